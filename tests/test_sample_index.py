"""The compact, cached index of a split's samples: the same samples as a listing, built once
and read back by every later start, rank and worker, rebuilt when the folders change or the
cache is damaged, and no memory that grows in a loader worker."""
import multiprocessing
import os
import shutil
import sys
import time

import numpy as np
import pytest

from data.sample_index import fingerprint_of
from data.sources.folders import cached_index, find_classes, index_split
from data.sample_index import SampleIndex, cache_file
from tests.helpers import PrivateMount


def aged(tree, seconds=100):
    """Every folder of `tree` last changed `seconds` ago: a folder changed within two seconds
    of its listing is never trusted (it may have changed unseen)."""
    when = time.time() - seconds
    for folder, _, _ in os.walk(tree):
        os.utime(folder, (when, when))
    return tree


@pytest.fixture()
def tree(tiny_imagenet, tmp_path):
    copy = shutil.copytree(tiny_imagenet, tmp_path / "data", ignore=shutil.ignore_patterns(".cspresnet_index"))
    return aged(copy)


def indexed(tree, caplog, split="train"):
    caplog.clear()
    with caplog.at_level("INFO", logger="data"):
        index = cached_index(tree / split, find_classes(tree / "train"))
    return index, "read from" in caplog.text


def test_the_index_holds_the_listings_samples_in_order_with_the_same_fingerprint(tree, caplog):
    listed = index_split(tree / "train", find_classes(tree / "train"))
    index, from_cache = indexed(tree, caplog)
    assert not from_cache and index == listed and list(index) == listed and len(index) == 24
    assert index.fingerprint() == fingerprint_of(listed)  # the rule checkpoints were written with
    again, from_cache = indexed(tree, caplog)
    assert from_cache and again == listed and again.fingerprint() == index.fingerprint()
    assert isinstance(again.targets, np.ndarray) and not again.targets.flags.writeable  # mapped from its file


def test_a_file_added_or_removed_or_a_class_added_makes_the_next_start_index_again(tree, caplog):
    indexed(tree, caplog)
    assert indexed(tree, caplog)[1]
    folder = tree / "train" / "n00000001"
    shutil.copy(next(folder.glob("*.JPEG")), folder / "added.JPEG")
    index, from_cache = indexed(tree, caplog)
    assert not from_cache and "out of date: the data changed since it was built" in caplog.text and len(index) == 25
    aged(tree, seconds=50)
    assert not indexed(tree, caplog)[1]  # its time moved: listed again, now settled
    assert indexed(tree, caplog)[1]
    (folder / "added.JPEG").unlink()
    index, from_cache = indexed(tree, caplog)
    assert not from_cache and len(index) == 24 and "added.JPEG" not in {p.rsplit("/", 1)[1] for p, _ in index}
    shutil.copytree(folder, tree / "train" / "n00000003")
    index, from_cache = indexed(tree, caplog)
    assert not from_cache and max(index.targets) == 3


def test_a_truncated_or_junk_cache_is_built_again_never_trusted(tree, caplog):
    first, _ = indexed(tree, caplog)
    path = cache_file(tree, "train.idx")
    whole = path.read_bytes()
    for damaged in (whole[: len(whole) // 2], b"junk" * 100, whole[:40], b""):
        path.write_bytes(damaged)
        index, from_cache = indexed(tree, caplog)
        assert not from_cache and index == first
        assert "cannot be read" in caplog.text or not damaged
        assert SampleIndex.load(path)[0] == first  # written whole again


def test_a_worker_reading_every_sample_gains_no_memory_unlike_a_list_of_tuples():
    """100,000 samples: a forked worker that reads each one's path and class, as a loader
    worker does over an epoch, gains private memory with a list (reference counts written
    into pages shared with its parent), and not with the index."""
    names = [[f"n{c:08d}_{i}.JPEG" for i in range(100)] for c in range(1000)]
    folders = [f"/data/imagenet/train/n{c:08d}" for c in range(1000)]
    index = SampleIndex.from_names(folders, names, range(1000))
    listed = list(index)
    context = multiprocessing.get_context("fork")
    grown = {}
    for kind, samples in (("index", index), ("list", listed)):
        queue = context.Queue()
        worker = context.Process(target=private_growth, args=(samples, queue))
        worker.start()
        grown[kind] = queue.get(timeout=60)
        worker.join(timeout=60)
    assert grown["list"] > 5 << 20, grown  # the control: the measurement sees what it should
    assert grown["index"] < 1 << 20, grown


def private_growth(samples, queue) -> None:
    before = private_bytes()
    for index in range(len(samples)):
        path, target = samples[index]
    queue.put(private_bytes() - before)


def private_bytes() -> int:
    """Pages this process wrote for itself (copies of shared pages included): a mapped
    file's pages are the page cache's, one copy for every process that maps it."""
    with open("/proc/self/smaps_rollup") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("Private_Dirty"))


BUILD = """
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(message)s")
from data.sources.folders import cached_index, find_classes
root = Path(sys.argv[1])
cached_index(root / "train", find_classes(root / "train"))
"""


@pytest.mark.slow
def test_two_processes_on_a_read_only_dataset_build_one_index_into_the_users_cache(tiny_imagenet, tmp_path):
    """Two ranks starting together: one builds the index while the other waits for it and
    reads it; the dataset's folder is read-only and its own index out of date (a file added
    since), so the index goes to the per-user cache, where the next start finds it."""
    disk = PrivateMount(tmp_path / "disk", size="16m")
    data = disk.outside(disk.path / "data")
    shutil.copytree(tiny_imagenet, data, ignore=shutil.ignore_patterns(".cspresnet_index"))
    cached_index(aged(data) / "train", find_classes(data / "train"))
    beside = (data / ".cspresnet_index" / "train.idx").read_bytes()
    shutil.copy(next((data / "train" / "n00000000").iterdir()), data / "train" / "n00000000" / "added.JPEG")
    aged(data)
    disk.run(f"mount -o remount,ro {disk.path}")
    cache = tmp_path / "cache"

    def start_one():
        return disk.start(["env", f"XDG_CACHE_HOME={cache}", sys.executable, "-c", BUILD, disk.path / "data"])

    started = [start_one() for _ in range(2)]
    logs = [process.communicate(timeout=120)[0] for process in started]
    assert all(process.returncode == 0 for process in started), logs
    assert sum("samples built in" in log for log in logs) == 1 and sum("samples read from" in log for log in logs) == 1, logs
    assert all(str(cache / "cspresnet" / "index") in log for log in logs), logs
    assert len(list((cache / "cspresnet" / "index").glob("data-*/train.idx"))) == 1
    assert (data / ".cspresnet_index" / "train.idx").read_bytes() == beside  # out of date, passed over
    later = start_one().communicate(timeout=120)[0]
    assert "25 samples read from" in later and str(cache) in later and "could not cache" not in later, later
