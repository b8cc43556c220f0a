"""The history checker (RELIABILITY "Harness"): what the producers saw acknowledged against what
the core queue holds, per (device, topic).

Producers number their events per (device, topic) and never send a number twice, acknowledged or
not; `History.accepted` records each number whose acknowledgement they saw. `History.check` takes
the core queue's content in its order and reports:

- ``lost``: acknowledged, not in the core queue (SPEC P1: must be none);
- ``duplicates``: deliveries beyond the first of one number, under one event id or several (P2);
- ``reordered``: (device, topic) pairs whose core-queue order is not seq order (P3 allows it after
  faults), and ``unrestorable``: pairs whose seq order is not the producer's order (P3: consumers
  restore the order by seq, so this must be none);
- ``unacknowledged``: delivered although the producer never saw the acknowledgement (the agent
  committed it, then the local connection or the agent died): allowed, counted.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Delivered", "History", "Verdict"]


@dataclass(frozen=True, slots=True)
class Delivered:
    """One event as the core queue holds it."""

    device: str
    topic: str  # as the producer published it (without the uplink's prefix)
    number: int  # the producer's number, from the payload
    seq: int
    event_id: str


@dataclass(frozen=True)
class Verdict:
    accepted: int
    delivered: int
    lost: list[tuple[str, str, int]]  # (device, topic, number), the first few
    lost_count: int
    duplicates: int
    reordered: int
    unrestorable: list[str]  # "device topic" pairs
    unacknowledged: int

    @property
    def ok(self) -> bool:
        return self.lost_count == 0 and self.duplicates == 0 and not self.unrestorable

    def figures(self) -> dict[str, object]:
        return {
            "accepted": self.accepted,
            "delivered": self.delivered,
            "lost": self.lost_count,
            "duplicates": self.duplicates,
            "reordered_pairs": self.reordered,
            "unrestorable_pairs": len(self.unrestorable),
            "unacknowledged_delivered": self.unacknowledged,
        }


class History:
    def __init__(self) -> None:
        self._accepted: set[tuple[str, str, int]] = set()

    def accepted(self, device: str, topic: str, number: int) -> None:
        """The producer saw the acknowledgement of ``number`` on (``device``, ``topic``)."""
        self._accepted.add((device, topic, number))

    def check(self, delivered: Sequence[Delivered]) -> Verdict:
        """Compare with ``delivered``, the core queue's content in its order."""
        # A number is published once: a second copy, whether under the same event id (the core
        # queue did not dedupe) or another (the agent stored it twice), is a duplicate.
        numbers = Counter((d.device, d.topic, d.number) for d in delivered)
        duplicates = len(delivered) - len(numbers)
        per_pair: dict[tuple[str, str], list[Delivered]] = defaultdict(list)
        for event in delivered:
            per_pair[event.device, event.topic].append(event)
        reordered = 0
        unrestorable: list[str] = []
        for (device, topic), events in per_pair.items():
            seqs = [e.seq for e in events]
            if seqs != sorted(seqs):
                reordered += 1
            by_seq = [e.number for e in sorted(events, key=lambda e: e.seq)]
            if any(a >= b for a, b in itertools.pairwise(by_seq)):
                unrestorable.append(f"{device} {topic}")
        lost = sorted(self._accepted - numbers.keys())
        return Verdict(
            accepted=len(self._accepted),
            delivered=len(delivered),
            lost=lost[:20],
            lost_count=len(lost),
            duplicates=duplicates,
            reordered=reordered,
            unrestorable=unrestorable,
            unacknowledged=len(numbers.keys() - self._accepted),
        )
