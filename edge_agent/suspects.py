"""Poison handling on the uplink (SPEC §5): the events a connection was lost on while they were
alone in flight, set aside and tried again (alone) only once other events got through since, or
at once when there is nothing else to send, so that one poison event neither blocks the rest nor
gets blamed for a dead link. After ``max_attempts`` such losses, each but the first with other
events getting through since the previous one, the uplink moves the event to the dead letters.
The losses that count are kept in the buffer (`Buffer.record_losses`): restarting the agent does
not start them over."""

from __future__ import annotations

import math
from collections.abc import KeysView, Mapping
from dataclasses import dataclass

from edge_agent.buffer import StoredEvent

__all__ = ["MAX_SUSPECTS", "Suspect", "Suspects"]

MAX_SUSPECTS = 100  # set aside at once, at most (more are simply sent again with the rest)
MAX_RETRY_WAIT = 3600.0  # seconds: the longest wait after publish timeouts


@dataclass(slots=True)
class Suspect:
    event: StoredEvent
    failures: int  # connections lost with this event alone in flight
    confirmed_at_failure: int  # `Suspects.confirmed` at the last failure
    timeouts: int = 0  # publish timeouts with this event alone in flight
    retry_after: float = 0.0  # loop time before which it is not tried again (after timeouts)
    lost_at: float = 0.0  # loop time of its last loss (0: in an earlier run of the agent)
    unproven: int = 0  # closes on it since it was set aside that did not count


class Suspects:
    """The events set aside, by seq, and the evidence that the server takes events."""

    def __init__(self) -> None:
        self._by_seq: dict[int, Suspect] = {}
        self._earlier: dict[int, tuple[int, int]] = {}
        """Losses counted, and `confirmed` at the last one, of events beyond `MAX_SUSPECTS`.
        Entries of events delivered since stay until the agent restarts: few, each one cost a
        lost connection."""
        self.confirmed = 0
        """QoS 1/2 events acknowledged this run: evidence that the server takes events (a QoS 0
        write is none: paho reports it published once it is in the socket)."""

    def remember(self, events: list[StoredEvent], losses: Mapping[int, int]) -> None:
        """The losses counted against events by earlier runs (`Buffer.suspects`): ``events`` (up
        to `MAX_SUSPECTS`) are set aside again, as if lost before any event got through in this
        run; the other seqs in ``losses`` keep their counts for when they are lost again."""
        for event in events[:MAX_SUSPECTS]:
            self._by_seq[event.seq] = Suspect(event, losses[event.seq], 0)
        self._earlier.update(
            (seq, (count, 0)) for seq, count in losses.items() if seq not in self._by_seq
        )

    @property
    def seqs(self) -> KeysView[int]:
        """Not to be read with the rest: they go alone, when `candidate` says so."""
        return self._by_seq.keys()

    def candidate(
        self,
        *,
        idle: bool,
        now: float,
        up_since: float | None = None,
        patience: float = math.inf,
    ) -> Suspect | None:
        """One worth another try, at loop time ``now`` (and not held back after timeouts):
        - other events got through since it failed;
        - or there is nothing else to send (``idle``: it is then not held back for want of
          traffic; a failure without other events getting through in between does not count
          towards ``max_attempts``, see `lost`);
        - or the connection (up since loop time ``up_since``) has been up ``patience`` seconds
          since it failed, doubling with each close on it since that did not count (up to an
          hour): a link carrying only QoS 0 events, which are no evidence, may never be idle,
          and held it back for as long as they came. (Such a close is not counted: with a sink
          refusing every event, or a wrong topic template, all of them would be dead-lettered.)
        """
        confirmed = self.confirmed
        since = -math.inf if up_since is None else up_since

        def worth(s: Suspect) -> bool:
            if idle or confirmed > s.confirmed_at_failure:
                return True
            # Capped at an hour, but never below the patience itself (a keep-alive over 40
            # minutes makes a longer silence limit), nor is "never" (inf) an hour.
            wait = min(patience * 2.0 ** min(s.unproven, 16), max(MAX_RETRY_WAIT, patience))
            return now - max(s.lost_at, since) >= wait

        return next((s for s in self._by_seq.values() if now >= s.retry_after and worth(s)), None)

    def next_retry(self, now: float) -> float | None:
        """Seconds from ``now`` until one held back after timeouts may go again, or None."""
        later = [s.retry_after for s in self._by_seq.values() if s.retry_after]
        if not later:
            return None
        return max(0.0, min(later) - now)

    def delivered(self, seqs: list[int], qos: int) -> list[int]:
        """Count acknowledged ``seqs``; return those of them that were set aside (no more)."""
        if qos > 0:
            self.confirmed += len(seqs)
        if not self._by_seq:
            return []
        return [seq for seq in seqs if self._by_seq.pop(seq, None) is not None]

    def lost(
        self,
        event: StoredEvent,
        *,
        closed: bool,
        publish_timeout: float,
        now: float,
        silent: bool = False,
    ) -> int | None:
        """The connection was lost with ``event`` alone in flight: ``closed`` by the other side,
        or not (our publish timeout; ``silent``: a link gone silent) at loop time ``now``. A
        silent link's first loss of an event makes it wait no longer than a close does: a quiet
        link's blackhole is common, and says nothing about the event. Returns how many
        losses count against the event if this one counted (the caller keeps that count, or
        dead-letters the event once it reaches ``max_attempts`` and then `forget`s it), else
        None. The event is set aside (up to `MAX_SUSPECTS`; beyond, its count is kept)."""
        suspect = self._by_seq.pop(event.seq, None)
        if suspect is None and (earlier := self._earlier.pop(event.seq, None)) is not None:
            suspect = Suspect(event, *earlier)
        # Poison is an event the connection keeps being closed on (SPEC §5). Our own publish
        # timeout is not that: a large event on a slow link, or a server that stopped
        # acknowledging; the event is still tried alone later, but never dead-lettered for it.
        counted = False
        first = suspect is None
        if suspect is None:
            suspect = Suspect(event, int(closed), self.confirmed)
            counted = closed
        elif closed and self.confirmed > suspect.confirmed_at_failure:
            suspect.failures += 1  # others got through since its last failure: it counts
            counted = True
        suspect.confirmed_at_failure = self.confirmed
        suspect.lost_at = now
        if closed and not first:
            # Silent losses and timeouts wait `retry_after` instead.
            suspect.unproven = 0 if counted else suspect.unproven + 1
        if not closed and not (silent and first):
            # Each try alone holds everything else back for a whole publish_timeout: after
            # each timeout the next try waits twice as long (up to an hour), so an event a
            # server never acknowledges costs less and less throughput, and is not dropped.
            suspect.timeouts += 1
            wait = min(publish_timeout * 2 ** min(suspect.timeouts, 16), MAX_RETRY_WAIT)
            suspect.retry_after = now + wait
        # Kept even at max_attempts, until the caller forgets it: a count restored at or over a
        # lowered max_attempts, or a dead letter that failed, must not start over at 1.
        if len(self._by_seq) < MAX_SUSPECTS:
            self._by_seq[event.seq] = suspect
        elif suspect.failures:
            self._earlier[event.seq] = (suspect.failures, suspect.confirmed_at_failure)
        return suspect.failures if counted else None

    def forget(self, seq: int) -> None:
        """Event ``seq`` left the buffer (dead-lettered, or gone): nothing more to try."""
        self._by_seq.pop(seq, None)
        self._earlier.pop(seq, None)
