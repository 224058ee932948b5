"""The worker: registration, calls, heartbeats, reconnects, clean shutdown.

Frames (JSON objects, one per websocket message), as the node's README documents them:

- worker -> node: ``worker-register {u, name, functions, max_concurrency?, token?}``,
  ``worker-result {id, result | error: {kind, message}}``, ``worker-heartbeat {}``,
  ``worker-goodbye {}``, and on each extra websocket (lane)
  ``worker-lane {u, worker_id, lane_key}``;
- node -> worker: ``worker-registered {u, worker_id, heartbeat_s, max_concurrency, lanes?,
  lane_key? | error}``, ``worker-call {id, fun, function_id, version, args, kwargs, timeout_ms}``,
  ``worker-cancel {id}``.

The worker opens the lanes the node offers (one websocket per node thread, so a call
needs no hand-off between the node's threads) and answers each call on the websocket it
came on; losing any of them loses the registration (the node closes the others).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import json
import logging
import random
from dataclasses import dataclass, field
from typing import Any, Callable

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

log = logging.getLogger("mpreg_worker")


class WorkerError(Exception):
    """The node refused the worker for good (bad registration, wrong token)."""


@dataclass
class _Function:
    name: str
    function_id: str
    version: str
    resources: list[str]
    body: Callable[..., Any]
    is_async: bool
    signature: inspect.Signature | None = field(default=None)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "function_id": self.function_id, "version": self.version,
                "resources": self.resources}


def normalize_version(version: str) -> str:
    """``1.2`` -> ``1.2.0``, as the node reads it (and names it in its calls); anything else
    is left for the node to refuse."""
    parts = version.strip().split(".")
    if 1 <= len(parts) <= 3 and all(p.isascii() and p.isdigit() for p in parts):
        return ".".join(str(int(p)) for p in parts + ["0"] * (3 - len(parts)))
    return version


def type_name(value: Any) -> str:
    """The JSON value's type as the node names it in its 1003 details."""
    if value is None:
        return "None"
    return type(value).__name__


def arg_types(args: list[Any], kwargs: dict[str, Any]) -> str:
    shown = [type_name(a) for a in args] + [f"{k}={type_name(v)}" for k, v in kwargs.items()]
    return "[" + ",".join(shown) + "]"


class Worker:
    """Serves the functions registered with :meth:`function` on the node at ``url``.

    ``max_concurrency`` bounds the calls this worker runs at once (the node holds the
    rest back); sync functions run in a thread pool of ``max_threads``; after a lost
    connection the worker reconnects with exponential backoff (``backoff_initial`` up to
    ``backoff_max`` seconds, with jitter) and registers again.
    """

    def __init__(self, url: str, name: str, *, token: str | None = None, max_concurrency: int | None = None,
                 max_threads: int = 8, reconnect: bool = True, backoff_initial: float = 0.1,
                 backoff_max: float = 5.0):
        self.url = url
        self.name = name
        self.token = token
        self.max_concurrency = max_concurrency
        self.reconnect = reconnect
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._functions: dict[tuple[str, str], _Function] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix=f"mpreg-{name}")
        self._running: dict[str, asyncio.Task] = {}
        self._stopping: asyncio.Event | None = None
        self._ws: ClientConnection | None = None
        #: Set while the worker is registered (tests and scripts wait on it).
        self.registered: asyncio.Event | None = None
        #: The id the node gave this worker at its last registration.
        self.worker_id: str | None = None

    def function(self, name: str | None = None, *, function_id: str | None = None, version: str = "1.0.0",
                 resources: list[str] | tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: serve the decorated function (async or sync) under ``name``."""

        def register(body: Callable[..., Any]) -> Callable[..., Any]:
            fname = name or body.__name__
            try:
                signature = inspect.signature(body)
            except (TypeError, ValueError):
                signature = None
            normalized = normalize_version(version)
            self._functions[(fname, normalized)] = _Function(
                name=fname, function_id=function_id or fname, version=normalized, resources=list(resources),
                body=body, is_async=inspect.iscoroutinefunction(body), signature=signature)
            return body

        return register

    async def run(self) -> None:
        """Serves until :meth:`stop` (or cancellation); reconnects after a lost connection."""
        if not self._functions:
            raise WorkerError("no functions registered with @worker.function")
        self._stopping = asyncio.Event()
        self.registered = self.registered or asyncio.Event()
        backoff = self.backoff_initial
        try:
            while not self._stopping.is_set():
                try:
                    async with connect(self.url, max_size=None) as ws:
                        self._ws = ws
                        offer = await self._register(ws)
                        backoff = self.backoff_initial
                        lanes = await self._open_lanes(*offer)
                        try:
                            await self._serve_all(ws, lanes)
                        finally:
                            for lane in lanes:
                                await lane.close()
                except WorkerError:
                    raise
                # A websocket handshake that fails (a node starting or stopping closes the
                # socket before its HTTP answer, or answers with an error status) is a lost
                # connection too, whether on the registering websocket or on a lane.
                except (OSError, ConnectionClosed, InvalidHandshake, asyncio.TimeoutError) as e:
                    log.warning("worker %s: connection to %s lost (%s)", self.name, self.url, e)
                finally:
                    self._ws = None
                    self.registered.clear()
                    self._abandon_calls()
                if self._stopping.is_set() or not self.reconnect:
                    return
                delay = backoff * (0.5 + random.random())
                log.info("worker %s: reconnecting in %.2fs", self.name, delay)
                try:
                    await asyncio.wait_for(self._stopping.wait(), timeout=delay)
                except asyncio.TimeoutError:
                    pass
                backoff = min(backoff * 2, self.backoff_max)
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def stop(self) -> None:
        """Clean shutdown: ``worker-goodbye`` (the node sends no new call), the calls in
        flight answer, then the connection closes and :meth:`run` returns."""
        if self._stopping is None:
            return
        self._stopping.set()
        ws = self._ws
        if ws is None:
            return
        try:
            await ws.send(json.dumps({"role": "worker-goodbye"}))
            if self._running:
                await asyncio.wait(list(self._running.values()))
            # The registering websocket first: the node reads the goodbye before its close,
            # and closes the lanes itself.
            await ws.close()
        except ConnectionClosed:
            pass

    async def _register(self, ws: ClientConnection) -> tuple[int, str | None]:
        """Registers on ``ws``; the lanes the node offers and their key."""
        frame: dict[str, Any] = {"role": "worker-register", "u": "register", "name": self.name,
                                 "functions": [f.describe() for f in self._functions.values()]}
        if self.token is not None:
            frame["token"] = self.token
        if self.max_concurrency is not None:
            frame["max_concurrency"] = self.max_concurrency
        reply = await self._handshake(ws, frame)
        error = reply.get("error")
        if error:
            # 1006 (the node has max_workers) may clear up; anything else will not.
            if error.get("code") == 1006:
                raise ConnectionError(f"node is full: {error}")
            raise WorkerError(f"registration refused: {error}")
        self.worker_id = reply.get("worker_id")
        self._heartbeat_s = float(reply.get("heartbeat_s", 5.0))
        log.info("worker %s registered as %s on %s", self.name, self.worker_id, self.url)
        assert self.registered is not None
        self.registered.set()
        return int(reply.get("lanes") or 0), reply.get("lane_key")

    @staticmethod
    async def _handshake(ws: ClientConnection, frame: dict[str, Any]) -> dict[str, Any]:
        """Sends ``frame`` and returns the node's ``worker-registered``."""
        await ws.send(json.dumps(frame))
        while True:
            reply = json.loads(await asyncio.wait_for(ws.recv(), timeout=30))
            if reply.get("role") == "worker-registered":
                return reply

    async def _open_lanes(self, lanes: int, key: str | None) -> list[ClientConnection]:
        """Opens the lanes offered; one the node refuses is done without."""
        opened: list[ClientConnection] = []
        if not key:
            return opened
        try:
            for n in range(1, lanes + 1):
                lane = await connect(self.url, max_size=None)
                frame = {"role": "worker-lane", "u": f"lane-{n}", "worker_id": self.worker_id, "lane_key": key}
                reply = await self._handshake(lane, frame)
                if reply.get("error"):
                    log.warning("worker %s: lane refused: %s", self.name, reply["error"])
                    await lane.close()
                else:
                    opened.append(lane)
        except BaseException:
            for lane in opened:
                await lane.close()
            raise
        return opened

    async def _serve_all(self, ws: ClientConnection, lanes: list[ClientConnection]) -> None:
        """Serves the registering websocket (with the heartbeat) and the lanes until any of
        them ends: the node ends the others then."""
        tasks = [asyncio.create_task(self._serve(ws))]
        tasks += [asyncio.create_task(self._serve_calls(lane)) for lane in lanes]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
        for task in done:
            task.result()  # a lost websocket raises here

    async def _serve(self, ws: ClientConnection) -> None:
        beat = asyncio.create_task(self._heartbeat(ws))
        try:
            await self._serve_calls(ws)
        finally:
            beat.cancel()

    async def _serve_calls(self, ws: ClientConnection) -> None:
        """Runs the calls that come on ``ws`` (each answered there) until it closes."""
        async for message in ws:
            frame = json.loads(message)
            role = frame.get("role")
            if role == "worker-call":
                call_id = str(frame.get("id"))
                task = asyncio.create_task(self._call(ws, frame))
                self._running[call_id] = task
                task.add_done_callback(lambda _t, i=call_id: self._running.pop(i, None))
            elif role == "worker-cancel":
                task = self._running.pop(str(frame.get("id")), None)
                if task is not None:
                    task.cancel()

    async def _heartbeat(self, ws: ClientConnection) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_s)
            await ws.send(json.dumps({"role": "worker-heartbeat"}))

    def _abandon_calls(self) -> None:
        for task in self._running.values():
            task.cancel()
        self._running.clear()

    async def _call(self, ws: ClientConnection, frame: dict[str, Any]) -> None:
        call_id = frame.get("id")
        args = frame.get("args") or []
        kwargs = frame.get("kwargs") or {}
        timeout = max(float(frame.get("timeout_ms", 30000)) / 1000.0, 0.001)
        function = self._functions.get((frame.get("fun"), frame.get("version")))
        try:
            if function is None:
                raise LookupError(f"{frame.get('fun')} {frame.get('version')} is not served by worker {self.name}")
            result = await asyncio.wait_for(self._invoke(function, args, kwargs), timeout=timeout)
            payload = json.dumps({"role": "worker-result", "id": call_id, "result": result})
        except asyncio.TimeoutError:
            return  # past the caller's deadline: nobody waits for the answer
        except asyncio.CancelledError:
            return  # the node cancelled the call
        except Exception as e:  # the function's failure is the caller's 1003
            payload = json.dumps({"role": "worker-result", "id": call_id,
                                  "error": {"kind": type(e).__name__, "message": self._describe(e, args, kwargs)}})
        try:
            await ws.send(payload)
        except ConnectionClosed:
            pass

    async def _invoke(self, function: _Function, args: list[Any], kwargs: dict[str, Any]) -> Any:
        if function.signature is not None:
            try:
                function.signature.bind(*args, **kwargs)
            except TypeError as e:
                raise TypeError(f"{function.name}{function.signature}: {e}") from None
        if function.is_async:
            result = await function.body(*args, **kwargs)
        else:
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(self._pool, functools.partial(function.body, *args, **kwargs))
        try:
            json.dumps(result)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{function.name} returned a value JSON cannot carry: {e}") from None
        return result

    @staticmethod
    def _describe(error: Exception, args: list[Any], kwargs: dict[str, Any]) -> str:
        text = str(error)
        if isinstance(error, TypeError):
            text += f" (argument types {arg_types(args, kwargs)})"
        return text
