"""A simulation plays every hospital's operator: the identities and roster it makes.

``bract simulate`` and an app run in Flower's simulation engine (``flwr run``
locally) have every hospital on one machine. The simulation then does what each
operator does in a real federation: it makes the hospital's Ed25519 identity and keeps
it in that hospital's own directory (owner-only), and publishes the roster. Server
side: :func:`simulated_identities`; hospital side: :func:`simulated_identity`. In a
real deployment each operator makes its own key (``bract hospital init``) and these
are not used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bract.flower.checkpoint import CheckpointError
from bract.flower.secagg_client import (
    SecAggIdentity,
    make_identities,
    read_identity_key,
    write_identity_key,
)
from bract.records.roster import Roster, read_roster, write_roster
from bract.secagg import ClientPolicy
from bract.secagg.crypto import SigningKey

__all__ = ["HOSPITALS_DIR", "ROSTER_FILE", "identity_file", "simulated_identities",
           "simulated_identity"]

#: Sub-directory of the run's output where simulated hospitals keep their own state.
HOSPITALS_DIR = "hospitals"
#: The federation's roster (hospital names and Ed25519 public keys), in the output.
ROSTER_FILE = "roster.json"


def identity_file(out_dir: Path, partition: int) -> Path:
    """Where simulated hospital ``partition`` keeps its identity key under ``out_dir``."""
    return Path(out_dir) / HOSPITALS_DIR / f"hospital-{partition}" / "identity.key"


def simulated_identity(ctx: Any, out_dir: Path, colluders: int | None = None
                       ) -> SecAggIdentity:
    """The identity :func:`simulated_identities` made for the hospital of ``ctx`` (its
    node config's ``partition-id``), with its roster, for secure aggregation and ledger
    signing. ``colluders``: the collusion bound it enforces (default ``floor((R-1)/3)``
    of the roster's R).
    Raises ``ValueError`` naming what is missing."""
    if "partition-id" not in ctx.node_config:
        raise ValueError("a simulated hospital's node config names its partition-id")
    pid = int(ctx.node_config["partition-id"])
    key = identity_file(out_dir, pid)
    if not key.exists():
        raise ValueError(f"no identity for simulated hospital {pid} in {key.parent}: the "
                         "ServerApp makes them (simulated_identities) before the first round")
    roster = read_roster(Path(out_dir) / ROSTER_FILE)
    return SecAggIdentity(pid + 1, read_identity_key(key), roster.keys, roster.federation_id,
                          ClientPolicy(colluders=colluders, clip_out_of_range=True))


def simulated_identities(out_dir: Path, n: int, *, resume: bool = False) -> tuple[
        Roster, list[SecAggIdentity]]:
    """The simulated hospitals' identities and roster: on resume those of the run;
    otherwise a new federation of the hospitals, each keeping the key it already has.

    A simulation plays every hospital's operator (``bract simulate``, and ``flwr run``
    in Flower's simulation engine): each key goes to that hospital's own directory
    (:func:`identity_file`, owner-only), the public roster to ``out_dir/roster.json``.
    """
    out_dir = Path(out_dir)
    key_path = [identity_file(out_dir, i) for i in range(n)]
    if not resume and any(p.exists() for p in key_path):
        return _new_federation_of(out_dir, key_path)
    if resume:
        try:
            roster = read_roster(out_dir / ROSTER_FILE)
            keys = [read_identity_key(p) for p in key_path]
        except (OSError, ValueError) as exc:
            raise CheckpointError(
                f"cannot resume: the hospitals' identities in {out_dir} are unreadable "
                f"({exc}); their ledgers were signed with them"
            ) from None
        return roster, [
            SecAggIdentity(i + 1, k, roster.keys, roster.federation_id) for i, k in enumerate(keys)
        ]
    federation_id = f"bract-sim-{os.urandom(8).hex()}"
    keys, identities = make_identities(n, federation_id)
    roster = Roster(federation_id, keys, {i + 1: f"hospital-{i}" for i in range(n)})
    out_dir.mkdir(parents=True, exist_ok=True)
    write_roster(out_dir / ROSTER_FILE, roster)
    for path, ident in zip(key_path, identities, strict=True):
        write_identity_key(path, ident.signing_key)
    return roster, identities


def _new_federation_of(out_dir: Path, key_path: list[Path]) -> tuple[
        Roster, list[SecAggIdentity]]:
    """A new federation (id and roster) of hospitals that keep their keys; a hospital
    without one gets a fresh key."""
    federation_id = f"bract-sim-{os.urandom(8).hex()}"
    signing: list[bytes] = []
    for path in key_path:
        if path.exists():
            signing.append(read_identity_key(path))
        else:
            key = SigningKey.generate().to_bytes()
            write_identity_key(path, key)
            signing.append(key)
    keys = {i + 1: SigningKey.from_bytes(k).public_bytes() for i, k in enumerate(signing)}
    roster = Roster(federation_id, keys, {i + 1: f"hospital-{i}" for i in range(len(signing))})
    write_roster(out_dir / ROSTER_FILE, roster)
    return roster, [SecAggIdentity(i + 1, k, keys, federation_id) for i, k in enumerate(signing)]


