"""The ``bract audit`` command group: checks a privacy officer runs on recorded files.

:func:`add_audit_parser` builds the ``audit`` subcommand and its own subparsers;
each audit registers itself there with a function of its own (``verify`` below)
that sets ``func`` on its parser, so ``bract.cli.main`` only calls
``args.func(args)``. Audits read files; none imports flwr.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_audit_parser(sub: Any) -> argparse._SubParsersAction:
    """Add ``bract audit`` to the ``bract`` subparsers ``sub``; returns its subparsers.

    Every audit subcommand is added to the returned object, so ``bract audit
    --help`` lists them all.
    """
    audit = sub.add_parser(
        "audit",
        help="audit what a federation recorded (ledgers, privacy claims)",
        description=(
            "Audits of a federation's record that do not trust the code that made it: "
            "they re-check every claim from the recorded files."
        ),
    )
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    return audit_sub
