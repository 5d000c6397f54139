"""A real tritonserver for the serving tests: one per session, on free ports.

Like Merlin Systems' `run_triton_server`: export a tiny run into a temporary
model repository, start the server, poll readiness while checking
the process is alive, and stop it in `finally`. Nothing about Triton is mocked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from serving import repository as layout
from serving.publish import ExportResult
from serving.server import ServerConfig, TritonServer
from serving.testing import tiny_export

# Small K so the tiny catalogue (80 items) still leaves room for over-fetching.
K = 10
OVERFETCH = 10


@dataclass(frozen=True)
class Served:
    repo: Path
    run: Path
    grpc_url: str
    http_url: str
    metrics_url: str
    server: TritonServer
    exported: ExportResult

    @property
    def version(self) -> int:
        return self.exported.version


def _serve(root: Path, retrieval_call: str | None = None):
    # A copy of the process-wide tiny export (dynamo exporter, k=10 + 10 over-fetched).
    run, repo, exported = tiny_export(root / "model_repository", k=K, overfetch=OVERFETCH)
    if retrieval_call is not None:
        layout.write_config(
            repo, layout.recommend_config(layout.RecommendServing(retrieval_call=retrieval_call))
        )
    server = TritonServer(
        ServerConfig.on_free_ports(
            str(repo),
            log_file=str(root / "tritonserver.log"),
        )
    )
    server.start()  # raises with the log tail if the server dies or never gets ready
    try:
        yield Served(
            repo, run, server.grpc_url, server.http_url, server.metrics_url, server, exported
        )
    finally:
        server.stop()


@pytest.fixture(scope="session")
def served(tmp_path_factory) -> Served:
    """The default export: on this cpu target `recommend` runs retrieval's graph inline."""
    yield from _serve(tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="session")
def served_bls(tmp_path_factory) -> Served:
    """`recommend` calling `retrieval` through Triton (BLS), as on the gpu target."""
    yield from _serve(tmp_path_factory.mktemp("serving-bls"), retrieval_call="bls")


@pytest.fixture(params=["inline", "bls"])
def served_each(request) -> Served:
    """Both ways `recommend` reaches `retrieval`, for tests of the path they share."""
    return request.getfixturevalue("served" if request.param == "inline" else "served_bls")
