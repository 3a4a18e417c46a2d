"""Recipe files: YAML with `base:` extension, `key.sub=value` overrides and --data-dir, read into a checked
Recipe (recipe.py), remembering where each value came from (--print-recipe); and recipes stored in checkpoints."""
import dataclasses
import difflib
import math
import typing
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Optional, Tuple, Union

import yaml

from common.errors import RecipeError

from .recipe import MOVED_KEYS, Recipe, dotted_keys, recipe_to_dict, unused_fields, with_moved_keys
from .yaml_comments import DuplicateKeyError, load_yaml_with_lines

_PACKAGE = Path(__file__).resolve().parent  # an installed copy holds recipes/ here (pyproject.toml); a checkout above
RECIPES_DIR = _PACKAGE / "recipes" if (_PACKAGE / "recipes").is_dir() else _PACKAGE.parent / "recipes"


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
