"""Throughput of `fedrec serve`, against issue 14's goal: ≥ 1,500 requests/s and p99 ≤ 20 ms for
`/recommend` from 16 keep-alive clients on 2 cores, no errors, flat memory, idle connections
closed within 10 s.

    python bench/serving.py [BUNDLE [WORKERS…]]   → results/serving.json
                                                  (default: the demo's bundle, 1 then 2 workers)

The server is `fedrec serve BUNDLE --workers N` (INT8) in its own processes; the clients are threads of this
one, on the same cores, each keeping one HTTP/1.1 connection (`loadtest.KeepAlive`). Histories
are 1–10 random catalog ids, k = 10. The host is shared and its speed drifts, so `/recommend`
runs in PASSES passes and the medians are reported with every pass. Then the mixed load
(recommend, search, similar) the same way, 64 clients opening a connection per request, and 100
idle connections timed until the server has closed them all. CPU seconds per request (server and
clients) and the load average before and after are recorded.
"""

from __future__ import annotations

import os
import re
import resource
import socket
import sys
import time
from pathlib import Path

import numpy as np

from common import REPO, save, show_progress
from fedrec.edge_runtime import EdgeModel
from fedrec.tools.loadtest import mixed_calls, process_tree, run_load, serving

PASSES, REQUESTS, CLIENTS, WORKERS = 5, 15_000, 16, (1, 2)


def recommend_calls(item_ids: list[str], count: int, seed: int) -> list[tuple[str, dict]]:
    rng = np.random.default_rng(seed)
    return [("/recommend", {"history": [item_ids[i] for i in rng.choice(len(item_ids), int(rng.integers(1, 11)),
                                                                       replace=False)], "k": 10})
            for _ in range(count)]


def cpu_seconds(pid: int) -> float:
    """CPU seconds of `pid` and its workers."""
    ticks = 0
    for process in process_tree(pid):
        fields = Path(f"/proc/{process}/stat").read_text().rpartition(")")[2].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def measured(base: str, pid: int, calls: list, clients: int, keep_alive: bool = True) -> dict:
    """One load run: rate, latency, errors, the server's memory, and CPU per request on each side."""
    server_before, client_before = cpu_seconds(pid), resource.getrusage(resource.RUSAGE_SELF)
    report = run_load(base, calls, clients, server_pid=pid, keep_alive=keep_alive, timeout=10)
    client = resource.getrusage(resource.RUSAGE_SELF)
    client_cpu = client.ru_utime + client.ru_stime - client_before.ru_utime - client_before.ru_stime
    return {"requests": report.requests, "clients": clients, "errors": report.errors,
            "error_samples": report.error_samples, "requests_per_second": round(report.requests_per_second),
            "p50_ms": round(report.p50_ms, 2), "p99_ms": round(report.p99_ms, 2),
            "rss_mb_max": round(max(report.rss_mb), 1), "rss_growth_mb": round(report.rss_growth_mb, 2),
            "server_cpu_ms_per_request": round((cpu_seconds(pid) - server_before) / report.requests * 1000, 3),
            "client_cpu_ms_per_request": round(client_cpu / report.requests * 1000, 3)}


def idle_closed(address: tuple[str, int], pid: int, count: int = 100) -> dict:
    """Seconds until the server has closed `count` connections that send nothing, and its threads
    (all workers') meanwhile."""
    started = time.monotonic()
    idle = [socket.create_connection(address, timeout=30) for _ in range(count)]
    time.sleep(1)
    threads = sum(int(re.search(r"Threads:\s+(\d+)", Path(f"/proc/{process}/status").read_text())[1])
                  for process in process_tree(pid))
    for connection in idle:
        with connection:
            while connection.recv(4096):
                pass
    return {"connections": count, "all_closed_after_s": round(time.monotonic() - started, 2),
            "server_threads_meanwhile": threads}

def median(passes: list[dict]) -> dict:
    return {key: float(np.median([p[key] for p in passes])) for key, value in passes[0].items()
            if isinstance(value, (int, float)) and key != "clients"}


def load(bundle: str, workers: int, model: EdgeModel, queries: list[str]) -> dict:
    """Every load, against `fedrec serve BUNDLE --workers N`."""
    with serving(bundle, workers=workers) as (base, pid):
        host, port = base.removeprefix("http://").split(":")
        run_load(base, recommend_calls(model.item_ids, 3_000, 99), CLIENTS, keep_alive=True)     # warm-up
        recommend = []
        for seed in range(PASSES):
            recommend.append(measured(base, pid, recommend_calls(model.item_ids, REQUESTS, seed), CLIENTS))
            print(workers, "recommend", recommend[-1], flush=True)
        mixed = [measured(base, pid, mixed_calls(model.item_ids, queries, REQUESTS // 2, seed), CLIENTS)
                 for seed in range(3)]
        print(workers, "mixed", mixed, flush=True)
        per_request = measured(base, pid, mixed_calls(model.item_ids, queries, 3_000), 64, keep_alive=False)
        print(workers, "connection per request", per_request, flush=True)
        idle = idle_closed((host, int(port)), pid)
        print(workers, "idle", idle, flush=True)
    best = median(recommend)
    return {"workers": workers,
            "goal_met": best["requests_per_second"] >= 1500 and best["p99_ms"] <= 20 and best["errors"] == 0,
            "recommend_16_keep_alive": {"median": best, "passes": recommend},
            "mixed_16_keep_alive": {"median": median(mixed), "passes": mixed},
            "mixed_64_connection_per_request": per_request, "idle": idle}


def main(bundle: str = str(REPO / "runs" / "demo" / "bundle"), *workers: str) -> None:
    load_before = os.getloadavg()
    model = EdgeModel(bundle, "fp32")
    queries = [" ".join(title.lower().split()[:2]) for title in model.titles]
    runs = [load(bundle, int(n), model, queries) for n in workers or WORKERS]
    save("serving", {
        "bundle": Path(bundle).name, "catalog_items": len(model.item_ids), "precision": "int8",
        "goal": "/recommend, 16 keep-alive clients: >= 1500 requests/s, p99 <= 20 ms, 0 errors",
        "goal_met_by_workers": [run["workers"] for run in runs if run["goal_met"]], "runs": runs,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()]})

if __name__ == "__main__":
    show_progress()
    main(*sys.argv[1:])
