"""Describing failures without quoting data.

Exception messages from parsers and drivers can quote the statement they
failed on, literals included, and the proxy's own log must never hold a
value from the audited database.  So failures are logged by type and place.
"""

from __future__ import annotations

import os
import traceback

__all__ = ["where"]


def where(exc: BaseException) -> str:
    """``ValueError in tracker.py:412 (_bind)``: type and innermost frame only."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return type(exc).__name__
    last = frames[-1]
    return f"{type(exc).__name__} in {os.path.basename(last.filename)}:{last.lineno} ({last.name})"
