"""bract on Flower's deployment engine: a real multi-process federation on one machine.

This module starts the same processes a multi-hospital deployment runs — one
``flower-superlink`` (the coordinating server) and one ``flower-supernode`` per
hospital — on ``127.0.0.1`` only, with TLS on every connection and SuperNode
authentication (each hospital proves its identity with its own EC key, which
the SuperLink accepts only after it was registered). It then submits the bract
Flower app (this repository: ``[tool.flwr.app]`` in ``pyproject.toml``) with
``flwr run`` and waits for the run to finish.

What it guarantees:

* Network: every listening socket is bound to ``127.0.0.1`` on a port that was
  free when chosen; nothing listens on other interfaces.
* Isolation from the user's setup: the Flower CLI reads and writes its
  configuration under ``FLWR_HOME`` inside the work directory, never ``~/.flwr``;
  runtime dependency installation (``uv``), telemetry and update checks are off.
* Bounded waits: every wait (readiness, registration, run completion, process
  exit) has a timeout and raises :class:`DeploymentError` when it expires.
* No leftovers: every process started here, and every process those start (the
  SuperExec and each ServerApp/ClientApp process, which Flower detaches into
  sessions of their own), carries a per-federation marker in its environment;
  :meth:`LocalFederation.stop` — run on every exit from the ``with`` block,
  errors included — terminates them, waits, then kills what is left.
* Certificates and keys are generated with pyca ``cryptography``; the dev CA is
  for local runs only (see ``docs/deployment.md`` for a real deployment).

``flwr`` executables are taken from the running interpreter's environment
(``sys.executable``'s directory), so the venv's Flower is always the one used.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bract.flower.files import write_private_bytes
from bract.flower.hospital_policy import HospitalPolicy
from bract.flower.secagg_client import (
    Roster,
    make_identities,
    write_identity_key,
    write_roster,
)

#: Repository root: the Flower app directory (its pyproject.toml has ``[tool.flwr.app]``).
APP_DIR = Path(__file__).resolve().parents[3]

#: Environment variable whose value marks every process of one local federation.
MARKER_ENV = "BRACT_LOCAL_FEDERATION"

#: Name of the SuperLink connection written into the private Flower configuration.
CONNECTION_NAME = "bract-local"

#: Loopback only: the one address local federations bind to and connect to.
LOOPBACK = "127.0.0.1"


class DeploymentError(RuntimeError):
    """A deployment step failed or did not finish in time; the message says which."""


# --------------------------------------------------------------------------- certificates
@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a development CA and the server certificate it signed."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def generate_dev_certificates(
    directory: Path,
    hosts: Sequence[str] = (LOOPBACK, "localhost"),
    days: int = 7,
) -> TlsFiles:
    """Create a throw-away CA and a server certificate for ``hosts``, as PEM files.

    Writes ``ca.crt`` (self-signed CA, path length 0), ``server.pem`` (signed by
    the CA, valid for TLS server authentication, with every entry of ``hosts`` in
    its subject alternative names — IP addresses as IP SANs, names as DNS SANs)
    and ``server.key`` (mode 0600) into ``directory``. Keys are EC P-256. The CA
    key is never written to disk, so no further certificate can be signed with it.

    These are development certificates: valid for ``days`` days, for one machine.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    not_before, not_after = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bract dev CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    files = TlsFiles(directory / "ca.crt", directory / "server.pem", directory / "server.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    write_private_bytes(
        files.server_key,
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return files


@dataclass(frozen=True)
class NodeKeyFiles:
    """A SuperNode's authentication key pair, in the OpenSSH formats Flower reads."""

    name: str
    private_key: Path
    public_key: Path


def generate_supernode_key(directory: Path, name: str) -> NodeKeyFiles:
    """Create SuperNode ``name``'s authentication key pair (EC P-384, OpenSSH format).

    Flower 1.41 authenticates SuperNodes with EC keys on a NIST curve:
    ``flower-supernode --auth-supernode-private-key`` reads an OpenSSH private
    key (written here as ``<name>`` with mode 0600, unencrypted), and ``flwr
    supernode register`` reads the OpenSSH public key (``<name>.pub``). Only
    the public key ever leaves the hospital.
    """
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"key name {name!r} must be a plain file name")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    files = NodeKeyFiles(name, directory / name, directory / f"{name}.pub")
    write_private_bytes(
        files.private_key,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    files.public_key.write_bytes(public + f" {name}\n".encode())
    return files


def write_flower_config(flwr_home: Path, address: str, root_certificates: Path) -> Path:
    """Write a Flower CLI configuration whose default connection is this SuperLink over TLS.

    The file is ``<flwr_home>/config.toml``; ``flwr`` reads it when ``FLWR_HOME``
    is ``flwr_home``. The connection verifies the SuperLink's certificate
    against ``root_certificates`` (an absolute path, as Flower requires).
    """
    flwr_home = Path(flwr_home)
    flwr_home.mkdir(parents=True, exist_ok=True)
    root = Path(root_certificates).resolve()
    text = (
        "[superlink]\n"
        f'default = "{CONNECTION_NAME}"\n\n'
        f"[superlink.{CONNECTION_NAME}]\n"
        f"address = {json.dumps(address)}\n"
        f"root-certificates = {json.dumps(str(root))}\n"
        "insecure = false\n"
    )
    path = flwr_home / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picked it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((LOOPBACK, port)) == 0


# --------------------------------------------------------------------------- processes
def executable(name: str) -> str:
    """Path of Flower executable ``name`` in the running interpreter's environment."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    raise DeploymentError(f"{name} not found next to {sys.executable}; is flwr installed?")


def marked_pids(marker: str) -> list[int]:
    """Ids of live processes whose environment carries ``MARKER_ENV=marker`` (Linux /proc).

    Only processes of the current user are readable, which are the only ones a
    federation started here can have spawned.
    """
    needle = f"{MARKER_ENV}={marker}".encode()
    pids = []
    own = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == own:
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            pids.append(int(entry.name))
    return sorted(pids)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


@dataclass
class ManagedProcess:
    """A process started by a :class:`LocalFederation`, in a session of its own."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the process's whole process group (its session leader's)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class RunResult:
    """How a ``flwr run`` of the bract app ended."""

    run_id: int
    status: str
    seconds: float
    out_dir: Path
    log: str
    #: Partition id of the SuperNode killed during the run, if one was.
    killed: int | None = None

    @property
    def succeeded(self) -> bool:
        return self.status == "finished:completed"

    def report(self) -> dict[str, Any]:
        """The run's ``report.json`` (raises DeploymentError when the run wrote none)."""
        path = self.out_dir / "report.json"
        if not path.exists():
            raise DeploymentError(f"run {self.run_id} ({self.status}) wrote no {path}")
        return json.loads(path.read_text(encoding="utf-8"))


@dataclass
class NodeHandle:
    """One hospital's SuperNode: its process, key and node config."""

    partition_id: int
    key: NodeKeyFiles
    port: int
    process: ManagedProcess | None = None


@dataclass
class LocalFederation:
    """A SuperLink and ``num_nodes`` SuperNodes on 127.0.0.1 with TLS and SuperNode auth.

    Use it as a context manager; entering starts and checks everything,
    leaving stops everything (also on errors)::

        with LocalFederation(workdir, num_nodes=3) as fed:
            result = fed.run({"rounds": 2, "dataset": "breast-cancer", "out": "/abs/out"})

    Steps on start: dev certificates (:func:`generate_dev_certificates`), one
    authentication key per hospital (:func:`generate_supernode_key`), a private
    Flower CLI configuration, ``flower-superlink --enable-supernode-auth`` with
    TLS, registration of every hospital's public key with ``flwr supernode
    register``, then one ``flower-supernode`` per hospital with its private key,
    ``--root-certificates`` and ``--node-config 'partition-id=i num-partitions=N'``,
    and a wait until the SuperLink lists every node as online.

    ``isolation`` is the SuperNode's ClientApp isolation mode (``subprocess``:
    the SuperNode's SuperExec starts a ClientApp process for each message it
    receives). ``task_poll_interval`` (seconds) is how often each SuperExec asks
    for new work (Flower's default is 1 s). Logs go to ``workdir/logs``.
    """

    workdir: Path
    num_nodes: int
    app_dir: Path = APP_DIR
    isolation: str = "subprocess"
    startup_timeout: float = 90.0
    task_poll_interval: float = 0.2
    #: Secure aggregation (run config). Every hospital gets an Ed25519 identity and a
    #: roster either way: the identity also signs its privacy ledger.
    secagg: bool = True
    #: Each hospital's own limits, written to its policy file (node config ``policy``):
    #: here the one operator plays every hospital's. ``None``: the policy defaults.
    hospital_policy: HospitalPolicy | None = None
    extra_env: Mapping[str, str] = field(default_factory=dict)

    marker: str = field(init=False, default_factory=lambda: uuid.uuid4().hex)
    superlink_port: int = field(init=False, default=0)
    tls: TlsFiles | None = field(init=False, default=None)
    nodes: list[NodeHandle] = field(init=False, default_factory=list)
    superlink: ManagedProcess | None = field(init=False, default=None)
    _processes: list[ManagedProcess] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.num_nodes < 1:
            raise ValueError("a federation needs at least one SuperNode")
        if self.isolation not in ("subprocess", "process"):
            raise ValueError("isolation must be 'subprocess' or 'process'")
        self.workdir = Path(self.workdir).resolve()
        self.app_dir = Path(self.app_dir).resolve()

    # ------------------------------------------------------------------ paths & env
    @property
    def address(self) -> str:
        """The SuperLink's address (Fleet, Control and Runtime APIs share one port)."""
        return f"{LOOPBACK}:{self.superlink_port}"

    @property
    def flwr_home(self) -> Path:
        return self.workdir / "flwr-home"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    def env(self) -> dict[str, str]:
        """Environment of every process: marker, private FLWR_HOME, no installs/telemetry."""
        env = dict(os.environ)
        env.update(
            {
                MARKER_ENV: self.marker,
                "FLWR_HOME": str(self.flwr_home),
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(self.task_poll_interval),
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                "PYTHONUNBUFFERED": "1",
                "NO_COLOR": "1",
                "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
            }
        )
        env.update(self.extra_env)
        return env

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> LocalFederation:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, name: str, argv: list[str]) -> ManagedProcess:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        log_file = log_path.open("ab")
        log_file.write(f"$ {' '.join(argv)}\n".encode())
        log_file.flush()
        popen = subprocess.Popen(
            argv,
            cwd=self.workdir,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        proc = ManagedProcess(name, popen, log_path, log_file)
        self._processes.append(proc)
        return proc

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI against this federation (bounded by ``timeout``)."""
        try:
            return subprocess.run(
                [executable("flwr"), *args],
                cwd=self.workdir,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                start_new_session=True,
            )
        except subprocess.TimeoutExpired as exc:
            raise DeploymentError(f"flwr {' '.join(args)} did not finish in {timeout}s") from exc

    def start(self) -> None:
        """Start the SuperLink, register the hospitals' keys, start their SuperNodes."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tls = generate_dev_certificates(self.workdir / "certs")
        keys_dir = self.workdir / "keys"
        self.nodes = [
            NodeHandle(i, generate_supernode_key(keys_dir, f"hospital-{i}"), free_port())
            for i in range(self.num_nodes)
        ]
        self.superlink_port = free_port()
        self._write_secagg_identities()
        write_flower_config(self.flwr_home, self.address, self.tls.ca_cert)
        self.superlink = self._spawn(
            "superlink",
            [
                executable("flower-superlink"),
                "--ssl-ca-certfile", str(self.tls.ca_cert),
                "--ssl-certfile", str(self.tls.server_cert),
                "--ssl-keyfile", str(self.tls.server_key),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--host", LOOPBACK,
                "--port", str(self.superlink_port),
            ],
        )
        deadline = time.monotonic() + self.startup_timeout
        self._wait(lambda: _port_open(self.superlink_port), deadline, "SuperLink to listen",
                   self.superlink)
        for node in self.nodes:
            self._register(node, deadline)
        for node in self.nodes:
            self.start_node(node.partition_id)
        self._wait(lambda: self.online_nodes() >= self.num_nodes, deadline,
                   f"{self.num_nodes} SuperNodes to come online", None, poll=1.0)

    @property
    def roster_path(self) -> Path:
        """The server's copy of the roster (pass it as the run config's ``roster``)."""
        return self.workdir / "secagg" / "roster.json"

    def _secagg_dir(self, partition_id: int) -> Path:
        return self.workdir / "secagg" / f"hospital-{partition_id}"

    def _write_secagg_identities(self) -> None:
        """Play each hospital's operator: an Ed25519 identity per hospital, one roster.

        Each hospital gets its own key file and its own copy of the roster (in a
        real deployment the operators exchange public keys out of band); the
        server gets a copy for early checks but no hospital ever reads it.
        """
        federation_id = f"bract-local-{uuid.uuid4().hex[:12]}"
        roster, identities = make_identities(self.num_nodes, federation_id)
        names = {i + 1: f"hospital-{i}" for i in range(self.num_nodes)}
        doc = Roster(federation_id, roster, names)
        self.roster_path.parent.mkdir(parents=True, exist_ok=True)
        write_roster(self.roster_path, doc)
        for i, ident in enumerate(identities):
            d = self._secagg_dir(i)
            d.mkdir(parents=True, exist_ok=True)
            write_identity_key(d / "identity.key", ident.signing_key)
            write_roster(d / "roster.json", doc)
            (self.hospital_policy or HospitalPolicy()).write(d / "policy.json")

    def node_config(self, partition_id: int) -> str:
        """The ``--node-config`` string of hospital ``partition_id``'s SuperNode."""
        d = self._secagg_dir(partition_id)
        parts = [
            f"partition-id={partition_id}",
            f"num-partitions={self.num_nodes}",
            f"secagg-id={partition_id + 1}",
            f'identity-key="{d / "identity.key"}"',
            f'roster="{d / "roster.json"}"',
            f'policy="{d / "policy.json"}"',
        ]
        return " ".join(parts)

    def _wait(self, ok: Any, deadline: float, what: str, proc: ManagedProcess | None,
              poll: float = 0.2) -> None:
        while True:
            if ok():
                return
            if proc is not None and not proc.alive():
                raise DeploymentError(
                    f"{proc.name} exited (code {proc.popen.returncode}) while waiting for "
                    f"{what}; log {proc.log_path}:\n{proc.log_tail()}"
                )
            for p in self._processes:
                if p.name.startswith("supernode") and not p.alive():
                    raise DeploymentError(
                        f"{p.name} exited (code {p.popen.returncode}) while waiting for "
                        f"{what}; log {p.log_path}:\n{p.log_tail()}"
                    )
            if time.monotonic() > deadline:
                raise DeploymentError(f"timed out waiting for {what}; logs in {self.log_dir}")
            time.sleep(poll)

    def _register(self, node: NodeHandle, deadline: float) -> None:
        """Register ``node``'s public key with the SuperLink (retrying until it answers)."""
        last = ""
        while time.monotonic() < deadline:
            res = self.flwr("supernode", "register", str(node.key.public_key),
                            "--name", node.key.name, "--format", "json", timeout=60)
            if res.returncode == 0:
                return
            last = (res.stdout + res.stderr)[-2000:]
            time.sleep(1.0)
        raise DeploymentError(f"could not register {node.key.name}: {last}")

    def start_node(self, partition_id: int) -> ManagedProcess:
        """Start (or restart) hospital ``partition_id``'s SuperNode."""
        node = self.nodes[partition_id]
        assert self.tls is not None
        node.process = self._spawn(
            f"supernode-{partition_id}",
            [
                executable("flower-supernode"),
                "--superlink", self.address,
                "--root-certificates", str(self.tls.ca_cert),
                "--auth-supernode-private-key", str(node.key.private_key),
                "--node-config",
                self.node_config(partition_id),
                "--isolation", self.isolation,
                "--host", LOOPBACK,
                "--port", str(node.port),
                # The SuperNode's own Runtime API (its SuperExec and ClientApps talk to
                # it) is TLS too, with the same loopback certificate.
                "--ssl-certfile", str(self.tls.server_cert),
                "--ssl-keyfile", str(self.tls.server_key),
                "--ssl-ca-certfile", str(self.tls.ca_cert),
                "--max-wait-time", str(max(self.startup_timeout, 60.0)),
            ],
        )
        return node.process

    def nodes_status(self) -> list[dict[str, Any]]:
        """The SuperLink's node list (``flwr supernode ls --format json``)."""
        res = self.flwr("supernode", "ls", "--format", "json", timeout=60)
        if res.returncode != 0:
            return []
        try:
            return list(json.loads(res.stdout)["nodes"])
        except (ValueError, KeyError):
            return []

    def online_nodes(self) -> int:
        """How many registered SuperNodes the SuperLink sees online."""
        return sum(1 for n in self.nodes_status() if n.get("status") == "online")

    def kill_node(self, partition_id: int) -> None:
        """Kill hospital ``partition_id``'s SuperNode at once (SIGKILL), as a crash would.

        The SuperNode's process group goes, and so do the processes it
        detached (its SuperExec and any ClientApp still training): they are
        found by this federation's marker plus the node's own Runtime API port.
        """
        node = self.nodes[partition_id]
        if node.process is None:
            return
        node.process.kill_group(signal.SIGKILL)
        port_flag = f"{LOOPBACK}:{node.port}".encode()
        for pid in marked_pids(self.marker):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if port_flag in cmdline:
                _signal(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.process.popen.wait(timeout=10)

    def stop(self, grace: float = 10.0) -> None:
        """Stop every process of this federation: SIGTERM, wait ``grace`` s, then SIGKILL.

        Idempotent. Afterwards no process carrying this federation's marker is
        left (checked; a survivor is killed again and reported in the log).
        """
        for proc in reversed(self._processes):
            if proc.alive():
                proc.kill_group(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self._processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        for pid in marked_pids(self.marker):
            _signal(pid, signal.SIGTERM)
        end = time.monotonic() + 3.0
        while marked_pids(self.marker) and time.monotonic() < end:
            time.sleep(0.1)
        for proc in self._processes:
            if proc.alive():
                proc.kill_group(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=5)
            proc.log_file.close()
        for _ in range(50):
            left = marked_pids(self.marker)
            if not left:
                break
            for pid in left:
                _signal(pid, signal.SIGKILL)
            time.sleep(0.1)

    # ------------------------------------------------------------------ runs
    def submit(self, run_config: Mapping[str, Any]) -> int:
        """Submit the bract app with ``run_config`` overrides; returns the run id.

        The run config gets the roster path (unless given): the server checks every
        hospital's signed ledger against it, and secure aggregation needs it.
        """
        run_config = dict(run_config)
        run_config.setdefault("secagg", self.secagg)
        run_config.setdefault("roster", str(self.roster_path))
        overrides = " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())
        args = ["run", str(self.app_dir), CONNECTION_NAME, "--format", "json"]
        if overrides:
            args += ["--run-config", overrides]
        res = self.flwr(*args, timeout=120)
        match = re.search(r'"run-id":\s*"?(\d+)', res.stdout) or re.search(
            r"started run (\d+)", res.stdout + res.stderr
        )
        if res.returncode != 0 or match is None:
            raise DeploymentError(f"flwr run failed:\n{(res.stdout + res.stderr)[-3000:]}")
        return int(match.group(1))

    def run_status(self, run_id: int) -> str:
        """The run's status text (``pending``, ``running``, ``finished:completed``...)."""
        res = self.flwr("ls", "--run-id", str(run_id), "--format", "json", timeout=60)
        try:
            runs = json.loads(res.stdout)["runs"]
            return str(runs[0]["status"])
        except (ValueError, KeyError, IndexError):
            return "unknown"

    def run_log(self, run_id: int) -> str:
        """The ServerApp's log of the run (``flwr log RUN_ID --show``)."""
        res = self.flwr("log", str(run_id), CONNECTION_NAME, "--show", timeout=60)
        return res.stdout + res.stderr

    def wait(self, run_id: int, timeout: float, poll: float = 2.0) -> str:
        """Wait until run ``run_id`` is finished; returns its final status.

        Raises :class:`DeploymentError` when the run is not finished in ``timeout`` s
        or the SuperLink process died.
        """
        deadline = time.monotonic() + timeout
        while True:
            status = self.run_status(run_id)
            if status.startswith("finished"):
                return status
            if self.superlink is not None and not self.superlink.alive():
                raise DeploymentError(f"SuperLink died during run {run_id}:\n"
                                      f"{self.superlink.log_tail()}")
            if time.monotonic() > deadline:
                self.flwr("stop", str(run_id), CONNECTION_NAME, timeout=60)
                raise DeploymentError(
                    f"run {run_id} not finished after {timeout}s (status {status}); "
                    f"stopped it. Logs in {self.log_dir}"
                )
            time.sleep(poll)

    def run(
        self,
        run_config: Mapping[str, Any],
        timeout: float = 600.0,
        kill_node_at_round: int | None = None,
        kill_partition: int | None = None,
    ) -> RunResult:
        """Run the bract app to completion and return how it ended.

        ``run_config`` must contain an absolute ``out`` directory (the ServerApp
        and ClientApps run in other working directories). With
        ``kill_node_at_round=K`` the SuperNode of ``kill_partition`` (default: the
        last hospital) is killed (SIGKILL, with its ClientApp) as soon as it has
        received its round-K message, i.e. in the middle of round K;
        :attr:`RunResult.killed` names it when that happened.
        """
        out = Path(str(run_config.get("out", "")))
        if not out.is_absolute():
            raise ValueError("run_config['out'] must be an absolute path")
        t0 = time.perf_counter()
        run_id = self.submit(run_config)
        killer = None
        if kill_node_at_round is not None:
            victim = self.num_nodes - 1 if kill_partition is None else kill_partition
            killer = _RoundKiller(self, run_id, kill_node_at_round, victim)
            killer.start()
        try:
            status = self.wait(run_id, timeout)
        finally:
            if killer is not None:
                killer.halt.set()
                killer.join(timeout=30)
        seconds = time.perf_counter() - t0
        killed = killer.partition if killer is not None and killer.killed.is_set() else None
        return RunResult(run_id, status, seconds, out, self.run_log(run_id), killed)


class _RoundKiller(threading.Thread):
    """Kills one SuperNode as soon as it has received its work for round K of a run.

    The SuperNode logs ``[RUN <id>, ROUND <k>]`` followed by ``Receiving: ...``
    when it pulls a message; its reply takes a ClientApp process start and the
    training, seconds later, so a kill right then is a crash in mid-round.
    """

    def __init__(self, fed: LocalFederation, run_id: int, round_k: int, partition: int,
                 poll: float = 0.1) -> None:
        super().__init__(name="bract-round-killer", daemon=True)
        self.fed, self.round_k, self.partition, self.poll = fed, round_k, partition, poll
        self.pattern = re.compile(
            rf"\[RUN {run_id}, ROUND {round_k}\][^\n]*\n[^\n]*Receiving", re.MULTILINE
        )
        self.halt = threading.Event()
        self.killed = threading.Event()

    def run(self) -> None:
        proc = self.fed.nodes[self.partition].process
        if proc is None:
            return
        while not self.halt.is_set():
            text = proc.log_path.read_bytes().decode("utf-8", "replace")
            if self.pattern.search(text):
                self.fed.kill_node(self.partition)
                self.killed.set()
                return
            self.halt.wait(self.poll)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


# --------------------------------------------------------------------------- CLI
def add_deploy_parser(subparsers: Any) -> None:
    """Add the ``deploy`` sub-command to ``bract``'s argparse sub-parsers."""
    p = subparsers.add_parser(
        "deploy",
        help="run a real multi-process federation (Flower SuperLink + SuperNodes) on "
             "127.0.0.1 with TLS and SuperNode authentication",
        description=(
            "Start a SuperLink and one SuperNode per hospital on 127.0.0.1 (dev TLS "
            "certificates, SuperNode authentication), run the bract app with `flwr run`, "
            "write report.json and ledger.jsonl to --out, and stop every process."
        ),
    )
    p.add_argument("--clients", type=int, default=3, help="hospitals (SuperNodes)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dataset", default="breast-cancer")
    p.add_argument("--target-epsilon", type=float, default=8.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/deploy"))
    p.add_argument("--workdir", type=Path, default=None,
                   help="certificates, keys, Flower home and logs (default: OUT/deployment)")
    p.add_argument("--round-timeout", type=float, default=120.0,
                   help="seconds the server waits for a round's replies (0: no limit)")
    p.add_argument("--kill-node-at-round", type=int, default=None, metavar="K",
                   help="demonstration: kill the last hospital's SuperNode during round K")
    p.add_argument("--secagg", action=argparse.BooleanOptionalAction, default=True,
                   help="secure aggregation (default on); hospitals sign their ledgers either way")
    p.add_argument("--isolation", choices=("subprocess", "process"), default="subprocess")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds the whole run may take before it is stopped")
    p.set_defaults(func=run_deploy)


def run_deploy(args: argparse.Namespace) -> int:
    """``bract deploy``: run the federation and print where its record is; 0 on success."""
    out = Path(args.out).resolve()
    workdir = Path(args.workdir).resolve() if args.workdir else out / "deployment"
    if args.kill_node_at_round is not None and not 1 <= args.kill_node_at_round <= args.rounds:
        print("--kill-node-at-round must be between 1 and --rounds", file=sys.stderr)
        return 2
    run_config = {
        "clients": args.clients,
        "rounds": args.rounds,
        "dataset": args.dataset,
        "target-epsilon": args.target_epsilon,
        "delta": args.delta,
        "seed": args.seed,
        "out": str(out),
        "round-timeout": float(args.round_timeout),
    }
    print(f"bract deploy: {args.clients} SuperNodes + 1 SuperLink on {LOOPBACK} "
          f"(TLS, SuperNode auth); work dir {workdir}", flush=True)
    try:
        # This command plays every hospital's operator: their policies allow the budget
        # asked for here (a real hospital's operator writes its own).
        own = HospitalPolicy(target_epsilon=args.target_epsilon, delta=args.delta)
        with LocalFederation(
            workdir, args.clients, isolation=args.isolation, secagg=args.secagg,
            hospital_policy=own,
        ) as fed:
            print(f"SuperLink at {fed.address}; {args.clients} SuperNodes online; "
                  f"logs in {fed.log_dir}", flush=True)
            result = fed.run(run_config, timeout=args.timeout,
                             kill_node_at_round=args.kill_node_at_round)
    except DeploymentError as exc:
        print(f"bract deploy failed: {exc}", file=sys.stderr)
        return 1
    print(result.log[-6000:])
    print(f"run {result.run_id}: {result.status} in {result.seconds:.1f}s; "
          f"record in {out / 'report.json'} and {out / 'ledger.jsonl'}")
    return 0 if result.succeeded else 1


@contextlib.contextmanager
def local_federation(workdir: Path, num_nodes: int, **kwargs: Any) -> Iterator[LocalFederation]:
    """``with local_federation(dir, n) as fed:`` — same as ``with LocalFederation(...)``."""
    with LocalFederation(workdir, num_nodes, **kwargs) as fed:
        yield fed
