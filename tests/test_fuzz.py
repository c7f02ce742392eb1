"""Valid-then-mutated ICP frames (both directions) and OTS API calls (every
method) against the real protocol objects: no exception escapes, nothing is
logged as a bug, the registry stays consistent (bench/fuzz.py; run it with
many more examples before a release)."""

from __future__ import annotations

import pytest

from bench.fuzz import CASES, run_case


@pytest.mark.parametrize("name", sorted(CASES))
def test_fuzz(name: str) -> None:
    run_case(name, examples=150)
