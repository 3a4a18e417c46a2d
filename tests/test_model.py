import pytest
import timm
import torch

from benchmarks.common import perturb_batchnorm
from cspresnet.model import CSPResNet50


def test_same_keys_shapes_and_initialisation_as_timm():
    torch.manual_seed(123)
    ours = CSPResNet50().state_dict()
    torch.manual_seed(123)
    theirs = timm.create_model("cspresnet50").state_dict()
    assert list(ours) == list(theirs)
    assert len(ours) == 332
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    for key in ("stem.conv1.conv.weight", "stages.1.conv_down.bn.weight", "stages.2.blocks.4.conv2.conv.weight",
                "stages.3.conv_transition.conv.weight", "head.fc.weight"):
        assert key in ours
    # last BN gamma of every block starts at zero, so each block starts as the identity
    assert torch.count_nonzero(ours["stages.2.blocks.4.conv3.bn.weight"]) == 0


def test_parameter_count():
    assert sum(p.numel() for p in CSPResNet50().parameters()) == 21_616_168


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_outputs_match_timm(mode):
    ours, theirs = CSPResNet50(num_classes=1000), timm.create_model("cspresnet50")
    perturb_batchnorm(theirs)
    torch.nn.init.normal_(theirs.head.fc.weight, std=0.05)
    for block in theirs.modules():
        if hasattr(block, "zero_init_last"):
            torch.nn.init.uniform_(block.conv3.bn.weight, 0.5, 1.5)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    getattr(ours, mode)()
    getattr(theirs, mode)()
    x = torch.randn(3, 3, 96, 128)
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert a.shape == (3, 1000)
    assert a.std() > 0.1  # not degenerate
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if mode == "train":  # the BN running statistics moved the same way
        for (key, ours_value), theirs_value in zip(ours.state_dict().items(), theirs.state_dict().values()):
            torch.testing.assert_close(ours_value, theirs_value, rtol=1e-5, atol=1e-6, msg=key)


def test_num_classes_and_dropout_like_timm():
    torch.manual_seed(7)
    ours = CSPResNet50(num_classes=10, drop_rate=0.3, drop_path_rate=0.2)
    torch.manual_seed(7)
    theirs = timm.create_model("cspresnet50", num_classes=10, drop_rate=0.3, drop_path_rate=0.2)
    assert ours.head.fc.weight.shape == (10, 1024)
    rates = [b.drop_path.drop_prob for b in ours.modules() if hasattr(b, "conv3") and hasattr(b.drop_path, "drop_prob")]
    assert rates == [b.drop_path.drop_prob for b in theirs.modules() if hasattr(b, "zero_init_last")
                     and hasattr(b.drop_path, "drop_prob")]
    assert rates[-1] == pytest.approx(0.2)
    x = torch.randn(2, 3, 64, 64)
    ours.train(), theirs.train()
    torch.manual_seed(99)
    a = ours(x)
    torch.manual_seed(99)
    b = theirs(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_rejects_zero_classes():
    with pytest.raises(ValueError, match="num_classes"):
        CSPResNet50(num_classes=0)
