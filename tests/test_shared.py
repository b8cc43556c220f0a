"""The shared seams: failpoints, the fake clock and device-id validation."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import unicodedata
import urllib.parse
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqtt_ingest import FakeClock, InvalidIdentifier, SystemClock, failpoints, validate_device_id
from mqtt_ingest.backoff import Backoff
from mqtt_ingest.failpoints import FailpointError
from mqtt_ingest.lifecycle import cancel_until_done

LOOP_WITH_FAILPOINT = (
    "from mqtt_ingest import failpoints\n"
    "for i in range(5):\n"
    "    failpoints.hit('demo.step')\n"
    "    print(i, flush=True)\n"
)


@pytest.fixture(autouse=True)
def _disarmed() -> Iterator[None]:
    failpoints.disarm_all()
    yield
    failpoints.disarm_all()


def test_unarmed_failpoint_does_nothing() -> None:
    for _ in range(3):
        failpoints.hit("nothing.armed")


def test_raise_on_the_nth_hit_only() -> None:
    failpoints.arm("step", "raise@2")
    failpoints.hit("step")
    with pytest.raises(FailpointError, match="'step'"):
        failpoints.hit("step")
    failpoints.hit("step")
    failpoints.hit("other")


def test_raise_on_a_range_of_hits() -> None:
    failpoints.arm("step", "raise@2-3")
    fired = []
    for _ in range(5):
        try:
            failpoints.hit("step")
        except FailpointError:
            fired.append(True)
        else:
            fired.append(False)
    assert fired == [False, True, True, False, False]


def test_async_sleep_yields_to_the_loop() -> None:
    failpoints.arm("slow", "sleep:0.05")
    ticks: list[int] = []

    async def ticker() -> None:
        for i in range(3):
            ticks.append(i)
            await asyncio.sleep(0)

    async def scenario() -> None:
        await asyncio.gather(failpoints.ahit("slow"), ticker())

    asyncio.run(scenario())
    assert ticks == [0, 1, 2]


def test_kill9_from_the_environment_kills_the_subprocess_at_the_nth_hit() -> None:
    result = subprocess.run(
        [sys.executable, "-c", LOOP_WITH_FAILPOINT],
        env={"BRIDGE_FAILPOINTS": "demo.step=kill9@3", "PYTHONPATH": "."},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == -signal.SIGKILL
    assert result.stdout.split() == ["0", "1"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("novalue", "is not name=action"),
        ("=raise", "is not name=action"),
        ("x=explode", "action must be kill9, raise or sleep:S"),
        ("x=raise@0", "positive whole numbers"),
        ("x=raise@3-2", "N <= M"),
        ("x=raise@1-", "positive whole numbers"),
        ("x=sleep:soon", "sleep:S needs seconds"),
    ],
)
def test_bad_specs_are_refused_with_the_item(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        failpoints.parse_spec(spec)
    assert spec in str(info.value)


def test_bad_environment_spec_stops_the_program_with_its_reason() -> None:
    result = subprocess.run(
        [sys.executable, "-c", LOOP_WITH_FAILPOINT],
        env={"BRIDGE_FAILPOINTS": "demo.step=explode", "PYTHONPATH": "."},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "BRIDGE_FAILPOINTS" in result.stderr
    assert result.stdout == ""


def test_fake_clock_advance_and_skew() -> None:
    clock = FakeClock(start=1000.0)
    clock.advance(5)
    assert (clock.time(), clock.monotonic()) == (1005.0, 5.0)
    clock.skew(-300)
    assert (clock.time(), clock.monotonic()) == (705.0, 5.0)
    with pytest.raises(ValueError, match="backwards"):
        clock.advance(-1)


def test_system_clock_monotonic_never_goes_back() -> None:
    clock = SystemClock()
    first = clock.monotonic()
    assert clock.monotonic() >= first
    assert clock.time() > 1_600_000_000


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "empty"),
        ("a/b", "topic level separator"),
        ("a+b", "wildcard"),
        ("a#", "wildcard"),
        ("dev.1", "NATS"),
        ("dev*", "wildcard"),
        ("dev>", "wildcard"),
        ("dev\x00", "NUL"),
        ("dev 1", "white space"),
        ("dev\t1", "white space"),
        ("dev\x7f", "control"),
        ("x" * 129, "over the limit of 128"),
        ("é" * 65, "130 bytes"),
        ("dev\ud800", "UTF-8"),
        ("dev?13", "connection parameters"),  # could never connect: the user name splits there
        ("dev-13\u200b", r"U\+200B"),  # zero width: reads as dev-13 in a log or a deny list
        ("dev\u202e31-", r"U\+202E"),  # right-to-left override
        ("\u2060dev-13", r"U\+2060"),
        ("dev-13\ufeff", r"U\+FEFF"),
        # What becomes '.', '..' or '/' for a consumer that percent-decodes, NFKC-normalises or
        # reads '\\' as a separator (mqtt_ingest/topics.py): another device's prefix there.
        ("%2E%2E", "percent"),
        ("victim%2fspoof", "percent"),
        ("\uff0e\uff0e", "NFKC"),
        ("victim\uff0fspoof", "NFKC"),
        ("victim\\spoof", "separator"),
        ("cafe\u0301-1", "NFKC"),  # reads as the NFC 'café-1', a different id
    ],
)
def test_invalid_device_ids_are_refused_with_a_reason(value: str, reason: str) -> None:
    with pytest.raises(InvalidIdentifier, match=reason):
        validate_device_id(value)


@pytest.mark.parametrize("value", ["dev-42", "sensor_7", "Zone-A:pump-3", "x" * 128, "капля-1"])
def test_valid_device_ids_are_returned_unchanged(value: str) -> None:
    assert validate_device_id(value) == value


@given(st.text(min_size=1, max_size=200))
def test_every_accepted_id_is_safe_as_topic_level_subject_token_and_file_name(value: str) -> None:
    try:
        validate_device_id(value)
    except InvalidIdentifier:
        return
    assert not set(value) & set("/+#.*>?\x00")
    assert value.strip() == value
    assert not any(unicodedata.category(c)[0] in "CZ" for c in value), "an invisible character"
    assert value not in {".", ".."}
    assert len(value.encode()) <= 128
    assert unicodedata.normalize("NFKC", value) == value
    assert "\\" not in value
    assert urllib.parse.unquote(value) == value


async def test_cancel_until_done_ends_a_task_that_swallowed_its_cancellation() -> None:
    # What Python 3.11's asyncio.wait_for, inside aio-pika, nats-py and aiomqtt, does when the
    # cancellation lands as the call completes: the task carries on with its loop.
    swallowed = 0

    async def loop_over_calls() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1

    task = asyncio.create_task(loop_over_calls())
    plain = asyncio.create_task(asyncio.sleep(3600))
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await cancel_until_done([task, plain], again_every=0.05)
    assert swallowed == 1
    assert task.cancelled()
    assert plain.cancelled()


async def test_cancel_until_done_cancels_a_well_behaved_task_once() -> None:
    cancelled = 0
    cleaned_up = False

    async def cleans_up() -> None:
        nonlocal cancelled, cleaned_up
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled += 1
            await asyncio.sleep(0.05)  # a clean-up shorter than again_every: not cut short
            cleaned_up = True
            raise

    task = asyncio.create_task(cleans_up())
    await asyncio.sleep(0)
    await cancel_until_done([task], again_every=0.3)
    assert cancelled == 1
    assert cleaned_up
    assert task.cancelled()


def test_backoff_is_exponential_capped_and_fully_jittered() -> None:
    backoff = Backoff(initial=0.5, cap=4.0)
    assert [backoff.ceiling(n) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff.ceiling(10_000) == 4.0  # no overflow after days of outage
    assert backoff.delay(2, rng=lambda: 0.0) == 0.0
    assert backoff.delay(2, rng=lambda: 0.5) == 1.0
    delays = [backoff.delay(5) for _ in range(200)]
    assert all(0 <= d <= 4.0 for d in delays)
    assert len(set(delays)) > 100, "not jittered"
    with pytest.raises(ValueError, match="initial <= cap"):
        Backoff(initial=2.0, cap=1.0)
    # A caller that lets the backoff count: the agent's uplink.
    counting = Backoff(initial=1.0, cap=4.0)
    assert [counting.next_delay(rng=lambda: 1.0) for _ in range(4)] == [1.0, 2.0, 4.0, 4.0]
    assert counting.failures == 4
    counting.reset()
    assert counting.next_delay(rng=lambda: 1.0) == 1.0
