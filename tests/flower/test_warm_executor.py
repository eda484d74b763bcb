"""The deployment speed-ups keep Flower's semantics: the warm executor forks a fresh
child per message (no state between messages, failures contained), the SuperNode's
idle pull and the server's reply poll are short but not busy, the accountant's recent
results travel in the Context, and the Flower internals these rely on are pinned."""

from __future__ import annotations

import inspect
import itertools
import json
import math
import sys
import time
import types
from pathlib import Path

import pytest
import tomllib
from hypothesis import given, settings
from hypothesis import strategies as st

from bract.flower import exchange, supernode, warm_executor

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------ the Flower pin
def test_the_installed_flower_is_the_pinned_one_and_reads_as_expected() -> None:
    """If a Flower upgrade changes what bract rebinds or calls, this fails first."""
    version = warm_executor.check_flower_version()
    requirement = [d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())
                   ["project"]["dependencies"] if d.startswith("flwr")]
    assert requirement == ["flwr[simulation]>=1.42,<1.43"]
    assert version.startswith(warm_executor.FLOWER_VERSIONS)
    import flwr.supernode.start_client_internal as internal
    from flwr.supercore.superexec import run_superexec
    from flwr.supercore.superexec.executor.types import Executor
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    source = inspect.getsource(internal)
    assert f"time.sleep({supernode.FLOWER_IDLE_SLEEP})" in source
    assert source.count(f"time.sleep({supernode.FLOWER_LOCAL_WAIT})") == 2
    assert f'command = ["{supernode.FLOWER_SUPEREXEC}"]' in source
    assert "executor = get_executor(" in inspect.getsource(run_superexec.run_superexec)
    # The pull and push the SuperNode patch wraps, and the task poll's only sleep.
    assert "run_id = _pull_and_store_message(" in source and "_push_messages(" in source
    assert inspect.getsource(run_superexec).count("time.sleep(") == 1
    assert "time.sleep(task_poll_interval)" in inspect.getsource(run_superexec.run_superexec)
    assert callable(run_superexec.get_executor)
    protocol = {n for n in vars(Executor) if not n.startswith("_")}
    assert protocol <= {n for n in dir(warm_executor.ForkingExecutor) if not n.startswith("_")}
    assert set(inspect.signature(run_clientapp).parameters) == {
        "runtime_api_address", "token", "insecure", "certificates", "parent_pid",
        "runtime_dependency_install"}


def test_an_unpinned_flower_is_refused_with_the_fallback(monkeypatch) -> None:
    import flwr.supercore.version as flower_version

    monkeypatch.setattr(flower_version, "package_version", "1.43.0")
    with pytest.raises(RuntimeError, match=r"Flower 1\.43\.0 is installed: run Flower's own "
                                           r"flower-supernode --isolation subprocess"):
        warm_executor.check_flower_version()


# ------------------------------------------------------------------ the warm executor
TARGET = '''
import json, os, sys
TOUCHED = False

def run(runtime_api_address, token, insecure, certificates, parent_pid,
        runtime_dependency_install):
    global TOUCHED
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    key = X25519PrivateKey.generate().public_key().public_bytes_raw().hex()
    out = {"pid": os.getpid(), "ppid": os.getppid(), "touched_before": TOUCHED,
           "preloaded": "fractions" in sys.modules, "address": runtime_api_address,
           "key": key, "urandom": os.urandom(16).hex(), "token_seen": token}
    if "torch" in sys.modules:  # preloaded by the zygote: draw from the global RNGs
        out["np_rand"] = float(sys.modules["numpy"].random.rand())
        out["torch_rand"] = float(sys.modules["torch"].rand(1))
    TOUCHED = True
    with open(os.path.join(os.environ["WARM_TEST_DIR"], token + ".json"), "w") as f:
        json.dump(out, f)
    if token.startswith("crash"):
        raise RuntimeError("this message's ClientApp failed")
    if token.startswith("exit"):
        sys.exit(3)
'''


def _spec(token: str):
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor.types import ExecutionSpec

    return ExecutionSpec(task_type=TaskType.CLIENT_APP, runtime_api_address="127.0.0.1:1",
                         token=token, insecure=True, root_certificates_path=None,
                         runtime_dependency_install=False, parent_pid=None,
                         suppress_output=True, task_id=1)


def _wait_for(path: Path, seconds: float = 60.0) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size:
            return json.loads(path.read_text())
        time.sleep(0.02)
    raise AssertionError(f"{path} was never written")


def test_each_message_runs_in_a_fresh_child_of_the_warm_parent(tmp_path, monkeypatch) -> None:
    """Every ClientApp task gets its own process forked from the zygote: it sees the
    zygote's imports, never what an earlier message's process did, and draws its own
    randomness (keys differ although the zygote's OpenSSL was used before the fork, and
    so do numpy's and torch's global draws, whose state the zygote holds); a message
    that raises or exits ends only its own process; a dead zygote is replaced."""
    (tmp_path / "warm_target.py").write_text(TARGET)
    # The zygote's OpenSSL, numpy and torch have already drawn randomness before it
    # forks (the worst case): each child must still get its own keys and draws.
    (tmp_path / "warm_prelude.py").write_text(
        "from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey\n"
        "import numpy, torch\n"
        "X25519PrivateKey.generate(); numpy.random.rand(); torch.rand(1)\n")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{ROOT / 'src'}")
    monkeypatch.setenv("WARM_TEST_DIR", str(tmp_path))
    # min_service=0: the zygote killed below has served, so it is replaced at once.
    executor = warm_executor.ForkingExecutor(preload=("fractions", "warm_prelude", "warm_target"),
                                             target="warm_target:run", min_service=0.0)
    try:
        assert executor.wait_ready(120)
        assert executor._zygote is not None
        zygote = executor._zygote.proc
        seen = []
        for token in ("first", "crash-1", "exit-1", "second"):
            assert executor.launch(_spec(token)).status == "accepted"
            seen.append(_wait_for(tmp_path / f"{token}.json"))
        assert len({s["pid"] for s in seen}) == 4
        assert all(s["ppid"] == zygote.pid for s in seen)
        assert not any(s["touched_before"] for s in seen)  # no state between messages
        assert all(s["preloaded"] for s in seen)
        assert len({s["key"] for s in seen}) == len({s["urandom"] for s in seen}) == 4
        assert len({s["np_rand"] for s in seen}) == len({s["torch_rand"] for s in seen}) == 4
        deadline = time.monotonic() + 30
        while executor.forked < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert executor.forked == 4
        assert zygote.poll() is None  # failures stayed in their own processes
        zygote.kill()
        zygote.wait()
        executor.reconcile()
        assert executor._zygote.proc is not zygote and executor.wait_ready(120)
        assert executor.launch(_spec("after-restart")).status == "accepted"
        assert _wait_for(tmp_path / "after-restart.json")["ppid"] == executor._zygote.proc.pid
    finally:
        executor.close()
    assert zygote.poll() is not None


def _any_spec(task_type, **fields):
    from flwr.supercore.superexec.executor.types import ExecutionSpec

    base = {"runtime_api_address": "127.0.0.1:9094", "token": "tok", "insecure": False,
            "root_certificates_path": None, "runtime_dependency_install": False,
            "parent_pid": None, "suppress_output": True, "task_id": 7}
    return ExecutionSpec(task_type=task_type, **{**base, **fields})


def test_the_fallback_starts_this_interpreter_s_flower_whatever_path_holds(
        tmp_path, monkeypatch) -> None:
    """A SuperNode started by its full path (no venv on PATH: systemd, ``/opt/venv/bin/
    bract hospital start``) still starts ``flwr-clientapp`` when its zygote is not ready:
    the one beside this interpreter, else its entry point through this interpreter;
    with Flower's own arguments for every task type."""
    import subprocess

    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

    beside = Path(sys.executable).parent / "flwr-clientapp"
    assert warm_executor.flower_task_command(TaskType.CLIENT_APP) == [str(beside)]
    by_entry_point = warm_executor.flower_task_command(TaskType.CLIENT_APP,
                                                       scripts_dir=tmp_path)
    assert by_entry_point[:2] == [sys.executable, "-c"]
    no_venv = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    for command in ([str(beside)], by_entry_point):
        usage = subprocess.run([*command, "--help"], env=no_venv, capture_output=True,
                               text=True, timeout=120)
        assert usage.returncode == 0, usage.stderr
        assert usage.stdout.startswith("usage: flwr-clientapp ")
    # Flower's SubprocessExecutor's arguments, with the command resolved.
    started: list[list[str]] = []
    monkeypatch.setattr(subprocess, "Popen", lambda args, *a, **k: started.append(args))
    ours = warm_executor.SubprocessFallback()
    variants = [{}, {"insecure": True}, {"root_certificates_path": "/ca.crt"},
                {"parent_pid": 42, "runtime_dependency_install": True}]
    for task_type in TASK_TYPE_TO_COMMAND:
        for fields in variants:
            spec = _any_spec(task_type, **fields)
            assert SubprocessExecutor().launch(spec).status == "accepted"
            assert ours.launch(spec).status == "accepted"
            flower, bract = started[-2:]
            assert bract == warm_executor.flower_task_args(
                spec, [str(Path(sys.executable).parent / flower[0])])
            assert bract[1:] == flower[1:]


class _BrokenFallback:
    def launch(self, spec):
        raise FileNotFoundError(2, "No such file or directory", "flwr-clientapp")


def test_a_launch_never_raises_it_reports_a_failed_launch(tmp_path, monkeypatch) -> None:
    """Flower 1.42's SuperExec loop catches nothing an executor raises: a launch that
    cannot start its task returns ``LaunchResult.failed`` with the reason instead."""
    from flwr.supercore.constant import TaskType

    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{ROOT / 'src'}")
    (tmp_path / "slow_preload.py").write_text("import time\ntime.sleep(60)\n")
    executor = warm_executor.ForkingExecutor(preload=("slow_preload",), target="json:dumps",
                                             fallback=_BrokenFallback())
    try:
        for spec in (_spec("not-ready-yet"), _any_spec(TaskType.SERVER_APP),
                     types.SimpleNamespace(task_id=3)):
            result = executor.launch(spec)
            assert result.status == "failed"
            assert "FileNotFoundError" in result.message or "AttributeError" in result.message
    finally:
        executor.close()


SCAN_TARGET = '''
import hashlib, json, os, re

def run(runtime_api_address, token, insecure, certificates, parent_pid,
        runtime_dependency_install):
    open_fds = []
    for fd in range(3, 4096):  # before this child opens anything itself
        try:
            os.fstat(fd)
            open_fds.append(fd)
        except OSError:
            pass
    stdin = os.readlink("/proc/self/fd/0")
    from_stdin = os.read(0, 4096).decode()
    pattern = re.compile(rb"secret-[0-9a-f]{32}")
    seen = set()
    with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", 0) as mem:
        for line in maps.read().splitlines():
            span, perms = line.split()[:2]
            if "r" not in perms or line.endswith(("[vvar]", "[vsyscall]", "[vvar_vclock]")):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                seen.update(m.decode() for m in pattern.findall(mem.read(end - start)))
            except (OSError, ValueError, OverflowError):
                pass
    # Named by a hash: a file named by the token would put the token in the directory
    # listings later children's imports read.
    name = hashlib.sha256(token.encode()).hexdigest() + ".json"
    with open(os.path.join(os.environ["SCAN_OUT"], name), "w") as f:
        json.dump({"open_fds": open_fds, "stdin": stdin, "from_stdin": from_stdin,
                   "tokens_in_memory": sorted(seen)}, f)
'''


def test_a_child_holds_only_its_own_token_and_none_of_the_zygote_s_descriptors(
        tmp_path, monkeypatch) -> None:
    """A child's fd 0 is /dev/null (not the zygote's request pipe, where the next
    messages' tokens arrive), it holds no descriptor above 2 (the zygote had one at
    1000), and its whole memory holds its own token and no other message's: neither
    of a request sent right behind it nor of one the zygote handled before."""
    import hashlib
    import secrets

    (tmp_path / "scan_target.py").write_text(SCAN_TARGET)
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "fd_prelude.py").write_text(
        "import os\nos.dup2(os.open(os.devnull, os.O_RDONLY), 1000)\n")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{ROOT / 'src'}")
    monkeypatch.setenv("SCAN_OUT", str(out))
    executor = warm_executor.ForkingExecutor(preload=("json", "re", "fd_prelude"),
                                             target="scan_target:run")
    tokens = [f"secret-{secrets.token_hex(16)}" for _ in range(3)]
    files = [out / (hashlib.sha256(t.encode()).hexdigest() + ".json") for t in tokens]
    try:
        assert executor.wait_ready(120)
        # Two messages back to back, then one after both have run.
        assert executor.launch(_spec(tokens[0])).status == "accepted"
        assert executor.launch(_spec(tokens[1])).status == "accepted"
        seen = [_wait_for(f) for f in files[:2]]
        assert executor.launch(_spec(tokens[2])).status == "accepted"
        seen.append(_wait_for(files[2]))
    finally:
        executor.close()
    for token, child in zip(tokens, seen, strict=True):
        assert child["open_fds"] == []
        assert child["stdin"] == "/dev/null" and child["from_stdin"] == ""
        assert child["tokens_in_memory"] == [token]


class _RecordingFallback:
    def __init__(self) -> None:
        self.specs: list = []

    def launch(self, spec):
        from flwr.supercore.superexec.executor.types import LaunchResult

        self.specs.append(spec)
        return LaunchResult.accepted()


def test_a_fork_that_fails_leaves_the_zygote_serving_and_runs_its_task_on_the_fallback(
        tmp_path, monkeypatch) -> None:
    """``os.fork`` failing (EAGAIN, ENOMEM) for one message neither kills the zygote nor
    loses the messages after it: that one message starts on Flower's executor at the
    next reconcile, the others are forked."""
    (tmp_path / "warm_target.py").write_text(TARGET)
    (tmp_path / "fork_fails_once.py").write_text(
        "import errno, os\n_fork, calls = os.fork, [0]\n"
        "def fork():\n    calls[0] += 1\n"
        "    if calls[0] == 2:\n"
        "        raise OSError(errno.EAGAIN, 'Resource temporarily unavailable')\n"
        "    return _fork()\nos.fork = fork\n")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{ROOT / 'src'}")
    monkeypatch.setenv("WARM_TEST_DIR", str(tmp_path))
    fallback = _RecordingFallback()
    executor = warm_executor.ForkingExecutor(preload=("warm_target", "fork_fails_once"),
                                             target="warm_target:run", fallback=fallback)
    try:
        assert executor.wait_ready(120)
        for token in ("c", "d", "e"):
            assert executor.launch(_spec(token)).status == "accepted"
        assert {_wait_for(tmp_path / f"{t}.json")["token_seen"] for t in ("c", "e")} \
            == {"c", "e"}
        deadline = time.monotonic() + 30
        while not fallback.specs and time.monotonic() < deadline:
            executor.reconcile()
            time.sleep(0.02)
        assert [s.token for s in fallback.specs] == ["d"]
        assert not (tmp_path / "d.json").exists()
        assert executor._zygote is not None and executor._zygote.proc.poll() is None
        assert executor.forked == 2
    finally:
        executor.close()


def test_a_zygote_that_cannot_start_is_retried_with_growing_pauses_then_given_up(
        tmp_path, monkeypatch, caplog) -> None:
    """A preload that fails to import (a broken optional dependency) does not restart
    the zygote at every task poll: the pauses between tries double, and after
    ``max_failures`` tries one line says the warm path is off and why; from then on no
    zygote starts and every message runs on Flower's executor."""
    import logging

    (tmp_path / "broken_preload.py").write_text(
        "raise ImportError('libcuda.so.1: cannot open shared object file')\n")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{ROOT / 'src'}")
    starts: list[float] = []
    real_start = warm_executor.ForkingExecutor._start_zygote

    def counting_start(self) -> None:
        starts.append(time.monotonic())
        real_start(self)

    monkeypatch.setattr(warm_executor.ForkingExecutor, "_start_zygote", counting_start)
    fallback = _RecordingFallback()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        executor = warm_executor.ForkingExecutor(
            preload=("json", "broken_preload"), target="json:dumps", fallback=fallback,
            max_failures=3, backoff=0.2)
        try:
            deadline = time.monotonic() + 60
            while executor.disabled is None and time.monotonic() < deadline:
                executor.reconcile()  # as Flower's task loop does between polls
                time.sleep(0.02)
            for _ in range(20):  # disabled: no further zygote, however often it is asked
                executor.reconcile()
                time.sleep(0.02)
            assert executor.launch(_spec("after")).status == "accepted"
        finally:
            executor.close()
    reason = ("importing broken_preload failed: ImportError: libcuda.so.1: cannot open "
              "shared object file")
    assert executor.disabled == reason
    assert len(starts) == 3
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4
    off = [r.getMessage() for r in caplog.records if "disabled" in r.getMessage()]
    assert off == [f"warm executor disabled: {reason}; messages run on Flower's executor"]
    assert [s.token for s in fallback.specs] == ["after"]



class _NoThread(warm_executor.threading.Thread):
    def start(self) -> None:
        raise RuntimeError("can't start new thread")


@pytest.mark.parametrize("cause", ["a preload Popen refuses", "no thread for its reader"])
def test_a_zygote_that_cannot_be_started_for_any_reason_is_a_failure_never_an_exception(
        monkeypatch, caplog, cause) -> None:
    """Not only an OSError: whatever starting a zygote raises (``ValueError`` from
    ``subprocess`` for a preload with a NUL byte, ``RuntimeError`` when no thread can
    be started for its reader) counts as a failed zygote, with the same pauses and the
    same end, and never reaches Flower's SuperExec loop; a zygote process that was
    started without its reader is killed, not left behind."""
    import logging
    import subprocess

    procs: list[subprocess.Popen] = []

    def popen(*args, **kwargs):
        procs.append(subprocess.Popen(*args, **kwargs))
        return procs[-1]

    monkeypatch.setattr(warm_executor, "subprocess", warm_executor.rebound(subprocess,
                                                                           Popen=popen))
    preload: tuple[str, ...] = ("json",)
    if cause == "a preload Popen refuses":
        preload, why = ("json\x00os",), "ValueError: embedded null byte"
    else:
        monkeypatch.setattr(warm_executor, "threading", warm_executor.rebound(
            warm_executor.threading, Thread=_NoThread))
        why = "RuntimeError: can't start new thread"
    fallback = _RecordingFallback()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        executor = warm_executor.ForkingExecutor(preload=preload, target="json:dumps",
                                                 fallback=fallback, max_failures=2,
                                                 backoff=0.05)
        try:
            deadline = time.monotonic() + 30
            while executor.disabled is None and time.monotonic() < deadline:
                executor.reconcile()
                time.sleep(0.01)
            assert executor.launch(_spec("after")).status == "accepted"
        finally:
            executor.close()
    assert executor.disabled == f"could not start its zygote: {why}"
    assert [s.token for s in fallback.specs] == ["after"]
    assert all(proc.poll() is not None for proc in procs)
    off = [r.getMessage() for r in caplog.records if "disabled" in r.getMessage()]
    assert off == [f"warm executor disabled: {executor.disabled}; messages run on Flower's "
                   "executor"]


DIES_WHEN_READY = """
import os, signal
signal.setitimer(signal.ITIMER_REAL, float(os.environ["ZYGOTE_LIFETIME"]))  # SIGALRM kills it
"""


def test_a_zygote_that_dies_soon_after_it_is_ready_backs_off_then_is_given_up(
        tmp_path, monkeypatch) -> None:
    """A zygote that becomes ready and then crashes, every time, is not restarted at
    every task poll: one that served less than ``min_service`` seconds is a failure
    (pauses that double, then the warm path is off), as one that never became ready."""
    (tmp_path / "dies_when_ready.py").write_text(DIES_WHEN_READY)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{ROOT / 'src'}")
    monkeypatch.setenv("ZYGOTE_LIFETIME", "0.2")
    starts: list[float] = []
    zygotes: list = []
    real_start = warm_executor.ForkingExecutor._start_zygote

    def counting_start(self) -> None:
        starts.append(time.monotonic())
        real_start(self)
        zygotes.append(self._zygote)

    monkeypatch.setattr(warm_executor.ForkingExecutor, "_start_zygote", counting_start)
    executor = warm_executor.ForkingExecutor(
        preload=("json", "dies_when_ready"), target="json:dumps",
        fallback=_RecordingFallback(), max_failures=3, backoff=0.2)
    try:
        deadline = time.monotonic() + 60
        while executor.disabled is None and time.monotonic() < deadline:
            executor.reconcile()
            time.sleep(0.02)
        for _ in range(20):
            executor.reconcile()
            time.sleep(0.02)
    finally:
        executor.close()
    assert len(starts) == 3
    assert all(z.ready_at is not None for z in zygotes)  # each of them had become ready
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4
    assert executor.disabled is not None
    assert executor.disabled.startswith("its zygote exited (status -14) ")
    assert executor.disabled.endswith(" s after it was ready")


def test_a_zygote_that_served_is_replaced_at_once_and_its_failures_forgotten(
        tmp_path, monkeypatch) -> None:
    """A zygote that exits after serving ``min_service`` seconds or more is replaced at
    the next reconcile, with no pause, and the failure count starts over."""
    (tmp_path / "dies_when_ready.py").write_text(DIES_WHEN_READY)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{ROOT / 'src'}")
    monkeypatch.setenv("ZYGOTE_LIFETIME", "1.5")
    executor = warm_executor.ForkingExecutor(
        preload=("json", "dies_when_ready"), target="json:dumps",
        fallback=_RecordingFallback(), max_failures=2, backoff=30.0, min_service=0.3)
    try:
        first = executor._zygote
        assert first is not None and executor.wait_ready(120)
        executor._failures = 1  # as if a zygote before it had failed
        first.proc.wait(timeout=60)
        executor.reconcile()
        assert executor.disabled is None and executor._failures == 0
        assert executor._zygote is not None and executor._zygote is not first
    finally:
        executor.close()

# ------------------------------------------------------------------ the SuperNode's polls
def test_the_supernode_patch_shortens_only_the_idle_sleep_and_swaps_the_superexec(
        monkeypatch) -> None:
    slept: list[float] = []
    started: list[list[str]] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    import subprocess

    monkeypatch.setattr(subprocess, "Popen", lambda args, *a, **k: started.append(args))
    module = types.SimpleNamespace(time=time, subprocess=subprocess)
    supernode.patch_supernode(module, 0.2, "warm")
    module.time.sleep(3)
    module.time.sleep(0.5)
    module.time.sleep(1.25)
    assert slept == [0.2, supernode.LOCAL_WAIT, 1.25]
    assert module.time.monotonic is time.monotonic
    module.subprocess.Popen(["flower-superexec", "--runtime-api-address", "a:1"])
    module.subprocess.Popen(["something-else"])
    assert started[0][-2:] == ["--runtime-api-address", "a:1"]
    assert started[0][0] == sys.executable and "superexec_main" in started[0][2]
    assert started[1] == ["something-else"]
    flower = types.SimpleNamespace(time=time, subprocess=subprocess)
    supernode.patch_supernode(flower, 1.0, "flower")
    assert flower.subprocess is subprocess  # Flower's own executor is left alone
    for bad in (0.0, -1.0, 3.5, math.nan):
        with pytest.raises(ValueError, match="--pull-interval"):
            supernode.patch_supernode(types.SimpleNamespace(), bad, "warm")


@settings(max_examples=300, deadline=None)
@given(st.floats(0, 1e4, allow_nan=False), st.floats(0.001, 3.0))
def test_an_idle_pull_is_never_busy_and_never_later_than_the_interval(
        since: float, interval: float) -> None:
    pause = supernode.idle_pause(since, interval)
    assert min(supernode.MIN_PULL_PAUSE, interval) <= pause <= interval
    assert supernode.idle_pause(since + 0.5, interval) >= pause  # thins out, never back
    if since >= 2 * interval:
        assert pause == interval


def test_a_message_makes_the_next_pulls_fast_and_wakes_the_superexec(monkeypatch) -> None:
    import os
    import subprocess

    now = [100.0]
    slept: list[float] = []
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    monkeypatch.setattr(time, "sleep", slept.append)
    started: list[dict] = []

    def fake_popen(args, *a, **k):
        started.append(k)
        return types.SimpleNamespace(args=args)

    monkeypatch.setattr(subprocess, "Popen", fake_popen)
    real_pipe, kept = os.pipe, []

    def pipe():  # keep a read end of our own: the patch closes the one it passes on
        read, write = real_pipe()
        kept.append(read)
        return os.dup(read), write

    monkeypatch.setattr(os, "pipe", pipe)
    pulls = iter([None, 7, None, None])
    module = types.SimpleNamespace(
        time=time, subprocess=subprocess,
        _pull_and_store_message=lambda **k: next(pulls),
        _push_messages=lambda **k: None)
    supernode.patch_supernode(module, 0.2, "warm")
    module.subprocess.Popen(["flower-superexec", "--runtime-api-address", "a:1"])
    fd = int(started[0]["env"][warm_executor.WAKE_FD_ENV])
    assert started[0]["pass_fds"] == (fd,)
    os.set_blocking(kept[0], False)
    assert module._pull_and_store_message() is None
    with pytest.raises(BlockingIOError):  # no message, no wake-up
        os.read(kept[0], 16)
    module.time.sleep(3)  # idle, nothing handled yet: the full interval
    assert module._pull_and_store_message() == 7  # a message: the SuperExec is woken
    assert os.read(kept[0], 16) == b"\0"
    module._push_messages()
    module.time.sleep(3)  # just after a message: the shortest pause
    now[0] += 0.1
    module.time.sleep(3)
    now[0] += 10.0
    module.time.sleep(3)
    assert slept == pytest.approx([0.2, supernode.MIN_PULL_PAUSE, 0.05, 0.2])
    os.close(kept[0])


def test_the_superexec_sleeps_until_woken_and_never_spins_once_its_supernode_is_gone(
        monkeypatch) -> None:
    import os
    import select

    read, write = os.pipe()
    sleeper = warm_executor.WakeableSleep(read)
    waits: list[float] = []
    real_select = select.select

    def recording_select(r, w, x, timeout):
        waits.append(timeout)
        return real_select(r, w, x, 0)  # look, do not wait: the test stays instant

    monkeypatch.setattr(select, "select", recording_select)
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    sleeper(0.2)  # nothing written: the whole pause is spent waiting on the pipe
    os.write(write, b"\0\0\0")  # three messages stored: one wake-up drains them all
    sleeper(0.2)
    sleeper(0.2)
    assert waits == [0.2, 0.2, 0.2] and slept == []
    with pytest.raises(BlockingIOError):
        os.read(read, 16)  # drained
    os.close(write)  # the SuperNode exited: end of file, a plain sleep from now on
    sleeper(0.2)
    sleeper(0.2)
    assert sleeper.fd is None and slept == [0.2, 0.2]


def test_object_pulls_retry_soon_and_give_up_on_flower_s_time_limit() -> None:
    from flwr.supercore import constant
    from flwr.supercore.inflatable import inflatable_utils as utils
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    from bract.flower import object_pulls

    # Flower's constants (the pinned release) are what bract shortens.
    assert (constant.PULL_INITIAL_BACKOFF, constant.PULL_BACKOFF_CAP) \
        == object_pulls.FLOWER_BACKOFF
    object_pulls.shorten_object_pull_backoff()
    object_pulls.shorten_object_pull_backoff()  # idempotent
    for fn in (utils.pull_objects, utils.pull_and_inflate_object_from_tree):
        params = inspect.signature(fn).parameters
        assert params["initial_backoff"].default == object_pulls.INITIAL_BACKOFF
        assert params["backoff_cap"].default == object_pulls.BACKOFF_CAP
        assert params["max_tries_per_object"].default is None
        assert params["max_time"].default == constant.PULL_MAX_TIME
    tries = {"a": 0, "b": 0}

    def pull(object_id: str) -> bytes:
        tries[object_id] += 1
        if tries[object_id] < 4:  # not uploaded yet, three times over
            raise ObjectUnavailableError(object_id)
        return object_id.encode()

    assert utils.pull_objects(["a", "b"], pull) == {"a": b"a", "b": b"b"}
    assert tries == {"a": 4, "b": 4}


class PushPullGrid:
    """Replies to message i become pullable after ``ready[i]`` pulls (never if None)."""

    def __init__(self, ready: list[int | None]) -> None:
        self.ready, self.pulls, self.pushed = ready, 0, []

    def push_messages(self, messages):
        self.pushed = list(messages)
        return [f"m{i}" for i in range(len(self.pushed))]

    def pull_messages(self, ids):
        self.pulls += 1
        return [types.SimpleNamespace(metadata=types.SimpleNamespace(reply_to_message_id=i))
                for i in sorted(ids) if (r := self.ready[int(i[1:])]) is not None
                and self.pulls >= r]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=5))
def test_the_reply_wait_returns_every_reply_once(ready) -> None:
    grid = PushPullGrid(list(ready))
    replies = exchange.send_and_receive(grid, range(len(ready)), None, max_poll=0.001)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == \
        [f"m{i}" for i in range(len(ready))]
    assert grid.pulls == max(ready)  # stops at the last reply, no extra pull


def test_the_reply_wait_gives_up_at_the_timeout_with_what_arrived() -> None:
    grid = PushPullGrid([1, None])
    replies = exchange.send_and_receive(grid, range(2), 0.05, max_poll=0.01)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]


def test_the_reply_wait_polls_soon_then_backs_off_to_the_maximum(monkeypatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(exchange.time, "sleep", slept.append)
    exchange.send_and_receive(PushPullGrid([12]), range(1), None, max_poll=0.1)
    assert slept[0] == exchange.FIRST_POLL
    assert all(b >= a for a, b in itertools.pairwise(slept))
    assert max(slept) == 0.1 and len(slept) == 11  # no busy loop: never below 10 ms


# ------------------------------------------------------------------ epsilon in the Context
def test_the_accountants_results_travel_in_the_context(tmp_path, monkeypatch) -> None:
    """After a train message the hospital's Context holds its recent epsilons; a new
    process (empty caches) given that Context answers the same question without the
    accountant, and only for exactly the history it was computed for."""
    from flwr.app import Context, RecordDict

    from bract.flower.app import client_app, server_app
    from bract.flower.records import STATE_EPSILONS
    from bract.privacy import accounting

    from .conftest import FakeGrid

    rc = {"dataset": "breast-cancer", "clients": 2, "rounds": 1, "target-epsilon": 2.0,
          "out": str(tmp_path), "secagg": False}
    grid = FakeGrid(dict.fromkeys((11, 22), client_app), run_config=rc)
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                             run_config=rc))
    report = json.loads((tmp_path / "report.json").read_text())
    eps = report["rounds"][0]["per_client"]["hospital-0"]["epsilon"]
    ctx = grid.contexts[11]
    carried = dict(ctx.state.config_records[STATE_EPSILONS])
    assert any(math.isclose(v, eps, rel_tol=1e-9) for v in carried.values())

    monkeypatch.setattr(accounting, "_CARRIED", {})
    accounting._composed_epsilon.cache_clear()
    events = [accounting.DpSgdEvent(1.1, 0.05, 40, 1.0, 1e-5)]
    fresh = accounting.epsilon_of(events, 1e-5)
    carried = accounting.carried_epsilons()
    monkeypatch.setattr(accounting, "_CARRIED", {})
    accounting._composed_epsilon.cache_clear()

    def no_accountant(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(accounting, "_composed_epsilon", no_accountant)
    accounting.carry_epsilons(carried)
    assert accounting.epsilon_of(events, 1e-5) == fresh
    with pytest.raises(AssertionError, match="recomputed"):
        accounting.epsilon_of(events, 2e-5)  # another delta is another question


def test_the_zygote_starts_no_python_thread_before_it_forks() -> None:
    """Forking copies only the forking thread: a Python thread alive in the zygote could
    hold a lock (logging, imports) that the child then never sees released. The zygote
    starts none. Native libraries it imports do start threads (numpy's and scipy's
    OpenBLAS pools, one thread fewer than the CPUs each); OpenBLAS stops its pools
    before a fork (its at-fork handler), so a child starts with its one thread, and so
    does the zygote after its first fork (it never runs BLAS work again)."""
    import subprocess

    code = ("import importlib, os, threading\n"
            "from bract.flower.warm_executor import PRELOAD\n"
            "[importlib.import_module(m) for m in PRELOAD]\n"
            "python = (threading.active_count(), [t.name for t in threading.enumerate()])\n"
            "tasks = lambda: len(os.listdir('/proc/self/task'))\n"
            "read, write = os.pipe()\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    os.write(write, str(tasks()).encode())\n"
            "    os._exit(0)\n"
            "os.waitpid(pid, 0)\n"
            "print(python, int(os.read(read, 16)), tasks())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300).stdout.strip()
    assert out == "(1, ['MainThread']) 1 1"


def test_a_child_imports_nothing_on_its_way_to_its_first_request(tmp_path) -> None:
    """What Flower's ``run_clientapp`` does before its first request (read the root
    certificate, build its HTTP client over TLS, read the app bundle's names) imports no
    module the zygote has not already imported: a child spends nothing on imports
    (httpx's transport alone took 15-40 ms per message)."""
    import subprocess

    from bract.flower.certificates import generate_dev_certificates

    tls = generate_dev_certificates(tmp_path / "certs")
    code = (
        "import importlib, sys; from bract.flower.warm_executor import PRELOAD\n"
        "[importlib.import_module(m) for m in PRELOAD]\n"
        "from flwr.supernode.runtime import run_clientapp as rc\n"
        "import io, zipfile; bundle = io.BytesIO()\n"
        "with zipfile.ZipFile(bundle, 'w') as z: z.writestr('pyproject.toml', 'x')\n"
        "before = set(sys.modules)\n"
        "from flwr.supercore.tls import validate_and_resolve_root_certificates\n"
        f"ca = validate_and_resolve_root_certificates({str(tls.ca_cert)!r}, False)\n"
        "client = rc.RuntimeHttpClient.from_server_address(server_address='127.0.0.1:1', "
        "insecure=False, root_certificates=ca, interceptors=[], "
        "retry_invoker=rc.make_simple_http_retry_invoker())\n"
        "assert zipfile.ZipFile(bundle).namelist() == ['pyproject.toml']\n"
        "print(sorted(set(sys.modules) - before))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300).stdout.strip()
    assert out == "[]"
