"""One run on any number of processes (docs/training.md, "Changing the number of GPUs"): the same images,
BatchNorm groups and random draws on 1 process x 4 passes, 2 x 2 and 4 x 1, across a requeue onto another
count, and on two nodes. The runs on several processes are this module under torchrun (`main`).

Tolerance: the runs are in float64, where only the order of the gradient sum differs (DDP averages 2 or 4
processes' gradients, one process adds its passes'): measured, losses within 2e-16 and weights within 3e-16 of
each other, so 1e-9 is far above rounding and far below what one other image or draw does (1e-3 and more). In
float32 this small run turns rounding into larger differences, as one process on 2 threads against 1 does too:
benchmarks/results/2026-12-07-cpu-process-counts.md (PROCESS_COUNTS_FLOAT32=1 runs this module in float32)."""
import contextlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch

import train as train_script
from cspresnet import engine
from cspresnet.checkpoint import load_checkpoint
from cspresnet.console import exit_now
from cspresnet.distributed import init_distributed, shutdown
from cspresnet.recipe_files import load_recipe
from cspresnet.run_log import RunLog
from cspresnet.signals import EXIT_PREEMPTED
from cspresnet.training import train
from data.sample_data import generate
from data.transforms import DevicePreprocess
from tests.helpers import TINY_OVERRIDES, free_port, last_wins, read_until, run_cli, start, torchrun, train_here

pytestmark = pytest.mark.slow

# 48 images, global batch 16 = 4 BatchNorm groups of 4 at 64 px, 3 updates in one epoch. (At 32 px and
# groups of 2 the last stage's BatchNorm normalises 2 numbers: rounding then decides which is the larger.)
SHAPE = ["epochs=1", "batch_size=16", "micro_batch_size=4", "data.img_size=64", "data.eval_img_size=64",
         "optim.reference_batch_size=16"]
DARKNET = last_wins(*TINY_OVERRIDES, *SHAPE)
# RandAugment, mixup and CutMix (one of them per group), random erasing, dropout, drop path, EMA: every draw.
RA = last_wins(*[o for o in TINY_OVERRIDES if not o.startswith("schedule.")], *SHAPE, "runtime.amp=none",
               "schedule.warmup_epochs=0.5", "augment.cutmix_alpha=1.0")
RECIPES = {"darknet": ("demo.yaml", DARKNET), "ra": ("cspresnet50_ra.yaml", RA)}
TOLERANCE = dict(rtol=1e-9, atol=1e-9)


@contextlib.contextmanager
def in_float64():
    """The model, its EMA and its inputs in float64 (see the module's docstring)."""
    build, preprocess = engine.build_model, DevicePreprocess.__call__
    if os.environ.get("PROCESS_COUNTS_FLOAT32"):  # to measure float32's differences
        yield
        return
    engine.build_model = lambda *args: build(*args).double()
    DevicePreprocess.__call__ = lambda self, batch: preprocess(self, batch).double()
    try:
        yield
    finally:
        engine.build_model, DevicePreprocess.__call__ = build, preprocess


def train_both(output: Path, data: Path) -> None:
    """Each recipe trained in this process group; rank 0 writes the losses of every log line (log_interval 1)."""
    ctx = init_distributed("cpu")
    losses, logged = {}, RunLog.step
    for name, (recipe, overrides) in RECIPES.items():
        RunLog.step = recording(losses.setdefault(name, []), logged)
        try:
            assert train(load_recipe(recipe, overrides, str(data)), ctx, output / name) == 0
        finally:
            RunLog.step = logged
    if ctx.is_main:
        (output / "losses.json").write_text(json.dumps(losses))
    shutdown()


def recording(seen: list, logged):
    def step(self, step, loss, *rest, **named):
        seen.append(loss)
        return logged(self, step, loss, *rest, **named)
    return step


def main() -> int:
    """`python -m tests.test_process_counts OUTPUT DATA` trains both recipes; `... train.py ARGS` is train.py."""
    with in_float64():
        if sys.argv[1] == "train.py":
            return train_script.main(sys.argv[2:])
        train_both(Path(sys.argv[1]), Path(sys.argv[2]))
    return 0


def parameters(path: Path, part: str = "model") -> dict:
    """BatchNorm's running statistics left out: with several processes they are rank 0's groups' (see the docs)."""
    state = load_checkpoint(path)[part]
    return {key: value for key, value in state.items() if not key.endswith(("running_mean", "running_var",
                                                                            "num_batches_tracked"))}


def assert_same_weights(a: Path, b: Path, part: str = "model") -> None:
    mine, theirs = parameters(a, part), parameters(b, part)
    assert list(mine) == list(theirs)
    for key in mine:
        torch.testing.assert_close(mine[key], theirs[key], **TOLERANCE, msg=key)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("data") / "images", num_classes=3, train_per_class=16, val_per_class=4,
                    min_size=64, max_size=96, seed=2)


@pytest.fixture(scope="module")
def runs(images, tmp_path_factory):
    """Both recipes on 1 process x 4 passes (here, on one thread as the children), 2 x 2 and 4 x 1."""
    folders = {count: tmp_path_factory.mktemp(f"on{count}") for count in (1, 2, 4)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with in_float64():
            train_both(folders[1], images)
    finally:
        torch.set_num_threads(threads)
    for count in (2, 4):
        run_cli(torchrun(count, "-m", "tests.test_process_counts", folders[count], images))
    return folders


@pytest.mark.parametrize("recipe", RECIPES)
def test_1_2_and_4_processes_train_the_same_run(runs, recipe):
    """Per-update losses (the mean over every rank's images) and the final weights and EMA agree."""
    losses = {count: json.loads((folder / "losses.json").read_text())[recipe] for count, folder in runs.items()}
    assert len(losses[1]) == 3 and len(set(losses[1])) == 3
    for count in (2, 4):
        torch.testing.assert_close(torch.tensor(losses[count]), torch.tensor(losses[1]), **TOLERANCE)
        assert_same_weights(runs[count] / recipe / "last.pt", runs[1] / recipe / "last.pt")
        if recipe == "ra":
            assert_same_weights(runs[count] / recipe / "last.pt", runs[1] / recipe / "last.pt", "model_ema")


def test_a_2_process_run_stopped_mid_epoch_and_resumed_on_1_ends_as_the_2_process_run(runs, images, tmp_path):
    recipe, overrides = RECIPES["ra"]
    args = ["train.py", "--recipe", recipe, "--data-dir", images, "--output", tmp_path / "run", *overrides]
    process = start(torchrun(2, "-m", "tests.test_process_counts", *args))
    read_until(process, "step 1 ")  # of 3
    os.killpg(process.pid, signal.SIGTERM)  # torchrun, as a scheduler preempting the job; it tells the ranks
    rest = process.communicate(timeout=120)[0]  # torchrun itself exits 1 on SIGTERM: the status is what requeues
    stopped_at = load_checkpoint(tmp_path / "run" / "last.pt")["step"]
    assert (tmp_path / "run" / "status").read_text() == f"preempted at step {stopped_at}\n", rest
    assert f"stopping on SIGTERM: checkpoint saved at step {stopped_at}" in rest, rest
    assert stopped_at in (1, 2) and load_checkpoint(tmp_path / "run" / "last.pt")["world_size"] == 2
    with in_float64():
        resumed = train_here([*args, "--resume", "auto"])
    assert ("it was saved by 2 processes, this run has 1: the same updates go on (the same images, BatchNorm "
            "groups of 4 and random draws)") in resumed.stderr + resumed.stdout
    assert_same_weights(tmp_path / "run" / "last.pt", runs[2] / "ra" / "last.pt")
    assert_same_weights(tmp_path / "run" / "last.pt", runs[2] / "ra" / "last.pt", "model_ema")


def two_nodes(data: list, output: Path, *extra) -> list:
    """Two torchrun launchers of one process each, as `--nnodes=2 --node_rank=0|1` on two hosts."""
    port = free_port()
    launcher = ("--nnodes=2", "--master_addr=127.0.0.1", f"--master_port={port}")
    return [start(torchrun(1, "-m", "tests.test_process_counts", "train.py", "--recipe", "demo.yaml", "--data-dir",
                           data[node], "--output", output, *last_wins(*DARKNET, "data.workers=1"), *extra,
                           extra=(*launcher, f"--node_rank={node}")))
            for node in (0, 1)]


def test_two_nodes_on_node_local_disks_train_stop_together_and_resume(images, tmp_path, runs):
    """Each node reads its own copy of the data (node-local disks) and indexes it once; the run folder is
    shared, owned by rank 0. A SIGTERM to both launchers saves once and stops both; the resume ends the run."""
    data = [shutil.copytree(images, tmp_path / f"node{node}_disk") for node in (0, 1)]
    output = tmp_path / "run"
    launchers = two_nodes(data, output)
    started = read_until(launchers[0], "step 1 ")
    for launcher in launchers:
        os.killpg(launcher.pid, signal.SIGTERM)
    ended = [launcher.communicate(timeout=120)[0] for launcher in launchers]  # both end, neither hangs
    assert (output / "status").read_text().startswith("preempted at step "), ended
    assert all(launcher.returncode in (1, EXIT_PREEMPTED) for launcher in launchers), ended  # torchrun: 1
    assert len(list(output.glob("step-*.pt"))) == 1 and "2 process(es)" in started
    for node in (0, 1):  # each node indexed its own copy, once
        assert len(list((data[node] / ".cspresnet_index").glob("*"))) >= 1, node
    launchers = two_nodes(data, output, "--resume", "auto")
    ended = [launcher.communicate(timeout=180)[0] for launcher in launchers]
    assert [launcher.returncode for launcher in launchers] == [0, 0], ended
    assert (output / "status").read_text().startswith("done at step 3")
    assert_same_weights(output / "last.pt", runs[2] / "darknet" / "last.pt")


if __name__ == "__main__":
    exit_now(main())
