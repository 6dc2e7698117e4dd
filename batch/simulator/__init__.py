"""An OpenAI-compatible completion server for demos, tests and benchmarks.

It answers ``POST /v1/chat/completions`` and ``POST /v1/completions``, streamed
(server-sent events) or not, with deterministic replies and exact usage, and it
misbehaves on demand: latency, sliding-window RPM/TPM limits answered with 429
(OpenAI style with ``x-ratelimit-*`` and ``Retry-After`` headers, or Atoma style,
bare), seeded faults, a fatal status for every request (or every one after the
first N), a context length answered with 400, and an API-key check.

The engine never imports it: the CLI starts it for ``base_url = "simulator"``.
One job per module:

* ``settings`` -- :class:`SimConfig`, every setting once; the CLI flags and the
  job file's ``[simulator]`` table check are generated from it
* ``replies`` -- the pure reply and usage functions (:func:`reply_for`, :func:`count_prompt_tokens`)
* ``limits`` -- the sliding-window RPM/TPM and its ``x-ratelimit-*`` headers
* ``faults`` -- which request fails, and how
* ``state`` -- config, counters, window and fault RNG of one running simulator
* ``bodies`` -- the OpenAI-shaped errors, completions and stream events
* ``app`` -- the ASGI app: a request goes authorize -> parse -> admit -> fault -> answer
* ``server`` -- :class:`SimServer` (a background thread on loopback), :func:`serve`, ``main``
"""

from batch.simulator.app import SimApp, create_app
from batch.simulator.replies import count_prompt_tokens, key_label, reply_for
from batch.simulator.server import SimServer, main, serve
from batch.simulator.settings import (
    FAULT_KINDS,
    SettingError,
    SimConfig,
    add_simulator_arguments,
    changed_config,
    config_from_args,
    config_from_table,
    table_problem,
)
from batch.simulator.state import SimState

__all__ = [
    "FAULT_KINDS",
    "SettingError",
    "SimApp",
    "SimConfig",
    "SimServer",
    "SimState",
    "add_simulator_arguments",
    "changed_config",
    "config_from_args",
    "config_from_table",
    "count_prompt_tokens",
    "create_app",
    "key_label",
    "main",
    "reply_for",
    "serve",
    "table_problem",
]
