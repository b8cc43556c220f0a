"""A tiny TCP echo server run as a real subprocess by the process-fixture tests.

It behaves the way our services must: binds the port it is given (0 = let the kernel choose),
prints ``listening on HOST:PORT`` once ready, keeps state in a data directory (a start counter) and
exits 0 on SIGTERM after closing its listener.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


def _count_start(data_dir: Path) -> int:
    data_dir.mkdir(parents=True, exist_ok=True)
    counter = data_dir / "starts"
    starts = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(starts))
    return starts


async def _serve(port: int, data_dir: Path) -> None:
    starts = _count_start(data_dir)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    server = await asyncio.start_server(_echo, "127.0.0.1", port)
    bound = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"listening on 127.0.0.1:{bound} starts={starts}\n")
    sys.stdout.flush()
    async with server:
        await stop.wait()
    sys.stdout.write("stopped\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data", type=Path, required=True)
    args = parser.parse_args()
    asyncio.run(_serve(args.port, args.data))


if __name__ == "__main__":
    main()
