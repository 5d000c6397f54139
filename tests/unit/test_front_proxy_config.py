"""The front proxy's settings: when `serve` puts nginx in front, and the config it renders
(checked by the real `nginx -t`)."""

from __future__ import annotations

import subprocess

import pytest

from serving.proxy import ProxyLimits, nginx_binary, render_config
from serving.server import ServerConfig, TritonServer


@pytest.mark.parametrize(
    ("host", "mode", "proxied"),
    [
        ("127.0.0.1", "auto", False),
        ("0.0.0.0", "auto", True),
        ("127.0.0.1", "on", True),
        ("0.0.0.0", "off", False),
    ],
)
def test_auto_puts_the_proxy_in_front_of_a_server_others_can_reach(host, mode, proxied):
    server = TritonServer(ServerConfig.on_free_ports("repo", host=host, front_proxy=mode))
    assert server.proxied is proxied
    if proxied:  # Triton itself then listens on loopback only, on its own ports
        cmd = " ".join(server.command())
        assert "--http-address=127.0.0.1" in cmd and "--grpc-address=127.0.0.1" in cmd
        assert f"--http-port={server.http_port}" not in cmd


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("front_proxy", "yes", "expected auto, on or off"),
        ("proxy_max_body_bytes", 10, "expected >= 1024"),
    ],
)
def test_bad_proxy_settings_name_the_field(field, value, expected):
    with pytest.raises(ValueError, match=rf"ServerConfig\.{field}=.*{expected}"):
        ServerConfig(**{field: value})


def test_the_rendered_config_bounds_bodies_and_passes_nginx_t(tmp_path):
    limits = ProxyLimits(max_body_bytes=123456)
    text = render_config(
        host="127.0.0.1",
        http_port=18000,
        grpc_port=18001,
        http_upstream=19000,
        grpc_upstream=19001,
        run_dir=tmp_path,
        limits=limits,
    )
    assert "client_max_body_size 123456;" in text
    assert "server 127.0.0.1:19001;" in text and "grpc_pass grpc://triton_grpc;" in text
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)
    check = subprocess.run(
        [nginx_binary(), "-t", "-q", "-c", str(conf), "-p", str(tmp_path), "-e", "stderr"],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stderr
