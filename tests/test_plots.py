"""The pictures: the learning rate a recipe trains with (train.py --plot) and a run's curves
(python -m cspresnet.plots), checked as PNGs and by the data they draw."""
import struct

import pytest

import train
from cspresnet import plots
from cspresnet.optim import build_schedule
from cspresnet.recipe_files import load_recipe
from cspresnet.run_log import write_csv
from tests.helpers import in_this_process


def png_size(path) -> tuple:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def drawn(ax, label):
    """The (x, y) of the line labelled `label` in `ax`."""
    line, = [line for line in ax.get_lines() if line.get_label() == label]
    return list(line.get_xdata()), list(line.get_ydata())


def crop_axes(figure):
    return [ax for ax in figure.axes if ax.get_ylabel() == "training crop (px)"]


def test_train_py_plots_the_recipe_into_a_png_of_the_size_asked(tmp_path):
    out = tmp_path / "lr.png"
    result = in_this_process(train.main, "--recipe", "demo.yaml", "--print-recipe", "--plot", out,
                             "--plot-images", 640)
    assert result.returncode == 0, result.stderr
    assert "schedule:" in result.stdout and f"wrote {out}" in result.stdout
    assert png_size(out) == (plots.SIZE_INCHES[0] * plots.DPI, plots.SIZE_INCHES[1] * plots.DPI)


def test_the_darknet_plot_is_the_schedule_that_trains_with_its_epochs_marked():
    recipe = load_recipe("cspresnet50.yaml")
    figure = plots.schedule_figure(recipe, 128_000, "cspresnet50.yaml")  # 1,000 steps per epoch at batch 128
    main = figure.axes[0]
    steps, rates = drawn(main, "learning rate")
    schedule = build_schedule(recipe, 1000)
    assert steps == list(range(1, 80 * 1000 + 1))
    for step in (1, 500, 999, 1000, 1001, 40_000, 80_000):
        assert rates[step - 1] == schedule(step)
    marks, = [c for c in main.collections if c.get_label() == "epoch ends"]
    assert [segment[0][0] for segment in marks.get_segments()] == [1000 * epoch for epoch in range(1, 80)]
    assert crop_axes(figure) == []  # 256 px throughout: no size axis
    inset, = [ax for ax in main.child_axes if drawn_labels(ax) == ["warm-up"]]  # 1,000 of 80,000 steps: enlarged
    assert drawn(inset, "warm-up")[1] == rates[:3000]
    assert "128,000 training images" in main.get_title()


def drawn_labels(ax):
    return [line.get_label() for line in ax.get_lines()]


def test_the_fast_plot_shows_the_size_ramp_where_it_changes_and_imagenet_by_default():
    recipe = load_recipe("cspresnet50_fast.yaml")
    figure = plots.schedule_figure(recipe, plots.IMAGENET_TRAIN_IMAGES, "cspresnet50_fast.yaml")
    per_epoch = plots.IMAGENET_TRAIN_IMAGES // 1024
    steps, rates = drawn(figure.axes[0], "learning rate")
    schedule = build_schedule(recipe, per_epoch)
    assert len(steps) == 32 * per_epoch and rates[2 * per_epoch] == schedule(2 * per_epoch + 1)
    axis, = crop_axes(figure)
    starts, sizes = drawn(axis, "training crop (px)")
    assert starts == [epoch * per_epoch for epoch in range(33)]
    assert sizes == [recipe.data.train_size(epoch) for epoch in range(32)] + [192]
    assert sizes[:25] == [160] * 25 and sizes[25:] == [192] * 8
    assert "ImageNet's 1,281,167 training images" in figure.axes[0].get_title()


def test_plot_images_below_one_batch_is_one_line(tmp_path):
    result = in_this_process(train.main, "--recipe", "demo.yaml", "--plot", tmp_path / "x.png", "--plot-images", 10)
    assert result.returncode == 2
    line, = result.stderr.splitlines()
    assert "--plot-images 10 is fewer than one global batch (batch_size=32)" in line
    assert not (tmp_path / "x.png").exists()


ROWS = [dict(epoch=e, step=10 * e, lr=0.1 / e, train_size=64, train_loss=2.3 - 0.2 * e, eval_loss=2.2 - 0.2 * e,
             top1=10.0 * e, top5=20.0 * e, ema_eval_loss=2.25 - 0.2 * e, ema_top1=9.0 * e, ema_top5=19.0 * e,
             images_per_s=100.0 + e, epoch_seconds=1.5) for e in (1, 2, 3)]


@pytest.mark.parametrize("ema", [True, False])
def test_run_curves_draw_what_summary_csv_holds(tmp_path, ema):
    rows = ROWS if ema else [{k: v for k, v in row.items() if not k.startswith("ema_")} for row in ROWS]
    write_csv(tmp_path / "summary.csv", rows)  # the writer train.py uses
    figure = plots.run_figure(tmp_path)
    loss, top1, lr, speed = figure.axes[:4]
    assert drawn_labels(loss) == ["train_loss", "eval_loss"] + (["ema_eval_loss"] if ema else [])
    assert drawn_labels(top1) == ["top1"] + (["ema_top1"] if ema else [])
    assert drawn(loss, "eval_loss") == ([1, 2, 3], [row["eval_loss"] for row in ROWS])
    assert drawn(lr, "lr")[1] == [row["lr"] for row in ROWS]
    assert drawn(speed, "images_per_s")[1] == [101.0, 102.0, 103.0]
    if ema:
        assert drawn(top1, "ema_top1")[1] == [9.0, 18.0, 27.0]

    out = tmp_path / "curves.png"
    result = in_this_process(plots.main, tmp_path, out)
    assert result.returncode == 0 and result.stdout == f"wrote {out}\n"
    assert png_size(out) == (1000, 500)


def test_a_folder_without_summary_csv_is_one_line(tmp_path):
    result = in_this_process(plots.main, tmp_path, tmp_path / "curves.png")
    assert result.returncode == 2
    line, = result.stderr.splitlines()
    assert f"{tmp_path} holds no summary.csv" in line
    assert not (tmp_path / "curves.png").exists()
