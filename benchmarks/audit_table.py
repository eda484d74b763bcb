"""Claimed vs found: the black-box and the white-box audit, side by side in one run.

For each audit, at a claimed epsilon of 2 (delta 1e-5), trains with the noise the
ledger records and with half of it (``noise_scale`` 0.5, the bug the audits should
catch), ``--repeats`` times, and prints each run's lower bound (95% confidence) and
verdict, and the white-box audit's measured noise / recorded noise and its
Gaussian-fit lower bound. Not a test: the figures go to docs/audit.md.

    python benchmarks/audit_table.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time

from bract.audit.empirical import EmpiricalAuditConfig, run_empirical_audit
from bract.audit.whitebox import GradientCanaryAuditConfig, run_gradient_canary_audit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    rows = []
    for rep in range(args.repeats):
        for scale in (1.0, 0.5):
            t0 = time.perf_counter()
            black = run_empirical_audit(EmpiricalAuditConfig(target_epsilon=2.0,
                                                             noise_scale=scale))
            rows.append({"audit": "black-box (linear stand-in, final model, 1000 canaries)",
                         "noise": scale, "claimed": black.claimed_epsilon,
                         "lower": black.epsilon_lower,
                         "violation": black.verdict != "consistent",
                         "seconds": time.perf_counter() - t0})
            t0 = time.perf_counter()
            white = run_gradient_canary_audit(GradientCanaryAuditConfig(noise_scale=scale))
            rows.append({"audit": "white-box (ChestCNN, gradient canaries, 5000)",
                         "noise": scale, "claimed": white.claimed_epsilon,
                         "lower": white.epsilon_lower, "violation": white.violation,
                         "noise_ratio": white.noise_ratio,
                         "gaussian_fit": white.epsilon_gaussian_fit,
                         "seconds": time.perf_counter() - t0})
            for row in rows[-2:]:
                extra = (f", noise measured/recorded {row['noise_ratio']:.3f}, Gaussian-fit "
                         f"lower bound {row['gaussian_fit']:.2f}" if "noise_ratio" in row else "")
                print(f"repeat {rep}, noise x{scale}: {row['audit']}: claimed "
                      f"{row['claimed']:.2f}, lower bound {row['lower']:.2f}, "
                      f"{'VIOLATION' if row['violation'] else 'consistent'}{extra} "
                      f"({row['seconds']:.0f} s)", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
