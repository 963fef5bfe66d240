"""Data errors that point at the exact place in the user's file (:class:`fedlora.errors.DataError`)."""

from fedlora.errors import DataError

__all__ = ["DataError"]
