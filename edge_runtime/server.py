"""`fedrec serve`: a small HTTP JSON API over an EdgeModel, on the standard library's HTTP server.

    GET  /health                                   → {"status": "ok", "items": N, "model": ...}
    POST /recommend {"history": [ids], "k": 10}    → {"results": [...], "unknown_ids": [...]}
    POST /search    {"query": "red mug", "k": 10, "mode": "hybrid"}  → {"results": [...]}
                    (mode: hybrid, the default, dense or lexical)
    POST /similar   {"item_id": "85123A", "k": 10} → {"results": [...]}

Input is validated: bodies up to 64 KiB of JSON objects, k in 1..100, queries up to 512
characters, histories up to 200 ids; unknown ids are reported and ignored. Every answer is JSON:
an error is a 4xx/5xx `{"error": message}`, never a traceback, a dropped connection or the
standard library's HTML page (for a malformed request line, headers too long, an unknown method).

Resources are bounded: at most MAX_CONNECTIONS connections are served at once, one thread each
(more wait in the listen backlog, BACKLOG deep); a connection silent for IDLE_SECONDS, between
requests or inside one, is closed, and so is one whose request has not fully arrived REQUEST_SECONDS
after the server began waiting for it (a client trickling a byte at a time). Inference takes no
lock (EdgeModel is safe to call from many threads): recommendations and searches are batched
(`Batcher`), side by side. `serve(..., workers=N)` runs N such servers in processes of their own on
one listening socket: one Python process is held to about one core by its interpreter lock.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import queue
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import wait
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from threadpoolctl import threadpool_limits

from fedrec.edge_runtime.runtime import SEARCH_MODES, EdgeModel

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
MAX_K = 100
MAX_QUERY = 512
MAX_HISTORY = 200
MAX_CONNECTIONS = 128
BACKLOG = 1024
IDLE_SECONDS = 5.0
REQUEST_SECONDS = 10.0
MAX_BATCH = 32


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def field(body: dict, name: str, kind: type, required: bool = True, default=None):
    if name not in body:
        if required:
            raise RequestError(400, f"missing field {name!r}")
        return default
    value = body[name]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise RequestError(400, f"field {name!r} must be an integer")
    if kind is not int and not isinstance(value, kind):
        raise RequestError(400, f"field {name!r} must be {kind.__name__}")
    return value


def top_k(body: dict) -> int:
    k = field(body, "k", int, required=False, default=10)
    if not 1 <= k <= MAX_K:
        raise RequestError(400, f"k must be between 1 and {MAX_K}")
    return k


def parse_body(data: bytes) -> dict:
    """The JSON object in `data`. JSON escapes can spell lone surrogates (`"\\ud800"`): not
    Unicode text, and no tokenizer takes them, so they are refused here, like nesting too deep
    for the parser."""
    try:
        body = json.loads(data or b"null")
        json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise RequestError(400, "body holds a lone surrogate (such as \\ud800): not valid Unicode text") from None
    except RecursionError:
        raise RequestError(400, "body is nested too deeply") from None
    except ValueError:                  # UnicodeDecodeError included
        raise RequestError(400, "body is not valid JSON") from None
    if not isinstance(body, dict):
        raise RequestError(400, "body must be a JSON object")
    return body


class Batcher:
    """One worker per batched method (`recommend_batch`, `search_batch`): the calls waiting when
    it is free run as one batch, one ONNX Runtime call and one pass over the item matrix for all
    of them, which is most of a request's cost (a pass reads the whole matrix however few rows it
    scores). No call waits for a batch to fill: a lone one runs alone. A recommendation and a
    search run side by side; two workers for one method halved its batches and cut throughput by a
    quarter on two cores (BENCHMARKS.md). The runtime gives a row the same result in any batch
    (test_edge.py::test_int8_ranks_a_query_the_same_alone_and_in_a_batch)."""

    def __init__(self, methods):
        self.waiting = {method: queue.SimpleQueue() for method in methods}
        for method, waiting in self.waiting.items():
            threading.Thread(target=self.work, args=(method, waiting), name="fedrec-batch", daemon=True).start()

    def __call__(self, method, value, k: int, *options):
        """`method([value, …], k, *options)[0]`, batched with the calls waiting beside it."""
        done: Future = Future()
        self.waiting[method].put((options, value, k, done))
        return done.result()

    def close(self) -> None:
        for waiting in self.waiting.values():
            waiting.put(None)

    def work(self, method, waiting: queue.SimpleQueue) -> None:
        while (entry := waiting.get()) is not None:
            batch = [entry]
            while len(batch) < MAX_BATCH and (entry := self.next(waiting)) is not None:
                batch.append(entry)
            for options in dict.fromkeys(options for options, *_ in batch):
                self.run(method, options, [entry for entry in batch if entry[0] == options])

    @staticmethod
    def next(waiting: queue.SimpleQueue):
        """The next waiting call, or None when there is none (or `close` was called: it stays queued)."""
        try:
            entry = waiting.get_nowait()
        except queue.Empty:
            return None
        if entry is None:
            waiting.put(None)
        return entry

    @staticmethod
    def run(method, options: tuple, entries: list) -> None:
        try:
            results = method([value for _, value, _, _ in entries], max(k for _, _, k, _ in entries), *options)
        except Exception as exc:        # reaches each waiting handler, which answers 500
            for *_, done in entries:
                done.set_exception(exc)
            return
        for (_, _, wanted, done), result in zip(entries, results):
            done.set_result(result[:wanted])


def handle(model: EdgeModel, batched: Batcher, path: str, body: dict) -> dict:
    if path == "/recommend":
        history = field(body, "history", list)
        if len(history) > MAX_HISTORY or not all(isinstance(i, str) and len(i) <= 64 for i in history):
            raise RequestError(400, f"history must be a list of at most {MAX_HISTORY} item id strings")
        _, unknown = model.known(history)
        results = batched(model.recommend_batch, history, top_k(body), bool(body.get("exclude_history", True)))
        return {"results": [vars(r) for r in results], "unknown_ids": unknown}
    if path == "/search":
        query = field(body, "query", str)
        if not query.strip() or len(query) > MAX_QUERY:
            raise RequestError(400, f"query must be 1 to {MAX_QUERY} characters")
        mode = field(body, "mode", str, required=False, default="hybrid")
        if mode not in SEARCH_MODES:
            raise RequestError(400, f"mode must be one of {', '.join(SEARCH_MODES)}")
        return {"results": [vars(r) for r in batched(model.search_batch, query, top_k(body), mode)]}
    if path == "/similar":
        item_id = field(body, "item_id", str)
        if item_id not in model.position:
            raise RequestError(404, f"unknown item_id {item_id[:64]!r}")
        return {"results": [vars(r) for r in model.similar(item_id, top_k(body))]}
    raise RequestError(404, f"no endpoint {path}")


class DeadlineReader(io.RawIOBase):
    """A connection's bytes, each read waiting at most IDLE_SECONDS and none past `deadline`: the
    per-read timeout alone let a client sending a byte every few seconds hold a thread for ever."""

    def __init__(self, connection: socket.socket):
        self.connection = connection
        self.deadline = float("inf")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the request did not arrive within {REQUEST_SECONDS:g} s")
        self.connection.settimeout(min(IDLE_SECONDS, left))
        return self.connection.recv_into(buffer)


def make_handler(model: EdgeModel):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = IDLE_SECONDS              # per read or write: an idle or stalled connection is closed
        wbufsize = -1                       # buffered: a reply leaves in one send, not headers then body
        disable_nagle_algorithm = True      # and a long one is not held back for the client's ACK

        def log_message(self, *args):        # quiet by default; errors still reach the client
            pass

        def setup(self):
            super().setup()
            self.rfile.close()
            self.arriving = DeadlineReader(self.connection)
            self.rfile = io.BufferedReader(self.arriving)

        def handle_one_request(self):
            self.arriving.deadline = time.monotonic() + REQUEST_SECONDS
            super().handle_one_request()

        def reply(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.connection.settimeout(IDLE_SECONDS)     # what is left of the request's deadline was for reading
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """The standard library's own refusals (request line, headers, method), in JSON, and
            with a status line: for a request too broken to name its version it would answer as to
            HTTP/0.9, with none."""
            self.request_version = self.protocol_version
            self.close_connection = True
            self.reply(code, {"error": message or HTTPStatus(code).phrase})

        def do_GET(self):
            if self.path == "/health":
                self.reply(200, {"status": "ok", "items": len(model.item_ids),
                                 "model": model.manifest["model"]["kind"]})
            else:
                self.reply(404, {"error": f"no endpoint GET {self.path}"})

        def do_POST(self):
            try:
                self.reply(200, handle(model, self.server.batched, self.path, self.read_body()))
            except RequestError as exc:
                self.reply(exc.status, {"error": str(exc)})
            except Exception as exc:        # a bug still gets an answer, in JSON
                self.log_error("%s %s: %r", self.command, self.path, exc)
                self.close_connection = True
                self.reply(500, {"error": f"internal error ({type(exc).__name__})"})

        def read_body(self) -> dict:
            """The JSON body, read whole before it is judged, so the connection stays in step."""
            length = self.headers.get("Content-Length", "")
            if not (length.isascii() and length.isdigit()):       # "²".isdigit(), but int("²") fails
                self.close_connection = True
                raise RequestError(411, "a Content-Length header of ASCII digits is required")
            if int(length) > MAX_BODY:
                self.close_connection = True
                raise RequestError(413, f"body over {MAX_BODY} bytes")
            try:
                data = self.rfile.read(int(length))
            except TimeoutError:
                self.close_connection = True
                raise RequestError(408, f"the body did not arrive in time (a read may wait {IDLE_SECONDS:g} s, "
                                        f"a whole request {REQUEST_SECONDS:g} s)") from None
            if "json" not in (self.headers.get("Content-Type") or ""):
                raise RequestError(415, "send Content-Type: application/json")
            return parse_body(data)

    return Handler


class EdgeServer(ThreadingHTTPServer):
    """The standard library's threading server on a listening socket, with at most `connections`
    connection threads, and the batcher its requests share. Requests run in parallel, so BLAS runs
    each product on one thread: its own pool, shared by every request, made a recommendation ten
    times slower under load."""

    daemon_threads = True

    def __init__(self, listening: socket.socket, model: EdgeModel, connections: int = MAX_CONNECTIONS):
        super().__init__(listening.getsockname()[:2], make_handler(model), bind_and_activate=False)
        self.socket.close()
        self.socket, self.server_address = listening, listening.getsockname()[:2]
        self.free = threading.BoundedSemaphore(connections)
        self.batched = Batcher([model.recommend_batch, model.search_batch])
        self.blas = threadpool_limits(1, user_api="blas")

    def process_request(self, request, client_address):
        self.free.acquire()                 # every thread busy: new connections wait in the backlog
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.free.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.free.release()

    def server_close(self):
        super().server_close()              # waits for the connection threads
        self.batched.close()
        self.blas.restore_original_limits()


def listen(host: str, port: int) -> socket.socket:
    return socket.create_server((host, port), backlog=BACKLOG)


def make_server(model: EdgeModel, host: str = "127.0.0.1", port: int = 8080,
                connections: int = MAX_CONNECTIONS) -> EdgeServer:
    return EdgeServer(listen(host, port), model, connections)


def warmed(model: EdgeModel) -> EdgeModel:
    """`model` once each kind of request has run: ONNX Runtime sets up a session's threads and
    buffers on its first run, which the first user would otherwise wait for."""
    model.recommend_batch([model.item_ids[:1]], 1)
    model.search_batch(["warm up"], 1)
    return model


def serve(load_model: Callable[[], EdgeModel], host: str = "127.0.0.1", port: int = 8080, workers: int = 1,
          on_ready: Callable[[tuple[str, int]], None] = lambda address: None) -> None:
    """Serve until interrupted. `load_model` (picklable, such as `partial(EdgeModel, bundle)`)
    gives each worker its model; with several, each is a process of its own and all accept from
    one listening socket. A worker that dies is replaced; one that fails to start stops them all
    with its error. Workers stop when this process does, however it ends."""
    listening = listen(host, port)
    if workers == 1:
        server = EdgeServer(listening, warmed(load_model()))
        on_ready(server.server_address)
        try:
            server.serve_forever()
        finally:
            server.server_close()
        return
    listening.setblocking(False)        # the workers that lose the race for a connection go back to waiting
    running = [start_worker(listening, load_model) for _ in range(workers)]
    try:
        on_ready(listening.getsockname()[:2])
        while True:
            wait([worker.sentinel for worker in running])
            for i, worker in enumerate(running):
                if not worker.is_alive():
                    log.warning(f"serving worker {worker.pid} exited with code {worker.exitcode}; starting another")
                    running[i] = start_worker(listening, load_model)
    finally:
        for worker in running:
            worker.terminate()
        for worker in running:
            worker.join(10)
        listening.close()


def start_worker(listening: socket.socket, load_model: Callable[[], EdgeModel]) -> multiprocessing.Process:
    """A worker process, once its model has loaded (or its error, raised here)."""
    context = multiprocessing.get_context("spawn")       # no fork of a process with threads running
    started, reported = context.Pipe(duplex=False)
    worker = context.Process(target=run_worker, args=(listening, load_model, reported), name="fedrec-serve",
                             daemon=True)
    worker.start()
    reported.close()
    try:
        problem = started.recv()
    except EOFError:
        worker.join(10)
        problem = RuntimeError(f"serving worker {worker.pid} exited with code {worker.exitcode} while loading the model")
    if problem is not None:
        worker.join(10)
        raise problem
    return worker


def run_worker(listening: socket.socket, load_model: Callable[[], EdgeModel], started) -> None:
    try:
        server = EdgeServer(listening, warmed(load_model()))
    except Exception as exc:
        started.send(exc)
        return
    started.send(None)
    parent = multiprocessing.parent_process()

    def stop_when_the_parent_does():
        wait([parent.sentinel])
        server.shutdown()

    threading.Thread(target=stop_when_the_parent_does, daemon=True).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:           # Ctrl-C reaches every process in the terminal's group
        pass
    finally:
        server.server_close()
