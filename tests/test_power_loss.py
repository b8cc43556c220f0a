"""RELIABILITY F2: a power loss keeps every acknowledged event with ``durability = "full"``.

The buffer runs over a VFS that drops every write not yet fsynced when the "power" goes; then a
fresh buffer opens what the "disk" kept. With ``"normal"`` the same crash loses recent commits,
which is what docs/buffer.md says ``normal`` trades for speed (and shows the simulation bites).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import uuid
from pathlib import Path
from typing import Literal

import apsw
import pytest

from edge_agent.buffer import Buffer, BufferFull, read_events
from tests.harness.buffer import event
from tests.harness.powerloss import ApswConnection, CrashVFS

pytestmark = pytest.mark.fault


async def crash_during_appends(
    directory: Path, durability: Literal["full", "normal"], seed: int
) -> tuple[set[bytes], set[bytes], CrashVFS, int]:
    """Append from 8 producers, cut the power at a random instant; return (acked, kept, the
    simulated disk, the highest seq acknowledged)."""
    async with await Buffer.open(directory):
        pass  # the agent has run here before: the schema is on disk
    vfs = CrashVFS(f"crash-{uuid.uuid4().hex[:8]}")
    rng = random.Random(seed)
    acked: set[bytes] = set()
    seqs = [0]
    buffer = await Buffer.open(
        directory, durability=durability, connect=ApswConnection.factory(vfs)
    )
    state = (directory / "buffer.state").read_text()  # as the run leaves it if it crashes

    async def producer(name: int) -> None:
        for number in range(100_000):
            payload = f"{name}-{number}".encode() + b"x" * rng.randrange(10, 400)
            outcome = await buffer.append([event(payload)])
            if isinstance(outcome[0], BufferFull):
                raise AssertionError(outcome[0])
            acked.add(payload)
            seqs.append(outcome[0])

    tasks = [asyncio.create_task(producer(i)) for i in range(8)]
    await asyncio.sleep(rng.uniform(0.3, 0.8))
    vfs.power_off()
    # Whatever is acknowledged from here on was never durable: stop counting at the cut.
    acked_at_cut, last_seq = set(acked), max(seqs)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    with contextlib.suppress(apsw.Error):
        await buffer.aclose()  # writes nothing: the disk is off (the final checkpoint fails)
    vfs.restore()
    (directory / "buffer.state").write_text(state)  # as the crashed run left it
    kept = {e.payload for e in read_events(directory)}
    return acked_at_cut, kept, vfs, last_seq


def integrity(path: Path) -> str:
    """``PRAGMA integrity_check`` (RELIABILITY's "ok" after a restart), read-only."""
    db = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
    try:
        return "; ".join(str(row[0]) for row in db.execute("PRAGMA integrity_check"))
    finally:
        db.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_full_durability_keeps_every_acked_event(tmp_path: Path, seed: int) -> None:
    acked, kept, vfs, _ = await crash_during_appends(tmp_path, "full", seed)
    assert len(acked) > 100, "too little traffic before the cut to mean anything"
    assert vfs.syncs > 0
    missing = acked - kept
    assert not missing, f"seed {seed}: {len(missing)} of {len(acked)} acked events lost"
    # The database the disk kept is sound (the full check, not only the buffer's quick_check at
    # open) and the buffer carries on from it.
    assert integrity(tmp_path / "buffer.db") == "ok"
    async with await Buffer.open(tmp_path) as buffer:
        stats = await buffer.stats()
        assert stats.incidents == []
        assert stats.events == len(kept)
        await buffer.append_one(event(b"after the power came back"))


async def test_normal_durability_can_lose_recent_commits(tmp_path: Path) -> None:
    acked, kept, _, last_seq = await crash_during_appends(tmp_path, "normal", seed=7)
    assert len(acked) > 100
    lost = acked - kept
    # Commits since the last checkpoint were never fsynced: gone, but the database is sound.
    assert lost, "normal durability lost nothing: the power-loss simulation is not biting"
    assert integrity(tmp_path / "buffer.db") == "ok"
    async with await Buffer.open(tmp_path) as buffer:
        assert (await buffer.stats()).incidents == []
        # The lost commits' seqs may be at the sink already: none is given again.
        assert await buffer.append_one(event(b"after")) > last_seq
