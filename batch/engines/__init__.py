"""Engines other than the local runner (:mod:`batch.runner`): the same job, run elsewhere.

- :mod:`batch.engines.ray_engine`: the driver of a job on Ray Data (``--engine ray``);
- :mod:`batch.engines.ray_worker`: the worker actor that runs promptmill's pipeline on a block of rows;
- :mod:`batch.engines.ray_limiter`: the one limiter actor a job's workers share, and their lease of it.

Nothing here is imported unless the job asks for Ray (``pip install 'promptmill[ray]'``).
"""

from __future__ import annotations

__all__: list[str] = []
