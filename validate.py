"""Evaluate a CSPResNet-50 checkpoint on an ImageNet-layout validation folder.

    python validate.py --checkpoint runs/cspresnet50/best.pt --data-dir /data/imagenet
    python validate.py --checkpoint cspresnet50_ra-d3e8d487.pth --data-dir /data/imagenet
    torchrun --nproc_per_node=8 validate.py --checkpoint model.safetensors --data-dir /data/imagenet

Reads our training checkpoints (model or EMA weights), timm's .pth state dicts and
.safetensors files; the number of classes comes from the weights. The last line printed
is a JSON object with top1, top5 (percent), images and the settings used.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from cspresnet.checkpoint import CheckpointError, load_checkpoint
from cspresnet.distributed import init_distributed, shutdown
from cspresnet.engine import evaluate
from cspresnet.model import build_model
from cspresnet.recipe import DataConfig, RecipeError, recipe_from_dict
from cspresnet.weights import extract_state_dict, load_weights_strict, num_classes_of
from data.imagenet import DatasetLayoutError, ImageFolderDataset, find_classes, index_split
from data.loader import build_eval_loader
from data.transforms import DeviceNormalizer, INTERPOLATIONS, eval_transform


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="last.pt/best.pt, timm .pth, or .safetensors")
    parser.add_argument("--data-dir", required=True, help="ImageNet root (uses DIR/<split>/<wnid>/*.JPEG)")
    parser.add_argument("--split", default="val", help="subfolder of --data-dir to evaluate (default: val)")
    parser.add_argument("--weights", choices=["auto", "model", "ema"], default="auto",
                        help="which weights of a training checkpoint (default: EMA when present)")
    parser.add_argument("--img-size", type=int, help="crop size (default: the checkpoint's recipe, else 256)")
    parser.add_argument("--crop-pct", type=float, help="resize short side to img_size / crop_pct (default 0.887)")
    parser.add_argument("--interpolation", choices=sorted(INTERPOLATIONS), help="resize filter (default bilinear)")
    parser.add_argument("--batch-size", type=int, default=256, help="global batch (default 256)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="loader processes per rank")
    parser.add_argument("--amp", choices=["bf16", "fp16", "none"], default="none", help="autocast dtype (default none: fp32)")
    parser.add_argument("--channels-last", action="store_true", help="run the model in channels_last memory format")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--results-file", help="also write the JSON result here")
    args = parser.parse_args(argv)
    if args.img_size is not None and args.img_size < 32:
        parser.error(f"--img-size must be >= 32 (the network downsamples 32x), got {args.img_size}")
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        parser.error(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
    if args.batch_size < 1 or args.workers < 0:
        parser.error("--batch-size must be >= 1 and --workers >= 0")
    return args


def eval_settings(args: argparse.Namespace, checkpoint: dict) -> DataConfig:
    """Command line first, then the checkpoint's recipe, then timm's cspresnet50 defaults."""
    data = recipe_from_dict(checkpoint["recipe"]).data if isinstance(checkpoint.get("recipe"), dict) else DataConfig()
    data.eval_img_size = args.img_size or data.eval_img_size
    data.eval_crop_pct = args.crop_pct or data.eval_crop_pct
    data.eval_interpolation = args.interpolation or data.eval_interpolation
    return data


def main(argv=None) -> dict:
    args = parse_args(argv)
    checkpoint = load_checkpoint(Path(args.checkpoint))
    state_dict, weights = extract_state_dict(checkpoint, args.weights)
    num_classes = num_classes_of(state_dict)
    settings = eval_settings(args, checkpoint)

    ctx = init_distributed(args.device)
    model = build_model(num_classes)
    load_weights_strict(model, state_dict)
    model = model.to(ctx.device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)

    split_dir = Path(args.data_dir).expanduser() / args.split
    classes = find_classes(split_dir)
    if len(classes) != num_classes:
        raise DatasetLayoutError(f"{split_dir} has {len(classes)} class folders but the checkpoint has {num_classes} classes")
    transform = eval_transform(settings.eval_img_size, settings.eval_crop_pct, settings.eval_interpolation)
    dataset = ImageFolderDataset(index_split(split_dir, classes), classes, transform)
    loader = build_eval_loader(dataset, -(-args.batch_size // ctx.world_size), ctx.world_size, ctx.rank,
                               args.workers, pin_memory=ctx.device.type == "cuda")
    normalize = DeviceNormalizer(ctx.device, args.channels_last)
    result = evaluate(model, loader, len(dataset), num_classes, normalize, args.amp,
                      on_unreadable=lambda index, reason: print(
                          f"warning: skipping unreadable image {dataset.samples[index][0]} ({reason})", file=sys.stderr),
                      progress=lambda it: tqdm(it, desc="eval", disable=None if ctx.is_main else True, leave=False))

    summary = dict(
        top1=round(result.top1, 3), top5=round(result.top5, 3), images=result.images, unreadable=result.unreadable,
        eval_loss=round(result.loss, 5),
        checkpoint=str(args.checkpoint), weights=weights, num_classes=num_classes,
        img_size=settings.eval_img_size, crop_pct=settings.eval_crop_pct, interpolation=settings.eval_interpolation,
        amp=args.amp, channels_last=args.channels_last, world_size=ctx.world_size, device=ctx.device.type,
        images_per_s=round(result.images / max(result.seconds, 1e-9), 1),
    )
    if ctx.is_main:
        if args.results_file:
            Path(args.results_file).write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary), flush=True)
    shutdown()
    return summary


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, DatasetLayoutError, RecipeError) as exc:
        sys.exit(f"error: {exc}")
