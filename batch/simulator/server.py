"""Serving the simulator: on a free loopback port in a background thread
(:class:`SimServer`), or in the foreground (:func:`serve`, ``python -m batch.simulator``).

Only uvicorn's public API is used: ``uvicorn.Config``/``uvicorn.Server``, serving a
socket bound here, ``server.started`` to know it listens, ``should_exit`` to stop.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import uvicorn

from batch.simulator.app import SimApp, create_app
from batch.simulator.settings import SimConfig, add_simulator_arguments, config_from_args

__all__ = ["SimServer", "main", "serve"]

logger = logging.getLogger(__name__)


def _uvicorn_server(app: SimApp, host: str, port: int) -> uvicorn.Server:
    return uvicorn.Server(uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="auto",  # uvloop when installed
        http="auto",  # httptools when installed
        lifespan="off",
        access_log=False,
        log_config=None,  # leave the application's logging alone
        timeout_graceful_shutdown=1,
    ))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        return None
    return uvloop.new_event_loop


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


class SimServer:
    """The simulator on a free loopback port, served from a background thread.

    >>> with SimServer(SimConfig(latency_ms=50)) as sim:
    ...     url = sim.base_url   # "http://127.0.0.1:<port>/v1"
    """

    def __init__(self, config: SimConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = create_app(config)
        self.host = host
        self.port = port
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: uvicorn.Server | None = None
        self._error: BaseException | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def url(self) -> str:
        """The server root (the admin API lives at ``{url}/_sim/...``)."""
        return f"http://{self.host}:{self.port}"

    @property
    def config(self) -> SimConfig:
        return self.app.sim.config

    @property
    def stats(self) -> dict[str, Any]:
        """The counters of ``GET /_sim/stats``."""
        stats: dict[str, Any] = self._call(self.app.sim.snapshot)
        return stats

    def configure(self, **changes: Any) -> SimConfig:
        """Change settings at run time (same names as :class:`SimConfig`)."""
        config: SimConfig = self._call(lambda: self.app.sim.configure(changes))
        return config

    def reset_stats(self) -> None:
        self._call(self.app.sim.reset)

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server's loop (state is only touched there), or here if stopped."""
        loop = self._loop
        if loop is None or not loop.is_running():
            return fn()

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), loop).result(timeout=10)

    def start(self) -> SimServer:
        if self._thread is not None:
            raise RuntimeError("the simulator is already started")
        sock = _listen(self.host, self.port)
        self.port = sock.getsockname()[1]
        self._server = _uvicorn_server(self.app, self.host, self.port)
        self._thread = threading.Thread(target=self._run, args=(sock,), name="promptmill-simulator", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive():
                self._thread = self._server = None
                raise RuntimeError("the simulator failed to start") from self._error
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the simulator did not start within 10 s")
            time.sleep(0.002)
        return self

    def _run(self, sock: socket.socket) -> None:
        try:
            with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                runner.run(self._serve(sock))
        except BaseException as exc:
            self._error = exc
        finally:
            sock.close()

    async def _serve(self, sock: socket.socket) -> None:
        assert self._server is not None
        self._loop = asyncio.get_running_loop()
        await self._server.serve(sockets=[sock])

    def stop(self) -> None:
        """Stop at once: open keep-alive connections and hung requests are not waited for."""
        thread, server = self._thread, self._server
        if thread is None:
            return
        if server is not None:
            server.should_exit = True
            server.force_exit = True
        thread.join(timeout=10)
        self._thread = self._loop = self._server = None

    def __enter__(self) -> SimServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve(config: SimConfig | None = None, host: str = "127.0.0.1", port: int = 8089) -> None:
    """Serve the simulator until interrupted (``promptmill simulate``)."""
    app = create_app(config)
    logger.info("simulator listening on http://%s:%d/v1", host, port)
    _uvicorn_server(app, host, port).run()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m batch.simulator``: serve the simulator standalone."""
    parser = argparse.ArgumentParser(prog="python -m batch.simulator",
                                     description="Serve the promptmill OpenAI-compatible simulator.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089)
    add_simulator_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    serve(config, args.host, args.port)
    return 0
