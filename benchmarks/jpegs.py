"""ImageNet-sized JPEGs for the benchmarks: photo-like clutter and sensor-like noise at
ImageNet's typical sizes (500x375, 375x500, 500x333 ...) and qualities 75-95, so that a
decode costs about what a real ImageNet decode costs.

    python -m benchmarks.jpegs --out bench_imagenet --classes 10 --per-class 100
"""
import argparse
import os
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

SIZES = [(500, 375), (375, 500), (500, 333), (500, 400), (400, 500), (500, 500), (333, 500), (640, 480)]


def photo_like(rng: random.Random, size) -> Image.Image:
    width, height = size
    gradient = Image.linear_gradient("L").resize(size).rotate(rng.uniform(0, 360))
    base = Image.merge("RGB", [gradient.point(lambda v, a=rng.uniform(0.3, 1.0), b=rng.randint(0, 120): int(v * a + b) % 256)
                               for _ in range(3)])
    draw = ImageDraw.Draw(base)
    for _ in range(rng.randint(15, 40)):
        x, y = rng.randrange(width), rng.randrange(height)
        r = rng.randint(5, max(6, min(size) // 4))
        colour = tuple(rng.randrange(256) for _ in range(3))
        if rng.random() < 0.5:
            draw.ellipse((x - r, y - r, x + r, y + rng.randint(r // 2, 2 * r)), fill=colour)
        else:
            draw.polygon([(x + rng.randint(-r, r), y + rng.randint(-r, r)) for _ in range(5)], fill=colour)
    base = base.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    noise = Image.merge("RGB", [Image.effect_noise(size, rng.uniform(40, 70)) for _ in range(3)])
    return Image.blend(base, noise, rng.uniform(0.3, 0.45))


def write_class(folder: Path, count: int, seed: str) -> None:
    rng = random.Random(seed)  # one stream per folder, so the folders can be written in parallel
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = photo_like(rng, rng.choice(SIZES))
        image.save(folder / f"{folder.name}_{i}.JPEG", "JPEG", quality=rng.randint(75, 95))


def generate(out: Path, classes: int = 10, per_class: int = 100, val_per_class: int = 0, seed: int = 0) -> Path:
    """out/train/<wnid>/*.JPEG (and out/val/ when val_per_class > 0); kept if already there."""
    marker = out / "benchmark_jpegs.txt"
    settings = f"{classes} {per_class} {val_per_class} {seed} v2"
    if marker.is_file() and marker.read_text() == settings:
        return out
    jobs = [(out / split / f"n{c:08d}", count, f"{seed} {split} {c}")
            for split, count in (("train", per_class), ("val", val_per_class)) if count for c in range(classes)]
    with ProcessPoolExecutor(min(len(jobs), os.cpu_count() or 1)) as pool:
        list(pool.map(write_class, *zip(*jobs)))
    marker.write_text(settings)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench_imagenet"))
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--val-per-class", type=int, default=20)
    args = parser.parse_args()
    print(generate(args.out, args.classes, args.per_class, args.val_per_class))


if __name__ == "__main__":
    main()
