import os

import pytest
import torch

# CPU runs go through Triton's interpreter unless told otherwise.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

# derandomized: CI is deterministic (a failing draw found once is added as an @example instead)
settings.register_profile("ci", deadline=None, max_examples=8, derandomize=True)
settings.register_profile("gpu", deadline=None, max_examples=30)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "gpu" if torch.cuda.is_available() else "ci"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _backend_tests_use_torch_kernels(request, monkeypatch):
    """The backend and bench tests check the graph rewrite and the report code, not the kernels
    (tests/test_kernels.py and tests/test_ops.py run those in the interpreter): give them the
    op's PyTorch path, which computes the same function, so CI stays within its time budget."""
    if request.module.__name__.startswith(("test_backend", "test_bench")):
        monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is as fast, and immune to OpenMP oversubscription on a busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
