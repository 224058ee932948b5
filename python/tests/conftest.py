"""Nodes for the tests: the built ``mpreg`` binary (``MPREG_BIN``, else the workspace's
``target/debug/mpreg``), started on port 0; its printed URLs are read from stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def binary() -> str:
    path = os.environ.get("MPREG_BIN") or str(ROOT / "target" / "debug" / "mpreg")
    if not Path(path).exists():
        raise RuntimeError(f"{path} does not exist: run `cargo build` first (or set MPREG_BIN)")
    return path


class NodeProcess:
    """``mpreg server start`` with the given flags, stopped at teardown."""

    def __init__(self, name: str, cluster: str, *flags: str, port: int = 0):
        self.name = name
        args = [binary(), "server", "start", "--port", str(port), "--monitoring-port", "0", "--name", name,
                "--cluster-id", cluster, *flags]
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.url = ""
        self.monitoring_url = ""
        ready = threading.Event()

        def read() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                if line.startswith("MPREG_URL="):
                    self.url = line.strip().split("=", 1)[1]
                elif line.startswith("MPREG_MONITORING_URL="):
                    self.monitoring_url = line.strip().split("=", 1)[1]
                if self.url and self.monitoring_url:
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(30):
            self.stop()
            raise RuntimeError(f"node {name} printed no URLs")

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.monitoring_url + path, timeout=5) as reply:
            return reply.read().decode()

    def catalog_has(self, fun: str, owner: str | None = None) -> bool:
        catalog = json.loads(self.get("/catalog"))
        return any(f["name"] == fun for n in catalog["nodes"] if owner in (None, n["node"])
                   for f in n["functions"])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def poll(what: str, probe, timeout: float = 15.0):
    """Polls ``probe`` until it returns something truthy (readiness, never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def nodes():
    started: list[NodeProcess] = []

    def start(name: str, cluster: str, *flags: str, port: int = 0) -> NodeProcess:
        node = NodeProcess(name, cluster, *flags, port=port)
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


@pytest.fixture
def cluster_name(request) -> str:
    return f"py-{request.node.name}-{os.getpid()}"


PYTHON = sys.executable
