"""timm's spelling where the meaning is the same: validate.py's --amp switch with --amp-dtype, -b, -j,
--results-file in CSV unless --results-format json; predict.py's --topk; the exit codes in --help."""
import contextlib
import csv
import io
import json

import pytest
import torch

import predict
import validate
from cspresnet.model import build_model
from cspresnet.reports import TIMM_RESULTS_COLUMNS
from tests.helpers import in_this_process


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("weights") / "w.pth"
    torch.save(build_model(3).state_dict(), path)
    return path


@pytest.mark.parametrize("arguments, amp", [
    ([], "none"),
    (["--amp"], "fp16"),  # timm's validate.py: --amp-dtype float16 unless told
    (["--amp", "--amp-dtype", "bfloat16"], "bf16"),
    (["--amp-dtype", "bfloat16"], "none"),  # as in timm, the dtype alone does not switch autocast on
    (["--amp", "bf16"], "bf16"),  # the older spelling still works
    (["--amp", "none"], "none"),
])
def test_amp_is_timms_switch_with_amp_dtype(arguments, amp):
    assert validate.parse_args(["--checkpoint", "w.pt", "--data-dir", "x", *arguments]).amp == amp


def test_short_flags_are_timms():
    args = validate.parse_args(["-m", "cspresnet50", "-b", "7", "-j", "3", "--data-dir", "x"])
    assert (args.model, args.batch_size, args.workers) == ("cspresnet50", 7, 3)
    args = predict.parse_args(["--checkpoint", "w.pt", "-b", "5", "-j", "2", "--topk", "3", "x.jpg"])
    assert (args.batch_size, args.workers, args.top_k) == (5, 2, 3)
    assert predict.parse_args(["--checkpoint", "w.pt", "--top-k", "4", "x.jpg"]).top_k == 4  # the older spelling


def test_results_file_is_timms_csv_unless_json_is_asked_for(tiny_imagenet, weights, tmp_path):
    def run(*args):
        return validate.main([str(a) for a in ("--checkpoint", weights, "--data-dir", tiny_imagenet, "-j", "0",
                                               "--img-size", "64", "--amp", *args)])

    result = run("--results-file", tmp_path / "r.csv")
    assert result["amp"] == "fp16"  # evaluated under float16 autocast, as `--amp` is in timm
    result = run("--results-file", tmp_path / "r.csv")  # a new file each time, as timm writes it
    with open(tmp_path / "r.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and list(rows[0]) == TIMM_RESULTS_COLUMNS
    assert rows[0]["model"] == "w" and float(rows[0]["top1"]) == result["top1"]

    run("--results-file", tmp_path / "r.txt", "--results-format", "json")
    run("--results-file", tmp_path / "r.json")  # a .json name means JSON, as before
    for name in ("r.txt", "r.json"):
        saved = json.loads((tmp_path / name).read_text())
        assert saved["top1"] == result["top1"] and len(saved["per_class_top1"]) == 3


def test_predict_topk_and_top_k_are_the_same_option(tiny_imagenet, weights):
    outputs = [in_this_process(predict.cli, "--checkpoint", weights, "-j", "0", flag, "2", tiny_imagenet / "val")
               for flag in ("--topk", "--top-k")]
    assert outputs[0].returncode == 0 and outputs[0].stdout == outputs[1].stdout
    lines = [json.loads(line) for line in outputs[0].stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 15 and all(len(line["top"]) == 2 for line in lines)


@pytest.mark.parametrize("script", [validate, predict])
def test_help_lists_the_exit_codes_the_docs_give(script):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        script.parse_args(["--help"])
    text = " ".join(out.getvalue().split())
    codes = ["0 evaluated", "1 any other failure", "2 a bad checkpoint"] if script is validate else \
        ["0 predicted", "1 any other failure", "2 a bad checkpoint"]
    assert all(code in text for code in codes), text[:600]
