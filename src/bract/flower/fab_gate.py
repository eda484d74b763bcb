"""Which code a hospital's SuperNode runs: bract's own ClientApp, never code a run ships.

Flower's ClientApp runtime (``run_clientapp``, the target of the warm executor's
children and of ``flwr-clientapp``) installs each run's FAB (Flower App Bundle, built
by the coordinator's ``flwr run``) and imports the ``clientapp`` component its
``pyproject.toml`` names, from the FAB's own directory first. Whoever submits a run
would otherwise choose the code that receives a hospital's Context: its node config
(data paths, its loader, its keys) and its state.

``bract-supernode`` therefore checks every FAB the moment its SuperNode pulls it from
the SuperLink (:func:`guard_supernode`, wrapping Flower's ``_pull_and_store_message``),
before it stores the FAB, the run or the message, so before any process can install
or import it. A FAB passes (:func:`check_fab`) only when

* its content's SHA-256 is the hash the SuperLink names for it and for its run, and
  the run's app id and version are the ones its ``pyproject.toml`` declares (so the
  ClientApp loads the very files checked here); and
* either this hospital's operator allowed it by that SHA-256 (``bract-supernode
  --allow-fab HASH``, or node config ``allowed-fab-hashes``: an app a hospital's
  developers built on bract), or it is configuration only: its ``clientapp`` component
  is :data:`BRACT_CLIENTAPP` (the bract installed next to the SuperNode) and it holds
  no file but :data:`FAB_CONFIG`, :data:`FAB_MANIFEST` and top-level ``*.md`` and
  ``LICENSE`` files (nothing Python can import: no ``.py``, ``.pyc``, ``.so``,
  ``.pth``, no package folder).

A refused FAB is answered like Flower's own failed FAB verification: the message gets
an error reply (``ErrorCode.INVALID_FAB``, its reason saying why), the hospital logs
one line naming the run, the FAB's SHA-256 and the reason, nothing of the run is kept,
and the SuperNode goes on pulling. The Flower internals this relies on are pinned
(:func:`check_internals`, checked at start; ``tests/flower/test_fab_gate.py`` checks
the code they belong to still reads as expected).
"""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping
from logging import ERROR
from types import ModuleType
from typing import Any

__all__ = ["BRACT_CLIENTAPP", "FAB_CONFIG", "FAB_MANIFEST", "NODE_CONFIG_KEY", "FabRefused",
           "allowed_hashes", "check_fab", "check_internals", "guard_supernode", "is_metadata"]

#: The only ClientApp component a FAB that its hospital did not allow by hash may name.
BRACT_CLIENTAPP = "bract.flower.app:client_app"
#: The FAB's app configuration (Flower reads the run config and the components from it).
FAB_CONFIG = "pyproject.toml"
#: The manifest of file hashes Flower's ``flwr build`` writes into every FAB.
FAB_MANIFEST = ".info/CONTENT"
#: Node config key listing the SHA-256 hashes of FABs this hospital's operator allows
#: whatever they hold (separated by spaces or commas; a TOML node config may list them).
NODE_CONFIG_KEY = "allowed-fab-hashes"
#: The largest ``pyproject.toml`` read from a FAB (bract's is 20 KB).
MAX_CONFIG_BYTES = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


class FabRefused(Exception):  # noqa: N818 (a refusal, the reply's error)
    """A run's FAB this hospital does not run; the message says why, without anything
    of the hospital's (it is the error reply's reason)."""


def is_metadata(name: str) -> bool:
    """Whether a FAB member named ``name`` is configuration or documentation that no
    import can load: :data:`FAB_CONFIG`, :data:`FAB_MANIFEST`, or a top-level ``*.md``
    or ``LICENSE`` file (the only other files Flower's ``flwr build`` puts at the top
    that hold no code)."""
    if name in (FAB_CONFIG, FAB_MANIFEST, "LICENSE"):
        return True
    return "/" not in name and "\\" not in name and name.endswith(".md") and len(name) > 3


def allowed_hashes(values: Iterable[str]) -> frozenset[str]:
    """The SHA-256 hashes in ``values`` (each a hash, or several separated by spaces or
    commas), lower-cased; ``ValueError`` naming any entry that is not 64 hex digits."""
    found: set[str] = set()
    for value in values:
        for entry in re.split(r"[\s,]+", str(value).strip()):
            if not entry:
                continue
            if not _SHA256.fullmatch(entry.lower()):
                raise ValueError(f"an allowed FAB hash must be a SHA-256 (64 hex digits), "
                                 f"got {entry[:80]!r}")
            found.add(entry.lower())
    return frozenset(found)


def node_config_hashes(node_config: Mapping[str, Any]) -> frozenset[str]:
    """The hashes the node config's :data:`NODE_CONFIG_KEY` lists (a string, or a list
    of strings from a TOML node config); ``ValueError`` for a malformed entry."""
    value = node_config.get(NODE_CONFIG_KEY)
    if value is None:
        return frozenset()
    if isinstance(value, str):
        return allowed_hashes([value])
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return allowed_hashes(value)
    raise ValueError(f"node config {NODE_CONFIG_KEY} must list SHA-256 hashes, got "
                     f"{type(value).__name__}")


def _short(text: object) -> str:
    return repr(str(text)[:80])


def check_fab(content: bytes, *, hashes: Iterable[str], fab_id: str, fab_version: str,
              allowed: frozenset[str] = frozenset()) -> str:
    """The SHA-256 of a run's FAB ``content`` when this hospital runs it; otherwise
    :class:`FabRefused` saying why.

    Guarantee: a FAB passes only if ``content`` hashes to every one of ``hashes`` (what
    the SuperLink names for the FAB and for its run), its ``pyproject.toml`` declares
    app ``fab_id`` version ``fab_version`` (the run's: the ClientApp loads the app of
    that id, version and hash), and either its SHA-256 is in ``allowed`` or it names
    :data:`BRACT_CLIENTAPP` as its ``clientapp`` and holds only :func:`is_metadata`
    members, each once. The check opens no file and imports nothing from the FAB."""
    from flwr.common.config import get_fab_config, get_metadata_from_config

    digest = hashlib.sha256(content).hexdigest()
    if any(str(h).lower() != digest for h in hashes):
        raise FabRefused("its content does not match the SHA-256 the SuperLink names for it")
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            members = archive.infolist()
            config_info = next((m for m in members if m.filename == FAB_CONFIG), None)
            if config_info is not None and config_info.file_size > MAX_CONFIG_BYTES:
                raise FabRefused(f"its {FAB_CONFIG} is larger than {MAX_CONFIG_BYTES} bytes")
        config = get_fab_config(content)
        declared_id, declared_version = get_metadata_from_config(config)
        component = config["tool"]["flwr"]["app"]["components"]["clientapp"]
    except FabRefused:
        raise
    except (zipfile.BadZipFile, KeyError, TypeError, ValueError, EOFError) as exc:
        raise FabRefused(f"it is not a FAB with a readable {FAB_CONFIG} naming a clientapp "
                         f"({type(exc).__name__})") from None
    if (declared_id, declared_version) != (fab_id, fab_version):
        raise FabRefused(f"the run names app {_short(fab_id)} version {_short(fab_version)}, "
                         f"its FAB declares {_short(declared_id)} {_short(declared_version)}")
    if digest in allowed:
        return digest
    if component != BRACT_CLIENTAPP:
        raise FabRefused(f"its clientapp is {_short(component)}; this hospital runs only "
                         f"{BRACT_CLIENTAPP} unless its operator allows the FAB by hash")
    names = [m.filename for m in members]
    for name in names:
        if not is_metadata(name):
            raise FabRefused(f"it carries {_short(name)}; this hospital takes configuration "
                             f"only ({FAB_CONFIG}, top-level *.md and LICENSE), never code, "
                             "unless its operator allows the FAB by hash")
    if len(set(names)) != len(names):
        raise FabRefused("it holds a file twice")
    return digest


def check_internals(module: ModuleType) -> None:
    """``RuntimeError`` unless the installed Flower is the pinned release and ``module``
    (``flwr.supernode.start_client_internal``) has the functions :func:`guard_supernode`
    wraps and calls."""
    from bract.flower.warm_executor import check_flower_version

    check_flower_version()
    for name in ("_pull_and_store_message", "_insert_message"):
        if not callable(getattr(module, name, None)):
            raise RuntimeError(f"Flower's SuperNode has no {name}: bract-supernode cannot "
                               "check the apps it runs")


def guard_supernode(module: ModuleType | Any, allowed: frozenset[str] = frozenset(),
                    log: Callable[..., None] | None = None) -> None:
    """Make ``module``'s (``flwr.supernode.start_client_internal``'s) SuperNode refuse
    every FAB :func:`check_fab` refuses, with ``allowed`` (and the node config's
    :data:`NODE_CONFIG_KEY`) as the hashes its operator allows.

    Guarantee: Flower pulls a run's FAB (``get_fab``) only for a message of a run it
    does not know yet, and stores the FAB, the run and the message only after that
    call returns; here the call returns only a FAB that passed, so no ClientApp
    process (warm child, ``flwr-clientapp``, any executor) ever gets another. A
    refused FAB makes the message's reply an ``INVALID_FAB`` error with the reason,
    logged in one line (``log``: Flower's logger by default), and the SuperNode
    carries on; the next message of that run is checked again."""
    if log is None:
        from flwr.supercore import log as flower_log

        log = flower_log
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode

    pull = module._pull_and_store_message
    insert = module._insert_message

    def pull_and_store(**kwargs: Any) -> int | None:
        received: list[Any] = []
        runs: dict[int, Any] = {}
        pulled: list[str] = []  # the SHA-256 of each FAB pulled (what --allow-fab takes)
        receive, get_run, get_fab = kwargs["receive"], kwargs["get_run"], kwargs["get_fab"]

        def receive_message() -> Any:
            got = receive()
            if got is not None:
                received.append(got[0])
            return got

        def get_checked_run(run_id: int) -> Any:
            runs[run_id] = run = get_run(run_id)
            return run

        def get_checked_fab(fab_hash: str, run_id: int) -> Any:
            fab = get_fab(fab_hash, run_id)
            pulled.append(hashlib.sha256(fab.content).hexdigest())
            run = runs.get(run_id)
            if run is None:
                raise FabRefused("its run was not announced before it")
            try:
                trusted = allowed | node_config_hashes(kwargs["node_config"])
            except ValueError as exc:
                raise FabRefused(f"this hospital's {exc}") from None
            check_fab(fab.content, hashes=(fab_hash, fab.hash_str, run.fab_hash),
                      fab_id=run.fab_id, fab_version=run.fab_version, allowed=trusted)
            return fab

        try:
            return pull(**{**kwargs, "receive": receive_message, "get_run": get_checked_run,
                           "get_fab": get_checked_fab})
        except FabRefused as refusal:
            message = received[-1]
            run_id = message.metadata.run_id
            reason = f"bract-supernode refused the run's FAB: {refusal}"
            log(ERROR, "[RUN %s] %s (FAB SHA-256 %s; an operator who trusts this FAB allows "
                "it with bract-supernode --allow-fab HASH)", run_id, reason, pulled[-1])
            reply = Message(Error(code=ErrorCode.INVALID_FAB, reason=reason), reply_to=message)
            insert(reply, kwargs["state"], kwargs["object_store"])
            return run_id

    module._pull_and_store_message = pull_and_store
