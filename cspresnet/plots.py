"""Pictures: a recipe's learning rate over its run (train.py --plot), and a run's curves from its folder:

    python -m cspresnet.plots RUN_FOLDER OUT.png

matplotlib is imported only here, when drawing (Agg, no display), so that train.py starts without it."""
import argparse
import csv
from pathlib import Path

from common.errors import OptionError, RunFolderError
from common.files import write_atomically

from .console import exit_now, run_script, setup_logging
from .optim import build_schedule
from .recipe import Recipe

IMAGENET_TRAIN_IMAGES = 1_281_167
SIZE_INCHES, DPI = (10, 5), 100  # 1000 x 500 px


def schedule_figure(recipe: Recipe, images: int, name: str):
    """The rate of every step from build_schedule, the code that trains; epoch ends as thin lines, the warm-up
    enlarged when it is too short to see, the training crop on a right axis when it changes."""
    steps_per_epoch = images // recipe.batch_size
    if steps_per_epoch < 1:
        raise OptionError(f"--plot-images {images} is fewer than one global batch (batch_size={recipe.batch_size})")
    schedule, total = build_schedule(recipe, steps_per_epoch), recipe.epochs * steps_per_epoch
    steps = range(1, total + 1)
    figure, ax = _figure()
    ax.plot(steps, [schedule(step) for step in steps], label="learning rate")
    ax.vlines([epoch * steps_per_epoch for epoch in range(1, recipe.epochs)], 0, 1, transform=ax.get_xaxis_transform(),
              colors="0.85", linewidths=0.5, label="epoch ends", zorder=0)
    ax.secondary_xaxis("top", functions=(lambda s: s / steps_per_epoch, lambda e: e * steps_per_epoch)) \
        .set_xlabel("epoch")
    ax.set(xlabel="optimizer step", ylabel="learning rate", xlim=(0, total), ylim=(0, None))
    ax.xaxis.set_major_formatter("{x:,.0f}")
    warmup = schedule.warmup_steps
    if 0 < warmup * 20 < total:
        inset = ax.inset_axes([0.55, 0.45, 0.4, 0.4])
        first = range(1, min(3 * warmup, total) + 1)
        inset.plot(first, [schedule(step) for step in first], label="warm-up")
        inset.set_title(f"the first {len(first):,} steps", fontsize=8)
        inset.tick_params(labelsize=7)
        inset.xaxis.set_major_formatter("{x:,.0f}")
    sizes = [recipe.data.train_size(epoch) for epoch in range(recipe.epochs)]
    if len(set(sizes)) > 1:
        right = ax.twinx()
        right.step([epoch * steps_per_epoch for epoch in range(recipe.epochs + 1)], sizes + sizes[-1:], where="post",
                   color="tab:orange", label="training crop (px)")
        right.set_ylabel("training crop (px)", color="tab:orange")
    source = (f"ImageNet's {images:,} training images (--plot-images N for another set)"
              if images == IMAGENET_TRAIN_IMAGES else f"{images:,} training images")
    ax.set_title(f"{name}: schedule {recipe.schedule.name}, global batch {recipe.batch_size}, {recipe.epochs} epochs "
                 f"x {steps_per_epoch:,} steps\n(steps per epoch from {source})", fontsize=9)
    return figure


def plot_schedule(recipe: Recipe, path: Path, images: int, name: str) -> int:
    return _save(schedule_figure(recipe, images, name), path)


# summary.csv's columns in each panel of a run's picture
PANELS = {"loss": ("train_loss", "eval_loss", "ema_eval_loss"), "top-1 (%)": ("top1", "ema_top1"),
          "learning rate at the epoch's end": ("lr",), "training images/s": ("images_per_s",)}


def run_figure(folder: Path):
    """One panel per quantity over the epochs of summary.csv (a row per epoch; older runs lack some columns)."""
    path = Path(folder) / "summary.csv"
    if not path.is_file():
        raise RunFolderError(f"{folder} holds no summary.csv: give a run folder of train.py (its --output), "
                             f"which writes summary.csv at each epoch's end")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "epoch" not in rows[0]:
        raise RunFolderError(f"{path} has no epoch rows: train.py writes a row with an epoch column per epoch")
    figure, axes = _figure(2, 2)
    epochs = [int(row["epoch"]) for row in rows]
    for ax, (title, columns) in zip(axes.flat, PANELS.items()):
        for column in (c for c in columns if rows[0].get(c) not in (None, "")):
            ax.plot(epochs, [float(row[column]) for row in rows], "o-", markersize=3, label=column)
        ax.set(title=title, xlabel="epoch")
        ax.legend(fontsize=8)
    figure.suptitle(f"{Path(folder).resolve().name}: {len(rows)} epochs, {rows[-1].get('step', '?')} steps",
                    fontsize=10)
    return figure


def _figure(rows: int = 1, columns: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=SIZE_INCHES, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(rows, columns)


def _save(figure, path: Path) -> int:
    write_atomically(Path(path), lambda handle: figure.savefig(handle, format="png", dpi=DPI))
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Draw a run's loss, top-1, learning rate and images/s per epoch "
                                                 "(from its summary.csv) into one PNG.")
    parser.add_argument("run_folder", type=Path, help="a run folder of train.py (its --output)")
    parser.add_argument("out", type=Path, metavar="OUT.png")
    args = parser.parse_args(argv)
    setup_logging(0)
    return run_script(lambda: _save(run_figure(args.run_folder), args.out))


if __name__ == "__main__":
    exit_now(main())
