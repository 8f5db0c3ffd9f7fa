"""Load a running `fedrec serve` from another process: a bounded number of concurrent requests,
latency percentiles, and the server's resident memory sampled through the run (it should stay
flat: a leak shows as growth from the first third of the run to the last)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
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
def serving(bundle: str | Path, timeout: float = 60.0) -> Iterator[tuple[str, int]]:
    """`fedrec serve BUNDLE` in its own process on a free loopback port: yields (base URL, pid)."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "fedrec.tools", "serve", str(bundle), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=1)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise FedrecError(f"`fedrec serve {bundle}` did not start on port {port}") from None
                time.sleep(0.2)
        yield base, server.pid
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


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_load(base_url: str, calls: list[Call], clients: int = 8, server_pid: int | None = None,
             timeout: float = 30.0, sample_every: float = 0.2) -> LoadReport:
    def one(call: Call) -> tuple[str, float]:
        path, body = call
        request = urllib.request.Request(base_url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        started = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                json.loads(response.read())
                problem = "" if response.status == 200 else f"{path}: HTTP {response.status}"
        except (OSError, ValueError) as exc:      # HTTPError, refused, reset, timeout, bad JSON
            problem = f"{path}: {exc}"
        return problem, time.perf_counter() - started

    samples: list[float] = []
    done = threading.Event()

    def sample():
        while not done.is_set() and server_pid is not None:
            samples.append(resident_mb(server_pid))
            done.wait(sample_every)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, calls))
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    problems = [p for p, _ in results if p]
    ms = np.array([s for _, s in results]) * 1000
    third = max(1, len(samples) // 3)
    growth = float(np.median(samples[-third:]) - np.median(samples[:third])) if samples else float("nan")
    return LoadReport(len(calls), clients, len(problems), seconds, len(calls) / seconds,
                      float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), samples, growth, problems[:5])
