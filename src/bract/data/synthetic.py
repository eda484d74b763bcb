"""Synthetic chest-X-ray-like images with structural class differences.

Nothing here downloads data. The generator is meant for tests, examples and
benchmarks: it produces images that look roughly like frontal chest
radiographs (dark lung fields inside a brighter body, a bright mediastinum,
curved rib shadows, smooth low-frequency noise), with per-image jitter of
position, size, brightness and contrast, and three classes that differ only
in *where and what shape* the abnormal opacities are:

* class 0, normal: no lesion;
* class 1, "pneumonia": one or two dense, irregular, localized consolidations
  inside one lung;
* class 2, "COVID-19": several faint, diffuse ground-glass opacities at the
  periphery of both lungs.

Every image is finally standardised to zero mean and unit standard deviation,
so global brightness and contrast carry no class signal: a model must learn
spatial structure.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CLASS_NAMES", "synthetic_chest_xray"]

#: Human-readable names of the synthetic classes, indexed by label.
CLASS_NAMES: tuple[str, ...] = ("normal", "pneumonia", "covid19")

_CHUNK = 256  # images rendered at once; bounds peak memory at large image sizes
_EPS = 1e-6


def _soft_ellipse(
    u: np.ndarray,
    v: np.ndarray,
    cx: np.ndarray,
    cy: np.ndarray,
    ax: np.ndarray,
    ay: np.ndarray,
    edge: float,
) -> np.ndarray:
    """Ellipse indicator in [0, 1] with a smooth (logistic) border of width ``edge``."""
    r = np.sqrt(((u - cx) / ax) ** 2 + ((v - cy) / ay) ** 2)
    return 1.0 / (1.0 + np.exp(np.clip((r - 1.0) / edge, -30.0, 30.0)))


def _blob(
    u: np.ndarray,
    v: np.ndarray,
    cx: np.ndarray,
    cy: np.ndarray,
    sx: np.ndarray,
    sy: np.ndarray,
    wobble: np.ndarray,
    phase: np.ndarray,
) -> np.ndarray:
    """Gaussian blob whose radius varies with angle (irregular outline), peak 1."""
    dx = (u - cx) / sx
    dy = (v - cy) / sy
    theta = np.arctan2(dy, dx)
    radius = 1.0 + wobble * np.cos(3.0 * theta + phase) + 0.5 * wobble * np.cos(5.0 * theta - phase)
    return np.exp(-0.5 * (dx * dx + dy * dy) / (radius * radius))


def _u(rng: np.random.Generator, low: float, high: float, n: int) -> np.ndarray:
    """n uniform draws shaped [n, 1, 1] (float32) for broadcasting against images."""
    return rng.uniform(low, high, n).astype(np.float32).reshape(n, 1, 1)


def synthetic_chest_xray(
    n: int,
    image_size: int = 128,
    seed: int = 0,
    num_classes: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``n`` synthetic chest X-rays and their labels.

    Guarantees:

    * deterministic: the same ``(n, image_size, seed, num_classes)`` gives
      bit-identical arrays; different seeds give different arrays;
    * images are ``float32`` of shape ``[n, 1, image_size, image_size]``, each
      standardised to mean 0 and standard deviation 1 (per image);
    * labels are ``int64`` in ``[0, num_classes)``, balanced (class counts differ
      by at most one) and shuffled;
    * classes differ only by spatial structure (see module docstring).

    ``num_classes`` may be 2 (normal / pneumonia) or 3 (normal / pneumonia /
    COVID-19). ``image_size`` must be at least 16.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    if num_classes not in (2, 3):
        raise ValueError(
            f"num_classes must be 2 (normal/pneumonia) or 3 (normal/pneumonia/COVID-19), "
            f"got {num_classes}"
        )
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % num_classes).astype(np.int64)
    rng.shuffle(labels)

    # Per-image anatomy and acquisition jitter, drawn up front for all images.
    p = {
        "cx": _u(rng, -0.06, 0.06, n),
        "cy": _u(rng, -0.06, 0.06, n),
        "scale": _u(rng, 0.9, 1.08, n),
        "lung_w": _u(rng, 0.9, 1.1, n),
        "lung_h": _u(rng, 0.9, 1.1, n),
        "lung_dark": _u(rng, 0.4, 0.55, n),
        "body": _u(rng, 0.5, 0.7, n),
        "rib_freq": _u(rng, 18.0, 24.0, n),
        "rib_curve": _u(rng, 0.8, 1.4, n),
        "rib_phase": _u(rng, 0.0, 2.0 * np.pi, n),
        "rib_amp": _u(rng, 0.08, 0.16, n),
        "contrast": _u(rng, 0.8, 1.25, n),
        "brightness": _u(rng, -0.1, 0.1, n),
        "noise": _u(rng, 0.02, 0.05, n),
        # smooth noise: 4 low-frequency plane waves per image
        "sn_fx": rng.uniform(-2.5, 2.5, (4, n)).astype(np.float32).reshape(4, n, 1, 1),
        "sn_fy": rng.uniform(-2.5, 2.5, (4, n)).astype(np.float32).reshape(4, n, 1, 1),
        "sn_ph": rng.uniform(0, 2 * np.pi, (4, n)).astype(np.float32).reshape(4, n, 1, 1),
        "sn_amp": rng.uniform(0.02, 0.05, (4, n)).astype(np.float32).reshape(4, n, 1, 1),
        # pneumonia: side (0 = image-left lung, 1 = image-right), 2 blobs, second optional
        "pn_side": rng.integers(0, 2, n).reshape(n, 1, 1),
        "pn_on2": (rng.random(n) < 0.5).astype(np.float32).reshape(n, 1, 1),
        "pn_ox": rng.uniform(-0.45, 0.45, (2, n)).astype(np.float32).reshape(2, n, 1, 1),
        "pn_oy": rng.uniform(-0.5, 0.5, (2, n)).astype(np.float32).reshape(2, n, 1, 1),
        "pn_sx": rng.uniform(0.07, 0.13, (2, n)).astype(np.float32).reshape(2, n, 1, 1),
        "pn_sy": rng.uniform(0.07, 0.13, (2, n)).astype(np.float32).reshape(2, n, 1, 1),
        "pn_amp": rng.uniform(0.45, 0.65, (2, n)).astype(np.float32).reshape(2, n, 1, 1),
        "pn_wob": rng.uniform(0.15, 0.3, (2, n)).astype(np.float32).reshape(2, n, 1, 1),
        "pn_ph": rng.uniform(0, 2 * np.pi, (2, n)).astype(np.float32).reshape(2, n, 1, 1),
        # COVID-19: 3 peripheral opacities per lung (6 total), third per lung optional
        "cv_on": (rng.random((6, n)) < np.array([1, 1, 0.6, 1, 1, 0.6])[:, None])
        .astype(np.float32)
        .reshape(6, n, 1, 1),
        "cv_oy": rng.uniform(-0.3, 0.6, (6, n)).astype(np.float32).reshape(6, n, 1, 1),
        "cv_lat": rng.uniform(0.45, 0.75, (6, n)).astype(np.float32).reshape(6, n, 1, 1),
        "cv_s": rng.uniform(0.1, 0.17, (6, n)).astype(np.float32).reshape(6, n, 1, 1),
        "cv_amp": rng.uniform(0.14, 0.22, (6, n)).astype(np.float32).reshape(6, n, 1, 1),
        "cv_wob": rng.uniform(0.1, 0.25, (6, n)).astype(np.float32).reshape(6, n, 1, 1),
        "cv_ph": rng.uniform(0, 2 * np.pi, (6, n)).astype(np.float32).reshape(6, n, 1, 1),
    }

    axis = np.linspace(-1.0, 1.0, image_size, dtype=np.float32)
    u = axis.reshape(1, 1, image_size)  # horizontal, left -> right
    v = axis.reshape(1, image_size, 1)  # vertical, top -> bottom
    edge = max(0.03, 1.5 / image_size)

    images = np.empty((n, 1, image_size, image_size), dtype=np.float32)
    for start in range(0, n, _CHUNK):
        sl = slice(start, min(n, start + _CHUNK))
        q = {k: (val[:, sl] if val.ndim == 4 else val[sl]) for k, val in p.items()}
        images[sl, 0] = _render(u, v, edge, labels[sl], q, rng)
    return images, labels


def _render(
    u: np.ndarray,
    v: np.ndarray,
    edge: float,
    labels: np.ndarray,
    p: dict[str, np.ndarray],
    rng: np.random.Generator,
) -> np.ndarray:
    """Render one chunk of images, shape [m, H, W], standardised per image."""
    s = p["scale"]
    cx, cy = p["cx"], p["cy"]

    body = _soft_ellipse(u, v, cx, cy + 0.1 * s, 0.92 * s, 1.15 * s, edge)
    # Lungs: image-left lung is wider; the heart narrows the image-right one.
    lung_cx = (cx - 0.38 * s, cx + 0.38 * s)
    lung_cy = cy - 0.08 * s
    lung_ax = (0.28 * s * p["lung_w"], 0.24 * s * p["lung_w"])
    lung_ay = 0.58 * s * p["lung_h"]
    # Lung fields taper towards the apex (top) and widen towards the diaphragm.
    taper = 1.0 + 0.25 * np.clip((v - lung_cy) / lung_ay, -1.0, 1.0)
    lungs = [
        _soft_ellipse(u, v, lung_cx[i], lung_cy, lung_ax[i] * taper, lung_ay, edge) for i in (0, 1)
    ]
    lung = np.maximum(lungs[0], lungs[1])

    # Curved rib shadows: bands bending downwards away from the spine.
    phase = p["rib_freq"] * (v - p["rib_curve"] * 0.5 * (u - cx) ** 2) + p["rib_phase"]
    ribs = (0.5 + 0.5 * np.cos(phase)) ** 4

    img = 0.1 + p["body"] * body - p["lung_dark"] * lung + p["rib_amp"] * ribs * body
    for k in range(p["sn_fx"].shape[0]):
        img = img + p["sn_amp"][k] * np.cos(
            np.pi * (p["sn_fx"][k] * u + p["sn_fy"][k] * v) + p["sn_ph"][k]
        )

    lesion = np.zeros_like(img)
    pn = labels == 1
    if pn.any():
        side = p["pn_side"][pn]
        lcx = np.where(side == 0, lung_cx[0][pn], lung_cx[1][pn])
        lax = np.where(side == 0, lung_ax[0][pn], lung_ax[1][pn])
        own_lung = np.where(side == 0, lungs[0][pn], lungs[1][pn])
        acc = np.zeros((int(pn.sum()), *img.shape[1:]), dtype=np.float32)
        for j in range(2):
            on = 1.0 if j == 0 else p["pn_on2"][pn]
            acc += (
                on
                * p["pn_amp"][j][pn]
                * _blob(
                    u,
                    v,
                    lcx + p["pn_ox"][j][pn] * lax,
                    lung_cy[pn] + p["pn_oy"][j][pn] * lung_ay[pn],
                    p["pn_sx"][j][pn] * s[pn],
                    p["pn_sy"][j][pn] * s[pn],
                    p["pn_wob"][j][pn],
                    p["pn_ph"][j][pn],
                )
            )
        lesion[pn] = np.minimum(acc, 0.8) * own_lung
    cv = labels == 2
    if cv.any():
        acc = np.zeros((int(cv.sum()), *img.shape[1:]), dtype=np.float32)
        for j in range(6):
            side = j // 3  # 0: image-left lung, 1: image-right lung; lateral = away from spine
            sign = -1.0 if side == 0 else 1.0
            acc += (
                p["cv_on"][j][cv]
                * p["cv_amp"][j][cv]
                * _blob(
                    u,
                    v,
                    lung_cx[side][cv] + sign * p["cv_lat"][j][cv] * lung_ax[side][cv],
                    lung_cy[cv] + p["cv_oy"][j][cv] * lung_ay[cv],
                    p["cv_s"][j][cv] * s[cv],
                    p["cv_s"][j][cv] * s[cv] * 1.3,
                    p["cv_wob"][j][cv],
                    p["cv_ph"][j][cv],
                )
            )
        lesion[cv] = acc * lung[cv]
    img = img + lesion

    img = p["contrast"] * img + p["brightness"]
    img = img + p["noise"] * rng.standard_normal(img.shape, dtype=np.float32)
    mean = img.mean(axis=(1, 2), keepdims=True)
    std = img.std(axis=(1, 2), keepdims=True)
    return ((img - mean) / (std + _EPS)).astype(np.float32, copy=False)
