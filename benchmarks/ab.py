"""Run one benchmark script on two revisions of bract, interleaved, and print the ratios.

Run:  .venv/bin/python benchmarks/ab.py --before REV -- benchmarks/secagg_bench.py [args]
      .venv/bin/python benchmarks/ab.py --before REV --repeat 2 -- benchmarks/round_bench.py \
          --rounds 8 --variants bract-plain bract-secure

``REV`` (a commit) is checked out read-only in a temporary ``git worktree``; each run
executes that revision's own copy of the script (or, with ``--same-script``, this
checkout's copy on both) with ``PYTHONPATH`` pointing at that
revision's ``src`` (ahead of the editable install), in this same virtual environment,
so both revisions share the interpreter, the libraries and the machine's load. Runs
alternate before, after, before, after, ... (``--repeat`` pairs) so a slow spell of the
machine hits both. Each script's last output line is its JSON summary; every numeric
field present in both (nested fields as dotted names) is reported as the median over
the runs of each revision and the ratio after / before. The last line printed is one
JSON object with the same figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def flatten(obj: Any, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix[:-1]] = float(obj)
    return out


def run(tree: Path, script: Path, args: list[str]) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree / "src"))
    proc = subprocess.run([sys.executable, str(script), *args], env=env, cwd=tree,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"ab.py: {script} failed at {tree} (exit {proc.returncode})")
    last = proc.stdout.strip().splitlines()[-1]
    return flatten(json.loads(last))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="the baseline commit")
    ap.add_argument("--repeat", type=int, default=1, help="before/after pairs (default 1)")
    ap.add_argument("--same-script", action="store_true",
                    help="run this checkout's copy of the script on both revisions (it must "
                         "use only API both have); default: each revision's own copy")
    ap.add_argument("script", help="benchmark script, relative to the repository root")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    a = ap.parse_args()
    args = [x for x in a.args if x != "--"]
    with tempfile.TemporaryDirectory(prefix="bract-ab-") as tmp:
        old = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old),
                        a.before], check=True, capture_output=True)
        try:
            runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
            for i in range(a.repeat):
                for label, tree in (("before", old), ("after", ROOT)):
                    print(f"[{i + 1}/{a.repeat}] {label}: {a.script} {' '.join(args)}",
                          flush=True)
                    script = (ROOT if a.same_script else tree) / a.script
                    runs[label].append(run(tree, script, args))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(old)], check=False, capture_output=True)
    keys = sorted(set.intersection(*(set(r) for r in runs["before"] + runs["after"])))
    table: dict[str, dict[str, float]] = {}
    print(f"{'figure':60s} {'before':>12s} {'after':>12s} {'after/before':>13s}")
    for k in keys:
        b = statistics.median(r[k] for r in runs["before"])
        f = statistics.median(r[k] for r in runs["after"])
        ratio = f / b if b else float("nan")
        table[k] = {"before": b, "after": f, "ratio": ratio}
        print(f"{k:60s} {b:12.6g} {f:12.6g} {ratio:13.3f}")
    for k in sorted(set().union(*runs["after"]) - set(keys)):
        f = statistics.median(r[k] for r in runs["after"] if k in r)
        table[k] = {"after": f}
        print(f"{k:60s} {'-':>12s} {f:12.6g} {'(after only)':>13s}")
    print(json.dumps({"before": a.before, "repeat": a.repeat, "script": a.script,
                      "args": args, "figures": table}))


if __name__ == "__main__":
    main()
