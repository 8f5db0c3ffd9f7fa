"""`fedrec serve`: a small HTTP JSON API over an EdgeModel (standard library only).

    GET  /health                                   → {"status": "ok", "items": N, "model": ...}
    POST /recommend {"history": [ids], "k": 10}    → {"results": [...], "unknown_ids": [...]}
    POST /search    {"query": "red mug", "k": 10}  → {"results": [...]}
    POST /similar   {"item_id": "85123A", "k": 10} → {"results": [...]}

Input is validated: bodies up to 64 KiB of JSON objects, k in 1..100, queries up to 512
characters, histories up to 200 ids; unknown ids are reported and ignored. Errors are JSON with
a 4xx status, never a traceback.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from fedrec.edge_runtime.runtime import EdgeModel

MAX_BODY = 64 * 1024
MAX_K = 100
MAX_QUERY = 512
MAX_HISTORY = 200


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


def handle(model: EdgeModel, path: str, body: dict) -> dict:
    if path == "/recommend":
        history = field(body, "history", list)
        if len(history) > MAX_HISTORY or not all(isinstance(i, str) and len(i) <= 64 for i in history):
            raise RequestError(400, f"history must be a list of at most {MAX_HISTORY} item id strings")
        _, unknown = model.known(history)
        results = model.recommend(history, top_k(body), bool(body.get("exclude_history", True)))
        return {"results": [asdict(r) for r in results], "unknown_ids": unknown}
    if path == "/search":
        query = field(body, "query", str)
        if not query.strip() or len(query) > MAX_QUERY:
            raise RequestError(400, f"query must be 1 to {MAX_QUERY} characters")
        return {"results": [asdict(r) for r in model.search(query, top_k(body))]}
    if path == "/similar":
        item_id = field(body, "item_id", str)
        if item_id not in model.position:
            raise RequestError(404, f"unknown item_id {item_id[:64]!r}")
        return {"results": [asdict(r) for r in model.similar(item_id, top_k(body))]}
    raise RequestError(404, f"no endpoint {path}")


def make_handler(model: EdgeModel, lock: threading.Lock):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):        # quiet by default; errors still reach the client
            pass

        def reply(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health":
                self.reply(200, {"status": "ok", "items": len(model.item_ids),
                                 "model": model.manifest["model"]["kind"]})
            else:
                self.reply(404, {"error": f"no endpoint GET {self.path}"})

        def do_POST(self):
            try:
                length = self.headers.get("Content-Length")
                if length is None or not length.isdigit():
                    raise RequestError(411, "a Content-Length header is required")
                if int(length) > MAX_BODY:
                    raise RequestError(413, f"body over {MAX_BODY} bytes")
                if "json" not in (self.headers.get("Content-Type") or ""):
                    raise RequestError(415, "send Content-Type: application/json")
                try:
                    body = json.loads(self.rfile.read(int(length)) or b"null")
                except (ValueError, UnicodeDecodeError):
                    raise RequestError(400, "body is not valid JSON") from None
                if not isinstance(body, dict):
                    raise RequestError(400, "body must be a JSON object")
                with lock:                  # one inference at a time: ORT sessions are not re-entrant here
                    payload = handle(model, self.path, body)
                self.reply(200, payload)
            except RequestError as exc:
                self.close_connection = exc.status in (411, 413)
                self.reply(exc.status, {"error": str(exc)})

    return Handler


def make_server(model: EdgeModel, host: str = "127.0.0.1", port: int = 8080) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), make_handler(model, threading.Lock()))
    server.daemon_threads = True
    return server
