"""A small MPREG client: one websocket, requests answered by ``u``."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

from websockets.asyncio.client import ClientConnection, connect


class RemoteError(Exception):
    """An error answer of the node: ``code`` (1001..1006), ``message``, ``details``."""

    def __init__(self, error: dict[str, Any]):
        self.code = error.get("code")
        self.message = error.get("message", "")
        self.details = error.get("details")
        super().__init__(f"{self.code} {self.message}: {self.details}")


class Client:
    """Calls functions on a cluster through one node."""

    def __init__(self, ws: ClientConnection):
        self._ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[str, asyncio.Future] = {}
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, url: str) -> "Client":
        return cls(await connect(url, max_size=None))

    async def _read(self) -> None:
        try:
            async for message in self._ws:
                frame = json.loads(message)
                waiter = self._waiting.pop(str(frame.get("u")), None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(frame)
        except Exception:  # the connection broke: every waiter learns it below
            pass
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(ConnectionError("connection to the node closed"))
        self._waiting.clear()

    async def request(self, cmds: list[dict[str, Any]], timeout: float | None = None) -> dict[str, Any]:
        """Runs a request of commands (``{"name", "fun", "args", ...}``); the sink results."""
        u = f"py-{next(self._ids)}"
        frame: dict[str, Any] = {"role": "rpc", "u": u, "cmds": cmds}
        if timeout is not None:
            frame["timeout"] = timeout
        waiter = asyncio.get_running_loop().create_future()
        self._waiting[u] = waiter
        await self._ws.send(json.dumps(frame))
        reply = await waiter
        if reply.get("error"):
            raise RemoteError(reply["error"])
        return reply.get("r", {})

    async def call(self, fun: str, *args: Any, locs: list[str] | None = None, timeout: float | None = None,
                   **kwargs: Any) -> Any:
        """Calls one function; its result."""
        cmd: dict[str, Any] = {"name": fun, "fun": fun, "args": list(args), "kwargs": kwargs}
        if locs:
            cmd["locs"] = locs
        return (await self.request([cmd], timeout=timeout))[fun]

    async def close(self) -> None:
        await self._ws.close()
        await self._reader

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
