"""A small builder for generated source: lines at an indentation depth, blocks, and calls
wrapped at 100 columns (no template with holes)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class CodeBuilder:
    def __init__(self):
        self.lines: list[str] = []
        self.depth = 0

    def __call__(self, text: str = "") -> None:
        self.lines.append(("    " * self.depth + text) if text else "")

    @contextmanager
    def indented(self) -> Iterator[None]:
        self.depth += 1
        yield
        self.depth -= 1

    @contextmanager
    def block(self, header: str) -> Iterator[None]:
        self(header)
        with self.indented():
            yield

    def call(self, head: str, args: list[str], tail: str = ")") -> None:
        """`head` + comma-separated args + `tail`, wrapped at 100 columns under the paren."""
        indent = "    " * self.depth
        line = indent + head
        pad = " " * len(line)
        for i, arg in enumerate(args):
            piece = arg + (", " if i < len(args) - 1 else "")
            if len(line) + len(piece.rstrip()) > 100 and line.strip() != head.strip():
                self.lines.append(line.rstrip())
                line = pad
            line += piece
        self.lines.append(line + tail)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"
