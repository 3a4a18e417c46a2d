"""The fast recipe and its progressive resizing: the crop size of each epoch (FFCV's rule) and
its refusals, workers that run ahead into the next epoch crop at its size, a run killed in the
epoch where the size changes resumes bitwise exactly, and two processes train across it."""
import csv
import os
import signal
import sys

import pytest
from torch.utils.data import DataLoader

from cspresnet.run_folder import CheckpointFolder
from cspresnet.optim import LinearSchedule
from cspresnet.recipe import RecipeError
from cspresnet.recipe_files import describe_recipe, load_recipe
from data.config import DataConfig
from data.loaders import build_splits
from data.loaders import loader_options
from data.samplers import TrainSampler
from data.transforms import SizeByEpoch, eval_transform, train_transform
from tests.helpers import TINY_OVERRIDES, last_wins, read_until, run_cli, start, torchrun, train_here
from tests.test_resilience import assert_same_run


def test_the_crop_size_of_each_epoch_is_ffcvs_and_the_fast_recipe_says_where_each_value_comes_from():
    fast = load_recipe("cspresnet50_fast.yaml")
    assert [fast.data.train_size(epoch) for epoch in range(32)] == [160] * 25 + [192] * 7
    assert fast.data.train_sizes() == [160, 192] and fast.data.train_size(40) == 192
    assert [DataConfig(img_size=256, start_img_size=128, size_ramp_epochs=(2, 6)).train_size(e) for e in range(8)] \
        == [128, 128, 128, 160, 192, 224, 256, 256]
    assert DataConfig().train_sizes() == [256] and DataConfig().train_size(5) == 256  # no ramp: img_size
    assert fast.scaled_lr() == pytest.approx(0.425) and fast.data.eval_img_size == 256
    described = describe_recipe("cspresnet50_fast.yaml")
    for key in ("epochs", "batch_size", "label_smoothing", "  start_img_size", "  size_ramp_epochs", "  lr",
                "  reference_batch_size", "  weight_decay", "  warmup_epochs", "  warmup_lr"):
        line = next(line for line in described.splitlines() if line.startswith(f"{key}:"))
        assert "[cspresnet50_fast.yaml]" in line and len(line.split("]", 1)[1].strip()) > 10, line


@pytest.mark.parametrize("overrides, message", [
    (["data.start_img_size=150"], "'data.start_img_size' must be a multiple of 32"),
    (["data.start_img_size=160", "data.img_size=200"], "'data.img_size' must be a multiple of 32"),
    (["data.start_img_size=224"], "'data.start_img_size' must be at most data.img_size=192"),
    (["data.size_ramp_epochs=[5,3]"], "'data.size_ramp_epochs' must be [first, last] epochs, counted from 0, first"),
    (["data.start_img_size=0"], "'data.size_ramp_epochs' must be [0, 0] without data.start_img_size"),
])
def test_a_size_schedule_that_cannot_work_is_refused_naming_the_key(overrides, message):
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_recipe("cspresnet50_fast.yaml", overrides)


def test_the_linear_schedule_is_ffcvs_warmup_then_a_straight_line_to_zero():
    schedule = LinearSchedule(base_lr=1.0, steps_per_epoch=10, warmup_epochs=2, warmup_lr=1e-4, total=100)
    assert schedule(1) == 1e-4 and schedule(21) == 1.0  # update 21: 20 done, the peak (FFCV's epoch 2)
    assert schedule(11) == pytest.approx((1e-4 + 1.0) / 2) and schedule(61) == pytest.approx(0.5)
    assert schedule(100) == pytest.approx(1 / 80) and all(schedule(s) > schedule(s + 1) for s in range(21, 100))


def test_workers_that_run_ahead_into_the_next_epoch_crop_at_its_size(tiny_imagenet):
    """Two workers, four batches each in flight, one loader pass over three epochs whose
    crops are 32, 64 and 64 px: each batch has its own epoch's size, whatever the workers
    had decoded ahead of the epoch's end."""
    config = DataConfig(img_size=64, start_img_size=32, size_ramp_epochs=(0, 1))
    by_size = {size: train_transform(size, decode="fast") for size in config.train_sizes()}
    train, _ = build_splits(DataConfig(dir=str(tiny_imagenet)), SizeByEpoch(by_size, config.train_size),
                            eval_transform(32, 0.875), seed=0)
    sampler = TrainSampler(len(train), batch_size=4, world_size=1, rank=0, seed=0)
    sampler.set_epoch(0, end_epoch=3)
    loader = DataLoader(train, batch_sampler=sampler, **loader_options(workers=2, pin_memory=False))
    sizes = [batch.images.shape[1] for batch in loader]
    assert sizes == [32] * 6 + [64] * 12


# A tiny fast recipe: 2 epochs of 6 updates, the crop growing from 32 to 64 px at the second.
FAST_TINY = last_wins(*[o for o in TINY_OVERRIDES if not o.startswith("schedule.")], "batch_size=4", "checkpoint.every_steps=2", "model.drop_rate=0.2",
                      "data.start_img_size=32", "data.img_size=64", "data.size_ramp_epochs=[0,1]",
                      "schedule.warmup_epochs=0.5", "optim.reference_batch_size=8", "optim.lr=0.1")


def fast_args(data, output, *extra):
    return ["train.py", "--recipe", "demo_fast.yaml", "--data-dir", data, "--output", output,
            *last_wins(*FAST_TINY, *extra)]


def train_sizes(output):
    with open(output / "summary.csv") as handle:
        return [int(row["train_size"]) for row in csv.DictReader(handle)]


@pytest.mark.slow
def test_a_kill_in_the_epoch_where_the_crop_grows_then_a_resume_ends_bitwise_equal(tiny_imagenet, tmp_path):
    straight = tmp_path / "straight"
    baseline = train_here(fast_args(tiny_imagenet, straight))
    assert "training crops: 32 px in epoch 1, 64 px in epoch 2; evaluation at 32 px" in baseline.stdout
    assert train_sizes(straight) == [32, 64]
    killed = tmp_path / "killed"
    process = start([sys.executable, *fast_args(tiny_imagenet, killed)])
    read_until(process, "step 9 ")  # epoch 2, at 64 px, one step after the step-8 checkpoint
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert max(step for step, _ in CheckpointFolder(killed, 2).step_files()) == 8
    resumed = train_here(fast_args(tiny_imagenet, killed, "--resume", "auto"))
    assert "inexactly" not in resumed.stdout
    assert_same_run(killed, straight)
    assert train_sizes(killed) == [32, 64]


@pytest.mark.slow
def test_two_processes_with_loader_workers_train_across_the_size_change(tiny_imagenet, tmp_path):
    output = tmp_path / "run"
    result = run_cli(torchrun(2, *fast_args(tiny_imagenet, output, "data.workers=1")))
    assert "64 px in epoch 2" in result.stdout and train_sizes(output) == [32, 64]
    assert (output / "status").read_text() == "done at step 12\n"
