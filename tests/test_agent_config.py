"""The agent's TOML configuration: every validator, every problem reported with its path."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.config import ConfigError, load_config, parse_config, topic_matches

BASE = """
[agent]
device_id = "dev-1"
data_dir = "/var/lib/edge-agent"
{extra}
[[topics]]
filter = "#"
{rule}
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "agent.toml")
    assert str(info.value).startswith("agent.toml: ")
    return info.value.problems


def test_five_mistakes_are_reported_at_once_with_paths() -> None:
    text = """
[agent]
device_id = "a/b"
data_dir = "/data"
colour = "blue"

[buffer]
durability = "sometimes"

[[topics]]
filter = "x"
qos = 3

[[topics]]
filter = "#"
ttl = "forever"
"""
    found = problems(text)
    assert len(found) == 5, found
    paths = [p.split(":")[0] for p in found]
    assert paths == [
        "agent.device_id",
        "agent.colour",
        "buffer.durability",
        "topics[0].qos",
        "topics[1].ttl",
    ]
    assert "unknown key" in found[1]
    assert "'sometimes'" in found[2]


def test_check_config_reports_cross_section_problems_with_the_others() -> None:
    """The rules over several keys or sections ran only once every field was valid, and each
    stopped at its first failure: a file with 7 mistakes took 6 rounds of edit and recheck."""
    text = """
[agent]
device_id = "dev-1"
data_dir = "/var/lib/edge-agent"
[buffer]
max_events = 0
[metrics]
port = 1883
[[topics]]
filter = "a/#"
"""
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    found = "\n".join(caught.value.problems)
    assert "buffer.max_events" in found
    assert 'the last [[topics]] rule must have filter = "#"' in found
    assert "both listen on port 1883" in found


def test_field_and_cross_section_mistakes_all_come_out_at_once_with_paths() -> None:
    text = """
[agent]
device_id = "a/b"
data_dir = "/data"

[buffer]
max_events = 0

[listener]
port = 18999
max_packet_size = "64KiB"

[metrics]
port = 18999

[uplink]
host = "sink"
port = 0
backoff_initial = "2m"
backoff_max = "1m"
refused_backoff_initial = "1h"

[uplink.tls]
ca = "/pki/ca.pem"
cert = "/pki/dev.pem"
key = "/pki/dev.key"

[uplink.token]
lifetime = "1m"
renew_before = "5m"

[[topics]]
filter = "a/#"
qos = 3
max_payload = "1MiB"

[[topics]]
filter = "b/#"
max_payload = "64KiB"
"""
    found = problems(text)
    assert [p.split(": ")[0] for p in found] == [
        "agent.device_id",
        "buffer.max_events",
        "uplink.port",
        "topics[0].qos",
        "uplink.token.audience",
        "uplink.token.renew_before",
        "uplink.backoff_initial",
        "uplink.refused_backoff_initial",
        "topics[1].filter",
        "topics[0].max_payload",
        "topics[1].max_payload",
        "metrics.port",
    ], found
    assert found[4:] == [
        "uplink.token.audience: device-signed tokens need an audience (the sink's [auth] audience)",
        "uplink.token.renew_before: renew_before must be shorter than the token lifetime"
        " (got '5m')",
        "uplink.backoff_initial: backoff_initial must not be more than backoff_max (got '2m')",
        "uplink.refused_backoff_initial: refused_backoff_initial must not be more than"
        " refused_backoff_max (got '1h')",
        'topics[1].filter: the last [[topics]] rule must have filter = "#" so that every topic'
        " has a policy (got 'b/#')",
        "topics[0].max_payload: max_payload over what the local listener accepts"
        " (listener.max_packet_size 65536 less 1024 bytes for the topic and header = 64512):"
        " topics[0] ('a/#'): 1048576 (got '1MiB')",
        "topics[1].max_payload: max_payload over what the local listener accepts"
        " (listener.max_packet_size 65536 less 1024 bytes for the topic and header = 64512):"
        " topics[1] ('b/#'): 65536 (got '64KiB')",
        "metrics.port: [listener] and [metrics] both listen on port 18999 (127.0.0.1 and"
        " 127.0.0.1) (got 18999)",
    ]


@pytest.mark.parametrize(
    ("keys", "path", "message"),
    [
        ('mode = "token-file"', "uplink.token.file", "token-file mode needs file"),
        ('audience = ""', "uplink.token.audience", "need an audience"),
    ],
)
def test_an_incomplete_token_is_reported_at_its_key(keys: str, path: str, message: str) -> None:
    extra = (
        '[uplink]\nhost = "sink"\nport = 0\n'
        '[uplink.tls]\nca = "/pki/ca.pem"\ncert = "/pki/dev.pem"\nkey = "/pki/dev.key"\n'
        f"[uplink.token]\n{keys}\n"
    )
    found = problems(BASE.format(extra=extra, rule=""))
    assert found[0].startswith("uplink.port:"), found  # a field error does not hide the rule
    assert any(p.startswith(f"{path}:") and message in p for p in found), found


def test_a_rule_over_an_invalid_value_is_left_to_that_value() -> None:
    """A rule needing a value that is itself wrong says nothing: its problem is reported."""
    extra = "[listener]\nport = 70000\n[metrics]\nport = 70000\n"
    assert [p.split(":")[0] for p in problems(BASE.format(extra=extra, rule=""))] == [
        "listener.port",
        "metrics.port",
    ]


def test_relative_paths_and_a_missing_token_section_are_reported_with_the_rest() -> None:
    """A relative path was resolved by each command against its own working directory (a
    `publish` run elsewhere stored into a buffer no agent drains). A missing [uplink.token]
    (whose default mode needs an audience) came out as one error without a path, hiding the
    others."""
    text = """
[agent]
device_id = "dev-1"
data_dir = "data"

[uplink]
host = "sink"

[uplink.tls]
ca = "ca.pem"
cert = "/pki/dev.pem"
key = "/pki/dev.key"

[[topics]]
filter = "#"
qos = 5
"""
    assert problems(text) == [
        "agent.data_dir: must be an absolute path (got 'data')",
        "uplink.tls.ca: must be an absolute path (got 'ca.pem')",
        "uplink.token: Field required",
        "topics[0].qos: Input should be 0, 1 or 2 (got 5)",
    ]


def test_a_valid_config_with_defaults_and_units() -> None:
    config = parse_config(
        BASE.format(
            extra='[buffer]\nmax_bytes = "64MiB"\ncommit_linger = "2ms"\n',
            rule='ttl = "7d"\nmax_payload = "4KiB"\non_full = "drop-oldest"',
        )
    )
    assert config.buffer.max_bytes == 64 * 1024**2
    assert config.buffer.commit_linger == pytest.approx(0.002)
    assert config.buffer.durability == "full"
    assert config.topics[0].ttl == 7 * 86400
    assert config.topics[0].max_payload == 4096
    assert config.listener.host == "127.0.0.1"
    assert config.listener.port == 1883


def test_lingers_may_be_zero() -> None:
    config = parse_config(BASE.format(extra='[buffer]\ncommit_linger = "0ms"\n', rule=""))
    assert config.buffer.commit_linger == 0


@pytest.mark.parametrize(
    ("extra", "rule", "path", "message"),
    [
        ("", "qos = -1", "topics[0].qos", "0, 1 or 2"),
        ("", "priority = 10", "topics[0].priority", "less than or equal to 9"),
        ("", 'on_full = "panic"', "topics[0].on_full", "'reject' or 'drop-oldest'"),
        ("", "max_payload = 0", "topics[0].max_payload", "greater than 0"),
        ("", 'max_payload = "2 furlongs"', "topics[0].max_payload", "a size is"),
        ("", 'ttl = "-5s"', "topics[0].ttl", "a duration is"),
        ("", "ttl = 0", "topics[0].ttl", "greater than 0"),
        ("[buffer]\nmax_events = 0\n", "", "buffer.max_events", "greater than 0"),
        (
            '[listener]\nmax_packet_size = "64KiB"\n',
            'max_payload = "64KiB"',
            "topics[0].max_payload",
            "max_payload over what the local listener accepts (listener.max_packet_size 65536"
            " less 1024 bytes for the topic and header = 64512): topics[0] ('#'): 65536",
        ),
        ('[buffer]\ncommit_linger = "-1ms"\n', "", "buffer.commit_linger", "a duration is"),
        ("[buffer]\ncommit_linger = -0.5\n", "", "buffer.commit_linger", "greater than or equal"),
        ("[buffer]\nsurprise = 1\n", "", "buffer.surprise", "unknown key"),
        ("[listener]\nport = 70000\n", "", "listener.port", "less than or equal to 65535"),
        ('[listener]\nhost = "0.0.0.0"\n', "", "listener.host", "without authentication"),
        ('[listener]\nhost = "192.168.1.5"\n', "", "listener.host", "without authentication"),
        (
            '[uplink]\nhost = "sink"\nmax_attempts = 1\n'
            '[uplink.tls]\nca = "/pki/ca.pem"\ncert = "/pki/dev.pem"\nkey = "/pki/dev.key"\n'
            '[uplink.token]\naudience = "sink"\n',
            "",
            "uplink.max_attempts",
            "greater than or equal to 2",
        ),
        (
            '[uplink]\nhost = "sink"\n'
            '[uplink.tls]\nca = "/pki/ca.pem"\ncert = "/pki/dev.pem"\nkey = "/pki/dev.key"\n'
            '[uplink.token]\naudience = "sink"\n[uplink.batch]\nmax_events = 1001\n',
            "",
            "uplink.batch.max_events",
            "less than or equal to 1000",
        ),
        *(
            (
                f'[uplink]\nhost = "sink"\n{keys}\n'
                '[uplink.tls]\nca = "/pki/ca.pem"\ncert = "/pki/dev.pem"\nkey = "/pki/dev.key"\n'
                '[uplink.token]\naudience = "sink"\n',
                "",
                path,
                message,
            )
            for keys, path, message in (
                (
                    'backoff_initial = "2m"\nbackoff_max = "1m"',
                    "uplink.backoff_initial",
                    "backoff_initial must not be more than backoff_max",
                ),
                (
                    'refused_backoff_initial = "1h"',  # over the default 900 s maximum
                    "uplink.refused_backoff_initial",
                    "refused_backoff_initial must not be more than refused_backoff_max",
                ),
            )
        ),
    ],
)
def test_each_validator_names_the_path(extra: str, rule: str, path: str, message: str) -> None:
    found = problems(BASE.format(extra=extra, rule=rule))
    assert any(p.startswith(f"{path}:") and message in p for p in found), found


@pytest.mark.parametrize(
    ("keys", "path", "message"),
    [
        # Each accepted at start, then every connection failed on the first publish, for ever.
        (
            'host = "sink"\ntopic_template = "devices/{device_id}/+/{topic}"',
            "uplink.topic_template",
            "the template makes topics such as 'devices/d/+/t': a topic name cannot contain the"
            " wildcards",
        ),
        (
            'host = "sink"\ntopic_template = "devices/{device_id}//{topic}"',
            "uplink.topic_template",
            "an empty level",
        ),
        (
            'host = "sink"\ntopic_template = "{topic}/../x"',
            "uplink.topic_template",
            "cannot be '.' or '..'",
        ),
        # Each connection attempt logged a traceback ("unexpected error").
        ('host = "sink..example.com"', "uplink.host", "'sink..example.com' is not a valid host"),
        ('host = ""', "uplink.host", "the host is empty"),
    ],
)
def test_an_uplink_that_could_never_send_is_refused_at_start(
    keys: str, path: str, message: str
) -> None:
    extra = (
        f"[uplink]\n{keys}\n"
        '[uplink.tls]\nca = "/pki/ca.pem"\ncert = "/pki/dev.pem"\nkey = "/pki/dev.key"\n'
        '[uplink.token]\naudience = "sink"\n'
    )
    found = problems(BASE.format(extra=extra, rule=""))
    assert any(p.startswith(f"{path}:") and message in p for p in found), found


@pytest.mark.parametrize("host", ["sink.example.com", "straße.example", "10.0.0.1", "::1"])
def test_valid_uplink_hosts(host: str) -> None:
    extra = (
        f'[uplink]\nhost = "{host}"\n'
        '[uplink.tls]\nca = "/pki/ca.pem"\ncert = "/pki/dev.pem"\nkey = "/pki/dev.key"\n'
        '[uplink.token]\naudience = "sink"\n'
    )
    config = parse_config(BASE.format(extra=extra, rule=""), "agent.toml")
    assert config.uplink is not None
    assert config.uplink.host == host


def test_durations_are_finite_and_bounded_where_larger_ones_break() -> None:
    """Values the schema once took that then failed at run time: a ttl of inf (or 1e17 s, over
    a 64-bit millisecond expiry) failed every commit of its group with OverflowError; a linger
    of inf never committed, and one over the listener's 30 s stage timeout left the publisher
    unacknowledged while the event was committed anyway (a duplicate on each retry)."""
    text = BASE.format(extra="[buffer]\ncommit_linger = inf\n", rule="ttl = nan").replace(
        '[[topics]]\nfilter = "#"',
        '[[topics]]\nfilter = "a/#"\nttl = 1e17\n\n[[topics]]\nfilter = "#"',
    )
    assert problems(text) == [
        "buffer.commit_linger: Input should be a finite number (got inf)",
        "topics[0].ttl: Input should be less than or equal to 3155760000 (got 1e+17)",
        "topics[1].ttl: Input should be greater than 0 (got nan)",
    ]
    slow = problems(BASE.format(extra='[buffer]\ncommit_linger = "35s"\n', rule=""))
    assert slow == ["buffer.commit_linger: Input should be less than or equal to 1 (got '35s')"]


@pytest.mark.parametrize(
    ("lifetime", "message"),
    [("0.5s", "greater than or equal to 2"), ("400d", "less than or equal to 31622400")],
)
def test_a_token_lifetime_is_two_seconds_to_a_year(lifetime: str, message: str) -> None:
    """Under a second, device-signed tokens were minted expired (JWT times are whole seconds);
    a lifetime past the year 9999 broke the uplink's log line about the token's expiry."""
    extra = (
        '[uplink]\nhost = "sink"\n'
        '[uplink.tls]\nca = "/pki/ca.pem"\ncert = "/pki/dev.pem"\nkey = "/pki/dev.key"\n'
        f'[uplink.token]\naudience = "sink"\nlifetime = "{lifetime}"\nrenew_before = "1s"\n'
    )
    found = problems(BASE.format(extra=extra, rule=""))
    assert any(p.startswith("uplink.token.lifetime:") and message in p for p in found), found


def test_values_that_passed_check_config_and_failed_at_run_are_refused() -> None:
    """A packet size over MQTT's limit and one port for the listener and the metrics passed
    check-config, then `run` exited with a traceback (restarted by systemd every 5 s); a loop
    period of a microsecond made an idle agent spin at 85% CPU."""
    extra = (
        '[buffer]\nttl_sweep_interval = "0.001ms"\n'
        '[listener]\nport = 18999\nmax_packet_size = "300MiB"\n'
        '[metrics]\nhost = "0.0.0.0"\nport = 18999\n'
    )
    assert problems(BASE.format(extra=extra, rule="")) == [
        "buffer.ttl_sweep_interval: Input should be greater than or equal to 0.1 (got '0.001ms')",
        "listener.max_packet_size: Input should be less than or equal to 268435455 (got '300MiB')",
        "metrics.port: [listener] and [metrics] both listen on port 18999 (127.0.0.1 and 0.0.0.0)"
        " (got 18999)",
    ]
    tls = "[listener.tls]\nca = '/a'\ncert = '/b'\nkey = '/c'\n"  # not loopback: needs TLS
    for listener, metrics, clash in (
        ("127.0.0.1", "127.0.0.2", False),
        ("0.0.0.0", "::1", False),  # two families: both bind
        ("localhost", "127.0.0.1", True),
        ("::", "::1", True),
    ):
        extra = (
            f'[listener]\nhost = "{listener}"\nport = 18999\n'
            + (tls if listener[0] in "0:" else "")
            + f'[metrics]\nhost = "{metrics}"\nport = 18999\n'
        )
        text = BASE.format(extra=extra, rule="")
        if not clash:
            assert parse_config(text).metrics.port == 18999
            continue
        found = problems(text)
        assert any("both listen on port 18999" in p for p in found), (listener, metrics, found)


def test_non_loopback_listener_is_allowed_with_mutual_tls() -> None:
    extra = (
        '[listener]\nhost = "0.0.0.0"\n[listener.tls]\n'
        'ca = "/etc/ca.pem"\ncert = "/etc/l.pem"\nkey = "/etc/l.key"\n'
    )
    config = parse_config(BASE.format(extra=extra, rule=""))
    assert config.listener.tls is not None


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_loopback_hosts_need_no_authentication(host: str) -> None:
    config = parse_config(BASE.format(extra=f'[listener]\nhost = "{host}"\n', rule=""))
    assert config.listener.host == host


@pytest.mark.parametrize(
    ("device_id", "message"),
    [("", "empty"), ("a+b", "wildcard"), ("a#", "wildcard"), ("a.b", "NATS")],
)
def test_device_id_is_validated(device_id: str, message: str) -> None:
    text = BASE.format(extra="", rule="").replace('"dev-1"', f'"{device_id}"')
    found = problems(text)
    assert any(p.startswith("agent.device_id:") and message in p for p in found), found


@pytest.mark.parametrize(
    ("topic_filter", "message"),
    [("a/#/b", "'#' must be"), ("a/b+", "'+' must be"), ("", "empty"), ("a\x00", "NUL")],
)
def test_topic_filters_are_validated(topic_filter: str, message: str) -> None:
    text = (
        BASE.format(extra="", rule="")
        .replace(
            '[[topics]]\nfilter = "#"',
            f'[[topics]]\nfilter = "{topic_filter}"\n\n[[topics]]\nfilter = "#"',
        )
        .replace("\x00", "\\u0000")
    )
    found = problems(text)
    assert any(p.startswith("topics[0].filter:") and message in p for p in found), found


def test_a_catch_all_rule_is_required_last() -> None:
    text = BASE.format(extra="", rule="").replace('filter = "#"', 'filter = "sensors/#"')
    assert any('must have filter = "#"' in p for p in problems(text))
    assert problems(BASE.format(extra="", rule="").split("[[topics]]")[0]) == [
        "topics: Field required"
    ]


def test_toml_syntax_and_missing_file(tmp_path: Path) -> None:
    assert "not valid TOML" in problems("[agent\n")[0]
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


def test_first_matching_rule_wins() -> None:
    text = BASE.format(extra="", rule="qos = 0").replace(
        '[[topics]]\nfilter = "#"',
        '[[topics]]\nfilter = "alarms/+/fire"\nqos = 2\n\n'
        '[[topics]]\nfilter = "alarms/#"\nqos = 1\n\n[[topics]]\nfilter = "#"',
    )
    config = parse_config(text)
    assert config.rule_for("alarms/hall/fire").qos == 2
    assert config.rule_for("alarms/hall/smoke").qos == 1
    assert config.rule_for("alarms").qos == 1
    assert config.rule_for("sensors/t").qos == 0
    # The catch-all is every topic's default policy, '$' ones included (it raised before).
    assert config.rule_for("$aws/things/t").qos == 0
    assert config.rule_for("$SYS/x").filter == "#"


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("#", "a/b", True),
        ("#", "$SYS/x", False),
        ("+/b", "a/b", True),
        ("+/b", "a/c", False),
        ("a/+", "a", False),
        ("a/#", "a", True),
        ("a/+/c", "a/b/c", True),
        ("a/b", "a/b/c", False),
        ("a/b/c", "a/b", False),
    ],
)
def test_topic_matching(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


def test_an_operators_selection_covers_dollar_topics() -> None:
    """`buffer purge|export|peek --topic` match with ``dollar``: the catch-all rule buffers
    `$aws/...` events, and `purge --topic '#'` said "purged N events" leaving them behind."""
    assert topic_matches("#", "$aws/things/x", dollar=True)
    assert topic_matches("+/things/#", "$aws/things/x", dollar=True)
    assert not topic_matches("a/#", "$aws/things/x", dollar=True)
    assert not topic_matches("#", "$aws/things/x")  # subscriber matching is unchanged


@pytest.mark.parametrize(
    ("template", "topic"),
    [
        ("devices/{device_id}/%{topic}", "2e%2e/x"),
        ("devices/{device_id}/{topic}2e", "x/%2e%"),
    ],
)
def test_a_topic_the_template_turns_into_a_dot_level_is_refused_at_the_door(
    template: str, topic: str
) -> None:
    """The door checked the uplink topic's length only: a local topic valid on its own but made
    into a '..' level by the text the template puts next to it ('%' + '2e%2e' percent-decodes
    to '..') was accepted, and the sink closed the link on it as a rights violation, connection
    after connection, until it was dead-lettered."""
    from edge_agent.accept import InvalidEvent, check_event

    extra = (
        f'[uplink]\nhost = "sink"\ntopic_template = "{template}"\n'
        '[uplink.tls]\nca = "/pki/ca.pem"\ncert = "/pki/dev.pem"\nkey = "/pki/dev.key"\n'
        '[uplink.token]\naudience = "sink"\n'
    )
    config = parse_config(BASE.format(extra=extra, rule=""))
    with pytest.raises(InvalidEvent, match=r"cannot be '\.' or '\.\.'"):
        check_event(config, topic, b"x")
