"""Bad input keeps the house rule (issue 14): infinite, undefined and complex constants, inputs
too deep, too long or too large, integers beyond int32, floats beyond float32, non-positive
tensor dimensions, bytes that are no UTF-8 and spec arguments of the wrong type each give a
SpecError at file:line:col (or a ValueError naming the argument or option the caller gave),
quickly; the CLI prints it and exits 2. Constants sympy keeps symbolic (sqrt(2), exp(1)) compile
and run. The bounds live in frontends/limits.py.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

import attnc
from attnc.cli import main
from attnc.errors import SpecError
from attnc.frontends import limits
from attnc.pipeline import frontend, read_spec


def spec_error(text: str, options: dict | None = None) -> SpecError:
    with pytest.raises(SpecError) as exc:
        frontend(read_spec(text), options)
    return exc.value


def attention(*lines: str) -> str:
    return "attention a {\n" + "".join(f"  {line}\n" for line in lines) + "}\n"


def linear(update: str) -> str:
    return ("linear a {\n  state S[i, j]\n"
            f"  S[i, j] = {update}\n"
            "  o[j] = sum(i) q[i] * S[i, j]\n}\n")


def cli(capsys, *argv) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, err


# --- 1. infinite, undefined and complex constants ------------------------------------------------

# (where, expression, message, its column in `score = dot(q, k) + EXPR`)
BAD_CONSTANTS = [
    ("log(0)", "infinite or undefined constant", 23),
    ("1 // 0.0", "division by zero", 25),           # at the operator, as for `/ 0`
    ("1 % 0.0", "division by zero", 25),
    ("0 ** -1", "infinite or undefined constant", 23),
    ("0.0 ** -1.0", "infinite or undefined constant", 23),
    ("sqrt(-1)", "complex value", 23),
    ("log(-1)", "complex value", 23),
    ("(-8) ** (1 / 3)", "complex value", 23),
    ("sqrt(-n)", "complex value", 23),              # sympy: I * sqrt(n), no real number
    ("sqrt(-n - 1)", "complex value", 23),          # complex for every n (sympy cannot compare
    ("log(-n - 1)", "complex value", 23),           # it: it raised TypeError in a mask)
    ("exp(1000)", "out of range", 23),
]


@pytest.mark.parametrize("expr, message, column", BAD_CONSTANTS,
                         ids=[c[0] for c in BAD_CONSTANTS])
def test_bad_constant_in_a_score(expr, message, column):
    err = spec_error(attention(f"score = dot(q, k) + {expr}"))
    assert message in err.message
    assert (err.line, err.column) == (2, column)


def test_bad_constant_inside_a_comparison_is_found_before_sympy_compares():
    # sympy raised TypeError: Invalid comparison of non-real zoo
    err = spec_error(attention("mask = n <= m and log(0) < 1"))
    assert "infinite or undefined" in err.message
    assert (err.line, err.column) == (2, 21)


@pytest.mark.parametrize("update", ["S[i, j] * log(0) + k[i] * v[j]",
                                    "S[i, j] + sqrt(-1) * k[i] * v[j]"])
def test_bad_constant_in_a_linear_update(update):
    err = spec_error(linear(update))
    assert err.line == 3 and err.column > 1
    assert "infinite" in err.message or "complex" in err.message


def test_bad_constant_in_a_dimension():
    err = spec_error(attention("param s[h, 0 ** -1]", "score = dot(q, k) + s[h, 0]"))
    assert (err.line, err.column) == (2, 14)


@pytest.mark.parametrize("factor", ["exp(1)", "sqrt(2)", "log(3)", "sqrt(2 * n + 1) / sqrt(n + 1)"])
def test_constants_sympy_keeps_symbolic_compile_and_run(factor):
    """exp(1) (sympy's E) had no Triton spelling, sqrt(2) was printed as tl.sqrt of an
    integer; both are folded into floats."""
    kernel = attnc.compile(attention(f"score = dot(q, k) * scale * {factor}"))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 16, 16, generator=g) for _ in range(3))
    out = kernel(q, k, v)
    n = torch.arange(16.0)
    value = {"exp(1)": torch.full((16,), math.e), "sqrt(2)": torch.full((16,), math.sqrt(2)),
             "log(3)": torch.full((16,), math.log(3)),
             "sqrt(2 * n + 1) / sqrt(n + 1)": torch.sqrt(2 * n + 1) / torch.sqrt(n + 1)}[factor]
    weights = torch.softmax(q @ k.transpose(-1, -2) * 0.25 * value, dim=-1)
    torch.testing.assert_close(out, weights @ v, rtol=1e-4, atol=1e-5)


# --- 2. deep and huge input ----------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    (attention("score = dot(q, k) * " + "-" * 5000 + "1"), "nests more than"),
    (attention("mask = " + "not " * 2000 + "n <= m"), "nests more than"),
    (attention("mask = " + " and ".join(["n <= m"] * 3000)), "nests more than"),
    (attention("score = dot(q, k) * " + "tanh(" * 400 + "n" + ")" * 400), "nests more than"),
    (attention("score = dot(q, k)" + " + 0" * 500_000), "longer than"),   # 2 MB
    (attention("score = " + "(" * 5000 + "dot(q, k)" + ")" * 5000), None),  # brackets: no level
], ids=["minus", "not", "and", "calls", "2MB", "brackets"])
def test_deep_or_huge_input_is_refused_quickly(text, message):
    start = time.perf_counter()
    if message is None:
        frontend(read_spec(text))
    else:
        err = spec_error(text)
        assert message in err.message and err.line >= 1
        assert max(map(len, str(err).splitlines())) < 300  # the 2 MB line is not printed whole
    assert time.perf_counter() - start < 10


def test_size_limit_points_at_the_first_character_past_it():
    text = attention("score = dot(q, k)" + " + 0" * 30_000)
    err = spec_error(text)
    assert err.line == 2
    assert err.column == limits.MAX_SPEC_CHARS - len("attention a {\n") + 1


def test_a_huge_file_is_read_only_as_far_as_the_limit(tmp_path):
    path = tmp_path / "huge.attn"
    path.write_text("attention a {\n" + "  # \u00e9t\u00e9\n" * 1_000_000 + "}\n")  # 10 MB
    start = time.perf_counter()
    with pytest.raises(SpecError, match="the spec is longer than 100000 characters") as exc:
        attnc.compile(path)
    assert exc.value.filename == str(path) and exc.value.line > 1
    assert time.perf_counter() - start < 5


def test_nesting_within_the_limit_still_compiles():
    kernel = attnc.compile(attention("score = dot(q, k) * " + "-" * 60 + "1"))
    assert kernel.name == "a"


def test_lets_count_towards_the_expression_depth():
    lets = ["let l0 = tanh(n)"] + [f"let l{i} = tanh(l{i - 1})" for i in range(1, 80)]
    err = spec_error(attention(*lets, "score = dot(q, k) * l79"))
    assert "levels deep" in err.message
    # tanh(n) is 2 levels, l{i} i + 2: l63, on line 65, is the first past 64; tanh at column 13
    assert (err.line, err.column) == (2 + limits.MAX_EXPR_DEPTH - 1, 13)


def test_lets_that_double_the_expression_are_refused_by_size():
    # each let reads the one before twice: 2 ** 30 nodes once inlined, a few hundred as a DAG
    lets = ["let l0 = tanh(n)"] + [f"let l{i} = tanh(l{i - 1}) * exp(l{i - 1})"
                                   for i in range(1, 30)]
    start = time.perf_counter()
    err = spec_error(attention(*lets, "score = dot(q, k) * l29"))
    assert "nodes" in err.message and err.line > 2
    assert time.perf_counter() - start < 10


def test_calls_take_a_bounded_number_of_arguments():
    args = ", ".join(f"n * {i}" for i in range(40))
    err = spec_error(attention(f"score = dot(q, k) * max({args})"))
    assert "at most 32 arguments" in err.message and (err.line, err.column) == (2, 23)


def test_cli_refuses_deep_input(capsys):
    rc, err = cli(capsys, "show", attention("mask = " + "not " * 2000 + "n <= m"))
    assert rc == 2 and err.startswith("<spec>:2:")


# --- 3. constant powers --------------------------------------------------------------------------

# right-associative: 2 ** 2 ** 2 ** 2 is 2 ** 16 = 65536; the next power, at the second 2
# (column 28), would have 19729 digits, the outermost 10 ** 19728
@pytest.mark.parametrize("expr, column", [("2 ** 2 ** 2 ** 2 ** 2 ** 2", 28),
                                          ("10 ** 100000", 23),
                                          ("2 ** -5000", 23),
                                          ("0.5 ** -5000", 23)])
def test_huge_constant_powers_answer_at_once(expr, column):
    start = time.perf_counter()
    err = spec_error(attention(f"score = dot(q, k) * {expr}"))
    assert time.perf_counter() - start < 2
    assert "out of range" in err.message and (err.line, err.column) == (2, column)


def test_cli_refuses_a_tower_of_powers_at_once(capsys):
    start = time.perf_counter()
    rc, err = cli(capsys, "compile", attention("score = dot(q, k) * 2 ** 2 ** 2 ** 2 ** 2 ** 2"))
    assert rc == 2 and err.startswith("<spec>:2:28: the constant power 2 ** 65536")
    assert time.perf_counter() - start < 5


def test_a_small_constant_power_is_folded():
    _, ir = frontend(read_spec(attention("mask = m - n < 2 ** 10")))
    assert "1024" in str(ir.mask)


# --- 4. bytes that are no UTF-8 ------------------------------------------------------------------

def test_a_file_that_is_no_utf8_is_located(tmp_path):
    path = tmp_path / "latin1.attn"
    path.write_bytes("attention a {\n  # caf\u00e9\n  mask = n <= m # \u00e9t\u00e9\n}\n"
                     .encode("latin-1"))
    with pytest.raises(SpecError) as exc:
        attnc.compile(str(path))
    err = exc.value
    assert err.filename == str(path)
    assert (err.line, err.column) == (2, 8)   # the \xe9 of "caf\xe9"
    assert "not valid UTF-8" in err.message and "0xe9" in err.message
    assert str(err).splitlines()[1] == "      # caf\ufffd"


def test_a_multibyte_character_is_one_column(tmp_path):
    path = tmp_path / "cut.attn"
    path.write_bytes("attention a {\n  # \u00e9\u00e9 ".encode() + b"\xe2\x82" + b"\n}\n")
    with pytest.raises(SpecError) as exc:
        read_spec(path)
    assert (exc.value.line, exc.value.column) == (2, 8)  # "  # " then two characters and " "


def test_cli_reports_a_file_that_is_no_utf8(capsys, tmp_path):
    path = tmp_path / "bad.attn"
    path.write_bytes(b"attention a {\n  mask = n <= m \xff\n}\n")
    rc, err = cli(capsys, "show", path, "--stage", "cascade")
    assert rc == 2 and err.startswith(f"{path}:2:17: the spec is not valid UTF-8 text: byte 0xff")


def test_undecodable_bytes_in_spec_text_are_located():
    # what Python makes of the byte 0xff in a command-line argument (surrogateescape)
    err = spec_error("attention a {\n  mask = n <= m \udcff\n}\n")
    assert (err.line, err.column) == (2, 17) and "byte 0xff" in err.message
    str(err).encode()  # printable: the bad character is shown as U+FFFD


# --- 5. non-finite numbers -----------------------------------------------------------------------

@pytest.mark.parametrize("lines, column", [
    (("score = dot(q, k) * 1e999",), 23),
    (("option cap = 1e999", "score = dot(q, k) / cap"), 16),
    (("option cap = -1e999", "score = dot(q, k) / cap"), 17),
    (("score = dot(q, k) * 1e39",), 23),            # finite in Python, inf in float32
    (("score = dot(q, k) * 1e38 * 10",), 11),
])
def test_numbers_beyond_float32_are_refused(lines, column):
    err = spec_error(attention(*lines))
    assert "out of range" in err.message and (err.line, err.column) == (2, column)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 1e39, 10**400])
def test_non_finite_option_values_name_the_option(value):
    with pytest.raises(ValueError, match="option cap"):
        attnc.compile(attention("option cap = 2.0", "score = dot(q, k) / cap"), cap=value)


def test_cli_refuses_a_non_finite_option(capsys):
    rc, err = cli(capsys, "compile", attention("option cap = 2.0", "score = dot(q, k) / cap"),
                  "-O", "cap=1e999")
    assert rc == 2 and "option cap must be a finite number, got inf" in err


# --- 6. integers beyond int32 --------------------------------------------------------------------

WINDOW = ("mask = n <= m and m - n < window",)


@pytest.mark.parametrize("lines, column", [
    (("option window = 2147483648",) + WINDOW, 19),
    (("option window = 99999999999999999999999999999999",) + WINDOW, 19),
    (("option window = " + "9" * 5000,) + WINDOW, 19),   # past Python's own int digit limit
    (("mask = m - n < 2 ** 40",), 18),
    (("mask = m - n < 2147483647 * 2",), 18),
    (("score = dot(q, k) * 2147483648",), 23),
])
def test_integers_beyond_int32_are_refused(lines, column):
    err = spec_error(attention(*lines))
    assert "out of range" in err.message and (err.line, err.column) == (2, column)
    assert err.hint.startswith("write a float")


def test_the_largest_int32_still_compiles():
    kernel = attnc.compile(attention("option window = 2147483647", *WINDOW))
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, 16, 16, generator=g) for _ in range(3))
    causal = attnc.compile(attention("mask = n <= m"))
    torch.testing.assert_close(kernel(q, k, v), causal(q, k, v))


@pytest.mark.parametrize("value", [2**31, 2**40, -2**31, 10**400])
def test_integer_options_beyond_int32_name_the_option(value):
    with pytest.raises(ValueError, match=r"option window = .* is out of range"):
        attnc.compile(attention("option window = 4", *WINDOW), window=value)


def test_cli_refuses_an_integer_option_beyond_int32(capsys):
    rc, err = cli(capsys, "compile", attention("option window = 4", *WINDOW),
                  "-O", "window=99999999999")
    assert rc == 2 and "option window = 99999999999 is out of range" in err
    # past Python's int digit limit, where int() itself raises
    rc, err = cli(capsys, "compile", attention("option window = 4", *WINDOW),
                  "-O", "window=" + "9" * 5000)
    assert rc == 2 and "option window: 99999999999999999999... (5000 digits) is out of range" in err


# --- 7. tensor dimensions ------------------------------------------------------------------------

REL_BIAS = ("param bias[h, 2 * max_distance + 1]",
            "score = dot(q, k) + bias[h, clamp(n - m, -max_distance, max_distance) "
            "+ max_distance]")


def test_a_dimension_that_is_not_positive_is_located():
    err = spec_error(attention("option max_distance = -5", *REL_BIAS))
    assert err.message == "dimension 2 of bias is -9, not positive"
    assert (err.line, err.column) == (3, 17)


def test_a_dimension_made_negative_by_the_caller_names_the_option():
    with pytest.raises(ValueError, match=r"bias is -9, not positive \(with max_distance = -5 "
                                         r"given by the caller\)"):
        attnc.compile(attention("option max_distance = 4", *REL_BIAS), max_distance=-5)


def test_a_zero_dimension_is_refused():
    err = spec_error(attention("param s[h, N - N]", "score = dot(q, k) + s[h, 0]"))
    assert "dimension 2 of s is 0" in err.message and (err.line, err.column) == (2, 14)


# --- 8. the spec argument ------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [123, None, b"attention a {\n}\n", 4.5])
def test_a_spec_of_the_wrong_type_names_the_argument(spec):
    with pytest.raises(ValueError, match=r"^spec must be DSL text, a path or a library name"):
        attnc.compile(spec)


def test_a_long_string_that_names_nothing():
    with pytest.raises(SpecError, match="no spec file or library variant named") as exc:
        attnc.compile("x" * 5000)
    assert len(str(exc.value)) < 400


@pytest.mark.parametrize("name, message", [
    ("x" * 5000, "no library variant"), ("../variants/causal", "no library variant"),
    ("causal\0", "no library variant"), (123, "name must be a library variant's name")])
def test_load_refuses_what_names_no_variant(name, message):
    with pytest.raises(ValueError, match=message) as exc:
        attnc.load(name)
    assert len(str(exc.value)) < 1000


# --- names and numbers are ASCII (found by tests/frontends/test_fuzz.py) --------------------------

@pytest.mark.parametrize("text, column", [
    ("attention caf\u00e9 {\n  mask = n <= m\n}\n", 14),   # torch's op registry raised
    ("attention a {\n  param poids\u00e9[h]\n  score = dot(q, k)\n}\n", 14),
    ("attention a {\n  mask = n <= \u0663\n}\n", 15),       # an Arabic-Indic digit three
])
def test_names_and_numbers_are_ascii(text, column):
    with pytest.raises(SpecError) as exc:
        attnc.compile(text)
    assert "unexpected character" in exc.value.message and exc.value.column == column
    assert "ASCII" in exc.value.hint


def test_comments_may_hold_any_text():
    assert attnc.compile("attention a {  # caf\u00e9\n  mask = n <= m  # \u0663\n}\n").name == "a"


# --- rendering -----------------------------------------------------------------------------------

def test_a_long_line_is_shown_around_the_caret():
    err = spec_error(attention("score = dot(q, k) + 1." + "0" * 5000 + " + nope"))
    shown, caret = str(err).splitlines()[1:3]
    assert len(shown) < 250 and shown.endswith("+ nope")
    assert shown[caret.index("^")] == "n"


def test_lines_end_at_newlines_only():
    # a form feed is whitespace to the parser; splitlines() would have broken the line there
    err = spec_error("attention a {\n  mask =\fn <= m $\n}\n")
    assert (err.line, err.column) == (2, 17)
    assert "$" in str(err).split("\n")[1]
