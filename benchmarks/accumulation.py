"""Training throughput with gradient accumulation against without, at the same micro-batch:
our Updater with the darknet recipe, one update of `passes` x `micro-batch` images against
`passes` updates of `micro-batch` images each, on the same synthetic batches, measured in
alternation so that drift in the machine hits both alike. What accumulation adds (slicing
the batch, scaling the loss, one optimizer step per update instead of one per pass) should
cost nothing measurable: the passes dominate.

    python -m benchmarks.accumulation --micro-batch 8 --passes 4 --img-size 128
"""
import argparse
import statistics
import time

import torch

from benchmarks.common import machine, print_result
from common.processes import DistContext
from cspresnet.engine import Updater, build_updater
from cspresnet.recipe_files import load_recipe
from data.batches import Batch


def build(images_per_update: int, micro_batch: int, img_size: int, amp: str, device: torch.device) -> Updater:
    recipe = load_recipe("cspresnet50.yaml", [f"batch_size={images_per_update}", f"micro_batch_size={micro_batch}",
                                              f"data.img_size={img_size}", f"runtime.amp={amp}"])
    step = build_updater(recipe, DistContext(rank=0, world_size=1, local_rank=0, device=device),
                            steps_per_epoch=10_000)
    step.model.train()
    return step


def random_batch(images: int, img_size: int) -> Batch:
    return Batch(torch.randint(0, 256, (images, img_size, img_size, 3), dtype=torch.uint8),
                 torch.randint(0, 1000, (images,)), torch.arange(images), [])


def seconds_for(step: Updater, batches, first_update: int) -> float:
    """Seconds for one update per batch (the device is synchronised before and after)."""
    device = step.preprocess.device
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for number, batch in enumerate(batches, first_update):
        loss, _ = step(batch, number)
    loss.item()  # waits for the last update
    return time.perf_counter() - start


def measure(micro_batch: int = 8, passes: int = 4, img_size: int = 128, updates: int = 2, rounds: int = 3,
            amp: str = "none", device: str = "cpu", threads: int = 0) -> dict:
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    accumulated = build(micro_batch * passes, micro_batch, img_size, amp, device)
    single = build(micro_batch, micro_batch, img_size, amp, device)
    assert accumulated.passes == passes and single.passes == 1
    big = [random_batch(micro_batch * passes, img_size) for _ in range(updates)]
    small = [Batch(b.images[k::passes], b.targets[k::passes], b.indices[k::passes], []) for b in big
             for k in range(passes)]  # the same images, one update per pass
    seconds_for(accumulated, big[:1], 1)  # warm-up: allocator, optimizer state
    seconds_for(single, small[:1], 1)
    rates = {"accumulated": [], "single": []}
    images = micro_batch * passes * updates
    for round_ in range(rounds):
        rates["accumulated"].append(images / seconds_for(accumulated, big, 2 + round_ * updates))
        rates["single"].append(images / seconds_for(single, small, 2 + round_ * updates * passes))
    median = {name: statistics.median(values) for name, values in rates.items()}
    return dict(
        machine(), device=device.type, micro_batch=micro_batch, passes=passes, img_size=img_size, amp=amp,
        threads=torch.get_num_threads(), updates=updates, rounds=rounds,
        accumulated_images_per_s=round(median["accumulated"], 2), single_images_per_s=round(median["single"], 2),
        accumulated_over_single=round(median["accumulated"] / median["single"], 3),
        rounds_images_per_s={name: [round(v, 2) for v in values] for name, values in rates.items()},
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro-batch", type=int, default=8, help="images per forward pass, both ways")
    parser.add_argument("--passes", type=int, default=4, help="passes accumulated into one update")
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--updates", type=int, default=2, help="accumulated updates per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    parser.add_argument("--amp", choices=["bf16", "fp16", "none"], default="none")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    print_result(measure(args.micro_batch, args.passes, args.img_size, args.updates, args.rounds, args.amp,
                         args.device, args.threads))


if __name__ == "__main__":
    main()
