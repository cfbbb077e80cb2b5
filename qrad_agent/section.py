"""The base of every configuration section: unknown keys are errors, and so are bad values
assigned at run time. Its own module so every package's settings can use it without
importing config.py (which imports them all)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
