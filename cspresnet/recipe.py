"""Recipes: YAML files read into typed dataclasses, with `base:` extension and overrides.

Every value is checked once, here, so that a typo or an impossible value stops the run
before any data is read, with a message that names the key and what it allows.
"""
import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Optional, Tuple, Union

import yaml

from data.config import DataConfig

from .yaml_comments import DuplicateKeyError, load_yaml, load_yaml_with_lines

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
    num_classes: Union[int, Literal["auto"]] = 1000  # auto: the number of class folders in train/
    drop_rate: float = 0.0  # dropout before the classifier
    drop_path_rate: float = 0.0  # stochastic depth, linear over the 13 blocks
    # Start a new run from these weights instead of the random init (never on a resume): timm's
    # .pth, a .safetensors, our last.pt/best.pt. "" = from scratch.
    initial_weights: str = ""
    initial_weights_kind: Literal["auto", "model", "ema"] = "auto"  # of our checkpoints; auto: EMA when present
    # The file's SHA-256, or its first 8+ hex digits: checked when set, filled in as the run starts.
    initial_weights_sha256: str = ""
    linear_probe: bool = False  # train the classifier only: the backbone frozen and in eval mode


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
    sync_bn: bool = False  # SyncBatchNorm: BatchNorm statistics pooled over processes (converted before DDP)
    sync_bn_group_size: int = 0  # processes per SyncBatchNorm group, consecutive ranks; 0: all processes


@dataclass
class CheckpointConfig:
    every_steps: int = 2500  # also at every epoch end; 0: epoch ends only
    keep_last: int = 2  # step-<N>.pt files kept besides last.pt and best.pt


@dataclass
class Recipe:
    epochs: int = 80
    batch_size: int = 128  # global, across all processes: the images of one weight update
    # Images per forward pass per process, which BatchNorm normalises over (without SyncBN);
    # each update accumulates the gradients of batch_size / (processes x this) passes.
    # 0: each process's whole share in one pass.
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
    raise RecipeError(f"recipe '{name_or_path}' not found: not a file, and not in {RECIPES_DIR} "
                      f"(available: {_available()})")


def _available() -> str:
    return ", ".join(sorted(p.name for p in RECIPES_DIR.glob("*.yaml")))


# Where a value of a resolved recipe comes from: (recipe file name, the comment beside the
# key there), ("command line", "key=value" or "--data-dir DIR"); no entry: the default.
Origin = Tuple[str, str]


def _read_yaml(path: Path, chain: Tuple[Path, ...], origins: Dict[str, Origin]) -> Dict[str, Any]:
    """Read one file and, recursively, the file it extends; child keys win. Records in
    `origins`, for every dotted key a file sets, the file and the comment beside the key."""
    if path in chain:
        raise RecipeError(f"recipe {path} extends itself through: {' -> '.join(str(p) for p in chain + (path,))}")
    try:
        raw, comments, lines = load_yaml_with_lines(_read_text(path))
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path} is not valid YAML: {exc}") from None
    except DuplicateKeyError as exc:
        raise RecipeError(f"recipe {path}: {exc} (lines {exc.lines[0]} and {exc.lines[1]})") from None
    if raw is None:  # a file cut short or never written must not train the defaults
        raise RecipeError(f"recipe {path} is empty (no keys, only blank space, comments or null); a recipe is a "
                          f"mapping of keys to values, at least 'base: cspresnet50.yaml'")
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path} must be a mapping of keys to values (key: value lines), "
                          f"got {type(raw).__name__}")
    merged: Dict[str, Any] = {}
    if "base" in raw:
        base_path = _base_path(path, raw.pop("base"), lines.get("base"))
        merged = _read_yaml(base_path, chain + (path,), origins)
    return _merge(merged, raw, origins, lambda key: (path.name, comments.get(key, "")))


def _read_text(path: Path) -> str:
    """The file as text, or a RecipeError: a file in another encoding would otherwise end
    the run in a UnicodeDecodeError traceback that does not name the file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"recipe {path} cannot be read: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise RecipeError(f"recipe {path} is not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start} "
                          f"(line {line}) is not valid UTF-8; recipes must be UTF-8 text") from None


def _base_path(path: Path, base: Any, line: Optional[int]) -> Path:
    """The file that `path`'s `base:` names: next to `path`, else as resolve_recipe_path finds
    it. An empty base is refused rather than read as no base, which would train the defaults."""
    where = f"{path}, line {line}" if line else str(path)
    if not isinstance(base, str) or not base.strip():
        given = "empty" if base is None or isinstance(base, str) else repr(base)
        raise RecipeError(f"recipe {where}: base is {given}; base must name a recipe file (a path "
                          f"next to this one, or a name in recipes/ such as cspresnet50.yaml), or be left out")
    for candidate in (path.parent / base, Path(base), RECIPES_DIR / base):
        if candidate.is_file():
            return candidate.resolve()
    raise RecipeError(f"recipe '{base}' (base of {where}) does not exist: not a file next to it "
                      f"or from here, and not in {RECIPES_DIR} (available: {_available()})")


def _merge(base: Dict[str, Any], child: Dict[str, Any], origins: Dict[str, Origin],
           origin_of: Callable[[str], Origin], prefix: str = "") -> Dict[str, Any]:
    """`child` over `base`: sections merge key by key, any other value replaces. Each value
    `child` sets is recorded in `origins` under its dotted key, as `origin_of(key)`."""
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value, origins, origin_of, f"{prefix}{key}.")
        else:
            merged[key] = value
            _record(origins, f"{prefix}{key}", value, origin_of)
    return merged


def _record(origins: Dict[str, Origin], dotted: str, value: Any, origin_of: Callable[[str], Origin]) -> None:
    """`value` now stands at `dotted`, replacing whatever was there and below it."""
    for stale in [key for key in origins if key == dotted or key.startswith(dotted + ".")]:
        del origins[stale]
    if isinstance(value, dict):
        for key, inner in value.items():
            _record(origins, f"{dotted}.{key}", inner, origin_of)
    else:
        origins[dotted] = origin_of(dotted)


def _apply_override(raw: Dict[str, Any], override: str, origins: Dict[str, Origin], given: Dict[str, str]) -> None:
    """Set one key.sub=value in `raw`. `given` holds the overrides so far by dotted key."""
    if "=" not in override:
        raise RecipeError(f"override '{override}' must look like key.sub=value (e.g. optim.lr=0.05)")
    dotted, text = override.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise RecipeError(f"override '{override}': '{dotted}' is not a dotted key like optim.lr")
    _refuse_repeat(given, ".".join(keys), override)
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
    _record(origins, ".".join(keys), value, lambda key: ("command line", override))


def _refuse_repeat(given: Dict[str, str], dotted: str, override: str) -> None:
    """A key given twice on the command line is refused, as in a file: the last would win
    silently. So is a key and the section around it: which wins depends on their order."""
    for earlier_key, earlier in given.items():
        if earlier_key == dotted:
            raise RecipeError(f"override key '{dotted}' is given twice: '{earlier}' and '{override}'; "
                              f"give each key once")
        if dotted.startswith(earlier_key + ".") or earlier_key.startswith(dotted + "."):
            inner, outer = sorted((dotted, earlier_key), key=len, reverse=True)
            raise RecipeError(f"override key '{inner}' is inside section '{outer}', which is also given: "
                              f"'{earlier}' and '{override}'; give each key once (the section's keys one by one, "
                              f"or the whole section)")
    given[dotted] = override


def _resolve(name_or_path: str, overrides: Optional[List[str]],
             data_dir: Optional[str]) -> Tuple[Recipe, Dict[str, Origin]]:
    """The recipe file, the files it extends, the overrides and --data-dir, in that order,
    checked; and where each value that is not a default came from."""
    origins: Dict[str, Origin] = {}
    raw = _read_yaml(resolve_recipe_path(name_or_path).resolve(), (), origins)
    given: Dict[str, str] = {}
    for override in overrides or []:
        _apply_override(raw, override, origins, given)
    if data_dir is not None:
        data = raw.setdefault("data", {})
        if isinstance(data, dict):  # otherwise _build reports the section as it would without --data-dir
            data["dir"] = data_dir
            origins["data.dir"] = ("command line", f"--data-dir {data_dir}")
    recipe = _build(Recipe, raw, "")
    validate(recipe)
    return recipe, origins


def load_recipe(name_or_path: str, overrides: Optional[List[str]] = None, data_dir: Optional[str] = None) -> Recipe:
    return _resolve(name_or_path, overrides, data_dir)[0]


def describe_recipe(name_or_path: str, overrides: Optional[List[str]] = None, data_dir: Optional[str] = None) -> str:
    """The resolved recipe as YAML, each value followed by where it came from: the recipe
    file that set it last and the comment beside it there, the command line, or [default].

        python train.py --recipe cspresnet50_ra.yaml --print-recipe
    """
    recipe, origins = _resolve(name_or_path, overrides, data_dir)

    def note(dotted: str) -> str:
        where, comment = origins.get(dotted, ("default", ""))
        return f"[command line: {comment}]" if where == "command line" else f"[{where}] {comment}".rstrip()

    lines = []
    for key, value in recipe_to_dict(recipe).items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines += [f"{f'  {sub}: {_inline(v)}':<44} # {note(f'{key}.{sub}')}" for sub, v in value.items()]
        else:
            lines.append(f"{f'{key}: {_inline(value)}':<44} # {note(key)}")
    return "\n".join(lines) + "\n"


def _inline(value: Any) -> str:
    """One value as one line of YAML (lists in flow style)."""
    return yaml.safe_dump(value, default_flow_style=True, width=1000).splitlines()[0]


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
        values = typing.get_args(kind)
        return repr(values[0]) if len(values) == 1 else "one of " + ", ".join(repr(v) for v in values)
    if typing.get_origin(kind) is Union:
        return " or ".join(_type_name(option) for option in typing.get_args(kind))
    if typing.get_origin(kind) is tuple:
        return f"a list of {len(typing.get_args(kind))} numbers"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(kind, str(kind))


def _convert(kind: Any, value: Any, key: str) -> Any:
    wrong = RecipeError(f"recipe key '{key}' must be {_type_name(kind)}, got {value!r}")
    origin = typing.get_origin(kind)
    if origin is Union:  # the first option that takes the value
        for option in typing.get_args(kind):
            try:
                return _convert(option, value, key)
            except RecipeError:
                continue
        raise wrong
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
    """Reject values that type-check but cannot work (in the order of the keys, so the first
    wrong key is the one named)."""
    r, d = recipe, recipe.data
    _require(r.epochs >= 1, "epochs", ">= 1", r.epochs)
    _require(r.batch_size >= 1, "batch_size", ">= 1", r.batch_size)
    _require(r.micro_batch_size >= 0, "micro_batch_size", ">= 0 (0: each process's share in one pass)",
             r.micro_batch_size)  # whether it fits the batch depends on the processes: arrangement.py
    _require(r.seed >= 0, "seed", ">= 0", r.seed)
    _require(0.0 <= r.label_smoothing < 1.0, "label_smoothing", "in [0, 1)", r.label_smoothing)
    _require(d.img_size >= 32, "data.img_size", ">= 32 (the network downsamples 32x)", d.img_size)
    _require(d.eval_img_size >= 32, "data.eval_img_size", ">= 32 (the network downsamples 32x)", d.eval_img_size)
    _require(d.workers >= 0, "data.workers", ">= 0", d.workers)
    _require(d.loader_timeout_s > 0, "data.loader_timeout_s", "> 0 (seconds without a batch that end the run)",
             d.loader_timeout_s)
    _require(0.0 < d.crop_scale[0] <= d.crop_scale[1] <= 1.0, "data.crop_scale", "[min, max] with 0 < min <= max <= 1", list(d.crop_scale))
    _require(0.0 < d.crop_ratio[0] <= d.crop_ratio[1], "data.crop_ratio", "[min, max] with 0 < min <= max", list(d.crop_ratio))
    _require(0.0 <= d.hflip <= 1.0, "data.hflip", "a probability in [0, 1]", d.hflip)
    _require(0.0 < d.eval_crop_pct <= 1.0, "data.eval_crop_pct", "in (0, 1]", d.eval_crop_pct)
    _require(d.eval_batch_size >= 1, "data.eval_batch_size", ">= 1", d.eval_batch_size)
    _require(0.0 <= d.holdout_fraction < 1.0, "data.holdout_fraction", "in [0, 1) (0: evaluate on val/)",
             d.holdout_fraction)
    _validate_training(recipe)
    _validate_input_and_runtime(recipe)


def _validate_training(recipe: Recipe) -> None:
    """The model, optimizer, schedule, augmentation and EMA keys."""
    r, o, s, a = recipe, recipe.optim, recipe.schedule, recipe.augment
    _validate_model(recipe.model)
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
    _require(not r.mixing() or r.micro_batch_size % 2 == 0, "micro_batch_size",
             "even when mixup or cutmix is on (each pass is mixed on its own, as timm's --grad-accum-steps)",
             r.micro_batch_size)
    _require(0.0 < recipe.ema.decay < 1.0, "ema.decay", "in (0, 1)", recipe.ema.decay)


def _validate_model(m: ModelConfig) -> None:
    _require(m.num_classes == "auto" or m.num_classes >= 1, "model.num_classes", ">= 1 or auto", m.num_classes)
    _require(0.0 <= m.drop_rate < 1.0, "model.drop_rate", "in [0, 1)", m.drop_rate)
    _require(0.0 <= m.drop_path_rate < 1.0, "model.drop_path_rate", "in [0, 1)", m.drop_path_rate)
    for key in ("initial_weights_kind", "initial_weights_sha256", "linear_probe"):
        if getattr(m, key) != getattr(ModelConfig(), key) and not m.initial_weights:
            raise RecipeError(f"recipe key 'model.{key}' only applies with model.initial_weights (a weights file), "
                              f"which is not set" + (": a frozen random backbone learns nothing"
                                                      if key == "linear_probe" else ""))
    _require(m.initial_weights_sha256 == "" or re.fullmatch(r"[0-9a-f]{8,64}", m.initial_weights_sha256) is not None,
             "model.initial_weights_sha256", "'' or 8 to 64 lowercase hex digits (a SHA-256 or its start)",
             m.initial_weights_sha256)


def _validate_input_and_runtime(recipe: Recipe) -> None:
    """Decoding and unreadable-image limits, then the runtime and checkpoint keys."""
    d, a = recipe.data, recipe.augment
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
    _require(recipe.runtime.sync_bn_group_size >= 0, "runtime.sync_bn_group_size", ">= 0 (0: all processes)",
             recipe.runtime.sync_bn_group_size)
    _require(recipe.runtime.sync_bn or recipe.runtime.sync_bn_group_size == 0, "runtime.sync_bn_group_size",
             "0 unless runtime.sync_bn is true", recipe.runtime.sync_bn_group_size)
    _require(recipe.runtime.max_nonfinite_steps >= 1, "runtime.max_nonfinite_steps", ">= 1",
             recipe.runtime.max_nonfinite_steps)
    _require(recipe.checkpoint.every_steps >= 0, "checkpoint.every_steps", ">= 0 (0: epoch ends only)",
             recipe.checkpoint.every_steps)
    _require(recipe.checkpoint.keep_last >= 0, "checkpoint.keep_last", ">= 0", recipe.checkpoint.keep_last)
