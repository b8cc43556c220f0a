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
from tests.harness.sink import core_message


async def test_publish_stores_in_order_and_counts_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "core.db"
    queue = await SqliteCoreQueue.open(path)
    first = await queue.publish([core_message(1), core_message(2), core_message(3)])
    again = await queue.publish([core_message(2), core_message(3), core_message(4)])
    assert (first.stored, first.duplicates) == (3, 0)
    assert (again.stored, again.duplicates) == (1, 2)
    assert queue.duplicates == 2
    # Visible to another reader while the queue is open: confirmed means committed.
    assert [m.seq for _, m in read_messages(path)] == [1, 2, 3, 4]
    await queue.aclose()
    stored = list(read_messages(path))
    assert stored[0][1] == core_message(1)
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
        *(queue.publish([core_message(s, f"dev-{d}") for s in range(1, 51)]) for d in range(10))
    )
    await queue.aclose()
    assert len(list(read_messages(path))) == 500
