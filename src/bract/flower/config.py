"""The federation's configuration, declared once.

:class:`FederationConfig` holds what the coordinator of a federation asks for:
the task (data, model, local training), the privacy budget it asks each
hospital to meet, and secure aggregation. Every setting is one :class:`Option`
in :data:`OPTIONS`; from that one table the config

- adds its command-line flags to ``bract simulate``, ``bract deploy`` and
  ``bract compare`` (:meth:`FederationConfig.add_arguments`),
- converts to and from Flower's run config (:meth:`FederationConfig.to_run_config`,
  :meth:`FederationConfig.from_run_config`), where a setting left to its default
  is a word (``"calibrate"``, ``"dataset-default"``, ...), never a number that
  means "not set", and
- checks every value, whichever way it came in, with an error naming the
  setting and what it accepts.

A hospital's own limits are not here: the coordinator's config only *asks*
(:mod:`bract.flower.hospital_policy` decides what a hospital admits).
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bract.flower.client import PrivacyPolicy
    from bract.tasks import TaskConfig

__all__ = ["OPTIONS", "RUN_CONFIG_DEFAULTS", "FederationConfig", "Option", "check_device",
           "device_arg", "device_problem"]

_DATASETS = ("synthetic", "breast-cancer", "diabetes", "medmnist", "imagefolder")

#: What ``device`` takes (anything else, e.g. ``tpu`` or ``cuda:x``, is refused by name).
DEVICES_TEXT = "cpu, cuda or cuda:N"


def check_device(value: str) -> str:
    """``value`` if it names a device bract trains on (cpu, cuda, cuda:N), else
    ``ValueError`` saying what it takes."""
    if value in ("cpu", "cuda") or re.fullmatch(r"cuda:[0-9]+", value):
        return value
    raise ValueError(f"must be {DEVICES_TEXT}")


def device_problem(device: str | None) -> str | None:
    """Why this machine cannot train on ``device`` (CUDA asked for where torch sees
    none, or a CUDA index past the last one), or ``None`` when it can. ``None`` (CUDA
    when available, else the CPU) and ``cpu`` always can; torch is imported only for
    a CUDA device."""
    if device in (None, "auto", "cpu"):
        return None
    import torch

    if not torch.cuda.is_available():
        return (f"{device} was asked for but torch sees no CUDA device on this machine: "
                "use cpu, or leave the device out (CUDA when available, else the CPU)")
    index = int(device.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        return (f"{device} was asked for but this machine has {count} CUDA device(s): "
                f"cuda:0 to cuda:{count - 1}")
    return None


def device_arg(text: str) -> str:
    """argparse ``type`` of a local ``--device``: cpu, cuda or cuda:N, and a CUDA device
    only where this machine has it (``ArgumentTypeError`` naming what it takes)."""
    try:
        value = check_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}, got {text!r}") from None
    problem = device_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


@dataclass(frozen=True)
class Option:
    """One setting of the federation: its name, kind, default, bounds and help.

    ``unset`` is the run-config word for "not set" (``None`` in Python); an option
    without one always has a value. ``low``/``high`` bound numbers (``open_low``:
    the low bound itself is excluded). ``flag``: offered on the command line;
    ``run_config``: travels in Flower's run config. ``form`` checks a text value's
    form (``ValueError``), ``accepts`` then says what it takes, and ``argtype``, when
    given, is the flag's argparse ``type`` (a check only the parsing machine can make).
    """

    name: str
    kind: type
    default: Any
    help: str
    unset: str = ""
    choices: tuple[str, ...] = ()
    low: float | None = None
    open_low: bool = False
    high: float | None = None
    open_high: bool = False
    flag: bool = True
    run_config: bool = True
    form: Callable[[str], str] | None = None
    accepts: str = ""
    argtype: Callable[[str], Any] | None = None

    @property
    def key(self) -> str:
        """The run-config key (also the flag, after ``--``)."""
        return self.name.replace("_", "-")

    def _bounds_text(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.open_low else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.open_high else '<='} {self.high:g}")
        return " and ".join(parts)

    def _accepts(self) -> str:
        if self.accepts:
            what = self.accepts
        elif self.choices:
            what = "one of " + ", ".join(self.choices)
        elif self.kind is int:
            what = f"an integer {self._bounds_text()}".strip()
        elif self.kind is float:
            what = f"a finite number {self._bounds_text()}".strip()
        else:
            what = {bool: "true or false", str: "text", Path: "a path"}[self.kind]
        if self.unset:
            what += f", or {self.unset!r}"
        return what

    def check(self, value: Any) -> Any:
        """``value`` as this option's kind, or ``ValueError`` saying what it accepts."""
        if value is None:
            if self.unset or self.default is None:
                return None
            raise ValueError(f"must be {self._accepts()}")
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"must be {self._accepts()}")
            return value
        if self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"must be {self._accepts()}")
            if self.kind is int and (not math.isfinite(value) or value != int(value)):
                raise ValueError(f"must be {self._accepts()}")
            value = self.kind(value)
            if not math.isfinite(value) or not self._within(value):
                raise ValueError(f"must be {self._accepts()}")
            return value
        if self.kind is Path:
            if not isinstance(value, (str, Path)):
                raise ValueError(f"must be {self._accepts()}")
            return Path(value)
        if not isinstance(value, str):
            raise ValueError(f"must be {self._accepts()}")
        if self.choices and value not in self.choices:
            raise ValueError(f"must be {self._accepts()}")
        if self.form is not None:
            try:
                return self.form(value)
            except ValueError:
                raise ValueError(f"must be {self._accepts()}") from None
        return value

    def _within(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
            return False
        return not (self.high is not None
                    and (value > self.high or (self.open_high and value == self.high)))

    def from_text(self, text: str) -> Any:
        """A command-line string as this option's value (argparse's ``type``)."""
        if self.unset and text == self.unset:
            return None
        try:
            if self.kind is int:
                value: Any = int(text)
            elif self.kind is float:
                value = float(text)
            else:
                value = text
            return self.check(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {self._accepts()}, got {text!r}"
                                              ) from None

    def to_run_config(self, value: Any) -> Any:
        """The value as Flower's run config holds it (``unset`` for ``None``)."""
        if value is None:
            return self.unset
        return str(value) if isinstance(value, Path) else value

    def from_run_config(self, value: Any) -> Any:
        """A run-config value as this option's value (``ValueError`` naming the key)."""
        if self.unset and value == self.unset:
            return None
        try:
            return self.check(value)
        except ValueError as exc:
            raise ValueError(f"run config {self.key}={value!r}: {exc}") from None


#: Every setting of the federation, in the order ``--help`` lists them.
OPTIONS: tuple[Option, ...] = (
    Option("clients", int, 3, "hospitals", low=1),
    Option("rounds", int, 3, "rounds", low=1),
    Option("dataset", str, "synthetic",
           "diabetes is regression (MSE, R²); medmnist and imagefolder read --data-path",
           choices=_DATASETS),
    Option("data_path", str, "",
           "MedMNIST .npz file (medmnist) or folder of class sub-folders (imagefolder); "
           "nothing is downloaded"),
    Option("strict_data", bool, False, "image folders: stop at the first file that cannot "
           "be read as one image instead of skipping it (skipped files are counted in one "
           "warning line)"),
    Option("partition", str, "iid", "how the training set is split between hospitals",
           choices=("iid", "dirichlet", "quantity", "column")),
    Option("alpha", float, 0.5,
           "Dirichlet concentration of the dirichlet and quantity partitions (small: more skew)",
           low=0, open_low=True),
    Option("partition_column", str, "",
           "column of --partition column: 'label', a feature name or index"),
    Option("samples", int, None, "total examples to generate/use (default: 4800 images, all "
           "tabular)", unset="dataset-default", low=1),
    Option("image_size", int, 28, "image side in pixels, images are resized to it "
           "(multiple of 4)", low=4),
    Option("num_classes", int, None, "the image model's classes, declared by a coordinator "
           "that holds no data (hospitals bring their own files)", unset="from-data", low=2,
           flag=False),
    Option("in_channels", int, None, "the image model's input channels, declared with "
           "num-classes", unset="from-data", low=1, flag=False),
    Option("batch_size", int, None, "expected batch size of Poisson sampling (default: 64 "
           "images, 32 tabular)", unset="dataset-default", low=1),
    Option("lr", float, None, "local SGD learning rate (default: 0.3 images, 0.2 "
           "breast-cancer, 0.5 diabetes)", unset="dataset-default", low=0, open_low=True),
    Option("momentum", float, None, "local SGD momentum (default: 0.5 images, 0 tabular)",
           unset="dataset-default", low=0, high=1, open_high=True),
    Option("local_epochs", int, 1, "local epochs per round", low=1),
    Option("max_grad_norm", float, 1.0, "per-example clip norm of DP-SGD", low=0,
           open_low=True),
    Option("seed", int, 0, "seed of the synthetic data, the bundled sets' test split, the "
           "--samples subset, the partition between simulated hospitals and the model "
           "initialisation (never of the noise or the sampling, nor of an image folder's or "
           "MedMNIST file's held-out split)", low=0),
    Option("target_epsilon", float, 8.0, "the epsilon each hospital is asked to meet over "
           "the whole run (a hospital's own policy may allow less; at most 50, bract's "
           "ceiling; at least 0.05, its floor)", low=0.05, high=50),
    Option("delta", float, 1e-5, "delta of the privacy budget", low=0, open_low=True, high=1,
           open_high=True),
    Option("noise_multiplier", float, None, "fixed noise instead of calibrating it to the "
           "target; 0 is NO noise, flagged NON-PRIVATE everywhere", unset="calibrate", low=0,
           high=1e4),
    Option("accountant", str, "prv", "privacy accountant", choices=("prv", "pld", "rdp")),
    Option("grad_sample_mode", str, "auto", "per-example clipping: bk (book-keeping, one "
           "backward pass; what auto picks when the model allows) or hooks (Opacus); "
           "hospitals refuse Opacus's ghost clipping",
           choices=("auto", "hooks", "bk")),
    Option("device", str, None, "cpu, cuda or cuda:N; a CUDA device only where torch sees "
           "it (default: cuda if available)", run_config=False, form=check_device,
           accepts=DEVICES_TEXT, argtype=device_arg),
    Option("secagg", bool, True, "secure aggregation (--no-secagg: plain FedAvg, updates "
           "in clear)"),
    Option("secagg_clip", float, 8.0, "bound on each update coordinate for the fixed-point "
           "encoding", low=0, open_low=True),
    Option("secagg_graph", str, "auto", "who shares with whom: auto (each round the "
           "sparsest graph that keeps the collusion bound and survives secagg-dropouts; the "
           "complete graph while no dropouts are declared), the complete graph, or "
           "SecAgg+'s sparse harary graph", choices=("auto", "complete", "harary")),
    Option("secagg_colluders", int, None, "colluding hospitals (with the server) that secure "
           "aggregation must withstand; every hospital enforces it (default: floor((n-1)/3) "
           "of the federation's n, in every round; "
           "a sparse harary graph needs a small value)", unset="one-third", low=0),
    Option("secagg_dropouts", int, None, "hospitals every secure round must survive dropping "
           "out, wherever they fall; refused if the graph cannot, and lets auto pick a sparse "
           "graph (default: not declared)", unset="none", low=0),
    Option("secagg_abort_limit", int, 2, "stop the federation after this many consecutive "
           "secure rounds that aborted after their hospitals trained (each spent privacy "
           "budget and produced no model); 0: no limit", low=0,
           accepts="an integer >= 1, or 0 for no limit"),
    Option("release_metrics", str, "none", "hospitals' metrics (the received model's loss on "
           "their records, their held-out evaluation), noised and counted in their epsilon: "
           "stay home (none), leave only inside the masked sum (aggregate), or in clear "
           "(clear, without secure aggregation only)", choices=("none", "aggregate", "clear")),
    Option("metrics_noise", float, 10.0, "noise multiplier of each hospital's metrics "
           "release (a hospital's own policy may require more)", low=0, open_low=True),
    Option("round_timeout", float, None, "seconds the server waits for a round's replies",
           unset="none", low=0, open_low=True),
    Option("out", Path, Path("runs/flwr"), "the coordinator's output directory", flag=False),
    Option("roster", str, "", "the coordinator's copy of the federation's roster file "
           "(secure aggregation and signed ledgers; docs/deployment.md)", flag=False),
    Option("reply_poll", float, 0.1, "the longest pause (s) between the server's pulls "
           "while it waits for a stage's replies (Flower's own: 3 on a SuperLink)", low=0,
           open_low=True, high=3.0, flag=False),
    Option("resume", bool, False, "continue the run in out after its last completed round "
           "(its checkpoint must have the same settings); off: an out that holds a run is "
           "refused", flag=False),
    Option("progress", bool, True, "the ServerApp's live table and progress bar; false: one "
           "plain line per round (bract deploy --no-progress)", flag=False),
)

_BY_NAME = {o.name: o for o in OPTIONS}
_BY_KEY = {o.key: o for o in OPTIONS if o.run_config}


@dataclass(frozen=True)
class FederationConfig:
    """What a coordinator asks of a federation; every field is one :data:`OPTIONS` entry.

    Construction checks every value (``ValueError`` naming the setting). ``None``
    means "not set": the dataset's default, a calibrated noise, the default
    collusion bound, no round timeout.
    """

    clients: int = 3
    rounds: int = 3
    dataset: str = "synthetic"
    data_path: str = ""
    strict_data: bool = False
    partition: str = "iid"
    alpha: float = 0.5
    partition_column: str = ""
    samples: int | None = None
    image_size: int = 28
    num_classes: int | None = None
    in_channels: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    momentum: float | None = None
    local_epochs: int = 1
    max_grad_norm: float = 1.0
    seed: int = 0
    target_epsilon: float = 8.0
    delta: float = 1e-5
    noise_multiplier: float | None = None
    accountant: str = "prv"
    grad_sample_mode: str = "auto"
    device: str | None = None
    secagg: bool = True
    secagg_clip: float = 8.0
    secagg_graph: str = "auto"
    secagg_colluders: int | None = None
    secagg_dropouts: int | None = None
    secagg_abort_limit: int = 2
    release_metrics: str = "none"
    metrics_noise: float = 10.0
    round_timeout: float | None = None
    out: Path = Path("runs/flwr")
    roster: str = ""
    reply_poll: float = 0.1
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            option = _BY_NAME[f.name]
            try:
                value = option.check(getattr(self, f.name))
            except ValueError as exc:
                raise ValueError(f"{option.key}={getattr(self, f.name)!r}: {exc}") from None
            object.__setattr__(self, f.name, value)
        self._check_together()

    def _check_together(self) -> None:
        """Settings that only make sense together (each error names the fix)."""
        if self.release_metrics == "aggregate" and not self.secagg:
            raise ValueError("release-metrics aggregate needs secure aggregation (the loss "
                             "leaves only inside the masked sum)")
        if self.release_metrics == "clear" and self.secagg:
            raise ValueError("with secure aggregation metrics leave only in aggregate, never "
                             "in clear (release-metrics aggregate, or --no-secagg)")
        if self.secagg:
            if self.clients < 3:
                raise ValueError("secure aggregation needs at least 3 hospitals: with 2, each "
                                 "would learn the other's update from the sum (or --no-secagg)")
            from bract.secagg import SecAggError
            from bract.secagg.protocol import check_dropouts

            try:
                check_dropouts(self.clients, self.secagg_graph, None, self.secagg_colluders, 2,
                               self.secagg_dropouts)
            except SecAggError as exc:
                raise ValueError(f"{exc} (secagg-colluders, secagg-dropouts)") from None
        if (self.num_classes is None) != (self.in_channels is None):
            raise ValueError("declare the model with both num-classes and in-channels, or "
                             "neither (then the data's own shape is used)")

    # ------------------------------------------------------------------ what it asks
    @property
    def non_private(self) -> bool:
        """Whether it asks for no noise at all (flagged NON-PRIVATE everywhere)."""
        return self.noise_multiplier == 0

    def task(self) -> TaskConfig:
        """The task every hospital trains (unset values take the dataset's defaults)."""
        from bract.tasks import TaskConfig

        return TaskConfig.for_dataset(
            self.dataset, clients=self.clients, seed=self.seed, image_size=self.image_size,
            n_samples=self.samples, batch_size=self.batch_size, lr=self.lr,
            momentum=self.momentum, data_path=self.data_path, partition=self.partition,
            alpha=self.alpha, partition_column=self.partition_column,
            num_classes=self.num_classes, in_channels=self.in_channels,
            strict_data=self.strict_data,
        )

    def policy(self) -> PrivacyPolicy:
        """The privacy policy it asks every hospital to train under."""
        from bract.flower.client import PrivacyPolicy

        return PrivacyPolicy(
            target_epsilon=self.target_epsilon, delta=self.delta, rounds=self.rounds,
            local_epochs=self.local_epochs, max_grad_norm=self.max_grad_norm,
            noise_multiplier=self.noise_multiplier, accountant=self.accountant,
            grad_sample_mode=self.grad_sample_mode, allow_non_private=self.non_private,
            device=self.device, sampling_seed=self.seed if self.non_private else None,
            metrics_noise_multiplier=self.metrics_noise,
        )

    # ------------------------------------------------------------------ Flower's run config
    def to_run_config(self) -> dict[str, Any]:
        """Flower's run config for this federation: every key, ``unset`` words for ``None``."""
        return {o.key: o.to_run_config(getattr(self, o.name)) for o in OPTIONS if o.run_config}

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FederationConfig:
        """The federation a Flower run config describes; missing keys take their defaults.

        Raises ``ValueError`` naming the key for a value of the wrong kind or out of
        range, and for a key bract does not know (a typo would otherwise be ignored).
        """
        unknown = sorted(set(run_config) - set(_BY_KEY))
        if unknown:
            raise ValueError(f"run config has keys bract does not know: {unknown} (known: "
                             f"{sorted(_BY_KEY)})")
        values = {_BY_KEY[k].name: _BY_KEY[k].from_run_config(v) for k, v in run_config.items()}
        return cls(**values)

    # ------------------------------------------------------------------ the command line
    @staticmethod
    def add_arguments(
        parser: argparse.ArgumentParser,
        only: Iterable[str] | None = None,
        *,
        skip: Iterable[str] = (),
        defaults: Mapping[str, Any] | None = None,
        choices: Mapping[str, tuple[str, ...]] | None = None,
        helps: Mapping[str, str] | None = None,
    ) -> None:
        """Add the flags of the options named in ``only`` (default: every option with a
        flag), less ``skip``; ``defaults`` and ``choices`` narrow them for one command,
        and ``helps`` replaces an option's help text where the narrowing changes it."""
        helps = dict(helps or {})
        defaults = dict(defaults or {})
        choices = dict(choices or {})
        names = [o.name for o in OPTIONS if o.flag] if only is None else list(only)
        for name in names:
            if name in set(skip):
                continue
            option = _BY_NAME[name]
            if name in choices:
                option = replace(option, choices=choices[name])
            default = option.check(defaults.get(name, option.default))
            shown = ("on" if default else "off") if option.kind is bool else default
            text = helps.get(name, option.help)
            if shown not in ("", None) and "default:" not in text:
                text = f"{text} (default: {shown})"
            if option.kind is bool:
                parser.add_argument(f"--{option.key}", dest=name, default=default, help=text,
                                    action=argparse.BooleanOptionalAction)
                continue
            parser.add_argument(
                f"--{option.key}", dest=name, default=default, help=text,
                type=option.argtype or option.from_text,
                metavar=option.key.upper().replace("-", "_") if not option.choices else None,
                choices=[*option.choices] if option.choices else None,
            )

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> FederationConfig:
        """The federation the parsed flags describe (options without a flag take their
        defaults, or ``overrides``)."""
        values = {o.name: getattr(args, o.name) for o in OPTIONS
                  if o.flag and hasattr(args, o.name)}
        for name, value in values.items():
            if isinstance(value, list):  # argparse drops a bare "--" given as a value
                raise ValueError(f"--{_BY_NAME[name].key}: no value: '--' marks the end of "
                                 "the options and cannot be a value")
        config = cls(**{**values, **overrides})
        if not config.secagg:
            # A secure-aggregation flag with --no-secagg is a mistake, never a setting.
            given = [f"--{o.key} {values[o.name]}" for o in OPTIONS
                     if o.name.startswith("secagg_") and o.name in values
                     and values[o.name] != o.default]
            if given:
                raise ValueError(f"{', '.join(given)} set{'s' if len(given) == 1 else ''} up "
                                 "secure aggregation, which --no-secagg turns off: leave "
                                 f"{'it' if len(given) == 1 else 'them'} out, or drop "
                                 "--no-secagg")
        return config


#: Flower's run config with every key at its default (``pyproject.toml``'s
#: ``[tool.flwr.app.config]`` holds the same; a test keeps them equal).
RUN_CONFIG_DEFAULTS: dict[str, Any] = FederationConfig().to_run_config()
