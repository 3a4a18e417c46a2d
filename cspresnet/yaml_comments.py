"""YAML as the recipes need it: a key given twice in one mapping is an error (yaml.safe_load
keeps the last one silently), and each key's comment is kept, for --print-recipe's sources."""
import re
from typing import Any, Dict, List, Tuple

import yaml


class DuplicateKeyError(ValueError):
    def __init__(self, key: Any, section: str, lines: Tuple[int, int]):
        self.key, self.section, self.lines = key, section, lines
        where = "at the top level" if section == "" else f"in section '{section}'"
        super().__init__(f"key '{key}' appears twice {where}")


class RecipeLoader(yaml.SafeLoader):
    """`root`: the section the document is (an override's dotted key). After loading, `key_lines` maps each
    dotted key to its line (0-based), `line_ends` each line to where its last token ends: a comment follows."""

    def __init__(self, stream, root: str):
        super().__init__(stream)
        self.root = root
        self.key_lines: Dict[str, int] = {}
        self.line_ends: Dict[int, int] = {}

    def get_token(self):
        token = super().get_token()
        if token is not None:
            end = token.end_mark
            self.line_ends[end.line] = max(self.line_ends.get(end.line, 0), end.column)
        return token

    def construct_document(self, node):
        self._sections = {}
        self._name_sections(node, self.root)
        return super().construct_document(node)

    def _name_sections(self, node, where: str) -> None:
        """Each mapping's dotted place, for construct_mapping's messages, and each key's line."""
        if id(node) in self._sections:  # an alias: the same node again
            return
        self._sections[id(node)] = where
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                name = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
                dotted = f"{where}.{name}" if where else str(name)
                self.key_lines.setdefault(dotted, key_node.start_mark.line)
                self._name_sections(value_node, dotted)
        elif isinstance(node, yaml.SequenceNode):
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


YAML_LINE_BREAK = re.compile(r"\r\n|[\r\n\x85\u2028\u2029]")  # what YAML counts as a new line


def load_yaml_with_lines(text: str, root: str = "") -> Tuple[Any, Dict[str, str], Dict[str, int]]:
    """yaml.safe_load's value (but a key given twice in one mapping raises DuplicateKeyError), {dotted key:
    the comment beside it} ("" for none), and {dotted key: its line, from 1}, for messages about a key."""
    loader = RecipeLoader(text, root)
    try:
        value = loader.get_single_data()
    finally:
        loader.dispose()
    lines = YAML_LINE_BREAK.split(text.removeprefix("\ufeff"))  # YAML's columns do not count a byte-order mark
    comments = {key: key_comment(lines, line, loader.line_ends[line]) for key, line in loader.key_lines.items()}
    return value, comments, {key: line + 1 for key, line in loader.key_lines.items()}


def key_comment(lines: List[str], line: int, column: int) -> str:
    """The comment on `lines[line]` after `column` (where its last token ends), continued by
    the comment-only lines right below whose '#' is in the same column, joined with spaces."""
    rest = lines[line][column:]
    if not rest.lstrip().startswith("#"):
        return ""
    hash_column = column + len(rest) - len(rest.lstrip())
    parts = [lines[line][hash_column + 1:].strip()]
    for below in lines[line + 1:]:
        text = below.lstrip()
        if not text.startswith("#") or len(below) - len(text) != hash_column:
            break
        parts.append(text[1:].strip())
    return " ".join(parts).strip()
