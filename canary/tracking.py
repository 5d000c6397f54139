"""MLflow tracking: one MLflow run per retrain, and a registered model whose aliases mirror
serving: `champion` = the production version, `challenger` = the canary.

The store defaults to `sqlite:///STATE_DIR/mlflow.db` with artifacts under
`STATE_DIR/mlartifacts` (the full `mlflow` package: sqlite and aliases work without a server);
`tracking_uri` points it at a server instead. Every registered model version carries the
Triton version number as the tag `triton_version`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from common.files import private_dir

log = logging.getLogger(__name__)

EXPERIMENT = "northstar-retrain"
MODEL_NAME = "northstar-retrieval"
CHAMPION, CHALLENGER = "champion", "challenger"


class Tracker:
    def __init__(self, state_dir: str | Path, tracking_uri: str | None = None):
        self.state_dir = Path(state_dir).resolve()
        private_dir(self.state_dir)  # the registry decides champion/challenger: owner-only
        db = self.state_dir / "mlflow.db"
        self.uri = tracking_uri or f"sqlite:///{db}"
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        if tracking_uri is None and db.exists():
            os.chmod(db, 0o600)
        exp = self.client.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            location = (self.state_dir / "mlartifacts").as_uri() if tracking_uri is None else None
            self.experiment_id = self.client.create_experiment(
                EXPERIMENT, artifact_location=location
            )
        else:
            self.experiment_id = exp.experiment_id
        if tracking_uri is None:
            os.chmod(db, 0o600)

    # -------------------------------------------------------------------- runs

    def log_retrain(
        self,
        *,
        name: str,
        params: dict[str, Any],
        metrics: dict[str, float],
        artifacts: list[Path],
        tags: dict[str, str],
    ) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        rid = run.info.run_id
        try:
            flat = _flatten(params)
            self.client.log_batch(
                rid,
                params=[Param(k[:250], str(v)[:6000]) for k, v in flat.items()],
                metrics=[
                    Metric(k[:250], float(v), 0, 0)
                    for k, v in metrics.items()
                    if isinstance(v, (int, float)) and math.isfinite(float(v))
                ],
            )
            for path in artifacts:
                path = Path(path)
                if path.is_dir():
                    self.client.log_artifacts(rid, str(path), path.name)
                elif path.exists():
                    self.client.log_artifact(rid, str(path))
            self.client.set_terminated(rid, "FINISHED")
        except BaseException:
            self.client.set_terminated(rid, "FAILED")
            raise
        return rid

    # -------------------------------------------------------------------- registry

    def register(self, *, source: str, run_id: str | None, triton_version: int) -> str:
        try:
            self.client.get_registered_model(MODEL_NAME)
        except MlflowException:
            self.client.create_registered_model(MODEL_NAME)
        mv = self.client.create_model_version(
            MODEL_NAME, source=source, run_id=run_id, tags={"triton_version": str(triton_version)}
        )
        return str(mv.version)

    def set_alias(self, alias: str, version: str | None) -> None:
        if version is None:
            with contextlib.suppress(MlflowException):
                self.client.delete_registered_model_alias(MODEL_NAME, alias)
            return
        self.client.set_registered_model_alias(MODEL_NAME, alias, version)

    def alias(self, alias: str) -> dict[str, Any] | None:
        try:
            mv = self.client.get_model_version_by_alias(MODEL_NAME, alias)
        except MlflowException:
            return None
        return {"version": mv.version, "tags": dict(mv.tags), "run_id": mv.run_id}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def flat_metrics(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict as 'a.b.c' -> float (MLflow metric names)."""
    out = {}
    for k, v in _flatten(d, prefix).items():
        if isinstance(v, bool) or (isinstance(v, (int, float)) and math.isfinite(float(v))):
            out[k.replace("@", "_at_")] = float(v)
    return out
