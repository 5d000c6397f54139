"""loadtest.gpu_ceiling: every engine x precision x batch row, on the CPU here and CUDA there."""

from __future__ import annotations

import json

import pytest
import torch

from loadtest import gpu_ceiling as gc


def test_a_cpu_smoke_run_produces_every_row_and_the_json(tmp_path):
    cfg = gc.GpuCeilingConfig(
        items=(500,), batches=(1, 4), dtypes=("fp32", "bf16"), device="cpu", reps=2, warmup=1
    )
    report = gc.run(cfg, tmp_path)
    got = {(r["engine"], r["dtype"], r["batch"]) for r in report["rows"]}
    assert got == {
        ("torch", "fp32", 1),
        ("torch", "fp32", 4),
        ("torch", "bf16", 1),
        ("torch", "bf16", 4),
        ("onnxruntime CPUExecutionProvider", "fp32", 1),
        ("onnxruntime CPUExecutionProvider", "fp32", 4),
    }
    assert all(r["queries_per_s"] > 0 and r["items"] == 500 for r in report["rows"])
    assert json.loads((tmp_path / "gpu_ceiling.json").read_text())["rows"] == report["rows"]
    assert "onnxruntime CPUExecutionProvider" in gc.table(report)


def test_the_graph_is_the_served_one_top_k_of_the_scores():
    cfg = gc.GpuCeilingConfig(k=7)
    module = gc.build_graph(300, cfg, torch.device("cpu"))
    x = gc.sample_inputs(module, 5, cfg.history_len, "cpu")
    with torch.inference_mode():
        ids, scores = module(*x)
        full = module.user_tower(*x) @ module.item_embeddings.T  # (5, 300)
    assert ids.shape == scores.shape == (5, 7)
    torch.testing.assert_close(scores, full.topk(7, dim=1).values)


def test_onnx_is_skipped_with_the_reason_when_the_graph_cannot_be_exported(monkeypatch):
    monkeypatch.setattr(gc, "_ONNX_MAX_BYTES", 1)
    cfg = gc.GpuCeilingConfig(items=(200,), batches=(1,), dtypes=("fp32",), device="cpu", reps=1)
    report = gc.run(cfg)
    assert {r["engine"] for r in report["rows"]} == {"torch"}
    assert "2 GB protobuf limit" in report["skipped"][0]["onnxruntime"]


@pytest.mark.gpu
def test_the_ceiling_on_a_cuda_device(tmp_path):
    cfg = gc.GpuCeilingConfig(items=(100_000,), batches=(1, 256), reps=5)
    report = gc.run(cfg, tmp_path)
    torch_rows = [r for r in report["rows"] if r["engine"] == "torch"]
    assert {(r["dtype"], r["batch"]) for r in torch_rows} == {
        (d, b) for d in ("fp32", "fp16", "bf16") for b in (1, 256)
    }
    assert report["machine"]["device"] != "cpu"
