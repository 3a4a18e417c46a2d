import math

import pytest
import torch
from timm.scheduler import StepLRScheduler

from cspresnet.model import CSPResNet50
from cspresnet.optim import (DarknetPolySchedule, StepSchedule, build_optimizer, build_schedule, parameter_groups,
                             set_lr)
from cspresnet.recipe_files import load_recipe


def darknet_schedule(steps_per_epoch=10009):
    return build_schedule(load_recipe("cspresnet50.yaml"), steps_per_epoch)


def test_darknet_schedule_spans_the_whole_run():
    s = darknet_schedule()
    assert (s.base_lr, s.burn_in, s.total, s.power) == (0.1, 1000, 80 * 10009, 4.0)


@pytest.mark.parametrize("step", [1, 10, 250, 500, 999])
def test_burn_in_curve(step):
    assert darknet_schedule()(step) == pytest.approx(0.1 * (step / 1000) ** 4, rel=1e-12)


@pytest.mark.parametrize("step", [1000, 1001, 100_000, 400_360, 800_000, 800_719])
def test_poly_curve(step):
    total = 80 * 10009
    assert darknet_schedule()(step) == pytest.approx(0.1 * (1 - step / total) ** 4, rel=1e-12)


def test_last_step_and_shape():
    s = darknet_schedule()
    assert s(s.total) == 0.0  # darknet's last update, batch_num == max_batches, has rate 0
    assert s(s.total + 5) == 0.0
    assert s(1) == pytest.approx(1e-13)
    after = [s(k) for k in range(1000, s.total + 1, 997)]
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert s(999) == pytest.approx(s(1000), rel=1e-3)  # burn-in hands over to poly with no jump


def test_schedule_is_resume_safe():
    """The rate depends on the step only: a resumed optimizer continues the same sequence."""
    s = DarknetPolySchedule(base_lr=0.1, burn_in=3, total=10, power=4)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=s(1), momentum=0.9)

    def run(opt, steps):
        used = []
        for step in steps:
            set_lr(opt, s(step))
            used.append(opt.param_groups[0]["lr"])
            model(torch.ones(1, 2)).sum().backward()
            opt.step()
        return used

    first = run(optimizer, range(1, 6))
    restored = torch.optim.SGD(model.parameters(), lr=123.0, momentum=0.9)
    restored.load_state_dict(optimizer.state_dict())
    assert first + run(restored, range(6, 11)) == [s(k) for k in range(1, 11)]


@pytest.mark.parametrize("steps_per_epoch, warmup_epochs, decay_epochs, steps", [(7, 3, 2.4, 400),
                                                                                (1251, 0.5, 0.3, 4000)])
def test_step_schedule_is_timms_step_lr_scheduler_to_the_last_bit(steps_per_epoch, warmup_epochs, decay_epochs, steps):
    """The closed form against timm's StepLRScheduler stepped after every update, as timm's
    train.py does, over a run that crosses the warmup's end and many decays, at a decay
    length in steps that is not a whole number."""
    ours = StepSchedule(0.05, steps_per_epoch, warmup_epochs=warmup_epochs, warmup_lr=1e-4,
                        decay_epochs=decay_epochs, decay_rate=0.9)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    theirs = StepLRScheduler(optimizer, decay_t=decay_epochs * steps_per_epoch, decay_rate=0.9,
                             warmup_t=round(warmup_epochs * steps_per_epoch), warmup_lr_init=1e-4,
                             warmup_prefix=False, t_in_epochs=False)
    for step in range(1, steps + 1):
        assert ours(step) == optimizer.param_groups[0]["lr"], step  # the rate timm set after update step - 1
        theirs.step_update(num_updates=step)
    decay_steps = decay_epochs * steps_per_epoch
    assert decay_steps != int(decay_steps) and 0 < ours.warmup_steps < steps - 5 * decay_steps
    # and it crosses a t where t / decay_steps rounds up to a whole number, which timm's t // decay_steps does not
    assert any(math.floor(t / decay_steps) != t // decay_steps for t in range(ours.warmup_steps, steps))


def test_no_weight_decay_on_batchnorm_and_bias():
    model = CSPResNet50(num_classes=10)
    decay, no_decay = parameter_groups(model, 5e-4, decay_norm_and_bias=False)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    bn_and_bias = {id(p) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    bn_and_bias.add(id(model.head.fc.bias))
    assert {id(p) for p in no_decay["params"]} == bn_and_bias
    assert all(p.ndim in (2, 4) for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_optimizer_uses_the_scaled_lr():
    recipe = load_recipe("cspresnet50.yaml", ["batch_size=256"])
    optimizer = build_optimizer(torch.nn.Conv2d(3, 3, 1), recipe)
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.2)
    assert optimizer.param_groups[0]["momentum"] == 0.9
