"""predict.py: one JSON line per image, with timm's evaluation transform of the checkpoint's
settings, class names from the checkpoint or from timm's ImageNet synsets, and unreadable
files reported without stopping the rest. Every run is predict.py's cli in this process."""
import json

import pytest
import timm
import torch
from timm.data import ImageDataset, create_transform

import predict
from cspresnet.model import build_model
from cspresnet.recipe import recipe_to_dict
from cspresnet.recipe_files import load_recipe
from data.sample_data import generate
from tests.helpers import in_this_process

CLASSES = ["cat", "dog", "fox"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Six images of three classes, ImageNet-like modes (a grayscale and a CMYK JPEG among them)."""
    return generate(tmp_path_factory.mktemp("images") / "set", num_classes=3, train_per_class=1, val_per_class=2,
                    min_size=60, max_size=120, seed=5) / "val"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, images):
    """One of our checkpoints with class names and a recipe that evaluates at 48 px, crop
    0.75, bicubic: predict.py must use those settings, not the defaults. The head's bias
    centres the logits on these images, so that the predicted class varies."""
    torch.manual_seed(0)
    model = build_model(3).eval()
    with torch.no_grad():
        model.head.fc.weight.normal_(0, 1.0)
        model.head.fc.bias -= model(timm_inputs(images)).mean(0)
    recipe = load_recipe("demo.yaml", ["data.eval_img_size=48", "data.eval_crop_pct=0.75",
                                       "data.eval_interpolation=bicubic", "model.num_classes=3"])
    path = tmp_path_factory.mktemp("run") / "best.pt"
    torch.save(dict(model=model.state_dict(), model_ema=None, classes=CLASSES, recipe=recipe_to_dict(recipe)), path)
    return path, model.state_dict()


def timm_inputs(folder):
    """The images as timm's evaluation transform at the checkpoint's settings gives them."""
    transform = create_transform(48, crop_pct=0.75, interpolation="bicubic", is_training=False)
    return torch.stack([image for image, _ in ImageDataset(str(folder), transform=transform)])


def run_predict(*args):
    result = in_this_process(predict.cli, *args, "--workers", "0")
    return result, [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_predictions_are_timms_on_the_checkpoints_evaluation_settings_with_its_class_names(images, checkpoint):
    path, state = checkpoint
    first = sorted((images / "n00000002").iterdir())[0]
    result, lines = run_predict("--checkpoint", path, "--top-k", "2", images, first)
    assert result.returncode == 0, result.stderr
    expected_paths = [str(p) for p in sorted(images.rglob("*.JPEG"))] + [str(first)]
    assert [line["image"] for line in lines] == expected_paths  # arguments in order, a folder sorted

    reference = timm.create_model("cspresnet50", num_classes=3).eval()
    reference.load_state_dict(state)
    with torch.no_grad():
        probabilities = reference(timm_inputs(images)).softmax(dim=1)
    for line, row in zip(lines, probabilities):
        top = row.topk(2)
        assert [entry["index"] for entry in line["top"]] == top.indices.tolist(), line["image"]
        assert [entry["probability"] for entry in line["top"]] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert [entry["class"] for entry in line["top"]] == [CLASSES[i] for i in top.indices.tolist()]
        assert [entry["name"] for entry in line["top"]] == [entry["class"] for entry in line["top"]]
    assert len({line["top"][0]["index"] for line in lines}) > 1  # not one class for every image


def test_a_1000_class_checkpoint_without_names_gets_timms_imagenet_synsets(images, tmp_path):
    model = build_model(1000)
    with torch.no_grad():
        model.head.fc.weight.zero_()
        model.head.fc.bias.zero_()
        model.head.fc.bias[1] = 20.0  # every image: goldfish, p = 1 - 999 e^-20
    path = tmp_path / "cspresnet50_like_timm.pth"
    torch.save(model.state_dict(), path)  # as timm saves its official weights: a plain state dict
    result, lines = run_predict("--checkpoint", path, "--top-k", "1", images / "n00000000")
    assert result.returncode == 0, result.stderr
    assert len(lines) == 2
    assert all(line["top"] == [dict(index=1, probability=pytest.approx(1.0, abs=1e-3), **{
        "class": "n01443537", "name": "goldfish, Carassius auratus"})] for line in lines), lines


def test_an_unreadable_file_gets_an_error_line_and_the_rest_go_on(images, checkpoint, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    good = sorted((images / "n00000001").iterdir())[0]
    result, lines = run_predict("--checkpoint", checkpoint[0], good, bad, good)
    assert result.returncode == 0, result.stderr
    assert [line["image"] for line in lines] == [str(good), str(bad), str(good)]
    assert "top" in lines[0] and "top" in lines[2] and lines[0] == lines[2]
    assert "error" in lines[1] and "top" not in lines[1] and lines[1]["error"].startswith("UnidentifiedImageError: ")
    assert f"warning: skipping unreadable image {bad}" in result.stderr


@pytest.mark.parametrize("arguments, message", [
    (["only_bad"], "error: none of the 1 images could be read"),
    (["missing.jpg"], "missing.jpg: no such file or folder"),
    (["empty_folder"], "error: no image files (.jpeg, "),
])
def test_bad_input_exits_2_with_one_error_line(checkpoint, tmp_path, arguments, message):
    (tmp_path / "only_bad").mkdir()
    (tmp_path / "only_bad" / "a.jpg").write_bytes(b"\xff\xd8 truncated")
    (tmp_path / "empty_folder").mkdir()
    result, _ = run_predict("--checkpoint", checkpoint[0], *[tmp_path / a for a in arguments])
    assert result.returncode == 2
    assert message in result.stderr.strip().splitlines()[-1] and "Traceback" not in result.stderr
