"""Fixtures shared by the tests (helpers live in tests/helpers.py)."""

from __future__ import annotations

import pytest

from tests.helpers import ARCHS, Arch


@pytest.fixture(params=list(ARCHS))
def arch(request: pytest.FixtureRequest) -> Arch:
    return ARCHS[request.param]
