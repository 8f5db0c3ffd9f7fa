"""`fedrec serve`: a small HTTP JSON API over an EdgeModel, on the standard library's HTTP server.

    GET  /health                                   → {"status": "ok", "items": N, "model": ...}
    POST /recommend {"history": [ids], "k": 10}    → {"results": [...], "unknown_ids": [...]}
    POST /search    {"query": "red mug", "k": 10}  → {"results": [...]}
    POST /similar   {"item_id": "85123A", "k": 10} → {"results": [...]}

Input is validated: bodies up to 64 KiB of JSON objects, k in 1..100, queries up to 512
characters, histories up to 200 ids; unknown ids are reported and ignored. Every answer is JSON:
an error is a 4xx/5xx `{"error": message}`, never a traceback, a dropped connection or the
standard library's HTML page (for a malformed request line, headers too long, an unknown method).

Resources are bounded: at most MAX_CONNECTIONS connections are served at once, one thread each
(more wait in the listen backlog, BACKLOG deep), and a connection silent for IDLE_SECONDS, between
requests or inside one, is closed. Inference takes no lock (EdgeModel is safe to call from many
threads): recommendations and searches are batched (`Batcher`), side by side.
"""

from __future__ import annotations

import json
import queue
import threading
from concurrent.futures import Future
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from threadpoolctl import threadpool_limits

from fedrec.edge_runtime.runtime import EdgeModel

MAX_BODY = 64 * 1024
MAX_K = 100
MAX_QUERY = 512
MAX_HISTORY = 200
MAX_CONNECTIONS = 128
BACKLOG = 1024
IDLE_SECONDS = 5.0
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
        return {"results": [vars(r) for r in batched(model.search_batch, query, top_k(body))]}
    if path == "/similar":
        item_id = field(body, "item_id", str)
        if item_id not in model.position:
            raise RequestError(404, f"unknown item_id {item_id[:64]!r}")
        return {"results": [vars(r) for r in model.similar(item_id, top_k(body))]}
    raise RequestError(404, f"no endpoint {path}")


def make_handler(model: EdgeModel):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = IDLE_SECONDS              # per read or write: an idle or stalled connection is closed
        wbufsize = -1                       # buffered: a reply leaves in one send, not headers then body
        disable_nagle_algorithm = True      # and a long one is not held back for the client's ACK

        def log_message(self, *args):        # quiet by default; errors still reach the client
            pass

        def reply(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
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
                raise RequestError(408, f"the body did not arrive within {IDLE_SECONDS:g} s") from None
            if "json" not in (self.headers.get("Content-Type") or ""):
                raise RequestError(415, "send Content-Type: application/json")
            return parse_body(data)

    return Handler


class EdgeServer(ThreadingHTTPServer):
    """The standard library's threading server with at most `connections` connection threads,
    and the batcher its requests share. Requests run in parallel, so BLAS runs each product on
    one thread: its own pool, shared by every request, made a recommendation ten times slower
    under load."""

    daemon_threads = True
    request_queue_size = BACKLOG

    def __init__(self, address: tuple[str, int], model: EdgeModel, connections: int = MAX_CONNECTIONS):
        super().__init__(address, make_handler(model))
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


def make_server(model: EdgeModel, host: str = "127.0.0.1", port: int = 8080,
                connections: int = MAX_CONNECTIONS) -> EdgeServer:
    return EdgeServer((host, port), model, connections)
