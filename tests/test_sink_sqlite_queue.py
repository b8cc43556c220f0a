"""The embedded core queue: confirmed means on disk, an event id is stored once."""

from __future__ import annotations

import asyncio
from pathlib import Path

from cloud_sink.backends import (
    CoreMessage,
    DeadLetterMessage,
    SqliteCoreQueue,
    read_dead_letters,
    read_messages,
)


def message(seq: int, device: str = "dev-1") -> CoreMessage:
    return CoreMessage(
        event_id=f"{device}/00112233aabbccdd/{seq}",
        device_id=device,
        topic=f"devices/{device}/t",
        payload=f"p{seq}".encode(),
        qos=1,
        received_at_ms=1_700_000_000_000 + seq,
        seq=seq,
        event_time_ms=1_699_999_999_000 + seq,
    )


async def test_publish_stores_in_order_and_counts_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "core.db"
    queue = await SqliteCoreQueue.open(path)
    first = await queue.publish([message(1), message(2), message(3)])
    again = await queue.publish([message(2), message(3), message(4)])
    assert (first.stored, first.duplicates) == (3, 0)
    assert (again.stored, again.duplicates) == (1, 2)
    assert queue.duplicates == 2
    # Visible to another reader while the queue is open: confirmed means committed.
    assert [m.seq for _, m in read_messages(path)] == [1, 2, 3, 4]
    await queue.aclose()
    stored = list(read_messages(path))
    assert stored[0][1] == message(1)
    assert [m.seq for _, m in read_messages(path, after=stored[1][0])] == [3, 4]


async def test_raw_publishes_without_seq_and_dead_letters(tmp_path: Path) -> None:
    path = tmp_path / "core.db"
    queue = await SqliteCoreQueue.open(path)
    raw = CoreMessage("sink-abc", "dev-2", "devices/dev-2/x", b"raw", 0, 1)
    await queue.publish([raw])
    bad = DeadLetterMessage("dev-2", "devices/dev-2/a.b", b"\x00", "topic level 'a.b'", 5)
    await queue.dead_letter([bad])
    await queue.aclose()
    assert [m for _, m in read_messages(path)] == [raw]
    assert read_dead_letters(path) == [bad]


async def test_concurrent_batches_from_many_devices(tmp_path: Path) -> None:
    path = tmp_path / "core.db"
    queue = await SqliteCoreQueue.open(path)
    await asyncio.gather(
        *(queue.publish([message(s, f"dev-{d}") for s in range(1, 51)]) for d in range(10))
    )
    await queue.aclose()
    assert len(list(read_messages(path))) == 500
