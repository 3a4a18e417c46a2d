"""Train CSPResNet-50 from a recipe, in one process or many (torchrun).

    python train.py --recipe demo.yaml
    torchrun --nproc_per_node=8 train.py --recipe cspresnet50.yaml --data-dir /data/imagenet
    torchrun --nproc_per_node=8 --max-restarts=3 train.py --recipe cspresnet50.yaml --data-dir /data/imagenet --resume auto
    python train.py --recipe cspresnet50.yaml --print-recipe optim.lr=0.2
    python train.py --recipe finetune.yaml --data-dir my_images --initial-weights cspresnet50_ra-d3e8d487.pth

Exit codes: 0 done; 75 stopped by SIGTERM/SIGINT after saving a checkpoint, however many
times the stop was delivered (rerun with --resume auto); 2 bad recipe, data, checkpoint or run
folder (one line on stderr, before any training where it can be known then); 3 numerical
failure (non-finite loss); 1 any other failure: a stalled loader or a full /dev/shm in one
line, anything else with its traceback; 130 a second Ctrl-C, and 128+N no exit within
runtime.stop_timeout_s of the first signal N, both without saving. Rank 0 also writes the
outcome to <run folder>/status.
"""
import signal

# A stop signal while Python imports torch (seconds) is kept, not fatal: the run acts on it as
# soon as it can write its status (exit 75; cspresnet/signals.py).
EARLY_SIGNALS = []
if __name__ == "__main__":
    for _stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(_stop, lambda signum, frame: EARLY_SIGNALS.append(signum))

import argparse  # noqa: E402  (after the handlers above)
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from cspresnet.console import run_script, setup_logging  # noqa: E402
from cspresnet.distributed import init_distributed, shutdown  # noqa: E402
from cspresnet.recipe import describe_recipe, load_recipe  # noqa: E402
from cspresnet.training import train  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="a recipe file, or a name in recipes/ (cspresnet50.yaml)")
    parser.add_argument("--data-dir", help="ImageNet root with train/ and val/ (sets data.dir)")
    parser.add_argument("--output", help="run folder (default: runs/<recipe name>)")
    parser.add_argument("--resume", metavar="PATH|auto",
                        help="continue from a checkpoint; auto: the newest in the run folder, or a fresh start")
    parser.add_argument("--initial-weights", metavar="PATH",
                        help="start a new run from these weights (sets model.initial_weights): timm's .pth, "
                             ".safetensors, our best.pt/last.pt; unlike --resume, optimizer and schedule start fresh")
    parser.add_argument("--print-recipe", action="store_true",
                        help="print the resolved recipe as YAML, each value with the file and comment that set it, and exit")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides, e.g. optim.lr=0.2")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.initial_weights is not None:  # quoted, so that YAML reads any path as a string
        overrides.append(f"model.initial_weights={json.dumps(args.initial_weights)}")
    recipe = load_recipe(args.recipe, overrides, args.data_dir)
    if args.print_recipe:
        print(describe_recipe(args.recipe, overrides, args.data_dir), end="")
        return 0
    ctx = init_distributed(recipe.runtime.device, recipe.runtime.collective_timeout_s)
    code = train(recipe, ctx, Path(args.output or Path("runs") / Path(args.recipe).stem), args.resume, EARLY_SIGNALS)
    shutdown()
    return code


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(int(os.environ.get("RANK", "0")))  # torchrun sets RANK before the process starts
    return run_script(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
