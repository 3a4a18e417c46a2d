from pathlib import Path

import pytest

from data.sample_data import generate


@pytest.fixture(scope="session")
def tiny_imagenet(tmp_path_factory) -> Path:
    """3 classes, 24 train images, 15 val images (odd, so 2 ranks get unequal shares)."""
    return generate(tmp_path_factory.mktemp("data") / "tiny", num_classes=3, train_per_class=8,
                    val_per_class=5, min_size=40, max_size=120, seed=1)
