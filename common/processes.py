"""Which process of how many, on which device: what the data and training layers both need
to know of a job (cspresnet/distributed.py starts one)."""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def alone(cls, device: torch.device) -> "DistContext":
        """One process on `device` (a script without torchrun, a benchmark, a test)."""
        return cls(rank=0, world_size=1, local_rank=0, device=device)
