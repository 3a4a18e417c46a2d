"""ImageNet's downloads written from a set in class folders, for the tests: the official
ILSVRC2012 archives (a tar of per-class tars, a flat val tar, a devkit made with
scipy.io.savemat) and Kaggle's download, unzipped and as a zip."""
import random
import shutil
from pathlib import Path
from typing import List, Tuple

from benchmarks.archives import tar_bytes, write_train_archive, write_zip
from data.sources.folders import find_classes, image_files
from data.sources.labels import KAGGLE_DATA
from tests.test_validate import fake_devkit


def val_names(source: Path) -> List[Tuple[Path, str, str]]:
    """(file, wnid, ILSVRC2012_val_NNNNNNNN.JPEG) of each validation image. The numbers run
    across the classes in turn, so the ground truth is in neither wnid order, and rise within
    a class in the folders' order, so the images sort within their class as in val/<wnid>/."""
    classes = find_classes(source / "val")
    files = {wnid: image_files(source / "val" / wnid) for wnid in classes}
    turns = [(wnid, name) for rank in range(max(map(len, files.values())))
             for wnid in reversed(classes) for name in files[wnid][rank:rank + 1]]
    return [(source / "val" / wnid / name, wnid, f"ILSVRC2012_val_{number:08d}.JPEG")
            for number, (wnid, name) in enumerate(turns, start=1)]


def write_solution(path: Path, source: Path) -> Path:
    with open(path, "w") as handle:
        handle.write("ImageId,PredictionString\n")
        for _, wnid, name in sorted(val_names(source), key=lambda row: row[2]):
            handle.write(f"{name[:-5]},{wnid} 1 2 30 40 {wnid} 5 6 70 80\n")
    return path


def official_archives(source: Path, out: Path, labels: str = "devkit", seed: int = 0) -> Path:
    """ILSVRC2012_img_train.tar (classes and files shuffled), ILSVRC2012_img_val.tar and the
    devkit (labels="devkit"; its md5 is not torchvision's: register it) or Kaggle's CSV."""
    rng = random.Random(seed)
    out.mkdir(parents=True)
    write_train_archive(source / "train", out / "ILSVRC2012_img_train.tar", seed)
    val = val_names(source)
    (out / "ILSVRC2012_img_val.tar").write_bytes(tar_bytes([(name, path.read_bytes())
                                                            for path, _, name in rng.sample(val, len(val))]))
    if labels == "devkit":
        ordered = sorted(val, key=lambda row: row[2])
        made = fake_devkit(out.parent / f"{out.name}-devkit", find_classes(source / "train"),
                           [wnid for _, wnid, _ in ordered])
        shutil.move(made, out / made.name)
    else:
        write_solution(out / "LOC_val_solution.csv", source)
    return out


def kaggle_tree(source: Path, top: Path) -> Path:
    """Kaggle's download unzipped: train/ as class folders, val/ flat, the CSV files at the top."""
    data = top / KAGGLE_DATA
    shutil.copytree(source / "train", data / "train")
    (data / "val").mkdir()
    for path, _, name in val_names(source):
        shutil.copy(path, data / "val" / name)
    write_solution(top / "LOC_val_solution.csv", source)
    (top / "LOC_synset_mapping.txt").write_text("".join(f"{wnid} thing\n" for wnid in find_classes(source / "train")))
    return top


def kaggle_zip(top: Path, path: Path) -> Path:
    """The unzipped tree zipped as Kaggle serves it."""
    files = sorted(p for p in top.rglob("*") if p.is_file() and ".cspresnet_index" not in p.parts)
    return write_zip([(file.relative_to(top).as_posix(), file) for file in files], path)
