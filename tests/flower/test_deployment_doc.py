"""docs/deployment.md's "exact commands" of a local federation are the commands
``LocalFederation`` runs: the doc's shell block, run by bash with each program replaced
by a recorder, gives the same argument lists and environment as the federation's own
start, registration, submission and polls (without starting a process)."""

from __future__ import annotations

import shlex
import subprocess
import sys
import types
from pathlib import Path

from bract.flower import deploy
from bract.flower.certificates import NodeKeyFiles, TlsFiles
from bract.flower.hospital_policy import HospitalPolicy
from bract.flower.operator import _read_public, hospital_init, roster_add, supernode_command

ROOT = Path(__file__).resolve().parents[2]
SEP = "\x1f"


def _doc_block() -> str:
    text = (ROOT / "docs" / "deployment.md").read_text(encoding="utf-8")
    start = text.index('   cd "$WORKDIR"\n')
    lines = text[start:text.index("   ```", start)].splitlines()
    return "\n".join(line[3:] if line.startswith("   ") else line for line in lines)


def _run_doc(variables: dict[str, str], env_keys: list[str]) -> tuple[list[list[str]], dict]:
    stubs = "".join(f"{name}() {{ printf '%s{SEP}' {name} \"$@\"; printf '\\n'; }}\n"
                    for name in ("flower-superlink", "flwr", "bract-supernode"))
    script = ("".join(f"{k}={v!r}\n" for k, v in variables.items()) + "cd() { :; }\n" + stubs
              + _doc_block() + "\n"
              + "".join(f"printf '%s\\n' \"ENV {k}=${k}\"\n" for k in env_keys))
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin"}).stdout.splitlines()
    commands = [line.rstrip(SEP).split(SEP) for line in out if not line.startswith("ENV ")]
    env = dict(line[4:].split("=", 1) for line in out if line.startswith("ENV "))
    return commands, env


def test_the_documented_local_commands_are_the_ones_local_federation_runs(
        tmp_path, monkeypatch) -> None:
    workdir, app_dir, out = tmp_path / "work", tmp_path / "app", tmp_path / "out"
    ports = iter([41000, 41001, 41002, 41003])
    monkeypatch.setattr(deploy, "free_port", lambda: next(ports))
    monkeypatch.setattr(deploy, "generate_dev_certificates", lambda d: TlsFiles(
        d / "ca.crt", d / "server.pem", d / "server.key"))
    monkeypatch.setattr(deploy, "generate_supernode_key", lambda d, name: NodeKeyFiles(
        name, d / name, d / f"{name}.pub"))
    fed = deploy.LocalFederation(workdir, num_nodes=3, app_dir=app_dir)
    spawned: list[list[str]] = []
    called: list[list[str]] = []

    def spawn(name, argv):
        spawned.append([Path(argv[0]).name, *argv[1:]])
        return types.SimpleNamespace(alive=lambda: True)

    def flwr(*args, timeout=60.0):
        called.append(["flwr", *args])
        return subprocess.CompletedProcess(args, 0, '{"run-id": 5, "runs": [], "nodes": []}',
                                           "")

    monkeypatch.setattr(fed, "_spawn", spawn)
    monkeypatch.setattr(fed, "_wait", lambda *a, **k: None)
    monkeypatch.setattr(fed, "flwr", flwr)
    fed.start()
    fed.nodes_status()
    assert fed.submit({"clients": 3, "rounds": 2, "dataset": "breast-cancer",
                       "target-epsilon": 4.0, "out": str(out)}) == 5
    fed.run_status(5)
    fed.run_log(5)
    ours = [spawned[0], called[0], spawned[1], *called[3:]]  # hospital 0 of 3
    env = fed.env()
    keys = ["FLWR_HOME", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION",
            "FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK",
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "PYTHONUNBUFFERED", "NO_COLOR",
            "OMP_NUM_THREADS", "BRACT_LOCAL_FEDERATION"]
    documented, doc_env = _run_doc(
        {"WORKDIR": str(fed.workdir), "VENV": str(Path(sys.executable).parent.parent),
         "MARKER": fed.marker, "LINK_PORT": "41003", "NODE0_PORT": "41000",
         "APP_DIR": str(fed.app_dir), "OUT": str(out), "RUN_ID": "5"}, [*keys, "PATH"])
    for doc_cmd, our_cmd in zip(documented, ours, strict=True):
        assert doc_cmd == our_cmd
    assert {k: doc_env[k] for k in keys} == {k: env[k] for k in keys}
    assert doc_env["PATH"].split(":")[0] == env["PATH"].split(":")[0]


def test_the_documented_hospital_supernode_is_what_hospital_start_runs(tmp_path) -> None:
    """The configured hospital's SuperNode command in "Each hospital (SuperNode host)"
    is what ``bract hospital start --dry-run`` prints for the folder ``hospital init``
    made (here under a temporary root standing for ``/``)."""
    root = tmp_path / "root"
    dirs = [root / "etc" / "bract" / f"hospital-{n}" for n in "abc"]
    for i, d in enumerate(dirs):
        hospital_init(d, i + 1, d.name, "federation-2026", HospitalPolicy())
    roster_add(dirs[0] / "roster.json", [_read_public(d / "public.json") for d in dirs])
    argv = supernode_command(
        dirs[0], "superlink.federation.example.org:9443", Path("/etc/bract/tls/ca.crt"),
        extra_node_config='name="hospital-a" dataset-id="hospital-a-chest-xray" '
                          'data-path="/srv/imaging/pneumoniamnist.npz"')
    text = (ROOT / "docs" / "deployment.md").read_text(encoding="utf-8")
    section = text[text.index("### Each hospital (SuperNode host)"):]
    start = section.index("```bash\nbract-supernode ")
    block = section[start + len("```bash\n"):section.index("```", start + 8)]
    documented = shlex.split(block.replace("\\\n", " "))
    assert documented == [a.replace(str(root), "") for a in argv]
