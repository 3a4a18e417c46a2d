"""What a checkpoint holds, key for key: the training checkpoint that this project writes and
resumes from, and the model weights that any supported file carries.

This is the one place that names checkpoint keys. The trainer builds a TrainingCheckpoint
and reads one back; validate.py, predict.py, export.py and the initial-weights loader read
`Weights`. The files themselves are written and read by cspresnet.checkpoint (atomically,
and without unpickling code).
"""
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from data.errors import CheckpointError

from .checkpoint import load_checkpoint

FORMAT = "cspresnet-train-v1"
StateDict = Dict[str, torch.Tensor]


@dataclass
class TrainingCheckpoint:
    """A training run at one step: everything `--resume` needs to go on as if it had never
    stopped (the keys are those this project has written since 2026-11-30)."""

    model: StateDict
    optimizer: Dict[str, Any]
    scaler: Dict[str, Any]  # the GradScaler's
    model_ema: Optional[StateDict]  # None without ema.enabled
    epoch: int  # epochs completed
    step_in_epoch: int  # steps of the current epoch completed
    step: int  # optimizer steps since the run began
    epoch_seconds: float  # training time of the current epoch so far
    best_top1: float
    rows: List[Dict[str, Any]]  # summary.csv, a row per completed epoch
    per_rank: List[Dict[str, Any]]  # each rank's random generators, epoch totals and unreadable files
    world_size: int  # the processes that wrote it (len(per_rank))
    dataset: str  # fingerprint of the training set (run_state.dataset_fingerprint)
    eval_dataset: Optional[str]  # of the evaluation set; None in checkpoints written before it was kept
    batch_size: Optional[int]  # the global batch the run trained at; None in checkpoints before it was kept
    classes: List[str]
    recipe: Dict[str, Any]  # the resolved recipe, as recipe_to_dict gives it
    metrics: Optional[Dict[str, Any]]  # the last summary row, for a reader who wants one number
    format: str = FORMAT

    OPTIONAL = ("model_ema", "eval_dataset", "batch_size", "metrics")  # None when absent

    def to_dict(self) -> Dict[str, Any]:
        """The dict torch.save writes (not dataclasses.asdict, which would copy every tensor)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, state: Dict[str, Any], path: Path) -> "TrainingCheckpoint":
        """Checked: our format, or a CheckpointError that says what the file is instead."""
        tag = state.get("format")
        if tag is not None and tag != FORMAT:
            raise CheckpointError(f"{path} is a training checkpoint of format {tag!r}; this version resumes {FORMAT!r}")
        names = [f.name for f in fields(cls)]
        missing = [name for name in names if name not in state and name not in cls.OPTIONAL + ("format",)]
        if missing and (tag is None or "model" not in state):
            raise CheckpointError(
                f"{path} holds model weights only, not a training run to continue (such as timm's .pth): --resume "
                f"continues a run from its own last.pt or step-<N>.pt; to start a new run from these weights, pass "
                f"--initial-weights {path}")
        if missing:
            raise CheckpointError(f"{path} is a damaged training checkpoint: it lacks {', '.join(missing)}")
        checkpoint = cls(**{name: state.get(name) for name in names if name != "format"})
        checkpoint.rows = [with_train_size(row, checkpoint.recipe) for row in checkpoint.rows]
        return checkpoint


def with_train_size(row: Dict[str, Any], recipe: Dict[str, Any]) -> Dict[str, Any]:
    """A summary row as this version writes it: rows written before progressive resizing
    (before ce21dd9, 2026-12-03) lack the epoch's training crop, which was then data.img_size."""
    if "train_size" in row:
        return row
    size = (recipe.get("data") or {}).get("img_size")
    before = list(row)[:list(row).index("lr") + 1] if "lr" in row else list(row)
    return {**{key: row[key] for key in before}, "train_size": size, **row}


def read_training_checkpoint(path: Path) -> TrainingCheckpoint:
    return TrainingCheckpoint.from_dict(load_checkpoint(path), Path(path))


# ----------------------------------------------------------------------------- weights of any file


@dataclass
class Weights:
    """A model's weights from any file users bring, and what the file says about them."""

    state_dict: StateDict
    kind: str  # "model" or "ema"
    classes: Optional[List[str]]  # the class names our checkpoints carry; None in timm's files
    recipe: Optional[Dict[str, Any]]  # the recipe our checkpoints were trained with


# Where each kind of weights lies: our training checkpoints, then timm's train.py checkpoints.
WEIGHT_KEYS = {"model": ("model", "state_dict"), "ema": ("model_ema", "state_dict_ema")}


def read_weights(path: Path, which: str = "auto") -> Weights:
    """The weights in our checkpoints (model or EMA), timm's .pth (a state dict, or its
    train.py checkpoint), a .safetensors, or a DDP-prefixed state dict.

    which: 'auto' (EMA when present, else the model), 'model' or 'ema'.
    """
    return weights_in(load_checkpoint(path), which)


def weights_in(checkpoint: Dict[str, Any], which: str = "auto") -> Weights:
    if which not in ("auto", "model", "ema"):
        raise CheckpointError(f"weights must be auto, model or ema, got {which!r}")
    found = {kind: next((checkpoint[k] for k in keys if isinstance(checkpoint.get(k), dict)), None)
             for kind, keys in WEIGHT_KEYS.items()}
    if found["model"] is None and found["ema"] is None:
        if not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            raise CheckpointError(
                "not a state dict: expected tensors, or a training checkpoint with a 'model' entry; "
                f"found keys {sorted(checkpoint)[:8]}"
            )
        if which == "ema":
            raise CheckpointError("the checkpoint is a plain state dict and holds no EMA weights")
        found["model"] = checkpoint
    kind = which if which != "auto" else ("ema" if found["ema"] is not None else "model")
    if found[kind] is None:
        raise CheckpointError(f"the checkpoint holds no {kind} weights "
                              f"(has: {[k for k, v in found.items() if v is not None]})")
    classes, recipe = checkpoint.get("classes"), checkpoint.get("recipe")
    return Weights(strip_prefix(found[kind], "module."), kind, list(classes) if isinstance(classes, list) else None,
                   recipe if isinstance(recipe, dict) else None)


def strip_prefix(state_dict: StateDict, prefix: str) -> StateDict:
    """Remove DDP's (or torch.compile's `_orig_mod.`) prefix when every key has it."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict

