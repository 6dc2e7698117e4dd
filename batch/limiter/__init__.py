"""Keep a job within its request and token rate limits, shared by every worker.

A thin :class:`Limiter` (``limiter.py``) composed of small policies, the strictest
winning at any moment: ``pace.py`` (pace to a given RPM/TPM), ``headers.py``
(follow ``x-ratelimit-*`` limits and budgets), ``adaptive.py`` (learn a rate from
bare 429s). Headers are read by ``batch.ratelimits``; tokens estimated by
``batch.tokens``.
"""

from __future__ import annotations

from batch.limiter.limiter import Limiter, LimiterStats, Reservation

__all__ = ["Limiter", "LimiterStats", "Reservation"]
