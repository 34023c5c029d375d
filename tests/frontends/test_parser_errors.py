"""Malformed specs: each error names the right message, line and column (1-based), and renders
with the source line and a caret under that column.

Positions were derived by reading each spec; the `# col` rulers in comments count columns.
"""

from __future__ import annotations

import pytest

import attnc
from attnc.cli import main
from attnc.errors import SpecError
from attnc.pipeline import frontend, read_spec


def spec_error(text: str, options: dict | None = None) -> SpecError:
    with pytest.raises(SpecError) as exc:
        frontend(read_spec(text), options)
    return exc.value


def assert_caret(err: SpecError) -> None:
    """str(err) is `file:line:col: message`, the source line, a caret under the column."""
    lines = str(err).splitlines()
    assert lines[0] == f"{err.filename}:{err.line}:{err.column}: {err.message}"
    source_line = err.source.splitlines()[err.line - 1]
    assert lines[1] == "    " + source_line.expandtabs(1)
    assert lines[2] == "    " + " " * (err.column - 1) + "^"
    if err.hint:
        assert lines[3] == f"hint: {err.hint}"
        assert len(lines) == 4
    else:
        assert len(lines) == 3


# (id, spec, message substring, line, column, hint substring or None)
CASES = [
    # --- lexical ---------------------------------------------------------------------------------
    ("bad_character",
     "attention a {\n"
     "  mask = n <= m $ 1\n"   # '$' is column 17
     "}\n",
     "unexpected character '$'", 2, 17, None),
    ("bad_character_in_name",
     "attention a {\n"
     "  option w@ = 3\n"       # '@' is column 11
     "}\n",
     "unexpected character '@'", 2, 11, None),
    # --- syntax ----------------------------------------------------------------------------------
    ("missing_equals",
     "attention a {\n"
     "  mask n <= m\n"         # 'n' is column 8, where '=' belongs
     "}\n",
     "unexpected 'n'", 2, 8, "expected '='"),
    ("unclosed_brace",
     "attention a {\n"
     "  mask = n <= m\n",      # the end of spec: just after the last character, column 16
     "unexpected end of spec", 2, 16, "is a closing '}' missing?"),
    ("missing_newline_before_brace",
     "attention a {\n"
     "  mask = n <= m }\n",    # '}' is column 17
     "unexpected '}'", 2, 17, "put '}' on its own line"),
    ("statement_on_brace_line",
     "attention a { mask = n <= m }\n",  # 'mask' is column 15; a newline must follow '{'
     "unexpected 'mask'", 1, 15, "each statement goes on a line of its own"),
    ("stray_token",
     "attention a {\n"
     "  mask = n <= m m\n"     # the second 'm' is column 17
     "}\n",
     "unexpected 'm'", 2, 17, None),
    ("unknown_block_keyword",
     "attentoin a {\n"
     "}\n",
     "unexpected 'attentoin'", 1, 1, None),
    # --- semantic: names and functions ------------------------------------------------------------
    ("unknown_name",
     "attention a {\n"
     "  score = dot(q, k) * temp\n"   # 'temp' is column 23
     "}\n",
     "unknown name 'temp'", 2, 23, "names in scope"),
    ("unknown_function",
     "attention a {\n"
     "  score = foo(dot(q, k))\n"     # 'foo' is column 11
     "}\n",
     "unknown function 'foo'", 2, 11, "functions: abs, clamp"),
    ("wrong_arity",
     "attention a {\n"
     "  score = tanh(dot(q, k), 2)\n"  # the call starts at 'tanh', column 11
     "}\n",
     "tanh takes 1 argument, got 2", 2, 11, None),
    ("where_arity",
     "attention a {\n"
     "  score = where(n <= m, dot(q, k))\n"   # the call starts at 'where', column 11
     "}\n",
     "where takes 3 arguments, got 2", 2, 11, None),
    ("reserved_option_name",
     "attention a {\n"
     "  option scale = 2\n"        # 'scale' is column 10
     "}\n",
     "option name 'scale' is reserved", 2, 10, None),
    ("reserved_tensor_name",
     "attention a {\n"
     "  param q[h]\n"              # 'q' is column 9
     "}\n",
     "tensor name 'q' is reserved", 2, 9, None),
    ("option_declared_twice",
     "attention a {\n"
     "  option w = 1, w = 2\n"     # the second 'w' is column 17
     "}\n",
     "option name 'w' is declared twice", 2, 17, None),
    ("q_used_as_number",
     "attention a {\n"
     "  score = q * 2\n"
     "}\n",
     "'q' is not a number here", 2, 11, "dot(q, k)"),
    # --- semantic: tensors and indices ------------------------------------------------------------
    ("unknown_tensor",
     "attention a {\n"
     "  score = dot(q, k) + bias[h]\n"   # 'bias' is column 23
     "}\n",
     "unknown tensor 'bias'", 2, 23, "declare it with `param` or `input`"),
    ("wrong_number_of_indices",
     "attention a {\n"
     "  param slopes[h]\n"
     "  score = dot(q, k) + slopes[h, m]\n"  # the access starts at 'slopes', column 23
     "}\n",
     "slopes has 1 dimension, indexed with 2", 3, 23, None),
    ("non_integer_index",
     "attention a {\n"
     "  param bias[h, N]\n"
     "  score = dot(q, k) + bias[h, n / 2]\n"  # 'n / 2' starts at column 31
     "}\n",
     "an index of bias must be an integer expression", 3, 31, None),
    ("tensor_not_indexed",
     "attention a {\n"
     "  param s[h]\n"
     "  score = dot(q, k) * s\n"   # 's' is column 23
     "}\n",
     "tensor 's' must be indexed", 3, 23, "write s[...]"),
    ("bad_dimension",
     "attention a {\n"
     "  param s[q]\n"              # 'q' is column 11
     "}\n",
     "'q' cannot size a tensor", 2, 11, None),
    # --- semantic: statements and types -----------------------------------------------------------
    ("mask_is_a_number",
     "attention a {\n"
     "  mask = n - m\n"            # the expression starts at column 10
     "}\n",
     "mask must be a boolean expression, this is a number", 2, 10, "a mask is a condition"),
    ("score_is_boolean",
     "attention a {\n"
     "  score = n <= m\n"          # the expression starts at column 11
     "}\n",
     "score must be a number expression, this is a boolean", 2, 11, "a score is a number"),
    ("and_of_a_number",
     "attention a {\n"
     "  mask = n <= m and 3\n"     # '3' is column 21
     "}\n",
     "operand of 'and' must be a boolean expression, this is a number", 2, 21, None),
    ("dot_outside_score",
     "attention a {\n"
     "  mask = dot(q, k) > 0\n"    # 'dot' is column 10
     "}\n",
     "dot(q, k) is only allowed in a score", 2, 10, None),
    ("duplicate_score",
     "attention a {\n"
     "  score = dot(q, k)\n"
     "  mask = n <= m\n"
     "  score = dot(q, k) * 2\n"   # the second score statement starts at column 3
     "}\n",
     "'score' is given twice", 4, 3, "first given on line 2"),
    ("unsupported_normalizer",
     "attention a {\n"
     "  normalize = sparsemax\n"   # 'sparsemax' is column 15
     "}\n",
     "normalizer 'sparsemax' is not supported", 2, 15, "supported: softmax"),
    ("division_by_zero",
     "attention a {\n"
     "  score = dot(q, k) / 0\n"   # '/' is column 21
     "}\n",
     "division by zero", 2, 21, None),
    ("two_blocks",
     "attention a {\n"
     "}\n"
     "attention b {\n"             # the second block starts at 3:1
     "}\n",
     "a spec holds exactly one block", 3, 1, "its own file"),
    # --- semantic: cascades ----------------------------------------------------------------------
    ("cascade_undefined_tensor",
     "cascade c {\n"
     "  QK[m, n] = Q[m, e] * K[n, e]\n"
     "  GM[m] = max(n) QKX[m, n]\n"   # 'QKX' is column 18
     "}\n",
     "unknown tensor 'QKX'", 3, 18, None),
    ("cascade_rank_mismatch",
     "cascade c {\n"
     "  QK[m, n] = Q[m, e] * K[n, e]\n"
     "  GM[m] = max(n) QK[n, m]\n"    # the access starts at 'QK', column 18
     "}\n",
     "QK is indexed [m, n], got [n, m]", 3, 18, None),
    ("cascade_reduction_over_wrong_ranks",
     "cascade c {\n"
     "  QK[m, n] = Q[m, e] * K[n, e]\n"
     "  GM[m] = max(e) QK[m, n]\n"    # the reduction 'max(e)' starts at column 11
     "}\n",
     "max(e) must reduce exactly the ranks that appear only on the right: (n)", 3, 11, None),
    ("cascade_unknown_rank",
     "cascade c {\n"
     "  QK[m, z] = Q[m, e] * K[n, e]\n"   # 'z' is column 9
     "}\n",
     "unknown rank 'z'", 2, 9, "ranks are m, n, e, f"),
    ("cascade_redefined_tensor",
     "cascade c {\n"
     "  QK[m, n] = Q[m, e] * K[n, e]\n"
     "  QK[m, n] = Q[m, e] * K[n, e]\n"   # the second 'QK' is column 3
     "}\n",
     "'QK' is already defined", 3, 3, None),
    ("cascade_without_einsum",
     "cascade c {\n"
     "  option w = 2\n"
     "}\n",
     "cascade c defines no einsum", 1, 1, None),
    # --- linear blocks ---------------------------------------------------------------------------
    ("linear_wrong_axis",
     "linear a {\n"
     "  state S[i, j]\n"
     "  S[i, j] = S[i, j] + k[j] * v[j]\n"   # the access 'k[j]' starts at column 23
     "  o[j] = sum(i) q[i] * S[i, j]\n"
     "}\n",
     "k is indexed [i], got [j]", 3, 23, None),
    ("linear_free_axis",
     "linear a {\n"
     "  state z[i]\n"
     "  z[i] = z[i] + v[j]\n"                # the right side starts at column 10
     "  o[j] = sum(i) q[i] * z[i]\n"
     "}\n",
     "axis j is free on the right but z has no j axis", 3, 10, "sum(j)"),
    ("linear_undeclared_state",
     "linear a {\n"
     "  state S[i, j]\n"
     "  S[i, j] = S[i, j] + k[i] * v[j]\n"
     "  Z[i, j] = S[i, j]\n"                 # 'Z' is column 3
     "  o[j] = sum(i) q[i] * S[i, j]\n"
     "}\n",
     "'Z' is not a declared state", 4, 3, "state Z[i, j]"),
    ("linear_state_updated_twice",
     "linear a {\n"
     "  state S[i, j]\n"
     "  S[i, j] = S[i, j] + k[i] * v[j]\n"
     "  S[i, j] = S[i, j]\n"                 # the second update is column 3
     "  o[j] = sum(i) q[i] * S[i, j]\n"
     "}\n",
     "state S is updated twice", 4, 3, "first on line 3"),
    ("linear_no_output",
     "linear a {\n"
     "  state S[i, j]\n"
     "  S[i, j] = S[i, j] + k[i] * v[j]\n"
     "}\n",
     "linear a has no output", 1, 1, "o[j] ="),
    ("linear_reduction_over_time",
     "linear a {\n"
     "  state S[i, j]\n"
     "  S[i, j] = S[i, j] + k[i] * v[j]\n"
     "  o[j] = sum(t) q[i] * S[i, j]\n"      # 'sum(t)' is column 10
     "}\n",
     "unsupported reduction sum(t)", 4, 10, "sum(i) or sum(j)"),
    ("linear_map_of_v",
     "linear a {\n"
     "  map v = taylor2(v)\n"                # 'v' is column 7
     "  state S[i, j]\n"
     "  S[i, j] = S[i, j] + k[i] * v[j]\n"
     "  o[j] = sum(i) q[i] * S[i, j]\n"
     "}\n",
     "a feature map replaces q or k, not 'v'", 2, 7, None),
    ("linear_map_without_weights",
     "linear a {\n"
     "  map q = hedgehog(q)\n"               # the call is column 11
     "  state S[i, j]\n"
     "  S[i, j] = S[i, j] + k[i] * v[j]\n"
     "  o[j] = sum(i) q[i] * S[i, j]\n"
     "}\n",
     "hedgehog takes (q, W)", 2, 11, None),
    ("linear_bad_layout",
     "linear a {\n"
     "  input g[t, b, h]\n"                  # the declaration 'g[...]' is column 9
     "  state S[i, j]\n"
     "  S[i, j] = exp(g) * S[i, j] + k[i] * v[j]\n"
     "  o[j] = sum(i) q[i] * S[i, j]\n"
     "}\n",
     "g is laid out [T, B, H]", 2, 9, "b, h, t lead"),
    ("linear_bad_state_axes",
     "linear a {\n"
     "  state S[j, i]\n"                     # the declaration is column 9
     "  S[j, i] = S[j, i]\n"
     "  o[j] = S[j, i]\n"
     "}\n",
     "state S has axes [j, i]", 2, 9, "S[i, j], z[i]"),
    ("linear_dot",
     "linear a {\n"
     "  state S[i, j]\n"
     "  S[i, j] = S[i, j] + k[i] * v[j]\n"
     "  o[j] = dot(q, S)\n"                  # 'dot' is column 10
     "}\n",
     "dot is not used in a linear block", 4, 10, "sum(i) q[i] * S[i, j]"),
]


@pytest.mark.parametrize("text, message, line, column, hint",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_spec(text, message, line, column, hint):
    err = spec_error(text)
    assert message in err.message
    assert (err.line, err.column) == (line, column)
    assert err.filename == "<spec>"
    if hint is not None:
        assert hint in err.hint
    assert_caret(err)


def test_enough_cases():
    assert len(CASES) >= 12
    assert len({c[0] for c in CASES}) == len(CASES)


def test_caret_with_tab_indentation():
    # a tab counts as one column, and renders as one space so the caret still lines up
    err = spec_error("attention a {\n\tscore = dot(q, k) * temp\n}\n")
    assert (err.line, err.column) == (2, 22)
    assert_caret(err)
    assert str(err).splitlines()[1] == "     score = dot(q, k) * temp"


def test_crlf_line_endings():
    err = spec_error("attention a {\r\n  mask = n - m\r\n}\r\n")
    assert (err.line, err.column) == (2, 10)
    assert "mask must be a boolean" in err.message


def test_unknown_option_override():
    spec = "attention a {\n  option window = 4\n  mask = n <= m and m - n < window\n}\n"
    with pytest.raises(SpecError) as exc:
        attnc.compile(spec, foo=1)
    err = exc.value
    assert err.message == "unknown option 'foo'; this spec declares: window"
    assert err.line == 0
    assert str(err) == "<spec>: unknown option 'foo'; this spec declares: window"


@pytest.mark.parametrize("value, message", [
    ("x", "option window must be a number, got 'x'"),
    (True, "option window must be a number, got True"),
    (2.5, "option window is an integer option, got 2.5"),
])
def test_bad_option_override_values(value, message):
    spec = "attention a {\n  option window = 4\n  mask = n <= m and m - n < window\n}\n"
    err = spec_error(spec, {"window": value})
    assert err.message == message


def test_spec_error_is_a_value_error():
    assert issubclass(SpecError, ValueError)


def test_file_path_is_reported_as_filename(tmp_path):
    path = tmp_path / "broken.attn"
    path.write_text("attention broken {\n  score = dot(q, k) * temp\n}\n")
    with pytest.raises(SpecError) as exc:
        attnc.compile(str(path))
    err = exc.value
    assert err.filename == str(path)
    assert str(err).startswith(f"{path}:2:23: unknown name 'temp'")
    assert_caret(err)
    # a pathlib.Path works the same
    with pytest.raises(SpecError) as exc:
        frontend(read_spec(path))
    assert exc.value.filename == str(path)


def test_cli_reports_malformed_file(tmp_path, capsys):
    path = tmp_path / "broken.attn"
    path.write_text("attention broken {\n  mask = n <= m $ 1\n}\n")
    rc = main(["show", str(path), "--stage", "cascade"])
    out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""
    assert err.startswith(f"{path}:2:17: unexpected character '$'\n")
    assert err.splitlines()[2] == "    " + " " * 16 + "^"
    assert "Traceback" not in err
