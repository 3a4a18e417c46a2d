"""Our evaluation transform (workers) + DevicePreprocess (device) against timm's own eval
transform for cspresnet50: the same float32 tensors, bit for bit."""
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from data.fast_decode import load_rgb
from data.transforms import DevicePreprocess, eval_resize_size, eval_transform


def ours(path, img_size, crop_pct, interpolation, channels_last=False):
    hwc = eval_transform(img_size, crop_pct, interpolation)(path.read_bytes())
    return DevicePreprocess(torch.device("cpu"), channels_last)(hwc[None])[0]


def test_timm_config_for_cspresnet50_is_the_recipe_default():
    config = resolve_data_config({}, model=timm.create_model("cspresnet50"))
    assert config["input_size"] == (3, 256, 256)
    assert (config["crop_pct"], config["interpolation"]) == (0.887, "bilinear")
    assert eval_resize_size(256, 0.887) == 288


@pytest.mark.parametrize("img_size, crop_pct, interpolation", [
    (256, 0.887, "bilinear"),  # cspresnet50's published setting
    (224, 0.875, "bicubic"),
    (64, 1.0, "bilinear"),
])
def test_same_tensors_as_timm(tiny_imagenet, img_size, crop_pct, interpolation):
    config = resolve_data_config({"input_size": (3, img_size, img_size), "crop_pct": crop_pct,
                                  "interpolation": interpolation}, model=timm.create_model("cspresnet50"))
    theirs = create_transform(**config, is_training=False)
    paths = sorted(tiny_imagenet.glob("val/*/*.JPEG")) + sorted(tiny_imagenet.glob("train/*/*.JPEG"))[:6]
    modes = set()
    for path in paths:
        with Image.open(path) as image:
            modes.add(image.mode)
        expected = theirs(load_rgb(path.read_bytes()))
        for channels_last in (False, True):
            got = ours(path, img_size, crop_pct, interpolation, channels_last)
            assert got.shape == expected.shape == (3, img_size, img_size)
            assert torch.equal(got, expected), path
    assert len(modes) >= 2  # the set mixes RGB with grayscale/CMYK files
