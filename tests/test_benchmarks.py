"""The benchmark commands run and report what they promise (their figures are not tested:
a timing is a benchmark, not an assertion)."""
import json
import sys
from datetime import datetime, timezone

import pytest

import benchmarks.amp_flips
import benchmarks.end_to_end
import benchmarks.handover
import benchmarks.index
import benchmarks.loader
import benchmarks.model
import benchmarks.recipes
from benchmarks.run import render, results_path
from data.jpeg_box import box_decoder
from tests.helpers import module_in_this_process, run_cli


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_loader_benchmark_both_pipelines_both_splits(tiny_imagenet):
    for pipeline in ("ours", "timm"):
        for split in ("train", "val"):
            result = last_json(module_in_this_process(
                benchmarks.loader, "--data-dir", tiny_imagenet, "--split", split, "--workers", "0", "--pipeline",
                pipeline, "--batch-size", "4", "--img-size", "64").stdout)
            assert result["images"] == (24 if split == "train" else 15) - 4  # the first batch is warm-up
            assert result["images_per_s"] > 0 and result["pipeline"] == pipeline
            if pipeline == "ours" and split == "train":
                assert result["jpeg"] == ("box" if box_decoder() else "whole")
        # A process of its own: --whole-jpeg must come before the first decoder is made.
        with_workers = last_json(run_cli([sys.executable, "-m", "benchmarks.loader", "--data-dir", tiny_imagenet,
                                          "--workers", "2", "--pipeline", pipeline, "--batch-size", "4",
                                          "--img-size", "64", *(["--whole-jpeg"] if pipeline == "ours" else [])]).stdout)
        assert with_workers["images"] == 20 and with_workers["images_per_s_per_core"] > 0
        assert with_workers["jpeg"] == ("whole" if pipeline == "ours" else "")


def test_handover_benchmark_times_each_way():
    for way in ("ours", "label_tensors", "fresh", "per_image"):
        result = last_json(module_in_this_process(benchmarks.handover, "--way", way, "--batch-size", "4",
                                                  "--img-size", "16", "--repeats", "1", "--settle-s", "0.2").stdout)
        assert result["way"] == way and result["main_wall_ms"] > 0 and result["worker_ms"] >= 0


def test_a_benchmark_run_never_overwrites_an_earlier_table(tmp_path):
    now = datetime(2026, 11, 24, tzinfo=timezone.utc)
    assert results_path(tmp_path, "cpu", now).name == "2026-11-24-cpu.md"
    for expected in ("2026-11-24-cpu-2.md", "2026-11-24-cpu-3.md"):
        results_path(tmp_path, "cpu", now).write_text("a table")
        assert results_path(tmp_path, "cpu", now).name == expected
    assert results_path(tmp_path, "gpu", now).name == "2026-11-24-gpu.md"


@pytest.mark.slow
def test_model_and_end_to_end_benchmarks(tiny_imagenet):
    model = last_json(module_in_this_process(benchmarks.model, "--batch-size", "2", "--img-size", "64", "--steps", "1",
                                             "--rounds", "1").stdout)
    assert model["ours_images_per_s"] > 0 and model["timm_images_per_s"] > 0 and "ours_over_timm" in model
    for pipeline in ("ours", "timm"):
        e2e = last_json(module_in_this_process(
            benchmarks.end_to_end, "--data-dir", tiny_imagenet, "--pipeline", pipeline, "--steps", "2", "--warmup",
            "1", "batch_size=4", "data.img_size=64", "data.workers=0", "runtime.amp=none",
            "model.num_classes=3").stdout)
        assert e2e["images_per_s"] > 0 and e2e["pipeline"] == pipeline
        assert 0 < e2e["data_wait_fraction"] < 1  # workers=0: each batch is loaded while the loop waits
        assert e2e["loader"] == ("one pass" if pipeline == "ours" else "pass per epoch") and e2e["epoch_ends"] == 0
    tiny = ["--warmup", "1", "batch_size=4", "data.img_size=64", "runtime.amp=none", "model.num_classes=3"]
    no_loader = last_json(module_in_this_process(benchmarks.end_to_end, "--data-dir", tiny_imagenet, "--no-loader",
                                                 "--steps", "2", "data.workers=0", *tiny).stdout)
    assert no_loader["loader"] == "none" and no_loader["data_wait_fraction"] < 0.05
    refused = module_in_this_process(benchmarks.end_to_end, "--data-dir", tiny_imagenet, "--pipeline", "timm",
                                     "--no-loader")
    assert refused.returncode == 2 and "apply to our pipeline" in refused.stderr


def test_a_stand_in_device_step_across_epoch_ends(tiny_imagenet):
    """24 images in batches of 4: 6 steps an epoch; steps 1 to 12 end epochs 0 and 1."""
    stand_in = ["--data-dir", tiny_imagenet, "--sleep-step", "0.01", "--steps", "12", "--warmup", "1", "batch_size=4",
                "data.img_size=64", "data.workers=2", "model.num_classes=3"]
    for extra, loader in (([], "one pass"), (["--pass-per-epoch"], "pass per epoch")):
        row = last_json(module_in_this_process(benchmarks.end_to_end, *stand_in, *extra).stdout)
        assert row["loader"] == loader and row["epoch_ends"] == 2 and row["sleep_step"] == 0.01
        assert 0 < row["images_per_s"] <= 4 / 0.01  # the sleep stood in for the training step


@pytest.mark.slow
def test_amp_flip_benchmark_compares_each_dtype_with_fp32(tiny_imagenet):
    out = module_in_this_process(benchmarks.amp_flips, "--data-dir", tiny_imagenet, "--images", "6", "--workers", "0",
                                 "--device", "cpu", "--amp", "bf16").stdout
    lines = [json.loads(line) for line in out.strip().splitlines()]
    assert [row["amp"] for row in lines] == ["bf16"]
    row = lines[0]
    assert row["images"] == 6 and row["weights"] == "stand-in" and 0 <= row["top1_flips"] <= 6
    assert row["max_abs_logit_diff"] > 0  # bf16 autocast really ran: the logits moved


def test_the_index_benchmark_reports_ours_and_the_peers_on_one_tree(tmp_path):
    out = module_in_this_process(benchmarks.index, "--root", tmp_path, "--classes", "5", "--files", "50").stdout
    result = last_json(out)
    assert result["files"] == 50
    assert all(result[key] >= 0 for key in ("build_s", "load_s", "index_mb", "imagefolder_s", "timm_s", "worker_growth_mb",
                                             "imagefolder_worker_growth_mb", "timm_worker_growth_mb"))


@pytest.mark.slow
def test_the_recipes_benchmark_runs_both_recipes_and_times_the_model_step(tiny_imagenet, tmp_path):
    """A rehearsal: one epoch of each recipe on the tiny set, one model step at 32 px."""
    out = module_in_this_process(benchmarks.recipes, "--data-dir", tiny_imagenet, "--out", tmp_path, "--sizes", "32",
                                 "--steps", "1", "--batch-size", "2", "epochs=1", "batch_size=8", "data.img_size=32",
                                 "data.eval_img_size=32", "model.num_classes=3", "data.workers=0",
                                 "data.eval_batch_size=8").stdout
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert [row.get("recipe") for row in rows[1:3]] == ["demo.yaml", "demo_fast.yaml"]
    assert all(row["epochs"] == 1 and row["curve"][0][1] == 32 and row["wall_s"] > 0 for row in rows[1:3])
    assert rows[3]["model_step_images_per_s"]["32"] > 0


def test_the_gpu_summary_relates_each_end_to_end_row_to_the_model_only_rate():
    """The GPU part of benchmarks.run only runs on a lent GPU: its table is checked here."""
    per_core = [{"images_per_s": 400.0, "jpeg": "box"}, {"images_per_s": 200.0}, {"images_per_s": 320.0}]
    parallel = [{"workers": 16, "images_per_s": 4000.0}, {"workers": 16, "images_per_s": 2000.0}]
    model_rows = [{"ours_images_per_s": 3000.0, "timm_images_per_s": 3000.0}, {"ours_images_per_s": 4000.0}]
    e2e_rows = [{"workers": 16, "images_per_s": rate, "command": "c"}
                for rate in (2700.0, 3600.0, 1500.0, 1800.0, 2400.0, 2000.0, 2880.0)]
    e2e_rows += [{"workers": 14, "images_per_s": 2850.0, "command": "c"}, {"error": "timed out", "command": "c"}]
    table = render({"date": "today"}, "data", [("End to end", e2e_rows)], per_core, parallel, model_rows, e2e_rows)
    assert "loader, one core: ours 400.0 img/s, timm 200.0 img/s: **2.00x**" in table
    assert "ours decoding whole files (`--whole-jpeg`): **1.60x**; decoding only the crops' boxes is **1.25x** that" \
        in table
    assert "end to end / model only (bf16, channels_last, eager): **0.90x**" in table
    assert "our step without the loader / model only (eager): **0.96x**; end to end / our step without the " \
           "loader: **0.94x**" in table
    assert "end to end / model only (compiled): **0.90x**" in table
    assert "end to end, ours / timm's train.py path (both eager): **1.50x**" in table
    assert "end to end with 14 workers / model only (eager): **0.95x**" in table
    assert "end to end with ? workers / model only (eager): n/a (a measurement failed)" in table


def test_the_cpu_summary_compares_one_loader_pass_with_a_pass_per_epoch():
    per_core = [{"images_per_s": 400.0, "jpeg": "box"}, {"images_per_s": 200.0}, {"images_per_s": 320.0}]
    parallel = [{"workers": 2, "images_per_s": 800.0}, {"workers": 2, "images_per_s": 400.0}]
    model_rows = [{"ours_images_per_s": 5.0, "timm_images_per_s": 5.0}]
    epoch_ends = [{"images_per_s": 520.0, "epoch_ends": 3, "data_wait_fraction": 0.02, "command": "c"},
                  {"images_per_s": 500.0, "epoch_ends": 3, "data_wait_fraction": 0.06, "command": "c"}]
    table = render({"date": "today"}, "data", [("Stand-in", epoch_ends)], per_core, parallel, model_rows,
                   epoch_ends=epoch_ends)
    assert "a stand-in device across 3 epoch ends, one loader pass / a pass per epoch: **1.04x** (waiting for " \
           "data: 0.02 of the time against 0.06)" in table
    assert "end to end / model only" not in table


def test_the_gpu_sweep_keeps_going_past_a_row_that_fails_or_hangs_and_one_past_its_budget(tmp_path):
    from benchmarks.gpu_sweep import Sweep
    sweep = Sweep(budget_s=60, row_timeout_s=2, env=None)
    failed = sweep.run("g", "fails", ["json.tool", str(tmp_path / "missing.json")])
    hung = sweep.run("g", "hangs", ["http.server", "0", "--bind", "127.0.0.1"])
    assert failed.result["error"].startswith("exit code 2: ") and "missing.json" in failed.result["error"]
    assert hung.result["error"] == "stopped after 2 s (its time limit)"
    sweep.deadline -= 60
    assert sweep.run("g", "late", ["json.tool"]).result == {"error": "not run: the sweep's budget of 60 s was spent"}


@pytest.mark.slow
def test_the_gpu_sweep_rehearses_every_lever_on_the_cpu(tmp_path):
    """The prepared GPU command, at a tiny size: each row's command runs and gives its figure
    (compiled rows through dynamo, without inductor), and the results file relates them."""
    import benchmarks.gpu_sweep
    out = tmp_path / "sweep.md"
    benchmarks.gpu_sweep.main(["--rehearse", "--work-dir", str(tmp_path / "work"), "--out", str(out),
                               "--workers", "0"])
    table = out.read_text()
    assert "- commit: " in table and "- packages: torchvision " in table and "--rehearse" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| row ")]
    assert len(rows) == 11 and not any("exit code" in row or "stopped after" in row for row in rows), rows
    assert all(row.split(" | ")[1] for row in rows), rows  # a figure in every row
    gpu_decode = next(row for row in rows if "GPU decode" in row)
    assert "GPU decode unavailable here: ran fast" in gpu_decode  # on a CPU it falls back, and says so
    assert "- the darknet recipe as it ships (4 x 2) / 1 x 4, end to end: **" in table
    assert "    python -m benchmarks.gpu_sweep model --batch 4 --img-size 32 --amp none --compile-mode " \
           "reduce-overhead" in table
