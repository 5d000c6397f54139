from dataclasses import dataclass, field

import pytest

from common.config import ConfigError, build, load


@dataclass(frozen=True)
class Inner:
    a: int = 1


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    rate: float = 0.5
    flag: bool = False
    maybe: str | None = None
    inner: Inner = field(default_factory=Inner)


def test_overrides_and_nested(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('name = "y"\n[inner]\na = 3\n')
    cfg = load(Outer, path, ["rate=0.25", "flag=true", "inner.a=4"])
    assert cfg == Outer(name="y", rate=0.25, flag=True, inner=Inner(a=4))


def test_unknown_key_and_bad_type_are_named():
    with pytest.raises(ConfigError, match="nope"):
        build(Outer, {"nope": 1})
    with pytest.raises(ConfigError, match="rate"):
        build(Outer, {"rate": "fast"})


# ---------------------------------------------------------------- each stage's CLI config
# Every stage builds its frozen config from one --config FILE / --set KEY=VALUE pair, with
# its flags as shorthands that default to None: the dataclass default is the only default.
# Precedence: the file, then the flags, then --set.


def _args(module, *argv):
    import argparse

    parser = argparse.ArgumentParser()
    module.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(list(argv))


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_simulate_file_sets_retry_fields_and_the_defaults_are_the_dataclass(tmp_path):
    from simulator import SimulateConfig, cli

    cfg = cli.simulate_config(_args(cli, "simulate", "--world", "w"))
    assert cfg == SimulateConfig(world="w")  # no flag default competes with the dataclass
    path = _write(
        tmp_path,
        "sim.toml",
        'world = "w"\nretries = 7\nretry_deadline_s = 45.5\ndelay_median_s = 12.0\n',
    )
    cfg = cli.simulate_config(_args(cli, "simulate", "--config", path))
    assert (cfg.retries, cfg.retry_deadline_s, cfg.delay_median_s) == (7, 45.5, 12.0)
    assert cfg.users == SimulateConfig.users


def test_simulate_flag_overrides_the_file_and_set_overrides_both(tmp_path):
    from simulator import cli

    path = _write(tmp_path, "sim.toml", '[simulate]\nworld = "w"\nusers = 10\nwindow_s = 60\n')
    args = _args(cli, "simulate", "--config", path, "--users", "7", "--window", "1h")
    cfg = cli.simulate_config(args)
    assert (cfg.world, cfg.users, cfg.window_s) == ("w", 7, 3600.0)
    args = _args(cli, "simulate", "--config", path, "--users", "7", "--set", "users=3")
    assert cli.simulate_config(args).users == 3


def test_simulate_wrong_key_type_or_missing_world_is_refused_by_name(tmp_path):
    from simulator import cli

    path = _write(tmp_path, "bad.toml", 'world = "w"\nretrys = 3\n')
    with pytest.raises(ConfigError, match="retrys"):
        cli.simulate_config(_args(cli, "simulate", "--config", path))
    with pytest.raises(ConfigError, match="retries"):
        cli.simulate_config(_args(cli, "simulate", "--world", "w", "--set", "retries=many"))
    with pytest.raises(ConfigError, match="world"):
        cli.simulate_config(_args(cli, "simulate", "--users", "5"))


def test_serve_config_from_file_flags_and_set(tmp_path):
    from serving import cli
    from serving.server import ServerConfig

    assert cli.server_config(_args(cli, "serve")) == ServerConfig()
    path = _write(
        tmp_path, "server.yaml", "server:\n  host: 0.0.0.0\n  http_port: 9000\n  log_verbose: 1\n"
    )
    args = _args(cli, "serve", "--config", path, "--http-port", "0", "--set", "log_verbose=2")
    cfg = cli.server_config(args)
    assert (cfg.host, cfg.http_port, cfg.log_verbose) == ("0.0.0.0", 0, 2)
    assert cfg.grpc_port == ServerConfig.grpc_port
    args = _args(cli, "serve", "--set", "models=feedback", "startup_timeout_s=5")
    assert cli.server_config(args).models == ("feedback",)
    with pytest.raises(ConfigError, match="http_prot"):
        cli.server_config(_args(cli, "serve", "--set", "http_prot=1"))


def test_join_config_durations_and_watermark(tmp_path):
    import math

    from feedback import cli
    from feedback.join import JoinConfig

    base = ("feedback", "join", "--log", "e.db", "--out", "labels")
    assert cli.join_config(_args(cli, *base)) == JoinConfig(log="e.db", out="labels")
    path = _write(tmp_path, "join.toml", "[join]\nwindow_s = 600\nas_of = 5.0\n")
    cfg = cli.join_config(_args(cli, *base, "--config", path))
    assert (cfg.window_s, cfg.as_of) == (600.0, 5.0)
    cfg = cli.join_config(_args(cli, *base, "--config", path, "--window", "2h", "--as-of", "log"))
    assert (cfg.window_s, cfg.as_of) == (7200.0, None)  # flags beat the file, 'log' too
    cfg = cli.join_config(_args(cli, *base, "--as-of", "end", "--lookback", "1d"))
    assert math.isinf(cfg.as_of) and cfg.late_lookback_s == 86400.0
    with pytest.raises(ConfigError, match="windw_s"):
        cli.join_config(_args(cli, *base, "--set", "windw_s=1"))
    with pytest.raises(ConfigError, match="out"):
        cli.join_config(_args(cli, "feedback", "join", "--log", "e.db"))


def test_ingest_bench_config(tmp_path):
    from feedback import cli
    from feedback.bench import IngestBenchConfig

    assert cli.bench_config(_args(cli, "feedback", "bench")) == IngestBenchConfig()
    args = _args(cli, "feedback", "bench", "--events", "10", "--set", "click_rate=0.5")
    assert cli.bench_config(args) == IngestBenchConfig(events=10, click_rate=0.5)


def test_audit_and_gate_configs_from_one_file(tmp_path):
    from fairness import cli
    from fairness.audit import AuditConfig
    from fairness.gates import GateConfig

    base = ("audit", "--run", "r", "--data", "d", "--out", "o")
    cfg, gates = cli.audit_configs(_args(cli, *base))
    assert (cfg, gates) == (AuditConfig(run="r", data="d"), GateConfig())
    path = _write(
        tmp_path, "audit.toml", "[audit]\nn_boot = 30\nci = 0.9\n[gates]\nmax_gap = 0.5\n"
    )
    args = _args(cli, *base, "--config", path, "--n-boot", "40", "--set", "gates.min_ratio=0.1")
    cfg, gates = cli.audit_configs(args)
    assert (cfg.n_boot, cfg.ci, gates.max_gap, gates.min_ratio) == (40, 0.9, 0.5, 0.1)
    top = _write(tmp_path, "top.toml", 'run = "r2"\ndata = "d2"\n[gates]\nmax_gap = 0.4\n')
    cfg, gates = cli.audit_configs(_args(cli, "audit", "--out", "o", "--config", top))
    assert (cfg.run, cfg.data, gates.max_gap) == ("r2", "d2", 0.4)
    with pytest.raises(ConfigError, match="n_bot"):
        cli.audit_configs(_args(cli, *base, "--set", "n_bot=3"))
    with pytest.raises(ConfigError, match="run and data"):
        cli.audit_configs(_args(cli, "audit", "--out", "o"))


def test_demo_config(tmp_path):
    from northstar import demo

    assert demo.demo_config(_args(demo, "demo")) == demo.DemoConfig()
    path = _write(tmp_path, "demo.json", '{"demo": {"preset": "tiny", "sim_users": 50}}')
    args = _args(demo, "demo", "--config", path, "--preset", "small", "--set", "k=5")
    assert demo.demo_config(args) == demo.DemoConfig(preset="small", sim_users=50, k=5)
    with pytest.raises(ConfigError, match="sim_user"):
        demo.demo_config(_args(demo, "demo", "--set", "sim_user=5"))
