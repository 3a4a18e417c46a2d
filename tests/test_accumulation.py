"""Micro-batches and SyncBatchNorm: how one update's global batch is cut into processes x
passes x images, and that every cut trains the same weights as darknet's one big batch.

The checks of real DDP processes run this module under torchrun (`torchrun_worker`)."""
import copy
import json
import os
import signal
import sys

import pytest
import torch

from cspresnet.arrangement import arrange
from cspresnet.checkpoint import load_checkpoint
from cspresnet.run_folder import CheckpointFolder
from common.processes import DistContext
from cspresnet.distributed import init_distributed, shutdown
from cspresnet.engine import build_criterion, build_updater
from cspresnet.optim import build_optimizer, set_lr
from cspresnet.recipe import RecipeError
from cspresnet.recipe_files import load_recipe
from cspresnet.sync_bn import convert_to_sync_bn
from data.batches import Batch

import train
from tests.helpers import TINY_OVERRIDES, in_this_process, last_wins, run_cli, start, torchrun, train_here

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.mark.parametrize("processes, line", [
    (1, "global batch 128 = 1 process x 4 passes x 32 images; BatchNorm over 32"),
    (4, "global batch 128 = 4 processes x 1 pass x 32 images; BatchNorm over 32"),
])
def test_the_darknet_recipe_normalises_over_32_images_on_1_and_4_gpus(processes, line):
    assert arrange(load_recipe("cspresnet50.yaml"), processes).describe() == line


def test_a_share_smaller_than_one_pass_is_one_pass_said_plainly_and_syncbn_pairs_give_32_on_8_gpus():
    """The README's 8-GPU command runs with BatchNorm over 16 and says so, naming the fix."""
    assert arrange(load_recipe("cspresnet50.yaml"), 8).describe() == (
        "global batch 128 = 8 processes x 1 pass x 16 images; BatchNorm over 16, not the recipe's micro_batch_size "
        "32: each process has 16 images, fewer than one pass, so it takes them in one; to normalise over 32 add "
        "runtime.sync_bn=true runtime.sync_bn_group_size=2")
    paired = load_recipe("cspresnet50.yaml", ["runtime.sync_bn=true", "runtime.sync_bn_group_size=2"])
    assert arrange(paired, 8).describe() == ("global batch 128 = 8 processes x 1 pass x 16 images; BatchNorm over "
                                             "32 (SyncBatchNorm over groups of 2 processes)")
    alone = arrange(load_recipe("cspresnet50.yaml", ["batch_size=16"]), 1)  # one process: no pair to pool with
    assert alone.describe().endswith("to normalise over 32, raise batch_size to a multiple of 32")
    refused = "'runtime.sync_bn_group_size' is 3 but the job has 4 processes; it must divide 4"
    with pytest.raises(RecipeError, match=refused):
        arrange(load_recipe("cspresnet50.yaml", ["runtime.sync_bn=true", "runtime.sync_bn_group_size=3"]), 4)


def test_an_impossible_arrangement_is_refused_before_any_work(tiny_imagenet, tmp_path):
    output = tmp_path / "run"
    result = in_this_process(train.main, "--recipe", "demo.yaml", "--data-dir", tiny_imagenet, "--output", output,
                             *TINY_OVERRIDES, "micro_batch_size=3")
    assert result.returncode == 2
    assert ("error: global batch 8 cannot be cut into 1 process x whole passes x 3 images (recipe keys "
            "'batch_size', 'micro_batch_size'): each process has 8 images, not a multiple of 3") in result.stderr
    assert not output.exists()  # no run folder claimed, nothing built


def test_print_recipe_shows_the_micro_batch_with_its_source():
    out = in_this_process(train.main, "--recipe", "cspresnet50.yaml", "--print-recipe").stdout
    line = next(line for line in out.splitlines() if line.startswith("micro_batch_size:"))
    assert line.startswith("micro_batch_size: 32") and "cfg batch=128 subdivisions=4" in line


def fixed_batch(images: int, seed: int) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    return Batch(torch.randint(0, 256, (images, 32, 32, 3), dtype=torch.uint8, generator=generator),
                 torch.randint(0, 3, (images,), generator=generator), torch.arange(images), [])


def test_one_process_4_passes_of_2_trains_the_weights_of_4_processes_of_2():
    """The reference is 4 ranks by hand: rank r takes the batch's images r, r + 4, ... (the
    sampler's deal), its own copy of the model and BatchNorm, and the update averages their
    gradients, as DDP does (one update: the optimizer's arithmetic is not under test here).
    Parameters agree; BatchNorm's running statistics do not and are not meant to (one
    process updates them once per pass, DDP keeps rank 0's)."""
    torch.set_num_threads(1)  # 2 cores, often shared: fewer threads run faster (conftest restores them)
    recipe = load_recipe("demo.yaml", [*TINY_OVERRIDES, "micro_batch_size=2"])
    torch.manual_seed(0)
    step = build_updater(recipe, CPU, steps_per_epoch=6)
    assert step.passes == 4
    ranks = [copy.deepcopy(step.model) for _ in range(4)]
    optimizer = build_optimizer(ranks[0], recipe)
    criterion = build_criterion(False, recipe.label_smoothing)
    batch = fixed_batch(8, seed=1)
    step(batch, 3)  # update 3: past the lowest burn-in rates
    inputs = step.preprocess(batch.images)
    for rank, model in enumerate(ranks):
        criterion(model(inputs[rank::4]), batch.targets[rank::4]).backward()
    for param, *others in zip(ranks[0].parameters(), *(m.parameters() for m in ranks[1:])):
        param.grad = (param.grad + sum(p.grad for p in others)) / 4
    set_lr(optimizer, step.schedule(3))
    optimizer.step()
    for (name, ours), theirs in zip(step.model.named_parameters(), ranks[0].parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=name)


def test_the_accumulation_benchmark_compares_the_same_images_both_ways(capsys):
    """What it promises, not how fast (a timing is a benchmark, not an assertion)."""
    import benchmarks.accumulation

    benchmarks.accumulation.main(["--micro-batch", "2", "--passes", "2", "--img-size", "32", "--updates", "1",
                                  "--rounds", "1", "--threads", "1", "--device", "cpu"])
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["micro_batch"] == 2 and result["passes"] == 2 and result["cores"] and result["commit"]
    assert result["accumulated_over_single"] == pytest.approx(
        result["accumulated_images_per_s"] / result["single_images_per_s"], rel=0.01)


# The slow tests: train.py on the tiny set, batch 4: one epoch of 6 updates.
ACCUMULATION_OVERRIDES = last_wins(*TINY_OVERRIDES, "epochs=1", "batch_size=4", "micro_batch_size=2",
                                   "checkpoint.every_steps=2")


def train_args(data, output, *extra):
    return ["train.py", "--recipe", "demo.yaml", "--data-dir", data, "--output", output, *last_wins(
            *ACCUMULATION_OVERRIDES, *extra)]


@pytest.fixture(scope="module")
def accumulated_run(tiny_imagenet, tmp_path_factory):
    """1 process x 2 passes x 2 images, uninterrupted."""
    output = tmp_path_factory.mktemp("accumulated")
    result = train_here(train_args(tiny_imagenet, output))
    assert "global batch 4 = 1 process x 2 passes x 2 images; BatchNorm over 2" in result.stdout + result.stderr
    return output


# train.py, killed by SIGKILL from inside update 5, as its second pass starts.
KILLED_BETWEEN_PASSES = """
import os, signal, sys
from cspresnet.engine import Updater
import train
forward_backward = Updater.backward_pass
passes = []
def killed_in_update_5(self, *args, **kwargs):
    passes.append(1)
    if len(passes) == 4 * 2 + 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return forward_backward(self, *args, **kwargs)
Updater.backward_pass = killed_in_update_5
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_kill_between_passes_resumes_at_the_updates_start_bitwise_exact(tiny_imagenet, tmp_path, accumulated_run):
    output = tmp_path / "run"
    process = start([sys.executable, "-c", KILLED_BETWEEN_PASSES, *train_args(tiny_imagenet, output)[1:]])
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert max(step for step, _ in CheckpointFolder(output, 2).step_files()) == 4
    # The resume turns the copy stream on: one batch ahead, it changes no number.
    resumed = train_here(train_args(tiny_imagenet, output, "runtime.copy_stream=true", "data.workers=2", "--resume",
                                    "auto"))
    assert "at step 4" in resumed.stdout and "inexactly" not in resumed.stdout
    ours, theirs = load_checkpoint(accumulated_run / "last.pt"), load_checkpoint(output / "last.pt")
    assert ours["step"] == theirs["step"] == 6
    for name, value in ours["model"].items():
        assert torch.equal(value, theirs["model"][name]), name


@pytest.mark.slow
def test_two_real_ddp_processes_train_as_one_with_syncbn_over_both_and_with_accumulation():
    run_cli(torchrun(2, "-m", "tests.test_accumulation"))


def torchrun_worker() -> None:
    threads_before = set(os.listdir("/proc/self/task"))
    ctx = init_distributed("cpu")
    syncbn_over_2_processes_is_batchnorm_over_both_halves(ctx)
    two_processes_of_2_passes_train_the_weights_of_one_process_of_4_passes(ctx)
    ddp_switches_change_no_weight(ctx)
    # The group's gloo threads end in shutdown, not at interpreter exit, where one that frees
    # a collective's tensors would abort the rank (cspresnet.distributed.shutdown says why),
    # even while a reference cycle holds DDP, as train.py's run and its stop callback do.
    held = build_updater(load_recipe("demo.yaml", TINY_OVERRIDES), ctx, steps_per_epoch=6)
    held.cycle = held
    del held
    shutdown()
    assert not set(os.listdir("/proc/self/task")) - threads_before, "the process group's threads outlived shutdown"


def syncbn_over_2_processes_is_batchnorm_over_both_halves(ctx: DistContext) -> None:
    """Each process holds half of a batch of 4: one update with SyncBatchNorm over both, as
    build_updater builds it (SyncBN, then DDP), gives the weights and BatchNorm statistics
    of one process's update on the whole batch; the state dict keeps its keys (checkpoints,
    export); a group of 1 is each process's own BatchNorm."""
    overrides = last_wins(*TINY_OVERRIDES, "batch_size=4", "runtime.sync_bn=true")
    torch.manual_seed(0)
    synced = build_updater(load_recipe("demo.yaml", overrides), ctx, steps_per_epoch=6)
    torch.manual_seed(0)
    alone = build_updater(load_recipe("demo.yaml", [*overrides[:-1]]), CPU, steps_per_epoch=6)
    batch = fixed_batch(4, seed=1)
    mine = slice(2 * ctx.rank, 2 * ctx.rank + 2)
    synced(Batch(batch.images[mine], batch.targets[mine], batch.indices[mine], []), 3)
    alone(batch, 3)
    expected = alone.model.state_dict()
    assert list(synced.model.state_dict()) == list(expected)
    for name, value in synced.model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-5, msg=name)

    own = convert_to_sync_bn(torch.nn.BatchNorm2d(3), group_size=1, world_size=2, device=ctx.device)
    plain = torch.nn.BatchNorm2d(3)
    half = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(ctx.rank))
    torch.testing.assert_close(own(half), plain(half))
    torch.testing.assert_close(own.running_var, plain.running_var)


def two_processes_of_2_passes_train_the_weights_of_one_process_of_4_passes(ctx: DistContext) -> None:
    """DDP's real path: gradients synced only in the last pass (no_sync before). Rank r
    holds the batch's images r, r + 2, ... (the sampler's deal); its pass k is then what
    pass r + 2k of one process takes. Parameters agree (BatchNorm statistics differ)."""
    recipe = load_recipe("demo.yaml", [*TINY_OVERRIDES, "micro_batch_size=2"])
    torch.manual_seed(0)
    accumulating = build_updater(recipe, ctx, steps_per_epoch=6)
    torch.manual_seed(0)
    alone = build_updater(recipe, CPU, steps_per_epoch=6)
    assert (accumulating.passes, alone.passes) == (2, 4)
    batch = fixed_batch(8, seed=2)
    mine = slice(ctx.rank, None, 2)
    accumulating(Batch(batch.images[mine], batch.targets[mine], batch.indices[mine], []), 3)
    alone(batch, 3)
    for (name, ours), theirs in zip(accumulating.model.named_parameters(), alone.model.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=name)



def ddp_switches_change_no_weight(ctx: DistContext) -> None:
    """DDP's gradient_as_bucket_view and a bucket size that cuts the gradients into many
    buckets, with accumulation (no_sync), and static_graph with one pass per update (it
    cannot take accumulation: arrangement.py), over two updates: bitwise the weights of DDP's
    defaults (each bucket's all-reduce sums the same two numbers per element)."""
    views = ["runtime.ddp_gradient_as_bucket_view=true", "runtime.ddp_bucket_cap_mb=0.05"]
    static = [*views, "runtime.ddp_static_graph=true"]
    for micro, switches in (("micro_batch_size=2", views), ("micro_batch_size=0", static)):
        weights = []
        for overrides in ([micro], [micro, *switches]):
            torch.manual_seed(0)
            step = build_updater(load_recipe("demo.yaml", [*TINY_OVERRIDES, *overrides]), ctx, steps_per_epoch=6)
            assert step.ddp.gradient_as_bucket_view is (overrides != [micro])
            for update in (3, 4):
                batch = fixed_batch(8, seed=update)
                mine = slice(ctx.rank, None, 2)
                step(Batch(batch.images[mine], batch.targets[mine], batch.indices[mine], []), update)
            weights.append(dict(step.model.named_parameters()))
        assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0]), switches


if __name__ == "__main__":
    torchrun_worker()
