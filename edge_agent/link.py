"""The uplink's link: its state as `edge-agent status` shows it, how a failed attempt is told
apart from a refusal, and how the progress of our bytes on a slow link counts as life (SPEC §5)."""

from __future__ import annotations

import contextlib
import enum
import fcntl
import itertools
import json
import socket
import ssl
import struct
import termios
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

__all__ = [
    "LINK_FILE",
    "REFUSAL_WINDOW",
    "LinkDead",
    "LinkFailure",
    "LinkState",
    "LinkStatus",
    "LocalFailure",
    "PublishTimeout",
    "SendProgress",
    "classify",
    "limit_unsent",
    "read_link_status",
    "recording_socket_class",
    "token_note",
]

LINK_FILE = "link.json"


class LinkState(enum.StrEnum):
    DISABLED = "disabled"  # no [uplink] configured: the agent only buffers
    CONNECTING = "connecting"
    ONLINE = "online"
    BACKOFF = "backoff"  # waiting to retry after a transient failure
    REFUSED = "refused"  # credentials or certificates refused / unusable: retrying slowly
    STOPPED = "stopped"


@dataclass
class LinkStatus:
    state: LinkState
    since: float  # unix seconds
    server: str = ""
    detail: str = ""  # why (for backoff / refused), or what (online)
    last_error: str = ""  # the last failure, kept while connecting again
    retry_at: float | None = None
    connected_since: float | None = None
    connections: int = 0  # successful CONNACKs this run
    failures: int = 0  # failed connection attempts or lost connections this run
    delivered: int = 0  # events acknowledged by the server this run
    dead_lettered: int = 0  # events moved to the dead-letter table this run
    certificate_not_after: float | None = None
    token_expires_at: float | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def detail_at(self, now: float) -> str:
        """`detail` as shown at unix time ``now``: online, the token's time left counts down
        (the detail written at CONNACK said "expires in 3599s" in `status` and in systemd's
        status line for the whole hour)."""
        if self.state is LinkState.ONLINE and self.token_expires_at is not None:
            return token_note(self.token_expires_at, now)
        return self.detail


def token_note(expires_at: float, now: float) -> str:
    return f"token expires in {max(0, int(expires_at - now))}s"


def read_link_status(data_dir: Path) -> LinkStatus | None:
    """The running (or last) agent's link state, or None if it never wrote one."""
    try:
        raw = json.loads((data_dir / LINK_FILE).read_text())
    except (OSError, ValueError):
        return None
    try:
        raw["state"] = LinkState(raw["state"])
        return LinkStatus(**raw)
    except (KeyError, TypeError, ValueError):
        return None


REFUSAL_WINDOW = 3.0
"""Seconds after the handshake within which a close with not a byte from the server is read as
a refusal of our certificate (the server's verdict comes one round trip after our side of the
handshake ends). Later, it is a server that stopped or restarted while it handled our CONNECT:
a transient failure, not one for the slow back-off of refusals."""


class LinkFailure(Exception):
    """A connection attempt or session ended; ``refused``: by credentials, retry slowly."""

    def __init__(self, detail: str, *, refused: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.refused = refused


class LinkDead(LinkFailure):
    """Nothing came back for too long (paho's keep-alive, the silence watchdog): the link died.
    That says nothing against an event in flight, unlike the server closing the connection."""


class LocalFailure(LinkFailure):
    """We ended the connection for a failure of our own (the buffer could not delete what was
    acknowledged, the watchdog broke): no evidence against an event in flight, which is neither
    set aside nor counted as poison for it."""


class PublishTimeout(LinkFailure):
    """Messages in flight and no acknowledgement for ``publish_timeout``: we gave up on the
    connection (the server did not close it)."""


def classify(detail: str, tls_errors: list[str]) -> LinkFailure:
    """A connect or session failure: certificate failures and TLS alerts are refusals."""
    if tls_errors:
        return LinkFailure(tls_errors[-1], refused=True)
    if "CERTIFICATE_VERIFY_FAILED" in detail:
        return LinkFailure(f"the server's certificate is not trusted: {detail}", refused=True)
    if "ALERT" in detail.upper():
        return LinkFailure(f"the server refused the TLS handshake: {detail}", refused=True)
    return LinkFailure(detail or "connection failed")


def recording_socket_class(
    errors: list[str], sockets: list[ssl.SSLSocket], received_at: list[float] | None = None
) -> type[ssl.SSLSocket]:
    """An `SSLSocket` that notices the server refusing the client certificate after the handshake
    (and closes itself when the handshake fails, which paho does not do). Each one adds itself to
    ``sockets``: paho does not close the socket of a connect that fails after the handshake (a
    reset during CONNECT), so the uplink closes them all when the attempt ends.

    With TLS 1.3 a server checks the client certificate after the client considers the handshake
    done; it then sends an alert or just closes. paho sees a closed socket and aiomqtt reports a
    CONNACK timeout, which would look like a network problem and be retried fast, forever. A TLS
    alert, or an end of stream before the server sent a single byte within `REFUSAL_WINDOW` of
    the handshake, is what tells them apart.

    ``received_at[0]`` is set to `time.monotonic()` whenever bytes arrive (the uplink's watchdog
    of a silent link).
    """
    received = [0]
    handshaken = [0.0]  # time.monotonic() when our side of the handshake ended
    arrivals = received_at if received_at is not None else [0.0]

    class _Recording(ssl.SSLSocket):
        def getpeername(self) -> Any:
            # `SSLContext.wrap_socket` asks this first. On a connection reset before the
            # handshake the wrap itself fails (Python 3.11 checks for data sent before the
            # handshake), and the new socket was left to the garbage collector: a
            # ResourceWarning. Listed now, it is closed with the attempt's other sockets.
            if self not in sockets:
                sockets.append(self)
            return super().getpeername()

        def do_handshake(self, block: bool = False) -> None:
            if self not in sockets:
                sockets.append(self)  # the caller closes it when the attempt is over
            try:
                super().do_handshake(block)
            except OSError:
                self.close()  # paho would leak the socket of a failed handshake
                raise
            handshaken[0] = time.monotonic()

        def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
            try:
                data = super().recv(buflen, flags)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise
            except ssl.SSLError as exc:
                errors.append(f"the server refused the TLS session: {exc.reason or exc}")
                raise
            late = time.monotonic() - handshaken[0] > REFUSAL_WINDOW
            if not data and not received[0] and not late:
                errors.append(
                    "the server closed the connection right after the TLS handshake, before any "
                    "MQTT answer: it most likely refused the client certificate (revoked, "
                    "expired or from another CA)"
                )
            if data:
                received[0] += len(data)
                arrivals[0] = time.monotonic()
            return data

    return _Recording


BACKLOG = 4096
"""Bytes our send queue must hold for the peer's acknowledgements of them to count as life
(`SendProgress`): a hung server's kernel still acknowledges a lone PINGREQ."""

PROGRESS_SLACK = 64 * 1024
"""Bytes beyond what the sink owes an answer for that may be acknowledged by TCP without a byte
coming back before that progress stops counting as life (`SendProgress`): socket buffers, TLS
records, the answer on its way."""

UNSENT_LIMIT = 128 * 1024
"""Bytes the kernel may hold for the uplink that it has not sent yet (``TCP_NOTSENT_LOWAT``):
beyond them paho keeps the messages, so a QoS 0 event is not taken as written (and deleted)
long before it can cross a slow link. A cut loses this much of them (one segment more) and
what was in flight. Bytes in flight are not limited: a fast link keeps its whole window busy."""

TLS_RECORD = 16384  # the most plaintext one TLS record carries
TLS_RECORD_OVERHEAD = 64  # more than a record adds to it (header, tag or MAC and padding)

_TCP_INFO_LENGTH = 136  # struct tcp_info up to tcpi_bytes_received (Linux 4.1 and later)
_BYTES_ACKED_AT = 120  # offset of tcpi_bytes_acked (u64)


def tcp_send_state(sock: socket.socket) -> tuple[int, int] | None:
    """(bytes of ours the peer's TCP acknowledged, bytes in our send queue: not sent yet or not
    acknowledged) of a connected TCP socket; None where the kernel does not tell."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LENGTH)
        queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(4))
    except (OSError, ValueError, AttributeError):  # closed, or not Linux
        return None
    if len(info) < _BYTES_ACKED_AT + 8:
        return None
    (acked,) = struct.unpack_from("=Q", info, _BYTES_ACKED_AT)
    (pending,) = struct.unpack("=i", queued)
    return acked, pending


class SendProgress:
    """Whether a connection is moving a backlog of our bytes (RELIABILITY F6).

    While a large message, or a stream of QoS 0 ones, crosses a slow link nothing comes back:
    the server's PINGRESP waits behind our bytes, so a watchdog of inbound bytes alone calls a
    working link dead once the queue takes longer than the keep-alive to cross. `moved` says
    whether, since its last call, the peer's TCP acknowledged more of our bytes while at least
    `BACKLOG` were queued; then it also tells paho, whose keep-alive check would end the
    connection for the same reason.

    A blackholed path acknowledges nothing, and a hung server stops acknowledging once its
    receive buffer is full. A middlebox that terminates TCP in front of a dead server would
    acknowledge for it, so progress counts only as long as the server cannot have been asked
    anything yet. The first time it counts after a byte came in, paho is made to send a PINGREQ
    next (behind the packet it is writing, ahead of those it holds), and progress counts until
    the peer's TCP has acknowledged the bytes up to it, `PROGRESS_SLACK` more; then the server
    owes its PINGRESP. Or, if more, until ``budget`` bytes were acknowledged since the last byte
    that came back: a live sink answers each QoS 1/2 message once it has it all (its PUBACK),
    so the session's budget is about two of its largest messages in flight. (A stream of QoS 0
    owes nothing, and a small QoS 1 message may wait behind much of it.)"""

    def __init__(self, mqtt: paho.Client, received_at: list[float], grace: float = 0.0) -> None:
        self._mqtt = mqtt
        self._received_at = received_at  # when bytes last came in (the recording socket's)
        # paho ends the connection a keep-alive after the last byte in with a PINGREQ unanswered,
        # or a keep-alive after its PINGREQ: both clocks are held at now for `grace` seconds
        # after the last progress, so that paho gives what our watchdog gives (the PINGREQ still
        # queued, the answer still crossing). Set ahead once, paho's own check would set them
        # back. Its clock of packets out is left alone: it times paho's PINGREQ on a link gone
        # idle, which the server's keep-alive needs.
        self._grace = grace
        self._hold_until: float | None = None
        self._last: tuple[int, int] | None = None
        self._inbound_seen = received_at[0]
        self._acked_then: int | None = None  # acknowledged bytes when a byte last came in
        self._ping_at: int | None = None  # acknowledged bytes by which the peer has our PINGREQ
        # paho 2.2's keep-alive check reads _last_bytes_received; 2.0 and 2.1 read _last_msg_in.
        self._paho_clock = (
            "_last_bytes_received" if hasattr(mqtt, "_last_bytes_received") else "_last_msg_in"
        )

    def moved(self, budget: int = 0) -> bool:
        now = time.monotonic()
        if self._hold_until is not None:
            self._hold_paho(min(now, self._hold_until))  # to the end of the grace exactly
            if now >= self._hold_until:
                self._hold_until = None
        sock = self._mqtt.socket()
        state = tcp_send_state(sock) if isinstance(sock, socket.socket) else None
        last, self._last = self._last, state
        if state is None:
            return False
        if self._acked_then is None or self._received_at[0] != self._inbound_seen:
            self._inbound_seen = self._received_at[0]
            self._acked_then = state[0]
            self._ping_at = None
        if last is None or state[0] <= last[0] or last[1] < BACKLOG:
            return False
        if self._ping_at is None:
            self._ping_at = self._ping(state)
        if self._ping_at is not None:
            budget = max(budget, self._ping_at - self._acked_then + PROGRESS_SLACK)
        if state[0] - self._acked_then > budget:
            return False  # that much went out and nothing came back: not a live sink
        self._hold_until = now + self._grace
        self._hold_paho(now)
        return True

    def _hold_paho(self, now: float) -> None:
        mqtt = self._mqtt
        with mqtt._msgtime_mutex:  # paho's own clock is time.monotonic
            setattr(mqtt, self._paho_clock, max(getattr(mqtt, self._paho_clock), now))
        if getattr(mqtt, "_ping_t", 0):
            mqtt._ping_t = max(mqtt._ping_t, now)

    def _ping(self, state: tuple[int, int]) -> int | None:
        """Have a PINGREQ sent next, unless one is unanswered already (then that one); return
        the count of acknowledged bytes by which the peer's TCP has it (None: paho's internals,
        which this reads, are not those of 2.2)."""
        mqtt = self._mqtt
        try:
            queue = mqtt._out_packet
            if not mqtt._ping_t and mqtt._send_pingreq() != paho.MQTT_ERR_SUCCESS:
                return None
            at = next((i for i, p in enumerate(queue) if p["command"] == paho.PINGREQ), None)
            if at is None:
                ahead = 0  # written: in the kernel's queue
            else:
                if at > 1:
                    # Ahead of what paho holds (a window of QoS 0 messages), so that the answer
                    # comes after what the kernel holds, not after both. Behind the first packet:
                    # a TLS write that would block is retried with the same bytes.
                    ping = queue[at]
                    del queue[at]
                    queue.insert(1, ping)
                    at = 1
                ahead = at + 1
            # paho holds plaintext; on the wire each packet is sent as TLS records of its own.
            rests = (len(p["packet"]) - p["pos"] for p in itertools.islice(queue, ahead))
            held: int = sum(rest + TLS_RECORD_OVERHEAD * (rest // TLS_RECORD + 1) for rest in rests)
        except (AttributeError, KeyError, TypeError):
            return None
        return state[0] + state[1] + held


def limit_unsent(sock: object) -> None:
    """Set `UNSENT_LIMIT` on the uplink's socket, where the kernel knows the option."""
    if isinstance(sock, socket.socket) and hasattr(socket, "TCP_NOTSENT_LOWAT"):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, UNSENT_LIMIT)
