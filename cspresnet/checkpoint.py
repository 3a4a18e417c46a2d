"""The one module that knows the checkpoint format: written whole or not at all, read without unpickling code,
also as older versions wrote it, and the `Weights` any supported file carries. A new field of where a run is
goes into Position; any other, into TrainingCheckpoint."""
import math
import pickle
import re
import sys
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from common.errors import CheckpointError
from common.files import write_atomically

FORMAT = "cspresnet-train-v1"
StateDict = Dict[str, torch.Tensor]


def save_checkpoint(state: Dict[str, Any], path: Path) -> None:
    """Durable, whole or not at all: a crash at any point leaves either the old file or the new one."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomically(Path(path), lambda handle: torch.save(state, handle), durable=True)


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6 is a zip file
# What the weights-only unpickler says of a pickle that names code, as opposed to bytes it cannot parse.
FORBIDDEN = ("Unsupported global", "is blocked", "allowlisted", "unrecognized function")


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """weights_only: tensors and plain data, never code. A file that does not load raises a one-line
    CheckpointError, never the loader's own exception: `--resume auto` then falls back to an older one, the
    scripts exit 2 with that line. Junk bytes make torch.load raise almost anything, hence the broad except."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {first_line(exc)}") from None
    if not head:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except MemoryError:
            raise
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path} is not a readable .safetensors file: {first_line(exc)}") from None
    # A zip (torch.save today) or a pickle of protocol 2-5 (before 1.6): anything else is not worth unpickling.
    if not (head.startswith(ZIP_MAGIC) or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (neither a zip file nor a pickle): "
                              f"it starts with {head!r}")
    try:
        with warnings.catch_warnings():  # a pickle of protocol 4 or 5 warns before it fails or loads
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except pickle.UnpicklingError as exc:
        reason = unpickler_error(exc)
        missing = missing_global(reason)
        if missing:
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt): its pickle "
                                  f"names {missing}, which does not exist") from None
        if any(marker in reason for marker in FORBIDDEN):
            raise CheckpointError(f"refusing to load {path}: it holds pickled Python objects, not only tensors and "
                                  f"plain data, and unpickling them could run code ({reason})") from None
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt): {reason}") from None
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt): "
                              f"{first_line(exc)}") from None


def first_line(exc: BaseException) -> str:
    """Its type and first non-empty line, so a CheckpointError stays one line (junk gives bare KeyError: '101')."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def unpickler_error(exc: Exception) -> str:
    """The unpickler's own sentence, out of torch's paragraphs ("Weights only load failed ... error: ...")."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    elif text.startswith("Weights only load failed") and "\n\n" in text:
        text = text.split("\n\n", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0].split(". Please use", 1)[0] if lines else type(exc).__name__


def missing_global(reason: str) -> Optional[str]:
    """The global a refused pickle names when it cannot be a real one: a name cut short ("torc.") or missing from
    its module ("collections.Orde") is a damaged file, not code to fear. Checked in sys.modules: imports nothing."""
    match = re.search(r"GLOBAL (\S+) was not an allowed global", reason)
    if not match:
        return None
    parts = match.group(1).split(".")
    if "" in parts:  # "torc.": the file ended inside the name
        return match.group(1)
    for i in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:i]))
        if module is not None:
            return match.group(1) if parts[i] not in vars(module) else None
    return None


@dataclass
class Position:
    """Where a run is, the same on every rank: saved in every checkpoint, and taken back on a resume."""
    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # steps of the current epoch completed
    step: int = 0  # optimizer steps since the run began, skipped ones included
    epoch_seconds: float = 0.0  # training time spent in the current epoch so far
    best_top1: float = -math.inf
    rows: List[Dict[str, Any]] = field(default_factory=list)  # summary.csv, one row per completed epoch


@dataclass
class TrainingCheckpoint:
    """Everything `--resume` needs. On disk one flat dict: these keys and Position's (written since
    2026-11-30; before, without `format` and the keys that default to None)."""
    model: StateDict
    optimizer: Dict[str, Any]
    scaler: Dict[str, Any]  # the GradScaler's
    position: Position
    per_rank: List[Dict[str, Any]]  # each rank's random generators, epoch totals and unreadable files
    world_size: int  # the processes that wrote it (len(per_rank))
    dataset: str  # fingerprint of the training set (SampleIndex.fingerprint)
    classes: List[str]
    recipe: Dict[str, Any]  # the resolved recipe, as recipe_to_dict gives it
    model_ema: Optional[StateDict] = None  # None without ema.enabled
    eval_dataset: Optional[str] = None  # of the evaluation set
    batch_size: Optional[int] = None  # the global batch the run trained at
    metrics: Optional[Dict[str, Any]] = None  # the last summary row, for a reader who wants one number

    def to_dict(self) -> Dict[str, Any]:
        """Not dataclasses.asdict, which would copy every tensor; of `position` (a RunState) only Position's fields."""
        flat = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "position"}
        return dict(flat, **{f.name: getattr(self.position, f.name) for f in fields(Position)}, format=FORMAT)

    @classmethod
    def from_dict(cls, state: Dict[str, Any], path: Path) -> "TrainingCheckpoint":
        """Our format, or a CheckpointError that says what the file is instead."""
        tag = state.get("format")
        if tag is not None and tag != FORMAT:
            raise CheckpointError(f"{path} is a training checkpoint of format {tag!r}; this version resumes {FORMAT!r}")
        required = [f.name for f in fields(cls) if f.default is not None and f.name != "position"]
        missing = [name for name in required + [f.name for f in fields(Position)] if name not in state]
        if missing and (tag is None or "model" not in state):
            raise CheckpointError(
                f"{path} holds model weights only, not a training run to continue (such as timm's .pth): --resume "
                f"continues a run from its own last.pt or step-<N>.pt; to start a new run from these weights, pass "
                f"--initial-weights {path}")
        if missing:
            raise CheckpointError(f"{path} is a damaged training checkpoint: it lacks {', '.join(missing)}")
        position = Position(**{f.name: state[f.name] for f in fields(Position)})
        position.rows = [with_train_size(row, state["recipe"]) for row in position.rows]
        return cls(position=position, **{f.name: state.get(f.name) for f in fields(cls) if f.name != "position"})


def with_train_size(row: Dict[str, Any], recipe: Dict[str, Any]) -> Dict[str, Any]:
    """Rows written before progressive resizing (ce21dd9, 2026-12-03) lack train_size: it was data.img_size."""
    if "train_size" in row:
        return row
    size = (recipe.get("data") or {}).get("img_size")
    before = list(row)[:list(row).index("lr") + 1] if "lr" in row else list(row)
    return {**{key: row[key] for key in before}, "train_size": size, **row}


def read_training_checkpoint(path: Path) -> TrainingCheckpoint:
    return TrainingCheckpoint.from_dict(load_checkpoint(path), Path(path))


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
    """From our checkpoints, timm's .pth (a state dict, or its train.py checkpoint), a .safetensors, or a
    DDP-prefixed state dict. which: 'auto' (EMA when present, else the model), 'model' or 'ema'."""
    return weights_in(load_checkpoint(path), which)


def weights_in(checkpoint: Dict[str, Any], which: str = "auto") -> Weights:
    if which not in ("auto", "model", "ema"):
        raise CheckpointError(f"weights must be auto, model or ema, got {which!r}")
    found = {kind: next((checkpoint[k] for k in keys if isinstance(checkpoint.get(k), dict)), None)
             for kind, keys in WEIGHT_KEYS.items()}
    if found["model"] is None and found["ema"] is None:
        if not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            raise CheckpointError("not a state dict: expected tensors, or a training checkpoint with a 'model' entry; "
                                  f"found keys {sorted(checkpoint)[:8]}")
        if which == "ema":
            raise CheckpointError("the checkpoint is a plain state dict and holds no EMA weights")
        found["model"] = checkpoint
    kind = which if which != "auto" else ("ema" if found["ema"] is not None else "model")
    if found[kind] is None:
        raise CheckpointError(f"the checkpoint holds no {kind} weights "
                              f"(has: {[k for k, v in found.items() if v is not None]})")
    state_dict, classes, recipe = found[kind], checkpoint.get("classes"), checkpoint.get("recipe")
    if state_dict and all(key.startswith("module.") for key in state_dict):  # DDP's prefix, on every key
        state_dict = {key[len("module."):]: value for key, value in state_dict.items()}
    return Weights(state_dict, kind, list(classes) if isinstance(classes, list) else None,
                   recipe if isinstance(recipe, dict) else None)
