"""validate.py against timm's own evaluation, on every checkpoint form and dataset layout."""
import csv
import hashlib
import io
import json
import os
import random
import shutil
import tarfile

import numpy as np
import pytest
import timm
import torch
import torchvision.datasets.imagenet as tv_imagenet
from PIL import Image
from safetensors.torch import save_file
from timm.data import ImageDataset, RealLabelsImagenet, create_transform, resolve_data_config

from benchmarks.common import stand_in_timm_model
from cspresnet.export import export_for_timm
from cspresnet.reports import TIMM_RESULTS_COLUMNS, load_real_labels, real_accuracy
from common.errors import DatasetLayoutError
from data.sample_data import generate
from data.downloads import arrange_by_class
from data.sources import evaluation_set
import validate
from tests.helpers import in_this_process, run_cli, torchrun


@pytest.fixture(scope="module")
def val_images(tmp_path_factory):
    """30 validation images in class folders (3 classes), ImageNet-like sizes and modes."""
    return generate(tmp_path_factory.mktemp("val") / "set", num_classes=3, train_per_class=1, val_per_class=10,
                    min_size=80, max_size=300, seed=7)


@pytest.fixture(scope="module")
def weights(tmp_path_factory, val_images):
    """Saved as timm's official .pth is: a plain state dict. The head's bias centres the
    logits on these images, so that the predicted class varies from image to image."""
    model = stand_in_timm_model(3)
    transform = create_transform(**resolve_data_config({}, model=model), is_training=False)
    images = torch.stack([image for image, _ in ImageDataset(str(val_images / "val"), transform=transform)])
    with torch.no_grad():
        mean_logits = model(images).mean(0)
        model.head.fc.bias -= mean_logits
    path = tmp_path_factory.mktemp("weights") / "cspresnet50_like_timm.pth"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.fixture(scope="module")
def timm_reference(val_images, weights):
    """timm's own pipeline: its transform from the model's pretrained config, its dataset."""
    model, _ = weights
    transform = create_transform(**resolve_data_config({}, model=model), is_training=False)
    dataset = ImageDataset(str(val_images / "val"), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=16)
    with torch.no_grad():
        logits = torch.cat([model(images) for images, _ in loader])
    targets = torch.tensor([target for _, target in dataset.reader.samples])
    paths = [str(p) for p in dataset.filenames(absolute=True)]
    return dict(zip(paths, zip(logits, targets)))


def run_validate(*args, launcher=None):
    """validate.py under `launcher` (torchrun), or its main in this process."""
    args = ("--workers", "0", "--batch-size", "16", *args)
    if launcher is None:
        return validate.main([str(a) for a in args])
    return json.loads(run_cli([*launcher, "validate.py", *args]).stdout.strip().splitlines()[-1])


def run_validate_small(*args):
    """validate.py's main in this process at 64 px, for the tests about formats and layouts
    rather than numerics or the command line (no start-up: seconds, not ten per call)."""
    return validate.main([str(a) for a in ("--workers", "0", "--img-size", "64", *args)])


def compare_with_timm(logits_file, reference):
    saved = torch.load(logits_file, weights_only=True)
    assert sorted(saved["paths"]) == sorted(reference)
    worst = 0.0
    for path, logits, target in zip(saved["paths"], saved["logits"], saved["targets"]):
        expected, expected_target = reference[path]
        worst = max(worst, ((logits - expected).abs().max() / expected.abs().max()).item())
        assert int(target) == int(expected_target), path  # the same class mapping
        assert torch.equal(logits.topk(3).indices, expected.topk(3).indices), path  # same top-1..top-3
    scale = max(expected.abs().max().item() for expected, _ in reference.values())
    assert worst < 1e-4 * scale, (worst, scale)  # float32 rounding, summed over ~50 layers
    return worst, scale


@pytest.mark.parametrize("mode", ["fp32", "channels_last", pytest.param("torchrun_2", marks=pytest.mark.slow)])
def test_same_predictions_as_timm(val_images, weights, timm_reference, tmp_path, mode):
    logits_file = tmp_path / "logits.pt"
    extra = ["--channels-last"] if mode == "channels_last" else []
    launcher = torchrun(2) if mode == "torchrun_2" else None
    result = run_validate("--checkpoint", weights[1], "--data-dir", val_images, "--logits-file", logits_file,
                          *extra, launcher=launcher)
    worst, scale = compare_with_timm(logits_file, timm_reference)
    reference = list(timm_reference.values())
    assert len({int(logits.argmax()) for logits, _ in reference}) == 3  # every class gets predicted
    expected_top1 = 100 * sum(int(l.argmax() == t) for l, t in reference) / len(reference)
    assert result["images"] == 30 and result["top1"] == round(expected_top1, 3)
    assert (result["img_size"], result["crop_pct"], result["interpolation"]) == (256, 0.887, "bilinear")
    print(f"{mode}: max |logit difference| against timm {worst:.3g} (largest |logit| {scale:.3g}), "
          f"top-1 {result['top1']}, all 30 top-1/top-3 predictions equal")


def test_every_checkpoint_form_gives_the_same_result(val_images, weights, tmp_path):
    model, pth = weights
    state = model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pth")
    other = stand_in_timm_model(3, seed=1).state_dict()
    torch.save({"model": other, "model_ema": state, "epoch": 3, "step": 9}, tmp_path / "last.pt")

    baseline = run_validate_small("--checkpoint", pth, "--data-dir", val_images)
    for name in ("model.safetensors", "ddp.pth", "last.pt"):
        result = run_validate_small("--checkpoint", tmp_path / name, "--data-dir", val_images)
        assert (result["top1"], result["top5"], result["eval_loss"]) == \
               (baseline["top1"], baseline["top5"], baseline["eval_loss"]), name
        assert result["weights"] == ("ema" if name == "last.pt" else "model")
    raw = run_validate_small("--checkpoint", tmp_path / "last.pt", "--data-dir", val_images, "--weights", "model")
    assert raw["weights"] == "model" and raw["eval_loss"] != baseline["eval_loss"]


@pytest.mark.parametrize("breakage, message", [
    ("resnet", "missing keys: 332"),
    ("truncated", "not a readable PyTorch checkpoint"),
    ("pickle", "refusing to load"),
])
def test_bad_checkpoints_give_one_clear_line(val_images, weights, tmp_path, breakage, message):
    path = tmp_path / "bad.pth"
    if breakage == "resnet":
        torch.save(timm.create_model("resnet18", num_classes=3).state_dict(), path)
    elif breakage == "truncated":
        path.write_bytes(weights[1].read_bytes()[:1000])
    else:
        torch.save({"model": weights[0].state_dict(), "extra": io.StringIO("x")}, path)
    assert_one_error_line(validate_cli("--checkpoint", path, "--data-dir", val_images), message)


def assert_one_error_line(result, message):
    """Exit code 2, the last line of stderr is `error: ...` naming the problem, no traceback."""
    last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert last.startswith("error: ") and message in last, last
    assert "Traceback" not in result.stderr


def validate_cli(*args):
    """validate.py's command line, in this process (its exit code and output)."""
    return in_this_process(validate.cli, "--workers", "0", "--img-size", "64", *args)


@pytest.mark.parametrize("breakage, message", [
    ("checkpoint", "not a readable PyTorch checkpoint"),
    ("data", "does not exist or is not a folder"),
    ("empty_class", "missing or empty folders"),  # data.sources.folders's message, with its multi-line layout hint
    ("recipe", "recipe key 'optim.lr' must be > 0"),
])
def test_bad_input_exits_2_with_one_error_line(val_images, weights, tmp_path, breakage, message):
    checkpoint, data = tmp_path / "w.pth", val_images
    if breakage == "checkpoint":
        checkpoint.write_bytes(weights[1].read_bytes()[:1000])
    elif breakage in ("data", "empty_class"):
        shutil.copy(weights[1], checkpoint)
        data = tmp_path / "missing"
        if breakage == "empty_class":
            shutil.copytree(val_images / "val", data)
            for image in (data / "n00000001").iterdir():
                image.unlink()
    else:  # a training checkpoint whose stored recipe is impossible
        torch.save({"model": weights[0].state_dict(), "recipe": {"optim": {"lr": -1.0}}}, checkpoint)
    assert_one_error_line(validate_cli("--checkpoint", checkpoint, "--data-dir", data), message)


@pytest.mark.parametrize("option", ["--results-file", "--results-csv", "--logits-file"])
def test_an_output_file_in_a_missing_folder_is_refused_before_anything_else(val_images, tmp_path, option):
    """The checkpoint does not exist either: the output folder is checked first, before any real work."""
    target = tmp_path / "no" / "such" / "folder" / "out"
    result = validate_cli("--checkpoint", tmp_path / "missing.pth", "--data-dir", val_images, option, target)
    assert_one_error_line(result, f"{option} {target}: its folder {target.parent} does not exist")


def test_a_set_with_no_decodable_image_is_an_error(val_images, weights, tmp_path):
    folder = tmp_path / "set"
    shutil.copytree(val_images / "val", folder)
    images = sorted(folder.glob("*/*.JPEG"))
    assert len(images) == 30
    images[0].write_bytes(b"not a JPEG at all")
    partly = run_validate_small("--checkpoint", weights[1], "--data-dir", folder)  # some unreadable: evaluates
    assert (partly["images"], partly["unreadable"]) == (29, 1)

    for image in images:
        image.write_bytes(b"not a JPEG at all")
    result = validate_cli("--checkpoint", weights[1], "--data-dir", folder)
    assert_one_error_line(result, f"error: none of the 30 images in {folder} could be decoded (e.g. {images[0]}: ")
    assert not [line for line in result.stdout.splitlines() if line.startswith("{")]  # no JSON result line


def test_a_dataset_root_without_the_split_is_refused(val_images, weights, tmp_path):
    root = tmp_path / "imagenet"
    shutil.copytree(val_images / "train", root / "train")  # train/ but no val/
    result = validate_cli("--checkpoint", weights[1], "--data-dir", root)
    assert_one_error_line(result, f"{root} has no val/ folder (it has train/): pass the evaluation folder "
                                  "itself, or --split NAME")
    evaluated = run_validate_small("--checkpoint", weights[1], "--data-dir", root, "--split", "train")
    assert evaluated["images"] == 3 and evaluated["layout"] == "class-folders"


def test_export_loads_in_timm(weights, tmp_path, val_images):
    model, _ = weights
    torch.save({"model": model.state_dict(), "classes": ["n00000000", "n00000001", "n00000002"],
                "recipe": None}, tmp_path / "best.pt")
    exported = export_for_timm(tmp_path / "best.pt", tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["architecture"] == "cspresnet50" and config["num_classes"] == 3
    assert config["label_names"] == ["n00000000", "n00000001", "n00000002"]
    assert config["pretrained_cfg"]["crop_pct"] == 0.887 and config["pretrained_cfg"]["interpolation"] == "bilinear"
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        expected = model(x)
        for loaded in (timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True),
                       timm.create_model("cspresnet50", pretrained=True, num_classes=3,
                                         pretrained_cfg_overlay=dict(file=str(exported), num_classes=3))):
            assert torch.equal(loaded.eval()(x), expected)


# ----------------------------------------------------------------------------- layouts


def fake_devkit(folder, wnids, val_wnids):
    """A devkit archive like ILSVRC2012_devkit_t12.tar.gz: meta.mat lists the synsets with
    their ILSVRC2012 IDs (here in reverse-sorted order, as the real one is not sorted
    either), plus one non-leaf synset; the ground truth holds IDs."""
    import scipy.io

    ids = {wnid: i + 1 for i, wnid in enumerate(sorted(wnids, reverse=True))}
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O")]
    synsets = np.array([(ids[w], w, f"thing {w}", "", 0) for w in sorted(wnids, reverse=True)]
                       + [(len(wnids) + 1, "n99999999", "parent", "", 2)], dtype=dtype)
    root = folder / "devkit_src" / "ILSVRC2012_devkit_t12" / "data"
    root.mkdir(parents=True)
    scipy.io.savemat(root / "meta.mat", {"synsets": synsets})
    (root / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ids[w]}\n" for w in val_wnids))
    archive = folder / "ILSVRC2012_devkit_t12.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder / "devkit_src" / "ILSVRC2012_devkit_t12", arcname="ILSVRC2012_devkit_t12")
    return archive


@pytest.fixture()
def flat_val(val_images, tmp_path, monkeypatch):
    """The same 30 images as a flat folder of ILSVRC2012_val_*.JPEG, in shuffled order,
    with a devkit archive (its md5 registered as torchvision's) and a Kaggle solution file."""
    class_folders = evaluation_set(val_images / "val")
    order = list(range(len(class_folders.samples)))
    random.Random(0).shuffle(order)
    flat = tmp_path / "flat"
    flat.mkdir()
    val_wnids = []
    for number, i in enumerate(order, start=1):
        path, label = class_folders.samples[i]
        shutil.copy(path, flat / f"ILSVRC2012_val_{number:08d}.JPEG")
        val_wnids.append(class_folders.classes[label])
    archive = fake_devkit(tmp_path, class_folders.classes, val_wnids)
    monkeypatch.setitem(tv_imagenet.ARCHIVE_META, "devkit",
                        (archive.name, hashlib.md5(archive.read_bytes()).hexdigest()))
    with open(tmp_path / "LOC_val_solution.csv", "w") as handle:
        handle.write("ImageId,PredictionString\n")
        for number, wnid in enumerate(val_wnids, start=1):
            handle.write(f"ILSVRC2012_val_{number:08d},{wnid} 1 2 30 40 {wnid} 5 6 70 80\n")
    return flat, archive, tmp_path / "LOC_val_solution.csv", class_folders


def labels_by_image(eval_set, names):
    """{image content hash: class name}: the same picture must get the same class."""
    return {hashlib.md5(open(p, "rb").read()).hexdigest(): names[label] for p, label in eval_set.samples}


def test_devkit_ids_follow_meta_mat_not_sorted_order(flat_val):
    flat, archive, _, class_folders = flat_val
    devkit = evaluation_set(flat, label_file=archive)
    assert devkit.layout == "flat-devkit" and devkit.classes == class_folders.classes
    assert labels_by_image(devkit, devkit.classes) == labels_by_image(class_folders, class_folders.classes)


def test_kaggle_solution_labels(flat_val):
    flat, _, solution, class_folders = flat_val
    kaggle = evaluation_set(flat, label_file=solution)
    assert kaggle.layout == "flat-kaggle"
    assert labels_by_image(kaggle, kaggle.classes) == labels_by_image(class_folders, class_folders.classes)


def test_flat_folder_without_labels_says_what_it_needs(flat_val, tmp_path):
    lonely = tmp_path / "lonely" / "flat"  # no devkit or solution file beside it
    shutil.copytree(flat_val[0], lonely)
    with pytest.raises(DatasetLayoutError, match="--devkit ILSVRC2012_devkit_t12.tar.gz .* --val-solution"):
        evaluation_set(lonely)


@pytest.mark.parametrize("symlinks", [False, True])
def test_arrange_links_into_class_folders(flat_val, tmp_path, symlinks):
    flat, archive, _, class_folders = flat_val
    out = tmp_path / ("sym" if symlinks else "hard")
    assert arrange_by_class(flat, archive, out, symlinks=symlinks) == 30
    arranged = evaluation_set(out)
    assert arranged.layout == "class-folders" and arranged.classes == class_folders.classes
    assert labels_by_image(arranged, arranged.classes) == labels_by_image(class_folders, class_folders.classes)
    first = next((out / arranged.classes[0]).iterdir())
    assert first.is_symlink() == symlinks
    if not symlinks:
        assert os.stat(first).st_ino == os.stat(flat / first.name).st_ino  # no copy


def test_validate_on_flat_layouts_matches_class_folders(flat_val, weights, tmp_path):
    flat, archive, solution, class_folders = flat_val
    tv_imagenet.parse_devkit_archive(str(archive.parent), archive.name)  # torchvision writes meta.bin
    baseline = run_validate_small("--checkpoint", weights[1], "--data-dir", class_folders.samples[0][0].rsplit("/", 2)[0])
    for labels in (["--devkit", archive.parent / "meta.bin"], ["--val-solution", solution], []):
        result = run_validate_small("--checkpoint", weights[1], "--data-dir", flat, *labels)
        assert (result["top1"], result["top5"], result["images"]) == (baseline["top1"], baseline["top5"], 30)
        assert result["layout"] in ("flat-devkit", "flat-kaggle")


def test_imagenetv2_folders_are_numbers_not_strings(tmp_path):
    for label in range(12):
        (tmp_path / str(label)).mkdir()
        Image.new("RGB", (8, 8), (label, 0, 0)).save(tmp_path / str(label) / "a.jpeg")
    v2 = evaluation_set(tmp_path)
    assert v2.layout == "imagenetv2" and v2.classes[:3] == ["0", "1", "2"]
    assert {p.split("/")[-2]: label for p, label in v2.samples}["10"] == 10  # string order would say 2
    shutil.rmtree(tmp_path / "5")
    with pytest.raises(DatasetLayoutError, match="must be 0..10"):
        evaluation_set(tmp_path)


# ----------------------------------------------------------------------------- reports


def test_real_labels_match_timm():
    real = load_real_labels()
    assert len(real) == 50_000
    filenames = [f"/x/ILSVRC2012_val_{i + 1:08d}.JPEG" for i in range(50_000)]
    generator = torch.Generator().manual_seed(0)
    # Predictions that are right often enough to make the comparison meaningful.
    truth = torch.tensor([labels[0] if labels else 0 for labels in real])
    logits = torch.randn(50_000, 1000, generator=generator)
    logits[torch.arange(50_000), truth] += torch.rand(50_000, generator=generator) * 6
    ours = real_accuracy(logits.topk(5).indices, filenames, real)
    theirs = RealLabelsImagenet(filenames)
    for start in range(0, 50_000, 5000):
        theirs.add_result(logits[start:start + 5000])
    assert ours["real_top1"] == pytest.approx(theirs.get_accuracy(1), abs=1e-9)
    assert ours["real_top5"] == pytest.approx(theirs.get_accuracy(5), abs=1e-9)
    assert 30 < ours["real_top1"] < 95 and ours["real_images"] == sum(1 for r in real if r)


def test_results_file_csv_row_and_real_labels_end_to_end(tmp_path, monkeypatch):
    """A 1000-class model on ten images named as ImageNet's: ReaL, per-class, timm's CSV."""
    wnids = [f"n{i:08d}" for i in range(1000)]
    real = load_real_labels()
    flat = tmp_path / "val"
    flat.mkdir()
    for number in range(1, 11):
        Image.new("RGB", (300, 200), (number * 20, 100, 50)).save(flat / f"ILSVRC2012_val_{number:08d}.JPEG")
    archive = fake_devkit(tmp_path, wnids, [wnids[real[n - 1][0] if real[n - 1] else 0] for n in range(1, 11)])
    monkeypatch.setitem(tv_imagenet.ARCHIVE_META, "devkit", (archive.name, hashlib.md5(archive.read_bytes()).hexdigest()))
    tv_imagenet.parse_devkit_archive(str(tmp_path), archive.name)
    torch.save(stand_in_timm_model(1000).state_dict(), tmp_path / "w.pth")
    result = run_validate_small("--checkpoint", tmp_path / "w.pth", "--data-dir", flat, "--devkit", tmp_path / "meta.bin",
                          "--real-labels", "--results-file", tmp_path / "r.json", "--results-csv", tmp_path / "r.csv",
                          "--logits-file", tmp_path / "logits.pt", "--name", "cspresnet50.test")
    saved = torch.load(tmp_path / "logits.pt", weights_only=True)
    expected = real_accuracy(saved["logits"].topk(5).indices, saved["paths"])
    assert result["real_top1"] == round(expected["real_top1"], 3) and result["real_images"] == expected["real_images"]
    full = json.loads((tmp_path / "r.json").read_text())
    assert len(full["per_class_top1"]) == 1000 and list(full["per_class_top1"])[:2] == wnids[:2]
    with open(tmp_path / "r.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == TIMM_RESULTS_COLUMNS
    assert rows[0]["model"] == "cspresnet50.test" and rows[0]["param_count"] == "21.62"
    assert float(rows[0]["top1"]) + float(rows[0]["top1_err"]) == pytest.approx(100)
