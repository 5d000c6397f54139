"""`recommend`: the front door. Online features -> routing -> `retrieval` -> unseen top-k.

All logic lives in serving/recommender.py (tested without Triton); this file
only converts between Triton tensors and numpy and makes the BLS calls, or, with
`retrieval_call: inline` (cpu target), runs retrieval's graph here (serving/inline.py).
"""

import contextlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from feedback.hook import impression_logger
from models.features import OUTPUT_NAMES, graph_input_names
from serving.backend import InputError
from serving.core_slots import server_folder
from serving.inline import InlineRetrieval, available_cores, inline_threads, resolve_retrieval_call
from serving.live import online_store_url, open_online_store
from serving.metrics import NO_VERSION, BatchMetrics, TritonMetrics
from serving.recommender import ImpressionSink, Recommender, RequestLimits, RequestResult


def _input(request, name):
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()


def _error(message, code=None):
    # INVALID_ARG (HTTP 400) for bad requests; backends without error codes get a plain error.
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        model_dir = Path(args["model_repository"])  # .../recommend
        self.retrieval_model = params.get("retrieval_model", "retrieval")
        # NORTHSTAR_ONLINE_STORE (or the `online_store` parameter): live features from the
        # shared store (serving/live.py); without it, each version's snapshot file.
        store_url = online_store_url(params)
        self.recommender = Recommender(
            model_dir.parent,
            default_k=int(params.get("default_k", 10)),
            epsilon=float(params.get("exploration_epsilon", 0.0)),
            store=open_online_store(store_url) if store_url else None,
            limits=RequestLimits.from_params(params),
        )
        # Ready means "can answer": a repository whose production version cannot be served
        # (routing.json, its meta.json or its features unreadable) fails this load, so the
        # server never reports ready in that state. The error names the file.
        try:
            self.recommender.check_servable()
        except Exception as exc:
            raise RuntimeError(f"recommend cannot serve production: {exc}") from exc
        # NORTHSTAR_EVENT_LOG (or the `event_log` parameter): impressions are durable before
        # the responses go out; without either, the no-op sink keeps serving working.
        self.impressions = impression_logger(params) or ImpressionSink()
        self.invalid_arg = getattr(pb_utils.TritonError, "INVALID_ARG", None)
        # Per-version requests, errors and latency on Triton's metrics endpoint: what the
        # canary's guardrails read (serving/metrics.py).
        self.metrics = TritonMetrics(pb_utils)
        # A torn or missing state file keeps its last good copy in service; say so loudly.
        self.recommender.state.on_error.append(self._state_error)
        self.inline = None
        self.retrieve = self._retrieve
        self.retrieval_call = resolve_retrieval_call(
            params.get("retrieval_call", "auto"), model_dir.parent
        )
        if self.retrieval_call == "inline":
            instances = sum(int(g.get("count", 1)) for g in config.get("instance_group", []))
            self.inline = InlineRetrieval(
                model_dir.parent,
                intra_op_threads=int(params.get("retrieval_threads") or 0)
                or inline_threads(instances),
                solo_threads=int(params.get("solo_threads") or 0) or available_cores(),
                slots_folder=server_folder(config["name"]),
                instances=instances,
            )
            self.retrieve = self.inline
            self.recommender.state.on_routing.append(self.inline.follow)
            try:  # the routed versions' sessions, before the first request needs them
                self.recommender.begin()
                self.inline.warm(self.recommender.state.routing.versions)
            except Exception as exc:  # no routing yet: versions load on first use
                logging.getLogger(__name__).warning("inline retrieval not warmed: %s", exc)

    def execute(self, requests):
        started = time.perf_counter()
        try:
            max_k = self.recommender.begin()
        except Exception as exc:  # no routing state or metadata: every request gets the reason
            lost = BatchMetrics()
            lost.requests[NO_VERSION] += len(requests)
            lost.errors[(NO_VERSION, "no_state")] += len(requests)
            self._record(lost)
            return [
                pb_utils.InferenceResponse(output_tensors=[], error=_error(str(exc)))
                for _ in requests
            ]
        parsed = []
        for request in requests:
            try:
                parsed.append(
                    self.recommender.parse(_input(request, "user_id"), _input(request, "k"), max_k)
                )
            except InputError as exc:
                parsed.append(exc)
        users = sum(len(p.user_ids) for p in parsed if not isinstance(p, InputError))
        with self.inline.batch(users) if self.inline is not None else contextlib.nullcontext():
            batch = self.recommender.run(parsed, self.retrieve)

        # ---- impression-log hook ------------------------------------------------------
        # Once per batch: every served (request_id, user_id, item_id, position, score,
        # model_version, propensity) row, durable in the event log before the responses go.
        if len(batch.impressions):
            self.impressions.write(batch.impressions)

        responses = [self._response(r) for r in batch.results]
        self._record(batch.observe_latency(time.perf_counter() - started))
        return responses

    def _state_error(self, path, _message):  # serving.recommender has logged it
        try:
            self.metrics.state_error(str(Path(path).relative_to(self.recommender.state.repo)))
        except Exception as exc:  # a metrics failure must never fail a request
            logging.getLogger(__name__).warning("state-file metric not recorded: %s", exc)

    def _record(self, metrics):
        try:
            self.metrics.record(metrics)
        except Exception as exc:  # a metrics failure must never fail a request
            logging.getLogger(__name__).warning("recommend metrics not recorded: %s", exc)

    def _response(self, result):
        if isinstance(result, InputError):
            return pb_utils.InferenceResponse(
                output_tensors=[], error=_error(str(result), self.invalid_arg)
            )
        if not isinstance(result, RequestResult):
            return pb_utils.InferenceResponse(output_tensors=[], error=_error(str(result)))
        return pb_utils.InferenceResponse(
            [
                pb_utils.Tensor("item_ids", result.item_ids),
                pb_utils.Tensor("scores", result.scores),
                pb_utils.Tensor("model_version", result.model_version),
                pb_utils.Tensor("request_id", result.request_id),
                pb_utils.Tensor("cold_start", result.cold_start),
            ]
        )

    def _retrieve(self, version, features):
        """One BLS request per chunk of retrieval's max batch (one chunk in practice)."""
        meta = self.recommender.state.meta(version)
        max_batch = int(meta["max_batch_size"])
        feeds = features.feeds(graph_input_names(meta))
        n = len(features.user_index)
        ids, scores = [], []
        for start in range(0, n, max_batch):
            inputs = [
                pb_utils.Tensor(name, np.ascontiguousarray(arr[start : start + max_batch]))
                for name, arr in feeds.items()
            ]
            response = pb_utils.InferenceRequest(
                model_name=self.retrieval_model,
                model_version=int(version),
                requested_output_names=list(OUTPUT_NAMES),
                inputs=inputs,
            ).exec()
            if response.has_error():
                raise RuntimeError(response.error().message())
            ids.append(pb_utils.get_output_tensor_by_name(response, "item_ids").as_numpy())
            scores.append(pb_utils.get_output_tensor_by_name(response, "scores").as_numpy())
        return np.concatenate(ids), np.concatenate(scores)
