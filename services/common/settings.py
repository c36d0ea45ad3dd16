"""A component's settings, taken from the config sections by field name.

A component declares what it reads of a run as a frozen dataclass (``SelectorSettings``,
``LearnerServiceSettings``, ``RolloutSettings``); the run config defines each value once, with
its default, bounds and doc, in a section model. :func:`settings_from` fills every field of the
dataclass from the one section that has a field of the same name, so a new config field reaches
a component by being declared in both places: no line copies it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from pydantic import BaseModel

__all__ = ["settings_from"]

T = TypeVar("T")


def settings_from(cls: type[T], sections: dict[str, BaseModel], **given: Any) -> T:
    """An instance of the dataclass ``cls``: each field from ``given`` if named there (values
    the config derives, such as a built preset), else from the section in ``sections`` (name
    -> model) that has a field of that name.

    Raises:
        TypeError: a field no section has and ``given`` lacks, one that two sections have (the
            dataclass cannot tell which it means), or a ``given`` name ``cls`` does not declare.
    """
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(given) - names)
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {', '.join(unknown)}")
    values = dict(given)
    for name in sorted(names - set(given)):
        owners = [s for s, model in sections.items() if name in type(model).model_fields]
        if len(owners) != 1:
            found = f"in {' and '.join(owners)}" if owners else "in no section"
            raise TypeError(
                f"{cls.__name__}.{name}: found {found} of {', '.join(sections)}; "
                "name one, or pass the value"
            )
        values[name] = getattr(sections[owners[0]], name)
    return cls(**values)
