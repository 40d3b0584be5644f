"""Identity carried in the startup packet, and its removal before forwarding.

Clients pass the person behind a connection as ``scalple.*`` settings in the
libpq ``options`` parameter (``-c scalple.user_id=42``, ``--scalple.email=x``)
or, with drivers that allow arbitrary startup parameters (asyncpg's
``server_settings``), as a parameter of its own.  PgBouncer rejects both
(unknown startup parameter), so every ``scalple.*`` setting is removed, and
``options`` is dropped when nothing else is left in it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["IDENTITY_PREFIX", "StartupIdentity", "extract_identity", "split_options"]

IDENTITY_PREFIX = "scalple."


@dataclass(frozen=True, slots=True)
class StartupIdentity:
    """What the startup packet said about the person; empty when nothing."""

    user_id: str | None = None
    email: str | None = None
    token: str | None = None
    """A signed token (``scalple.token``), verified by the identity layer."""
    extra: tuple[tuple[str, str], ...] = ()
    """Other ``scalple.*`` settings, kept for the record, never forwarded."""

    @property
    def empty(self) -> bool:
        return self.user_id is None and self.email is None and self.token is None


def split_options(options: str) -> list[str]:
    """Split ``options`` into arguments the way PostgreSQL does.

    Arguments are separated by unescaped white space; a backslash makes the
    next character literal (libpq writes ``a\\ b`` for a space in a value).
    Returns the raw arguments, escapes kept, so that they can be re-joined
    byte for byte.
    """
    args: list[str] = []
    current: list[str] = []
    escaped = False
    for ch in options:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            current.append(ch)
            escaped = True
        elif ch.isspace():
            if current:
                args.append("".join(current))
                current = []
        else:
            current.append(ch)
    if current:
        args.append("".join(current))
    return args


def _unescape(arg: str) -> str:
    out: list[str] = []
    escaped = False
    for ch in arg:
        if escaped:
            out.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        else:
            out.append(ch)
    return "".join(out)


def _setting(arg: str) -> tuple[str, str] | None:
    """``name=value`` of one setting argument, unescaped; None if not one."""
    text = _unescape(arg)
    name, sep, value = text.partition("=")
    if not sep or not name:
        return None
    return name.strip(), value


def _filter_options(options: str) -> tuple[str | None, list[tuple[str, str]]]:
    """Remove ``scalple.*`` settings from ``options``.

    Returns the remaining options text (None when nothing remains) and the
    removed ``(name, value)`` pairs in order.
    """
    args = split_options(options)
    kept: list[str] = []
    taken: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        setting: tuple[str, str] | None = None
        width = 1
        if arg == "-c" and i + 1 < len(args):
            setting, width = _setting(args[i + 1]), 2
        elif arg.startswith("-c") or arg.startswith("--"):
            setting = _setting(arg[2:])
        if setting is not None and setting[0].lower().startswith(IDENTITY_PREFIX):
            taken.append(setting)
        else:
            kept.extend(args[i : i + width])
        i += width
    if not taken:
        return options, []
    return (" ".join(kept) or None), taken


def extract_identity(parameters: dict[str, str]) -> tuple[dict[str, str], StartupIdentity]:
    """Take the identity out of startup parameters.

    Returns the parameters to forward (same order, ``scalple.*`` removed) and
    what was found.  When a setting appears twice the last one wins, as it
    would in PostgreSQL.
    """
    found: list[tuple[str, str]] = []
    forward: dict[str, str] = {}
    for name, value in parameters.items():
        if name == "options":
            remaining, taken = _filter_options(value)
            found.extend(taken)
            if remaining is not None:
                forward[name] = remaining
        elif name.lower().startswith(IDENTITY_PREFIX):
            found.append((name, value))
        else:
            forward[name] = value
    if not found:
        return forward, StartupIdentity()
    values: dict[str, str] = {}
    for name, value in found:
        values[name.lower()[len(IDENTITY_PREFIX) :]] = value
    user_id = values.pop("user_id", None)
    email = values.pop("email", None)
    token = values.pop("token", None)
    return forward, StartupIdentity(
        user_id=user_id or None,
        email=email or None,
        token=token or None,
        extra=tuple(sorted(values.items())),
    )
