"""SIGTERM and SIGINT (preemption, Ctrl-C): finish the current step, checkpoint, exit 75."""
import signal

import torch

from .distributed import all_reduce_sum

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request, checkpoint saved; rerun with --resume auto


class StopRequest:
    """Remembers that a stop signal arrived; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.signal_name = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank got a signal (a collective: call on all ranks)."""
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=device)
        return all_reduce_sum(flag).item() > 0

