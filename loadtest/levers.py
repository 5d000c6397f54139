"""`python -m loadtest.levers`: serving settings side by side, in interleaved rounds.

On a shared machine the background load drifts by more than most levers move the
needle, so a lever is never judged against a number from another run. Here every
variant gets its own copy of the repository (its own config.pbtxt) and its own
tritonserver, all started at once; then, round after round, each variant in turn takes
the same single-user `recommend` load while the others sit idle, and the in-process
ONNX ceiling (a) is measured in every round too. Medians over rounds are reported.

    python -m loadtest.levers default rec1 rec1-delay2ms --concurrency 32 --rounds 3

Variants are `--set`-style overrides of the retrieval/recommend serving settings
(VARIANTS below, or NAME=key=value,key=value on the command line).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import statistics
import sys
from pathlib import Path

from common import config as config_mod
from loadtest import catalogue
from loadtest.bench import (
    BenchConfig,
    _CpuWatch,
    _payloads,
    _recommend_request,
    _run_load,
    machine,
    measure_onnx,
)
from loadtest.loadgen import LoadGenerator, LoadSpec
from serving import repository as layout
from serving.client import RecommenderClient
from serving.server import ServerConfig, TritonServer

log = logging.getLogger(__name__)

# Named variants: overrides of BenchConfig's `retrieval.*` and `recommend.*` fields.
VARIANTS: dict[str, dict[str, str]] = {
    "default": {},
    "rec1": {"recommend.instances": "1"},
    "rec1-delay2ms": {"recommend.instances": "1", "recommend.max_queue_delay_us": "2000"},
    "rec1-delay0": {"recommend.instances": "1", "recommend.max_queue_delay_us": "0"},
    "rec3": {"recommend.instances": "3"},
    "ret-threads1": {"retrieval.intra_op_threads": "1"},
    "rec1-ret-threads1": {"recommend.instances": "1", "retrieval.intra_op_threads": "1"},
    "ret-spin": {"retrieval.allow_spinning": "true"},
    "ret2": {"retrieval.instances": "2"},
    # Two pipelines at once: two recommend instances feeding two single-threaded retrievals.
    "par2": {
        "recommend.instances": "2",
        "retrieval.instances": "2",
        "retrieval.intra_op_threads": "1",
    },
    # How recommend reaches retrieval (serving/inline.py). The default on the cpu target is
    # inline with 2 instances x (cores / 2) threads; "bls" is the default before step 3.
    "bls": {"recommend.retrieval_call": "bls"},
    "bls-rec1": {"recommend.retrieval_call": "bls", "recommend.instances": "1"},
    "inline": {"recommend.retrieval_call": "inline"},
    "inline-rec1": {"recommend.retrieval_call": "inline", "recommend.instances": "1"},
    "inline-t2": {"recommend.retrieval_call": "inline", "recommend.retrieval_threads": "2"},
}


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """NAME (from VARIANTS) or NAME=key=value,key=value."""
    if "=" not in text:
        if text not in VARIANTS:
            raise ValueError(f"variant {text!r}: unknown; known: {sorted(VARIANTS)}")
        return text, VARIANTS[text]
    name, rest = text.split("=", 1)
    pairs = dict(p.split("=", 1) for p in rest.split(",") if p)
    return name, pairs


def variant_config(base: BenchConfig, overrides: dict[str, str]) -> BenchConfig:
    values = config_mod.to_dict(base)
    for key, val in overrides.items():
        section, field = key.split(".", 1)
        if section not in ("retrieval", "recommend"):
            raise ValueError(f"variant key {key!r}: expected retrieval.* or recommend.*")
        values[section][field] = val
    return config_mod.build(BenchConfig, values)


def run_levers(
    variants: list[tuple[str, dict[str, str]]],
    *,
    base: BenchConfig,
    concurrency: int,
    rounds: int,
    out: Path,
    prepare=None,
) -> dict:
    """`prepare(name, repo)`, if given, may change a variant's repository copy before its
    server starts (e.g. an older model.py, to compare code side by side)."""

    out.mkdir(parents=True, exist_ok=True)
    br = catalogue.build(catalogue.CatalogueShape(n_items=base.items[0], n_users=base.n_users))
    batches, singles = _payloads(br, base)
    payloads = tuple(_recommend_request(u, base.k) for u in singles)
    result: dict = {
        "machine": machine(),
        "n_items": br.shape.n_items,
        "concurrency": concurrency,
        "rounds": rounds,
        "duration_s": base.duration_s,
        "loadavg_start": list(os.getloadavg()),
        "variants": {},
    }
    with contextlib.ExitStack() as stack:
        servers = {}
        for name, overrides in variants:
            cfg = variant_config(base, overrides)
            repo = out / "repos" / name
            shutil.rmtree(repo, ignore_errors=True)
            shutil.copytree(br.repo, repo, ignore=shutil.ignore_patterns("__pycache__"))
            catalogue.write_serving_configs(repo, cfg.retrieval, cfg.recommend)
            if prepare is not None:
                prepare(name, repo)
            server = stack.enter_context(
                TritonServer(
                    ServerConfig.on_free_ports(
                        str(repo),
                        log_file=str(out / f"tritonserver-{name}.log"),
                    )
                )
            )
            client = stack.enter_context(RecommenderClient(server.grpc_url))
            servers[name] = (server, client, _CpuWatch(server.process.pid))
            result["variants"][name] = {"overrides": overrides, "rounds": []}
        gen = LoadGenerator()
        ceiling = []
        for r in range(rounds):
            a = measure_onnx(br, batches, dataclasses.replace(base, duration_s=2.0))
            ceiling.append(a["qps"])
            for name, (server, client, cpu) in servers.items():
                spec = LoadSpec(
                    "grpc", server.grpc_url, payloads, 1, concurrency, base.duration_s, 1.0
                )
                res, extra = _run_load(gen, spec, cpu, client, (layout.RECOMMEND, layout.RETRIEVAL))
                row = {**res.to_dict(), **extra, "a_qps": a["qps"], "loadavg": os.getloadavg()[0]}
                result["variants"][name]["rounds"].append(row)
                log.info(
                    "round %d %-18s %5.0f q/s p50 %5.1f p99 %5.1f ms (a %4.0f) "
                    "batch %.1f, load %.1f",
                    r + 1,
                    name,
                    res.qps,
                    res.p50_ms,
                    res.p99_ms,
                    a["qps"],
                    extra["recommend_avg_batch"],
                    row["loadavg"],
                )
    result["a_qps"] = ceiling
    for v in result["variants"].values():
        rs = v["rounds"]
        v["median"] = {
            key: statistics.median(r[key] for r in rs)
            for key in (
                "qps",
                "p50_ms",
                "p99_ms",
                "recommend_avg_batch",
                "server_cpu_share",
                "server_cpu_ms_per_query",
            )
        }
        v["median"]["c_over_a"] = statistics.median(r["qps"] / r["a_qps"] for r in rs)
    result["loadavg_end"] = list(os.getloadavg())
    (out / "levers.json").write_text(json.dumps(result, indent=1, default=str))
    return result


def markdown(result: dict) -> str:
    lines = [
        f"{result['n_items']:,} items, `recommend` single-user requests at concurrency "
        f"{result['concurrency']}, {result['rounds']} interleaved rounds of "
        f"{result['duration_s']:.0f} s; medians. (a) per round: "
        + ", ".join(f"{q:.0f}" for q in result["a_qps"])
        + f" q/s. Load average {result['loadavg_start'][0]:.1f} -> "
        f"{result['loadavg_end'][0]:.1f}.",
        "",
        "| variant | overrides | q/s | (c)/(a) | p50 ms | p99 ms | batch | server CPU "
        "| server CPU ms/query |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, v in result["variants"].items():
        m = v["median"]
        ov = ", ".join(f"{k}={x}" for k, x in v["overrides"].items()) or "(defaults)"
        lines.append(
            f"| {name} | {ov} | {m['qps']:.0f} | {m['c_over_a']:.2f} | {m['p50_ms']:.1f} | "
            f"{m['p99_ms']:.1f} | {m['recommend_avg_batch']:.1f} | "
            f"{100 * m['server_cpu_share']:.0f}% | {m['server_cpu_ms_per_query']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.levers", description=__doc__.split("\n")[0]
    )
    p.add_argument("variants", nargs="+", help=f"names from {sorted(VARIANTS)} or NAME=k=v,...")
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--out", default="reports/levers")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    base = BenchConfig(items=(args.items,), duration_s=args.duration)
    variants = [parse_variant(v) for v in args.variants]
    result = run_levers(
        variants, base=base, concurrency=args.concurrency, rounds=args.rounds, out=Path(args.out)
    )
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
