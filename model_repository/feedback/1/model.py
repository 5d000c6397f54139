"""`feedback`: interaction ingest. All logic is in feedback/ingest.py (tested without
Triton); this file converts tensors and sends one response per request.

Acknowledgement: a response is sent only after the batch's events are durable in the
event log. A per-event reason (b"" = accepted) tells the client what was quarantined.
"""

import json

import triton_python_backend_utils as pb_utils

from feedback.events import EventError
from feedback.hook import event_log_location
from feedback.ingest import RequestOutcome, ingest, parse_request
from feedback.live import ingest_sink
from feedback.sink import EVENT_LOG_ENV
from online.config import online_store_url


def _error(message):
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    try:  # error codes exist in newer Python backends; INVALID_ARG maps to HTTP 400
        return (
            pb_utils.TritonError(message, code)
            if code is not None
            else pb_utils.TritonError(message)
        )
    except TypeError:
        return pb_utils.TritonError(message)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        where = event_log_location(params)
        if where is None:
            raise RuntimeError(
                f"feedback: no event log configured; set {EVENT_LOG_ENV} in the server's "
                "environment or the `event_log` parameter in config.pbtxt"
            )
        # With an online store (NORTHSTAR_ONLINE_STORE), acknowledged clicks also reach the
        # users' live features (feedback/live.py).
        self.sink = ingest_sink(where, online_store_url(params))

    def execute(self, requests):
        parsed = []
        for request in requests:
            try:
                parsed.append(parse_request(lambda name, r=request: _get(r, name)))
            except EventError as exc:
                parsed.append(exc)
        try:
            outcomes = ingest(self.sink, parsed)
        except Exception as exc:  # nothing acknowledged: every request fails, clients retry
            return [
                pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"event log: {exc}")
                )
                for _ in requests
            ]
        responses = []
        for outcome in outcomes:
            if isinstance(outcome, RequestOutcome):
                responses.append(
                    pb_utils.InferenceResponse(
                        [
                            pb_utils.Tensor("accepted", outcome.accepted),
                            pb_utils.Tensor("reason", outcome.reason),
                        ]
                    )
                )
            else:
                responses.append(
                    pb_utils.InferenceResponse(output_tensors=[], error=_error(str(outcome)))
                )
        return responses

    def finalize(self):
        self.sink.close()


def _get(request, name):
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()
