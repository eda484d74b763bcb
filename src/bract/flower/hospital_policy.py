"""A hospital's own privacy policy: the limits it keeps whatever the coordinator asks.

In a real federation the hospital and the coordinator are different organisations.
The coordinator's run config *asks* for a budget, a noise level and a metric
release; the hospital's operator writes the limits in a policy file the hospital
reads from its own disk (node config ``policy``). Every request is checked against
those limits before any training: a request looser than the hospital's policy is
refused, with a reason that reaches the coordinator's table and report, and
nothing of the hospital's data leaves.

File format (JSON, every field optional)::

    {"target_epsilon": 8.0, "delta": 1e-5, "accountant": "prv",
     "min_noise_multiplier": 0.0, "allow_non_private": false,
     "release_metrics": "none", "secagg_colluders": null, "secagg_min_honest": 2,
     "public_dataset_size": null, "privacy_unit": "record", "legacy_ledger_unit": null,
     "metrics_noise_multiplier": 10.0, "metrics_loss_bound": 4.0,
     "allow_plain_aggregation": false, "max_image_size": 512,
     "max_model_parameters": 120000000, "max_batch_size": 4096, "max_local_epochs": 10,
     "max_per_example_gradients": 2000000000, "num_classes": null}

Every field holds a value of its declared JSON type (a boolean only ``true``/``false``,
an integer never ``2.0``, a number never a string or ``true``; ``null`` only where the
default is ``null``), within range (``target_epsilon`` > 0, a cap on what a run may
ask; ``min_noise_multiplier`` >= 0; the ``secagg_*`` bounds by secure aggregation's
own :class:`~bract.secagg.protocol.ClientPolicy`); a field named twice is refused.
:meth:`HospitalPolicy.read` raises ``ValueError`` naming the file and the field.

``max_image_size``, ``max_model_parameters``, ``max_batch_size``, ``max_local_epochs``,
``max_per_example_gradients``: the most the coordinator's run config may make the
hospital allocate and compute: the image side (every image is resized to it, the image
model's first dense layer grows with its square), the image model's parameters, the
expected batch size of Poisson sampling, the local epochs of a round, and with
``grad-sample-mode hooks`` (a gradient per example) the batch size times the
parameters. A run config past one is refused before the model is built or any data
read (:meth:`HospitalPolicy.admit_task`); the defaults admit every size bract's
documentation uses (images up to 224 px, ChestCNN at 512 px has 113.3 million
parameters).

``allow_plain_aggregation``: a hospital its operator configured sends its update (and
example count) only inside a masked sum; a training request without secure aggregation
is refused before it trains unless this is true, in bract's own app and in every app
built with :func:`~bract.flower.client.make_client_app`.

``public_dataset_size``: a number of records the hospital declares public, at least
its true count (e.g. its count rounded up to a round number). Its sample rate,
steps, calibrated noise and FedAvg weight are then computed from it, so nothing it
releases reveals its exact count (see docs/privacy.md, "What leaves a hospital").

``privacy_unit``: ``"record"`` (each training example) or ``"patient"``: Poisson
sampling over patients, each patient's summed gradient clipped, epsilon per patient;
it needs a patient id per training record from the hospital's own loader
(``FederatedDataset(train_columns={"patient_id": ...})``).

``legacy_ledger_unit``: ``"record"`` or ``"patient"``, the unit the hospital's runs
protected before bract recorded each ledger event's unit. A ledger holding such
events is refused until it is stated (record- and patient-level events never compose
into one epsilon, and a guess could under-count); every run before patient-level DP
existed protected records.

``num_classes``: the number of classes the hospital's own data is labelled with (an
integer >= 1, or null). Declared, a hospital on its own data refuses a federation model
with another number of classes before it reads any data, so whether it refuses depends
on its policy alone; null, it reads its data and refuses a model with fewer classes than
its largest label, which tells a coordinator that declares k classes whether any of its
records has a label >= k (docs/privacy.md, "What leaves a hospital").

``metrics_noise_multiplier`` / ``metrics_loss_bound``: when ``release_metrics`` lets
metrics leave, they leave as a Gaussian release with at least this noise multiplier,
each record's loss clipped to this bound, and every release is spent from the same
budget as training (bract.privacy.metrics_release).
"""

from __future__ import annotations

import functools
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bract.flower.client import METRICS_RELEASE, PrivacyPolicy
from bract.privacy.accounting import ACCOUNTANTS
from bract.privacy.metrics_release import DEFAULT_LOSS_BOUND, DEFAULT_METRICS_NOISE
from bract.secagg.errors import ConfigurationError
from bract.secagg.protocol import ClientPolicy

if TYPE_CHECKING:
    from bract.tasks import TaskConfig

__all__ = ["IMAGE_DATASETS", "OPERATOR_KEYS", "HospitalPolicy", "PolicyFieldError",
           "PolicyRefusal",
           "hospital_policy_of", "image_model_parameters", "operator_keys_in"]

#: Node-config keys only a hospital's operator sets: a SuperNode with any of them is a
#: configured hospital, which must keep its state in its own ``state-dir`` (or its
#: ``HospitalSetup.state_dir``) and reads only data its operator names (never a file the
#: coordinator's run config names, whose path would choose the budget's key). Flower's
#: simulation engine gives its SuperNodes ``partition-id`` and ``num-partitions`` only.
OPERATOR_KEYS = ("identity-key", "name", "data-path", "loader", "policy", "dataset-id",
                 "state-dir")


def operator_keys_in(node_config: Mapping[str, Any]) -> list[str]:
    """The :data:`OPERATOR_KEYS` a node config names, sorted: empty for a SuperNode of
    Flower's simulation engine, not for one a hospital's operator configured."""
    return sorted(k for k in OPERATOR_KEYS if k in node_config)

#: The policy's limits on what a run config makes the hospital allocate and compute.
_SIZE_LIMITS = ("max_image_size", "max_model_parameters", "max_batch_size",
                "max_local_epochs", "max_per_example_gradients")
#: The datasets whose model is bract's image model (ChestCNN).
IMAGE_DATASETS = ("synthetic", "medmnist", "imagefolder")

#: How much each metric release lets out (a request above the hospital's is refused).
_RELEASE_ORDER = {"none": 0, "aggregate": 1, "clear": 2}


class PolicyFieldError(ValueError):
    """A policy field holds a value of the wrong type or out of range; the message names
    the policy file (when read from one), the field, its value and what it must be. Its
    ``public_reason`` (what a hospital's failure reply carries to the coordinator) names
    the field and what it must be, not the file's path nor the value."""

    def __init__(self, field: str, value: Any, expected: str, path: Path | None = None
                 ) -> None:
        self.field, self.value, self.expected, self.path = field, value, expected, path
        where = "hospital policy" + (f" {path}" if path is not None else "")
        shown = json.dumps(value) if _json_plain(value) else repr(value)
        super().__init__(f"{where}: {field} must be {expected}, got {shown}")
        self.public_reason = (f"this hospital's policy file is invalid: {field} must be "
                              f"{expected}; its operator must correct it (details in its "
                              "own log)")


def _json_plain(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


class _DuplicateKeyError(ValueError):
    pass


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``'s ``object_pairs_hook``: a key named twice raises
    :class:`_DuplicateKeyError` (the standard reader would silently keep the last one)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(key)
        out[key] = value
    return out


@functools.cache
def _field_types() -> dict[str, Any]:
    """Each :class:`HospitalPolicy` field's declared type, resolved."""
    return typing.get_type_hints(HospitalPolicy)


def _has_type(value: Any, expected: Any) -> bool:
    """Whether ``value`` is of the declared type ``expected`` as JSON would give it:
    ``bool`` only a bool, ``int`` an int but not a bool, ``float`` a finite int or float
    but not a bool, ``str`` a str, ``X | None`` also None."""
    options = typing.get_args(expected) if typing.get_origin(expected) in (
        types.UnionType, typing.Union) else (expected,)
    for option in options:
        if option is type(None) and value is None:
            return True
        if option is bool and isinstance(value, bool):
            return True
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if option is float and isinstance(value, (int, float)) and not isinstance(
                value, bool) and math.isfinite(value):
            return True
        if option is str and isinstance(value, str):
            return True
    return False


def _type_words(expected: Any) -> str:
    """What :func:`_has_type` accepts for ``expected``, in words."""
    options = typing.get_args(expected) if typing.get_origin(expected) in (
        types.UnionType, typing.Union) else (expected,)
    words = {bool: "true or false (a JSON boolean, not a string or a number)",
             int: "an integer", float: "a finite number", str: "a string",
             type(None): "null"}
    return " or ".join(words[o] for o in options)


class PolicyRefusal(RuntimeError):  # noqa: N818 (a refusal, reported as the reply's error)
    """The coordinator asked for more than the hospital's policy allows; says what."""


@dataclass(frozen=True)
class HospitalPolicy:
    """The limits a hospital's operator sets; the coordinator can only ask within them.

    Guarantee: :meth:`admit` returns a training policy no looser than these limits
    (epsilon at most ``target_epsilon``, delta at most ``delta``, the hospital's own
    accountant, noise at least ``min_noise_multiplier`` whether the coordinator names
    the noise or asks for it calibrated, never non-private unless
    ``allow_non_private``, at most ``max_local_epochs`` local epochs) or raises
    :class:`PolicyRefusal` naming the first request that exceeds them;
    :meth:`admit_task` refuses a task past the size limits (``max_*``) the same way.
    """

    target_epsilon: float = 8.0
    delta: float = 1e-5
    accountant: str = "prv"
    min_noise_multiplier: float = 0.0
    allow_non_private: bool = False
    release_metrics: str = "none"
    max_image_size: int = 512
    max_model_parameters: int = 120_000_000
    max_batch_size: int = 4096
    max_local_epochs: int = 10
    max_per_example_gradients: int = 2_000_000_000
    secagg_colluders: int | None = None
    secagg_min_honest: int = 2
    public_dataset_size: int | None = None
    privacy_unit: str = "record"
    legacy_ledger_unit: str | None = None
    metrics_noise_multiplier: float = DEFAULT_METRICS_NOISE
    metrics_loss_bound: float = DEFAULT_LOSS_BOUND
    allow_plain_aggregation: bool = False
    num_classes: int | None = None

    def __post_init__(self) -> None:
        problem = self._first_problem()
        if problem is not None:
            raise PolicyFieldError(*problem)

    def _first_problem(self) -> tuple[str, Any, str] | None:
        """The first field (its name, its value, what it must be) that breaks a rule, or
        None. Every field is first checked against its declared type, so no field can be
        left unchecked: a ``bool`` field takes only ``true``/``false`` (never ``"false"``
        or ``0``), an ``int`` field only an integer (never ``2.0``, ``"2"`` or ``true``),
        a ``float`` field only a finite number (never a string or ``true``), a ``str``
        field only a string, and only an optional field (``... | None``) takes null."""
        for f in fields(self):
            value = getattr(self, f.name)
            expected = _field_types()[f.name]
            if not _has_type(value, expected):
                return f.name, value, _type_words(expected)
        for name in _SIZE_LIMITS:
            if getattr(self, name) < 1:
                return name, getattr(self, name), "an integer >= 1"
        for name in ("metrics_noise_multiplier", "metrics_loss_bound"):
            if not getattr(self, name) > 0:
                return name, getattr(self, name), "a finite number > 0"
        if self.privacy_unit not in ("record", "patient"):
            return "privacy_unit", self.privacy_unit, "'record' or 'patient'"
        if self.legacy_ledger_unit not in (None, "record", "patient"):
            return "legacy_ledger_unit", self.legacy_ledger_unit, "'record', 'patient' or null"
        if self.num_classes is not None and self.num_classes < 1:
            return "num_classes", self.num_classes, "an integer >= 1 or null"
        if self.public_dataset_size is not None and self.public_dataset_size < 1:
            return "public_dataset_size", self.public_dataset_size, "an integer >= 1 or null"
        if not self.target_epsilon > 0:  # a cap on what a run asks: any finite > 0
            return "target_epsilon", self.target_epsilon, "a finite number > 0"
        if not 0 < self.delta < 1:
            return "delta", self.delta, "a number in (0, 1)"
        if self.accountant not in ACCOUNTANTS:
            return "accountant", self.accountant, f"one of {list(ACCOUNTANTS)}"
        if not 0 <= self.min_noise_multiplier:
            return "min_noise_multiplier", self.min_noise_multiplier, "a finite number >= 0"
        if self.release_metrics not in METRICS_RELEASE:
            return "release_metrics", self.release_metrics, f"one of {list(METRICS_RELEASE)}"
        # Secure aggregation's own rules (ClientPolicy), applied here so that a bad bound
        # is refused when the policy is read, not inside a secure round.
        for name, key in (("secagg_colluders", "colluders"), ("secagg_min_honest",
                                                               "min_honest")):
            try:
                ClientPolicy(**{key: getattr(self, name)})
            except ConfigurationError as exc:
                return name, getattr(self, name), f"valid for secure aggregation ({exc})"
        return None

    @classmethod
    def read(cls, path: Path) -> HospitalPolicy:
        """Read a policy file.

        Guarantee: a file that is unreadable, not JSON, not one JSON object, names a
        field twice or a field :class:`HospitalPolicy` does not have, or holds a value
        of the wrong type or out of range raises ``ValueError`` (a
        :class:`PolicyFieldError` for a field's value) in one line naming the file, and
        the field, its value and what it must be; never another exception."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"),
                              object_pairs_hook=_refuse_duplicate_keys)
        except _DuplicateKeyError as exc:
            raise ValueError(f"hospital policy {path} names the field {exc.args[0]!r} twice: "
                             "which one holds is ambiguous; keep one") from None
        except (OSError, ValueError, RecursionError) as exc:
            raise ValueError(f"hospital policy {path} is unreadable: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"hospital policy {path} must hold a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"hospital policy {path}: unknown field(s) {unknown}; "
                             f"known: {sorted(known)}")
        try:
            return cls(**data)
        except PolicyFieldError as exc:
            raise PolicyFieldError(exc.field, exc.value, exc.expected, path) from None

    def write(self, path: Path) -> None:
        """Write the policy as JSON (the operator's file; not secret)."""
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")

    def admit(self, requested: PrivacyPolicy) -> PrivacyPolicy:
        """The training policy for a coordinator's request, or :class:`PolicyRefusal`."""
        if requested.noise_multiplier == 0 or requested.allow_non_private:
            if not self.allow_non_private:
                raise PolicyRefusal(
                    "refused: the coordinator asks for training without noise (non-private); "
                    "this hospital's policy never allows it"
                )
        elif (requested.noise_multiplier is not None
              and not requested.noise_multiplier >= self.min_noise_multiplier):  # NaN too
            raise PolicyRefusal(
                f"refused: the coordinator asks for noise multiplier "
                f"{requested.noise_multiplier:g}; this hospital's policy requires at least "
                f"{self.min_noise_multiplier:g}"
            )
        # Written so that NaN (which compares False with anything) is refused too.
        if not requested.target_epsilon <= self.target_epsilon:
            raise PolicyRefusal(
                f"refused: the coordinator asks for epsilon {requested.target_epsilon:g}; "
                f"this hospital's policy allows at most {self.target_epsilon:g}"
            )
        if not requested.delta <= self.delta:
            raise PolicyRefusal(
                f"refused: the coordinator asks for delta {requested.delta:g}; this "
                f"hospital's policy allows at most {self.delta:g}"
            )
        for name in ("max_grad_norm", "metrics_noise_multiplier", "metrics_loss_bound"):
            value = getattr(requested, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise PolicyRefusal(f"refused: the coordinator asks for {name} {value!r}; "
                                    "this hospital needs a finite number > 0")
        if requested.grad_sample_mode == "ghost":
            raise PolicyRefusal(
                "refused: the coordinator asks for grad-sample-mode ghost, whose clipped "
                "terms come from a second backward pass that crafted weights can move "
                "past the clipping norm; this hospital clips with auto, bk or hooks"
            )
        self._within("local-epochs", requested.local_epochs, "max_local_epochs")
        return replace(requested, accountant=self.accountant,
                       min_noise_multiplier=max(requested.min_noise_multiplier,
                                                self.min_noise_multiplier),
                       allow_non_private=requested.allow_non_private and self.allow_non_private,
                       metrics_noise_multiplier=max(requested.metrics_noise_multiplier,
                                                    self.metrics_noise_multiplier),
                       metrics_loss_bound=self.metrics_loss_bound)

    def admit_model(self, kind: str, num_classes: int) -> None:
        """Refuse a federation model the hospital's declared class count does not fit.

        Guarantee: with ``num_classes`` declared, raises :class:`PolicyRefusal` unless the
        coordinator's model is a classification with exactly that many classes; the
        outcome depends on the policy and the coordinator's model only, never on the
        hospital's data. Without it, nothing is checked here.
        """
        if self.num_classes is None:
            return
        if kind != "classification" or num_classes != self.num_classes:
            what = (f"a {kind} model" if kind != "classification"
                    else f"a model of {num_classes} classes")
            raise PolicyRefusal(f"refused: the coordinator's run config asks for {what}; "
                                f"this hospital's policy declares its data's "
                                f"{self.num_classes} classes")

    def admit_release(self, requested: str) -> str:
        """The metric release for a coordinator's request, or :class:`PolicyRefusal`."""
        if requested not in METRICS_RELEASE:
            raise PolicyRefusal(f"refused: unknown metric release {requested!r}")
        if _RELEASE_ORDER[requested] > _RELEASE_ORDER[self.release_metrics]:
            raise PolicyRefusal(
                f"refused: the coordinator asks to release training metrics "
                f"{requested!r}; this hospital's policy allows {self.release_metrics!r}"
            )
        return requested

    def admit_task(self, task: TaskConfig, requested: PrivacyPolicy) -> None:
        """Refuse (:class:`PolicyRefusal`, naming the setting and the policy's field) a
        task larger than this hospital's size limits; call it before the model is built
        or any data is read.

        Guarantee: whether it refuses depends only on ``task`` and ``requested`` (the
        coordinator's run config) and on these limits, never on the hospital's data, so
        a refusal tells the coordinator nothing it did not send. Checked: local epochs
        (``max_local_epochs``), the expected batch size of Poisson sampling
        (``max_batch_size``) and, for an image task, the image side
        (``max_image_size``), the image model's parameters (``max_model_parameters``,
        counted for the declared ``num-classes`` and ``in-channels``, or for 2 classes
        and 1 channel where the hospital's data decides them) and, in
        ``grad_sample_mode`` ``hooks`` (the mode that holds one gradient per example),
        the expected batch size times those parameters (``max_per_example_gradients``).
        The bundled tabular tasks' models are fixed by their public data (a few
        thousand parameters)."""
        self._within("local-epochs", requested.local_epochs, "max_local_epochs")
        self._within("batch-size", task.batch_size, "max_batch_size")
        if task.dataset not in IMAGE_DATASETS:
            return
        self._within("image-size", task.image_size, "max_image_size")
        parameters = image_model_parameters(task)
        self._within("a model of", parameters, "max_model_parameters", unit=" parameters")
        if requested.grad_sample_mode == "hooks":
            self._within("grad-sample-mode hooks with per-example gradients of",
                         task.batch_size * parameters, "max_per_example_gradients",
                         unit=" values (batch-size x parameters)")

    def _within(self, setting: str, value: int, limit: str, unit: str = "") -> None:
        if not value <= getattr(self, limit):  # NaN too
            raise PolicyRefusal(
                f"refused: the coordinator asks for {setting} {value}{unit}; this hospital's "
                f"policy allows at most {getattr(self, limit)} ({limit})")

    def to_plain(self) -> dict[str, Any]:
        """Plain dict (the file's content)."""
        return asdict(self)


def image_model_parameters(task: TaskConfig) -> int:
    """The parameters of ``task``'s image model (bract's ChestCNN at its image size),
    counted without allocating them (torch's ``meta`` device) and without reading any
    data: for the declared classes and channels, else for 2 classes and 1 channel."""
    import torch

    from bract.models import ChestCNN

    with torch.device("meta"):
        model = ChestCNN(image_size=task.image_size, in_channels=task.in_channels or 1,
                         num_classes=task.num_classes or 2)
    return sum(p.numel() for p in model.parameters())


def hospital_policy_of(node_config: Mapping[str, Any]) -> HospitalPolicy:
    """The hospital's own limits: the policy file its node config names (``policy``),
    or :class:`HospitalPolicy`'s defaults (epsilon <= 8 at delta <= 1e-5, never
    non-private, training metrics stay home)."""
    path = node_config.get("policy")
    if not path:
        return HospitalPolicy()
    try:
        stat = Path(str(path)).stat()
    except OSError:
        return HospitalPolicy.read(Path(str(path)))  # names the problem
    return _read_policy(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _read_policy(path: str, mtime_ns: int, size: int) -> HospitalPolicy:
    """The policy file, read once per version of it (a message reads it three times:
    the budget, the metric release, the secure-aggregation bound)."""
    return HospitalPolicy.read(Path(path))
