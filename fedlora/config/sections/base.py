"""The base of every config section: unknown keys are errors, assignments validated, no inf/NaN, and no
true/false where a number is meant."""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

#: an importable module's dotted name (``my_methods.fedfoo``): what ``plugins`` may list
MODULE_NAME = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"


def admits_bool(annotation: Any) -> bool:
    """Whether a field's type accepts true/false on purpose (``bool``, or a union or Literal holding one)."""
    if annotation is bool or annotation is Any:
        return True
    if isinstance(annotation, bool):  # a Literal[True] value
        return True
    return any(admits_bool(arg) for arg in typing.get_args(annotation))


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated, and no number may
    be infinite or NaN (an inf learning rate or rank scale would only fail later, or silently). A YAML
    ``true``/``false`` given for a number (``federation.rounds: true``) is refused, not read as 1 or 0."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, allow_inf_nan=False, populate_by_name=True
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name is not None:
            field = cls.model_fields.get(info.field_name)
            if field is not None and not admits_bool(field.annotation):
                raise ValueError("true/false given where a number or a name is meant")
        return value
