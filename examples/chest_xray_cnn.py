"""Chest X-ray CNN across hospitals with non-IID data, DP-SGD and secure aggregation.

Run:  python examples/chest_xray_cnn.py                      (synthetic X-rays, 128x128)
      python examples/chest_xray_cnn.py --data-path pneumoniamnist.npz   (a real MedMNIST file)

The model is the mission's CNN (conv-pool-conv-pool-dense, GroupNorm; 128x128x1
input; normal / pneumonia / COVID-19 on the synthetic set, the file's classes on
MedMNIST). Hospitals get a Dirichlet label-skewed share of the training split; each
trains with DP-SGD calibrated to its own (epsilon, delta) budget, updates are
combined with bract's secure aggregation, and the global model is evaluated on the
central test split every round. It trains on the GPU when there is one. Last, the
global model's predictions on eight test images are explained with Grad-CAM.

Outputs in --out: report.json, ledger.jsonl (signed), roster.json, epsilon.png,
metric.png, global_model.npz and gradcam/ (one overlay per image and a contact sheet).
Nothing is downloaded: a MedMNIST file is read from the path you give.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from bract.cli import main as bract_command
from bract.flower.config import FederationConfig, device_arg
from bract.flower.observer import summarize
from bract.flower.simulation import SimulationConfig, run
from bract.records.report import RunReport

#: What a finished run leaves in --out, in the order the last line names them.
OUTPUTS = ("report.json", "ledger.jsonl", "roster.json", "epsilon.png", "metric.png",
           "global_model.npz", "gradcam")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-path", type=Path, default=None,
                   help="a MedMNIST .npz file (e.g. pneumoniamnist.npz); default: synthetic")
    p.add_argument("--hospitals", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--image-size", type=int, default=128, help="image side in pixels")
    p.add_argument("--samples", type=int, default=None,
                   help="images to generate (synthetic, default 2400) or to use from the file "
                        "(default: all of them)")
    p.add_argument("--alpha", type=float, default=1.0,
                   help="Dirichlet label skew between hospitals (small: more skew)")
    p.add_argument("--epsilon", type=float, default=8.0, help="each hospital's budget")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--device", type=device_arg, default=None,
                   help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--out", type=Path, default=Path("runs/chest_xray"))
    p.add_argument("--no-progress", action="store_true", help="plain output, no live table")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    console = Console()
    try:
        report = train(args)
    except ValueError as exc:  # bad settings or data: bract's errors name the fix
        console.print(f"[red]error:[/red] {exc}")
        return 2
    except RuntimeError as exc:  # the federation did not finish: say why, once
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        return 1
    typed = RunReport.from_plain(report, str(args.out / "report.json"))
    errors = typed.errors()
    if errors:  # a run that failed says so, and explains no model it did not train
        console.print(f"[red]error:[/red] {'; '.join(errors)} (the record is in {args.out})",
                      highlight=False)
        return 1
    console.print(summarize(typed))
    # Grad-CAM of the final global model on the first eight central test images.
    status = bract_command(["explain", "--report", str(args.out / "report.json"),
                            "--count", "8", "--out", str(args.out / "gradcam")])
    if status != 0:  # explain has printed its one error line
        return status
    written = [f"{name}/" if (args.out / name).is_dir() else name for name in OUTPUTS
               if (args.out / name).exists()]
    console.print(f"outputs in {args.out}: {', '.join(written)}", highlight=False)
    return 0


def train(args: argparse.Namespace) -> dict:
    """The federation: returns its report (also written to --out)."""
    samples = args.samples
    if samples is None and args.data_path is None:
        samples = 2400  # synthetic images to generate; a file's images are all used
    federation = FederationConfig(
        dataset="medmnist" if args.data_path else "synthetic",
        data_path=str(args.data_path) if args.data_path else "",
        clients=args.hospitals, rounds=args.rounds, image_size=args.image_size,
        samples=samples, partition="dirichlet", alpha=args.alpha,
        target_epsilon=args.epsilon, delta=args.delta, device=args.device, out=args.out,
    )
    # a re-run moves the earlier run in --out aside (OUT-<time>); nothing is deleted
    cfg = SimulationConfig(federation, save_model=args.out / "global_model.npz",
                           show_progress=not args.no_progress, previous_run="archive")
    return run(cfg)


if __name__ == "__main__":
    raise SystemExit(main())
