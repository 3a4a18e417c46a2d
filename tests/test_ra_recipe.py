"""The RA recipe: its values and their provenance, each part switched on and off, and the
parts equal to timm's own (they are timm's, wired by us)."""
import os
import random
import signal
import sys

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from timm.data import create_transform
from timm.data.mixup import Mixup
from timm.data.random_erasing import RandomErasing
from timm.layers import DropPath
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import RMSpropTF
from timm.scheduler import create_scheduler_v2

from cspresnet.checkpoint import load_checkpoint
from cspresnet.engine import Updater, build_criterion, build_grad_scaler
from cspresnet.model import build_model
from cspresnet.optim import StepSchedule, build_optimizer, build_schedule
from cspresnet.recipe_files import load_recipe
from data.batches import Batch
from data.transforms import DevicePreprocess, build_batch_augment, train_transform

import train
import validate
from tests.helpers import TINY_OVERRIDES, in_this_process, last_wins, read_until, start, train_here

CPU = torch.device("cpu")


def test_darknet_recipe_keeps_every_extra_off():
    r = load_recipe("cspresnet50.yaml")
    assert (r.data.auto_augment, r.augment.random_erasing, r.augment.mixup_alpha, r.augment.cutmix_alpha) == ("", 0, 0, 0)
    assert not r.ema.enabled and (r.model.drop_rate, r.model.drop_path_rate) == (0, 0)
    assert build_batch_augment(r.augment, r.label_smoothing, 1000, CPU) is None
    assert "RandAugment" not in repr(train_transform(64, auto_augment=r.data.auto_augment))
    assert isinstance(build_criterion(r.augment.mixing, r.label_smoothing), torch.nn.CrossEntropyLoss)


def test_ra_recipe_values():
    r = load_recipe("cspresnet50_ra.yaml")
    assert (r.epochs, r.batch_size, r.label_smoothing, r.data.img_size, r.data.train_interpolation) == \
           (200, 256, 0.1, 256, "random")
    o, s, a = r.optim, r.schedule, r.augment
    assert (o.name, o.lr, o.reference_batch_size, o.eps, o.alpha, o.momentum, o.weight_decay) == \
           ("rmsproptf", 0.016, 256, 1e-3, 0.9, 0.9, 1e-5)
    assert (s.name, s.warmup_epochs, s.warmup_lr, s.decay_epochs, s.decay_rate) == ("step", 5, 1e-6, 2.4, 0.97)
    assert (r.data.auto_augment, a.random_erasing, a.random_erasing_mode, a.mixup_alpha) == ("rand-m9-mstd0.5", 0.2, "pixel", 0.2)
    assert (r.model.drop_rate, r.model.drop_path_rate, r.ema.enabled, r.ema.decay) == (0.3, 0.2, True, 0.9999)
    assert (r.data.eval_img_size, r.data.eval_crop_pct) == (256, 0.887)
    assert load_recipe("cspresnet50_ra.yaml", ["batch_size=1024"]).scaled_lr() == pytest.approx(0.064)
    assert isinstance(build_optimizer(torch.nn.Linear(2, 2), r), RMSpropTF)


def test_print_recipe_gives_every_value_its_provenance():
    out = in_this_process(train.main, "--recipe", "cspresnet50_ra.yaml", "--print-recipe", "optim.lr=0.02").stdout
    assert load_recipe("cspresnet50_ra.yaml", ["optim.lr=0.02"]).epochs == yaml.safe_load(out)["epochs"]
    value_lines = [line for line in out.splitlines() if not line.endswith(":")]
    assert all("# [" in line for line in value_lines)
    by_key = {line.split(":")[0].strip(): line for line in value_lines}
    assert "[cspresnet50_ra.yaml] OUR CHOICE" in by_key["epochs"]
    assert "[cspresnet50_ra.yaml] template --opt-eps .001" in by_key["eps"]
    assert "[cspresnet50.yaml]" in by_key["eval_crop_pct"]
    assert "[command line: optim.lr=0.02]" in by_key["lr"]


@pytest.mark.parametrize("options", [dict(auto_augment="rand-m9-mstd0.5", interpolation="random"),
                                     dict(auto_augment="", interpolation="bicubic")])
def test_train_transform_is_timms(tmp_path, options):
    """Same seeds, same picture, same tensor as timm's create_transform(is_training=True)."""
    ours = train_transform(64, interpolation=options["interpolation"], auto_augment=options["auto_augment"])
    theirs = create_transform(64, is_training=True, auto_augment=options["auto_augment"] or None,
                              interpolation=options["interpolation"], color_jitter=None, re_prob=0)
    image = Image.effect_mandelbrot((200, 150), (-2, -1.5, 1, 1.5), 60).convert("RGB")
    path = tmp_path / "picture.JPEG"
    image.save(path, quality=90)
    image = Image.open(path).convert("RGB")
    differs_from_plain = False
    for seed in range(12):
        outputs = []
        for transform, source in ((ours, path.read_bytes()), (theirs, image)):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)
            outputs.append(transform(source))
        normalised = DevicePreprocess(CPU, channels_last=False)(outputs[0][None])[0]
        assert torch.equal(normalised, outputs[1]), seed
        torch.manual_seed(seed)
        random.seed(seed)
        differs_from_plain |= not torch.equal(outputs[0], train_transform(64, interpolation="bilinear")(path.read_bytes()))
    assert differs_from_plain


def ra_augment(**changes):
    recipe = load_recipe("cspresnet50_ra.yaml", [f"augment.{k}={v}" for k, v in changes.items()])
    return build_batch_augment(recipe.augment, recipe.label_smoothing, 10, CPU)


def test_random_erasing_on_and_off():
    augment = ra_augment(random_erasing=1.0, mixup_alpha=0)
    assert isinstance(augment.erasing, RandomErasing) and augment.mixup is None
    batch, targets = torch.randn(4, 3, 32, 32), torch.arange(4)
    erased, same_targets = augment(batch.clone(), targets)
    assert torch.equal(same_targets, targets)
    changed = (erased != batch).any(dim=1)  # an erased rectangle in every image
    assert all(changed[i].any() and not changed[i].all() for i in range(4))
    assert ra_augment(random_erasing=0, mixup_alpha=0) is None


def test_mixup_on_and_off_and_the_loss_is_timms():
    augment = ra_augment(random_erasing=0)
    assert isinstance(augment.mixup, Mixup) and augment.erasing is None
    np.random.seed(3)
    batch, targets = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    mixed, soft = augment(batch.clone(), targets)
    assert soft.shape == (4, 10) and torch.allclose(soft.sum(1), torch.ones(4))
    lam = (soft[0, 0] - 0.01) / (0.9 + 0.01 - 0.01)  # smoothing 0.1 over 10 classes: on 0.91, off 0.01
    torch.testing.assert_close(mixed, lam * batch + (1 - lam) * batch.flip(0))
    logits = torch.randn(4, 10)
    recipe = load_recipe("cspresnet50_ra.yaml")
    ours = build_criterion(recipe.augment.mixing, recipe.label_smoothing)
    assert torch.equal(ours(logits, soft), SoftTargetCrossEntropy()(logits, soft))
    plain = build_criterion(False, 0.1)
    torch.testing.assert_close(plain(logits, targets), LabelSmoothingCrossEntropy(0.1)(logits, targets))


def test_dropout_and_drop_path_follow_the_recipe():
    ra = load_recipe("cspresnet50_ra.yaml").model
    model = build_model(10, ra.drop_rate, ra.drop_path_rate)
    assert model.head.drop.p == 0.3
    rates = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    assert len(rates) == 12 and max(rates) == pytest.approx(0.2)  # block 1 of 13 has rate 0
    plain = build_model(10)
    assert plain.head.drop.p == 0 and not any(isinstance(m, DropPath) for m in plain.modules())


def test_step_schedule_matches_timms_train_loop():
    """timm's train.py with per-update scheduling: the rate of update k is what the
    scheduler set after update k-1 (or at creation, for k = 1)."""
    steps_per_epoch = 100
    ours = StepSchedule(0.016, steps_per_epoch, warmup_epochs=5, warmup_lr=1e-6, decay_epochs=2.4, decay_rate=0.97)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.016)
    theirs, _ = create_scheduler_v2(optimizer, sched="step", num_epochs=200, decay_epochs=2.4, decay_rate=0.97,
                                    warmup_epochs=5, warmup_lr=1e-6, step_on_epochs=False,
                                    updates_per_epoch=steps_per_epoch)
    sampled = {1, 2, 250, 499, 500, 501, 739, 740, 741, 980, 5000, 19_999, 20_000}
    for step in range(1, 20_001):
        if step in sampled:
            assert ours(step) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12), step
        theirs.step_update(num_updates=step)
    assert ours(1) == pytest.approx(1e-6)  # warmup starts at warmup_lr ...
    assert ours(251) == pytest.approx(1e-6 + 250 * (0.016 - 1e-6) / 500)  # ... and rises linearly
    assert ours(501) == pytest.approx(0.016 * 0.97 ** 2)  # then the staircase, counted from step 0
    assert ours(20_000) == pytest.approx(0.016 * 0.97 ** (19_999 // 240))


def test_ema_update_is_timms_once_per_step():
    torch.manual_seed(0)
    model = build_model(3, drop_rate=0.3, drop_path_rate=0.2)
    recipe = load_recipe("cspresnet50_ra.yaml", ["ema.decay=0.9"])
    train_step = Updater(model=model, train_model=model, optimizer=build_optimizer(model, recipe),
                           scaler=build_grad_scaler(CPU, "none"), schedule=build_schedule(recipe, 10),
                           criterion=build_criterion(False, 0.1), preprocess=DevicePreprocess(CPU, False), amp="none",
                           ema=timm.utils.ModelEmaV3(model, decay=recipe.ema.decay))
    batch = Batch(torch.randint(0, 255, (4, 32, 32, 3), dtype=torch.uint8), torch.tensor([0, 1, 2, 0]),
                  torch.arange(4), [])
    expected = None
    for step in range(1, 5):
        train_step(batch, step)
        now = {k: v.clone() for k, v in model.state_dict().items()}
        if expected is None:
            expected = now  # the first update copies the weights (timm: decay 0 at step 1)
        else:
            expected = {k: v.lerp(now[k], 0.1) if v.is_floating_point() else now[k] for k, v in expected.items()}
    for key, value in train_step.ema.module.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)


RA_TINY = last_wins(*[o for o in TINY_OVERRIDES if not o.startswith("schedule.")],
                    "runtime.amp=none", "schedule.warmup_epochs=0.5", "batch_size=4", "checkpoint.every_steps=2")


def ra_args(data, output, *extra):
    return ["train.py", "--recipe", "cspresnet50_ra.yaml", "--data-dir", data, "--output", output, *last_wins(*RA_TINY, *extra)]


@pytest.mark.slow
def test_ra_recipe_trains_resumes_exactly_and_its_ema_validates(tiny_imagenet, tmp_path):
    straight = tmp_path / "straight"
    train_here(ra_args(tiny_imagenet, straight))
    killed = tmp_path / "killed"
    process = start([sys.executable, *ra_args(tiny_imagenet, killed)])
    read_until(process, "step 9 ")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    train_here(ra_args(tiny_imagenet, killed, "--resume", "auto"))

    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(killed / "last.pt")
    for part in ("model", "model_ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert a["rows"][-1]["ema_top1"] == b["rows"][-1]["ema_top1"]
    assert not all(torch.equal(a["model"][k], a["model_ema"][k]) for k in a["model"])

    result = validate.main(["--checkpoint", str(straight / "best.pt"), "--data-dir", str(tiny_imagenet),
                            "--workers", "0"])
    assert result["weights"] == "ema" and result["images"] == 15
