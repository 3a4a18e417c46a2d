"""A run survives kills, signals, full disks, bad files and NaNs, and a resumed run is
bitwise the run that never stopped. Every test here runs train.py (slow)."""
import csv
import json
import os
import re
import shutil
import signal
import sys
import time

import pytest
import torch
from PIL import Image

import validate as validate_script
from common.files import remove_leftovers
from cspresnet.checkpoint import load_checkpoint
from cspresnet.optim import build_schedule
from cspresnet.recipe_files import load_recipe
from cspresnet.run_folder import CheckpointFolder, RunFolder
from cspresnet.signals import EXIT_PREEMPTED
from tests.helpers import (TINY_OVERRIDES, PrivateMount, child_pids, last_wins, read_until, run_cli, start, torchrun,
                           train_here, wait_until_gone)

pytestmark = pytest.mark.slow

# 6 steps per epoch, 12 in all; dropout and drop-path on, so the random generators matter.
RESUME_OVERRIDES = last_wins(*TINY_OVERRIDES, "batch_size=4", "checkpoint.every_steps=2", "model.drop_rate=0.2",
                             "model.drop_path_rate=0.1")


def train_args(data, output, *extra):
    return ["train.py", "--recipe", "demo.yaml", "--data-dir", data, "--output", output, *last_wins(*RESUME_OVERRIDES, *extra)]


def summary_column(output, column):
    with open(output / "summary.csv") as handle:
        return [row[column] for row in csv.DictReader(handle)]


def assert_same_run(a, b):
    """Every tensor of the final checkpoints equal, and the same loss in summary.csv."""
    left, right = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert left["step"] == right["step"] == 12
    for key in left["model"]:
        assert torch.equal(left["model"][key], right["model"][key]), key
    for index, state in left["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], right["optimizer"]["state"][index]["momentum_buffer"])
    assert summary_column(a, "train_loss") == summary_column(b, "train_loss")
    assert summary_column(a, "top1") == summary_column(b, "top1")


@pytest.fixture(scope="module")
def one_process_baseline(tiny_imagenet, tmp_path_factory):
    output = tmp_path_factory.mktemp("baseline1")
    train_here(train_args(tiny_imagenet, output))
    return output


@pytest.fixture(scope="module")
def two_process_baseline(tiny_imagenet, tmp_path_factory):
    output = tmp_path_factory.mktemp("baseline2")
    run_cli(torchrun(2, *train_args(tiny_imagenet, output)))
    return output


def newest_step(output) -> int:
    return max(step for step, _ in CheckpointFolder(output, 2).step_files())


def test_sigkill_mid_epoch_then_resume_is_bitwise_exact(tiny_imagenet, tmp_path, one_process_baseline):
    output = tmp_path / "run"
    process = start([sys.executable, *train_args(tiny_imagenet, output)])
    read_until(process, "step 9 ")  # epoch 2, one step after the step-8 checkpoint
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert newest_step(output) == 8  # killed between checkpoints: step 9 is lost and redone

    resumed = train_here(train_args(tiny_imagenet, output, "--resume", "auto"))
    assert "resumed from" in resumed.stdout and "at step 8" in resumed.stdout
    assert "inexactly" not in resumed.stdout
    assert_same_run(output, one_process_baseline)


def test_two_processes_sigkill_then_resume_is_bitwise_exact(tiny_imagenet, tmp_path, two_process_baseline):
    output = tmp_path / "run"
    process = start(torchrun(2, *train_args(tiny_imagenet, output)))
    read_until(process, "step 9 ")
    ranks = child_pids(process.pid)
    os.killpg(process.pid, signal.SIGKILL)  # torchrun's group: the ranks, in sessions of their own, die with it
    process.wait()
    for rank in ranks:
        wait_until_gone(rank)
    assert newest_step(output) == 8  # no rank trained on after its launcher died
    run_cli(torchrun(2, *train_args(tiny_imagenet, output, "--resume", "auto")))
    assert_same_run(output, two_process_baseline)


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_and_exits_75_then_resumes_exactly(tiny_imagenet, tmp_path, one_process_baseline,
                                                                stop_signal):
    output = tmp_path / "run"
    process = start([sys.executable, *train_args(tiny_imagenet, output)])
    read_until(process, "step 3 ")
    process.send_signal(stop_signal)
    rest = process.communicate(timeout=120)[0]
    assert process.returncode == EXIT_PREEMPTED, rest
    stopped_at = load_checkpoint(output / "last.pt")["step"]
    assert 3 <= stopped_at < 6 and f"stopping on {stop_signal.name}: checkpoint saved at step {stopped_at}" in rest
    train_here(train_args(tiny_imagenet, output, "--resume", "auto"))
    assert_same_run(output, one_process_baseline)


def test_a_two_process_run_writes_its_outputs_once_and_validates_the_same_on_two(tiny_imagenet, two_process_baseline):
    rows = list(csv.DictReader(open(two_process_baseline / "summary.csv")))
    assert [(int(r["epoch"]), int(r["step"])) for r in rows] == [(1, 6), (2, 12)]  # written once, by rank 0
    files = {path.name for path in two_process_baseline.iterdir()}
    assert {"best.pt", "last.pt", "step-00000010.pt", "step-00000012.pt"} <= files
    args = ["--checkpoint", two_process_baseline / "last.pt", "--data-dir", tiny_imagenet, "--workers", "0"]
    single = validate_script.main([str(a) for a in args])
    double = json.loads(run_cli([*torchrun(2), "validate.py", *args]).stdout.strip().splitlines()[-1])
    assert double["images"] == single["images"] == 15  # 8 + 7, no padding duplicates
    assert double["world_size"] == 2
    assert (double["top1"], double["top5"]) == (single["top1"], single["top5"])


def test_sigterm_to_every_process_of_a_torchrun_job_twice_saves_once_and_resumes_exactly(tiny_imagenet, tmp_path,
                                                                                         two_process_baseline):
    """As SLURM preempts a job step: SIGTERM to torchrun, to each rank and to each loader
    worker at once, while torchrun forwards its own copy to each rank's process group; then
    all of it again. Every rank saves once and exits 75, no worker dies of it."""
    output = tmp_path / "run"
    process = start(torchrun(2, *train_args(tiny_imagenet, output, "data.workers=1")))
    read_until(process, "step 3 ")
    ranks = child_pids(process.pid)
    everyone = [process.pid, *ranks, *(worker for rank in ranks for worker in child_pids(rank))]
    assert len(everyone) == 5
    for _ in range(2):
        for pid in everyone:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    rest = process.communicate(timeout=120)[0]
    status = (output / "status").read_text()
    assert status.startswith("preempted at step "), (status, rest)
    stopped_at = int(status.split()[-1])
    assert f"stopping on SIGTERM: checkpoint saved at step {stopped_at}" in rest
    assert "ending without saving" not in rest and "killed by signal" not in rest, rest
    assert load_checkpoint(output / "last.pt")["step"] == stopped_at
    run_cli(torchrun(2, *train_args(tiny_imagenet, output, "data.workers=1", "--resume", "auto")))
    assert_same_run(output, two_process_baseline)


def test_a_resume_with_another_global_batch_goes_on_along_the_schedule(tiny_imagenet, tmp_path):
    """Epoch 1 at batch 4 (6 updates), epoch 2 at batch 8 (3): the learning rate of each
    later update is the schedule's at the images trained so far, not 0 past its end."""
    output = tmp_path / "run"
    train_here(train_args(tiny_imagenet, output, "epochs=1"))
    resumed = train_here(train_args(tiny_imagenet, output, "epochs=2", "batch_size=8", "--resume", "auto"))
    assert "resuming inexactly: the recipe changed" in resumed.stdout
    lrs = [float(lr) for lr in re.findall(r"^step \d+ loss \S+ lr (\S+)", resumed.stdout, flags=re.MULTILINE)]
    schedule = build_schedule(load_recipe("demo.yaml", last_wins(*RESUME_OVERRIDES, "epochs=2", "batch_size=8")), 3)
    assert lrs == pytest.approx([schedule(position) for position in (4, 5, 6)], rel=1e-5)
    assert lrs[0] > lrs[1] > 0  # the poly schedule reaches 0 only at its last update
    assert load_checkpoint(output / "last.pt")["step"] == 9


def test_a_killed_rank_comes_back_under_max_restarts(tiny_imagenet, tmp_path, two_process_baseline):
    output = tmp_path / "run"
    process = start(torchrun(2, *train_args(tiny_imagenet, output, "--resume", "auto"), extra=["--max-restarts=1"]))
    read_until(process, "step 5 ")
    workers = child_pids(process.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)  # one rank dies, e.g. OOM-killed
    rest = process.communicate(timeout=300)[0]
    assert process.returncode == 0, rest
    assert "resumed from" in rest
    assert_same_run(output, two_process_baseline)


KILL_DURING_SAVE = """
import sys, torch
from cspresnet.run_folder import CheckpointFolder
folder = CheckpointFolder(sys.argv[1], keep_last=2)
step = 0
while True:
    step += 1
    folder.save({"step": step, "weights": torch.full((4_000_000,), float(step))}, step, is_best=step % 3 == 0)
    print("saved", step, flush=True)
"""


def test_a_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    """16 MB checkpoints written in a loop, killed at staggered moments of a save."""
    for delay in (0.0, 0.013, 0.029, 0.047, 0.071, 0.101, 0.149):
        process = start([sys.executable, "-c", KILL_DURING_SAVE, tmp_path])
        read_until(process, "saved 2")
        time.sleep(delay)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        folder = CheckpointFolder(tmp_path, keep_last=2)
        path, state = folder.newest_loadable()
        assert path.name == "last.pt" and torch.all(state["weights"] == state["step"])
        for step, step_path in folder.step_files():
            assert load_checkpoint(step_path)["step"] == step
        if (tmp_path / "best.pt").exists():
            best = load_checkpoint(tmp_path / "best.pt")
            assert best["step"] % 3 == 0 and torch.all(best["weights"] == best["step"])
        remove_leftovers(tmp_path)
        assert not list(tmp_path.glob(".*.tmp"))


def test_nonfinite_loss_stops_and_leaves_the_last_checkpoint_alone(tiny_imagenet, tmp_path):
    output = tmp_path / "run"
    train_here(train_args(tiny_imagenet, output, "epochs=1"))
    before = {p.name: p.read_bytes() for p in output.glob("*.pt")}
    blown_up = train_here(train_args(tiny_imagenet, output, "epochs=2", "optim.lr=1e30",
                                                    "runtime.max_nonfinite_steps=2", "--resume", "auto"), check=False)
    assert blown_up.returncode == 3, blown_up.stdout + blown_up.stderr
    assert "not finite" in blown_up.stderr
    assert {p.name: p.read_bytes() for p in output.glob("*.pt")} == before


def hostile_copy(source, target):
    """The tiny set plus everything a real ImageNet copy throws at a loader."""
    import shutil

    shutil.copytree(source, target)
    folder = target / "train" / "n00000001"
    good = next(folder.glob("*.JPEG")).read_bytes()
    (folder / "truncated.JPEG").write_bytes(good[: len(good) // 3])
    (folder / "zero_bytes.JPEG").write_bytes(b"")
    (folder / "html_error_page.JPEG").write_text("<html>404</html>")
    Image.new("RGB", (50, 40), (10, 200, 30)).save(folder / "png_inside.JPEG", "PNG")
    Image.new("RGB", (50, 40), (10, 200, 30)).convert("CMYK").save(folder / "cmyk.JPEG", "JPEG")
    Image.new("L", (50, 40), 128).save(folder / "gray.JPEG", "JPEG")
    for junk in (".DS_Store", "Thumbs.db", "readme.txt"):
        (folder / junk).write_bytes(b"\x00junk")
    return target


def test_hostile_files_are_skipped_counted_and_never_shift_the_sampler(tiny_imagenet, tmp_path):
    data = hostile_copy(tiny_imagenet, tmp_path / "hostile")
    output = tmp_path / "run"
    result = train_here(train_args(data, output, "epochs=1", "batch_size=6",
                                                  "data.max_unreadable_fraction=0.2"))
    warned = re.findall(r"^warning: skipping unreadable image \S+/(\S+) \(", result.stderr, flags=re.MULTILINE)
    assert sorted(warned) == [
        "html_error_page.JPEG", "truncated.JPEG", "zero_bytes.JPEG"]
    assert summary_column(output, "unreadable_images") == ["3"]  # 30 images, 5 steps of 6: all served once
    from data.sources.folders import find_classes, index_split

    indexed = [p.split("/")[-1] for p, _ in index_split(data / "train", find_classes(data / "train"))]
    assert len(indexed) == 30 and "readme.txt" not in indexed and "Thumbs.db" not in indexed
    assert {"truncated.JPEG", "zero_bytes.JPEG", "png_inside.JPEG", "cmyk.JPEG", "gray.JPEG"} <= set(indexed)


def test_too_many_unreadable_files_stop_the_run(tiny_imagenet, tmp_path):
    data = hostile_copy(tiny_imagenet, tmp_path / "hostile")
    result = train_here(train_args(data, tmp_path / "run", "epochs=1", "batch_size=6",
                                                  "data.max_unreadable_fraction=0.05", "data.min_unreadable_allowed=2"),
                        check=False)
    assert result.returncode == 2
    assert "distinct training images could not be decoded" in result.stderr


def test_a_disk_that_really_fills_up_skips_saves_and_a_resume_on_it_ends_bitwise_exact(tiny_imagenet, tmp_path,
                                                                                         one_process_baseline):
    """A tmpfs filled to its last byte under the running job: torch.save's 'unexpected pos'
    error is known as a full disk, the save is skipped, the previous checkpoint stays. A
    crash then, and --resume auto on the still-full disk, train on; once space is back the
    next due save works, and the run ends as if nothing had happened."""
    disk = PrivateMount(tmp_path / "disk", size="1g")
    output, seen = disk.path / "run", disk.outside(disk.path / "run")
    process = disk.start([sys.executable, *train_args(tiny_imagenet, output)])
    read_until(process, "step 3 ")  # the step-2 checkpoint is written
    process.send_signal(signal.SIGSTOP)
    filler = disk.fill()
    process.send_signal(signal.SIGCONT)
    read_until(process, "warning: disk full in")  # the step-4 save
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert load_checkpoint(seen / "last.pt")["step"] == 2 and not list(seen.glob(".*.tmp"))

    resumed = disk.start([sys.executable, *train_args(tiny_imagenet, output, "--resume", "auto")])
    read_until(resumed, "warning: disk full in")  # its step-4 save, on the disk still full
    resumed.send_signal(signal.SIGSTOP)
    filler.unlink()
    resumed.send_signal(signal.SIGCONT)
    rest = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, rest
    assert not list(seen.glob(".*.tmp")) and (seen / "status").read_text() == "done at step 12\n"
    assert_same_run(seen, one_process_baseline)


def test_sigterm_on_a_full_disk_claims_no_save_and_the_advised_rerun_works(tiny_imagenet, tmp_path):
    """A disk that fills before the first checkpoint: a SIGTERM cannot save, and the log and
    status say so. The advised rerun, on the still full disk, trains to its end, writes its
    summary but not its final checkpoint, and says what to run; once there is space, that
    command trains the run. A status line is still updated on a disk full to its last byte."""
    disk = PrivateMount(tmp_path / "disk", size="1g")
    output, seen = disk.path / "run", disk.outside(disk.path / "run")
    process = disk.start([sys.executable, *train_args(tiny_imagenet, output, "epochs=1")])
    read_until(process, "step 1 ")
    process.send_signal(signal.SIGSTOP)
    filler = disk.fill()
    os.truncate(filler, filler.stat().st_size - (256 << 10))  # room for small files, none for a checkpoint
    process.send_signal(signal.SIGCONT)
    read_until(process, "warning: disk full in")  # the step-2 save
    process.send_signal(signal.SIGTERM)
    rest = process.communicate(timeout=120)[0]
    assert process.returncode == EXIT_PREEMPTED, rest
    assert "checkpoint saved" not in rest and "could not be written (the disk is full); no checkpoint" in rest, rest
    assert "Traceback" not in rest  # TensorBoard's writer thread dies of the full disk, without a word
    assert (seen / "status").read_text() == "preempted at step 0\n" and not list(seen.glob("*.pt"))

    ended = train_here(train_args(tiny_imagenet, seen, "epochs=1", "--resume", "auto"), check=False)
    assert ended.returncode == 1, ended.stderr
    assert (f"final checkpoint was not written; no checkpoint of this run was written; free space in {seen}, then "
            f"rerun with --resume auto (it starts again from step 0)") in ended.stderr
    assert (seen / "summary.csv").is_file() and not list(seen.glob("*.pt"))
    filler.unlink()
    again = train_here(train_args(tiny_imagenet, seen, "epochs=1", "--resume", "auto"))
    assert "never wrote a checkpoint" in again.stderr and (seen / "status").read_text() == "done at step 6\n"

    disk.fill()
    RunFolder(seen, keep_last=2).set_status("preempted at step 6")
    assert (seen / "status").read_text() == "preempted at step 6\n"


def test_dev_shm_filling_before_an_evaluation_keeps_the_epochs_training(tiny_imagenet, tmp_path,
                                                                         one_process_baseline):
    """/dev/shm full when epoch 1's evaluation starts its loader: one line that says what to
    change, the epoch's training saved before its evaluation, and a resume bitwise exact."""
    shm = PrivateMount("/dev/shm", size="64m")
    output = tmp_path / "run"
    process = shm.start([sys.executable, *train_args(tiny_imagenet, output, "data.workers=2")])
    read_until(process, "step 3 ")
    process.send_signal(signal.SIGSTOP)
    shm.fill()
    process.send_signal(signal.SIGCONT)
    out = process.communicate(timeout=120)[0]
    assert process.returncode == 1 and "Traceback" not in out, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: a loader worker ran out of shared memory") and "--shm-size" in last, last
    assert last.endswith("checkpoint saved at step 6; continue with --resume auto"), last
    assert load_checkpoint(output / "last.pt")["step"] == 6
    train_here(train_args(tiny_imagenet, output, "--resume", "auto"))
    assert_same_run(output, one_process_baseline)


def test_a_dataset_moved_to_another_path_resumes_bitwise_exact(tiny_imagenet, tmp_path, one_process_baseline):
    data = shutil.copytree(tiny_imagenet, tmp_path / "mounted_here")
    output = tmp_path / "run"
    process = start([sys.executable, *train_args(data, output)])
    read_until(process, "step 9 ")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    moved = data.rename(tmp_path / "mounted_elsewhere")
    resumed = train_here(train_args(moved, output, "--resume", "auto"))
    assert "at step 8" in resumed.stdout and "inexactly" not in resumed.stdout
    assert_same_run(output, one_process_baseline)
