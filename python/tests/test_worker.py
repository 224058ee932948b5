"""The SDK against real node processes (the built `mpreg` binary, port 0)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import PYTHON, NodeProcess
from mpreg_worker import Client, RemoteError, Worker, WorkerError

HERE = Path(__file__).resolve().parent


async def apoll(what: str, probe, timeout: float = 15.0):
    """Polls ``probe`` (blocking, run in a thread) without stalling the event loop."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await asyncio.to_thread(probe)
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def started(worker: Worker) -> asyncio.Task:
    task = asyncio.create_task(worker.run())
    while worker.registered is None:
        await asyncio.sleep(0.005)
    done, _ = await asyncio.wait([task, asyncio.create_task(worker.registered.wait())],
                                 return_when=asyncio.FIRST_COMPLETED, timeout=15)
    if task in done:
        task.result()  # raises the registration error
    assert worker.registered.is_set(), "worker did not register"
    return task


def test_a_dag_mixes_rust_and_python_functions_across_two_nodes(nodes, cluster_name):
    a = nodes("A", cluster_name, "--functions", "demo")
    b = nodes("B", cluster_name, "--peer", a.url)

    async def scenario():
        worker = Worker(b.url, "py-math")

        @worker.function(resources=["python"], version="1.2")  # the node reads 1.2.0
        async def py_square(x):
            return x * x

        @worker.function()
        def py_label(x, prefix="label"):  # sync: runs in the worker's thread pool
            return f"{prefix}-{x}"

        task = await started(worker)
        # The node registers a worker's functions together, in one catalog update: once A
        # knows py_square it knows py_label too.
        await apoll("A to know B's py_square", lambda: a.catalog_has("py_square", owner="B"))
        async with await Client.connect(a.url) as client:
            r = await client.request([
                {"name": "s", "fun": "add", "args": [2, 3]},                      # Rust, on A
                {"name": "sq", "fun": "py_square", "args": ["s"], "locs": ["python"],
                 "version_constraint": ">=1.2"},                                 # Python, on B
                {"name": "m", "fun": "multiply", "args": ["sq", 2]},              # Rust, on A
                {"name": "l", "fun": "py_label", "args": ["m"], "kwargs": {"prefix": "result"}},
            ])
            assert r == {"l": "result-50"}
            # A call that does not fit the signature: a 1003 with the argument types.
            with pytest.raises(RemoteError) as failure:
                await client.call("py_square", 1, "two")
            assert failure.value.code == 1003
            assert "TypeError" in str(failure.value.details), failure.value.details
            assert "argument types [int,str]" in str(failure.value.details), failure.value.details
            assert "worker=py-math" in str(failure.value.details), failure.value.details
        await worker.stop()
        await asyncio.wait_for(task, 15)
        # The clean shutdown took its functions out of the cluster.
        await apoll("py_square to leave A's catalog", lambda: not a.catalog_has("py_square"))

    asyncio.run(scenario())


def test_a_worker_process_killed_mid_call(nodes, cluster_name, tmp_path):
    node = nodes("K", cluster_name)

    def spawn(name: str) -> tuple[subprocess.Popen, Path]:
        marker = tmp_path / f"{name}.called"
        env = dict(os.environ, PYTHONPATH=str(HERE.parent))
        process = subprocess.Popen([PYTHON, str(HERE / "slow_worker.py"), node.url, name, str(marker)], env=env)
        return process, marker

    async def scenario():
        async with await Client.connect(node.url) as client:
            # Alone: the call is lost with the process, answered 1005 (not a timeout).
            victim, marker = spawn("victim")
            try:
                await apoll("the victim to register", lambda: node.catalog_has("slow"))
                call = asyncio.create_task(client.call("slow", 1))
                await apoll("the call to reach the victim", marker.exists)
                victim.send_signal(signal.SIGKILL)
                with pytest.raises(RemoteError) as lost:
                    await asyncio.wait_for(call, 20)
                assert lost.value.code == 1005, lost.value
                assert "victim" in str(lost.value.details)
            finally:
                victim.kill()
                victim.wait()
            await apoll("slow to leave the catalog", lambda: not node.catalog_has("slow"))
            # With another worker serving it: the call is retried there.
            victim, marker = spawn("victim-2")
            try:
                await apoll("victim-2 to register", lambda: node.catalog_has("slow"))
                call = asyncio.create_task(client.call("slow", 7))
                await apoll("the call to reach victim-2", marker.exists)
                backup = Worker(node.url, "backup")

                @backup.function()
                def slow(x):
                    return x + 1

                task = await started(backup)
                victim.send_signal(signal.SIGKILL)
                assert await asyncio.wait_for(call, 20) == 8
                await backup.stop()
                await asyncio.wait_for(task, 15)
            finally:
                victim.kill()
                victim.wait()

    asyncio.run(scenario())


def test_two_workers_share_the_load(nodes, cluster_name):
    node = nodes("L", cluster_name)

    async def scenario():
        running = {"left": 0, "right": 0}
        peak = {"left": 0, "right": 0}
        workers, tasks = [], []
        for name in ("left", "right"):
            worker = Worker(node.url, name, max_concurrency=2)

            def make(name: str):
                async def who():
                    running[name] += 1
                    peak[name] = max(peak[name], running[name])
                    await asyncio.sleep(0.05)
                    running[name] -= 1
                    return name
                return who

            worker.function(name="who")(make(name))
            workers.append(worker)
            tasks.append(await started(worker))
        async with await Client.connect(node.url) as client:
            answers = await asyncio.gather(*(client.call("who") for _ in range(16)))
        assert set(answers) == {"left", "right"}, answers
        assert all(1 <= p <= 2 for p in peak.values()), peak
        for worker in workers:
            await worker.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 15)

    asyncio.run(scenario())


def metric(node: NodeProcess, series: str) -> float | None:
    """The value of one series (name and labels, as `/metrics` prints them), if present."""
    for line in node.get("/metrics").splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_the_worker_opens_its_lanes_and_leaves_as_one_worker(nodes, cluster_name, tmp_path):
    config = tmp_path / "node.toml"
    config.write_text("[mpreg]\nworkers = 2\n")  # two listener threads: the node offers one lane
    node = nodes("L", cluster_name, "--config", str(config))

    async def scenario():
        worker = Worker(node.url, "laned")

        @worker.function()
        async def square(x):
            return x * x

        task = await started(worker)
        # The registering websocket and its lane; calls from clients on either thread.
        await apoll("the lane", lambda: metric(node, 'mpreg_connections{node="L"}') == 2)
        assert metric(node, 'mpreg_workers{node="L"}') == 1
        for x in range(4):
            async with await Client.connect(node.url) as client:
                assert await client.call("square", x) == x * x
        await worker.stop()
        await asyncio.wait_for(task, 15)
        await apoll("the goodbye counted",
                    lambda: metric(node, 'mpreg_workers_left_total{node="L",reason="goodbye"}') == 1)

    asyncio.run(scenario())


def test_the_worker_reconnects_after_the_node_restarts(nodes, cluster_name):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    node = nodes("R", cluster_name, port=port)

    async def scenario():
        worker = Worker(node.url, "phoenix", backoff_initial=0.05, backoff_max=0.5)

        @worker.function()
        def ping():
            return "pong"

        task = await started(worker)
        node.stop()
        await apoll("the worker to notice", lambda: not worker.registered.is_set())
        again = await asyncio.to_thread(lambda: NodeProcess("R", cluster_name, port=port))
        try:
            await asyncio.wait_for(worker.registered.wait(), 20)
            async with await Client.connect(again.url) as client:
                assert await client.call("ping") == "pong"
            await worker.stop()
            await asyncio.wait_for(task, 15)
        finally:
            again.stop()

    asyncio.run(scenario())


def test_a_failed_websocket_handshake_is_retried_not_fatal():
    """A listener that closes each connection before the HTTP answer (a node starting or
    stopping) makes the worker retry with backoff; run() does not die of it."""

    async def scenario():
        accepted = 0

        async def close_at_once(reader, writer):
            nonlocal accepted
            accepted += 1
            writer.close()

        server = await asyncio.start_server(close_at_once, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        worker = Worker(f"ws://127.0.0.1:{port}", "patient", backoff_initial=0.02, backoff_max=0.05)

        @worker.function()
        def ping():
            return "pong"

        task = asyncio.create_task(worker.run())
        deadline = time.monotonic() + 15
        while accepted < 3 and not task.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert not task.done(), task.exception() if task.done() else None
        assert accepted >= 3, accepted
        await worker.stop()
        await asyncio.wait_for(task, 5)
        server.close()
        await server.wait_closed()

    asyncio.run(scenario())


def test_a_refused_registration_is_an_error(nodes, cluster_name):
    node = nodes("E", cluster_name)

    async def scenario():
        worker = Worker(node.url, "clash")

        @worker.function()
        def echo(x):  # the node's own built-in: refused
            return x

        with pytest.raises(WorkerError):
            await asyncio.wait_for(worker.run(), 15)

    asyncio.run(scenario())
