"""A hospital's SuperNode runs bract's own ClientApp, never code the coordinator's FAB
ships: ``bract-supernode`` refuses, the moment Flower pulls it and before anything of
the run is stored, a FAB that names another ClientApp or carries anything but
configuration, unless the hospital's operator allows that FAB by its SHA-256.

The SuperNode side is Flower 1.42's own ``_pull_and_store_message`` (guarded as
``bract-supernode`` guards it) against a stand-in SuperLink, on Flower's in-memory
node state: what a ClientApp process could ever get is what that state holds."""

from __future__ import annotations

import hashlib
import inspect
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.cli.build import build_fab_from_disk, build_fab_from_files
from flwr.common.config import get_fab_config, get_metadata_from_config
from flwr.common.constant import ErrorCode
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supernode.nodestate import NodeStateFactory

from bract.flower import fab_gate, supernode

ROOT = Path(__file__).resolve().parents[2]
RUN_ID = 5


def _pyproject(clientapp: str, publisher: str = "bract", name: str = "bract-app") -> str:
    return (f'[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
            f'[project]\nname = "{name}"\nversion = "1.0.0"\ndependencies = []\n\n'
            f'[tool.flwr.app]\npublisher = "{publisher}"\n\n'
            f'[tool.flwr.app.components]\nserverapp = "bract.flower.app:server_app"\n'
            f'clientapp = "{clientapp}"\n\n[tool.flwr.app.config]\nrounds = 1\n')


def _evil_fab(marker: Path, clientapp: str = "bract_evil_probe:client_app",
              module: str = "bract_evil_probe.py") -> bytes:
    """The red team's FAB: publisher bract, a ClientApp of its own that would receive the
    hospital's Context; importing it writes ``marker``."""
    code = (f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
            "from flwr.clientapp import ClientApp\nclient_app = ClientApp()\n")
    files = {"pyproject.toml": _pyproject(clientapp).encode(), module: code.encode()}
    return build_fab_from_files(files)[0]


def _zip(files: dict[str, str]) -> bytes:
    """A FAB as any zip tool writes it (``flwr build`` leaves out .so and .pth files;
    a coordinator need not use it)."""
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bract_fab() -> bytes:
    """The FAB ``flwr run`` builds from bract's own app directory."""
    return build_fab_from_disk(ROOT)


class _Node:
    """Flower's SuperNode state, fed by a stand-in SuperLink that holds one run with
    ``fab`` and one train message for it."""

    def __init__(self, fab: bytes, guard: Callable[[Any], None] | None,
                 node_config: dict[str, Any] | None = None) -> None:
        import flwr.supernode.start_client_internal as internal
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id = RUN_ID
        TaskIdentity.node_id = 0
        TaskIdentity.task_id = 1
        self.fab = fab
        self.hash = hashlib.sha256(fab).hexdigest()
        self.fab_id, self.fab_version = get_metadata_from_config(get_fab_config(fab))
        stores = ObjectStoreFactory()
        self.state = NodeStateFactory(objectstore_factory=stores).state()
        self.store = stores.store()
        self.state.set_node_id(7)
        self.node_config = node_config or {}
        self.module = types.SimpleNamespace(
            _pull_and_store_message=internal._pull_and_store_message,
            _insert_message=internal._insert_message)
        self.logged: list[str] = []
        if guard is not None:
            guard(self.module)

    def log(self, level: int, fmt: str, *args: Any) -> None:
        self.logged.append(fmt % args)

    def pull(self) -> int | None:
        msg = Message(RecordDict({"c": ConfigRecord({"round": 1})}), dst_node_id=7,
                      message_type="train")
        msg.metadata.__dict__["_message_id"] = msg.object_id
        objects = {k: v.deflate() for k, v in get_all_nested_objects(msg).items()}
        pending = [(msg, get_object_tree(msg))]

        def get_run(run_id: int) -> Run:
            run = Run.create_empty(run_id)
            run.fab_id, run.fab_version, run.fab_hash = self.fab_id, self.fab_version, self.hash
            return run

        return self.module._pull_and_store_message(
            state=self.state, object_store=self.store, node_config=self.node_config,
            receive=lambda: pending.pop() if pending else None, get_run=get_run,
            get_fab=lambda fab_hash, run_id: Fab(self.hash, self.fab, {}),
            pull_object=lambda run_id, object_id: objects[object_id],
            confirm_message_received=lambda run_id, message_id: None,
            trusted_entities=None)

    def stored(self) -> bool:
        """Whether the run and its FAB are in the state ClientApp processes read."""
        return self.state.get_run(RUN_ID) is not None or self.state.get_fab(self.hash) is not None

    def replies(self) -> list[Message]:
        return self.state.get_messages_legacy(is_reply=True)


def _guard(allowed: frozenset[str] = frozenset()) -> Callable[[Any], None]:
    return lambda module: fab_gate.guard_supernode(module, allowed)


def _run_the_stored_app(node: _Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What Flower's run_clientapp does with the FAB the SuperNode holds: install it and
    load the clientapp it names (run_clientapp.py, 1.42)."""
    from flwr.cli.install import install_from_fab
    from flwr.clientapp.utils import get_load_client_app_fn

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    fab = node.state.get_fab(node.hash)
    install_from_fab(fab.content, skip_prompt=True)
    load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
    try:
        load(node.fab_id, node.fab_version, fab.hash_str)
    finally:
        sys.modules.pop("bract_evil_probe", None)


def test_a_fab_with_a_clientapp_of_its_own_is_refused_and_its_code_never_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "ran"
    fab = _evil_fab(marker)
    # Without the guard, Flower keeps the FAB and the hospital would run its code.
    open_node = _Node(fab, guard=None)
    assert open_node.pull() == RUN_ID and open_node.stored()
    _run_the_stored_app(open_node, tmp_path, monkeypatch)
    assert marker.read_text() == "ran"
    marker.unlink()

    node = _Node(fab, guard=None)
    fab_gate.guard_supernode(node.module, log=node.log)
    assert node.pull() == RUN_ID  # the SuperNode carries on: it answers and pulls again
    assert not node.stored() and not marker.exists()
    (reply,) = node.replies()
    assert reply.has_error() and reply.error.code == ErrorCode.INVALID_FAB
    assert reply.error.reason == (
        "bract-supernode refused the run's FAB: its clientapp is "
        "'bract_evil_probe:client_app'; this hospital runs only "
        "bract.flower.app:client_app unless its operator allows the FAB by hash")
    (line,) = node.logged
    assert f"[RUN {RUN_ID}]" in line and node.hash in line and "--allow-fab" in line
    assert node.pull() == RUN_ID  # the run's next message: checked again, refused again
    (again,) = node.replies()  # (Flower's push takes each reply once)
    assert again.error.code == ErrorCode.INVALID_FAB
    assert not node.stored() and not marker.exists()


@pytest.mark.parametrize("member", [
    "bract_evil_probe.py", "sitecustomize.py", "evil.pth", "native.cpython-311-x86_64-linux-gnu.so",
    "bract/flower/app.py", "bract/__init__.py", "pkg/README.md", "data.json", "conf.yaml"])
def test_a_fab_naming_bracts_clientapp_but_carrying_any_other_file_is_refused(
        tmp_path: Path, member: str) -> None:
    """Even with bract's component, a file the FAB's folder would put first on sys.path
    (a module shadowing bract's, a .pth, an extension module) is refused."""
    marker = tmp_path / "ran"
    fab = _zip({"pyproject.toml": _pyproject(fab_gate.BRACT_CLIENTAPP),
                member: f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"})
    node = _Node(fab, _guard())
    assert node.pull() == RUN_ID and not node.stored()
    (reply,) = node.replies()
    assert reply.error.code == ErrorCode.INVALID_FAB
    assert f"it carries {member!r}" in reply.error.reason
    assert not marker.exists()


@pytest.mark.parametrize("component", ["os:system", "flwr.clientapp:ClientApp",
                                       "bract.flower.app:server_app",
                                       "bract.flower.client:client_app"])
def test_a_configuration_only_fab_naming_another_component_is_refused(component: str) -> None:
    node = _Node(_zip({"pyproject.toml": _pyproject(component)}), _guard())
    node.pull()
    assert not node.stored()
    assert f"its clientapp is {component!r}" in node.replies()[0].error.reason


def test_bracts_own_fab_passes_and_is_stored_as_flower_stores_it(bract_fab: bytes) -> None:
    digest = fab_gate.check_fab(bract_fab, hashes=(), fab_id="bract/bract",
                                fab_version="0.1.0")
    assert digest == hashlib.sha256(bract_fab).hexdigest()
    node = _Node(bract_fab, _guard())
    assert node.pull() == RUN_ID and node.stored() and node.replies() == []
    assert node.state.get_fab(node.hash).content == bract_fab


def test_an_operator_allowed_fab_passes_by_flag_or_node_config(tmp_path: Path) -> None:
    """A hospital's developers' own app on bract: its operator allows that FAB by hash."""
    marker = tmp_path / "ran"
    fab = _evil_fab(marker)
    digest = hashlib.sha256(fab).hexdigest()
    by_flag = _Node(fab, _guard(fab_gate.allowed_hashes([digest.upper()])))
    assert by_flag.pull() == RUN_ID and by_flag.stored() and by_flag.replies() == []
    other = hashlib.sha256(b"another app").hexdigest()
    by_config = _Node(fab, _guard(), node_config={
        fab_gate.NODE_CONFIG_KEY: f"{other}, {digest}"})
    assert by_config.pull() == RUN_ID and by_config.stored()
    as_list = _Node(fab, _guard(), node_config={fab_gate.NODE_CONFIG_KEY: [digest]})
    assert as_list.pull() == RUN_ID and as_list.stored()
    only_other = _Node(fab, _guard(frozenset({other})))
    only_other.pull()
    assert not only_other.stored()
    malformed = _Node(fab, _guard(), node_config={fab_gate.NODE_CONFIG_KEY: "not-a-hash"})
    malformed.pull()
    assert not malformed.stored()
    assert "must be a SHA-256" in malformed.replies()[0].error.reason
    assert not marker.exists()  # allowing a FAB stores it; nothing here loads it


def test_a_fab_whose_hash_or_app_id_does_not_match_its_run_is_refused(bract_fab: bytes) -> None:
    digest = hashlib.sha256(bract_fab).hexdigest()
    with pytest.raises(fab_gate.FabRefused, match="does not match the SHA-256"):
        fab_gate.check_fab(bract_fab, hashes=(digest, "0" * 64), fab_id="bract/bract",
                           fab_version="0.1.0", allowed=frozenset({digest}))
    for fab_id, version in (("other/bract", "0.1.0"), ("bract/bract", "9.9.9")):
        with pytest.raises(fab_gate.FabRefused, match="the run names app"):
            fab_gate.check_fab(bract_fab, hashes=(digest,), fab_id=fab_id,
                               fab_version=version, allowed=frozenset({digest}))
    for junk in (b"", b"not a zip", bract_fab[:100]):
        with pytest.raises(fab_gate.FabRefused, match="not a FAB with a readable"):
            fab_gate.check_fab(junk, hashes=(), fab_id="bract/bract", fab_version="0.1.0")


def test_a_fab_holding_a_file_twice_is_refused() -> None:
    """Flower reads the last copy of a member, an extraction writes each in turn: one
    name, one content."""
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("pyproject.toml", _pyproject(fab_gate.BRACT_CLIENTAPP))
        archive.writestr("README.md", "# one")
        with pytest.warns(UserWarning, match="Duplicate name"):
            archive.writestr("README.md", "# two")
    with pytest.raises(fab_gate.FabRefused, match="holds a file twice"):
        fab_gate.check_fab(buffer.getvalue(), hashes=(), fab_id="bract/bract-app",
                           fab_version="1.0.0")


def test_only_configuration_and_documentation_are_metadata() -> None:
    for name in ("pyproject.toml", ".info/CONTENT", "README.md", "LICENSE", "CHANGES.md"):
        assert fab_gate.is_metadata(name), name
    for name in ("x.py", "x.pyc", "x.so", "x.pth", "pkg/README.md", "bract/__init__.py",
                 ".md", "docs/pyproject.toml", "a\\b.md", "setup.cfg", ".info/OTHER"):
        assert not fab_gate.is_metadata(name), name


def test_allowed_hashes_are_checked_sha256s() -> None:
    digest = "ab" * 32
    assert fab_gate.allowed_hashes([digest.upper(), f" {digest} ,"]) == {digest}
    for bad in ("ab" * 31, "zz" * 32, digest + "0"):
        with pytest.raises(ValueError, match="must be a SHA-256"):
            fab_gate.allowed_hashes([bad])


def test_bract_supernode_reads_allowed_hashes_and_refuses_runtime_installs(
        capsys: pytest.CaptureFixture[str]) -> None:
    digest = "cd" * 32
    allowed, installs = supernode.flower_settings(
        ["--insecure", "--node-config", f'name="a" {fab_gate.NODE_CONFIG_KEY}="{digest}"'])
    assert allowed == {digest} and installs is False
    # Flower's own parser decides, abbreviations included.
    for flag in ("--allow-runtime-dependency-installation", "--allow-runtime-dep"):
        assert supernode.flower_settings(["--insecure", flag])[1] is True
    for argv in (["--allow-runtime-dependency-installation", "--insecure"],
                 ["--allow-fab", "nothex", "--insecure"],
                 ["--insecure", "--node-config", f'{fab_gate.NODE_CONFIG_KEY}="12"']):
        with pytest.raises(SystemExit) as stopped:
            supernode.main(argv)
        assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "--allow-runtime-dependency-installation would install packages" in err
    assert err.count("must be a SHA-256") == 2


def test_the_flower_code_the_gate_wraps_reads_as_expected() -> None:
    """If a Flower upgrade moves the FAB pull, or stores a run or FAB elsewhere, this
    fails first (with the version pin, checked at start)."""
    import flwr.supernode.start_client_internal as internal

    fab_gate.check_internals(internal)
    loop = inspect.getsource(internal.start_client_internal)
    for kwarg in ("state=state", "object_store=store", "node_config=node_config",
                  "receive=receive", "get_run=get_run", "get_fab=get_fab"):
        assert kwarg in loop
    pull = inspect.getsource(internal._pull_and_store_message)
    order = ["if (recv := receive()) is None:", "run_info = get_run(run_id)",
             "fab = get_fab(run_info.fab_hash, run_id)",
             "run_cfg = get_fused_config_from_fab(fab.content, run_info)",
             "state.store_run(run_info)", "state.store_fab(fab)", "task_id = state.create_task(",
             "state.store_message(message)"]
    at = [pull.index(line) for line in order]
    assert at == sorted(at)
    source = inspect.getsource(internal)
    # The only place a FAB, a run or a task enters the SuperNode's state.
    assert source.count("store_fab(") == 1 and source.count("store_run(") == 1
    assert source.count("create_task(") == 1 and source.count("get_fab(") == 1
    assert list(inspect.signature(internal._insert_message).parameters) == [
        "msg", "state", "store"]


def test_a_flower_without_the_wrapped_functions_is_refused() -> None:
    with pytest.raises(RuntimeError, match="has no _pull_and_store_message"):
        fab_gate.check_internals(types.SimpleNamespace(_insert_message=print))
