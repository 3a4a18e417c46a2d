"""Files that cannot be decoded: one warning for training and evaluation alike, and a
training run's budget of them."""
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
    """Before any work: the samples that the index already knows cannot be read (a cut or
    damaged download, a shard gone) stop the run in one line when they are whole classes of
    the training set, or more images than the unreadable budget allows. Otherwise a run
    would train, and a score be reported, on what is left of the set."""
    lost = dataset.known_unreadable()
    if not lost:
        return
    index, reason = min(lost.items())
    example = f"e.g. {dataset.samples[index][0]}: {reason}"
    if split == "training":
        targets = np.asarray(dataset.samples.targets)
        readable = np.ones(len(targets), dtype=bool)
        readable[list(lost)] = False
        held = np.bincount(targets[readable & (targets >= 0)], minlength=len(dataset.classes))
        empty = [dataset.classes[i] for i in np.flatnonzero(held == 0)]
        if empty:
            raise DatasetLayoutError(f"{len(empty)} of the {len(dataset.classes)} classes of the training set have no "
                                     f"image that can be read ({', '.join(empty[:3])}{', ...' if len(empty) > 3 else ''})"
                                     f"; {example}. The download lost them: download it again")
    limit, rule = unreadable_budget(len(dataset), max_fraction, min_allowed)
    if len(lost) > limit:
        raise UnreadableDataError(f"{len(lost)} of the {len(dataset)} images of the {split} set cannot be read, known "
                                  f"before any training ({example}): more than the {limit} allowed ({rule}). Repair "
                                  f"the download, or raise either key")


class UnreadableImages:
    """Skips files that cannot be decoded, warns once per file, counts them, and stops the
    run when more than the allowed fraction of a batch is unreadable, or more distinct files
    than the set's budget: the larger of `min_allowed` and `max_fraction` of the set (a
    floor, so that a few bad files in a small set train through). Each rank checks the
    files it has seen against the whole budget: the sampler reshuffles every epoch, so a
    rank meets most bad files within a few epochs. Skipping never changes which images the
    sampler serves."""

    def __init__(self, samples: Sequence[Sample], max_batch_fraction: float, max_fraction: float, min_allowed: int):
        self.samples = samples
        self.max_batch_fraction = max_batch_fraction
        self.limit, self.budget_rule = unreadable_budget(len(samples), max_fraction, min_allowed)
        self.seen: set = set()
        self.epoch_count = 0

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
            raise UnreadableDataError(
                f"{len(batch.unreadable)} of the {batch.requested} images of one batch could not be decoded "
                f"(data.max_unreadable_batch_fraction={self.max_batch_fraction}); e.g. {example}"
            )
        if len(self.seen) > self.limit:
            raise UnreadableDataError(
                f"{len(self.seen)} distinct training images could not be decoded, more than the {self.limit} allowed "
                f"({self.budget_rule}); e.g. {example}. Repair or remove the files, or raise either key"
            )

    def state_dict(self) -> Dict:
        return {"seen": sorted(self.seen), "epoch_count": self.epoch_count}

    def load_state_dict(self, state: Dict) -> None:
        self.seen = set(state["seen"])
        self.epoch_count = state["epoch_count"]
