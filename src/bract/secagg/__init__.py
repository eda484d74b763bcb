"""bract's hardened secure aggregation: a pure library (no flwr, no torch).

Bonawitz et al. 2017 double masking with Shamir-shared secrets, dropout recovery
and the consistency check, on a complete graph or the SecAgg+ sparse graph
(Bell et al. 2020); every maskable secret serves one round, each client enforces
a declared collusion bound, and every revealed share is checked against its
dealer's commitment. See ``docs/secagg.md`` and :mod:`bract.secagg.protocol`.
"""

from .crypto import SigningKey
from .driver import STAGES, run_round
from .encoding import EncodingConfig
from .errors import (
    AuthenticationError,
    ConfigurationError,
    ConsistencyError,
    EncodingError,
    KeyRotationRequired,
    MalformedMessage,
    ProtocolViolation,
    ReplayError,
    RoundAborted,
    SecAggError,
    ThresholdPolicyError,
)
from .messages import (
    ConsistencyRequest,
    ConsistencySignature,
    KeyAdvertisement,
    MaskedInput,
    MaskRequest,
    Message,
    RoundConfig,
    ShareKeys,
    UnmaskReply,
    UnmaskRequest,
    message_from_bytes,
    message_from_dict,
)
from .protocol import (
    AggregateResult,
    ClientPolicy,
    ClientSession,
    ServerSession,
    alive_shortfall,
    default_colluders,
    required_threshold,
)

__all__ = [
    "STAGES",
    "AggregateResult",
    "AuthenticationError",
    "ClientPolicy",
    "ClientSession",
    "ConfigurationError",
    "ConsistencyError",
    "ConsistencyRequest",
    "ConsistencySignature",
    "EncodingConfig",
    "EncodingError",
    "KeyAdvertisement",
    "KeyRotationRequired",
    "MalformedMessage",
    "MaskRequest",
    "MaskedInput",
    "Message",
    "ProtocolViolation",
    "ReplayError",
    "RoundAborted",
    "RoundConfig",
    "SecAggError",
    "ServerSession",
    "ShareKeys",
    "SigningKey",
    "ThresholdPolicyError",
    "UnmaskReply",
    "UnmaskRequest",
    "alive_shortfall",
    "default_colluders",
    "message_from_bytes",
    "message_from_dict",
    "required_threshold",
    "run_round",
]
