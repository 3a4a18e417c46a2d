"""The progress of a stage that can take minutes (indexing, hashing, arranging, packing): a tqdm bar where tqdm
finds a terminal; elsewhere (a batch job's log) a line every PERIOD_S seconds, so that the log shows it is alive."""
import logging
import time
from typing import Callable, Iterable, Iterator, Optional, TypeVar

from tqdm import tqdm

PERIOD_S = 10.0  # between two lines when the output is not a terminal (tests lower it)
log = logging.getLogger("data.progress")  # under a logger that console.setup_logging shows on rank 0
Item = TypeVar("Item")


def progress(items: Iterable[Item], what: str, total: Optional[int] = None, unit: str = "files",
             size: Optional[Callable[[Item], int]] = None) -> Iterator[Item]:
    """Yields `items`, each counted once the caller is done with it (as `size(item)` units if given: unit "B"
    counts bytes). Without a terminal, a last line closes the lines said, if any, unless the last said it all."""
    bar = tqdm(total=total, desc=what, unit=unit, unit_scale=unit == "B", disable=True if total == 0 else None,
               leave=False, dynamic_ncols=True)  # None: tqdm's own test for a terminal
    started = last = time.perf_counter()
    done, said = 0, -1  # the count the last line said
    try:
        for item in items:
            yield item
            count = 1 if size is None else size(item)
            done += count
            if not bar.disable:
                bar.update(count)
            elif time.perf_counter() - last >= PERIOD_S:
                log.info("%s", line(what, done, total, unit, time.perf_counter() - started))
                last, said = time.perf_counter(), done
        if 0 <= said < done:
            log.info("%s", line(what, done, total, unit, time.perf_counter() - started))
    finally:
        bar.close()


def line(what: str, done: int, total: Optional[int], unit: str, seconds: float) -> str:
    """'indexing X: 1,234/50,000 files (2%), 8.1 s'; bytes as '1.20GB/148GB (1%)'."""
    def amount(n: int) -> str:
        return tqdm.format_sizeof(n, "B", 1000) if unit == "B" else f"{n:,}"

    named = "" if unit == "B" else f" {unit}"
    counted = f"{amount(done)}/{amount(total)}{named} ({done / total:.0%})" if total else f"{amount(done)}{named}"
    return f"{what}: {counted}, {seconds:.1f} s"
