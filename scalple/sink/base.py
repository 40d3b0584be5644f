"""The contract between the relay and whatever stores audit events."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from scalple.events import SessionClosed, SessionInfo, SessionRejected, StatementEvent

__all__ = ["Event", "Sink"]

Event = StatementEvent | SessionInfo | SessionClosed | SessionRejected
"""A session opening (SessionInfo), closing, refusal, or an executed statement."""


class Sink(Protocol):
    """Receives events on the event loop; stores them elsewhere.

    ``submit`` must be cheap and must not block: it runs on the relay path.
    When the sink cannot keep up it sets ``congested`` and calls
    ``on_congested`` on the loop; the relay stops reading from clients until
    ``on_drained`` runs.
    """

    congested: bool
    strict: bool  # [log] durability = "strict": completions wait for hold()
    submitted: int  # events submitted so far

    def submit(self, event: Event) -> None: ...

    def notify(
        self,
        loop: asyncio.AbstractEventLoop,
        on_congested: Callable[[], None],
        on_drained: Callable[[], None],
        on_failing: Callable[[str | None], None] = ...,
        on_subject_columns: Callable[[str, dict[tuple[int, int], int]], None] = ...,
    ) -> None: ...

    def hold(self, release: Callable[[], None]) -> None:
        """Call ``release`` on the loop once every event submitted so far is durable."""

    def flush(self, timeout: float = 5.0) -> None: ...

    def close(self) -> None: ...
