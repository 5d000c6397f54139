"""The in-process ceiling of the `retrieval` graph on a GPU (loadtest/RESULTS.md, GPU section).

    python -m loadtest.gpu_ceiling --out reports/gpu           # on the lent GPU machine
    python -m loadtest.gpu_ceiling --device cpu --items 2000 --batches 1 8   # a smoke run

For each catalogue size it builds the production-shape graph with random weights (the
same TwoTowerRetrieval that export writes to ONNX: user tower -> (B, N) scores -> top-K)
directly on the device, and times it at each batch size and precision:
  - torch eager in fp32, fp16 and bf16 (the user tower and the item table cast);
  - onnxruntime's CUDA provider on the exported graph, where that provider is installed
    and the graph is small enough to export (ONNX protobufs stop at 2 GB).
GPU timings use CUDA events around `reps` calls after a warmup, so the asynchronous
launches are measured, not the Python that queues them. Throughput depends on the
shapes, not on the weights. Writes gpu_ceiling.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from models.features import FeatureSpec
from models.retrieval import TwoTowerRetrieval
from models.towers import TowerConfig, TwoTower

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_ONNX_MAX_BYTES = 1_800_000_000  # protobuf's 2 GB limit, with room for the graph


@dataclass(frozen=True)
class GpuCeilingConfig:
    # a large, a very large and a huge catalogue
    items: tuple[int, ...] = (100_000, 1_000_000, 10_000_000)
    batches: tuple[int, ...] = (1, 16, 64, 256, 1024, 4096)
    dtypes: tuple[str, ...] = ("fp32", "fp16", "bf16")
    device: str = "cuda"
    k: int = 200  # k 100 + overfetch 100, as exported
    history_len: int = 20
    n_users: int = 20_000
    tower: TowerConfig = field(default_factory=lambda: TowerConfig(dropout=0.0))
    reps: int = 20
    warmup: int = 3
    onnx: bool = True


def build_graph(n_items: int, cfg: GpuCeilingConfig, device: torch.device) -> TwoTowerRetrieval:
    spec = FeatureSpec(
        n_users=cfg.n_users,
        n_items=n_items,
        n_hash_buckets=256,
        history_len=cfg.history_len,
        user_cat_cardinalities=(4, 8, 4, 4),
        item_cat_cardinalities=(8, 4),
    )
    gen = torch.Generator().manual_seed(0)
    item_cats = torch.stack(
        [torch.randint(0, c, (n_items,), generator=gen) for c in spec.item_cat_cardinalities], 1
    )
    with torch.device(device):
        model = TwoTower(spec, cfg.tower, item_cats.to(device)).eval()
        with torch.no_grad():
            module = TwoTowerRetrieval.from_two_tower(
                model, torch.arange(n_items, device=device), min(cfg.k, n_items)
            )
    del model  # the item tower is not part of the served graph
    return module


def sample_inputs(module: TwoTowerRetrieval, batch: int, history_len: int, device):
    tower = module.user_tower
    gen = torch.Generator().manual_seed(batch)
    users = torch.randint(0, tower.user_emb.num_embeddings, (batch, 1), generator=gen)
    cats = torch.stack(
        [torch.randint(0, e.num_embeddings, (batch,), generator=gen) for e in tower.cat_embs], 1
    )
    hist = torch.randint(0, tower.history_emb.num_embeddings, (batch, history_len), generator=gen)
    return tuple(t.to(device) for t in (users, cats, hist))


def _time(fn, device: torch.device, reps: int, warmup: int) -> float:
    """Seconds per call."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3 / reps
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def _row(engine, n_items, dtype, batch, sec) -> dict:
    return {
        "engine": engine,
        "items": n_items,
        "dtype": dtype,
        "batch": batch,
        "ms_per_call": sec * 1e3,
        "queries_per_s": batch / sec,
    }


def measure_torch(module, n_items, cfg: GpuCeilingConfig, device) -> list[dict]:
    rows = []
    for name in cfg.dtypes:
        cast = module.to(DTYPES[name])  # indices stay int64; weights and the table cast
        for b in cfg.batches:
            inputs = sample_inputs(cast, b, cfg.history_len, device)
            with torch.inference_mode():
                sec = _time(lambda c=cast, x=inputs: c(*x), device, cfg.reps, cfg.warmup)
            rows.append(_row("torch", n_items, name, b, sec))
            log.info("torch %s items=%d batch=%d: %.0f q/s", name, n_items, b, b / sec)
    module.to(torch.float32)
    return rows


def measure_onnx(module, n_items, cfg: GpuCeilingConfig, device) -> tuple[list[dict], str]:
    """onnxruntime on the exported graph; returns (rows, why none) ."""
    try:
        # lazy: optional here; a GPU machine may have torch without onnxruntime's CUDA build
        import onnxruntime as ort
    except ImportError:
        return [], "onnxruntime is not installed"
    provider = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
    if provider not in ort.get_available_providers():
        return [], f"onnxruntime has no {provider}"
    n_bytes = sum(t.numel() * t.element_size() for t in module.buffers())
    if n_bytes > _ONNX_MAX_BYTES:
        return [], f"{n_bytes / 1e9:.1f} GB of initializers: over the 2 GB protobuf limit"
    cpu_module = module.to("cpu", torch.float32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        names = ("user_index", "user_cats", "history")
        with warnings.catch_warnings():  # the legacy exporter is chosen on purpose (below)
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                cpu_module,
                sample_inputs(cpu_module, 2, cfg.history_len, "cpu"),
                str(path),
                input_names=list(names),
                output_names=["item_ids", "scores"],
                dynamic_axes={n: {0: "batch"} for n in (*names, "item_ids", "scores")},
                opset_version=18,
                dynamo=False,  # needs no onnxscript, which the GPU machine may lack
            )
        session = ort.InferenceSession(str(path), providers=[provider])
        for b in cfg.batches:
            feeds = dict(
                zip(
                    names,
                    (t.numpy() for t in sample_inputs(cpu_module, b, cfg.history_len, "cpu")),
                    strict=True,
                )
            )
            # Host in, host out, as a Triton instance without CUDA shared memory does.
            sec = _time(lambda f=feeds: session.run(None, f), torch.device("cpu"), cfg.reps, 1)
            rows.append(_row(f"onnxruntime {provider}", n_items, "fp32", b, sec))
            log.info("onnxruntime items=%d batch=%d: %.0f q/s", n_items, b, b / sec)
    module.to(device)
    return rows, ""


def run(cfg: GpuCeilingConfig, out: Path | None = None) -> dict:
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_ceiling: --device cuda but torch sees no CUDA device")
    report: dict = {
        "config": {**asdict(cfg), "tower": asdict(cfg.tower)},
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        },
        "rows": [],
        "skipped": [],
    }
    for n in cfg.items:
        module = build_graph(n, cfg, device)
        report["rows"] += measure_torch(module, n, cfg, device)
        if cfg.onnx:
            rows, why = measure_onnx(module, n, cfg, device)
            report["rows"] += rows
            if why:
                report["skipped"].append({"items": n, "onnxruntime": why})
        del module
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_ceiling.json").write_text(json.dumps(report, indent=2))
    return report


def table(report: dict) -> str:
    lines = [
        f"{'engine':36s} {'items':>9s} {'dtype':5s} {'batch':>6s} {'ms/call':>9s} {'q/s':>10s}"
    ]
    for r in report["rows"]:
        lines.append(
            f"{r['engine']:36s} {r['items']:9d} {r['dtype']:5s} {r['batch']:6d} "
            f"{r['ms_per_call']:9.3f} {r['queries_per_s']:10.0f}"
        )
    lines += [f"skipped at {s['items']} items: {s['onnxruntime']}" for s in report["skipped"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.gpu_ceiling", description=__doc__)
    d = GpuCeilingConfig()
    p.add_argument("--items", type=int, nargs="+", default=list(d.items))
    p.add_argument("--batches", type=int, nargs="+", default=list(d.batches))
    p.add_argument("--dtypes", nargs="+", default=list(d.dtypes), choices=sorted(DTYPES))
    p.add_argument("--device", default=d.device)
    p.add_argument("--reps", type=int, default=d.reps)
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    cfg = GpuCeilingConfig(
        items=tuple(a.items),
        batches=tuple(a.batches),
        dtypes=tuple(a.dtypes),
        device=a.device,
        reps=a.reps,
        onnx=not a.no_onnx,
    )
    report = run(cfg, a.out)
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
