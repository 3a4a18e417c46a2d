"""The project as a package: pyproject.toml names what the requirements files pin, and a non-editable install
(recipes as package data, the scripts as commands) trains from any folder without the source tree."""
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from tests.helpers import REPO, TINY_OVERRIDES, child_env, last_wins


def pinned(requirements_file: str) -> set:
    """The package names a requirements file pins, as pip compares them (case and -/_ alike)."""
    lines = (line.split("#")[0].strip() for line in (REPO / requirements_file).read_text().splitlines())
    return {canonical(line.split("==")[0]) for line in lines if line and not line.startswith("-")}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_pyproject_names_exactly_the_pinned_packages_runtime_and_test_apart():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert {canonical(name) for name in project["dependencies"]} == pinned("requirements.txt")
    assert {canonical(name) for name in project["optional-dependencies"]["test"]} == pinned("requirements-test.txt")
    assert "pytest" not in pinned("requirements.txt")  # a test-only package is not a runtime one
    assert {"torchcodec", "matplotlib"} <= pinned("requirements.txt")


def test_the_makefile_installs_both_requirements_files_and_ci_runs_make_test():
    makefile = (REPO / "Makefile").read_text()
    assert "-r requirements.txt -r requirements-test.txt" in makefile
    assert (REPO / ".ci" / "run").read_text().strip().splitlines()[-1] == "make test"


@pytest.mark.slow
def test_a_non_editable_install_trains_a_packaged_recipe_from_another_folder(tmp_path, tiny_imagenet):
    """A venv that sees this interpreter's packages (torch: gigabytes) through a .pth line, which adds their folders
    but runs none of their .pth files, so an editable install of this project there stays invisible."""
    pytest.importorskip("setuptools", minversion="64")  # the build backend pyproject.toml names, from here
    source = shutil.copytree(REPO, tmp_path / "source", ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "runs", "sample_imagenet", "build", "*.egg-info"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    outer = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if p != str(purelib)]
    (purelib / "outer.pth").write_text("\n".join(dict.fromkeys(outer)) + "\n")
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", source],
                   check=True, capture_output=True, cwd=tmp_path)
    shutil.rmtree(source)  # nothing may come from the copy that was installed either

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = child_env(False, PYTHONVERBOSE="1")  # every module's file, on stderr
    env.pop("PYTHONPATH", None)
    trained = subprocess.run([venv / "bin" / "cspresnet-train", "--recipe", "demo.yaml", "--data-dir", tiny_imagenet,
                              "--output", "run", *last_wins(*TINY_OVERRIDES, "epochs=1")],
                             cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    said = [line for line in trained.stderr.splitlines() if not line.startswith(("#", "import "))]
    assert trained.returncode == 0, trained.stdout + "\n".join(said[-20:])
    assert (elsewhere / "run" / "best.pt").is_file()
    packaged = f"{purelib}/cspresnet/recipe_files.py"
    assert packaged in trained.stderr
    from_the_tree = re.findall(rf"{re.escape(str(REPO))}/(?!\.venv/)\S+", trained.stderr)
    assert from_the_tree == []

    probe = "from cspresnet.recipe_files import resolve_recipe_path; print(resolve_recipe_path('demo.yaml'))"
    found = subprocess.run([python, "-c", probe], cwd=elsewhere, env=child_env(False), capture_output=True, text=True,
                           check=True)
    assert found.stdout.strip() == f"{purelib}/cspresnet/recipes/demo.yaml"
    recipes = sorted(p.name for p in (REPO / "recipes").glob("*.yaml"))
    assert sorted(p.name for p in (purelib / "cspresnet" / "recipes").glob("*.yaml")) == recipes
