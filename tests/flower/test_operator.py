"""Operator tooling: ``bract hospital init`` and ``bract roster add|verify``, and that
the files they make are exactly what a hospital's SuperNode and the coordinator use."""

from __future__ import annotations

import hashlib
import json
import stat

import pytest
from flwr.app import Context, RecordDict

from bract.cli import main
from bract.flower.app import client_app, identity_from_node_config, server_app
from bract.flower.client import privacy_dir
from bract.flower.hospital_policy import HospitalPolicy
from bract.flower.operator import hospital_init, key_fingerprint, roster_add, roster_verify
from bract.flower.secagg_client import read_identity_key
from bract.records.roster import read_roster
from bract.secagg.crypto import SigningKey

from .conftest import FakeGrid

FED = "operator-federation"


def _init_three(tmp_path, **policy):
    for i in range(3):
        assert main(["hospital", "init", str(tmp_path / f"h{i}"), "--id", str(i + 1),
                     "--name", f"hospital-{i}", "--federation", FED, *policy.get("argv", [])]) \
            == 0
    return [tmp_path / f"h{i}" for i in range(3)]


def test_hospital_init_makes_an_owner_only_identity_and_refuses_to_replace_it(tmp_path,
                                                                             capsys) -> None:
    (d,) = _init_three(tmp_path)[:1]
    out = capsys.readouterr().out
    assert "policy=" in out and "state-dir=" in out and "identity.key" in out
    assert stat.S_IMODE((d / "identity.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((d / "state").stat().st_mode) == 0o700
    public = json.loads((d / "public.json").read_text())
    key = SigningKey.from_bytes(read_identity_key(d / "identity.key"))
    assert bytes.fromhex(public["public_key"]) == key.public_bytes()
    assert key.to_bytes().hex() not in out  # the private key is never printed
    assert HospitalPolicy.read(d / "policy.json") == HospitalPolicy()
    # One step makes both keys: the SuperNode's Flower authentication key pair too,
    # owner-only, its public half in the public file the coordinator receives.
    assert stat.S_IMODE((d / "supernode-auth").stat().st_mode) == 0o600
    assert public["supernode_auth_public_key"] == (d / "supernode-auth.pub").read_text().strip()
    assert public["supernode_auth_public_key"].startswith("ecdsa-sha2-nistp384 ")
    assert (d / "supernode-auth").read_text() not in out
    assert main(["hospital", "init", str(d), "--id", "1", "--name", "x", "--federation",
                 FED]) == 2
    assert "keeps its identity" in capsys.readouterr().out
    assert SigningKey.from_bytes(read_identity_key(d / "identity.key")).public_bytes() == \
        key.public_bytes()


def test_roster_built_from_public_files_verifies_and_refuses_conflicts(tmp_path,
                                                                      capsys) -> None:
    dirs = _init_three(tmp_path)
    roster = tmp_path / "roster.json"
    assert main(["roster", "add", str(roster), *(str(d / "public.json") for d in dirs)]) == 0
    out = capsys.readouterr().out
    for d in dirs:  # the coordinator gets each SuperNode key ready to register
        name = json.loads((d / "public.json").read_text())["name"]
        pub = tmp_path / "supernode-auth" / f"{name}.pub"
        assert pub.read_text() == (d / "supernode-auth.pub").read_text().strip() + "\n"
        assert f"flwr supernode register {pub}" in out
    doc = read_roster(roster)
    assert doc.federation_id == FED and sorted(doc.keys) == [1, 2, 3]
    assert main(["roster", "verify", str(roster), "--public",
                 *(str(d / "public.json") for d in dirs)]) == 0
    out = capsys.readouterr().out
    assert "sound" in out
    # each member's fingerprint is printed, the one its own public file gives
    for d in dirs:
        pub = _public(d)
        assert f"member {pub['id']} {pub['name']!r}: key fingerprint " \
               f"{key_fingerprint(pub['public_key'])}" in out
    assert f"roster file SHA-256 {hashlib.sha256(roster.read_bytes()).hexdigest()}" in out
    with pytest.raises(ValueError, match="already"):
        roster_add(roster, [_public(dirs[0])])
    other = tmp_path / "other"
    hospital_init(other, 9, "hospital-9", "another-federation", HospitalPolicy())
    assert main(["roster", "add", str(roster), str(other / "public.json")]) == 2
    assert "another-federation" in capsys.readouterr().out
    # a hospital whose key in the roster was swapped is reported
    data = json.loads(roster.read_text())
    data["members"][0]["public_key"] = SigningKey.generate().public_bytes().hex()
    roster.write_text(json.dumps(data))
    assert main(["roster", "verify", str(roster), "--public", str(dirs[0] / "public.json")]) == 1
    assert "not listed with its public key" in capsys.readouterr().out
    assert roster_verify(read_roster(roster)) == []
    small = tmp_path / "small.json"
    roster_add(small, [_public(dirs[0])])
    assert any("at least 3" in p for p in roster_verify(read_roster(small)))


def _public(d):
    p = json.loads((d / "public.json").read_text())
    return {**p, "public_key": bytes.fromhex(p["public_key"])}


def test_the_files_run_a_secure_round_of_the_deployed_app(tmp_path) -> None:
    """Each hospital's node config names only files `hospital init` made; the roster
    comes from `roster add`; the module-level apps run a secure DP round with them."""
    dirs = _init_three(tmp_path, argv=["--target-epsilon", "3"])
    roster = tmp_path / "roster.json"
    roster_add(roster, [_public(d) for d in dirs])
    node_configs = []
    for i, d in enumerate(dirs):
        (d / "roster.json").write_text(roster.read_text())  # each keeps its own copy
        node_configs.append({"partition-id": i, "num-partitions": 3, "secagg-id": i + 1,
                             "identity-key": str(d / "identity.key"),
                             "roster": str(d / "roster.json"),
                             "policy": str(d / "policy.json"), "state-dir": str(d / "state")})
    node_configs[0]["dataset-id"] = "wisconsin-breast-2026"  # its operator names its data
    assert identity_from_node_config(node_configs[0]).node == 1
    rc = {"dataset": "breast-cancer", "clients": 3, "rounds": 1, "target-epsilon": 2.0,
          "out": str(tmp_path / "out"), "roster": str(roster),
          "secagg-colluders": 1}  # a run-config key, so `flwr run --run-config` can set it
    grid = FakeGrid(dict.fromkeys((11, 22, 33), client_app), run_config=rc)
    for ctx, extra in zip(grid.contexts.values(), node_configs, strict=True):
        ctx.node_config.update(extra)
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                             run_config=rc))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    (row,) = report["rounds"]
    assert row["secagg"]["aborted"] is None and len(row["trained"]) == 3
    assert row["secagg"]["colluders"] == 1  # the run config's bound, not the default 0
    # Each hospital's ledger lives in its own state directory, under the dataset it
    # protects: the name its operator gave, else the data's source.
    for d, dataset in zip(dirs, ["wisconsin-breast-2026", "breast-cancer", "breast-cancer"],
                          strict=True):
        assert (privacy_dir(d / "state", dataset) / "ledger.jsonl").read_text().strip()
        assert [p.name for p in (d / "state" / "datasets").iterdir()] == [
            privacy_dir(d / "state", dataset).name]


def test_hospital_start_serves_exactly_what_init_made(tmp_path, capsys) -> None:
    import shlex

    dirs = _init_three(tmp_path)
    roster = tmp_path / "roster.json"
    argv = ["hospital", "start", str(dirs[0]), "--superlink", "link.example:9092",
            "--root-certificates", str(tmp_path / "ca.crt"),
            "--node-config", 'data-path="/data/a" dataset-id="site-a-xray"', "--dry-run"]
    assert main(argv) == 2  # no roster copy yet
    assert "roster.json is missing" in " ".join(capsys.readouterr().out.split())
    roster_add(roster, [_public(d) for d in dirs[1:]])
    (dirs[0] / "roster.json").write_text(roster.read_text())
    assert main(argv) == 2  # a roster that does not list this hospital is refused
    assert "not listed with its public key" in capsys.readouterr().out
    roster.unlink()
    roster_add(roster, [_public(d) for d in dirs])
    (dirs[0] / "roster.json").write_text(roster.read_text())
    capsys.readouterr()
    assert main(argv) == 0
    cmd = shlex.split(capsys.readouterr().out.strip().splitlines()[-1])
    assert cmd[:5] == ["bract-supernode", "--executor", "warm", "--pull-interval", "0.2"]
    assert cmd[cmd.index("--superlink") + 1] == \
        "link.example:9092"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    # The SuperNode key `hospital init` made in the same step, unless told otherwise.
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(
        dirs[0].resolve() / "supernode-auth")
    node_config = dict(kv.split("=", 1) for kv in shlex.split(cmd[cmd.index("--node-config")
                                                                   + 1]))
    d = dirs[0].resolve()
    assert node_config == {"secagg-id": "1", "identity-key": str(d / "identity.key"),
                           "roster": str(d / "roster.json"), "policy": str(d / "policy.json"),
                           "state-dir": str(d / "state"), "data-path": "/data/a",
                           "dataset-id": "site-a-xray"}
    assert identity_from_node_config(node_config).node == 1
    # Its own data without the name its budget is kept under is refused before it starts.
    for data in ('data-path="/data/a"', 'loader="site:load" dataset-id=" "'):
        argv[argv.index("--node-config") + 1] = data
        assert main(argv) == 2
        assert "names the hospital's own data but no dataset-id" in capsys.readouterr().out


def test_hospital_start_refuses_an_identity_key_its_public_file_does_not_name(
        tmp_path, capsys) -> None:
    """``hospital start`` loads the identity key and checks its public half against
    ``public.json``: an empty, cut or foreign key is refused in one line (the SuperNode
    would otherwise start and fail every secure round), and ``hospital init`` says how
    to recover from a damaged key instead of only that it exists."""
    hospital, argv = _started_hospital(tmp_path)
    dirs = [hospital]
    capsys.readouterr()
    assert main(argv) == 0
    capsys.readouterr()
    key = dirs[0].resolve() / "identity.key"
    good = key.read_bytes()
    foreign = (SigningKey.generate().to_bytes().hex() + "\n").encode()
    for content, reason in ((b"", f"{key} holds no valid identity key (empty)"),
                            (good[:20] + b"\n", f"{key} holds no valid identity key (10 "
                                                f"bytes, not 32)"),
                            (b"zz", f"{key} holds no valid identity key (not hex)"),
                            (foreign, f"{key} is not the key {key.parent / 'public.json'} "
                                      "names: the identity and its public file must come "
                                      "from the same init")):
        key.write_bytes(content)
        assert main(argv) == 2
        assert capsys.readouterr().out == f"error: {reason}\n"
    key.write_bytes(b"")
    assert main(["hospital", "init", str(dirs[0]), "--id", "1", "--name", "hospital-0",
                 "--federation", FED]) == 2
    assert capsys.readouterr().out == (
        f"error: {dirs[0] / 'identity.key'} holds no valid identity key (empty): if this "
        "hospital never ran with it, delete it and run init again; if it did, restore it "
        "from a backup (its signed ledger depends on it)\n")
    key.write_bytes(good)
    assert main(argv) == 0


@pytest.mark.parametrize("key", ["identity-key", "name", "data-path", "loader", "policy",
                                 "dataset-id"])
def test_a_configured_hospital_without_its_own_state_dir_refuses_to_train(tmp_path,
                                                                          key) -> None:
    """A hospital its operator configured (its node config names any key only an
    operator sets: an identity, a name, its own data or loader, a policy, a dataset id)
    keeps its budget on its own disk: without state-dir its ledger would live under the
    coordinator's output (the run config's `out`) and a run into another `out` would
    start it empty, so it refuses, saying why. A simulated hospital (partition only)
    keeps its state under the run's output."""
    from bract import tasks
    from bract.flower.app import hospital_setup
    from bract.flower.hospital_policy import OPERATOR_KEYS

    assert key in OPERATOR_KEYS
    (d,) = _init_three(tmp_path)[:1]
    value = {"identity-key": str(d / "identity.key"), "name": "st-mary",
             "data-path": str(tmp_path / "own.npz"), "loader": "mymodule:load",
             "policy": str(d / "policy.json"), "dataset-id": "st-mary-2026"}[key]
    ctx = Context(run_id=1, node_id=5, state=RecordDict(), run_config={}, node_config={
        "partition-id": 0, "num-partitions": 3, key: value})
    with pytest.raises(ValueError, match=f"names {key} but no state-dir"):
        hospital_setup(tasks.TaskConfig(dataset="breast-cancer"), ctx, tmp_path / "coordinator")
    simulated = Context(run_id=1, node_id=5, state=RecordDict(), run_config={},
                        node_config={"partition-id": 0, "num-partitions": 3})
    setup = hospital_setup(tasks.TaskConfig(dataset="breast-cancer"), simulated,
                           tmp_path / "coordinator")
    assert setup.state_dir == tmp_path / "coordinator" / "hospital-0"


def test_a_configured_hospital_reads_no_data_file_the_coordinator_names(tmp_path) -> None:
    """The coordinator cannot point a hospital at a file of its choosing (a copy of the
    same patients under another path would spend from a fresh budget): a configured
    hospital reads only what its own node config names."""
    from bract import tasks
    from bract.flower.app import hospital_setup

    (d,) = _init_three(tmp_path)[:1]
    path = tmp_path / "copy-of-pneumoniamnist.npz"
    path.write_bytes(b"")
    ctx = Context(run_id=1, node_id=5, state=RecordDict(), run_config={}, node_config={
        "partition-id": 0, "num-partitions": 3, "identity-key": str(d / "identity.key"),
        "state-dir": str(d / "state")})
    task = tasks.TaskConfig(dataset="medmnist", data_path=str(path))
    with pytest.raises(ValueError, match="reads only data its operator names"):
        hospital_setup(task, ctx)



def test_a_configured_hospital_that_names_no_data_is_refused_in_one_line(tmp_path) -> None:
    """A configured hospital with neither data-path nor loader trains on its partition of
    the bundled dataset, so its node config needs partition-id: without one it is refused
    with one line naming the three settings (no KeyError), and that line is all its error
    reply carries (nothing of its own, such as its state-dir)."""
    from flwr.app import ConfigRecord, Message

    from bract import tasks
    from bract.flower.app import hospital_setup
    from bract.flower.client import PrivacyPolicy, make_client_app
    from bract.flower.records import ROUND_CONFIG

    state = tmp_path / "St_Mary" / "state"
    plain = tmp_path / "St_Mary" / "policy.json"  # its update may leave in plain FedAvg
    plain.parent.mkdir()
    HospitalPolicy(allow_plain_aggregation=True).write(plain)
    task = tasks.TaskConfig(dataset="breast-cancer")
    reason = ("this SuperNode's node config names no data to train on: set data-path (the "
              "hospital's own file) or loader (its own Python loader), or partition-id (its "
              "partition of the run's bundled dataset)")
    ctx = Context(run_id=1, node_id=5, state=RecordDict(), run_config={},
                  node_config={"name": "st-mary", "state-dir": str(state),
                               "policy": str(plain)})
    with pytest.raises(ValueError) as refused:
        hospital_setup(task, ctx)
    assert str(refused.value) == reason
    app = make_client_app(lambda c: hospital_setup(task, c),
                          PrivacyPolicy(target_epsilon=4.0, delta=1e-5, rounds=1))
    content = RecordDict()
    content.config_records[ROUND_CONFIG] = ConfigRecord({"round": 1})
    reply = app(Message(content, dst_node_id=5, message_type="train"), ctx)
    assert reply.has_error() and reply.error.reason == reason
    for bad in ("first", -1, 1.5):
        ctx.node_config["partition-id"] = bad
        with pytest.raises(ValueError, match="partition-id must be a whole number"):
            hospital_setup(task, ctx)
    ctx.node_config["partition-id"] = 1
    assert hospital_setup(task, ctx).client_id == "st-mary"

def test_a_configured_hospital_never_takes_keys_the_coordinator_wrote(tmp_path) -> None:
    """In Flower's simulation engine a hospital (partition-id only) takes the identity
    its ServerApp wrote under the run's output. A SuperNode its operator configured
    (any operator-only key: here a name, a policy and a state-dir, but no identity-key)
    never does, even when such files exist at the coordinator's `out`, and takes part
    in plain FedAvg only if its own policy allows it."""
    from bract.flower import app
    from bract.flower.simulated_operators import simulated_identities

    out = tmp_path / "out"
    simulated_identities(out, 3)
    policy = tmp_path / "policy.json"
    HospitalPolicy().write(policy)
    rc = {"out": str(out), "clients": 3}
    simulated = Context(run_id=1, node_id=5, state=RecordDict(), run_config=rc,
                        node_config={"partition-id": 0, "num-partitions": 3})
    assert app._simulated_identity(simulated) is not None
    assert app._plain_allowed(simulated)
    configured = Context(run_id=1, node_id=5, state=RecordDict(), run_config=rc,
                         node_config={"partition-id": 0, "num-partitions": 3, "name": "x",
                                      "policy": str(policy), "state-dir": str(tmp_path)})
    assert app._simulated_identity(configured) is None
    assert app._signer_from_context(configured) is None
    with pytest.raises(ValueError, match="secure aggregation needs node config"):
        app._identity_from_context(configured)
    assert not app._plain_allowed(configured)
    HospitalPolicy(allow_plain_aggregation=True).write(policy)
    assert app._plain_allowed(configured)


def test_hospital_init_prints_the_dataset_id_its_budget_is_kept_under(tmp_path,
                                                                      capsys) -> None:
    """The node config `hospital init` prints names the patients' dataset (``--dataset-id``,
    default the hospital's name): the key its lifetime budget is kept under, which stays
    the same when the data moves; a blank id is refused."""
    from flwr.common.config import parse_config_args

    assert main(["hospital", "init", str(tmp_path / "a"), "--id", "1", "--name", "st-mary",
                 "--federation", FED]) == 0
    line = capsys.readouterr().out.splitlines()[2]
    assert parse_config_args([line.strip()])["dataset-id"] == "st-mary"
    assert main(["hospital", "init", str(tmp_path / "b"), "--id", "2", "--name", "st-anne",
                 "--federation", FED, "--dataset-id", "st-anne chest x-ray"]) == 0
    out = capsys.readouterr().out
    assert parse_config_args([out.splitlines()[2].strip()])["dataset-id"] == \
        "st-anne chest x-ray"
    assert "keep it when the data moves or is re-exported" in " ".join(out.split())
    for bad in (" ", 'a"b'):
        with pytest.raises(SystemExit):
            main(["hospital", "init", str(tmp_path / "c"), "--id", "3", "--name", "x",
                  "--federation", FED, "--dataset-id", bad])
    assert not (tmp_path / "c").exists()


def test_a_node_config_with_only_a_state_dir_is_a_configured_hospital(tmp_path) -> None:
    """A state directory is the operator's: a node config naming ``state-dir`` and a
    partition (no other operator key) is a configured hospital, so it never reads a
    data file the coordinator names (whose path would key its budget), never takes
    the coordinator's keys and joins plain FedAvg only by its policy. Flower's
    simulation engine names no state-dir: its hospitals keep theirs under the run."""
    from bract import tasks
    from bract.flower import app
    from bract.flower.app import hospital_setup
    from bract.flower.hospital_policy import OPERATOR_KEYS, operator_keys_in
    from bract.flower.simulated_operators import simulated_identities

    assert "state-dir" in OPERATOR_KEYS
    nc = {"partition-id": 0, "num-partitions": 3, "state-dir": str(tmp_path / "state")}
    assert operator_keys_in(nc) == ["state-dir"]
    path = tmp_path / "copy-of-pneumoniamnist.npz"
    path.write_bytes(b"")
    ctx = Context(run_id=1, node_id=5, state=RecordDict(), run_config={}, node_config=nc)
    with pytest.raises(ValueError, match=r"names state-dir\) reads only data its operator "
                                         r"names: node config data-path or loader, with the "
                                         r"dataset-id"):
        hospital_setup(tasks.TaskConfig(dataset="medmnist", data_path=str(path)), ctx)
    out = tmp_path / "out"
    simulated_identities(out, 3)
    rc = {"out": str(out), "clients": 3}
    ctx = Context(run_id=1, node_id=5, state=RecordDict(), run_config=rc, node_config=nc)
    assert app._simulated_identity(ctx) is None and not app._plain_allowed(ctx)
    # On the run's bundled data it trains its partition, its budget in its own state-dir.
    setup = hospital_setup(tasks.TaskConfig(dataset="breast-cancer"), ctx, out / "hospitals")
    assert setup.state_dir == tmp_path / "state" and setup.dataset_id == "breast-cancer"


def _tree(root) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a directory)."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes())
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--delta", "5"], "delta must be a number in (0, 1), got 5"),
        (["--target-epsilon", "0.01"], "--target-epsilon must lie in [0.05, 50]"),
        (["--target-epsilon", "51"], "--target-epsilon must lie in [0.05, 50]"),
        (["--name", ""], "hospital name '' is not a plain file name"),
        (["--name", "bad name"], "hospital name 'bad name' is not a plain file name"),
        (["--name", "../x"], "is not a plain file name"),
        (["--dir", "afile/sub"], "afile is not a directory"),
        (["--dir", "afile"], "afile is not a directory"),
    ],
)
def test_hospital_init_refuses_bad_input_in_one_line_and_writes_nothing(
    argv, needle, tmp_path, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    opts = {"--name": "h5", "--dir": "h5"}
    rest = []
    for flag, value in zip(argv[::2], argv[1::2], strict=True):
        if flag in opts:
            opts[flag] = value
        else:
            rest += [flag, value]
    before = _tree(tmp_path)
    code = main(["hospital", "init", opts["--dir"], "--id", "5", "--name", opts["--name"],
                 "--federation", FED, *rest])
    out = capsys.readouterr().out
    assert code == 2
    assert out.startswith("error: ") and out.count("\n") == 1 and needle in out, out
    assert _tree(tmp_path) == before


def test_roster_add_refuses_bad_paths_and_names_and_writes_nothing(tmp_path, capsys,
                                                                   monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    _init_three(tmp_path)
    capsys.readouterr()
    # A public file whose name is not a plain file name (made by hand or by an older init).
    bad = json.loads((tmp_path / "h2" / "public.json").read_text())
    bad["name"] = ""
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    (tmp_path / "adir").mkdir()
    cases = [
        (["rr/roster.json", "h0/public.json"], "rr is not an existing directory"),
        (["adir", "h0/public.json"], "adir is a directory"),
        (["r6.json", "h0/public.json", "bad.json"], "hospital name '' is not a plain file"),
    ]
    for argv, needle in cases:
        before = _tree(tmp_path)
        assert main(["roster", "add", *argv]) == 2
        out = capsys.readouterr().out
        assert out.startswith("error: ") and out.count("\n") == 1 and needle in out, out
        assert _tree(tmp_path) == before
    # The same files, well named, make a roster whose members all have names.
    assert main(["roster", "add", "r6.json", "h0/public.json", "h1/public.json"]) == 0
    assert sorted(read_roster(tmp_path / "r6.json").names.values()) == [
        "hospital-0", "hospital-1"]
    assert sorted(p.name for p in (tmp_path / "supernode-auth").iterdir()) == [
        "hospital-0.pub", "hospital-1.pub"]


def _started_hospital(tmp_path):
    """Three hospitals from ``hospital init``, the first with its roster copy, and the
    ``hospital start --dry-run`` argv of the first (which succeeds as made)."""
    dirs = _init_three(tmp_path)
    roster = tmp_path / "roster.json"
    roster_add(roster, [_public(d) for d in dirs])
    (dirs[0] / "roster.json").write_text(roster.read_text())
    argv = ["hospital", "start", str(dirs[0]), "--superlink", "link.example:9092",
            "--root-certificates", str(tmp_path / "ca.crt"), "--dry-run"]
    return dirs[0], argv


#: Policy files an operator may write by mistake, and the field each error names.
_BAD_POLICIES = [
    ('{"allow_non_private": "false"}', "allow_non_private"),
    ('{"allow_non_private": 0}', "allow_non_private"),
    ('{"allow_plain_aggregation": "true"}', "allow_plain_aggregation"),
    ('{"target_epsilon": "4"}', "target_epsilon"),
    ('{"target_epsilon": true}', "target_epsilon"),
    ('{"target_epsilon": -1}', "target_epsilon"),
    ('{"target_epsilon": NaN}', "target_epsilon"),
    ('{"delta": null}', "delta"),
    ('{"delta": "1e-5"}', "delta"),
    ('{"min_noise_multiplier": "0.5"}', "min_noise_multiplier"),
    ('{"accountant": ["prv"]}', "accountant"),
    ('{"max_image_size": 512.0}', "max_image_size"),
    ('{"num_classes": 2.0}', "num_classes"),
    ('{"secagg_min_honest": 0}', "secagg_min_honest"),
    ('{"secagg_min_honest": "2"}', "secagg_min_honest"),
    ('{"secagg_colluders": "1"}', "secagg_colluders"),
    ('{"secagg_colluders": -1}', "secagg_colluders"),
    ('{"target_epsilon": 1, "target_epsilon": 40}', "target_epsilon"),
]


def test_hospital_start_refuses_every_bad_policy_in_one_line_naming_file_and_field(
        tmp_path, capsys) -> None:
    """``hospital start --dry-run`` reads the policy as the SuperNode will: a value of
    the wrong type, out of range, refused by secure aggregation's rules, or a field
    named twice is one ``error:`` line (exit 2) naming the file and the field, never a
    traceback, and never a SuperNode that fails only in its first round."""
    d, argv = _started_hospital(tmp_path)
    capsys.readouterr()
    assert main(argv) == 0
    policy = d.resolve() / "policy.json"
    for text, field in _BAD_POLICIES:
        capsys.readouterr()
        policy.write_text(text)
        assert main(argv) == 2, text
        out = capsys.readouterr().out
        assert out.startswith(f"error: hospital policy {policy}") and out.count("\n") == 1, out
        assert f" {field} " in out or f"'{field}'" in out, out
    policy.write_text("{}")
    assert main(argv) == 0


@pytest.mark.parametrize(("missing", "hint"), [
    ("identity.key", "the hospital's identity, made by bract hospital init"),
    ("roster.json", "the federation's roster, which comes from the coordinator"),
    ("policy.json", "the hospital's privacy policy, made by bract hospital init"),
    ("state", "the hospital's privacy state directory, made by bract hospital init: if "
              "this hospital ever ran, restore it from a backup"),
])
def test_hospital_start_says_what_makes_each_missing_file(tmp_path, capsys, missing,
                                                          hint) -> None:
    import shutil

    d, argv = _started_hospital(tmp_path)
    target = d.resolve() / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    capsys.readouterr()
    assert main(argv) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith(f"error: {target} is missing: {hint}"), out
    if missing != "roster.json":
        assert "roster" not in out, out


@pytest.mark.parametrize("dataset_id", ["site-a ", " site-a", "site-a\t", "site\u200ba"])
def test_a_dataset_id_with_edge_whitespace_or_an_invisible_character_is_refused(
        tmp_path, capsys, dataset_id) -> None:
    """Neither ``hospital init --dataset-id`` nor ``hospital start --node-config`` takes
    a dataset-id that would keep a budget apart from the one it reads the same as."""
    _, argv = _started_hospital(tmp_path)
    capsys.readouterr()
    argv += ["--node-config", f'loader="site:load" dataset-id="{dataset_id}"']
    assert main(argv) == 2
    out = capsys.readouterr().out
    assert out.startswith(f"error: --node-config: dataset-id {dataset_id!r} ")
    assert out.count("\n") == 1
    with pytest.raises(SystemExit) as info:
        main(["hospital", "init", str(tmp_path / "h9"), "--id", "9", "--name", "h9",
              "--federation", FED, "--dataset-id", dataset_id])
    assert info.value.code == 2
    assert f"dataset-id {dataset_id!r} " in capsys.readouterr().err
    assert not (tmp_path / "h9").exists()
