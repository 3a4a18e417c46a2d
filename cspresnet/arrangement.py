"""How one update's global batch is cut: processes x passes x images per pass, and how many images each
BatchNorm normalises over (darknet's subdivisions: docs/recipes.md, docs/training.md)."""
import dataclasses
from dataclasses import dataclass
from typing import Optional

from common.errors import RecipeError

from .recipe import Recipe


@dataclass(frozen=True)
class Arrangement:
    global_batch: int  # images per weight update, all processes
    processes: int
    passes: int  # forward/backward passes per update in each process (gradient accumulation)
    images_per_pass: int  # per process
    bn_group: int  # processes whose BatchNorm statistics are pooled (SyncBatchNorm); 1: each its own
    micro_batch_size: int  # the recipe's images per pass (0: one pass); a process may hold fewer

    @property
    def bn_images(self) -> int:
        return self.images_per_pass * self.bn_group

    def describe(self) -> str:
        line = (f"global batch {self.global_batch} = {counted(self.processes, 'process', 'processes')} x "
                f"{counted(self.passes, 'pass', 'passes')} x {self.images_per_pass} images; "
                f"BatchNorm over {self.bn_images}")
        if self.bn_group > 1:
            line += f" (SyncBatchNorm over groups of {self.bn_group} processes)"
        if not self.short_of_micro_batch:
            return line
        share, micro = self.images_per_pass, self.micro_batch_size
        line += (f", not the recipe's micro_batch_size {micro}: each process has {share} images, fewer than one "
                 f"pass, so it takes them in one")
        pooled = micro // share
        if micro % share == 0 and self.processes % pooled == 0:
            return f"{line}; to normalise over {micro} add runtime.sync_bn=true runtime.sync_bn_group_size={pooled}"
        return f"{line}; to normalise over {micro}, raise batch_size to a multiple of {micro * self.processes}"

    @property
    def short_of_micro_batch(self) -> bool:
        return self.bn_images < self.micro_batch_size


def counted(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def arrange(recipe: Recipe, world_size: int) -> Arrangement:
    """Or a RecipeError that names the global batch, the processes, the images per pass and what would fit."""
    batch, micro = recipe.batch_size, recipe.micro_batch_size
    share = batch // world_size
    if batch % world_size or share == 0:
        raise RecipeError(f"recipe key 'batch_size' is {batch}, the global batch, which {world_size} processes "
                          f"cannot share equally; it must be a multiple of {world_size}")
    images = min(micro, share) if micro else share  # a share smaller than a pass is one pass, said at start
    if share % images:
        raise RecipeError(f"global batch {batch} cannot be cut into {counted(world_size, 'process', 'processes')} x "
                          f"whole passes x {micro} images (recipe keys 'batch_size', 'micro_batch_size'): each process "
                          f"has {share} images, not a multiple of {micro}: set micro_batch_size to a divisor of "
                          f"{share}, or 0 (one pass)")
    if recipe.augment.mixing and images % 2:
        raise RecipeError(f"global batch {batch} = {counted(world_size, 'process', 'processes')} x {share} images "
                          f"in one pass: mixup and cutmix need an even number of images per pass; use a global "
                          f"batch that is a multiple of {2 * world_size}")
    if recipe.runtime.ddp_static_graph and world_size > 1 and share // images > 1:
        raise RecipeError(f"recipe key 'runtime.ddp_static_graph' cannot be true with gradient accumulation "
                          f"({share // images} passes per update here): torch's DDP fails an internal assert on "
                          f"the first update, and would stop averaging gradients after it (pytorch/pytorch#143580, "
                          f"#187732); set micro_batch_size=0 or {share} (one pass), or ddp_static_graph=false")
    bn_group = (recipe.runtime.sync_bn_group_size or world_size) if recipe.runtime.sync_bn else 1
    if world_size % bn_group:
        raise RecipeError(f"recipe key 'runtime.sync_bn_group_size' is {bn_group} but the job has "
                          f"{counted(world_size, 'process', 'processes')}; it must divide {world_size} "
                          f"(0: one group of all)")
    return Arrangement(batch, world_size, share // images, images, bn_group, micro)


def on_another_count(recipe: Recipe, now: Arrangement, processes: int, batch: int) -> Optional[str]:
    """A resume saved by `processes` processes at global `batch`: the same updates go on when each pass is still one
    BatchNorm group of the same images (their draws are seeded by the group: engine.seed_draws); else what changed."""
    if processes == now.processes:
        return None
    saved = f"it was saved by {counted(processes, 'process', 'processes')}, this run has {now.processes}"
    try:
        then = arrange(dataclasses.replace(recipe, batch_size=batch), processes)
    except RecipeError:
        then = None
    if then is not None and then.bn_group == now.bn_group == 1 and then.images_per_pass == now.images_per_pass:
        return (f"{saved}: the same updates go on (the same images, BatchNorm groups of {now.bn_images} and random "
                f"draws); only the floating-point order of the gradient sum differs")
    was = f"{then.bn_images} images" if then is not None else "another cut"
    return (f"{saved}: BatchNorm groups were {was} and are now {now.bn_images} images (or pooled otherwise by "
            f"SyncBatchNorm), so the updates differ from the uninterrupted run's; a fixed micro_batch_size keeps "
            f"the groups on any count (docs/training.md, \"Changing the number of GPUs\")")
