"""Train CSPResNet-50 from a recipe, in one process or many (torchrun).

    python train.py --recipe demo.yaml
    torchrun --nproc_per_node=8 train.py --recipe cspresnet50.yaml --data-dir /data/imagenet
    torchrun --nproc_per_node=8 --max-restarts=3 train.py --recipe cspresnet50.yaml --data-dir /data/imagenet --resume auto
    python train.py --recipe cspresnet50.yaml --print-recipe optim.lr=0.2

Exit codes: 0 done; 75 stopped by SIGTERM/SIGINT after saving a checkpoint (rerun with
--resume auto); 2 bad recipe, data, checkpoint or run folder (one line on stderr, before any
training where it can be known then); 3 numerical failure (non-finite loss); 1 any other
failure, with its traceback; 128+N ended by a second signal N, or by no exit within
runtime.stop_timeout_s of the first, without saving. Rank 0 also writes the outcome to
<run folder>/status.
"""
import argparse
import sys
from pathlib import Path

from cspresnet.checkpoint import CheckpointError
from cspresnet.distributed import init_distributed, shutdown
from cspresnet.engine import NonFiniteLossError
from cspresnet.fit import FinalCheckpointError, fit
from cspresnet.recipe import describe_recipe
from cspresnet.recipe import RecipeError, load_recipe
from cspresnet.run_folder import RunFolderError
from cspresnet.signals import end_child_processes
from data.imagenet import DatasetLayoutError, UnreadableDataError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="a recipe file, or a name in recipes/ (cspresnet50.yaml)")
    parser.add_argument("--data-dir", help="ImageNet root with train/ and val/ (sets data.dir)")
    parser.add_argument("--output", help="run folder (default: runs/<recipe name>)")
    parser.add_argument("--resume", metavar="PATH|auto",
                        help="continue from a checkpoint; auto: the newest in the run folder, or a fresh start")
    parser.add_argument("--print-recipe", action="store_true",
                        help="print the resolved recipe as YAML, each value with the file and comment that set it, and exit")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides, e.g. optim.lr=0.2")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides, args.data_dir)
        if args.print_recipe:
            print(describe_recipe(args.recipe, args.overrides, args.data_dir), end="")
            return 0
        ctx = init_distributed(recipe.runtime.device, recipe.runtime.collective_timeout_s)
        output = Path(args.output or Path("runs") / Path(args.recipe).stem)
        code = fit(recipe, ctx, output, args.resume)
    except (RecipeError, DatasetLayoutError, UnreadableDataError, CheckpointError, RunFolderError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 3
    except FinalCheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    except RuntimeError as exc:
        if "unable to allocate shared memory" not in str(exc):
            raise
        print(f"error: a loader worker ran out of shared memory ({str(exc).strip().splitlines()[-1]}); /dev/shm is "
              f"too small for data.workers: lower it, or give the job more (Docker: --shm-size=8g or --ipc=host)",
              file=sys.stderr, flush=True)
        return 1
    finally:
        end_child_processes()  # an error must end the loader workers too, or the exit would wait for them
    shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
