import errno
import io
import os
import pickle
import random

import pytest
import torch
from safetensors.torch import save_file

from cspresnet.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cspresnet.run_folder import CheckpointFolder
from cspresnet.checkpoint import weights_in
from cspresnet.weights import load_weights_strict, num_classes_of
from cspresnet.model import CSPResNet50
from tests.helpers import in_this_process


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


def extract_state_dict(checkpoint, which="auto"):
    found = weights_in(checkpoint, which)
    return found.state_dict, found.kind


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


def small_checkpoint() -> dict:
    """A few tensors and plain data: the shape of a training checkpoint, small enough to load
    hundreds of broken copies of it in a few seconds."""
    generator = torch.Generator().manual_seed(0)
    model = {"conv.weight": torch.randn(4, 3, 3, 3, generator=generator), "bn.num_batches_tracked": torch.tensor(7),
             "fc.bias": torch.zeros(5)}
    return {"model": model, "epoch": 2, "step": 17, "best_top1": 12.5, "classes": ["cat", "dog"],
            "recipe": {"optim": {"lr": 0.1}, "data": {"crop_scale": [0.08, 1.0]}}}


def saved_bytes(state, **options) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer, **options)
    return buffer.getvalue()


def assert_one_line_naming(error: CheckpointError, path) -> None:
    message = str(error)
    assert "\n" not in message and str(path) in message, message


def junk_files(rng: random.Random, marker):
    """(name, bytes) of every kind of file a checkpoint path may hold by mistake or by damage;
    the pickle that would run code creates `marker`."""
    good = saved_bytes(small_checkpoint())
    legacy = saved_bytes(small_checkpoint(), _use_new_zipfile_serialization=False)
    for i in range(100):
        yield f"random-{i}", rng.randbytes(rng.randint(0, 2000))
    for i in range(40):  # random bytes behind a zip's or a pickle's first bytes reach torch.load itself
        prefix = b"PK\x03\x04" if i % 2 else bytes([0x80, rng.randint(2, 5)])
        yield f"random-header-{i}", prefix + rng.randbytes(rng.randint(0, 500))
    for i in range(80):
        yield f"truncated-{i}", good[: rng.randint(0, len(good) - 1)]
    for i in range(30):
        yield f"truncated-legacy-{i}", legacy[: rng.randint(0, len(legacy) - 1)]
    for i, source in enumerate([good] * 100 + [legacy] * 40):
        flipped = bytearray(source)
        for _ in range(rng.randint(1, 8)):
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        yield f"flipped-{i}", bytes(flipped)
    yield "text", b"epoch: 3\nlr: 0.1\n"
    yield "html", b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"
    yield "lfs-pointer", b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 102400\n"
    yield "os-system", pickle.dumps(os.system, protocol=2)
    yield "os-system-protocol-5", pickle.dumps(os.system)
    yield "class-instance", pickle.dumps(io.StringIO("x"), protocol=2)
    yield "runs-code", saved_bytes({"model": small_checkpoint()["model"], "payload": RunsCode(str(marker))})


def test_every_broken_file_either_loads_or_raises_a_one_line_checkpoint_error(tmp_path):
    loaded, refused = 0, 0
    for name, data in junk_files(random.Random(0), tmp_path / "pwned"):
        path = tmp_path / f"{name}.pt"
        path.write_bytes(data)
        try:
            load_checkpoint(path)  # a flipped bit in a tensor's data, or in the zip's padding, still loads
            loaded += 1
        except CheckpointError as error:
            assert_one_line_naming(error, path)
            if name.startswith("truncated"):
                assert "could run code" not in str(error)  # a name cut short is damage, not code
            refused += 1
    assert refused > 350 and not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("damage", ["text", "truncated"])
def test_auto_resume_falls_back_past_a_last_checkpoint_that_is_text_or_truncated(tmp_path, caplog, damage):
    folder = CheckpointFolder(tmp_path, keep_last=3)
    for step in (1, 2):
        folder.save(dict(small_checkpoint(), step=step), step)
    good = (tmp_path / "last.pt").read_bytes()
    broken = b"step: 2\n" if damage == "text" else good[: len(good) // 2]
    for name in ("last.pt", "step-00000002.pt"):  # one file under two names (a hard link), damaged on disk
        (tmp_path / name).write_bytes(broken)
    path, state = folder.newest_loadable()
    assert (path.name, state["step"]) == ("step-00000001.pt", 1)
    assert_same(state["model"], small_checkpoint()["model"])
    expected = "not a PyTorch checkpoint" if damage == "text" else "truncated or corrupt"
    assert caplog.text.count("skipping unreadable checkpoint") == 2 and expected in caplog.text


def test_each_kind_of_unreadable_file_is_named_for_what_it_is(tmp_path):
    legacy = saved_bytes(small_checkpoint(), _use_new_zipfile_serialization=False)  # PyTorch < 1.6, timm's older .pth
    cases = {
        "notes.pt": (b"lr: 0.1\n", "is not a PyTorch checkpoint (neither a zip file nor a pickle): "
                                  "it starts with b'lr: 0.1\\n'"),
        "empty.pt": (b"", "is empty (0 bytes)"),
        "half.pt": (saved_bytes(small_checkpoint())[:500],
                    "is not a readable PyTorch checkpoint (truncated or corrupt): RuntimeError: PytorchStreamReader failed"),
        # the unpickler takes the last byte, "e", for the newline that ends the name
        "half-legacy.pt": (legacy[: legacy.index(b"_rebuild_tensor_v2") + 11],
                           "is not a readable PyTorch checkpoint (truncated or corrupt): its pickle names "
                           "torch._utils._rebuild_t, which does not exist"),
        "system.pt": (pickle.dumps(os.system, protocol=2), "unpickling them could run code (Trying to load "
                      f"unsupported GLOBAL {os.system.__module__}.system whose module {os.system.__module__} is blocked.)"),
        "instance.pt": (pickle.dumps(io.StringIO("x"), protocol=2),
                        "could run code (Unsupported global: GLOBAL _io.StringIO was not an allowed global by default)"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError) as caught:
            load_checkpoint(tmp_path / name)
        assert message in str(caught.value), str(caught.value)
        assert_one_line_naming(caught.value, tmp_path / name)
        if name in ("notes.pt", "empty.pt", "half.pt", "half-legacy.pt"):
            assert "could run code" not in str(caught.value)
    (tmp_path / "run").mkdir()
    with pytest.raises(CheckpointError, match="run is a folder, not a checkpoint file"):
        load_checkpoint(tmp_path / "run")


def test_validate_and_predict_exit_2_with_one_line_for_a_junk_checkpoint(tmp_path):
    import predict
    import validate

    junk = tmp_path / "best.pt"
    junk.write_bytes(b"<!DOCTYPE html>\n<html><body>Access denied</body></html>\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "cat.jpg").write_bytes(b"\xff\xd8 not read: the checkpoint fails first")
    for result in (in_this_process(validate.cli, "--checkpoint", junk, "--data-dir", tmp_path / "data"),
                   in_this_process(predict.cli, "--checkpoint", junk, tmp_path / "cat.jpg")):
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == [
            f"error: {junk} is not a PyTorch checkpoint (neither a zip file nor a pickle): it starts with "
            "b'<!DOCTYPE html>\\n'"], result.stderr
