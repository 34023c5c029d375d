"""Errors that point into a spec.

A `SpecError` carries the spec text and a 1-based line/column so it renders the way compilers do:
`file:line:col: message`, the offending source line and a caret under the column. It subclasses
`ValueError` so API callers can catch malformed specs like any other bad argument.
"""

from __future__ import annotations


class SpecError(ValueError):
    def __init__(self, message: str, *, source: str = "", filename: str = "<spec>",
                 line: int = 0, column: int = 0, hint: str = ""):
        self.message = message
        self.source = source
        self.filename = filename
        self.line = line
        self.column = column
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        if not self.line:
            text = f"{self.filename}: {self.message}"
        else:
            text = f"{self.filename}:{self.line}:{self.column}: {self.message}"
            lines = self.source.splitlines()
            if 0 < self.line <= len(lines):
                src = lines[self.line - 1].expandtabs(1)
                text += f"\n    {src}\n    {' ' * (self.column - 1)}^"
        if self.hint:
            text += f"\nhint: {self.hint}"
        return text


class CompileError(ValueError):
    """A well-formed spec that attnc cannot compile (yet): says which construct and why."""
