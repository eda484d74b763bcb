"""How stable is Grad-CAM across training seeds of ChestCNN? (docs/explain.md)

Toy task, 16x16 images with faint noise and one round blob anywhere (a
distractor). Class 1 adds a cross in a random quadrant, class 0 a second round
blob in a random quadrant, so the cross is the only class-1 evidence. For each
seed, ChestCNN (channels 8/16, hidden 32) is trained with Adam (300 steps of 64)
and, on 100 class-1 test images, we measure the share of Grad-CAM heat for
class 1 (at the default layer, ``features.6``) inside the cross's quadrant
(0.25 = no localisation). Data generation is seeded (``np.random``): test
data, not secrets. CPU, one thread, about 4 s per seed.

    .venv/bin/python benchmarks/gradcam_seeds.py            # seeds 0..7, as in docs/explain.md
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from bract.explain import grad_cam
from bract.models import ChestCNN

SIDE = 16
HALF = SIDE // 2


def _blob(cy: float, cx: float) -> np.ndarray:
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    return 2.0 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 1.2**2))


def _cross(cy: int, cx: int) -> np.ndarray:
    img = np.zeros((SIDE, SIDE), np.float32)
    img[cy - 2 : cy + 3, cx] = 2.0
    img[cy, cx - 2 : cx + 3] = 2.0
    return img


def make_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images, labels and the quadrant (0..3) of each image's class evidence."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.3, (n, 1, SIDE, SIDE)).astype(np.float32)
    y = (np.arange(n) % 2).astype(np.int64)
    quadrant = rng.integers(0, 4, n)
    for i in range(n):
        x[i, 0] += _blob(*rng.uniform(2, SIDE - 2, 2))
        top, left = (quadrant[i] // 2) * HALF, (quadrant[i] % 2) * HALF
        cy, cx = top + int(rng.integers(2, HALF - 2)), left + int(rng.integers(2, HALF - 2))
        x[i, 0] += _cross(cy, cx) if y[i] == 1 else _blob(cy, cx)
    return x, y, quadrant


def run_seed(seed: int) -> tuple[float, float, float]:
    """Test accuracy, mean and median share of class-1 heat in the cross's quadrant."""
    torch.manual_seed(seed)
    model = ChestCNN(image_size=SIDE, channels=(8, 16), hidden=32, num_classes=2)
    x, y, _ = make_data(1024, 0)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(300):
        idx = torch.randint(0, len(xs), (64,))
        loss = torch.nn.functional.cross_entropy(model(xs[idx]), ys[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    xt, yt, qt = make_data(200, 1)
    model.eval()
    with torch.no_grad():
        acc = float((model(torch.from_numpy(xt)).argmax(1).numpy() == yt).mean())
    pos, quad = xt[yt == 1], qt[yt == 1]
    heat = grad_cam(model, pos, target=1).heatmaps
    shares = []
    for h, q in zip(heat, quad, strict=True):
        top, left = (q // 2) * HALF, (q % 2) * HALF
        total = float(h.sum())
        shares.append(float(h[top : top + HALF, left : left + HALF].sum()) / total if total else 0)
    return acc, float(np.mean(shares)), float(np.median(shares))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    args = parser.parse_args()
    torch.set_num_threads(1)
    console = Console()
    table = Table(title="Grad-CAM heat in the evidence's quadrant (chance 0.25)")
    for col in ("seed", "test accuracy", "mean share", "median share"):
        table.add_column(col, justify="right")
    with console.status("training") as status:
        for seed in args.seeds:
            status.update(f"training seed {seed}")
            acc, mean, median = run_seed(seed)
            table.add_row(str(seed), f"{acc:.3f}", f"{mean:.2f}", f"{median:.2f}")
    console.print(table)


if __name__ == "__main__":
    main()
