"""ImageNet as downloaded: the official ILSVRC2012 archives and Kaggle's download, zipped or
not, read as they are; the same samples, bytes, weights and validation as class folders,
the cached index, and a message for each kind of bad archive."""
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import tarfile
import time

import pytest
import torch
import torchvision.datasets.imagenet as tv_imagenet

import data.downloads
import train
import validate
from benchmarks.common import stand_in_timm_model
from cspresnet.checkpoint import load_checkpoint
from cspresnet.run_folder import RunFolder
from data.sources import archives
from data.config import DataConfig
from common.errors import DatasetLayoutError
from data.loaders import build_splits
from data.pack_shards import pack
from data.transforms import eval_transform
from benchmarks.archives import tar_bytes, write_train_archive
from tests.archive_helpers import kaggle_tree, kaggle_zip, official_archives, val_names
from tests.helpers import (TINY_OVERRIDES, PrivateMount, in_this_process, last_wins, module_in_this_process, read_until, start,
                           train_here)
from tests.test_sample_index import aged
from tests.test_validate import assert_one_error_line, fake_devkit

TRAIN, VAL, DEVKIT = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"
IDENTITY = eval_transform(32, 0.875)


@pytest.fixture(scope="module")
def downloads(tiny_imagenet, tmp_path_factory):
    """tiny_imagenet as each download: the archives with the devkit, with Kaggle's CSV, and
    Kaggle's tree unzipped and zipped."""
    root = tmp_path_factory.mktemp("downloads")
    top = kaggle_tree(tiny_imagenet, root / "kaggle")
    zipped = kaggle_zip(top, root / "zip" / "imagenet-object-localization-challenge.zip")
    return dict(archives=official_archives(tiny_imagenet, root / "archives"),
                archives_csv=official_archives(tiny_imagenet, root / "archives_csv", labels="csv", seed=1),
                kaggle=top, kaggle_data=top / "ILSVRC" / "Data" / "CLS-LOC", zip=zipped, zip_folder=zipped.parent)


@pytest.fixture(autouse=True)
def our_devkit(downloads, monkeypatch):
    """torchvision checks the devkit's md5: the generated one's stands in for the real one's."""
    registered = {}
    for folder in downloads.values():
        if (folder / DEVKIT).is_file():
            registered = (DEVKIT, hashlib.md5((folder / DEVKIT).read_bytes()).hexdigest())
    monkeypatch.setitem(tv_imagenet.ARCHIVE_META, "devkit", registered)


def splits(folder, **settings):
    return build_splits(DataConfig(dir=str(folder), **settings), IDENTITY, IDENTITY, 0)


def names(dataset):
    return [(os.path.basename(path), target) for path, target in dataset.samples]


def fresh_copy(source, folder):
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns(".cspresnet_index"))
    return folder


# ----------------------------------------------------------------------------- the same samples and bytes


def test_every_download_gives_the_class_folders_samples_in_their_order_with_the_same_bytes(tiny_imagenet, downloads):
    """The PNG behind a .JPEG name and the CMYK JPEGs of the generated set included."""
    train, val = splits(tiny_imagenet)
    for kind, folder in downloads.items():
        got_train, got_val = splits(folder)
        assert got_train.classes == got_val.classes == train.classes, kind
        assert names(got_train) == names(train) and [t for _, t in got_val.samples] == [t for _, t in val.samples]
        assert got_train.samples.fingerprint() == train.samples.fingerprint(), kind  # a resume across them is exact
        assert all(got_train.read(i) == train.read(i) for i in range(len(train))), kind
        assert all(got_val.read(i) == val.read(i) for i in range(len(val))), kind
        assert all(got[i][3] is None for got in (got_train, got_val) for i in range(len(got))), kind  # all decode
    assert open(tiny_imagenet / "train" / train.samples[0][0].split("/train/")[1], "rb").read(4) == b"\x89PNG"
    assert [layout(folder) for folder in downloads.values()] == \
           ["archives", "archives", "kaggle", "kaggle", "kaggle-zip", "kaggle-zip"]
    read_as = {kind: (index.kind, bool(index.arrays and (index.arrays["method"] == 8).any())) for kind, name in
               (("archives", "archives"), ("zip", "kaggle"), ("kaggle", "kaggle"))
               for index in [splits(downloads[kind], layout=name)[0].samples]}
    assert read_as == {"archives": ("members", False), "zip": ("members", True), "kaggle": ("files", False)}


def layout(folder):
    from data.sources import source_of

    return source_of(folder).layout


def test_the_official_counts_are_stated_and_a_difference_is_named(downloads, caplog):
    with caplog.at_level("INFO", logger="data"):
        splits(downloads["archives"])
    assert "hold 3 classes, not 1,000 (-997); 24 train images, not 1,281,167 (-1,281,143); 15 validation images, " \
           "not 50,000 (-49,985): not ImageNet's official counts" in caplog.text


# ----------------------------------------------------------------------------- the index


def test_the_index_is_built_once_and_again_when_an_archive_changes(tiny_imagenet, downloads, tmp_path, monkeypatch):
    folder = fresh_copy(downloads["archives"], tmp_path / "archives")
    scanned = []
    real_scan = archives.scan_train
    monkeypatch.setattr(archives, "scan_train", lambda *a: scanned.append(a[0].name) or real_scan(*a))
    first = splits(folder)[0]
    assert scanned == [TRAIN] and (folder / ".cspresnet_index" / "archives-train.idx").is_file()
    assert names(splits(folder)[0]) == names(first) and scanned == [TRAIN]  # from the cache
    changed = folder / TRAIN
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    assert names(splits(folder)[0]) == names(first) and scanned == [TRAIN, TRAIN]
    # Another archive of the same size copied over it, keeping its times (cp --preserve=timestamps)
    other = write_train_archive(tiny_imagenet / "train", tmp_path / "other.tar", seed=7)
    assert other.stat().st_size == changed.stat().st_size and other.read_bytes() != changed.read_bytes()
    kept = changed.stat()
    shutil.copyfile(other, changed)
    os.utime(changed, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    again, folders = splits(folder)[0], splits(tiny_imagenet)[0]
    assert scanned == [TRAIN] * 3 and all(again.read(i) == folders.read(i) for i in range(len(folders)))
    os.chmod(folder, 0o555)  # read-only: data.index_dir holds it
    try:
        elsewhere = splits(folder, index_dir=str(tmp_path / "cache"))[0]
    finally:
        os.chmod(folder, 0o755)
    assert names(elsewhere) == names(first) and any((tmp_path / "cache").rglob("archives-train.idx"))


def test_the_same_data_named_by_a_relative_path_then_an_absolute_one_is_indexed_once(tiny_imagenet, downloads,
                                                                                       tmp_path, monkeypatch, caplog):
    fresh_copy(downloads["archives"], tmp_path / "archives")
    aged(fresh_copy(tiny_imagenet, tmp_path / "folders"))  # a folder changed just before its listing is listed again
    monkeypatch.chdir(tmp_path)
    for name in ("archives", "folders"):
        splits(name)
        caplog.clear()
        with caplog.at_level("INFO", logger="data"):
            splits(tmp_path / name)
        assert "samples read from" in caplog.text and "indexing" not in caplog.text, (name, caplog.text)


# ----------------------------------------------------------------------------- bad archives


def rewrite_train(folder, change):
    """The train archive rewritten with change(members) applied to its (name, bytes) members."""
    with tarfile.open(folder / TRAIN) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    (folder / TRAIN).write_bytes(tar_bytes(change(members)))


def reasons(dataset):
    return {path.split(".tar/")[1]: dataset[i][3] for i, (path, _) in enumerate(dataset.samples) if dataset[i][3]}


def test_a_truncated_train_archive_is_named_and_its_lost_images_counted(downloads, tmp_path, caplog):
    folder = fresh_copy(downloads["archives"], tmp_path / "archives")
    whole = (folder / TRAIN).read_bytes()
    with tarfile.open(folder / TRAIN) as tar:
        first, second = tar.getmembers()[:2]
    cut = second.offset_data + second.size // 2
    (folder / TRAIN).write_bytes(whole[:cut])  # inside the second class's tar
    with caplog.at_level("WARNING", logger="data"):
        train = splits(folder)[0]
    assert f"{TRAIN} is cut short or damaged at byte {cut}" in caplog.text
    lost = reasons(train)
    third = next(wnid for wnid in train.classes if wnid + ".tar" not in (first.name, second.name))
    assert lost[f"{third}/{third}.tar"] == f"UnreadableSample: lost: {TRAIN} is cut short at byte {cut}"
    assert any(f"cut short: {TRAIN} ends at byte" in reason for reason in lost.values())
    assert "cannot be read and will be skipped and counted as unreadable" in caplog.text


def test_a_train_archive_cut_short_stops_the_run_in_one_line_naming_the_classes_it_lost(downloads, tmp_path):
    """As an interrupted download leaves it (here inside the second of 3 class tars): whole
    classes gone, the run refused before any training (counting each lost class as one
    unreadable sample let it train on)."""
    folder = fresh_copy(downloads["archives"], tmp_path / "archives")
    with tarfile.open(folder / TRAIN) as tar:
        second = tar.getmembers()[1]
    os.truncate(folder / TRAIN, second.offset_data + second.size // 2)
    result = in_this_process(train.main, "--recipe", "demo.yaml", "--data-dir", folder, "--output", tmp_path / "run",
                             *TINY_OVERRIDES)
    assert_one_error_line(result, "1 of the 3 classes of the training set have no image that can be read (n")
    assert f"lost: {TRAIN} is cut short at byte" in result.stderr and "download it again" in result.stderr
    assert result.returncode == 2 and not (tmp_path / "run" / "status").exists()


def test_a_class_tar_that_is_not_a_tar_loses_its_class_and_is_counted(downloads, tmp_path):
    folder = fresh_copy(downloads["archives"], tmp_path / "archives")
    rewrite_train(folder, lambda members: [(name, b"<html>503</html>" * 40 if i == 0 else data)
                                           for i, (name, data) in enumerate(members)])
    train = splits(folder)[0]
    (bad, reason), = reasons(train).items()
    assert re.fullmatch(r"(n\d+)/\1\.tar", bad) and f"in {TRAIN} is not a tar archive" in reason
    assert len(train) == 24 - 8 + 1


def test_missing_or_wrong_labels_stop_at_once_in_one_line(downloads, tmp_path):
    folder = fresh_copy(downloads["archives"], tmp_path / "archives")
    (folder / DEVKIT).unlink()
    with pytest.raises(DatasetLayoutError, match=f"has no labels for {VAL}: put {DEVKIT} .or Kaggle's "
                                                 "LOC_val_solution.csv. beside it"):
        splits(folder)
    torch.save(stand_in_timm_model(3).state_dict(), tmp_path / "w.pth")
    assert_one_error_line(in_this_process(validate.cli, "--checkpoint", tmp_path / "w.pth", "--data-dir", folder),
                          f"has no labels for {VAL}")


def test_a_devkit_whose_ground_truth_has_the_wrong_length_stops_in_one_line(tiny_imagenet, downloads, tmp_path,
                                                                            monkeypatch):
    folder = fresh_copy(downloads["archives"], tmp_path / "archives")
    ordered = [wnid for _, wnid, _ in sorted(val_names(tiny_imagenet), key=lambda row: row[2])]
    short = fake_devkit(tmp_path / "short", sorted(set(ordered)), ordered[:13])
    monkeypatch.setitem(tv_imagenet.ARCHIVE_META, "devkit", (DEVKIT, hashlib.md5(short.read_bytes()).hexdigest()))
    shutil.copy(short, folder / DEVKIT)
    with pytest.raises(DatasetLayoutError, match=f"{DEVKIT} labels 13 images but {VAL} holds 15, 2 of them without "
                                                 f"a label .e.g. ILSVRC2012_val_00000014.JPEG.: its ground truth"):
        splits(folder)


def test_a_validation_archive_missing_an_image_counts_it_as_unreadable(downloads, tmp_path, caplog):
    folder = fresh_copy(downloads["archives"], tmp_path / "archives")
    with tarfile.open(folder / VAL) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    gone = sorted(name for name, _ in members)[4]
    (folder / VAL).write_bytes(tar_bytes([(name, data) for name, data in members if name != gone]))
    with caplog.at_level("WARNING", logger="data"):
        val = splits(folder)[1]
    assert f"lacks 1 of the 15 images that {DEVKIT} labels, e.g. {gone}" in caplog.text
    (path, reason), = reasons(val).items()
    assert path.endswith(gone) and reason == f"UnreadableSample: missing: {VAL} holds no {gone}"


def test_a_damaged_zip_member_is_named_and_counted_and_a_cut_zip_stops_in_one_line(downloads, tmp_path):
    zipped = tmp_path / downloads["zip"].name
    shutil.copy(downloads["zip"], zipped)
    train = splits(zipped)[0]
    deflated = next(i for i in range(len(train)) if train.samples.arrays["method"][i] == 8)
    whole = zipped.read_bytes()
    start = int(train.samples.arrays["offset"][deflated])
    zipped.write_bytes(whole[:start] + bytes(64) + whole[start + 64:])  # same size and time; indexed again (ctime)
    os.utime(zipped, ns=(train.samples.identities[0][1], train.samples.identities[0][1]))
    assert "do not inflate" in splits(zipped)[0][deflated][3]
    zipped.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(DatasetLayoutError, match="cannot be read as a zip .*: download it again"):
        splits(zipped)


def test_a_flat_val_folder_without_labels_names_what_to_add_and_the_command(downloads, tmp_path):
    top = fresh_copy(downloads["kaggle"], tmp_path / "kaggle")
    (top / "LOC_val_solution.csv").unlink()
    with pytest.raises(DatasetLayoutError, match=r"val is a flat folder of images without labels: put Kaggle's "
                                                 r"LOC_val_solution.csv or ILSVRC2012_devkit_t12.tar.gz beside it, or "
                                                 r"arrange it into class folders: python -m data.downloads arrange --val-dir"):
        splits(top)


def test_a_folder_holding_kaggles_zip_beside_its_csv_files_is_read_as_the_zip(downloads, tmp_path):
    folder = tmp_path / "download"
    folder.mkdir()
    shutil.copy(downloads["zip"], folder)
    for name in ("LOC_val_solution.csv", "LOC_synset_mapping.txt"):  # unzipped out of it
        shutil.copy(downloads["kaggle"] / name, folder)
    assert layout(folder) == "kaggle-zip"
    assert names(splits(folder)[0]) == names(splits(downloads["zip"])[0]) == names(splits(folder, layout="kaggle")[0])


def with_solution(downloads, folder, edit):
    """Kaggle's download unzipped, its LOC_val_solution.csv's lines passed through `edit`."""
    top = fresh_copy(downloads["kaggle"], folder)
    lines = (top / "LOC_val_solution.csv").read_text().splitlines(keepends=True)
    (top / "LOC_val_solution.csv").write_text("".join(edit(lines)))
    return top


@pytest.mark.parametrize("edit, message", [
    (lambda lines: lines[:3] + [lines[3].split(",")[0] + ",\n"] + lines[4:],
     r"LOC_val_solution.csv, line 4: expected an ImageId and a PredictionString that starts with the image's wnid"),
    (lambda lines: lines[:3] + [lines[3].split(",")[0] + "\n"] + lines[4:], r"line 4: expected an ImageId"),
    (lambda lines: lines + [lines[2].split(",")[0] + ",n99999999 1 2 3 4\n"],
     r"line 17: ILSVRC2012_val_00000002 is labelled n99999999, but n\d+ on line 3: which is right\?"),
])
def test_a_bad_label_file_is_one_line_and_exit_2_in_train_and_validate(downloads, tmp_path, edit, message):
    top = with_solution(downloads, tmp_path / "kaggle", edit)
    torch.save(stand_in_timm_model(3).state_dict(), tmp_path / "w.pth")
    for result in (in_this_process(train.main, "--recipe", "demo.yaml", "--data-dir", top, "--output",
                                   tmp_path / "run", *TINY_OVERRIDES),
                   in_this_process(validate.cli, "--checkpoint", tmp_path / "w.pth", "--data-dir", top)):
        assert_one_error_line(result, "")
        assert re.search(message, result.stderr), result.stderr


def test_a_layout_named_in_the_recipe_that_the_folder_does_not_hold_is_one_line(tiny_imagenet, tmp_path):
    result = in_this_process(train.main, "--recipe", "demo.yaml", "--data-dir", tiny_imagenet, "--output",
                             tmp_path / "run", *TINY_OVERRIDES, "data.layout=kaggle")
    assert_one_error_line(result, f"data.layout is kaggle but {tiny_imagenet} holds neither Kaggle's zip nor its "
                                  f"download unzipped")


# ----------------------------------------------------------------------------- the commands


def test_verify_names_each_archive_whose_md5_is_not_the_published_one(downloads):
    result = in_this_process(data.downloads.main, "verify", downloads["archives"])
    lines = dict(line.split(": ", 1) for line in result.stdout.strip().splitlines())
    assert result.returncode == 2 and set(lines) == {TRAIN, VAL, DEVKIT}
    assert lines[DEVKIT].endswith(" OK")  # the test's devkit is registered as the published one
    assert lines[TRAIN].endswith("DIFFERS from the published MD5: download it again")


def test_arrange_writes_the_class_folders_resumes_and_refuses_to_overwrite_another_result(tiny_imagenet, downloads,
                                                                                          tmp_path):
    out = tmp_path / "out"
    for kind in ("archives", "zip"):
        result = in_this_process(data.downloads.main, "arrange", "--data-dir", downloads[kind], "--out", out)
        assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-2:] == ["train: 0 images written, 24 already there, 0 unreadable skipped",
                                          "val: 0 images written, 15 already there, 0 unreadable skipped"]
    train = sorted(p.relative_to(tiny_imagenet / "train") for p in (tiny_imagenet / "train").rglob("*.JPEG"))
    assert sorted(p.relative_to(out / "train") for p in (out / "train").rglob("*.JPEG")) == train
    assert all((out / "train" / p).read_bytes() == (tiny_imagenet / "train" / p).read_bytes() for p in train)
    assert {(wnid, path.read_bytes()) for path, wnid, _ in val_names(tiny_imagenet)} == \
           {(p.parent.name, p.read_bytes()) for p in (out / "val").rglob("*.JPEG")}
    (out / "train" / train[0]).write_bytes(b"another image")
    refused = in_this_process(data.downloads.main, "arrange", "--data-dir", downloads["archives"], "--out", out)
    assert refused.returncode == 2 and f"{out / 'train' / train[0]} exists and differs" in refused.stderr


def many_small_images(folder, classes=20, per_class=300):
    """An official train archive of 6,000 small images (not JPEGs: arrange copies bytes), a val
    tar and Kaggle's labels: enough for arrange to be caught halfway."""
    folder.mkdir()
    inner = {f"n{c:08d}": [(f"n{c:08d}_{k}.JPEG", os.urandom(64)) for k in range(per_class)] for c in range(classes)}
    (folder / TRAIN).write_bytes(tar_bytes([(f"{wnid}.tar", tar_bytes(files)) for wnid, files in inner.items()]))
    (folder / VAL).write_bytes(tar_bytes([(f"ILSVRC2012_val_{i + 1:08d}.JPEG", os.urandom(64)) for i in range(classes)]))
    (folder / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "".join(
        f"ILSVRC2012_val_{i + 1:08d},{wnid} 1 2 3 4\n" for i, wnid in enumerate(inner)))
    return inner


@pytest.mark.slow
def test_arrange_killed_midway_into_the_downloads_own_folder_goes_on_and_never_takes_its_part_for_the_whole(
        tmp_path):
    folder = tmp_path / "download"
    inner = many_small_images(folder)
    process = start([sys.executable, "-m", "data.downloads", "arrange", "--data-dir", folder, "--out", folder])
    deadline = time.monotonic() + 60
    while sum(len(files) for _, _, files in os.walk(folder / "train.partial")) < 300:
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (folder / "train").exists()  # the part is not taken for class folders
    result = in_this_process(data.downloads.main, "arrange", "--data-dir", folder, "--out", folder)
    written, kept = map(int, re.search(r"^train: (\d+) images written, (\d+) already there", result.stdout,
                                       re.MULTILINE).groups())
    assert result.returncode == 0 and written + kept == 6000 and kept >= 300, result.stdout + result.stderr
    assert all((folder / "train" / wnid / name).read_bytes() == data for wnid, files in inner.items()
               for name, data in files)
    assert not (folder / "train.partial").exists() and len(list((folder / "val").rglob("*.JPEG"))) == 20


def test_arrange_onto_a_full_disk_names_the_file_it_could_not_write(downloads, tmp_path):
    mount = PrivateMount(tmp_path / "small", size="32k")
    process = mount.start([sys.executable, "-m", "data.downloads", "arrange", "--data-dir", downloads["archives_csv"],
                           "--out", tmp_path / "small" / "out"])
    out, _ = process.communicate(timeout=60)
    last = out.strip().splitlines()[-1]
    assert process.returncode == 2 and re.fullmatch(
        rf"error: \[Errno 28\] No space left on device: '{tmp_path}/small/out/train.partial/n\d+/[^/]+\.JPEG'", last), out


def test_the_packer_reads_the_archives_and_the_zip_into_the_folders_train_shards_byte_for_byte(tiny_imagenet,
                                                                                               downloads, tmp_path):
    packs = {kind: pack(folder, tmp_path / kind, seed=2, train_shards=2, val_shards=1)
             for kind, folder in (("folders", tiny_imagenet), ("archives", downloads["archives"]),
                                  ("zip", downloads["zip"]))}
    shards = packs["folders"]["splits"]["train"]["filenames"]
    for kind in ("archives", "zip"):
        assert packs[kind]["classes"] == packs["folders"]["classes"]
        assert all((tmp_path / kind / name).read_bytes() == (tmp_path / "folders" / name).read_bytes()
                   for name in shards), kind
    names = tarfile.open(tmp_path / "archives" / packs["archives"]["splits"]["validation"]["filenames"][0]).getnames()
    assert len(names) == 30 and all(name.startswith("ILSVRC2012_val_") for name in names)


# ----------------------------------------------------------------------------- validation and training


@pytest.mark.slow
def test_validate_prints_the_same_result_on_every_download_as_on_class_folders(tiny_imagenet, downloads, tmp_path):
    torch.save(stand_in_timm_model(3).state_dict(), tmp_path / "w.pth")

    def result(folder):
        found = validate.main([str(a) for a in ("--checkpoint", tmp_path / "w.pth", "--data-dir", folder,
                                                "--workers", "0", "--img-size", "32")])
        return {key: value for key, value in found.items() if key not in ("layout", "images_per_s")}, found["layout"]

    from_folders, _ = result(tiny_imagenet)
    assert from_folders["images"] == 15 and from_folders["unreadable"] == 0
    for kind, folder in downloads.items():
        assert result(folder) == (from_folders, layout(folder)), kind


# A checkpoint after every step, so that a kill mid-epoch leaves one to resume from.
OVERRIDES = last_wins(*TINY_OVERRIDES, "epochs=1", "checkpoint.every_steps=1")


def train_from(folder, output):
    train_here(["train.py", "--recipe", "demo.yaml", "--data-dir", folder, "--output", output, *OVERRIDES])
    return output


def assert_same_weights(a, b):
    left, right = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert left["step"] == right["step"] == 3
    assert all(torch.equal(left["model"][key], right["model"][key]) for key in left["model"])
    assert [row["top1"] for row in left["rows"]] == [row["top1"] for row in right["rows"]]


@pytest.fixture(scope="module")
def folder_run(tiny_imagenet, tmp_path_factory):
    return train_from(tiny_imagenet, tmp_path_factory.mktemp("folders") / "run")


@pytest.mark.slow
def test_training_from_the_archives_the_zip_and_the_unzipped_download_gives_the_folders_weights_bitwise(
        downloads, folder_run, tmp_path):
    for kind in ("archives", "zip", "kaggle"):
        assert_same_weights(folder_run, train_from(downloads[kind], tmp_path / kind))


@pytest.mark.slow
def test_a_run_from_the_archives_killed_mid_epoch_resumes_bitwise(downloads, folder_run, tmp_path):
    """Kaggle's labels beside the archives: the child process cannot take the test's devkit."""
    args = ["train.py", "--recipe", "demo.yaml", "--data-dir", downloads["archives_csv"], "--output", tmp_path / "run",
            *OVERRIDES]
    process = start([sys.executable, *args])
    read_until(process, "step 2 ")  # mid-epoch (3 steps), a checkpoint behind
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    resumed = train_here([*args, "--resume", "auto"])
    at_step = re.search(r"resumed from \S+ at step (\d+)", resumed.stdout + resumed.stderr)
    assert at_step and int(at_step.group(1)) in (1, 2), resumed.stdout
    assert "inexactly" not in resumed.stdout + resumed.stderr
    assert_same_weights(folder_run, tmp_path / "run")


@pytest.mark.slow
def test_an_archive_rewritten_under_a_running_job_stops_it_in_one_line_and_the_rerun_indexes_it_again(
        tiny_imagenet, downloads, tmp_path):
    """Loader workers that keep the archive open all run, the file rewritten in place with
    another of the same size and its old times: a read notices, not a skipped batch."""
    folder = fresh_copy(downloads["archives_csv"], tmp_path / "archives")
    args = ["train.py", "--recipe", "demo.yaml", "--data-dir", folder, "--output", tmp_path / "run",
            *last_wins(*OVERRIDES, "epochs=3", "batch_size=2", "data.workers=2", "checkpoint.every_steps=0")]
    other = write_train_archive(tiny_imagenet / "train", tmp_path / "other.tar", seed=7)
    process = start([sys.executable, *args])
    read_until(process, "step 2 ")  # 36 steps of 2 images; the workers are at most 8 batches ahead
    kept = (folder / TRAIN).stat()
    with open(folder / TRAIN, "r+b") as handle:
        handle.write(other.read_bytes())
    os.utime(folder / TRAIN, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    out, _ = process.communicate(timeout=120)
    last = out.strip().splitlines()[-1]
    assert process.returncode == 2 and last.startswith(f"error: {folder / TRAIN} changed after it was indexed"), out
    assert "restart the run to index it again; checkpoint saved at step" in last and "Traceback" not in out
    resumed = train_here([*args, "--resume", "auto"])
    assert f"indexed {TRAIN}: 24 samples built in" in resumed.stdout and (tmp_path / "run" / "status").read_text() == \
        "done at step 36\n"


@pytest.mark.slow
def test_a_stop_during_the_start_ends_it_at_once_and_leaves_a_status_the_requeue_script_requeues(downloads, tmp_path):
    """SIGTERM to the job while it waits for another process's index of the train archive
    (blocked in a lock, as a second rank or node waits), and while Python imports torch."""
    folder = fresh_copy(downloads["archives_csv"], tmp_path / "archives")
    args = ["train.py", "--recipe", "demo.yaml", "--data-dir", folder, "--output", tmp_path / "run", *OVERRIDES]
    (folder / ".cspresnet_index").mkdir()
    with open(folder / ".cspresnet_index" / "archives-train.idx.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another process builds the index
        process = start([sys.executable, *args])
        read_until(process, "waiting for another process")
        os.killpg(process.pid, signal.SIGTERM)
        out, _ = process.communicate(timeout=30)
    assert process.returncode == 75, out
    assert "stopping on SIGTERM during the start, before any training: nothing of this run was trained yet" in out
    assert (tmp_path / "run" / "status").read_text() == "preempted at step 0\n"
    assert not list((folder / ".cspresnet_index").glob("*.partial"))
    assert RunFolder(tmp_path / "run", keep_last=2).choose_start(None) is None  # a status alone holds no run

    process = start([sys.executable, *args, "--resume", "auto"])
    time.sleep(0.5)  # importing torch
    os.killpg(process.pid, signal.SIGTERM)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 75 and (tmp_path / "run" / "status").read_text() == "preempted at step 0\n", out
    train_here([*args, "--resume", "auto"])
    assert (tmp_path / "run" / "status").read_text() == "done at step 3\n"


@pytest.mark.slow
def test_the_benchmark_reads_every_source_and_times_the_indexes(tiny_imagenet, tmp_path):
    import benchmarks.archives

    result = module_in_this_process(benchmarks.archives, "--data-dir", tiny_imagenet, "--work-dir", tmp_path,
                                    "--rounds", "1", "--img-size", "32", "--batch-size", "4")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["images"] == 24 and set(summary["index_seconds_per_1000_images"]) == {"archives", "kaggle-zip"}
    assert all(rate > 0 for workers in summary["images_per_s"].values() for rate in workers.values())
    assert set(summary["images_per_s"]["workers_2"]) == {"folders", "shards", "archives", "kaggle-zip"}
