"""Shared by the benchmarks (and the tests): machine facts, the final JSON line, and a
stand-in for trained weights."""
import importlib.metadata
import json
import os
import platform
import subprocess
from datetime import datetime, timezone

import timm
import torch


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    facts = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
             "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    facts["packages"] = package_versions()
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    if os.environ.get("BENCHMARK_COMMIT"):  # a copy whose .git is missing or stale: say which commit it was
        facts["commit"] = os.environ["BENCHMARK_COMMIT"]
        return facts
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
        facts["commit"] = commit + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        pass
    return facts


def package_versions() -> str:
    """The versions that decide a figure, as installed (a lent GPU machine has its own torch)."""
    found = []
    for name in ("torchvision", "timm", "torchcodec", "simplejpeg"):
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} missing")
    return ", ".join(found + ([f"CUDA {torch.version.cuda}"] if torch.version.cuda else []))


def rehearsal_compile_backend() -> None:
    """With CSPRESNET_BENCH_COMPILE_BACKEND=eager (the GPU sweep's CPU rehearsal),
    torch.compile traces with dynamo as usual but runs the captured graphs as they are,
    instead of spending minutes in inductor on a small CPU. Never set for a measurement."""
    backend = os.environ.get("CSPRESNET_BENCH_COMPILE_BACKEND")
    if backend:
        real = torch.compile
        torch.compile = lambda model, mode=None, dynamic=None: real(model, backend=backend, dynamic=dynamic)


def print_result(result: dict) -> None:
    print(json.dumps(result), flush=True)


def perturb_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every BN's statistics and affine parameters off their init, so that a wrong
    layer order, a missed buffer or near-tied logits would show."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)


def stand_in_timm_model(num_classes: int, seed: int = 0) -> torch.nn.Module:
    """timm's cspresnet50 with BN statistics, gammas and head moved off their init, so
    that its logits are well separated (an untrained init gives near-ties). No trained
    weights may be downloaded here; this is what the parity checks run instead."""
    torch.manual_seed(seed)
    model = timm.create_model("cspresnet50", num_classes=num_classes).eval()
    perturb_batchnorm(model, seed)
    torch.nn.init.normal_(model.head.fc.weight, std=0.002)  # logits of order 10
    return model
