"""The end-to-end demo (README): PKI, a sink, an agent, sensors, an outage, the drain, the count.

Everything lives in a temporary directory and every process is stopped at the end, also on
Ctrl-C, SIGTERM or SIGHUP (a closed terminal): the first one stops the demo and waits for the
services to stop (the agent finishes its in-flight sends); a second one kills them (SIGKILL) instead
of waiting. Whatever happened, every service started is gone before the directory is removed. The
verdict is computed: every event the sensors had acknowledged by the agent on a
QoS 1/2 topic is looked up in the core queue by its sensor and counter.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import aiomqtt

from cloud_sink.backends import read_messages
from edge_agent.buffer import inspect
from edge_agent.link import read_link_status

BIN = Path(sys.executable).parent
REAP_GRACE = 5.0  # seconds a service left running after the loop gets between SIGTERM and SIGKILL
DELIVERY_TIMEOUT = 60.0  # seconds for the agent to empty its buffer once the sensors stopped
DEVICE = "gw-demo-1"
LIVE_BACKLOG = 50  # events: what the live sensors keep in flight; below this, the backlog is gone


@dataclass
class Sensor:
    name: str
    topic: str
    rate: float  # events per second
    uplink_qos: int
    acked: set[int] = field(default_factory=set)
    sent: int = 0


SENSORS = [
    Sensor("temperature", "sensors/temperature", 50, 1),
    Sensor("door", "alarms/door", 2, 2),
    Sensor("vibration", "telemetry/vibration", 100, 0),
]

AGENT_TOPICS = """
[[topics]]
filter = "alarms/#"
qos = 2
priority = 9

[[topics]]
filter = "telemetry/#"
qos = 0
on_full = "drop-oldest"

[[topics]]
filter = "#"
qos = 1
"""


def say(text: str) -> None:
    print(text, flush=True)


def reserve_port() -> socket.socket:
    """A loopback port kept for the demo until the socket is closed: bound with SO_REUSEADDR but
    not listening, so its service can listen on it (asyncio's servers set SO_REUSEADDR) and no
    other program is given it, by bind(0) or as an outgoing connection's port, while the service
    is down (the sink restarts on its port after 20 s without it: a port only probed free at the
    start could be someone else's by then)."""
    reservation = socket.socket()
    reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    reservation.bind(("127.0.0.1", 0))
    return reservation


def port_of(reservation: socket.socket) -> int:
    port: int = reservation.getsockname()[1]
    return port


def command(name: str, module: str) -> list[str]:
    """How to run the console script ``name``: the one next to the interpreter (a virtualenv's
    bin), else ``module``'s ``main`` run by this interpreter (console scripts installed elsewhere,
    e.g. pip's --user scripts): the code the demo itself imports, never some other install's."""
    script = BIN / name
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


async def run(*argv: str) -> str:
    """``argv`` to completion; a failure ends the demo with its stderr. Awaited, so that a signal
    cancels it (and kills the command) like every other step."""
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(60):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    if process.returncode != 0:
        raise SystemExit(f"demo: {' '.join(argv)} failed:\n{err.decode(errors='replace')}")
    return out.decode()


class Process:
    """A service of the demo: started, waited for, signalled, never left behind."""

    started: ClassVar[list[asyncio.subprocess.Process]] = []
    """Every service process started, for `reap` (`stop` forgets the one it stops)."""

    def __init__(self, name: str, argv: list[str], ready: str, log: Path) -> None:
        self.name = name
        self.argv = argv
        self.ready = re.compile(ready)
        self.log = log
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("ab") as log:
            start = log.tell()  # the log is shared by restarts: only this run's lines count
            self.process = await asyncio.create_subprocess_exec(
                *self.argv, stdout=log, stderr=log, start_new_session=True
            )
            Process.started.append(self.process)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.ready.search(self._output(start)):
                return
            if self.process.returncode is not None:
                break
            await asyncio.sleep(0.1)
        raise SystemExit(f"demo: {self.name} did not start; its log:\n{self._output(start)}")

    def _output(self, start: int) -> str:
        with self.log.open("rb") as log:
            log.seek(start)
            return log.read().decode(errors="replace")

    async def stop(self) -> int | None:
        process, self.process = self.process, None
        if process is None or process.returncode is not None:
            return None if process is None else process.returncode
        process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(process.wait(), 15)
        except TimeoutError:
            process.kill()
            return await process.wait()

    @staticmethod
    def kill_all() -> None:
        """SIGKILL to every service still running (its session's process group), at once."""
        for process in Process.started:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)


def reap(grace: float | None = None) -> None:
    """Synchronously, after the event loop whatever ended it: every service started and not
    known to have exited gets SIGTERM on its process group, ``grace`` seconds, then SIGKILL. The
    services run in sessions of their own, which no signal to the demo reaches: one the loop's
    clean-up did not stop would be left running in a deleted directory. A signal while this waits
    goes straight to SIGKILL."""
    grace = REAP_GRACE if grace is None else grace
    left = [process.pid for process in Process.started if process.returncode is None]
    if not left:
        return
    # asyncio's child watcher thread reaps them, and reports it to the closed loop: not news
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    hurry: list[int] = []
    signums = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.signal(signum, lambda s, _: hurry.append(s)) for signum in signums}
    try:
        for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            for pgid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signum)
            deadline = time.monotonic() + wait
            while (left := [p for p in left if _group_alive(p)]) and time.monotonic() < deadline:
                if hurry and signum == signal.SIGTERM:
                    break
                time.sleep(0.05)
            if not left:
                return
        say(f"demo: could not stop the process groups {left}")
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


async def sensor_loop(sensor: Sensor, port: int, stop: asyncio.Event) -> None:
    """Publish at ``rate`` to the agent's local listener; an acked event is the agent's."""
    interval = 1 / sensor.rate
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"sensor-{sensor.name}") as client:
        start = time.monotonic()
        while not stop.is_set():
            n = sensor.sent
            sensor.sent += 1
            payload = json.dumps({"sensor": sensor.name, "n": n, "t": round(time.time(), 3)})
            await client.publish(sensor.topic, payload, qos=1, timeout=10)
            sensor.acked.add(n)
            await asyncio.sleep(max(0.0, start + sensor.sent * interval - time.monotonic()))


def backlog(data: Path) -> int:
    return inspect(data).events


def link_state(data: Path) -> str:
    status = read_link_status(data)
    return "starting" if status is None else status.state.value


def core_count(core: Path) -> int:
    if not core.exists():
        return 0
    return sum(1 for _ in read_messages(core))


def bar(done: int, total: int, width: int = 30) -> str:
    filled = width if total == 0 else int(width * done / total)
    return "[" + "#" * filled + "." * (width - filled) + "]"


@contextlib.asynccontextmanager
async def sensors(port: int) -> AsyncIterator[None]:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(sensor_loop(s, port, stop)) for s in SENSORS]
    try:
        yield
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def watch(seconds: float, label: str, data: Path, core: Path) -> None:
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        await asyncio.sleep(min(2.0, left))
        accepted = sum(len(s.acked) for s in SENSORS)
        say(
            f"  {label:<8} link={link_state(data):<10} accepted={accepted:>6}"
            f"  backlog={backlog(data):>6}  in core queue={core_count(core):>6}"
        )


async def show_drain(data: Path, total: int) -> None:
    """A progress bar from the backlog at reconnection down to live traffic only."""
    start = time.monotonic()
    tty = sys.stdout.isatty()
    last_line = 0.0
    while True:
        left = backlog(data)
        done = max(0, total - left)
        elapsed = time.monotonic() - start
        finished = left <= LIVE_BACKLOG
        if tty or finished or elapsed - last_line >= 1:
            last_line = elapsed
            line = f"  drain    {bar(done, total)} {done:>6}/{total} {link_state(data):<10}"
            print("\r" + line if tty else line, end="" if tty and not finished else "\n")
        if finished:
            rate = total / elapsed if elapsed > 0 else 0
            say(f"demo: backlog of {total} events drained in {elapsed:.1f}s ({rate:.0f} events/s,"
                " while the sensors kept publishing)")  # fmt: skip
            return
        if elapsed > 60:
            raise SystemExit("demo: the backlog did not drain within 60 s; see agent.log")
        await asyncio.sleep(0.05)


async def until_delivered(data: Path, within: float | None = None) -> None:
    """Until the agent's buffer is empty (the agent process owns it: polled, read-only)."""
    within = DELIVERY_TIMEOUT if within is None else within
    try:
        async with asyncio.timeout(within):
            while backlog(data) > 0:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise SystemExit(
            f"demo: {backlog(data)} events still in the agent's buffer {within:g} s after the"
            " sensors stopped; see agent.log and sink.log"
        ) from None


async def demo(work: Path, online: float, offline: float) -> int:
    say(f"demo: working in {work}")
    pki = work / "pki"
    certs = command("bridge-certs", "certs.cli")
    await run(*certs, "--dir", str(pki), "init-ca")
    await run(*certs, "--dir", str(pki), "server", "--dns", "localhost", "--ip", "127.0.0.1")
    await run(*certs, "--dir", str(pki), "device", DEVICE)
    say("demo: PKI ready (CA, sink certificate for localhost, device certificate)")

    with reserve_port() as sink_reserved, reserve_port() as agent_reserved:
        sink_port, agent_port = port_of(sink_reserved), port_of(agent_reserved)
        return await _run_demo(work, (sink_port, agent_port), online, offline)


async def _run_demo(work: Path, ports: tuple[int, int], online: float, offline: float) -> int:
    pki, core = work / "pki", work / "core.db"
    sink_port, agent_port = ports
    (work / "sink.toml").write_text(
        f'[listener]\nhost = "127.0.0.1"\nport = {sink_port}\nca = "{pki}/ca.pem"\n'
        f'cert = "{pki}/servers/localhost.pem"\nkey = "{pki}/servers/localhost.key"\n\n'
        f'[auth]\naudience = "demo-sink"\n\n[backend]\ntype = "sqlite"\npath = "{core}"\n'
    )
    data = work / "agent-data"
    (work / "agent.toml").write_text(
        f'[agent]\ndevice_id = "{DEVICE}"\ndata_dir = "{data}"\n\n'
        f"[listener]\nport = {agent_port}\n\n"
        f'[uplink]\nhost = "localhost"\nport = {sink_port}\nbackoff_max = "2s"\n'
        f'[uplink.tls]\nca = "{pki}/ca.pem"\ncert = "{pki}/devices/{DEVICE}.pem"\n'
        f'key = "{pki}/devices/{DEVICE}.key"\n'
        f'[uplink.token]\naudience = "demo-sink"\nlifetime = "1h"\n{AGENT_TOPICS}'
    )
    sink = Process(
        "cloud-sink",
        [*command("cloud-sink", "cloud_sink.cli"), "--config", str(work / "sink.toml"), "run"],
        r"listening on",
        work / "sink.log",
    )
    agent = Process(
        "edge-agent",
        [*command("edge-agent", "edge_agent.cli"), "--config", str(work / "agent.toml"), "run"],
        r"listener on",
        work / "agent.log",
    )
    try:
        await sink.start()
        say(f"demo: cloud sink on localhost:{sink_port} (mutual TLS, JWT, sqlite core queue)")
        await agent.start()
        say(f"demo: edge agent on 127.0.0.1:{agent_port}, uplink to the sink")
        say("demo: sensors: " + ", ".join(
            f"{s.name} {s.rate:g}/s on {s.topic} (uplink QoS {s.uplink_qos})" for s in SENSORS
        ))  # fmt: skip
        async with sensors(agent_port):
            await watch(online, "online", data, core)
            say("demo: cutting the uplink: stopping the sink")
            await sink.stop()
            await watch(offline, "offline", data, core)
            say("demo: bringing the sink back")
            total = backlog(data)
            await sink.start()
            await show_drain(data, total)
            await watch(4, "online", data, core)
        say("demo: sensors stopped")
        await until_delivered(data)
    finally:
        say("demo: stopping the agent and the sink")
        agent_rc = await agent.stop()
        sink_rc = await sink.stop()
        say(f"demo: stopped the agent (exit {agent_rc}) and the sink (exit {sink_rc})")
    return verdict(core)


def verdict(core: Path) -> int:
    delivered: dict[str, Counter[int]] = {s.name: Counter() for s in SENSORS}
    for _, message in read_messages(core):
        body = json.loads(message.payload)
        delivered[body["sensor"]][body["n"]] += 1
    say("\ndemo: what reached the core queue")
    say(f"  {'topic':<22} {'QoS':>3} {'accepted':>9} {'delivered':>9} {'lost':>5} {'dupes':>5}")
    lost_reliable = 0
    for sensor in SENSORS:
        got = delivered[sensor.name]
        lost = len(sensor.acked - set(got))
        dupes = sum(count - 1 for count in got.values())
        say(
            f"  {sensor.topic:<22} {sensor.uplink_qos:>3} {len(sensor.acked):>9}"
            f" {len(set(got) & sensor.acked):>9} {lost:>5} {dupes:>5}"
        )
        if sensor.uplink_qos > 0:
            lost_reliable += lost
    if lost_reliable == 0:
        say("demo: 0 lost: every accepted QoS 1/2 event is in the core queue")
        say("      (QoS 0 is best effort: events in flight when the link dropped may be gone)")
        return 0
    say(f"demo: {lost_reliable} accepted QoS 1/2 events LOST")
    return 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--online", type=float, default=8, help="seconds online before the cut")
    parser.add_argument("--offline", type=float, default=20, help="seconds without the sink")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bridge-demo-"))
    received: list[int] = []
    status = 1
    try:
        status = asyncio.run(_until_signalled(demo(work, args.online, args.offline), received))
    except KeyboardInterrupt:  # a Ctrl-C before the loop's handlers were in place
        status = 130
    except Signalled as stopped:
        status = 128 + stopped.signum
    except SystemExit as step:  # a step that failed says so, e.g. "see agent.log"
        say(str(step.code))
    finally:
        reap()
        if received:  # also when a step failed because of it (a service killed by a 2nd signal)
            status = 128 + received[0]
        failed = status not in (0, 130) and not 128 < status < 160  # not stopped by a signal
        if args.keep or failed:
            say(f"demo: kept {work} (agent.log, sink.log)")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return status


class Signalled(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


async def _until_signalled(main: Coroutine[Any, Any, int], received: list[int]) -> int:
    """``main``, cancelled by Ctrl-C (SIGINT), SIGTERM or SIGHUP (a closed terminal), so that
    its clean-up stops the services: they run in sessions of their own, which no signal to the
    demo reaches. Each signal is appended to ``received``.

    SIGINT too is handled here, not by asyncio.run: its second Ctrl-C raised KeyboardInterrupt in
    the middle of the clean-up, which left the sink running. Here a second signal only hurries
    the clean-up: the services still running are killed (SIGKILL) instead of waited for."""
    task = asyncio.ensure_future(main)
    loop = asyncio.get_running_loop()

    def stop(signum: int) -> None:
        received.append(signum)
        if len(received) == 1:
            task.cancel()
        elif len(received) == 2:
            say("demo: signalled again: killing the agent and the sink (SIGKILL)")
            Process.kill_all()

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, stop, signum)
    try:
        return await task
    except asyncio.CancelledError:
        if received:
            raise Signalled(received[0]) from None
        raise


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
