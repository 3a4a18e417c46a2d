"""Train CSPResNet-50 from a recipe, in one process or many (torchrun).

    python train.py --recipe demo.yaml
    torchrun --nproc_per_node=8 train.py --recipe cspresnet50.yaml --data-dir /data/imagenet
    torchrun --nproc_per_node=8 --max-restarts=3 train.py --recipe cspresnet50.yaml --data-dir /data/imagenet --resume auto
    python train.py --recipe cspresnet50.yaml --print-recipe optim.lr=0.2
    python train.py --recipe cspresnet50_fast.yaml --print-recipe --plot lr.png
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

from common.errors import OptionError  # noqa: E402
from cspresnet.console import exit_now, run_script, setup_logging  # noqa: E402
from cspresnet.distributed import init_distributed, shutdown  # noqa: E402
from cspresnet.plots import IMAGENET_TRAIN_IMAGES, plot_schedule  # noqa: E402
from cspresnet.recipe_files import describe_recipe, load_recipe  # noqa: E402
from cspresnet.training import train  # noqa: E402
from data.sources import expected_layouts  # noqa: E402

# timm train.py's flags (as of timm 1.0, 2026-08) that this script takes as recipe overrides, with the override
# ({} the flag's value) and where the meaning differs, how. A flag given gets this line, not "unrecognized".
TIMM_FLAGS = {
    "--lr": "optim.lr={} optim.lr_scaling=none (timm's --lr is the rate as used; optim.lr alone is for a global "
            "batch of optim.reference_batch_size and scales with batch_size)",
    "--lr-base": "optim.lr={} optim.reference_batch_size=256 optim.lr_scaling=linear (timm: lr_base x global "
                 "batch / --lr-base-size, 256 by default)",
    "--lr-base-size": "optim.reference_batch_size={}",
    "-b": "batch_size={} (the global batch, all processes and passes; timm's -b is per process and pass: -b N on "
          "P processes with --grad-accum-steps A is batch_size=N*P*A micro_batch_size=N)",
    "--grad-accum-steps": "micro_batch_size=M, the images of one pass per process (timm's -b N --grad-accum-steps "
                          "{} on P processes is batch_size=N*P*{} micro_batch_size=N)",
    "-vb": "data.eval_batch_size={} (global, all processes; timm's is per process)",
    "--epochs": "epochs={}",
    "--opt": "optim.name={} (sgd or rmsproptf; timm's sgd is Nesterov's: add optim.nesterov=true; timm's momentum "
             "is our sgd)",
    "--opt-eps": "optim.eps={}",
    "--momentum": "optim.momentum={}",
    "--weight-decay": "optim.weight_decay={} (not on BatchNorm and biases, as timm; optim.decay_norm_and_bias)",
    "--sched": "schedule.name={} (darknet_poly, linear, or step: timm's step with --sched-on-updates; no cosine)",
    "--warmup-epochs": "schedule.warmup_epochs={} (schedules step and linear; darknet_poly warms up over "
                       "schedule.burn_in_iters)",
    "--warmup-lr": "schedule.warmup_lr={}",
    "--decay-epochs": "schedule.decay_epochs={}",
    "--decay-rate": "schedule.decay_rate={}",
    "--smoothing": "label_smoothing={}",
    "--mixup": "augment.mixup_alpha={}",
    "--cutmix": "augment.cutmix_alpha={}",
    "--mixup-prob": "augment.mixup_prob={}",
    "--mixup-switch-prob": "augment.mixup_switch_prob={}",
    "--reprob": "augment.random_erasing={}",
    "--remode": "augment.random_erasing_mode={}",
    "--aa": "data.auto_augment={} (RandAugment policies, rand-...)",
    "--img-size": "data.img_size={} (the training crop; evaluation: data.eval_img_size)",
    "--crop-pct": "data.eval_crop_pct={}",
    "--train-interpolation": "data.train_interpolation={}",
    "--hflip": "data.hflip={}",
    "--drop": "model.drop_rate={}",
    "--drop-path": "model.drop_path_rate={}",
    "--num-classes": "model.num_classes={}",
    "--model-ema": "ema.enabled=true",
    "--model-ema-decay": "ema.decay={}",
    "--amp": "runtime.amp=fp16, timm's --amp alone (our default is runtime.amp=bf16, timm's --amp-dtype bfloat16; "
             "off: none)",
    "--amp-dtype": "runtime.amp=bf16 for bfloat16, runtime.amp=fp16 for float16 (none: off)",
    "--channels-last": "runtime.channels_last=true (on by default)",
    "--sync-bn": "runtime.sync_bn=true",
    "--torchcompile": "runtime.compile=true",
    "--device": "runtime.device={} (auto, cuda or cpu)",
    "--seed": "seed={}",
    "-j": "data.workers={} (per process, as timm's)",
    "--log-interval": "runtime.log_interval={}",
    "--recovery-interval": "checkpoint.every_steps={}",
    "--checkpoint-hist": "checkpoint.keep_last={} (the newest step-<N>.pt files; timm keeps the N best)",
    "--pretrained": "the option --initial-weights cspresnet50.ra_in1k",
    "--initial-checkpoint": "the option --initial-weights {}",
    "--model": "the option --recipe: this script trains cspresnet50 only, the recipe says how",
    "-c": "the option --recipe {} (a recipe YAML, not timm's file of flags)",
    "--experiment": "the option --output runs/{} (the run folder itself; timm's is <--output>/<--experiment>)",
}
TIMM_ALIASES = {"--batch-size": "-b", "--validation-batch-size": "-vb", "--workers": "-j", "--dr": "--decay-rate",
                "--config": "-c"}
TIMM_SWITCHES = ("--amp", "--model-ema", "--channels-last", "--sync-bn", "--torchcompile", "--pretrained")


def refuse_timm_flags(argv) -> None:
    """timm's flags that mean a recipe override here: one line with each flag's override."""
    said, tokens = [], list(argv)
    for i, token in enumerate(tokens):
        flag, _, value = token.partition("=")
        flag = TIMM_ALIASES.get(flag, flag)
        if flag not in TIMM_FLAGS:
            continue
        if flag not in TIMM_SWITCHES and not value:
            value = tokens[i + 1] if i + 1 < len(tokens) else "VALUE"
        said.append(f"{token.split('=')[0]}{'' if flag in TIMM_SWITCHES else ' ' + value} -> "
                    f"{TIMM_FLAGS[flag].format(value)}")
    if said:
        raise OptionError("train.py takes these timm flags as recipe overrides (key=value after the options) or "
                          "as its own options: " + "; ".join(said))


def parse_args(argv=None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    refuse_timm_flags(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="a recipe file, or a name in recipes/ (cspresnet50.yaml)")
    parser.add_argument("--data-dir", metavar="DIR", help="ImageNet as downloaded or arranged, read in place (sets "
                        "data.dir; data.layout=auto tells which): " + expected_layouts().replace("%", "%%"))
    parser.add_argument("--output", help="run folder (default: runs/<recipe name>)")
    parser.add_argument("--resume", metavar="PATH|auto",
                        help="continue from a checkpoint; auto: the newest in the run folder, or a fresh start")
    parser.add_argument("--initial-weights", metavar="PATH",
                        help="start a new run from these weights (sets model.initial_weights): timm's .pth, "
                             ".safetensors, our best.pt/last.pt; unlike --resume, optimizer and schedule start fresh")
    parser.add_argument("--print-recipe", action="store_true",
                        help="print the resolved recipe as YAML, each value with the file and comment that set it, and exit")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="draw the learning rate of each step of the run (and the training size where it "
                             "changes) into FILE.png and exit; no data is read")
    parser.add_argument("--plot-images", type=int, metavar="N", default=IMAGENET_TRAIN_IMAGES,
                        help="with --plot: training images per epoch (default: ImageNet's 1,281,167)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides, e.g. optim.lr=0.2")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.initial_weights is not None:  # quoted, so that YAML reads any path as a string
        overrides.append(f"model.initial_weights={json.dumps(args.initial_weights)}")
    recipe = load_recipe(args.recipe, overrides, args.data_dir)
    if args.print_recipe:
        print(describe_recipe(args.recipe, overrides, args.data_dir), end="")
    if args.plot:
        return plot_schedule(recipe, Path(args.plot), args.plot_images, Path(args.recipe).name)
    if args.print_recipe:
        return 0
    ctx = init_distributed(recipe.runtime.device, recipe.runtime.collective_timeout_s)
    code = train(recipe, ctx, Path(args.output or Path("runs") / Path(args.recipe).stem), args.resume, EARLY_SIGNALS)
    shutdown()
    return code


def main(argv=None) -> int:
    setup_logging(int(os.environ.get("RANK", "0")))  # torchrun sets RANK before the process starts
    return run_script(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    exit_now(main())
