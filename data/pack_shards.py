"""Pack an ImageNet-layout folder into WebDataset tar shards, in timm's layout (docs/shards.md).

    python -m data.pack_shards --data-dir /data/imagenet --out /data/imagenet-wds
    python -m data.pack_shards --data-dir sample_imagenet --out sample_shards --train-shards 8 --val-shards 2
    python -m data.pack_shards --data-dir /data/ilsvrc2012 --out /data/imagenet-wds    (ImageNet as downloaded)
"""
import argparse
import hashlib
import io
import json
import logging
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from common.errors import DatasetLayoutError
from common.files import remove_leftovers, write_atomically
from common.progress import progress

from .config import DataConfig
from .dataset import ImageDataset
from .loaders import build_splits
from .sample_index import Sample, absolute
from .sources import source_of
from .sources.folders import find_classes, index_split
from .sources.tars import INFO_NAME

log = logging.getLogger(__name__)

PLAN_NAME = "_pack.json"
# The shuffle rule, recorded in _pack.json: a pack begun under another is not continued (two orders in one set).
SHUFFLE = "randperm from sha256('data.pack_shards <split> seed <seed>')"
SPLITS = {"train": "train", "val": "validation"}  # source folder -> the split's name in the shards (timm's)


class PackError(ValueError):
    """The pack cannot be made as asked; the message says why."""


@dataclass
class SplitPlan:
    split: str  # train | validation
    source: ImageDataset  # its samples, (file, class index), and read(i) their bytes
    keys: List[str]  # each sample's key in the shards
    shards: Dict[str, List[int]]  # per shard's file name, its samples (positions in source.samples) in writing order


def source_sets(root: Path, splits: Sequence[str]) -> Dict[str, ImageDataset]:
    """Each split, read(i) giving the bytes that training would read. Class folders' train/ alone needs no val/."""
    if list(splits) == ["train"] and source_of(root).layout == "class-folders":
        classes = find_classes(root / "train")
        return {"train": ImageDataset(index_split(root / "train", classes), classes, None)}
    train, val = build_splits(DataConfig(dir=str(root)), None, None, 0)
    return {folder: train if folder == "train" else val for folder in splits}


def sample_keys(samples: Sequence[Sample], classes: List[str], where: Path) -> List[str]:
    """The file names without extension; prefixed with the class where they repeat."""
    stems = [Path(path).stem for path, _ in samples]
    dotted = [path for (path, _), stem in zip(samples, stems) if "." in stem]
    if dotted:
        raise PackError(f"{len(dotted)} file names in {where} have a dot before their extension, e.g. {dotted[0]}: "
                        f"a WebDataset key ends at the first dot, so rename them")
    if len(set(stems)) == len(stems):
        return stems
    keys = [f"{classes[target]}/{stem}" for stem, (_, target) in zip(stems, samples)]
    if len(set(keys)) < len(keys):
        seen = set()
        twice = next(path for key, (path, _) in zip(keys, samples) if key in seen or seen.add(key))
        raise PackError(f"two files in one class of {where} share a name without extension, e.g. {twice}")
    log.info("file names repeat across the classes of %s: keys are <class>/<name>", where)
    return keys


def plan_split(split: str, source: ImageDataset, keys: List[str], count: int, seed: int, name: str) -> SplitPlan:
    """`count` shards (fewer if there are fewer samples) of near-equal size, shuffled by `seed`."""
    # A stream of its own, not the training sampler's (docs/shards.md, "The pack command")
    digest = hashlib.sha256(f"data.pack_shards {split} seed {seed}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    count = min(count, len(source))
    order = torch.randperm(len(source), generator=generator).tolist()
    bounds = [len(source) * i // count for i in range(count + 1)]
    digits = max(2, len(str(count - 1)))
    return SplitPlan(split, source, keys, {f"{name}-{split}-{i:0{digits}d}.tar": order[bounds[i]:bounds[i + 1]]
                                           for i in range(count)})


def claim_output(out: Path, plans: List[SplitPlan], root: Path, name: str, seed: int) -> None:
    """Start a pack in `out`, or continue the same one; refuse to mix two packs. The digest changes with anything
    that changes the shards' contents: files, classes, seed, counts, the shuffle rule."""
    digest = hashlib.sha1(f"{name}\n{seed}\n{SHUFFLE}\n".encode())
    for plan in plans:
        digest.update(f"{plan.split} {len(plan.shards)}\n".encode())
        for (path, target), key in zip(plan.source.samples, plan.keys):
            digest.update(f"{Path(path).relative_to(root)}\t{target}\t{key}\n".encode())
    record = dict(digest=digest.hexdigest(), source=str(root), seed=seed, name=name,
                  shards={plan.split: len(plan.shards) for plan in plans}, shuffle=SHUFFLE)
    out.mkdir(parents=True, exist_ok=True)
    marker = out / PLAN_NAME
    if marker.is_file():
        held = json.loads(marker.read_text())
        if held.get("digest") != record["digest"]:
            older = held.get("shuffle") != SHUFFLE
            why = ("begun by an older version of this command, which shuffled the samples in another order" if older
                   else "other files, classes, --seed, --name or shard counts")
            raise PackError(f"{out} holds another pack ({why}; see {marker}): pack into an empty folder, or delete "
                            f"{out} and run this command again")
        return
    if any(out.glob("*.tar")):
        raise PackError(f"{out} already holds .tar files that this command did not write: pack into an empty folder")
    write_atomically(marker, json.dumps(record, indent=1) + "\n")


def write_shard(out: Path, plan: SplitPlan, filename: str) -> None:
    """One shard, whole or not at all: a rerun after a kill writes it again."""
    def write(handle) -> None:
        with tarfile.open(fileobj=handle, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for position in plan.shards[filename]:
                path, target = plan.source.samples[position]
                suffix = Path(path).suffix.lower()
                extension = "jpg" if suffix in (".jpg", ".jpeg") else suffix.lstrip(".")
                for member, data in (("cls", str(target).encode()), (extension, plan.source.read(position))):
                    info = tarfile.TarInfo(f"{plan.keys[position]}.{member}")
                    info.size, info.mode, info.mtime = len(data), 0o444, 0  # the same input gives the same bytes
                    tar.addfile(info, io.BytesIO(data))
    write_atomically(out / filename, write, durable=True)


def pack(root: Path, out: Path, name: str = "imagenet1k", seed: int = 0, train_shards: int = 1024,
         val_shards: int = 64, splits: Sequence[str] = ("train", "val"), threads: int = 8) -> Dict:
    """Pack the splits of `root` into `out`; returns what _info.json says."""
    root = absolute(root)
    if not root.exists():
        raise PackError(f"{root} does not exist")
    sources = source_sets(root, splits)
    classes = next(iter(sources.values())).classes
    plans = [plan_split(SPLITS[folder], source, sample_keys(source.samples, classes, root / folder),
                        train_shards if folder == "train" else val_shards, seed, name)
             for folder, source in sources.items()]
    claim_output(out, plans, root, name, seed)
    remove_leftovers(out)  # a shard being written when an earlier pack was killed
    todo = [(plan, filename) for plan in plans for filename in plan.shards if not (out / filename).is_file()]
    kept = sum(len(plan.shards) for plan in plans) - len(todo)
    if kept:
        log.info("continuing a pack in %s: %d shard(s) already written are kept", out, kept)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(progress(pool.map(lambda job: write_shard(out, *job), todo), f"packing into {out}", len(todo), "shards"))
    # timm's _info.json fields (its wds reader takes the split sizes from here), and the class names
    written = {plan.split: dict(name=plan.split, num_samples=len(plan.source), filenames=list(plan.shards),
                                shard_lengths=[len(shard) for shard in plan.shards.values()]) for plan in plans}
    info = dict(name=name, splits=written, num_classes=len(classes), classes=classes)
    write_atomically(out / INFO_NAME, json.dumps(info, indent=1) + "\n")
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, type=Path,
                        help="ImageNet root with train/ and val/, or as downloaded (docs/archives.md)")
    parser.add_argument("--out", required=True, type=Path, help="the folder for the shards (empty, or this pack's)")
    parser.add_argument("--name", default="imagenet1k", help="the shards' name prefix (default: imagenet1k, as timm's)")
    parser.add_argument("--seed", type=int, default=0, help="the shuffle across shards (default 0)")
    parser.add_argument("--train-shards", type=int, default=1024, help="default 1024 (timm's)")
    parser.add_argument("--val-shards", type=int, default=64, help="default 64 (timm's)")
    parser.add_argument("--splits", nargs="+", choices=sorted(SPLITS), default=["train", "val"])
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="shards written at once")
    args = parser.parse_args()
    if args.train_shards < 1 or args.val_shards < 1 or args.threads < 1 or args.seed < 0:
        parser.error("--train-shards, --val-shards and --threads must be >= 1, --seed >= 0")
    if not args.name or "/" in args.name:
        parser.error(f"--name must be a file name prefix (shards are <name>-<split>-NNNN.tar), got {args.name!r}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        info = pack(args.data_dir.expanduser(), args.out.expanduser(), args.name, args.seed, args.train_shards,
                    args.val_shards, args.splits, args.threads)
    except (PackError, DatasetLayoutError, OSError) as exc:
        parser.exit(2, f"error: {exc}\n")
    sizes = ", ".join(f"{split['num_samples']} {name} images in {len(split['filenames'])} shards"
                      for name, split in info["splits"].items())
    print(f"packed {sizes} into {args.out} (seed {args.seed})")


if __name__ == "__main__":
    main()
