"""The Python worker's figures next to the node's own `echo`, with the same Python client.

Starts a node (`MPREG_BIN`, else target/release/mpreg) and a Python worker serving
`py_echo` (async) in this process, then measures for `--duration` seconds each:
sequential calls (one in flight) and pipelined calls (64 in flight on one connection),
first of the node's built-in `echo`, then of `py_echo`. The client is the SDK's own (so
both sides pay the same client cost); prints one JSON object like `mpreg bench rpc --json`.

    python python/examples/bench_worker.py --duration 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import threading
import time
from pathlib import Path

from mpreg_worker import Client, Worker

ROOT = Path(__file__).resolve().parents[2]


def start_node() -> tuple[subprocess.Popen, str]:
    binary = os.environ.get("MPREG_BIN") or str(ROOT / "target" / "release" / "mpreg")
    process = subprocess.Popen([binary, "server", "start", "--port", "0", "--name", "bench"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    url: list[str] = []
    ready = threading.Event()

    def read():
        for line in process.stdout:
            if line.startswith("MPREG_URL="):
                url.append(line.strip().split("=", 1)[1])
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(30):
        raise RuntimeError("the node did not start")
    return process, url[0]


async def measure(client: Client, fun: str, depth: int, duration: float) -> dict:
    latencies: list[float] = []
    stop_at = time.perf_counter() + duration

    async def one_lane():
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            assert await client.call(fun, 42) == 42
            latencies.append(time.perf_counter() - t)

    started = time.perf_counter()
    await asyncio.gather(*(one_lane() for _ in range(depth)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    pick = lambda q: int(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e6)
    return {"calls_per_s": round(len(latencies) / elapsed, 1), "p50_us": pick(0.5), "p99_us": pick(0.99),
            "calls": len(latencies)}


async def main(duration: float) -> None:
    process, url = start_node()
    worker = Worker(url, "bench-py", max_concurrency=64)

    @worker.function()
    async def py_echo(x):
        return x

    task = asyncio.create_task(worker.run())
    try:
        while worker.registered is None or not worker.registered.is_set():
            await asyncio.sleep(0.01)
        results = []
        async with await Client.connect(url) as client:
            await measure(client, "echo", 1, 0.5)  # warm-up
            for name, fun, depth in [("py_client_echo_seq", "echo", 1), ("py_client_echo_pipelined", "echo", 64),
                                     ("python_worker_seq", "py_echo", 1),
                                     ("python_worker_pipelined", "py_echo", 64)]:
                results.append({"name": name, **await measure(client, fun, depth, duration)})
        print(json.dumps({"results": results, "duration_s": duration, "pipeline_depth": 64}))
    finally:
        await worker.stop()
        await asyncio.gather(task, return_exceptions=True)
        process.terminate()
        process.wait(10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=3.0)
    asyncio.run(main(parser.parse_args().duration))
