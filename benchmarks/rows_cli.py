"""The command line of a single benchmark module: ``--device`` and ``--quick``, rows as JSON lines.

``python -m benchmarks.kernels`` runs them all and saves the results; each module also runs alone.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import torch


def print_rows(run: Callable[[str, bool], list[dict[str, Any]]], description: str,
               argv: list[str] | None = None) -> None:
    """Parse ``--device cuda|cpu`` (default: cuda when there is one) and ``--quick``; print
    ``run(device, quick)``'s rows, one JSON object per line, after a first line with the machine
    and versions (``{"environment": ...}``: a file cut short still says where it came from)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    args = parser.parse_args(argv)
    from benchmarks.env import environment

    print(json.dumps({"environment": environment()}), flush=True)
    for row in run(args.device, args.quick):
        print(json.dumps(row), flush=True)
