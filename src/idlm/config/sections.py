"""The base of every config section (imports only pydantic)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Every config section: unknown keys are errors, values are frozen."""

    # inf and nan are out of every numeric domain (an lr of inf passes gt=0 otherwise).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
