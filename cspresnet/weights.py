"""Model weights in every form users bring: our training checkpoints (model or EMA),
timm's .pth state dicts, .safetensors, and DDP's `module.` prefix."""
from typing import Any, Dict, Tuple

import torch
from torch import nn

from data.config import DataConfig

from .checkpoint import CheckpointError
from .model import CSPResNet50, build_model
from .recipe import recipe_from_dict


def extract_state_dict(checkpoint: Dict[str, Any], weights: str = "auto") -> Tuple[Dict[str, torch.Tensor], str]:
    """The model weights inside any supported checkpoint, and which ones they are.

    weights: 'auto' (EMA when present, else the model), 'model' or 'ema'.
    """
    if weights not in ("auto", "model", "ema"):
        raise CheckpointError(f"weights must be auto, model or ema, got {weights!r}")
    candidates = {"model": ("model", "state_dict"), "ema": ("model_ema", "state_dict_ema")}
    found = {kind: next((checkpoint[k] for k in keys if isinstance(checkpoint.get(k), dict)), None)
             for kind, keys in candidates.items()}
    if found["model"] is None and found["ema"] is None:
        if not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            raise CheckpointError(
                "not a state dict: expected tensors, or a training checkpoint with a 'model' entry; "
                f"found keys {sorted(checkpoint)[:8]}"
            )
        if weights == "ema":
            raise CheckpointError("the checkpoint is a plain state dict and holds no EMA weights")
        found["model"] = checkpoint
    kind = weights if weights != "auto" else ("ema" if found["ema"] is not None else "model")
    if found[kind] is None:
        raise CheckpointError(f"the checkpoint holds no {kind} weights (has: {[k for k, v in found.items() if v is not None]})")
    return strip_prefix(found[kind], "module."), kind


def strip_prefix(state_dict: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """Remove DDP's (or torch.compile's `_orig_mod.`) prefix when every key has it."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def num_classes_of(state_dict: Dict[str, torch.Tensor]) -> int:
    """The classifier's output count; 1000 when there is no CSPResNet-50 classifier, so that
    loading such weights fails with the full list of keys that do not fit."""
    weight = state_dict.get("head.fc.weight")
    return int(weight.shape[0]) if weight is not None and weight.ndim == 2 else 1000


def load_weights_strict(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> None:
    """load_state_dict(strict=True) with one readable message instead of a wall of keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    if missing or unexpected or mismatched:
        def show(keys):
            return f"{len(keys)} ({', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''})"

        parts = [f"missing keys: {show(missing)}" if missing else "",
                 f"unexpected keys: {show(unexpected)}" if unexpected else "",
                 f"wrong shapes: {show(mismatched)}" if mismatched else ""]
        raise CheckpointError(
            "these weights are not CSPResNet-50's (timm 'cspresnet50' layout): " + "; ".join(p for p in parts if p)
        )
    model.load_state_dict(state_dict, strict=True)


def load_cspresnet(checkpoint: Dict[str, Any], weights: str = "auto") -> Tuple[CSPResNet50, str]:
    """Our model with the checkpoint's weights (strictly), and which weights they are."""
    state_dict, kind = extract_state_dict(checkpoint, weights)
    model = build_model(num_classes_of(state_dict))
    load_weights_strict(model, state_dict)  # another architecture fails here, listing the keys
    return model, kind


def trained_data_config(checkpoint: Dict[str, Any]) -> DataConfig:
    """The data settings of the recipe a checkpoint was trained with; timm's cspresnet50
    defaults (256 px, crop 0.887, bilinear) for weights that carry no recipe."""
    recipe = checkpoint.get("recipe")
    return recipe_from_dict(recipe).data if isinstance(recipe, dict) else DataConfig()
