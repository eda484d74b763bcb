"""bract as a Flower app: module-level ``client_app`` and ``server_app``.

These are what ``[tool.flwr.app.components]`` in ``pyproject.toml`` names, so
``flwr run`` (simulation or a SuperLink) runs the same federation as
``bract simulate`` (both are built by :mod:`bract.flower.apps`). Settings come from
the run config (``[tool.flwr.app.config]``, overridable with ``flwr run
--run-config``), read as a :class:`~bract.flower.config.FederationConfig`; each
hospital's data, keys, policy and state come from its node config.

The run config only *asks* for a privacy budget, noise and metric release: each
hospital holds its own limits in the policy file its node config names (``policy``,
see :class:`bract.flower.hospital_policy.HospitalPolicy`; the defaults apply without
one) and refuses any request looser than them, before it trains.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from bract.flower import apps
from bract.flower.apps import Hospitals
from bract.flower.client import (
    DATASETS_DIR,
    LEDGER_FILE,
    STATE_FILE,
    HospitalSetup,
    PrivacyPolicy,
    dataset_id_problem,
    privacy_dir,
)
from bract.flower.config import FederationConfig
from bract.flower.hospital_policy import hospital_policy_of, operator_keys_in
from bract.flower.reasons import public
from bract.flower.run_dir import set_aside_previous_run
from bract.flower.secagg_client import SecAggIdentity, read_identity_key
from bract.flower.server import run_federation
from bract.flower.simulated_operators import (
    HOSPITALS_DIR,
    identity_file,
    simulated_identities,
    simulated_identity,
)
from bract.records.roster import read_roster
from bract.secagg import ClientPolicy

if TYPE_CHECKING:
    from bract import tasks

# torch and the built-in tasks load on first use: a SuperNode starts a ClientApp process
# per message, and the secure-aggregation stages (mask, check, unmask) need neither.


def task_from_run_config(rc: Mapping[str, Any]) -> tasks.TaskConfig:
    """The task a run config describes (unset values take the dataset's defaults)."""
    return FederationConfig.from_run_config(rc).task()


def policy_from_run_config(rc: Mapping[str, Any]) -> PrivacyPolicy:
    """The privacy policy a run config asks every hospital to train under."""
    return FederationConfig.from_run_config(rc).policy()


def hospital_setup(
    task: tasks.TaskConfig, ctx: Context, state_root: Path | None = None
) -> HospitalSetup:
    """A hospital's model, optimizer and data for a built-in task.

    With a ``data-path`` in its node config the hospital serves its own file (of the
    run's dataset kind): it trains on that file's training split and evaluates the
    global model it receives on that file's held-out split; nothing else is read.
    Without one it trains on partition ``partition-id`` of the task's shared data
    (simulation). Its client id is the node config's ``name``, else
    ``hospital-<partition-id>``. It keeps its state in the node config's
    ``state-dir`` (required of a hospital its operator configured, i.e. one whose node
    config names any of :data:`~bract.flower.hospital_policy.OPERATOR_KEYS`), else (a
    simulated hospital: partition only) in ``state_root/<client id>``. Its privacy budget
    is keyed by the data it protects: a hospital on its own data (``data-path`` or
    ``loader``) by its node config's ``dataset-id``, which it must name
    (:func:`check_own_dataset_id` refuses before any data is read); a hospital on a
    partition of the task's data by its ``dataset-id`` when its operator names one,
    else by the data's source (:func:`dataset_source`); a ``dataset-id`` that is blank,
    begins or ends with whitespace or holds an invisible character is refused
    (:func:`check_dataset_id`), never stripped. A policy that declares its
    data's ``num_classes`` refuses another model before any data is read
    (:meth:`~bract.flower.hospital_policy.HospitalPolicy.admit_model`). Under its policy's
    ``privacy_unit: patient``, an own image folder with any image whose patient is
    unknown is refused (:func:`bract.data.imagefolder.check_patients_known`).
    """
    from bract import tasks

    nc = ctx.node_config
    own_path = str(nc.get("data-path", ""))
    loader = str(nc.get("loader", ""))
    if own_path and loader:
        raise ValueError("this SuperNode's node config names both a data-path and a loader: "
                         "one source of data, please")
    if "name" in nc:
        client_id = str(nc["name"])
    elif "partition-id" in nc:
        client_id = f"hospital-{partition_id(nc)}"
    else:
        raise ValueError("this SuperNode's node config names neither the hospital "
                         "('name') nor its partition ('partition-id')")
    state_dir = nc.get("state-dir")
    configured = operator_keys_in(nc)
    if not state_dir and configured:
        # A hospital its operator configured keeps its budget on its own disk: under the
        # coordinator's output (the run config's `out`) it would start from an empty
        # ledger whenever the coordinator names another one.
        raise ValueError(f"this hospital's node config names {', '.join(configured)} but no "
                         "state-dir: its spent privacy budget must live in a directory its "
                         "operator owns (bract hospital init makes DIR/state)")
    if task.data_path and configured and not (own_path or loader):
        # The file would be the coordinator's choice, and so would the budget's key: a
        # copy of the same patients under another name would spend from a fresh one.
        raise ValueError("the coordinator's run config names the data file "
                         f"({task.data_path}); this hospital (its node config names "
                         f"{', '.join(configured)}) reads only data its operator names: "
                         "node config data-path or loader, with the dataset-id of its "
                         "patients")
    dataset_id = str(nc.get("dataset-id", ""))
    own_policy = hospital_policy_of(nc)
    if own_path or loader:
        # Before any data is read: the budget's key is the operator's name for the data,
        # and a declared class count is compared with the model, not with the labels.
        check_own_dataset_id(task.dataset, own_path, loader, dataset_id,
                             Path(str(state_dir)) if state_dir else None)
        _, num_classes, kind = tasks.model_spec(task)
        own_policy.admit_model(kind, num_classes)
    elif dataset_id:
        check_dataset_id(dataset_id, Path(str(state_dir)) if state_dir else None)
    model = tasks.build_model(task)
    held_out = None
    source = ""
    patient_ids = held_out_ids = None
    if own_path or loader:
        if own_path:
            own = tasks.own_data(task, own_path)
            if own_policy.privacy_unit == "patient" and task.dataset == "imagefolder":
                from bract.data.imagefolder import check_patients_known

                check_patients_known(
                    [*own.train_columns.get("patient_id", ()),
                     *own.test_columns.get("patient_id", ())], own_path)
        else:
            own = tasks.check_fits_model(task, load_with(loader, nc), f"loader {loader}")
        train_loader = tasks.loader_of(task, own.x_train, own.y_train)
        patient_ids = own.train_columns.get("patient_id")
        held_out_ids = own.test_columns.get("patient_id")
        held_out = tasks.loader_of(task, own.x_test, own.y_test).dataset
    else:
        source = dataset_source(task)
        train_loader = tasks.hospital_loader(task, partition_id(nc))
    if own_policy.privacy_unit == "patient":
        if patient_ids is None:
            raise ValueError(
                "this hospital's policy protects patients (privacy_unit 'patient') but its "
                "data names no patient per record: its loader must return "
                "FederatedDataset(train_columns={'patient_id': ...}), one id per training "
                "record")
        patient_ids = [str(p) for p in patient_ids]
        if held_out_ids is not None:
            held_out_ids = [str(p) for p in held_out_ids]
    else:
        patient_ids = held_out_ids = None
    return HospitalSetup(
        public_size=own_policy.public_dataset_size,
        patient_ids=patient_ids,
        dataset_id=dataset_id or source,
        model=model,
        optimizer=tasks.make_optimizer(task, model),
        train_loader=train_loader,
        criterion=tasks.make_criterion(task),
        client_id=client_id,
        held_out=held_out,
        held_out_patient_ids=held_out_ids,
        legacy_ledger_unit=own_policy.legacy_ledger_unit,
        state_dir=Path(str(state_dir)) if state_dir else (
            state_root / client_id if state_root is not None else None
        ),
    )


def partition_id(node_config: Mapping[str, Any]) -> int:
    """The node config's ``partition-id``: the partition of the run's bundled dataset a
    hospital without data of its own (no ``data-path``, no ``loader``) trains on.

    Raises ``ValueError`` in one line naming the settings when it is missing (the node
    config then names no data at all) or not a whole number; the message holds nothing
    of the hospital's but the value its operator wrote."""
    if "partition-id" not in node_config:
        raise public(ValueError("this SuperNode's node config names no data to train on: "
                                "set data-path (the hospital's own file) or loader (its own "
                                "Python loader), or partition-id (its partition of the run's "
                                "bundled dataset)"))
    value = node_config["partition-id"]
    try:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise ValueError(f"this SuperNode's node config partition-id must be a whole number "
                         f"(0, 1, ...), got {str(value)[:40]!r}")
    return number


def load_with(loader: str, node_config: Mapping[str, Any]) -> Any:
    """Call the hospital's own Python loader ``"package.module:function"`` (node config
    ``loader``) with its node config; it returns a :class:`bract.data.FederatedDataset`
    (its training split, and its held-out split for evaluation, possibly empty), whose
    construction checked (and converted) its arrays' types, shapes and labels.

    Raises ``ValueError`` in one line for a malformed or unimportable ``loader`` or a
    loader that returns anything else; each carries a ``public_reason`` naming the
    problem without the loader's name (which the hospital's operator chose). An
    exception the loader itself raises leaves the hospital as its type's name only."""
    import importlib

    from bract.data import FederatedDataset

    module_name, _, function = loader.partition(":")
    if not module_name or not function:
        raise public(ValueError(f"node config loader {loader!r} must read "
                                "'package.module:function'"),
                     "the hospital's node config loader must read 'package.module:function' "
                     "(details in its own log)")
    try:
        fn = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as exc:
        raise public(ValueError(f"node config loader {loader!r} cannot be imported: {exc}"),
                     "the hospital's node config loader cannot be imported (details in its "
                     "own log)") from None
    data = fn(dict(node_config))
    if not isinstance(data, FederatedDataset):
        returned = type(data).__name__
        raise public(ValueError(f"loader {loader!r} returned {returned}, not a "
                                "bract.data.FederatedDataset"),
                     f"the hospital's loader returned {returned}, not a "
                     "bract.data.FederatedDataset (details in its own log)")
    return data


def dataset_source(task: tasks.TaskConfig) -> str:
    """The data a built-in task's hospital trains on, as a budget key: the dataset and
    its file. Neither the seed nor the partition scheme enters it, so a new split of
    the same source spends from the same lifetime budget (the conservative choice:
    its patients overlap)."""
    if not task.data_path:
        return task.dataset
    return f"{task.dataset}:{Path(task.data_path).expanduser().resolve()}"


def path_derived_key(dataset: str, own_path: str, loader: str) -> str:
    """The key a hospital's own data (node config ``data-path`` or ``loader``) has when
    its source names it: ``<dataset>:<resolved data-path>`` or ``loader:<loader>``. A
    state directory may hold such data's ledger under it (written for a node config
    without a ``dataset-id``); ``dataset-id`` set to this very string keeps the budget
    in the same directory (:func:`~bract.flower.client.privacy_dir` of the same key)."""
    if own_path:
        return f"{dataset}:{Path(own_path).expanduser().resolve()}"
    return f"loader:{loader}"


def _holds_ledger(directory: Path) -> bool:
    return any((directory / name).exists() for name in (STATE_FILE, LEDGER_FILE))


def _known_datasets(state_dir: Path) -> list[str]:
    """The datasets whose ledgers ``state_dir`` holds: each one's recorded dataset id,
    or, for a ledger that records none, its directory and how its id reads."""
    root = Path(state_dir) / DATASETS_DIR
    found = []
    for d in sorted(root.iterdir()) if root.is_dir() else ():
        if not _holds_ledger(d):
            continue
        try:
            recorded = json.loads((d / STATE_FILE).read_text(encoding="utf-8"))["dataset-id"]
            found.append(f"dataset-id {str(recorded)!r}")
        except (OSError, ValueError, KeyError, TypeError):
            found.append(f"directory {d} (its id is the '<dataset>:<resolved data-path>' or "
                         "'loader:<loader>' it was written for, its name begins with it)")
    return found


def check_dataset_id(dataset_id: str, state_dir: Path | None = None) -> None:
    """Refuse (``DataError``, before any data is read) a node config ``dataset-id`` that
    :func:`~bract.flower.client.dataset_id_problem` refuses: blank, with whitespace at
    either end, or with a control or invisible character, each of which would keep a
    second budget for the same patients under a text that reads the same."""
    from bract.data.errors import DataError

    problem = dataset_id_problem(dataset_id, state_dir)
    if problem:
        raise DataError(f"this hospital's node config: {problem}",
                        public_reason="this hospital's node config names a dataset-id "
                                      "its privacy budget cannot be kept under (blank, "
                                      "whitespace at an end, an invisible character or a "
                                      "look-alike Unicode form); its operator must correct "
                                      "it")


def check_own_dataset_id(dataset: str, own_path: str, loader: str, dataset_id: str,
                         state_dir: Path | None) -> None:
    """Refuse a hospital on its own data whose budget would have no stable name.

    A hospital that serves its own data keeps its lifetime budget under its operator's
    name for the patients' dataset (node config ``dataset-id``), a name that stays the
    same when the data is moved, renamed, re-exported or read through a loader instead
    of a file. Guarantee: raises ``DataError`` (before any data is read) when
    ``dataset_id`` is empty, naming, when ``state_dir`` holds a ledger of this
    ``data-path`` or ``loader`` under its :func:`path_derived_key`, the exact
    ``dataset-id`` that continues it; and when ``dataset_id`` names a dataset with no
    ledger yet while that path-derived ledger exists, so naming the data never starts
    a spent budget from nothing; and (:func:`check_dataset_id`) when ``dataset_id``
    begins or ends with whitespace or holds a control or invisible character. The
    reply's reason (``public_reason``) names no path.
    """
    from bract.data.errors import DataError

    source = "data-path" if own_path else "loader"
    old_key = path_derived_key(dataset, own_path, loader)
    spent = (state_dir is not None and old_key != dataset_id
             and _holds_ledger(privacy_dir(state_dir, old_key)))
    public = ("this hospital's node config names its own data but no dataset-id its "
              "privacy budget can be kept under; its operator must set one (details in its "
              "own log)")
    if not dataset_id.strip():
        if spent:
            raise DataError(
                f"this hospital's node config names its own data ({source}) but no "
                f"dataset-id, and its state directory holds this {source}'s ledger under "
                f"the key {old_key!r}: set node config dataset-id=\"{old_key}\" to continue "
                "that budget, and keep that value when the data is moved or re-exported",
                public_reason=public)
        known = _known_datasets(state_dir) if state_dir is not None else []
        raise DataError(
            f"this hospital's node config names its own data ({source}) but no dataset-id: "
            "name its patients' dataset (node config dataset-id=\"<name>\", e.g. "
            "dataset-id=\"st-mary-chest-xray\"), a name that stays the same when the data "
            "is moved, renamed or re-exported; its lifetime privacy budget is kept under "
            "that name" + (f" (its state directory holds the ledgers of {', '.join(known)}: "
                           "if these patients are one of them, use that id)" if known else ""),
            public_reason=public)
    check_dataset_id(dataset_id, state_dir)
    if spent and state_dir is not None and not _holds_ledger(privacy_dir(state_dir,
                                                                          dataset_id)):
        raise DataError(
            f"this hospital's state directory holds this {source}'s ledger under the key "
            f"{old_key!r} ({privacy_dir(state_dir, old_key)}) and none under dataset-id "
            f"{dataset_id!r}: set dataset-id=\"{old_key}\" to continue that budget, or "
            f"move that directory's files into {privacy_dir(state_dir, dataset_id)} to "
            f"continue it under {dataset_id!r}",
            public_reason="this hospital's state directory holds its data's ledger under "
                          "another key than its dataset-id; its operator must choose which "
                          "continues (details in its own log)")


def _setup_from_context(ctx: Context) -> HospitalSetup:
    import torch

    torch.set_num_threads(1)
    fed = FederationConfig.from_run_config(ctx.run_config)
    task = fed.task()
    # The sizes the coordinator asks for are held to the hospital's own limits before
    # its model is built or its data read (the refusal depends on neither).
    hospital_policy_of(ctx.node_config).admit_task(task, fed.policy())
    return hospital_setup(task, ctx, fed.out / HOSPITALS_DIR)


def _policy_from_context(ctx: Context) -> PrivacyPolicy:
    """What the coordinator asks, admitted by the hospital's own policy (or refused:
    :class:`PolicyRefusal` becomes the reply's error, with its reason)."""
    return hospital_policy_of(ctx.node_config).admit(policy_from_run_config(ctx.run_config))


#: Node-config keys a hospital's operator sets for secure aggregation.
NODE_SECAGG_KEYS = ("secagg-id", "identity-key", "roster")


def identity_from_node_config(node_config: Mapping[str, Any]) -> SecAggIdentity:
    """A hospital's secagg identity from files its operator named in its node config.

    ``secagg-id``: its id in the roster; ``identity-key``: its Ed25519 private key
    file; ``roster``: its own copy of the roster (never taken from the server);
    its policy file (node config ``policy``) sets the colluding hospitals it
    tolerates (``secagg_colluders``, default ``floor((R - 1) / 3)`` of the roster's R)
    and the honest updates per sum (``secagg_min_honest``); it refuses any round
    weaker than that.
    """
    missing = [k for k in NODE_SECAGG_KEYS if k not in node_config]
    if missing:
        raise ValueError(
            f"secure aggregation needs node config {missing} on this SuperNode "
            "(see docs/deployment.md), or run with secagg=false"
        )
    roster = read_roster(Path(str(node_config["roster"])))
    own = hospital_policy_of(node_config)
    return SecAggIdentity(
        int(node_config["secagg-id"]),
        read_identity_key(Path(str(node_config["identity-key"]))),
        roster.keys,
        roster.federation_id,
        ClientPolicy(colluders=own.secagg_colluders, min_honest=own.secagg_min_honest,
                     clip_out_of_range=True),
    )


def _simulated_identity(ctx: Context) -> SecAggIdentity | None:
    """A hospital of Flower's simulation engine (``flwr run`` locally: its node config
    names a partition and no identity): the identity the ServerApp made for it, as
    ``bract simulate`` does, under the run's output (the simulation plays every
    operator). ``None`` when there is none (then the node config must name one)."""
    nc = ctx.node_config
    if operator_keys_in(nc) or "partition-id" not in nc:
        return None  # a hospital its operator configured never takes coordinator keys
    fed = FederationConfig.from_run_config(ctx.run_config)
    if not identity_file(fed.out, int(nc["partition-id"])).exists():
        return None
    return simulated_identity(ctx, fed.out, fed.secagg_colluders)


def _identity_from_context(ctx: Context) -> SecAggIdentity:
    return _simulated_identity(ctx) or identity_from_node_config(ctx.node_config)


def _signer_from_context(ctx: Context) -> SecAggIdentity | None:
    """The identity that signs this hospital's ledger: its node config's, when it has one
    (or, in Flower's simulation engine, the one its ServerApp made for it)."""
    if "identity-key" not in ctx.node_config:
        return _simulated_identity(ctx)  # None for a configured node without a key
    return identity_from_node_config(ctx.node_config)


def _release_from_context(ctx: Context) -> str:
    requested = FederationConfig.from_run_config(ctx.run_config).release_metrics
    return hospital_policy_of(ctx.node_config).admit_release(requested)


def _plain_allowed(ctx: Context) -> bool:
    """Whether this hospital takes part in plain FedAvg: one its operator configured
    (:func:`~bract.flower.hospital_policy.operator_keys_in`) only when its policy says
    ``allow_plain_aggregation``; a simulated one whenever the run is plain."""
    nc = ctx.node_config
    return not operator_keys_in(nc) or hospital_policy_of(nc).allow_plain_aggregation


#: The hospitals of ``flwr run`` and ``bract deploy``: each reads what its operator
#: configured in its node config, and admits only what its own policy allows.
CONFIGURED_HOSPITALS = Hospitals(
    setup=_setup_from_context, policy=_policy_from_context,
    release_metrics=_release_from_context, secagg=_identity_from_context,
    identity=_signer_from_context, allow_plain_aggregation=_plain_allowed,
)
client_app = apps.client_app(CONFIGURED_HOSPITALS)
server_app = ServerApp()


class RunRefusedError(ValueError):
    """The ServerApp refused its run before any round: a run-config value out of range,
    a SuperNode count other than ``clients``, an ``out`` that holds a run, data no
    hospital could train on. Raised (Flower then marks the run failed), and logged by
    Flower as one line that names the cause, not a traceback."""


class _OneLineRefusal(logging.Filter):
    """Flower logs an exception out of a ServerApp with its traceback; a
    :class:`RunRefusedError` is the run's settings, not a fault in code, so its record
    becomes one line: ``bract refused the run: <why>``."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, RunRefusedError):
            record.msg, record.args = "bract refused the run: %s", (str(exc),)
            record.exc_info = record.exc_text = None
        return True


logging.getLogger("flwr").addFilter(_OneLineRefusal())


def _in_simulation(grid: Grid) -> bool:
    """Whether the ServerApp runs in Flower's simulation engine (its in-memory Grid)."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid)


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    from bract.flower.object_pulls import shorten_object_pull_backoff

    shorten_object_pull_backoff()  # replies are pulled as soon as they are all there
    rc = dict(context.run_config)
    try:
        fed = FederationConfig.from_run_config(rc)
        task = fed.task()
        roster = read_roster(Path(fed.roster)) if fed.roster else None
        simulated = _in_simulation(grid)
        if simulated:
            nodes = len(grid.get_node_ids())
            if nodes != fed.clients:
                raise ValueError(
                    f"the run config asks for clients={fed.clients} but Flower's simulation "
                    f"started {nodes} SuperNodes: run flwr run . --federation-config "
                    f"\"num-supernodes={fed.clients}\" (or --run-config clients={nodes})")
        if not fed.resume:
            # A run never overwrites an earlier one's ledger, checkpoint or hospitals' state.
            set_aside_previous_run(fed.out, "refuse", choices=(
                "--run-config resume=true continues it; another out (--run-config "
                "out=DIR) starts a new run"))
        if simulated and fed.secagg and roster is None:
            # Flower's simulation engine (flwr run locally): every hospital runs here, so
            # this process plays their operators, as bract simulate does.
            roster, _ = simulated_identities(fed.out, fed.clients, resume=fed.resume)
        cfg = apps.server_config(fed, roster, run_config={**task.to_plain(), **rc},
                                 resume=fed.resume, show_progress=fed.progress)
    except (ValueError, OSError) as exc:  # the run's settings or files: one line, no trace
        raise RunRefusedError(str(exc)) from None
    run_federation(grid, apps.initial_weights(task), apps.central_evaluation(task), cfg)
