"""The admin key's sources and checks, and owner-only control-plane files."""

from __future__ import annotations

import os
import stat

import pytest

from common.files import atomic_write_text, private_dir, write_private
from serving import auth
from serving.routing import RoutingState


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def no_key_env(monkeypatch, tmp_path):
    monkeypatch.delenv(auth.KEY_ENV, raising=False)
    monkeypatch.delenv(auth.KEY_FILE_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path / "config" / "northstar" / "admin.key"


def test_default_key_file_is_created_owner_only_and_reused(no_key_env):
    assert auth.admin_key() is None and auth.headers() == {}
    key = auth.admin_key(create=True)
    assert len(key) >= 32 and no_key_env.read_text().strip() == key
    assert _mode(no_key_env) == 0o600 and _mode(no_key_env.parent) == 0o700
    assert auth.admin_key(create=True) == key  # not regenerated
    assert auth.headers("http") == {"northstar-admin-key": key}
    assert auth.headers("grpc") == {"triton-grpc-protocol-northstar-admin-key": key}


def test_a_key_file_others_can_read_is_refused(no_key_env):
    auth.admin_key(create=True)
    os.chmod(no_key_env, 0o644)
    with pytest.raises(auth.AdminKeyError, match="mode 0644; expected 0600"):
        auth.admin_key()


def test_env_value_wins_and_is_validated(no_key_env, monkeypatch):
    monkeypatch.setenv(auth.KEY_ENV, "k" * 20)
    assert auth.admin_key(create=True) == "k" * 20
    assert not no_key_env.exists()  # nothing written when the key comes from the env
    for bad in ("short", "has:colon" * 3, "has=equals" * 3, "has space" * 3):
        monkeypatch.setenv(auth.KEY_ENV, bad)
        with pytest.raises(auth.AdminKeyError, match=auth.KEY_ENV):
            auth.admin_key()


def test_mounted_secret_file(no_key_env, monkeypatch, tmp_path):
    secret = tmp_path / "secret"
    monkeypatch.setenv(auth.KEY_FILE_ENV, str(secret))
    with pytest.raises(auth.AdminKeyError, match="does not exist"):
        auth.admin_key(create=True)  # a missing mounted secret is an error, not a new key
    secret.write_text("s" * 24 + "\n")
    os.chmod(secret, 0o644)  # orchestrators mount secrets 0644/0444: accepted
    assert auth.admin_key() == "s" * 24


def test_restricted_flags_cover_the_control_plane():
    flags = auth.restricted_flags("x" * 16)
    assert flags == [
        "--http-restricted-api=model-repository,model-config,shared-memory,trace,logging:"
        "northstar-admin-key=" + "x" * 16,
        "--grpc-restricted-protocol=model-repository,model-config,shared-memory,trace,logging:"
        "northstar-admin-key=" + "x" * 16,
    ]
    assert not {"inference", "health", "metadata"} & set(auth.RESTRICTED)


def test_entrypoint_refuses_to_start_without_a_key(no_key_env, capsys):
    assert auth.main(["exec", "tritonserver", "--model-repository=/models"]) == 2
    assert "refusing to start: no admin key" in capsys.readouterr().err
    assert auth.main(["tritonserver"]) == 2  # usage


def test_private_files_and_folders(tmp_path):
    old = os.umask(0)  # the most permissive umask: modes must still be exact
    try:
        path = write_private(tmp_path / "a" / "b" / "state.json", "{}")
        routing = RoutingState(production=2, canary=3, canary_percent=10).save(
            tmp_path / "repo" / "state" / "routing.json"
        )
        public = atomic_write_text(tmp_path / "public.txt", "x")
        made = private_dir(tmp_path / "c" / "d")
    finally:
        os.umask(old)
    assert _mode(path) == 0o600 and _mode(routing) == 0o600
    assert _mode(tmp_path / "a") == _mode(tmp_path / "a" / "b") == 0o700
    assert _mode(tmp_path / "repo" / "state") == 0o700 and _mode(made) == 0o700
    assert _mode(public) == 0o644
    assert RoutingState.load(routing).canary == 3
    assert not list(tmp_path.rglob("*.tmp"))  # no temp file left behind


def test_event_log_and_canary_registry_are_owner_only(tmp_path):
    from canary.state import StateStore
    from canary.tracking import Tracker
    from feedback.sink import open_sink

    old = os.umask(0)
    try:
        sink = open_sink(tmp_path / "events.db")
        sink.close()
        store = StateStore(tmp_path / "canary")
        with store.update() as s:
            s["production"] = None
        Tracker(tmp_path / "canary")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "events.db") == 0o600
    assert _mode(tmp_path / "canary") == 0o700
    assert _mode(tmp_path / "canary" / "state.json") == 0o600
    assert _mode(tmp_path / "canary" / "mlflow.db") == 0o600


def test_published_feature_snapshots_are_owner_only_whatever_the_umask(tmp_path):
    from serving import repository as layout
    from serving.testing import tiny_export

    old = os.umask(0o022)
    try:
        _, repo, res = tiny_export(tmp_path / "repo")
    finally:
        os.umask(old)
    folder = layout.features_dir(repo, res.version)
    assert _mode(folder.parent) == 0o700 and _mode(folder) == 0o700
    assert {p.name: _mode(p) for p in folder.iterdir()} == {p.name: 0o600 for p in folder.iterdir()}
