"""Load a running `fedrec serve` from another process: a bounded number of concurrent requests,
latency percentiles, and the server's resident memory sampled through the run (it should stay
flat: a leak shows as growth from the first third of the run to the last). Clients open a
connection per request, or keep one each (`keep_alive`), as a service in front of the server does."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from fedrec.errors import FedrecError
from fedrec.federation.deployment import free_port

Call = tuple[str, dict]          # (endpoint path, JSON body)


@dataclass
class LoadReport:
    requests: int
    clients: int
    errors: int
    seconds: float
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    rss_mb: list[float] = field(default_factory=list)     # the server's RSS, sampled through the run
    rss_growth_mb: float = 0.0                             # median of the last third − the first third
    error_samples: list[str] = field(default_factory=list)


@contextmanager
def serving(bundle: str | Path, timeout: float = 60.0, workers: int = 1) -> Iterator[tuple[str, int]]:
    """`fedrec serve BUNDLE` in its own process on a free loopback port, once every worker has
    loaded (it says so): yields (base URL, pid)."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "fedrec.tools", "serve", str(bundle), "--port", str(port),
                               "--workers", str(workers)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    said: list[str] = []
    ready = threading.Event()

    def read_output():
        for line in server.stdout:          # read to the end, so the pipe never fills
            said.append(line)
            if line.startswith("serving "):
                ready.set()

    threading.Thread(target=read_output, daemon=True).start()
    try:
        deadline = time.monotonic() + timeout
        while not ready.wait(0.2):
            if server.poll() is not None or time.monotonic() > deadline:
                raise FedrecError(f"`fedrec serve {bundle}` did not start on port {port}: {''.join(said)[-2000:]}")
        yield f"http://127.0.0.1:{port}", server.pid
    finally:
        server.terminate()
        server.wait(10)


def mixed_calls(item_ids: list[str], queries: list[str], count: int, seed: int = 0) -> list[Call]:
    """Recommend, search and similar requests in equal parts, from real ids and queries."""
    rng = np.random.default_rng(seed)
    calls: list[Call] = []
    for i in range(count):
        kind = i % 3
        if kind == 0:
            history = [item_ids[j] for j in rng.choice(len(item_ids), int(rng.integers(1, 11)), replace=False)]
            calls.append(("/recommend", {"history": history, "k": 10}))
        elif kind == 1:
            calls.append(("/search", {"query": queries[int(rng.integers(len(queries)))], "k": 10}))
        else:
            calls.append(("/similar", {"item_id": item_ids[int(rng.integers(len(item_ids)))], "k": 10}))
    return calls


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (a server's workers)."""
    tree = [pid]
    for parent in tree:
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                tree.extend(int(child) for child in (task / "children").read_text().split())
            except FileNotFoundError:           # a thread that has just ended
                pass
    return tree


def resident_mb(pid: int) -> float:
    """The resident memory of `pid` and its descendants."""
    total = 0.0
    for process in process_tree(pid):
        for line in Path(f"/proc/{process}/status").read_text().splitlines():
            if line.startswith("VmRSS"):
                total += int(line.split()[1]) / 1024
    return total


class KeepAlive:
    """One HTTP/1.1 connection kept across requests. Minimal on purpose (as wrk is): a status
    line, Content-Length and `Connection: close` are all `fedrec serve` sends, and the clients
    share the machine's cores with the server (http.client took 0.4 ms of CPU a request)."""

    def __init__(self, host: str, port: int, timeout: float):
        self.address, self.timeout = (host, port), timeout
        self.connection: socket.socket | None = None
        self.pending = b""

    def post(self, path: str, data: bytes) -> tuple[int, bytes]:
        if self.connection is None:
            self.connection = socket.create_connection(self.address, self.timeout)
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.pending = b""
        try:
            self.connection.sendall(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                                    b"Content-Length: %d\r\n\r\n%s" % (path.encode(), self.address[0].encode(),
                                                                      len(data), data))
            while b"\r\n\r\n" not in self.pending:
                self.receive()
            head, _, self.pending = self.pending.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = dict(line.lower().split(":", 1) for line in lines[1:] if ":" in line)
            length = int(headers["content-length"])
            while len(self.pending) < length:
                self.receive()
            body, self.pending = self.pending[:length], self.pending[length:]
            if headers.get("connection", "").strip() == "close":
                self.close()
            return int(lines[0].split()[1]), body
        except (IndexError, KeyError, ValueError) as exc:
            self.close()
            raise ValueError(f"malformed reply: {exc!r}") from None
        except OSError:
            self.close()
            raise

    def receive(self) -> None:
        chunk = self.connection.recv(1 << 16)
        if not chunk:
            raise ConnectionResetError("the server closed the connection")
        self.pending += chunk

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def run_load(base_url: str, calls: list[Call], clients: int = 8, server_pid: int | None = None,
             timeout: float = 30.0, sample_every: float = 0.2, keep_alive: bool = False) -> LoadReport:
    address = urllib.parse.urlsplit(base_url)

    def post(path: str, data: bytes, connection: KeepAlive | None) -> tuple[int, bytes]:
        if connection is not None:
            return connection.post(path, data)
        request = urllib.request.Request(base_url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()

    def one(path: str, body: bytes, connection: KeepAlive | None) -> tuple[str, float]:
        started = time.perf_counter()
        try:
            status, data = post(path, body, connection)
            json.loads(data)
            problem = "" if status == 200 else f"{path}: HTTP {status}"
        except (OSError, ValueError) as exc:      # HTTPError, refused, reset, timeout, bad JSON
            problem = f"{path}: {exc}"
        return problem, time.perf_counter() - started

    samples: list[float] = []
    done = threading.Event()

    def sample():
        while not done.is_set() and server_pid is not None:
            samples.append(resident_mb(server_pid))
            done.wait(sample_every)

    requests = [(path, json.dumps(body).encode()) for path, body in calls]
    results: list = [None] * len(requests)
    turns = iter(range(len(requests)))     # shared: each client takes the next request when it is free

    def client():
        connection = KeepAlive(address.hostname, address.port, timeout) if keep_alive else None
        for i in turns:
            results[i] = one(*requests[i], connection)
        if connection is not None:
            connection.close()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    problems = [p for p, _ in results if p]
    ms = np.array([s for _, s in results]) * 1000
    third = max(1, len(samples) // 3)
    growth = float(np.median(samples[-third:]) - np.median(samples[:third])) if samples else float("nan")
    return LoadReport(len(calls), clients, len(problems), seconds, len(calls) / seconds,
                      float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), samples, growth, problems[:5])
