from __future__ import annotations

import batch


def test_all_is_sorted_and_every_name_exists() -> None:
    assert batch.__all__ == sorted(batch.__all__)
    for name in batch.__all__:
        assert getattr(batch, name) is not None, name


def test_every_public_module_member_is_listed() -> None:
    assert sorted(batch._EXPORTS) == batch.__all__
    for name in batch.__all__:
        getattr(batch, name)  # loaded on first use
    public = {
        name for name, value in vars(batch).items()
        if not name.startswith("_") and getattr(value, "__module__", "").startswith("batch.")
    }
    assert public == set(batch.__all__)
