"""The person behind each statement of one client session.

:class:`IdentityState` merges the identity channels of a session, highest
precedence first:

1. ``comment``: a sqlcommenter comment on the statement itself, for that
   statement only (:mod:`scalple.identity.comment`);
2. ``local``: ``SET LOCAL scalple.x`` / ``set_config(.., true)``, until the
   transaction ends;
3. ``session``: ``SET scalple.x`` / ``set_config(.., false)``, until
   ``RESET``, ``RESET ALL`` or ``DISCARD ALL``;
4. ``startup``: ``scalple.*`` in the startup packet
   (:mod:`scalple.identity.startup`).

Rules (chosen so that a record never mixes two people and never hides a
failed attempt):

* **Whole channels.** The highest channel that presents anything
  (``user_id``, ``email`` or ``token``) supplies the whole identity; fields
  are never combined across channels (one person's email next to another
  person's id would be worse than no email).
* **Tokens win inside a channel.** A valid ``scalple.token`` makes the
  identity its ``sub``/``email`` with ``source="token"``, ``verified=True``,
  whatever plain ``user_id``/``email`` the same channel also carries.
* **Refused means the channel does not count.** A channel whose token is
  refused (expired, bad signature, no verifier configured, ...) or whose
  identity was set dynamically (``set_config`` with a non-constant value:
  not captured) is skipped as a whole, its plain ``user_id`` included (it
  came with failed evidence); lower channels decide the identity, and
  ``problem`` keeps the reason of the highest skipped channel.  With no
  lower channel the identity is ``source="none"``, ``user_id=None`` and
  ``problem`` set.
* **PostgreSQL scoping.** ``SET`` / ``RESET`` of a key also drops its
  ``SET LOCAL`` value (as in PostgreSQL); ``SET LOCAL x TO DEFAULT`` (or an
  empty value) hides the session value of ``x`` until the transaction ends;
  ``RESET``/``DEFAULT`` fall back to the startup channel (the "reset value");
  ``RESET ALL`` and ``DISCARD ALL`` clear the local and session channels;
  session changes are undone when the proxy reports the transaction was
  rolled back (``transaction_ended(committed=False)``).
* **Odds and ends.** A ``set_config`` whose *name* is computed counts as a
  dynamic ``user_id``.  Only ``user_id``, ``email`` and ``token`` matter;
  other ``scalple.*`` settings are ignored.  An empty value means unset.
  A verified identity from a lower channel keeps ``verified=True`` even
  with a ``problem`` from a higher one.  A token refused as "not yet
  valid" is looked at again only at the next change of settings.

The state is pure: no I/O, no logging; the proxy feeds it.  The effective
identity is computed when something changes, so :meth:`for_statement` on an
ordinary statement is an attribute read, a substring test and, when a token
is in use, one clock reading.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Literal

import msgspec

from scalple.identity.comment import sqlcommenter_pairs
from scalple.identity.settings import IdentityChange, ParamValue, changes_of_statement
from scalple.identity.startup import StartupIdentity
from scalple.identity.token import TokenError, TokenVerifier

__all__ = [
    "DYNAMIC_PROBLEM",
    "NO_IDENTITY",
    "NO_TOKEN_VERIFIER",
    "Identity",
    "IdentitySource",
    "IdentityState",
    "Requirement",
]

Requirement = Literal["verified", "any", "none"]
IdentitySource = Literal["startup", "set", "comment", "token", "none"]
"""Same values as ``scalple.events.IdentitySource``; not imported from there
because ``scalple.events`` imports :class:`Identity` from here."""

DYNAMIC_PROBLEM = "identity set dynamically, not captured"
NO_TOKEN_VERIFIER = "token verification not configured"

_KEYS = ("user_id", "email", "token")


class Identity(msgspec.Struct, frozen=True, gc=False):
    """The person a statement is attributed to, and how sure we are.

    Attributes
    ----------
    user_id, email: the person (either may be None).
    source: the channel that named them: ``comment``, ``set`` (SET or
        SET LOCAL), ``startup``, ``token`` (a verified token from any
        channel), or ``none``.
    verified: True only for a verified token.
    problem: why a higher-precedence channel was not used (``token
        expired``, ``bad signature``, ...); set even when a lower channel
        supplied the identity, so the attempt is on record.
    """

    user_id: str | None
    email: str | None
    source: IdentitySource
    verified: bool = False
    problem: str | None = None

    def acceptable(self, require: Requirement) -> bool:
        """Whether this identity satisfies a policy.

        ``verified``: a verified token named the person.  ``any``: somebody
        is named (user id or email), verified or not, even if a ``problem``
        was noted on the way.  ``none``: always.
        """
        if require == "none":
            return True
        if require == "verified":
            return self.verified
        return self.user_id is not None or self.email is not None


NO_IDENTITY = Identity(None, None, "none")


class _Mark(enum.Enum):
    """Values a scope can hold besides text."""

    DEFAULT = "default"
    """``SET LOCAL x TO DEFAULT``: hides the session value until the
    transaction ends."""
    DYNAMIC = "dynamic"
    """Set to something the proxy could not see (an expression)."""


_Value = str | _Mark
_Presented = str | _Mark | None


class IdentityState:
    """Identity bookkeeping for one client session (see the module doc).

    Parameters
    ----------
    startup: what the startup packet said.
    verifier: checks ``scalple.token``; None refuses every token with
        ``token verification not configured``.
    """

    __slots__ = (
        "_clock",
        "_identity",
        "_local",
        "_recheck_at",
        "_session",
        "_session_before",
        "_startup",
        "_verifier",
    )

    def __init__(self, startup: StartupIdentity, verifier: TokenVerifier | None) -> None:
        self._startup = startup
        self._verifier = verifier
        self._clock: Callable[[], float] | None = verifier.clock if verifier else None
        self._session: dict[str, _Value] = {}
        self._local: dict[str, _Value] = {}
        self._session_before: dict[str, _Value] | None = None
        self._identity = NO_IDENTITY
        self._recheck_at: float | None = None
        self._refresh()

    # --- queries -----------------------------------------------------------

    @property
    def current(self) -> Identity:
        """The identity from SET LOCAL / SET / startup, without any comment."""
        return self.for_statement(None)

    def for_statement(self, sql: str | None, index: int | None = None) -> Identity:
        """The identity for a statement about to run.

        ``sql`` is the statement text (None when unknown); ``index`` is its
        position in a multi-statement simple Query, so that a comment on
        one statement is not applied to its neighbours (None: the whole
        text is one statement).  Only a text containing ``scalple.`` is
        looked at (the comment parser's cost contract); otherwise the
        precomputed identity object is returned as is.
        """
        recheck = self._recheck_at
        if recheck is not None and self._clock is not None and self._clock() > recheck:
            self._refresh()  # a token in use has expired since it was verified
        identity = self._identity
        if sql is None or "scalple." not in sql:
            return identity
        pairs = sqlcommenter_pairs(sql, index)
        if not pairs:
            return identity
        return self._with_comment(pairs, identity)

    def _with_comment(self, pairs: Sequence[tuple[str, str]], base: Identity) -> Identity:
        values: dict[str, str] = {}
        for key, value in pairs:
            values[key[len("scalple.") :]] = value
        found, refused, _ = self._evaluate(
            "comment", values.get("user_id"), values.get("email"), values.get("token")
        )
        if found is not None:
            return found
        if refused is not None:
            return msgspec.structs.replace(base, problem=refused)
        return base

    # --- changes -----------------------------------------------------------

    def statement_succeeded(
        self, sql: str, index: int, params: Sequence[ParamValue] | None = None
    ) -> None:
        """Statement ``index`` of ``sql`` completed: apply its setting changes.

        ``params`` are the bind parameters of an extended-protocol execution
        (they resolve ``set_config('scalple.user_id', $1, ...)``).  Cheap for
        statements that do not mention ``scalple.``, ``reset`` or
        ``discard`` (see :func:`scalple.identity.settings.identity_changes`).
        """
        changes = changes_of_statement(sql, index, params)
        if not changes:
            return
        for change in changes:
            self._apply(change)
        self._refresh()

    def transaction_ended(self, committed: bool = True) -> None:
        """The transaction ended (ReadyForQuery reported idle ``I``).

        SET LOCAL values go.  With ``committed=False`` (the transaction was
        rolled back, explicitly or by an error in an implicit one), session
        changes made during it are undone too, as PostgreSQL does.
        Savepoint rollbacks are not tracked.
        """
        changed = False
        if self._local:
            self._local.clear()
            changed = True
        before = self._session_before
        if before is not None:
            self._session_before = None
            if not committed:
                self._session = before
                changed = True
        if changed:
            self._refresh()

    def _apply(self, change: IdentityChange) -> None:
        if change.reset_all:
            self._touch_session()
            self._session.clear()
            self._local.clear()
            return
        key = change.key
        if key is None:
            # set_config with a computed name: it may have been the identity.
            key = "user_id"
        if key not in _KEYS:
            return  # other scalple.* settings do not name the person
        if change.scope == "session":
            self._touch_session()
            if change.dynamic:
                self._session[key] = _Mark.DYNAMIC
            elif change.value:
                self._session[key] = change.value
            else:  # RESET, DEFAULT, NULL, empty string
                self._session.pop(key, None)
            self._local.pop(key, None)
        elif change.dynamic:
            self._local[key] = _Mark.DYNAMIC
        else:
            self._local[key] = change.value or _Mark.DEFAULT

    def _touch_session(self) -> None:
        """Remember the session values as the transaction found them (for
        a rollback); copied once per transaction, on the first change."""
        if self._session_before is None:
            self._session_before = dict(self._session)

    # --- resolution --------------------------------------------------------

    def _channels(self) -> Iterator[tuple[IdentitySource, Mapping[str, _Presented]]]:
        local = self._local
        yield "set", {k: v for k, v in local.items() if v is not _Mark.DEFAULT}
        yield (
            "set",
            {k: v for k, v in self._session.items() if local.get(k) is not _Mark.DEFAULT},
        )
        startup = self._startup
        yield (
            "startup",
            {"user_id": startup.user_id, "email": startup.email, "token": startup.token},
        )

    def fork(self) -> IdentityState:
        """A copy to try changes on without touching this state.

        The ``[identity] require`` check applies the identity changes of a
        statement that has not run yet to a fork, to learn whether what
        follows it would have an acceptable identity.
        """
        twin = object.__new__(IdentityState)
        for name in IdentityState.__slots__:
            setattr(twin, name, getattr(self, name))
        twin._session = dict(self._session)
        twin._local = dict(self._local)
        if self._session_before is not None:
            twin._session_before = dict(self._session_before)
        return twin

    def _refresh(self) -> None:
        """Recompute the effective identity; keep the old object if equal."""
        problem: str | None = None
        identity: Identity | None = None
        recheck: float | None = None
        for source, values in self._channels():
            found, refused, recheck = self._evaluate(
                source, values.get("user_id"), values.get("email"), values.get("token")
            )
            if found is not None:
                identity = found
                break
            if refused is not None and problem is None:
                problem = refused
        if identity is None:
            identity = NO_IDENTITY
            recheck = None
        if problem is not None:
            identity = msgspec.structs.replace(identity, problem=problem)
        if identity != self._identity:
            self._identity = identity
        self._recheck_at = recheck

    def _evaluate(
        self,
        source: IdentitySource,
        user_id: _Presented,
        email: _Presented,
        token: _Presented,
    ) -> tuple[Identity | None, str | None, float | None]:
        """One channel: (identity, None, recheck time) when it names somebody,
        (None, reason, None) when it was refused, (None, None, None) when it
        presents nothing."""
        if not user_id and not email and not token:
            return None, None, None
        if _Mark.DYNAMIC in (user_id, email, token):
            return None, DYNAMIC_PROBLEM, None
        if isinstance(token, str) and token:
            verifier = self._verifier
            if verifier is None:
                return None, NO_TOKEN_VERIFIER, None
            try:
                verified = verifier.verify(token)
            except TokenError as exc:
                return None, exc.reason, None
            recheck = None if verified.expires_at is None else verified.expires_at + verifier.leeway
            return Identity(verified.sub, verified.email, "token", True), None, recheck
        return (
            Identity(
                user_id if isinstance(user_id, str) and user_id else None,
                email if isinstance(email, str) and email else None,
                source,
            ),
            None,
            None,
        )
