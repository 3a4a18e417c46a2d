"""What only a GPU shows: bf16 kill-and-resume with and without deterministic kernels,
fp16 loss scaling, and validate.py on the GPU against the CPU. Skipped without CUDA (CI
has none); run with `pytest tests/test_gpu.py -v` on a GPU machine."""
import json
import os
import signal
import sys

import pytest
import torch

from cspresnet.checkpoint import load_checkpoint
from tests.helpers import TINY_OVERRIDES, last_wins, read_until, run_cli, start
from tests.test_resilience import RESUME_OVERRIDES, assert_same_run, newest_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU = ["runtime.device=cuda", "runtime.amp=bf16", "runtime.channels_last=true"]


def gpu_train_args(data, output, *extra):
    return ["train.py", "--recipe", "demo.yaml", "--data-dir", data, "--output", output, *last_wins(
            *RESUME_OVERRIDES, *GPU, *extra)]


@pytest.mark.parametrize("deterministic", [
    True,
    pytest.param(False, marks=pytest.mark.xfail(
        reason="cuDNN autotuning may pick other kernels in the resumed process", strict=False)),
])
def test_bf16_kill_and_resume_is_bitwise_exact_on_gpu(tiny_imagenet, tmp_path, deterministic):
    setting = f"runtime.deterministic={str(deterministic).lower()}"
    baseline = tmp_path / "baseline"
    run_cli([sys.executable, *gpu_train_args(tiny_imagenet, baseline, setting)], gpu=True)

    output = tmp_path / "run"
    process = start([sys.executable, *gpu_train_args(tiny_imagenet, output, setting)], gpu=True)
    read_until(process, "step 9 ")  # epoch 2, one step after the step-8 checkpoint
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert newest_step(output) == 8
    run_cli([sys.executable, *gpu_train_args(tiny_imagenet, output, setting, "--resume", "auto")], gpu=True)

    left, right = load_checkpoint(baseline / "last.pt"), load_checkpoint(output / "last.pt")
    differing = {key: (left["model"][key].double() - right["model"][key].double()).abs().max().item()
                 for key in left["model"] if not torch.equal(left["model"][key], right["model"][key])}
    print(f"deterministic={deterministic}: {len(differing)} of {len(left['model'])} tensors differ, "
          f"largest difference {max(differing.values(), default=0.0):.3g}")
    assert_same_run(output, baseline)


def test_fp16_scales_the_loss_and_trains(tiny_imagenet, tmp_path):
    args = ["train.py", "--recipe", "demo.yaml", "--data-dir", tiny_imagenet, "--output", tmp_path,
            *TINY_OVERRIDES, "runtime.device=cuda", "runtime.amp=fp16"]
    run_cli([sys.executable, *args], gpu=True)
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["scaler"]["scale"] != 1.0  # a real GradScaler, not the pinned one of bf16/fp32
    assert state["rows"][-1]["nonfinite_steps"] == 0
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_validate_on_gpu_agrees_with_the_cpu(tiny_imagenet, tmp_path):
    run_cli([sys.executable, "train.py", "--recipe", "demo.yaml", "--data-dir", tiny_imagenet, "--output", tmp_path,
             *TINY_OVERRIDES])
    results = {}
    for device in ("cpu", "cuda"):
        logits = tmp_path / f"{device}.pt"
        out = run_cli([sys.executable, "validate.py", "--checkpoint", tmp_path / "last.pt", "--data-dir",
                       tiny_imagenet, "--workers", "0", "--device", device, "--logits-file", logits], gpu=True).stdout
        results[device] = json.loads(out.strip().splitlines()[-1]), torch.load(logits, weights_only=True)
    (cpu, cpu_logits), (gpu, gpu_logits) = results["cpu"], results["cuda"]
    assert gpu["device"] == "cuda" and cpu["images"] == gpu["images"] == 15
    assert cpu_logits["paths"] == gpu_logits["paths"]
    reference = cpu_logits["logits"]
    tolerance = 1e-2 * reference.abs().max()  # cuDNN runs fp32 convolutions in TF32 by default: ~1e-3 relative
    assert (reference - gpu_logits["logits"]).abs().max() < tolerance
    top2 = reference.topk(2, dim=1).values
    clear = top2[:, 0] - top2[:, 1] > 2 * tolerance  # predictions that such a difference cannot flip
    assert torch.equal(reference.argmax(1)[clear], gpu_logits["logits"].argmax(1)[clear])
