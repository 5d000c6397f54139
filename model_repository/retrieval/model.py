"""`retrieval` on the cpu target: the version's model.onnx through onnxruntime.

pytriton's tritonserver has no onnxruntime backend, so this Python model runs
the same graph the gpu target serves natively. `northstar export` copies this
file into every version folder. The requests of a dynamic batch are
concatenated and run as ONE session.run (serving/backend.py: RetrievalRunner).
"""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from serving.backend import InputError, RetrievalRunner


def _error(message, code=None):
    # INVALID_ARG (HTTP 400) for bad requests; backends without error codes get a plain error.
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.runner = RetrievalRunner(
            Path(args["model_repository"]) / args["model_version"],
            intra_op_threads=int(params.get("intra_op_threads") or 0),
            allow_spinning=params.get("allow_spinning", "0") == "1",
        )
        self.invalid_arg = getattr(pb_utils.TritonError, "INVALID_ARG", None)

    def execute(self, requests):
        feeds, errors = [], {}
        for i, request in enumerate(requests):
            tensors = {}
            for name in self.runner.input_names:
                t = pb_utils.get_input_tensor_by_name(request, name)
                tensors[name] = None if t is None else t.as_numpy()
            try:
                feeds.append(self.runner.validate(tensors))
            except InputError as exc:  # this request fails; the rest of the batch still runs
                errors[i] = str(exc)
        outputs = iter(self.runner.run(feeds))
        responses = []
        for i in range(len(requests)):
            if i in errors:
                responses.append(
                    pb_utils.InferenceResponse(
                        output_tensors=[], error=_error(errors[i], self.invalid_arg)
                    )
                )
                continue
            ids, scores = next(outputs)
            responses.append(
                pb_utils.InferenceResponse(
                    [pb_utils.Tensor("item_ids", ids), pb_utils.Tensor("scores", scores)]
                )
            )
        return responses
