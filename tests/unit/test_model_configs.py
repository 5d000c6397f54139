"""Contract tests for what Triton reads: config.pbtxt vs the ONNX graph, routing state, Dockerfile.

Like Merlin Systems: parse the generated config.pbtxt as `ModelConfig` and
check names, dtypes and dims against the model it serves.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from serving import repository as layout
from serving.routing import RoutingState
from serving.testing import tiny_export

ROOT = Path(__file__).resolve().parents[2]
ONNX_TO_TRITON = {onnx.TensorProto.INT64: mc.TYPE_INT64, onnx.TensorProto.FLOAT: mc.TYPE_FP32}


@pytest.fixture(scope="module")
def exported():
    _, repo, res = tiny_export(k=10, overfetch=10)  # shared with other tests: read only
    return repo, res


def _parse(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def _graph_io(path: Path) -> dict[str, tuple[int, list]]:
    graph = onnx.load(str(path)).graph
    out = {}
    for v in [*graph.input, *graph.output]:
        t = v.type.tensor_type
        out[v.name] = (t.elem_type, [d.dim_value if d.dim_value else -1 for d in t.shape.dim])
    return out


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_retrieval_config_matches_the_onnx_graph(exported, target):
    repo, res = exported
    dims = layout.RetrievalDims.from_meta(layout.read_meta(repo, res.version))
    cfg = _parse(layout.to_pbtxt(layout.retrieval_config(dims, target=target, versions=[1])))
    io = _graph_io(layout.version_dir(repo, res.version) / layout.ONNX_FILE)
    declared = {t.name: t for t in [*cfg.input, *cfg.output]}
    assert set(declared) == set(io), "config names != graph names"
    assert cfg.max_batch_size > 0
    for name, (elem, shape) in io.items():
        assert declared[name].data_type == ONNX_TO_TRITON[elem], name
        assert shape[0] == -1, f"{name}: the graph's batch axis must be dynamic"
        assert list(declared[name].dims) == shape[1:], name  # Triton dims exclude the batch
    assert cfg.name == "retrieval"
    assert list(cfg.version_policy.specific.versions) == [1]
    assert cfg.HasField("dynamic_batching")  # the setting, not a latency: timing is benchmarked
    assert all(b <= cfg.max_batch_size for b in cfg.dynamic_batching.preferred_batch_size)
    assert cfg.instance_group[0].count >= 1
    for w in cfg.model_warmup:  # warmup inputs are the model's inputs, same dtype and dims
        assert w.batch_size <= cfg.max_batch_size
        for name, inp in w.inputs.items():
            assert inp.data_type == declared[name].data_type
            assert list(inp.dims) == list(declared[name].dims)
            assert inp.zero_data
    if target == "cpu":
        assert cfg.backend == "python" and not cfg.platform
        assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
        assert "intra_op_threads" in cfg.parameters
    else:
        assert cfg.platform == "onnxruntime_onnx"
        assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU


def test_the_exported_config_is_the_cpu_target_with_the_run_dims(exported):
    repo, res = exported
    cfg = layout.read_config(repo / "retrieval" / layout.CONFIG_FILE)
    assert layout.config_target(cfg) == "cpu"
    assert {t.name: list(t.dims) for t in cfg.output} == {"item_ids": [20], "scores": [20]}
    assert res.graph_k == 20 and res.k == 10


def test_gpu_target_can_ask_for_tensorrt_fp16():
    dims = layout.RetrievalDims(n_user_cats=4, history_len=20, k=200)
    serving = layout.RetrievalServing(tensorrt_fp16=True)
    cfg = _parse(
        layout.to_pbtxt(
            layout.retrieval_config(dims, target="gpu", versions=[3, 4], serving=serving)
        )
    )
    (acc,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert acc.name == "tensorrt" and acc.parameters["precision_mode"] == "FP16"
    assert list(cfg.version_policy.specific.versions) == [3, 4]
    assert layout.served_versions(layout.with_versions(cfg, [4])) == [4]
    json.loads(layout.to_json(cfg))  # the repository API's load(config=...) form


@pytest.mark.parametrize(
    ("n_items", "max_batch", "preferred"),
    [
        (None, 1024, [64, 256]),
        (100_000, 1024, [64, 256]),
        (1_000_000, 256, [64, 256]),
        (3_000_000, 64, [64]),
        (10**9, 1, []),
    ],
)
def test_a_big_catalogue_caps_the_batch_so_the_score_matrix_fits(n_items, max_batch, preferred):
    # (B, n_items) fp32 scores live at once before TopK: B * n_items * 4 <= 1 GiB.
    dims = layout.RetrievalDims(4, 20, 200)
    cfg = _parse(
        layout.to_pbtxt(layout.retrieval_config(dims, target="cpu", versions=[1], n_items=n_items))
    )
    assert cfg.max_batch_size == max_batch
    assert list(cfg.dynamic_batching.preferred_batch_size) == preferred
    assert all(w.batch_size <= max_batch for w in cfg.model_warmup)
    if n_items and max_batch > 1:  # one row is the floor, whatever it costs
        assert max_batch * n_items * 4 <= 1 << 30


def test_bad_config_requests_are_refused():
    dims = layout.RetrievalDims(4, 20, 200)
    with pytest.raises(ValueError, match="target"):
        layout.retrieval_config(dims, target="tpu", versions=[1])
    with pytest.raises(ValueError, match="version"):
        layout.retrieval_config(dims, target="cpu", versions=[])


def test_recommend_config_contract():
    cfg = _parse(layout.to_pbtxt(layout.recommend_config()))
    assert cfg.name == "recommend" and cfg.backend == "python" and cfg.max_batch_size > 0
    inputs = {t.name: t for t in cfg.input}
    assert (inputs["user_id"].data_type, list(inputs["user_id"].dims)) == (mc.TYPE_INT64, [1])
    assert inputs["k"].data_type == mc.TYPE_INT32 and inputs["k"].optional
    outputs = {t.name: (t.data_type, list(t.dims)) for t in cfg.output}
    assert outputs == {
        "item_ids": (mc.TYPE_INT64, [-1]),
        "scores": (mc.TYPE_FP32, [-1]),
        "model_version": (mc.TYPE_INT64, [1]),
        "request_id": (mc.TYPE_STRING, [1]),
        "cold_start": (mc.TYPE_BOOL, [1]),
    }
    assert cfg.HasField("dynamic_batching")
    assert int(cfg.parameters["default_k"].string_value) == 10


@pytest.mark.parametrize("rel", sorted(layout.example_configs()))
def test_committed_examples_are_what_the_generator_writes(rel):
    path = layout.SOURCE_REPO / rel
    assert path.exists(), f"{path}: run `python -m serving.repository`"
    assert _parse(path.read_text()) == _parse(layout.example_configs()[rel]), (
        f"{path} is stale: run `python -m serving.repository`"
    )


def test_committed_python_backends_exist():
    for rel in ("retrieval/model.py", "recommend/1/model.py", ".gitignore", "README.md"):
        assert (layout.SOURCE_REPO / rel).exists(), rel
    ignored = (layout.SOURCE_REPO / ".gitignore").read_text()
    for pattern in ("/retrieval/[0-9]*/", "*.onnx", "/recommend/state/"):
        assert pattern in ignored


# ------------------------------------------------------------------------- routing state


def test_routing_is_deterministic_and_close_to_the_percentage():
    r = RoutingState(production=1, canary=2, canary_percent=10)
    users = np.arange(100_000, dtype=np.int64)
    v = r.version_for(users)
    np.testing.assert_array_equal(v, r.version_for(users))
    assert 0.08 < (v == 2).mean() < 0.12
    shuffled = RoutingState(production=1, canary=2, canary_percent=10, salt=12345)
    assert not np.array_equal(v, shuffled.version_for(users))
    assert set(RoutingState(production=1, canary=2, canary_percent=0).version_for(users)) == {1}
    assert set(RoutingState(production=1, canary=2, canary_percent=100).version_for(users)) == {2}
    assert RoutingState(production=3).versions == (3,)
    assert RoutingState(production=3, canary=4, canary_percent=5).versions == (3, 4)


def test_routing_file_round_trip_and_errors(tmp_path):
    path = tmp_path / "state" / "routing.json"
    r = RoutingState(production=2, canary=3, canary_percent=25, salt=9)
    r.save(path)
    assert json.loads(path.read_text()) == {
        "production": 2,
        "canary": 3,
        "canary_percent": 25,
        "salt": 9,
    }
    assert RoutingState.load(path) == r
    for bad in (
        '{"canary": 3}',
        '{"production": 1, "canary_percent": 101}',
        "not json",
        '{"production": 1, "typo": 1}',
    ):
        path.write_text(bad)
        with pytest.raises(ValueError, match="routing"):
            RoutingState.load(path)


# ----------------------------------------------------------------------------- Dockerfile


def test_dockerfile_is_pinned_non_root_and_health_checked():
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    (base,) = [ln for ln in lines if ln.startswith("FROM ")]
    assert re.fullmatch(r"FROM nvcr\.io/nvidia/tritonserver:\d{2}\.\d{2}-py3", base), base
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^EXPOSE 8000 8001 8002$", text, re.M)
    assert "HEALTHCHECK" in text and "/v2/health/ready" in text
    assert "--model-control-mode=explicit" in text
    assert "--load-model=retrieval" in text and "--load-model=recommend" in text
    assert re.search(r"numpy==1\.", text), "the Python backend stub needs numpy < 2"
    for src in re.findall(r"^COPY (.+) \S+/?$", text.replace("\\\n", " "), re.M):
        for rel in src.split():
            assert (ROOT / rel).exists(), f"Dockerfile copies {rel}, which does not exist"


def test_dockerfile_locks_the_control_plane_without_baking_a_secret():
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    # The entrypoint adds the restricted-API flags from a run-time secret, or refuses.
    assert 'ENTRYPOINT ["python3", "-m", "serving.auth", "exec"]' in lines
    assert "serving/auth.py" in text.replace("\\\n", " ")
    baked = [
        ln
        for ln in lines
        if ln.startswith(("ENV ", "ARG ", "LABEL "))
        and ("ADMIN_KEY=" in ln.replace(" ", "") and "ADMIN_KEY_FILE" not in ln)
    ]
    assert not baked, f"a secret must not be baked into the image: {baked}"
    assert "--http-restricted-api" not in text  # never a literal key in the image
