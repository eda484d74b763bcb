"""Synthetic chest X-rays: determinism, format, normalisation, class structure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from bract.data import CLASS_NAMES, synthetic_chest_xray
from bract.models import ChestCNN

# few lbfgs iterations are enough to show the signal; convergence is not the point
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


@pytest.fixture(scope="module")
def xray28() -> tuple[np.ndarray, np.ndarray]:
    return synthetic_chest_xray(1500, image_size=28, seed=1)


def test_same_seed_is_identical_and_different_seed_differs() -> None:
    x1, y1 = synthetic_chest_xray(60, image_size=32, seed=7)
    x2, y2 = synthetic_chest_xray(60, image_size=32, seed=7)
    x3, y3 = synthetic_chest_xray(60, image_size=32, seed=8)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(x1, x3)
    assert not np.array_equal(y1, y3)


@pytest.mark.parametrize(("n", "size", "k"), [(10, 16, 3), (31, 28, 3), (7, 64, 2), (0, 28, 3)])
def test_shapes_and_dtypes(n: int, size: int, k: int) -> None:
    x, y = synthetic_chest_xray(n, image_size=size, seed=0, num_classes=k)
    assert x.shape == (n, 1, size, size)
    assert x.dtype == np.float32
    assert y.shape == (n,)
    assert y.dtype == np.int64
    assert np.isfinite(x).all()
    if n:
        assert y.min() >= 0 and y.max() < k


def test_each_image_is_standardised(xray28: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = xray28
    np.testing.assert_allclose(x.mean(axis=(1, 2, 3)), 0.0, atol=1e-4)
    np.testing.assert_allclose(x.std(axis=(1, 2, 3)), 1.0, atol=1e-3)


def test_labels_balanced_and_shuffled(xray28: tuple[np.ndarray, np.ndarray]) -> None:
    _, y = xray28
    counts = np.bincount(y, minlength=3)
    assert counts.max() - counts.min() <= 1
    assert not np.array_equal(y, np.arange(len(y)) % 3)
    assert len(CLASS_NAMES) == 3


def test_global_statistics_carry_no_class_signal(xray28: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = xray28
    means = x.mean(axis=(1, 2, 3))
    stds = x.std(axis=(1, 2, 3))
    for c in range(3):
        assert abs(means[y == c].mean()) < 1e-4
        assert abs(stds[y == c].mean() - 1.0) < 1e-3
    # a classifier on (mean, std) alone is at chance level
    feats = np.stack([means, stds], axis=1) * 1e3
    clf = LogisticRegression(max_iter=200).fit(feats[:1000], y[:1000])
    assert clf.score(feats[1000:], y[1000:]) < 0.45


def test_classes_differ_structurally(xray28: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = xray28
    flat = x.reshape(len(x), -1)
    # pixel-wise class means differ (lesions are spatial structure)
    class_means = np.stack([flat[y == c].mean(axis=0) for c in range(3)])
    for a in range(3):
        for b in range(a + 1, 3):
            assert np.abs(class_means[a] - class_means[b]).max() > 0.1
    # a linear model on pixels beats chance (1/3) clearly
    clf = LogisticRegression(max_iter=30, C=0.05).fit(flat[:1000], y[:1000])
    assert clf.score(flat[1000:], y[1000:]) > 0.6


def test_tiny_cnn_learns_the_classes(xray28: tuple[np.ndarray, np.ndarray]) -> None:
    torch.manual_seed(0)
    x, y = (torch.from_numpy(a) for a in xray28)
    model = ChestCNN(image_size=28, channels=(8, 16), hidden=32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(3):
        perm = torch.randperm(1000)
        for i in range(0, 1000, 50):
            idx = perm[i : i + 50]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        acc = (model(x[1000:]).argmax(1) == y[1000:]).float().mean().item()
    assert acc > 0.7


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 5, "image_size": 12}, "image_size"),
        ({"n": 5, "num_classes": 4}, "num_classes"),
        ({"n": 5, "num_classes": 1}, "num_classes"),
        ({"n": -1}, "n must be"),
    ],
)
def test_bad_arguments(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        synthetic_chest_xray(**kwargs)


def test_two_class_variant_has_no_covid_label() -> None:
    _, y = synthetic_chest_xray(50, image_size=16, seed=0, num_classes=2)
    assert set(np.unique(y)) == {0, 1}
