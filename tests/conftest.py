import pytest
import torch

from dagc.trainer.train import TrainConfig, train


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        # The marker, not ``"gpu" in item.keywords``: keywords also hold the names of the folders
        # above the test (a checkout in a folder named gpu would skip every test).
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
    """dagc's cache (cost tables, `dagc.cost_table.cache_dir`) in a temporary folder: no test writes
    to the user's ~/.cache. A test that needs its own sets DAGC_CACHE_DIR to its tmp_path."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DAGC_CACHE_DIR", str(tmp_path_factory.mktemp("dagc_cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def short_checkpoint(tmp_path_factory):
    """A few iterations of the default synthetic run (not accurate: a reduced network and its data
    for the precision checks). Read-only: a test that changes it copies it first."""
    run = tmp_path_factory.mktemp("short_run")
    train(TrainConfig(warmup_iters=3, search_iters=6, finetune_iters=3, batch_size=4, n_train=32, n_test=8),
          run, progress=False)
    return run / "checkpoint.safetensors"
