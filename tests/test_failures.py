"""Whatever fails, every process of the job ends within a bounded time, nonzero, and says
why: an error in the training process or in a loader worker, shared memory running out, a
peer that dies or hangs, a save that fails, a stuck process that is sent SIGTERM. Each
failure here is the real one (a killed process, a full or read-only filesystem), and a
hang fails the test at its time limit instead of stalling the suite."""
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

from cspresnet.checkpoint import load_checkpoint
from cspresnet.signals import EXIT_PREEMPTED
from tests.helpers import (TINY_OVERRIDES, PrivateMount, child_pids, last_wins, read_until, start, torchrun,
                           train_here)

pytestmark = pytest.mark.slow  # every test here starts train.py

BOUND_S = 90  # a failing job must be gone within this, start-up (~10 s a process here) included


def train_args(data, output, *extra):
    return ["train.py", "--recipe", "demo.yaml", "--data-dir", data, "--output", output,
            *last_wins(*TINY_OVERRIDES, "batch_size=4", "epochs=4", *extra)]


def ends_within(process: subprocess.Popen, seconds: float) -> str:
    """The rest of the process's output, once it has ended; fails the test if it hangs."""
    try:
        return process.communicate(timeout=seconds)[0]
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running {seconds} s later: it hangs") from None


def assert_every_process_gone(process: subprocess.Popen) -> None:
    """Nothing of the job (loader workers, ranks) is left in its process group."""
    for _ in range(50):
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"processes of the job outlived it: {subprocess.run(['pgrep', '-g', str(process.pid), '-a'], capture_output=True, text=True).stdout}")


def rank_pid(launcher_pid: int, rank: int) -> int:
    for pid in child_pids(launcher_pid):
        with open(f"/proc/{pid}/environ", "rb") as handle:
            if f"RANK={rank}".encode() in handle.read().split(b"\0"):
                return pid
    raise AssertionError(f"no rank {rank} under {launcher_pid}")


def wait_until_blocked(pid: int, quiet_s: float = 2.0) -> None:
    """Until the process has used no CPU for `quiet_s`: it waits for something that will not come."""
    def cpu_ticks():
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    last, since = cpu_ticks(), time.monotonic()
    while time.monotonic() - since < quiet_s:
        time.sleep(0.25)
        now = cpu_ticks()
        if now != last:
            last, since = now, time.monotonic()


def test_shared_memory_running_out_in_a_loader_worker_ends_the_run_with_a_hint(tiny_imagenet, tmp_path):
    shm = PrivateMount("/dev/shm", size="64k")  # Docker's default is 64 MB; a batch ring needs more
    process = shm.start([sys.executable, *train_args(tiny_imagenet, tmp_path / "run", "data.workers=2",
                                                     "data.img_size=64")])
    out = ends_within(process, BOUND_S)
    assert process.returncode == 1, out
    assert "error: a loader worker ran out of shared memory" in out and "--shm-size" in out
    assert_every_process_gone(process)


@pytest.mark.parametrize("second_signal", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_ends_a_stuck_process_after_the_stop_timeout_or_a_second_ctrl_c(tiny_imagenet, tmp_path,
                                                                                 second_signal):
    """Its loader worker frozen, the training process waits for its next batch: the first
    SIGTERM cannot be acted on at a step's end. The time limit ends it, without saving; a
    repeated SIGTERM (a scheduler delivering the same stop twice) changes nothing, and a
    person's second Ctrl-C ends it at once."""
    timeout_s = 600 if second_signal == signal.SIGINT else 4
    output = tmp_path / "run"
    process = start([sys.executable, *train_args(tiny_imagenet, output, "data.workers=1",
                                                 f"runtime.stop_timeout_s={timeout_s}")])
    read_until(process, "step 2 ")
    for worker in child_pids(process.pid):
        os.kill(worker, signal.SIGSTOP)
    wait_until_blocked(process.pid)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    time.sleep(1)
    process.send_signal(second_signal)
    out = ends_within(process, 60)
    took = time.monotonic() - started
    assert process.returncode == 128 + second_signal, out
    if second_signal == signal.SIGINT:
        assert "ending without saving: a second Ctrl-C (SIGINT)" in out and took < 20
    else:
        assert "ending without saving: it did not stop within runtime.stop_timeout_s=4 s of SIGTERM" in out
        assert 4 <= took < 30
    assert_every_process_gone(process)
    status = (output / "status").read_text()
    assert status.startswith("interrupted at step ") and "the last checkpoint stays as it was" in status


def test_stopped_loader_workers_end_the_run_naming_them_and_it_saves_where_it_got_to(tiny_imagenet, tmp_path):
    """Both workers SIGSTOP'd mid-epoch, as a worker stuck on a hung network read would be:
    no batch within data.loader_timeout_s ends the run, which says which workers, saves a
    checkpoint at the step it reached (one process) and exits 1."""
    output = tmp_path / "run"
    process = start([sys.executable, *train_args(tiny_imagenet, output, "data.workers=2",
                                                 "data.loader_timeout_s=3")])
    read_until(process, "step 2 ")
    workers = child_pids(process.pid)
    assert len(workers) == 2
    for worker in workers:
        os.kill(worker, signal.SIGSTOP)
    out = ends_within(process, BOUND_S)
    assert process.returncode == 1, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: the loader delivered no batch for 3 s (data.loader_timeout_s): worker 0 (pid "), last
    assert sorted(int(pid) for pid in re.findall(r"worker \d \(pid (\d+), stopped\)", last)) == sorted(workers), last
    saved = int(re.search(r"checkpoint saved at step (\d+); continue with --resume auto$", last).group(1))
    assert load_checkpoint(output / "last.pt")["step"] == saved >= 2
    assert (output / "status").read_text().startswith("failed: LoaderStallError: the loader delivered no batch")
    assert_every_process_gone(process)


def test_a_job_suspended_longer_than_the_loader_timeout_goes_on_when_it_is_resumed(tiny_imagenet, tmp_path):
    """SLURM's suspend: SIGSTOP to every process of the job (here the worker, then the rank
    while it waits for that worker's batch), SIGCONT to all twice the time-out later. The time
    stopped is not a stall."""
    output = tmp_path / "run"
    process = start([sys.executable, *train_args(tiny_imagenet, output, "data.workers=1", "data.loader_timeout_s=3")])
    read_until(process, "step 2 ")
    worker, = child_pids(process.pid)
    os.kill(worker, signal.SIGSTOP)
    time.sleep(1)  # the rank now waits for the worker's next batch, under the alarm
    os.kill(process.pid, signal.SIGSTOP)
    time.sleep(6)
    os.killpg(process.pid, signal.SIGCONT)
    out = ends_within(process, BOUND_S)
    assert process.returncode == 0 and "delivered no batch" not in out, out
    assert (output / "status").read_text().startswith("done at step")


def test_a_read_that_never_returns_is_named_with_its_file(tiny_imagenet, tmp_path):
    """A file whose read blocks for good (a named pipe behind a .JPEG link, as a file on a
    hung mount would): the error names the file, the worker and how long it waited."""
    data = shutil.copytree(tiny_imagenet, tmp_path / "data")
    os.mkfifo(tmp_path / "pipe")
    (data / "train" / "n00000001" / "hung.JPEG").symlink_to(tmp_path / "pipe")
    result = train_here(train_args(data, tmp_path / "run", "data.workers=1", "data.loader_timeout_s=2", "epochs=1"),
                        check=False)
    assert result.returncode == 1, result.stderr
    assert re.search(r"worker 0 \(pid \d+, sleeping\) has been reading \S+/n00000001/hung.JPEG for [23] s",
                     result.stderr), result.stderr


@pytest.mark.parametrize("victim", ["a loader worker of rank 0", "rank 1"])
def test_a_process_that_dies_ends_the_whole_torchrun_job(tiny_imagenet, tmp_path, victim):
    process = start(torchrun(2, *train_args(tiny_imagenet, tmp_path / "run", "data.workers=1")))
    read_until(process, "step 2 ")
    if victim == "rank 1":
        os.kill(rank_pid(process.pid, 1), signal.SIGKILL)
    else:
        os.kill(child_pids(rank_pid(process.pid, 0))[0], signal.SIGKILL)
    out = ends_within(process, 25)  # torchrun's own SIGKILL of what is left comes after 30 s
    assert process.returncode not in (0, EXIT_PREEMPTED), out
    assert_every_process_gone(process)


def limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000_000, 50_000_000))  # a checkpoint is ~170 MB


@pytest.mark.parametrize("processes", [1, 2])
def test_a_save_that_fails_ends_the_job_and_its_loader_workers(tiny_imagenet, tmp_path, processes):
    """A filesystem that refuses the checkpoint (a file-size limit: EFBIG, not a full disk,
    so the save is not just skipped): an uncaught error in the training process, with
    loader workers running; under torchrun, on rank 0 only."""
    args = train_args(tiny_imagenet, tmp_path / "run", "data.workers=1", "checkpoint.every_steps=2")
    launch = [sys.executable, *args] if processes == 1 else torchrun(2, *args)
    process = start(launch, preexec_fn=limit_file_size)
    out = ends_within(process, BOUND_S)
    assert process.returncode not in (0, EXIT_PREEMPTED), out
    assert "File too large" in out
    assert_every_process_gone(process)
    assert (tmp_path / "run" / "status").read_text().startswith("failed: ")
    assert not list((tmp_path / "run").glob("*.pt")) and not list((tmp_path / "run").glob(".*.tmp"))
