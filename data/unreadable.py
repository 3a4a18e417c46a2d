"""Files that cannot be decoded: one warning for training and evaluation alike, and a run's budget of them."""
import logging
from typing import Dict, Sequence, Tuple

import numpy as np

from common.errors import DatasetLayoutError, UnreadableDataError

from .batches import Batch
from .sample_index import Sample

log = logging.getLogger(__name__)


def warn_unreadable(path: str, reason: str, note: str = "") -> None:
    log.warning("skipping unreadable image %s (%s)%s", path, reason, f"; {note}" if note else "")


def unreadable_budget(images: int, max_fraction: float, min_allowed: int) -> Tuple[int, str]:
    """How many distinct unreadable images a set of `images` may hold, and the rule in words."""
    return (max(min_allowed, int(max_fraction * images)),
            f"the larger of data.min_unreadable_allowed={min_allowed} and data.max_unreadable_fraction="
            f"{max_fraction:g} x {images} images")


def refuse_damaged(dataset, max_fraction: float, min_allowed: int, split: str) -> None:
    """Known-unreadable samples that are whole training classes, or over budget, stop the run before any work."""
    lost = dataset.known_unreadable()
    if not lost:
        return
    index, reason = min(lost.items())
    example = f"e.g. {dataset.samples[index][0]}: {reason}"
    if split == "training":
        readable = np.delete(np.asarray(dataset.samples.targets), list(lost))
        held = np.bincount(readable[readable >= 0], minlength=len(dataset.classes))
        empty = [dataset.classes[i] for i in np.flatnonzero(held == 0)]
        if empty:
            shown = ", ".join(empty[:3]) + (", ..." if len(empty) > 3 else "")
            raise DatasetLayoutError(f"{len(empty)} of the {len(dataset.classes)} classes of the training set have no "
                                     f"image that can be read ({shown}); {example}. The download lost them: download "
                                     f"it again")
    limit, rule = unreadable_budget(len(dataset), max_fraction, min_allowed)
    if len(lost) > limit:
        raise UnreadableDataError(f"{len(lost)} of the {len(dataset)} images of the {split} set cannot be read, known "
                                  f"before any training ({example}): more than the {limit} allowed ({rule}). Repair "
                                  f"the download, or raise either key")


class UnreadableImages:
    """Warns once per undecodable file; stops the run when too much of one batch, or more files than the budget, are
    unreadable. Each rank holds what it has seen to the whole budget: reshuffled each epoch, it meets most bad files."""

    def __init__(self, samples: Sequence[Sample], max_batch_fraction: float, max_fraction: float, min_allowed: int):
        self.samples, self.max_batch_fraction = samples, max_batch_fraction
        self.limit, self.budget_rule = unreadable_budget(len(samples), max_fraction, min_allowed)
        self.seen, self.epoch_count = set(), 0

    def check(self, batch: Batch) -> None:
        if not batch.unreadable:
            return
        for index, reason in batch.unreadable:
            if index not in self.seen:
                self.seen.add(index)
                warn_unreadable(self.samples[index][0], reason, f"{len(self.seen)} of the {self.limit} allowed")
        self.epoch_count += len(batch.unreadable)
        example = f"{self.samples[batch.unreadable[0][0]][0]}: {batch.unreadable[0][1]}"
        if len(batch.unreadable) > self.max_batch_fraction * batch.requested:
            raise UnreadableDataError(f"{len(batch.unreadable)} of the {batch.requested} images of one batch could not "
                                      f"be decoded (data.max_unreadable_batch_fraction={self.max_batch_fraction}); "
                                      f"e.g. {example}")
        if len(self.seen) > self.limit:
            raise UnreadableDataError(f"{len(self.seen)} distinct training images could not be decoded, more than the "
                                      f"{self.limit} allowed ({self.budget_rule}); e.g. {example}. Repair or remove "
                                      f"the files, or raise either key")

    def state_dict(self) -> Dict:
        return {"seen": sorted(self.seen), "epoch_count": self.epoch_count}

    def load_state_dict(self, state: Dict) -> None:
        self.seen, self.epoch_count = set(state["seen"]), state["epoch_count"]
