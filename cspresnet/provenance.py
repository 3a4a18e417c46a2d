"""Where each value of a resolved recipe comes from: which recipe file set it and the
comment it wrote beside it, the command line, or the dataclass default.

    python train.py --recipe cspresnet50_ra.yaml --print-recipe
"""
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import yaml

from .recipe import Recipe, recipe_to_dict, resolve_recipe_path

KEY_LINE = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z_]\w*):(?P<value>[^#]*?)\s*(?:#\s?(?P<comment>.*))?$")
COMMENT_LINE = re.compile(r"^(?P<indent>\s*)#\s?(?P<comment>.*)$")


def commented_keys(path: Path) -> Dict[str, str]:
    """{dotted key: its comment} for one recipe file. A comment-only line whose '#' sits in
    the same column as the previous key's comment continues that comment."""
    comments: Dict[str, str] = {}
    section, last_key, last_column = None, None, None
    for line in path.read_text().splitlines():
        key_line = KEY_LINE.match(line)
        if key_line:
            indent, key, value = len(key_line["indent"]), key_line["key"], key_line["value"].strip()
            if indent == 0:
                section = key if not value else None
                dotted = key
            else:
                dotted = f"{section}.{key}" if section else key
            comments[dotted] = key_line["comment"] or ""
            last_key = dotted
            last_column = line.index("#") if key_line["comment"] is not None else None
            continue
        comment_line = COMMENT_LINE.match(line)
        if comment_line and last_key and last_column == len(comment_line["indent"]):
            comments[last_key] = f"{comments[last_key]} {comment_line['comment']}".strip()
        else:
            last_key, last_column = None, None
    return comments


def recipe_chain(name_or_path: str) -> List[Path]:
    """The recipe file and the files it extends, base first."""
    chain, path = [], resolve_recipe_path(name_or_path).resolve()
    while path is not None and path not in chain:
        chain.insert(0, path)
        base = (yaml.safe_load(path.read_text()) or {}).get("base")
        if base is None:
            break
        sibling = path.parent / str(base)
        path = (sibling if sibling.is_file() else resolve_recipe_path(str(base))).resolve()
    return chain


def annotated_yaml(recipe: Recipe, name_or_path: str, overrides: Optional[List[str]] = None,
                   data_dir: Optional[str] = None) -> str:
    """The resolved recipe as YAML, each value followed by where it came from."""
    origin: Dict[str, Tuple[str, str]] = {}
    for path in recipe_chain(name_or_path):
        for key, comment in commented_keys(path).items():
            origin[key] = (path.name, comment)
    for override in overrides or []:
        origin[override.split("=", 1)[0].strip()] = ("command line", override)
    if data_dir is not None:
        origin["data.dir"] = ("command line", f"--data-dir {data_dir}")
    def note(dotted: str) -> str:
        where, comment = origin.get(dotted, ("default", ""))
        return f"[command line: {comment}]" if where == "command line" else f"[{where}] {comment}".rstrip()

    lines = []
    for key, value in recipe_to_dict(recipe).items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines += [f"{f'  {sub}: {_inline(v)}':<44} # {note(f'{key}.{sub}')}" for sub, v in value.items()]
        else:
            lines.append(f"{f'{key}: {_inline(value)}':<44} # {note(key)}")
    return "\n".join(lines) + "\n"


def _inline(value) -> str:
    """One value as one line of YAML (lists in flow style)."""
    return yaml.safe_dump(value, default_flow_style=True, width=1000).splitlines()[0]
