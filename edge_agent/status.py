"""What `edge-agent status` shows: the buffer (per topic, totals, drops, dead letters,
incidents), the disk, and the uplink (its link state, certificate and token expiry), as text for
an operator or as JSON. Read-only, beside a running agent."""

from __future__ import annotations

import json
import time

from cryptography import x509

from edge_agent.buffer import BufferStats, agent_pid
from edge_agent.config import AgentConfig
from edge_agent.link import LinkStatus, read_link_status
from edge_agent.token import Token, TokenUnavailable, token_source
from mqtt_ingest.clock import SystemClock
from mqtt_ingest.disk import free_bytes

__all__ = ["disk_room", "link_text", "read_link", "status_json", "status_text"]

CERTIFICATE_WARNING = 30 * 86400  # seconds: status warns when the certificate expires sooner
TOKEN_WARNING = 3600  # seconds: at most this, or a quarter of the token's lifetime (below)


def _age(now_ms: int, then_ms: int) -> str:
    seconds = max(0, (now_ms - then_ms) // 1000)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def disk_room(config: AgentConfig) -> dict[str, int]:
    """Free space on the data directory's filesystem, against ``[buffer] disk_reserve``."""
    return {"free": free_bytes(config.agent.data_dir), "reserve": config.buffer.disk_reserve}


def _printable(text: str) -> str:
    """``text`` with its unprintable characters escaped: a topic is any local publisher's, and
    one holding ESC or CR sequences rewrote the operator's terminal (JSON output is escaped
    already)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def status_text(stats: BufferStats, config: AgentConfig, disk: dict[str, int]) -> str:
    now_ms = int(time.time() * 1000)
    lines = [
        f"buffer {config.agent.data_dir}  epoch {stats.epoch}  next seq {stats.next_seq}",
        f"{'TOPIC':<40} {'EVENTS':>10} {'BYTES':>12} {'OLDEST':>8}",
    ]
    for topic in stats.topics:
        age = _age(now_ms, topic.oldest_event_time_ms)
        name = _printable(topic.topic)[:40]
        lines.append(f"{name:<40} {topic.events:>10} {topic.bytes:>12} {age:>8}")
    lines.append(f"{'total':<40} {stats.events:>10} {stats.bytes:>12}")
    limits = config.buffer
    stored, size = stats.events + stats.dead_letters, stats.bytes + stats.dead_letter_bytes
    line = f"limits: {stored}/{limits.max_events} events, {size}/{limits.max_bytes} bytes"
    if stats.dead_letters:
        line += " (dead letters included)"
    lines.append(line)
    line = f"disk: {disk['free']} bytes free, disk_reserve {disk['reserve']}"
    if disk["free"] < disk["reserve"]:
        line += " (below it: new events only reuse the room of delivered ones, docs/buffer.md)"
    lines.append(line)
    if stats.drops:
        lines.append("dropped:")
        for (reason, name), (events, size) in sorted(stats.drops.items()):
            label = _printable(name)[:40]
            lines.append(f"  {reason:<12} {label:<40} {events:>10} events {size:>12} bytes")
    else:
        lines.append("dropped: none")
    lines.append(f"dead letters: {stats.dead_letters}")
    for incident in stats.incidents:
        lines.append(
            f"incident {_age(now_ms, incident.at_ms)} ago: {incident.kind}:"
            f" {_printable(incident.detail)}"
        )
    return "\n".join(lines)


def status_json(stats: BufferStats) -> dict[str, object]:
    return {
        "epoch": stats.epoch,
        "events": stats.events,
        "bytes": stats.bytes,
        "next_seq": stats.next_seq,
        "topics": [
            {
                "topic": t.topic,
                "events": t.events,
                "bytes": t.bytes,
                "oldest_ms": t.oldest_event_time_ms,
            }
            for t in stats.topics
        ],
        "drops": [
            {"reason": reason, "topic": topic, "events": events, "bytes": size}
            for (reason, topic), (events, size) in sorted(stats.drops.items())
        ],
        "dead_letters": stats.dead_letters,
        "dead_letter_bytes": stats.dead_letter_bytes,
        "incidents": [
            {"at_ms": i.at_ms, "kind": i.kind, "detail": i.detail} for i in stats.incidents
        ],
    }


def read_link(config: AgentConfig) -> dict[str, object]:
    """The uplink as ``status`` shows it: configuration, live state, credential expiry."""
    if config.uplink is None:
        return {"configured": False}
    now = time.time()
    result: dict[str, object] = {
        "configured": True,
        "server": f"{config.uplink.host}:{config.uplink.port}",
        "agent_pid": agent_pid(config.agent.data_dir),
    }
    state: LinkStatus | None = read_link_status(config.agent.data_dir)
    if state is not None:
        result["link"] = json.loads(state.to_json())
        result["detail"] = state.detail_at(now)
    # While the agent runs, the certificate it loaded (a rotation it refused left the file on
    # disk another one: shown from the file, a valid one there hid the expiry of the one in
    # use); the file besides when it differs.
    loaded = None
    if state is not None and result["agent_pid"] is not None:
        loaded = state.certificate_not_after
    prefix = "certificate" if loaded is None else "certificate_file"
    try:
        certificate = x509.load_pem_x509_certificate(config.uplink.tls.cert.read_bytes())
        not_after = certificate.not_valid_after_utc.timestamp()
        if not_after != loaded:
            result[f"{prefix}_expires_in_s"] = int(not_after - now)
    except (OSError, ValueError) as exc:
        result[f"{prefix}_problem"] = str(exc)
    if loaded is not None:
        result["certificate_expires_in_s"] = int(loaded - now)
    if config.uplink.token.mode == "token-file":
        try:
            token = token_source(config.uplink, config.agent.device_id, SystemClock()).current()
            if token.expires_at is not None:
                result["token_expires_in_s"] = int(token.expires_at - now)
                result["token_warning_s"] = token_warning(token, config.uplink.token.renew_before)
        except TokenUnavailable as exc:
            result["token_problem"] = str(exc)
    return result


def token_warning(token: Token, renew_before: float) -> int:
    """Seconds before a file token's expiry from which `status` warns: a quarter of its lifetime
    (``exp - iat``), at most `TOKEN_WARNING`, and at least ``renew_before`` (from then on the
    agent waits for a new file). A fresh token from the default ``issue-token --ttl 3600`` was
    below a flat hour from the start: always a warning."""
    if token.expires_at is None or token.issued_at is None:
        return TOKEN_WARNING
    lifetime = max(0.0, token.expires_at - token.issued_at)
    return int(max(renew_before, min(TOKEN_WARNING, lifetime / 4)))


def _seconds(value: object) -> str:
    seconds = int(value) if isinstance(value, int | float) else 0
    return _age(seconds * 1000, 0) if seconds >= 0 else f"-{_age(-seconds * 1000, 0)}"


def link_text(link: dict[str, object]) -> str:
    if not link["configured"]:
        return "uplink: not configured (the agent only buffers)"
    lines = []
    state = link.get("link")
    pid = link["agent_pid"]
    if pid is None:
        last = f"; last state {state['state']}" if isinstance(state, dict) else ""
        lines.append(f"uplink: {link['server']}: the agent is not running{last}")
    elif isinstance(state, dict):
        since = _seconds(time.time() - float(state["since"]))
        line = f"uplink: {state['state']} ({link['server']}) for {since}"
        if link.get("detail"):
            line += f": {link['detail']}"
        lines.append(line)
        if state["state"] != "online" and state.get("last_error"):
            lines.append(f"  last error: {state['last_error']}")
        lines.append(
            f"  delivered {state['delivered']} events over {state['connections']} connections"
            f" this run; {state['dead_lettered']} dead-lettered"
        )
    else:
        lines.append(f"uplink: {link['server']}: no link state yet")
    token_warning = link.get("token_warning_s", TOKEN_WARNING)
    for name, key, warning in (
        ("certificate", "certificate", CERTIFICATE_WARNING),
        ("certificate file (not loaded)", "certificate_file", CERTIFICATE_WARNING),
        ("token", "token", token_warning),
    ):
        assert isinstance(warning, int)
        if f"{key}_problem" in link:
            lines.append(f"{name}: WARNING {link[f'{key}_problem']}")
        elif f"{key}_expires_in_s" in link:
            left = link[f"{key}_expires_in_s"]
            assert isinstance(left, int)
            warn = "WARNING " if left < warning else ""
            when = f"expired {_seconds(-left)} ago" if left < 0 else f"expires in {_seconds(left)}"
            lines.append(f"{name}: {warn}{when}")
    return "\n".join(lines)
