"""A hospital's privacy state (its signed ledger and the head naming it) and the run's
records are written atomically and durably: the file is fsynced before its rename
and its directory after, and a round's state is on disk before its update leaves."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from bract.flower import client, files


def _name(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def _record_syncs(monkeypatch, events: list[tuple[str, str]]) -> None:
    """Record every fsync (``file``/``dir`` and the path) and rename, in order."""
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        events.append((f"fsync {kind}", _name(fd)))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", os.fspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)


def test_a_record_is_fsynced_renamed_then_its_directory_fsynced(tmp_path, monkeypatch) -> None:
    """The data reaches the disk before the rename makes it the record, and the rename
    reaches the disk before the write returns; directories it had to create are made
    durable in their parents first."""
    record = tmp_path / "hospital" / "state" / "privacy-state.json"
    events: list[tuple[str, str]] = []
    _record_syncs(monkeypatch, events)
    files.atomic_write_text(record, "spent round 1")
    assert record.read_text() == "spent round 1"
    # hospital/ and hospital/state/ were created: each one's entry, in its parent
    assert events[:2] == [("fsync dir", str(tmp_path)), ("fsync dir", str(tmp_path / "hospital"))]
    kinds = [kind for kind, _ in events[2:]]
    assert kinds == ["fsync file", "replace", "fsync dir"]
    assert events[2][1].startswith(str(record.parent / ".privacy-state.json."))
    assert events[3:] == [("replace", str(record)), ("fsync dir", str(record.parent))]
    assert sorted(p.name for p in record.parent.iterdir()) == ["privacy-state.json"]

    events.clear()
    files.atomic_write_text(record, "spent round 2")  # an existing directory: no mkdir syncs
    assert [kind for kind, _ in events] == ["fsync file", "replace", "fsync dir"]


@pytest.mark.parametrize("fail_at", ["fsync", "replace"])
def test_a_record_write_that_fails_midway_leaves_the_old_record_and_no_debris(
        tmp_path, monkeypatch, fail_at) -> None:
    record = tmp_path / "privacy-state.json"
    record.write_text("spent round 1")

    def crash(*args, **kwargs):
        raise OSError(5, "Input/output error (simulated crash)")

    monkeypatch.setattr(os, fail_at, crash)
    with pytest.raises(OSError, match="simulated crash"):
        files.atomic_write_text(record, "spent round 2")
    assert record.read_text() == "spent round 1"
    assert [p.name for p in tmp_path.iterdir()] == ["privacy-state.json"]


def _hospital(tmp_path: Path):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    data = TensorDataset(torch.randn(64, 4), torch.arange(64) % 2)
    return client.HospitalSetup(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_loader=DataLoader(data, batch_size=16), client_id="hospital-0",
        state_dir=tmp_path / "state", dataset_id="st-mary-2026")


def test_a_rounds_privacy_state_is_on_disk_before_its_update_leaves(tmp_path,
                                                                     monkeypatch) -> None:
    """The train handler commits the round's ledger and state (both fsynced, renamed
    and their directory fsynced) before it builds the reply that carries the update:
    a power loss once the update is out cannot take the record of its spending."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from bract.flower.records import (
        GLOBAL_WEIGHTS,
        LOCAL_WEIGHTS,
        ROUND_CONFIG,
        weights_to_record,
    )
    from bract.privacy import PrivacyLedger, weights_of

    setup = _hospital(tmp_path)
    home = setup.privacy_dir()
    assert home is not None
    policy = client.PrivacyPolicy(target_epsilon=8.0, delta=1e-5, rounds=2,
                                  noise_multiplier=1.0)
    events: list[tuple[str, str]] = []
    _record_syncs(monkeypatch, events)
    on_disk_at_reply: list[list[int]] = []
    real_report = client.privacy_report_record

    def report(*args, **kwargs):  # the first piece of the reply the handler builds
        events.append(("reply", ""))
        state = json.loads((home / client.STATE_FILE).read_text())
        on_disk_at_reply.append([e.round for e in PrivacyLedger.from_json(
            state["ledger"]).events])
        return real_report(*args, **kwargs)

    monkeypatch.setattr(client, "privacy_report_record", report)
    content = RecordDict()
    content.config_records[ROUND_CONFIG] = ConfigRecord({"round": 1, "run-id": "r1"})
    content.array_records[GLOBAL_WEIGHTS] = weights_to_record(weights_of(setup.model))
    msg = Message(content, dst_node_id=1, message_type="train")
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = client.dp_train_handler(lambda c: setup, policy)(msg, ctx)

    assert not reply.has_error() and LOCAL_WEIGHTS in reply.content.array_records
    assert on_disk_at_reply == [[1]]
    reply_at = events.index(("reply", ""))
    for name in (client.LEDGER_FILE, client.STATE_FILE):
        path = str(home / name)
        renamed = events.index(("replace", path))
        assert events[renamed - 1][0] == "fsync file"  # its data, before the rename
        assert events[renamed + 1] == ("fsync dir", str(home))  # the rename, after
        assert renamed + 1 < reply_at


def _train(setup, run_id: str, round_: int = 1):
    """One train message to a fresh process (an empty ctx.state): its reply (an error
    reply, as a ClientApp sends it, when the handler raises)."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from bract.flower.records import GLOBAL_WEIGHTS, ROUND_CONFIG, weights_to_record
    from bract.privacy import weights_of

    policy = client.PrivacyPolicy(target_epsilon=50.0, delta=1e-5, rounds=8,
                                  noise_multiplier=1.0)
    content = RecordDict()
    content.config_records[ROUND_CONFIG] = ConfigRecord({"round": round_, "run-id": run_id})
    content.array_records[GLOBAL_WEIGHTS] = weights_to_record(weights_of(setup.model))
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    return client.contain_errors_mod(Message(content, dst_node_id=1, message_type="train"),
                                     ctx, client.dp_train_handler(lambda c: setup, policy))


def test_a_privacy_state_older_than_its_ledger_is_refused_and_the_ledger_kept(
        tmp_path) -> None:
    """Property: a privacy-state.json that commits fewer entries than the ledger beside
    it holds, past the one round a crash between the two writes leaves, is refused
    (naming both files and to restore both from the same backup), whether it is an
    older backup restored alone or a hand-written state of no entries; the ledger file
    is left byte for byte, and no update leaves."""
    from flwr.app import Context, RecordDict


    setup = _hospital(tmp_path)
    home = setup.privacy_dir()
    assert home is not None
    assert not _train(setup, "run-1").has_error()
    backup = (home / client.STATE_FILE).read_text()
    for run in ("run-2", "run-3"):
        assert not _train(setup, run).has_error()
    ledger = (home / client.LEDGER_FILE).read_bytes()
    empty = json.dumps({"ledger": client.PrivacyLedger("hospital-0").to_json(),
                        "chain-length": 0})
    for stale in (backup, empty):
        (home / client.STATE_FILE).write_text(stale)
        reply = _train(setup, "run-4")
        assert reply.has_error()
        assert reply.error.reason.endswith(
            "this hospital's privacy state is older than its own ledger: its operator must "
            "restore both from the same backup (details in the hospital's log)")
        assert (home / client.LEDGER_FILE).read_bytes() == ledger
        assert not reply.has_content()  # an error reply: nothing of an update
    with pytest.raises(client.LedgerError, match=(
            f"{home / client.LEDGER_FILE} holds 3 entries, {client.STATE_FILE} commits 0.*"
            "restore both from the same backup")):
        client._load_state(Context(run_id=1, node_id=1, node_config={}, state=RecordDict(),
                                   run_config={}), setup)


def test_a_crash_between_the_ledger_and_the_state_counts_that_round_as_spent(
        tmp_path, monkeypatch) -> None:
    """The train handler writes the ledger, then the state naming its head. A crash
    between the two leaves the round's entries past the committed head; the next
    message counts that round as spent (its DP-SGD ran) and keeps its entries, so
    restoring only an older state file can never make a spent round unspent."""
    from bract.records.ledger import read_ledger

    setup = _hospital(tmp_path)
    home = setup.privacy_dir()
    assert home is not None
    assert not _train(setup, "run-1").has_error()
    real = client.atomic_write_text

    def crash_on_state(path, text):
        if Path(path).name == client.STATE_FILE:
            raise OSError(5, "Input/output error (simulated crash)")
        real(path, text)

    monkeypatch.setattr(client, "atomic_write_text", crash_on_state)
    assert _train(setup, "run-2").has_error()
    monkeypatch.setattr(client, "atomic_write_text", real)
    written = read_ledger(home / client.LEDGER_FILE)
    assert len(written) == 2 and json.loads(
        (home / client.STATE_FILE).read_text())["chain-length"] == 1
    assert not _train(setup, "run-2").has_error()  # the same run, asked again
    after = read_ledger(home / client.LEDGER_FILE)
    assert after[:2] == written and len(after) == 3
    state = json.loads((home / client.STATE_FILE).read_text())
    assert state["chain-length"] == 3 and state["chain-head"] == after[-1].hash()
    assert len(client.PrivacyLedger.from_json(state["ledger"]).events) == 3


@pytest.mark.parametrize("failures", [1, 2, 3])
@pytest.mark.parametrize("what_fails", ["each-rounds-own-state-write", "every-state-write"])
def test_failed_state_writes_count_their_rounds_and_never_lock_the_hospital_out(
        tmp_path, monkeypatch, failures, what_fails) -> None:
    """Property: however many messages in a row fail to write ``privacy-state.json``
    (a full disk, a crash), from the dataset's first round on, the next message that
    can write trains, and the dataset's state then commits every round whose DP-SGD
    ran: nothing spent is forgotten, and nobody must restore a backup that cannot
    exist. A round left past the head is committed before the next one trains, so a
    message that cannot commit it trains nothing."""
    from bract.records.ledger import read_ledger

    setup = _hospital(tmp_path)
    home = setup.privacy_dir()
    assert home is not None
    real = client.atomic_write_text
    written: list[str] = []

    def failing(path, text):
        name = Path(path).name
        if name == client.STATE_FILE and (what_fails == "every-state-write"
                                          or written[-1:] == [client.LEDGER_FILE]):
            raise OSError(28, "No space left on device (simulated)")
        written.append(name)
        real(path, text)

    for k in range(failures):
        written.clear()
        monkeypatch.setattr(client, "atomic_write_text", failing)
        assert _train(setup, f"run-{k}").has_error()
        monkeypatch.setattr(client, "atomic_write_text", real)
        spent = 1 if what_fails == "every-state-write" else k + 1
        assert len(read_ledger(home / client.LEDGER_FILE)) == spent
        if k > 0 and what_fails == "each-rounds-own-state-write":  # its elder committed
            assert json.loads((home / client.STATE_FILE).read_text())["chain-length"] == k
    assert not _train(setup, "run-ok").has_error()
    entries = read_ledger(home / client.LEDGER_FILE)
    assert len(entries) == spent + 1
    state = json.loads((home / client.STATE_FILE).read_text())
    assert state["chain-length"] == spent + 1 and state["chain-head"] == entries[-1].hash()
    assert len(client.PrivacyLedger.from_json(state["ledger"]).events) == spent + 1
