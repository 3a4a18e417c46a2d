"""docs/adding-a-source.md's example, run as the page writes it: its module and its registry row
read Caffe's list files, in the class folders' order, and data.layout names it."""
import re
import shutil
import sys
import types

import pytest

import data.sources
from common.errors import DatasetLayoutError
from cspresnet.recipe_files import load_recipe
from data.sources import Source, folders, training_splits
from tests.helpers import REPO


@pytest.fixture
def caffe_lists(monkeypatch):
    """The page's module as data.sources.caffe_lists, and its row first in the registry."""
    module_code, row_code = re.findall(r"```python\n(.*?)```", (REPO / "docs/adding-a-source.md").read_text(), re.S)
    module = types.ModuleType("data.sources.caffe_lists")
    module.__package__ = "data.sources"
    exec(compile(module_code, "docs/adding-a-source.md", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    row = eval(row_code.strip().rstrip(","), {"Source": Source, "caffe_lists": module})
    monkeypatch.setattr(data.sources, "SOURCES", (row, *data.sources.SOURCES))
    monkeypatch.setattr(data.sources, "BY_LAYOUT", {"caffe-lists": row, **data.sources.BY_LAYOUT})
    return row


def as_caffe_lists(tiny_imagenet, root):
    """tiny_imagenet's images in Caffe's layout: train/ as it is, val/ flat, three text files."""
    classes = folders.find_classes(tiny_imagenet / "train")
    shutil.copytree(tiny_imagenet / "train", root / "train")
    (root / "val").mkdir()
    train, val = [], []
    for label, wnid in enumerate(classes):
        train += [f"{wnid}/{path.name} {label}" for path in (root / "train" / wnid).iterdir()]
        for path in (tiny_imagenet / "val" / wnid).iterdir():
            shutil.copy(path, root / "val" / f"{wnid}_{path.name}")
            val.append(f"{wnid}_{path.name} {label}")
    (root / "synsets.txt").write_text("\n".join(classes) + "\n")
    (root / "train.txt").write_text("\n".join(reversed(train)) + "\n")  # any order: the source sorts
    (root / "val.txt").write_text("\n".join(val) + "\n")
    return classes


def test_the_pages_source_reads_caffes_lists_in_the_class_folders_order(caffe_lists, tiny_imagenet, tmp_path):
    classes = as_caffe_lists(tiny_imagenet, tmp_path)
    recipe = load_recipe("demo.yaml", ["data.layout=caffe-lists"], data_dir=str(tmp_path))
    for config in (recipe.data, load_recipe("demo.yaml", data_dir=str(tmp_path)).data):  # named, and found
        train, val, found = training_splits(config, seed=0)
        assert found == classes
        assert list(train) == list(folders.cached_index(tmp_path / "train", classes))
        assert len(val) == 15 and [label for _, label in val] == sorted(label for _, label in val)
    assert not caffe_lists.holds(tiny_imagenet)


def test_a_bad_line_in_a_list_is_one_error_that_names_the_file_and_line(caffe_lists, tiny_imagenet, tmp_path):
    as_caffe_lists(tiny_imagenet, tmp_path)
    with open(tmp_path / "val.txt", "a") as lines:
        lines.write("ILSVRC2012_val_00000001.JPEG 7\n")
    config = load_recipe("demo.yaml", data_dir=str(tmp_path)).data
    with pytest.raises(DatasetLayoutError, match=r"val.txt, line 16: expected 'PATH LABEL' with LABEL in 0..2, "
                                                 r"got 'ILSVRC2012_val_00000001.JPEG 7'"):
        training_splits(config, seed=0)


def test_an_unknown_layout_names_the_registrys(tmp_path):
    from common.errors import RecipeError
    with pytest.raises(RecipeError, match="recipe key 'data.layout' must be one of auto, kaggle-zip, kaggle, "
                                          "class-folders, archives, shards, got 'caffe'"):
        load_recipe("demo.yaml", ["data.layout=caffe"])
