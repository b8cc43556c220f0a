"""Poison handling's bookkeeping (edge_agent/suspects.py): which losses count towards
``max_attempts``, and the counts an earlier run of the agent kept in the buffer."""

from __future__ import annotations

from edge_agent.buffer import StoredEvent
from edge_agent.suspects import MAX_SUSPECTS, Suspects

MAX_ATTEMPTS = 5


def stored(seq: int) -> StoredEvent:
    return StoredEvent(seq, "sensors/t", b"x", 1, 0, 0, 1)


def closed(suspects: Suspects, seq: int) -> int | None:
    """The connection was closed with event ``seq`` alone in flight."""
    return suspects.lost(stored(seq), closed=True, publish_timeout=10.0, now=0.0)


def test_a_loss_counts_only_after_other_events_got_through_since_the_last() -> None:
    suspects = Suspects()
    assert closed(suspects, 7) == 1  # the first loss counts
    assert list(suspects.seqs) == [7]
    assert suspects.candidate(idle=False, now=0.0) is None  # nothing got through since
    assert closed(suspects, 7) is None  # a dead link, not a poison event: not counted
    assert suspects.delivered([1, 2], qos=0) == []  # QoS 0 writes are no evidence
    assert closed(suspects, 7) is None
    assert suspects.delivered([3], qos=1) == []
    candidate = suspects.candidate(idle=False, now=0.0)
    assert candidate is not None
    assert candidate.event.seq == 7
    assert closed(suspects, 7) == 2


def test_counts_of_an_earlier_run_go_on_once_other_events_got_through() -> None:
    suspects = Suspects()
    suspects.remember([stored(7)], {7: 3, 8: 1})
    assert list(suspects.seqs) == [7]  # set aside again: tried alone
    assert suspects.candidate(idle=False, now=0.0) is None
    idle = suspects.candidate(idle=True, now=0.0)  # nothing else to send: tried at once
    assert idle is not None
    assert idle.event.seq == 7
    assert closed(suspects, 7) is None  # nothing got through in this run yet
    assert closed(suspects, 8) is None  # its count (not set aside: beyond the limit) too
    suspects.delivered([1], qos=1)
    assert closed(suspects, 7) == 4
    assert closed(suspects, 8) == 2
    suspects.delivered([2], qos=2)
    assert closed(suspects, 7) == MAX_ATTEMPTS  # the caller dead-letters it, then forgets it
    assert 7 in suspects.seqs
    suspects.forget(7)
    assert 7 not in suspects.seqs


def test_a_count_at_or_over_max_attempts_is_not_started_over() -> None:
    """Found by review: with max_attempts lowered across a restart (a count of 4 kept, 3 now),
    or a dead letter that failed, the event was no longer set aside, and its next counted loss
    started the count over at 1 (written over the 4 in the buffer)."""
    suspects = Suspects()
    suspects.remember([stored(7)], {7: 4})
    assert closed(suspects, 7) is None  # nothing got through in this run yet
    assert 7 in suspects.seqs
    suspects.delivered([1], qos=1)
    assert closed(suspects, 7) == 5  # not 1: dead-lettered now at any max_attempts up to 5


def test_counts_beyond_the_events_set_aside_are_kept() -> None:
    suspects = Suspects()
    for seq in range(1, MAX_SUSPECTS + 2):
        assert closed(suspects, seq) == 1
    assert len(suspects.seqs) == MAX_SUSPECTS
    assert MAX_SUSPECTS + 1 not in suspects.seqs  # read and sent with the rest again
    suspects.delivered([10_000], qos=1)
    assert closed(suspects, MAX_SUSPECTS + 1) == 2  # not 1: its first loss was not forgotten


def test_a_silent_link_never_counts_and_delays_only_a_second_loss() -> None:
    """A blackhole (keep-alive, the silence watchdog) with an event alone in flight: never a
    count towards dead-lettering; the first time it goes again as soon as the link is back (it
    waited twice the publish timeout, failing a drain expected within a minute), a second time
    only after a wait, as after a publish timeout (a path that drops large packets)."""
    suspects = Suspects()

    def silent(now: float) -> int | None:
        return suspects.lost(stored(7), closed=False, publish_timeout=10.0, now=now, silent=True)

    assert silent(now=0.0) is None
    candidate = suspects.candidate(idle=True, now=0.0)
    assert candidate is not None
    assert candidate.event.seq == 7
    assert suspects.delivered([3], qos=1) == []
    assert silent(now=1.0) is None
    assert suspects.candidate(idle=True, now=1.0) is None
    assert suspects.next_retry(now=1.0) == 20.0  # 2 x the publish timeout from now
    assert suspects.candidate(idle=True, now=21.0) is not None


def test_a_link_up_long_enough_is_evidence_when_only_qos0_gets_through() -> None:
    """Found by review: only QoS 1/2 acknowledgements count as events getting through, and a
    link carrying a steady QoS 0 stream may never be idle: an event set aside waited for as
    long as the stream lasted. A connection up ``patience`` seconds since its loss is enough to
    try it again; a close on it then does not count (a sink refusing everything, a wrong topic
    template, would get every event dead-lettered), and the next such try waits twice as long."""
    suspects = Suspects()
    assert suspects.lost(stored(7), closed=True, publish_timeout=10.0, now=100.0) == 1
    assert suspects.delivered([1, 2, 3], qos=0) == []  # the QoS 0 stream goes on
    # A new connection up since 105: not yet 30 s since the loss, nor since it came up.
    assert suspects.candidate(idle=False, now=120.0, up_since=105.0, patience=30.0) is None
    assert suspects.candidate(idle=False, now=134.0, up_since=105.0, patience=30.0) is None
    candidate = suspects.candidate(idle=False, now=135.0, up_since=105.0, patience=30.0)
    assert candidate is not None
    assert candidate.event.seq == 7
    assert suspects.lost(stored(7), closed=True, publish_timeout=10.0, now=136.0) is None
    # Now 60 s of a connection (a poison event among QoS 0 closes connections less and less
    # often, up to an hourly try, and is never dead-lettered without evidence); idle: at once.
    assert suspects.candidate(idle=False, now=170.0, up_since=140.0, patience=30.0) is None
    assert suspects.candidate(idle=False, now=200.0, up_since=140.0, patience=30.0) is not None
    assert suspects.candidate(idle=True, now=141.0, up_since=140.0, patience=30.0) is not None
    assert suspects.lost(stored(7), closed=True, publish_timeout=10.0, now=201.0) is None
    assert suspects.candidate(idle=False, now=320.0, up_since=201.5, patience=30.0) is None
    assert suspects.candidate(idle=False, now=322.0, up_since=201.5, patience=30.0) is not None
    # Evidence after all: the next close counts, and the wait starts over.
    assert suspects.delivered([8], qos=1) == []
    assert suspects.lost(stored(7), closed=True, publish_timeout=10.0, now=330.0) == 2
    assert suspects.candidate(idle=False, now=360.0, up_since=331.0, patience=30.0) is None
    assert suspects.candidate(idle=False, now=361.0, up_since=331.0, patience=30.0) is not None


def test_the_cap_on_the_wait_never_shortens_the_patience() -> None:
    suspects = Suspects()
    assert suspects.lost(stored(7), closed=True, publish_timeout=10.0, now=0.0) == 1
    assert suspects.candidate(idle=False, now=7200.0) is None  # no patience given: never
    huge = 5000.0  # the silence limit of a 55-minute keep-alive
    assert suspects.candidate(idle=False, now=4999.0, up_since=0.0, patience=huge) is None
    assert suspects.candidate(idle=False, now=5000.0, up_since=0.0, patience=huge) is not None
