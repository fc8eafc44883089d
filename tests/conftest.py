"""Test tiers and the interpreter switch.

Without CUDA, TRITON_INTERPRET=1 is set here, before any kernel module is imported (the @triton.jit
decorators read it at import). Kernel outputs are NaN-poisoned so an unwritten element fails a test.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("SAILS_FAST_POISON_OUTPUTS", "1")
# nothing in the tests may reach a hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# kernel tests run where Triton can: CPU tensors under the interpreter, else CUDA
KERNEL_DEVICE = "cpu" if INTERPRET else "cuda"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def kernel_device() -> str:
    return KERNEL_DEVICE
