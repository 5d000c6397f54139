"""Session-wide test settings."""

from __future__ import annotations

import os
import secrets

import pytest

from serving import auth


def pytest_configure(config) -> None:
    # Every tritonserver the tests start locks its control plane with this key, and the
    # northstar commands they run (in-process or as subprocesses) send it. Setting it here
    # keeps the tests from creating ~/.config/northstar/admin.key on the machine.
    os.environ.setdefault(auth.KEY_ENV, secrets.token_urlsafe(32))


def pytest_collection_modifyitems(config, items) -> None:
    # `gpu` tests are deselected by `make test`; run by hand (`pytest -m gpu`) on a machine
    # without CUDA they skip with the reason instead of failing.
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU; torch sees none")
        for item in gpu:
            item.add_marker(skip)


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server (Debian's package) on a free port with its own data dir."""
    from common.redis_server import RedisServer

    with RedisServer(tmp_path / "redis") as server:
        yield server
