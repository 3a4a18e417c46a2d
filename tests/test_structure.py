"""The house's rules that a reader relies on, checked on the code itself: small interfaces on
the training path, error classes at the bottom, light command-line tools, and a checkpoint
schema that keeps reading what earlier versions wrote."""
import ast
import subprocess
import sys

import pytest
import torch

import train
from cspresnet.checkpoint import FORMAT, TrainingCheckpoint, read_training_checkpoint, read_weights, save_checkpoint
from cspresnet.model import CSPResNet50
from cspresnet.recipe_files import recipe_from_dict
from common.errors import CheckpointError
from tests.helpers import REPO, TINY_OVERRIDES, a_training_checkpoint, in_this_process

TRAINING_PATH = sorted((REPO / "cspresnet").glob("*.py")) + [REPO / "data" / "loaders.py"]


def required_parameters(function: ast.FunctionDef) -> int:
    args = function.args
    positional = args.posonlyargs + args.args
    required = len(positional) - len(args.defaults) + sum(d is None for d in args.kw_defaults)
    return required - (1 if positional and positional[0].arg in ("self", "cls") else 0)


def test_no_function_on_the_training_path_takes_more_than_5_required_parameters():
    crowded = [f"{path.relative_to(REPO)}:{node.name} ({required_parameters(node)})"
               for path in TRAINING_PATH for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.FunctionDef) and required_parameters(node) > 5]
    assert not crowded


def imported_modules(path) -> set:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            found.add(("." * node.level) + (node.module or ""))
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_the_console_knows_the_errors_module_and_no_module_that_raises_them():
    ours = {name for name in imported_modules(REPO / "cspresnet" / "console.py")
            if name.startswith((".", "cspresnet", "data", "common"))}
    assert ours == {"common.errors"}


def test_no_module_decodes_images_with_torchvision_io():
    """torchvision 0.29 deprecates its image decoders for TorchCodec's (data/gpu_decode.py)."""
    users = [str(path.relative_to(REPO)) for folder in ("cspresnet", "data", "benchmarks", "tests")
             for path in (REPO / folder).rglob("*.py") if any(name.startswith("torchvision.io")
                                                             for name in imported_modules(path))]
    users += [name for name in ("train.py", "validate.py", "predict.py")
              if any(m.startswith("torchvision.io") for m in imported_modules(REPO / name))]
    assert users == []


def test_validate_and_predict_load_neither_the_training_loop_nor_tensorboard():
    probe = ("import sys, validate, predict; print(sorted(m for m in sys.modules if m in ('cspresnet.training', "
             "'cspresnet.run_log', 'cspresnet.signals', 'cspresnet.run_folder') or m.startswith(('tensorboard', "
             "'torch.utils.tensorboard'))))")
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr


def test_the_checkpoint_schema_reads_what_earlier_versions_wrote(tmp_path):
    assert FORMAT == "cspresnet-train-v1"
    save_checkpoint(a_training_checkpoint(), tmp_path / "v1.pt")
    checkpoint = read_training_checkpoint(tmp_path / "v1.pt")
    assert (checkpoint.position.step, checkpoint.batch_size, checkpoint.eval_dataset) == (3, 8, "15:def")
    assert set(checkpoint.to_dict()) == set(a_training_checkpoint())  # and it writes the same keys

    # Before 2026-11-30: no format tag, no eval_dataset, no batch_size; RandAugment under augment.
    old_recipe = a_training_checkpoint()["recipe"]
    old_recipe["augment"] = dict(old_recipe["augment"], auto_augment=old_recipe["data"].pop("auto_augment"))
    save_checkpoint(a_training_checkpoint(format=..., eval_dataset=..., batch_size=..., recipe=old_recipe),
                    tmp_path / "older.pt")
    older = read_training_checkpoint(tmp_path / "older.pt")
    assert (older.eval_dataset, older.batch_size) == (None, None)
    assert recipe_from_dict(older.recipe).data.auto_augment == ""
    assert read_weights(tmp_path / "older.pt").recipe is not None


def test_what_is_not_a_training_checkpoint_is_named_for_what_it_is(tmp_path):
    torch.save(CSPResNet50(num_classes=3).state_dict(), tmp_path / "timm.pth")
    with pytest.raises(CheckpointError, match="holds model weights only.*--initial-weights .*timm.pth"):
        read_training_checkpoint(tmp_path / "timm.pth")
    save_checkpoint(a_training_checkpoint(format="cspresnet-train-v9"), tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="of format 'cspresnet-train-v9'; this version resumes"):
        read_training_checkpoint(tmp_path / "future.pt")
    save_checkpoint(a_training_checkpoint(per_rank=...), tmp_path / "damaged.pt")
    with pytest.raises(CheckpointError, match="damaged training checkpoint: it lacks per_rank"):
        read_training_checkpoint(tmp_path / "damaged.pt")
    assert isinstance(TrainingCheckpoint.from_dict(a_training_checkpoint(), tmp_path), TrainingCheckpoint)


def test_resuming_from_timms_weights_file_is_one_line_that_names_initial_weights(tiny_imagenet, tmp_path):
    torch.save(CSPResNet50(num_classes=3).state_dict(), tmp_path / "cspresnet50_ra-d3e8d487.pth")
    result = in_this_process(train.main, "--recipe", "demo.yaml", "--data-dir", tiny_imagenet, "--output",
                             tmp_path / "run", "--resume", tmp_path / "cspresnet50_ra-d3e8d487.pth", *TINY_OVERRIDES)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "holds model weights only" in lines[0] and "pass --initial-weights" in lines[0]
    assert not (tmp_path / "run" / "status").exists()


LIBRARY = sorted(path for folder in ("common", "cspresnet", "data") for path in (REPO / folder).rglob("*.py"))


def calling(name: str) -> set:
    """The library's modules that call `name` (a dotted attribute or a plain name)."""
    found = set()
    for path in LIBRARY:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                called = ast.unparse(node.func)
                if called == name or called.endswith("." + name):
                    found.add(str(path.relative_to(REPO)))
    return found


def test_each_mechanism_is_written_once():
    """One atomic write (the others rename a finished folder, or swap a checkpoint's link),
    one index cache, one checkpoint format, one evaluation-set dispatcher."""
    assert calling("os.replace") == {"common/files.py", "data/downloads.py", "cspresnet/run_folder.py"}
    assert calling("fcntl.flock") == calling("SampleIndex.load") == {"data/sample_index.py"}
    assert calling("torch.load") == calling("torch.save") == {"cspresnet/checkpoint.py"}
    assert calling("evaluation") == calling("source_of") - {"data/pack_shards.py"} == {"data/sources/__init__.py"}


def test_the_library_stays_within_its_size():
    """A newcomer reads cspresnet/ and data/ in an afternoon: 5,800 lines at issue 32 (from 7,335); issue 33's
    features added 272 (weights by name, step lines, pictures, timm's flags, progress), the fast exit 10, splitting
    recipe.py in two 9 (a docstring, imports). A change that needs more raises this number and says why it pays."""
    lines = sum(len(path.read_text().splitlines()) for path in LIBRARY if path.relative_to(REPO).parts[0] != "common")
    assert lines <= 6100, lines


def test_the_sources_are_at_most_7_modules_of_1200_lines_on_4_levels_without_a_circle():
    modules = {path.stem: path for path in (REPO / "data" / "sources").glob("*.py")}
    lines = sum(len(path.read_text().splitlines()) for path in modules.values())
    assert len(modules) <= 7 and lines <= 1200, (len(modules), lines)
    imports = {name: {module.lstrip(".") for module in imported_modules(path)
                      if module.startswith(".") and not module.startswith("..")} & set(modules)
               for name, path in modules.items()}
    imports["__init__"] |= {name for name in modules if name != "__init__"}  # `from . import archives, ...`

    def level(name, seen=()):
        assert name not in seen, f"a circle: {' -> '.join(seen + (name,))}"
        return 1 + max((level(other, seen + (name,)) for other in imports[name]), default=0)

    assert max(level(name) for name in modules) <= 4


def test_no_floor_imports_one_above_it():
    """common/ stands on nothing of ours, data/ on common/ alone, cspresnet/ on both."""
    above = {"common": ("data", "cspresnet"), "data": ("cspresnet",)}
    upward = [f"{path.relative_to(REPO)} imports {module}" for path in LIBRARY for floor, higher in above.items()
              if path.relative_to(REPO).parts[0] == floor for module in imported_modules(path)
              if module.split(".")[0] in higher]
    assert upward == []
