"""The rows of a request asked with ``n`` (``sample_mode = "n"``): one row per choice.

Choice i is sample i. The request's usage and cost are shared out evenly (token
counts as integers, the remainder to the first samples), so totals and cost per
row compare with separate requests. A choice the server did not send is a failed
row (``missing_choice``); a failed request fails every sample alike.
"""

from __future__ import annotations

import msgspec

from batch.records import Completion, Result

__all__ = ["MISSING_CHOICE", "per_choice"]

MISSING_CHOICE = "missing_choice"
_TOKENS = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens")


def _share(value: int | None, n: int, i: int) -> int | None:
    return None if value is None else value // n + (1 if i < value % n else 0)


def per_choice(result: Result, n: int, completion: Completion | None = None) -> list[Result]:
    """``result`` (sample 0, answered or failed) as the ``n`` rows of its samples."""
    if n <= 1:
        return [result]
    if completion is None:
        return [result, *(msgspec.structs.replace(result, sample=(result.sample or 0) + i) for i in range(1, n))]
    rows = []
    for i in range(n):
        changes: dict[str, object] = {name: _share(getattr(result, name), n, i) for name in _TOKENS}
        changes["cost_usd"] = None if result.cost_usd is None else result.cost_usd / n
        if i:
            changes["sample"] = (result.sample or 0) + i
            choice = completion.more[i - 1] if i - 1 < len(completion.more) else None
            if choice is None:
                changes |= {"status": "failed", "text": None, "refusal": None, "finish_reason": None,
                            "error_code": MISSING_CHOICE, "error": f"the answer had no choice {i} of the {n} asked"}
            else:
                changes |= {"text": choice.text, "refusal": choice.refusal, "finish_reason": choice.finish_reason}
        rows.append(msgspec.structs.replace(result, **changes))
    return rows
