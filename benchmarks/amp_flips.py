"""How far autocast moves validate.py's predictions from fp32: top-1 flips, top-5 changes
and logit differences, for bf16 and fp16, on the same images and weights.

    python -m benchmarks.amp_flips --data-dir bench_imagenet --images 3000
    python -m benchmarks.amp_flips --data-dir sample_imagenet --checkpoint runs/demo/best.pt

No ImageNet weights can be downloaded here. Without --checkpoint the model is a stand-in:
timm's cspresnet50 with perturbed BatchNorm and a head centred on these images, which
spreads its top-1 over 1000 classes. An untrained backbone's features are mostly common
to all images, so its top-1 margins are far smaller than a trained model's, and its flips
overstate what a trained model shows; the median margins are reported beside them.
"""
import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Tuple

import torch
from timm.data import ImageDataset, create_transform, resolve_data_config

from benchmarks.common import print_result, stand_in_timm_model
from data.sources import evaluation_set

AMPS = ("bf16", "fp16")  # compared with fp32


def centred_weights(folder: Path, path: Path, num_classes: int, seed: int = 0) -> None:
    """The stand-in model, its head bias shifted so that the mean logit on (up to 256 of)
    these images is zero for every class; saved as timm's plain state dict."""
    model = stand_in_timm_model(num_classes, seed)
    transform = create_transform(**resolve_data_config({}, model=model), is_training=False)
    dataset = ImageDataset(str(folder), transform=transform)
    batch = torch.stack([dataset[i][0] for i in range(min(256, len(dataset)))])
    with torch.no_grad():
        model.head.fc.bias -= model(batch).mean(0)
    torch.save(model.state_dict(), path)


def logits_for(weights: Path, folder: Path, amp: str, out: Path, extra) -> dict:
    command = [sys.executable, "validate.py", "--checkpoint", weights, "--data-dir", folder, "--amp", amp,
               "--logits-file", out, *extra]
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, command))} failed:\n{done.stderr[-3000:]}")
    return torch.load(out, weights_only=True)


def compare(reference: dict, other: dict) -> dict:
    assert reference["paths"] == other["paths"]
    ref, oth = reference["logits"].double(), other["logits"].double()
    top2 = ref.topk(2, dim=1).values
    flipped = ref.argmax(1) != oth.argmax(1)
    top5_changed = (ref.topk(5, dim=1).indices.sort(1).values != oth.topk(5, dim=1).indices.sort(1).values).any(1)
    margin = top2[:, 0] - top2[:, 1]
    return dict(images=len(ref), top1_flips=int(flipped.sum()),
                top1_flip_pct=round(100 * flipped.double().mean().item(), 3), top5_set_changes=int(top5_changed.sum()),
                max_abs_logit_diff=round((ref - oth).abs().max().item(), 4),
                relative_l2_diff=float(f"{((ref - oth).norm() / ref.norm()).item():.2e}"),
                median_fp32_top1_margin=round(margin.median().item(), 4),
                median_margin_of_flipped=round(margin[flipped].median().item(), 4) if flipped.any() else None)


def stand_in_folder(folder: Path, tmp: Path, images: int) -> Tuple[Path, Path]:
    """The first `images` of `folder` spread over up to 1000 class folders (links), and the
    stand-in weights for them: (folder, weights)."""
    subset = tmp / "images"
    samples = list(evaluation_set(folder).samples)[:images]
    classes = min(1000, len(samples))  # labels are not scored; validate.py wants a folder per class
    for index, (path, _) in enumerate(samples):
        target = subset / f"c{index % classes:04d}" / Path(path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(Path(path).resolve())
    weights = tmp / "stand_in.pth"
    centred_weights(subset, weights, classes)
    return subset, weights


def measure(data_dir: Path, checkpoint, images: int, device: str, workers: int, channels_last: bool,
            amps=AMPS) -> list:
    folder = evaluation_set(data_dir, "val").folder
    extra = ["--device", device, "--workers", workers, "--batch-size", 256]
    extra += ["--channels-last"] if channels_last else []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = checkpoint
        if checkpoint is None:
            folder, weights = stand_in_folder(folder, tmp, images)
        fp32 = logits_for(weights, folder, "none", tmp / "none.pt", extra)
        rows = []
        for amp in amps:
            row = dict(weights="stand-in" if checkpoint is None else str(checkpoint), amp=amp, device=device,
                       channels_last=channels_last)
            row.update(compare(fp32, logits_for(weights, folder, amp, tmp / f"{amp}.pt", extra)))
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, type=Path, help="an ImageNet-layout folder (its val/ is used)")
    parser.add_argument("--checkpoint", type=Path,
                        help="trained weights whose classes match the folder's (default: the stand-in, 1000 classes)")
    parser.add_argument("--images", type=int, default=3000, help="stand-in only: how many of the folder's images")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--contiguous", action="store_true", help="NCHW instead of channels_last")
    parser.add_argument("--amp", choices=AMPS, action="append",
                        help="which autocast dtypes to compare with fp32 (default both; one JSON line each)")
    args = parser.parse_args()
    for row in measure(args.data_dir, args.checkpoint, args.images, args.device, args.workers, not args.contiguous,
                       args.amp or AMPS):
        print_result(row)


if __name__ == "__main__":
    main()
