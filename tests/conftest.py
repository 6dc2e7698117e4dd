"""Shared fixtures: a clean environment for every test."""

from __future__ import annotations

from collections.abc import Iterator

import msgspec
import pytest

from batch.simulator import SimConfig, SimServer

_SECRET_VARS = ("ATOMA_API_KEY", "OPENAI_API_KEY", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                "http_proxy", "https_proxy", "all_proxy", "NO_PROXY", "no_proxy")


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """No API key or proxy from the developer's shell leaks into a test."""
    for name in _SECRET_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def sim_server() -> Iterator[SimServer]:
    """One simulator on loopback for the whole test run."""
    with SimServer(SimConfig()) as server:
        yield server


@pytest.fixture
def sim(sim_server: SimServer) -> SimServer:
    """The shared simulator, with default settings and zeroed counters for this test."""
    sim_server.configure(**msgspec.structs.asdict(SimConfig()))
    sim_server.reset_stats()
    return sim_server
