"""Model-only training throughput on synthetic tensors: our CSPResNet-50 against timm's
cspresnet50, same batch, optimizer, precision, memory format and threads, measured in
alternation so that drift in the machine hits both alike.

    python -m benchmarks.model --device cpu --batch-size 16 --img-size 256
"""
import argparse
import time

import timm
import torch

from benchmarks.common import print_result
from cspresnet.engine import autocast
from cspresnet.model import build_model
from cspresnet.optim import build_optimizer
from cspresnet.recipe_files import load_recipe
from data.transforms import memory_format


def train_steps(model, optimizer, inputs, targets, amp: str, steps: int) -> float:
    """Seconds for `steps` training steps (the device is synchronised before and after)."""
    device = inputs.device
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        with autocast(device, amp):
            loss = torch.nn.functional.cross_entropy(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(device: str = "cpu", batch_size: int = 16, img_size: int = 256, steps: int = 5, rounds: int = 2,
            amp: str = "none", channels_last: bool = True, threads: int = 0, compile: bool = False) -> dict:
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    torch.backends.cudnn.benchmark = True
    recipe = load_recipe("cspresnet50.yaml")
    layout = memory_format(channels_last)
    models = {"ours": build_model(1000), "timm": timm.create_model("cspresnet50")}
    runners = {}
    for name, model in models.items():
        model = model.to(device, memory_format=layout).train()
        runners[name] = (torch.compile(model) if compile else model, build_optimizer(model, recipe))
    inputs = torch.randn(batch_size, 3, img_size, img_size, device=device).contiguous(memory_format=layout)
    targets = torch.randint(0, 1000, (batch_size,), device=device)
    for model, optimizer in runners.values():  # warm-up: allocator, cuDNN autotuning, compilation
        train_steps(model, optimizer, inputs, targets, amp, 2)
    seconds = {name: 0.0 for name in runners}
    for _ in range(rounds):
        for name, (model, optimizer) in runners.items():
            seconds[name] += train_steps(model, optimizer, inputs, targets, amp, steps)
    images = batch_size * steps * rounds
    result = {f"{name}_images_per_s": round(images / s, 2) for name, s in seconds.items()}
    result.update(device=device.type, batch_size=batch_size, img_size=img_size, amp=amp, channels_last=channels_last,
                  compile=compile, threads=torch.get_num_threads(),
                  ours_over_timm=round(seconds["timm"] / seconds["ours"], 3))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--amp", choices=["bf16", "fp16", "none"], default="none")
    parser.add_argument("--contiguous", action="store_true", help="NCHW instead of channels_last")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    print_result(measure(args.device, args.batch_size, args.img_size, args.steps, args.rounds, args.amp,
                         not args.contiguous, args.threads, args.compile))


if __name__ == "__main__":
    main()
