"""Test configuration: make the repository root importable and run torch on one thread.

scripts/run_tests.sh runs two pytest workers; one torch thread each keeps both cores busy
without oversubscribing them, and on a machine whose cores are shared a single thread does
not stall the way spinning OpenMP threads do (measured: a demo run took 3x longer with two).
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cub_root(tmp_path_factory) -> Path:
    """A CUB dataset in its real layout: 3 old + 3 new classes, 4 training and 2 test images
    each, so 6 labelled + 18 unlabelled training images and 12 test images."""
    from tests.data_fixtures import make_fixture

    return make_fixture("cub", tmp_path_factory.mktemp("cub"))


def pytest_configure(config):
    # tests/test_gpu.py: the CUDA tier (`pytest -m cuda`), skipped with the reason without a GPU
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped without one (scripts/gpu_check.sh runs them)")
