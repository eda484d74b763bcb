"""Differential privacy on each hospital: DP-SGD, the privacy ledger, budgets.

Imports neither flwr nor anything of secure aggregation.
"""

from bract.privacy.accounting import (
    ACCOUNTANTS,
    DEFAULT_ACCOUNTANT,
    BudgetDecision,
    Calibration,
    DpSgdEvent,
    PrivacyBudget,
    PrivacyError,
    PrivacyLedger,
    TrainingPlan,
    calibrate,
    epsilon_of,
    read_jsonl,
    write_jsonl,
)
from bract.privacy.metrics_release import RELEASED_METRICS, MetricsRelease

# DP-SGD and the secure noise need torch: they load on first use, so the ledger and
# its accountants (and the auditors that read them) import without torch.
_LAZY = {
    "SecureGaussian": "noise",
    "use_secure_noise": "noise",
    "GRAD_SAMPLE_MODES": "training",
    "PrivateTrainer": "training",
    "RoundOutcome": "training",
    "check_privatisable": "training",
    "choose_grad_sample_mode": "training",
    "load_weights": "training",
    "resolve_device": "training",
    "weights_of": "training",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"bract.privacy.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bract.privacy' has no attribute {name!r}")


__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_ACCOUNTANT",
    "GRAD_SAMPLE_MODES",
    "RELEASED_METRICS",
    "BudgetDecision",
    "Calibration",
    "DpSgdEvent",
    "MetricsRelease",
    "PrivacyBudget",
    "PrivacyError",
    "PrivacyLedger",
    "PrivateTrainer",
    "RoundOutcome",
    "SecureGaussian",
    "TrainingPlan",
    "calibrate",
    "check_privatisable",
    "choose_grad_sample_mode",
    "epsilon_of",
    "load_weights",
    "read_jsonl",
    "resolve_device",
    "use_secure_noise",
    "weights_of",
    "write_jsonl",
]
