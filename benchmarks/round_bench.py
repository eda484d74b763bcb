"""Round time of plain FedAvg vs bract secure FedAvg vs Flower's SecAgg+, in one run.

Run:  .venv/bin/python benchmarks/round_bench.py             (all variants, ~5-7 min, 2 cores)
      .venv/bin/python benchmarks/round_bench.py --quick     (fewer rounds and variants)
      .venv/bin/python benchmarks/round_bench.py --profile   (adds an in-process profile)

What is measured. Every variant is one ``flwr.simulation.run_simulation`` call (Ray
backend, ``num_cpus=1`` per ClientApp, so on this 2-core VM two ClientApps run at a
time) with **10 simulated clients** and the same model: an MLP 784-1024-192-10
(float32, **1,002,570 parameters**, 4.0 MB). The variants run one after another in this
process; each restarts Ray, and start-up is excluded:

* the **round time** of round r is the wall time between the server's end-of-round
  centralized evaluation of round r-1 and that of round r (``time.perf_counter`` in the
  evaluate function the server calls after every round; the evaluation itself is a
  no-op). It is measured the same way for every variant: the whole round as the server
  loop runs it (messages, aggregation, bract's report/checkpoint writes, Flower's
  bookkeeping). Reported: the **median of rounds 2..R** (round 1 holds Ray warm-up and,
  for bract, the one-off key advertisement).
* **client work** ("no training", the default, isolates the aggregation cost): each
  client returns ``global + delta`` with a fixed per-client ``delta`` drawn once from
  U(-0.01, 0.01) and 100 examples as its weight; the Flower clients do exactly the same
  in ``NumPyClient.fit`` / a message-API ``train`` handler. bract's no-training client is
  ``make_client_app``'s app with its DP training handler replaced by that stub (same
  ``secagg_mod`` and stage handlers, same metrics guard).
* **with bract's DP training** (``*-dp`` variants): ``make_client_app`` unchanged, Opacus
  DP-SGD (noise multiplier 1.0 fixed, clip 1.0) on 64 synthetic examples per hospital
  with expected batch 32 (about 2 steps per round), one torch thread, and bract's
  default PRV accountant (its budget check, memoised within a process, is a few
  hundredths of a second per round here; the same in plain and secure rounds).

Variants: ``bract-plain`` (bract's server loop, ``secagg=None``), ``bract-secure``
(``SecAggSettings`` defaults: complete graph, the default collusion bound c = 3 of 10
hospitals, so t = 7, clip 8, 16 fractional bits, and the ring sized from the weight
bound each hospital reports (100 here): a 64-bit ring in round 1, before any report,
then 10 x 100 x 8 x 2^16 < 2^31, a 32-bit ring), ``bract-secure-harary`` (SecAgg+
graph, degree 8; only with ``--variants``),
``bract-secure-ring64`` (complete graph; max weight fixed at 2^20: a 64-bit ring every
round, as before the ring was sized from the reports),
``flower-secaggplus`` (legacy ``ServerApp`` + ``LegacyContext`` + ``FedAvg`` strategy +
``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(num_shares=10,
reconstruction_threshold=6))``, ``ClientApp(client_fn, mods=[secaggplus_mod])``: same
graph as ``bract-secure``, Flower's default threshold (6 of 10); Flower's 32-bit
modulus, 2^22 quantization),
``flower-legacy-fedavg`` (the same legacy app without SecAgg+), ``flower-fedavg``
(message-API ``flwr.serverapp.strategy.FedAvg``), ``bract-plain-dp`` /
``bract-secure-dp``, and the engine's floor: ``floor-1-stage`` (a bare message-API
loop: one ``train`` stage, the same stub clients and 4 MB updates, mean on the server)
and ``floor-3-stages`` (the same plus two message stages that carry and do nothing),
i.e. the least any protocol with three message stages per round can cost here.

Breakdown of bract's secure rounds (measured in the same runs, cheap instrumentation):
time inside ``grid.send_and_receive`` per message stage (includes the clients' work and
Ray's transport), time in the ``ServerSession`` calls (crypto, summation, unmasking),
and, on the clients (an outermost mod writing one line per message to a temp file), the
time of each handler and, inside it, of ``ClientSession.from_state``/``export_state``,
record (de)serialisation and the protocol step itself.

``--pull-interval S`` (experiment) sets the simulation Grid's reply-polling interval
(Flower's default 0.1 s) for every variant. ``--profile`` adds one in-process run (no
Ray: a direct in-memory Grid delivering each message to its ClientApp in turn) of
bract-plain and bract-secure to separate Ray's transport cost from computation, and a
cProfile of the secure rounds' top functions.

The last line of output is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import logging
import math
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import itertools

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bract.flower.secagg_client as sc
import bract.flower.secagg_server as ss
from bract.flower.client import (
    HospitalSetup,
    PrivacyPolicy,
    make_client_app,
    metrics_guard_mod,
)
from bract.flower.records import (
    GLOBAL_WEIGHTS,
    LOCAL_WEIGHTS,
    PRIVACY_REPORT,
    TRAIN_INFO,
    privacy_report_record,
    record_to_weights,
    weights_to_record,
)
from bract.flower.secagg_client import SecAggIdentity
from bract.flower.secagg_server import SecAggSettings
from bract.flower.server import ServerConfig, run_federation
from bract.flower.simulation import train_beside_other_hospitals
from bract.privacy import PrivacyLedger
from bract.privacy.accounting import BudgetDecision
from bract.secagg import SigningKey
from bract.secagg.protocol import ClientSession, ServerSession

Weights = dict[str, np.ndarray]
N_CLIENTS = 10
EXAMPLES = 100
LAYERS = (784, 1024, 192, 10)
ALL_VARIANTS = (
    "bract-plain", "bract-secure", "bract-secure-harary", "bract-secure-ring64",
    "flower-secaggplus", "flower-legacy-fedavg", "flower-fedavg",
    "bract-plain-dp", "bract-secure-dp", "floor-1-stage", "floor-3-stages",
)
#: The default run (bract-secure-harary is on request: at n = 10 its graph has degree 8,
#: hardly sparser than the complete graph's 9, and it costs a Ray start-up).
DEFAULT_VARIANTS = tuple(v for v in ALL_VARIANTS if v != "bract-secure-harary")
QUICK_VARIANTS = ("bract-plain", "bract-secure", "flower-secaggplus")


# ----------------------------------------------------------------------------- model
def build_model() -> nn.Module:
    """The benchmark model: MLP 784-1024-192-10 (ReLU), 1,002,570 parameters."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(LAYERS)):
        layers.append(nn.Linear(a, b))
        if i < len(LAYERS) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def model_weights() -> Weights:
    return {k: v.detach().numpy().copy() for k, v in build_model().state_dict().items()}


_DELTAS: dict[int, Weights] = {}


def client_delta(pid: int, like: Weights) -> Weights:
    """The fixed update of client ``pid``: U(-0.01, 0.01), drawn once per process."""
    if pid not in _DELTAS:
        rng = np.random.default_rng(1000 + pid)
        _DELTAS[pid] = {
            k: rng.uniform(-0.01, 0.01, v.shape).astype(v.dtype) for k, v in like.items()
        }
    return _DELTAS[pid]


# -------------------------------------------------------------------- client timing
def _acc() -> dict[str, float]:
    """Per-process accumulator, kept on an importable module: Ray pickles ``__main__``
    functions by value, so a global here could be copied per function."""
    return sc.__dict__.setdefault("_round_bench_acc", defaultdict(float))


def _timed(fn: Callable, name: str) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _acc()[name] += time.perf_counter() - t

    wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
    return wrapper


def _patch_client_side() -> None:
    """Time bract's client-side pieces in this (Ray actor) process; idempotent."""
    if sc.__dict__.get("_round_bench_patched"):
        return
    sc.__dict__["_round_bench_patched"] = True
    cs_from_state = ClientSession.__dict__["from_state"].__func__
    ClientSession.from_state = classmethod(_timed(cs_from_state, "from_state"))  # type: ignore
    for name in ("export_state", "handle_round_config", "handle_mask_request",
                 "handle_consistency_request", "handle_unmask_request"):
        setattr(ClientSession, name, _timed(getattr(ClientSession, name), name))
    for name in ("secagg_from_record", "secagg_to_record", "flatten_delta", "record_to_weights"):
        setattr(sc, name, _timed(getattr(sc, name), name))


def timing_mod(log_path: str, variant: str) -> Callable:
    """Outermost client mod: one JSON line per message (type, handler time, parts)."""

    def mod(msg: Message, ctx: Context, call_next: Callable[[Message, Context], Message]):
        _patch_client_side()
        _acc().clear()
        t0 = time.perf_counter()
        reply = call_next(msg, ctx)
        dt = time.perf_counter() - t0
        stage = msg.metadata.message_type
        cfg = msg.content.config_records.get("secaggplus")
        if cfg is not None and "stage" in cfg:
            stage = f"{stage}:{cfg['stage']}"
        state_bytes = sum(
            len(v) for rec in ctx.state.config_records.values() for v in rec.values()
            if isinstance(v, bytes)
        )
        line = {"variant": variant, "stage": stage, "round": msg.metadata.group_id,
                "pid": int(ctx.node_config.get("partition-id", -1)), "seconds": dt,
                "state_bytes": state_bytes, "parts": dict(_acc()), "os_pid": os.getpid()}
        with open(log_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")
        return reply

    return mod


# ------------------------------------------------------------------ bract clients
def _stub_train(msg: Message, ctx: Context) -> Message:
    """bract's train reply without training: global + fixed delta, 100 examples."""
    pid = int(ctx.node_config["partition-id"])
    glob = record_to_weights(msg.content.array_records[GLOBAL_WEIGHTS])
    delta = client_delta(pid, glob)
    local = {k: v + delta[k] for k, v in glob.items()}
    cid = f"hospital-{pid}"
    decision = BudgetDecision(True, math.inf, math.inf, math.inf, 1e-5, "prv",
                              "benchmark stub: no training (NON-PRIVATE)")
    content = RecordDict()
    content.config_records[PRIVACY_REPORT] = privacy_report_record(
        PrivacyLedger(cid), decision, trained=True, epsilon=math.inf,
        noise_multiplier=0.0, sample_rate=0.0, weight_bound=EXAMPLES,
    )
    content.array_records[LOCAL_WEIGHTS] = weights_to_record(local)
    content.metric_records[TRAIN_INFO] = MetricRecord({"num-examples": EXAMPLES})
    return Message(content, reply_to=msg)


def make_identities(n: int, federation_id: str) -> tuple[dict[int, bytes], list[SecAggIdentity]]:
    keys = [SigningKey.generate() for _ in range(n)]
    roster = {i + 1: k.public_bytes() for i, k in enumerate(keys)}
    return roster, [SecAggIdentity(i + 1, k.to_bytes(), roster, federation_id)
                    for i, k in enumerate(keys)]


def bract_stub_client(identities: list[SecAggIdentity] | None, tmod: Callable) -> ClientApp:
    """``make_client_app``'s app with the DP handler replaced by the no-training stub."""
    app = ClientApp()
    mods = [tmod, metrics_guard_mod("none")]
    if identities is not None:
        def identity(ctx: Context) -> SecAggIdentity:
            return identities[int(ctx.node_config["partition-id"])]
        mods.append(sc.secagg_mod(identity))
        sc.register_secagg(app, identity, mods=[tmod])
    app.train(mods=mods)(_stub_train)
    return app


def _dp_setup(ctx: Context) -> HospitalSetup:
    train_beside_other_hospitals(N_CLIENTS, 1)  # one torch thread, as `bract simulate`
    pid = int(ctx.node_config["partition-id"])
    g = torch.Generator().manual_seed(pid)
    x = torch.randn(64, LAYERS[0], generator=g)
    y = torch.randint(0, LAYERS[-1], (64,), generator=g)
    model = build_model()
    return HospitalSetup(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        train_loader=DataLoader(TensorDataset(x, y), batch_size=32),
        client_id=f"hospital-{pid}",
    )


def bract_dp_client(identities: list[SecAggIdentity] | None, rounds: int,
                    tmod: Callable) -> ClientApp:
    policy = PrivacyPolicy(target_epsilon=1000.0, delta=1e-5, rounds=rounds,
                           noise_multiplier=1.0, max_grad_norm=1.0)
    secagg = None
    if identities is not None:
        def secagg(ctx: Context) -> SecAggIdentity:
            return identities[int(ctx.node_config["partition-id"])]
    return make_client_app(_dp_setup, policy, secagg=secagg, mods=[tmod])


# ------------------------------------------------------------------ server timing
class TimingGrid:
    """Forwards to a Grid; records the duration of every ``send_and_receive``."""

    #: When set, the simulation's InMemoryGrid polls for replies this often (Flower: 0.1 s).
    pull_interval: float | None = None

    def __init__(self, grid: Any, exchange: bool = False) -> None:
        self._grid = grid
        #: bract's server waits with its own reply loop (bract.flower.exchange: polls from
        #: 10 ms up to 0.1 s); Flower's and the floor variants with the Grid's own.
        self._exchange = exchange
        self.calls: list[dict[str, Any]] = []
        if TimingGrid.pull_interval is not None and hasattr(grid, "pull_interval"):
            grid.pull_interval = TimingGrid.pull_interval

    def __getattr__(self, name: str) -> Any:
        if name in ("push_messages", "pull_messages"):
            raise AttributeError(name)  # every wait goes through send_and_receive (timed)
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        messages = list(messages)
        t = time.perf_counter()
        if self._exchange:
            from bract.flower.exchange import send_and_receive

            replies = send_and_receive(self._grid, messages, timeout)
        else:
            replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.calls.append({
            "stage": messages[0].metadata.message_type if messages else "",
            "round": messages[0].metadata.group_id if messages else "",
            "n": len(messages), "seconds": time.perf_counter() - t,
        })
        return replies


_SERVER_ACC: dict[str, float] = defaultdict(float)
_SERVER_PATCHED = {"done": False}


def _patch_server_side() -> None:
    if _SERVER_PATCHED["done"]:
        return
    _SERVER_PATCHED["done"] = True
    for name in ("start_round", "receive_advertisement", "receive_shares", "mask_requests",
                 "receive_masked_input", "consistency_request",
                 "receive_consistency_signature", "unmask_request", "receive_unmask_reply",
                 "finish"):
        fn = getattr(ServerSession, name)
        setattr(ServerSession, name, _timed_server(fn, name))
    for name in ("secagg_to_record", "secagg_from_record"):
        setattr(ss, name, _timed_server(getattr(ss, name), name))


def _timed_server(fn: Callable, name: str) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _SERVER_ACC[name] += time.perf_counter() - t

    return wrapper


# ---------------------------------------------------------------------- variants
def bract_server(rounds: int, settings: SecAggSettings | None, out_dir: Path,
                 sink: dict[str, Any]) -> ServerApp:
    app = ServerApp()
    evals: list[float] = []
    per_round_acc: list[dict[str, float]] = []

    def evaluate(_: Weights) -> dict[str, float]:
        evals.append(time.perf_counter())
        per_round_acc.append(dict(_SERVER_ACC))
        return {}

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        tg = TimingGrid(grid, exchange=True)
        cfg = ServerConfig(rounds=rounds, num_clients=N_CLIENTS, delta=1e-5, out_dir=out_dir,
                           min_clients=N_CLIENTS, show_progress=False, secagg=settings)
        report = run_federation(tg, model_weights(), evaluate, cfg)  # type: ignore[arg-type]
        sink.update(report=report, evals=evals, calls=tg.calls, server_acc=per_round_acc)

    return app


def flower_legacy(rounds: int, secaggplus: tuple[int, int] | None, sink: dict[str, Any],
                  tmod: Callable) -> tuple[ServerApp, ClientApp]:
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext
    from flwr.server import ServerConfig as FlwrServerConfig
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    init = model_weights()
    names = list(init)
    evals: list[float] = []
    fit_seconds: list[float] = []

    class StubClient(NumPyClient):
        def __init__(self, pid: int) -> None:
            self.pid = pid

        def fit(self, parameters: list[np.ndarray], config: dict) -> tuple:
            delta = client_delta(self.pid, dict(zip(names, parameters, strict=True)))
            return [p + delta[k] for k, p in zip(names, parameters, strict=True)], EXAMPLES, {}

    def client_fn(context: Context) -> Any:
        return StubClient(int(context.node_config["partition-id"])).to_client()

    mods = [tmod, secaggplus_mod] if secaggplus else [tmod]
    client = ClientApp(client_fn=client_fn, mods=mods)
    server = ServerApp()

    def evaluate_fn(rnd: int, params: list[np.ndarray], config: dict) -> None:
        evals.append(time.perf_counter())
        return None

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = LegacyFedAvg(
            fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=N_CLIENTS,
            min_available_clients=N_CLIENTS,
            initial_parameters=ndarrays_to_parameters(list(init.values())),
            evaluate_fn=evaluate_fn,
        )
        legacy = LegacyContext(context=context, config=FlwrServerConfig(num_rounds=rounds),
                               strategy=strategy)
        fit = None
        if secaggplus is not None:
            inner = SecAggPlusWorkflow(num_shares=secaggplus[0],
                                       reconstruction_threshold=secaggplus[1])

            def fit(grid: Grid, ctx: Context) -> None:
                t = time.perf_counter()
                inner(grid, ctx)
                fit_seconds.append(time.perf_counter() - t)

        tg = TimingGrid(grid)
        DefaultWorkflow(fit_workflow=fit)(tg, legacy)  # type: ignore[arg-type]
        sink.update(evals=evals, calls=tg.calls, fit_seconds=fit_seconds)

    return server, client


def _local_arrays(msg: Message, ctx: Context, names: list[str]) -> list[np.ndarray]:
    """A message-API client's stub work: the global arrays plus its fixed delta."""
    pid = int(ctx.node_config["partition-id"])
    glob = msg.content.array_records["arrays"].to_numpy_ndarrays()
    delta = client_delta(pid, dict(zip(names, glob, strict=True)))
    return [g + delta[k] for k, g in zip(names, glob, strict=True)]


def flower_message_api(rounds: int, sink: dict[str, Any], tmod: Callable
                       ) -> tuple[ServerApp, ClientApp]:
    from flwr.serverapp.strategy import FedAvg

    init = model_weights()
    client = ClientApp()
    evals: list[float] = []

    @client.train(mods=[tmod])
    def train(msg: Message, ctx: Context) -> Message:
        local = _local_arrays(msg, ctx, list(init))
        content = RecordDict({"arrays": ArrayRecord(local),
                              "metrics": MetricRecord({"num-examples": EXAMPLES})})
        return Message(content, reply_to=msg)

    server = ServerApp()

    def evaluate_fn(rnd: int, arrays: ArrayRecord) -> MetricRecord | None:
        evals.append(time.perf_counter())
        return None

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0,
                          min_train_nodes=N_CLIENTS, min_available_nodes=N_CLIENTS)
        tg = TimingGrid(grid)
        strategy.start(grid=tg, initial_arrays=ArrayRecord(list(init.values())),  # type: ignore
                       num_rounds=rounds, train_config=ConfigRecord(), evaluate_fn=evaluate_fn)
        sink.update(evals=evals, calls=tg.calls)

    return server, client


def stage_floor(rounds: int, stages: int, sink: dict[str, Any], tmod: Callable
                ) -> tuple[ServerApp, ClientApp]:
    """The engine's floor: plain FedAvg (the same stub clients and 4 MB updates) followed
    by ``stages - 1`` message stages that carry nothing and do nothing. What any
    protocol with that many message stages per round costs at least, crypto aside."""
    init = model_weights()
    names = list(init)
    client = ClientApp()

    @client.train(mods=[tmod])
    def train(msg: Message, ctx: Context) -> Message:
        local = _local_arrays(msg, ctx, names)
        return Message(RecordDict({"arrays": ArrayRecord(local)}), reply_to=msg)

    @client.query("empty", mods=[tmod])
    def empty(msg: Message, ctx: Context) -> Message:
        return Message(RecordDict(), reply_to=msg)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        tg = TimingGrid(grid)
        deadline = time.monotonic() + 60
        while len(list(grid.get_node_ids())) < N_CLIENTS and time.monotonic() < deadline:
            time.sleep(0.05)
        nodes = sorted(grid.get_node_ids())
        weights = [np.array(v, copy=True) for v in init.values()]
        evals = [time.perf_counter()]
        for rnd in range(1, rounds + 1):
            msgs = [Message(RecordDict({"arrays": ArrayRecord(weights)}), dst_node_id=n,
                            message_type="train", group_id=str(rnd)) for n in nodes]
            locals_ = [r.content.array_records["arrays"].to_numpy_ndarrays()
                       for r in tg.send_and_receive(msgs)]
            weights = [np.mean([w[i] for w in locals_], axis=0).astype(np.float32)
                       for i in range(len(weights))]
            for _ in range(stages - 1):
                msgs = [Message(RecordDict(), dst_node_id=n, message_type="query.empty",
                                group_id=str(rnd)) for n in nodes]
                list(tg.send_and_receive(msgs))
            evals.append(time.perf_counter())
        sink.update(evals=evals, calls=tg.calls)

    return server, client


def build_variant(name: str, rounds: int, work: Path, log_path: str, sink: dict[str, Any]
                  ) -> tuple[ServerApp, ClientApp]:
    tmod = timing_mod(log_path, name)
    secure = "secure" in name
    settings: SecAggSettings | None = None
    identities: list[SecAggIdentity] | None = None
    if name.startswith("bract") and secure:
        fed = f"round-bench-{os.urandom(6).hex()}"
        roster, identities = make_identities(N_CLIENTS, fed)
        kw: dict[str, Any] = {}
        if name.endswith("harary"):
            kw["graph"] = "harary"
        if name.endswith("ring64"):
            kw.update(max_weight=2**20)
        settings = SecAggSettings(fed, roster, **kw)
    if name.startswith("bract"):
        server = bract_server(rounds, settings, work / name, sink)
        if name.endswith("-dp"):
            return server, bract_dp_client(identities, rounds, tmod)
        return server, bract_stub_client(identities, tmod)
    if name == "flower-secaggplus":
        return flower_legacy(rounds, (N_CLIENTS, N_CLIENTS // 2 + 1), sink, tmod)
    if name == "flower-legacy-fedavg":
        return flower_legacy(rounds, None, sink, tmod)
    if name == "flower-fedavg":
        return flower_message_api(rounds, sink, tmod)
    if name.startswith("floor-"):
        return stage_floor(rounds, int(name.split("-")[1]), sink, tmod)
    raise ValueError(f"unknown variant {name!r}")


def run_variant(name: str, rounds: int, work: Path) -> dict[str, Any]:
    from flwr.simulation import run_simulation

    log_path = str(work / f"{name}.clients.jsonl")
    sink: dict[str, Any] = {}
    _SERVER_ACC.clear()
    server, client = build_variant(name, rounds, work, log_path, sink)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(
            server_app=server, client_app=client, num_supernodes=N_CLIENTS,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                            "init_args": {"log_to_driver": False,
                                          "include_dashboard": False}},
        )
    wall = time.perf_counter() - t0
    if "evals" not in sink:
        raise RuntimeError(f"variant {name} did not finish")
    evals = sink["evals"]
    # evals[0] is the initial evaluation; evals[r] ends round r.
    periods = [b - a for a, b in itertools.pairwise(evals)]
    if len(periods) < rounds:
        raise RuntimeError(f"variant {name}: only {len(periods)} of {rounds} rounds finished")
    clients = []
    if Path(log_path).exists():
        clients = [json.loads(x) for x in Path(log_path).read_text().splitlines()]
    out: dict[str, Any] = {
        "rounds": periods, "round_s": statistics.median(periods[1:]),
        "first_round_s": periods[0], "wall_s": wall, "calls": sink.get("calls", []),
        "clients": clients,
    }
    report = sink.get("report")
    if report is not None:
        rows = report["rounds"]
        out["bract_seconds"] = [r["seconds"] for r in rows]
        if rows and "secagg" in rows[0]:
            out["secagg"] = [r["secagg"] for r in rows]
            assert all(r["secagg"]["aborted"] is None for r in rows), "a secure round aborted"
            assert all(len(r["secagg"]["alive"]) == N_CLIENTS for r in rows)
        acc = sink.get("server_acc", [])
        out["server_acc"] = [
            {k: b.get(k, 0.0) - a.get(k, 0.0) for k in b} for a, b in itertools.pairwise(acc)
        ]
    if sink.get("fit_seconds"):
        out["fit_s"] = statistics.median(sink["fit_seconds"][1:] or sink["fit_seconds"])
    return out


# --------------------------------------------------------------------- breakdowns
def stage_breakdown(res: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per message stage, rounds 2..R: server-side wait, client handler time, parts."""
    rounds = {str(r) for r in range(2, len(res["rounds"]) + 1)}
    calls = [c for c in res["calls"] if str(c["round"]) in rounds]
    by_stage: dict[str, dict[str, float]] = {}
    n_rounds = max(1, len(rounds))
    for c in calls:
        d = by_stage.setdefault(c["stage"], defaultdict(float))
        d["send_and_receive_s"] += c["seconds"] / n_rounds
    clients = [c for c in res["clients"] if str(c["round"]) in rounds]
    for c in clients:
        stage = c["stage"]
        d = by_stage.setdefault(stage, defaultdict(float))
        d["client_handler_sum_s"] += c["seconds"] / n_rounds
        d["client_msgs"] += 1 / n_rounds
        d["state_bytes_max"] = max(d["state_bytes_max"], c["state_bytes"])
        for k, v in c["parts"].items():
            d[f"client_{k}_s"] += v / n_rounds
    return {k: dict(v) for k, v in by_stage.items()}


def per_message(clients: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, float]]:
    """Mean handler time and timed parts per (variant, stage), rounds 2 and later."""
    acc: dict[tuple[str, str], dict[str, float]] = {}
    count: dict[tuple[str, str], int] = defaultdict(int)
    for c in clients:
        if int(c["round"] or 0) < 2:
            continue
        key = (c["variant"], c["stage"])
        d = acc.setdefault(key, defaultdict(float))
        count[key] += 1
        d["seconds"] += c["seconds"]
        for k, v in c["parts"].items():
            d[k] += v
    return {k: {kk: vv / count[k] for kk, vv in d.items()} for k, d in acc.items()}


def load_avg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# ------------------------------------------------------------- in-process profile
class DirectGrid:
    """An in-memory Grid: each message goes to its node's ClientApp, one after another."""

    def __init__(self, app: ClientApp, n: int) -> None:
        self.app = app
        self.contexts = {
            1000 + i: Context(run_id=1, node_id=1000 + i,
                              node_config={"partition-id": i, "num-partitions": n},
                              state=RecordDict(), run_config={})
            for i in range(n)
        }

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> list[Message]:
        return [self.app(m, self.contexts[m.metadata.dst_node_id]) for m in messages]


def profile_in_process(rounds: int, work: Path) -> dict[str, Any]:
    """bract plain and secure with no Ray: computation only; cProfile of secure rounds."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    log_path = str(work / "inproc.clients.jsonl")
    for name in ("bract-plain", "bract-secure"):
        identities = None
        settings = None
        if name == "bract-secure":
            fed = f"round-bench-{os.urandom(6).hex()}"
            roster, identities = make_identities(N_CLIENTS, fed)
            settings = SecAggSettings(fed, roster)
        app = bract_stub_client(identities, timing_mod(log_path, f"inproc-{name}"))
        grid = TimingGrid(DirectGrid(app, N_CLIENTS))
        evals: list[float] = []

        def evaluate(_: Weights, evals: list[float] = evals) -> dict[str, float]:
            evals.append(time.perf_counter())
            return {}

        cfg = ServerConfig(rounds=rounds, num_clients=N_CLIENTS, delta=1e-5,
                           out_dir=work / f"inproc-{name}", show_progress=False,
                           secagg=settings)
        prof = cProfile.Profile() if name == "bract-secure" else None
        # Profile rounds 2..R only: run round 1 inside the same federation, then enable.
        if prof is not None:
            def evaluate_p(w: Weights, evals: list[float] = evals,
                           prof: cProfile.Profile = prof) -> dict[str, float]:
                evals.append(time.perf_counter())
                if len(evals) == 2:
                    prof.enable()
                return {}
            report = run_federation(grid, model_weights(), evaluate_p, cfg)  # type: ignore
            prof.disable()
        else:
            report = run_federation(grid, model_weights(), evaluate, cfg)  # type: ignore
        periods = [b - a for a, b in itertools.pairwise(evals)]
        out[name] = {"rounds": periods, "round_s": statistics.median(periods[1:]),
                     "bract_seconds": [r["seconds"] for r in report["rounds"]],
                     "calls": grid.calls}
        if prof is not None:
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(35)
            out["cprofile_top"] = buf.getvalue()
            st = pstats.Stats(prof)
            tot: dict[str, float] = {}
            for (file, _line, func), (_cc, _nc, _tt, ct, _callers) in st.stats.items():  # type: ignore
                tot[f"{Path(file).name}:{func}"] = max(tot.get(f"{Path(file).name}:{func}", 0), ct)
            out["cprofile_cum"] = dict(sorted(tot.items(), key=lambda kv: -kv[1])[:60])
    clients = [json.loads(x) for x in Path(log_path).read_text().splitlines()]
    out["clients"] = clients
    return out


# ------------------------------------------------------------------------- output
def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="3 rounds, variants bract-plain, bract-secure, flower-secaggplus")
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds per no-training variant (default 6; quick 3)")
    ap.add_argument("--dp-rounds", type=int, default=3, help="rounds per *-dp variant")
    ap.add_argument("--variants", nargs="+", default=None, choices=ALL_VARIANTS,
                    help="subset of variants to run, in this order")
    ap.add_argument("--pull-interval", type=float, default=None,
                    help="experiment: the simulation Grid's reply polling interval in s "
                         "(Flower's default 0.1), for every variant")
    ap.add_argument("--profile", action="store_true",
                    help="also run bract plain/secure in-process (no Ray) with cProfile")
    args = ap.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 6)
    variants = list(args.variants or (QUICK_VARIANTS if args.quick else DEFAULT_VARIANTS))
    if rounds < 2:
        ap.error("--rounds must be at least 2 (round 1 is excluded)")

    TimingGrid.pull_interval = args.pull_interval
    for name in ("flwr", "ray", "bract.server"):
        logging.getLogger(name).setLevel(logging.ERROR)
    _patch_server_side()
    n_params = sum(v.size for v in model_weights().values())
    load_start = load_avg()
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    print(f"round_bench: {N_CLIENTS} clients, MLP {'-'.join(map(str, LAYERS))} "
          f"({n_params:,} parameters), rounds {rounds} (dp: {args.dp_rounds}); "
          f"load average at start {load_start}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="round-bench-") as tmp:
        work = Path(tmp)
        for name in variants:
            r = args.dp_rounds if name.endswith("-dp") else rounds
            t = time.perf_counter()
            results[name] = run_variant(name, r, work)
            print(f"  {name:22s} median round {results[name]['round_s']:.3f} s "
                  f"(rounds: {', '.join(f'{x:.2f}' for x in results[name]['rounds'])}; "
                  f"variant wall {time.perf_counter() - t:.1f} s)", flush=True)
        inproc = profile_in_process(rounds, work) if args.profile else None

    def rs(name: str) -> float | None:
        return results[name]["round_s"] if name in results else None

    def ratio(a: str, b: str) -> float | None:
        x, y = rs(a), rs(b)
        return None if x is None or y is None else x / y

    print()
    print("| variant | median round s (2..R) | round 1 s | x bract-plain | x flower-fedavg |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in results.items():
        base = "bract-plain-dp" if name.endswith("-dp") else "bract-plain"
        print(f"| {name} | {r['round_s']:.3f} | {r['first_round_s']:.2f} | "
              f"{fmt(ratio(name, base))} | {fmt(ratio(name, 'flower-fedavg'))} |")

    floor_goal = None
    if all(v in results for v in ("bract-secure", "bract-plain", "floor-1-stage",
                                  "floor-3-stages")):
        # The engine's own floor for a 3-stage round, scaled to bract's plain round.
        floor_goal = rs("bract-secure") / (rs("bract-plain") * ratio("floor-3-stages",
                                                                      "floor-1-stage"))
        print(f"\nbract-secure / (bract-plain x floor-3-stages / floor-1-stage): "
              f"{floor_goal:.2f} (goal <= 1.2)")
    if "flower-secaggplus" in results and "bract-secure" in results:
        print(f"flower-secaggplus / bract-secure: "
              f"{ratio('flower-secaggplus', 'bract-secure'):.2f} (goal > 1)")

    breakdowns = {}
    for name, r in results.items():
        if name.startswith("bract") and "secure" in name:
            breakdowns[name] = stage_breakdown(r)
            sec = r["secagg"][1:]
            sacc = r["server_acc"][1:]
            print(f"\n{name}: secagg.seconds median "
                  f"{statistics.median(s['seconds'] for s in sec):.3f} s, stages "
                  f"{[s['stages'] for s in r['secagg']]}; ServerSession time per round (median): "
                  + ", ".join(f"{k} {statistics.median(a.get(k, 0) for a in sacc):.3f}"
                              for k in sorted(sacc[0]) if sacc))
            print("| stage | server wait in send_and_receive s | sum of client handler s | "
                  "from_state s | export_state s | protocol step s | other timed parts s | "
                  "max ctx.state bytes |")
            print("| --- | --- | --- | --- | --- | --- | --- | --- |")
            for stage, d in breakdowns[name].items():
                proto = sum(v for k, v in d.items() if k.startswith("client_handle_"))
                ser = sum(v for k, v in d.items() if k.startswith("client_") and k.endswith(
                    "_s") and k not in ("client_handler_sum_s", "client_from_state_s",
                                        "client_export_state_s") and not k.startswith(
                    "client_handle_"))
                print(f"| {stage} | {fmt(d.get('send_and_receive_s'))} | "
                      f"{fmt(d.get('client_handler_sum_s'))} | {fmt(d.get('client_from_state_s'))}"
                      f" | {fmt(d.get('client_export_state_s'))} | {fmt(proto)} | {fmt(ser)} | "
                      f"{int(d.get('state_bytes_max', 0)):,} |")
    for name in ("flower-secaggplus", "flower-legacy-fedavg", "flower-fedavg", "bract-plain"):
        if name in results:
            breakdowns[name] = stage_breakdown(results[name])
    if inproc is not None:
        print(f"\nin-process (no Ray, clients one after another on one core): bract-plain "
              f"{inproc['bract-plain']['round_s']:.3f} s/round, bract-secure "
              f"{inproc['bract-secure']['round_s']:.3f} s/round")
        print("in-process, per client message (mean over rounds 2..R), seconds:")
        for (variant, stage), d in per_message(inproc["clients"]).items():
            parts = ", ".join(f"{k} {v:.4f}" for k, v in d.items() if k != "seconds")
            print(f"  {variant} {stage}: handler {d['seconds']:.4f}" + (f" ({parts})"
                                                                      if parts else ""))
        print(inproc["cprofile_top"])

    load_end = load_avg()
    total = time.perf_counter() - t_start
    cpu = time.process_time() - cpu_start
    print(f"total {total:.1f} s wall (this process {cpu:.1f} s CPU); "
          f"load average at start {load_start}, at end {load_end}")
    summary: dict[str, Any] = {
        "plain_round_s": rs("bract-plain"),
        "bract_secagg_round_s": rs("bract-secure"),
        "flower_secaggplus_round_s": rs("flower-secaggplus"),
        "bract_secagg_over_plain": ratio("bract-secure", "bract-plain"),
        "flower_secaggplus_over_plain": ratio("flower-secaggplus", "bract-plain"),
        "flower_secaggplus_over_flower_legacy_plain": ratio("flower-secaggplus",
                                                            "flower-legacy-fedavg"),
        # The engine's floor for a three-stage protocol (no crypto, empty stages).
        "floor_3_stages_over_1": ratio("floor-3-stages", "floor-1-stage"),
        "bract_secure_over_engine_floor": floor_goal,
        "variants": {k: {"round_s": v["round_s"], "rounds_s": v["rounds"],
                         "first_round_s": v["first_round_s"], "wall_s": v["wall_s"],
                         **({"bract_report_seconds": v["bract_seconds"]}
                            if "bract_seconds" in v else {}),
                         **({"fit_workflow_s": v["fit_s"]} if "fit_s" in v else {})}
                     for k, v in results.items()},
        "ratios_vs_bract_plain": {k: ratio(k, "bract-plain-dp" if k.endswith("-dp")
                                           else "bract-plain") for k in results},
        "bract_secure_breakdown": breakdowns,
        "settings": {
            "clients": N_CLIENTS, "model": f"MLP {'-'.join(map(str, LAYERS))}",
            "parameters": n_params, "rounds": rounds, "dp_rounds": args.dp_rounds,
            "statistic": "median of rounds 2..R of end-of-round to end-of-round wall time",
            "client_work": "global + fixed U(-0.01,0.01) delta, weight 100 (no training); "
                           "*-dp: Opacus DP-SGD, sigma 1.0, 64 examples, batch 32",
            "bract_secure": "complete graph, default collusion bound c=3 (t=7 of 10), "
                            "clip 8, frac_bits 16, ring sized from the reported weight "
                            "bound 100 (64-bit in round 1, 32-bit after); ring64: "
                            "max_weight 2^20 fixed",
            "flower_secaggplus": f"num_shares {N_CLIENTS}, reconstruction_threshold "
                                 f"{N_CLIENTS // 2 + 1}, clipping 8, quantization 2^22, "
                                 "modulus 2^32",
            "ray": "num_cpus=1 per ClientApp",
            "grid_pull_interval_s": args.pull_interval or 0.1,
        },
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_avg_start": load_start, "load_avg_end": load_end,
                    "total_wall_s": total, "process_cpu_s": cpu},
    }
    if inproc is not None:
        summary["in_process"] = {k: {"round_s": v["round_s"], "rounds_s": v["rounds"]}
                                 for k, v in inproc.items() if k.startswith("bract")}
        summary["in_process"]["cprofile_cum_s"] = inproc["cprofile_cum"]
        summary["in_process"]["per_message_s"] = {
            f"{v} {st}": d for (v, st), d in per_message(inproc["clients"]).items()}
    print(json.dumps(summary, default=float))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
