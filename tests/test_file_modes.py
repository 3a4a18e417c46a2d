"""What a run writes is as readable as open() and torch.save make a file under the user's umask, so that a
teammate in the group of a shared cluster can read best.pt (umask 022) or resume the run (umask 002)."""
import os
import shutil
import stat
import time

import pytest

from tests.helpers import TINY_OVERRIDES, last_wins, train_here


def modes(*folders):
    """Each file's and folder's permission bits under `folders`, the folders included, by path."""
    found = {}
    for folder in folders:
        for path in [folder, *folder.rglob("*")]:
            found[str(path)] = stat.S_IMODE(os.lstat(path).st_mode)
    return found


@pytest.mark.parametrize("umask", [0o022, 0o002], ids=["umask-022", "umask-002"])
def test_the_run_folder_and_the_index_cache_follow_the_umask(tmp_path, tiny_imagenet, umask):
    data = shutil.copytree(tiny_imagenet, tmp_path / "data", ignore=shutil.ignore_patterns(".cspresnet_index"))
    an_hour_ago = time.time() - 3600  # an index listed just after its folders changed is not cached (RACY_NS)
    for folder in [data, *data.rglob("*")]:
        os.utime(folder, (an_hour_ago, an_hour_ago))
    run = tmp_path / "run"
    before = os.umask(umask)
    try:
        train_here(["train.py", "--recipe", "demo.yaml", "--data-dir", data, "--output", run,
                    *last_wins(*TINY_OVERRIDES, "epochs=1")])
    finally:
        os.umask(before)
    index = data / ".cspresnet_index"
    written = modes(run, index)
    names = {os.path.basename(path) for path in written}
    assert {"recipe.yaml", "status", "summary.csv", "segments.jsonl", "last.pt", "best.pt", "train.idx",
            "val.idx"} <= names
    assert any(name.startswith("step-") for name in names) and any(name.startswith("events.") for name in names)
    wrong = {path: oct(mode) for path, mode in written.items()
             if mode != (0o777 if os.path.isdir(path) else 0o666) & ~umask}
    assert wrong == {}
