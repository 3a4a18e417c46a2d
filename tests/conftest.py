import os
import signal
from pathlib import Path

import pytest
import torch

from data.sample_data import generate
from tests.helpers import STARTED


@pytest.fixture(autouse=True)
def same_threads_after():
    """Some tests run a benchmark's main here, which may pin torch to one thread."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def no_stray_processes():
    """A failed test must not leave its training processes running (they hold the cores)."""
    yield
    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()


@pytest.fixture(scope="session")
def tiny_imagenet(tmp_path_factory) -> Path:
    """3 classes, 24 train images, 15 val images (odd, so 2 ranks get unequal shares)."""
    return generate(tmp_path_factory.mktemp("data") / "tiny", num_classes=3, train_per_class=8,
                    val_per_class=5, min_size=40, max_size=120, seed=1)
