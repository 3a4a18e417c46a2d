"""From a recipe to the training and evaluation loaders of one process."""
from dataclasses import dataclass
import torch
from torch.utils.data import DataLoader

from cspresnet.recipe import Recipe, RecipeError

from .gpu_decode import gpu_decode_available, warn_fallback
from .imagenet import ImageFolderDataset, build_imagenet_splits
from .loader import TrainSampler, build_eval_loader, build_train_loader
from .transforms import eval_transform, train_transform


@dataclass
class Loaders:
    train: DataLoader
    train_sampler: TrainSampler
    val: DataLoader
    train_set: ImageFolderDataset
    val_set: ImageFolderDataset


def per_process(global_size: int, world_size: int, key: str) -> int:
    if global_size % world_size:
        raise RecipeError(
            f"recipe key '{key}' is {global_size}, the global batch across {world_size} processes; "
            f"it must be a multiple of {world_size}"
        )
    return global_size // world_size


def build_loaders(recipe: Recipe, rank: int, world_size: int, device: torch.device) -> Loaders:
    d = recipe.data
    decode = d.train_decode
    if decode == "gpu":
        available, reason = gpu_decode_available(device)
        if not available:
            warn_fallback(reason)
            decode = "fast"
    pin_memory = device.type == "cuda"
    train_set, val_set = build_imagenet_splits(
        d.dir,
        train_transform(d.img_size, d.crop_scale, d.crop_ratio, d.train_interpolation, d.hflip,
                        recipe.augment.auto_augment, decode),
        eval_transform(d.eval_img_size, d.eval_crop_pct, d.eval_interpolation, d.eval_decode),
        seed=recipe.seed,
    )
    if len(train_set.classes) != recipe.model.num_classes:
        raise RecipeError(
            f"recipe key 'model.num_classes' is {recipe.model.num_classes} but {d.dir}/train has "
            f"{len(train_set.classes)} class folders; set model.num_classes={len(train_set.classes)}"
        )
    if len(train_set) < recipe.batch_size:
        raise RecipeError(f"{d.dir}/train has {len(train_set)} images, fewer than one global batch "
                          f"(batch_size={recipe.batch_size}); lower batch_size")
    sampler = TrainSampler(len(train_set), per_process(recipe.batch_size, world_size, "batch_size"),
                           world_size, rank, recipe.seed)
    eval_batch = -(-d.eval_batch_size // world_size)
    timeout = recipe.runtime.stop_timeout_s
    val = build_eval_loader(val_set, eval_batch, world_size, rank, d.workers, pin_memory, timeout)
    train = build_train_loader(train_set, sampler, d.workers, pin_memory, timeout)
    return Loaders(train, sampler, val, train_set, val_set)
