"""Test support for fedlora and its plugins: the strategy conformance suite (:mod:`fedlora.testing.conformance`)."""

from fedlora.testing.conformance import CHECKS, Case, check_strategy

__all__ = ["CHECKS", "Case", "check_strategy"]
