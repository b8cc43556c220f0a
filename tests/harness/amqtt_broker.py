"""amqtt's broker as a generic third-party MQTT broker (SPEC §4), run as a subprocess:

    python -m tests.harness.amqtt_broker --port P --ca ca.pem --cert server.pem --key server.key

One TLS listener on 127.0.0.1 that asks for a client certificate from ``--ca`` (amqtt's
CERT_OPTIONAL; our clients always present one) and accepts anonymous clients. Prints
``amqtt broker listening on 127.0.0.1:P`` once it accepts connections, then one line
``received QOS TOPIC`` per PUBLISH it receives (amqtt delivers to subscribers at the
subscription's QoS, not the publish's, so a subscriber cannot see the QoS a client sent);
stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

READY = r"amqtt broker listening on 127\.0\.0\.1:(?P<port>\d+)"


def _reporter() -> type:
    from amqtt.plugins.base import BasePlugin

    class Reporter(BasePlugin):  # type: ignore[misc]  # amqtt ships no type information
        async def on_broker_message_received(self, *, client_id: str, message: object) -> None:
            qos, topic = getattr(message, "qos", None), getattr(message, "topic", "")
            print(f"received {qos} {topic}", flush=True)  # noqa: T201

    return Reporter


Reporter = _reporter()


async def serve(port: int, ca: str, cert: str, key: str) -> None:
    from amqtt.broker import Broker

    listener = {
        "type": "tcp",
        "bind": f"127.0.0.1:{port}",
        "ssl": True,
        "cafile": ca,
        "certfile": cert,
        "keyfile": key,
    }
    broker = Broker(
        {
            "listeners": {"default": listener},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
                "tests.harness.amqtt_broker.Reporter": {},
            },
        }
    )
    await broker.start()
    print(f"amqtt broker listening on 127.0.0.1:{port}", flush=True)  # noqa: T201
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(broker.shutdown(), 5)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.ca, args.cert, args.key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
