"""What train.py and validate.py print, and how they end: the same logging and the same
exit codes for both.

Logging: rank 0 shows everything ours logs (information on stdout, warnings and errors on
stderr); the other ranks show only their warnings and errors, each line marked with its
rank. Lines go through tqdm so that they do not tear a progress bar.
"""
import logging
import sys
from typing import Callable

from tqdm import tqdm

from data.config import DataConfigError
from data.imagenet import DatasetLayoutError, UnreadableDataError
from data.jpeg_box import Required as FastJpegRequired
from data.loader_faults import LoaderStallError, SharedMemoryError

from .checkpoint import CheckpointError
from .engine import NonFiniteLossError
from .recipe import RecipeError
from .run_folder import RunFolderError
from .signals import end_child_processes
from .training import FinalCheckpointError

EXIT_FAILED = 1  # anything else; its traceback says where
EXIT_BAD_INPUT = 2  # a recipe, data, checkpoint, run folder or option that cannot work: one line says which
EXIT_NONFINITE = 3  # the loss was not finite too many steps in a row
BAD_INPUT = (RecipeError, DataConfigError, DatasetLayoutError, UnreadableDataError, CheckpointError, RunFolderError,
             FastJpegRequired)
OUR_LOGGERS = ("cspresnet", "data", "benchmarks")


class OptionError(ValueError):
    """A command-line option that cannot work, found before any work."""


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
    """A script's main, with its exit code: bad input is one line on stderr and exit 2, a
    non-finite loss 3, a full disk at the very end, a stalled loader or a full /dev/shm 1; anything else raises (traceback, exit 1). The loader workers end with the process,
    however it ends."""
    log = logging.getLogger("cspresnet")
    try:
        return main()
    except BAD_INPUT + (OptionError,) as exc:
        log.error(" ".join(str(exc).split()) if "\n" in str(exc) else str(exc))  # one line, whatever the message
        return EXIT_BAD_INPUT
    except NonFiniteLossError as exc:
        log.error(str(exc))
        return EXIT_NONFINITE
    except (FinalCheckpointError, LoaderStallError, SharedMemoryError) as exc:
        log.error(str(exc))
        return EXIT_FAILED
    finally:
        end_child_processes()  # an error must end the loader workers too, or the exit would wait for them
