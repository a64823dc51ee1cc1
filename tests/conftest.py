from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def encoder():
    from stepserve.models.builtin.text import TextEncoder

    return TextEncoder()


@pytest.fixture(scope="session")
def pipeline(encoder):
    from stepserve.models.builtin.pipeline import BuiltinPipeline

    return BuiltinPipeline(encoder=encoder)
