"""What the README and docs/ tell a user to type parses, and what they say about the code is so: each command
line of their code blocks parses with its script's own argparse parser (never run: /data/imagenet may be a
placeholder), each script's --help works, each recipe resolves with the line's overrides, each file they name
exists; and the statements of theirs that once disagreed with the code (recipes, shard names, layout errors)."""
import argparse
import ast
import contextlib
import importlib
import inspect
import io
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from common.errors import DatasetLayoutError
from cspresnet.recipe_files import load_recipe, resolve_recipe_path
from data.config import DataConfig
from data.pack_shards import plan_split
from data.sources import SOURCES, training_splits
from tests.helpers import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
COMMANDS = {"cspresnet-train": "train.py", "cspresnet-validate": "validate.py", "cspresnet-predict": "predict.py"}
PACKAGES = ("cspresnet", "data", "common", "benchmarks")  # `python -m` of another (pytest, pip) is not checked
PYTHON = re.compile(r"^(python3?|\.venv/bin/python)$")


def code_lines(page: Path):
    """(page:line, text) of each line of the page's fenced code blocks, a line ending in \\ joined to the next."""
    lines, joined, start, fenced = page.read_text().splitlines(), "", 0, False
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            start = start if joined else number
            joined += line.rstrip("\\").rstrip() + " " if line.rstrip().endswith("\\") else line
            if not line.rstrip().endswith("\\"):
                yield f"{page.relative_to(REPO)}:{start}", joined.strip()
                joined = ""


def commands():
    """(where, script or module, argv) of each command of the docs' code blocks that this repository provides."""
    found = []
    for page in PAGES:
        for where, line in code_lines(page):
            for part in re.split(r"&&|;|\|\|?", line):
                try:
                    words = shlex.split(part, comments=True)
                except ValueError:
                    continue
                while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value before the command
                    words = words[1:]
                target = command_target(words)
                if target is not None:
                    found.append((where, *target))
    return found


def command_target(words):
    """(script.py or package.module, its arguments) when `words` runs one of this repository's, else None."""
    if not words:
        return None
    if words[0] in COMMANDS:
        return COMMANDS[words[0]], words[1:]
    if words[0] == "torchrun":  # its own options, then the script (or -m module) and the script's
        words = ["python", *words[next((i for i, w in enumerate(words) if w.endswith(".py") or w == "-m"), 0):]]
    if PYTHON.match(words[0]) and len(words) > 1:
        if words[1] == "-m" and len(words) > 2 and words[2].split(".")[0] in PACKAGES:
            return words[2], words[3:]
        if words[1].endswith(".py"):
            return words[1], words[2:]
    if words[0] == "make":
        return "make", words[1:]
    return None


def script_file(target: str) -> Path:
    """train.py, or a module's file: data.pack_shards -> data/pack_shards.py."""
    if target.endswith(".py"):
        return REPO / target
    path = REPO / Path(*target.split("."))
    return path / "__main__.py" if path.is_dir() else path.with_suffix(".py")


class Parsed(BaseException):
    """Raised by the outermost parse_args of a script's main once it has parsed: the script stops there."""

    def __init__(self, namespace):
        self.namespace = namespace


@contextlib.contextmanager
def stop_after_parsing(monkeypatch):
    """parse_args, or parse_known_args where a script calls it itself; not the calls inside them (subparsers)."""
    depth = [0]

    def outermost(original):
        def parse(self, args=None, namespace=None):
            depth[0] += 1
            try:
                result = original(self, args, namespace)
            finally:
                depth[0] -= 1
            if depth[0] == 0:
                raise Parsed(result[0] if isinstance(result, tuple) else result)
            return result
        return parse

    for name in ("parse_args", "parse_known_args"):
        monkeypatch.setattr(argparse.ArgumentParser, name, outermost(getattr(argparse.ArgumentParser, name)))
    yield


def entry_point(target: str):
    """The function the script's `if __name__ == "__main__":` calls (main, cli), from its module."""
    path = script_file(target)
    module = importlib.import_module(target[:-3] if target.endswith(".py") else target)
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            calls = [call.func.id for call in ast.walk(node) if isinstance(call, ast.Call)
                     and isinstance(call.func, ast.Name) and call.func.id != "exit_now"]  # exit_now(main())
            if calls:  # train.py's first such block only sets signal handlers
                return getattr(module, calls[0])
    raise AssertionError(f"{target} has no `if __name__ == '__main__':` call")


def parse(monkeypatch, target: str, argv):
    """The namespace the script's own parser makes of `argv`; SystemExit (with argparse's message) if it refuses."""
    main = entry_point(target)
    err = io.StringIO()
    with stop_after_parsing(monkeypatch), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        monkeypatch.setattr(sys, "argv", [target, *argv])
        try:
            code = main(list(argv)) if inspect.signature(main).parameters else main()
        except Parsed as parsed:
            return parsed.namespace
        except SystemExit as exc:
            code = exc.code
    raise SystemExit(f"exit {code}: {err.getvalue().strip()}")  # argparse's refusal, or the script's own


DOCUMENTED = commands()


def test_the_docs_have_commands_to_check():
    assert {"train.py", "validate.py", "predict.py", "make"} <= {target for _, target, _ in DOCUMENTED}


@pytest.mark.parametrize("target", sorted({target for _, target, _ in DOCUMENTED} - {"make"}))
def test_each_documented_script_says_its_help(monkeypatch, target):
    assert script_file(target).is_file(), f"{target}: no such script"
    with pytest.raises(SystemExit, match=r"^exit 0: $"):
        parse(monkeypatch, target, ["--help"])


@pytest.mark.parametrize("where, target, argv", DOCUMENTED, ids=[f"{w} {t}" for w, t, _ in DOCUMENTED])
def test_each_documented_command_line_parses_and_its_recipe_resolves(monkeypatch, where, target, argv):
    if target == "make":
        targets = re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M)
        assert set(argv) <= set(targets), f"{where}: make {argv}: the Makefile's targets are {targets}"
        return
    assert script_file(target).is_file(), f"{where}: {target} is not in the repository"
    try:
        args = parse(monkeypatch, target, argv)
    except SystemExit as exc:
        raise AssertionError(f"{where}: {target} {' '.join(argv)}: {exc}") from None
    if getattr(args, "recipe", None):
        resolve_recipe_path(args.recipe)
        load_recipe(args.recipe, list(getattr(args, "overrides", None) or []), getattr(args, "data_dir", None))


ELSEWHERE = {"docs/models/csp-resnet.md"}  # timm's model card, in timm's repository (docs/recipes.md, Sources)
REPO_PATH = re.compile(r"(?<![\w./-])((?:recipes|docs|benchmarks/results)/[\w./-]*\w)")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(REPO)) for page in PAGES])
def test_each_file_a_page_names_exists(page):
    text = page.read_text()
    named = {REPO / path for path in REPO_PATH.findall(text) if path not in ELSEWHERE}
    named |= {(page.parent / link).resolve() for link in LINK.findall(text) if not re.match(r"^\w+:", link)}
    assert sorted(str(path.relative_to(REPO)) for path in named if not path.exists()) == []
    for name in re.findall(r"--recipe[ =]([\w./-]*[a-z][\w./-]*)", text):  # prose too; NAME_OR_PATH is no name
        resolve_recipe_path(name)


# ----------------------------------------------------------------------------- what the docs said wrong

def test_the_recipes_page_lists_every_recipe_and_counts_them():
    page = (REPO / "docs" / "recipes.md").read_text()
    recipes = sorted(path.name for path in (REPO / "recipes").glob("*.yaml"))
    table = sorted(re.findall(r"^\| `([\w.]+\.yaml)` \|", page, re.M))
    assert table == recipes
    words = {4: "Four", 5: "Five", 6: "Six", 7: "Seven", 8: "Eight"}
    assert page.count(f"{words[len(recipes)]} recipes live in `recipes/`") == 1


def test_the_shard_names_the_docs_give_are_the_packers():
    """docs/shards.md: as many digits as the last number needs, at least two."""
    def first_and_last(split, count):
        names = list(plan_split(split, range(2000), [], count, 0, "imagenet1k").shards)
        return names[0], names[-1]

    assert first_and_last("train", 1024) == ("imagenet1k-train-0000.tar", "imagenet1k-train-1023.tar")
    assert first_and_last("validation", 64) == ("imagenet1k-validation-00.tar", "imagenet1k-validation-63.tar")
    assert first_and_last("train", 100) == ("imagenet1k-train-00.tar", "imagenet1k-train-99.tar")
    page = (REPO / "docs" / "shards.md").read_text()
    assert "DIR/imagenet1k-train-0000.tar ... -1023.tar" in page
    assert "DIR/imagenet1k-validation-00.tar ... -63.tar" in page
    assert "`--train-shards 100` gives `-00` to `-99`" in page


def layout_error(data_dir) -> str:
    with pytest.raises(DatasetLayoutError) as error:
        training_splits(DataConfig(dir=str(data_dir)), seed=0)
    return str(error.value)


def test_a_folder_of_no_layout_gets_a_readable_list_of_the_layouts(tmp_path):
    message = layout_error(tmp_path)
    assert message.startswith(f"{tmp_path / 'train'} does not exist; expected one of {len(SOURCES)} layouts: "
                              f"kaggle-zip = Kaggle's zip, kaggle = ")
    assert "\n" not in message and len(message.split("; ", 1)[1]) < 400, message
    assert "docs/adding-a-source.md" in message and "class folders are DIR/train/<wnid>/*.JPEG" in message


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_data_dir_that_is_one_split_says_to_give_its_parent(tiny_imagenet, split):
    assert layout_error(tiny_imagenet / split) == (f"{tiny_imagenet / split} is one split of a dataset: pass "
                                                   f"--data-dir {tiny_imagenet}, the folder that holds train/")


def test_a_split_folder_away_from_its_dataset_is_known_by_its_class_folders(tiny_imagenet, tmp_path):
    alone = shutil.copytree(tiny_imagenet / "train", tmp_path / "train")
    assert "is one split of a dataset" in layout_error(alone)
    other = shutil.copytree(tiny_imagenet / "train", tmp_path / "pictures")  # not a split's name: the list
    assert layout_error(other).startswith(f"{other / 'train'} does not exist; expected one of")
