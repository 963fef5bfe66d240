"""Every registered strategy against every conformance check (fedlora.testing.conformance): a new method is
in this suite by being registered, with no edit here."""

from pathlib import Path

import pytest

from fedlora.strategies import STRATEGIES
from fedlora.testing.conformance import CHECKS, Case


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("strategy", STRATEGIES.names())
def test_strategy_conformance(strategy: str, check: str, tmp_path: Path) -> None:
    CHECKS[check](Case(strategy, tmp_path))
