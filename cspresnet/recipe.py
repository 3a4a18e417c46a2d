"""Recipes: YAML files read into typed dataclasses, with `base:` extension and overrides.

Every value is checked once, here, so that a typo or an impossible value stops the run
before any data is read, with a message that names the key and what it allows.
"""
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple

import yaml

from data.config import DataConfig

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


class RecipeError(ValueError):
    """A recipe, a base file or an override is wrong; the message says where and why."""


@dataclass
class AugmentConfig:
    """Augmentations beyond crop and flip; all off by default (timm's implementations)."""

    auto_augment: str = ""  # RandAugment policy, e.g. rand-m9-mstd0.5; "" = off
    random_erasing: float = 0.0  # probability per image, applied to the normalised batch on the device
    random_erasing_mode: Literal["pixel", "rand", "const"] = "pixel"
    mixup_alpha: float = 0.0  # mixup on when > 0
    cutmix_alpha: float = 0.0  # cutmix on when > 0
    mixup_prob: float = 1.0  # probability of mixing a batch at all
    mixup_switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on


@dataclass
class ModelConfig:
    num_classes: int = 1000
    drop_rate: float = 0.0  # dropout before the classifier
    drop_path_rate: float = 0.0  # stochastic depth, linear over the 13 blocks


@dataclass
class OptimConfig:
    name: Literal["sgd", "rmsproptf"] = "sgd"  # rmsproptf: timm's RMSpropTF (TensorFlow 1 behaviour)
    lr: float = 0.1  # for a global batch of reference_batch_size
    reference_batch_size: int = 128
    lr_scaling: Literal["linear", "none"] = "linear"  # what a different global batch does to lr
    momentum: float = 0.9
    nesterov: bool = False  # sgd only
    eps: float = 1e-3  # rmsproptf only
    alpha: float = 0.9  # rmsproptf only: decay of the squared-gradient average
    weight_decay: float = 5e-4
    decay_norm_and_bias: bool = False  # False: no weight decay on BatchNorm and bias parameters


@dataclass
class ScheduleConfig:
    name: Literal["darknet_poly", "step"] = "darknet_poly"
    # darknet_poly: lr * (it/burn_in)^power during burn-in, then lr * (1 - it/total)^power
    burn_in_iters: int = 1000  # at reference_batch_size; scaled to keep the same number of images
    power: float = 4.0
    # step (timm's StepLRScheduler, per iteration): linear warmup from warmup_lr, then
    # lr * decay_rate^floor(epochs / decay_epochs)
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-6
    decay_epochs: float = 2.4
    decay_rate: float = 0.97


@dataclass
class EmaConfig:
    enabled: bool = False  # keep an exponential moving average of the weights (timm's ModelEmaV3)
    decay: float = 0.9999


@dataclass
class RuntimeConfig:
    device: Literal["auto", "cuda", "cpu"] = "auto"
    amp: Literal["bf16", "fp16", "none"] = "bf16"  # fp16 adds a GradScaler
    channels_last: bool = True
    compile: bool = False
    deterministic: bool = False  # GPU: repeatable kernels, so a resumed run is bitwise exact there too; slower
    log_interval: int = 50  # steps between loss reads and stop checks (each read syncs the GPU)
    max_nonfinite_steps: int = 20  # stop after this many non-finite losses in a row
    stop_timeout_s: float = 60.0  # after SIGTERM/SIGINT, save and exit within this, else exit without saving
    collective_timeout_s: float = 600.0  # a rank waiting this long for the others fails the job


@dataclass
class CheckpointConfig:
    every_steps: int = 2500  # also at every epoch end; 0: epoch ends only
    keep_last: int = 2  # step-<N>.pt files kept besides last.pt and best.pt


@dataclass
class Recipe:
    epochs: int = 80
    batch_size: int = 128  # global, across all processes
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

    def scaled_lr(self) -> float:
        """The learning rate actually used at this recipe's global batch."""
        if self.optim.lr_scaling == "none":
            return self.optim.lr
        return self.optim.lr * self.batch_size / self.optim.reference_batch_size

    def mixing(self) -> bool:
        return self.augment.mixup_alpha > 0 or self.augment.cutmix_alpha > 0

    def burn_in_steps(self) -> int:
        """Burn-in length in optimizer steps at this global batch (same number of images)."""
        return round(self.schedule.burn_in_iters * self.optim.reference_batch_size / self.batch_size)


# ----------------------------------------------------------------------------- reading


def resolve_recipe_path(name_or_path: str) -> Path:
    """A path that exists, or a bare name looked up in recipes/."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = RECIPES_DIR / name_or_path
    if bundled.is_file():
        return bundled
    available = ", ".join(sorted(p.name for p in RECIPES_DIR.glob("*.yaml")))
    raise RecipeError(f"recipe '{name_or_path}' not found: not a file, and not in {RECIPES_DIR} (available: {available})")


class DuplicateKeyError(ValueError):
    """A mapping in recipe YAML names the same key twice."""

    def __init__(self, key: Any, section: str, lines: Tuple[int, int]):
        self.key, self.section, self.lines = key, section, lines
        where = "at the top level" if section == "" else f"in section '{section}'"
        super().__init__(f"key '{key}' appears twice {where}")


class RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping naming one key twice (safe_load keeps the last).

    `root` names the section the document itself is (an override's dotted key), for messages.
    """

    root = ""

    def construct_document(self, node):
        self._sections = {}
        self._name_sections(node, self.root)
        return super().construct_document(node)

    def _name_sections(self, node, where: str) -> None:
        """Remember each mapping's dotted place in the document, for construct_mapping's messages."""
        if id(node) in self._sections:  # an alias: the same node again
            return
        if isinstance(node, yaml.MappingNode):
            self._sections[id(node)] = where
            for key_node, value_node in node.value:
                name = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
                self._name_sections(value_node, f"{where}.{name}" if where else str(name))
        elif isinstance(node, yaml.SequenceNode):
            self._sections[id(node)] = where
            for i, item in enumerate(node.value):
                self._name_sections(item, f"{where}[{i}]")

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base' may override, as YAML intends
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: SafeConstructor reports it
                    continue
                if first is not key_node:
                    section = self._sections.get(id(node), "?")
                    raise DuplicateKeyError(key, section, (first.start_mark.line + 1, key_node.start_mark.line + 1))
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, root: str = "") -> Any:
    """Recipe YAML, as yaml.safe_load reads it, except that a key given twice in one
    mapping raises DuplicateKeyError instead of the last one silently winning."""
    loader = RecipeLoader(text)
    loader.root = root
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _read_yaml(path: Path, chain: Tuple[Path, ...]) -> Dict[str, Any]:
    """Read one file and, recursively, the file it extends; child keys win."""
    if path in chain:
        raise RecipeError(f"recipe {path} extends itself through: {' -> '.join(str(p) for p in chain + (path,))}")
    try:
        raw = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path} is not valid YAML: {exc}") from None
    except DuplicateKeyError as exc:
        raise RecipeError(f"recipe {path}: {exc} (lines {exc.lines[0]} and {exc.lines[1]})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path} must be a mapping of keys to values, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    sibling = path.parent / str(base)
    base_path = sibling if sibling.is_file() else resolve_recipe_path(str(base))
    return _merge(_read_yaml(base_path.resolve(), chain + (path,)), raw)


def _merge(base: Dict[str, Any], child: Dict[str, Any]) -> Dict[str, Any]:
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _apply_override(raw: Dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise RecipeError(f"override '{override}' must look like key.sub=value (e.g. optim.lr=0.05)")
    dotted, text = override.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise RecipeError(f"override '{override}': '{dotted}' is not a dotted key like optim.lr")
    try:
        value = load_yaml(text, root=".".join(keys)) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    except DuplicateKeyError as exc:
        raise RecipeError(f"override '{override}': {exc}") from None
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise RecipeError(f"override '{override}': '{key}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def load_recipe(name_or_path: str, overrides: Optional[List[str]] = None, data_dir: Optional[str] = None) -> Recipe:
    path = resolve_recipe_path(name_or_path).resolve()
    raw = _read_yaml(path, ())
    for override in overrides or []:
        _apply_override(raw, override)
    if data_dir is not None:
        data = raw.setdefault("data", {})
        if isinstance(data, dict):  # otherwise _build reports the section as it would without --data-dir
            data["dir"] = data_dir
    recipe = _build(Recipe, raw, "")
    validate(recipe)
    return recipe


def recipe_from_dict(raw: Dict[str, Any]) -> Recipe:
    """The inverse of recipe_to_dict, for recipes stored in checkpoints."""
    recipe = _build(Recipe, raw, "")
    validate(recipe)
    return recipe


def recipe_to_dict(recipe: Recipe) -> Dict[str, Any]:
    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(recipe))


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)


# ----------------------------------------------------------------------------- typing


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(kind))
    if typing.get_origin(kind) is tuple:
        return f"a list of {len(typing.get_args(kind))} numbers"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(kind, str(kind))


def _convert(kind: Any, value: Any, key: str) -> Any:
    wrong = RecipeError(f"recipe key '{key}' must be {_type_name(kind)}, got {value!r}")
    origin = typing.get_origin(kind)
    if origin is Literal:
        if value not in typing.get_args(kind):
            raise wrong
        return value
    if origin is tuple:
        items = typing.get_args(kind)
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise wrong
        return tuple(_convert(item, v, f"{key}[{i}]") for i, (item, v) in enumerate(zip(items, value)))
    if kind is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise wrong
        try:  # a string: YAML 1.1 reads 1e30 and 5e-4 (no dot) as strings
            number = float(value)
        except ValueError:
            raise wrong from None
        except OverflowError:  # an integer too large for a float
            number = math.inf
        if not math.isfinite(number):  # .inf, -.inf, .nan, 1e400: no use as a rate, size or probability
            raise RecipeError(f"recipe key '{key}' must be a finite number, got {number!r}")
        return number
    if kind is str:
        if not isinstance(value, str):
            raise wrong
        return value
    raise TypeError(f"unsupported recipe field type {kind} for '{key}'")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the recipe"
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe section '{where}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise RecipeError(
            f"unknown recipe key '{prefix}{unknown[0]}' in {where}; allowed keys: {', '.join(names)}"
        )
    values = {}
    for name in names:
        if name not in raw:
            continue
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, raw[name], f"{prefix}{name}.")
        else:
            values[name] = _convert(kind, raw[name], f"{prefix}{name}")
    return cls(**values)


# ----------------------------------------------------------------------------- values


def _require(ok: bool, key: str, allowed: str, value: Any) -> None:
    if not ok:
        raise RecipeError(f"recipe key '{key}' must be {allowed}, got {value!r}")


def _only_for(section: Any, prefix: str, chosen: str, keys_by_name: Dict[str, Tuple[str, ...]]) -> None:
    """A key that belongs to another choice than the chosen one must keep its default."""
    defaults = type(section)()
    for name, keys in keys_by_name.items():
        if name == chosen:
            continue
        for key in keys:
            if getattr(section, key) != getattr(defaults, key):
                raise RecipeError(f"recipe key '{prefix}.{key}' only applies to {prefix}.name={name}, "
                                  f"but {prefix}.name is {chosen}")


def validate(recipe: Recipe) -> None:
    """Reject values that type-check but cannot work."""
    r, d, o, s, a = recipe, recipe.data, recipe.optim, recipe.schedule, recipe.augment
    _require(r.epochs >= 1, "epochs", ">= 1", r.epochs)
    _require(r.batch_size >= 1, "batch_size", ">= 1", r.batch_size)
    _require(r.seed >= 0, "seed", ">= 0", r.seed)
    _require(0.0 <= r.label_smoothing < 1.0, "label_smoothing", "in [0, 1)", r.label_smoothing)
    _require(d.img_size >= 32, "data.img_size", ">= 32 (the network downsamples 32x)", d.img_size)
    _require(d.eval_img_size >= 32, "data.eval_img_size", ">= 32 (the network downsamples 32x)", d.eval_img_size)
    _require(d.workers >= 0, "data.workers", ">= 0", d.workers)
    _require(0.0 < d.crop_scale[0] <= d.crop_scale[1] <= 1.0, "data.crop_scale", "[min, max] with 0 < min <= max <= 1", list(d.crop_scale))
    _require(0.0 < d.crop_ratio[0] <= d.crop_ratio[1], "data.crop_ratio", "[min, max] with 0 < min <= max", list(d.crop_ratio))
    _require(0.0 <= d.hflip <= 1.0, "data.hflip", "a probability in [0, 1]", d.hflip)
    _require(0.0 < d.eval_crop_pct <= 1.0, "data.eval_crop_pct", "in (0, 1]", d.eval_crop_pct)
    _require(d.eval_batch_size >= 1, "data.eval_batch_size", ">= 1", d.eval_batch_size)
    _require(recipe.model.num_classes >= 1, "model.num_classes", ">= 1", recipe.model.num_classes)
    _require(0.0 <= recipe.model.drop_rate < 1.0, "model.drop_rate", "in [0, 1)", recipe.model.drop_rate)
    _require(0.0 <= recipe.model.drop_path_rate < 1.0, "model.drop_path_rate", "in [0, 1)", recipe.model.drop_path_rate)
    _require(o.lr > 0.0, "optim.lr", "> 0", o.lr)
    _require(o.reference_batch_size >= 1, "optim.reference_batch_size", ">= 1", o.reference_batch_size)
    _require(0.0 <= o.momentum < 1.0, "optim.momentum", "in [0, 1)", o.momentum)
    _require(o.weight_decay >= 0.0, "optim.weight_decay", ">= 0", o.weight_decay)
    _require(not o.nesterov or o.momentum > 0, "optim.nesterov", "false when optim.momentum is 0", o.nesterov)
    _only_for(o, "optim", o.name, {"sgd": ("nesterov",), "rmsproptf": ("eps", "alpha")})
    _require(o.eps > 0.0, "optim.eps", "> 0", o.eps)
    _require(0.0 < o.alpha < 1.0, "optim.alpha", "in (0, 1)", o.alpha)
    _only_for(s, "schedule", s.name, {"darknet_poly": ("burn_in_iters", "power"),
                                      "step": ("warmup_epochs", "warmup_lr", "decay_epochs", "decay_rate")})
    _require(s.burn_in_iters >= 0, "schedule.burn_in_iters", ">= 0", s.burn_in_iters)
    _require(s.power > 0.0, "schedule.power", "> 0", s.power)
    _require(s.warmup_epochs >= 0.0, "schedule.warmup_epochs", ">= 0", s.warmup_epochs)
    _require(s.warmup_lr >= 0.0, "schedule.warmup_lr", ">= 0", s.warmup_lr)
    _require(s.decay_epochs > 0.0, "schedule.decay_epochs", "> 0", s.decay_epochs)
    _require(0.0 < s.decay_rate <= 1.0, "schedule.decay_rate", "in (0, 1]", s.decay_rate)
    _require(a.auto_augment == "" or a.auto_augment.startswith("rand-"), "augment.auto_augment",
             "'' (off) or a RandAugment policy like rand-m9-mstd0.5", a.auto_augment)
    _require(0.0 <= a.random_erasing <= 1.0, "augment.random_erasing", "a probability in [0, 1]", a.random_erasing)
    _require(a.mixup_alpha >= 0.0, "augment.mixup_alpha", ">= 0 (0: off)", a.mixup_alpha)
    _require(a.cutmix_alpha >= 0.0, "augment.cutmix_alpha", ">= 0 (0: off)", a.cutmix_alpha)
    _require(0.0 <= a.mixup_prob <= 1.0, "augment.mixup_prob", "a probability in [0, 1]", a.mixup_prob)
    _require(0.0 <= a.mixup_switch_prob <= 1.0, "augment.mixup_switch_prob", "a probability in [0, 1]",
             a.mixup_switch_prob)
    _require(not r.mixing() or r.batch_size % 2 == 0, "batch_size", "even when mixup or cutmix is on",
             r.batch_size)
    _require(0.0 < recipe.ema.decay < 1.0, "ema.decay", "in (0, 1)", recipe.ema.decay)
    _require(d.train_decode != "gpu" or not a.auto_augment, "data.train_decode",
             "fast or full with augment.auto_augment (RandAugment runs on the CPU, before any GPU decode)",
             d.train_decode)
    _require(0.0 < d.max_unreadable_batch_fraction < 1.0, "data.max_unreadable_batch_fraction",
             "in (0, 1): a batch must keep at least one image", d.max_unreadable_batch_fraction)
    _require(0.0 <= d.max_unreadable_fraction < 1.0, "data.max_unreadable_fraction", "in [0, 1)",
             d.max_unreadable_fraction)
    _require(d.min_unreadable_allowed >= 0, "data.min_unreadable_allowed", ">= 0", d.min_unreadable_allowed)
    _require(recipe.runtime.stop_timeout_s > 0, "runtime.stop_timeout_s", "> 0", recipe.runtime.stop_timeout_s)
    _require(recipe.runtime.collective_timeout_s > 0, "runtime.collective_timeout_s", "> 0",
             recipe.runtime.collective_timeout_s)
    _require(recipe.runtime.log_interval >= 1, "runtime.log_interval", ">= 1", recipe.runtime.log_interval)
    _require(recipe.runtime.max_nonfinite_steps >= 1, "runtime.max_nonfinite_steps", ">= 1",
             recipe.runtime.max_nonfinite_steps)
    _require(recipe.checkpoint.every_steps >= 0, "checkpoint.every_steps", ">= 0 (0: epoch ends only)",
             recipe.checkpoint.every_steps)
    _require(recipe.checkpoint.keep_last >= 0, "checkpoint.keep_last", ">= 0", recipe.checkpoint.keep_last)
