"""Test-wide setup. TRITON_INTERPRET must be set before any `@triton.jit` runs, so it is set
here, at conftest import, before any test module imports a kernel module."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run: CI failures are reproducible, never flaky.
settings.register_profile("fastalign", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("fastalign")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
