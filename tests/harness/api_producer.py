"""Test subprocess: publish through the Python API and print each event once it is acknowledged.

    python -m tests.harness.api_producer CONFIG COUNT CONCURRENCY

Prints ``ready`` once the agent is up, then ``acked <payload> <event-id>`` per acknowledged event.
The test kills it and checks every printed event is in the buffer.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from edge_agent import Agent, load_config


async def _main(config_path: Path, count: int, concurrency: int) -> None:
    config = load_config(config_path)
    async with Agent(config) as agent:
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        queue = iter(range(count))

        async def producer() -> None:
            for number in queue:
                payload = f"api-{number}"
                event_id = await agent.publish(f"sensors/{number % 7}", payload.encode())
                sys.stdout.write(f"acked {payload} {event_id}\n")
                sys.stdout.flush()

        async with asyncio.TaskGroup() as tasks:
            for index in range(concurrency):
                tasks.create_task(producer(), name=f"producer-{index}")


if __name__ == "__main__":
    asyncio.run(_main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
