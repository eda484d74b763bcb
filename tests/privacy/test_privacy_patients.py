"""Patient-level DP: Poisson sampling over patients, each patient's summed gradient
clipped to C, epsilon per patient. Checked against a torch.func reference that sums
each patient's per-record gradients before clipping."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

from bract.privacy.accounting import PrivacyError
from bract.privacy.sampling import PatientPoissonSampler, Patients
from bract.privacy.training import PrivateTrainer
from tests.privacy.test_privacy_clipping import Offset


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def _per_record_grads(model, x, y):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


def _patient_sums(per_record, owner, patients):
    return {k: torch.zeros(patients, *g.shape[1:]).index_add_(0, owner, g)
            for k, g in per_record.items()}


def _clipped_sum(per_unit, clip):
    count = next(iter(per_unit.values())).shape[0]
    norms = torch.sqrt(sum((g.reshape(count, -1) ** 2).sum(1) for g in per_unit.values()))
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    return {k: (g * factor.view(-1, *[1] * (g.dim() - 1))).sum(0) for k, g in per_unit.items()}


def _step(model, x, y, ids, clip, **kw):
    """One DP-SGD step with every patient sampled (q = 1), no noise, lr 1: returns the
    applied clipped sum (the update times the expected number of patients)."""
    m = copy.deepcopy(model)
    before = {k: v.detach().clone() for k, v in m.named_parameters()}
    patients = len(set(ids))
    trainer = PrivateTrainer(
        m, torch.optim.SGD(m.parameters(), lr=1.0),
        DataLoader(TensorDataset(x, y), batch_size=patients), noise_multiplier=0.0,
        max_grad_norm=clip, delta=1e-5, sampling_seed=0, patient_ids=ids, **kw,
    )
    assert trainer.privacy_unit == "patient"
    assert trainer.grad_sample_mode == kw.get("grad_sample_mode", "bk")  # auto picks bk
    assert trainer.train_round(1).trained
    return {k: (before[k] - v.detach()) * patients for k, v in m.named_parameters()}


@settings(max_examples=25, deadline=None)
@given(owner=st.lists(st.integers(0, 5), min_size=2, max_size=24), seed=st.integers(0, 99),
       mode=st.sampled_from(["auto", "bk", "hooks"]))
def test_each_patients_summed_gradient_is_clipped_as_one(owner, seed, mode) -> None:
    """The property patient-level DP needs: the step applies sum_p clip(sum_{i in p} g_i),
    so removing one patient (all its records) changes it by at most C; in every mode
    that accepts patients (auto picks book-keeping)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(owner), 4, generator=gen)
    y = torch.randint(0, 3, (len(owner),), generator=gen)
    ids = [f"patient-{o}" for o in owner]
    slots = {pid: i for i, pid in enumerate(dict.fromkeys(ids))}
    index = torch.tensor([slots[p] for p in ids])
    model = _model()
    per_patient = _patient_sums(_per_record_grads(model, x, y), index, len(slots))
    norms = torch.sqrt(sum((g.reshape(len(slots), -1) ** 2).sum(1)
                           for g in per_patient.values()))
    clip = float(norms.median())
    want = _clipped_sum(per_patient, clip)
    got = _step(model, x, y, ids, clip, **({} if mode == "auto" else {"grad_sample_mode": mode}))
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-5, rtol=1e-4)


def test_record_level_clipping_lets_a_patient_add_more_than_c() -> None:
    """Negative control: clipping records, a patient with 8 records adds up to 8 C;
    clipping patients, at most C."""
    x = (torch.randn(1, 4) * 5).repeat(8, 1)  # 8 visits that teach the model the same
    y = torch.zeros(8, dtype=torch.long)
    model, clip = _model(), 0.1
    per_record = _per_record_grads(model, x, y)
    record_level = _clipped_sum(per_record, clip)
    norm = torch.sqrt(sum((g ** 2).sum() for g in record_level.values()))
    assert norm > 7.9 * clip  # one patient's 8 records, each clipped alone: 8 C
    got = _step(model, x, y, ["same-patient"] * 8, clip)
    assert torch.sqrt(sum((g ** 2).sum() for g in got.values())) <= clip * (1 + 1e-4)


def test_patients_are_sampled_whole_at_rate_q() -> None:
    owner = np.repeat(np.arange(40), np.arange(1, 41) % 4 + 1)
    patients = Patients.of(list(owner), len(owner))
    assert patients.count == 40
    sampler = PatientPoissonSampler(patients, 0.25, steps=400)
    seen = np.zeros(40)
    for batch in sampler:
        groups = sampler.groups.popleft()
        chosen = sorted(set(owner[batch]))
        assert sorted(batch) == sorted(i for p in chosen for i in patients.records[p])
        assert len(groups) == len(batch) and (groups.max() + 1 if len(groups) else 0) == len(chosen)
        seen[chosen] += 1
    assert abs(seen.mean() / 400 - 0.25) < 0.02


def test_the_plan_counts_patients_and_epsilon_is_per_patient() -> None:
    x, y = torch.randn(30, 4), torch.arange(30) % 3
    ids = [i // 3 for i in range(30)]  # 10 patients of 3 records
    m = _model()
    trainer = PrivateTrainer(m, torch.optim.SGD(m.parameters(), lr=0.1),
                             DataLoader(TensorDataset(x, y), batch_size=2),
                             noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5,
                             patient_ids=ids)
    event = trainer.planned_event(1)
    assert (event.sample_rate, event.steps) == (1 / 5, 5)  # 10 patients, 2 per step
    outcome = trainer.train_round(1)
    assert outcome.num_examples == 10 and outcome.event == event


@pytest.mark.parametrize("mode", ["ghost"])
def test_modes_with_per_record_norms_are_refused(mode) -> None:
    m = _model()
    with pytest.raises(PrivacyError, match=r"patient-level DP .* Opacus's 'ghost'"):
        PrivateTrainer(m, torch.optim.SGD(m.parameters(), lr=0.1),
                       DataLoader(TensorDataset(torch.randn(6, 4), torch.zeros(6).long()),
                                  batch_size=2), noise_multiplier=1.0, max_grad_norm=1.0,
                       delta=1e-5, patient_ids=[0, 0, 1, 1, 2, 2], grad_sample_mode=mode)


def test_one_id_per_record() -> None:
    m = _model()
    with pytest.raises(PrivacyError, match="3 patient ids for 6 records"):
        PrivateTrainer(m, torch.optim.SGD(m.parameters(), lr=0.1),
                       DataLoader(TensorDataset(torch.randn(6, 4), torch.zeros(6).long()),
                                  batch_size=2), noise_multiplier=1.0, max_grad_norm=1.0,
                       delta=1e-5, patient_ids=[0, 1, 2])


@pytest.mark.slow
def test_bract_simulate_protects_patients_of_an_image_folder(tmp_path, capsys) -> None:
    """--privacy-unit patient on an image folder with patient sub-folders: every
    hospital samples patients (q from its patient count) and meets the target per
    patient."""
    import json
    import math

    from PIL import Image

    from bract.cli import main
    from bract.tasks import TaskConfig, hospital_patients

    root = tmp_path / "xrays"
    for cls in ("normal", "pneumonia"):
        for p in range(30):
            for k in range(3):
                path = root / cls / f"patient{cls[0]}{p}" / f"img{k}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.full((8, 8), 40 + 3 * p + k, np.uint8)).save(path)
    out = tmp_path / "run"
    code = main(["simulate", "--dataset", "imagefolder", "--data-path", str(root),
                 "--image-size", "8", "--clients", "3", "--rounds", "2", "--batch-size", "4",
                 "--target-epsilon", "4", "--privacy-unit", "patient", "--out", str(out),
                 "--no-progress"])
    assert code == 0, capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["privacy_unit"] == "patient"
    task = TaskConfig.for_dataset("imagefolder", data_path=str(root), image_size=8,
                                  clients=3, batch_size=4)
    for cid, line in report["rounds"][-1]["per_client"].items():
        patients = len(set(hospital_patients(task, int(cid.split("-")[1]))))
        assert line["sample_rate"] == pytest.approx(1 / math.ceil(patients / 4))
        assert 0.98 * 4 <= line["epsilon"] <= 4.0


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 99), offset=st.sampled_from([3e5, 3e6, 1e8]),
       mode=st.sampled_from(["auto", "bk", "hooks"]))
def test_a_whole_step_under_cancelling_weights_adds_at_most_c_per_patient(
        seed: int, offset: float, mode: str) -> None:
    """Through the trainer (what a hospital runs), for the coordinator's crafted weights
    whose per-patient Gram sums cancel (tests/privacy/test_privacy_clipping.py's
    ``Offset``: huge, nearly equal head inputs, opposite labels within each patient),
    the applied clipped sum over P patients has norm at most P C."""
    gen = torch.Generator().manual_seed(seed)
    patients, visits, clip = 4, 2, 1.0
    x = torch.randn(patients * visits, 6, generator=gen)
    y = torch.arange(patients * visits) % 2  # each patient holds both labels
    ids = [f"patient-{i // visits}" for i in range(patients * visits)]
    got = _step(Offset(offset, seed), x, y, ids, clip,
                **({} if mode == "auto" else {"grad_sample_mode": mode}))
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in got.values()))
    assert norm <= patients * clip * (1 + 1e-4)
