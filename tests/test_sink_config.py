"""The sink's configuration checked at start and by ``cloud-sink check-config``: every problem
reported at once with its path, the validators of each section, the backend's reachability,
and no secret in what it prints."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from pathlib import Path

import pytest

from cloud_sink.backends.base import redacted_url
from cloud_sink.config import ConfigError, NatsBackendConfig, parse_config
from cloud_sink.service import preflight
from tests.harness.pki import Pki
from tests.harness.sink import sink_cli, write_sink_config


async def test_check_config_and_its_errors(tmp_path: Path, pki: Pki) -> None:
    good = await asyncio.to_thread(sink_cli, write_sink_config(tmp_path, pki), "check-config")
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["auth"]["mode"] == "device-signed"
    with pytest.raises(ConfigError) as info:
        parse_config('[listener]\nport = -1\n[auth]\nmode = "issuer-signed"\naudience = "a"\n')
    assert [p.split(":")[0] for p in info.value.problems] == [
        "listener.port",
        "listener.ca",
        "listener.cert",
        "listener.key",
        "backend",
        "auth.issuer",
        "auth.issuer_keys",
    ]


async def test_check_config_reports_every_missing_or_unusable_file_at_once(
    tmp_path: Path, pki: Pki
) -> None:
    config = write_sink_config(tmp_path, pki)
    junk = tmp_path / "k2.pem"
    junk.write_text("not a key\n")
    text = config.read_text().replace(str(pki.ca_cert), str(tmp_path / "no-ca.pem"))
    text = text.replace("[auth]", f'crl = "{tmp_path}"\n\n[auth]')  # a directory
    text = text.replace(
        "[auth]\n",
        '[auth]\nmode = "issuer-signed"\nissuer = "https://iss"\n'
        f'issuer_keys = ["{tmp_path / "k1.pem"}", "{junk}"]\n',
    )
    config.write_text(text)
    for command in ("check-config", "run"):
        result = await asyncio.to_thread(sink_cli, config, command)
        assert result.returncode == 2, result.stderr
        problems = [line.strip() for line in result.stderr.splitlines()[1:]]
        assert [p.split(":")[0] for p in problems] == [
            "listener.ca",
            "listener.crl",
            "auth.issuer_keys[0]",
            "auth.issuer_keys[1]",
        ], result.stderr
        assert "No such file or directory" in problems[0]
        assert "is a directory" in problems[1]
        assert "not a PEM public key" in problems[3]
    # Every file readable, but the key does not belong to the certificate.
    other = pki.device(f"cfg-{uuid.uuid4().hex[:6]}")
    config.write_text(write_sink_config(tmp_path, pki).read_text().replace(
        str(pki.server_key), str(other.key)
    ))  # fmt: skip
    result = await asyncio.to_thread(sink_cli, config, "check-config")
    assert result.returncode == 2
    assert "listener: certificate" in result.stderr


def test_reconnect_and_health_validators(tmp_path: Path, pki: Pki) -> None:
    base = write_sink_config(tmp_path, pki).read_text()
    config = parse_config(base)
    assert (config.backend.reconnect.initial, config.backend.reconnect.max) == (0.5, 30.0)
    assert config.health.port is None  # off unless configured
    assert config.listener.crl_check_interval == 5.0
    assert config.listener.batch_linger == 0  # forwarded at once; batches grow with the load
    assert parse_config(
        base.replace("[auth]", 'batch_linger = "2ms"\n\n[auth]')
    ).listener.batch_linger == pytest.approx(0.002)
    with pytest.raises(ConfigError) as info:
        parse_config(
            base.replace("[auth]", 'crl_check_interval = "0s"\nbatch_linger = "5s"\n\n[auth]')
            + '\n[backend.reconnect]\ninitial = "5s"\nmax = "1s"\n'
            + "\n[health]\nport = 70000\n"
        )
    problems = info.value.problems
    assert len(problems) == 4, problems
    assert problems[0].startswith("listener.crl_check_interval:")
    assert problems.pop(1).startswith(
        "listener.batch_linger: Input should be less than or equal to 1"
    )
    assert problems[1].startswith("health.port:")
    assert problems[2] == "backend.reconnect.initial: initial must not be more than max (got '5s')"


def test_check_config_reports_the_rules_over_several_keys_with_the_others(
    tmp_path: Path, pki: Pki
) -> None:
    """The rules over several keys (issuer-signed needs issuer and issuer_keys, reconnect initial
    <= max, the NATS subject prefixes apart) were model validators of their sections: each ran
    only once every key of its section was valid, and was reported at the section ("auth",
    "backend.nats.reconnect"). A file with these mistakes took three rounds of check-config."""
    text = write_sink_config(tmp_path, pki).read_text().split("[backend]")[0]
    text = text.replace("[listener]\n", "[listener]\nmax_connections = 0\n")
    text = text.replace("[auth]\n", '[auth]\nmode = "issuer-signed"\nleeway = "1h"\n')
    text += (
        '[backend]\ntype = "nats"\nsubject_prefix = "bridge"\ntimeout = "40s"\n\n'
        '[backend.reconnect]\ninitial = "10s"\nmax = "1s"\n'
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    issuer = 'mode = "issuer-signed" needs issuer and issuer_keys'
    assert info.value.problems == [
        "listener.max_connections: Input should be greater than 0 (got 0)",
        "auth.leeway: Input should be less than or equal to 600 (got '1h')",
        "backend.nats.timeout: Input should be less than or equal to 12 (got '40s')",
        f"auth.issuer: {issuer}",
        f"auth.issuer_keys: {issuer}",
        "backend.reconnect.initial: initial must not be more than max (got '10s')",
        "backend.subject_prefix: subject_prefix 'bridge' and dead_letter_subject_prefix"
        " 'bridge.dead' overlap: the two streams would take each other's subjects (got 'bridge')",
    ]
    # A rule is skipped when a value it needs is invalid: that value's own problem is enough.
    text = text.replace('subject_prefix = "bridge"', 'subject_prefix = "bridge.*"')
    text = text.replace('initial = "10s"', 'initial = "0s"')
    text = text.replace('mode = "issuer-signed"', 'mode = "issuer-signed"\nissuer = ""')
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert [p.split(": ")[0] for p in info.value.problems] == [
        "listener.max_connections",
        "auth.leeway",
        "backend.nats.reconnect.initial",
        "backend.nats.subject_prefix",
        "backend.nats.timeout",
        "auth.issuer",
        "auth.issuer_keys",
    ], info.value.problems
    assert f"auth.issuer: {issuer} (got '')" in info.value.problems


def test_the_jwt_leeway_is_at_most_ten_minutes(tmp_path: Path, pki: Pki) -> None:
    """Any leeway was taken ("365d"): expired tokens stayed usable that long."""
    base = write_sink_config(tmp_path, pki).read_text()
    assert parse_config(base.replace("[auth]\n", '[auth]\nleeway = "10m"\n')).auth.leeway == 600
    with pytest.raises(ConfigError) as info:
        parse_config(base.replace("[auth]\n", '[auth]\nleeway = "365d"\n'))
    assert info.value.problems == [
        "auth.leeway: Input should be less than or equal to 600 (got '365d')"
    ]


def test_a_backend_timeout_must_fit_the_stage_timeout(tmp_path: Path, pki: Pki) -> None:
    """With timeout = 40s the ingest server's 30 s stage timeout cut every call first: a dead
    backend never counted as an outage (the sink kept accepting and reporting ready)."""
    base = write_sink_config(tmp_path, pki).read_text()
    base = base[: base.index("[backend]")]
    for backend in ('type = "nats"\nurl = "nats://x"', 'type = "amqp"\nurl = "amqp://x"'):
        text = f"{base}[backend]\n{backend}\ntimeout = "
        assert parse_config(text + '"12s"\n').backend.timeout == 12.0  # type: ignore[union-attr]
        with pytest.raises(ConfigError) as info:
            parse_config(text + '"40s"\n')
        assert info.value.problems[0].startswith("backend.")
        assert "less than or equal to 12" in info.value.problems[0]


@pytest.mark.parametrize(("backend", "modules"), [("amqp", "aio_pika, aiormq"), ("nats", "nats")])
def test_check_config_reports_a_backend_whose_package_extra_is_missing(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch, backend: str, modules: str
) -> None:
    # `run` died with a ModuleNotFoundError traceback after check-config had said all is well.
    text = write_sink_config(tmp_path, pki).read_text()
    config = parse_config(text.split("[backend]")[0] + f'[backend]\ntype = "{backend}"\n')
    assert preflight(config) == []
    for module in modules.split(", "):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    assert preflight(config) == [
        f"backend.type: {backend!r} needs the package's [{backend}] extra (install it from its"
        f" checkout or wheel as '...[{backend}]'); not installed: {modules}"
    ]


@pytest.mark.parametrize(
    ("backend", "url", "problem"),
    [
        ("amqp", "http://rabbit:5672/", "the scheme must be one of amqp, amqps, not 'http'"),
        ("amqp", "amqp://rabbit:notaport/", "the port must be a number from 0 to 65535"),
        ("amqp", "amqp:///vhost", "the URL names no host"),
        ("nats", "nats://nats:99999", "the port must be a number from 0 to 65535"),
        ("nats", "127.0.0.1:4222", "the scheme must be one of nats, tls, ws, wss"),
        # A '/' or '?' in the password: the host or port was taken from it, and it was shown.
        ("amqp", "amqp://bridge:1234/5678@rabbit:5672/", "percent-encode the user name"),
        ("amqp", "amqp://bridge:hunter2?x@rabbit/", "percent-encode the user name"),
        ("nats", "nats://bridge:hunter2#x@nats:4222", "NATS takes no '/', '?' or '#'"),
    ],
)
def test_check_config_refuses_a_backend_url_it_cannot_connect_to(
    tmp_path: Path, pki: Pki, backend: str, url: str, problem: str
) -> None:
    """A bad URL passed check-config and failed only at the first connection attempt."""
    text = write_sink_config(tmp_path, pki).read_text()
    with pytest.raises(ConfigError) as info:
        parse_config(text.split("[backend]")[0] + f'[backend]\ntype = "{backend}"\nurl = "{url}"\n')
    [only] = info.value.problems
    assert only.startswith((f"backend.{backend}.url: ", "backend.url: ")), only
    assert problem in only, only
    assert "got" not in only  # the URL may hold a password: never shown
    assert all(secret not in only for secret in ("5678", "hunter2"))


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ('subject_prefix = "x.*"', "subject_prefix: a NATS subject prefix must hold no wildcard"),
        ('subject_prefix = "x.>"', "subject_prefix: a NATS subject prefix must hold no wildcard"),
        ('subject_prefix = "x."', "subject_prefix: a NATS subject prefix must not start or end"),
        ('subject_prefix = ".x"', "subject_prefix: a NATS subject prefix must not start or end"),
        ('subject_prefix = "x..y"', "subject_prefix: a NATS subject prefix must not start or end"),
        ('subject_prefix = ""', "subject_prefix: a NATS subject prefix must not be empty"),
        ('dead_letter_subject_prefix = "a b"', "dead_letter_subject_prefix: a NATS subject"),
        ('dead_letter_subject_prefix = "a\\tb"', "dead_letter_subject_prefix: a NATS subject"),
        (
            'subject_prefix = "bridge"',
            "'bridge' and dead_letter_subject_prefix 'bridge.dead' overlap",
        ),
        ('dead_letter_subject_prefix = "bridge.events"', "overlap"),
        ('dead_letter_subject_prefix = "bridge.events.dead"', "overlap"),
    ],
)
def test_a_nats_subject_prefix_that_is_no_subjects_start_is_refused(
    tmp_path: Path, pki: Pki, settings: str, problem: str
) -> None:
    """The subject prefixes were not checked: with "x.*" every event was stored on a literal
    wildcard subject; with "x.>" or "x." every publish failed with an opaque server error; with
    prefixes that overlap the second stream could not be created (or took the first's
    subjects)."""
    text = write_sink_config(tmp_path, pki).read_text().split("[backend]")[0]
    text += f'[backend]\ntype = "nats"\n{settings}\n'
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    [only] = info.value.problems
    key = settings.split(" = ")[0]
    assert only.startswith((f"backend.nats.{key}: ", f"backend.{key}: ")), only
    assert problem in only, only
    # Prefixes apart in a token (not merely a character) are fine.
    fine = 'subject_prefix = "a.b-c"\ndead_letter_subject_prefix = "a.b"'
    backend = parse_config(text.replace(settings, fine)).backend
    assert isinstance(backend, NatsBackendConfig)
    assert (backend.subject_prefix, backend.dead_letter_subject_prefix) == ("a.b-c", "a.b")


def test_a_deny_entry_that_is_no_device_id_is_refused(tmp_path: Path, pki: Pki) -> None:
    """A typo in the deny list ("dev-13 ") denied nobody, without a word."""
    text = write_sink_config(tmp_path, pki).read_text()
    with pytest.raises(ConfigError) as info:
        parse_config(text.replace("[auth]\n", '[auth]\ndeny = ["dev-12", "dev-13 "]\n', 1))
    assert info.value.problems == [
        "auth.deny: deny[1] is no device id: control characters and white space are not allowed"
        " (got ['dev-12', 'dev-13 '])"
    ]


def test_a_deny_list_keeps_ids_a_normalising_consumer_reads_as_others(
    tmp_path: Path, pki: Pki
) -> None:
    """Found by review: device ids that a normalising consumer reads as others are refused now
    (percent-escapes, NFKC, backslash); a deny list that named one (the id an operator denies
    after seeing the attack) made the sink's configuration invalid after the upgrade: it did not
    start, and a reload was refused. The deny list keeps them; the other rules still hold."""
    text = write_sink_config(tmp_path, pki).read_text()
    names = '["%2E%2E", "cafe\u0301-1", "victim\\\\spoof"]'
    config = parse_config(text.replace("[auth]\n", f"[auth]\ndeny = {names}\n", 1))
    assert config.auth.deny == ["%2E%2E", "cafe\u0301-1", "victim\\spoof"]
    with pytest.raises(ConfigError, match=r"deny\[0\] is no device id: '/'"):
        parse_config(text.replace("[auth]\n", '[auth]\ndeny = ["a/b"]\n', 1))


def test_check_config_and_the_logs_show_no_backend_password(tmp_path: Path, pki: Pki) -> None:
    text = write_sink_config(tmp_path, pki).read_text()
    url = "amqp://bridge:s3cr%40t@rabbit.example:5671/prod"
    path = tmp_path / "amqp.toml"
    path.write_text(text.split("[backend]")[0] + f'[backend]\ntype = "amqp"\nurl = "{url}"\n')
    done = sink_cli(path, "check-config")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["backend"]["url"] == "amqp://bridge:***@rabbit.example:5671/prod"
    assert "s3cr" not in done.stdout
    assert redacted_url("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"
    assert redacted_url("tls://u:p@[::1]:4222") == "tls://u:***@[::1]:4222"
    assert redacted_url("nats://s3cr3t-token@nats:4222") == "nats://***@nats:4222"  # a token
