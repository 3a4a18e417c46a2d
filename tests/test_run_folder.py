"""A run folder belongs to one run and keeps a true record of it: no start on top of another
run's results, one job at a time, each segment's recipe and start step kept, a status line
that a requeue script can act on, and bad input refused in one line before any training."""
import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile

import pytest
import torch
import yaml

import train
from cspresnet.run_folder import RunFolder
from cspresnet.signals import EXIT_PREEMPTED
from tests.helpers import (REPO, TINY_OVERRIDES, PrivateMount, a_training_checkpoint, last_wins, in_this_process, read_until, run_cli, start, torchrun,
                           train_here)


def train_args(data, output, *extra):
    return ["--recipe", "demo.yaml", "--data-dir", str(data), "--output", str(output), *last_wins(*TINY_OVERRIDES, *extra)]


def train_in_this_process(*argv):
    """train.main here, for refusals that come before any training: exit code, last stderr line."""
    result = in_this_process(train.main, *argv)
    return result.returncode, (result.stderr.strip().splitlines() or [""])[-1]


def run_files(folder):
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.name != ".lock"}


def another_runs_results(folder):
    folder.mkdir(parents=True)
    (folder / "best.pt").write_bytes(b"stands for a 91% model")
    (folder / "summary.csv").write_text("epoch,top1\n1,91.0\n")
    return run_files(folder)


def test_a_new_run_refuses_a_folder_holding_another_runs_results(tiny_imagenet, tmp_path):
    output = tmp_path / "run"
    before = another_runs_results(output)  # no last.pt: the old guard let this through
    code, line = train_in_this_process(*train_args(tiny_imagenet, output))
    assert code == 2 and line.startswith("error: ") and "already holds a run (best.pt, summary.csv)" in line
    assert run_files(output) == before


def test_resume_auto_refuses_to_start_over_when_no_checkpoint_loads(tiny_imagenet, tmp_path):
    output = tmp_path / "run"
    before = another_runs_results(output)
    (output / "last.pt").write_bytes(b"\0" * 100)
    before = run_files(output)
    code, line = train_in_this_process(*train_args(tiny_imagenet, output, "--resume", "auto"))
    assert code == 2 and "none of the checkpoints" in line and "refusing to start over" in line
    assert run_files(output) == before


def test_a_start_that_failed_before_training_leaves_the_folder_to_the_corrected_command(tiny_imagenet, tmp_path):
    output = tmp_path / "run"
    code, line = train_in_this_process(*train_args(tmp_path / "tpyo", output))
    assert code == 2 and "does not exist" in line, line
    code, line = train_in_this_process(*train_args(tiny_imagenet, output, "--initial-weights", tmp_path / "no.pth"))
    assert code == 2 and "no.pth does not exist" in line, line
    assert run_files(output) == {}  # no status, nothing a new run would be refused for
    assert RunFolder(output, keep_last=2).choose_start(None) is None


@pytest.mark.slow
def test_every_rank_refuses_with_rank_0(tiny_imagenet, tmp_path):
    output = tmp_path / "run"
    another_runs_results(output)
    result = run_cli(torchrun(2, "train.py", *train_args(tiny_imagenet, output)), check=False)
    assert result.returncode != 0
    assert result.stderr.count("already holds a run (best.pt, summary.csv)") == 2, result.stderr


@pytest.mark.slow
def test_a_second_job_on_a_folder_in_use_is_refused_naming_the_holder(tiny_imagenet, tmp_path):
    output = tmp_path / "run"
    first = start([sys.executable, "train.py", *train_args(tiny_imagenet, output, "epochs=20")])
    read_until(first, "step 1 ")
    code, line = train_in_this_process(*train_args(tiny_imagenet, output, "--resume", "auto"))
    assert code == 2 and f"in use by another job (host {socket.gethostname()} pid {first.pid})" in line
    assert first.poll() is None  # the first job goes on


def segments(output):
    return [json.loads(line) for line in (output / "segments.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_run_in_segments_keeps_each_ones_recipe_and_says_how_it_ended(tiny_imagenet, tmp_path):
    """Preempted mid-epoch, resumed with a bigger global batch (inexact, said so), done, then
    restarted once more with nothing left to train."""
    output = tmp_path / "run"
    first = start([sys.executable, "train.py", *train_args(tiny_imagenet, output, "batch_size=4")])
    read_until(first, "step 5 ")
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
    assert first.returncode == EXIT_PREEMPTED
    stopped_at = int((output / "status").read_text().split("preempted at step ")[1])
    assert 5 <= stopped_at <= 6  # mid-epoch or at its end (6 steps of 4)

    resumed = train_here(["train.py", *train_args(tiny_imagenet, output, "batch_size=8", "--resume", "auto")])
    images = stopped_at * 4
    assert f"resuming inexactly: the global batch changed from 4 to 8 in epoch 1, after {images} of its images" \
        in resumed.stdout
    assert (output / "status").read_text() == f"done at step {stopped_at + 3 + (3 - min(images // 8, 3))}\n"
    assert yaml.safe_load((output / "recipe.yaml").read_text())["batch_size"] == 4  # the run's start, kept
    first_segment, second_segment = segments(output)
    assert (first_segment["start_step"], first_segment["recipe"]["batch_size"]) == (0, 4)
    assert (second_segment["start_step"], second_segment["recipe"]["batch_size"]) == (stopped_at, 8)
    assert any("the recipe changed: batch_size 4 -> 8" in note for note in second_segment["inexact"])

    again = train_here(["train.py", *train_args(tiny_imagenet, output, "batch_size=16", "--resume", "auto")])
    assert "done: best top-1" in again.stdout
    assert len(segments(output)) == 2 and yaml.safe_load((output / "recipe.yaml").read_text())["batch_size"] == 4


OLDEST_RESUMED = "26ce8b7"  # 2026-11-30, before issue 22: the oldest code whose runs this version continues


@pytest.fixture(scope="module")
def older_code(tmp_path_factory):
    """The project as it was at OLDEST_RESUMED, from this clone's own history."""
    folder = tmp_path_factory.mktemp(OLDEST_RESUMED)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", OLDEST_RESUMED], capture_output=True, check=True)
    tarfile.open(fileobj=io.BytesIO(archive.stdout)).extractall(folder, filter="data")
    return folder


def stopped_after(process, line):
    """SIGTERM to the job's processes once the run has printed `line`; its exit code."""
    read_until(process, line)
    os.killpg(process.pid, signal.SIGTERM)
    process.communicate(timeout=120)
    return process.returncode


@pytest.mark.slow
def test_a_run_begun_by_older_code_resumes_under_this_code_as_often_as_it_is_stopped(tiny_imagenet, tmp_path,
                                                                                   older_code):
    """Its checkpoint's summary rows lack train_size: summary.csv keeps one header of every
    column, filled in for the old rows, through each later resume."""
    output, args = tmp_path / "run", train_args(tiny_imagenet, tmp_path / "run", "epochs=4")
    older = start([sys.executable, older_code / "train.py", *args])  # its own modules, beside its script
    assert stopped_after(older, "epoch=1 ") == EXIT_PREEMPTED
    assert "train_size" not in (output / "summary.csv").read_text().splitlines()[0]
    resumed = start([sys.executable, "train.py", *args, "--resume", "auto"])
    assert stopped_after(resumed, "epoch=2 ") == EXIT_PREEMPTED
    train_here(["train.py", *args, "--resume", "auto"])
    with open(output / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["1", "2", "3", "4"]
    assert all(None not in row and "" not in row.values() for row in rows), rows  # no field without a column
    assert {row["train_size"] for row in rows} == {"32"}
    assert (output / "status").read_text() == "done at step 12\n" and len(segments(output)) == 3


@pytest.mark.slow
def test_a_few_unreadable_files_in_a_small_set_train_through_and_are_counted(tiny_imagenet, tmp_path):
    data = shutil.copytree(tiny_imagenet, tmp_path / "data")
    good = next((data / "train" / "n00000001").glob("*.JPEG")).read_bytes()
    (data / "train" / "n00000001" / "truncated.JPEG").write_bytes(good[: len(good) // 3])
    result = train_here(["train.py", *train_args(data, tmp_path / "run", "epochs=1", "batch_size=5")])
    assert "truncated.JPEG" in result.stderr and "1 of the 10 allowed" in result.stderr
    assert "unreadable_images=1" in result.stdout  # 25 images, 5 steps of 5: each served once


def two_class_copy(source, target):
    shutil.copytree(source, target)
    for split in ("train", "val"):
        shutil.rmtree(target / split / "n00000002")
    return target


@pytest.mark.parametrize("case, message", [
    ("fewer images than one batch", "has 24 images, fewer than one global batch (batch_size=32); lower batch_size"),
    ("output is a file", "is a file, not a folder"),
    ("classes changed on resume", "the checkpoint's classifier has 3 classes but the recipe has model.num_classes=2"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_imagenet, tmp_path, case, message):
    data, output, extra = tiny_imagenet, tmp_path / "run", []
    if case == "fewer images than one batch":
        extra = ["batch_size=32"]
    elif case == "output is a file":
        output.write_text("not a folder")
    else:
        data = two_class_copy(tiny_imagenet, tmp_path / "data")
        output.mkdir()
        torch.save(a_training_checkpoint(num_classes=3), output / "last.pt")
        extra = ["model.num_classes=2", "--resume", "auto"]
    code, line = train_in_this_process(*train_args(data, output, *extra))
    assert code == 2 and line.startswith("error: ") and message in line, line


@pytest.mark.slow
def test_a_read_only_output_folder_is_one_line_and_exit_2(tiny_imagenet, tmp_path):
    disk = PrivateMount(tmp_path / "disk", size="1m", options="ro")
    process = disk.start([sys.executable, "train.py", *train_args(tiny_imagenet, disk.path / "run")])
    out = process.communicate(timeout=120)[0]
    assert process.returncode == 2, out
    assert out.strip().splitlines()[-1] == (f"error: cannot write in the run folder {disk.path / 'run'}: "
                                            f"Read-only file system")


RUN_LOG_ON_A_FULL_DISK = """
import sys
from pathlib import Path
from cspresnet.console import setup_logging
from cspresnet.run_log import RunLog, StepPosition
setup_logging(0)
folder = Path(sys.argv[1])
log = RunLog(folder, enabled=True)
print("ready", flush=True)
sys.stdin.readline()  # the disk fills meanwhile
for step in log.clock.timed(range(1, 51)):
    log.step(step, 1.0, 0.1, StepPosition(1, 1, step, 50, 8))
log.epoch([dict(epoch=1, step=50, top1=10.0)])
log.close()
print("closed", flush=True)
"""


@pytest.mark.slow
def test_tensorboards_writer_thread_dying_of_a_full_disk_is_one_warning_not_a_traceback(tmp_path):
    disk = PrivateMount(tmp_path / "disk", size="1m")
    process = disk.start([sys.executable, "-c", RUN_LOG_ON_A_FULL_DISK, disk.path / "run"], stdin=subprocess.PIPE)
    read_until(process, "ready")
    disk.fill()
    out = process.communicate("go\n", timeout=60)[0]
    assert process.returncode == 0 and "closed" in out, out
    assert "Traceback" not in out and "warning: disk full: TensorBoard events lost until the next epoch's end" in out
