"""The agent's command line: `publish` (one of the agent's three sources) through the running
agent's listener or, with no agent running, straight into the buffer; the inspection commands
`status`, `check-config` and `buffer peek/export/purge/dead`; and what goes wrong around them said
in one line, never a traceback (a port in use, a closed pipe, a missing or unreadable buffer, Ctrl-D
at the purge prompt)."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import select
import subprocess
from collections.abc import Callable
from pathlib import Path

from edge_agent import Agent, load_config
from edge_agent.buffer import inspect, read_events
from tests.harness.agent import start_agent, write_config
from tests.harness.agent_cli import EDGE_AGENT, acli
from tests.harness.process import ProcessFactory
from tests.harness.stages import RecordingStage, running_server


async def test_cli_publish_through_the_running_agent_and_status(
    tmp_path: Path, process_factory: ProcessFactory
) -> None:
    config = write_config(tmp_path)
    agent = start_agent(process_factory, config)
    # The file says port = 0: the CLI finds the listener the agent recorded in its directory.
    ok = await acli(config, "publish", "sensors/cli", "42")
    assert ok.returncode == 0, ok.stderr
    conf_with_port = tmp_path / "cli.toml"
    conf_with_port.write_text(config.read_text().replace("port = 0", f"port = {agent.port}"))
    piped = await acli(conf_with_port, "publish", "alarms/cli", "-", stdin=b"from stdin")
    assert piped.returncode == 0, piped.stderr
    bad = await acli(conf_with_port, "publish", "sensors/+", "x")
    assert bad.returncode == 1
    assert "wildcards" in bad.stderr
    status = await acli(conf_with_port, "status", "--json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["events"] == 2
    assert {t["topic"] for t in data["topics"]} == {"sensors/cli", "alarms/cli"}
    assert data["disk"]["reserve"] == 16 * 1024**2
    assert data["disk"]["free"] > 0
    text = await acli(conf_with_port, "status")
    assert "sensors/cli" in text.stdout
    assert f"bytes free, disk_reserve {16 * 1024**2}" in text.stdout
    assert "dead letters: 0" in text.stdout
    # purge needs the lock, which the running agent holds.
    purge = await acli(conf_with_port, "buffer", "purge", "--yes")
    assert purge.returncode == 1
    assert "another edge-agent" in purge.stderr
    assert await agent.asigterm() == 0
    assert [e.payload for e in read_events(tmp_path / "data")] == [b"from stdin", b"42"]


async def test_cli_publish_without_a_running_agent_commits_directly(tmp_path: Path) -> None:
    config = write_config(tmp_path, listener="port = 1")  # nothing listens on port 1
    result = await acli(config, "publish", "sensors/offline", "still stored")
    assert result.returncode == 0, result.stderr
    device, _, seq = result.stdout.strip().split("/")
    assert (device, seq) == ("dev-1", "1")
    assert [e.payload for e in read_events(tmp_path / "data")] == [b"still stored"]


async def test_cli_publish_trusts_no_other_server_on_the_listener_port(tmp_path: Path) -> None:
    """A PUBACK from whatever answers on the configured port (a Mosquitto on 1883) is not a
    commit: with no agent running the CLI commits directly (it used to exit 0 with nothing
    stored), and with an agent whose listener is off it says so."""
    stranger = RecordingStage()
    async with running_server(stranger) as server:
        config = write_config(tmp_path, listener=f"port = {server.port}")
        result = await acli(config, "publish", "sensors/x", "kept")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("dev-1/")
    assert stranger.events == []
    assert [e.payload for e in read_events(tmp_path / "data")] == [b"kept"]
    quiet = write_config(tmp_path / "quiet", listener="enabled = false")
    async with Agent(load_config(quiet)):
        refused = await acli(quiet, "publish", "sensors/x", "lost?")
    assert refused.returncode == 1
    assert "has no plain local listener" in refused.stderr
    assert list(read_events(tmp_path / "quiet" / "data")) == []
    # The record goes with the agent (a stale one could name a reused pid), and a broken one
    # is not trusted.
    assert not (tmp_path / "data" / "listener.json").exists()
    again = write_config(tmp_path / "again")
    record = tmp_path / "again" / "data" / "listener.json"
    async with Agent(load_config(again)):
        assert record.exists()
        record.write_text('{"pid": "x"}')
        broken = await acli(again, "publish", "sensors/x", "not here")
        assert broken.returncode == 1
        assert "has no plain local listener" in broken.stderr
    assert not record.exists()


async def test_cli_publishes_at_once_with_the_agent_stopped_all_commit(tmp_path: Path) -> None:
    """Found by review: with the agent stopped, `publish` commits straight into the buffer and
    holds its lock meanwhile; a second one took that for an agent without a listener and failed
    ("the agent (pid N) holds ..."): half of eight run at once did. They wait for the lock."""
    config = write_config(tmp_path)
    done = await asyncio.gather(*(acli(config, "publish", "sensors/x", f"{n}") for n in range(8)))
    assert [d.returncode for d in done] == [0] * 8, [d.stderr for d in done]
    payloads = sorted(e.payload for e in read_events(tmp_path / "data"))
    assert payloads == [b"%d" % n for n in range(8)]


async def test_cli_publish_refused_by_a_full_buffer_fails_at_the_refusal(tmp_path: Path) -> None:
    """The listener refuses by closing the connection (no PUBACK); the CLI fails on that close,
    not 30 s later when its publish would time out."""
    config = write_config(tmp_path, buffer="max_events = 1")
    async with Agent(load_config(config)) as agent:
        await agent.publish("alarms/first", b"fills the buffer")
        for qos in ("1", "2"):
            refused = await acli(config, "publish", "--qos", qos, "alarms/second", "no room")
            assert refused.returncode == 1
            assert "did not confirm the event" in refused.stderr
            assert "timed out" not in refused.stderr, refused.stderr
    assert [e.payload for e in read_events(tmp_path / "data")] == [b"fills the buffer"]


async def test_cli_says_what_is_wrong_instead_of_a_traceback(tmp_path: Path) -> None:
    config_path = write_config(tmp_path)
    async with Agent(load_config(config_path)) as agent:
        await agent.publish("sensors/1", b"v")
    export = await acli(config_path, "buffer", "export", "--output", str(tmp_path / "no/such.json"))
    assert (export.returncode, export.stdout) == (1, "")
    assert "cannot write" in export.stderr
    assert "No such file or directory" in export.stderr
    none = await acli(config_path, "buffer", "peek", "-n", "0")
    assert none.returncode == 2
    assert "must be at least 1" in none.stderr
    for action in ("peek", "export", "purge"):  # a filter that would silently match nothing
        bad = await acli(config_path, "buffer", action, "--topic", "a/#/b")
        assert bad.returncode == 2
        assert "'#' must be a whole level and the last one" in bad.stderr
    database = tmp_path / "data" / "buffer.db"
    database.write_bytes(b"this is no SQLite header at all" + database.read_bytes()[31:])
    for command in (["status"], ["buffer", "peek"], ["buffer", "export"]):
        broken = await acli(config_path, *command)
        assert broken.returncode == 1, command
        assert "cannot read the buffer" in broken.stderr, command
        assert "Traceback" not in broken.stderr, command


async def test_cli_publish_of_a_packet_the_listener_cannot_take_says_so(tmp_path: Path) -> None:
    """max_payload leaves room for a topic of about 1,000 bytes: a longer one made a packet
    over the listener's max_packet_size, which closed the connection, and the CLI said the
    buffer was full. A payload that is no UTF-8 (the shell's bytes) was a traceback."""
    config = write_config(
        tmp_path,
        listener='port = 0\nmax_packet_size = "64KiB"',
        topics='[[topics]]\nfilter = "#"\nmax_payload = 64512\n',
    )
    async with Agent(load_config(config)):
        long_topic = "a" * 2000
        refused = await acli(config, "publish", long_topic, "-", stdin=b"x" * 64_000)
        assert refused.returncode == 1
        assert refused.stderr.strip() == (
            "edge-agent: the PUBLISH would be 66008 bytes, over the listener's max_packet_size"
            " (65536): nothing was stored"
        )
        argv: list[str | bytes] = [EDGE_AGENT, "--config", str(config), "publish"]
        argv += ["sensors/raw", b"\xff\xfe"]  # the shell's bytes, no UTF-8
        raw = await asyncio.to_thread(
            subprocess.run, argv, capture_output=True, timeout=60, check=False
        )
        assert raw.returncode == 0, raw.stderr
    assert [e.payload for e in read_events(tmp_path / "data")] == [b"\xff\xfe"]


async def test_cli_status_escapes_what_a_topic_would_do_to_the_terminal(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    forged = "sensors/\x1b[2K\rtotal  0 events: all delivered"
    async with Agent(load_config(config)) as agent:
        await agent.publish(forged, b"x")
    status = await acli(config, "status")
    assert status.returncode == 0, status.stderr
    assert "\x1b" not in status.stdout
    assert "\r" not in status.stdout
    assert "sensors/\\x1b[2K\\rtotal  0 events" in status.stdout


async def test_cli_run_on_a_port_in_use_says_so_in_one_line(tmp_path: Path) -> None:
    """`run` printed a 36-line traceback for a port it could not bind (a Mosquitto on 1883)."""
    async with running_server(RecordingStage()) as taken:
        config = write_config(tmp_path, listener=f"port = {taken.port}")
        result = await acli(config, "run")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"edge-agent: cannot listen on 127.0.0.1:{taken.port} ([listener]): Address already in use"
    )
    assert "Traceback" not in result.stderr
    nowhere = write_config(tmp_path / "nowhere")
    nowhere.write_text(
        nowhere.read_text() + '\n[metrics]\nhost = "no-such-host.invalid"\nport = 19111\n'
    )
    unresolved = await acli(nowhere, "run")
    assert unresolved.returncode == 1
    last = unresolved.stderr.strip().splitlines()[-1]
    assert last.startswith("edge-agent: cannot listen on no-such-host.invalid:19111 ([metrics]): ")
    assert "Unknown error" not in last, last


def test_cli_check_config_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [EDGE_AGENT, "--config", str(config), "check-config"],
            stdout=write,
            stderr=subprocess.PIPE,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write)
    assert done.stderr == b""
    assert done.returncode == 0


async def test_cli_peek_export_purge(tmp_path: Path) -> None:
    config_path = write_config(tmp_path)
    async with Agent(load_config(config_path)) as agent:
        for i in range(5):
            await agent.publish(f"sensors/{i}", f"v{i}".encode())
        await agent.publish("alarms/x", b"\xff\x00")
    peek = await acli(config_path, "buffer", "peek", "-n", "2")
    lines = [json.loads(line) for line in peek.stdout.splitlines()]
    assert [(r["topic"], r.get("payload_hex")) for r in lines] == [
        ("alarms/x", "ff00"),
        ("sensors/0", None),
    ]
    out = tmp_path / "export.jsonl"
    export = await acli(
        config_path, "buffer", "export", "--topic", "sensors/#", "--output", str(out)
    )
    assert export.returncode == 0
    assert [json.loads(line)["payload"] for line in out.read_text().splitlines()] == [
        f"v{i}" for i in range(5)
    ]
    refused = await acli(config_path, "buffer", "purge", "--topic", "sensors/#")
    assert refused.returncode == 1
    assert "confirm with --yes" in refused.stderr
    purge = await acli(config_path, "buffer", "purge", "--topic", "sensors/#", "--yes")
    assert purge.returncode == 0, purge.stderr
    stats = inspect(tmp_path / "data")
    assert stats.events == 1
    assert (
        sum(events for (reason, _), (events, _) in stats.drops.items() if reason == "purged") == 5
    )


async def test_cli_topic_wildcards_cover_the_dollar_topics_the_catch_all_buffers(
    tmp_path: Path,
) -> None:
    """`#` (and `+` at level one) did not match `$aws/...` topics in `export` and `purge`
    (MQTT subscriber matching), though the catch-all rule buffers such events: `purge --topic
    '#'` said "purged 1 events" and left the `$` one behind."""
    config_path = write_config(tmp_path)
    async with Agent(load_config(config_path)) as agent:
        await agent.publish("$aws/things/dev/shadow/update", b"{}")
        await agent.publish("sensors/0", b"v0")
    export = await acli(config_path, "buffer", "export", "--topic", "#")
    assert [json.loads(line)["topic"] for line in export.stdout.splitlines()] == [
        "$aws/things/dev/shadow/update",
        "sensors/0",
    ]
    peek = await acli(config_path, "buffer", "peek", "--topic", "+/things/#")
    assert [json.loads(line)["topic"] for line in peek.stdout.splitlines()] == [
        "$aws/things/dev/shadow/update"
    ]
    purge = await acli(config_path, "buffer", "purge", "--topic", "#", "--yes")
    assert "purged 2 events" in purge.stderr, purge.stderr
    assert inspect(tmp_path / "data").events == 0


async def test_cli_check_config_prints_the_effective_config_or_every_problem(
    tmp_path: Path,
) -> None:
    good = await acli(write_config(tmp_path / "good"), "check-config")
    assert good.returncode == 0
    effective = json.loads(good.stdout)
    assert effective["buffer"]["durability"] == "full"
    assert effective["topics"][-1]["filter"] == "#"
    bad_path = tmp_path / "bad.toml"
    bad_path.write_text('[agent]\ndevice_id = ""\ndata_dir = "/x"\nextra = 1\n')
    bad = await acli(bad_path, "check-config")
    assert bad.returncode == 2
    assert "agent.device_id" in bad.stderr
    assert "agent.extra: unknown key" in bad.stderr
    assert "topics: Field required" in bad.stderr


async def test_cli_buffer_commands_on_a_missing_buffer_create_nothing(tmp_path: Path) -> None:
    config_path = write_config(tmp_path)  # data_dir never used: no buffer there (a typo, say)
    for action in (("purge", "--yes"), ("requeue-dead",), ("peek",), ("export",)):
        done = await acli(config_path, "buffer", *action)
        assert done.returncode == 1, (action, done.stderr)
        assert f"no buffer at {tmp_path / 'data' / 'buffer.db'}" in done.stderr
    assert not (tmp_path / "data" / "buffer.db").exists()


def test_cli_export_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    config_path = write_config(tmp_path)

    async def fill() -> None:
        async with Agent(load_config(config_path)) as agent:
            await asyncio.gather(*(agent.publish("sensors/t", b"%d" % i) for i in range(3000)))

    asyncio.run(fill())
    reader = subprocess.Popen(
        [EDGE_AGENT, "--config", str(config_path), "buffer", "export"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert reader.stdout is not None
    first = reader.stdout.readline()
    reader.stdout.close()  # as `| head -1` does
    _, errors = reader.communicate(timeout=60)
    assert json.loads(first)["seq"] == 1
    assert reader.returncode == 0
    assert b"Traceback" not in errors, errors


def purge_at_the_prompt(config_path: Path, answer: bytes, meanwhile: Callable[[], None]) -> bytes:
    """Run ``buffer purge`` on a terminal, call ``meanwhile`` at its prompt, answer; return
    everything it wrote, once it has exited with status 1."""
    main, child = pty.openpty()  # a terminal: the prompt is asked
    process = subprocess.Popen(
        [EDGE_AGENT, "--config", str(config_path), "buffer", "purge"],
        stdin=child,
        stdout=child,
        stderr=child,
    )
    os.close(child)
    seen = b""
    try:
        while b"[y/N]" not in seen:
            assert select.select([main], [], [], 30)[0], f"no prompt, only {seen!r}"
            seen += os.read(main, 1024)
        meanwhile()
        os.write(main, answer)
        assert process.wait(timeout=30) == 1
        while select.select([main], [], [], 1)[0]:
            try:
                seen += os.read(main, 1024)
            except OSError:  # the terminal's other side closed
                break
    finally:
        os.close(main)
    assert b"Traceback" not in seen, seen
    return seen


def test_cli_purge_prompt_takes_ctrl_d_as_no(tmp_path: Path) -> None:
    """It raised EOFError with a traceback (and Ctrl-C waited for Enter)."""
    config_path = write_config(tmp_path)

    async def fill() -> None:
        async with Agent(load_config(config_path)) as agent:
            await agent.publish("sensors/t", b"1")

    asyncio.run(fill())
    seen = purge_at_the_prompt(config_path, b"\x04", lambda: None)  # Ctrl-D: end of input
    assert b"nothing deleted" in seen
    assert inspect(tmp_path / "data").events == 1


def test_cli_purge_deletes_nothing_if_the_buffer_was_replaced_at_the_prompt(
    tmp_path: Path,
) -> None:
    """The buffer is closed while the operator is asked: an agent may start, find it corrupt
    and begin a fresh one, whose seqs 1, 2, ... name other events."""
    config_path = write_config(tmp_path)

    async def fill(topic: str) -> None:
        async with Agent(load_config(config_path)) as agent:
            await agent.publish(topic, b"1")

    asyncio.run(fill("sensors/old"))

    def replace() -> None:
        for leftover in (tmp_path / "data").glob("buffer.db*"):
            leftover.unlink()
        asyncio.run(fill("alarms/new"))

    seen = purge_at_the_prompt(config_path, b"y\n", replace)
    assert b"the buffer was replaced since it was listed: nothing deleted" in seen
    assert [e.topic for e in read_events(tmp_path / "data")] == ["alarms/new"]


async def test_cli_buffer_dead_lists_dead_letters_with_their_reason(tmp_path: Path) -> None:
    """SPEC §5: dead letters are visible in the CLI (status gave only their count), each with
    the event id the core queue would have (exports carry it too, for dedupe downstream)."""
    config_path = write_config(tmp_path, device_id="dev-dead")
    config = load_config(config_path)
    async with Agent(config) as agent:
        first = await agent.publish("sensors/a", b"fine")
        poison = await agent.publish("sensors/b", b"\xff")
        assert agent.buffer is not None
        assert await agent.buffer.dead_letter(int(poison.rsplit("/", 1)[1]), "too large for it")
    dead = await acli(config_path, "buffer", "dead")
    assert dead.returncode == 0, dead.stderr
    [letter] = [json.loads(line) for line in dead.stdout.splitlines()]
    assert letter["id"] == poison
    assert (letter["topic"], letter["reason"], letter["payload_hex"]) == (
        "sensors/b", "too large for it", "ff",
    )  # fmt: skip
    assert letter["dead_at_ms"] > 0
    peek = await acli(config_path, "buffer", "peek")
    assert [json.loads(line)["id"] for line in peek.stdout.splitlines()] == [first]
    # Any count is "all" beyond the buffer's size (SQLite's LIMIT overflowed with a traceback).
    for command in ("dead", "peek"):
        done = await acli(config_path, "buffer", command, "-n", str(2**64))
        assert (done.returncode, done.stderr) == (0, ""), done.stderr
        assert len(done.stdout.splitlines()) == 1
