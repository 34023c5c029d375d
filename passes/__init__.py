"""The compiler's passes, one module each; every module exports its `PASS` record.

A pass is a pure function from one IR to the next. An analysis leaves the IR as it is and
reports what it found (`report`); a rewrite returns new IR (of the same level, or the next one
down: `fuse` turns a cascade into kernel IR). attnc.pipeline lists the passes in order and
verifies the IR after every one.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class PassKind(enum.Enum):
    ANALYSIS = "analysis"  # returns its input unchanged; `report` says what it found
    REWRITE = "rewrite"    # returns new IR


@dataclass(frozen=True)
class Pass:
    name: str
    kind: PassKind
    run: Callable[[Any], Any]
    doc: str  # one line: what it does, for `attnc passes`
    report: Callable[[Any], str] | None = None  # an analysis' findings, for `attnc show`
