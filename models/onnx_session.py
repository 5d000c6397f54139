"""One way to open an onnxruntime session, for export's parity check and for serving."""

from __future__ import annotations

import os
from pathlib import Path


def onnxruntime_providers(prefer_gpu: bool) -> list[str]:
    """CUDA only when asked for, built in, and a GPU is actually visible; else the CPU."""
    # lazy: the gpu serving image has no onnxruntime, and its Python models import this
    import onnxruntime as ort

    if prefer_gpu and "CUDAExecutionProvider" in ort.get_available_providers() and _gpu_visible():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _gpu_visible() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", "x") in ("", "-1"):
        return False
    return Path("/dev/nvidiactl").exists() or Path("/dev/nvidia0").exists()


def onnx_session(
    path: str | Path,
    *,
    intra_op_threads: int = 0,
    allow_spinning: bool = False,
    prefer_gpu: bool = False,
    prepack: bool = True,
):
    # lazy: the gpu serving image has no onnxruntime, and its Python models import this
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = int(intra_op_threads)
    so.inter_op_num_threads = 1  # the graph is one chain: no parallel branches to run
    so.add_session_config_entry("session.intra_op.allow_spinning", str(int(allow_spinning)))
    if not prepack:
        # Prepacking lays a constant MatMul input out for blocked GEMM: faster from a few rows
        # up, slower for one row, where the plain kernel streams the item table once.
        so.add_session_config_entry("session.disable_prepacking", "1")
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=onnxruntime_providers(prefer_gpu))
