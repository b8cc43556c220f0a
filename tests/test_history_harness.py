"""The history checker finds what it is there to find: a loss, a duplicate under either id, a
core queue out of seq order, and a seq order that is not the producer's."""

from __future__ import annotations

from tests.harness.history import Delivered, History


def history(*numbers: int, device: str = "d", topic: str = "t") -> History:
    h = History()
    for number in numbers:
        h.accepted(device, topic, number)
    return h


def event(number: int, seq: int, event_id: str | None = None, topic: str = "t") -> Delivered:
    return Delivered("d", topic, number, seq, event_id or f"d/e/{seq}")


def test_everything_delivered_once_in_order_is_ok() -> None:
    verdict = history(0, 1, 2).check([event(0, 1), event(1, 2), event(2, 3)])
    assert verdict.ok
    assert verdict.figures()["lost"] == 0
    assert (verdict.accepted, verdict.delivered, verdict.reordered) == (3, 3, 0)


def test_an_acknowledged_event_missing_is_lost() -> None:
    verdict = history(0, 1, 2).check([event(0, 1), event(2, 3)])
    assert not verdict.ok
    assert (verdict.lost_count, verdict.lost) == (1, [("d", "t", 1)])


def test_a_second_copy_is_a_duplicate_under_the_same_id_or_another() -> None:
    same_id = history(0, 1).check([event(0, 1), event(1, 2), event(1, 2)])
    other_id = history(0, 1).check([event(0, 1), event(1, 2), event(1, 5)])
    assert (same_id.duplicates, other_id.duplicates) == (1, 1)
    assert not same_id.ok
    assert not other_id.ok


def test_out_of_seq_order_is_reported_and_allowed_when_seq_restores_it() -> None:
    verdict = history(0, 1, 2).check([event(0, 1), event(2, 3), event(1, 2)])
    assert verdict.reordered == 1
    assert verdict.ok


def test_a_seq_order_that_is_not_the_producers_cannot_be_restored() -> None:
    verdict = history(0, 1).check([event(1, 1), event(0, 2)])
    assert verdict.unrestorable == ["d t"]
    assert not verdict.ok


def test_delivered_without_an_acknowledgement_is_counted_not_an_error() -> None:
    verdict = history(0, 2).check([event(0, 1), event(1, 2), event(2, 3)])
    assert verdict.ok
    assert verdict.unacknowledged == 1


def test_pairs_are_checked_separately() -> None:
    h = history(0, 1)
    h.accepted("d", "u", 0)
    verdict = h.check([event(0, 1), event(1, 3), event(0, 2, topic="u")])
    assert verdict.ok
    assert verdict.accepted == 3
