from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    """Keep the default tier free of server subprocesses: a test that uses live_server
    must carry the slow marker (it then runs with `pytest -m slow`)."""
    for item in items:
        if "live_server" in getattr(item, "fixturenames", ()) and not item.get_closest_marker(
                "slow"):
            raise pytest.UsageError(f"{item.nodeid} starts a server subprocess (live_server): "
                                    "mark it @pytest.mark.slow")


@pytest.fixture(scope="session")
def encoder():
    from stepserve.models.builtin.text import TextEncoder

    return TextEncoder()


@pytest.fixture(scope="session")
def engine(encoder):
    from stepserve.engines.torch_engine import TorchEngine

    return TorchEngine(encoder=encoder)


@pytest.fixture(scope="session")
def generate(engine):
    """generate(prompts, seeds, steps=..., guidance=...) through the offline scheduler."""
    from functools import partial

    from stepserve.server.scheduler.offline import generate_offline

    return partial(generate_offline, engine)


@pytest.fixture(scope="session")
def live_server():
    """One real `stepserve serve` subprocess on the built-in model, shared by e2e tests."""
    from server_process import ServerProcess

    srv = ServerProcess("--threads", "1", "--max-queue", "16", "--max-batch-size", "16")
    srv.wait_ready()
    yield srv
    srv.stop()
