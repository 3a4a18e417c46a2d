"""Evaluate a CSPResNet-50 checkpoint on an ImageNet validation set, in any common layout.

    python validate.py --checkpoint runs/cspresnet50/best.pt --data-dir /data/imagenet
    python validate.py --model cspresnet50.ra_in1k --pretrained --data-dir /data/imagenet
    python validate.py --checkpoint cspresnet50_ra-d3e8d487.pth --data-dir /data/imagenet --real-labels
    python validate.py --checkpoint model.safetensors --data-dir /data/val_flat --devkit ILSVRC2012_devkit_t12.tar.gz
    torchrun --nproc_per_node=8 validate.py --checkpoint best.pt --data-dir /data/imagenet --results-file r.json

Reads our training checkpoints (model or EMA weights), timm's .pth state dicts,
.safetensors files and DDP's module.-prefixed state dicts, and timm's published weights by
name (--model cspresnet50.ra_in1k --pretrained, or --checkpoint hf-hub:timm/cspresnet50.ra_in1k)
through the Hugging Face hub's cache (HF_HOME, HF_HUB_OFFLINE); the number of classes comes
from the weights. timm's flags where they mean the same: docs/from-timm.md.

The evaluation folder is DIR/<split> if it exists, else DIR: class folders, ImageNetV2's
numbered folders, a flat folder with the devkit or Kaggle's solution file, or WebDataset tar
shards named <name>-<split>-NN.tar (docs/shards.md; --split val also takes -validation-).
ImageNet as downloaded (the folder of the official archives, Kaggle's zip or its unzipped
tree) is read as it is (docs/archives.md). A DIR
that holds other splits (train/, val/, validation/, test/) but not <split> is refused.
The last line printed is JSON with top1, top5 (percent), images and the settings used.

Exit codes:
    0  evaluated (images that could not be decoded are skipped, each with a warning)
    1  any other failure: a stalled loader or a full /dev/shm in one line, anything else
       with its traceback
    2  a bad checkpoint, weights name, data folder or option, or nothing could be evaluated:
       one line "error: ..." on stderr says which (argparse's own usage errors also exit 2)
"""
import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path

import torch
from tqdm import tqdm

from common.errors import DatasetLayoutError, OptionError, UnreadableDataError
from cspresnet.checkpoint import Weights, read_weights
from cspresnet.console import exit_now, run_script, setup_logging
from cspresnet.distributed import init_distributed, shutdown
from cspresnet.engine import EvalResult, configure_kernels, evaluate
from cspresnet.reports import VAL_NAME, append_csv_row, real_accuracy, timm_results_row
from cspresnet.weights import hub_repo, load_cspresnet, pretrained_name, trained_data_config, weights_file
from data.config import DataConfig
from data.loaders import build_eval_data
from data.sources import EvalSet, evaluation_set
from data.sources.labels import default_classes
from data.transforms import INTERPOLATIONS, DevicePreprocess, decode_path, memory_format

log = logging.getLogger("cspresnet.validate")
AMP_DTYPES = {"bfloat16": "bf16", "float16": "fp16"}  # timm's --amp-dtype names, and ours


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="last.pt/best.pt, timm .pth, .safetensors, or a hub name "
                                              "(hf-hub:timm/cspresnet50.ra_in1k)")
    parser.add_argument("--model", "-m", metavar="NAME",
                        help="cspresnet50 or cspresnet50.ra_in1k; without --checkpoint, its published weights")
    parser.add_argument("--pretrained", action="store_true",
                        help="timm's published weights of --model (default cspresnet50.ra_in1k), via the hub's cache")
    parser.add_argument("--data-dir", required=True, help="ImageNet root, or the evaluation folder itself")
    parser.add_argument("--split", default="val",
                        help="subfolder of --data-dir to evaluate, if present (default: val); "
                             "a --data-dir holding train/, val/, validation/ or test/ must have it")
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--devkit", type=Path, help="labels of a flat folder: ILSVRC2012_devkit_t12.tar.gz or meta.bin")
    labels.add_argument("--val-solution", type=Path, help="labels of a flat folder: Kaggle's LOC_val_solution.csv")
    parser.add_argument("--index-dir", "--shard-index-dir", default="",
                        help="where the index of tar shards is cached (default: beside them, or ~/.cache/cspresnet)")
    parser.add_argument("--weights", choices=["auto", "model", "ema"], default="auto",
                        help="which weights of a training checkpoint (default: EMA when present)")
    parser.add_argument("--img-size", type=int, help="crop size (default: the checkpoint's recipe, else 256)")
    parser.add_argument("--crop-pct", type=float, help="resize short side to img_size / crop_pct (default 0.887)")
    parser.add_argument("--interpolation", choices=sorted(INTERPOLATIONS), help="resize filter (default bilinear)")
    parser.add_argument("--decode", choices=["full", "fast"],
                        help="full: timm's transform bit for bit (default); fast: libjpeg-turbo, one-step crop and resize")
    parser.add_argument("-b", "--batch-size", type=int, default=256, help="global batch (default 256)")
    parser.add_argument("-j", "--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="loader processes per rank")
    parser.add_argument("--amp", nargs="?", const="on", default="none", choices=["on", "bf16", "fp16", "none"],
                        metavar="DTYPE", help="autocast in --amp-dtype (timm's switch; default off: fp32); "
                                              "--amp bf16|fp16|none, the older spelling, names the dtype itself")
    parser.add_argument("--amp-dtype", choices=sorted(AMP_DTYPES), default="float16",
                        help="the dtype of --amp (default float16, as timm's validate.py)")
    parser.add_argument("--channels-last", action="store_true", help="run the model in channels_last memory format")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--real-labels", action="store_true", help="also report ImageNet-ReaL top-1/top-5")
    parser.add_argument("--results-file", type=Path,
                        help="write the result here: timm's CSV columns, or the JSON line with per-class top-1")
    parser.add_argument("--results-format", choices=["csv", "json"],
                        help="of --results-file (default: json for a .json name, else csv, as timm)")
    parser.add_argument("--results-csv", type=Path, help="append a row like timm's results-imagenet.csv here")
    parser.add_argument("--logits-file", type=Path, help="save every image's logits and path (torch.save) here")
    parser.add_argument("--name", help="model name in the CSV results (default: the weights' name or file name)")
    args = parser.parse_args(argv)
    args.amp = AMP_DTYPES[args.amp_dtype] if args.amp == "on" else args.amp
    args.results_format = args.results_format or ("json" if str(args.results_file).endswith(".json") else "csv")
    return args


def weights_name(args: argparse.Namespace) -> str:
    """--checkpoint, or timm's --model NAME [--pretrained]: without a checkpoint, timm evaluates published weights."""
    published = pretrained_name(args.model or "cspresnet50")
    if args.checkpoint and args.pretrained:
        raise OptionError("--pretrained and --checkpoint both name weights: give one")
    if args.checkpoint or args.model or args.pretrained:
        return args.checkpoint or published
    raise OptionError("no weights: give --checkpoint FILE (or hf-hub:timm/cspresnet50.ra_in1k), or --model "
                      "cspresnet50.ra_in1k --pretrained")


# The options that set the data section's evaluation keys, and so name them in its checks.
OPTION_OF_KEY = {"eval_img_size": "--img-size", "eval_crop_pct": "--crop-pct", "eval_batch_size": "--batch-size",
                 "workers": "--workers"}


def eval_settings(args: argparse.Namespace, weights: Weights) -> DataConfig:
    """Command line first, then the checkpoint's recipe, then timm's cspresnet50 defaults;
    checked by the data section's own checks, which name the options."""
    data = trained_data_config(weights)
    given = dict(eval_img_size=args.img_size, eval_crop_pct=args.crop_pct, eval_interpolation=args.interpolation,
                 eval_decode=args.decode, eval_batch_size=args.batch_size, workers=args.workers)
    data = dataclasses.replace(data, **{key: value for key, value in given.items() if value is not None})
    data.check_evaluation(key=lambda name: OPTION_OF_KEY.get(name, f"recipe key 'data.{name}'"))
    return data


def check_output_paths(args: argparse.Namespace) -> None:
    """Every file validate.py would write must have a folder to go in: fail now, not after evaluating."""
    for option, path in (("--results-file", args.results_file), ("--results-csv", args.results_csv),
                         ("--logits-file", args.logits_file)):
        if path is None:
            continue
        if path.is_dir():
            raise OptionError(f"{option} {path} is a folder; give a file name")
        if not path.parent.is_dir():
            raise OptionError(f"{option} {path}: its folder {path.parent} does not exist")


def numbered(classes) -> bool:
    """Classes known by number only (ImageNetV2's folders, shards without class names)."""
    return all(name.isdigit() for name in classes)


def check_labels(eval_set: EvalSet, trained_classes, num_classes: int, real_labels: bool) -> None:
    """Refuse an evaluation whose labels cannot mean what the model's outputs mean."""
    if len(eval_set.classes) != num_classes:
        raise DatasetLayoutError(f"the evaluation set has {len(eval_set.classes)} classes ({eval_set.layout}) "
                                 f"but the checkpoint has {num_classes}")
    if trained_classes and not numbered(trained_classes) and not numbered(eval_set.classes) \
            and list(trained_classes) != eval_set.classes:
        differ = next(i for i, (a, b) in enumerate(zip(trained_classes, eval_set.classes)) if a != b)
        raise DatasetLayoutError(f"class {differ} is {trained_classes[differ]} in the checkpoint but "
                                 f"{eval_set.classes[differ]} in the evaluation set: not the same classes")
    if real_labels:
        odd = [path for path, _ in eval_set.samples if not VAL_NAME.match(Path(path).name)]
        if num_classes != 1000 or odd:
            raise DatasetLayoutError("--real-labels needs the 1000 ImageNet classes and the validation images' "
                                     f"own names (ILSVRC2012_val_*.JPEG); e.g. {odd[:1]}")


def main(argv=None) -> dict:
    """Evaluate and return the summary (also the last line printed, as JSON); bad input
    raises an error that run_script turns into one line and exit code 2."""
    args = parse_args(argv)
    check_output_paths(args)
    args.checkpoint = weights_name(args)
    file = weights_file(args.checkpoint)
    if str(file) != args.checkpoint:
        log.info("weights %s: %s", args.checkpoint, file)
    weights = read_weights(file, args.weights)
    model = load_cspresnet(weights)
    settings = eval_settings(args, weights)
    eval_set = evaluation_set(Path(args.data_dir).expanduser(), args.split, args.devkit or args.val_solution,
                              weights.classes or default_classes(model.num_classes), args.index_dir)
    folder = eval_set.folder
    check_labels(eval_set, weights.classes, model.num_classes, args.real_labels)

    ctx = init_distributed(args.device)
    configure_kernels(deterministic=False)  # eval shapes are fixed: let cuDNN pick its fastest kernels
    model = model.to(ctx.device, memory_format=memory_format(args.channels_last))
    dataset, loader = build_eval_data(eval_set.samples, eval_set.classes, settings, ctx)
    log.info("%d images (%s) in %s; JPEGs: %s", len(dataset), eval_set.layout, folder,
             decode_path(settings.eval_decode))
    result = evaluate(model, loader, model.num_classes, DevicePreprocess(ctx.device, args.channels_last), args.amp,
                      keep_logits=args.logits_file is not None,
                      progress=lambda it: tqdm(it, desc="eval", disable=None if ctx.is_main else True, leave=False))
    if result.images == 0:  # every rank sees the gathered result, so every rank stops here
        shutdown()
        index, reason = result.unreadable[0]
        raise UnreadableDataError(f"none of the {len(dataset)} images in {folder} could be decoded "
                                  f"(e.g. {dataset.samples[index][0]}: {reason})")
    paths = [dataset.samples[i][0] for i in result.indices.tolist()]
    summary = dict(
        top1=round(result.top1, 3), top5=round(result.top5, 3), images=result.images,
        unreadable=len(result.unreadable), eval_loss=round(result.loss, 5), checkpoint=str(args.checkpoint),
        weights=weights.kind, num_classes=model.num_classes, layout=eval_set.layout, img_size=settings.eval_img_size,
        crop_pct=settings.eval_crop_pct, interpolation=settings.eval_interpolation, decode=settings.eval_decode,
        amp=args.amp, channels_last=args.channels_last, world_size=ctx.world_size, device=ctx.device.type,
        images_per_s=round(result.images / max(result.seconds, 1e-9), 1),
    )
    if args.real_labels:
        summary.update({k: round(v, 3) for k, v in real_accuracy(result.predictions, paths).items()})
    if ctx.is_main:
        write_reports(args, summary, result, eval_set, paths, model, settings)
        print(json.dumps(summary), flush=True)
    shutdown()
    return summary


def write_reports(args: argparse.Namespace, summary: dict, result: EvalResult, eval_set: EvalSet, paths,
                  model: torch.nn.Module, settings: DataConfig) -> None:
    """--results-file (a new file: timm's CSV columns, or JSON), --results-csv (a row appended), --logits-file."""
    repo = hub_repo(args.checkpoint)
    name = args.name or (repo.split("@")[0].split("/")[-1] if repo else Path(args.checkpoint).stem)
    row = timm_results_row(name, result, sum(p.numel() for p in model.parameters()), settings)
    if args.results_file and args.results_format == "json":
        full = dict(summary, per_class_top1=dict(zip(eval_set.classes, result.per_class_top1(model.num_classes))))
        args.results_file.write_text(json.dumps(full, indent=2) + "\n")
    elif args.results_file:
        args.results_file.unlink(missing_ok=True)
        append_csv_row(args.results_file, row)
    if args.results_csv:
        append_csv_row(args.results_csv, row)
    if args.logits_file:
        torch.save({"paths": paths, "targets": result.targets, "logits": result.logits}, args.logits_file)


def cli(argv=None) -> int:
    setup_logging(int(os.environ.get("RANK", "0")))
    return run_script(lambda: main(argv) and 0)


if __name__ == "__main__":
    exit_now(cli())
