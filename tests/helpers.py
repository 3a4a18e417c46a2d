"""Shared by the tests: the repository root, a tiny recipe, and subprocess runners."""
import contextlib
import io
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch


REPO = Path(__file__).resolve().parent.parent

# A recipe small enough for a 2-core CPU: 3 classes, 32 px, batch 8.
TINY_OVERRIDES = [
    "epochs=2", "batch_size=8", "data.img_size=32", "data.eval_img_size=32", "data.workers=0",
    "data.eval_batch_size=4", "model.num_classes=3", "runtime.log_interval=1",
    "optim.reference_batch_size=8", "schedule.burn_in_iters=2",
]
OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def last_wins(*args) -> list:
    """Command-line arguments with each recipe override's key once, at its last value: a
    test's own value replaces TINY_OVERRIDES' (train.py refuses a key given twice)."""
    args = [str(a) if not isinstance(a, str) else a for a in args]
    keys = [OVERRIDE.match(a) and a.split("=", 1)[0] for a in args]
    return [a for i, (a, key) in enumerate(zip(args, keys)) if not key or key not in keys[i + 1:]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(gpu: bool, **extra) -> dict:
    """Single-threaded math (2 cores, maybe 2 processes), and no GPU unless asked: the CPU
    tests compare bits, and must compare the same bits on a machine with a GPU."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_cli(args, timeout=300, check=True, gpu=False) -> subprocess.CompletedProcess:
    """Run a command in the repository and wait for it."""
    env = child_env(gpu)
    result = subprocess.run([str(a) for a in args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def in_this_process(main, *argv) -> subprocess.CompletedProcess:
    """A script's main(argv) run here, its output caught: for checks of what it says and its
    exit code, without the ten seconds of a new process's start-up."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def module_in_this_process(module, *argv) -> subprocess.CompletedProcess:
    """`python -m module ARGV...` run here: the module's main() with sys.argv set."""
    def main(args):
        saved = sys.argv
        sys.argv = [module.__name__, *args]
        try:
            return module.main() or 0
        except SystemExit as exc:  # argparse's errors
            return exc.code
        finally:
            sys.argv = saved

    return in_this_process(main, *argv)


def torchrun(nproc: int, *args, extra=("--standalone",)):
    """torchrun on this machine; --standalone picks a free port for each run."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *extra, *args]


STARTED = []  # every process start() made; conftest kills what is left of them after each test


def start(args, gpu=False, **popen) -> subprocess.Popen:
    """Start a command in the repository, in its own session, its output unbuffered as text."""
    env = child_env(gpu, PYTHONUNBUFFERED="1")
    process = subprocess.Popen([str(a) for a in args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True, **popen)
    STARTED.append(process)
    return process


def read_until(process: subprocess.Popen, marker: str) -> str:
    """Read the process's output until a line starts with `marker`; all of it so far."""
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith(marker):
            return "".join(seen)
    raise AssertionError(f"the process ended before printing {marker!r}:\n{''.join(seen)}")


def child_pids(pid: int):
    with open(f"/proc/{pid}/task/{pid}/children") as handle:
        return [int(p) for p in handle.read().split()]


class PrivateMount:
    """A tmpfs at `path` that only the processes started through it see (a private mount
    namespace): a real filesystem that fills up or turns read-only, for the failure tests,
    without touching the machine's own mounts. The test reaches its files through
    `outside(path)`. Skips the test where the machine does not allow it (needs root)."""

    def __init__(self, path, size: str, options: str = ""):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        mount = f"mount -t tmpfs -o size={size}{',' + options if options else ''} tmpfs {self.path}"
        self.holder = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                                        f"{mount} && echo mounted && exec sleep 3600"],
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       start_new_session=True)
        STARTED.append(self.holder)
        first = self.holder.stdout.readline()
        if first.strip() != "mounted":
            import pytest

            pytest.skip(f"needs a private mount namespace (unshare -m and mount, as root): {first.strip()}")

    def run(self, command: str) -> None:
        """A shell command inside the namespace (mount -o remount,ro ...)."""
        subprocess.run(["nsenter", "-t", str(self.holder.pid), "-m", "sh", "-c", command], check=True)

    def start(self, args, **popen) -> subprocess.Popen:
        return start(["nsenter", "-t", self.holder.pid, "-m", f"--wd={REPO}", "--", *args], **popen)

    def outside(self, path) -> Path:
        """`path` (under the mount) as this process sees it."""
        return Path(f"/proc/{self.holder.pid}/root") / Path(path).resolve().relative_to("/")

    def fill(self) -> Path:
        """Fill the filesystem to the last byte; returns the filler file, to delete."""
        filler = self.outside(self.path / "filler")
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            for chunk in (1 << 20, 4096, 1):
                try:
                    while True:
                        os.write(fd, b"\0" * chunk)
                except OSError:
                    pass
        finally:
            os.close(fd)
        return filler


def wait_until_gone(pid: int, timeout_s: float = 60.0) -> None:
    """Until process `pid` has exited (or is a zombie nobody reaps); fails after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except FileNotFoundError:
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} still runs {timeout_s:.0f} s later")


def train_here(args, check=True) -> subprocess.CompletedProcess:
    """`python ARGS...` for a train.py command line, run here on one thread as run_cli's
    processes run (OMP_NUM_THREADS=1), so that its numbers are theirs bit for bit: for runs
    whose process boundary is not under test (a baseline, a resume after a kill)."""
    import train  # the entry script, imported only by the tests that train

    assert str(args[0]) == "train.py", args
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = in_this_process(train.main, *args[1:])
    finally:
        torch.set_num_threads(threads)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({result.returncode}):\n{result.stdout}\n"
                             f"{result.stderr}")
    return result


def a_training_checkpoint(num_classes=3, **changes) -> dict:
    """The keys this project's training checkpoints have held since 2026-11-30 (format v1),
    as c6af46c's save_run wrote them, with real weights and plain stand-ins for the rest."""
    from cspresnet.model import CSPResNet50
    from cspresnet.recipe import recipe_to_dict
    from cspresnet.recipe_files import load_recipe

    state = dict(format="cspresnet-train-v1", model=CSPResNet50(num_classes=num_classes).state_dict(), optimizer={},
                 scaler={}, model_ema=None, epoch=0, step_in_epoch=3, step=3, epoch_seconds=1.5, best_top1=float("-inf"),
                 rows=[], per_rank=[], world_size=1, dataset="24:abc", eval_dataset="15:def", batch_size=8,
                 classes=[f"n{i:08d}" for i in range(num_classes)],
                 recipe=recipe_to_dict(load_recipe("demo.yaml", TINY_OVERRIDES)), metrics=None)
    state.update(changes)
    return {key: value for key, value in state.items() if value is not ...}
