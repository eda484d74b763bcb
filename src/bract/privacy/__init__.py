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
from bract.privacy.noise import SecureGaussian, use_secure_noise
from bract.privacy.training import (
    GRAD_SAMPLE_MODES,
    PrivateTrainer,
    RoundOutcome,
    check_privatisable,
    choose_grad_sample_mode,
    load_weights,
    resolve_device,
    weights_of,
)

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_ACCOUNTANT",
    "GRAD_SAMPLE_MODES",
    "BudgetDecision",
    "Calibration",
    "DpSgdEvent",
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
