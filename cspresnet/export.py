"""Export a checkpoint as timm does for the Hugging Face hub: model.safetensors plus a config.json with the
pretrained config (input size, crop_pct, interpolation, labels); how timm loads it: docs/validation.md.

    python -m cspresnet.export --checkpoint runs/cspresnet50/best.pt --out exported/cspresnet50
"""
import argparse
import sys
from pathlib import Path

import timm
from timm.models import save_for_hf

from common.errors import CheckpointError

from .checkpoint import read_weights
from .weights import load_weights_strict, num_classes_of, trained_data_config


def export_for_timm(checkpoint_path: Path, out_dir: Path, weights: str = "auto") -> Path:
    """Write out_dir/model.safetensors and out_dir/config.json; returns the weights file."""
    read = read_weights(checkpoint_path, weights)
    data = trained_data_config(read)
    # Written through timm's own writer, from timm's model, so the files are what timm expects.
    model = timm.create_model("cspresnet50", pretrained=False, num_classes=num_classes_of(read.state_dict))
    load_weights_strict(model, read.state_dict)
    model_config = {"pretrained_cfg": {"tag": Path(out_dir).name}}  # not timm's "ra_in1k"
    if read.classes:
        model_config["label_names"] = list(read.classes)
    save_for_hf(model, str(out_dir), safe_serialization=True, model_config=model_config,
                data_config={"input_size": (3, data.eval_img_size, data.eval_img_size),
                             "crop_pct": data.eval_crop_pct, "interpolation": data.eval_interpolation})
    return Path(out_dir) / "model.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="last.pt / best.pt (or any supported weights)")
    parser.add_argument("--out", required=True, type=Path, help="folder for model.safetensors and config.json")
    parser.add_argument("--weights", choices=["auto", "model", "ema"], default="auto",
                        help="which weights of a training checkpoint (default: EMA when present)")
    args = parser.parse_args()
    try:
        path = export_for_timm(args.checkpoint, args.out, args.weights)
    except CheckpointError as exc:
        sys.exit(f"error: {exc}")
    print(f"wrote {path} and {args.out / 'config.json'}")


if __name__ == "__main__":
    main()
