"""Model weights in every form users bring: our training checkpoints (model or EMA),
timm's .pth state dicts, .safetensors, and DDP's `module.` prefix; and a new run's
initial weights, whose classifier gives way when the classes differ."""
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from data.config import DataConfig

from .checkpoint import CheckpointError, load_checkpoint
from .model import CSPResNet50, build_model
from .recipe import recipe_from_dict

CLASSIFIER = ("head.fc.weight", "head.fc.bias")


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


def check_keys(expected: Dict[str, torch.Tensor], state_dict: Dict[str, torch.Tensor]) -> None:
    """Refuse weights whose keys or shapes are not `expected`'s, in one readable message
    instead of load_state_dict's wall of keys."""
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


def load_weights_strict(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> None:
    """load_state_dict(strict=True), refusing another architecture in one line."""
    check_keys(model.state_dict(), state_dict)
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


# ----------------------------------------------------------------------------- initial weights


@dataclass
class InitialWeights:
    """The weights a new run starts from (model.initial_weights), read and checked."""

    path: Path
    sha256: str
    kind: str  # "model" or "ema": which weights of the file
    state_dict: Dict[str, torch.Tensor]
    classes: Optional[List[str]]  # the class names our checkpoints carry; None in timm's files


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_initial_weights(path: str, kind: str = "auto", sha256: str = "") -> InitialWeights:
    """The file's weights (weights_only), refused now, before any work, when it is not the
    file `sha256` names or when anything but the classifier does not fit CSPResNet-50."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise CheckpointError(f"recipe key 'model.initial_weights': {file} does not exist; give timm's "
                              f"cspresnet50 .pth, a .safetensors or one of our last.pt/best.pt")
    actual = file_sha256(file)
    if not actual.startswith(sha256):
        raise CheckpointError(f"recipe key 'model.initial_weights_sha256' is {sha256} but {file} has SHA-256 "
                              f"{actual}: not the file the recipe names")
    checkpoint = load_checkpoint(file)
    state_dict, kind = extract_state_dict(checkpoint, kind)
    with torch.device("meta"):  # the shapes only, without allocating or initialising a model
        expected = CSPResNet50(num_classes=1).state_dict()
    backbone = {k: v for k, v in expected.items() if k not in CLASSIFIER}
    check_keys(backbone, {k: v for k, v in state_dict.items() if k not in CLASSIFIER})
    weight = state_dict.get(CLASSIFIER[0])
    if weight is not None and (weight.ndim != 2 or weight.shape[1] != expected[CLASSIFIER[0]].shape[1]):
        check_keys(expected, state_dict)  # a classifier on other features: names it a wrong shape
    classes = checkpoint.get("classes")
    return InitialWeights(file, actual, kind, state_dict, list(classes) if isinstance(classes, list) else None)


def apply_initial_weights(initial: InitialWeights, models: Sequence[nn.Module], classes: Sequence[str]) -> str:
    """Load `initial` into each of `models` (the model and its EMA), strictly; the classifier
    too when it is for the same classes, else the models keep their freshly initialised one.
    Returns the line that says which."""
    own = models[0].state_dict()
    keep, why = classifier_fits(initial, own, classes)
    loaded = {k: v for k, v in initial.state_dict.items() if keep or k not in CLASSIFIER}
    if not keep:
        loaded.update({k: own[k] for k in CLASSIFIER})
    for model in models:
        model.load_state_dict(loaded, strict=True)
    return (f"initial weights: {initial.path} ({initial.kind} weights, SHA-256 {initial.sha256[:16]}...): "
            f"{len(loaded) - (0 if keep else len(CLASSIFIER))} tensors loaded; {why}")


def classifier_fits(initial: InitialWeights, own: Dict[str, torch.Tensor], classes: Sequence[str]) -> Tuple[bool, str]:
    """Whether the file's classifier is for these classes, and the reason in words."""
    theirs = [initial.state_dict.get(k) for k in CLASSIFIER]
    if theirs[0] is None or theirs[1] is None:
        return False, f"the file has no classifier: {', '.join(CLASSIFIER)} initialised for {len(classes)} classes"
    shapes = " and ".join(f"{k} {tuple(t.shape)} -> {tuple(own[k].shape)}" for k, t in zip(CLASSIFIER, theirs))
    if theirs[0].shape[0] != len(classes):
        return False, (f"classifier re-initialised, {shapes}: the file has {theirs[0].shape[0]} classes, the "
                       f"data {len(classes)}")
    if initial.classes is not None and list(initial.classes) != list(classes):
        differ = next((i for i, (a, b) in enumerate(zip(initial.classes, classes)) if a != b), None)
        example = (f"class {differ} is {initial.classes[differ]!r} there, {classes[differ]!r} here"
                   if differ is not None else f"it names {len(initial.classes)}")
        return False, f"classifier re-initialised, {shapes}: the file's classes are not the data's ({example})"
    return True, f"classifier kept: {len(classes)} classes, as the data's"
