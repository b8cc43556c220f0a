"""The agent's Python API, one of its three sources (the local listener and the command line have
their own modules): `Agent.publish` and `publish_many` return the event id once it is committed,
refuse an invalid event at the door and raise BufferFull under a reject rule, and a call from
another event loop or after the agent stopped stores nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from edge_agent import Agent, BufferFull, InvalidEvent, load_config
from edge_agent.buffer import inspect, read_events
from tests.harness.agent import write_config


async def test_api_publish_returns_the_event_id_once_committed(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, device_id="dev-api"))
    async with Agent(config) as agent:
        first = await agent.publish("sensors/t1", b"21.5")
        second = await agent.publish("alarms/door", b"open")
        device, epoch, seq = first.split("/")
        assert (device, seq) == ("dev-api", "1")
        assert second == f"dev-api/{epoch}/2"
        stats = inspect(config.agent.data_dir)  # read-only, while the agent runs
        assert stats.events == 2
    events = {e.topic: e for e in read_events(config.agent.data_dir)}
    assert (events["alarms/door"].qos, events["alarms/door"].priority) == (2, 9)
    assert (events["sensors/t1"].qos, events["sensors/t1"].priority) == (1, 0)


async def test_api_publish_after_the_agent_stopped_is_a_runtime_error(tmp_path: Path) -> None:
    """`running` stayed True after the `async with`, and a publish failed on the closed buffer
    with a BufferError instead of the documented RuntimeError."""
    agent = Agent(load_config(write_config(tmp_path)))
    states = [agent.running]
    async with agent:
        states.append(agent.running)
        await agent.publish("sensors/a", b"1")
    states.append(agent.running)
    assert states == [False, True, False]
    with pytest.raises(RuntimeError, match="the agent is not running"):
        await agent.publish("sensors/a", b"2")
    assert [e.payload for e in read_events(tmp_path / "data")] == [b"1"]


async def test_api_publish_from_another_event_loop_stores_nothing(tmp_path: Path) -> None:
    """From another thread's event loop, `publish` raised (its future belongs to the agent's
    loop) but its event was committed all the same: a caller retrying on the error stored it
    twice. It is refused before anything is queued now, saying which loop to use."""
    config = load_config(write_config(tmp_path))
    async with Agent(config) as agent:

        def elsewhere() -> list[str]:
            refusals = []
            for call in (
                lambda: agent.publish("sensors/a", b"1"),
                lambda: agent.publish_many([("sensors/a", b"2")]),
            ):
                try:
                    asyncio.run(call())
                except RuntimeError as exc:
                    refusals.append(str(exc))
            return refusals

        refusals = await asyncio.to_thread(elsewhere)
        await asyncio.sleep(0.1)  # a commit of what was queued would have happened by now
        assert await agent.publish("sensors/a", b"3")  # the agent is none the worse for it
    assert len(refusals) == 2
    assert all("runs on another event loop" in refusal for refusal in refusals)
    assert [e.payload for e in read_events(config.agent.data_dir)] == [b"3"]


async def test_api_publish_of_a_str_payload_is_refused_at_the_call_alone(tmp_path: Path) -> None:
    """The group insert binds payloads as ``bytearray(payload)``: a ``str`` payload (typed
    ``bytes``, but Python lets it through) raised TypeError on the committer's thread, and the
    whole group commit failed with it, every other publisher's event of that group refused
    ("commit failed"). It is refused at the call now, to its caller only, nothing stored."""
    config = load_config(write_config(tmp_path))
    async with Agent(config) as agent:
        await agent.publish("sensors/a", b"0")
        outcomes = await asyncio.gather(
            *[agent.publish("sensors/a", b"%d" % i) for i in range(1, 4)],
            agent.publish("sensors/b", "text"),  # type: ignore[arg-type]
            *[agent.publish("sensors/a", b"%d" % i) for i in range(4, 7)],
            return_exceptions=True,
        )
        with pytest.raises(TypeError, match="payload must be bytes, not str"):
            await agent.publish_many([("sensors/a", b"7"), ("sensors/b", "text")])  # type: ignore[list-item]
    refused = outcomes.pop(3)
    assert isinstance(refused, TypeError)
    assert all(isinstance(outcome, str) for outcome in outcomes), outcomes
    stored = [e.payload for e in read_events(config.agent.data_dir)]
    assert stored == [b"%d" % i for i in range(7)]


async def test_api_publish_many_commits_together_and_reports_each_outcome(
    tmp_path: Path,
) -> None:
    config = load_config(write_config(tmp_path, device_id="dev-many", buffer="max_events = 5"))
    async with Agent(config) as agent:
        commits = agent.buffer.commits
        ids = await agent.publish_many(
            [("sensors/a", b"1"), ("alarms/b", b"2"), ("sensors/a", b"3")]
        )
        assert agent.buffer.commits == commits + 1  # one commit, one wait
        assert [str(i).rsplit("/", 1)[1] for i in ids] == ["1", "2", "3"]
        assert all(isinstance(i, str) and i.startswith("dev-many/") for i in ids)
        # One bad event: said with its index, and none of them is stored.
        with pytest.raises(InvalidEvent, match=r"event 1: .*wildcards"):
            await agent.publish_many([("sensors/a", b"4"), ("sensors/#", b"5")])
        assert inspect(config.agent.data_dir).events == 3
        # A full buffer refuses some (a reject rule): the rest are committed.
        outcomes = await agent.publish_many([(f"sensors/{n}", b"x") for n in range(4)])
        assert [type(o) for o in outcomes] == [str, str, BufferFull, BufferFull]
        assert await agent.publish_many([]) == []
    assert [e.payload for e in read_events(config.agent.data_dir)] == [b"2", b"1", b"3", b"x", b"x"]


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("a/+/b", b"x", "wildcards"),
        ("a/#", b"x", "wildcards"),
        ("a/\x00", b"x", "NUL"),
        ("a//b", b"x", "empty level"),
        ("/a", b"x", "empty level"),
        ("a/", b"x", "empty level"),
        ("a/../b", b"x", r"cannot be '\.' or '\.\.'"),
        ("a/.", b"x", r"cannot be '\.' or '\.\.'"),
        # The sink refuses these as well (a consumer would resolve them as path steps): stored,
        # each would close the link until dead-lettered.
        ("a/\u2025/b", b"x", r"cannot be '\.' or '\.\.', nor become one"),
        ("a/..\\b", b"x", r"cannot be '\.' or '\.\.', nor become one"),
        ("a/%2e%2e/b", b"x", r"cannot be '\.' or '\.\.', nor become one"),
        ("", b"x", "empty"),
        ("t" * 65536, b"x", "over MQTT's 65535"),
        ("bulk/x", b"y" * 1025, "over max_payload 1024"),
    ],
)
async def test_invalid_events_are_refused_at_the_door(
    tmp_path: Path, topic: str, payload: bytes, reason: str
) -> None:
    config = load_config(write_config(tmp_path))
    async with Agent(config) as agent:
        with pytest.raises(InvalidEvent, match=reason):
            await agent.publish(topic, payload)
        assert (await agent.buffer.stats()).events == 0


async def test_reject_policy_raises_buffer_full_to_the_api(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, buffer="max_events = 2"))
    async with Agent(config) as agent:
        await agent.publish("sensors/a", b"1")
        await agent.publish("alarms/b", b"2")
        with pytest.raises(BufferFull, match="max_events"):
            await agent.publish("alarms/c", b"3")
        # A drop-oldest topic makes room by dropping the oldest event of its priority or lower,
        # never the priority-9 alarm.
        await agent.publish("bulk/x", b"4")
        stats = await agent.buffer.stats()
        assert [t.topic for t in stats.topics] == ["alarms/b", "bulk/x"]
        assert stats.drops == {("buffer-full", "sensors/a"): (1, 1)}
