"""A recipe as typed dataclasses, one per section, each checking its own values once, so that a typo or an
impossible value stops the run before any data is read, naming the key and what it allows; and what a resume
compares between two recipes. Reading one from its YAML files and overrides: recipe_files.py."""
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

import yaml

from common.errors import RecipeError
from common.recipe_fields import KeyName, recipe_key, require, setting
from data.config import AugmentConfig, DataConfig
from data.sources import layouts


@dataclass
class ModelConfig:
    num_classes: Union[int, Literal["auto"]] = 1000  # auto: the number of class folders in train/
    drop_rate: float = 0.0  # dropout before the classifier
    drop_path_rate: float = 0.0  # stochastic depth, linear over the 13 blocks
    # start a new run (never a resume) from these weights, not the random init: docs/finetune.md. "": from scratch
    initial_weights: str = setting("", affects_results=False)
    # which weights of our checkpoints; auto: EMA when present
    initial_weights_kind: Literal["auto", "model", "ema"] = setting("auto", affects_results=False)
    # The file's SHA-256, or its first 8+ hex digits: checked when set, filled in as the run starts.
    initial_weights_sha256: str = setting("", affects_results=False)
    linear_probe: bool = False  # train the classifier only: the backbone frozen and in eval mode

    def check(self, key: KeyName = recipe_key("model")) -> None:
        require(self.num_classes == "auto" or self.num_classes >= 1, key("num_classes"), ">= 1 or auto",
                self.num_classes)
        require(0.0 <= self.drop_rate < 1.0, key("drop_rate"), "in [0, 1)", self.drop_rate)
        require(0.0 <= self.drop_path_rate < 1.0, key("drop_path_rate"), "in [0, 1)", self.drop_path_rate)
        for name in ("initial_weights_kind", "initial_weights_sha256", "linear_probe"):
            if getattr(self, name) != getattr(ModelConfig(), name) and not self.initial_weights:
                raise RecipeError(f"{key(name)} only applies with model.initial_weights (a weights file), which is "
                                  f"not set" + (": a frozen random backbone learns nothing"
                                                if name == "linear_probe" else ""))
        require(self.initial_weights_sha256 == "" or re.fullmatch(r"[0-9a-f]{8,64}", self.initial_weights_sha256)
                is not None, key("initial_weights_sha256"), "'' or 8 to 64 lowercase hex digits (a SHA-256 or its "
                "start)", self.initial_weights_sha256)


@dataclass
class OptimConfig:
    name: Literal["sgd", "rmsproptf"] = "sgd"  # rmsproptf: timm's RMSpropTF (TensorFlow 1 behaviour)
    lr: float = 0.1  # for a global batch of reference_batch_size
    reference_batch_size: int = 128
    lr_scaling: Literal["linear", "none"] = "linear"  # what a different global batch does to lr
    momentum: float = 0.9
    nesterov: bool = setting(False, only_for="sgd")
    # SGD's kernels; fused: a skipped step costs no host sync (docs/performance.md). RMSpropTF has only a loop.
    kernel: Literal["fused", "foreach", "for-loop"] = setting("fused", only_for="sgd")
    eps: float = setting(1e-3, only_for="rmsproptf")
    alpha: float = setting(0.9, only_for="rmsproptf")  # decay of the squared-gradient average
    weight_decay: float = 5e-4
    decay_norm_and_bias: bool = False  # False: no weight decay on BatchNorm and bias parameters

    def check(self, key: KeyName = recipe_key("optim")) -> None:
        require(self.lr > 0.0, key("lr"), "> 0", self.lr)
        require(self.reference_batch_size >= 1, key("reference_batch_size"), ">= 1", self.reference_batch_size)
        require(0.0 <= self.momentum < 1.0, key("momentum"), "in [0, 1)", self.momentum)
        require(self.weight_decay >= 0.0, key("weight_decay"), ">= 0", self.weight_decay)
        require(not self.nesterov or self.momentum > 0, key("nesterov"), "false when optim.momentum is 0",
                self.nesterov)
        check_variants(self, "optim")
        require(self.eps > 0.0, key("eps"), "> 0", self.eps)
        require(0.0 < self.alpha < 1.0, key("alpha"), "in (0, 1)", self.alpha)


@dataclass
class ScheduleConfig:
    name: Literal["darknet_poly", "step", "linear"] = "darknet_poly"
    # darknet_poly: lr * (it/burn_in)^power during burn-in, then lr * (1 - it/total)^power
    # burn_in_iters is counted at reference_batch_size: scaled to keep the same number of images
    burn_in_iters: int = setting(1000, only_for="darknet_poly")
    power: float = setting(4.0, only_for="darknet_poly")
    # step (timm's StepLRScheduler, per iteration): linear warmup from warmup_lr, then lr * decay_rate^floor(epochs
    # / decay_epochs); linear (FFCV's "cyclic"): the same warmup, then down in a straight line to 0 at the run's end
    warmup_epochs: float = setting(0.0, only_for=("step", "linear"))
    warmup_lr: float = setting(1e-6, only_for=("step", "linear"))
    decay_epochs: float = setting(2.4, only_for="step")
    decay_rate: float = setting(0.97, only_for="step")

    def check(self, key: KeyName = recipe_key("schedule")) -> None:
        check_variants(self, "schedule")
        require(self.burn_in_iters >= 0, key("burn_in_iters"), ">= 0", self.burn_in_iters)
        require(self.power > 0.0, key("power"), "> 0", self.power)
        require(self.warmup_epochs >= 0.0, key("warmup_epochs"), ">= 0", self.warmup_epochs)
        require(self.warmup_lr >= 0.0, key("warmup_lr"), ">= 0", self.warmup_lr)
        require(self.decay_epochs > 0.0, key("decay_epochs"), "> 0", self.decay_epochs)
        require(0.0 < self.decay_rate <= 1.0, key("decay_rate"), "in (0, 1]", self.decay_rate)


@dataclass
class EmaConfig:
    enabled: bool = False  # keep an exponential moving average of the weights (timm's ModelEmaV3)
    decay: float = 0.9999

    def check(self, key: KeyName = recipe_key("ema")) -> None:
        require(0.0 < self.decay < 1.0, key("decay"), "in (0, 1)", self.decay)


@dataclass
class RuntimeConfig:
    device: Literal["auto", "cuda", "cpu"] = "auto"
    amp: Literal["bf16", "fp16", "none"] = "bf16"  # fp16 adds a GradScaler
    channels_last: bool = True
    # Speed levers from compile to ddp_static_graph (and optim.kernel): what each does and costs, docs/performance.md
    compile: bool = False  # torch.compile of the training forward pass, one static graph per crop size
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    compile_eval: bool = False  # evaluation through torch.compile too (mode as above), at its static batch
    copy_stream: bool = setting(False, affects_results=False)  # each batch to the GPU on a side stream, one ahead
    ddp_bucket_cap_mb: float = setting(25.0, affects_results=False)  # DDP's options: several processes only
    ddp_gradient_as_bucket_view: bool = setting(False, affects_results=False)
    ddp_static_graph: bool = setting(False, affects_results=False)
    deterministic: bool = False  # GPU: repeatable kernels, so a resumed run is bitwise exact there too; slower
    log_interval: int = setting(50, affects_results=False)  # steps between loss reads and stop checks (GPU syncs)
    max_nonfinite_steps: int = 20  # stop after this many non-finite losses in a row
    stop_timeout_s: float = setting(60.0, affects_results=False)  # save and exit within this of a SIGTERM/SIGINT
    collective_timeout_s: float = setting(600.0, affects_results=False)  # a rank waiting this long fails the job
    sync_bn: bool = False  # SyncBatchNorm: BatchNorm statistics pooled over processes (converted before DDP)
    sync_bn_group_size: int = 0  # processes per SyncBatchNorm group, consecutive ranks; 0: all processes

    def check(self, key: KeyName = recipe_key("runtime")) -> None:
        require(self.stop_timeout_s > 0, key("stop_timeout_s"), "> 0", self.stop_timeout_s)
        require(self.collective_timeout_s > 0, key("collective_timeout_s"), "> 0", self.collective_timeout_s)
        require(self.log_interval >= 1, key("log_interval"), ">= 1", self.log_interval)
        require(self.sync_bn_group_size >= 0, key("sync_bn_group_size"), ">= 0 (0: all processes)",
                self.sync_bn_group_size)
        require(self.sync_bn or self.sync_bn_group_size == 0, key("sync_bn_group_size"),
                "0 unless runtime.sync_bn is true", self.sync_bn_group_size)
        require(self.max_nonfinite_steps >= 1, key("max_nonfinite_steps"), ">= 1", self.max_nonfinite_steps)
        require(self.compile or self.compile_eval or self.compile_mode == "default", key("compile_mode"),
                "default unless runtime.compile or runtime.compile_eval is true", self.compile_mode)
        require(self.ddp_bucket_cap_mb > 0, key("ddp_bucket_cap_mb"), "> 0 (MB)", self.ddp_bucket_cap_mb)


@dataclass
class CheckpointConfig:
    every_steps: int = setting(2500, affects_results=False)  # also at every epoch end; 0: epoch ends only
    keep_last: int = setting(2, affects_results=False)  # step-<N>.pt files kept besides last.pt and best.pt

    def check(self, key: KeyName = recipe_key("checkpoint")) -> None:
        require(self.every_steps >= 0, key("every_steps"), ">= 0 (0: epoch ends only)", self.every_steps)
        require(self.keep_last >= 0, key("keep_last"), ">= 0", self.keep_last)


@dataclass
class Recipe:
    epochs: int = 80
    batch_size: int = 128  # global, across all processes: the images of one weight update
    # images per forward pass per process, what BatchNorm normalises over; 0: one pass (docs/training.md)
    micro_batch_size: int = 0
    seed: int = 0
    label_smoothing: float = 0.1
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def check(self) -> None:
        """Top-level keys, then each section's, in key order (the first wrong key is named), then across sections."""
        key = recipe_key("")
        require(self.epochs >= 1, key("epochs"), ">= 1", self.epochs)
        require(self.batch_size >= 1, key("batch_size"), ">= 1", self.batch_size)
        require(self.micro_batch_size >= 0, key("micro_batch_size"), ">= 0 (0: each process's share in one pass)",
                self.micro_batch_size)  # whether it fits the batch depends on the processes: arrangement.py
        require(self.seed >= 0, key("seed"), ">= 0", self.seed)
        require(0.0 <= self.label_smoothing < 1.0, key("label_smoothing"), "in [0, 1)", self.label_smoothing)
        require(self.data.layout in layouts(), recipe_key("data")("layout"), "one of " + ", ".join(layouts()),
                self.data.layout)
        for section in (self.data, self.augment, self.model, self.optim, self.schedule, self.ema, self.runtime,
                        self.checkpoint):
            section.check()
        require(not self.augment.mixing or self.batch_size % 2 == 0, key("batch_size"),
                "even when mixup or cutmix is on", self.batch_size)
        require(not self.augment.mixing or self.micro_batch_size % 2 == 0, key("micro_batch_size"),
                "even when mixup or cutmix is on (each pass is mixed on its own, as timm's --grad-accum-steps)",
                self.micro_batch_size)

    def scaled_lr(self) -> float:
        if self.optim.lr_scaling == "none":
            return self.optim.lr
        return self.optim.lr * self.batch_size / self.optim.reference_batch_size

    def burn_in_steps(self) -> int:
        """Burn-in length in optimizer steps at this global batch (same number of images)."""
        return round(self.schedule.burn_in_iters * self.optim.reference_batch_size / self.batch_size)


def check_variants(section: Any, prefix: str) -> None:
    """A field marked only_for another choice than the section's `name` must keep its default."""
    for each, only in unused_fields(section):
        if getattr(section, each.name) != each.default:
            raise RecipeError(f"recipe key '{prefix}.{each.name}' only applies to {prefix}.name={' or '.join(only)}, "
                              f"but {prefix}.name is {section.name}")


def unused_fields(section: Any) -> List[Tuple[dataclasses.Field, Tuple[str, ...]]]:
    """The fields marked only_for other choices than the section's `name`, with those choices."""
    marked = [(each, each.metadata.get("only_for") or ()) for each in dataclasses.fields(section)]
    marked = [(each, (only,) if isinstance(only, str) else only) for each, only in marked]
    return [(each, only) for each, only in marked if only and section.name not in only]


def keys_that_change_no_result(cls: type = None, prefix: str = "") -> List[str]:
    """The dotted keys marked affects_results=False: a resume that changes them stays exact."""
    found = []
    for each in dataclasses.fields(cls or Recipe):
        if dataclasses.is_dataclass(each.type):
            found += keys_that_change_no_result(each.type, f"{prefix}{each.name}.")
        elif each.metadata.get("affects_results") is False:
            found.append(prefix + each.name)
    return found


def changed_keys(old: Dict[str, Any], new: Dict[str, Any], prefix: str = "",
                 defaults: Optional[Dict[str, Any]] = None) -> List[str]:
    """The keys of two recipe_to_dict dicts that differ and can change the trained weights, as 'key old ->
    new'; `old` may be from an older version (moved keys followed, a key added since read as its default)."""
    old, unaffected, changes = with_moved_keys(old) if not prefix else old, keys_that_change_no_result(), []
    defaults = recipe_to_dict(Recipe()) if defaults is None else defaults
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, defaults.get(key)), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += changed_keys(a, b, f"{prefix}{key}.", defaults.get(key) or {})
        elif a != b and f"{prefix}{key}" not in unaffected:
            changes.append(f"{prefix}{key} {a!r} -> {b!r}")
    return changes


# Keys that moved, old -> new: a recipe file with the old key is told the new one, and a
# recipe stored in an older checkpoint is read with it moved.
MOVED_KEYS = {"augment.auto_augment": "data.auto_augment", "data.shard_index_dir": "data.index_dir"}


def with_moved_keys(raw: Dict[str, Any]) -> Dict[str, Any]:
    raw = {key: dict(value) if isinstance(value, dict) else value for key, value in raw.items()}
    for old, new in MOVED_KEYS.items():
        (old_section, old_key), (new_section, new_key) = old.split("."), new.split(".")
        if isinstance(raw.get(old_section), dict) and old_key in raw[old_section]:
            raw.setdefault(new_section, {})[new_key] = raw[old_section].pop(old_key)
    return raw


def recipe_to_dict(recipe: Recipe) -> Dict[str, Any]:
    def with_lists(pairs):  # tuples as lists, as YAML and the checkpoints hold them
        return {key: list(value) if isinstance(value, tuple) else value for key, value in pairs}

    return dataclasses.asdict(recipe, dict_factory=with_lists)


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)


def dotted_keys(cls: type, prefix: str = "") -> List[str]:
    return [key for each in dataclasses.fields(cls) for key in (dotted_keys(each.type, f"{prefix}{each.name}.")
                                                                 if dataclasses.is_dataclass(each.type)
                                                                 else [prefix + each.name])]
