"""A grammar-driven fuzzer for the spec language (frontends/grammar.lark).

Seeded random `attention`, `linear` and `cascade` blocks are built rule by rule from the grammar
(options, params, inputs, lets, scores, masks, states, updates, einsums; expressions from every
operator and function), then some are mutated: tokens deleted, inserted, repeated or swapped,
numbers made huge, constants made infinite or complex, expressions nested deep or chained long,
odd characters and bytes that are no UTF-8 inserted, options overridden with bad values.

The invariant is the house rule for bad input. Compiling a case (attnc.compile: parse, lower,
the passes and code generation) either succeeds, or raises a SpecError at a line of the spec
(one about an option the caller gave may name the option instead), or a CompileError that says
what it refuses; within a few seconds; never any other exception. A few of the kernels that
compile run on tiny shapes, and where the reference interpreter's output is finite theirs is
finite and close to it.
"""

from __future__ import annotations

import math
import random
import re
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import torch

import attnc
from attnc import testing
from attnc.backends.reference.cascade import interpret
from attnc.backends.reference.linear import interpret as interpret_scan
from attnc.errors import CompileError, SpecError

SECONDS_PER_CASE = 20  # a case takes about a second; generous for a shared 2-core machine

FUNCTIONS = ("exp", "exp2", "log", "tanh", "sqrt", "abs", "sin", "cos", "tan", "sigmoid",
             "softplus", "relu", "elu")
BINARY = ("+", "-", "*", "/", "//", "%")
COMPARE = ("<", "<=", ">", ">=", "==", "!=")
# Substitutes for a number or a name that cross a limit or make a bad constant.
BAD_CONSTANTS = ("log(0)", "sqrt(-1)", "log(-1)", "(0 ** -1)", "(1 // 0.0)", "(1 % 0.0)",
                 "exp(1)", "sqrt(2)", "(2 ** 2 ** 2 ** 2 ** 2 ** 2)", "(10 ** 100000)",
                 "1e999", "1e39", "2147483648", "99999999999999999999999999999999",
                 "(2147483647 * 2)", "exp(1000)", "((-8) ** (1 / 3))", "(0.0 ** -1.0)",
                 "sqrt(-n - 1)", "(2.0 ** 200)", "1e-999")
TOKENS = ("(", ")", "[", "]", "{", "}", ",", "=", "**", "//", "-", "+", "*", "not", "and",
          "or", "<=", "==", "sum(i)", "max(n)", "sum(n)", "q", "k", "v", "dot", "m", "n",
          "scale", "option", "param", "input", "let", "score", "mask", "state", "o", "0",
          "1.5", "\n", "#", "true")
ODD_TEXT = ("\x00", "\f", "\v", "\u2028", "\t", "\r", "\u00e9", "\ufeff", "$", "@", "\\",
            "\ud800", "\udcff")
BAD_BYTES = (b"\xff", b"\xc3(", b"\x80", b"\xe2\x82", b"\xf0\x9f\x98")
OVERRIDE_VALUES = (0, -5, 3, 2.5, 2**31, 2**40, 10**400, 1e39, math.inf, math.nan, "x", True)
# What makes a score ill-conditioned between the kernel's float32 and the reference's float64
# (a jump of `%`, `//` or `where` flipped by rounding, tan's poles, exp's overflow, a division
# near zero, a large power): kernels whose spec holds any of it compile but are not run. The
# decays of the linear templates are tame (their gates are small), hence the exceptions.
UNTAME = re.compile(r"%|/|\bwhere\b|\btan\(|\bexp2?\((?!g\)|gk\[i\]\)|-abs\(g\)\)|-0\.5\))"
                    r"|\blog\(|\bsqrt\(|\*\*(?!\s*[23]\b)")
TOKEN = re.compile(r"\s+|#[^\n]*|\d+\.\d*(?:[eE][-+]?\d+)?|\d+(?:[eE][-+]?\d+)?|\w+|\*\*|//"
                   r"|<=|>=|==|!=|.", re.S)


# --- generation ---------------------------------------------------------------------------------

@dataclass
class Scope:
    """What an expression may read: numbers (leaves), conditions, and whether dot(q, k)."""

    numbers: list[str]
    conditions: list[str] = field(default_factory=lambda: ["true"])
    dot: bool = False
    integers: tuple[str, ...] = ("m", "n", "h", "b", "M", "N")


class Expressions:
    """Random expressions of the grammar's `expr` rule, typed as the lowering types them.

    Conditions compare integer expressions (positions, heads, integer options: what masks are
    made of) with the integer operators and functions; numbers take every operator and
    function. (A condition over transcendental functions, `2 ** m > clamp(m, n, h)`, is legal
    but keeps the mask analysis busy for many seconds: a finding reported, not fuzzed.)"""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def number(self, scope: Scope, depth: int) -> str:
        rng = self.rng
        if depth <= 0 or rng.random() < 0.25:
            return self.leaf(scope)
        form = rng.choice(("binary", "binary", "binary", "unary", "call", "call", "power",
                           "paren", "where", "clamp", "extremum"))
        sub = lambda: self.number(scope, depth - 1)  # noqa: E731
        if form == "call":
            return f"{rng.choice(FUNCTIONS)}({sub()})"
        if form == "power":
            exponent = rng.choice(("2", "3", "0.5", "-1", "n", "h"))
            return f"({sub()}) ** {exponent}" if rng.random() < 0.7 else f"2 ** ({sub()})"
        if form == "where":
            return f"where({self.condition(scope, depth - 1)}, {sub()}, {sub()})"
        return self.shared(form, sub)

    def integer(self, scope: Scope, depth: int) -> str:
        rng = self.rng
        if depth <= 0 or rng.random() < 0.3:
            return str(rng.randint(0, 9)) if rng.random() < 0.3 else rng.choice(scope.numbers)
        form = rng.choice(("binary", "binary", "unary", "paren", "clamp", "extremum", "abs",
                           "square"))
        sub = lambda: self.integer(scope, depth - 1)  # noqa: E731
        if form == "abs":
            return f"abs({sub()})"
        if form == "square":
            return f"({sub()}) ** 2"
        return self.shared(form, sub, ("+", "-", "*", "//", "%"))

    def shared(self, form: str, sub: Callable[[], str], ops: tuple[str, ...] = BINARY) -> str:
        """The forms numbers and integers share."""
        rng = self.rng
        if form == "binary":
            return f"{sub()} {rng.choice(ops)} {sub()}"
        if form == "unary":
            return rng.choice(("-", "+")) + sub()
        if form == "paren":
            return f"({sub()})"
        if form == "clamp":
            return f"clamp({sub()}, {sub()}, {sub()})"
        args = ", ".join(sub() for _ in range(rng.randint(2, 3)))
        return f"{rng.choice(('min', 'max'))}({args})"

    def leaf(self, scope: Scope) -> str:
        rng = self.rng
        pick = rng.random()
        if pick < 0.15:
            return str(rng.randint(0, 9))
        if pick < 0.25:
            return rng.choice(("0.5", "1.5", "2.0", "1e-3", "3.25", ".5", "1e2"))
        if scope.dot and pick < 0.45:
            return "dot(q, k)"
        return rng.choice(scope.numbers)

    def condition(self, scope: Scope, depth: int) -> str:
        rng = self.rng
        if depth <= 0 or rng.random() < 0.35:
            if rng.random() < 0.15:
                return rng.choice(scope.conditions)
            integer = Scope(numbers=[x for x in scope.numbers if x in scope.integers] or ["n"])
            return (f"{self.integer(integer, 1)} {rng.choice(COMPARE)} "
                    f"{self.integer(integer, 1)}")
        form = rng.choice(("and", "or", "not", "paren"))
        sub = lambda: self.condition(scope, depth - 1)  # noqa: E731
        if form == "not":
            return f"not {sub()}"
        if form == "paren":
            return f"({sub()})"
        return f"{sub()} {form} {sub()}"


class Blocks:
    """Random blocks of each kind; every declared name is read (the lowering refuses a
    declaration nothing reads)."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.expr = Expressions(rng)

    def options(self, count: int) -> tuple[list[str], list[str], str]:
        """(names, the integer ones, the statement)."""
        names = [f"w{i}" for i in range(count)]
        values = [str(self.rng.randint(1, 8)) if self.rng.random() < 0.6
                  else self.rng.choice(("0.5", "2.5", "1e-2", "-1")) for _ in names]
        text = "  option " + ", ".join(f"{n} = {v}" for n, v in zip(names, values)) + "\n"
        integers = [n for n, v in zip(names, values) if "." not in v and "e" not in v]
        return names, integers, (text if names else "")

    def attention(self, depth: int) -> str:
        text, scope = self._attention_declarations()
        read = []  # the expressions' text, to find what nothing reads yet
        for i in range(self.rng.randint(0, 2)):
            read.append(self.expr.number(scope, depth))
            text += f"  let l{i} = {read[-1]}\n"
            scope.numbers = scope.numbers + [f"l{i}"]
        score = self.expr.number(scope, depth)
        scope.dot = False
        mask = self.expr.condition(scope, depth) if self.rng.random() < 0.6 else None
        read += [score, mask or ""]
        unread = [x for x in scope.numbers[7:]
                  if not re.search(rf"\b{re.escape(x)}", " ".join(read))]
        score += "".join(f" + 0.5 * {x}" for x in unread)
        if len(scope.conditions) > 1 and scope.conditions[1] not in " ".join(read):
            mask = " and ".join(c for c in (mask, scope.conditions[1]) if c)
        text += f"  score = {score}\n" + (f"  mask = {mask}\n" if mask else "")
        if self.rng.random() < 0.2:
            text += "  normalize = softmax\n"
        return f"attention fuzz {{\n{text}}}\n"

    def _attention_declarations(self) -> tuple[str, Scope]:
        """Options, params and inputs, and the scope that reads them (the first seven
        numbers are the language's own)."""
        rng = self.rng
        options, integers, text = self.options(rng.randint(0, 2))
        numbers = ["m", "n", "h", "b", "M", "N", "scale"] + options
        if rng.random() < 0.4:
            text += "  param s[h]\n"
            numbers.append("s[h]")
        if rng.random() < 0.25:
            text += "  option R = 3\n  param bias[h, 2 * R + 1]\n"
            numbers.append("bias[h, clamp(n - m, -R, R) + R]")
        conditions = ["true"]
        if rng.random() < 0.25:
            text += "  input doc[b, n]\n"
            conditions.append("doc[b, n] == doc[b, m]")
        return text, Scope(numbers=numbers, conditions=conditions, dot=True,
                           integers=Scope.integers + tuple(integers))

    def linear(self, depth: int) -> str:
        rng = self.rng
        options, _, text = self.options(rng.randint(0, 1))
        gate, decay = self._gate()
        text += gate
        delta = rng.random() < 0.3
        scalars = ["h", "t", "DK", "DV", "scale"] + options
        if delta or rng.random() < 0.3:
            text += "  input beta[b, h, t]\n"
            scalars.append("beta")
        coef = self.expr.number(Scope(numbers=scalars), depth)
        coef += "".join(f" + 0 * {x}" for x in scalars[5:] if not re.search(rf"\b{x}\b", coef))
        text += "  state S[i, j]\n"
        if delta:
            text += (f"  S[i, j] = {decay} * S[i, j] + beta * k[i] * (v[j] - {decay} * "
                     f"sum(i) k[i] * S[i, j]) + 0 * ({coef})\n")
        else:
            text += f"  S[i, j] = {decay} * S[i, j] + ({coef}) * k[i] * v[j]\n"
        text += rng.choice(("  o[j] = sum(i) q[i] * scale * S[i, j]\n",
                            "  o[j] = sum(i) q[i] * S[i, j]\n"))
        return f"linear fuzz {{\n{text}}}\n"

    def _gate(self) -> tuple[str, str]:
        """A gate's declaration and the state's decay: per step, per key feature, or none."""
        rng = self.rng
        gate = rng.choice(("g", "gk", None))
        if gate == "g":
            return "  input g[b, h, t]\n", rng.choice(("exp(g)", "sigmoid(g)", "exp(-abs(g))"))
        if gate == "gk":
            return "  input gk[b, h, t, i]\n", "exp(gk[i])"
        return "", rng.choice(("1", "0.9", "exp(-0.5)", "sigmoid(h + 1)"))

    def cascade(self, depth: int) -> str:
        """The 3-pass softmax cascade, or one of its relatives the passes refuse with a
        CompileError (no max, another normalizer, no softmax at all)."""
        rng = self.rng
        scale = rng.choice(("", " * 0.125", " / 2"))
        lines = [f"QK[m, n] = Q[m, e] * K[n, e]{scale}", "GM[m] = max(n) QK[m, n]",
                 "SN[m, n] = exp(QK[m, n] - GM[m])", "SD[m] = sum(n) SN[m, n]",
                 "A[m, n] = SN[m, n] / SD[m]", "AV[m, f] = sum(n) A[m, n] * V[n, f]"]
        form = rng.choice(("softmax", "softmax", "no max", "tanh", "unnormalized", "linear"))
        if form == "no max":
            lines[1:3] = ["SN[m, n] = exp(QK[m, n])"]
        elif form == "tanh":
            lines[2] = "SN[m, n] = tanh(QK[m, n] - GM[m])"
        elif form == "unnormalized":
            lines[3:] = ["AV[m, f] = sum(n) SN[m, n] * V[n, f]"]
        elif form == "linear":
            lines[1:] = ["AV[m, f] = sum(n) QK[m, n] * V[n, f]"]
        return "cascade fuzz {\n" + "".join(f"  {line}\n" for line in lines) + "}\n"


# --- mutation -----------------------------------------------------------------------------------

@dataclass
class Case:
    text: str
    data: bytes | None = None            # the spec as bytes that are no UTF-8, read from a file
    options: dict = field(default_factory=dict)
    how: str = "generated"


class Mutations:
    """Damage to a valid spec, each returning the new case."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.all: tuple[Callable[[Case], Case], ...] = (
            self.delete, self.insert, self.repeat, self.swap, self.bad_constant,
            self.bad_constant, self.deep, self.chain, self.odd_text, self.bad_bytes,
            self.override)

    def _tokens(self, case: Case) -> list[str]:
        return TOKEN.findall(case.text)

    def _with(self, case: Case, tokens: list[str], how: str) -> Case:
        return Case("".join(tokens), None, dict(case.options), how)

    def _pick(self, tokens: list[str], pattern: str = r"\S") -> int:
        spots = [i for i, t in enumerate(tokens) if re.fullmatch(pattern, t)] or [0]
        return self.rng.choice(spots)

    def delete(self, case: Case) -> Case:
        tokens = self._tokens(case)
        del tokens[self._pick(tokens, r"\S+")]
        return self._with(case, tokens, "delete")

    def insert(self, case: Case) -> Case:
        tokens = self._tokens(case)
        tokens.insert(self.rng.randrange(len(tokens) + 1), f" {self.rng.choice(TOKENS)} ")
        return self._with(case, tokens, "insert")

    def repeat(self, case: Case) -> Case:
        tokens = self._tokens(case)
        i = self._pick(tokens, r"\S+")
        tokens.insert(i, tokens[i] + " ")
        return self._with(case, tokens, "repeat")

    def swap(self, case: Case) -> Case:
        tokens = self._tokens(case)
        i = self._pick(tokens, r"\S+")
        j = min(i + 2, len(tokens) - 1)
        tokens[i], tokens[j] = tokens[j], tokens[i]
        return self._with(case, tokens, "swap")

    def bad_constant(self, case: Case) -> Case:
        tokens = self._tokens(case)
        i = self._pick(tokens, r"\d+(\.\d*)?|[mnht]")
        tokens[i] = self.rng.choice(BAD_CONSTANTS)
        return self._with(case, tokens, "bad constant")

    def deep(self, case: Case) -> Case:
        """Nest a number or a name: past the limits (refused at once), or a little. (Nesting
        within the limits but deeper than a few calls is legal, and slow in two passes: a
        linear update's chunk_scan simplifies for minutes at a dozen nested calls, a mask's
        analysis takes many seconds with tens; reported, so not fuzzed.)"""
        tokens = self._tokens(case)
        i = self._pick(tokens, r"\d+(\.\d*)?|[mnh]")
        k = self.rng.choice((4, 150, 3000))
        tokens[i] = self.rng.choice(("-" * k + tokens[i], "(" * k + tokens[i] + ")" * k,
                                     "tanh(" * k + tokens[i] + ")" * k,
                                     "abs(" * k + tokens[i] + ")" * k))
        return self._with(case, tokens, f"deep {k}")

    def chain(self, case: Case) -> Case:
        tokens = self._tokens(case)
        i = self._pick(tokens, r"\d+(\.\d*)?|[mnh]")
        k = self.rng.choice((40, 120, 30000))
        op = self.rng.choice((" + ", " * ", " - "))
        tokens[i] = "(" + op.join([tokens[i]] * k) + ")"
        return self._with(case, tokens, f"chain {k}")

    def odd_text(self, case: Case) -> Case:
        tokens = self._tokens(case)
        tokens.insert(self.rng.randrange(len(tokens) + 1), self.rng.choice(ODD_TEXT))
        return self._with(case, tokens, "odd text")

    def bad_bytes(self, case: Case) -> Case:
        data = case.text.encode("utf-8", "surrogatepass")  # an odd_text surrogate stays bad
        at = self.rng.randrange(len(data) + 1)
        return Case(case.text, data[:at] + self.rng.choice(BAD_BYTES) + data[at:],
                    dict(case.options), "bad bytes")

    def override(self, case: Case) -> Case:
        names = re.findall(r"\b(w\d|R)\s*=", case.text) or ["w0"]
        options = {self.rng.choice(names): self.rng.choice(OVERRIDE_VALUES)}
        return Case(case.text, case.data, options, "override")


def cases(seed: int, count: int, depth: int = 2) -> Iterator[Case]:
    """`count` cases: a fifth valid specs, the rest mutated (some more than once), with
    expressions nested up to `depth` operators deep before mutation."""
    rng = random.Random(seed)
    blocks, mutations = Blocks(rng), Mutations(rng)
    for _ in range(count):
        kind = rng.choices((blocks.attention, blocks.linear, blocks.cascade), (6, 3, 1))[0]
        case = Case(kind(rng.randint(1, depth)))
        for _ in range(rng.choice((0, 1, 1, 1, 2))):
            case = rng.choice(mutations.all)(case)
        yield case


# --- the invariant ------------------------------------------------------------------------------

class TookTooLong(Exception):
    pass


@contextmanager
def time_limit(seconds: float):
    def expire(signum, frame):
        raise TookTooLong(f"no answer within {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Outcome:
    kernel: object = None
    error: Exception | None = None


def compile_case(case: Case, tmp_path) -> Outcome:
    """Compile a case, checking the invariant; the kernel or the accepted error."""
    spec: object = case.text
    if case.data is not None:
        path = tmp_path / "case.attn"
        path.write_bytes(case.data)
        spec = path
    try:
        with time_limit(SECONDS_PER_CASE):
            return Outcome(kernel=attnc.compile(spec, **case.options))
    except CompileError as err:
        assert err.message.strip(), describe(case, err)
        return Outcome(error=err)
    except SpecError as err:
        located = err.line >= 1 and str(err).startswith(f"{err.filename}:{err.line}:")
        about_override = any(name in err.message for name in case.options)
        assert located or about_override, describe(case, err)
        return Outcome(error=err)
    except ValueError as err:
        # the caller's own arguments (an option given as a keyword) may be refused unlocated
        assert any(name in str(err) for name in case.options), describe(case, err)
        return Outcome(error=err)
    except Exception as err:  # the invariant's breach: any other exception fails the case
        raise AssertionError(describe(case, err)) from err


def describe(case: Case, err: BaseException) -> str:
    shown = case.text if len(case.text) < 1500 else case.text[:1500] + "..."
    return (f"{case.how} case, options {case.options}, raised {type(err).__name__}: "
            f"{str(err)[:600]}\n--- spec ---\n{shown}")


# --- running what compiled ----------------------------------------------------------------------

def run_attention(kernel, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 1, 16, 16, generator=g) for _ in range(3))
    inputs = testing.random_inputs(kernel, 1, 1, 16, 16, "cpu", g)
    out = kernel(q, k, v, **inputs)
    floats = {n: (t.double() if t.is_floating_point() else t) for n, t in inputs.items()}
    ref = interpret(dict(kernel._trail)["autodiff"], q.double(), k.double(), v.double(),
                    scale=0.25, inputs=floats)["out"]
    assert_matches(out, ref, kernel.source)


def run_linear(kernel, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 1, 16, 16, generator=g) for _ in range(3))
    inputs = testing.random_linear_inputs(kernel, 1, 1, 16, 16, 16, generator=g)
    out = kernel(q, k, v, **inputs)
    ref, _ = interpret_scan(kernel.scan, q.double(), k.double(), v.double(),
                            {n: t.double() for n, t in inputs.items()})
    assert_matches(out, ref, kernel.source)


def assert_matches(out: torch.Tensor, ref: torch.Tensor, source: str) -> None:
    """Where the reference is finite the kernel's output is finite and close to it."""
    finite = torch.isfinite(ref)
    got = out.detach().double()[finite]
    assert torch.isfinite(got).all(), source[:2000]
    want = ref[finite]
    error = (got - want).norm() / max(want.norm().item(), 1.0)
    assert error <= 1e-2, f"relative error {error:.3g}\n{source[:2000]}"


def fuzz(seed: int, count: int, runs: int, tmp_path, depth: int = 2) -> dict[str, int]:
    """Check `count` cases, running `runs` of the kernels that compile; returns a tally. Every
    breach of the invariant is collected, so one failing run lists them all."""
    tally = {"compiled": 0, "spec errors": 0, "compile errors": 0, "other errors": 0,
             "ran": 0}
    breaches: list[str] = []
    for i, case in enumerate(cases(seed, count, depth)):
        try:
            outcome = compile_case(case, tmp_path)
            if outcome.kernel is not None and tally["ran"] < runs:
                tally["ran"] += run_compiled(outcome.kernel, case, seed + i)
        except AssertionError as err:
            breaches.append(str(err))
            continue
        err = outcome.error
        tally["compiled" if err is None else "compile errors" if isinstance(err, CompileError)
              else "spec errors" if isinstance(err, SpecError) else "other errors"] += 1
    assert not breaches, (f"{len(breaches)} of {count} cases broke the invariant:\n\n"
                          + "\n\n".join(breaches))
    return tally


def run_compiled(kernel, case: Case, seed: int) -> int:
    """Run a compiled kernel; 1 when it ran, 0 when its spec is not tame (UNTAME) or the call
    refused its random inputs (an index out of range for the tiny shapes is the caller's
    error, reported as a ValueError)."""
    if UNTAME.search(case.text):
        return 0
    runner = run_linear if isinstance(kernel, attnc.LinearKernel) else run_attention
    try:
        with time_limit(6 * SECONDS_PER_CASE):
            runner(kernel, seed)
    except ValueError:
        return 0
    except RuntimeError as err:
        # an integer `//` or `%` by a value that is zero at run time (`n // h` for head 0):
        # the interpreter raises, as torch does; the spec asked for it
        if "ZeroDivisionError" not in str(err):
            raise
        return 0
    except AssertionError as err:
        raise AssertionError(f"{err}\n--- spec ---\n{case.text}") from None
    return 1


# --- the tests ----------------------------------------------------------------------------------

def test_the_generator_mostly_makes_specs_that_compile(tmp_path):
    """The valid specs are valid: otherwise the fuzzer would test little but the parser."""
    rng = random.Random(11)
    blocks = Blocks(rng)
    made = [kind(2) for kind in (blocks.attention, blocks.linear, blocks.cascade)
            for _ in range(6)]
    compiled = sum(compile_case(Case(text), tmp_path).kernel is not None for text in made)
    assert compiled >= 0.6 * len(made)


def test_mutations_reach_every_limit(tmp_path):
    """Deep nesting, long chains, huge numbers and bad bytes each occur in a run and are
    refused where expected."""
    text = Blocks(random.Random(3)).attention(1)
    for make, message in (
            (lambda c: Case(c.text.replace("score = ", "score = " + "-" * 500)), "nests"),
            (lambda c: Case(c.text.replace("score = ", "score = 1" + " + 1" * 30000 + " + ")),
             "longer than"),
            (lambda c: Case(c.text.replace("score = ", "score = 1e999 * ")), "out of range"),
            (lambda c: Case(c.text, c.text.encode().replace(b"score", b"sc\xffore")),
             "not valid UTF-8")):
        outcome = compile_case(make(Case(text)), tmp_path)
        assert isinstance(outcome.error, SpecError) and message in str(outcome.error)


def test_fuzz(tmp_path):
    """A few hundred cases under a minute: compile each, run a handful."""
    tally = fuzz(seed=2024, count=250, runs=6, tmp_path=tmp_path)
    assert tally["ran"] >= 5, tally
    assert tally["compiled"] >= 30 and tally["spec errors"] >= 100, tally


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(5))
def test_fuzz_more(tmp_path, seed):
    fuzz(seed=seed, count=1000, runs=20, tmp_path=tmp_path)
