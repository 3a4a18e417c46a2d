"""The fast decode path draws RandomResizedCrop's crops, and its pixels stay close to a
full decode; the fast evaluation path moves predictions only a little."""
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp
from torchvision import transforms

from data.fast_decode import FastCenterCrop, decode_region
from data.dataset import ImageDataset, seeded_randomness
from data.transforms import eval_transform, train_transform

OUT = 64


@pytest.fixture(scope="module")
def ramp_jpeg(tmp_path_factory):
    """R rises left to right, G top to bottom: a crop's pixels tell where it came from.
    Big enough (1024x768) that most crops are decoded at 1/2 or 1/4 scale."""
    width, height = 1024, 768
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    path = tmp_path_factory.mktemp("ramp") / "ramp.JPEG"
    Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8)).save(path, quality=95)
    return path, width, height


def box_seen(pixels: torch.Tensor, width: int, height: int):
    """(area fraction, aspect ratio) of the source region, read back from the ramps."""
    r, g = pixels[..., 0].double(), pixels[..., 1].double()
    columns, rows = r.mean(0), g.mean(1)
    box_width = abs(columns[-1] - columns[0]) * OUT / (OUT - 1) * (width - 1) / 255
    box_height = abs(rows[-1] - rows[0]) * OUT / (OUT - 1) * (height - 1) / 255
    return box_width * box_height / (width * height), box_width / box_height


def test_same_crop_distribution_as_torchvision(ramp_jpeg):
    path, width, height = ramp_jpeg
    ours = train_transform(OUT, decode="fast")
    theirs = transforms.Compose([transforms.RandomResizedCrop(OUT), transforms.RandomHorizontalFlip(),
                                 transforms.PILToTensor()])
    original = Image.open(path).convert("RGB")
    seen = {"ours": [], "torchvision": []}
    for seed in range(400):
        with seeded_randomness(seed):
            seen["ours"].append(box_seen(ours(path.read_bytes()), width, height))
        with seeded_randomness(10_000 + seed):
            seen["torchvision"].append(box_seen(theirs(original).permute(1, 2, 0), width, height))
    for index, name in ((0, "area"), (1, "aspect")):
        a = [s[index] for s in seen["ours"]]
        b = [s[index] for s in seen["torchvision"]]
        assert ks_2samp(a, b).pvalue > 0.01, name
        assert abs(np.mean(a) - np.mean(b)) < 0.05 * np.mean(b), name
    areas = [s[0] for s in seen["ours"]]
    assert 0.07 < min(areas) and max(areas) < 1.02  # scale (0.08, 1)
    aspects = [s[1] for s in seen["ours"]]
    assert 0.7 < min(aspects) and max(aspects) < 1.4  # ratio (3/4, 4/3)


def test_the_decoded_region_is_the_box_at_reduced_size_too(ramp_jpeg):
    """Boxes decoded at 1, 1/2 and 1/4 scale land where a full decode puts them."""
    path, width, height = ramp_jpeg
    full = torch.from_numpy(np.array(Image.open(path).convert("RGB")))
    for box in [(100, 200, 60, 70), (0, 0, 768, 1024), (50, 300, 300, 400), (10, 10, 700, 600)]:
        top, left, box_height, box_width = box
        fast = decode_region(path.read_bytes(), lambda h, w: box, OUT, "bilinear")
        reference = torch.nn.functional.interpolate(
            full[top:top + box_height, left:left + box_width].permute(2, 0, 1)[None].double(), size=(OUT, OUT),
            mode="bilinear", antialias=True)[0].permute(1, 2, 0)
        assert (fast.double() - reference).abs().mean() < 3, box  # grey levels out of 255


def test_files_libjpeg_turbo_does_not_take_go_through_pillow(tmp_path):
    image = Image.new("RGB", (120, 90), (200, 30, 90))
    for name, mode, fmt in (("png.JPEG", "RGB", "PNG"), ("cmyk.JPEG", "CMYK", "JPEG"), ("gray.JPEG", "L", "JPEG")):
        image.convert(mode).save(tmp_path / name, fmt)
        pixels = decode_region((tmp_path / name).read_bytes(), lambda h, w: (0, 0, h, w), 32, "bilinear")
        assert pixels.shape == (32, 32, 3) and pixels.dtype == torch.uint8
        expected = np.array(image.convert(mode).convert("RGB"))[0, 0]
        assert np.abs(pixels[16, 16].numpy().astype(int) - expected).max() < 12, name
    data = (tmp_path / "gray.JPEG").read_bytes()
    (tmp_path / "truncated.JPEG").write_bytes(data[: len(data) // 3])
    with pytest.raises(OSError):
        decode_region((tmp_path / "truncated.JPEG").read_bytes(), lambda h, w: (0, 0, h, w), 32, "bilinear")


def test_fast_training_is_reproducible_per_sample(tiny_imagenet):
    transform = train_transform(48, decode="fast")
    samples = [(str(p), 0) for p in sorted(tiny_imagenet.glob("train/*/*.JPEG"))[:5]]
    dataset = ImageDataset(samples, ["a"], transform, seed=3)
    first = [dataset[(2, i)][0] for i in range(5)]
    random.seed(1)
    torch.manual_seed(1)
    assert all(torch.equal(a, dataset[(2, i)][0]) for i, a in enumerate(first))
    assert not all(torch.equal(a, dataset[(3, i)][0]) for i, a in enumerate(first))


def test_fast_eval_crop_matches_the_exact_one_closely(tiny_imagenet):
    paths = sorted(tiny_imagenet.glob("val/*/*.JPEG"))
    exact, fast = eval_transform(64, 0.875), eval_transform(64, 0.875, decode="fast")
    assert isinstance(fast, FastCenterCrop)
    for path in paths:
        a, b = exact(path.read_bytes()).double(), fast(path.read_bytes()).double()
        assert a.shape == b.shape == (64, 64, 3)
        assert (a - b).abs().mean() < 8, path  # the box is whole source pixels: up to half a pixel off


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (nvJPEG)"))])
def test_device_decode_matches_the_cpu_path(tiny_imagenet, tmp_path, device):
    """The GPU decode path (with device=cpu its code runs through TorchCodec's CPU decoder):
    same crops and flips as the fast CPU path, nearly the same pixels; PNG and CMYK files
    travel decoded."""
    from data.batches import collate_batch
    from data.gpu_decode import EncodedBatch, decode_batch
    from data.transforms import DevicePreprocess

    paths = [str(p) for p in sorted(tiny_imagenet.glob("train/*/*.JPEG"))[:10]]
    Image.new("RGB", (90, 70), (10, 200, 30)).save(tmp_path / "png.JPEG", "PNG")
    Image.new("RGB", (90, 70), (10, 200, 30)).convert("CMYK").save(tmp_path / "cmyk.JPEG", "JPEG")
    paths += [str(tmp_path / "png.JPEG"), str(tmp_path / "cmyk.JPEG")]
    samples = [(p, 0) for p in paths]
    cpu = ImageDataset(samples, ["a"], train_transform(48, decode="fast", interpolation="random"), seed=5)
    gpu = ImageDataset(samples, ["a"], train_transform(48, decode="gpu", interpolation="random"), seed=5)
    encoded = collate_batch([gpu[(0, i)] for i in range(len(paths))])
    assert isinstance(encoded.images, EncodedBatch)
    def nvjpeg_takes(path):
        with Image.open(path) as image:
            return image.format == "JPEG" and image.mode != "CMYK"

    kinds = [length > 0 for length in encoded.images.lengths]
    assert kinds == [nvjpeg_takes(p) for p in paths]  # PNGs and CMYK JPEGs were decoded by the worker
    assert kinds[-2:] == [False, False] and sum(kinds) >= 8
    # The files travel as one tensor (one shared-memory handover, not one per image), whole.
    assert all(image.data is None for image in encoded.images.images)
    assert bytes(encoded.images.files.numpy()) == b"".join(Path(p).read_bytes() for p, kind in zip(paths, kinds) if kind)
    decoded, failed = decode_batch(encoded.images, torch.device(device))
    on_device = DevicePreprocess(torch.device(device), channels_last=True)(decoded).cpu()
    on_cpu = DevicePreprocess(torch.device("cpu"), channels_last=True)(
        collate_batch([cpu[(0, i)] for i in range(len(paths))]).images)
    assert on_device.shape == on_cpu.shape == (12, 3, 48, 48) and failed == {}
    difference = (on_device - on_cpu).abs().mean(dim=(1, 2, 3)) * 0.226 * 255  # back to grey levels
    assert difference.max() < 3, difference


def test_gpu_decode_falls_back_with_a_message(tiny_imagenet, caplog):
    from common.processes import DistContext
    from cspresnet.recipe import RecipeError
    from cspresnet.recipe_files import load_recipe
    from data.fast_decode import FastRandomResizedCrop
    from data.loaders import build_training_data

    recipe = load_recipe("demo.yaml", ["data.train_decode=gpu", "model.num_classes=3", "batch_size=8"],
                         data_dir=str(tiny_imagenet))
    data = build_training_data(recipe.data, recipe.batch_size, recipe.seed, DistContext.alone(torch.device("cpu")))
    assert type(data.train_set.transform) is FastRandomResizedCrop and data.train_decode == "fast"
    assert "data.train_decode=gpu but no CUDA GPU: decoding on the CPU workers (fast) instead" in caplog.text
    with pytest.raises(RecipeError, match="data.train_decode.*RandAugment"):
        load_recipe("cspresnet50_ra.yaml", ["data.train_decode=gpu"])


def test_a_truncated_jpeg_on_the_gpu_decode_path_is_skipped_and_counted_as_the_fast_path_counts_it(
        tiny_imagenet, tmp_path, monkeypatch):
    """Trained with data.train_decode=gpu through TorchCodec's CPU decoder (as a GPU would
    decode, with device=cpu): one file cut in half, one without its end marker. TorchCodec
    refuses both, and with them the batch; the fast path decodes the second."""
    import csv
    import shutil

    import data.transforms
    from tests.helpers import TINY_OVERRIDES, last_wins, train_here

    folder = shutil.copytree(tiny_imagenet, tmp_path / "data", ignore=shutil.ignore_patterns(".cspresnet_index"))

    def plain_jpeg(path):
        with Image.open(path) as image:
            return image.format == "JPEG" and image.mode == "RGB"

    half, no_end = [path for path in sorted(folder.glob("train/*/*.JPEG")) if plain_jpeg(path)][:2]
    half.write_bytes(half.read_bytes()[:half.stat().st_size // 2])
    no_end.write_bytes(no_end.read_bytes()[:-2])
    monkeypatch.setattr(data.transforms, "gpu_decode_available", lambda device: (True, ""))

    def unreadable_per_epoch(decode):
        output = tmp_path / decode
        result = train_here(["train.py", "--recipe", "demo.yaml", "--data-dir", folder, "--output", output,
                             *last_wins(*TINY_OVERRIDES, f"data.train_decode={decode}")])
        assert f"skipping unreadable image {half}" in result.stderr and str(no_end) not in result.stderr
        assert ("training JPEGs: nvJPEG on the device" in result.stdout) == (decode == "gpu")
        with open(output / "summary.csv", newline="") as handle:
            return [row["unreadable_images"] for row in csv.DictReader(handle)]

    assert unreadable_per_epoch("gpu") == unreadable_per_epoch("fast") == ["1", "1"]
