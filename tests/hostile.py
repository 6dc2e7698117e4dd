"""A small loopback server that answers the way odd servers do, for end-to-end tests.

``HostileServer(answer)`` serves ``POST .../chat/completions`` on 127.0.0.1 from a
thread (the standard library's ``ThreadingHTTPServer``, HTTP/1.1 keep-alive).
``answer(n, body)`` gets the 0-based request number and the parsed request body
and returns ``(status, headers, body bytes)``. ``requests`` counts what came in.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Answer = tuple[int, Mapping[str, str], bytes]


def completion(text: str = "hello", *, usage: Mapping[str, Any] | None = None, raw: bytes | None = None) -> bytes:
    """A well-formed chat completion body (``raw`` replaces the whole body)."""
    if raw is not None:
        return raw
    return json.dumps({
        "id": "cmpl-1", "object": "chat.completion", "created": 1_700_000_000, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": dict(usage) if usage is not None else {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }).encode()


def ok(text: str = "hello", **kw: Any) -> Answer:
    return 200, {"content-type": "application/json"}, completion(text, **kw)


class HostileServer:
    def __init__(self, answer: Callable[[int, dict[str, Any]], Answer]) -> None:
        self.answer = answer
        self.requests = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with server._lock:
                    n = server.requests
                    server.requests += 1
                status, headers, data = server.answer(n, body)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Quiet(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that hangs up (a job stopping) is not news

        self._httpd = Quiet(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> HostileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
