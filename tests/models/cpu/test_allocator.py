"""The oneDNN cache cap keeps a user's own setting.

Moved from tests/models/test_speed_correctness.py (one file per source module).
"""

from __future__ import annotations


def test_cap_onednn_cache_keeps_a_user_setting(monkeypatch) -> None:
    from tinysft.models.cpu.allocator import ONEDNN_CACHE, cap_onednn_cache

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    cap_onednn_cache()
    import os

    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(ONEDNN_CACHE)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "7")
    cap_onednn_cache()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "7"
