"""Fast construction of frozen slotted dataclasses for the decoders.

A frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``; on
the decode hot path that costs more than the parsing. ``constructor(cls)`` returns a
function taking the fields positionally that fills the slots directly. It is only for
decoders, which have already validated every value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


def constructor(cls: type) -> Callable[..., Any]:
    names = [f.name for f in dataclasses.fields(cls)]
    namespace: dict[str, Any] = {"_new": object.__new__, "_cls": cls}
    lines = [f"def make({', '.join(names)}):", "    obj = _new(_cls)"]
    for i, name in enumerate(names):
        namespace[f"_set{i}"] = getattr(
            cls, name
        ).__set__  # the slot's member descriptor
        lines.append(f"    _set{i}(obj, {name})")
    lines.append("    return obj")
    exec("\n".join(lines), namespace)
    return namespace["make"]
