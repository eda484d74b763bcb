"""The one builder of bract's Flower apps, for ``bract simulate``, ``flwr run`` and
``bract deploy``.

Every federation bract runs is a :class:`~bract.flower.config.FederationConfig`
(what the coordinator asks) and a :class:`Hospitals` (where each hospital's
ClientApp finds what its operator owns: its data, its privacy policy, its
identity). Only the second differs between the engines:

- ``bract simulate`` plays every hospital's operator in one process
  (:mod:`bract.flower.simulation`: keys it made, the coordinator's ask as each
  hospital's policy);
- ``flwr run`` and ``bract deploy`` run :mod:`bract.flower.app`, whose hospitals
  read their node config: their own policy file, key, roster copy, data and
  state directory, and admit only what their policy allows.

The server side is the same for all three: :func:`server_config` turns the
federation into the round loop's settings, :func:`initial_weights` and
:func:`central_evaluation` give its model and its test-set evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import Context
from flwr.clientapp import ClientApp

from bract.flower.client import (
    HospitalSetup,
    PolicyLike,
    SignerLike,
    make_client_app,
)
from bract.flower.config import FederationConfig
from bract.flower.records import AGGREGATED_METRICS
from bract.flower.secagg_client import IdentityLike
from bract.flower.secagg_server import SecAggSettings
from bract.flower.server import ServerConfig
from bract.records.ledger import SignerRoster
from bract.records.roster import Roster

if TYPE_CHECKING:
    from bract import tasks

__all__ = ["Hospitals", "central_evaluation", "client_app", "initial_weights",
           "secagg_settings", "server_config"]


@dataclass(frozen=True)
class Hospitals:
    """Where each hospital's ClientApp finds what its operator owns, per message.

    ``setup``: its model, optimizer and data; ``policy``: the privacy policy it
    trains under (already admitted by its own limits); ``release_metrics``: what
    its training metrics may leave as; ``secagg``: its secure-aggregation identity
    (``None``: plain FedAvg only); ``identity``: who signs its ledger entries;
    ``mods``: wrap every handler (e.g. simulated faults);
    ``allow_plain_aggregation``: whether a hospital with a secure-aggregation identity
    takes part in a plain FedAvg round (its update in clear) when asked.
    """

    setup: Callable[[Context], HospitalSetup]
    policy: PolicyLike
    release_metrics: str | Callable[[Context], str]
    secagg: IdentityLike | None
    identity: SignerLike | None
    mods: Sequence[Callable] = ()
    allow_plain_aggregation: bool | Callable[[Context], bool] = False


def client_app(hospitals: Hospitals) -> ClientApp:
    """The hospitals' ClientApp: DP-SGD under each hospital's policy, its signed
    ledger, and secure aggregation when it has an identity for it.

    A hospital that signs its ledger answers the server's identity query (its signed
    key advertisement, as in secure aggregation) in a plain FedAvg run too, so a
    hospital that fails before the server has its name is still named in the report."""
    app = make_client_app(
        hospitals.setup, hospitals.policy, secagg=hospitals.secagg,
        release_metrics=hospitals.release_metrics, mods=list(hospitals.mods),
        identity=hospitals.identity,
        allow_plain_aggregation=hospitals.allow_plain_aggregation,
    )
    return app


def secagg_settings(fed: FederationConfig, roster: Roster,
                    record_dir: Path | None = None) -> SecAggSettings:
    """The server's secure-aggregation settings for ``fed`` over ``roster``'s hospitals
    (``record_dir``: record the server's view of every round there)."""
    return SecAggSettings(
        roster.federation_id, roster.keys, clip=fed.secagg_clip, graph=fed.secagg_graph,
        colluders=fed.secagg_colluders, dropouts=fed.secagg_dropouts,
        aggregate_metrics=len(AGGREGATED_METRICS) if fed.release_metrics == "aggregate" else 0,
        record_dir=str(record_dir) if record_dir is not None else None,
        abort_limit=fed.secagg_abort_limit or None,  # 0: no limit
    )


def server_config(
    fed: FederationConfig,
    roster: Roster | None,
    *,
    run_config: dict[str, Any],
    show_progress: bool = True,
    resume: bool = False,
    save_model: Path | None = None,
    record_dir: Path | None = None,
) -> ServerConfig:
    """The round loop's settings for ``fed``: its rounds, hospitals, delta, output and
    timeout; secure aggregation over ``roster`` when ``fed.secagg`` (which then needs
    a roster); with a roster, every hospital's signed ledger is checked on receipt.
    ``run_config`` is what report.json records as the run's configuration."""
    if fed.secagg and roster is None:
        raise ValueError("secure aggregation needs the roster file: set run config 'roster' "
                         "(docs/deployment.md), or secagg=false for plain FedAvg")
    return ServerConfig(
        rounds=fed.rounds,
        num_clients=fed.clients,
        delta=fed.delta,
        out_dir=Path(fed.out),
        round_timeout=fed.round_timeout,
        save_model=save_model,
        run_config=run_config,
        show_progress=show_progress,
        resume=resume,
        secagg=secagg_settings(fed, roster, record_dir) if fed.secagg and roster else None,
        roster=SignerRoster.of(roster) if roster is not None else None,
        reply_poll=fed.reply_poll,
        release_metrics=fed.release_metrics,
    )


def initial_weights(task: tasks.TaskConfig) -> dict[str, Any]:
    """The global model's starting weights: the task's model at its seed."""
    from bract import tasks
    from bract.privacy import weights_of

    return weights_of(tasks.build_model(task))


def central_evaluation(task: tasks.TaskConfig) -> Callable[[dict], dict[str, float]]:
    """The coordinator's evaluation of a global model on the task's central test set;
    it returns no metrics when the coordinator holds no data (the task declares its
    model and names no file), and then only the hospitals evaluate."""
    from bract import tasks
    from bract.privacy import load_weights

    if task.declares_model and not task.data_path:
        return lambda weights: {}
    model = tasks.build_model(task)

    def evaluate(weights: dict) -> dict[str, float]:
        ds = tasks.dataset_for(task)
        load_weights(model, weights)
        return tasks.evaluate(model, ds.x_test, ds.y_test)

    return evaluate
