"""A warm ClientApp executor for a hospital's SuperNode: Flower's SuperExec, with each
message's ClientApp forked from a parent that imported Flower, bract, torch and
opacus once, instead of a new ``flwr-clientapp`` interpreter per message.

Flower 1.42's SuperExec starts one TaskExecutor per task through an ``Executor``
(``flwr.supercore.superexec.executor.types.Executor``: ``launch(spec)`` and a few
capacity hooks). ``bract-superexec`` is Flower's own ``flower-superexec`` command
with one difference: its executor is :class:`ForkingExecutor`. Everything else (the
task loop, authentication to the Runtime API, TLS, the task token, the ClientApp's
own lifecycle in ``flwr.supernode.runtime.run_clientapp``) is Flower's.

What it keeps of Flower's semantics, by construction:

* **No state between messages except the Context.** Every ClientApp runs in a new
  process forked from the *zygote*, a process that only imported modules and never
  ran an app; so each message starts from the same state a fresh interpreter would
  have after those imports (module caches empty), and whatever one message's process
  does dies with it. Randomness is each child's own: Python's ``random`` reseeds
  itself at fork, the child reseeds numpy's and torch's global generators from
  ``os.urandom``, and OpenSSL and ``os.urandom`` draw from the kernel.
* **Threads.** The zygote starts no Python thread (a fork copies only the forking
  thread, so a Python thread could leave a lock held in the child). Native libraries
  it imports start their own worker threads: numpy's and scipy's OpenBLAS pools.
  OpenBLAS stops its pools before every fork (its at-fork handler), so each child
  starts with one thread and starts its own pools when it first needs them, and the
  zygote, which never runs BLAS work, has one thread after its first fork.
* **No message's token reaches another message's process through the zygote.** The
  zygote never parses a request: it reads each one's bytes, exactly, into a buffer it
  zeroes right after the fork (the child parses its own copy). Before any app code
  runs, a child's fd 0 is ``/dev/null`` (it was the zygote's request pipe, where the
  next messages' tokens arrive), its fd 1 is its log (fd 2), and every other
  descriptor it inherited is closed. What remains: a child's own token stays in its
  memory as Python strings, which cannot be wiped reliably, until it exits; requests
  the zygote has not read yet wait in the kernel's pipe buffer. This keeps messages
  apart; it is not a sandbox: every ClientApp runs as the SuperNode's OS user (as
  with Flower's own executor), and code running as that user can reach that user's
  other processes (the SuperNode and the SuperExec hold every task's token) through
  ``/proc`` as far as the kernel's ptrace rules allow.
* **Each message's failure stays contained.** A ClientApp that raises, exits or is
  killed ends its own process; Flower's Runtime API reports it as it does for
  ``flwr-clientapp``. A fork that fails (``EAGAIN``, ``ENOMEM``) costs only that
  message its warm start: the zygote says so and goes on, and the message starts on
  Flower's executor at the next task poll. If the zygote itself dies, the next message
  runs as Flower's default (a fresh ``flwr-clientapp``, this interpreter's own, not
  one found on ``PATH``) while a new zygote starts; a message it had been handed but
  not answered for is not started again (it may have forked it), so Flower's task
  expiry applies to it. A zygote that served for :data:`MIN_ZYGOTE_SERVICE` seconds
  or more is replaced at once. One that fails (it cannot be started, exits before it
  is ready, e.g. a preload that fails to import, or exits less than
  :data:`MIN_ZYGOTE_SERVICE` seconds after it became ready) is retried after 1 s, 2 s,
  4 s; after :data:`MAX_ZYGOTE_FAILURES` failures in a row the executor logs ``warm
  executor disabled: REASON; messages run on Flower's executor`` once and starts no
  more. ``launch`` and ``reconcile`` never raise: what cannot be started is a failed
  launch, which Flower logs, or a failed zygote.
* **The app code is the hospital's installed bract**, as with Flower's default
  executor for this app (bract is imported from the environment, not from the FAB).

The Flower internals this relies on are pinned: :data:`FLOWER_VERSIONS` (checked at
start, with a clear refusal otherwise; ``tests/flower/test_warm_executor.py`` checks
the pin against the installed Flower).
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["FLOWER_VERSIONS", "HEADER_SIZE", "MAX_REQUEST", "MAX_ZYGOTE_FAILURES",
           "MIN_ZYGOTE_SERVICE", "PRELOAD", "WAKE_FD_ENV", "ZYGOTE_BACKOFF",
           "ForkingExecutor", "SubprocessFallback", "WakeableSleep", "check_flower_version",
           "encode_request", "flower_task_args", "flower_task_command", "rebound",
           "superexec_main", "zygote_main"]

#: Flower releases whose SuperExec executor protocol, ``run_superexec.get_executor``
#: and ``run_clientapp`` signature this module was written against and tested with.
FLOWER_VERSIONS = ("1.42.",)
#: What the zygote imports once: Flower's ClientApp runtime, bract's ClientApp and what
#: its train handler loads (torch, Opacus, the accountants, the tasks' data loaders),
#: and what every child would otherwise import on its way to its first request: httpx's
#: transport (``httpcore``, imported when the first ``httpx.Client`` is built: 15-40 ms
#: per message), Flower's TLS helpers, the OpenSSL backend, and the code page zipfile
#: reads the app bundle with.
PRELOAD = ("flwr.supernode.runtime.run_clientapp", "bract.flower.app", "bract.flower.client",
           "bract.tasks", "bract.privacy", "bract.privacy.training",
           "bract.privacy.bookkeeping", "bract.privacy.grad_samplers", "opacus",
           "torch._dynamo", "dp_accounting", "scipy.signal", "sklearn.datasets",
           "httpcore", "flwr.supercore.tls", "cryptography.hazmat.backends.openssl",
           "encodings.cp437")
#: The function each forked child runs, as ``module:function`` (Flower's own).
RUN_CLIENTAPP = "flwr.supernode.runtime.run_clientapp:run_clientapp"
#: The environment variable through which ``bract-supernode`` gives its SuperExec the
#: read end of the pipe it writes a byte to whenever it stored a message.
WAKE_FD_ENV = "BRACT_SUPEREXEC_WAKE_FD"
#: Zygotes in a row that may fail (not start, exit before they are ready, e.g. a preload
#: that fails to import, or exit within :data:`MIN_ZYGOTE_SERVICE` seconds of becoming
#: ready) before the executor stops starting them and leaves every message to Flower's.
MAX_ZYGOTE_FAILURES = 4
#: Seconds a zygote must have served (from its ``ready`` to its exit) for its exit to
#: restart it at once with the failure count reset; one that exits sooner counts as a
#: failure, so a zygote that crashes whenever it is ready is not restarted at every poll.
MIN_ZYGOTE_SERVICE = 30.0
#: Seconds before the first new zygote after one failed; doubled after each failure.
ZYGOTE_BACKOFF = 1.0


def rebound(module: types.ModuleType, **replacements: Any) -> types.SimpleNamespace:
    """A stand-in for ``module`` (e.g. ``time``) with every public name of it and
    ``replacements`` in place of some: bound as one Flower module's global, it changes
    only what that module calls, never the real module other code uses."""
    names = {n: getattr(module, n) for n in dir(module) if not n.startswith("__")}
    return types.SimpleNamespace(**{**names, **replacements})


class WakeableSleep:
    """The SuperExec's pause between task polls, cut short when its SuperNode writes to
    the wake pipe ``fd`` (a message has arrived), so the task is asked for at once.

    Guarantee: never returns early without a byte from the SuperNode (no busy loop):
    once the SuperNode's end is closed (it exited), it sleeps the full pause.
    """

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        if fd is not None:
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)

    def __call__(self, seconds: float) -> None:
        if self.fd is None:
            time.sleep(seconds)
            return
        ready, _, _ = select.select([self.fd], [], [], seconds)
        if not ready:
            return
        try:
            data = os.read(self.fd, 4096)  # every byte written so far: one wake-up
        except BlockingIOError:
            return
        if not data:  # the SuperNode closed its end
            os.close(self.fd)
            self.fd = None
            time.sleep(seconds)


def check_flower_version() -> str:
    """The installed Flower version, if it is one this executor is pinned to; otherwise
    ``RuntimeError`` naming the installed version and the fallback."""
    from flwr.supercore.version import package_version

    if not any(package_version.startswith(v) for v in FLOWER_VERSIONS):
        raise RuntimeError(
            f"bract's warm ClientApp executor is written against Flower "
            f"{', '.join(v + 'x' for v in FLOWER_VERSIONS)}; Flower {package_version} is "
            "installed: run Flower's own flower-supernode --isolation subprocess "
            "(a fresh ClientApp process per message, Flower's 3 s idle pull)")
    return package_version


# ---------------------------------------------------------------------- the zygote
def _resolve(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def _child(request: dict[str, Any], target: str) -> int:
    """Run one ClientApp (in a forked child): Flower's ``run_clientapp`` with the task's
    token and Runtime API address; the exit status it ends with."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        certificates = None
        if not request["insecure"] and request.get("root_certificates_path"):
            from flwr.supercore.tls import validate_and_resolve_root_certificates

            certificates = validate_and_resolve_root_certificates(
                request["root_certificates_path"], False)
        _resolve(target)(
            runtime_api_address=request["runtime_api_address"],
            token=request["token"],
            insecure=request["insecure"],
            certificates=certificates,
            parent_pid=request.get("parent_pid"),
            runtime_dependency_install=request.get("runtime_dependency_install", False),
        )
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        return 1
    return 0


#: A request's header on the zygote's stdin: its id and its body's length in bytes, as
#: ``b"%010d %010d\n"``; the body (the JSON request, with the task's token) follows.
HEADER_SIZE = 22
#: The longest request body the zygote accepts (a request is about 250 bytes).
MAX_REQUEST = 1 << 16


def encode_request(request_id: int, body: bytes) -> bytes:
    """One request as the zygote reads it: the fixed-size header, then ``body``."""
    if not 0 <= request_id < 10**10 or len(body) > MAX_REQUEST:
        raise ValueError(f"request {request_id} of {len(body)} bytes cannot be sent")
    return b"%010d %010d\n" % (request_id, len(body)) + body


def _read_into(fd: int, buffer: bytearray) -> bool:
    """Fill ``buffer`` from ``fd`` exactly (no byte past it is read, and none goes
    through an intermediate ``bytes``); False at end of file."""
    view, got = memoryview(buffer), 0
    while got < len(buffer):
        n = os.readv(fd, [view[got:]])
        if n == 0:
            return False
        got += n
    return True


def _wipe(buffer: bytearray) -> None:
    buffer[:] = bytes(len(buffer))


def _open_fd_limit() -> int:
    try:
        limit = os.sysconf("SC_OPEN_MAX")
    except (ValueError, OSError):
        limit = -1
    return limit if limit > 0 else 65536


def _isolate_fds() -> None:
    """In a new child: fd 0 becomes ``/dev/null`` (it was the zygote's request pipe,
    where the next messages' tokens arrive), fd 1 the log (fd 2; it was the zygote's
    answer pipe), and every other descriptor the zygote held is closed. The child needs
    none: Flower's ``run_clientapp`` opens its own connections."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(2, 1)
    os.closerange(3, _open_fd_limit())  # ``null`` included


def _reseed() -> None:
    """In a new child: fresh seeds from ``os.urandom`` for the global generators of
    numpy and torch, if the zygote imported them (a fork copies their state, so every
    child would draw the same numbers). Python's ``random`` reseeds itself at fork;
    OpenSSL and ``os.urandom`` draw from the kernel."""
    np = sys.modules.get("numpy")
    if np is not None and hasattr(np, "random"):
        np.random.seed(np.frombuffer(os.urandom(16), dtype=np.uint32))
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "manual_seed"):
        torch.manual_seed(int.from_bytes(os.urandom(8), "little"))


def _run_child(body: bytearray, target: str) -> int:
    """Everything a new child does before and around its ClientApp: isolate its file
    descriptors, parse its own request (then zero the buffer it came in), reseed the
    global random generators it inherited, run it."""
    _isolate_fds()
    try:
        request = json.loads(body.decode("utf-8"))
    finally:
        _wipe(body)
    _reseed()
    return _child(request, target)


def _say(line: str) -> None:
    print(" ".join(line.split()), flush=True)  # one line, whatever the text held


def zygote_main(argv: Sequence[str] | None = None) -> int:
    """The warm parent: import :data:`PRELOAD` (or ``--preload``), answer ``ready``,
    then for each request on stdin (:func:`encode_request`) fork one child that runs
    ``--target`` with it, answering ``forked ID PID``, or ``failed ID REASON`` when the
    fork fails (the zygote goes on). It exits when stdin closes (its executor is gone),
    with ``error REASON`` and status 3 when an import fails, or ``error REASON`` and
    status 2 on a malformed header. It starts no Python thread (see the module text for
    the native ones).

    Guarantee: the zygote never parses a request: it reads each body, byte-exact, into
    a buffer it zeroes right after the fork, so a child inherits no other message's
    token from it (its own request is parsed in the child); and each child holds only
    fds 0-2 (fd 0 ``/dev/null``) once it runs any code of its own."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bract.flower.warm_executor")
    parser.add_argument("--preload", default=",".join(PRELOAD))
    parser.add_argument("--target", default=RUN_CLIENTAPP)
    args = parser.parse_args(argv)
    for module in filter(None, args.preload.split(",")):
        try:
            importlib.import_module(module)
        except Exception as exc:
            _say(f"error importing {module} failed: {type(exc).__name__}: {exc}")
            return 3
    if args.target == RUN_CLIENTAPP:
        # Every child pulls its message from the SuperNode: retry soon if it is not all
        # there yet (bract.flower.object_pulls).
        from bract.flower.object_pulls import shorten_object_pull_backoff

        shorten_object_pull_backoff()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the executor decides when it stops
    _say("ready")
    header = bytearray(HEADER_SIZE)
    while _read_into(0, header):
        fields = header.decode("ascii", "replace").split()
        if (len(fields) != 2 or not all(f.isdigit() for f in fields)
                or int(fields[1]) > MAX_REQUEST):
            _say(f"error malformed request header {bytes(header)!r}")
            return 2
        request_id, body = int(fields[0]), bytearray(int(fields[1]))
        if not _read_into(0, body):
            break
        try:
            pid = os.fork()
        except OSError as exc:  # EAGAIN, ENOMEM: this request runs elsewhere, we go on
            _wipe(body)
            _say(f"failed {request_id} fork: {exc}")
            continue
        if pid == 0:
            code = 1
            try:
                code = _run_child(body, args.target)
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        _wipe(body)
        _say(f"forked {request_id} {pid}")
    return 0


# ---------------------------------------------------------------------- the executor
def flower_task_command(task_type: Any, python: str = sys.executable,
                        scripts_dir: Path | None = None) -> list[str]:
    """The command that starts Flower's process for ``task_type`` (``flwr-clientapp``
    for a ClientApp) from *this* interpreter's installation, never from ``PATH``: the
    script in ``scripts_dir`` (default: the folder of ``python``, where a venv keeps
    its scripts), else ``python -c`` running that script's entry point.

    A SuperNode started by its full path (``/opt/venv/bin/bract hospital start``, a
    systemd unit) has no venv on ``PATH``, where Flower's own executor would look.
    ``LookupError`` if this installation has no such command."""
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND

    name = TASK_TYPE_TO_COMMAND[task_type]
    folder = Path(python).parent if scripts_dir is None else Path(scripts_dir)
    beside = folder / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    from importlib.metadata import entry_points

    found = list(entry_points(group="console_scripts", name=name))
    if not found:
        raise LookupError(f"Flower's {name} is neither in {folder} nor an entry point of "
                          f"{python}'s packages")
    entry = found[0]
    code = (f"import importlib, sys\nsys.argv[0] = {name!r}\n"
            f"main = importlib.import_module({entry.module!r})\n"
            f"for part in {entry.attr.split('.')!r}:\n    main = getattr(main, part)\n"
            "sys.exit(main())\n")
    return [python, "-c", code]


def flower_task_args(spec: Any, command: Sequence[str]) -> list[str]:
    """The argument list Flower 1.42's ``SubprocessExecutor.launch`` starts for ``spec``,
    with ``command`` in place of the bare command name it looks up on ``PATH`` (a test
    checks the two agree for the pinned Flower)."""
    from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG

    args = [*command, TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type],
            spec.runtime_api_address, "--token", spec.token]
    if spec.insecure:
        args.append("--insecure")
    elif spec.root_certificates_path is not None:
        args.extend(["--root-certificates", spec.root_certificates_path])
    if spec.parent_pid is not None:
        args.extend(["--parent-pid", str(spec.parent_pid)])
    if spec.runtime_dependency_install:
        args.append("--allow-runtime-dependency-installation")
    return args


class SubprocessFallback:
    """What runs a task the zygote does not: Flower's ``SubprocessExecutor`` (one new
    process per task, the same arguments), with the command from this interpreter's
    installation (:func:`flower_task_command`) instead of ``PATH``."""

    def __init__(self, python: str = sys.executable, scripts_dir: Path | None = None) -> None:
        self.python, self.scripts_dir = python, scripts_dir

    def launch(self, spec: Any) -> Any:
        """Start ``spec``'s process; ``LaunchResult.accepted()`` once it is started (an
        exception if it cannot be: :meth:`ForkingExecutor.launch` reports it)."""
        from flwr.supercore.superexec.executor.types import LaunchResult

        args = flower_task_args(spec, flower_task_command(spec.task_type, self.python,
                                                          self.scripts_dir))
        if spec.suppress_output:
            subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:
            subprocess.Popen(args)
        return LaunchResult.accepted()


class _Zygote:
    """One zygote process and what its executor knows of it."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.ready = threading.Event()
        #: Requests written to it and not answered yet: request id -> ExecutionSpec.
        self.sent: dict[int, Any] = {}
        #: The reason it gave for exiting (its ``error`` line), if any.
        self.error = ""
        self.reader: threading.Thread | None = None
        #: When (``time.monotonic``) it said ``ready``, and when its output ended (it
        #: exited): how long it served.
        self.ready_at: float | None = None
        self.ended_at: float | None = None


class ForkingExecutor:
    """Flower's ``Executor`` protocol: ClientApp tasks run in a child forked from a warm
    zygote; any other task type, or a ClientApp task while no zygote is ready, runs
    as Flower's ``SubprocessExecutor`` would run it (:class:`SubprocessFallback`).

    Guarantee: a launch never waits for a zygote and never raises; every launched task
    gets one process, or, when neither the zygote nor the fallback can start one, a
    failure Flower logs (a fork the zygote could not make is started by the fallback at
    the next :meth:`reconcile`); that process shares no state with another task's (see
    the module text)."""

    def __init__(self, preload: Sequence[str] = PRELOAD, target: str = RUN_CLIENTAPP,
                 ready_timeout: float = 120.0, *, fallback: Any = None,
                 max_failures: int = MAX_ZYGOTE_FAILURES, backoff: float = ZYGOTE_BACKOFF,
                 min_service: float = MIN_ZYGOTE_SERVICE) -> None:
        if max_failures < 1 or not backoff > 0 or not min_service >= 0:
            raise ValueError("max_failures must be at least 1, backoff above 0 s and "
                             "min_service at least 0 s")
        #: What runs a task the zygote does not (``launch(spec)``, Flower's protocol).
        self._fallback = fallback if fallback is not None else SubprocessFallback()
        self._max_failures, self._backoff = max_failures, backoff
        self._min_service = min_service
        #: Zygotes in a row that failed (see :meth:`reconcile`).
        self._failures = 0
        #: When the next zygote may start (after a failure: a growing pause).
        self._restart_at = 0.0
        #: Why the warm path is off for good (``None`` while it is on).
        self.disabled: str | None = None
        self._preload = ",".join(preload)
        self._target = target
        self._ready_timeout = ready_timeout
        self._lock = threading.Lock()
        self._zygote: _Zygote | None = None
        self._ids = itertools.count(1)
        #: Tasks whose fork failed in the zygote, to start on the fallback.
        self._refused: list[tuple[Any, str]] = []
        self._closed = False
        #: How many ClientApp processes the zygotes forked (for logs and tests).
        self.forked = 0
        with self._lock:
            self._maybe_start(time.monotonic())

    def _start_zygote(self) -> None:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bract.flower.warm_executor", "--preload", self._preload,
             "--target", self._target],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        zygote = _Zygote(proc)
        try:
            zygote.reader = threading.Thread(target=self._read_zygote, args=(zygote,),
                                             name="bract-zygote-reader", daemon=True)
            zygote.reader.start()
        except BaseException:
            # No reader, no zygote: one nobody listens to must not outlive this try.
            proc.kill()
            proc.wait()
            raise
        self._zygote = zygote

    def _read_zygote(self, zygote: _Zygote) -> None:
        assert zygote.proc.stdout is not None
        for raw in zygote.proc.stdout:
            word, _, rest = raw.decode("utf-8", "replace").strip().partition(" ")
            if word == "ready":
                zygote.ready_at = time.monotonic()
                zygote.ready.set()
            elif word in ("forked", "failed"):
                request, _, detail = rest.partition(" ")
                with self._lock:
                    spec = zygote.sent.pop(int(request), None) if request.isdigit() else None
                    if word == "forked":
                        self.forked += 1
                    elif spec is not None:
                        self._refused.append((spec, detail))
            elif word == "error":
                zygote.error = rest
        zygote.ended_at = time.monotonic()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Whether the zygote finished its imports within ``timeout`` seconds."""
        zygote = self._zygote
        return zygote is not None and zygote.ready.wait(
            self._ready_timeout if timeout is None else timeout)

    # Flower's Executor protocol ----------------------------------------------------
    def get_eligible_capacity(self, supported_task_types: set[Any], *, insecure: bool = False,
                              root_certificates_path: str | None = None
                              ) -> tuple[set[Any], set[str]]:
        """Every supported task type can launch at once (as Flower's default)."""
        del insecure, root_certificates_path
        return supported_task_types, set()

    def wait_for_capacity(self, task_type: Any = None, *, fab_hash: str | None = None,
                          insecure: bool = False, root_certificates_path: str | None = None
                          ) -> None:
        """No capacity gate (as Flower's default)."""
        del task_type, fab_hash, insecure, root_certificates_path

    def launch(self, spec: Any) -> Any:
        """Start the task's process: forked from the zygote for a ClientApp task when the
        zygote is ready, otherwise as Flower's subprocess executor does
        (:class:`SubprocessFallback`).

        Guarantee: never raises (Flower 1.42's SuperExec loop does not catch an
        executor's exception: it would end the SuperExec); whatever goes wrong is a
        ``LaunchResult.failed`` naming it, which Flower logs and leaves to its task
        expiry."""
        from flwr.supercore.superexec.executor.types import LaunchResult

        try:
            return self._launch(spec)
        except Exception as exc:  # any failure is this launch's result
            return LaunchResult.failed(f"bract's warm executor could not start task "
                                       f"{getattr(spec, 'task_id', '?')}: {exc!r}")

    def _launch_fallback(self, spec: Any) -> Any:
        from flwr.supercore.superexec.executor.types import LaunchResult

        try:
            return self._fallback.launch(spec)
        except Exception as exc:
            return LaunchResult.failed(f"could not start task {spec.task_id} as Flower's "
                                       f"subprocess executor would: {exc!r}")

    def _launch(self, spec: Any) -> Any:
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return self._launch_fallback(spec)
        body = json.dumps({
            "runtime_api_address": spec.runtime_api_address, "token": spec.token,
            "insecure": spec.insecure, "root_certificates_path": spec.root_certificates_path,
            "parent_pid": spec.parent_pid,
            "runtime_dependency_install": spec.runtime_dependency_install,
        }).encode("utf-8")
        with self._lock:
            zygote = self._zygote
            sent = False
            if zygote is not None and zygote.ready.is_set() and zygote.proc.poll() is None:
                request_id = next(self._ids)
                zygote.sent[request_id] = spec  # before the write: the answer may be quick
                try:
                    assert zygote.proc.stdin is not None
                    zygote.proc.stdin.write(encode_request(request_id, body))
                    zygote.proc.stdin.flush()
                    sent = True
                except (OSError, ValueError):
                    zygote.sent.pop(request_id, None)
        return LaunchResult.accepted() if sent else self._launch_fallback(spec)

    def reconcile(self) -> None:
        """Between task polls: start on the fallback every task whose fork failed in the
        zygote, and replace a zygote that died: at once, with the failure count reset,
        if it had served ``min_service`` seconds or more since it became ready. A zygote
        that failed (it could not be started, whatever the exception; it exited before
        it was ready, e.g. a preload that fails to import; or it exited less than
        ``min_service`` seconds after it became ready) is replaced after a pause that
        doubles each time (``backoff`` s, then twice that...), and after
        ``max_failures`` failures in a row never again: one log line, ``warm executor
        disabled: REASON; messages run on Flower's executor``, and every later message
        runs on the fallback.

        Guarantee: never raises (Flower's SuperExec loop calls it unguarded); a zygote
        that crashes whenever it is ready is started at most ``max_failures`` times."""
        from flwr.common.logger import log

        zygote = self._zygote
        if zygote is not None and zygote.proc.poll() is not None and zygote.reader:
            zygote.reader.join(timeout=2.0)  # its last answers (it has exited: EOF soon)
        with self._lock:
            refused, self._refused = self._refused, []
            now = time.monotonic()
            if not self._closed and zygote is not None and zygote is self._zygote \
                    and zygote.proc.poll() is not None:
                self._zygote = None
                self._zygote_exited(zygote, now)
            self._maybe_start(now)
        for spec, reason in refused:
            result = self._launch_fallback(spec)
            log(logging.WARNING if result.status == "accepted" else logging.ERROR,
                "bract warm executor: could not fork task %s's ClientApp (%s); %s", spec.task_id,
                reason, "started it on Flower's executor" if result.status == "accepted"
                else f"nor start it on Flower's executor ({result.message}); Flower's task "
                     "expiry applies")

    def _maybe_start(self, now: float) -> None:
        """Start a zygote if there is none, the warm path is on and its pause is over."""
        if self._closed or self.disabled is not None or self._zygote is not None \
                or now < self._restart_at:
            return
        try:
            self._start_zygote()
        except Exception as exc:  # any failure to start is a failed zygote, never raised
            detail = str(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
            self._failed(f"could not start its zygote: {detail}", now)

    def _failed(self, reason: str, now: float) -> None:
        """A zygote that failed (see :meth:`reconcile`): wait longer before the next, and
        after ``max_failures`` in a row stop trying (one log line says so)."""
        from flwr.common.logger import log

        self._failures += 1
        if self._failures >= self._max_failures:
            self.disabled = reason
            log(logging.ERROR, "warm executor disabled: %s; messages run on Flower's "
                "executor", reason)
            return
        pause = min(60.0, self._backoff * 2 ** (self._failures - 1))
        self._restart_at = now + pause
        log(logging.WARNING, "bract warm executor: %s; next try in %g s (messages run on "
            "Flower's executor meanwhile)", reason, pause)

    def _zygote_exited(self, zygote: _Zygote, now: float) -> None:
        from flwr.common.logger import log

        if zygote.sent:
            # It may have forked them without saying so: starting them again could run
            # one message twice.
            log(logging.ERROR, "bract warm executor: the zygote exited before it answered "
                "for task(s) %s: whether their ClientApp started is unknown, so they are not "
                "started again (Flower's task expiry applies)",
                ", ".join(str(s.task_id) for s in zygote.sent.values()))
            zygote.sent.clear()
        status = zygote.proc.returncode
        if zygote.ready_at is not None:
            served = (zygote.ended_at if zygote.ended_at is not None else now) - zygote.ready_at
            if served < self._min_service:  # it crashes once it is ready: back off
                self._failed(zygote.error or f"its zygote exited (status {status}) "
                             f"{served:.1f} s after it was ready", now)
                return
            # It served: a new one at once, the count starts over.
            self._failures, self._restart_at = 0, now
            log(logging.WARNING, "bract warm executor: its zygote exited (status %s); a new "
                "one starts (messages run on Flower's executor until it is ready)", status)
        else:
            self._failed(zygote.error or f"its zygote exited (status {status}) before it "
                         "was ready", now)

    def close(self) -> None:
        """Stop the zygote (children already forked finish their own task)."""
        with self._lock:
            self._closed = True
            zygote, self._zygote = self._zygote, None
        if zygote is None:
            return
        with contextlib.suppress(OSError, ValueError):
            assert zygote.proc.stdin is not None
            zygote.proc.stdin.close()
        try:
            # A ready zygote exits at once; one still importing has forked nothing.
            zygote.proc.wait(timeout=5 if zygote.ready.is_set() else 0.1)
        except subprocess.TimeoutExpired:
            zygote.proc.kill()
            zygote.proc.wait()


def superexec_main() -> None:
    """``bract-superexec``: Flower's ``flower-superexec`` (same flags) whose executor is
    :class:`ForkingExecutor`."""
    try:
        check_flower_version()
    except RuntimeError as exc:
        print(f"bract-superexec: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    from flwr.supercore.cli.flower_superexec import flower_superexec
    from flwr.supercore.superexec import run_superexec as flower_run_superexec

    def get_executor(executor_type: Any, executor_config: Any = None, **_: Any) -> Any:
        del executor_type, executor_config
        return ForkingExecutor()

    flower_run_superexec.get_executor = get_executor
    wake = os.environ.pop(WAKE_FD_ENV, None)
    if wake is not None and wake.isdigit():
        # The task poll's only sleep (run_superexec's main loop) wakes on a new message.
        flower_run_superexec.time = rebound(time, sleep=WakeableSleep(int(wake)))
    flower_superexec()


if __name__ == "__main__":
    raise SystemExit(zygote_main())
