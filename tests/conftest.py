import pytest
import torch


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
