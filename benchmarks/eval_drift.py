"""How far the fast evaluation decode moves predictions from the exact (timm) one, and
how much faster it is: the same checkpoint and images through both.

    python -m benchmarks.eval_drift --checkpoint runs/demo/best.pt --data-dir sample_imagenet
"""
import argparse
import dataclasses
from pathlib import Path

import torch

from benchmarks.common import print_result
from cspresnet.checkpoint import read_weights
from common.processes import DistContext
from cspresnet.engine import evaluate
from cspresnet.weights import load_cspresnet, trained_data_config
from data.loaders import build_eval_data
from data.transforms import DevicePreprocess
from data.sources import evaluation_set


def measure(checkpoint_path: Path, data_dir: Path, split: str = "val", workers: int = 0) -> dict:
    torch.set_num_threads(1)
    weights = read_weights(checkpoint_path)
    model = load_cspresnet(weights)
    data = trained_data_config(weights)
    eval_set = evaluation_set(data_dir, split)
    cpu = torch.device("cpu")
    results = {}
    for decode in ("full", "fast"):
        settings = dataclasses.replace(data, eval_decode=decode, eval_batch_size=64, workers=workers)
        _, loader = build_eval_data(eval_set.samples, eval_set.classes, settings, DistContext.alone(cpu))
        results[decode] = evaluate(model, loader, len(eval_set.classes), DevicePreprocess(cpu, False), "none",
                                   keep_logits=True)
    full, fast = results["full"], results["fast"]
    return {"images": full.images, "img_size": data.eval_img_size, "top1_full": round(full.top1, 3),
            "top1_fast": round(fast.top1, 3),
            "top1_agreement": round(100.0 * (full.predictions[:, 0] == fast.predictions[:, 0]).double().mean().item(), 3),
            "max_logit_difference": round((full.logits - fast.logits).abs().max().item(), 4),
            "mean_logit_difference": round((full.logits - fast.logits).abs().mean().item(), 5),
            "seconds_full": round(full.seconds, 2), "seconds_fast": round(fast.seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--split", default="val")
    args = parser.parse_args()
    print_result(measure(args.checkpoint, args.data_dir, args.split))


if __name__ == "__main__":
    main()
