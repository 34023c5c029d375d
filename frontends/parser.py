"""Parse spec text with the LALR grammar in grammar.lark, turning lark's errors into SpecErrors.

Statements end at newlines; a post-lexer drops newlines inside (...) and [...] so long
expressions may span lines. A spec longer than limits.MAX_SPEC_CHARS is refused before parsing,
and a parse tree nested deeper than limits.MAX_NESTING after it (lark parses iteratively, but
everything after it recurses over the tree), both at the line and column where the limit is
crossed.
"""

from __future__ import annotations

import functools
from importlib import resources

import lark

from attnc.errors import SpecError
from attnc.frontends import limits

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
    _check_size(source, filename)
    tree = _parse(source, filename)
    deep = limits.too_deep(tree)
    if deep is not None:
        line, column = _start(deep)
        raise SpecError(f"the expression nests more than {limits.MAX_NESTING} levels deep",
                        source=source, filename=filename, line=line, column=column,
                        hint="every operator and call is a level (`a + b + c` is two); name "
                             "parts with `let`")
    return tree


def _check_size(source: str, filename: str) -> None:
    offset = limits.oversize_offset(source)
    if offset is None:
        return
    line = source.count("\n", 0, offset) + 1
    column = offset - (source.rfind("\n", 0, offset) + 1) + 1
    raise SpecError(f"the spec is longer than {limits.MAX_SPEC_CHARS} characters",
                    source=source, filename=filename, line=line, column=column)


def _start(tree: lark.Tree) -> tuple[int, int]:
    """Where a subtree starts: its own position, or its first token's (iteratively: the
    subtree may be deep)."""
    stack: list = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, lark.Token):
            return node.line or 0, node.column or 0
        if not node.meta.empty:
            return node.meta.line, node.meta.column
        stack.extend(reversed(node.children))
    return 0, 0


def _parse(source: str, filename: str) -> lark.Tree:
    parser = _parser()
    text = source if source.endswith("\n") else source + "\n"
    try:
        return parser.parse(text)
    except lark.exceptions.UnexpectedCharacters as err:
        char = text[err.pos_in_stream or 0]
        raise SpecError(f"unexpected character {char!r}", source=source, filename=filename,
                        line=err.line, column=err.column,
                        hint="" if char.isascii() else "outside comments a spec is ASCII: "
                        "names are letters, digits and _") from None
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
