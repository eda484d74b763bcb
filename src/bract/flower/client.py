"""Hospital side: a Flower ``ClientApp`` that trains with DP-SGD and keeps its ledger.

A hospital developer supplies what they already have — a function that builds
their model, optimizer and DataLoader — and a :class:`PrivacyPolicy`; bract
does the rest: loads the global model, checks the budget before training,
trains with Opacus DP-SGD, records the mechanism events in its dataset's ledger
(on disk in its state directory, else in ``ctx.state``) across rounds, signs each
event into its hash-chained ledger (:mod:`bract.records.ledger`) with its identity
key, and replies with the update
and its privacy report. A refusal (budget spent) is a normal reply, not an error.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from bract.flower.files import atomic_write_text, make_directory
from bract.flower.reasons import failure_reason, public
from bract.flower.records import (
    GLOBAL_WEIGHTS,
    LOCAL_METRICS,
    LOCAL_WEIGHTS,
    PRIVACY_REPORT,
    ROUND_CONFIG,
    SECAGG_MAX_WEIGHT,
    STATE_EPSILONS,
    STATE_PRIVACY,
    TRAIN_INFO,
    privacy_report_record,
    record_to_weights,
    weights_to_record,
)
from bract.flower.secagg_client import (
    PLAIN_REFUSED,
    IdentityLike,
    PlainAggregationRefused,
    SecAggIdentity,
    advertise_handler,
    masks_this_reply,
    register_secagg,
    secagg_mod,
)
from bract.privacy import (
    DEFAULT_ACCOUNTANT,
    DpSgdEvent,
    MetricsRelease,
    PrivacyBudget,
    PrivacyError,
    PrivacyLedger,
    TrainingPlan,
    calibrate,
    epsilon_of,
)
from bract.privacy.accounting import carried_epsilons, carry_epsilons
from bract.privacy.metrics_release import DEFAULT_LOSS_BOUND, DEFAULT_METRICS_NOISE
from bract.records.ledger import (
    LedgerEntry,
    LedgerError,
    append_entry,
    check_chain,
    dumps_jsonl,
    loads_jsonl,
    read_ledger,
)

if TYPE_CHECKING:  # torch loads only where a hospital trains, not for secure-aggregation stages
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, Dataset


@dataclass
class HospitalSetup:
    """What a hospital brings: its model, optimizer, training data and loss."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_loader: DataLoader
    client_id: str
    criterion: nn.Module | None = None
    #: The hospital's own state directory: its privacy state (signed ledger and head)
    #: lives in ``state_dir/datasets/<dataset_id>``, so a restarted process, a resumed
    #: run, a new run or another federation on the same data never forgets spent budget.
    state_dir: Path | None = None
    #: The dataset whose patients this budget protects: its operator's name for it, one
    #: that stays the same when the data moves or is re-exported (a simulated hospital's:
    #: the data's source). Every run and federation that trains on it spends from one
    #: lifetime budget; ``""`` keeps the state directly in ``state_dir``, and with a
    #: name a ledger directly in ``state_dir`` is refused (:func:`check_state_layout`).
    dataset_id: str = ""
    #: The hospital's own held-out records (a Dataset of ``(x, y)``), on which it
    #: evaluates the global model it receives. The figures leave only through the
    #: hospital's metrics release, noised and accounted (bract.privacy.metrics_release).
    held_out: Dataset | None = None
    #: A number of records the hospital declares public, at least its true count
    #: (e.g. rounded up): sample rate, steps, calibrated noise and FedAvg weight come
    #: from it, so nothing the hospital releases is a function of its exact count.
    public_size: int | None = None
    #: The patient of each training record (in dataset order): the privacy unit is
    #: then the patient (Poisson sampling over patients, each patient's summed
    #: gradient clipped, epsilon per patient). ``None``: each record is the unit.
    patient_ids: Sequence[Hashable] | None = None
    #: The patient of each held-out record, under patient-level privacy (a patient's
    #: records in both splits are one unit of the metrics release).
    held_out_patient_ids: Sequence[Hashable] | None = None
    #: The privacy unit the runs that wrote this data's ledger before events recorded
    #: their unit protected (``"record"`` or ``"patient"``; the operator's statement,
    #: policy ``legacy_ledger_unit``). ``None``: such a ledger is refused, saying so.
    legacy_ledger_unit: str | None = None
    #: For datasets whose items are dicts (Flower Datasets): the keys of the inputs and
    #: the labels, e.g. ``("img", "label")``; the training and held-out data are then
    #: read as ``(inputs, labels)`` pairs (bract.privacy.batches).
    batch_keys: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        from bract.privacy.batches import PairDataset, check_batch_keys, pairs_of

        keys = check_batch_keys(self.batch_keys)
        if keys is not None:
            self.train_loader = pairs_of(self.train_loader, *keys)
            if self.held_out is not None:
                self.held_out = PairDataset(self.held_out, *keys)

    @property
    def privacy_unit(self) -> str:
        """What the hospital's epsilon is per: ``"patient"`` when it names each record's
        patient, ``"record"`` otherwise."""
        return "record" if self.patient_ids is None else "patient"

    def privacy_units(self) -> int:
        """How many privacy units (patients, or records) the hospital's data holds."""
        if self.patient_ids is not None:
            return len(set(self.patient_ids))
        return len(self.train_loader.dataset)  # type: ignore[arg-type]

    def privacy_dir(self) -> Path | None:
        """Where this dataset's lifetime privacy state lives (``None``: in memory only)."""
        return None if self.state_dir is None else privacy_dir(self.state_dir, self.dataset_id)


#: Sub-directory of a hospital's state directory holding one privacy state per dataset.
DATASETS_DIR = "datasets"


def privacy_dir(state_dir: Path, dataset_id: str) -> Path:
    """The directory under a hospital's ``state_dir`` that holds the lifetime privacy
    state (``ledger.jsonl``, ``privacy-state.json``) of the dataset ``dataset_id``."""
    if not dataset_id:
        return Path(state_dir)
    return Path(state_dir) / DATASETS_DIR / dataset_dir_name(dataset_id)


def dataset_id_problem(dataset_id: str, state_dir: Path | None = None) -> str | None:
    """Why ``dataset_id`` cannot name a dataset's lifetime privacy budget, or None.

    The budget is kept under the exact text, so two texts that read the same would keep
    two budgets for the same patients: refused are a blank id, one that begins or ends
    with whitespace (``"site-2 "`` is not ``"site-2"``), one holding a control,
    invisible-format or line/paragraph-separator character, and one not in its plain
    Unicode form (NFKC: a non-breaking space, a decomposed accent). Nothing is
    stripped: an id is used exactly as written or refused. An id whose budget
    ``state_dir`` already holds (written before these rules) is kept as it is:
    refusing it would send its operator to a fresh, empty budget for the same
    patients."""
    import unicodedata

    if not dataset_id.strip():
        return "a dataset-id must not be blank"
    if state_dir is not None and (privacy_dir(state_dir, dataset_id) / LEDGER_FILE).exists():
        return None
    if dataset_id != dataset_id.strip():
        return (f"dataset-id {dataset_id!r} begins or ends with whitespace: the privacy "
                "budget is kept under the exact text, so it would keep a budget apart from "
                f"dataset-id {dataset_id.strip()!r} (the same patients spent twice); write "
                "it without that whitespace")
    bad = sorted({c for c in dataset_id if unicodedata.category(c) in ("Cc", "Cf", "Zl",
                                                                      "Zp")})
    if bad:
        return (f"dataset-id {dataset_id!r} holds control or invisible character(s) "
                f"{', '.join(f'U+{ord(c):04X}' for c in bad)}: it would read the same as "
                "another dataset-id with a budget of its own; use visible characters only")
    if unicodedata.normalize("NFKC", dataset_id) != dataset_id:
        return (f"dataset-id {dataset_id!r} is not in its plain Unicode form (NFKC: e.g. a "
                "non-breaking space or a decomposed accent): it would read the same as "
                f"dataset-id {unicodedata.normalize('NFKC', dataset_id)!r}, with a budget "
                "of its own; write it in plain characters")
    return None


def dataset_dir_name(dataset_id: str) -> str:
    """A file-system-safe, collision-resistant directory name for ``dataset_id``."""
    import hashlib
    import re

    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", dataset_id).strip("._")[:40] or "dataset"
    return f"{slug}-{hashlib.sha256(dataset_id.encode('utf-8')).hexdigest()[:12]}"


@dataclass(frozen=True)
class PrivacyPolicy:
    """A hospital's privacy rules for the whole federation.

    ``noise_multiplier=None`` calibrates one noise multiplier for the whole plan
    (``rounds`` x ``local_epochs``) so the final epsilon lands on
    ``target_epsilon``; the budget is ``(target_epsilon, delta)`` and a round that
    would pass it is refused. ``noise_multiplier=0`` trains without DP and is
    only accepted with ``allow_non_private=True``; every report flags it.
    """

    target_epsilon: float
    delta: float
    rounds: int
    local_epochs: int = 1
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    accountant: str = DEFAULT_ACCOUNTANT
    grad_sample_mode: str = "auto"
    allow_non_private: bool = False
    device: str | None = None
    #: Fixed Poisson-sampling seed; accepted only with noise multiplier 0 (non-private
    #: runs made reproducible, e.g. to compare secure and plain aggregation exactly).
    sampling_seed: int | None = None
    extra: dict[str, str] = field(default_factory=dict)
    #: The hospital's metrics release, when its policy lets metrics leave: the noise
    #: multiplier of the Gaussian release and the bound each record's loss is clipped to.
    metrics_noise_multiplier: float = DEFAULT_METRICS_NOISE
    metrics_loss_bound: float = DEFAULT_LOSS_BOUND
    #: The least noise multiplier the hospital trains with (its own policy's floor):
    #: a calibrated multiplier below it is raised to it, which only lowers epsilon.
    min_noise_multiplier: float = 0.0

    def metrics_release(self) -> MetricsRelease:
        """The Gaussian mechanism this policy releases metrics with (when they leave)."""
        return MetricsRelease(self.metrics_noise_multiplier, self.metrics_loss_bound)

    def budget(self) -> PrivacyBudget:
        """The (epsilon, delta) budget this policy enforces."""
        return PrivacyBudget(
            self.target_epsilon, self.delta, self.accountant, self.allow_non_private
        )


def _noise_multiplier(
    policy: PrivacyPolicy, setup: HospitalSetup, state: ConfigRecord, ledger: PrivacyLedger,
    run_id: str, server_round: int, per_round: Sequence[DpSgdEvent] = (),
) -> float:
    """The policy's noise multiplier, calibrated once per run and kept in the state.

    The calibration covers what this dataset already spent (earlier runs and
    federations) plus this run's remaining rounds, each with the events
    ``per_round`` it releases besides its DP-SGD (its metrics release), so the run
    lands on the lifetime target; when too little budget is left for that, it
    calibrates as for a fresh plan and the budget check refuses the round that
    would pass it. A calibrated multiplier below the policy's ``min_noise_multiplier``
    is raised to that floor (the run then ends below its target).
    """
    floor = float(policy.min_noise_multiplier)
    if policy.noise_multiplier is not None:
        # (a hospital's own policy refuses a fixed noise below its floor before this)
        return max(float(policy.noise_multiplier), floor) if policy.noise_multiplier else 0.0
    if "noise-multiplier" in state and state.get("calibrated-run", "") == run_id:
        # The floor may have risen since this run calibrated: it holds either way.
        return max(float(state["noise-multiplier"]), floor)
    loader = setup.train_loader
    plan = TrainingPlan(
        max(1, policy.rounds - server_round + 1), policy.local_epochs,
        setup.public_size or setup.privacy_units(), int(loader.batch_size or 0),
        unit=setup.privacy_unit,
    )
    alongside = [e for _ in range(plan.rounds) for e in per_round]
    try:
        cal = calibrate(policy.target_epsilon, policy.delta, plan, accountant=policy.accountant,
                        prior=ledger.events, alongside=alongside,
                        legacy_unit=setup.legacy_ledger_unit)
    except PrivacyError:
        if not ledger.events:
            raise
        cal = calibrate(policy.target_epsilon, policy.delta, plan, accountant=policy.accountant,
                        alongside=alongside)
    sigma = max(cal.noise_multiplier, floor)
    state["noise-multiplier"] = sigma
    state["calibrated-run"] = run_id
    return sigma


PolicyLike = PrivacyPolicy | Callable[[Context], PrivacyPolicy]
#: The identity that signs a hospital's ledger entries (``None``: entries are unsigned).
SignerLike = SecAggIdentity | Callable[[Context], SecAggIdentity | None]
STATE_FILE = "privacy-state.json"
#: The hospital's own copy of its signed ledger, next to STATE_FILE (which holds its head).
LEDGER_FILE = "ledger.jsonl"


def _refusal(message: str, public_reason: str) -> LedgerError:
    """A :class:`LedgerError` whose ``public_reason`` (what leaves the hospital in its
    failure reply) names no path of the hospital's; its own log has ``message``."""
    exc = LedgerError(message)
    exc.public_reason = public_reason  # type: ignore[attr-defined]
    return exc


def check_state_layout(state_dir: Path, dataset_id: str) -> None:
    """Refuse a state directory that holds a privacy state this hospital would not read.

    A dataset's privacy state lives in :func:`privacy_dir` (``state_dir/datasets/<dir>``);
    ``privacy-state.json`` or ``ledger.jsonl`` directly in ``state_dir`` (where bract
    kept one ledger per state directory before it kept one per dataset) is a spent
    budget no dataset's directory holds. Guarantee: with a ``dataset_id``, either file
    at the top of ``state_dir`` raises :class:`LedgerError` naming the directory of
    ``dataset_id`` to move them into (when they are that dataset's ledger), so an
    upgrade never starts a spent budget from nothing; bract never moves them itself
    (which dataset they protect is the operator's knowledge).
    """
    if not dataset_id:
        return  # privacy_dir is state_dir itself: those files are the state
    top = Path(state_dir)
    found = [name for name in (STATE_FILE, LEDGER_FILE) if (top / name).exists()]
    if found:
        raise _refusal(
            f"{top} holds {' and '.join(found)} at its top, a privacy ledger of the layout "
            f"that kept one ledger per state directory, which this hospital does not read: "
            f"if it is the ledger of dataset-id {dataset_id!r}, move {STATE_FILE} and "
            f"{LEDGER_FILE} into {privacy_dir(top, dataset_id)} (if that holds a ledger "
            "already, or they are another dataset's, move them into the directory of the "
            "dataset they protect); until then this hospital refuses to train, so no "
            "spent budget is forgotten",
            "this hospital's state directory holds a privacy ledger in a layout it does "
            "not read; its operator must move it into its dataset's directory (details in "
            "its own log)")


def privacy_state_key(dataset_id: str) -> str:
    """The ``ctx.state`` record that holds the in-memory privacy state of ``dataset_id``
    (one per dataset, so one dataset's ledger is never read as another's)."""
    return STATE_PRIVACY if not dataset_id else f"{STATE_PRIVACY}.{dataset_dir_name(dataset_id)}"


def _load_state(ctx: Context, setup: HospitalSetup) -> ConfigRecord:
    """The privacy state of the hospital's dataset: its own files when it has a privacy
    directory, else this dataset's record in ``ctx.state``.

    Guarantee: a dataset's spent budget is read only from what was written for that
    dataset. With a privacy directory the files are the only source: ``ctx.state`` is
    never consulted, because Flower hands every run of one run series (which the
    coordinator names) the same Context, so it may hold a ledger another dataset's runs
    wrote. It fails closed. A state directory with a ledger outside any dataset's
    directory (:func:`check_state_layout`), a dataset directory whose
    ``ledger.jsonl`` holds more than one round's entries while its
    ``privacy-state.json`` (the head that commits them) is missing, or a ledger that
    does not match that head (:func:`_read_own_chain`) raises :class:`LedgerError`
    instead of starting the dataset's budget from nothing or from less than it spent.
    The one round a crash between the two writes can leave past the head (or, on the
    dataset's first round, without a state file) counts as spent and is committed
    before the caller trains, so failed writes never lock an honest hospital out.
    """
    home = setup.privacy_dir()
    if home is None or setup.state_dir is None:
        return ctx.state.config_records.get(privacy_state_key(setup.dataset_id),
                                            ConfigRecord())
    check_state_layout(setup.state_dir, setup.dataset_id)
    path = home / STATE_FILE
    if not path.exists():
        ledger = home / LEDGER_FILE
        if not (ledger.exists() and ledger.read_text(encoding="utf-8").strip()):
            return ConfigRecord()  # this dataset has spent nothing yet
        chain = _first_round_without_its_state(home)
        if chain is None:
            raise _refusal(
                f"{home} holds {LEDGER_FILE} but no {STATE_FILE} (the head that commits "
                "it): this dataset's spent budget cannot be read, and the hospital refuses "
                "to train rather than start it from nothing; restore both files from a "
                "backup",
                f"this hospital's privacy state is incomplete ({STATE_FILE} is missing); "
                "its operator must restore it from a backup (details in its own log)")
        # The dataset's first round crashed between its two writes: counted as spent.
        on_disk = {"ledger": PrivacyLedger(chain[0].client_id,
                                           tuple(e.event for e in chain)).to_json()}
        committed_length = 0
    else:
        on_disk = json.loads(path.read_text(encoding="utf-8"))
        chain = _read_own_chain(path.parent, on_disk)
        committed = PrivacyLedger.from_json(on_disk["ledger"])
        committed_length = len(committed.events)
        if len(chain) > committed_length:
            # The round whose entries were written just before a crash took its state:
            # its DP-SGD ran, so it counts as spent (never dropped, and its entries stay).
            on_disk["ledger"] = PrivacyLedger(
                committed.client_id,
                committed.events + tuple(e.event for e in chain[committed_length:]),
            ).to_json()
    if len(chain) > committed_length:
        # Commit that round now, before this one trains: a second failed write in a row
        # then still leaves a single round past the head, never a state refused for good.
        on_disk["chain-length"] = len(chain)
        on_disk["chain-head"] = chain[-1].hash()
        atomic_write_text(path, json.dumps(on_disk))
    return ConfigRecord({**on_disk, "chain": dumps_jsonl(chain)})


def _first_round_without_its_state(home: Path) -> tuple[LedgerEntry, ...] | None:
    """The ledger of a dataset without ``privacy-state.json`` when it is what a crash
    between the two writes of the dataset's first round leaves (one round's entries,
    linked from the start), else ``None`` (refused by the caller: more than that was
    written, so a committed state existed and is gone)."""
    try:
        return _read_own_chain(home, {"chain-length": 0, "chain-head": ""}) or None
    except (LedgerError, ValueError):
        return None


def _one_rounds_entries(tail: Sequence[LedgerEntry]) -> bool:
    """Whether ``tail`` is what one trained round appends: its metrics releases, then
    its one DP-SGD event, all of the same round."""
    return (bool(tail) and tail[-1].event.is_training
            and not any(e.event.is_training for e in tail[:-1])
            and len({e.round for e in tail}) == 1)


def _read_own_chain(home: Path, on_disk: dict) -> tuple[LedgerEntry, ...]:
    """The hospital's own signed ledger file, checked against the head its state names.

    Guarantee: it returns the whole file, never fewer entries than it holds, or raises
    :class:`LedgerError` naming both files. The file's first ``chain-length`` entries
    must link up to the state's ``chain-head``. Past them it tolerates exactly what the
    commit order (:func:`_save_state`: the ledger, then the state naming its head) leaves
    after a crash between the two writes: one round's entries (its metrics releases and
    its one DP-SGD event, of one round) linked onto that head, which the caller counts
    as spent. Anything else (entries missing or edited, more than one round past the
    head, a state of fewer entries restored over a longer ledger, a state of no entries
    next to a ledger of several rounds) is refused.
    """
    n = int(on_disk.get("chain-length", 0))
    path = home / LEDGER_FILE
    entries = read_ledger(path) if path.exists() else []
    if not entries and n == 0:
        return ()
    links = check_chain(
        entries, None, client_id=entries[0].client_id, expected_length=len(entries),
    ) if len(entries) >= n else None
    head = "" if n == 0 else (entries[n - 1].hash() if links is not None else None)
    if links is None or not links.ok or head != on_disk.get("chain-head", ""):
        raise public(LedgerError(
            f"{path} does not match the chain head in {STATE_FILE}: this hospital's own "
            "ledger was truncated or edited; restore both files from the same backup"
        ), f"this hospital's own ledger does not match the chain head in {STATE_FILE}: it "
           "was truncated or edited (details in the hospital's log)")
    if len(entries) > n and not _one_rounds_entries(entries[n:]):
        raise public(LedgerError(
            f"{path} holds {len(entries)} entries, {STATE_FILE} commits {n}: the state is "
            "older than the ledger (restored from another backup, or rewritten), and "
            "reading it would forget the budget the later entries spent; this hospital "
            "refuses to train and leaves both files as they are; restore both from the "
            "same backup"
        ), "this hospital's privacy state is older than its own ledger: its operator must "
           "restore both from the same backup (details in the hospital's log)")
    return tuple(entries)


def _save_state(ctx: Context, setup: HospitalSetup, state: ConfigRecord) -> None:
    """Commit the hospital's privacy state: into ``ctx.state``, and, with a privacy
    directory, durably to disk (:func:`~bract.flower.files.atomic_write_text`: fsynced
    before and after its rename). The train handler calls it before it builds its
    reply, so an update never leaves the hospital before the privacy it spends is on
    disk: a crash or power loss right after cannot let the hospital spend it again.
    With a privacy directory the files alone hold it (:func:`_load_state`)."""
    home = setup.privacy_dir()
    if home is None:
        ctx.state.config_records[privacy_state_key(setup.dataset_id)] = state
        return
    # The entries first, then the state naming their head (the commit point).
    atomic_write_text(home / LEDGER_FILE, str(state.get("chain", "")))
    atomic_write_text(
        home / STATE_FILE,
        json.dumps({k: v for k, v in state.items() if k != "chain"}),
    )


@contextlib.contextmanager
def exclusive(home: Path | None) -> Iterator[None]:
    """Hold the dataset's privacy directory alone (an advisory lock, ``fcntl.flock`` on
    ``home/.lock``) from reading its state to committing the round; nothing when the
    state lives only in memory."""
    if home is None:
        yield
        return
    import fcntl

    make_directory(Path(home))
    with open(Path(home) / ".lock", "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _load_chain(state: ConfigRecord, ledger: PrivacyLedger) -> tuple[LedgerEntry, ...]:
    """The signed ledger in ``state``; it must record exactly the events of ``ledger``."""
    chain = tuple(loads_jsonl(str(state.get("chain", "")), "this hospital's signed ledger"))
    if [e.event for e in chain] != list(ledger.events):
        raise LedgerError(
            f"this hospital's signed ledger ({len(chain)} entries) does not record the "
            f"{len(ledger.events)} events of its privacy state; restore both from a backup"
        )
    return chain


def dp_train_handler(
    setup_fn: Callable[[Context], HospitalSetup],
    policy: PolicyLike,
    identity: SignerLike | None = None,
    release_metrics: str | Callable[[Context], str] = "none",
) -> Callable[[Message, Context], Message]:
    """A ``train`` handler: DP-SGD on the hospital's data, ledger kept per dataset.

    ``policy`` may be a function of the Context (e.g. reading ``ctx.run_config``
    in a deployed Flower app); so may ``identity``, whose Ed25519 key signs each
    new ledger entry (``None``: entries are hash-chained but unsigned).

    Guarantee: the dataset's ledger advances only after a round's DP-SGD
    steps completed, and a round that would exceed the policy's budget is refused
    before any training (the reply says why). On a configured hospital (a SuperNode
    whose node config names any operator-only key,
    :data:`~bract.flower.hospital_policy.OPERATOR_KEYS`), what the app asks is held to
    the operator's :class:`~bract.flower.hospital_policy.HospitalPolicy` (its
    ``policy`` file, else the defaults: epsilon <= 8 at delta <= 1e-5, never
    non-private, metrics stay home, no plain aggregation) before its setup runs: a
    looser budget or noise (:meth:`~bract.flower.hospital_policy.HospitalPolicy.admit`),
    a looser metric release (:func:`admitted_release`) or a ``train`` message without
    secure aggregation the policy does not allow
    (:class:`~bract.flower.secagg_client.PlainAggregationRefused`) is refused, and it
    refuses to train without a ``HospitalSetup.state_dir``. A simulated hospital (no
    operator-only key) trains under what the app asks. Each trained round appends one
    signed entry to the dataset's chain, kept in the dataset's privacy directory,
    the only copy read when there is one (:meth:`HospitalSetup.privacy_dir`:
    ``ledger.jsonl``, its head in ``privacy-state.json``; else in ``ctx.state``, one
    record per dataset), which every later run and federation on the same dataset
    continues; both files are written durably
    (fsynced) before the reply is built, so no update leaves the hospital before the
    record of the privacy it spent would survive a crash or power loss. The reply
    carries the updated weights, the number of examples, and accounting data only;
    when ``release_metrics`` (or its value for the Context) is not ``"none"``, also
    the round's metrics release (:class:`bract.privacy.MetricsRelease`), covered by
    the same budget check and recorded in the ledger before the round's DP-SGD.
    """

    def handle(msg: Message, ctx: Context) -> Message:
        from bract.flower.hospital_policy import hospital_policy_of, operator_keys_in

        policy_now = policy(ctx) if callable(policy) else policy
        nc = ctx.node_config
        configured = operator_keys_in(nc)
        if configured:
            # The operator's own limits (its policy file, else the defaults) hold for any
            # app built on this handler: what the app asks (often the coordinator's run
            # config) is only admitted within them, before its setup reads any data.
            own = hospital_policy_of(nc)
            policy_now = own.admit(policy_now)
            # Masked only when secagg_mod (in the app's mods, however the app was
            # built) is handling this message's secure-aggregation record; a record in
            # a message no mod masks changes nothing.
            if not masks_this_reply() and not own.allow_plain_aggregation:
                raise PlainAggregationRefused(PLAIN_REFUSED)
        release_now = admitted_release(release_metrics, ctx)
        setup = setup_fn(ctx)
        if setup.state_dir is None and configured:
            # Without a state directory the ledger lives in this run's Context only, so
            # a new run would start the hospital's budget from nothing.
            raise public(ValueError(
                f"this hospital's node config names {', '.join(configured)} but its "
                "HospitalSetup has no state_dir: its spent privacy budget must live in a "
                "directory its operator owns (node config state-dir)"))
        # The accountant's recent results travel in the Context: in deployment every
        # message runs in its own process, which would otherwise recompute them.
        carried = ctx.state.config_records.get(STATE_EPSILONS, ConfigRecord())
        carry_epsilons({str(k): float(v) for k, v in carried.items()})
        # One writer at a time on this dataset's state: a second run (or federation)
        # training the same data concurrently waits, so no spent round is lost.
        with exclusive(setup.privacy_dir()):
            state = _load_state(ctx, setup)
            ledger = (
                PrivacyLedger.from_json(str(state["ledger"]))
                if "ledger" in state
                else PrivacyLedger(setup.client_id)
            )
            chain = _load_chain(state, ledger)
            signer = identity(ctx) if callable(identity) else identity
            federation_id = signer.federation_id if signer is not None else ""
            round_cfg = msg.content.config_records.get(ROUND_CONFIG, ConfigRecord())
            server_round = int(round_cfg.get("round", 1))
            metrics = policy_now.metrics_release() if release_now != "none" else None
            also = (() if metrics is None
                    else (metrics.event(server_round, policy_now.delta, setup.client_id,
                                        setup.privacy_unit),))
            from bract.privacy.training import (  # torch, only where training runs
                PrivateTrainer,
                check_finite_weights,
            )

            global_weights = None
            if GLOBAL_WEIGHTS in msg.content.array_records:
                global_weights = record_to_weights(msg.content.array_records[GLOBAL_WEIGHTS])
                # Refused before anything touches the data: the refusal is a function of
                # the coordinator's message alone.
                check_finite_weights(global_weights, setup.model)
            sigma = _noise_multiplier(policy_now, setup, state, ledger,
                                      str(round_cfg.get("run-id", "")), server_round, also)

            trainer = PrivateTrainer(
                setup.model,
                setup.optimizer,
                setup.train_loader,
                noise_multiplier=sigma,
                max_grad_norm=policy_now.max_grad_norm,
                delta=policy_now.delta,
                criterion=setup.criterion,
                local_epochs=policy_now.local_epochs,
                budget=policy_now.budget(),
                ledger=ledger,
                client_id=setup.client_id,
                public_size=setup.public_size,
                patient_ids=setup.patient_ids,
                accountant=policy_now.accountant,
                grad_sample_mode=policy_now.grad_sample_mode,
                device=policy_now.device,
                sampling_seed=policy_now.sampling_seed,
                legacy_ledger_unit=setup.legacy_ledger_unit,
            )
            limit = round_cfg.get(SECAGG_MAX_WEIGHT)
            if limit is not None and ring_refuses(trainer.plan_per_round, int(limit)):
                # Before any training or release: nothing is spent on an update the
                # round's ring could not carry. The next round is sized from the report.
                raise public(ValueError(
                    f"this hospital's FedAvg weight exceeds the secure round's max weight "
                    f"{int(limit)}: refused before training, nothing spent; the server sizes "
                    "a later round for it"
                ))
            released: dict[str, float] | None = None
            if (metrics is not None and global_weights is not None
                    and trainer.check_budget(server_round, also).allowed):
                # The global model as received, on the hospital's training records and
                # its own held-out split; noised, and spent only if the round trains.
                # Loaded with the weights-only probe (public synthetic inputs) before any
                # record is read: weights it refuses never reach the release, and
                # train_round below reuses its verdict for these same weights.
                trainer.load_global_weights(global_weights)
                released = metrics.release(
                    setup.model, trainer.criterion, setup.train_loader.dataset,
                    setup.held_out, train_units=setup.patient_ids,
                    held_out_units=setup.held_out_patient_ids,
                    collate=setup.train_loader.collate_fn)
            outcome = trainer.train_round(server_round, global_weights,
                                          also=also if released is not None else ())
            events = trainer.ledger.events
            for i, extra in enumerate(outcome.also if outcome.trained else ()):
                upto = len(events) - 1 - len(outcome.also) + i + 1
                chain = append_entry(
                    chain, extra, epsilon=epsilon_of(events[:upto], policy_now.delta,
                                                     policy_now.accountant),
                    delta=policy_now.delta, accountant=policy_now.accountant,
                    federation_id=federation_id, client_id=setup.client_id,
                    signing_key=signer.signing_key if signer is not None else None,
                )
            if outcome.trained and outcome.event is not None:
                chain = append_entry(
                    chain, outcome.event, epsilon=outcome.epsilon, delta=policy_now.delta,
                    accountant=policy_now.accountant, federation_id=federation_id,
                    client_id=setup.client_id,
                    signing_key=signer.signing_key if signer is not None else None,
                )
            # Persist only after the round finished (or was refused without change).
            state["ledger"] = trainer.ledger.to_json()
            state["chain"] = dumps_jsonl(chain)
            state["chain-length"] = len(chain)
            state["chain-head"] = chain[-1].hash() if chain else ""
            if setup.dataset_id:
                # Which dataset this directory budgets, for its operator (the directory's
                # name is a hash of it).
                state["dataset-id"] = setup.dataset_id
            _save_state(ctx, setup, state)
        ctx.state.config_records[STATE_EPSILONS] = ConfigRecord(carried_epsilons())

        content = RecordDict()
        content.config_records[PRIVACY_REPORT] = privacy_report_record(
            trainer.ledger,
            outcome.decision,
            trained=outcome.trained,
            epsilon=outcome.epsilon,
            noise_multiplier=sigma,
            sample_rate=trainer.plan_per_round.sample_rate,
            weight_bound=trainer.plan_per_round.weight_bound,
            chain=chain,
            appended=(1 + len(outcome.also)) if outcome.trained else 0,
        )
        if outcome.trained and outcome.weights is not None:
            content.array_records[LOCAL_WEIGHTS] = weights_to_record(outcome.weights)
            content.metric_records[TRAIN_INFO] = MetricRecord(
                {"num-examples": int(outcome.num_examples)}
            )
            if released is not None:
                # Noised and accounted; the guard and secagg mods decide how it leaves.
                content.metric_records[LOCAL_METRICS] = MetricRecord(released)
        return Message(content, reply_to=msg)

    return handle


METRICS_RELEASE = ("none", "aggregate", "clear")


def ring_refuses(plan: TrainingPlan, max_weight: int) -> bool:
    """Whether a hospital with ``plan`` refuses a secure round whose ring is sized for
    ``max_weight``: when its public weight bound exceeds it.

    Guarantee: the refusal depends only on the weight bound (batch size / sample rate,
    already public), never on the exact dataset size, so a server that varies the max
    weight round after round learns nothing more from refusals; and a hospital that
    does not refuse has a weight (at most its bound) the ring carries.
    """
    return plan.weight_bound > max_weight


def admitted_release(release: str | Callable[[Context], str], ctx: Context) -> str:
    """The metric release ``release`` (or its value for ``ctx``) asks for, as this
    hospital lets it leave.

    Guarantee: the value is one of :data:`METRICS_RELEASE` (else ``ValueError`` naming
    it); on a configured hospital (any operator-only node-config key,
    :func:`~bract.flower.hospital_policy.operator_keys_in`) it is also no looser than
    its policy's ``release_metrics`` (the policy file's, else ``"none"``), else
    :class:`~bract.flower.hospital_policy.PolicyRefusal` naming both.
    """
    from bract.flower.hospital_policy import hospital_policy_of, operator_keys_in

    value = release(ctx) if callable(release) else release
    if value not in METRICS_RELEASE:
        raise ValueError(f"metrics release {value!r} must be one of {METRICS_RELEASE}")
    if ctx is not None and operator_keys_in(ctx.node_config):
        hospital_policy_of(ctx.node_config).admit_release(value)
    return value


def metrics_guard_mod(release: str | Callable[[Context], str] = "none") -> Callable:
    """A mod that lets metrics on the hospital's private data leave only by policy.

    ``"none"`` (default): training metrics never leave; ``"clear"``: they leave
    as a metric record; ``"aggregate"``: they leave only inside the masked vector
    of secure aggregation (the secagg mod, inside this one, puts them there), so
    the server learns only their example-weighted average. The privacy report
    (epsilon and accounting events) always leaves: the server needs it. On a configured
    hospital a release looser than its policy's is refused before the handler runs
    (:func:`admitted_release`).
    """
    if not callable(release):
        admitted_release(release, None)  # type: ignore[arg-type]  # a fixed one, up front

    def mod(msg: Message, ctx: Context, call_next: Callable[[Message, Context], Message]):
        policy = admitted_release(release, ctx)
        reply = call_next(msg, ctx)
        if not reply.has_error() and policy != "clear":
            reply.content.metric_records.pop(LOCAL_METRICS, None)
        return reply

    return mod


def contain_errors_mod(msg: Message, ctx: Context,
                       call_next: Callable[[Message, Context], Message]) -> Message:
    """The outermost mod of every hospital handler: an exception in the hospital's
    code becomes an error reply with a one-line reason (:func:`failure_reason`: only
    bract's public reasons and refusals, otherwise the exception's type), so it
    reaches the coordinator's table and report as this hospital's failure, and no
    traceback floods the console; the whole message stays in the hospital's own log
    (logger ``bract``: the message at WARNING, the traceback at DEBUG). Nothing else
    of the failed message leaves."""
    import logging

    from flwr.app import Error
    from flwr.common.constant import ErrorCode

    try:
        return call_next(msg, ctx)
    except Exception as exc:  # every failure becomes this hospital's reply
        reason = failure_reason(exc)
        logger = logging.getLogger("bract")
        # The hospital's own log has the whole message, the reply only its reason.
        whole = " ".join(str(exc).split())
        logger.warning("hospital failed: %s: %s", type(exc).__name__, whole)
        logger.debug("hospital failure", exc_info=True)
        return Message(error=Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                       reply_to=msg)


def make_client_app(
    setup_fn: Callable[[Context], HospitalSetup],
    policy: PolicyLike,
    *,
    secagg: IdentityLike | None = None,
    release_metrics: str | Callable[[Context], str] = "none",
    mods: Sequence[Callable] = (),
    identity: SignerLike | None = None,
    allow_plain_aggregation: bool | Callable[[Context], bool] = False,
) -> ClientApp:
    """A Flower ``ClientApp`` for a hospital: DP-SGD, and secure aggregation if given.

    ``secagg`` is the hospital's identity for secure aggregation (or a function of
    the Context returning it); with it, the update and example count leave the
    hospital only inside masked vectors: a ``train`` message without a
    secure-aggregation record is refused before training unless
    ``allow_plain_aggregation`` (or a function of the Context) lets it take part in
    plain FedAvg. ``identity`` signs the hospital's ledger
    entries (default: the ``secagg`` identity; give it to sign plain runs too); a
    hospital with an ``identity`` and no ``secagg`` answers the server's identity
    query (``query.secagg_advertise``) with its signed key advertisement, so a server
    with a roster can tell which member it is.
    ``mods`` wrap every handler, inside the metrics guard (e.g. fault injection).
    """
    app = ClientApp()
    train_mods = [contain_errors_mod, metrics_guard_mod(release_metrics), *mods]
    if secagg is not None:
        train_mods.append(secagg_mod(secagg, release_metrics=release_metrics,
                                     allow_plain=allow_plain_aggregation))
        register_secagg(app, secagg, mods=[contain_errors_mod, *mods])
    signer = identity if identity is not None else secagg
    app.train(mods=train_mods)(dp_train_handler(setup_fn, policy, signer, release_metrics))
    if secagg is None and identity is not None:
        # A server with a roster names a plain-FedAvg hospital only by this proof.
        app.query("secagg_advertise", mods=[contain_errors_mod, *mods])(
            identity_handler(identity))
    return app


def identity_handler(identity: SignerLike) -> Callable[[Message, Context], Message]:
    """The signed key advertisement of a plain-FedAvg hospital with a signing identity
    (the proof of which roster member it is: :func:`bract.flower.server.advertised_member`);
    a hospital without one (``identity(ctx)`` is ``None``) refuses in one line."""

    def signer(ctx: Context) -> SecAggIdentity:
        ident = identity(ctx) if callable(identity) else identity
        if ident is None:
            raise ValueError("this hospital has no identity key to prove its name with")
        return ident

    return advertise_handler(signer)
