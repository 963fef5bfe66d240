"""The base of every config section: unknown keys are errors, assignments validated, no inf/NaN."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated, and no number may
    be infinite or NaN (an inf learning rate or rank scale would only fail later, or silently)."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, allow_inf_nan=False, populate_by_name=True
    )
