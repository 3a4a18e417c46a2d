"""The parts of a training checkpoint that are not model or optimizer: random generator
states of every rank, and a fingerprint of the training set."""
import hashlib
import random
from pathlib import Path
from typing import Any, Dict, Sequence, Tuple

import numpy as np
import torch


def capture_rng(device: torch.device) -> Dict[str, Any]:
    """This process's generators, as tensors and plain data (loadable with weights_only)."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": position,
                  "has_gauss": has_gauss, "cached_gaussian": cached},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"],
                         n["cached_gaussian"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def dataset_fingerprint(samples: Sequence[Tuple[str, int]]) -> str:
    """Changes when any file is added, removed or relabelled: then sample indices moved.
    Only the class folder and file name count, not where the dataset is mounted."""
    digest = hashlib.sha1()
    for path, target in samples:
        path = Path(path)
        digest.update(f"{path.parent.name}/{path.name}\t{target}\n".encode())
    return f"{len(samples)}:{digest.hexdigest()}"

