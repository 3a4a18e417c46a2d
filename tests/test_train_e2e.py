"""The real train.py and validate.py, as a user runs them: one process, and two "nodes" on
this machine (two processes under torchrun: test_resilience.py)."""
import csv

import pytest
import torch
from torch.utils.data import DataLoader
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
import validate as validate_script
from cspresnet.checkpoint import load_checkpoint
from cspresnet.recipe_files import load_recipe
from tests.helpers import TINY_OVERRIDES, last_wins, in_this_process, train_here

pytestmark = pytest.mark.slow  # every test here starts train.py


def train_args(data, output, *extra):
    return ["train.py", "--recipe", "demo.yaml", "--data-dir", data, "--output", output,
            *last_wins(*TINY_OVERRIDES, *extra)]


def summary(output):
    with open(output / "summary.csv") as handle:
        return list(csv.DictReader(handle))


def validate(checkpoint, data):
    return validate_script.main(["--checkpoint", str(checkpoint), "--data-dir", str(data), "--workers", "0"])


def test_one_process_run_writes_its_outputs_and_validates(tiny_imagenet, tmp_path, monkeypatch):
    output = tmp_path / "run"
    passes = []  # the batch sampler of each pass a DataLoader makes
    iterate = DataLoader.__iter__
    monkeypatch.setattr(DataLoader, "__iter__",
                        lambda loader: passes.append(type(loader.batch_sampler).__name__) or iterate(loader))
    train_here(train_args(tiny_imagenet, output))
    # One pass of the training loader serves every epoch: its workers then never drain at an
    # epoch's end, where the GPU would wait for a whole batch to be decoded.
    assert passes.count("TrainSampler") == 1 and passes.count("BatchSampler") == 2  # evaluation after each epoch

    rows = summary(output)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert int(rows[-1]["step"]) == 6  # 24 images // batch 8 = 3 steps per epoch
    assert float(rows[-1]["lr"]) == 0.0  # the poly schedule ends at zero on the last step
    for column in ("train_loss", "eval_loss", "top1", "top5", "images_per_s", "epoch_seconds"):
        assert all(float(r[column]) >= 0 for r in rows), column
    assert load_recipe(str(output / "recipe.yaml")) == load_recipe(
        "demo.yaml", TINY_OVERRIDES, data_dir=str(tiny_imagenet))

    last, best = load_checkpoint(output / "last.pt"), load_checkpoint(output / "best.pt")
    assert (last["epoch"], last["step"]) == (2, 6)
    best_top1 = max(float(r["top1"]) for r in rows)
    assert best["metrics"]["top1"] == best_top1 == last["best_top1"]

    events = EventAccumulator(str(output))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "epoch/top1", "epoch/top5", "epoch/images_per_s", "epoch/epoch_seconds"} <= tags
    assert len(events.Scalars("train/loss")) == 6

    result = validate(output / "best.pt", tiny_imagenet)
    assert result["images"] == 15 and result["num_classes"] == 3
    assert (result["img_size"], result["crop_pct"], result["interpolation"]) == (32, 0.887, "bilinear")
    assert result["top1"] == round(best_top1, 3)


def test_same_seed_gives_the_same_numbers_with_or_without_loader_workers(tiny_imagenet, tmp_path):
    """Augmentation is a function of (seed, epoch, index), so worker processes change no
    number; this also holds the workers' reused shared buffers to never serve a stale batch,
    while the workers run on into the next epoch during the evaluation."""
    for name, workers in (("a", 0), ("b", 2)):
        train_here(train_args(tiny_imagenet, tmp_path / name, f"data.workers={workers}"))
    columns = ("train_loss", "eval_loss", "top1", "top5")
    assert [[r[c] for c in columns] for r in summary(tmp_path / "a")] == \
           [[r[c] for c in columns] for r in summary(tmp_path / "b")]
    a, b = (load_checkpoint(tmp_path / name / "last.pt")["model"] for name in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_existing_run_is_never_overwritten_and_resumes(tiny_imagenet, tmp_path):
    output = tmp_path / "run"
    train_here(train_args(tiny_imagenet, output, "epochs=1"))
    first = (output / "last.pt").read_bytes()
    again = in_this_process(train.main, *train_args(tiny_imagenet, output, "epochs=1")[1:])  # refused at once
    assert again.returncode != 0 and "already holds a run" in again.stderr
    assert (output / "last.pt").read_bytes() == first

    resumed = train_here(train_args(tiny_imagenet, output, "epochs=2", "--resume", "auto"))
    assert "resumed from" in resumed.stdout
    assert [int(r["epoch"]) for r in summary(output)] == [1, 2]
    finished = (output / "last.pt").read_bytes()
    assert load_checkpoint(output / "last.pt")["step"] == 6

    # A launcher that restarts a finished run (torchrun --max-restarts, a job array) is told so.
    again = train_here(train_args(tiny_imagenet, output, "epochs=2", "--resume", "auto"))
    assert "done: best top-1" in again.stdout and (output / "last.pt").read_bytes() == finished
