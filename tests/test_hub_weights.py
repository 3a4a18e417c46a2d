"""Weights by name (timm's cspresnet50.ra_in1k, hf-hub:timm/cspresnet50.ra_in1k) through huggingface_hub's own
cache, offline: a cache written in the hub's layout holds our own random-init CSPResNet-50, and every name must
give exactly what the same file gives by path. Nothing downloads."""
import hashlib
import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from huggingface_hub import constants
from safetensors.torch import save_file

import predict
import train
import validate
from cspresnet.model import build_model
from tests.helpers import REPO, child_env, in_this_process

NAME, HUB_NAME = "cspresnet50.ra_in1k", "hf-hub:timm/cspresnet50.ra_in1k"
COMMIT = "8f8e4f4e2c0a6d4c7a5bb2b1a0c5e6f7d8e9fa0b"  # any 40 hex digits: the snapshot refs/main names
# finetune.yaml shrunk for a CPU: one epoch at 32 px, batch 8, fp32, no loader processes.
SMALL = ["epochs=1", "batch_size=8", "optim.reference_batch_size=8", "data.img_size=32", "data.eval_img_size=32",
         "data.workers=0", "data.eval_batch_size=15", "schedule.burn_in_iters=2", "runtime.amp=none"]


def write_hub_cache(home, weights, filename):
    """HF_HOME as `hf download timm/cspresnet50.ra_in1k FILENAME` leaves it: the file as a blob named by its SHA-256,
    a snapshot folder whose FILENAME links to the blob, and refs/main naming the snapshot."""
    repo = home / "hub" / "models--timm--cspresnet50.ra_in1k"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    (repo / "blobs").mkdir(parents=True)
    shutil.copy(weights, repo / "blobs" / digest)
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    (repo / "snapshots" / COMMIT / filename).symlink_to(f"../../blobs/{digest}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return home


@pytest.fixture(scope="module")
def state_dict():
    """A random-init CSPResNet-50 of 3 classes, as many as tiny_imagenet has."""
    torch.manual_seed(3)
    return build_model(3).state_dict()


@pytest.fixture(scope="module")
def safetensors_file(tmp_path_factory, state_dict):
    path = tmp_path_factory.mktemp("weights") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, safetensors_file):
    """The hub's cache as it holds timm's repository: model.safetensors, the file timm loads first."""
    return write_hub_cache(tmp_path_factory.mktemp("hf_home"), safetensors_file, "model.safetensors")


def offline(monkeypatch, home):
    """What HF_HOME=home HF_HUB_OFFLINE=1 give a new process, for huggingface_hub already imported here."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def run_validate(*args):
    return validate.main([str(a) for a in ("--workers", "0", "--img-size", "64", *args)])


def same_evaluation(result, reference):
    keys = ("top1", "top5", "eval_loss", "images", "weights", "num_classes")
    return {k: result[k] for k in keys} == {k: reference[k] for k in keys}


def test_validate_by_name_is_the_evaluation_of_the_file_by_path(tiny_imagenet, safetensors_file, hf_home,
                                                                  monkeypatch, tmp_path):
    by_path = run_validate("--checkpoint", safetensors_file, "--data-dir", tiny_imagenet)
    # A new process, as a user runs it: the hub reads HF_HOME and HF_HUB_OFFLINE from the environment itself.
    child = subprocess.run([sys.executable, "validate.py", "--model", NAME, "--pretrained", "--data-dir", tiny_imagenet,
                            "--workers", "0", "--img-size", "64"], cwd=REPO, capture_output=True, text=True,
                           timeout=300, env=child_env(False, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1"))
    assert child.returncode == 0, child.stderr
    by_model = json.loads(child.stdout.strip().splitlines()[-1])
    assert same_evaluation(by_model, by_path) and by_model["checkpoint"] == NAME
    assert str(hf_home / "hub" / "models--timm--cspresnet50.ra_in1k" / "snapshots" / COMMIT) in child.stdout

    offline(monkeypatch, hf_home)
    by_hub_name = run_validate("--checkpoint", HUB_NAME, "--data-dir", tiny_imagenet, "--results-file", tmp_path / "r")
    assert same_evaluation(by_hub_name, by_path) and by_hub_name["checkpoint"] == HUB_NAME
    assert (tmp_path / "r").read_text().splitlines()[1].startswith(f"{NAME},{by_path['top1']},")  # timm's model name


def test_a_cache_with_only_timms_pytorch_model_bin_loads_it(tiny_imagenet, tmp_path, state_dict, monkeypatch):
    """timm's load_state_dict_from_hf order: model.safetensors, else pytorch_model.bin."""
    pickle_file = tmp_path / "pytorch_model.bin"
    torch.save(state_dict, pickle_file)
    offline(monkeypatch, write_hub_cache(tmp_path / "hf_home", pickle_file, "pytorch_model.bin"))
    by_path = run_validate("--checkpoint", pickle_file, "--data-dir", tiny_imagenet)
    assert same_evaluation(run_validate("--checkpoint", HUB_NAME, "--data-dir", tiny_imagenet), by_path)


def test_predict_by_name_prints_what_the_file_by_path_gives(tiny_imagenet, safetensors_file, hf_home, monkeypatch):
    offline(monkeypatch, hf_home)
    images = tiny_imagenet / "val" / "n00000001"
    outputs = [in_this_process(predict.cli, "--checkpoint", weights, "--workers", "0", "--topk", "2", images)
               for weights in (safetensors_file, NAME, HUB_NAME)]
    assert [o.returncode for o in outputs] == [0, 0, 0], outputs[1].stderr
    assert outputs[0].stdout.count('"top"') == 5 and outputs[1].stdout == outputs[0].stdout == outputs[2].stdout


def test_finetune_yaml_starts_from_timms_weights_by_name_and_records_the_files_sha256(tiny_imagenet, tmp_path,
                                                                                      safetensors_file, hf_home,
                                                                                      monkeypatch):
    """finetune.yaml as shipped names the weights; the run folder records the name and the file's SHA-256."""
    offline(monkeypatch, hf_home)
    result = in_this_process(train.main, "--recipe", "finetune.yaml", "--data-dir", tiny_imagenet, "--output",
                             tmp_path / "run", *SMALL)
    assert result.returncode == 0, result.stderr
    recorded = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["model"]
    assert recorded["initial_weights"] == HUB_NAME
    assert recorded["initial_weights_sha256"] == hashlib.sha256(safetensors_file.read_bytes()).hexdigest()
    assert f"snapshots/{COMMIT}/model.safetensors (model weights, SHA-256 " in result.stdout


@pytest.mark.parametrize("script", ["validate", "predict", "train"])
def test_a_name_missing_from_the_offline_cache_is_one_line_that_says_how_to_fetch_it(tiny_imagenet, tmp_path,
                                                                                    monkeypatch, script):
    offline(monkeypatch, tmp_path / "empty")
    if script == "validate":
        result = in_this_process(validate.cli, "--model", NAME, "--pretrained", "--data-dir", tiny_imagenet)
    elif script == "predict":
        result = in_this_process(predict.cli, "--checkpoint", NAME, tiny_imagenet / "val")
    else:
        result = in_this_process(train.main, "--recipe", "finetune.yaml", "--data-dir", tiny_imagenet, "--output",
                                 tmp_path / "run", *SMALL)
    name = NAME if script != "train" else f"recipe key 'model.initial_weights': {HUB_NAME}"
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {name} is not in the Hugging Face cache {tmp_path / 'empty' / 'hub'} and the hub cannot be reached "
        f"(HF_HUB_OFFLINE=1): fetch it where it can, into the same HF_HOME, with `hf download "
        f"timm/cspresnet50.ra_in1k model.safetensors`")


@pytest.mark.parametrize("arguments, message", [
    (["--model", "resnet50", "--pretrained"],
     "--model resnet50: this project has CSPResNet-50 only; allowed: cspresnet50, cspresnet50.ra_in1k"),
    (["--model", "cspresnet50.a1_in1k"], "--model cspresnet50.a1_in1k: this project has CSPResNet-50 only"),
    (["--pretrained", "--checkpoint", "w.pth"], "--pretrained and --checkpoint both name weights: give one"),
    ([], "no weights: give --checkpoint FILE (or hf-hub:timm/cspresnet50.ra_in1k), or --model cspresnet50.ra_in1k "
         "--pretrained"),
    (["--checkpoint", "hf-hub:not a name"], "hf-hub:not a name: not a hub repository name (HFValidationError: "),
])
def test_wrong_weights_options_are_one_line(tiny_imagenet, tmp_path, monkeypatch, arguments, message):
    offline(monkeypatch, tmp_path / "empty")
    result = in_this_process(validate.cli, *arguments, "--data-dir", tiny_imagenet)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {message}")


def test_the_bare_model_name_means_its_published_weights_as_in_timm(hf_home, monkeypatch):
    """timm's validate.py: --model cspresnet50 without a checkpoint evaluates its default published weights."""
    offline(monkeypatch, hf_home)
    for model in ("cspresnet50", NAME):
        assert validate.weights_name(validate.parse_args(["--model", model, "--data-dir", "x"])) == NAME
    assert validate.weights_name(validate.parse_args(["--pretrained", "--data-dir", "x"])) == NAME
    with_checkpoint = validate.parse_args(["-m", "cspresnet50", "--checkpoint", "b.pt", "--data-dir", "x"])
    assert validate.weights_name(with_checkpoint) == "b.pt"
