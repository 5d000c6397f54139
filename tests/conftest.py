"""Session-wide test settings."""

from __future__ import annotations

import os
import secrets
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from common import leftovers, procs
from serving import auth

# Every process the session starts inherits this mark (a fresh value per session, so suites of
# other checkouts running beside this one are told apart), and every process group
# common/procs.spawn starts is recorded in the registry: at the end, whatever of them still
# runs is a leak (common/leftovers.py).
SESSION_ENV = "NORTHSTAR_TEST_SESSION"
pytest_plugins = ["pytester"]  # tests/unit/test_leftovers.py runs this file in a session of its own
_LEAKS = pytest.StashKey[list]()
_SAVED_ENV = pytest.StashKey[dict]()
_REGISTRY = pytest.StashKey[str]()
_STARTED = pytest.StashKey[float]()
_MARK = pytest.StashKey[tuple]()


def pytest_configure(config) -> None:
    # Every tritonserver the tests start locks its control plane with this key, and the
    # northstar commands they run (in-process or as subprocesses) send it. Setting it here
    # keeps the tests from creating ~/.config/northstar/admin.key on the machine.
    os.environ.setdefault(auth.KEY_ENV, secrets.token_urlsafe(32))
    config.stash[_SAVED_ENV] = {k: os.environ.get(k) for k in (SESSION_ENV, procs.REGISTRY_ENV)}
    session = uuid.uuid4().hex
    os.environ[SESSION_ENV] = session
    config.stash[_MARK] = (SESSION_ENV, session)
    fd, registry = tempfile.mkstemp(prefix=f"northstar-test-{session[:8]}-", suffix=".procs")
    os.close(fd)
    os.environ[procs.REGISTRY_ENV] = registry
    config.stash[_REGISTRY] = registry
    config.stash[_STARTED] = time.time()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus) -> None:
    """After every fixture is torn down (pytest's own sessionfinish runs first, trylast puts
    this one after it), also after Ctrl-C: fail the run on any server it left running."""
    config = session.config
    found = leftovers.wait_for_leftovers(
        config.stash[_MARK],
        registry=config.stash[_REGISTRY],
        root_pid=os.getpid(),
        since=config.stash[_STARTED],
    )
    config.stash[_LEAKS] = found
    if found:
        leftovers.kill(found)  # reported below; the machine is left clean either way
        if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    found = config.stash.get(_LEAKS, [])
    if found:
        terminalreporter.section("servers left running by the tests (now killed)", red=True)
        for leftover in found:
            terminalreporter.line(str(leftover))


def pytest_unconfigure(config) -> None:
    if _REGISTRY in config.stash:
        Path(config.stash[_REGISTRY]).unlink(missing_ok=True)
    for key, value in config.stash.get(_SAVED_ENV, {}).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


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
