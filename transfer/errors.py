"""User-facing errors: bad data, bad params, missing files.

Everything a user can fix derives from ``TransferError``; the CLI prints those as one
line (no traceback, exit code 2) and Prefect tasks do not retry them. This module
imports nothing from the package so any module can import it without cycles.
"""

from __future__ import annotations

from typing import Any


class TransferError(Exception):
    """Base of all user errors: the message says what is wrong and how to fix it."""


class DataError(TransferError):
    """A dataset problem: missing root, unreadable image, empty class, bad split."""


class DiskFullError(TransferError):
    """No space left where weights, checkpoints or caches are written (``transfer.disk``)."""


def __getattr__(name: str) -> Any:
    # ConfigError lives in transfer.config (which imports this module), so it is
    # re-exported lazily to avoid an import cycle.
    if name == "ConfigError":
        from transfer.config import ConfigError

        return ConfigError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ConfigError", "DataError", "DiskFullError", "TransferError"]
