"""Serve Python functions on an MPREG cluster.

A :class:`Worker` connects to any node's websocket, registers its functions and serves
the calls the cluster routes to it::

    from mpreg_worker import Worker

    worker = Worker("ws://127.0.0.1:6666", name="ml")

    @worker.function(resources=["gpu"], version="1.2.0")
    async def score(x):
        return x / 100

    asyncio.run(worker.run())

:class:`Client` is a small client for calling functions (tests, examples, scripts).
The wire protocol is documented in the repository's README ("Workers").
"""

from .client import Client, RemoteError
from .worker import Worker, WorkerError

__all__ = ["Client", "RemoteError", "Worker", "WorkerError"]
