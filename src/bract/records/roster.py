"""The federation's roster: who its members are and which Ed25519 key speaks for each.

One file, one parser. Format (JSON)::

    {"federation_id": "...", "members": [{"id": 1, "name": "hospital-a",
                                          "public_key": "<64 hex digits>"}, ...]}

``id`` is a member's secure-aggregation id, ``name`` the ``client_id`` its ledger
entries carry, ``public_key`` its raw 32-byte Ed25519 key. Each hospital's operator
gives it this file out of band; the coordinator holds a copy for early checks, and an
auditor takes it from the hospitals, never from the party it audits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Roster", "read_roster", "write_roster"]


@dataclass(frozen=True)
class Roster:
    """The federation's members: id -> (name, Ed25519 public key).

    Guarantee of :meth:`from_json`: a returned roster has a string federation id,
    distinct integer ids, and a 32-byte key for every member; anything else raises
    ``ValueError`` naming the problem.
    """

    federation_id: str
    keys: dict[int, bytes]
    names: dict[int, str]

    def to_json(self) -> str:
        """Stable JSON text: ``{"federation_id", "members": [{id, name, public_key}]}``."""
        members = [
            {"id": i, "name": self.names.get(i, f"member-{i}"), "public_key": k.hex()}
            for i, k in sorted(self.keys.items())
        ]
        return json.dumps({"federation_id": self.federation_id, "members": members}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Roster:
        """Parse a roster file's text; names what is wrong with a malformed one."""
        try:
            data = json.loads(text)
            members = data["members"]
            keys = {int(m["id"]): bytes.fromhex(m["public_key"]) for m in members}
            names = {int(m["id"]): str(m.get("name", "")) for m in members}
            federation_id = data["federation_id"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"malformed roster: {exc!r}") from None
        if not isinstance(federation_id, str):
            raise ValueError("malformed roster: 'federation_id' must be a string")
        if len(keys) != len(members):
            raise ValueError("malformed roster: duplicate member ids")
        bad = sorted(names[i] or str(i) for i, k in keys.items() if len(k) != 32)
        if bad:
            raise ValueError(f"malformed roster: public key of {bad} is not 32 bytes (Ed25519)")
        return cls(federation_id, keys, names)

    def signers(self) -> dict[str, bytes]:
        """Member name -> public key (the ledger's ``client_id`` -> its signing key)."""
        return {self.names.get(i, f"member-{i}"): k for i, k in self.keys.items()}


def write_roster(path: Path, roster: Roster) -> None:
    """Write a roster file (public data)."""
    Path(path).write_text(roster.to_json() + "\n", encoding="utf-8")


def read_roster(path: Path) -> Roster:
    """Read a roster file written by :func:`write_roster`."""
    return Roster.from_json(Path(path).read_text(encoding="utf-8"))
