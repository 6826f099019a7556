"""Benchmarks: ``pytest benchmarks/`` (pytest-benchmark). Each group times refnet and, where
PyTorch is installed, the same work in torch (``impl`` = refnet | torch) in the same run;
``python benchmarks/compare.py RUN.json`` prints the refnet/torch ratios."""

import os

import pytest

# torch's threads: 2, the machine size every benchmark here is planned for; REFNET_BENCH_THREADS
# sets another (with OPENBLAS_NUM_THREADS for numpy's side: the same count on both sides).
THREADS = int(os.environ.get("REFNET_BENCH_THREADS", "2"))

try:
    import torch
    torch.set_num_threads(THREADS)
    HAVE_TORCH = True
except ImportError:
    HAVE_TORCH = False


def pytest_generate_tests(metafunc):
    if "impl" in metafunc.fixturenames:
        metafunc.parametrize("impl", ["refnet", "torch"])


@pytest.fixture
def need_torch(impl):
    if impl == "torch" and not HAVE_TORCH:
        pytest.skip("torch not installed: no peer timing")
