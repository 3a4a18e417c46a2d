"""The training step: what it does with a non-finite loss."""
import pytest
import torch


def test_a_nonfinite_step_is_skipped_on_the_device():
    from cspresnet.engine import Updater, build_grad_scaler
    from cspresnet.model import build_model
    from cspresnet.optim import build_optimizer
    from cspresnet.recipe_files import load_recipe
    from cspresnet.run_state import EpochTotals, RunState
    from data.batches import Batch
    from common.errors import NonFiniteLossError
    from data.transforms import DevicePreprocess
    from data.unreadable import UnreadableImages

    torch.manual_seed(0)
    cpu = torch.device("cpu")
    model = build_model(3)
    poisoned = {1, 3, 4}
    run = RunState(totals=EpochTotals(cpu), unreadable=UnreadableImages([], 0.5, 0.0, 0))

    class Criterion(torch.nn.Module):
        def forward(self, logits, targets):
            loss = torch.nn.functional.cross_entropy(logits, targets)
            return loss * float("nan") if run.step in poisoned else loss

    step = Updater(model=model, train_model=model, optimizer=build_optimizer(model, load_recipe("demo.yaml")),
                     scaler=build_grad_scaler(cpu, "none"), schedule=lambda step: 0.05, criterion=Criterion(),
                     preprocess=DevicePreprocess(cpu, False), amp="none")
    batch = Batch(torch.randint(0, 255, (4, 32, 32, 3), dtype=torch.uint8), torch.tensor([0, 1, 2, 0]),
                  torch.arange(4), [])

    def train_step():  # as TrainingRun.train_epoch takes one
        run.step += 1
        run.totals.add(step(batch, run.step)[0], len(batch.targets))

    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_step()  # step 1: NaN, skipped: nothing moves, momentum stays zero
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.endswith("running_mean")
               and not k.endswith("running_var") and not k.endswith("num_batches_tracked"))
    assert all(torch.count_nonzero(s["momentum_buffer"]) == 0 for s in step.optimizer.state.values())
    train_step()  # step 2: finite, a real update
    assert not torch.equal(before["head.fc.weight"], model.state_dict()["head.fc.weight"])
    assert step.weights_are_finite()
    run.check_numerics(max_nonfinite_steps=2)  # one in a row so far: fine
    train_step()
    train_step()  # steps 3 and 4: two in a row
    with pytest.raises(NonFiniteLossError, match="2 steps in a row"):
        run.check_numerics(max_nonfinite_steps=2)
    stats = run.totals.finish_epoch(seconds=1.0)
    assert stats.nonfinite_steps == 3 and stats.images == 16 and torch.isfinite(torch.tensor(stats.loss))
