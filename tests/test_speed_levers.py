"""The GPU speed levers, each a recipe switch, checked on the CPU: torch.compile's modes and
static shapes, SGD's kernels, the copy stream. (DDP's switches: tests/test_accumulation.py's
torchrun worker; the copy stream's bitwise resume: its kill-between-passes test.)"""
import pytest
import torch
from torch import nn

import train
from cspresnet.arrangement import arrange
from common.processes import DistContext
from cspresnet.engine import CompiledAtOneBatch, build_updater, evaluated_models
from cspresnet.recipe import RecipeError
from cspresnet.recipe_files import load_recipe
from data.batches import Batch
from data.device_feed import ahead_on_device
from tests.helpers import TINY_OVERRIDES, in_this_process, last_wins
from tests.test_accumulation import fixed_batch

CPU = DistContext.alone(torch.device("cpu"))


@pytest.fixture
def compiles(monkeypatch):
    """torch.compile through dynamo for real, but with a backend that runs the captured graph
    as it is (no inductor: minutes on this CPU) and records each compilation: (mode, input shape)."""
    torch._dynamo.reset()
    recorded = []
    real_compile = torch.compile

    def compile(module, mode=None, dynamic=None):
        def backend(graph, inputs):
            names = [node.name for node in graph.graph.nodes if node.op == "placeholder"]
            images = next(value for name, value in zip(names, inputs) if not any(
                part in name for part in ("_modules_", "_parameters_", "_buffers_")))  # not a weight: the input
            recorded.append((mode, tuple(images.shape)))
            return graph.forward
        return real_compile(module, backend=backend, dynamic=dynamic)

    monkeypatch.setattr(torch, "compile", compile)
    yield recorded
    torch._dynamo.reset()


def test_one_compilation_per_crop_size_and_none_for_a_batch_of_another_size(compiles):
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    wrapped = CompiledAtOneBatch(module, batch=4, mode="reduce-overhead")
    for shape in [(4, 3, 8, 8), (4, 3, 8, 8), (3, 3, 8, 8), (4, 3, 16, 16), (4, 3, 8, 8), (1, 3, 16, 16)]:
        inputs = torch.randn(shape)
        torch.testing.assert_close(wrapped(inputs), module(inputs), rtol=0, atol=0)
    assert compiles == [("reduce-overhead", (4, 3, 8, 8)), ("reduce-overhead", (4, 3, 16, 16))]


def test_the_compiled_training_step_compiles_once_and_trains_the_eager_weights(compiles):
    """The real model with SGD, through build_updater: one graph at the pass's size; a batch
    short of unreadable images runs plain; the weights are those of the eager step."""
    torch.set_num_threads(1)
    recipe = load_recipe("demo.yaml", last_wins(*TINY_OVERRIDES, "runtime.compile=true",
                                                "runtime.compile_mode=max-autotune"))
    torch.manual_seed(0)
    compiled = build_updater(recipe, CPU, steps_per_epoch=6)
    torch.manual_seed(0)
    eager = build_updater(load_recipe("demo.yaml", TINY_OVERRIDES), CPU, steps_per_epoch=6)
    for step, images in enumerate([8, 8, 7], start=3):
        compiled(fixed_batch(images, seed=step), step)
        eager(fixed_batch(images, seed=step), step)
    assert compiles == [("max-autotune", (8, 3, 32, 32))]
    for (name, ours), theirs in zip(compiled.model.state_dict().items(), eager.model.state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=name)


def test_compiled_evaluation_runs_the_weights_and_their_ema_at_the_evaluation_batch(compiles):
    recipe = load_recipe("demo.yaml", last_wins(*TINY_OVERRIDES, "runtime.compile_eval=true", "ema.enabled=true"))
    step = build_updater(recipe, CPU, steps_per_epoch=6)
    model, ema = evaluated_models(step, recipe.runtime, batch=5)
    assert model.plain is step.model and ema.plain is step.ema.module and model.batch == ema.batch == 5
    inputs = torch.randn(5, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    model.eval()
    torch.testing.assert_close(model(inputs), step.model(inputs))
    assert compiles == [("default", (5, 3, 32, 32))]
    plain = load_recipe("demo.yaml", TINY_OVERRIDES)
    assert evaluated_models(step, plain.runtime, batch=5) == (step.model, step.ema.module)


def test_a_compiled_run_says_what_is_compiled_at_which_batch(tiny_imagenet, tmp_path, compiles):
    result = in_this_process(train.main, "--recipe", "demo.yaml", "--data-dir", tiny_imagenet, "--output",
                             tmp_path / "run", *last_wins(*TINY_OVERRIDES, "epochs=1", "runtime.compile=true",
                                                          "runtime.compile_eval=true"))
    assert result.returncode == 0, result.stderr
    assert ("torch.compile (mode default, static shapes): training passes of 8 images and evaluation batches of "
            "4 images; a batch of another size runs without compiling") in result.stdout
    assert sorted(shape[0] for _, shape in compiles) == [4, 8]  # 15 evaluation images: the last 3 ran plain


@pytest.mark.parametrize("kernel", ["foreach", "for-loop"])
def test_each_sgd_kernel_trains_the_fused_kernels_weights(kernel):
    torch.set_num_threads(1)
    steps = {}
    for each in ("fused", kernel):
        torch.manual_seed(0)
        steps[each] = build_updater(load_recipe("demo.yaml", [*TINY_OVERRIDES, f"optim.kernel={each}"]), CPU, 6)
        assert steps[each].optimizer.defaults["fused" if each == "fused" else "foreach"] is (each != "for-loop")
        for step in range(3, 6):
            steps[each](fixed_batch(8, seed=step), step)
    fused, other = (steps[each].model.state_dict() for each in ("fused", kernel))
    for name, value in fused.items():
        torch.testing.assert_close(value, other[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("overrides, message", [
    (["optim.name=rmsproptf", "optim.kernel=foreach"],
     "recipe key 'optim.kernel' only applies to optim.name=sgd, but optim.name is rmsproptf"),
    (["runtime.compile_mode=reduce-overhead"], "'runtime.compile_mode' must be default unless runtime.compile or "
                                               "runtime.compile_eval is true"),
    (["runtime.ddp_bucket_cap_mb=0"], "'runtime.ddp_bucket_cap_mb' must be > 0 (MB)"),
    (["runtime.compile=true", "runtime.compile_mode=cudagraphs"], "'runtime.compile_mode' must be one of"),
])
def test_a_switch_that_cannot_work_is_refused_naming_the_key(overrides, message):
    with pytest.raises(RecipeError) as error:
        load_recipe("demo.yaml", overrides)
    assert message in str(error.value)


def test_ddp_static_graph_with_accumulation_is_refused_at_start_naming_the_way_out():
    """torch's DDP cannot take static_graph with no_sync (tests/test_accumulation.py runs it
    with one pass per update, bitwise the default)."""
    recipe = load_recipe("cspresnet50.yaml", ["runtime.ddp_static_graph=true"])
    with pytest.raises(RecipeError, match=r"'runtime.ddp_static_graph' cannot be true with gradient accumulation "
                                          r"\(2 passes per update here\).*pytorch/pytorch#143580.*micro_batch_size=0"):
        arrange(recipe, 2)
    assert arrange(recipe, 4).passes == 1 and arrange(recipe, 1).passes == 4  # one pass each; one process: no DDP


def test_print_recipe_shows_every_switch():
    out = in_this_process(train.main, "--recipe", "cspresnet50.yaml", "--print-recipe").stdout
    for line in ["compile: false", "compile_mode: default", "compile_eval: false", "copy_stream: false",
                 "ddp_bucket_cap_mb: 25.0", "ddp_gradient_as_bucket_view: false", "ddp_static_graph: false",
                 "kernel: fused"]:
        assert any(shown.strip().startswith(line) for shown in out.splitlines()), line


def test_the_look_ahead_yields_every_batch_once_in_order_and_pulls_one_ahead():
    pulled = []

    def batches():
        for n in range(4):
            pulled.append(n)
            yield Batch(torch.full((2, 4, 4, 3), n, dtype=torch.uint8), torch.tensor([n, n]), torch.arange(2), [])

    fed = ahead_on_device(batches(), torch.device("cpu"))
    first = next(fed)
    assert first.targets.tolist() == [0, 0] and pulled == [0, 1]  # the next batch is on its way
    assert [b.targets[0].item() for b in fed] == [1, 2, 3] and pulled == [0, 1, 2, 3]
    assert list(ahead_on_device(iter([]), torch.device("cpu"))) == []


def test_a_resume_that_turns_the_copy_stream_on_is_no_recipe_change():
    from cspresnet.recipe import changed_keys, recipe_to_dict
    before = recipe_to_dict(load_recipe("demo.yaml"))
    after = recipe_to_dict(load_recipe("demo.yaml", ["runtime.copy_stream=true", "runtime.ddp_static_graph=true"]))
    assert changed_keys(before, after) == []
    older = {key: value for key, value in before.items()}
    older["runtime"] = {k: v for k, v in before["runtime"].items() if k not in ("compile_mode", "compile_eval")}
    assert changed_keys(older, before) == []  # a checkpoint from before these keys existed: their defaults
    assert changed_keys(before, recipe_to_dict(load_recipe("demo.yaml", ["optim.kernel=foreach"]))) == [
        "optim.kernel 'fused' -> 'foreach'"]


def test_without_a_loadable_torchcodec_gpu_decode_says_why_and_training_decodes_on_the_cpu(monkeypatch):
    """The GPU machine's own torch may be one that the pinned TorchCodec does not load with."""
    import data.gpu_decode
    monkeypatch.setattr(data.gpu_decode, "decode_jpeg", None)
    monkeypatch.setattr(data.gpu_decode, "WHY_NO_TORCHCODEC", "TorchCodec cannot be imported (no module)",
                        raising=False)
    assert data.gpu_decode.gpu_decode_available(torch.device("cuda")) == (
        False, "TorchCodec cannot be imported (no module)")
