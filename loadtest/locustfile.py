"""Locust users for the Triton-served recommender, on tritonclient (gRPC and HTTP).

    locust -f loadtest/locustfile.py --config loadtest/locust.conf TritonGrpcUser
    python -m loadtest.run            # starts a server, runs this headless, writes reports

Neither user is an HttpUser: each holds a tritonclient InferenceServerClient and fires
`environment.events.request` itself, like locust's examples/grpc/grpc_user.py.

Tasks, by weight:
  recommend  one user per request, the front door clients call;
  retrieval  a batch of users' online features straight to `retrieval`;
  feedback   a click on an item of the user's last slate, to the `feedback` model;
             skipped (and reported once) when the server has no `feedback` model loaded.

User ids are drawn Zipf-like from the known users (the repository's production feature
snapshot, or a users parquet) plus a share of unknown ids (cold starts), see users.py.

Several servers (replicas on one repository): `--grpc-url a:8001,b:8001` (and `--http-url`
likewise). Each simulated user holds one client per server and sends each request to the
next one in turn; a server that cannot be reached is skipped for a second and the request
goes to the next one. Those retries are not failures: they are counted per server and
reported when the run ends (log line "failover: ...", and `failover_counts()`).

Every answer is checked (loadtest/answers.py): a `recommend` slate must hold k distinct
item ids, none the user has already seen, and a `retrieval` row its top items in score
order; with --catalogue, every id must be in the catalogue. A wrong answer is a failed
request. When the run ends the log says how many answers were checked, how many were
wrong, and how many slates were short of k because the user's seen items used up the
over-fetch ("answers checked: ...").

Thresholds (`make loadtest`): when the run ends, a p99 of `recommend` above --max-p99-ms
or a failure ratio above --max-fail-ratio sets the exit code to 1 (locust's
stop_on_threshold.py). Tests turn the p99 threshold off and judge answers, not speed.

gevent (measured here): tritonclient.grpc blocks the event loop unless
`grpc.experimental.gevent.init_gevent()` runs before any channel exists, and with it the
process hangs after the summary, deaf to SIGTERM. So an `events.quit` listener closes the
CSV files and leaves with `os._exit(code)`. Run Locust under a hard timeout regardless.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import logging
import os
import random
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # before tritonclient.grpc opens any channel

import numpy as np  # noqa: E402
from locust import User, between, events  # noqa: E402
from locust import task as locust_task  # noqa: E402
from locust.stats import (  # noqa: E402
    PERCENTILES_TO_REPORT,
    StatsCSV,
    StatsCSVFileWriter,
)

# after locust, whose import monkey-patches the standard library for gevent
from tritonclient import grpc as triton_grpc  # noqa: E402
from tritonclient import http as triton_http  # noqa: E402

from feedback.ingest import INPUTS as _FEEDBACK_INPUTS  # noqa: E402
from loadtest.answers import check_recommend, check_retrieval  # noqa: E402
from loadtest.thresholds import threshold_failures  # noqa: E402
from loadtest.users import UserSampler, known_user_ids, production_snapshot  # noqa: E402
from models.features import INPUT_HISTORY_TS, INPUT_NAMES, input_names  # noqa: E402
from models.snapshot import UserFeatures  # noqa: E402
from serving import repository as layout  # noqa: E402
from serving.client import split_urls, unreachable  # noqa: E402
from serving.routing import RoutingState  # noqa: E402

log = logging.getLogger("northstar.locust")

RECOMMEND, RETRIEVAL, FEEDBACK = "recommend", "retrieval", "feedback"
_REC_OUTPUTS = ("item_ids", "scores", "model_version", "request_id", "cold_start")


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    g = parser.add_argument_group("northstar")
    g.add_argument(
        "--grpc-url",
        default="localhost:8001",
        env_var="NORTHSTAR_GRPC_URL",
        help="host:port, or several comma-separated: round-robin with failover",
    )
    g.add_argument(
        "--http-url",
        default="localhost:8000",
        env_var="NORTHSTAR_HTTP_URL",
        help="host:port, or several comma-separated: round-robin with failover",
    )
    g.add_argument(
        "--repo",
        default="model_repository",
        env_var="NORTHSTAR_REPO",
        help="model repository: known users and their features (production snapshot)",
    )
    g.add_argument(
        "--users-parquet",
        default="",
        env_var="NORTHSTAR_USERS",
        help="known users from a parquet with a user_id column instead of the snapshot",
    )
    g.add_argument("--zipf-a", type=float, default=0.8, help="P(rank r) ∝ r**-a")
    g.add_argument("--unknown-share", type=float, default=0.05, help="share of cold-start ids")
    g.add_argument("--k", type=int, default=10, help="items per recommend request")
    g.add_argument("--retrieval-batch", type=int, default=64, help="users per retrieval request")
    g.add_argument("--max-p99-ms", type=float, default=500.0, help="recommend p99 threshold")
    g.add_argument("--max-fail-ratio", type=float, default=0.01, help="failure ratio threshold")
    g.add_argument("--timeout-s", type=float, default=30.0, help="per-request client timeout")
    g.add_argument(
        "--catalogue",
        default="",
        env_var="NORTHSTAR_CATALOGUE",
        help=".npy of the served catalogue's raw item ids: an answer outside it is a failure",
    )
    g.add_argument(
        "--request-log",
        default="",
        env_var="NORTHSTAR_REQUEST_LOG",
        help="CSV of every request (ts, name, ms, ok): exact percentiles per minute (soak)",
    )


# ----------------------------------------------------------------------------- workload


@dataclass
class Workload:
    """What every simulated user shares: the id sampler and, if known, the features."""

    sampler: object  # loadtest.users.UserSampler
    snapshot: object | None  # models.snapshot.FeatureSnapshot: features for `retrieval`
    version: int | None = None  # the version whose snapshot that is (seen items per user)
    catalogue: np.ndarray | None = None  # sorted raw item ids, when --catalogue is given

    @classmethod
    def from_options(cls, options) -> Workload:
        snapshot = version = catalogue = None
        try:
            snapshot = production_snapshot(options.repo)
            version = RoutingState.load(layout.routing_path(options.repo)).production
        except (FileNotFoundError, ValueError, KeyError) as exc:
            log.warning(
                "no feature snapshot in %s (%s): retrieval sends zero features", options.repo, exc
            )
        if options.users_parquet:
            known = known_user_ids(users=options.users_parquet)
        elif snapshot is not None:
            known = snapshot.user_ids
        else:
            known = np.zeros(0, dtype=np.int64)
        share = options.unknown_share if len(known) else 1.0
        sampler = UserSampler.build(known, zipf_a=options.zipf_a, unknown_share=share)
        if options.catalogue:
            catalogue = np.unique(np.load(options.catalogue).astype(np.int64))
        return cls(sampler, snapshot, version, catalogue)

    def seen(self, user_id: int, version: int) -> np.ndarray | None:
        """The user's seen items in the snapshot of `version`; None where that is not the
        snapshot loaded here (another version may know more history)."""
        if self.snapshot is None or version != self.version:
            return None
        return self.snapshot.lookup(np.asarray([user_id])).seen[0]

    def features(
        self, user_ids: np.ndarray, dims: tuple[int, int], names: tuple[str, ...] = INPUT_NAMES
    ) -> dict[str, np.ndarray]:
        """`retrieval` inputs `names` for these users; zeros (valid everywhere: row 0, unknown
        categories, empty history) without a snapshot."""
        n = len(user_ids)
        if self.snapshot is None:
            c, h = dims
            zeros = UserFeatures(
                np.zeros((n, 1), np.int64),
                np.zeros((n, c), np.int64),
                np.zeros((n, h), np.int64),
                np.zeros(n, bool),
                [],
            )
            return zeros.feeds(names)
        return self.snapshot.lookup(user_ids).feeds(names)


_workload: Workload | None = None


def workload(environment) -> Workload:
    global _workload
    if _workload is None:
        _workload = Workload.from_options(environment.parsed_options)
    return _workload


# ----------------------------------------------------------------------------- users


class _TritonUser(User):
    """Shared tasks; subclasses pick the tritonclient module and the URL."""

    abstract = True
    wait_time = between(0.0, 0.01)
    protocol = ""

    def __init__(self, environment):
        super().__init__(environment)
        opts = environment.parsed_options
        self.opts = opts
        self.rng = np.random.default_rng(random.getrandbits(32))
        self.work = workload(environment)
        # One client per server; `client` (the first) answers the metadata questions.
        self.clients = [self._make_client(u) for u in split_urls(self._urls())]
        self.client = self.clients[0]
        self._turn = random.randrange(len(self.clients))
        self._down_until = [0.0] * len(self.clients)
        self.last_slate: tuple[int, str, np.ndarray] | None = None  # user, request id, items
        self.feedback_ready = False
        self.retrieval_dims = (0, 0)
        self.retrieval_inputs = INPUT_NAMES
        self.graph_k = 0  # candidates per row `retrieval` returns

    # -- protocol specifics ---------------------------------------------------------
    def _urls(self) -> str:
        raise NotImplementedError

    def _make_client(self, url: str):
        raise NotImplementedError

    def _infer_on(self, client, model: str, inputs, outputs):
        raise NotImplementedError

    def _infer(self, model: str, inputs, outputs):
        """On the next server in turn; one that cannot be reached is skipped for DOWN_S and
        the request goes to the next (counted in _failovers, not a failure)."""
        n = len(self.clients)
        if n == 1:
            return self._infer_on(self.client, model, inputs, outputs)
        self._turn = (self._turn + 1) % n
        order = [(self._turn + i) % n for i in range(n)]
        now = time.monotonic()
        order.sort(key=lambda i: self._down_until[i] > now)  # stable: down ones last
        last: Exception | None = None
        for i in order:
            try:
                result = self._infer_on(self.clients[i], model, inputs, outputs)
            except Exception as exc:
                if not unreachable(exc):
                    raise
                self._down_until[i] = time.monotonic() + DOWN_S
                _failovers[self._url_of(i)] += 1
                last = exc
                continue
            self._down_until[i] = 0.0
            return result
        assert last is not None
        raise last

    def _url_of(self, i: int) -> str:
        return split_urls(self._urls())[i]

    # -- lifecycle -----------------------------------------------------------------
    def on_start(self) -> None:
        for c in self.clients:  # the first server that answers says what is served
            self.client = c
            with contextlib.suppress(Exception):
                if c.is_server_live():
                    break
        try:
            self.feedback_ready = bool(self.client.is_model_ready(FEEDBACK))
        except Exception:  # an old server, or no such model: same answer
            self.feedback_ready = False
        if not self.feedback_ready:
            _warn_once("the server has no ready `feedback` model: the feedback task is skipped")
            self.tasks = [t for t in self.tasks if t is not _TritonUser.feedback]
        # Metadata, not the model config: the config API is for the operator (admin key).
        meta = self._metadata(RETRIEVAL)
        by_name = {i["name"]: i for i in meta.get("inputs", [])}
        self.retrieval_dims = (
            int(by_name["user_cats"]["shape"][-1]),
            int(by_name["history"]["shape"][-1]),
        )
        # Three inputs, or four where the served graphs read time gaps (`history_ts`).
        self.retrieval_inputs = input_names(INPUT_HISTORY_TS in by_name)
        outs = {o["name"]: o for o in meta.get("outputs", [])}
        self.graph_k = int(outs["item_ids"]["shape"][-1])

    def on_stop(self) -> None:
        for c in self.clients:
            c.close()

    # -- tasks ---------------------------------------------------------------------
    @locust_task(10)
    def recommend(self) -> None:
        uid = int(self.work.sampler.sample(1, self.rng)[0])
        inputs = [
            self._input("user_id", np.array([[uid]], dtype=np.int64), "INT64"),
            self._input("k", np.array([[self.opts.k]], dtype=np.int32), "INT32"),
        ]
        k = self.opts.k

        def check(result) -> str | None:
            version = int(result.as_numpy("model_version").reshape(-1)[0])
            seen = self.work.seen(uid, version)
            return check_recommend(
                result.as_numpy("item_ids")[0],
                k=k,
                graph_k=self.graph_k,
                seen=seen,
                catalogue=self.work.catalogue,
                # A server that takes feedback learns seen items the snapshot lacks.
                seen_is_all=not self.feedback_ready,
            )

        result = self._call(RECOMMEND, RECOMMEND, inputs, _REC_OUTPUTS, check)
        if result is not None:
            items = result.as_numpy("item_ids")[0]
            if (items >= 0).sum() < k:  # right (seen items used the over-fetch), but counted
                _answers[RECOMMEND, "short"] += 1
            rid = result.as_numpy("request_id").reshape(-1)[0]
            rid = rid.decode() if isinstance(rid, bytes) else str(rid)
            self.last_slate = (uid, rid, items[items >= 0])

    @locust_task(1)
    def retrieval(self) -> None:
        b = self.opts.retrieval_batch
        feats = self.work.features(
            self.work.sampler.sample(b, self.rng), self.retrieval_dims, self.retrieval_inputs
        )
        inputs = [self._input(n, a, "INT64") for n, a in feats.items()]

        def check(result) -> str | None:
            return check_retrieval(
                result.as_numpy("item_ids"),
                result.as_numpy("scores"),
                batch=b,
                graph_k=self.graph_k,
                catalogue=self.work.catalogue,
            )

        self._call(RETRIEVAL, f"{RETRIEVAL}[{b}]", inputs, ("item_ids", "scores"), check)

    @locust_task(3)
    def feedback(self) -> None:
        if not self.feedback_ready or self.last_slate is None or not len(self.last_slate[2]):
            return
        uid, rid, items = self.last_slate
        item = int(items[min(int(self.rng.geometric(0.3)) - 1, len(items) - 1)])
        row = {
            "event_id": np.array([[uuid.uuid4().hex.encode()]], dtype=object),
            "user_id": np.array([[uid]], dtype=np.int64),
            "item_id": np.array([[item]], dtype=np.int64),
            "type": np.array([[b"click"]], dtype=object),
            "value": np.array([[1.0]], dtype=np.float32),
            "ts": np.array([[time.time()]], dtype=np.float64),
            "request_id": np.array([[rid.encode()]], dtype=object),
        }
        inputs = [self._input(n, row[n], dt) for n, dt in _FEEDBACK_INPUTS.items()]
        result = self._call(FEEDBACK, FEEDBACK, inputs, ("accepted", "reason"))
        if result is not None and not bool(result.as_numpy("accepted").reshape(-1)[0]):
            reason = result.as_numpy("reason").reshape(-1)[0]
            _warn_once(f"feedback event not accepted: {reason!r}")

    # -- helpers -------------------------------------------------------------------
    def _input(self, name: str, arr: np.ndarray, dtype: str):
        t = self.mod.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        return t

    def _call(self, model: str, name: str, inputs, outputs, check=None):
        """One timed inference; fires the request event; the result, or None on failure.
        `check(result)` says why an answer is wrong (None: right): a wrong one is a failure."""
        start = time.perf_counter()
        result, exc, length = None, None, 0
        try:
            result = self._infer(model, inputs, [self.mod.InferRequestedOutput(o) for o in outputs])
            length = sum(result.as_numpy(o).nbytes for o in outputs)
        except Exception as e:  # tritonclient raises InferenceServerException and friends
            exc, result = e, None
        if result is not None and check is not None:
            _answers[name, "checked"] += 1
            if (why := check(result)) is not None:
                _answers[name, "wrong"] += 1
                _warn_once(f"wrong answer from {name}: {why}")
                exc, result = WrongAnswer(why), None
        self.environment.events.request.fire(
            request_type=self.protocol,
            name=name,
            response_time=(time.perf_counter() - start) * 1000.0,
            response_length=length,
            exception=exc,
            context={},
        )
        return result


class TritonGrpcUser(_TritonUser):
    protocol = "grpc"

    def _urls(self) -> str:
        return self.opts.grpc_url

    def _make_client(self, url: str):
        self.mod = triton_grpc
        return self.mod.InferenceServerClient(url)

    def _infer_on(self, client, model, inputs, outputs):
        return client.infer(model, inputs, outputs=outputs, client_timeout=self.opts.timeout_s)

    def _metadata(self, model: str) -> dict:
        return self.client.get_model_metadata(model, as_json=True)


class TritonHttpUser(_TritonUser):
    protocol = "http"

    def _urls(self) -> str:
        return self.opts.http_url

    def _make_client(self, url: str):
        self.mod = triton_http
        t = self.opts.timeout_s
        return self.mod.InferenceServerClient(url, connection_timeout=t, network_timeout=t)

    def _infer_on(self, client, model, inputs, outputs):
        return client.infer(model, inputs, outputs=outputs)

    def _metadata(self, model: str) -> dict:
        return self.client.get_model_metadata(model)


# ----------------------------------------------------------------------------- the end

_warned: set[str] = set()
DOWN_S = 1.0  # a server that could not be reached is skipped this long
_failovers: Counter = Counter()  # server URL -> requests sent on to another server
_answers: Counter = Counter()  # (request name, "checked" | "wrong") -> answers


class WrongAnswer(Exception):
    """A response that arrived but is not a right answer (loadtest/answers.py)."""


def answer_counts() -> dict[str, dict[str, int]]:
    """Per request name: answers checked, wrong, and (recommend) short slates."""
    out: dict[str, dict[str, int]] = {}
    for (name, kind), n in _answers.items():
        out.setdefault(name, {"checked": 0, "wrong": 0, "short": 0})[kind] = n
    return out


def failover_counts() -> dict[str, int]:
    """Per server: requests it could not take that another server answered or was asked."""
    return dict(_failovers)


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


@events.quitting.add_listener
def _check_thresholds(environment, **_kwargs) -> None:
    opts = environment.parsed_options
    if opts is None:
        return
    if _failovers:
        total = sum(_failovers.values())
        per = ", ".join(f"{u}: {n}" for u, n in sorted(_failovers.items()))
        log.warning("failover: %d requests sent on to another server (%s)", total, per)
    counts = answer_counts()
    wrong = sum(c["wrong"] for c in counts.values())
    checked = ", ".join(f"{n} {c['checked']}" for n, c in sorted(counts.items()))
    short = sum(c["short"] for c in counts.values())
    log.info("answers checked: %s; wrong %d; short slates %d", checked or "none", wrong, short)
    problems = threshold_failures(
        environment.stats, max_p99_ms=opts.max_p99_ms, max_fail_ratio=opts.max_fail_ratio
    )
    if problems:
        log.error("thresholds failed: %s", "; ".join(problems))
        environment.process_exit_code = 1
    else:
        log.info("thresholds passed")


_environment = None
_request_log: tuple | None = None  # (file, csv writer) when --request-log is set


@events.test_start.add_listener
def _open_request_log(environment, **_kwargs) -> None:
    global _request_log
    path = getattr(environment.parsed_options, "request_log", "")
    if path and _request_log is None:
        f = open(path, "w", newline="")  # noqa: SIM115 - closed in _exit_now
        w = csv.writer(f)
        w.writerow(["ts", "name", "ms", "ok"])
        _request_log = (f, w)


@events.request.add_listener
def _log_request(name, response_time, exception=None, **_kwargs) -> None:
    if _request_log is not None:
        _request_log[1].writerow(
            [f"{time.time():.3f}", name, f"{response_time:.3f}", int(exception is None)]
        )


@events.init.add_listener
def _keep_environment(environment, **_kwargs) -> None:
    global _environment
    _environment = environment


def write_final_csv(environment, prefix: str) -> None:
    """Rewrite <prefix>_stats/_failures/_exceptions.csv from the final stats.

    Locust's CSV writer refreshes them once a second and closes them after `quit`;
    leaving early would otherwise keep up to a second-old copy.
    """
    writer = StatsCSV(environment, PERCENTILES_TO_REPORT)
    for suffix, write in (
        ("stats", writer.requests_csv),
        ("failures", writer.failures_csv),
        ("exceptions", writer.exceptions_csv),
    ):
        with open(f"{prefix}_{suffix}.csv", "w", newline="") as f:
            write(csv.writer(f))


@events.quit.add_listener
def _exit_now(exit_code, **_kwargs) -> None:
    # Locust closes its CSV files only after this event; close them now, then leave before
    # grpc's gevent integration can hang the interpreter's shutdown.
    for obj in gc.get_objects():
        if isinstance(obj, StatsCSVFileWriter):
            with contextlib.suppress(Exception):  # already closed, or never opened
                obj.close_files()
    if _request_log is not None:
        with contextlib.suppress(OSError):
            _request_log[0].close()
    opts = getattr(_environment, "parsed_options", None)
    if opts is not None and getattr(opts, "csv_prefix", None):
        try:
            write_final_csv(_environment, opts.csv_prefix)
        except OSError as exc:
            log.warning("could not write the final CSV files: %s", exc)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(exit_code)
