"""The benchmark commands run and report what they promise (their figures are not tested:
a timing is a benchmark, not an assertion)."""
import json
import sys

from tests.helpers import run_cli


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_loader_benchmark_both_pipelines_both_splits(tiny_imagenet):
    for pipeline in ("ours", "timm"):
        for split in ("train", "val"):
            result = last_json(run_cli([sys.executable, "-m", "benchmarks.loader", "--data-dir", tiny_imagenet,
                                        "--split", split, "--workers", "0", "--pipeline", pipeline,
                                        "--batch-size", "4", "--img-size", "64"]).stdout)
            assert result["images"] == (24 if split == "train" else 15) - 4  # the first batch is warm-up
            assert result["images_per_s"] > 0 and result["pipeline"] == pipeline


def test_model_and_end_to_end_benchmarks(tiny_imagenet):
    model = last_json(run_cli([sys.executable, "-m", "benchmarks.model", "--batch-size", "2", "--img-size", "64",
                               "--steps", "1", "--rounds", "1"]).stdout)
    assert model["ours_images_per_s"] > 0 and model["timm_images_per_s"] > 0 and "ours_over_timm" in model
    for pipeline in ("ours", "timm"):
        e2e = last_json(run_cli([sys.executable, "-m", "benchmarks.end_to_end", "--data-dir", tiny_imagenet,
                                 "--pipeline", pipeline, "--steps", "2", "--warmup", "1", "batch_size=4",
                                 "data.img_size=64", "data.workers=0", "runtime.amp=none",
                                 "model.num_classes=3"]).stdout)
        assert e2e["images_per_s"] > 0 and e2e["pipeline"] == pipeline


def test_amp_flip_benchmark_compares_each_dtype_with_fp32(tiny_imagenet):
    out = run_cli([sys.executable, "-m", "benchmarks.amp_flips", "--data-dir", tiny_imagenet, "--images", "6",
                   "--workers", "0", "--device", "cpu", "--amp", "bf16"]).stdout
    lines = [json.loads(line) for line in out.strip().splitlines()]
    assert [row["amp"] for row in lines] == ["bf16"]
    row = lines[0]
    assert row["images"] == 6 and row["weights"] == "stand-in" and 0 <= row["top1_flips"] <= 6
    assert row["max_abs_logit_diff"] > 0  # bf16 autocast really ran: the logits moved
