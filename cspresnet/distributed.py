"""One process or many (torchrun): who we are, which device, and the few collectives we use."""
import ctypes
import datetime
import gc
import os
import signal
from typing import Any, List

import torch
import torch.distributed as dist

from common.processes import DistContext


def pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if preference == "cuda":
        raise RuntimeError("runtime.device=cuda but no CUDA GPU is visible; use runtime.device=auto or cpu")
    return torch.device("cpu")


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def end_with_launcher() -> None:
    """The kernel kills this rank when torchrun dies: a kill of torchrun's process group does not reach the
    ranks, each in a session of its own, which would train on unsupervised (docs/training.md)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    launcher = os.getppid()
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != launcher:  # it died before the signal was armed
        os.kill(os.getpid(), signal.SIGKILL)


def init_distributed(device_preference: str = "auto", timeout_s: float = 600.0) -> DistContext:
    """Joins the group when torchrun started several processes; a collective waiting over `timeout_s` fails."""
    end_with_launcher()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        # torchrun --max-restarts keeps its store, and a restarted group would read the dead group's addresses
        # from it (seen with gloo in torch 2.14; pytorch/pytorch#167288 for NCCL): a key prefix per restart.
        store, _, _ = next(dist.rendezvous("env://"))
        store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        timeout = datetime.timedelta(seconds=timeout_s)
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world_size,
                                device_id=device if cuda else None, timeout=timeout)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any) -> List[Any]:
    if not dist.is_initialized():
        return [obj]
    gathered: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group and end its threads while Python still runs (once the training run is no longer
    referenced), or a rank may abort at exit after a run that succeeded (docs/training.md)."""
    if dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()
