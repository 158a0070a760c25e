"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (missing path, unknown language, config typo, empty corpus...)."""
