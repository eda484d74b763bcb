"""Each hospital serves its own data; the coordinator holds none.

The deployed app's hospitals each read a different file named in their own node
config (no partition of a shared file, no ``partition-id``); the coordinator's run
config declares only the model (dataset kind, classes, channels, image size). The
hospitals evaluate the global model they receive on their own held-out splits, and
the coordinator learns only the pooled totals, inside secure aggregation."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from bract import tasks
from bract.cli import main
from bract.flower.app import client_app, server_app
from bract.flower.client import privacy_dir
from bract.flower.operator import roster_add
from bract.records.ledger import by_client, read_ledger

from .conftest import FakeGrid

FED = "own-data-federation"
#: Training (train + val) and held-out (test) images per hospital: all different.
SIZES = ((40, 8, 10), (50, 8, 14), (75, 8, 6))


def _npz(path, n_train, n_val, n_test, seed):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in (("train", n_train), ("val", n_val), ("test", n_test)):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(count) % 2).reshape(-1, 1).astype(np.uint8)
    np.savez(path, **arrays)
    return path


def _hospitals(tmp_path):
    dirs, files = [], []
    for i, sizes in enumerate(SIZES):
        d = tmp_path / f"site-{i}"
        assert main(["hospital", "init", str(d), "--id", str(i + 1), "--name", f"site-{i}",
                     "--federation", FED, "--release-metrics", "aggregate",
                     "--metrics-noise", "2"]) == 0
        data_dir = d / "data"
        data_dir.mkdir()
        files.append(_npz(data_dir / "pneumoniamnist.npz", *sizes, seed=i))
        dirs.append(d)
    roster = tmp_path / "coordinator" / "roster.json"
    roster.parent.mkdir()
    roster_add(roster, [{**(p := json.loads((d / "public.json").read_text())),
                         "public_key": bytes.fromhex(p["public_key"])} for d in dirs])
    return dirs, files, roster


def _release_noise_off(monkeypatch) -> None:
    """The metrics release's noise set to zero (the plumbing test below checks the
    released totals exactly; the accounting still records the policy's noise, and the
    noise itself is tested in tests/privacy/test_metrics_release.py)."""
    from bract.privacy.noise import SecureGaussian

    monkeypatch.setattr(SecureGaussian, "standard_normal", lambda self, count: np.zeros(count))


def test_each_hospital_trains_and_evaluates_on_its_own_file_and_the_coordinator_holds_none(
        tmp_path, monkeypatch) -> None:
    _release_noise_off(monkeypatch)
    dirs, files, roster = _hospitals(tmp_path)
    read: list[str] = []
    real = tasks.dataset_for
    monkeypatch.setattr(tasks, "dataset_for", lambda cfg: read.append(cfg.data_path) or real(cfg))
    rc = {"dataset": "medmnist", "num-classes": 2, "in-channels": 1, "image-size": 28,
          "clients": 3, "rounds": 2, "target-epsilon": 8.0, "batch-size": 16,
          "out": str(tmp_path / "coordinator" / "out"), "roster": str(roster),
          "release-metrics": "aggregate", "metrics-noise": 2.0}
    grid = FakeGrid(dict.fromkeys((11, 22, 33), client_app), run_config=rc)
    for ctx, d, f in zip(grid.contexts.values(), dirs, files, strict=True):
        (d / "roster.json").write_text(roster.read_text())  # each keeps its own copy
        ctx.node_config.clear()  # no partition: each node config names only its own files
        ctx.node_config.update({
            "name": d.name, "secagg-id": int(d.name[-1]) + 1, "data-path": str(f),
            "dataset-id": f"{d.name}-chest-xray",
            "identity-key": str(d / "identity.key"), "roster": str(d / "roster.json"),
            "policy": str(d / "policy.json"), "state-dir": str(d / "state"),
        })
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                             run_config=rc))
    # Only the hospitals' own files were ever read; the coordinator read no data.
    assert read and set(read) <= {str(f) for f in files}
    report = json.loads((tmp_path / "coordinator" / "out" / "report.json").read_text())
    rows = report["rounds"]
    assert [sorted(r["trained"]) for r in rows] == [["site-0", "site-1", "site-2"]] * 2
    assert all("accuracy" not in r and "loss" not in r for r in rows)  # no central test set
    # Each hospital's ledger lives in its own state directory, under its dataset id.
    chains = by_client(read_ledger(tmp_path / "coordinator" / "out" / "ledger.jsonl"))
    for d in dirs:
        own = privacy_dir(d / "state", f"{d.name}-chest-xray")
        # Per round: the metrics release (accounted), then the DP-SGD event.
        assert len(read_ledger(own / "ledger.jsonl")) == 4 == len(chains[d.name])
        assert [e.event.mechanism for e in chains[d.name]] == ["metrics", "dp-sgd"] * 2
        assert all(e.event.noise_multiplier == 2.0 for e in chains[d.name][::2])
        # The noise was calibrated for the hospital's own data size.
        (event,) = {e.event.sample_rate for e in chains[d.name] if e.event.is_training}
        n_train = SIZES[int(d.name[-1])][0] + SIZES[int(d.name[-1])][1]
        assert event == pytest.approx(1 / math.ceil(n_train / 16))  # Opacus: 1 / batches
    # The pooled held-out evaluation of the initial model (what round 1's hospitals
    # received) equals the one computed directly on the three held-out splits.
    first = rows[0]["federated_eval"]
    assert first["model_of_round"] == 0 and first["examples"] == sum(s[2] for s in SIZES)
    task = tasks.TaskConfig(dataset="medmnist", num_classes=2, in_channels=1)
    model = tasks.build_model(task)  # the initial model: deterministic from the seed
    x = np.concatenate([tasks.own_data(task, str(f)).x_test for f in files])
    y = np.concatenate([tasks.own_data(task, str(f)).y_test for f in files])
    direct = tasks.evaluate(model, x, y)
    assert first["loss"] == pytest.approx(direct["loss"], abs=1e-3)
    assert first["accuracy"] == pytest.approx(direct["accuracy"], abs=1e-3)
    assert rows[1]["federated_eval"]["model_of_round"] == 1
    # The metric plot shows the pooled held-out evaluation, at the rounds of its models.
    from bract.plots import metric_series

    series = metric_series(report)
    assert series.kind == "held-out" and series.rounds == [0, 1]
    assert series.primary[0] == pytest.approx(first["accuracy"])
    assert len(report["final"]["plots"]) == 2


def test_a_hospital_file_that_does_not_fit_the_declared_model_is_refused_with_the_reason(
        tmp_path) -> None:
    from bract.flower.client import failure_reason

    (tmp_path / "Jane_Doe_MRN0000").mkdir()
    path = _npz(tmp_path / "Jane_Doe_MRN0000" / "bloodmnist.npz", 10, 2, 4, seed=0)
    task = tasks.TaskConfig(dataset="medmnist", num_classes=2, in_channels=3)
    with pytest.raises(ValueError, match=r"shape \(1, 28, 28\).*takes \(3, 28, 28\)") as err:
        tasks.own_data(task, str(path))
    assert str(path) in str(err.value)  # the hospital's own log
    reason = failure_reason(err.value)  # its reply: the mismatch, not the path
    assert "shape (1, 28, 28)" in reason and "takes (3, 28, 28)" in reason
    assert not [part for part in path.parts[1:] if part in reason]
    grey = tasks.TaskConfig(dataset="medmnist", num_classes=2, in_channels=1)
    own = tasks.own_data(grey, str(path))
    with pytest.raises(ValueError, match=r"a regression dataset, the federation trains "
                                         r"classification") as err:
        tasks.check_fits_model(grey, dataclasses.replace(own, task="regression"), str(path))
    reason = failure_reason(err.value)
    assert "a regression dataset" in reason and str(path.parent) in str(err.value)
    assert not [part for part in path.parts[1:] if part in reason]
    with pytest.raises(ValueError, match="bundled"):
        tasks.TaskConfig(dataset="breast-cancer", num_classes=2, in_channels=1)
    with pytest.raises(ValueError, match="both num-classes and in-channels"):
        tasks.TaskConfig(dataset="medmnist", num_classes=2)


def test_a_refusal_that_names_a_figure_of_the_data_leaves_without_it(tmp_path) -> None:
    """An error reply reaches the coordinator: a refusal whose message holds a fact
    about the hospital's patients (a label only a rare record has, the exact number of
    records) leaves with a reason that does not, and the whole message stays local."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from bract.flower.client import failure_reason
    from bract.privacy import PrivacyError, PrivateTrainer

    path = _npz(tmp_path / "bloodmnist.npz", 10, 2, 4, seed=0)
    data = dict(np.load(path))
    data["train_labels"] = data["train_labels"].copy()
    data["train_labels"][0] = 7  # one record of a rare class
    np.savez(path, **data)
    task = tasks.TaskConfig(dataset="medmnist", num_classes=2, in_channels=1)
    with pytest.raises(ValueError, match="label 7 is beyond") as refused:
        tasks.own_data(task, str(path))
    reason = failure_reason(refused.value)
    assert "beyond the federation's model's 2 classes" in reason
    assert "7" not in reason and str(path) not in reason
    x, y = torch.randn(64, 4), torch.arange(64) % 3
    model = torch.nn.Linear(4, 3)
    with pytest.raises(PrivacyError, match=r"number of records \(64\)") as refused:
        PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                       DataLoader(TensorDataset(x, y), batch_size=8), noise_multiplier=1.0,
                       max_grad_norm=1.0, delta=1e-5, public_size=10)
    reason = failure_reason(refused.value)
    assert "public size bound" in reason and "64" not in reason
    # The coordinator's `samples` does not size a hospital's own file: neither a count
    # beyond the file's (refused naming it) nor one below (a subsample, and with it a
    # yes/no answer about the count).
    fits = _npz(tmp_path / "fits.npz", 10, 2, 4, seed=1)
    for samples in (10**9, 3):
        ds = tasks.own_data(dataclasses.replace(task, n_samples=samples), str(fits))
        assert len(ds.y_train) == 12  # training and validation splits, whole


LOADER_MODULE = '''
import numpy as np
from bract.data import FederatedDataset
from bract.data.tabular import load_dataset


def load(node_config):
    """This hospital's own records: a slice of the breast-cancer set chosen by its site."""
    full = load_dataset("breast-cancer", seed=0)
    site = int(node_config["site"])
    rows = np.arange(len(full.x_train))[site::3]
    test = np.arange(len(full.x_test))[site::3]
    return FederatedDataset(
        f"site-{site}", full.x_train[rows], full.y_train[rows], full.x_test[test],
        full.y_test[test], full.num_classes, full.input_shape,
    )
'''


def _configured_federation(tmp_path, rc: dict, policy, loader: str, tag: str = ""):
    """Three hospitals an operator configured (name, site, ``policy``, ``loader``,
    dataset id ``site-<i>-records``, own state dirs ``state-<i>``) run one federation of
    ``rc`` through bract's own apps; the grid (for its contexts) and the report."""
    grid = FakeGrid(dict.fromkeys((11, 22, 33), client_app), run_config=rc)
    for i, ctx in enumerate(grid.contexts.values()):
        path = tmp_path / f"policy-{tag}{i}.json"
        policy.write(path)
        ctx.node_config.clear()
        ctx.node_config.update({"name": f"hospital-{i}", "site": i, "policy": str(path),
                                "loader": loader, "dataset-id": f"site-{i}-records",
                                "state-dir": str(tmp_path / f"state-{i}")})
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                             run_config=rc))
    return grid, json.loads((pathlib.Path(rc["out"]) / "report.json").read_text())


def test_a_hospitals_own_python_loader_serves_its_data_and_metrics_leave_only_by_policy(
        tmp_path, monkeypatch) -> None:
    """Node config ``loader = "module:function"``: the hospital's own code loads its
    data; with its policy releasing metrics in clear (plain FedAvg) the coordinator
    gets the pooled held-out evaluation, exactly the one computed on the three
    held-out slices; the budget is kept under each hospital's dataset id."""
    from bract.data.tabular import load_dataset

    _release_noise_off(monkeypatch)
    from bract.flower.hospital_policy import HospitalPolicy

    (tmp_path / "site_records.py").write_text(LOADER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    rc = {"dataset": "breast-cancer", "clients": 3, "rounds": 1, "target-epsilon": 4.0,
          "secagg": False, "release-metrics": "clear", "out": str(tmp_path / "out")}
    grid, report = _configured_federation(
        tmp_path, rc, HospitalPolicy(release_metrics="clear", allow_plain_aggregation=True),
        "site_records:load")
    (row,) = report["rounds"]
    assert sorted(row["trained"]) == ["hospital-0", "hospital-1", "hospital-2"]
    full = load_dataset("breast-cancer", seed=0)
    direct = tasks.evaluate(tasks.build_model(tasks.TaskConfig(dataset="breast-cancer")),
                            full.x_test, full.y_test)  # the three slices pool to the whole
    assert row["federated_eval"]["examples"] == len(full.x_test)
    assert row["federated_eval"]["loss"] == pytest.approx(direct["loss"], rel=1e-5)
    assert row["federated_eval"]["accuracy"] == pytest.approx(direct["accuracy"], rel=1e-5)
    for i in range(3):
        assert (privacy_dir(tmp_path / f"state-{i}", f"site-{i}-records")
                / "ledger.jsonl").exists()
    # A loader that is not importable is refused with a reason naming it.
    ctx = next(iter(grid.contexts.values()))
    from bract.flower.app import hospital_setup

    ctx.node_config["loader"] = "no_such_module:load"
    with pytest.raises(ValueError, match="cannot be imported"):
        hospital_setup(tasks.TaskConfig(dataset="breast-cancer"), ctx)


#: A hospital's loader handing over its third site's records as pandas or a careless
#: script might (environment BRACT_TEST_VARIANT picks how).
SLOPPY_LOADER = '''
import os

import numpy as np
from bract.data import FederatedDataset
from bract.data.tabular import load_dataset


def load(node_config):
    full = load_dataset("breast-cancer", seed=0)
    site = int(node_config["site"])
    rows, test = np.arange(len(full.x_train))[site::3], np.arange(len(full.x_test))[site::3]
    xtr, ytr, xte, yte = full.x_train[rows], full.y_train[rows].copy(), full.x_test[test], \\
        full.y_test[test]
    variant = os.environ["BRACT_TEST_VARIANT"] if site == 2 else ""
    if variant == "float64 inputs":
        xtr, xte = xtr.astype(np.float64), xte.astype(np.float64)
    elif variant == "integer inputs":
        xtr, xte = (xtr * 10).astype(np.int64), (xte * 10).astype(np.int64)
    elif variant == "float labels":
        ytr, yte = ytr.astype(np.float32), yte.astype(np.float64)
    elif variant == "int32 labels":
        ytr, yte = ytr.astype(np.int32), yte.astype(np.int32)
    elif variant == "N x 1 labels":
        ytr, yte = ytr.reshape(-1, 1), yte.reshape(-1, 1)
    elif variant == "a negative label":
        ytr[0] = -1
    elif variant == "fractional labels":
        ytr = ytr.astype(np.float32)
        ytr[0] = 0.5
    elif variant == "text inputs":
        xtr, xte = xtr.astype(str), xte.astype(str)
    elif variant == "float64 beyond float32":
        xtr = xtr.astype(np.float64) * 1e300
    elif variant == "None":
        return None
    return FederatedDataset(f"site-{site}", xtr, ytr, xte, yte, full.num_classes,
                            full.input_shape)
'''


@pytest.mark.parametrize(("variant", "reason"), [
    ("float64 inputs", None), ("integer inputs", None), ("float labels", None),
    ("int32 labels", None), ("N x 1 labels", None),
    ("a negative label", "the hospital's dataset: y_train (training labels) holds a "
                         "negative label (class indices start at zero)"),
    ("fractional labels", "the hospital's dataset: y_train (training labels) holds values "
                          "that are not whole numbers (class indices)"),
    ("text inputs", "the hospital's dataset: x_train (training inputs) holds text, not "
                    "numbers"),
    ("float64 beyond float32", "the hospital's dataset: x_train (training inputs) holds "
                               "values beyond float32's range"),
    ("None", "the hospital's loader returned NoneType, not a bract.data.FederatedDataset"),
])
def test_a_hospitals_loader_in_other_types_trains_or_is_refused_with_the_named_reason(
        tmp_path, monkeypatch, variant: str, reason: str | None) -> None:
    """What a hospital's own loader hands over in other number types (float64 or
    integer features, float, int32 or N x 1 labels) is converted and trains with the
    others; what cannot be converted without changing its meaning is refused before
    training, and the coordinator sees the array and the problem (not an exception's
    type from deep inside torch), with no value of the records."""
    from bract.flower.hospital_policy import HospitalPolicy

    (tmp_path / "site_sloppy.py").write_text(SLOPPY_LOADER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("BRACT_TEST_VARIANT", variant)
    rc = {"dataset": "breast-cancer", "clients": 3, "rounds": 1, "target-epsilon": 4.0,
          "secagg": False, "out": str(tmp_path / "out")}
    _, report = _configured_federation(
        tmp_path, rc, HospitalPolicy(allow_plain_aggregation=True), "site_sloppy:load")
    (row,) = report["rounds"]
    if reason is None:
        assert sorted(row["trained"]) == ["hospital-0", "hospital-1", "hospital-2"]
        assert not row.get("failed")
        return
    assert sorted(row["trained"]) == ["hospital-0", "hospital-1"]
    (failed,) = row["failed"].values()
    assert failed == f"failed: {reason} (details in its own log)"
    assert "-1" not in failed and "0.5" not in failed and "site_sloppy" not in failed


@pytest.mark.parametrize(("loader", "reason"), [
    ("site_secret_name", "the hospital's node config loader must read "
                         "'package.module:function'"),
    ("site_secret_name:load", "the hospital's node config loader cannot be imported"),
    ("json:dumps", "the hospital's loader returned str, not a bract.data.FederatedDataset"),
])
def test_a_loader_that_gives_no_dataset_is_refused_with_a_reason_without_its_name(
        loader: str, reason: str) -> None:
    """A malformed or unimportable node config ``loader``, or one returning anything but a
    FederatedDataset: the hospital's log names the loader, the coordinator's reason the
    problem only."""
    from bract.flower.app import load_with
    from bract.flower.client import failure_reason

    with pytest.raises(ValueError, match=loader) as refused:
        load_with(loader, {"obj": 1} if loader == "json:dumps" else {})
    assert failure_reason(refused.value) == f"{reason} (details in its own log)"


PATIENT_LOADER = '''
import numpy as np
from bract.data import FederatedDataset
from bract.data.tabular import load_dataset


def load(node_config):
    """A site's records, three visits per patient (the patient id in train_columns)."""
    full = load_dataset("breast-cancer", seed=0)
    site = int(node_config["site"])
    rows = np.arange(len(full.x_train))[site::3]
    return FederatedDataset(
        f"site-{site}", full.x_train[rows], full.y_train[rows], full.x_test[:0],
        full.y_test[:0], full.num_classes, full.input_shape,
        train_columns={"patient_id": np.arange(len(rows)) // 3},
    )
'''


def test_a_hospital_whose_policy_protects_patients_spends_epsilon_per_patient(
        tmp_path, monkeypatch) -> None:
    """Policy ``privacy_unit: patient`` and a loader that names each record's patient:
    the hospital samples patients (q from its number of patients), clips each
    patient's summed gradient, and its ledger's epsilon is per patient; without patient
    ids it refuses, naming what is missing."""
    from bract.flower.hospital_policy import HospitalPolicy

    (tmp_path / "site_patients.py").write_text(PATIENT_LOADER)
    monkeypatch.syspath_prepend(str(tmp_path))
    rc = {"dataset": "breast-cancer", "clients": 3, "rounds": 1, "target-epsilon": 4.0,
          "secagg": False, "batch-size": 8, "out": str(tmp_path / "out")}
    grid, report = _configured_federation(
        tmp_path, rc, HospitalPolicy(privacy_unit="patient", allow_plain_aggregation=True),
        "site_patients:load")
    (row,) = report["rounds"]
    assert sorted(row["trained"]) == ["hospital-0", "hospital-1", "hospital-2"]
    for cid, line in row["per_client"].items():
        records = len(range(int(cid[-1]), 455, 3))
        patients = math.ceil(records / 3)
        assert line["sample_rate"] == pytest.approx(1 / math.ceil(patients / 8))
        assert 0.98 * 4.0 <= line["epsilon"] <= 4.0
    ctx = next(iter(grid.contexts.values()))
    ctx.node_config["loader"] = "site_records:load"  # no patient ids
    (tmp_path / "site_records.py").write_text(LOADER_MODULE)
    from bract.flower.app import hospital_setup

    with pytest.raises(ValueError, match="names no patient per record"):
        hospital_setup(tasks.TaskConfig(dataset="breast-cancer"), ctx)


def _unit_run(tmp_path, out: str, unit: str, target: float, legacy: str | None = None) -> dict:
    """One round of three configured hospitals (PATIENT_LOADER, own state dirs) whose
    policies protect ``unit`` (and state ``legacy`` as legacy_ledger_unit)."""
    from bract.flower.hospital_policy import HospitalPolicy

    rc = {"dataset": "breast-cancer", "clients": 3, "rounds": 1, "target-epsilon": target,
          "secagg": False, "batch-size": 8, "out": str(tmp_path / out)}
    policy = HospitalPolicy(target_epsilon=8.0, privacy_unit=unit, legacy_ledger_unit=legacy,
                            allow_plain_aggregation=True)
    _, report = _configured_federation(tmp_path, rc, policy, "site_patients:load", f"{out}-")
    return report["rounds"][-1]


def _own_ledger(tmp_path, i: int = 0) -> list:
    return read_ledger(privacy_dir(tmp_path / f"state-{i}", f"site-{i}-records")
                       / "ledger.jsonl")


def test_a_ledger_from_before_units_is_spent_from_only_once_the_hospital_states_its_unit(
        tmp_path, monkeypatch) -> None:
    """A hospital's ledger written before events recorded their unit (rewritten here as
    the earlier code wrote it: unsigned entries, no unit) is refused until its policy
    states the unit those runs protected; then it trains, and its later entries state
    theirs."""
    import dataclasses as dc

    from bract.flower.client import LEDGER_FILE, STATE_FILE
    from bract.privacy import PrivacyLedger
    from bract.records.ledger import append_entry, dumps_jsonl

    (tmp_path / "site_patients.py").write_text(PATIENT_LOADER)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "hospital-0" in _unit_run(tmp_path, "before", "record", 2.0)["trained"]
    home = privacy_dir(tmp_path / "state-0", "site-0-records")
    chain: tuple = ()
    for entry in read_ledger(home / LEDGER_FILE):
        chain = append_entry(chain, dc.replace(entry.event, unit="unstated"),
                             epsilon=entry.epsilon, delta=entry.delta,
                             accountant=entry.accountant, federation_id=entry.federation_id,
                             client_id=entry.client_id, signing_key=None)
    assert "unit" not in json.loads(dumps_jsonl(chain).splitlines()[0])["event"]
    state = json.loads((home / STATE_FILE).read_text())
    old = PrivacyLedger.from_json(state["ledger"])
    state["ledger"] = PrivacyLedger(old.client_id, tuple(e.event for e in chain)).to_json()
    state["chain-head"] = chain[-1].hash()
    (home / LEDGER_FILE).write_text(dumps_jsonl(chain))
    (home / STATE_FILE).write_text(json.dumps(state))

    refused = _unit_run(tmp_path, "unstated", "record", 4.0)
    assert "hospital-0" not in refused["trained"]
    assert any("legacy_ledger_unit" in why for why in refused["failed"].values())
    stated = _unit_run(tmp_path, "stated", "record", 4.0, legacy="record")
    assert "hospital-0" in stated["trained"]
    assert [e.event.unit for e in _own_ledger(tmp_path)] == ["unstated", "record"]


def test_a_dataset_keeps_the_privacy_unit_its_ledger_started_with(tmp_path, monkeypatch) -> None:
    """A hospital trains its data per record, then its operator switches the policy to
    per patient (same data, same state dir). The ledger's record-level events say
    nothing per patient of three records, so the patient-level run refuses before it
    trains, naming the mix, and the ledger stays as it was; back under the record unit
    it trains again."""
    (tmp_path / "site_patients.py").write_text(PATIENT_LOADER)
    monkeypatch.syspath_prepend(str(tmp_path))

    def run(out: str, unit: str, target: float) -> dict:
        return _unit_run(tmp_path, out, unit, target)

    def ledger() -> list:
        return _own_ledger(tmp_path)

    first = run("record", "record", 2.0)
    assert "hospital-0" in first["trained"]
    assert [e.event.unit for e in ledger()] == ["record"]
    switched = run("patient", "patient", 4.0)
    assert switched["trained"] == []
    assert all("holds record-level events and this run protects each patient" in why
               for why in switched["failed"].values()), switched["failed"]
    assert [e.event.unit for e in ledger()] == ["record"]
    again = run("record-again", "record", 4.0)
    assert "hospital-0" in again["trained"], again
    assert [e.event.unit for e in ledger()] == ["record", "record"]


def _train_once(nc: dict, rc: dict, rnd: int, run_id: str):
    """One ``train`` message of round ``rnd`` of run ``run_id`` to bract's own hospital app
    (a fresh Context: a new process, as a deployed SuperNode starts one per message):
    the error reason, or the privacy report."""
    from flwr.app import ConfigRecord, Message

    from bract.flower.records import PRIVACY_REPORT, ROUND_CONFIG

    content = RecordDict()
    content.config_records[ROUND_CONFIG] = ConfigRecord({"round": rnd, "run-id": run_id})
    ctx = Context(run_id=1, node_id=7, node_config=dict(nc), state=RecordDict(),
                  run_config=rc)
    reply = client_app(Message(content, dst_node_id=7, message_type="train",
                               group_id=str(rnd)), ctx)
    if reply.has_error():
        return reply.error.reason
    return dict(reply.content.config_records[PRIVACY_REPORT])


#: A coordinator's request for a hospital's own 28x28 grey file: fixed noise, so four
#: rounds spend the policy's budget of 3.
OWN_FILE_RC = {"dataset": "medmnist", "num-classes": 2, "in-channels": 1, "image-size": 28,
               "secagg": False, "rounds": 50, "noise-multiplier": 2.0, "batch-size": 10,
               "target-epsilon": 3.0}


def _own_file_hospital(tmp_path):
    """A configured hospital (name, plain-FedAvg policy with epsilon 3, own state-dir)
    and its file in export folder ``exports/2026-11``: its node config without data."""
    from bract.flower.hospital_policy import HospitalPolicy

    policy = tmp_path / "policy.json"
    HospitalPolicy(target_epsilon=3.0, allow_plain_aggregation=True).write(policy)
    (tmp_path / "exports" / "2026-11").mkdir(parents=True)
    _npz(tmp_path / "exports" / "2026-11" / "chest.npz", 30, 0, 10, seed=3)
    return {"name": "st-mary", "policy": str(policy), "state-dir": str(tmp_path / "state")}


def _spend(nc: dict, rc: dict, run_id: str) -> tuple[int, float]:
    """Train rounds until the hospital refuses: how many trained, and its epsilon."""
    for rnd in range(1, 30):
        report = _train_once(nc, rc, rnd, run_id)
        assert isinstance(report, dict), report
        if not report["trained"]:
            return rnd - 1, float(report["epsilon"])
    raise AssertionError("the hospital never refused")


def test_a_hospital_on_its_own_data_keeps_one_budget_when_the_data_moves(
        tmp_path, monkeypatch) -> None:
    """A hospital on its own data names its patients' dataset (node config
    ``dataset-id``): without one it refuses before reading any data, and the reason that
    reaches the coordinator names no path. Its budget is kept under that name, so a
    byte-identical re-export of the same patients in another folder, a move, or the
    same records through a loader spend from the budget already spent."""
    import shutil

    nc = _own_file_hospital(tmp_path)
    export = tmp_path / "exports" / "2026-11" / "chest.npz"
    read: list[str] = []
    real = tasks.dataset_for
    monkeypatch.setattr(tasks, "dataset_for", lambda cfg: read.append(cfg.data_path) or real(cfg))
    for data in ({"data-path": str(export)}, {"loader": "site_records:load"}):
        reason = _train_once({**nc, **data}, OWN_FILE_RC, 1, "run-0")
        assert reason == ("this hospital's node config names its own data but no dataset-id "
                          "its privacy budget can be kept under; its operator must set one "
                          "(details in its own log)")
    assert read == []  # refused before any data was read
    from bract.flower.app import hospital_setup

    with pytest.raises(ValueError, match=r"names its own data \(data-path\) but no "
                                         r"dataset-id: name its patients' dataset"):
        hospital_setup(tasks.TaskConfig(dataset="medmnist", num_classes=2, in_channels=1),
                       Context(run_id=1, node_id=7, state=RecordDict(), run_config={},
                               node_config={**nc, "data-path": str(export)}))
    nc["dataset-id"] = "st-mary-chest-xray"
    trained, spent = _spend({**nc, "data-path": str(export)}, OWN_FILE_RC, "run-a")
    assert trained == 4 and spent <= 3.0
    # The same patients re-exported to another folder (the old one then removed).
    again = tmp_path / "exports" / "2026-12"
    shutil.copytree(export.parent, again)
    shutil.rmtree(export.parent)
    assert _spend({**nc, "data-path": str(again / "chest.npz")}, OWN_FILE_RC, "run-b") == (
        0, pytest.approx(spent))
    datasets = list((tmp_path / "state" / "datasets").iterdir())
    assert [d.name for d in datasets] == [privacy_dir(tmp_path / "state",
                                                      "st-mary-chest-xray").name]
    # The directory records which dataset it budgets, for its operator.
    assert json.loads((datasets[0] / "privacy-state.json").read_text())["dataset-id"] == \
        "st-mary-chest-xray"


def test_a_ledger_kept_under_its_data_path_is_continued_by_the_dataset_id_named(
        tmp_path) -> None:
    """A state directory holding the ledger of a hospital's own file under its
    path-derived key (``<dataset>:<resolved path>``, written for a node config without
    ``dataset-id``): the refusal names the exact ``dataset-id`` that continues it, and
    with it the hospital spends on from that ledger. A new name while that ledger
    exists is refused too, until the operator sets that id or moves the files under
    the new one."""
    import re
    import shutil

    from bract.flower.client import LEDGER_FILE, STATE_FILE

    nc = _own_file_hospital(tmp_path)
    export = tmp_path / "exports" / "2026-11" / "chest.npz"
    own = {**nc, "data-path": str(tmp_path / "exports" / ".." / "exports" / "2026-11"
                                  / "chest.npz")}
    old_key = f"medmnist:{export.resolve()}"
    rc = {**OWN_FILE_RC, "rounds": 2}
    first = _train_once({**own, "dataset-id": old_key}, rc, 1, "run-a")
    assert first["trained"], first
    from bract.flower.app import hospital_setup

    task = tasks.TaskConfig(dataset="medmnist", num_classes=2, in_channels=1)

    def refusal(node_config: dict) -> str:
        with pytest.raises(ValueError) as refused:
            hospital_setup(task, Context(run_id=1, node_id=7, state=RecordDict(),
                                         run_config={}, node_config=node_config))
        return " ".join(str(refused.value).split())

    why = refusal(own)
    assert f"holds this data-path's ledger under the key {old_key!r}" in why
    (named,) = re.findall(r'set node config dataset-id="([^"]+)" to continue', why)
    assert named == old_key
    second = _train_once({**own, "dataset-id": named}, rc, 2, "run-a")
    assert second["trained"], second
    chain = read_ledger(privacy_dir(tmp_path / "state", old_key) / LEDGER_FILE)
    assert [e.round for e in chain] == [1, 2]  # one ledger, continued
    # A fresh name would start from nothing: refused, naming both ways on.
    why = refusal({**own, "dataset-id": "st-mary-chest-xray"})
    assert f"set dataset-id=\"{old_key}\" to continue that budget" in why
    assert str(privacy_dir(tmp_path / "state", "st-mary-chest-xray")) in why
    new_home = privacy_dir(tmp_path / "state", "st-mary-chest-xray")
    new_home.mkdir(parents=True)
    for name in (LEDGER_FILE, STATE_FILE):
        shutil.move(privacy_dir(tmp_path / "state", old_key) / name, new_home / name)
    third = _train_once({**own, "dataset-id": "st-mary-chest-xray"}, {**rc, "rounds": 3}, 3,
                        "run-a")
    assert third["trained"], third
    assert [e.round for e in read_ledger(new_home / LEDGER_FILE)] == [1, 2, 3]
    # Another dataset's ledger is listed by its recorded id when none matches this data.
    other = {**nc, "data-path": str(tmp_path / "elsewhere.npz")}
    assert "holds the ledgers of dataset-id 'st-mary-chest-xray'" in refusal(other)


def test_a_hospital_protecting_patients_refuses_images_whose_patient_is_unknown(
        tmp_path, capsys) -> None:
    """Policy ``privacy_unit: patient`` on an image folder laid out flat (several images
    per patient directly in each class folder): each image would count as a patient
    and the epsilon per patient would be false, so the hospital refuses before it
    trains; the reason it sends names neither its files nor their count. Under the
    record unit the same folder trains as before; ``bract simulate --privacy-unit
    patient`` refuses it too."""
    from PIL import Image

    from bract.flower.hospital_policy import HospitalPolicy

    root = tmp_path / "xrays"
    rng = np.random.default_rng(0)
    for cls in ("normal", "pneumonia"):
        (root / cls).mkdir(parents=True)
        for p in range(6):
            for view in range(3):
                Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(
                    root / cls / f"patient{p:03d}_view{view}.png")
    rc = {"dataset": "imagefolder", "num-classes": 2, "in-channels": 1, "image-size": 8,
          "secagg": False, "rounds": 3, "noise-multiplier": 1.0, "batch-size": 8}
    for unit in ("patient", "record"):
        policy = tmp_path / f"policy-{unit}.json"
        HospitalPolicy(privacy_unit=unit, allow_plain_aggregation=True).write(policy)
        nc = {"name": "st-mary", "policy": str(policy), "data-path": str(root),
              "dataset-id": f"st-mary-xrays-{unit}", "state-dir": str(tmp_path / "state")}
        outcome = _train_once(nc, rc, 1, "run-1")
        if unit == "patient":
            assert outcome == (
                "the hospital's image folder holds images whose patient is unknown (directly "
                "in their class folder, no DICOM PatientID), and its policy protects patients "
                "(details in its own log)")
            assert not (tmp_path / "state" / "datasets").exists()  # nothing spent
        else:
            assert outcome["trained"], outcome
    code = main(["simulate", "--dataset", "imagefolder", "--data-path", str(root),
                 "--image-size", "8", "--clients", "3", "--rounds", "1", "--privacy-unit",
                 "patient", "--out", str(tmp_path / "sim"), "--no-progress"])
    assert code != 0
    assert "lie directly in their class folder" in " ".join(capsys.readouterr().out.split())


def test_a_declared_class_count_answers_the_coordinator_without_reading_labels(
        tmp_path, monkeypatch) -> None:
    """A coordinator that declares k classes would learn from a refusal whether any of a
    hospital's patients has a label >= k. A hospital whose policy declares its data's
    class count (``num_classes``) compares that with the model before reading any data:
    two hospitals, one with a single patient of the rare class 2, answer every k alike
    (refused unless k is the declared 3, then both train)."""
    from bract.flower.hospital_policy import HospitalPolicy

    read: list[str] = []
    real = tasks.dataset_for
    monkeypatch.setattr(tasks, "dataset_for", lambda cfg: read.append(cfg.data_path) or real(cfg))
    answers: dict[tuple[bool, int], object] = {}
    for rare in (False, True):
        d = tmp_path / f"rare-{rare}"
        d.mkdir()
        path = _npz(d / "chest.npz", 30, 0, 10, seed=4)
        if rare:
            data = dict(np.load(path))
            data["train_labels"] = data["train_labels"].copy()
            data["train_labels"][7] = 2  # one patient with the rare diagnosis
            np.savez(path, **data)
        HospitalPolicy(num_classes=3, allow_plain_aggregation=True).write(d / "policy.json")
        nc = {"name": "st-mary", "policy": str(d / "policy.json"), "data-path": str(path),
              "dataset-id": "st-mary-chest-xray", "state-dir": str(d / "state")}
        for k in (2, 4, 3):
            read.clear()
            rc = {**OWN_FILE_RC, "num-classes": k, "rounds": 2}
            outcome = _train_once(nc, rc, 1, f"run-{k}")
            answers[rare, k] = outcome if isinstance(outcome, str) else outcome["trained"]
            if k != 3:
                assert read == []  # refused before any data was read
    for k in (2, 4):
        assert answers[False, k] == answers[True, k]
        assert answers[False, k].endswith(
            f"refused: the coordinator's run config asks for a model of {k} classes; this "
            "hospital's policy declares its data's 3 classes")
    assert answers[False, 3] is True and answers[True, 3] is True
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1 or null"):
        HospitalPolicy(num_classes=0)


@pytest.mark.parametrize("dataset_id", ["st-mary-chest-xray ", " st-mary-chest-xray",
                                        "st-mary-chest-xray\t", "st-mary\u200b-chest-xray",
                                        "st-mary\x00-chest-xray", "st-mary-chest-xray\u2028",
                                        "st-mary\xa0chest-xray", "st-mary-che\u0301st-xray"])
def test_a_dataset_id_that_reads_like_another_is_refused_before_any_data_is_read(
        tmp_path, monkeypatch, dataset_id: str) -> None:
    """A dataset-id with whitespace at either end or an invisible character would keep a
    fresh budget apart from the one it reads the same as (the same patients spent
    twice): it is refused, never stripped, before any data is read, whether the
    hospital serves its own data or a partition; the reply's reason names no id."""
    from bract.flower.app import hospital_setup

    nc = _own_file_hospital(tmp_path)
    export = tmp_path / "exports" / "2026-11" / "chest.npz"
    read: list[str] = []
    real = tasks.dataset_for
    monkeypatch.setattr(tasks, "dataset_for", lambda cfg: read.append(cfg.data_path) or real(cfg))
    # The clean id has spent budget already: the look-alike must not start a fresh one.
    assert isinstance(_train_once({**nc, "data-path": str(export),
                                   "dataset-id": "st-mary-chest-xray"}, OWN_FILE_RC, 1,
                                  "run-a"), dict)
    read.clear()
    reason = _train_once({**nc, "data-path": str(export), "dataset-id": dataset_id},
                         OWN_FILE_RC, 1, "run-b")
    assert reason == ("this hospital's node config names a dataset-id its privacy budget "
                      "cannot be kept under (blank, whitespace at an end, an invisible "
                      "character or a look-alike Unicode form); its operator must correct "
                      "it")
    assert read == []
    assert [d.name for d in (tmp_path / "state" / "datasets").iterdir()] == [
        privacy_dir(tmp_path / "state", "st-mary-chest-xray").name]
    for data in ({"data-path": str(export)}, {"loader": "site_records:load"},
                 {"partition-id": 0, "num-partitions": 3}):
        with pytest.raises(ValueError, match=r"dataset-id .* (begins or ends with whitespace"
                                             r"|holds control or invisible character"
                                             r"|is not in its plain Unicode form)"):
            hospital_setup(tasks.TaskConfig(dataset="medmnist", num_classes=2,
                                            in_channels=1, image_size=28),
                           Context(run_id=1, node_id=7, state=RecordDict(), run_config={},
                                   node_config={**nc, **data, "dataset-id": dataset_id}))
    assert read == []


def test_a_dataset_id_whose_budget_already_exists_keeps_it(tmp_path) -> None:
    """An id written before the look-alike rules (here with a trailing space) whose
    budget the state directory holds is kept as it is: refusing it would send its
    operator to a fresh, empty budget for the same patients. A look-alike id without a
    budget is still refused."""
    from bract.flower.client import LEDGER_FILE, dataset_id_problem

    state = tmp_path / "state"
    old = "st-mary-chest-xray "
    assert dataset_id_problem(old, state) is not None
    spent = privacy_dir(state, old)
    spent.mkdir(parents=True)
    (spent / LEDGER_FILE).write_text("")
    assert dataset_id_problem(old, state) is None
    assert dataset_id_problem(" st-mary-chest-xray", state) is not None
    assert dataset_id_problem(old) is not None  # no state directory: nothing to keep
