"""The audit report a privacy officer reads: Markdown, HTML and the epsilon plot.

Order: the verdict first, then one row per hospital, then the findings in plain
language, then epsilon per round, then how it was checked and what was trusted.
Every figure comes from :class:`bract.audit.verify.AuditResult`; nothing here
decides a verdict.
"""

from __future__ import annotations

import html
import math
import sys
from pathlib import Path

from bract.audit.verify import FAIL, UNDER_TOLERANCE, AuditResult, HospitalAudit

MARKDOWN = "audit.md"
HTML = "audit.html"
PLOT = "epsilon_per_round.png"


def _eps(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return "∞ (no noise)" if math.isinf(x) else f"{x:.4f}"


def verdict_line(result: AuditResult) -> str:
    """One sentence: PASS or FAIL and why.

    Guarantee: the line says PASS only when every check passed, and then names what
    each chain's length (completeness) was checked against and the finite budget
    checked, with where it came from (the officer's ``--budget`` or report.json's
    ``target_epsilon``, the coordinator's claim), or that none was, and names every
    hospital whose own copy holds entries the server never received (its ε is then
    beyond what report.json says of it); when any hospital's
    completeness could not be checked, the line says FAIL and "completeness NOT
    checked", with why and for whom. A report.json of an unfinished run is named as
    such in either case."""
    n = len(result.hospitals)
    unfinished = (" report.json is of an unfinished run (it has no final summary)."
                  if result.unfinished_run else "")
    if result.passed:
        refs = sorted({h.length_checked_by for h in result.hospitals.values()
                       if h.length_checked_by})
        against = "; ".join(refs) if refs else "a reference"
        budget = (f" Every epsilon is within the budget of {result.budget:g} "
                  f"({_budget_source(result)})."
                  if result.budget is not None and math.isfinite(result.budget)
                  else " No budget was checked: none was given (--budget, or a report.json "
                       "with a target_epsilon).")
        lost = sorted(cid for cid, h in result.hospitals.items() if h.lost_rounds)
        beyond = (f" The server never received the last replies of {', '.join(lost)}: "
                  "their own copies hold entries its ledger and report.json lack, and their "
                  "ε here is their own copies' (see Findings)." if lost else "")
        under = min(result.tolerance, UNDER_TOLERANCE)
        return (
            f"PASS — the ledgers of all {n} hospitals are authentic, complete (length "
            f"checked against {against}) and in order, and every reported epsilon agrees "
            f"with an independent recomputation (at most {under:.1%} below it, "
            f"{result.tolerance:.0%} above)."
            + beyond + budget + unfinished
        )
    k = len(result.failures)
    who = sorted({f.hospital for f in result.failures if f.hospital})
    unchecked = result.completeness_unchecked
    by_reason: dict[str, list[str]] = {}
    for cid, reason in unchecked.items():
        by_reason.setdefault(reason, []).append(cid)
    completeness = "".join(
        f"; completeness NOT checked: {reason} ({', '.join(cids)})"
        for reason, cids in sorted(by_reason.items())
    )
    open_ended = sorted({f.hospital for f in result.failures if f.topic == "non-private"})
    return (
        f"FAIL — {k} problem{'s' if k != 1 else ''} found"
        + (f" (hospitals: {', '.join(who)})" if who else "")
        + (f"; NON-PRIVATE (ε = ∞): {', '.join(open_ended)}" if open_ended else "")
        + completeness
        + "; see Findings. Do not rely on this federation's privacy claims until resolved."
        + ("" if "unfinished run" in completeness else unfinished)
    )


def _budget_source(result: AuditResult) -> str:
    if result.budget_source == "--budget":
        return "given with --budget"
    return ("report.json's target_epsilon: the coordinator's claim, not the hospitals' "
            "policies; give --budget to check against those")


def _final_recomputed(h: HospitalAudit) -> str:
    """The final recomputed epsilon; both figures when the hospital's own copy gives
    another than the server's chain (the larger is what it spent)."""
    own, server = h.own_copy_recomputed, h.final_recomputed
    if own is None or _eps(own) == _eps(server):
        return _eps(server)
    return f"{_eps(h.final_spent)} (own copy {_eps(own)}; server's ledger {_eps(server)})"


def _hospital_rows(result: AuditResult) -> list[list[str]]:
    rows = []
    for cid, h in sorted(result.hospitals.items()):
        failed = any(f.hospital == cid and f.severity == FAIL for f in result.findings)
        rows.append([
            cid,
            str(len(h.entries)),
            _chain_text(h),
            _eps(h.final_reported),
            _final_recomputed(h),
            f"{100 * h.largest_difference:.2f}%",
            h.copy_status,
            "FAIL" if failed else "pass",
        ])
    return rows


def _chain_text(h: HospitalAudit) -> str:
    if not h.in_roster:
        return "not in roster"
    if h.chain_problem is None:
        return "verified"
    return f"broken after entry {h.verified}"


HEADERS = [
    "Hospital", "Entries", "Chain & signatures", "Final ε reported", "Final ε recomputed",
    "Largest difference", "Own copy", "Verdict",
]


def _round_table(result: AuditResult) -> tuple[list[str], list[list[str]]]:
    names = sorted(result.hospitals)
    head = ["Round"] + [f"{c} reported / recomputed" for c in names]
    rows = []
    for r in result.rounds:
        cells = [str(r)]
        for c in names:
            h = result.hospitals[c]
            rep = h.reported_by_round.get(r)
            rec = h.recomputed_by_round.get(r)
            cells.append(f"{_eps(rep)} / {_eps(rec)}" if rec is not None else "–")
        rows.append(cells)
    return head, rows


def _method_lines(result: AuditResult) -> list[str]:
    budget = (f"{result.budget:g}, {_budget_source(result)}" if result.budget is not None
              else "none checked")
    return [
        f"Server's ledger: `{result.ledger_path}`; roster: `{result.roster_path}` "
        f"(federation `{result.federation_id}`); report: "
        + (f"`{result.report_path}`" if result.report_path else "not given") + ".",
        "Integrity: each entry's Ed25519 signature is checked against the hospital's key "
        "in the roster, and each entry's SHA-256 link to the one before it (the first to a "
        "value binding the federation and the hospital); sequence numbers must run 1, 2, 3, …",
        f"Epsilon: recomputed after every entry from the recorded events by {result.accountant}"
        " — called directly by the audit, independently of the code that reported the figures.",
        f"Tolerance: a reported epsilon may differ from the recomputation by at most "
        f"{result.tolerance:.1%} (plus 0.001 absolute). bract reports Opacus's PRV upper "
        "bound, which lies within 0.5% below to 1% above the PLD value by design.",
        "Completeness: a chain cut at its end is itself a valid chain, so each chain's "
        "length is checked against the hospital's own copy or a finished run's report.json; "
        "a hospital with neither fails. "
        + "; ".join(f"{cid}: " + (h.length_checked_by or f"NOT checked ({h.length_unchecked})")
                    for cid, h in sorted(result.hospitals.items())) + ".",
        f"Budget: {budget}.",
        "Trusted: the roster's public keys (obtain the roster from the hospitals, not from the "
        "server audited), the dp_accounting library and the cryptography library. report.json "
        "is compared, never trusted.",
    ]


def _plot_text(plot_problem: str | None) -> str:
    return f"The plot could not be drawn: {plot_problem}" if plot_problem else ""


def render_markdown(result: AuditResult, plot_problem: str | None = None) -> str:
    """The report as Markdown (without the plot, and saying why, when it could not be
    drawn)."""
    out = ["# Privacy audit of a bract federation", "", f"**{verdict_line(result)}**", ""]
    out += ["## Hospitals", "", _md_table(HEADERS, _hospital_rows(result)), ""]
    out += ["## Findings", ""]
    if result.findings:
        for i, f in enumerate(result.findings, 1):
            tag = "FAIL" if f.severity == FAIL else "note"
            who = f"{f.hospital}: " if f.hospital else ""
            out.append(f"{i}. **{tag}** ({f.topic}) {who}{f.message}")
    else:
        out.append("No problems found.")
    figure = _plot_text(plot_problem) or f"![epsilon per round]({PLOT})"
    out += ["", "## Epsilon per round", "", figure, ""]
    head, rows = _round_table(result)
    out += [_md_table(head, rows), "", "## How this was checked", ""]
    out += [f"- {line}" for line in _method_lines(result)]
    return "\n".join(out) + "\n"


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(head), line(["---"] * len(head)), *(line(r) for r in rows)])


def render_html(result: AuditResult, plot_problem: str | None = None) -> str:
    """The report as a standalone HTML page (the plot beside it as a PNG)."""
    e = html.escape
    colour = "#1b7f3b" if result.passed else "#b3261e"
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<title>bract privacy audit</title><style>",
        "body{font-family:system-ui,sans-serif;max-width:70em;margin:2em auto;color:#222}",
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
        "padding:.3em .6em;text-align:left}th{background:#f3f3f3}",
        f".verdict{{padding:1em;border-radius:.4em;color:#fff;background:{colour};"
        "font-weight:bold}.fail{color:#b3261e;font-weight:bold}.note{color:#555}",
        "</style></head><body>",
        "<h1>Privacy audit of a bract federation</h1>",
        f"<p class='verdict'>{e(verdict_line(result))}</p>",
        "<h2>Hospitals</h2>", _html_table(HEADERS, _hospital_rows(result)),
        "<h2>Findings</h2>",
    ]
    if result.findings:
        parts.append("<ol>")
        for f in result.findings:
            cls = "fail" if f.severity == FAIL else "note"
            who = f"{f.hospital}: " if f.hospital else ""
            parts.append(
                f"<li><span class='{cls}'>{'FAIL' if cls == 'fail' else 'note'}</span> "
                f"({e(f.topic)}) {e(who + f.message)}</li>"
            )
        parts.append("</ol>")
    else:
        parts.append("<p>No problems found.</p>")
    head, rows = _round_table(result)
    parts += [
        "<h2>Epsilon per round</h2>",
        f"<p>{e(_plot_text(plot_problem))}</p>" if plot_problem else
        f"<img src='{PLOT}' alt='epsilon per round for each hospital, with the budget' "
        "style='max-width:100%'>",
        _html_table(head, rows),
        "<h2>How this was checked</h2><ul>",
        *(f"<li>{e(line).replace('`', '')}</li>" for line in _method_lines(result)),
        "</ul></body></html>",
    ]
    return "\n".join(parts) + "\n"


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    e = html.escape
    cells = "".join(f"<th>{e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def plot_epsilon(result: AuditResult, path: Path) -> None:
    """Recomputed epsilon after each round, one line per hospital, and the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    finite_max = 0.0
    for cid, h in sorted(result.hospitals.items()):
        rounds = sorted(h.recomputed_by_round) or [e.round for e in h.entries]
        values = (
            [h.recomputed_by_round[r] for r in rounds]
            if h.recomputed_by_round
            else [e.recomputed for e in h.entries]
        )
        shown = [(r, v) for r, v in zip(rounds, values, strict=True) if math.isfinite(v)]
        label = cid + ("" if len(shown) == len(values) else " (∞ rounds not drawn)")
        if shown:
            (line,) = ax.plot(*zip(*shown, strict=True), marker="o", label=label)
            finite_max = max(finite_max, max(v for _, v in shown))
            reported = [(r, v) for r, v in sorted(h.reported_by_round.items())
                        if math.isfinite(v)]
            if reported:
                ax.plot(*zip(*reported, strict=True), linestyle="none", marker="x",
                        color=line.get_color(), alpha=0.8)
        else:
            ax.plot([], [], label=label)
    if result.budget is not None and math.isfinite(result.budget):
        ax.axhline(result.budget, color="#b3261e", linestyle="--",
                   label=f"budget ε={result.budget:g}")
        finite_max = max(finite_max, result.budget)
    ax.set_ylim(0, finite_max * 1.1 if finite_max > 0 else 1.0)
    ax.set_xlabel("round")
    ax.set_ylabel("ε after the round (recomputed, PLD)")
    ax.set_title("Epsilon per round per hospital (× = reported in report.json)")
    if result.rounds:
        ax.set_xticks(result.rounds)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_reports(result: AuditResult, out_dir: str | Path) -> tuple[dict[str, Path],
                                                                     str | None]:
    """Write audit.md, audit.html and epsilon_per_round.png into ``out_dir``; returns the
    paths written and, when the plot could not be drawn, why (then there is no
    ``plot`` path and both reports say so). Only :class:`OSError` (a file that cannot be
    written) is raised: the plot is the report's illustration, so whatever the figures
    do to the plotting library, the verdict and the reports still stand."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / MARKDOWN, "html": out / HTML, "plot": out / PLOT}
    plot_problem: str | None = None
    try:
        plot_epsilon(result, paths["plot"])
    except OSError:
        raise
    except Exception as exc:  # any plotting failure: no plot, and the reports say why
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is not None:
            plt.close("all")
        paths.pop("plot").unlink(missing_ok=True)
        plot_problem = f"{type(exc).__name__}: {exc}"[:200]
    paths["markdown"].write_text(render_markdown(result, plot_problem), encoding="utf-8")
    paths["html"].write_text(render_html(result, plot_problem), encoding="utf-8")
    return paths, plot_problem
