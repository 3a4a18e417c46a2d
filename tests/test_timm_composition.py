"""Our RA recipe, composed as timm's train.py composes it: its factories, side by side with
our Updater on the same batches, agree on every weight, EMA weight and learning rate.

test_ra_recipe.py checks the parts one by one; this checks the wiring between them: which
parameters get weight decay, when the schedule and the EMA step, how smoothing enters the
mixup targets, in which order.
"""
import copy

import numpy as np
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

from common.processes import DistContext
from cspresnet.engine import build_updater
from cspresnet.recipe_files import load_recipe
from data.batches import Batch

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
UPDATES = 5

# The RA recipe, shrunk: fp32, 3 classes at 32 px, batch 4, one update per "epoch" so that
# the warmup (shortened to 2 epochs) ends after update 2 and the staircase falls at update
# 4 (t = 3 >= 2.4). Random erasing is off: timm's train.py applies it in the loader, not
# in the step (test_ra_recipe checks ours against timm's). The template's lr 0.016 unscaled
# and an EMA decay of 0.9, so that a wiring difference shows within 5 updates.
OVERRIDES = ["runtime.amp=none", "model.num_classes=3", "data.img_size=32", "batch_size=4",
             "augment.random_erasing=0", "schedule.warmup_epochs=2", "optim.lr_scaling=none", "ema.decay=0.9"]


class TimmTrainLoop:
    """timm train.py's train_one_epoch (1.0.x), for --opt rmsproptf --opt-eps .001 --lr .016
    --weight-decay 1e-5 --sched step --decay-epochs 2.4 --decay-rate .97 --warmup-lr 1e-6
    --mixup 0.2 --smoothing 0.1 --model-ema, on images already loaded and normalised."""

    def __init__(self, model: torch.nn.Module, recipe):
        s, e = recipe.schedule, recipe.ema
        self.model = model
        self.optimizer = create_optimizer_v2(model, opt="rmsproptf", lr=0.016, weight_decay=1e-5, momentum=0.9,
                                             eps=0.001)  # filter_bias_and_bn=True: no decay on 1-D tensors
        # Here timm's train.py and our recipe differ on purpose: train.py steps the step
        # scheduler once per epoch unless --sched-on-updates, and we step once per update
        # (the 2.4-epoch staircase falls mid-epoch, not at the next epoch's start). So
        # timm runs with --sched-on-updates (step_on_epochs=False), and the test checks
        # our per-update rule on its own as well.
        self.scheduler, _ = create_scheduler_v2(self.optimizer, sched="step", num_epochs=recipe.epochs,
                                                decay_epochs=s.decay_epochs, decay_rate=s.decay_rate,
                                                warmup_epochs=s.warmup_epochs, warmup_lr=s.warmup_lr,
                                                step_on_epochs=False, updates_per_epoch=1)
        # train.py's loop mixes with Mixup (its prefetcher path does the same in FastCollateMixup)
        self.mixup = Mixup(mixup_alpha=0.2, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=3)
        self.loss_fn = SoftTargetCrossEntropy()  # train.py's choice when mixup is on
        self.ema = ModelEmaV3(model, decay=e.decay)
        self.num_updates = 0

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        lr = self.optimizer.param_groups[0]["lr"]
        inputs, targets = self.mixup(inputs, targets)
        loss = self.loss_fn(self.model(inputs), targets)
        loss.backward()
        self.optimizer.step()
        self.num_updates += 1
        self.optimizer.zero_grad()
        self.ema.update(self.model, step=self.num_updates)
        self.scheduler.step_update(num_updates=self.num_updates)
        return lr


def same_randomness(update: int) -> None:
    """Both sides draw the same mixup (numpy) and dropout/drop-path (torch) for an update."""
    np.random.seed(update)
    torch.manual_seed(update)


def test_our_ra_step_is_timms_train_loop_weight_for_weight():
    torch.set_num_threads(1)  # 2 cores, often shared: fewer threads run faster (conftest restores them)
    recipe = load_recipe("cspresnet50_ra.yaml", OVERRIDES)
    torch.manual_seed(0)
    ours = build_updater(recipe, CPU, steps_per_epoch=1)
    assert ours.passes == 1 and recipe.scaled_lr() == 0.016
    theirs = TimmTrainLoop(copy.deepcopy(ours.model), recipe)
    ours.model.train()
    generator = torch.Generator().manual_seed(0)
    our_rates, their_rates = [], []
    for update in range(1, UPDATES + 1):
        batch = Batch(torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, generator=generator),
                      torch.randint(0, 3, (4,), generator=generator), torch.arange(4), [])
        same_randomness(update)
        our_rates.append(ours(batch, update)[1])
        same_randomness(update)
        their_rates.append(theirs(ours.preprocess(batch.images), batch.targets))

    assert our_rates == their_rates
    # Our rule, per update k from 1: t = k - 1; a linear warmup from warmup_lr over 2
    # updates, then 0.016 x 0.97 ^ floor(t / 2.4).
    assert our_rates == [1e-6, 1e-6 + (0.016 - 1e-6) / 2, 0.016, 0.016 * 0.97, 0.016 * 0.97]
    for name, tensor in ours.model.state_dict().items():
        assert torch.equal(tensor, theirs.model.state_dict()[name]), name
    for name, tensor in ours.ema.module.state_dict().items():
        assert torch.equal(tensor, theirs.ema.module.state_dict()[name]), f"EMA {name}"
