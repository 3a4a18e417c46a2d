"""Logs a batch job can read: step lines with the pace, the data wait, the place in the epoch and the time left;
a progress line every PERIOD_S seconds from each start-up stage of minutes when the output is not a terminal, and a
tqdm bar when it is; `downloads verify` on Kaggle's download."""
import fcntl
import io
import logging
import os
import pty
import re
import struct
import sys
import termios

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import common.progress
import data.downloads
from common.progress import progress
from cspresnet import run_log
from cspresnet.run_log import StepClock, StepPosition
from data.config import DataConfig
from data.pack_shards import pack
from data.sources import training_splits
from data.sources.tars import shard_index
from tests.archive_helpers import kaggle_tree, kaggle_zip, official_archives
from tests.helpers import TINY_OVERRIDES, in_this_process, last_wins, start

STEP_LINE = re.compile(r"^step (\d+) loss (\S+) lr (\S+) epoch (\d+)/(\d+) step (\d+)/(\d+) (\S+) img/s "
                       r"data wait (\d+)% epoch left (\d+):(\d\d):(\d\d) run left (\d+):(\d\d):(\d\d)$", re.MULTILINE)


class FakeClock:
    """time.perf_counter as a test moves it."""

    def __init__(self):
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


def seconds(h, m, s) -> int:
    return int(h) * 3600 + int(m) * 60 + int(s)


def test_a_non_terminal_runs_step_lines_carry_pace_data_wait_position_and_time_left(tiny_imagenet, tmp_path):
    output = tmp_path / "run"
    process = start([sys.executable, "train.py", "--recipe", "demo.yaml", "--data-dir", tiny_imagenet, "--output",
                     output, *last_wins(*TINY_OVERRIDES, "data.workers=1")])  # stdout a pipe, as under SLURM
    out = process.communicate(timeout=120)[0]
    assert process.returncode == 0, out
    lines = STEP_LINE.findall(out)
    assert len(lines) == 6 == out.count("\nstep "), out  # 2 epochs of 3 steps, every line whole
    assert [(int(s), int(e), int(es), int(k), int(n)) for s, _, _, e, es, k, n, *_ in lines] == \
           [(1, 1, 2, 1, 3), (2, 1, 2, 2, 3), (3, 1, 2, 3, 3), (4, 2, 2, 1, 3), (5, 2, 2, 2, 3), (6, 2, 2, 3, 3)]
    assert all(float(line[7]) > 0 and 0 <= int(line[8]) <= 100 for line in lines), out
    for step, line in enumerate(lines, start=1):  # the time left at the line's pace (an interval is one step here)
        step_s = 8 / float(line[7])
        assert abs(seconds(*line[9:12]) - (3 - (step - 1) % 3 - 1) * step_s) <= 0.51, line
        assert abs(seconds(*line[12:15]) - (6 - step) * step_s) <= 0.51, line
    events = EventAccumulator(str(output))
    events.Reload()
    assert {"train/loss", "train/lr", "train/images_per_s", "train/data_wait"} <= set(events.Tags()["scalars"])
    assert len(events.Scalars("train/data_wait")) == 6


def test_the_step_clock_times_the_interval_the_wait_in_the_loader_and_what_is_left(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(run_log, "time", clock)

    def loader():
        for batch in range(5):
            clock.now += 0.25  # the loader keeps the step waiting
            yield batch

    timer = StepClock()
    batches = timer.timed(loader())
    for _ in range(2):
        next(batches)
        clock.now += 0.75  # the step's work
    rates, words = timer.lap(StepPosition(epoch=2, epochs=3, step=2, steps=5, batch_size=64))
    assert rates == dict(images_per_s=64.0, data_wait=0.25)  # 2 steps of 64 images in 2 s, 0.5 s of it waiting
    # 3 steps of 1 s left in this epoch, and 5 more in the last one
    assert words == "epoch 2/3 step 2/5 64.0 img/s data wait 25% epoch left 0:00:03 run left 0:00:08"
    next(batches)
    clock.now += 3600 * 30 - 0.25  # the next interval is one slow step, past a day
    rates, words = timer.lap(StepPosition(epoch=2, epochs=3, step=3, steps=5, batch_size=64))
    assert rates["data_wait"] == pytest.approx(0.25 / 108000) and words.endswith("left 60:00:00 run left 210:00:00")
    assert list(timer.timed(iter([]))) == []


def test_progress_says_a_line_every_period_and_a_last_one_when_not_on_a_terminal(monkeypatch, caplog):
    clock = FakeClock()
    monkeypatch.setattr(common.progress, "time", clock)
    monkeypatch.setattr(common.progress, "PERIOD_S", 1.0)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # where tqdm draws: not a terminal
    caplog.set_level(logging.INFO, logger="data.progress")
    for _ in progress(range(10), "indexing X", 10, "files"):
        clock.now += 0.4
    assert [r.getMessage() for r in caplog.records] == [
        "indexing X: 3/10 files (30%), 1.2 s", "indexing X: 6/10 files (60%), 2.4 s",
        "indexing X: 9/10 files (90%), 3.6 s", "indexing X: 10/10 files (100%), 4.0 s"]
    assert sys.stderr.getvalue() == ""
    caplog.clear()
    for _ in progress([b"x" * 700_000] * 3, "hashing Y", None, "B", size=len):
        clock.now += 2
    assert [r.getMessage() for r in caplog.records] == [  # the last line said it all: no line after it
        "hashing Y: 700kB, 2.0 s", "hashing Y: 1.40MB, 4.0 s", "hashing Y: 2.10MB, 6.0 s"]
    caplog.clear()
    assert list(progress(range(3), "quick", 3)) == [0, 1, 2] and caplog.records == []  # within a period: silent


def test_progress_draws_a_tqdm_bar_on_a_terminal_and_logs_nothing(monkeypatch, caplog):
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal of 100 columns
    monkeypatch.setattr(common.progress, "PERIOD_S", 0.0)
    caplog.set_level(logging.INFO, logger="data.progress")
    with os.fdopen(follower, "w") as terminal:
        monkeypatch.setattr(sys, "stderr", terminal)
        assert list(progress(range(4), "indexing Z", 4, "files")) == [0, 1, 2, 3]
        os.set_blocking(leader, False)  # nothing drawn fails the test instead of hanging it
        drawn = os.read(leader, 1 << 16).decode()
        monkeypatch.undo()  # sys.stderr back before the terminal closes
    os.close(leader)
    assert "\r" in drawn and "indexing Z:   0%|" in drawn and "| 0/4 [" in drawn and caplog.records == []


def test_each_start_up_stage_of_minutes_says_its_progress(tiny_imagenet, tmp_path, monkeypatch, caplog):
    """With the period at 0: a line for every item, in the log of a real indexing, hashing, arranging, packing."""
    monkeypatch.setattr(common.progress, "PERIOD_S", 0.0)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    caplog.set_level(logging.INFO, logger="data.progress")
    archives = official_archives(tiny_imagenet, tmp_path / "archives", labels="csv")
    training_splits(DataConfig(dir=str(archives)), 0)
    zipped = kaggle_zip(kaggle_tree(tiny_imagenet, tmp_path / "kaggle"), tmp_path / "zip" / "kaggle.zip")
    training_splits(DataConfig(dir=str(zipped)), 0)
    pack(tiny_imagenet, tmp_path / "shards", train_shards=4, val_shards=2, threads=2)
    shard_index(tmp_path / "shards", "train")
    data.downloads.md5_of(archives / "ILSVRC2012_img_val.tar")
    data.downloads.arrange(zipped, tmp_path / "arranged")
    said = "\n".join(r.getMessage() for r in caplog.records)
    for line in ("reading the headers of ILSVRC2012_img_val.tar: 15 members, ",
                 "indexing ILSVRC2012_img_train.tar: 3/3 class tars (100%), ",
                 "indexing kaggle.zip's train images: 24/24 images (100%), ",
                 f"packing into {tmp_path / 'shards'}: 6/6 shards (100%), ",
                 f"indexing the shards in {tmp_path / 'shards'}: 1/4 shards (25%), ",
                 "hashing ILSVRC2012_img_val.tar: ",
                 f"arranging {tmp_path / 'arranged' / 'val'}: 15/15 images (100%), "):
        assert line in said, said


@pytest.mark.parametrize("given", ["zip", "zip_folder", "tree"])
def test_verify_on_kaggles_download_says_kaggle_publishes_no_md5s(tiny_imagenet, tmp_path, given):
    tree = kaggle_tree(tiny_imagenet, tmp_path / "kaggle")
    zipped = kaggle_zip(tree, tmp_path / "zip" / "imagenet-object-localization-challenge.zip")
    folder = dict(zip=zipped, zip_folder=zipped.parent, tree=tree)[given]
    result = in_this_process(data.downloads.main, "verify", folder)
    assert result.returncode == 2 and result.stdout == ""
    described = "Kaggle's download (unzipped)" if given == "tree" else "Kaggle's zip"
    expected = (f"error: {tree if given == 'tree' else zipped} is {described}: Kaggle publishes no MD5s, so it "
                f"cannot be checked against official checksums")
    assert result.stderr.startswith(expected) and len(result.stderr.splitlines()) == 1, result.stderr
    assert ("python -m zipfile -t on it checks its members' CRC-32s" in result.stderr) == (given != "tree")
