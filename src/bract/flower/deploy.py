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
* Certificates and keys are generated with pyca ``cryptography``
  (:mod:`bract.flower.certificates`); the dev CA is for local runs only (see
  ``docs/deployment.md`` for a real deployment). Process bookkeeping is in
  :mod:`bract.flower.processes`, the ``bract deploy`` command in
  :mod:`bract.flower.deploy_cli`.

``flwr`` executables are taken from the running interpreter's environment
(``sys.executable``'s directory), so the venv's Flower is always the one used.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bract.flower.certificates import (
    LOOPBACK,
    NodeKeyFiles,
    TlsFiles,
    generate_dev_certificates,
    generate_supernode_key,
)
from bract.flower.client import dataset_id_problem
from bract.flower.hospital_policy import HospitalPolicy
from bract.flower.processes import (
    MARKER_ENV,
    DeploymentError,
    ManagedProcess,
    _port_open,
    _signal,
    executable,
    free_port,
    marked_pids,
)
from bract.flower.secagg_client import read_identity_key, write_identity_key
from bract.flower.supernode import (
    DEFAULT_PULL_INTERVAL,
    FLOWER_IDLE_SLEEP,
    TASK_POLL_INTERVAL,
)
from bract.records.roster import Roster, read_roster, write_roster
from bract.secagg import SecAggError
from bract.secagg.crypto import SigningKey

#: Repository root: the Flower app directory (its pyproject.toml has ``[tool.flwr.app]``).
APP_DIR = Path(__file__).resolve().parents[3]

#: Name of the SuperLink connection written into the private Flower configuration.
CONNECTION_NAME = "bract-local"



def resume_problem(workdir: Path, num_nodes: int) -> str | None:
    """Why a local federation of ``num_nodes`` hospitals cannot resume from ``workdir``
    (a hospital without a readable identity key, or a roster that is unreadable or
    lists other hospitals or keys), or ``None`` when it can.

    Guarantee: it only reads, so ``bract deploy --resume`` and
    :meth:`LocalFederation.start` refuse such a resume before anything is created."""
    secagg = Path(workdir) / "secagg"
    keys: dict[int, bytes] = {}
    for i in range(num_nodes):
        path = secagg / f"hospital-{i}" / "identity.key"
        if not path.exists():
            return (f"cannot resume: hospital-{i} has no identity in {path.parent} (was the "
                    "federation run with this --workdir?)")
        try:
            keys[i + 1] = SigningKey.from_bytes(read_identity_key(path)).public_bytes()
        except (OSError, ValueError, SecAggError) as exc:
            return f"cannot resume: hospital-{i}'s identity key {path} is unreadable ({exc})"
    roster_path = secagg / "roster.json"
    try:
        earlier = read_roster(roster_path)
    except (OSError, ValueError) as exc:
        return f"cannot resume: no readable roster in {roster_path} ({exc})"
    names = {i + 1: f"hospital-{i}" for i in range(num_nodes)}
    if dict(earlier.keys) != keys or dict(earlier.names) != names:
        return (f"cannot resume: the roster in {roster_path} lists other hospitals than the "
                f"{num_nodes} in {secagg} (another --clients?)")
    return None


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
    authentication key per hospital (:func:`generate_supernode_key`), every
    hospital's identity key, roster copy, policy and state directory
    (``workdir/secagg/hospital-i``), a private Flower CLI configuration,
    ``flower-superlink --enable-supernode-auth`` with TLS, registration of every
    hospital's public key with ``flwr supernode register``, then one
    ``bract-supernode`` per hospital with its private key, ``--root-certificates``
    and the node config :meth:`node_config` returns, and a wait until the SuperLink
    lists every node as online (the exact commands: docs/deployment.md).

    Each SuperNode is ``bract-supernode`` (:mod:`bract.flower.supernode`): Flower's
    ``flower-supernode`` with ``--isolation subprocess``, pulling every
    ``pull_interval`` seconds when idle (Flower: 3 s), its ClientApps run by
    ``executor`` (``warm``: forked from a warm parent, ``flower``: a fresh
    ``flwr-clientapp`` per message). ``task_poll_interval`` (seconds) is how often
    each SuperExec asks for new work (Flower's default is 1 s). Logs go to ``workdir/logs``.
    """

    workdir: Path
    num_nodes: int
    app_dir: Path = APP_DIR
    executor: str = "warm"
    pull_interval: float = DEFAULT_PULL_INTERVAL
    startup_timeout: float = 90.0
    task_poll_interval: float = TASK_POLL_INTERVAL
    #: Secure aggregation (run config). Every hospital gets an Ed25519 identity and a
    #: roster either way: the identity also signs its privacy ledger.
    secagg: bool = True
    #: Each hospital's own limits, written to its policy file (node config ``policy``):
    #: here the one operator plays every hospital's. ``None``: the policy defaults.
    hospital_policy: HospitalPolicy | None = None
    #: Each hospital's own data file (node config ``data-path``), by partition id; the
    #: coordinator then holds none (the run config declares the model). Empty: the
    #: hospitals train on partitions of the run's dataset.
    hospital_data: Sequence[str] = ()
    #: The dataset id of each file in ``hospital_data`` (node config ``dataset-id``: the
    #: name its lifetime budget is kept under), by partition id; required with it.
    hospital_dataset_ids: Sequence[str] = ()
    extra_env: Mapping[str, str] = field(default_factory=dict)
    #: Continue the federation already in ``workdir``: the same hospitals' keys, roster
    #: (so the same federation id: their signed ledgers continue) and lifetime state.
    #: Refused (``DeploymentError``) when ``workdir`` holds no such federation.
    resume: bool = False

    marker: str = field(init=False, default_factory=lambda: uuid.uuid4().hex)
    superlink_port: int = field(init=False, default=0)
    tls: TlsFiles | None = field(init=False, default=None)
    nodes: list[NodeHandle] = field(init=False, default_factory=list)
    superlink: ManagedProcess | None = field(init=False, default=None)
    _processes: list[ManagedProcess] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.num_nodes < 1:
            raise ValueError("a federation needs at least one SuperNode")
        if self.executor not in ("warm", "flower"):
            raise ValueError("executor must be 'warm' or 'flower'")
        if not 0 < self.pull_interval <= FLOWER_IDLE_SLEEP:
            raise ValueError(f"pull_interval must be > 0 and <= {FLOWER_IDLE_SLEEP} s")
        if self.hospital_data and len(self.hospital_data) != self.num_nodes:
            raise ValueError(f"hospital_data names {len(self.hospital_data)} files for "
                             f"{self.num_nodes} hospitals: one each")
        if len(self.hospital_dataset_ids) != len(self.hospital_data) or any(
                not str(i).strip() or '"' in str(i) for i in self.hospital_dataset_ids):
            raise ValueError("hospital_dataset_ids must name one dataset id (non-blank, no "
                             "quotes) per file of hospital_data: the name each hospital's "
                             "lifetime budget is kept under")
        for dataset_id in self.hospital_dataset_ids:
            problem = dataset_id_problem(str(dataset_id))
            if problem:
                raise ValueError(f"hospital_dataset_ids: {problem}")
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
        """Start the SuperLink, register the hospitals' keys, start their SuperNodes.

        A resume its work dir cannot take (:func:`resume_problem`) is refused with
        :class:`DeploymentError` before anything is created."""
        if self.resume:
            problem = resume_problem(self.workdir, self.num_nodes)
            if problem:
                raise DeploymentError(problem)
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
        if self.resume:  # every key and the roster it continues must be there, unchanged
            problem = resume_problem(self.workdir, self.num_nodes)
            if problem:
                raise DeploymentError(problem)
        federation_id = f"bract-local-{uuid.uuid4().hex[:12]}"
        keys: dict[int, bytes] = {}
        for i in range(self.num_nodes):
            d = self._secagg_dir(i)
            d.mkdir(parents=True, exist_ok=True)
            path = d / "identity.key"
            # A hospital keeps its key (its lifetime ledger in d/state is signed with it);
            # on resume every key is there (checked above).
            if not path.exists():
                write_identity_key(path, SigningKey.generate().to_bytes())
            keys[i + 1] = SigningKey.from_bytes(read_identity_key(path)).public_bytes()
        names = {i + 1: f"hospital-{i}" for i in range(self.num_nodes)}
        if self.resume:  # the roster it continues (resume_problem checked its members)
            federation_id = read_roster(self.roster_path).federation_id
        doc = Roster(federation_id, keys, names)
        self.roster_path.parent.mkdir(parents=True, exist_ok=True)
        write_roster(self.roster_path, doc)
        for i in range(self.num_nodes):
            d = self._secagg_dir(i)
            write_roster(d / "roster.json", doc)
            (d / "state").mkdir(mode=0o700, exist_ok=True)
            own = self.hospital_policy or HospitalPolicy(
                allow_plain_aggregation=not self.secagg)
            own.write(d / "policy.json")

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
            f'state-dir="{d / "state"}"',
        ]
        if self.hospital_data:
            parts.append(f'data-path="{Path(self.hospital_data[partition_id]).resolve()}"')
            parts.append(f'dataset-id="{self.hospital_dataset_ids[partition_id]}"')
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
                executable("bract-supernode"),
                "--executor", self.executor,
                "--pull-interval", str(self.pull_interval),
                "--superlink", self.address,
                "--root-certificates", str(self.tls.ca_cert),
                "--auth-supernode-private-key", str(node.key.private_key),
                "--node-config",
                self.node_config(partition_id),
                "--isolation", "subprocess",
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
        # The port exactly (not a prefix of another node's port), as a whole argument
        # or the end of one.
        port_flag = re.compile(re.escape(f"{LOOPBACK}:{node.port}".encode()) + rb"(?![0-9])")
        for pid in marked_pids(self.marker):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if port_flag.search(cmdline):
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
