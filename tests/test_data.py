import pickle
import random
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from data.fast_decode import load_rgb
from common.errors import DatasetLayoutError
from data.config import DataConfig
from data.dataset import ImageDataset
from data.loaders import build_splits
from data.sources.folders import find_classes, index_split
from data.batches import SharedBatchRing, collate_batch
from data.loaders import loader_options
from data.samplers import EvalSampler, TrainSampler
from data.transforms import eval_transform, train_transform


def identity(image):
    return image


def build_imagenet_splits(root, train, val, seed):
    """Class folders' training and validation sets."""
    return build_splits(DataConfig(dir=root, layout="class-folders"), train, val, seed)


def test_classes_are_sorted_folder_names_and_labels_follow_them(tiny_imagenet):
    train, val = build_imagenet_splits(str(tiny_imagenet), identity, identity, seed=0)
    assert train.classes == ["n00000000", "n00000001", "n00000002"] == val.classes
    for path, target in train.samples + val.samples:
        assert f"/{train.classes[target]}/" in path
    assert (len(train), len(val)) == (24, 15)


def test_every_image_mode_becomes_rgb(tmp_path):
    base = Image.new("RGB", (40, 30), (200, 30, 90))
    base.convert("L").save(tmp_path / "gray.JPEG", "JPEG")
    base.convert("CMYK").save(tmp_path / "cmyk.JPEG", "JPEG")
    base.save(tmp_path / "png_named_jpeg.JPEG", "PNG")
    base.convert("RGBA").save(tmp_path / "rgba.png")
    base.convert("P").save(tmp_path / "palette.png")
    base.convert("I;16").save(tmp_path / "sixteen.png")
    for path in sorted(tmp_path.iterdir()):
        image = load_rgb(path.read_bytes())
        assert image.mode == "RGB" and image.size == (40, 30), path.name
    cmyk = load_rgb((tmp_path / "cmyk.JPEG").read_bytes()).getpixel((20, 15))
    assert abs(cmyk[0] - 200) < 20 and abs(cmyk[1] - 30) < 20  # colours survive the CMYK round trip


def test_non_image_and_hidden_files_are_ignored(tmp_path, tiny_imagenet):
    root = tmp_path / "copy"
    shutil.copytree(tiny_imagenet, root)
    (root / "train" / "n00000000" / ".DS_Store").write_bytes(b"\0\1")
    (root / "train" / "n00000000" / "Thumbs.db").write_bytes(b"\0\1")
    (root / "train" / "n00000000" / "notes.txt").write_text("hi")
    (root / "train" / ".hidden_class").mkdir()
    classes = find_classes(root / "train")
    assert len(classes) == 3
    assert len(index_split(root / "train", classes)) == 24


@pytest.mark.parametrize("breakage, message", [
    ("no_root", "does not exist"),
    ("no_val", "val does not exist"),
    ("flat_val", "holds 2 image files directly: a flat folder"),
    ("empty_class", "1 of 3 classes have no images"),
    ("extra_val_class", "class folders that the training classes lack"),
])
def test_layout_errors_show_the_expected_layout(tmp_path, tiny_imagenet, breakage, message):
    root = tmp_path / "copy"
    if breakage != "no_root":
        shutil.copytree(tiny_imagenet, root)
    if breakage == "no_val":
        shutil.rmtree(root / "val")
    elif breakage == "flat_val":
        shutil.rmtree(root / "val")
        (root / "val").mkdir()
        for name in ("ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG"):
            Image.new("RGB", (8, 8)).save(root / "val" / name, "JPEG")
    elif breakage == "empty_class":
        for path in (root / "train" / "n00000001").iterdir():
            path.unlink()
    elif breakage == "extra_val_class":
        shutil.copytree(root / "val" / "n00000000", root / "val" / "n99999999")
    with pytest.raises(DatasetLayoutError, match=message) as error:
        build_imagenet_splits(str(root), identity, identity, seed=0)
    assert "DIR/train/<wnid>/*.JPEG" in str(error.value)


def test_empty_data_dir_says_how_to_set_it():
    with pytest.raises(DatasetLayoutError, match="pass --data-dir"):
        build_imagenet_splits("", identity, identity, seed=0)


def test_train_sampler_shards_disjointly_and_reshuffles():
    samplers = [TrainSampler(103, batch_size=4, world_size=3, rank=r, seed=5) for r in range(3)]
    batches = [list(s) for s in samplers]
    assert [len(b) for b in batches] == [8, 8, 8] == [len(s) for s in samplers]  # 103 // 12 steps
    assert all(len(batch) == 4 for rank in batches for batch in rank)
    indices = [index for rank in batches for batch in rank for _, index in batch]
    assert len(indices) == len(set(indices)) == 96
    assert indices and all(epoch == 0 for rank in batches for batch in rank for epoch, _ in batch)
    again = [list(TrainSampler(103, 4, 3, r, seed=5)) for r in range(3)]
    assert again == batches
    samplers[0].set_epoch(1)
    assert [i for b in samplers[0] for _, i in b] != [i for b in batches[0] for _, i in b]


def test_one_train_sampler_pass_runs_through_several_epochs_as_separate_passes_would():
    sampler = TrainSampler(103, batch_size=4, world_size=3, rank=1, seed=5)
    separate = []
    for epoch, start_step in ((2, 5), (3, 0), (4, 0)):
        sampler.set_epoch(epoch, start_step)
        separate += list(sampler)
    sampler.set_epoch(2, 5, end_epoch=5)
    assert list(sampler) == separate and len(sampler) == len(separate) == 3 + 8 + 8
    assert [key[0] for batch in separate for key in batch] == [2] * 12 + [3] * 32 + [4] * 32
    with pytest.raises(ValueError, match="end_epoch 2 must come after epoch 2"):
        sampler.set_epoch(2, end_epoch=2)
    with pytest.raises(ValueError, match="start_step 9 is outside the epoch's 8 steps"):
        sampler.set_epoch(2, 9, end_epoch=5)


def test_train_sampler_needs_one_global_batch():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        TrainSampler(10, batch_size=4, world_size=3, rank=0, seed=0)


def test_eval_sampler_counts_every_image_exactly_once():
    shares = [list(EvalSampler(15, world_size=2, rank=r)) for r in range(2)]
    assert [len(s) for s in shares] == [8, 7]
    assert sorted(shares[0] + shares[1]) == list(range(15))


# RandAugment draws its ops from NumPy's generator, the crop and flip only from Python's and torch's.
WITH_AND_WITHOUT_RANDAUGMENT = pytest.mark.parametrize("options", [
    dict(), dict(auto_augment="rand-m9-mstd0.5"), dict(auto_augment="rand-m9-mstd0.5", decode="fast")])


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@WITH_AND_WITHOUT_RANDAUGMENT
def test_augmentation_is_a_function_of_seed_epoch_and_index(tiny_imagenet, options):
    train, _ = build_imagenet_splits(str(tiny_imagenet), train_transform(32, **options), identity, seed=3)
    assert train.transform.uses_numpy_random == ("auto_augment" in options)
    seed_all(0)
    first = [train[(0, i)][0] for i in range(6)]
    seed_all(999)
    assert all(torch.equal(train[(0, i)][0], image) for i, image in enumerate(first))  # global state does not matter
    assert not torch.equal(train[(1, 5)][0], first[5])  # a new epoch draws a new crop
    other_seed = ImageDataset(train.samples, train.classes, train.transform, seed=4)
    assert not torch.equal(other_seed[(0, 5)][0], first[5])


@WITH_AND_WITHOUT_RANDAUGMENT
def test_sampling_leaves_global_rng_untouched(tiny_imagenet, options):
    train, _ = build_imagenet_splits(str(tiny_imagenet), train_transform(32, **options), identity, seed=3)
    seed_all(1)
    expected = (torch.rand(3), random.random(), np.random.rand())
    seed_all(1)
    train[(0, 2)]
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1] and np.random.rand() == expected[2]


def test_a_batch_crosses_processes_with_its_labels_as_lists():
    """Each tensor would cross through a shared-memory file of its own (~0.6 ms a batch each)."""
    batch = collate_batch([(torch.ones(2, 2, 3, dtype=torch.uint8), 3, 7, None), (None, 1, 8, "OSError: broken")])
    assert batch.__getstate__()["targets"] == [3] and batch.__getstate__()["indices"] == [7]
    copy = pickle.loads(pickle.dumps(batch))
    assert copy.targets.dtype == copy.indices.dtype == torch.long
    assert torch.equal(copy.targets, batch.targets) and torch.equal(copy.indices, batch.indices)
    assert torch.equal(copy.images, batch.images) and copy.unreadable == [(8, "OSError: broken")]


class RecordingRing(SharedBatchRing):
    """Also reports, from inside the worker, where the batch was stacked."""

    def __call__(self, samples):
        batch = super().__call__(samples)
        return batch, batch.images.is_shared(), batch.images.untyped_storage().data_ptr()


def test_workers_stack_into_a_ring_of_reused_shared_buffers(tiny_imagenet):
    """Fresh shared memory for every batch costs a page fault per 4 KiB; the ring does not."""
    train, _ = build_imagenet_splits(str(tiny_imagenet), train_transform(32, decode="fast"), identity, seed=0)
    keys = [[(0, i), (0, i + 1)] for i in range(0, 24, 2)]
    loader = DataLoader(train, batch_sampler=keys, num_workers=1, prefetch_factor=2, collate_fn=RecordingRing(2))
    received = list(loader)  # each batch is checked against the main process's below, not used after
    addresses = [address for _, shared, address in received]
    assert all(shared for _, shared, _ in received)
    assert len(set(addresses[:4])) == 4 and addresses[4:] == addresses[:-4]  # prefetch 2 + 2 buffers, reused
    # (the images were overwritten since: compare the batches as they arrive instead)
    for key, batch in zip(keys, DataLoader(train, batch_sampler=keys, num_workers=1, prefetch_factor=2,
                                           collate_fn=SharedBatchRing(2))):
        assert torch.equal(batch.images, collate_batch([train[k] for k in key]).images)


def test_a_yielded_batch_stays_intact_while_the_workers_run_ahead(tiny_imagenet):
    train, _ = build_imagenet_splits(str(tiny_imagenet), train_transform(32, decode="fast"), identity, seed=0)
    loader = DataLoader(train, batch_size=1, **loader_options(workers=2, pin_memory=False))
    previous = None
    for batch in loader:
        if previous is not None:
            time.sleep(0.05)  # every worker fills all the buffers it may
            assert torch.equal(previous.images, previous_copy)
        previous, previous_copy = batch, batch.images.clone()


def test_transform_output_is_uint8_hwc(tiny_imagenet):
    train, val = build_imagenet_splits(str(tiny_imagenet), train_transform(48), eval_transform(40, 0.875), seed=0)
    image, target, index, error = train[(0, 0)]
    assert image.dtype == torch.uint8 and image.shape == (48, 48, 3) and isinstance(target, int)
    assert (index, error) == (0, None)
    assert val[3][0].shape == (40, 40, 3)


def test_unreadable_batch_fraction():
    from common.errors import UnreadableDataError
    from data.batches import Batch
    from data.unreadable import UnreadableImages

    class Fake:
        samples = [(f"/d/{i}.JPEG", 0) for i in range(100)]

        def __len__(self):
            return 100

    guard = UnreadableImages(Fake().samples, max_batch_fraction=0.5, max_fraction=0.5, min_allowed=0)
    batch = lambda good, bad: Batch(torch.zeros(good, 2, 2, 3, dtype=torch.uint8), torch.zeros(good, dtype=torch.long),  # noqa: E731
                                    torch.arange(good), [(i, "OSError: broken") for i in bad])
    guard.check(batch(3, [7]))
    guard.check(batch(2, [7, 8]))  # 2 of 4: at the limit, allowed
    assert guard.epoch_count == 3 and guard.seen == {7, 8}
    with pytest.raises(UnreadableDataError, match="3 of the 4 images of one batch"):
        guard.check(batch(1, [1, 2, 3]))


def test_the_unreadable_budget_has_a_floor_and_its_message_names_the_keys():
    from data.batches import Batch
    from common.errors import UnreadableDataError
    from data.unreadable import UnreadableImages

    hundred = [(f"/d/{i}.JPEG", 0) for i in range(100)]
    guard = UnreadableImages(hundred, max_batch_fraction=0.5, max_fraction=0.001, min_allowed=2)
    one_bad = lambda index: Batch(torch.zeros(3, 2, 2, 3, dtype=torch.uint8), torch.zeros(3, dtype=torch.long),  # noqa: E731
                                  torch.arange(3), [(index, "OSError: broken")])
    guard.check(one_bad(7))
    guard.check(one_bad(8))  # 0.001 x 100 allows 0.1 files; the floor allows 2
    with pytest.raises(UnreadableDataError, match=r"3 distinct training images could not be decoded, more than the "
                                                  r"2 allowed \(the larger of data.min_unreadable_allowed=2 and "
                                                  r"data.max_unreadable_fraction=0.001 x 100 images\)"):
        guard.check(one_bad(9))


def test_the_default_budget_lets_a_handful_of_bad_files_through_a_small_set_and_keeps_imagenets():
    from data.batches import Batch
    from data.config import DataConfig
    from common.errors import UnreadableDataError
    from data.unreadable import UnreadableImages

    config = DataConfig()
    def budget(images):
        return UnreadableImages([(f"/d/{i}.JPEG", 0) for i in range(images)], config.max_unreadable_batch_fraction,
                                config.max_unreadable_fraction, config.min_unreadable_allowed)

    assert budget(1_281_167).limit == 1281  # ImageNet: 0.1%
    small = budget(600)
    assert small.limit == 10
    one_bad = lambda index: Batch(torch.zeros(3, 2, 2, 3, dtype=torch.uint8), torch.zeros(3, dtype=torch.long),  # noqa: E731
                                  torch.arange(3), [(index, "OSError: broken")])
    for index in range(10):
        small.check(one_bad(index))  # a scraped set's handful: trained through, counted
    assert small.epoch_count == 10
    with pytest.raises(UnreadableDataError, match="11 distinct training images could not be decoded"):
        small.check(one_bad(10))


def test_links_that_lead_nowhere_are_listed_and_read_as_unreadable_files(tmp_path):
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(folder / "good.JPEG")
    (folder / "loop.JPEG").symlink_to(folder / "loop.JPEG")  # a link to itself
    (folder / "dangling.JPEG").symlink_to(tmp_path / "gone.JPEG")
    (tmp_path / "train" / "b").symlink_to(tmp_path / "train" / "b")  # a class folder that loops
    with pytest.raises(DatasetLayoutError, match="train/b cannot be followed .Too many levels of symbolic links."):
        find_classes(tmp_path / "train")
    (tmp_path / "train" / "b").unlink()
    samples = index_split(tmp_path / "train", ["a"])
    assert [p.rsplit("/", 1)[1] for p, _ in samples] == ["dangling.JPEG", "good.JPEG", "loop.JPEG"]
    dataset = ImageDataset(samples, ["a"], eval_transform(32, 0.875))
    reasons = [dataset[i][3] for i in range(3)]
    assert "No such file" in reasons[0] and reasons[1] is None and "Too many levels of symbolic links" in reasons[2]
