"""Operator tooling: a hospital's identity, policy and state, and the federation's roster.

``bract hospital init DIR --id N --name NAME --federation FED`` makes, at the hospital:

* ``DIR/identity.key``: its Ed25519 private key (hex, mode 0600; never leaves);
* ``DIR/supernode-auth`` (mode 0600) and ``supernode-auth.pub``: its SuperNode's
  Flower authentication key pair (EC P-384, OpenSSH), made in the same step;
* ``DIR/public.json``: ``{"federation_id", "id", "name", "public_key",
  "supernode_auth_public_key"}`` (the one file to hand to the coordinator: the roster
  entry and the SuperNode key to register);
* ``DIR/policy.json``: its privacy policy (:class:`~bract.flower.hospital_policy.
  HospitalPolicy`), from the flags given;
* ``DIR/state/``: its privacy state directory (mode 0700), where its signed ledger
  and budget live across runs;

and prints the ``--node-config`` its SuperNode needs, with the ``dataset-id`` its
lifetime privacy budget is kept under (``--dataset-id``, default the hospital's name:
the operator's name for its patients' dataset, kept when the data moves or is
re-exported). It refuses to overwrite an existing identity (a new key would orphan the
hospital's signed ledger), and refuses, in one ``error:`` line (exit 2) before writing
anything, a name that is not a plain file name, a target epsilon outside bract's
[0.05, 50], a delta outside (0, 1), or a directory path through a file.

``bract hospital start DIR --superlink HOST:PORT --root-certificates CA
[--auth-key KEY] [--node-config EXTRA]`` starts the hospital's ``bract-supernode``
with everything ``DIR`` holds (identity, SuperNode key ``DIR/supernode-auth`` unless
``--auth-key`` names another, roster copy ``DIR/roster.json``, policy, state) in its
node config, after checking that the identity key is valid and is the one
``public.json`` names, and that a node config naming its own data (``data-path`` or
``loader``) names its ``dataset-id`` too; ``--dry-run`` prints the command instead.

``bract roster add ROSTER PUBLIC.json...`` builds the roster from hospitals' public
files (creating it if missing), writes each SuperNode key they carry to
``ROSTER_DIR/supernode-auth/<name>.pub`` and prints the ``flwr supernode register``
command for it (it checks every file, name and path first and writes nothing when it
refuses; the roster is replaced atomically, after the keys);
``bract roster verify ROSTER [--public FILE...]`` checks a roster file: its format,
distinct ids, names and keys, one federation id, and that each given hospital's
public file is listed unchanged, and prints every member's key fingerprint and the
file's SHA-256. Every hospital gets the same roster file out of band, and confirms
with each member it lists, over a second channel, that the fingerprint is that
hospital's: the roster decides who counts as a hospital, so a member nobody vouches
for may be an identity the coordinator holds.

Roster format (JSON): ``{"federation_id": str, "members": [{"id": int, "name": str,
"public_key": hex of the raw 32-byte Ed25519 key}, ...]}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

from flwr.common.config import parse_config_args

from bract.argtypes import nonnegative_int, positive_float
from bract.flower.certificates import generate_supernode_key
from bract.flower.client import dataset_id_problem
from bract.flower.files import atomic_write_text
from bract.flower.hospital_policy import HospitalPolicy
from bract.flower.secagg_client import read_identity_key, write_identity_key
from bract.flower.supernode import DEFAULT_PULL_INTERVAL
from bract.privacy.accounting import MAX_TARGET_EPSILON, MIN_TARGET_EPSILON
from bract.records.roster import Roster, read_roster
from bract.secagg.crypto import KEY_BYTES, SigningKey

__all__ = ["add_operator_parsers", "hospital_init", "key_fingerprint", "roster_add",
           "roster_verify", "supernode_command"]

PUBLIC_FILE = "public.json"
#: A hospital's name: it names the file its SuperNode key is kept in on the coordinator's
#: side (``supernode-auth/<name>.pub``), so it is a plain, non-empty file name.
PLAIN_NAME = re.compile(r"[A-Za-z0-9_.-]+")
#: The SuperNode's Flower authentication key pair in a hospital's directory.
AUTH_KEY = "supernode-auth"


def check_hospital_name(name: str) -> None:
    """ValueError in one line unless ``name`` is a plain file name (letters, digits,
    ``_ . -``, not empty, not ``.`` or ``..``), the rule ``roster add`` applies."""
    if not PLAIN_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"hospital name {name!r} is not a plain file name: use letters, "
                         "digits, '_', '.' and '-' only (it names the hospital's SuperNode "
                         "key file on the coordinator's side)")


def _directory_problem(directory: Path) -> str | None:
    """Why ``directory`` cannot be (or become) a directory, or None."""
    for part in (directory, *directory.parents):
        if part.exists():
            return None if part.is_dir() else f"{part} is not a directory"
    return None


def hospital_init(directory: Path, node: int, name: str, federation_id: str,
                  policy: HospitalPolicy) -> dict[str, Any]:
    """Create a hospital's identity, SuperNode authentication key, public file, policy
    and state directory, in one step.

    Guarantee: both private keys are written owner-only and never printed; an existing
    identity is never replaced (``FileExistsError``); a name that is not a plain file
    name, an empty federation id, or a directory path through a file is refused
    (``ValueError``) before anything is written.
    """
    directory = Path(directory)
    check_hospital_name(name)
    problem = _directory_problem(directory)
    if problem:
        raise ValueError(f"cannot make the hospital directory {directory}: {problem}")
    key_path = directory / "identity.key"
    if key_path.exists():
        try:
            identity_public_key(key_path)
        except ValueError as exc:
            raise FileExistsError(
                f"{exc}: if this hospital never ran with it, delete it and run init "
                "again; if it did, restore it from a backup (its signed ledger depends on "
                "it)") from None
        raise FileExistsError(f"{key_path} exists: a hospital keeps its identity (its signed "
                              "ledger depends on it); use another directory to start anew")
    if not federation_id:
        raise ValueError("the federation id must not be empty")
    directory.mkdir(parents=True, exist_ok=True)
    key = SigningKey.generate()
    write_identity_key(key_path, key.to_bytes())
    auth = generate_supernode_key(directory, AUTH_KEY)
    public = {"federation_id": federation_id, "id": int(node), "name": name,
              "public_key": key.public_bytes().hex(),
              "supernode_auth_public_key": auth.public_key.read_text(encoding="ascii").strip()}
    (directory / PUBLIC_FILE).write_text(json.dumps(public, indent=2) + "\n", encoding="utf-8")
    policy.write(directory / "policy.json")
    state = directory / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    os.chmod(state, 0o700)
    return public


def identity_public_key(path: Path) -> bytes:
    """The Ed25519 public key of the identity key file at ``path``; ``ValueError`` in
    one line when the file is unreadable or holds no valid key (empty, cut short,
    not hex)."""
    try:
        raw = read_identity_key(path)
    except OSError as exc:
        raise ValueError(f"{path} cannot be read: {exc.strerror or exc}") from None
    except ValueError:
        raise ValueError(f"{path} holds no valid identity key (not hex)") from None
    if len(raw) != KEY_BYTES:
        raise ValueError(f"{path} holds no valid identity key ("
                         + (f"{len(raw)} bytes, not {KEY_BYTES})" if raw else "empty)"))
    return SigningKey.from_bytes(raw).public_bytes()


#: What to do when a file ``hospital start`` needs is missing from the hospital's folder.
_MISSING_HINTS = {
    "identity.key": "the hospital's identity, made by bract hospital init; if this "
                    "hospital ever ran, restore it from a backup (its signed ledger depends "
                    "on it), else run init in a new directory",
    "roster.json": "the federation's roster, which comes from the coordinator: copy the "
                   "file every hospital gets there and check it with bract roster verify",
    "policy.json": "the hospital's privacy policy, made by bract hospital init: restore it, "
                   "or write one (a JSON object of HospitalPolicy fields; {} keeps the "
                   "defaults)",
    "state": "the hospital's privacy state directory, made by bract hospital init: if "
             "this hospital ever ran, restore it from a backup (its spent privacy budget "
             "lives there; an empty one would start that budget from nothing), else create "
             "it (mkdir -m 700)",
}


def supernode_command(directory: Path, superlink: str, root_certificates: Path,
                      auth_key: Path | None = None, extra_node_config: str = "",
                      port: int = 9094, executor: str = "warm",
                      pull_interval: float = DEFAULT_PULL_INTERVAL) -> list[str]:
    """The ``bract-supernode`` command (Flower's SuperNode with bract's warm ClientApp
    ``executor`` and a ``pull_interval`` s idle pull, :mod:`bract.flower.supernode`)
    that serves the hospital set up in ``directory``.

    Its node config names the hospital's identity, roster copy, policy and state
    directory (checked to exist, with the roster listing this hospital's key), then
    ``extra_node_config`` (e.g. its data's keys); the Runtime API stays on loopback.

    Guarantee: ``ValueError``, in one line, unless the folder is complete, its
    ``identity.key`` holds a valid Ed25519 key whose public half is the one
    ``public.json`` names, its roster copy lists that key, its policy parses with every
    field of its type and in range (:meth:`HospitalPolicy.read`), and an
    ``extra_node_config`` that names the hospital's own data (``data-path`` or
    ``loader``) names the ``dataset-id`` its budget is kept under, one without whitespace
    at either end or an invisible character. A missing file's message says what makes
    it (``hospital init``, the coordinator's roster, a backup).
    """
    d = Path(directory).resolve()
    extra = parse_config_args([extra_node_config]) if extra_node_config.strip() else {}
    if "dataset-id" in extra and str(extra["dataset-id"]).strip():
        problem = dataset_id_problem(str(extra["dataset-id"]), d / "state")
        if problem:
            raise ValueError(f"--node-config: {problem}")
    if ("data-path" in extra or "loader" in extra) and not str(
            extra.get("dataset-id", "")).strip():
        raise ValueError("--node-config names the hospital's own data but no dataset-id: add "
                         "dataset-id=\"<name>\", the name of its patients' dataset that its "
                         "lifetime privacy budget is kept under (bract hospital init printed "
                         "one; keep it when the data moves or is re-exported)")
    public = _read_public(d / PUBLIC_FILE)
    auth_key = Path(auth_key) if auth_key is not None else d / AUTH_KEY
    if not auth_key.exists():
        raise ValueError(f"{auth_key} is missing: the SuperNode's authentication key "
                         "(bract hospital init makes DIR/supernode-auth)")
    for need, hint in _MISSING_HINTS.items():
        if not (d / need).exists():
            raise ValueError(f"{d / need} is missing: {hint}")
    if identity_public_key(d / "identity.key") != public["public_key"]:
        raise ValueError(f"{d / 'identity.key'} is not the key {d / PUBLIC_FILE} names: the "
                         "identity and its public file must come from the same init")
    problems = roster_verify(read_roster(d / "roster.json"), [public])
    if problems:
        raise ValueError(f"{d / 'roster.json'}: " + "; ".join(problems))
    HospitalPolicy.read(d / "policy.json")  # a malformed policy stops here, not mid-run
    node_config = (f"secagg-id={public['id']} identity-key=\"{d / 'identity.key'}\" "
                   f"roster=\"{d / 'roster.json'}\" policy=\"{d / 'policy.json'}\" "
                   f"state-dir=\"{d / 'state'}\"")
    if extra_node_config:
        node_config += " " + extra_node_config
    return ["bract-supernode", "--executor", executor, "--pull-interval", f"{pull_interval:g}",
            "--superlink", superlink,
            "--root-certificates", str(Path(root_certificates).resolve()),
            "--auth-supernode-private-key", str(Path(auth_key).resolve()),
            "--node-config", node_config, "--isolation", "subprocess",
            "--host", "127.0.0.1", "--port", str(port)]


def _read_public(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        entry = {"federation_id": str(data["federation_id"]), "id": int(data["id"]),
                 "name": str(data["name"]), "public_key": bytes.fromhex(data["public_key"]),
                 "supernode_auth_public_key": str(data.get("supernode_auth_public_key", ""))}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a hospital's public file: {exc!r}") from None
    if len(entry["public_key"]) != 32:
        raise ValueError(f"{path}: the public key must be 32 bytes")
    return entry


def roster_verify(roster: Roster, publics: list[dict[str, Any]] = ()) -> list[str]:
    """Problems with a roster (empty when it is sound), in plain words."""
    problems = []
    if not roster.federation_id:
        problems.append("the federation id is empty")
    keys = list(roster.keys.values())
    if len(set(keys)) != len(keys):
        problems.append("two members share one public key")
    if any(len(k) != 32 for k in keys):
        problems.append("a public key is not 32 bytes")
    names = [roster.names.get(i, "") for i in roster.keys]
    if len(set(names)) != len(names) or "" in names:
        problems.append("member names must be present and distinct")
    if len(roster.keys) < 3:
        problems.append(f"{len(roster.keys)} member(s): secure aggregation needs at least 3")
    for p in publics:
        if p["federation_id"] != roster.federation_id:
            problems.append(f"{p['name']} belongs to federation {p['federation_id']!r}, the "
                            f"roster to {roster.federation_id!r}")
        elif roster.keys.get(p["id"]) != p["public_key"]:
            problems.append(f"{p['name']} (id {p['id']}) is not listed with its public key")
        elif roster.names.get(p["id"]) != p["name"]:
            problems.append(f"id {p['id']} is listed as {roster.names.get(p['id'])!r}, not "
                            f"{p['name']!r}")
    return problems


def roster_add(path: Path, publics: list[dict[str, Any]], *,
               write_keys: bool = False) -> Roster:
    """Add hospitals' public entries to the roster at ``path`` (created if missing);
    with ``write_keys``, also write each SuperNode key they carry to
    ``ROSTER_DIR/supernode-auth/<name>.pub`` (:func:`write_supernode_keys`).

    Guarantee: refuses (``ValueError`` in one line, nothing written) a second federation
    id, a taken id or name, a key listed twice, a name that is not a plain file name, a
    malformed SuperNode key, a roster path that is a directory or whose folder is
    missing, or (``write_keys``) a ``supernode-auth`` there that is not a directory; the
    roster file is replaced atomically, after the keys, so it never lists a hospital
    whose key file was not written.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; name the roster file, e.g. "
                         f"{path / 'roster.json'}")
    if not path.parent.is_dir():
        raise ValueError(f"{path.parent} is not an existing directory; create it first")
    keys_dir = path.resolve().parent / AUTH_KEY
    if write_keys and supernode_key_paths(path, publics) and keys_dir.exists() \
            and not keys_dir.is_dir():
        raise ValueError(f"{keys_dir} is not a directory: the SuperNode keys go there")
    for p in publics:
        check_hospital_name(p["name"])
        text = p.get("supernode_auth_public_key", "")
        if text and (not text.startswith("ecdsa-sha2-nistp") or "\n" in text):
            raise ValueError(f"{p['name']}: its SuperNode key is not an OpenSSH EC public key")
    if path.exists():
        roster = read_roster(path)
    else:
        if not publics:
            raise ValueError("nothing to add")
        roster = Roster(publics[0]["federation_id"], {}, {})
    keys, names = dict(roster.keys), dict(roster.names)
    for p in publics:
        if p["federation_id"] != roster.federation_id:
            raise ValueError(f"{p['name']} belongs to federation {p['federation_id']!r}; the "
                             f"roster is {roster.federation_id!r}")
        if p["id"] in keys:
            raise ValueError(f"id {p['id']} is already {names.get(p['id'])!r}")
        if p["public_key"] in keys.values() or p["name"] in names.values():
            raise ValueError(f"{p['name']}: its name or key is already in the roster")
        keys[p["id"]] = p["public_key"]
        names[p["id"]] = p["name"]
    out = Roster(roster.federation_id, keys, names)
    if write_keys:
        write_supernode_keys(path, publics)
    atomic_write_text(path, out.to_json() + "\n")
    os.chmod(path, 0o644)  # public data, handed to every hospital
    return out


def _dataset_id(text: str) -> str:
    """A ``--dataset-id``: any text but blank, or with a quote or a line break (it is
    printed inside the double quotes of a node config), or one
    :func:`~bract.flower.client.dataset_id_problem` refuses (whitespace at either end,
    an invisible character)."""
    if not text.strip() or any(c in text for c in '"\n\r'):
        raise argparse.ArgumentTypeError("a dataset id must be non-blank, without quotes or "
                                         "line breaks")
    problem = dataset_id_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def _hospital_init_cmd(args: argparse.Namespace) -> int:
    try:
        if not MIN_TARGET_EPSILON <= args.target_epsilon <= MAX_TARGET_EPSILON:
            raise ValueError(f"--target-epsilon must lie in [{MIN_TARGET_EPSILON:g}, "
                             f"{MAX_TARGET_EPSILON:g}] (bract calibrates noise for no "
                             f"other), got {args.target_epsilon:g}")
        policy = HospitalPolicy(target_epsilon=args.target_epsilon, delta=args.delta,
                                allow_non_private=False, release_metrics=args.release_metrics,
                                secagg_colluders=args.colluders,
                                metrics_noise_multiplier=args.metrics_noise)
        hospital_init(args.dir, args.id, args.name, args.federation, policy)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}")
        return 2
    d = Path(args.dir).resolve()
    print(f"hospital {args.name}: identity {d / 'identity.key'} and SuperNode key "
          f"{d / AUTH_KEY} (mode 0600, keep them here), public file {d / PUBLIC_FILE} (send "
          f"it to the coordinator: roster entry and SuperNode key), policy "
          f"{d / 'policy.json'}, state {d / 'state'}")
    dataset_id = args.dataset_id if args.dataset_id is not None else args.name
    print("SuperNode node config (add your data's key: data-path or loader):")
    print(f"  secagg-id={args.id} identity-key=\"{d / 'identity.key'}\" "
          f"roster=\"{d / 'roster.json'}\" policy=\"{d / 'policy.json'}\" "
          f"state-dir=\"{d / 'state'}\" dataset-id=\"{dataset_id}\"")
    print(f"dataset-id {dataset_id!r} names the patients' dataset whose lifetime privacy "
          "budget this hospital keeps: keep it when the data moves or is re-exported, and "
          "give each other dataset of other patients its own (bract hospital start "
          "--node-config takes it with the data's key)")
    return 0


def _hospital_start_cmd(args: argparse.Namespace) -> int:
    try:
        argv = supernode_command(args.dir, args.superlink, args.root_certificates,
                                 args.auth_key, args.node_config, args.port,
                                 executor=args.executor, pull_interval=args.pull_interval)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}")
        return 2
    if args.dry_run:
        print(shlex.join(argv))
        return 0
    from bract.flower.processes import DeploymentError, executable

    try:
        argv[0] = executable("bract-supernode")  # this venv's bract and Flower
    except DeploymentError as exc:
        print(f"error: {exc}")
        return 2
    os.execv(argv[0], argv)  # the SuperNode replaces this process (Ctrl-C stops it)
    return 1  # not reached


def _roster_add_cmd(args: argparse.Namespace) -> int:
    try:
        publics = [_read_public(p) for p in args.public]
        roster = roster_add(args.roster, publics, write_keys=True)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}")
        return 2
    print(f"{args.roster}: {len(roster.keys)} member(s) of {roster.federation_id}")
    for path in supernode_key_paths(args.roster, publics):
        print(f"register its SuperNode: flwr supernode register {shlex.quote(str(path))} "
              "<federation>")
    return 0


def write_supernode_keys(roster_path: Path, publics: list[dict[str, Any]]) -> list[Path]:
    """Each hospital's SuperNode public key (from its public file) as
    ``ROSTER_DIR/supernode-auth/<name>.pub``, for ``flwr supernode register``; each file
    is replaced atomically. ``ValueError`` for a name that is not a plain file name or a
    key that is not an OpenSSH EC public key, checked for all before any is written."""
    for p in publics:
        check_hospital_name(p["name"])
        text = p.get("supernode_auth_public_key", "")
        if text and (not text.startswith("ecdsa-sha2-nistp") or "\n" in text):
            raise ValueError(f"{p['name']}: its SuperNode key is not an OpenSSH EC public key")
    out = supernode_key_paths(roster_path, publics)
    if out:
        out[0].parent.mkdir(parents=True, exist_ok=True)
    by_name = {p["name"]: p["supernode_auth_public_key"] for p in publics
               if p.get("supernode_auth_public_key", "")}
    for path in out:
        atomic_write_text(path, by_name[path.stem] + "\n")
        os.chmod(path, 0o644)  # a public key
    return out


def supernode_key_paths(roster_path: Path, publics: list[dict[str, Any]]) -> list[Path]:
    """Where :func:`write_supernode_keys` puts each SuperNode key the publics carry."""
    return [Path(roster_path).resolve().parent / AUTH_KEY / f"{p['name']}.pub"
            for p in publics if p.get("supernode_auth_public_key", "")]


def _roster_verify_cmd(args: argparse.Namespace) -> int:
    try:
        roster = read_roster(args.roster)
        publics = [_read_public(p) for p in args.public]
    except (OSError, ValueError) as exc:
        print(f"error: {exc}")
        return 2
    problems = roster_verify(roster, publics)
    for p in problems:
        print(f"problem: {p}")
    for member_id in sorted(roster.keys):
        print(f"member {member_id} {roster.names.get(member_id, '')!r}: key fingerprint "
              f"{key_fingerprint(roster.keys[member_id])}")
    digest = hashlib.sha256(Path(args.roster).read_bytes()).hexdigest()
    print(f"roster file SHA-256 {digest}")
    print(f"{args.roster}: {len(roster.keys)} member(s) of {roster.federation_id}: "
          + ("NOT sound" if problems else "sound"))
    return 1 if problems else 0


def key_fingerprint(public_key: bytes) -> str:
    """What two operators read to each other over a second channel to confirm a roster
    member is the hospital it names: the first 128 bits of SHA-256 of its raw Ed25519
    public key, in groups of four hex digits (finding another key with the same
    fingerprint takes about 2^128 work)."""
    digest = hashlib.sha256(bytes(public_key)).hexdigest()[:32]
    return ":".join(digest[i:i + 4] for i in range(0, 32, 4))


def add_operator_parsers(sub: Any) -> None:
    """``bract hospital init`` and ``bract roster add|verify``."""
    hosp = sub.add_parser("hospital", help="a hospital operator's set-up")
    hsub = hosp.add_subparsers(dest="hospital_command", required=True)
    init = hsub.add_parser("init", help="create a hospital's identity key, public file, "
                                        "privacy policy and state directory")
    init.add_argument("dir", type=Path)
    init.add_argument("--id", type=nonnegative_int, required=True, help="its id in the roster")
    init.add_argument("--name", required=True)
    init.add_argument("--federation", required=True, help="the federation id")
    init.add_argument("--dataset-id", type=_dataset_id, default=None,
                      help="the name of the patients' dataset this hospital serves, which "
                           "its lifetime privacy budget is kept under; it stays the same "
                           "when the data moves or is re-exported (default: --name)")
    init.add_argument("--target-epsilon", type=lambda t: positive_float(t, "epsilon"),
                      default=8.0, help="the most epsilon this hospital will spend (default 8)")
    init.add_argument("--delta", type=lambda t: positive_float(t, "delta"), default=1e-5)
    init.add_argument("--release-metrics", choices=("none", "aggregate", "clear"),
                      default="none", help="whether this hospital's metrics (noised, counted "
                      "in its epsilon) may leave: never, inside the masked sum, or in clear")
    init.add_argument("--metrics-noise", type=lambda t: positive_float(t, "metrics noise"),
                      default=10.0, help="the least noise multiplier its metrics release "
                      "uses (default 10)")
    init.add_argument("--colluders", type=nonnegative_int, default=None,
                      help="colluding hospitals secure aggregation must withstand "
                           "(default floor((R-1)/3) of the roster's R hospitals)")
    init.set_defaults(func=_hospital_init_cmd)
    start = hsub.add_parser("start", help="start the hospital's SuperNode with its identity, "
                                          "roster, policy and state")
    start.add_argument("dir", type=Path)
    start.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink's Fleet API")
    start.add_argument("--root-certificates", type=Path, required=True,
                       help="the CA certificate that signed the SuperLink's TLS certificate")
    start.add_argument("--auth-key", type=Path, default=None,
                       help="the hospital's SuperNode authentication key (registered by the "
                            "coordinator; default DIR/supernode-auth, made by hospital init)")
    start.add_argument("--node-config", default="",
                       help="more node config, e.g. the data's keys")
    start.add_argument("--port", type=nonnegative_int, default=9094,
                       help="the SuperNode's local Runtime API port on 127.0.0.1")
    start.add_argument("--executor", choices=("warm", "flower"), default="warm",
                       help="how the SuperNode runs each message's ClientApp: warm (forked "
                            "from a parent that imported Flower, bract and torch once) or "
                            "flower (a fresh flwr-clientapp process) (default: warm)")
    start.add_argument("--pull-interval", type=lambda t: positive_float(t, "pull interval"),
                       default=DEFAULT_PULL_INTERVAL,
                       help="seconds between the idle SuperNode's pulls (Flower's own: 3; "
                            f"at most 3) (default: {DEFAULT_PULL_INTERVAL})")
    start.add_argument("--dry-run", action="store_true", help="print the command, start nothing")
    start.set_defaults(func=_hospital_start_cmd)
    ros = sub.add_parser("roster", help="build and check the federation's roster")
    rsub = ros.add_subparsers(dest="roster_command", required=True)
    add = rsub.add_parser("add", help="add hospitals' public files to a roster")
    add.add_argument("roster", type=Path)
    add.add_argument("public", type=Path, nargs="+")
    add.set_defaults(func=_roster_add_cmd)
    ver = rsub.add_parser("verify", help="check a roster (and that hospitals are listed)")
    ver.add_argument("roster", type=Path)
    ver.add_argument("--public", type=Path, nargs="*", default=[])
    ver.set_defaults(func=_roster_verify_cmd)
