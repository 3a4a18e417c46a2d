"""Recipes: YAML files read into typed dataclasses, with `base:` extension and overrides. Every
value is checked once, here, so that a typo or an impossible value stops the run before any
data is read, with a message that names the key and what it allows."""
import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Optional, Tuple, Union

import yaml

from common.errors import RecipeError
from common.recipe_fields import KeyName, recipe_key, require, setting
from data.config import AugmentConfig, DataConfig
from data.sources import layouts

from .yaml_comments import DuplicateKeyError, load_yaml_with_lines

_PACKAGE = Path(__file__).resolve().parent  # an installed copy holds recipes/ here (pyproject.toml); a checkout above
RECIPES_DIR = _PACKAGE / "recipes" if (_PACKAGE / "recipes").is_dir() else _PACKAGE.parent / "recipes"


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


def resolve_recipe_path(name_or_path: str) -> Path:
    """A path that exists, or a bare name looked up in recipes/."""
    for path in (Path(name_or_path), RECIPES_DIR / name_or_path):
        if path.is_file():
            return path
    raise RecipeError(f"recipe '{name_or_path}' not found: not a file, and not in {RECIPES_DIR} "
                      f"(available: {_available()})")


def _available() -> str:
    return ", ".join(sorted(p.name for p in RECIPES_DIR.glob("*.yaml")))


# Where a value of a resolved recipe comes from: (recipe file name, the comment beside the
# key there), ("command line", "key=value" or "--data-dir DIR"); no entry: the default.
Origin = Tuple[str, str]


def _read_yaml(path: Path, chain: Tuple[Path, ...], origins: Dict[str, Origin]) -> Dict[str, Any]:
    """One file over the file it extends, recursively; `origins` gets each key's file and the comment beside it."""
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
        merged = _read_yaml(_base_path(path, raw.pop("base"), lines.get("base")), chain + (path,), origins)
    return _merge(merged, raw, origins, lambda key: (path.name, comments.get(key, "")))


def _read_text(path: Path) -> str:
    """A file in another encoding would otherwise end the run in a traceback that does not name it."""
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
    """An empty base is refused rather than read as no base, which would train the defaults."""
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
    """`child` over `base`: sections merge key by key, any other value replaces (recorded in `origins`)."""
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
        raise RecipeError(f"override '{override}' must look like key.sub=value (e.g. optim.lr=0.05; a dataset "
                          f"folder goes to --data-dir)")
    dotted, text = override.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise RecipeError(f"override '{override}': '{dotted}' is not a dotted key like optim.lr")
    _refuse_repeat(given, ".".join(keys), override)
    try:
        value = load_yaml_with_lines(text, root=".".join(keys))[0] if text.strip() else ""
    except yaml.YAMLError:
        value = text
    except DuplicateKeyError as exc:
        raise RecipeError(f"override '{override}': {exc}") from None
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override '{override}': '{key}' is a value, not a section")
    node[keys[-1]] = value
    _record(origins, ".".join(keys), value, lambda key: ("command line", override))


def _refuse_repeat(given: Dict[str, str], dotted: str, override: str) -> None:
    """An override key given twice is refused, as in a file: the last would win silently. So is a key and
    the section around it: which wins depends on their order."""
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
    """The recipe file, the files it extends, the overrides, --data-dir, checked; and each value's origin."""
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
    recipe.check()
    return recipe, origins


def load_recipe(name_or_path: str, overrides: Optional[List[str]] = None, data_dir: Optional[str] = None) -> Recipe:
    return _resolve(name_or_path, overrides, data_dir)[0]


def describe_recipe(name_or_path: str, overrides: Optional[List[str]] = None, data_dir: Optional[str] = None) -> str:
    """The resolved recipe as YAML (--print-recipe), each value followed by where it came from: the
    recipe file that set it last and the comment beside it there, the command line, or [default]."""
    recipe, origins = _resolve(name_or_path, overrides, data_dir)
    for prefix, section in vars(recipe).items():  # a value for another optimizer or schedule: not its origin
        for each, _ in unused_fields(section) if hasattr(section, "name") else ():
            origins[f"{prefix}.{each.name}"] = (f"not used by {prefix}.name={section.name}", "")
    lines = []
    for key, value in recipe_to_dict(recipe).items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            entries = [(f"  {sub}", f"{key}.{sub}", v) for sub, v in value.items()]
        else:
            entries = [(key, key, value)]
        for name, dotted, v in entries:
            where, comment = origins.get(dotted, ("default", ""))
            note = f"[command line: {comment}]" if where == "command line" else f"[{where}] {comment}".rstrip()
            flow = yaml.safe_dump(v, default_flow_style=True, width=1000).splitlines()[0]  # lists in flow style
            lines.append(f"{f'{name}: {flow}':<44} # {note}")
    return "\n".join(lines) + "\n"


def recipe_from_dict(raw: Dict[str, Any]) -> Recipe:
    """The inverse of recipe_to_dict, for recipes stored in checkpoints (of older versions too)."""
    recipe = _build(Recipe, with_moved_keys(raw), "")
    recipe.check()
    return recipe


def recipe_to_dict(recipe: Recipe) -> Dict[str, Any]:
    def with_lists(pairs):  # tuples as lists, as YAML and the checkpoints hold them
        return {key: list(value) if isinstance(value, tuple) else value for key, value in pairs}

    return dataclasses.asdict(recipe, dict_factory=with_lists)


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)


def _type_name(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Literal:
        return repr(args[0]) if len(args) == 1 else "one of " + ", ".join(repr(v) for v in args)
    if origin is Union:
        return " or ".join(_type_name(option) for option in args)
    if origin is tuple:
        return f"a list of {len(args)} numbers"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(kind, str(kind))


def _convert(kind: Any, value: Any, key: str) -> Any:
    """`value` as the field type `kind` (a section, a Union, Literal, tuple or plain type) takes it."""
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, f"{key}.")
    wrong = RecipeError(f"recipe key '{key}' must be {_type_name(kind)}, got {value!r}")
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Union:  # the first option that takes the value
        for option in args:
            try:
                return _convert(option, value, key)
            except RecipeError:
                continue
        raise wrong
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise wrong
        return tuple(_convert(item, v, f"{key}[{i}]") for i, (item, v) in enumerate(zip(args, value)))
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
    if origin is Literal:
        fits = value in args
    elif kind in (bool, int, str):
        fits = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))  # True is an int too
    else:
        raise TypeError(f"unsupported recipe field type {kind} for '{key}'")
    if not fits:
        raise wrong
    return value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the recipe"
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe section '{where}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown and f"{prefix}{unknown[0]}" in MOVED_KEYS:
        raise RecipeError(f"recipe key '{prefix}{unknown[0]}' is now '{MOVED_KEYS[prefix + unknown[0]]}': rename it")
    if unknown:
        raise RecipeError(f"unknown recipe key '{prefix}{unknown[0]}' in {where}{_did_you_mean(prefix + unknown[0])}; "
                          f"allowed keys: {', '.join(names)}")
    return cls(**{name: _convert(hints[name], raw[name], prefix + name) for name in names if name in raw})


def _did_you_mean(dotted: str) -> str:
    """The nearest recipe key: the same name in a section (lr: optim.lr), a longer name (drop_path:
    drop_path_rate), else difflib's nearest (optim.lrr: optim.lr)."""
    keys = dotted_keys(Recipe)
    name_of = {key: key.rsplit(".", 1)[-1] for key in keys}
    name = dotted.rsplit(".", 1)[-1]
    near = ([key for key in keys if name_of[key] == name] or [key for key in keys if key.startswith(dotted)]
            or [key for key in keys if name_of[key].startswith(name)] or difflib.get_close_matches(dotted, keys, n=1))
    return f" (did you mean {near[0]}?)" if near else ""


def dotted_keys(cls: type, prefix: str = "") -> List[str]:
    return [key for each in dataclasses.fields(cls) for key in (dotted_keys(each.type, f"{prefix}{each.name}.")
                                                                 if dataclasses.is_dataclass(each.type)
                                                                 else [prefix + each.name])]
