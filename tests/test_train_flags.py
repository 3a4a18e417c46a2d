"""What a timm user types at train.py: timm's flags get the override they mean, a wrong recipe key gets the
nearest right one, and --print-recipe and --help say what applies."""
import re
import subprocess
import sys

import pytest

import train
from common.errors import RecipeError
from cspresnet.recipe import Recipe, dotted_keys
from cspresnet.recipe_files import describe_recipe, load_recipe
from data.sources import SOURCES, expected_layouts
from tests.helpers import REPO, in_this_process
from tests.test_recipe import notes


@pytest.mark.parametrize("flags, says", [
    (["--lr", "0.2"], "--lr 0.2 -> optim.lr=0.2 optim.lr_scaling=none"),
    (["--lr=0.2"], "--lr 0.2 -> optim.lr=0.2 optim.lr_scaling=none"),
    (["-b", "64"], "-b 64 -> batch_size=64 (the global batch"),
    (["--batch-size", "64"], "--batch-size 64 -> batch_size=64 (the global batch"),
    (["-j", "4"], "-j 4 -> data.workers=4"),
    (["--workers=6"], "--workers 6 -> data.workers=6"),
    (["--epochs", "10"], "--epochs 10 -> epochs=10"),
    (["--weight-decay", "1e-5"], "--weight-decay 1e-5 -> optim.weight_decay=1e-5"),
    (["--smoothing", "0.0"], "--smoothing 0.0 -> label_smoothing=0.0"),
    (["--mixup", "0.2"], "--mixup 0.2 -> augment.mixup_alpha=0.2"),
    (["--cutmix", "1.0"], "--cutmix 1.0 -> augment.cutmix_alpha=1.0"),
    (["--drop-path", "0.1"], "--drop-path 0.1 -> model.drop_path_rate=0.1"),
    (["--warmup-epochs", "3"], "--warmup-epochs 3 -> schedule.warmup_epochs=3"),
    (["--sched", "step"], "--sched step -> schedule.name=step"),
    (["--dr", "0.9"], "--dr 0.9 -> schedule.decay_rate=0.9"),
    (["--seed", "42"], "--seed 42 -> seed=42"),
    (["--model-ema", "--model-ema-decay", "0.9998"], "--model-ema -> ema.enabled=true; --model-ema-decay 0.9998 -> "
                                                     "ema.decay=0.9998"),
    (["--amp"], "--amp -> runtime.amp=fp16"),
    (["--pretrained"], "--pretrained -> the option --initial-weights cspresnet50.ra_in1k"),
    (["--opt", "sgd"], "timm's sgd is Nesterov's: add optim.nesterov=true"),
])
def test_a_timm_flag_gets_one_line_naming_its_override(flags, says):
    result = in_this_process(train.main, "--recipe", "demo.yaml", *flags)
    assert result.returncode == 2
    assert result.stdout == ""
    line, = result.stderr.splitlines()
    assert line.startswith("error: train.py takes these timm flags as recipe overrides")
    assert says in line


def test_several_timm_flags_come_in_one_line_before_any_other_complaint():
    result = in_this_process(train.main, "--lr", "0.2", "-b", "64", "--epochs", "10")  # and no --recipe
    assert result.returncode == 2
    line, = result.stderr.splitlines()
    assert "optim.lr=0.2" in line and "batch_size=64" in line and "epochs=10" in line
    assert "--recipe" not in line  # timm's flags first: they are what the user needs to change


def test_each_override_a_timm_flag_names_is_a_recipe_key():
    keys = set(dotted_keys(Recipe))
    named = {key for text in train.TIMM_FLAGS.values() for key in re.findall(r"\b([a-z_]+(?:\.[a-z_]+)*)=", text)}
    assert named - keys == set()
    assert len(named) > 30
    assert set(train.TIMM_ALIASES.values()) <= set(train.TIMM_FLAGS)
    assert set(train.TIMM_SWITCHES) <= set(train.TIMM_FLAGS)


def test_values_of_our_own_options_and_overrides_are_not_timm_flags():
    args = train.parse_args(["--recipe", "demo.yaml", "--output", "runs/x", "optim.lr=0.2", "batch_size=64"])
    assert args.overrides == ["optim.lr=0.2", "batch_size=64"]


def test_a_dataset_folder_given_as_timm_does_points_to_data_dir():
    result = in_this_process(train.main, "/data/imagenet", "--recipe", "demo.yaml")
    assert result.returncode == 2
    line, = result.stderr.splitlines()
    assert "override '/data/imagenet' must look like key.sub=value" in line and "folder goes to --data-dir" in line


@pytest.mark.parametrize("override, nearest", [
    ("lr=0.2", "optim.lr"),  # the same name in a section
    ("optim.lrr=0.2", "optim.lr"),  # a typo
    ("epoch=3", "epochs"),
    ("warmup_epochs=3", "schedule.warmup_epochs"),
    ("model.drop_path=0.1", "model.drop_path_rate"),  # a longer name
    ("mixup=0.2", "augment.mixup_alpha"),
    ("smoothing=0.1", "label_smoothing"),
    ("data.img_sise=64", "data.img_size"),
])
def test_an_unknown_key_gets_the_nearest_key(override, nearest):
    with pytest.raises(RecipeError, match=rf"unknown recipe key .* \(did you mean {re.escape(nearest)}\?\); "
                                          rf"allowed keys: "):
        load_recipe("demo.yaml", [override])


def test_a_key_like_no_other_gets_no_guess():
    with pytest.raises(RecipeError) as error:
        load_recipe("demo.yaml", ["zzzz=1"])
    assert "did you mean" not in str(error.value) and "allowed keys: epochs," in str(error.value)


def test_did_you_mean_reaches_the_command_line_in_one_line():
    result = in_this_process(train.main, "--recipe", "demo.yaml", "--print-recipe", "lr=0.2")
    assert result.returncode == 2
    line, = result.stderr.splitlines()
    assert "unknown recipe key 'lr' in the recipe (did you mean optim.lr?)" in line


def test_print_recipe_marks_the_keys_of_another_schedule_or_optimizer_as_not_used():
    ra, fast, darknet = (notes(describe_recipe(name)) for name in
                         ("cspresnet50_ra.yaml", "cspresnet50_fast.yaml", "cspresnet50.yaml"))
    assert ra["schedule.burn_in_iters"] == ra["schedule.power"] == "[not used by schedule.name=step]"
    assert fast["schedule.burn_in_iters"] == "[not used by schedule.name=linear]"
    assert fast["schedule.decay_rate"] == "[not used by schedule.name=linear]"
    assert ra["optim.nesterov"] == ra["optim.kernel"] == "[not used by optim.name=rmsproptf]"
    assert ra["optim.eps"].startswith("[cspresnet50_ra.yaml] template --opt-eps")  # used: its origin, as before
    assert ra["schedule.warmup_epochs"].startswith("[cspresnet50_ra.yaml]")
    assert darknet["schedule.burn_in_iters"] == "[cspresnet50.yaml] cfg burn_in=1000: lr = 0.1 * (it/1000)^4"
    assert darknet["schedule.warmup_epochs"] == "[not used by schedule.name=darknet_poly]"
    assert darknet["optim.eps"] == "[not used by optim.name=sgd]"


def test_recipe_comments_point_to_docs_sections_that_exist():
    pointers = [(path.name, doc, heading) for path in sorted((REPO / "recipes").glob("*.yaml"))
                for doc, heading in re.findall(r'\((docs/[\w-]+\.md), "([^"]+)"\)', path.read_text())]
    assert ("cspresnet50.yaml", "docs/training.md", "Exact resume") in pointers
    for _, doc, heading in pointers:
        assert re.search(rf"^#+ {re.escape(heading)}$", (REPO / doc).read_text(), re.M), (doc, heading)
    assert not [path.name for path in (REPO / "recipes").glob("*.yaml") if "see README," in path.read_text()]


def test_help_lists_every_layout_data_dir_takes(capsys):
    with pytest.raises(SystemExit) as done:
        train.parse_args(["--help"])
    assert done.value.code == 0
    help_text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, at hyphens too
    assert "".join(expected_layouts().split()) in help_text
    assert all("".join(source.described.split()) in help_text for source in SOURCES)
    assert "ImageNetrootwithtrain/andval/" not in help_text


def test_train_py_starts_without_matplotlib():
    probe = "import sys, train; print('matplotlib' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "False", loaded.stderr
