"""A worker process for the kill test: `slow(x)` announces the call (touches MARKER), then
sleeps far past any test; the test kills this process while the call runs."""

import asyncio
import pathlib
import sys

from mpreg_worker import Worker


async def main(url: str, name: str, marker: str) -> None:
    worker = Worker(url, name, reconnect=False)

    @worker.function()
    async def slow(x):
        pathlib.Path(marker).touch()
        await asyncio.sleep(600)
        return x

    await worker.run()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
