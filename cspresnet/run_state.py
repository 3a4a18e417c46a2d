"""Where a run is and what each rank has counted: all a checkpoint holds besides the weights, the
optimizer and the recipe, so that a resume is exact."""
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from common.errors import NonFiniteLossError
from data.unreadable import UnreadableImages

from .checkpoint import Position, TrainingCheckpoint
from .distributed import all_reduce_sum


@dataclass
class EpochStats:
    loss: float  # mean training loss over all ranks' images with a finite loss
    images: int  # images trained on, all ranks
    nonfinite_steps: int
    seconds: float


class EpochTotals:
    """This rank's running sums for the current epoch, kept on the device so that no step waits for them."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        on_device = dict(device=self.device, dtype=torch.float64)
        self.sums = torch.zeros(3, **on_device)  # [loss x images, images with a finite loss, non-finite steps]
        self.streak = torch.zeros((), **on_device)  # current run of non-finite losses
        self.max_streak = torch.zeros((), **on_device)  # longest run since the last check
        self.window = torch.zeros(2, **on_device)  # [loss sum, steps] since the last log line
        self.images = 0  # images trained on (decodable ones)

    def add(self, loss: torch.Tensor, batch_size: int) -> None:
        loss = loss.detach().double()
        finite = torch.isfinite(loss)
        safe = torch.where(finite, loss, torch.zeros_like(loss))
        self.sums += torch.stack([safe * batch_size, finite * float(batch_size), (~finite).double()])
        self.window += torch.stack([safe, finite.double()])
        self.streak = (self.streak + 1) * (~finite)
        self.max_streak = torch.maximum(self.max_streak, self.streak)
        self.images += batch_size

    def read_window_loss(self) -> float:
        """The mean loss over every rank's images since the last call, the same on any number of processes
        (a collective, at the log interval: the one place a step waits for the device)."""
        loss_sum, steps = all_reduce_sum(self.window.clone()).tolist()
        self.window.zero_()
        return loss_sum / steps if steps else float("nan")

    def finish_epoch(self, seconds: float) -> EpochStats:
        """The epoch's figures over all ranks (a collective); starts the next epoch's sums."""
        images = torch.tensor([float(self.images)], device=self.device, dtype=torch.float64)
        loss_sum, counted, nonfinite, images = all_reduce_sum(torch.cat([self.sums, images])).tolist()
        self.reset()
        return EpochStats(loss=loss_sum / counted if counted else float("nan"), images=int(images),
                          nonfinite_steps=int(nonfinite), seconds=seconds)

    def state_dict(self) -> Dict:
        return {"sums": self.sums.cpu(), "streak": self.streak.cpu(), "max_streak": self.max_streak.cpu(),
                "window": self.window.cpu(), "images": self.images}

    def load_state_dict(self, state: Dict) -> None:
        for key in ("sums", "streak", "max_streak", "window"):
            setattr(self, key, state[key].to(self.device))
        self.images = state["images"]

    def add_state(self, state: Dict) -> None:
        """Fold another rank's totals into these (a resume on fewer or more processes)."""
        for key in ("sums", "window"):
            getattr(self, key).add_(state[key].to(self.device))
        self.images += state["images"]


@dataclass
class RunState(Position):
    """Where the run is (Position, the same on every rank), and what each rank has counted (totals,
    unreadable files), gathered from every rank into a checkpoint's `per_rank`."""
    totals: Optional[EpochTotals] = None
    unreadable: Optional[UnreadableImages] = None
    saved_step: int = -1  # this process's knowledge: the newest checkpoint written (-1: none); not saved

    def schedule_step(self, steps_per_epoch: int) -> int:
        """The next update counted at today's global batch: `step + 1` unless a resume changed it (docs/training.md)."""
        return self.epoch * steps_per_epoch + self.step_in_epoch + 1

    def rank_state_dict(self) -> Dict[str, Any]:
        return dict(totals=self.totals.state_dict(), unreadable=self.unreadable.state_dict())

    def load(self, checkpoint: TrainingCheckpoint, rank: int, world_size: int) -> None:
        """On another number of processes: rank 0 takes the epoch's totals of all the old ranks, and every rank
        the files any of them found unreadable. No generator state: engine.seed_draws seeds each pass."""
        vars(self).update(vars(checkpoint.position))
        self.saved_step = checkpoint.position.step  # the checkpoint resumed from
        if checkpoint.world_size == world_size:
            self.totals.load_state_dict(checkpoint.per_rank[rank]["totals"])
            self.unreadable.load_state_dict(checkpoint.per_rank[rank]["unreadable"])
            return
        for old in checkpoint.per_rank:
            self.unreadable.seen |= set(old["unreadable"]["seen"])
            if rank == 0:
                self.totals.add_state(old["totals"])
                self.unreadable.epoch_count += old["unreadable"]["epoch_count"]

    def check_numerics(self, max_nonfinite_steps: int) -> None:
        """Stop when any rank saw too many non-finite losses in a row (a collective)."""
        streak = self.totals.max_streak.clone()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(streak, op=torch.distributed.ReduceOp.MAX)
        longest = int(streak.item())
        if longest >= max_nonfinite_steps:
            raise NonFiniteLossError(
                f"the loss was not finite for {longest} steps in a row (up to step {self.step}); those steps were "
                f"skipped and the run stops here, leaving the last checkpoint as it was. Try a lower optim.lr; with "
                f"runtime.amp=fp16, try bf16 or none")

