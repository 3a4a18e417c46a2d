"""Training and validation from WebDataset tar shards: the same weights as from the class
folders they were packed from, timm's layout written by hand, the cached index, bad
shards, the pack command, and the files each loader worker opens."""
import csv
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import tarfile

import pytest
import torch
import torchvision.datasets.imagenet as tv_imagenet
from PIL import Image

import benchmarks.shards
import data.pack_shards
import train
import validate
from benchmarks.common import stand_in_timm_model
from cspresnet.checkpoint import load_checkpoint
from cspresnet.reports import load_real_labels
from data.sources import tars
from data.config import DataConfig
from common.errors import DataConfigError, DatasetLayoutError, SourceChangedError
from data.dataset import ImageDataset
from data.sources.folders import find_classes, index_split
from data.loaders import build_splits
from data.pack_shards import PLAN_NAME, PackError, pack
from data.samplers import TrainSampler
from data.transforms import eval_transform, train_transform
from tests.helpers import (TINY_OVERRIDES, child_pids, in_this_process, last_wins, module_in_this_process, read_until,
                           run_cli, start, torchrun, train_here)
from tests.test_validate import fake_devkit


ONE_EPOCH = last_wins(*TINY_OVERRIDES, "epochs=1")  # 3 steps: the sample order and crop draws are what is compared


def train_run(data_dir, output, *extra):
    result = in_this_process(train.main, "--recipe", "demo.yaml", "--data-dir", data_dir, "--output", output,
                             *last_wins(*ONE_EPOCH, *extra))
    assert result.returncode == 0, result.stderr
    return output


def assert_same_weights(a, b):
    left, right = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert left["step"] == right["step"]
    assert all(torch.equal(left["model"][key], right["model"][key]) for key in left["model"])
    assert (a / "summary.csv").read_text().count("\n") == (b / "summary.csv").read_text().count("\n")
    assert [r["top1"] for r in left["rows"]] == [r["top1"] for r in right["rows"]]


def run_validate(checkpoint, data_dir, *extra):
    return validate.main([str(a) for a in ("--checkpoint", checkpoint, "--data-dir", data_dir, "--workers", "0",
                                           *extra)])


def same_result(a, b):
    differ = {"layout", "images_per_s"}  # where the images came from, and how fast
    return {k: v for k, v in a.items() if k not in differ} == {k: v for k, v in b.items() if k not in differ}


def write_tar(path, members):
    """members: (name, bytes), written with plain tarfile as any WebDataset writer does."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def timm_layout(source, out, shards_per_split=2, seed=3):
    """`source`'s class folders as timm publishes ImageNet-1k: imagenet1k-{train,validation}-NNNN.tar
    of <key>.jpg, <key>.cls and a <key>.json sidecar, shuffled across shards, and an
    _info.json with timm's split fields (no class names)."""
    out.mkdir()
    classes = find_classes(source / "train")
    info = {"name": "imagenet-1k-tiny", "splits": {}}
    for folder, split in (("train", "train"), ("val", "validation")):
        samples = index_split(source / folder, classes)
        random.Random(seed).shuffle(samples)
        names, lengths = [], []
        for number in range(shards_per_split):
            part = samples[number::shards_per_split]
            names.append(f"imagenet1k-{split}-{number:04d}.tar")
            lengths.append(len(part))
            members = []
            for path, target in part:
                key = os.path.splitext(os.path.basename(path))[0]
                members += [(f"{key}.jpg", open(path, "rb").read()), (f"{key}.cls", str(target).encode()),
                            (f"{key}.json", json.dumps({"filename": os.path.basename(path)}).encode())]
            write_tar(out / names[-1], members)
        info["splits"][split] = {"name": split, "num_samples": len(samples), "filenames": names,
                                 "shard_lengths": lengths}
    (out / "_info.json").write_text(json.dumps(info))
    return out


@pytest.fixture(scope="module")
def packed(tiny_imagenet, tmp_path_factory):
    """tiny_imagenet packed by our command: 3 train and 2 validation shards, shuffled."""
    out = tmp_path_factory.mktemp("packed") / "shards"
    pack(tiny_imagenet, out, seed=5, train_shards=3, val_shards=2)
    return out


@pytest.fixture(scope="module")
def packed_seed0(tiny_imagenet, tmp_path_factory):
    """tiny_imagenet packed with the default --seed 0 into 3 train shards of 8: with the old
    shuffle (torch seeded with --seed), each of the sampler's first-epoch batches of 8 (run
    seed 0) was one whole shard."""
    out = tmp_path_factory.mktemp("packed_seed0") / "shards"
    pack(tiny_imagenet, out, seed=0, train_shards=3, val_shards=2)
    return out


def fresh_copy(source, folder):
    """A copy to damage, without the index that other tests may have left in `source`."""
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns(".cspresnet_index"))
    return folder


def cut_mid_member(shard):
    """Cuts `shard` halfway through its middle image, as an interrupted copy leaves it;
    returns its whole bytes (to repair it) and how many samples follow the cut one."""
    whole = shard.read_bytes()
    images = [m for m in tarfile.open(shard).getmembers() if m.name.endswith(".jpg")]
    middle = len(images) // 2
    shard.write_bytes(whole[:images[middle].offset_data + images[middle].size // 2])
    return whole, len(images) - middle - 1


@pytest.fixture(scope="module")
def folder_run(tiny_imagenet, tmp_path_factory):
    return train_run(tiny_imagenet, tmp_path_factory.mktemp("folder") / "run")


@pytest.fixture(scope="module")
def handmade(tiny_imagenet, tmp_path_factory):
    """tiny_imagenet in timm's published layout, written with plain tarfile (not our packer)."""
    return timm_layout(tiny_imagenet, tmp_path_factory.mktemp("handmade") / "wds")


@pytest.fixture(scope="module")
def handmade_run(handmade, tmp_path_factory):
    return train_run(handmade, tmp_path_factory.mktemp("handmade_run") / "run")


# ----------------------------------------------------------------------------- the same numbers as the folders


def test_shards_in_timms_layout_written_by_hand_train_to_the_folders_weights_bitwise_and_validate_the_same(
        tiny_imagenet, packed, handmade, folder_run, handmade_run):
    """Our packer's shards give the folders' weights too: with 2 processes, killed and
    resumed, in the slow test below."""
    first_member = tarfile.open(handmade / "imagenet1k-train-0000.tar").getnames()[0]
    first_file = index_split(tiny_imagenet / "train", find_classes(tiny_imagenet / "train"))[0][0]
    assert first_member.split(".")[0] != os.path.basename(first_file).split(".")[0]  # shuffled across shards
    assert_same_weights(folder_run, handmade_run)  # whatever order the samples lie in the shards
    checkpoint = handmade_run / "last.pt"
    assert load_checkpoint(checkpoint)["classes"] == ["0", "1", "2"]  # timm's _info.json names none
    from_folder = run_validate(checkpoint, tiny_imagenet)
    for shards_dir in (handmade, packed):  # numbered classes go with any names; ours names them
        result = run_validate(checkpoint, shards_dir)
        assert (result["images"], result["layout"], result["unreadable"]) == (15, "shards", 0)
        assert same_result(from_folder, result)


@pytest.mark.parametrize("decode", ["full", "fast", "gpu"])
def test_every_decode_path_gets_the_same_bytes_from_a_shard_as_from_the_file(tiny_imagenet, packed, decode):
    samples = index_split(tiny_imagenet / "train", find_classes(tiny_imagenet / "train"))
    split = tars.shard_index(packed, "train")
    assert [t for _, t in split] == [t for _, t in samples]
    assert [os.path.basename(p).split(".")[0] for p, _ in split] == \
           [os.path.basename(p).split(".")[0] for p, _ in samples]
    from_files = ImageDataset(samples, [], train_transform(40, decode=decode), seed=1)
    from_shards = ImageDataset(split, [], train_transform(40, decode=decode), seed=1)
    for index in range(len(samples)):
        a, b = from_files[(2, index)], from_shards[(2, index)]
        if decode == "gpu":
            assert (a[0].data, a[0].box, a[0].flip) == (b[0].data, b[0].box, b[0].flip)
        else:
            assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


# ----------------------------------------------------------------------------- the index


def test_the_index_is_built_once_reused_and_rebuilt_for_a_changed_shard(packed, tmp_path, monkeypatch, caplog):
    folder = fresh_copy(packed, tmp_path / "shards")  # the other tests may have indexed `packed`
    scanned = []
    real_scan = tars.scan_shard
    monkeypatch.setattr(tars, "scan_shard", lambda path: scanned.append(path.name) or real_scan(path))
    first = tars.shard_index(folder, "train")
    assert sorted(scanned) == [f"imagenet1k-train-0{i}.tar" for i in range(3)] and \
        (folder / ".cspresnet_index" / "shards-train.idx").is_file()
    scanned.clear()
    assert tars.shard_index(folder, "train") == first and scanned == []  # from the cache
    assert len(tars.shard_index(folder, "val")) == 15 and len(scanned) == 2  # each split its own
    scanned.clear()
    changed = folder / "imagenet1k-train-01.tar"
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    with caplog.at_level("INFO", logger="data"):
        again = tars.shard_index(folder, "train")
    assert scanned == [changed.name] and "re-indexing 1 shard(s) that changed" in caplog.text
    assert again == first
    scanned.clear()
    elsewhere = tars.shard_index(folder, "train", index_dir=str(tmp_path / "cache"))  # data.index_dir
    assert len(scanned) == 3 and elsewhere == first and any((tmp_path / "cache").rglob("shards-train.idx"))


# ----------------------------------------------------------------------------- bad shards


@pytest.fixture()
def bad_shards(tiny_imagenet, tmp_path):
    """Two train shards: the first with a member that is not a JPEG and a sample without
    its .cls; the second cut short inside its last image; and a good validation shard."""
    files = sorted((tiny_imagenet / "train" / "n00000001").iterdir())
    jpeg = [path.read_bytes() for path in files]
    folder = tmp_path / "bad"
    folder.mkdir()
    write_tar(folder / "set-train-0.tar", [
        ("a.jpg", jpeg[1]), ("a.cls", b"0"), ("html.jpg", b"<html>503 Service Unavailable</html>"),
        ("html.cls", b"1"), ("nolabel.jpg", jpeg[2]), ("b.jpg", jpeg[3]), ("b.cls", b"1")])
    write_tar(folder / "set-train-1.tar", [("c.jpg", jpeg[4]), ("c.cls", b"0"), ("d.cls", b"1"), ("d.jpg", jpeg[5])])
    whole = (folder / "set-train-1.tar").read_bytes()
    (folder / "set-train-1.tar").write_bytes(whole[:whole.index(jpeg[5]) + len(jpeg[5]) // 2])
    write_tar(folder / "set-validation-0.tar", [("v.jpg", jpeg[6]), ("v.cls", b"1")])
    return folder


def reasons(dataset):
    return {os.path.basename(dataset.samples[i][0]): dataset[i][3] for i in range(len(dataset))}


def test_bad_shards_give_clear_reasons_and_their_samples_are_skipped(bad_shards, caplog):
    with caplog.at_level("WARNING", logger="data"):
        split = tars.shard_index(bad_shards, "train")
    assert "set-train-1.tar is cut short or damaged" in caplog.text
    assert "2 of the 6 samples of the train shards" in caplog.text  # known when indexing; one line a run
    dataset = ImageDataset(split, ["x", "y"], eval_transform(32, 0.875))
    found = reasons(dataset)
    assert [os.path.basename(p) for p, _ in split][-1] == "nolabel.jpg"  # no class: placed last
    assert found["a.jpg"] is None and found["b.jpg"] is None and found["c.jpg"] is None
    assert "not an image Pillow can read (36 bytes, starting b'<html>50'" in found["html.jpg"]
    assert "no .cls member" in found["nolabel.jpg"]
    assert "cut short: the shard ends" in found["d.jpg"] and "set-train-1.tar is cut short" in found["d.jpg"]


def test_a_shard_deleted_after_indexing_is_named_and_its_samples_counted_and_a_changed_one_stops_the_run(bad_shards, caplog):
    split = tars.shard_index(bad_shards, "train")
    (bad_shards / "set-train-1.tar").unlink()  # while a run has the index
    dataset = ImageDataset(split, ["x", "y"], eval_transform(32, 0.875))
    assert "set-train-1.tar is gone: deleted or moved after it was indexed" in reasons(dataset)["c.jpg"]
    with caplog.at_level("WARNING", logger="data"):
        later = tars.shard_index(bad_shards, "train")  # the next run
    assert "set-train-1.tar was indexed but is gone" in caplog.text
    assert later == split  # the others keep their indices: an exact resume stays exact
    assert "is gone" in reasons(ImageDataset(later, ["x", "y"], eval_transform(32, 0.875)))["c.jpg"]

    write_tar(bad_shards / "set-train-0.tar", [("a.jpg", b"other"), ("a.cls", b"0")])  # rewritten: stale offsets
    os.utime(bad_shards / "set-train-0.tar", ns=(1, 1))
    with pytest.raises(SourceChangedError, match="set-train-0.tar changed after it was indexed.*restart the run"):
        ImageDataset(later, ["x", "y"], eval_transform(32, 0.875))[0]  # ends the run, no sample skipped
    assert [os.path.basename(p) for p, _ in tars.shard_index(bad_shards, "train")][0] == "a.jpg"


def test_a_deleted_shard_stops_a_resumed_run_at_its_start_by_the_unreadable_budget_and_loses_nothing(
        handmade, handmade_run, tmp_path):
    folder, run = tmp_path / "shards", tmp_path / "run"
    shutil.copytree(handmade, folder)
    shutil.copytree(handmade_run, run)
    (folder / "imagenet1k-train-0001.tar").unlink()  # 12 of the 24 images
    saved = (run / "last.pt").read_bytes()
    args = ["--recipe", "demo.yaml", "--data-dir", folder, "--output", run, "--resume", "auto", *TINY_OVERRIDES]
    stopped = in_this_process(train.main, *args)
    assert stopped.returncode == 2 and "imagenet1k-train-0001.tar is gone" in stopped.stderr
    assert "12 of the 24 images of the training set cannot be read, known before any training" in stopped.stderr
    assert (run / "last.pt").read_bytes() == saved
    assert "training set changed" not in stopped.stdout  # the index kept the gone shard's places


def test_a_shard_cut_before_it_was_indexed_counts_the_samples_info_json_says_it_lost(packed, tmp_path, caplog):
    folder = fresh_copy(packed, tmp_path / "shards")
    _, after_cut = cut_mid_member(folder / "imagenet1k-train-01.tar")
    with caplog.at_level("WARNING", logger="data"):
        split = tars.shard_index(folder, "train")
    assert len(split) == 24  # _info.json's count: 3 shards of 8
    lost = {i: reason for i, reason in split.problems.items() if reason.startswith("lost:")}
    assert after_cut == 3 and sorted(lost) == [21, 22, 23]  # placeholders, class unknown: placed last
    assert all(split[i][1] == -1 and split[i][0].endswith(f"<lost sample {n} of 3>")
               for n, i in enumerate(sorted(lost), start=1))
    assert set(lost.values()) == {f"lost: imagenet1k-train-01.tar is cut short at byte "
                                  f"{(folder / 'imagenet1k-train-01.tar').stat().st_size}; _info.json says it holds "
                                  f"8 samples, its tar headers show 5"}
    cut = [reason for i, reason in split.problems.items() if i not in lost]
    assert len(cut) == 1 and "cut short: the shard ends" in cut[0]
    assert "3 sample(s) after the cut will be skipped" in caplog.text and "4 of the 24 samples of the train shards" \
        in caplog.text
    dataset = ImageDataset(split, ["a", "b", "c"], eval_transform(32, 0.875))
    assert all(dataset[i][3] == f"UnreadableSample: {lost[i]}" for i in lost)  # the dataset reports them unreadable


def test_a_shard_cut_after_it_was_indexed_keeps_its_samples_in_their_places_until_it_is_copied_again(
        packed, tmp_path, monkeypatch):
    folder = fresh_copy(packed, tmp_path / "shards")
    before = tars.shard_index(folder, "train")
    shard = folder / "imagenet1k-train-01.tar"
    whole, after_cut = cut_mid_member(shard)
    after = tars.shard_index(folder, "train")
    assert after == before  # every sample keeps its index: an exact resume stays exact
    lost = [i for i, reason in after.problems.items() if reason.startswith("lost:")]
    assert len(lost) == after_cut == 3 and len(after.problems) == 4  # and the cut one
    assert after.problems[lost[0]] == (f"lost: imagenet1k-train-01.tar is cut short at byte {shard.stat().st_size} "
                                       f"(it was {len(whole)} bytes when indexed)")
    dataset = ImageDataset(after, ["a", "b", "c"], eval_transform(32, 0.875))
    assert [i for i in range(len(dataset)) if dataset[i][3]] == sorted(after.problems)  # the rest read as before
    scanned = []
    real_scan = tars.scan_shard
    monkeypatch.setattr(tars, "scan_shard", lambda path: scanned.append(path.name) or real_scan(path))
    again = tars.shard_index(folder, "train")  # the cache keeps the kept samples for the cut shard
    assert (list(again), again.problems, scanned) == (list(after), after.problems, [])
    shard.write_bytes(whole)  # copied again
    repaired = tars.shard_index(folder, "train")
    assert scanned == [shard.name] and repaired == before and repaired.problems == {}


def test_validate_counts_the_lost_images_of_a_cut_validation_shard_as_unreadable(packed, tmp_path):
    folder = fresh_copy(packed, tmp_path / "shards")
    _, after_cut = cut_mid_member(folder / "imagenet1k-validation-01.tar")
    torch.save(stand_in_timm_model(3).state_dict(), tmp_path / "w.pth")
    result = run_validate(tmp_path / "w.pth", folder, "--img-size", "32")
    assert result["images"] + result["unreadable"] == 15 and result["unreadable"] == after_cut + 1 > 1


def test_a_cut_shard_without_info_json_or_an_earlier_index_says_the_number_lost_is_unknown(packed, tmp_path, caplog):
    folder = fresh_copy(packed, tmp_path / "shards")
    (folder / "_info.json").unlink()
    _, after_cut = cut_mid_member(folder / "imagenet1k-train-01.tar")
    with caplog.at_level("WARNING", logger="data"):
        split = tars.shard_index(folder, "train")
    assert "imagenet1k-train-01.tar is cut short or damaged" in caplog.text
    assert "The number of samples lost after the cut is unknown" in caplog.text
    assert len(split) == 24 - after_cut and len(split.problems) == 1  # only the cut one is known


def test_an_index_written_by_an_older_version_is_built_again(packed, tmp_path, monkeypatch, caplog):
    folder = fresh_copy(packed, tmp_path / "shards")
    first = tars.shard_index(folder, "train")
    cache = folder / ".cspresnet_index" / "shards-train.idx"
    cache.write_bytes(b"CSPRESNET-SAMPLE-INDEX-1\n" + cache.read_bytes()[25:])  # as the older format began
    scanned = []
    real_scan = tars.scan_shard
    monkeypatch.setattr(tars, "scan_shard", lambda path: scanned.append(path.name) or real_scan(path))
    with caplog.at_level("INFO", logger="data"):
        again = tars.shard_index(folder, "train")
    assert len(scanned) == 3 and "not a sample index of this version" in caplog.text
    assert again == first


# ----------------------------------------------------------------------------- the pack command


def test_pack_is_deterministic_resumable_and_keeps_validation_names(tiny_imagenet, tmp_path):
    source = tmp_path / "imagenet"
    shutil.copytree(tiny_imagenet, source)
    for number, path in enumerate(sorted(source.glob("val/*/*.JPEG")), start=1):
        path.rename(path.with_name(f"ILSVRC2012_val_{number:08d}.JPEG"))
    first, again, other = (pack(source, tmp_path / name, seed=seed, train_shards=4, val_shards=2)
                           for name, seed in (("a", 7), ("b", 7), ("c", 8)))
    tars = sorted(p.name for p in (tmp_path / "a").glob("*.tar"))
    assert len(tars) == 6 and first == again == other
    assert all((tmp_path / "a" / t).read_bytes() == (tmp_path / "b" / t).read_bytes() for t in tars)
    assert any((tmp_path / "a" / t).read_bytes() != (tmp_path / "c" / t).read_bytes() for t in tars)
    names = tarfile.open(tmp_path / "a" / "imagenet1k-validation-00.tar").getnames()
    assert all(n.startswith("ILSVRC2012_val_") and n.endswith((".jpg", ".cls")) for n in names)
    assert first["splits"]["train"]["shard_lengths"] == [6, 6, 6, 6] and first["classes"] == find_classes(source / "train")

    # Interrupted: one shard written halfway, another not at all. The rerun keeps the finished ones.
    resumed = tmp_path / "b"
    kept = (resumed / tars[0]).stat().st_mtime_ns
    (resumed / tars[1]).rename(resumed / f".{tars[1]}.4242.tmp")  # a process killed while writing it
    (resumed / f".{tars[1]}.4242.tmp").write_bytes(b"half a shard")
    (resumed / tars[2]).unlink()
    pack(source, resumed, seed=7, train_shards=4, val_shards=2)
    assert all((tmp_path / "a" / t).read_bytes() == (resumed / t).read_bytes() for t in tars)
    assert (resumed / tars[0]).stat().st_mtime_ns == kept and not list(resumed.glob(".*.tmp"))
    with pytest.raises(PackError, match="holds another pack"):
        pack(source, resumed, seed=8, train_shards=4, val_shards=2)


def test_pack_command_says_what_is_wrong_in_one_line(tiny_imagenet, tmp_path):
    dotted = tmp_path / "dotted"
    shutil.copytree(tiny_imagenet, dotted)
    next((dotted / "train" / "n00000000").iterdir()).rename(dotted / "train" / "n00000000" / "a.b.JPEG")
    for args, message in ((["--data-dir", tmp_path / "nowhere"], "does not exist"),
                          (["--data-dir", dotted], "a dot before their extension"),
                          (["--data-dir", tiny_imagenet, "--train-shards", "0"], "must be >= 1")):
        result = module_in_this_process(data.pack_shards, *args, "--out", tmp_path / "out")
        assert result.returncode == 2 and message in result.stderr, result.stderr
    done = module_in_this_process(data.pack_shards, "--data-dir", tiny_imagenet, "--out", tmp_path / "ok",
                                  "--train-shards", "2", "--val-shards", "1")
    assert done.returncode == 0 and "packed 24 train images in 2 shards, 15 validation images in 1 shards" in done.stdout


def test_the_packers_shuffle_is_not_the_samplers_so_each_first_epoch_batch_draws_from_several_shards(packed_seed0):
    shard_of = tars.shard_index(packed_seed0, "train").folder_of
    for batch_size in (4, 6, 8):
        batches = list(TrainSampler(24, batch_size, 1, 0, seed=0))
        assert all(len({int(shard_of[index]) for _, index in batch}) > 1 for batch in batches), batch_size


def test_a_pack_begun_with_the_old_shuffle_is_refused_and_the_message_says_what_to_do(tiny_imagenet, tmp_path):
    out = tmp_path / "out"
    pack(tiny_imagenet, out, seed=0, train_shards=3, val_shards=2)
    plan = json.loads((out / PLAN_NAME).read_text())
    del plan["shuffle"]  # as the old command wrote it, with a digest of the old rule
    (out / PLAN_NAME).write_text(json.dumps(dict(plan, digest=hashlib.sha1(b"the old rule").hexdigest())))
    (out / "imagenet1k-train-02.tar").unlink()  # interrupted
    with pytest.raises(PackError, match=r"holds another pack \(begun by an older version of this command, which "
                                        r"shuffled the samples in another order.*delete .*out and run this command"):
        pack(tiny_imagenet, out, seed=0, train_shards=3, val_shards=2)
    assert not (out / "imagenet1k-train-02.tar").exists()


def test_a_shard_deleted_after_indexing_trains_through_a_raised_budget_and_is_counted(packed_seed0, tmp_path):
    folder, run = tmp_path / "shards", tmp_path / "run"
    shutil.copytree(packed_seed0, folder)
    shard_of = tars.shard_index(folder, "train").folder_of  # indexed: the index keeps the deleted shard's places
    per_batch = [sum(int(shard_of[index]) == 1 for _, index in batch) for batch in TrainSampler(24, 8, 1, 0, seed=0)]
    # Shard 1 holds 8 of the 24 images: max_unreadable_fraction=0.5 allows 12. It gives at most 3
    # images to any first-epoch batch of 8: max_unreadable_batch_fraction=0.75 allows 6. (Under the
    # old shuffle one batch was all 8 of them, which no fraction allows: it must stay below 1.)
    assert sum(per_batch) == 8 and max(per_batch) <= 3, per_batch
    (folder / "imagenet1k-train-01.tar").unlink()
    result = train_here(["train.py", "--recipe", "demo.yaml", "--data-dir", folder, "--output", run,
                         *last_wins(*TINY_OVERRIDES, "epochs=1", "seed=0", "data.max_unreadable_fraction=0.5",
                                    "data.max_unreadable_batch_fraction=0.75")])
    assert "imagenet1k-train-01.tar is gone" in result.stdout + result.stderr
    with open(run / "summary.csv") as handle:
        assert [int(row["unreadable_images"]) for row in csv.DictReader(handle)] == [8]


# ----------------------------------------------------------------------------- layouts and validation


def test_the_layout_is_detected_from_the_folder_or_named_in_the_recipe(tiny_imagenet, packed, tmp_path):
    identity = train_transform(32)
    from_shards = build_splits(DataConfig(dir=str(packed)), identity, identity, 0)[0]
    assert from_shards.samples.kind == "members"
    assert from_shards.classes == find_classes(tiny_imagenet / "train")  # our packer's _info.json names them
    assert build_splits(DataConfig(dir=str(tiny_imagenet)), identity, identity, 0)[0].samples.kind == "files"
    with pytest.raises(DatasetLayoutError, match="has no train shards"):
        build_splits(DataConfig(dir=str(tiny_imagenet), layout="shards"), identity, identity, 0)
    with pytest.raises(DatasetLayoutError, match="(?s)train does not exist.*WebDataset tar shards"):
        build_splits(DataConfig(dir=str(packed), layout="class-folders"), identity, identity, 0)
    mixed = tmp_path / "mixed"
    shutil.copytree(packed, mixed)
    shutil.copy(packed / "imagenet1k-train-00.tar", mixed / "other-train-00.tar")
    with pytest.raises(DatasetLayoutError, match="train shards of 2 sets"):
        build_splits(DataConfig(dir=str(mixed)), identity, identity, 0)
    with pytest.raises(DataConfigError, match="'data.holdout_fraction' is 0.1, but .* holds tar shards"):
        build_splits(DataConfig(dir=str(packed), holdout_fraction=0.1), identity, identity, 0)
    held_out = build_splits(DataConfig(dir=str(tiny_imagenet), holdout_fraction=0.2), identity, identity, 0)
    assert (len(held_out[0]), len(held_out[1])) == (18, 6)  # class folders: 8 images a class, 2 held out of each


def test_a_1000_class_model_scores_the_same_on_shards_and_on_the_flat_folder(tmp_path, monkeypatch):
    """Ten images named as ImageNet's validation images: ImageNet-ReaL works from the shards."""
    real = load_real_labels()
    flat = tmp_path / "val"
    flat.mkdir()
    labels = [real[n - 1][0] if real[n - 1] else 0 for n in range(1, 11)]
    members = []
    for number, label in enumerate(labels, start=1):
        name = f"ILSVRC2012_val_{number:08d}"
        Image.new("RGB", (300, 200), (number * 20, 100, 50)).save(flat / f"{name}.JPEG")
        members += [(f"{name}.cls", str(label).encode()), (f"{name}.jpg", (flat / f"{name}.JPEG").read_bytes())]
    wnids = sorted(f"n{i:08d}" for i in range(1000))
    archive = fake_devkit(tmp_path, wnids, [wnids[label] for label in labels])
    monkeypatch.setitem(tv_imagenet.ARCHIVE_META, "devkit", (archive.name, hashlib.md5(archive.read_bytes()).hexdigest()))
    wds = tmp_path / "wds"
    wds.mkdir()
    write_tar(wds / "imagenet1k-validation-00.tar", members[:8])
    write_tar(wds / "imagenet1k-validation-01.tar", members[8:])
    torch.save(stand_in_timm_model(1000).state_dict(), tmp_path / "w.pth")
    small = ("--img-size", "64", "--real-labels")
    from_folder = run_validate(tmp_path / "w.pth", flat, "--devkit", archive, *small)
    from_shards = run_validate(tmp_path / "w.pth", wds, *small)
    assert from_shards["layout"] == "shards" and from_shards["real_images"] == from_folder["real_images"] > 0
    assert same_result(from_folder, from_shards)


# ----------------------------------------------------------------------------- files opened


def test_each_loader_worker_opens_each_shard_once(tiny_imagenet, tmp_path):
    """The benchmark's counts: a folder opens a file per image, the shards one per shard and worker."""
    args = ["--data-dir", tiny_imagenet, "--shards-dir", tmp_path / "shards", "--shards", "3", "--rounds", "1",
            "--batch-size", "4", "--img-size", "32"]
    for workers in (0, 2):
        result = json.loads(module_in_this_process(benchmarks.shards, *args, "--workers", workers)
                            .stdout.strip().splitlines()[-1])
        assert result["images"] == 24 and result["folders_opens_per_image"] == 1.0
        assert result["shards"] == 3 and 3 <= result["shards_opens"] <= 3 * max(workers, 1)
        assert result["shards_images_per_s"] > 0 and result["folders_images_per_s"] > 0


# ----------------------------------------------------------------------------- processes


@pytest.mark.slow
def test_two_processes_from_shards_killed_mid_epoch_and_resumed_match_the_folder_bitwise(tiny_imagenet, packed,
                                                                                         tmp_path):
    """Dropout and drop-path on, so the random generators matter; a loader worker per rank
    for the shards, none for the folders (workers change no number)."""
    overrides = last_wins(*TINY_OVERRIDES, "epochs=1", "batch_size=4", "checkpoint.every_steps=2",
                          "model.drop_rate=0.2", "model.drop_path_rate=0.1")
    folders, killed = tmp_path / "folders", tmp_path / "shards"
    run_cli(torchrun(2, "train.py", "--recipe", "demo.yaml", "--data-dir", tiny_imagenet, "--output", folders,
                     *overrides))
    args = ["train.py", "--recipe", "demo.yaml", "--data-dir", packed, "--output", killed,
            *last_wins(*overrides, "data.workers=1")]
    process = start(torchrun(2, *args))
    read_until(process, "step 3 ")  # mid-epoch, a step after the step-2 checkpoint (6 steps an epoch)
    # The whole job at once, like a lost node: this torchrun starts each rank in a process
    # group of its own (with its loader worker), so killing torchrun's group leaves them running.
    for group in {process.pid, *(os.getpgid(pid) for pid in child_pids(process.pid))}:
        os.killpg(group, signal.SIGKILL)
    process.wait()
    resumed = run_cli(torchrun(2, *args, "--resume", "auto"))
    at_step = re.search(r"resumed from \S+ at step (\d+)", resumed.stdout)
    assert at_step and int(at_step.group(1)) in (2, 4), resumed.stdout  # not 6: killed mid-epoch
    assert "inexactly" not in resumed.stdout
    assert_same_weights(folders, killed)
    assert [row["train_loss"] for row in load_checkpoint(folders / "last.pt")["rows"]] == \
           [row["train_loss"] for row in load_checkpoint(killed / "last.pt")["rows"]]
