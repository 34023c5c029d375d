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
            # lines end at "\n" only, as the parser counts them (splitlines would also break
            # at a form feed or a vertical tab)
            lines = self.source.split("\n")
            if 0 < self.line <= len(lines):
                src, col = _window(lines[self.line - 1].rstrip("\r").expandtabs(1), self.column)
                text += f"\n    {src}\n    {' ' * (col - 1)}^"
        if self.hint:
            text += f"\nhint: {self.hint}"
        return text


_SHOWN = 100  # characters of a source line shown on each side of the caret at most


def _window(line: str, column: int) -> tuple[str, int]:
    """The part of a long source line around `column`, marked with "..." where cut, and the
    caret's column in it: a 2 MB one-line spec must not print whole."""
    start = max(column - 1 - _SHOWN, 0)
    end = column - 1 + _SHOWN
    if start == 0 and end >= len(line):
        return line, column
    head = "..." if start else ""
    tail = "..." if end < len(line) else ""
    return head + line[start:end] + tail, column - start + len(head)


class CompileError(SpecError):
    """A well-formed spec that attnc cannot compile (yet): says which construct and why.

    A pass raises it naming the cascade `tensor` whose statement it refuses (None: the block as
    a whole) and knows nothing of the source; the pipeline, which does, re-raises it with the
    statement's file:line:col (`located`). Unlocated, it renders as its bare message.
    """

    def __init__(self, message: str, *, tensor: str | None = None, **where):
        self.tensor = tensor
        super().__init__(message, **where)

    def render(self) -> str:
        if self.line:
            return super().render()
        return self.message + (f"\nhint: {self.hint}" if self.hint else "")

    def located(self, source: str, filename: str, line: int, column: int) -> CompileError:
        return CompileError(self.message, tensor=self.tensor, source=source, filename=filename,
                            line=line, column=column, hint=self.hint)
