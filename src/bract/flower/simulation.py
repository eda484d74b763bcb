"""In-process Flower simulation (Ray backend) of a federation of hospitals.

Builds the hospitals' ``ClientApp`` and the ``ServerApp`` from a
:class:`~bract.tasks.TaskConfig` and a :class:`~bract.flower.client.PrivacyPolicy`
and runs them with ``flwr.simulation.run_simulation``: no servers to start.

Every simulated hospital gets an Ed25519 identity (written, owner-only, to
``OUT/hospitals/<id>/identity.key``) that signs its ledger entries, plain runs
included, and the roster of them goes to ``OUT/roster.json`` for
``bract audit verify``; a resumed run reuses both.

The simulated hospitals own ``OUT/hospitals``: their keys and their lifetime
privacy state per dataset. A new run of the same hospitals (``previous_run=
"new-run"``) is a new federation (new federation id and roster) whose
hospitals keep their keys and continue spending their budgets; only a new
simulated federation (``"archive"``) starts hospitals afresh.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context

from bract import tasks
from bract.flower import apps
from bract.flower.app import HOSPITALS_DIR, hospital_setup
from bract.flower.checkpoint import load_checkpoint_state
from bract.flower.client import HospitalSetup, PrivacyPolicy
from bract.flower.config import FederationConfig
from bract.flower.faults import DROP_STAGES, dropout_mod
from bract.flower.run_dir import PREVIOUS_RUN, SECAGG_VIEW_DIR, set_aside_previous_run
from bract.flower.secagg_client import (
    SecAggIdentity,
)
from bract.flower.server import make_server_app
from bract.flower.simulated_operators import simulated_identities
from bract.privacy import PrivacyError, TrainingPlan, calibrate, threads
from bract.records.roster import Roster
from bract.secagg import ClientPolicy


@dataclass(frozen=True)
class SimulationConfig:
    """Everything ``bract simulate`` runs: the federation (task, privacy ask, secure
    aggregation, output in ``federation.out``) and how the simulation runs it."""

    federation: FederationConfig
    save_model: Path | None = None
    show_progress: bool = True
    resume: bool = False
    #: What to do when the output already holds a run and ``resume`` is off:
    #: ``"refuse"`` (the default: say so and stop), ``"new-run"`` (move the run's
    #: records aside to ``<out>-<time>``; the same hospitals join a new federation
    #: and continue their budgets) or ``"archive"`` (move everything aside: a new
    #: simulated federation of new hospitals). A previous run's ledger, checkpoint and
    #: hospitals' privacy state are never deleted.
    previous_run: str = "refuse"
    client_threads: int = 1
    drop_rate: float = 0.0
    drop_stage: str = "mask"
    #: Record the server's view of every secure round in ``out/secagg_view`` (for
    #: ``bract audit secagg --view``).
    record_secagg: bool = False
    #: A number of records every simulated hospital declares public (at least its
    #: true count): its sample rate, steps, noise and FedAvg weight come from it.
    public_size: int | None = None
    #: What every simulated hospital protects: each ``"record"``, or each ``"patient"``
    #: (the dataset's patient ids; an image folder's patient sub-folders or DICOM
    #: PatientID): Poisson sampling over patients, per-patient clipping and epsilon.
    privacy_unit: str = "record"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def out_dir(self) -> Path:
        """The run's output directory (``federation.out``)."""
        return Path(self.federation.out)

    @functools.cached_property
    def task(self) -> tasks.TaskConfig:
        """The task every simulated hospital trains."""
        return self.federation.task()

    @functools.cached_property
    def policy(self) -> PrivacyPolicy:
        """The privacy policy every simulated hospital trains under (its operator, the
        simulation, adopts the coordinator's ask)."""
        return self.federation.policy()

    def to_plain(self) -> dict[str, Any]:
        """Plain dict for report.json's ``config``."""
        policy = asdict(self.policy)
        fed = self.federation
        return {
            **self.task.to_plain(),
            **{k: v for k, v in policy.items() if k != "extra"},
            "non_private": fed.non_private,
            "out": str(self.out_dir),
            "save_model": str(self.save_model) if self.save_model else None,
            "secagg": fed.secagg,
            "secagg_clip": fed.secagg_clip,
            "secagg_graph": fed.secagg_graph,
            "secagg_colluders": fed.secagg_colluders,
            "secagg_dropouts": fed.secagg_dropouts,
            "secagg_abort_limit": fed.secagg_abort_limit,
            "drop_rate": self.drop_rate,
            "drop_stage": self.drop_stage,
            "release_metrics": fed.release_metrics,
            "record_secagg": self.record_secagg,
            "public_size": self.public_size,
            "privacy_unit": self.privacy_unit,
            **self.extra,
        }


def hospital_cores(hospitals: int, client_threads: int, cores: int) -> int:
    """The cores one simulated hospital may count on when ``hospitals`` of them share
    ``cores`` (the engine runs one per core at a time, as ``client_resources`` asks),
    each training with ``client_threads`` torch threads."""
    at_once = max(1, min(hospitals, cores))
    return max(client_threads, cores // at_once)


def train_beside_other_hospitals(hospitals: int, client_threads: int) -> None:
    """Set this process up as one of ``hospitals`` simulated hospitals training side by
    side on this machine: ``client_threads`` torch threads, and its share of the cores
    declared, so a core another hospital uses does not count as free for this one's
    noise draws or per-example rules (:mod:`bract.privacy.threads`)."""
    torch.set_num_threads(client_threads)
    threads.declare_cores(hospital_cores(hospitals, client_threads, threads.machine_cores()))


def _setup_fn(cfg: SimulationConfig) -> Callable[[Context], HospitalSetup]:
    def setup(ctx: Context) -> HospitalSetup:
        train_beside_other_hospitals(cfg.task.clients, cfg.client_threads)
        setup = hospital_setup(cfg.task, ctx, cfg.out_dir / HOSPITALS_DIR)
        patients = (tasks.hospital_patients(cfg.task, int(ctx.node_config["partition-id"]))
                    if cfg.privacy_unit == "patient" else None)
        return replace(setup, public_size=cfg.public_size, patient_ids=patients)

    return setup




def _identities(cfg: SimulationConfig) -> tuple[Roster, list[SecAggIdentity]]:
    return simulated_identities(cfg.out_dir, cfg.task.clients, resume=cfg.resume)


def fixed_noise_epsilon(cfg: SimulationConfig, plan: TrainingPlan, rounds: int) -> float:
    """The ε a hospital with ``plan`` has spent after ``rounds`` rounds at the run's fixed
    noise multiplier, each with its metrics release when metrics leave (the policy's
    accountant and δ)."""
    from bract.privacy import PrivacyLedger

    policy = cfg.policy
    release = policy.metrics_release() if cfg.federation.release_metrics != "none" else None
    ledger = PrivacyLedger()
    for r in range(1, rounds + 1):
        if release is not None:
            ledger = ledger.append(release.event(r, policy.delta, "", cfg.privacy_unit))
        ledger = ledger.append(plan.round_event(policy.noise_multiplier,
                                                max_grad_norm=policy.max_grad_norm,
                                                delta=policy.delta, round=r))
    return ledger.epsilon(policy.delta, policy.accountant)


def validate(cfg: SimulationConfig) -> None:
    """Fail fast, before Ray starts, on a configuration no hospital could run."""
    from bract.flower.config import device_problem

    problem = device_problem(cfg.policy.device)
    if problem:  # every hospital here would fail its first round on it
        raise ValueError(f"device {problem}")
    ds = tasks.dataset_for(cfg.task)
    if cfg.task.clients > ds.n_train:
        raise PrivacyError(
            f"{cfg.task.clients} hospitals but only {ds.n_train} training examples: some "
            "hospital would get an empty partition; use fewer hospitals or more samples."
        )
    # The task's partition scheme must give every hospital data (a clear error otherwise).
    smallest = min(len(part) for part in tasks.partitions(cfg.task))
    largest = max(len(part) for part in tasks.partitions(cfg.task))
    if cfg.privacy_unit not in ("record", "patient"):
        raise ValueError(f"privacy unit must be 'record' or 'patient', got {cfg.privacy_unit!r}")
    if cfg.privacy_unit == "patient":
        patients = [len(set(tasks.hospital_patients(cfg.task, i)))
                    for i in range(cfg.task.clients)]
        smallest, largest = min(patients), max(patients)
    if cfg.public_size is not None and cfg.public_size < largest:
        raise PrivacyError(f"--public-size {cfg.public_size} is below a hospital's number of "
                           f"records ({largest}): the public bound must be at least each "
                           "hospital's count")
    tasks.build_model(cfg.task)  # a model the task cannot build (e.g. an image side) is refused
    plan = TrainingPlan(cfg.policy.rounds, cfg.policy.local_epochs,
                        cfg.public_size or smallest, cfg.task.batch_size, unit=cfg.privacy_unit)
    cfg.policy.budget()
    if cfg.policy.noise_multiplier == 0 and not cfg.policy.allow_non_private:
        raise PrivacyError("noise multiplier 0 is non-private; allow it explicitly.")
    if cfg.policy.noise_multiplier is None and not cfg.resume:
        # What every hospital will calibrate, for the one with the least data (the
        # hardest plan): an unreachable target is refused here, not in every hospital.
        release = cfg.policy.metrics_release() if cfg.federation.release_metrics != "none" \
            else None
        alongside = [] if release is None else [
            release.event(r, cfg.policy.delta, "", cfg.privacy_unit)
            for r in range(1, plan.rounds + 1)]
        calibrate(cfg.policy.target_epsilon, cfg.policy.delta, plan,
                  accountant=cfg.policy.accountant, alongside=alongside)
    sigma = cfg.policy.noise_multiplier
    if sigma and not cfg.resume and cfg.previous_run != "new-run":
        # A fixed noise level every hospital would refuse from round 1 on (even the one
        # with the most data, whose rounds cost least): nothing could train.
        most = TrainingPlan(plan.rounds, cfg.policy.local_epochs, cfg.public_size or largest,
                            cfg.task.batch_size, unit=cfg.privacy_unit)
        first = fixed_noise_epsilon(cfg, most, 1)
        if first > cfg.policy.target_epsilon:
            raise PrivacyError(
                f"--noise-multiplier {sigma:g} spends ε={first:.3g} in round 1 alone (at "
                f"δ={cfg.policy.delta:g}, for the hospital with the most data), past "
                f"--target-epsilon {cfg.policy.target_epsilon:g}: every hospital would "
                "refuse every round. Raise the noise or the target, or let bract "
                "calibrate the noise (leave out --noise-multiplier)")
    if cfg.resume:
        load_checkpoint_state(cfg.out_dir, cfg.to_plain())
    if cfg.drop_stage not in DROP_STAGES:
        raise ValueError(f"--drop-stage must be one of {sorted(DROP_STAGES)}")
    if not 0.0 <= cfg.drop_rate <= 1.0:
        raise ValueError(f"--drop-rate must lie in [0, 1] (got {cfg.drop_rate})")
    if not cfg.federation.secagg and cfg.drop_rate and cfg.drop_stage != "config":
        raise ValueError("without secure aggregation the only drop stage is 'config'")
    if cfg.previous_run not in PREVIOUS_RUN:
        raise ValueError(f"previous_run must be one of {PREVIOUS_RUN}, got {cfg.previous_run!r}")
    if cfg.record_secagg and not cfg.federation.secagg:
        raise ValueError("--record-secagg records secure rounds: it needs --secagg")


def check_output(cfg: SimulationConfig) -> None:
    """Refuse (``ValueError`` or ``CheckpointError`` naming the problem) a run whose
    files could not be written or whose output could not take it, reading only.

    Guarantee: it creates, moves and writes nothing, so a run it refuses leaves the
    filesystem as it was. It checks the output directory (not a file, creatable and
    writable), ``save_model`` (a ``.npz`` file name whose folder can be made and
    written), and an earlier run in the output: refused with ``previous_run="refuse"``,
    its hospitals' identity keys readable for ``"new-run"`` (they join the new run
    after its records are moved aside) and the run's roster and keys readable on
    ``resume``. :func:`run` calls it after :func:`validate` and before it moves an
    earlier run aside or creates anything."""
    from bract.argtypes import output_dir_problem
    from bract.flower.run_dir import holds_run
    from bract.flower.secagg_client import read_identity_key
    from bract.flower.simulated_operators import identity_file
    from bract.secagg import SecAggError
    from bract.secagg.crypto import SigningKey

    problem = output_dir_problem(cfg.out_dir, create=False)
    if problem:
        raise ValueError(problem)
    model = cfg.save_model
    if model is not None:
        if model.suffix != ".npz":
            raise ValueError(f"--save-model must end in .npz (got {model})")
        if model.is_dir():
            raise ValueError(f"--save-model {model} is an existing directory: name a .npz "
                             "file")
        problem = output_dir_problem(model.parent, "--save-model's folder", create=False)
        if problem:
            raise ValueError(problem)
        if model.exists() and not os.access(model, os.W_OK):
            raise ValueError(f"--save-model {model} cannot be written (not writable): name "
                             "a writable file")
    if cfg.resume:
        _identities(cfg)  # reads the roster and keys (CheckpointError naming them)
        return
    if not holds_run(cfg.out_dir):
        return
    if cfg.previous_run == "refuse":
        set_aside_previous_run(cfg.out_dir, "refuse")  # raises ValueError naming the choices
    if cfg.previous_run == "new-run":
        for i in range(cfg.task.clients):
            key = identity_file(cfg.out_dir, i)
            if not key.exists():
                continue
            try:
                SigningKey.from_bytes(read_identity_key(key))
            except (OSError, ValueError, SecAggError) as exc:
                raise ValueError(
                    f"--new-run: hospital-{i}'s identity key {key} is unreadable ({exc}); "
                    "its ledger entries are signed with it: restore it, or start new "
                    "hospitals with --new-federation") from None
        change = split_change(cfg)
        if change:
            raise ValueError(change)


#: The split the simulated hospitals' budgets were spent on, in ``OUT/hospitals``.
SPLIT_FILE = "split.json"
#: The settings that decide which records each hospital holds (named when they change).
_SPLIT_SETTINGS = ("dataset", "data_path", "n_samples", "image_size", "clients", "partition",
                   "alpha", "partition_column", "seed")


def split_record(task: tasks.TaskConfig) -> dict[str, Any]:
    """Which records each simulated hospital holds: a SHA-256 digest of each hospital's
    training inputs and labels, with the settings that decided them."""
    ds = tasks.dataset_for(task)
    digests = []
    for idx in tasks.partitions(task):
        h = hashlib.sha256()
        for array in (ds.x_train[idx], ds.y_train[idx]):
            h.update(np.ascontiguousarray(array).tobytes())
        digests.append(h.hexdigest())
    return {"settings": {k: getattr(task, k) for k in _SPLIT_SETTINGS}, "hospitals": digests}


def split_change(cfg: SimulationConfig) -> str | None:
    """Why a new run of the hospitals in ``cfg.out_dir`` (``previous_run="new-run"``)
    must be refused: its split gives some hospital other records than those its budget
    was spent on, or the hospitals spent budgets on a split nobody recorded (``None``:
    every hospital holds what it held, or no budget was spent).

    Guarantee: a refused new run keeps each record's privacy loss bounded by one
    hospital's lifetime budget. Otherwise a record could be trained on under two
    hospitals' budgets (one before and one after the re-split), and no reported ε would
    bound it."""
    path = cfg.out_dir / HOSPITALS_DIR / SPLIT_FILE
    if not path.exists():
        if not any((cfg.out_dir / HOSPITALS_DIR).glob("*/datasets/*/ledger.jsonl")):
            return None  # no budget spent yet: nothing to keep apart
        return (f"{cfg.out_dir / HOSPITALS_DIR} holds the hospitals' spent budgets but no "
                f"record of which records each holds ({SPLIT_FILE}: written by every run "
                "since bract checks it, or deleted): a new run could give a hospital records "
                "another's budget was spent on. Start new hospitals with --new-federation")
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
        old_settings, old_digests = before["settings"], before["hospitals"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"the hospitals' record of their data split ({path}) is unreadable ({exc})"
    now = split_record(cfg.task)
    if now["hospitals"] == old_digests:
        return None
    changed = [f"{k} {now['settings'][k]!r} (was {old_settings.get(k)!r})"
               for k in _SPLIT_SETTINGS if old_settings.get(k) != now["settings"][k]]
    what = ", ".join(changed) if changed else "the data itself changed"
    return (f"--new-run keeps the hospitals and their spent budgets, but this run splits the "
            f"data differently ({what}): a record would be trained on under two hospitals' "
            "budgets and no reported ε would bound it. Keep the split settings, or start "
            "new hospitals with --new-federation")


def write_split(cfg: SimulationConfig) -> None:
    """Record which records each simulated hospital holds (:func:`split_change`)."""
    from bract.flower.files import atomic_write_text

    folder = cfg.out_dir / HOSPITALS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / SPLIT_FILE, json.dumps(split_record(cfg.task), indent=1))


#: Below this many records (or patients) per hospital a run gets a warning.
FEW_RECORDS = 20


def warnings_for(cfg: SimulationConfig) -> list[str]:
    """What is allowed but almost certainly not what the user meant, one line each: a
    hospital with very little data, an expected batch as large as a hospital's data."""
    sizes = [len(part) for part in tasks.partitions(cfg.task)]
    smallest = min(sizes)
    out = []
    if smallest < FEW_RECORDS:
        out.append(f"the smallest of the {cfg.task.clients} hospitals holds {smallest} "
                   f"record{'' if smallest == 1 else 's'}: DP noise calibrated for so few "
                   "swamps what they can learn (fewer hospitals, or more samples)")
    unit = cfg.privacy_unit
    units = smallest if unit == "record" else min(
        len(set(tasks.hospital_patients(cfg.task, i))) for i in range(cfg.task.clients))
    if cfg.policy.delta * units >= 1:
        out.append(f"δ={cfg.policy.delta:g} is not below 1/n for the hospital with the least "
                   f"data ({units} {unit}s): a release that publishes one {unit} in full "
                   "meets (ε, δ) with such a δ. Choose δ well below 1/n (e.g. 1e-5)")
    sigma = cfg.policy.noise_multiplier
    if sigma and not cfg.resume and cfg.previous_run != "new-run":
        least = TrainingPlan(cfg.policy.rounds, cfg.policy.local_epochs,
                             cfg.public_size or units, cfg.task.batch_size,
                             unit=cfg.privacy_unit)
        spent = fixed_noise_epsilon(cfg, least, cfg.policy.rounds)
        if spent > cfg.policy.target_epsilon:
            out.append(f"--noise-multiplier {sigma:g} spends ε={spent:.3g} over "
                       f"{cfg.policy.rounds} rounds for the hospital with the least data, "
                       f"past --target-epsilon {cfg.policy.target_epsilon:g}: such hospitals "
                       "refuse the rounds that would pass it (leave out --noise-multiplier "
                       "to calibrate the noise for every round)")
    batch = cfg.task.batch_size or 0
    if batch >= smallest:
        out.append(f"--batch-size {batch} is at least a hospital's whole data ({smallest} "
                   "records): every step samples all of it (rate 1), so privacy gains "
                   "nothing from sampling and each round is one step per epoch")
    return out


@contextlib.contextmanager
def keep_sigterm_handler() -> Iterator[None]:
    """Within the block, Ray's start-up (``ray.init`` and the head node it starts in
    this process) leaves an installed SIGTERM handler in place instead of replacing it
    with Ray's own (``sys.exit`` from a signal handler, which under Flower's simulation
    ends in an abort and a page of Ray's output). So a SIGTERM to ``bract simulate``
    reaches :func:`bract.flower.interrupt.interruptible`'s stop (every child stopped,
    one ``interrupted:`` line, exit 143). Ray's driver also installs a C++ failure
    handler for SIGTERM in ``ray.init`` (it prints ``*** SIGTERM received ...`` and a
    stack address before calling the previous handler); an installed Python handler
    is put back in its place right after ``ray.init``, so a SIGTERM prints only
    bract's line. Where no handler is installed (SIGTERM's default), Ray installs its
    own as usual."""
    try:
        import ray
        import ray._private.utils as ray_utils
    except ImportError:
        yield
        return
    original = getattr(ray_utils, "set_sigterm_handler", None)
    if original is None:
        yield
        return
    ray_init = ray.init

    def set_unless_installed(handler: Callable[..., Any]) -> None:
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            original(handler)

    def init_keeping_handler(*args: Any, **kwargs: Any) -> Any:
        installed = signal.getsignal(signal.SIGTERM)
        try:
            return ray_init(*args, **kwargs)
        finally:
            if (callable(installed) and threading.current_thread() is threading.main_thread()
                    and signal.getsignal(signal.SIGTERM) is installed):
                signal.signal(signal.SIGTERM, installed)  # over Ray's C++ handler

    ray_utils.set_sigterm_handler = set_unless_installed
    ray.init = init_keeping_handler
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = original
        ray.init = ray_init


def run(cfg: SimulationConfig, on_checked: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run the simulated federation; returns the report (also written to ``out_dir``).
    ``on_checked`` is called once every setting and the output passed their checks,
    before anything starts (e.g. to announce the run: a refused run announces none).

    A run never deletes an earlier one: ``resume=True`` continues the run in
    ``out_dir``; otherwise an ``out_dir`` that holds a run is refused, or moved aside
    whole with ``previous_run="archive"``.

    Guarantee: every setting and the output are checked (:func:`validate`,
    :func:`check_output`) before anything under ``out_dir`` is moved or created, so a
    refused run (``ValueError``, ``CheckpointError``) leaves the filesystem as it
    was.
    """
    validate(cfg)
    check_output(cfg)
    if on_checked is not None:
        on_checked()
    if not cfg.resume:
        set_aside_previous_run(cfg.out_dir, cfg.previous_run)
    from bract.argtypes import output_dir_problem

    problem = output_dir_problem(cfg.out_dir)  # makes it, and proves it writable
    if problem:
        raise ValueError(problem)
    if not cfg.resume or not (cfg.out_dir / HOSPITALS_DIR / SPLIT_FILE).exists():
        write_split(cfg)  # a resumed run has its first run's split (the settings are checked)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.ERROR)
    roster, identities = _identities(cfg)
    fed = cfg.federation
    server_cfg = apps.server_config(
        fed, roster, run_config=cfg.to_plain(), show_progress=cfg.show_progress,
        resume=cfg.resume, save_model=cfg.save_model,
        record_dir=cfg.out_dir / SECAGG_VIEW_DIR if cfg.record_secagg else None,
    )
    result: dict[str, Any] = {}
    server_app = make_server_app(lambda: apps.initial_weights(cfg.task),
                                 apps.central_evaluation(cfg.task), server_cfg,
                                 on_done=result.update)
    policy = ClientPolicy(colluders=fed.secagg_colluders, clip_out_of_range=True)

    def identity(ctx: Context) -> SecAggIdentity:
        return replace(identities[int(ctx.node_config["partition-id"])], policy=policy)

    # The simulation plays every hospital's operator: keys it made, the coordinator's
    # ask as each hospital's policy, each hospital's partition of the shared data.
    hospitals = apps.Hospitals(
        setup=_setup_fn(cfg), policy=cfg.policy, release_metrics=fed.release_metrics,
        secagg=identity if fed.secagg else None, identity=identity,
        mods=[dropout_mod(cfg.drop_rate, cfg.drop_stage, cfg.task.seed)] if cfg.drop_rate
        else [],
    )
    client_app = apps.client_app(hospitals)
    from flwr.simulation import run_simulation

    device = cfg.policy.device
    use_gpu = torch.cuda.is_available() and (device in (None, "auto") or device.startswith("cuda"))
    backend_config = {
        # On a GPU machine the hospitals share the GPU; Ray hides it when num_gpus is 0.
        "client_resources": {"num_cpus": 1, "num_gpus": 1.0 / cfg.task.clients if use_gpu else 0.0},
        "init_args": {"log_to_driver": False, "include_dashboard": False},
    }
    with warnings.catch_warnings(), keep_sigterm_handler():
        warnings.simplefilter("ignore")
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=cfg.task.clients,
            backend_config=backend_config,
        )
    if not result:
        raise RuntimeError(
            "the federation did not finish; see the messages above (report.json holds the "
            f"rounds that completed, in {cfg.out_dir})"
        )
    return result
