"""Shared pytest fixtures: the real data in ../shared (skipped when absent) and markers."""
import os
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MVSNB_SHARED", ROOT.parent / "shared"))
REALDATA = SHARED / "realdata"

def pytest_configure(config):
    for m in ("slow: takes more than a few seconds", "cuda: needs a GPU", "open3d: needs Open3D"):
        config.addinivalue_line("markers", m)

def pytest_collection_modifyitems(config, items):
    import torch
    skip_gpu = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available(): item.add_marker(skip_gpu)

@pytest.fixture(scope="session")
def realdata():
    "Path to ../shared/realdata, or skip the test when it is not there."
    if not REALDATA.is_dir(): pytest.skip(f"real data not found at {REALDATA}")
    return REALDATA

@pytest.fixture
def one_thread():
    "Tiny tensors: on a busy 2-core machine torch's thread hand-offs cost more than they save."
    import torch
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
