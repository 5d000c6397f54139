"""An int8 item table for the retrieval graph: the same inputs and outputs, a quarter of the bytes.

On a large catalogue one batch-1 call of the fp32 graph streams the whole table through a
GEMV, and the memory bandwidth sets its cost. Here the coarse pass reads an int8 copy:

    user tower [-> a 1 appended, against the bias column] -> x the table's column scales
    -> per-row symmetric quantisation (uint8, zero point 128: onnxruntime's u8s8 kernel)
    -> MatMulInteger against the int8 table (one scale per column) -> TopK on the int32
    dot (rerank x graph_k candidates)
    -> exact fp32 rescoring of those candidates only (Gather of their fp32 rows)
    [+ their bias] -> TopK(graph_k) -> raw ids

Column scales fold into the user vector, so the int32 dot is the score up to a positive
factor per row and TopK reads it directly: no float pass over the (B, N) scores.

Per-row quantisation of u (rather than DynamicQuantizeLinear's one scale per batch) keeps
a user's answer independent of who else is in the batch. The rescoring pass makes the
returned scores the fp32 scores, so what the overlap check at export measures is only
which candidates the int8 pass let through.

Built with onnx.helper around the user tower's own exported graph; nothing here imports
torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import compose
from onnx import helper as h
from onnx import numpy_helper as nh

from models.features import OUTPUT_ITEM_IDS, OUTPUT_SCORES

USER_VEC = "user_vec"  # the user tower graph's output: FP32 [B, d]
# Above this many bytes of initializers the graph keeps them in a side file (protobuf: 2 GB).
_EXTERNAL_DATA_BYTES = 1 << 30


def quantize_columns(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) fp32 -> (int8 (N, D), scale (D,) fp32): symmetric, one scale per column."""
    table = np.asarray(table, dtype=np.float32)
    scale = np.abs(table).max(axis=0) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)  # an all-zero column stays 0
    q = np.clip(np.rint(table / scale[None, :]), -127, 127).astype(np.int8)
    return q, scale


def int8_head(
    item_embeddings: np.ndarray,
    raw_item_ids: np.ndarray,
    graph_k: int,
    *,
    item_bias: np.ndarray | None = None,
    rerank: int = 2,
    opset: int = 18,
):
    """The scoring half as an onnx.ModelProto: USER_VEC (B, d) -> item_ids, scores (B, graph_k).

    rerank: the int8 pass keeps rerank x graph_k candidates, rescored exactly in fp32; 0 keeps
    graph_k and returns the int8 pass's approximate scores (no fp32 table in the graph).
    """

    emb = np.ascontiguousarray(item_embeddings, dtype=np.float32)
    n, d = emb.shape
    if not 0 < graph_k <= n:
        raise ValueError(f"graph_k={graph_k}: expected 0 < graph_k <= n_items={n}")
    # The bias, when there is one, is one more column: the int8 pass ranks by u.e + bias.
    table = (
        emb if item_bias is None else np.hstack([emb, np.asarray(item_bias, np.float32)[:, None]])
    )
    q, col_scale = quantize_columns(table)
    cand = min(n, max(graph_k, rerank * graph_k)) if rerank > 0 else graph_k
    inits = [
        nh.from_array(np.ascontiguousarray(q.T), "items_q_t"),  # (D, N) int8
        nh.from_array(col_scale, "col_scale"),  # (D,)
        nh.from_array(np.asarray(raw_item_ids, dtype=np.int64), "raw_item_ids"),
        nh.from_array(np.array([1], dtype=np.int64), "axis1"),
        nh.from_array(np.array([2], dtype=np.int64), "axis2"),
        nh.from_array(np.array([0, 0, 0, 1], dtype=np.int64), "pad_one"),
        nh.from_array(np.array(1.0, dtype=np.float32), "one"),
        nh.from_array(np.array(1e-12, dtype=np.float32), "eps"),
        nh.from_array(np.array(127.0, dtype=np.float32), "c127"),
        nh.from_array(np.array(128.0, dtype=np.float32), "c128"),
        nh.from_array(np.array(128, dtype=np.uint8), "zp128"),
        nh.from_array(np.array([cand], dtype=np.int64), "k_cand"),
        nh.from_array(np.array([graph_k], dtype=np.int64), "k_out"),
    ]
    nodes = []
    u = USER_VEC
    if item_bias is not None:  # (B, d) -> (B, d + 1), a 1 against the bias column
        nodes.append(h.make_node("Pad", [USER_VEC, "pad_one", "one"], ["u_aug"]))
        u = "u_aug"
    nodes += [
        # Folding the column scales into u leaves the int32 dot proportional to the score,
        # with a positive factor per row (v_scale): TopK runs on the int32 output directly.
        h.make_node("Mul", [u, "col_scale"], ["v"]),
        h.make_node("Abs", ["v"], ["v_abs"]),
        # ReduceMax takes its axes as an input from opset 18, as an attribute before.
        h.make_node("ReduceMax", ["v_abs", "axis1"], ["v_max"], keepdims=1)
        if opset >= 18
        else h.make_node("ReduceMax", ["v_abs"], ["v_max"], keepdims=1, axes=[1]),
        h.make_node("Max", ["v_max", "eps"], ["v_max_pos"]),
        h.make_node("Div", ["v_max_pos", "c127"], ["v_scale"]),  # (B, 1)
        h.make_node("Div", ["v", "v_scale"], ["v_div"]),
        h.make_node("Round", ["v_div"], ["v_round"]),
        # uint8 around a zero point of 128: onnxruntime's fast u8s8 kernel, one scale per
        # row so a user's answer does not depend on who else is in the batch.
        h.make_node("Add", ["v_round", "c128"], ["v_shift"]),
        h.make_node("Cast", ["v_shift"], ["v_q"], to=T.UINT8),
        h.make_node("MatMulInteger", ["v_q", "items_q_t", "zp128"], ["dot_i32"]),  # (B, N)
    ]
    if rerank > 0:
        inits.append(nh.from_array(emb, "items_f32"))  # (N, d): only candidates' rows are read
        nodes += [
            h.make_node("TopK", ["dot_i32", "k_cand"], ["_coarse_top", "cand_idx"]),
            h.make_node("Gather", ["items_f32", "cand_idx"], ["cand_emb"], axis=0),  # (B, C, d)
            h.make_node("Unsqueeze", [USER_VEC, "axis2"], ["u_col"]),  # (B, d, 1)
            h.make_node("MatMul", ["cand_emb", "u_col"], ["cand_dot3"]),  # (B, C, 1)
            h.make_node("Squeeze", ["cand_dot3", "axis2"], ["cand_dot"]),  # (B, C)
        ]
        exact = "cand_dot"
        if item_bias is not None:
            inits.append(nh.from_array(np.asarray(item_bias, dtype=np.float32), "item_bias"))
            nodes += [
                h.make_node("Gather", ["item_bias", "cand_idx"], ["cand_bias"], axis=0),
                h.make_node("Add", ["cand_dot", "cand_bias"], ["cand_score"]),
            ]
            exact = "cand_score"
        nodes += [
            h.make_node("TopK", [exact, "k_out"], [OUTPUT_SCORES, "top_pos"]),
            h.make_node("GatherElements", ["cand_idx", "top_pos"], ["top_idx"], axis=1),
        ]
    else:
        nodes += [
            h.make_node("TopK", ["dot_i32", "k_out"], ["top_i32", "top_idx"]),
            h.make_node("Cast", ["top_i32"], ["top_f"], to=T.FLOAT),
            h.make_node("Mul", ["top_f", "v_scale"], [OUTPUT_SCORES]),
        ]
    nodes.append(h.make_node("Gather", ["raw_item_ids", "top_idx"], [OUTPUT_ITEM_IDS], axis=0))
    graph = h.make_graph(
        nodes,
        "int8_retrieval_head",
        [h.make_tensor_value_info(USER_VEC, T.FLOAT, ["batch", d])],
        [
            h.make_tensor_value_info(OUTPUT_ITEM_IDS, T.INT64, ["batch", graph_k]),
            h.make_tensor_value_info(OUTPUT_SCORES, T.FLOAT, ["batch", graph_k]),
        ],
        inits,
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])


def write_int8_graph(
    user_tower_path: str | Path,
    path: str | Path,
    item_embeddings: np.ndarray,
    raw_item_ids: np.ndarray,
    graph_k: int,
    *,
    item_bias: np.ndarray | None = None,
    rerank: int = 2,
) -> Path:
    """model.onnx for an int8 version: the user tower graph joined to `int8_head`."""

    tower = onnx.load(str(user_tower_path))
    opset = next(o.version for o in tower.opset_import if o.domain in ("", "ai.onnx"))
    head = int8_head(
        item_embeddings, raw_item_ids, graph_k, item_bias=item_bias, rerank=rerank, opset=opset
    )
    head.ir_version = tower.ir_version
    # The tower may import other domains (the dynamo exporter's pkg.* functions): the head
    # only needs the default one, merged with whatever version the tower declared.
    merged = compose.merge_models(tower, head, io_map=[(USER_VEC, USER_VEC)])
    path = Path(path)
    n_bytes = sum(t.ByteSize() for t in merged.graph.initializer)
    if n_bytes > _EXTERNAL_DATA_BYTES:
        onnx.save(merged, str(path), save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save(merged, str(path))
    return path
