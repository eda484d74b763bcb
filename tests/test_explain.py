"""Grad-CAM (bract.explain) and `bract explain`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812 (torch's own convention)
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from bract import tasks
from bract.cli import main
from bract.explain import default_layer, find_last_conv, grad_cam, task_from_report
from bract.models import ChestCNN, TabularMLP
from bract.privacy import weights_of

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SIDE = 16
HALF = SIDE // 2
RING = np.ones((3, 3), np.float32)
RING[1, 1] = 0.0  # a hollow 3x3 square
DOT = np.zeros((3, 3), np.float32)
DOT[1, 1] = 1.0  # a single bright pixel


class ShapeNet(nn.Module):
    """A CNN with constructed weights: class 1 is "there is a ring", class 0 "there is
    a dot", wherever they are. Channel 0 of the conv detects a ring centred on the
    pixel (ring kernel, strongly negative centre), channel 1 a lone dot (positive
    centre, negative surround); the head reads class 1 from channel 0 and class 0
    from channel 1 after max-pooling and global averaging."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)
        ring = np.where(RING > 0, 1.0, -4.0)  # centred ring: 8; anything else <= 7
        dot = np.where(DOT > 0, 1.0, -1.0)  # lone dot: 1; a ring pixel has ring neighbours
        with torch.no_grad():
            self.features[0].weight.copy_(torch.tensor(np.stack([ring, dot])[:, None]))
            self.features[0].bias.copy_(torch.tensor([-7.0, -0.5]))
            self.fc.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def _scene(ring_quadrant: int, dot_quadrant: int, ring_at: tuple[int, int],
           dot_at: tuple[int, int], noise_seed: int) -> np.ndarray:
    """A 1x16x16 image with a ring in one quadrant and a dot in another, plus faint noise."""
    rng = np.random.default_rng(noise_seed)  # seeded test data, not a secret
    x = rng.uniform(0.0, 0.05, (1, SIDE, SIDE)).astype(np.float32)
    for q, (r, c), pattern in ((ring_quadrant, ring_at, RING), (dot_quadrant, dot_at, DOT)):
        top, left = (q // 2) * HALF + r, (q % 2) * HALF + c
        x[0, top : top + 3, left : left + 3] += pattern
    return x


def _mass_in_quadrant(heat: np.ndarray, q: int) -> float:
    top, left = (q // 2) * HALF, (q % 2) * HALF
    total = float(heat.sum())
    assert total > 0, "the heat map is empty"
    return float(heat[top : top + HALF, left : left + HALF].sum()) / total


quadrant_pairs = st.tuples(st.integers(0, 3), st.integers(0, 3)).filter(lambda t: t[0] != t[1])
# Patterns stay one pixel clear of their quadrant's border (offsets 1..4 of 0..7).
offsets = st.tuples(st.integers(1, HALF - 4), st.integers(1, HALF - 4))


@settings(max_examples=40, deadline=None)
@given(quadrant_pairs, offsets, offsets, st.integers(0, 2**16),
       st.sampled_from([None, "features.0", "features.1", "features.2"]))
def test_heat_concentrates_where_the_explained_class_is(quads, ring_at, dot_at, seed, layer):
    """For either class, most of the heat lies in the quadrant holding that class's
    evidence, not in the one holding the other class's: the class score, the channel
    weights and the ReLU all decide where the map points (also through the pooled,
    upsampled layer features.2)."""
    ring_q, dot_q = quads
    model = ShapeNet()
    x = torch.from_numpy(_scene(ring_q, dot_q, ring_at, dot_at, seed))[None]
    ring_cam = grad_cam(model, x, target=1, layer=layer)
    dot_cam = grad_cam(model, x, target=0, layer=layer)
    assert _mass_in_quadrant(ring_cam.heatmaps[0], ring_q) > 0.5
    assert _mass_in_quadrant(dot_cam.heatmaps[0], dot_q) > 0.5
    assert _mass_in_quadrant(ring_cam.heatmaps[0], dot_q) < 0.25


class GapNet(nn.Module):
    """conv (stride 2) -> ReLU -> global average pool -> linear: Grad-CAM at the ReLU
    equals the class activation map ReLU(sum_k w_ck A_k) (Selvaraju et al., Sec. 3.1)."""

    def __init__(self, channels: int = 6, classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, channels, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(0, 3))
@example(6071, 3)
def test_grad_cam_equals_the_class_activation_map_of_a_gap_network(seed, cls):
    torch.manual_seed(seed)
    model = GapNet()
    x = torch.randn(3, 2, 12, 12)
    cam = grad_cam(model, x, target=cls, layer="features.1")
    with torch.no_grad():
        act = model.features(x)  # [3, 6, 6, 6]
        ref = F.relu(torch.einsum("k,bkhw->bhw", model.fc.weight[cls], act))
        ref = F.interpolate(ref[:, None], size=(12, 12), mode="bilinear",
                            align_corners=False)[:, 0]
        low = ref.amin(dim=(1, 2), keepdim=True)
        span = ref.amax(dim=(1, 2), keepdim=True) - low
        ref = torch.where(span > 0, (ref - low) / span.clamp_min(1e-12), torch.zeros_like(ref))
        # the largest size of the terms one position sums (weights times activations,
        # which can cancel)
        terms = torch.einsum("k,bkhw->bhw", model.fc.weight[cls].abs(), act.abs())
        terms = terms.amax(dim=(1, 2), keepdim=True)
    # float32 both ways, summed in different orders: the rounding is a small part of the
    # terms' size, and the min-max scaling divides it by the map's span, so a map that
    # nearly cancels out is compared at a looser tolerance (hypothesis: seed 6071, class
    # 3); a flat map must be all zeros.
    tol = torch.where(span > 0, 1e-5 * torch.clamp(terms / span.clamp_min(1e-12), min=1.0),
                      torch.zeros_like(span))
    assert (torch.from_numpy(cam.heatmaps) - ref).abs().le(tol).all()
    assert cam.classes.tolist() == [cls] * 3


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


def test_grad_cam_is_a_pure_read_of_the_model() -> None:
    torch.manual_seed(0)
    model = ChestCNN(image_size=16, channels=(4, 8), hidden=16)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 1, 16, 16)
    cam = grad_cam(model, x)
    assert model.training  # the caller's mode is restored
    assert all(p.grad is None for p in model.parameters())  # no parameter gradient written
    assert all(p.requires_grad for p in model.parameters())
    assert _no_hooks(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # eval-mode forward: the reported prediction is the model's own
    model.eval()
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1).numpy()
    np.testing.assert_allclose(cam.probabilities, probs, atol=1e-6)
    assert cam.predicted.tolist() == probs.argmax(1).tolist()
    assert cam.classes.tolist() == cam.predicted.tolist()  # default: the predicted class


def test_hooks_are_removed_when_grad_cam_raises() -> None:
    model = ChestCNN(image_size=16, channels=(4, 8), hidden=16)
    with pytest.raises(ValueError, match="out of range"):
        grad_cam(model, torch.randn(2, 1, 16, 16), target=7)
    assert _no_hooks(model)
    with pytest.raises(ValueError, match="not a feature map"):
        grad_cam(model, torch.randn(2, 1, 16, 16), layer="classifier.1")
    assert _no_hooks(model)


def test_heat_maps_have_the_input_size_and_lie_in_unit_range() -> None:
    torch.manual_seed(1)
    model = ChestCNN(image_size=20, channels=(4, 8), hidden=16)
    x = torch.randn(4, 1, 20, 20)
    cam = grad_cam(model, x, target=[0, 1, 2, 0])
    assert cam.heatmaps.shape == (4, 20, 20) and cam.heatmaps.dtype == np.float32
    assert cam.heatmaps.min() >= 0.0 and cam.heatmaps.max() <= 1.0
    for heat in cam.heatmaps:  # normalised per image: max 1 unless no positive evidence
        assert heat.max() == pytest.approx(1.0) or heat.max() == 0.0
    assert cam.classes.tolist() == [0, 1, 2, 0]
    assert cam.layer == "features.6"  # the last conv's rectified output
    np.testing.assert_allclose(cam.probabilities.sum(axis=1), 1.0, atol=1e-6)


class LooseConv(nn.Module):
    """A conv that is not inside an nn.Sequential, with a functional ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.head = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.conv(x)).mean(dim=(2, 3)))


def test_default_layer_is_the_last_convs_rectified_output() -> None:
    assert find_last_conv(ChestCNN(image_size=16)) == "features.4"
    # conv features.4 -> GroupNorm features.5 -> ReLU features.6 -> MaxPool (stop)
    assert default_layer(ChestCNN(image_size=16)) == "features.6"
    assert default_layer(ShapeNet()) == "features.1"  # conv, ReLU, then MaxPool
    assert default_layer(GapNet()) == "features.1"
    assert default_layer(LooseConv()) == "conv"
    nested = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sequential(nn.Conv2d(2, 2, 3), nn.ReLU()),
                           nn.Flatten())
    assert default_layer(nested) == "1.1"
    with pytest.raises(ValueError, match="no Conv2d"):
        default_layer(TabularMLP(n_features=5, n_classes=2))


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"images": torch.randn(1, 16, 16)}, "batch"),
        ({"layer": "features.99"}, "no layer named"),
        ({"target": [0, 1, 2]}, "3 target classes for 2 images"),
        ({"target": -1}, "out of range"),
    ],
)
def test_bad_grad_cam_arguments_name_the_problem(kwargs, needle) -> None:
    model = ChestCNN(image_size=16, channels=(4, 8), hidden=16)
    args = {"images": torch.randn(2, 1, 16, 16), **kwargs}
    with pytest.raises(ValueError, match=needle):
        grad_cam(model, **args)


def test_task_from_report_takes_only_task_fields_in_either_spelling() -> None:
    report = {"config": {"dataset": "synthetic", "clients": 2, "image-size": 20, "seed": 3,
                         "n_samples": 90, "target_epsilon": 8.0, "future_field": 1}}
    task = task_from_report(report)
    assert (task.dataset, task.clients, task.image_size, task.seed, task.n_samples) == (
        "synthetic", 2, 20, 3, 90)
    with pytest.raises(ValueError, match="no dataset"):
        task_from_report({"config": {"clients": 2}})
    with pytest.raises(ValueError, match="does not describe a task"):
        task_from_report({"config": {"dataset": "mnist"}})


# ------------------------------------------------------------------ the CLI
def _run_dir(tmp_path: Path, dataset: str = "synthetic", image_size: int = 16,
             model_image_size: int | None = None) -> tuple[Path, Path]:
    """A report.json and model.npz as `bract simulate --save-model` leaves them."""
    task = tasks.TaskConfig.for_dataset(dataset, clients=2, image_size=image_size,
                                        n_samples=150 if dataset == "synthetic" else None)
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    model_path = run / "model.npz"
    if model_image_size is None:
        model = tasks.build_model(task)
    else:
        model = ChestCNN(image_size=model_image_size, num_classes=3)
    np.savez(model_path, **weights_of(model))
    report = {"config": {**task.to_plain(), "target_epsilon": 8.0, "non_private": False},
              "initial": {"loss": 1.1, "accuracy": 0.33}, "rounds": [],
              "final": {"rounds_completed": 0, "model": str(model_path)}}
    (run / "report.json").write_text(json.dumps(report))
    return run / "report.json", model_path


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 5000


def test_bract_explain_writes_overlays_and_a_contact_sheet(tmp_path, capsys) -> None:
    report, model = _run_dir(tmp_path)
    out = tmp_path / "cam"
    assert main(["explain", "--report", str(report), "--model", str(model), "--count", "3",
                 "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "gradcam_0.png", "gradcam_1.png", "gradcam_2.png", "gradcam_grid.png"]
    assert all(_is_png(p) for p in out.iterdir())
    # --indices, --class true, and the model named by the report; default folder gradcam/
    assert main(["explain", "--report", str(report), "--indices", "4", "7",
                 "--class", "true"]) == 0
    default = report.parent / "gradcam"
    assert sorted(p.name for p in default.iterdir()) == [
        "gradcam_4.png", "gradcam_7.png", "gradcam_grid.png"]
    assert "contact sheet" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("setup", "argv", "needle"),
    [
        ({"dataset": "breast-cancer"}, [], "tabular"),
        ({"model_image_size": 20}, [], "do not fit"),
        ({}, ["--model", "missing.npz"], "does not exist"),
        ({}, ["--indices", "100000"], "out of range"),
        ({}, ["--class", "5"], "out of range"),
        ({}, ["--layer", "classifier.1"], "not a feature map"),
    ],
)
def test_bract_explain_errors_are_clear(setup, argv, needle, tmp_path, capsys) -> None:
    report, _ = _run_dir(tmp_path, **setup)
    code = main(["explain", "--report", str(report), "--out", str(tmp_path / "o"), *argv])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 2
    assert "error:" in out and needle in out
    assert "Traceback" not in out


def test_bract_explain_finds_a_relative_model_beside_the_report(tmp_path, monkeypatch) -> None:
    report, _ = _run_dir(tmp_path)
    data = json.loads(report.read_text())
    data["final"]["model"] = "runs/latest/model.npz"  # relative to where simulate ran
    report.write_text(json.dumps(data))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["explain", "--report", str(report), "--count", "1"]) == 0
    assert _is_png(report.parent / "gradcam" / "gradcam_0.png")


def test_bract_explain_refuses_the_model_of_a_run_that_averaged_no_update(tmp_path,
                                                                          capsys) -> None:
    """A run in which no round averaged an update names no trained model: explain says
    so in one line instead of explaining the initial weights."""
    report, _ = _run_dir(tmp_path)
    data = json.loads(report.read_text())
    data["final"] = {"rounds_completed": 0, "model_trained": False, "epsilon": 1.0,
                     "delta": 1e-5}
    report.write_text(json.dumps(data))
    assert main(["explain", "--report", str(report), "--count", "1"]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert out.count("error:") == 1 and "never trained" in out
    assert not (report.parent / "gradcam").exists()
