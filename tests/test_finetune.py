"""Fine-tuning: a new run from trained weights (timm's .pth, .safetensors, our checkpoints,
DDP prefixes), the class count from the data, a held-out split where there is no val/, and
the linear probe. Every run here is train.py's main in this process, at 32 px."""
import hashlib
import shutil

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file
from timm.data import ImageDataset, create_transform

import train
from cspresnet import training
from cspresnet.checkpoint import load_checkpoint
from common.processes import DistContext
from cspresnet.model import build_model
from data.sample_index import fingerprint_of
from cspresnet.weights import CLASSIFIER, apply_initial_weights, read_initial_weights
from data.config import DataConfig
from data.sources.folders import hold_out, index_split
from data.loaders import build_training_data
from data.sample_data import generate
from tests.helpers import TINY_OVERRIDES, in_this_process, last_wins

# finetune.yaml shrunk for a CPU: 32 px, batch 16, fp32, no loader processes.
SMALL = ["data.img_size=32", "data.eval_img_size=32", "data.workers=0", "data.eval_batch_size=60", "batch_size=16",
         "optim.reference_batch_size=16", "schedule.burn_in_iters=2", "runtime.amp=none", "runtime.log_interval=5"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """timm's cspresnet50 (1000 classes) trained for 16 steps on 8 generated classes other
    than the fine-tuning set's, so that its features are worth keeping; saved as timm saves
    its official weights: a plain state dict."""
    data = generate(tmp_path_factory.mktemp("pretraining") / "set", num_classes=8, train_per_class=24,
                    val_per_class=1, min_size=40, max_size=80, seed=11)
    torch.manual_seed(0)
    model = timm.create_model("cspresnet50", num_classes=1000).train()
    images = ImageDataset(str(data / "train"), transform=create_transform(32, is_training=True, scale=(0.35, 1.0)))
    loader = torch.utils.data.DataLoader(images, batch_size=32, shuffle=True, drop_last=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for step, (inputs, targets) in zip(range(16), (batch for _ in range(10) for batch in loader)):
        loss = torch.nn.functional.cross_entropy(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("weights") / "cspresnet50_pretrained.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory):
    """timm's cspresnet50 as it is initialised (1000 classes), saved as a plain state dict:
    for the tests that need a timm-format file, not features worth keeping."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "cspresnet50_initialised.pth"
    torch.save(timm.create_model("cspresnet50", num_classes=1000).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def ten_classes(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("finetuning") / "set", num_classes=10, train_per_class=8,
                    val_per_class=6, min_size=40, max_size=80, seed=12)


class FirstEpochSpy:
    """Wraps TrainingRun.train_epoch: keeps the model's tensors as the first step finds
    them, and whether the backbone and the classifier were in training mode during it."""

    def __init__(self, monkeypatch):
        self.before, self.modes = None, None
        real = training.TrainingRun.train_epoch

        def spy(run, *args, **kwargs):
            if self.before is None:
                self.before = {k: v.clone() for k, v in run.updater.model.state_dict().items()}
                model = run.updater.model
                model.train()
                self.modes = dict(stages=model.stages.training, stem=model.stem.training, head=model.head.training)
            return real(run, *args, **kwargs)

        monkeypatch.setattr(training.TrainingRun, "train_epoch", spy)


def backbone(state):
    return {k: v for k, v in state.items() if k not in CLASSIFIER}


def assert_backbone_equal(state, reference):
    assert set(backbone(state)) == set(backbone(reference))
    for key, value in backbone(reference).items():
        assert torch.equal(state[key], value), key


def finetune(data, output, *extra):
    result = in_this_process(train.main, "--recipe", "finetune.yaml", "--data-dir", data, "--output", output,
                             *extra, *SMALL)
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.slow  # about two minutes of CPU time here: 16 pretraining steps and two runs of 10
def test_fine_tuning_a_timm_pth_keeps_its_backbone_and_beats_training_from_scratch(pretrained, ten_classes, tmp_path,
                                                                                   monkeypatch):
    spy = FirstEpochSpy(monkeypatch)
    tuned = finetune(ten_classes, tmp_path / "tuned", "--initial-weights", pretrained, "epochs=2")
    weights = torch.load(pretrained, weights_only=True)
    assert_backbone_equal(spy.before, weights)  # all 330 backbone tensors, BatchNorm statistics included
    assert spy.before["head.fc.weight"].shape == (10, 1024) and spy.before["head.fc.bias"].shape == (10,)
    assert ("classifier re-initialised, head.fc.weight (1000, 1024) -> (10, 1024) and head.fc.bias (1000,) -> (10,): "
            "the file has 1000 classes, the data 10") in tuned.stdout

    recorded = yaml.safe_load((tmp_path / "tuned" / "recipe.yaml").read_text())["model"]
    assert recorded["num_classes"] == 10 and recorded["initial_weights"] == str(pretrained)
    assert recorded["initial_weights_sha256"] == hashlib.sha256(pretrained.read_bytes()).hexdigest()
    last = load_checkpoint(tmp_path / "tuned" / "last.pt")
    assert last["classes"] == [f"n{i:08d}" for i in range(10)] and last["step"] == 10  # fresh: 2 epochs x 5 steps

    finetune(ten_classes, tmp_path / "scratch", "model.initial_weights=", "epochs=2")
    tuned_top1, scratch_top1 = (load_checkpoint(tmp_path / name / "last.pt")["best_top1"] for name in ("tuned", "scratch"))
    print(f"10 classes, 80 training / 60 validation images, 32 px, 10 steps of 16: best top-1 {tuned_top1:.1f} "
          f"fine-tuned from the .pth, {scratch_top1:.1f} from scratch")
    assert tuned_top1 >= scratch_top1 + 20


def test_safetensors_our_checkpoints_and_ddp_prefixes_load(tmp_path):
    model = build_model(3)
    source = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    other = {k: v + 1 if v.is_floating_point() else v for k, v in source.items()}
    classes = ["a", "b", "c"]
    save_file({k: v.contiguous() for k, v in source.items()}, str(tmp_path / "model.safetensors"))  # as the hub serves
    torch.save({f"module.{k}": v for k, v in source.items()}, tmp_path / "ddp.pth")
    torch.save({"model": other, "model_ema": source, "classes": classes}, tmp_path / "best.pt")
    for name, kind in (("model.safetensors", "auto"), ("ddp.pth", "auto"), ("best.pt", "auto"), ("best.pt", "model")):
        for tensor in model.state_dict().values():
            tensor.zero_()
        initial = read_initial_weights(str(tmp_path / name), kind)
        message = apply_initial_weights(initial, [model], classes)
        expected = other if kind == "model" else source
        assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items()), name  # the classifier too
        assert initial.kind == ("model" if kind == "model" or name != "best.pt" else "ema")
        assert "classifier kept: 3 classes, as the data's" in message

    # The same number of other classes: the classifier is the model's own.
    message = apply_initial_weights(read_initial_weights(str(tmp_path / "best.pt")), [model], ["a", "x", "c"])
    assert "the file's classes are not the data's (class 1 is 'b' there, 'x' here)" in message
    assert_backbone_equal(model.state_dict(), source)
    assert torch.equal(model.state_dict()["head.fc.weight"], other["head.fc.weight"])  # left as it was


@pytest.mark.parametrize("breakage, message", [
    ("resnet", "not CSPResNet-50's (timm 'cspresnet50' layout): missing keys: 330 (stages.0.blocks.0.conv1.bn.bias"),
    ("shape", "wrong shapes: 1 (stem.conv1.conv.weight)"),
    ("sha256", "recipe key 'model.initial_weights_sha256' is 0123abcd but"),
    ("missing", "recipe key 'model.initial_weights': "),
])
def test_weights_that_do_not_fit_are_refused_in_one_line_before_any_work(tiny_imagenet, tmp_path, monkeypatch,
                                                                         breakage, message):
    path, extra = tmp_path / "w.pth", []
    if breakage == "resnet":
        torch.save(timm.create_model("resnet18", num_classes=3).state_dict(), path)
    elif breakage == "shape":
        state = timm.create_model("cspresnet50", num_classes=3).state_dict()
        state["stem.conv1.conv.weight"] = state["stem.conv1.conv.weight"][:, :1]  # a grayscale stem
        torch.save(state, path)
    elif breakage == "sha256":
        torch.save(timm.create_model("cspresnet50", num_classes=3).state_dict(), path)
        extra = ["model.initial_weights_sha256=0123abcd"]
    monkeypatch.setattr(training, "build_training_data", lambda *a: pytest.fail("the data was read"))
    result = in_this_process(train.main, "--recipe", "demo.yaml", "--data-dir", tiny_imagenet, "--output",
                             tmp_path / "run", "--initial-weights", path, *last_wins(*TINY_OVERRIDES, *extra))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines[-1].startswith("error: ") and message in lines[-1], result.stderr
    assert "Traceback" not in result.stderr


def test_a_class_count_that_differs_from_the_data_is_refused_before_any_work(tiny_imagenet, tmp_path, monkeypatch):
    monkeypatch.setattr(training, "build_updater", lambda *a: pytest.fail("the model was built"))
    result = in_this_process(train.main, "--recipe", "demo.yaml", "--data-dir", tiny_imagenet, "--output",
                             tmp_path / "run", *last_wins(*TINY_OVERRIDES, "model.num_classes=5"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: recipe key 'model.num_classes' is 5 but {tiny_imagenet}/train has 3 class folders; "
        f"set model.num_classes=3, or auto")
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.suffix in (".pt", ".yaml")]


def test_a_missing_val_folder_names_the_key_that_holds_out_part_of_train(tiny_imagenet, tmp_path):
    shutil.copytree(tiny_imagenet / "train", tmp_path / "data" / "train")
    result = in_this_process(train.main, "--recipe", "demo.yaml", "--data-dir", tmp_path / "data", "--output",
                             tmp_path / "run", *TINY_OVERRIDES)
    assert result.returncode == 2
    assert f"error: {tmp_path / 'data' / 'val'} does not exist: add it with the same class folders as train/, or set " \
           "data.holdout_fraction (e.g. 0.1)" in result.stderr


def test_the_held_out_split_is_the_same_on_every_rank_and_a_function_of_the_seed(tiny_imagenet, tmp_path):
    shutil.copytree(tiny_imagenet / "train", tmp_path / "train")  # no val/
    config = DataConfig(dir=str(tmp_path), img_size=32, eval_img_size=32, workers=0, holdout_fraction=0.25)

    def splits(rank, world_size, seed=0):
        data = build_training_data(config, 8, seed, DistContext(rank, world_size, 0, torch.device("cpu")))
        return data.train_set.samples, data.val_set.samples

    one = splits(0, 1)
    assert splits(0, 2) == splits(1, 2) == one
    train_part, held = one
    assert len(held) == 6 and sorted(t for _, t in held) == [0, 0, 1, 1, 2, 2]  # round(0.25 x 8) per class
    assert not {p for p, _ in train_part} & {p for p, _ in held} and len(train_part) == 18
    assert splits(0, 1, seed=1)[1] != held

    classes = ["n00000000", "n00000001", "n00000002"]
    samples = index_split(tmp_path / "train", classes)
    added = samples + [(str(tmp_path / "train" / "n00000000" / "new.JPEG"), 0)]
    moved = {p for p, _ in held} ^ {p for p, _ in hold_out(added, classes, 0.25, 0)[1]}
    assert len(moved - {added[-1][0]}) <= 1  # a file added later moves at most one other image across


def test_auto_classes_and_a_held_out_split_survive_a_resume_which_reads_no_initial_weights(
        tiny_imagenet, timm_weights, tmp_path):
    shutil.copytree(tiny_imagenet / "train", tmp_path / "data" / "train")  # no val/
    weights = tmp_path / "initial.pth"
    shutil.copy(timm_weights, weights)
    args = ["--recipe", "demo.yaml", "--data-dir", tmp_path / "data", "--output", tmp_path / "run", *TINY_OVERRIDES,
            "model.num_classes=auto", "data.holdout_fraction=0.25", "model.initial_weights=" + str(weights)]
    first = in_this_process(train.main, *last_wins(*args, "epochs=1"))
    assert first.returncode == 0, first.stderr
    assert "model.num_classes: auto -> 3" in first.stdout
    assert yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["model"]["num_classes"] == 3
    weights.unlink()  # a resume takes the checkpoint's weights and never reads this file

    resumed = in_this_process(train.main, *last_wins(*args, "epochs=2", "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "set changed" not in resumed.stdout  # neither train/ nor held-out
    assert "initial weights" not in resumed.stdout
    held = hold_out(index_split(tmp_path / "data" / "train", [f"n{i:08d}" for i in range(3)]), ["n00000000",
                    "n00000001", "n00000002"], 0.25, 0)[1]
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["eval_dataset"] == fingerprint_of(held) and last["step"] == 4  # 18 images: 2 steps of 8
    assert [row["epoch"] for row in last["rows"]] == [1, 2] and last["classes"] == ["n00000000", "n00000001",
                                                                                    "n00000002"]


def test_the_linear_probe_changes_only_the_classifier(tiny_imagenet, timm_weights, tmp_path, monkeypatch):
    spy = FirstEpochSpy(monkeypatch)
    result = in_this_process(train.main, "--recipe", "demo.yaml", "--data-dir", tiny_imagenet, "--output",
                             tmp_path / "run", "--initial-weights", timm_weights,
                             *last_wins(*TINY_OVERRIDES, "epochs=1", "model.linear_probe=true"))
    assert result.returncode == 0, result.stderr
    assert spy.modes == dict(stages=False, stem=False, head=True)  # the backbone in eval mode while training
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert_backbone_equal(last["model"], torch.load(timm_weights, weights_only=True))  # BN statistics too
    assert all(not torch.equal(last["model"][k], spy.before[k]) for k in CLASSIFIER)
    assert len(last["optimizer"]["state"]) == 2  # momentum for the classifier's weight and bias only

