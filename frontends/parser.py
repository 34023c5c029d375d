"""Parse spec text with the LALR grammar in grammar.lark, turning lark's errors into SpecErrors.

Statements end at newlines; a post-lexer drops newlines inside (...) and [...] so long
expressions may span lines.
"""

from __future__ import annotations

import functools
from importlib import resources

import lark

from attnc.errors import SpecError

_OPEN = {"LPAR", "LSQB"}
_CLOSE = {"RPAR", "RSQB"}

# How expected terminals are shown in messages.
_FRIENDLY = {
    "_NL": "end of line", "NAME": "a name", "NUMBER": "a number", "REDUCTION": "a reduction",
    "COMPARE": "a comparison", "ADD_OP": "'+' or '-'", "MUL_OP": "'*', '/', '//' or '%'",
    "$END": "end of spec",
}


class _BracketNewlines:
    """Post-lexer: inside brackets a newline is whitespace."""

    always_accept = ("_NL",)

    def process(self, stream):
        depth = 0
        for tok in stream:
            if tok.type in _OPEN:
                depth += 1
            elif tok.type in _CLOSE:
                depth = max(depth - 1, 0)
            elif tok.type == "_NL" and depth:
                continue
            yield tok


@functools.lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    grammar = resources.files("attnc.frontends").joinpath("grammar.lark").read_text()
    return lark.Lark(grammar, parser="lalr", postlex=_BracketNewlines(),
                     propagate_positions=True, maybe_placeholders=False)


def _describe(parser: lark.Lark, names) -> str:
    shown = set()
    for name in names:
        if name in _FRIENDLY:
            shown.add(_FRIENDLY[name])
            continue
        try:
            pattern = parser.get_terminal(name).pattern
        except KeyError:
            shown.add(name.lower())
            continue
        shown.add(f"'{pattern.value}'" if pattern.type == "str" else name.lower())
    return ", ".join(sorted(shown))


def parse(source: str, filename: str = "<spec>") -> lark.Tree:
    """Parse a spec; raise SpecError with file:line:col on malformed input."""
    parser = _parser()
    text = source if source.endswith("\n") else source + "\n"
    try:
        return parser.parse(text)
    except lark.exceptions.UnexpectedCharacters as err:
        raise SpecError(f"unexpected character {text[err.pos_in_stream or 0]!r}", source=source,
                        filename=filename, line=err.line, column=err.column) from None
    except lark.exceptions.UnexpectedToken as err:
        tok = err.token
        expected = _describe(parser, err.expected)
        if tok.type == "$END":
            lines = source.rstrip("\n").splitlines() or [""]
            raise SpecError("unexpected end of spec", source=source, filename=filename,
                            line=len(lines), column=len(lines[-1]) + 1,
                            hint=f"expected {expected}; is a closing '}}' missing?") from None
        found = "end of line" if tok.type == "_NL" else repr(str(tok))
        hint = f"expected {expected}"
        if "end of line" in expected and str(tok) == "}":
            hint = "each statement ends at a newline; put '}' on its own line"
        elif expected == "end of line":
            hint += "; each statement goes on a line of its own"
        raise SpecError(f"unexpected {found}", source=source, filename=filename,
                        line=tok.line, column=tok.column, hint=hint) from None
    except lark.exceptions.UnexpectedEOF as err:  # pragma: no cover - LALR reports tokens
        raise SpecError("unexpected end of spec", source=source, filename=filename) from err
