"""Train CSPResNet-50 from a recipe, in one process or many (torchrun).

    python train.py --recipe demo.yaml
    torchrun --nproc_per_node=8 train.py --recipe cspresnet50.yaml --data-dir /data/imagenet
    python train.py --recipe cspresnet50.yaml --print-recipe optim.lr=0.2
"""
import argparse
import json
import random
import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from cspresnet.checkpoint import TRAIN_CHECKPOINT_FORMAT, CheckpointError, load_checkpoint, save_checkpoint
from cspresnet.distributed import barrier, init_distributed, shutdown
from cspresnet.engine import evaluate, train_one_epoch
from cspresnet.model import build_model
from cspresnet.optim import build_optimizer, build_schedule
from cspresnet.recipe import RecipeError, load_recipe, recipe_to_dict, recipe_to_yaml
from cspresnet.run_log import RunLog
from data.imagenet import DatasetLayoutError
from data.pipeline import build_loaders
from data.transforms import DeviceNormalizer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="a recipe file, or a name in recipes/ (cspresnet50.yaml)")
    parser.add_argument("--data-dir", help="ImageNet root with train/ and val/ (sets data.dir)")
    parser.add_argument("--output", help="run folder (default: runs/<recipe name>)")
    parser.add_argument("--resume", metavar="PATH|auto", help="continue from a checkpoint; auto: OUTPUT/last.pt if it exists")
    parser.add_argument("--print-recipe", action="store_true", help="print the resolved recipe as YAML and exit")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides, e.g. optim.lr=0.2")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides, args.data_dir)
    if args.print_recipe:
        print(recipe_to_yaml(recipe), end="")
        return
    output = Path(args.output or Path("runs") / Path(args.recipe).stem)
    resume_from = find_resume_checkpoint(args.resume, output)

    ctx = init_distributed(recipe.runtime.device)
    torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
    random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    rt = recipe.runtime
    data = build_loaders(recipe, ctx.rank, ctx.world_size, pin_memory=ctx.device.type == "cuda")
    memory_format = torch.channels_last if rt.channels_last else torch.contiguous_format
    model = build_model(recipe.model.num_classes, recipe.model.drop_rate, recipe.model.drop_path_rate)
    model = model.to(ctx.device, memory_format=memory_format)
    optimizer = build_optimizer(model, recipe)
    schedule = build_schedule(recipe, len(data.train_sampler))
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=rt.amp == "fp16")
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    normalize = DeviceNormalizer(ctx.device, rt.channels_last)

    start_epoch, step, best_top1 = 0, 0, float("-inf")
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, step, best_top1 = state["epoch"], state["step"], state["best_top1"]
    train_model = DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None) \
        if ctx.is_distributed else model
    if rt.compile:
        train_model = torch.compile(train_model)

    log = RunLog(output, enabled=ctx.is_main)
    if ctx.is_main:
        output.mkdir(parents=True, exist_ok=True)
        (output / "recipe.yaml").write_text(recipe_to_yaml(recipe))
        print(f"{ctx.world_size} process(es) on {ctx.device.type}; {len(data.train_set)} train / "
              f"{len(data.val_set)} val images; global batch {recipe.batch_size}; lr {recipe.scaled_lr():g} "
              f"(optim.lr {recipe.optim.lr:g} x {recipe.batch_size}/{recipe.optim.reference_batch_size} "
              f"{recipe.optim.lr_scaling}); {schedule.total} steps; output {output}", flush=True)
        if schedule.burn_in >= schedule.total:
            print(f"warning: the burn-in ({schedule.burn_in} steps) is longer than the run ({schedule.total} steps); "
                  f"the learning rate never reaches {schedule.base_lr:g}", flush=True)
        if resume_from is not None:
            print(f"resumed from {resume_from} at epoch {start_epoch}, step {step}", flush=True)

    for epoch in range(start_epoch, recipe.epochs):
        data.train_sampler.set_epoch(epoch)
        stats = train_one_epoch(train_model, data.train, normalize, optimizer, schedule, scaler, criterion, rt.amp,
                                step, rt.log_interval, on_log=log.step, show_progress=ctx.is_main,
                                description=f"epoch {epoch + 1}/{recipe.epochs}")
        step = stats.step
        result = evaluate(model, data.val, data.val_indices, len(data.val_set), recipe.model.num_classes,
                          normalize, rt.amp, show_progress=ctx.is_main)
        is_best = result.top1 > best_top1
        best_top1 = max(best_top1, result.top1)
        log.epoch(dict(epoch=epoch + 1, step=step, lr=stats.lr, train_loss=stats.loss, eval_loss=result.loss,
                       top1=result.top1, top5=result.top5, images_per_s=stats.images_per_s,
                       epoch_seconds=stats.seconds, eval_seconds=result.seconds))
        if ctx.is_main:
            state = dict(format=TRAIN_CHECKPOINT_FORMAT, model=model.state_dict(), optimizer=optimizer.state_dict(),
                         scaler=scaler.state_dict(), epoch=epoch + 1, step=step, best_top1=best_top1,
                         metrics=dict(top1=result.top1, top5=result.top5, eval_loss=result.loss),
                         recipe=recipe_to_dict(recipe))
            save_checkpoint(state, output / "last.pt")
            if is_best:
                save_checkpoint(state, output / "best.pt")
        barrier()

    log.close()
    if ctx.is_main:
        print(json.dumps(dict(best_top1=best_top1, epochs=recipe.epochs, steps=step, output=str(output))), flush=True)
    shutdown()


def find_resume_checkpoint(resume: str, output: Path):
    """The checkpoint to continue from, or None for a fresh run that must not overwrite one."""
    if resume is None:
        if (output / "last.pt").exists():
            raise CheckpointError(
                f"{output} already holds a run (last.pt); pass --resume auto to continue it, "
                f"or --output NEW_FOLDER to start another"
            )
        return None
    if resume == "auto":
        last = output / "last.pt"
        return last if last.exists() else None
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"--resume {resume}: no such checkpoint file")
    return path


if __name__ == "__main__":
    try:
        main()
    except (RecipeError, DatasetLayoutError, CheckpointError) as exc:
        sys.exit(f"error: {exc}")
