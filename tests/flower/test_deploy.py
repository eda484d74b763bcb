"""bract on Flower's deployment engine: real SuperLink and SuperNode processes on 127.0.0.1.

One federation (a SuperLink and two hospitals' SuperNodes, TLS, SuperNode
authentication) is started once for the module and runs two federations of the
bract app with DP on the breast-cancer data: a clean one, and one in which a
hospital's SuperNode is killed during round 2. Every process is gone afterwards.
"""

from __future__ import annotations

import math
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_ssh_private_key,
    load_ssh_public_key,
)

from bract.audit.verify import verify_federation
from bract.flower.app import dataset_source, task_from_run_config
from bract.flower.certificates import LOOPBACK, generate_dev_certificates, generate_supernode_key
from bract.flower.client import privacy_dir
from bract.flower.deploy import DeploymentError, LocalFederation, RunResult
from bract.flower.hospital_policy import HospitalPolicy
from bract.flower.processes import marked_pids
from bract.records.ledger import read_ledger

HOSPITALS = 3  # a killed hospital leaves 2 >= t = 2: secure rounds go on
ROUNDS = 2
TARGET_EPSILON = 4.0


def _run_config(out: Path, **extra: object) -> dict[str, object]:
    return {"clients": HOSPITALS, "rounds": ROUNDS, "dataset": "breast-cancer",
            "target-epsilon": TARGET_EPSILON, "out": str(out), **extra}


# --------------------------------------------------------------------------- fast unit checks
def test_dev_certificates_verify_for_loopback(tmp_path: Path) -> None:
    tls = generate_dev_certificates(tmp_path)
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == [LOOPBACK]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert tls.server_key.stat().st_mode & 0o077 == 0
    key = load_pem_private_key(tls.server_key.read_bytes(), None)
    assert key.public_key() == server.public_key()
    # A TLS client trusting only the dev CA completes a handshake with the server cert
    # and accepts it for 127.0.0.1 (hostname checking on).
    client_ctx = ssl.create_default_context(cafile=str(tls.ca_cert))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tls.server_cert, tls.server_key)
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(a, server_side=True) as s:
                s.sendall(b"ok")
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    with client_ctx.wrap_socket(b, server_hostname=LOOPBACK) as c:
        assert c.recv(2) == b"ok"
    thread.join(timeout=10)
    assert not errors


def test_supernode_keys_are_openssh_nist_ec(tmp_path: Path) -> None:
    files = generate_supernode_key(tmp_path, "hospital-0")
    private = load_ssh_private_key(files.private_key.read_bytes(), None)
    public = load_ssh_public_key(files.public_key.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(private.curve, ec.SECP384R1)
    assert private.public_key() == public
    assert files.private_key.stat().st_mode & 0o077 == 0
    with pytest.raises(ValueError):
        generate_supernode_key(tmp_path, "../escape")


# --------------------------------------------------------------------------- real processes
@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    workdir = tmp_path_factory.mktemp("deploy")
    fed = LocalFederation(workdir, HOSPITALS, startup_timeout=180.0)
    with fed:
        yield fed
    assert marked_pids(fed.marker) == [], "processes of the federation were left behind"
    assert all(not p.alive() for p in fed._processes)


@pytest.fixture(scope="module")
def clean_run(federation: LocalFederation, tmp_path_factory: pytest.TempPathFactory
              ) -> RunResult:
    out = tmp_path_factory.mktemp("clean-out")
    return federation.run(_run_config(out), timeout=480)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_federation_uses_tls_auth_and_loopback(federation: LocalFederation) -> None:
    nodes = federation.nodes_status()
    assert len(nodes) == HOSPITALS
    assert all(n["status"] == "online" for n in nodes)
    link_log = federation.superlink.log_tail(100_000) if federation.superlink else ""
    assert "SuperNode authentication is disabled" not in link_log
    assert "insecure" not in link_log.lower()
    # The SuperLink speaks TLS only, with the dev CA's certificate for 127.0.0.1.
    assert federation.tls is not None
    ctx = ssl.create_default_context(cafile=str(federation.tls.ca_cert))
    with socket.create_connection((LOOPBACK, federation.superlink_port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=LOOPBACK) as tls_sock:
            assert tls_sock.version() in ("TLSv1.2", "TLSv1.3")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_deployed_run_reports_epsilon_every_round(clean_run: RunResult) -> None:
    assert clean_run.succeeded, clean_run.log[-4000:]
    report = clean_run.report()
    assert report["final"]["rounds_completed"] == ROUNDS
    assert [r["round"] for r in report["rounds"]] == list(range(1, ROUNDS + 1))
    hospitals = {f"hospital-{i}" for i in range(HOSPITALS)}
    previous = dict.fromkeys(hospitals, 0.0)
    for row in report["rounds"]:
        assert set(row["per_client"]) == hospitals
        assert set(row["trained"]) == hospitals
        for cid, info in row["per_client"].items():
            assert info["trained"]
            assert previous[cid] < info["epsilon"] <= TARGET_EPSILON
            previous[cid] = info["epsilon"]
        assert row["epsilon"] == max(v["epsilon"] for v in row["per_client"].values())
        # Secure aggregation (on by default): every hospital in the masked sum.
        assert row["secagg"]["aborted"] is None
        assert set(row["secagg"]["alive"]) == hospitals
        assert row["secagg"]["stages"] == (5 if row["round"] == 1 else 3)  # then pipelined
    # Calibrated for the whole plan: the last round lands just under the target.
    assert all(0.98 * TARGET_EPSILON <= e <= TARGET_EPSILON for e in previous.values())
    assert not report["final"]["non_private"]
    assert report["final"]["accuracy"] > 0.8


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_deployed_run_writes_the_ledger(clean_run: RunResult) -> None:
    events = [e.event.to_plain() for e in read_ledger(clean_run.out_dir / "ledger.jsonl")]
    by_client: dict[str, list[dict]] = {}
    for e in events:
        by_client.setdefault(e["client_id"], []).append(e)
    assert set(by_client) == {f"hospital-{i}" for i in range(HOSPITALS)}
    report = clean_run.report()
    for cid, evs in by_client.items():
        assert len(evs) == ROUNDS  # one DP-SGD event per round
        last = report["rounds"][-1]["per_client"][cid]
        assert sum(int(e["steps"]) for e in evs) == last["steps"]
        assert all(float(e["noise_multiplier"]) == last["noise_multiplier"] for e in evs)
        assert all(float(e["delta"]) == report["rounds"][-1]["delta"] for e in evs)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_deployed_ledgers_are_signed_and_pass_the_audit(
    federation: LocalFederation, clean_run: RunResult
) -> None:
    """Every hospital signed its entries with the identity key its operator installed;
    the server's ledger and each hospital's own copy pass `bract audit verify`."""
    task = task_from_run_config(_run_config(clean_run.out_dir))
    copies = {  # each hospital's own copy: in its own state directory, under its data
        f"hospital-{i}": privacy_dir(federation.workdir / "secagg" / f"hospital-{i}" / "state",
                                     dataset_source(task)) / "ledger.jsonl"
        for i in range(HOSPITALS)
    }
    result = verify_federation(
        clean_run.out_dir / "ledger.jsonl", federation.roster_path,
        report_path=clean_run.out_dir / "report.json", hospital_copies=copies,
        pld_discretization=1e-3,
    )
    assert result.passed, [f.message for f in result.failures]
    assert set(result.hospitals) == set(copies)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_deployed_hospitals_refuse_a_coordinator_that_loosens_their_policy(
    federation: LocalFederation, clean_run: RunResult,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """On real SuperNodes: the coordinator's run config asks for training without
    noise, a larger epsilon and metrics in clear; every hospital's own policy file (the
    defaults `LocalFederation` writes: epsilon <= 8, never non-private, metrics stay
    home) refuses before training, the reasons reach the report, and nothing trains."""
    assert clean_run.succeeded  # runs after the clean run, before the kill test
    out = tmp_path_factory.mktemp("loosen-out")
    ask = {"noise-multiplier": 0.0, "target-epsilon": 20.0, "release-metrics": "clear",
           "secagg": False, "rounds": 1}
    result = federation.run(_run_config(out, **ask), timeout=480)
    assert result.succeeded, result.log[-4000:]
    (row,) = result.report()["rounds"]
    assert row["trained"] == []
    assert len(row["failed"]) == HOSPITALS
    for reason in row["failed"].values():
        assert "PolicyRefusal" in reason and "this hospital's policy" in reason
    assert not (out / "ledger.jsonl").exists() or not (out / "ledger.jsonl").read_text().strip()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_deployed_hospitals_refuse_a_fab_that_ships_its_own_clientapp(
    federation: LocalFederation, clean_run: RunResult,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The red team's FAB on real SuperNodes: bract's own app (publisher bract, every
    setting), its clientapp swapped for a module the FAB ships, which would receive each
    hospital's Context. Every hospital's bract-supernode refuses the FAB when it first
    pulls it: the module is never imported anywhere (its marker file is never written),
    each hospital's reply names the refusal, each SuperNode logs it and carries on (the
    kill test after this one still runs on every node)."""
    assert clean_run.succeeded  # runs after the clean run, before the kill test
    app = tmp_path_factory.mktemp("evil-app")
    marker = app / "ran"
    pyproject = (federation.app_dir / "pyproject.toml").read_text(encoding="utf-8")
    swapped = pyproject.replace('clientapp = "bract.flower.app:client_app"',
                                'clientapp = "bract_evil_app:client_app"').replace(
        'fab-include = ["/README.md"]', 'fab-include = ["/bract_evil_app.py"]')
    assert swapped.count("bract_evil_app") == 2
    (app / "pyproject.toml").write_text(swapped, encoding="utf-8")
    (app / "bract_evil_app.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from flwr.clientapp import ClientApp\nclient_app = ClientApp()\n", encoding="utf-8")
    out = tmp_path_factory.mktemp("evil-out")
    own_app = federation.app_dir
    federation.app_dir = app
    try:
        result = federation.run(_run_config(out, rounds=1, secagg=False), timeout=480)
    finally:
        federation.app_dir = own_app
    assert result.succeeded, result.log[-4000:]
    assert not marker.exists()
    (row,) = result.report()["rounds"]
    assert row["trained"] == [] and len(row["failed"]) == HOSPITALS
    for reason in row["failed"].values():
        assert reason.startswith("failed: bract-supernode refused the run's FAB: its clientapp "
                                 "is 'bract_evil_app:client_app'")
    for node in federation.nodes:
        assert node.process is not None and node.process.alive()
        assert "bract-supernode refused the run's FAB" in node.process.log_tail(200_000)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_federation_survives_a_hospital_killed_mid_round(
    federation: LocalFederation, clean_run: RunResult,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # Runs after the clean run (it needs every node alive), and leaves one node dead.
    assert clean_run.succeeded
    out = tmp_path_factory.mktemp("kill-out")
    victim = HOSPITALS - 1
    # The hospitals keep their lifetime budgets on their own disks: the clean run spent
    # about TARGET_EPSILON of this data, so this run asks for a lifetime of twice that.
    lifetime = 2 * TARGET_EPSILON
    result = federation.run(_run_config(out, **{"round-timeout": 150.0,
                                                 "target-epsilon": lifetime}), timeout=480,
                            kill_node_at_round=2, kill_partition=victim)
    assert result.killed == victim  # killed after it received its round-2 work
    node = federation.nodes[victim]
    assert node.process is not None and not node.process.alive()
    assert result.succeeded, result.log[-4000:]
    report = result.report()
    assert report["final"]["rounds_completed"] == ROUNDS
    first, second = report["rounds"]
    everyone = {f"hospital-{i}" for i in range(HOSPITALS)}
    assert set(first["trained"]) == everyone
    assert set(second["trained"]) == everyone - {f"hospital-{victim}"}
    assert second["secagg"]["aborted"] is None
    assert set(second["secagg"]["alive"]) == everyone - {f"hospital-{victim}"}
    for cid in second["trained"]:
        assert TARGET_EPSILON < second["per_client"][cid]["epsilon"] <= lifetime
    for cid in everyone:  # every hospital carried the clean run's entries into this run
        assert first["per_client"][cid]["ledger_carried"] == ROUNDS
    # The report says which hospital is missing from round 2, and why.
    assert set(second["failed"]) == {f"hospital-{victim}"}
    assert first["failed"] == {}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_deployed_hospitals_each_serve_their_own_data_and_the_coordinator_holds_none(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Real SuperNodes, each reading a different data directory named in its own node
    config; the coordinator's run config names no data (only the model), so the
    central test set does not exist: the report carries the hospitals' pooled
    held-out evaluation, released inside the secure sum by their policies."""
    workdir = tmp_path_factory.mktemp("own-data")
    files = []
    for i in range(HOSPITALS):
        data_dir = workdir / f"hospital-{i}-data"
        data_dir.mkdir()
        files.append(_medmnist_file(data_dir / "pneumoniamnist.npz", 48 + 16 * i, 60, i))
    # Metrics leave noised (noise multiplier 3: a std of 5.2 per hospital on each count),
    # so the held-out splits are large enough for the pooled figures to stand out.
    fed = LocalFederation(workdir / "fed", HOSPITALS, startup_timeout=180.0,
                          hospital_policy=HospitalPolicy(release_metrics="aggregate",
                                                         metrics_noise_multiplier=3.0),
                          hospital_data=files,
                          hospital_dataset_ids=[f"hospital-{i}-xray" for i in range(HOSPITALS)])
    out = workdir / "out"
    with fed:
        result = fed.run({"clients": HOSPITALS, "rounds": ROUNDS, "dataset": "medmnist",
                          "num-classes": 2, "in-channels": 1, "batch-size": 16,
                          "target-epsilon": TARGET_EPSILON, "release-metrics": "aggregate",
                          "metrics-noise": 3.0, "out": str(out)}, timeout=480)
    assert marked_pids(fed.marker) == []
    assert result.succeeded, result.log[-4000:]
    report = result.report()
    assert report["config"]["data-path"] == ""  # the coordinator names no data
    for row in report["rounds"]:
        assert sorted(row["trained"]) == [f"hospital-{i}" for i in range(HOSPITALS)]
        assert "accuracy" not in row
        # 180 held-out examples; the noise on the pooled count has std 3 * sqrt(3) *
        # sqrt(3) = 9: 50 is more than 5 standard deviations (cannot flake).
        assert abs(row["federated_eval"]["examples"] - 60 * HOSPITALS) <= 50
        assert row["train_loss"] is not None
    # Each hospital trained on its own file: the sample rate follows its own size
    # (Opacus samples at 1 / batches per epoch).
    entries = read_ledger(out / "ledger.jsonl")
    # Each round: the hospital's metrics release (accounted), then its DP-SGD.
    for i in range(HOSPITALS):
        mine = [e.event for e in entries if e.client_id == f"hospital-{i}"]
        assert [e.mechanism for e in mine] == ["metrics", "dp-sgd"] * ROUNDS
        assert all(e.noise_multiplier == 3.0 for e in mine[::2])
    chains = {e.client_id: e for e in entries}
    for i in range(HOSPITALS):
        n_train = (48 + 16 * i) + 4
        assert chains[f"hospital-{i}"].event.sample_rate == pytest.approx(
            1 / math.ceil(n_train / 16))
    # No data sits with the coordinator: its only arrays are the global model's.
    assert [p.name for p in out.rglob("*.npz")] == [f"global-round-{ROUNDS}.npz"]


def _medmnist_file(path: Path, n_train: int, n_test: int, seed: int) -> str:
    import numpy as np

    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in (("train", n_train), ("val", 4), ("test", n_test)):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(count) % 2).reshape(-1, 1).astype(np.uint8)
    np.savez(path, **arrays)
    return str(path)


def test_a_resumed_local_federation_keeps_its_hospitals_and_federation_id(tmp_path) -> None:
    """No process is started: resuming reuses each hospital's key and the roster's
    federation id (so their signed ledgers continue); a work dir without that federation,
    or with other hospitals, is refused by name."""
    from bract.records.roster import read_roster

    first = LocalFederation(tmp_path, 3)
    first._write_secagg_identities()
    roster = read_roster(first.roster_path)
    again = LocalFederation(tmp_path, 3, resume=True)
    again._write_secagg_identities()
    assert read_roster(again.roster_path) == roster
    fresh = LocalFederation(tmp_path, 3)
    fresh._write_secagg_identities()  # a new run of the same hospitals: new federation id
    assert read_roster(fresh.roster_path).keys == roster.keys
    assert read_roster(fresh.roster_path).federation_id != roster.federation_id
    with pytest.raises(DeploymentError, match="cannot resume: hospital-3 has no identity"):
        LocalFederation(tmp_path, 4, resume=True)._write_secagg_identities()
    with pytest.raises(DeploymentError, match="cannot resume: hospital-0 has no identity"):
        LocalFederation(tmp_path / "elsewhere", 3, resume=True)._write_secagg_identities()
    first.roster_path.unlink()
    with pytest.raises(DeploymentError, match="cannot resume: no readable roster"):
        LocalFederation(tmp_path, 3, resume=True)._write_secagg_identities()


def test_a_local_federation_names_each_hospitals_own_data_with_its_dataset_id(
        tmp_path) -> None:
    """No process is started: a hospital given its own file (``hospital_data``) also gets
    the dataset id its budget is kept under (``hospital_dataset_ids``) in its node
    config; files without one id each are refused before anything starts."""
    from flwr.common.config import parse_config_args

    files = [str(tmp_path / f"h{i}.npz") for i in range(2)]
    fed = LocalFederation(tmp_path, 2, hospital_data=files,
                          hospital_dataset_ids=["st-mary-xray", "st-anne-xray"])
    node = parse_config_args([fed.node_config(1)])
    assert (node["data-path"], node["dataset-id"]) == (files[1], "st-anne-xray")
    for ids in ((), ("st-mary-xray",), ("st-mary-xray", " "), ('a"b', "c")):
        with pytest.raises(ValueError, match="hospital_dataset_ids must name one dataset id"):
            LocalFederation(tmp_path, 2, hospital_data=files, hospital_dataset_ids=ids)
    for ids in (("st-mary-xray ", "st-anne-xray"), ("st-mary-xray", "\tst-anne-xray"),
                ("st-mary-xray", "st-anne\u200b-xray")):
        with pytest.raises(ValueError, match=r"hospital_dataset_ids: dataset-id .* (begins "
                                             r"or ends with whitespace|holds control)"):
            LocalFederation(tmp_path, 2, hospital_data=files, hospital_dataset_ids=ids)
    assert "dataset-id" not in parse_config_args([LocalFederation(tmp_path, 2).node_config(0)])
