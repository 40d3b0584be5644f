"""Error text that is safe to store: never a piece of the statement."""

from __future__ import annotations

import re

__all__ = ["describe_parse_error"]

_QUOTED_NEAR = re.compile(r'\s+at or near ".*"\Z', re.S)


def describe_parse_error(exc: BaseException) -> str:
    """A parse error without the text it quotes: PostgreSQL's message names
    the token it stopped at, which can be a constant holding personal data.
    What remains is the kind of error and its byte offset."""
    args: tuple[object, ...] = exc.args
    message = str(args[0]) if args else type(exc).__name__
    message = _QUOTED_NEAR.sub("", message)
    if '"' in message or "'" in message:
        message = type(exc).__name__  # any other quoting: say nothing of the text
    location = args[1] if len(args) > 1 and isinstance(args[1], int) else None
    return f"{message} at byte {location}" if location is not None else message
