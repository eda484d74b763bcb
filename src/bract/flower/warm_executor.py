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
  process forked from the *zygote*, a single-threaded process that only imported
  modules and never ran an app; so each message starts from the same state a fresh
  interpreter would have after those imports (module caches empty), and whatever
  one message's process does dies with it.
* **Each message's failure stays contained.** A ClientApp that raises, exits or is
  killed ends its own process; Flower's Runtime API reports it as it does for
  ``flwr-clientapp``. If the zygote itself dies, the next message runs as Flower's
  default (a fresh ``flwr-clientapp``) while a new zygote starts.
* **The app code is the hospital's installed bract**, as with Flower's default
  executor for this app (bract is imported from the environment, not from the FAB).

The Flower internals this relies on are pinned: :data:`FLOWER_VERSIONS` (checked at
start, with a clear refusal otherwise; ``tests/flower/test_warm_executor.py`` checks
the pin against the installed Flower).
"""

from __future__ import annotations

import contextlib
import importlib
import json
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

__all__ = ["FLOWER_VERSIONS", "PRELOAD", "WAKE_FD_ENV", "ForkingExecutor", "SubprocessFallback",
           "WakeableSleep", "check_flower_version", "flower_task_args", "flower_task_command",
           "rebound", "superexec_main"]

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


def zygote_main(argv: Sequence[str] | None = None) -> int:
    """The warm parent: import :data:`PRELOAD` (or ``--preload``), then for each JSON
    request line on stdin fork one child that runs ``--target`` with it. Single-
    threaded by construction (it starts no thread), so forking it is safe. It exits
    when stdin closes (its executor is gone)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bract.flower.warm_executor")
    parser.add_argument("--preload", default=",".join(PRELOAD))
    parser.add_argument("--target", default=RUN_CLIENTAPP)
    args = parser.parse_args(argv)
    for module in filter(None, args.preload.split(",")):
        importlib.import_module(module)
    if args.target == RUN_CLIENTAPP:
        # Every child pulls its message from the SuperNode: retry soon if it is not all
        # there yet (bract.flower.object_pulls).
        from bract.flower.object_pulls import shorten_object_pull_backoff

        shorten_object_pull_backoff()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the executor decides when it stops
    print("ready", flush=True)
    for line in sys.stdin:
        try:
            request = json.loads(line)
        except ValueError:
            continue
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                sys.stdin.close()
                os.dup2(2, 1)  # the child's output goes to the log, not the protocol pipe
                os.closerange(3, 256)
                code = _child(request, args.target)
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        print(f"forked {pid}", flush=True)
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


class ForkingExecutor:
    """Flower's ``Executor`` protocol: ClientApp tasks run in a child forked from a warm
    zygote; any other task type, or a ClientApp task while no zygote is ready, runs
    as Flower's :class:`SubprocessExecutor` would run it.

    Guarantee: a launch never waits for a zygote; every launched task gets exactly one
    process; that process shares no state with another task's (see the module text)."""

    def __init__(self, preload: Sequence[str] = PRELOAD, target: str = RUN_CLIENTAPP,
                 ready_timeout: float = 120.0, *, fallback: Any = None) -> None:
        #: What runs a task the zygote does not (``launch(spec)``, Flower's protocol).
        self._fallback = fallback if fallback is not None else SubprocessFallback()
        self._preload = ",".join(preload)
        self._target = target
        self._ready_timeout = ready_timeout
        self._lock = threading.Lock()
        self._zygote: subprocess.Popen[str] | None = None
        self._ready = threading.Event()
        #: How many ClientApp processes the zygotes forked (for logs and tests).
        self.forked = 0
        self._start_zygote()

    def _start_zygote(self) -> None:
        self._ready.clear()
        self._zygote = subprocess.Popen(
            [sys.executable, "-m", "bract.flower.warm_executor", "--preload", self._preload,
             "--target", self._target],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )
        threading.Thread(target=self._read_zygote, args=(self._zygote,), daemon=True).start()

    def _read_zygote(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == "ready":
                self._ready.set()
            elif line.startswith("forked "):
                self.forked += 1

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Whether the zygote finished its imports within ``timeout`` seconds."""
        return self._ready.wait(self._ready_timeout if timeout is None else timeout)

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
        request = {
            "runtime_api_address": spec.runtime_api_address, "token": spec.token,
            "insecure": spec.insecure, "root_certificates_path": spec.root_certificates_path,
            "parent_pid": spec.parent_pid,
            "runtime_dependency_install": spec.runtime_dependency_install,
        }
        with self._lock:
            zygote = self._zygote
            if zygote is None or zygote.poll() is not None or not self._ready.is_set():
                return self._launch_fallback(spec)
            try:
                assert zygote.stdin is not None
                zygote.stdin.write(json.dumps(request) + "\n")
                zygote.stdin.flush()
            except (OSError, ValueError):
                return self._launch_fallback(spec)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Between task polls: start a new zygote if the last one died."""
        with self._lock:
            if self._zygote is not None and self._zygote.poll() is not None:
                self._start_zygote()

    def close(self) -> None:
        """Stop the zygote (children already forked finish their own task)."""
        with self._lock:
            zygote, self._zygote = self._zygote, None
        if zygote is None:
            return
        with contextlib.suppress(OSError, ValueError):
            assert zygote.stdin is not None
            zygote.stdin.close()
        try:
            zygote.wait(timeout=5)
        except subprocess.TimeoutExpired:
            zygote.kill()


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
