"""How a training process stops: on the first SIGTERM or SIGINT, after the step and a save, exit 75; on a second
Ctrl-C, or after runtime.stop_timeout_s, at once and unsaved (docs/training.md, "Signals and preemption")."""
import contextlib
import os
import select
import signal
import sys
import threading
import time
from typing import Callable, List, Optional

import torch

from .distributed import all_reduce_sum

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request, checkpoint saved; rerun with --resume auto
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# A SIGINT this soon after the first stop signal is the same stop delivered twice, not a second Ctrl-C.
REPEAT_WINDOW_S = 0.5


class StartInterrupted(Exception):
    """A stop signal before training began: nothing to save."""


class StopRequest:
    """The first stop signal, acted on at a step's end. Python runs handlers in the main thread between bytecodes,
    never reached in a collective whose peer is gone: a watchdog thread reads the wakeup fd and keeps the time limit."""

    def __init__(self, timeout_s: float, early_signals: Optional[List[int]] = None):
        self.signal_name: Optional[str] = None
        self.timeout_s = timeout_s
        self.on_give_up: Callable[[str], None] = lambda reason: None  # the caller's (the run's status), before exit
        self.starting = True  # until the run trains: a stop raises StartInterrupted once armed (arm_start)
        self._armed = False
        read_end, self._write_end = os.pipe()
        os.set_blocking(self._write_end, False)
        # The watchdog acts; these handlers keep the defaults (death, KeyboardInterrupt) away
        # and, during the start, end it (they run in the main thread, between bytecodes).
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        self._previous_fd = signal.set_wakeup_fd(self._write_end, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(read_end,), name="stop-watchdog", daemon=True).start()
        for signum in early_signals or ():  # came before the wakeup fd: the watchdog did not see them
            os.write(self._write_end, bytes([signum]))
        self._pending = signal.Signals(early_signals[0]).name if early_signals else None

    def _handle(self, signum: int, frame) -> None:
        self._pending = self._pending or signal.Signals(signum).name
        if self._armed:
            self.arm_start()

    def arm_start(self) -> None:
        """Until training begins a stop (also an earlier one) ends the start; call it once the run stands."""
        self._armed = True
        if self._pending and self.starting:
            self.starting = False  # once: a repeated signal must not interrupt the exit
            raise StartInterrupted(self._pending)

    def training(self) -> None:
        """From here a stop is acted on at a step's end, after a save."""
        self.starting = False

    def __enter__(self) -> "StopRequest":
        return self

    def __exit__(self, *exc) -> None:
        """Signals as they were before, for a caller that goes on (a test, a notebook)."""
        signal.set_wakeup_fd(self._previous_fd)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        os.close(self._write_end)  # the watchdog reads the end of its pipe and leaves

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank got a signal (a collective: call on all ranks)."""
        return all_reduce_sum(torch.tensor([1.0 if self.signal_name else 0.0], device=device)).item() > 0

    def _watch(self, read_end: int) -> None:
        first = None  # when the first stop signal came
        while True:
            wait = None if first is None else max(0.0, first + self.timeout_s - time.monotonic())
            if not select.select([read_end], [], [], wait)[0]:
                self._give_up(f"it did not stop within runtime.stop_timeout_s={self.timeout_s:g} s of "
                              f"{self.signal_name}", signal.Signals[self.signal_name])
            received = os.read(read_end, 64)
            if not received:  # closed: the run is over
                os.close(read_end)
                return
            for signum in received:  # every signal with a Python handler lands here: keep ours
                if signum in STOP_SIGNALS and first is None:
                    self.signal_name, first = signal.Signals(signum).name, time.monotonic()
                elif signum == signal.SIGINT and time.monotonic() - first > REPEAT_WINDOW_S:
                    self._give_up("a second Ctrl-C (SIGINT)", signal.SIGINT)

    def _give_up(self, reason: str, signum: signal.Signals) -> None:
        code = 128 + signum.value
        message = f"ending without saving: {reason}; the last checkpoint stays as it was (exit code {code})"
        os.write(sys.stderr.fileno(), f"error: {message}\n".encode())
        with contextlib.suppress(Exception):  # nothing may stop this exit
            self.on_give_up(message)
        os._exit(code)  # the kernel ends the loader workers with it (WorkerSignals: parent-death signal)
