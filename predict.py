"""Predict the classes of images with a CSPResNet-50 checkpoint: one JSON line per image.

    python predict.py --checkpoint runs/finetune/best.pt photos/ cat.jpg
    python predict.py --checkpoint cspresnet50_ra-d3e8d487.pth --topk 3 ILSVRC2012_val_00000001.JPEG
    python predict.py --checkpoint hf-hub:timm/cspresnet50.ra_in1k photos/

Each line, in the order of the arguments (a folder: its image files, sorted, subfolders included):

    {"image": "photos/cat.jpg", "top": [{"index": 3, "class": "cat", "name": "cat", "probability": 0.912}, ...]}
    {"image": "photos/broken.jpg", "error": "UnidentifiedImageError: cannot identify image file ..."}

"class" is the training class folder's name, which every checkpoint of ours saves; for a
1000-class checkpoint without names (timm's .pth) the ImageNet synset in timm's order. "name"
is the synset's description from timm's package data ("tench, Tinca tinca"), or the class
itself. Images go through timm's evaluation transform with the checkpoint's settings (its
recipe's data.eval_*, else 256 px, crop 0.887, bilinear), as in validate.py. --checkpoint also
takes a hub name (hf-hub:timm/cspresnet50.ra_in1k, or timm's cspresnet50.ra_in1k), read
through the Hugging Face hub's cache (HF_HOME, HF_HUB_OFFLINE).

Exit codes: 0 predicted (unreadable files get their error line, and a warning, and the rest go
on); 1 any other failure (a stalled loader in one line, anything else with its traceback); 2 a bad
checkpoint, weights name or option, a path that does not exist, or no image could be read.
"""
import argparse
import json
import os
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from timm.data import ImageNetInfo

from common.errors import CheckpointError, OptionError, UnreadableDataError
from common.processes import DistContext
from cspresnet.checkpoint import read_weights
from cspresnet.console import exit_now, run_script, setup_logging
from cspresnet.weights import load_cspresnet, trained_data_config, weights_file
from data.loader_faults import Batches
from data.loaders import build_eval_data
from data.sources.labels import IMAGE_EXTENSIONS, default_classes
from data.transforms import DevicePreprocess
from data.unreadable import warn_unreadable


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="best.pt/last.pt, timm .pth, .safetensors, or a hub "
                                                             "name (hf-hub:timm/cspresnet50.ra_in1k)")
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, or folders of them")
    parser.add_argument("--topk", "--top-k", dest="top_k", type=int, default=5, help="classes per image (default 5)")
    parser.add_argument("--weights", choices=["auto", "model", "ema"], default="auto",
                        help="which weights of a training checkpoint (default: EMA when present)")
    parser.add_argument("-b", "--batch-size", type=int, default=32)
    parser.add_argument("-j", "--workers", type=int, default=min(4, os.cpu_count() or 1), help="decoding processes")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1 or args.workers < 0:
        parser.error("--topk and --batch-size must be >= 1, --workers >= 0")
    return args


def image_paths(inputs: Sequence[str]) -> List[str]:
    """Files as given, whatever their extension (a user who names a file means it); under a
    folder, every image file (data.sources.labels's extensions), subfolders included, sorted."""
    paths = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            for folder, subfolders, files in os.walk(path):
                subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
                paths += [os.path.join(folder, name) for name in sorted(files) if not name.startswith(".")
                          and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS]
        elif path.is_file():
            paths.append(str(path))
        else:
            raise OptionError(f"{item}: no such file or folder")
    if not paths:
        raise OptionError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(inputs)}")
    return paths


def class_names(classes: Optional[List[str]], num_classes: int) -> Tuple[List[str], List[str]]:
    """(class, name) of each output: see the module's docstring."""
    if classes is None:
        classes = default_classes(num_classes)
    if len(classes) != num_classes:
        raise CheckpointError(f"the checkpoint names {len(classes)} classes but its classifier has {num_classes}")
    descriptions = ImageNetInfo().label_descriptions(as_dict=True)
    return list(classes), [descriptions.get(name, name) for name in classes]


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise OptionError("--device cuda but no CUDA GPU is visible; use --device auto or cpu")
    return torch.device("cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu")


@torch.no_grad()
def predict(model: torch.nn.Module, loader, preprocess: DevicePreprocess,
            k: int) -> Iterator[Tuple[int, Optional[torch.Tensor], Optional[torch.Tensor], Optional[str]]]:
    """(dataset index, top-k probabilities, their class indices, None), or (index, None,
    None, why it could not be read), in dataset order."""
    model.eval()
    for batch in Batches(loader):  # under data.loader_timeout_s, as evaluation
        rows = {index: (None, None, reason) for index, reason in batch.unreadable}
        if len(batch.targets):
            top = model(preprocess(batch.images)).float().softmax(dim=1).topk(k, dim=1)
            for row, index in enumerate(batch.indices.tolist()):
                rows[index] = (top.values[row].cpu(), top.indices[row].cpu(), None)
        for index in sorted(rows):
            yield (index, *rows[index])


def main(argv=None) -> int:
    """Print a JSON line per image; bad input raises an error that run_script turns into one
    line and exit code 2."""
    args = parse_args(argv)
    paths = image_paths(args.images)
    device = pick_device(args.device)
    weights = read_weights(weights_file(args.checkpoint), args.weights)
    model = load_cspresnet(weights)
    classes, names = class_names(weights.classes, model.num_classes)
    settings = trained_data_config(weights)
    settings.eval_batch_size, settings.workers = args.batch_size, args.workers
    _, loader = build_eval_data([(path, 0) for path in paths], classes, settings, DistContext.alone(device))
    predicted = 0
    for index, probabilities, top, error in predict(model.to(device), loader, DevicePreprocess(device, False),
                                                    min(args.top_k, model.num_classes)):
        line = {"image": paths[index]}
        if error is not None:
            warn_unreadable(paths[index], error)
            line["error"] = error
        else:
            predicted += 1
            line["top"] = [{"index": i, "class": classes[i], "name": names[i], "probability": round(p, 6)}
                           for p, i in zip(probabilities.tolist(), top.tolist())]
        print(json.dumps(line), flush=True)
    if not predicted:
        raise UnreadableDataError(f"none of the {len(paths)} images could be read")
    return 0


def cli(argv=None) -> int:
    setup_logging(0)
    return run_script(lambda: main(argv))


if __name__ == "__main__":
    exit_now(cli())
