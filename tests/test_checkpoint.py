import errno
import os

import pytest
import torch
from safetensors.torch import save_file

from cspresnet.checkpoint import CheckpointError, CheckpointFolder, load_checkpoint, save_checkpoint
from cspresnet.weights import extract_state_dict, load_weights_strict, num_classes_of
from cspresnet.model import CSPResNet50


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    return CSPResNet50(num_classes=7).state_dict()


def assert_same(a, b):
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_checkpoint_round_trip(tmp_path, weights):
    model = CSPResNet50(num_classes=7)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), epoch=3, step=42,
                 best_top1=12.5, recipe={"epochs": 4, "data": {"crop_scale": [0.08, 1.0]}})
    save_checkpoint(state, tmp_path / "last.pt")
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert_same(loaded["model"], state["model"])
    assert (loaded["epoch"], loaded["step"], loaded["best_top1"], loaded["recipe"]) == (3, 42, 12.5, state["recipe"])
    restored = torch.optim.SGD(CSPResNet50(num_classes=7).parameters(), lr=0.1, momentum=0.9)
    restored.load_state_dict(loaded["optimizer"])
    assert torch.equal(restored.state_dict()["state"][0]["momentum_buffer"], optimizer.state_dict()["state"][0]["momentum_buffer"])
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary files left behind


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, weights):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": weights, "epoch": 1}, path)
    with pytest.raises(Exception):
        save_checkpoint({"model": weights, "epoch": 2, "bad": lambda: None}, path)  # lambdas cannot be saved
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_that_would_run_code_is_refused(tmp_path, weights):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as handle:
        torch.save({"model": weights, "payload": RunsCode(str(marker))}, handle)
    with pytest.raises(CheckpointError, match="refusing to load.*pickled Python objects"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_corrupt_and_missing_files(tmp_path, weights):
    save_checkpoint({"model": weights}, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(tmp_path / "truncated.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable .safetensors"):
        load_checkpoint(tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_every_weight_format(tmp_path, weights):
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}
    forms = {
        "timm_plain.pth": (weights, "model"),
        "ours.pt": ({"model": weights, "model_ema": ema, "epoch": 1}, "ema"),
        "timm_train.pth.tar": ({"state_dict": weights, "epoch": 1}, "model"),
        "ddp.pth": ({f"module.{k}": v for k, v in weights.items()}, "model"),
    }
    for name, (content, kind) in forms.items():
        torch.save(content, tmp_path / name)
        state_dict, found = extract_state_dict(load_checkpoint(tmp_path / name))
        assert found == kind, name
        assert_same(state_dict, ema if kind == "ema" else weights)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / "model.safetensors"))
    state_dict, _ = extract_state_dict(load_checkpoint(tmp_path / "model.safetensors"))
    assert_same(state_dict, weights)
    assert num_classes_of(state_dict) == 7

    model_weights, kind = extract_state_dict(load_checkpoint(tmp_path / "ours.pt"), "model")
    assert kind == "model"
    assert_same(model_weights, weights)
    with pytest.raises(CheckpointError, match="holds no EMA weights"):
        extract_state_dict(weights, "ema")


def test_wrong_architecture_lists_the_keys(weights):
    model = CSPResNet50(num_classes=7)
    wrong = dict(weights)
    del wrong["stem.conv1.conv.weight"]
    wrong["layer1.0.conv1.weight"] = torch.zeros(1)
    wrong["head.fc.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"missing keys: 1 \(stem.conv1.conv.weight\); "
                                              r"unexpected keys: 1 \(layer1.0.conv1.weight\); wrong shapes: 1 \(head.fc.bias\)"):
        load_weights_strict(model, wrong)
    with pytest.raises(CheckpointError, match="not a state dict"):
        extract_state_dict({"epoch": 3, "arch": "resnet50"})
    assert num_classes_of({"fc.weight": torch.zeros(3, 3)}) == 1000  # then loading lists the keys


def test_a_full_disk_skips_the_save_and_keeps_the_old_checkpoints(tmp_path, monkeypatch, caplog):
    folder = CheckpointFolder(tmp_path, keep_last=1)
    folder.save({"step": 1}, 1, is_best=True)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    assert folder.save({"step": 2}, 2, is_best=True) is None
    assert "disk full" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt", "step-00000001.pt"]
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 1
    monkeypatch.undo()
    folder.save({"step": 3}, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt", "step-00000003.pt"]
    assert load_checkpoint(tmp_path / "best.pt")["step"] == 1  # a link keeps its data when the step file goes


def test_auto_resume_skips_a_corrupt_newest_checkpoint(tmp_path, caplog):
    folder = CheckpointFolder(tmp_path, keep_last=3)
    for step in (1, 2):
        folder.save({"step": step}, step)
    (tmp_path / "last.pt").unlink()
    (tmp_path / "step-00000002.pt").write_bytes(b"\x00" * 10)
    path, state = folder.newest_loadable()
    assert (path.name, state["step"]) == ("step-00000001.pt", 1)
    assert "skipping unreadable checkpoint" in caplog.text
    assert CheckpointFolder(tmp_path / "empty", 2).newest_loadable() is None
