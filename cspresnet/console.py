"""The same logging and exit codes for train.py, validate.py and predict.py (which rank prints what:
docs/training.md). Lines go through tqdm so that they do not tear a progress bar."""
import logging
import multiprocessing
import os
import signal
import sys
from typing import Callable, NoReturn, Optional

from tqdm import tqdm

from common.errors import ExitError

OUR_LOGGERS = ("cspresnet", "data", "benchmarks")


class ConsoleHandler(logging.Handler):
    def __init__(self, rank: int):
        super().__init__()
        self.prefix = f"[rank {rank}] " if rank else ""

    def emit(self, record: logging.LogRecord) -> None:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
        tqdm.write(f"{self.prefix}{level}{record.getMessage()}", file=stream)
        stream.flush()


def setup_logging(rank: int) -> None:
    """Our loggers at INFO on rank 0 and WARNING elsewhere; other libraries' at WARNING."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, ConsoleHandler)]:
        root.removeHandler(handler)
    root.addHandler(ConsoleHandler(rank))
    root.setLevel(logging.WARNING)
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if rank == 0 else logging.WARNING)


def run_script(main: Callable[[], int]) -> int:
    """An ExitError (common/errors.py) is one line on stderr and its exit code; anything else raises."""
    try:
        return main()
    except ExitError as exc:
        message = str(exc)
        logging.getLogger("cspresnet").error(" ".join(message.split()) if "\n" in message else message)  # one line
        return exc.exit_code
    finally:
        end_child_processes()  # an error must end the loader workers too, or the exit would wait for them


def end_child_processes() -> None:
    """At exit multiprocessing SIGTERMs daemonic children and joins them with no time limit, but our loader
    workers ignore SIGTERM (data.loaders.WorkerSignals) and may be stuck in a system call: kill and reap them."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would raise for every killed worker
    children = multiprocessing.active_children()
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout=5)


def exit_now(code: Optional[int]) -> NoReturn:
    """A script that returned: children ended, output flushed, then os._exit, which skips tearing down the ~2,700
    modules of torch and timm: 1.1 s of `python -c "import train"`'s 3.9 s on the 2-core CPU."""
    end_child_processes()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
