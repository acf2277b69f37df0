"""Typed, validated options: the base of every strategy's options and of every run-config section.

A strategy declares its options once, next to its code, as a subclass; the run
config embeds the same type as its section, so a value is checked in one place
and a bad one fails at load time with an error naming the dotted field.
"""

from __future__ import annotations

from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator, model_validator


class Options(BaseModel):
    """Frozen options: unknown keys refused, no inf or nan, no true/false for a number."""

    # no float may be inf or nan (a YAML ``.inf`` learning rate is a typo, not a setting)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        """Pydantic reads ``true`` as 1 for a number field (``rounds: true`` would run one round): refuse it.

        Strict mode would also refuse ``1e-3``, which YAML 1.1 reads as a string, so only booleans are refused.
        """
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            kinds = set(get_args(annotation)) or {annotation}
            if bool not in kinds and kinds & {int, float}:
                raise ValueError("expected a number, not true/false")
        return value

    @model_validator(mode="before")
    @classmethod
    def _yaml_off(cls, data: Any) -> Any:
        """YAML 1.1 reads a bare ``off`` as false: give choice fields that offer "off" the word back."""
        if not isinstance(data, dict):
            return data
        fixed = dict(data)
        for name, value in data.items():
            field = cls.model_fields.get(name)
            if value is False and field is not None and "off" in get_args(field.annotation):
                fixed[name] = "off"
        return fixed
