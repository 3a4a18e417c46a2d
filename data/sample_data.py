"""Write a small, learnable image-classification set in the ImageNet layout, as real JPEGs: a
class's shape and hue over a random textured background, at random places and sizes (random-resized
crops still see the class); like ImageNet, a few grayscale and CMYK JPEGs and a PNG named .JPEG."""
import argparse
import colorsys
import json
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("disc", "square", "triangle", "cross", "ring")


def _rgb(hue: float, saturation: float, value: float) -> tuple:
    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue % 1.0, saturation, value))


def draw_sample(class_index: int, num_classes: int, rng: random.Random, size: tuple) -> Image.Image:
    width, height = size
    background = Image.new("RGB", size, _rgb(rng.random(), rng.uniform(0.0, 0.4), rng.uniform(0.2, 0.9)))
    draw = ImageDraw.Draw(background)
    for _ in range(rng.randint(5, 15)):  # clutter that carries no class information
        x, y = rng.randrange(width), rng.randrange(height)
        r = rng.randint(3, max(4, min(size) // 8))
        draw.rectangle((x - r, y - r, x + r, y + r), fill=_rgb(rng.random(), 0.3, rng.uniform(0.2, 1.0)))
    background = background.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))
    draw = ImageDraw.Draw(background)
    colour = _rgb(class_index / num_classes + rng.uniform(-0.02, 0.02), rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0))
    shape = SHAPES[class_index % len(SHAPES)]
    radius = rng.uniform(0.25, 0.45) * min(size)
    cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "disc":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    elif shape == "cross":
        bar = radius / 3
        draw.rectangle((cx - radius, cy - bar, cx + radius, cy + bar), fill=colour)
        draw.rectangle((cx - bar, cy - radius, cx + bar, cy + radius), fill=colour)
    else:
        draw.ellipse(box, outline=colour, width=max(2, int(radius / 3)))
    return background


def generate(out: Path, num_classes: int = 10, train_per_class: int = 60, val_per_class: int = 20,
             min_size: int = 96, max_size: int = 320, seed: int = 0) -> Path:
    """Build the set at `out` unless an identical one is already there; returns `out`."""
    settings = dict(num_classes=num_classes, train_per_class=train_per_class, val_per_class=val_per_class,
                    min_size=min_size, max_size=max_size, seed=seed)
    marker = out / "sample_data.json"
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return out
    if not 1 <= num_classes <= 1000:
        raise ValueError(f"num_classes must be in [1, 1000], got {num_classes}")
    if not 32 <= min_size <= max_size:
        raise ValueError(f"need 32 <= min_size <= max_size, got {min_size}, {max_size}")
    rng = random.Random(seed)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    counter = 0
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for class_index in range(num_classes):
            wnid = f"n{class_index:08d}"
            folder = staging / split / wnid
            folder.mkdir(parents=True)
            for image_index in range(per_class):
                size = (rng.randint(min_size, max_size), rng.randint(min_size, max_size))
                image = draw_sample(class_index, num_classes, rng, size)
                path, quality = folder / f"{wnid}_{image_index}.JPEG", rng.randint(75, 95)
                counter += 1
                if counter == 1:  # ImageNet's n02105855_2933.JPEG is a PNG too
                    image.save(path, "PNG")
                else:  # every 23rd image grayscale, every 29th CMYK
                    mode = "L" if counter % 23 == 0 else "CMYK" if counter % 29 == 0 else "RGB"
                    image.convert(mode).save(path, "JPEG", quality=quality)
    (staging / "sample_data.json").write_text(json.dumps(settings))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="sample_imagenet", help="output folder (default: sample_imagenet)")
    for option, default in (("--classes", 10), ("--train-per-class", 60), ("--val-per-class", 20), ("--min-size", 96),
                            ("--max-size", 320), ("--seed", 0)):
        parser.add_argument(option, type=int, default=default)
    args = parser.parse_args()
    out = generate(Path(args.out), args.classes, args.train_per_class, args.val_per_class,
                   args.min_size, args.max_size, args.seed)
    print(f"sample dataset ready at {out}")


if __name__ == "__main__":
    main()
