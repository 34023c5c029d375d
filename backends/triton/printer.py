"""Print sympy expressions as Triton expressions.

Functions come from the op table (attnc.expr.functions: each head's `triton` spelling and the
helper it needs); the rest is sympy's core algebra. `names` maps symbols to Triton text
(m -> "offs_m[:, None]" inside a tile, "m_lo" stays itself in scalar bound expressions).
Integer floor division and modulo go through helpers that are correct whether the backend's
`//` truncates (compiled Triton) or floors (the interpreter). Helpers a printed expression
needs are collected in `helpers` so the code generator emits only those.

`tiled` names the symbols that are tensors inside a tile. A conjunction that mixes a scalar
condition (say `p[h] > 1`) with tile conditions is printed as `tl.where(scalar, tile, False)`:
compiled Triton accepts `scalar & tile`, but Triton's interpreter rejects it.
"""

from __future__ import annotations

import math

import sympy
from sympy.logic.boolalg import BooleanFunction

from attnc.expr.functions import BY_HEAD, FUNCTIONS, helper_name
from attnc.expr.symbols import integral_relation

_REL = {sympy.Lt: "<", sympy.Le: "<=", sympy.Gt: ">", sympy.Ge: ">=", sympy.Eq: "==",
        sympy.Ne: "!="}

# Helpers of sympy's core algebra; the op table's functions bring their own (`Function.helper`).
_CORE_HELPERS = {
    "_floor_div": '''@triton.jit
def _floor_div(a, b):
    # floor(a / b) whether `//` truncates (compiled) or floors (interpreter)
    q = a // b
    r = a - q * b
    return q - ((r != 0) & ((r < 0) != (b < 0))).to(q.dtype)
''',
    "_floor_mod": '''@triton.jit
def _floor_mod(a, b):
    return a - _floor_div(a, b) * b
''',
}
_POW = '''@triton.jit
def _pow(x, y):
    return tl.exp2(y * tl.log2(x))
'''
_IPOW = '''@triton.jit
def _ipow(x, n):
    # x ** n for an integer n that is no constant (x ** h): a negative x is fine, as in torch;
    # the magnitude through exp2, negated for odd n; x ** 0 is 1, also for x == 0
    r = tl.exp2(n * tl.log2(tl.abs(x)))
    r = tl.where(n == 0, 1.0, r)
    return tl.where((x < 0) & (n % 2 != 0), -r, r)
'''
# Every helper's source by name, in the order generated modules list them.
HELPERS = {**_CORE_HELPERS, **{helper_name(f): f.helper for f in FUNCTIONS if f.helper},
           "_pow": _POW, "_ipow": _IPOW}
HELPER_DEPS = {"_floor_mod": ("_floor_div",)}


class TritonPrinter:
    def __init__(self, names: dict, tiled: frozenset = frozenset()):
        self.names = names
        self.tiled = tiled
        self.helpers: set[str] = set()

    def use(self, helper: str) -> str:
        self.helpers.add(helper)
        self.helpers.update(HELPER_DEPS.get(helper, ()))
        return helper

    def __call__(self, ex) -> str:
        return self.p(sympy.sympify(ex))

    def p(self, ex) -> str:
        if ex is sympy.true:
            return "True"
        if ex is sympy.false:
            return "False"
        if ex in self.names:
            return self.names[ex]
        if ex.is_Symbol:
            return ex.name
        if ex == sympy.oo:
            return 'float("inf")'
        if ex == -sympy.oo:
            return 'float("-inf")'
        if ex.is_Integer:
            return str(int(ex))
        if ex.is_Rational:
            return repr(float(ex))
        if ex.is_Float:
            return repr(float(ex))
        if ex.is_Add:
            terms = sympy.Add.make_args(ex)
            text = self.p(terms[0])
            for t in terms[1:]:
                coeff, rest = t.as_coeff_Mul()
                if coeff.is_Number and coeff < 0:
                    text += f" - {self._wrap(-t)}"
                else:
                    text += f" + {self._wrap(t)}"
            return f"({text})"
        if ex.is_Mul:
            return self._mul(ex)
        if ex.is_Pow:
            return self._pow(ex)
        if isinstance(ex, (sympy.floor, sympy.ceiling, sympy.Mod)) and not all(
                a.is_integer for a in (ex.args if isinstance(ex, sympy.Mod)
                                       else ex.args[0].as_numer_denom())):
            return self._float_rounding(ex)
        if isinstance(ex, sympy.floor):
            num, den = ex.args[0].as_numer_denom()
            return f"{self.use('_floor_div')}({self.p(num)}, {self.p(den)})"
        if isinstance(ex, sympy.ceiling):
            num, den = ex.args[0].as_numer_denom()
            return f"(-{self.use('_floor_div')}({self.p(-num)}, {self.p(den)}))"
        if isinstance(ex, sympy.Mod):
            return f"{self.use('_floor_mod')}({self.p(ex.args[0])}, {self.p(ex.args[1])})"
        if isinstance(ex, (sympy.Min, sympy.Max)):
            fn = "tl.minimum" if isinstance(ex, sympy.Min) else "tl.maximum"
            args = sorted(ex.args, key=sympy.default_sort_key)
            text = self.p(args[-1])
            for a in reversed(args[:-1]):
                text = f"{fn}({self.p(a)}, {text})"
            return text
        if isinstance(ex, sympy.Piecewise):
            text = self.p(ex.args[-1][0])
            for value, cond in reversed(ex.args[:-1]):
                text = f"tl.where({self.p(cond)}, {self.p(value)}, {text})"
            return text
        if ex.func in _REL:
            ex = integral_relation(ex)
            return f"({self.p(ex.lhs)} {_REL[ex.func]} {self.p(ex.rhs)})"
        if isinstance(ex, (sympy.And, sympy.Or)):
            return self._logic(ex)
        if isinstance(ex, sympy.Not):
            return f"(~{self.p(ex.args[0])})"
        if isinstance(ex, sympy.ITE):  # sympy's form of a comparison of a Piecewise
            cond, yes, no = ex.args
            return f"tl.where({self.p(cond)}, {self.p(yes)}, {self.p(no)})"
        if isinstance(ex, BooleanFunction):  # Xor, Implies, Equivalent, Nand, Nor
            return self.p(sympy.to_nnf(ex, simplify=False))
        if ex.func in BY_HEAD:  # the op table's functions (attnc.expr.functions)
            entry = BY_HEAD[ex.func]
            if entry.helper is not None:
                self.use(helper_name(entry))
            assert entry.triton is not None
            return entry.triton.format(x=self._float(ex.args[0]))
        raise NotImplementedError(f"no Triton spelling for {ex.func.__name__} in {ex}")

    def _float_rounding(self, ex) -> str:
        """floor, ceiling and modulo of a real (a param, say): Triton's `//` and `%` take
        integers only, so these go through tl.floor."""
        if isinstance(ex, sympy.Mod):
            a, b = (self._float(x) for x in ex.args)
            return f"({a} - {b} * tl.floor({a} / {b}))"
        x = self._float(ex.args[0])
        return f"tl.floor({x})" if isinstance(ex, sympy.floor) else f"(-tl.floor(-{x}))"

    def _float(self, ex) -> str:
        """An argument of a float function: Triton's math functions refuse integers (tan(b))."""
        if ex.is_Number:
            return repr(float(ex))
        text = self.p(ex)
        return f"({text}).to(tl.float32)" if ex.is_integer else text

    def _logic(self, ex) -> str:
        conj = isinstance(ex, sympy.And)
        args = sorted(ex.args, key=sympy.default_sort_key)
        tile = [a for a in args if a.free_symbols & self.tiled]
        scalar = [a for a in args if not a.free_symbols & self.tiled]
        if tile and scalar:
            s, t = self.p(ex.func(*scalar)), self.p(ex.func(*tile))
            return f"tl.where({s}, {t}, False)" if conj else f"tl.where({s}, True, {t})"
        op = " & " if conj else " | "
        return "(" + op.join(self.p(a) for a in args) + ")"

    def _wrap(self, ex) -> str:
        return self.p(ex)

    def _mul(self, ex) -> str:
        coeff, rest = ex.as_coeff_Mul()
        if coeff == -1:
            return f"(-{self.p(rest)})"
        num, den = [], []
        for f in sympy.Mul.make_args(ex):
            if f.is_Pow and f.exp.is_Number and f.exp < 0:
                den.append(f.base if f.exp == -1 else f.base ** -f.exp)
            elif f.is_Rational and not f.is_Integer:
                num.append(f)
            else:
                num.append(f)
        text = " * ".join(self.p(f) for f in num) if num else "1.0"
        for d in den:
            text = f"{text} / {self.p(d)}"
        return f"({text})"

    def _pow(self, ex) -> str:
        base, exp = ex.args
        if base.is_Number and base.is_positive and not exp.is_Number:
            # c**x = exp2(x * log2(c)), e.g. FlexAttention's ALiBi slopes torch.exp2(...)
            factor = "" if base == 2 else f" * {math.log2(float(base))!r}"
            return f"tl.exp2({self._float(exp)}{factor})"
        if exp == sympy.Rational(1, 2):
            return f"tl.sqrt({self._float(base)})"
        if exp == -1:
            return f"(1.0 / {self.p(base)})"
        if exp.is_Integer and 0 < exp <= 4:
            b = self.p(base)
            return "(" + " * ".join([b] * int(exp)) + ")"
        if exp.is_Integer and -4 <= exp < 0:
            b = self.p(base)
            return "(1.0 / (" + " * ".join([b] * int(-exp)) + "))"
        if exp.is_integer:
            return f"{self.use('_ipow')}({self._float(base)}, {self.p(exp)})"
        return f"{self.use('_pow')}({self._float(base)}, {self._float(exp)})"
