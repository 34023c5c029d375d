"""Derivatives in closed form, for both families' backward passes.

`derivative` differentiates an expression in one access with sympy; kinks become Piecewise
expressions (Heaviside and sign never reach a backend), and an expression sympy cannot
differentiate in closed form raises `NotDifferentiable`. The functions with heads of their own
get their derivatives from the op table (attnc.expr.functions).

At a kink the value chosen is torch autograd's, so kernels and eager references agree on exact
ties: min and max split the gradient evenly among the arguments that attain the extremum
(torch.maximum gives 1/2 to each of two equal arguments, amax divides evenly), |u| has
derivative sign(u) u' (0 at 0, and real also where sympy cannot prove u real). relu and clamp
carry their own conventions in the Piecewise forms the op table builds for them.
"""

from __future__ import annotations

import sympy


class NotDifferentiable(ValueError):
    """sympy leaves a derivative unevaluated, or it reads floor or modulo."""


def _step(x, at_zero=sympy.S.Half):
    return sympy.Piecewise((1, x > 0), (at_zero, sympy.Eq(x, 0)), (0, True))


def _sign(x):
    return sympy.Piecewise((1, x > 0), (-1, x < 0), (0, True))


def closed_form(d: sympy.Expr) -> sympy.Expr:
    """Heaviside and sign as Piecewise, so backends need no new functions. Heaviside keeps its
    value at 0 (sympy's default 1/2)."""
    return d.replace(sympy.Heaviside, _step).replace(sympy.sign, _sign)


class _Extremum(sympy.Function):
    """min or max while it is differentiated: sympy's own Min/Max derivative is a Heaviside of
    the difference to the others, which counts a three-way tie three times; here the gradient
    is shared evenly by the arguments that attain the extremum."""

    largest: bool = True
    plain: type = sympy.Max

    def fdiff(self, argindex=1):
        args = [_plain(a) for a in self.args]
        a = args[argindex - 1]
        if len(args) == 2:
            b = args[2 - argindex]
            wins = a > b if self.largest else a < b
            return sympy.Piecewise((1, wins), (sympy.S.Half, sympy.Eq(a, b)), (0, True))
        top = self.plain(*args)
        ties = sympy.Add(*(sympy.Piecewise((1, sympy.Eq(x, top)), (0, True)) for x in args))
        return sympy.Piecewise((1 / ties, sympy.Eq(a, top)), (0, True))


class _Largest(_Extremum):
    largest, plain = True, sympy.Max


class _Smallest(_Extremum):
    largest, plain = False, sympy.Min


class _Magnitude(sympy.Function):
    """|u| while it is differentiated, with torch's derivative sign(u) u'. sympy's own treats
    an argument it cannot prove real (sqrt(x), log(x) of a real x) as complex and answers with
    re, im and atan2; every value a kernel computes is real (NaN where torch's is)."""

    def fdiff(self, argindex=1):
        return _sign(_plain(self.args[0]))


def _plain(ex: sympy.Expr) -> sympy.Expr:
    """The stand-ins back to sympy's Min, Max and Abs."""
    return ex.replace(_Largest, sympy.Max).replace(_Smallest, sympy.Min).replace(
        _Magnitude, sympy.Abs)


def _stand_ins(ex: sympy.Expr, wrt: sympy.Expr) -> sympy.Expr:
    """Every Min, Max and Abs that reads `wrt` as its stand-in with torch's derivative."""
    def swap(e):
        if isinstance(e, sympy.Abs):
            return _Magnitude(e.args[0])
        return (_Largest if isinstance(e, sympy.Max) else _Smallest)(*e.args)
    return ex.replace(lambda e: isinstance(e, (sympy.Min, sympy.Max, sympy.Abs)) and e.has(wrt),
                      swap)


def diff(ex: sympy.Expr, wrt: sympy.Expr) -> sympy.Expr:
    """sympy.diff with torch's values at kinks, in closed form (`wrt` a symbol)."""
    return closed_form(_plain(sympy.diff(_stand_ins(ex, wrt), wrt)))


def derivative(ex: sympy.Expr, wrt: sympy.Expr) -> sympy.Expr:
    """d ex / d wrt for an access (or symbol) `wrt`, in closed form. Raises NotDifferentiable
    if sympy leaves a Derivative behind."""
    x = sympy.Dummy("x", real=True)
    d = diff(ex.xreplace({wrt: x}), x).xreplace({x: wrt})
    if d.has(sympy.Derivative, sympy.Subs, sympy.DiracDelta):
        raise NotDifferentiable(f"sympy leaves d({ex})/d({wrt}) unevaluated")
    return d


def _vjp_clean(d: sympy.Expr) -> sympy.Expr:
    # floor and modulo of a differentiated value stay behind as Derivative; of positions
    # (t % 4 == 0) they are constants, and the kernels print them on integers
    if d.has(sympy.Derivative, sympy.Subs, sympy.DiracDelta):
        raise NotDifferentiable(f"cannot differentiate through {d}")
    return d


def fresh_symbol(name: str, taken: set[str]) -> sympy.Symbol:
    """A real symbol called `name` (underscores appended while the name is in `taken`, which it
    joins): never the same symbol as one of an expression's own."""
    while name in taken:
        name += "_"
    taken.add(name)
    return sympy.Symbol(name, real=True)


def symbol_names(*exprs: sympy.Expr) -> set[str]:
    """The names of the symbols and tensors `exprs` read."""
    found: set[str] = set()
    for ex in exprs:
        found |= {str(s) for s in ex.free_symbols} | {str(a.base)
                                                      for a in ex.atoms(sympy.Indexed)}
    return found


def vjp_parts(expr: sympy.Expr, atoms: set, tag: int, taken: set[str] | None = None
              ) -> list[tuple[sympy.Expr, sympy.Expr, sympy.Sum | None]]:
    """The pieces of a vector-Jacobian product of an element-form expression (a scan's update
    or output): each outermost `sum(i) body` is hidden behind a placeholder symbol `_z<k>_<tag>`
    (a name not in `taken`, default the expression's own names);
    for every atom of the result (one of `atoms`: an access or a per-step symbol, or a
    placeholder) returns (atom, d expr / d atom, the placeholder's Sum or None), sorted. The
    derivative may read placeholders again: they are printed as their sums. Raises
    NotDifferentiable for floor or modulo of a differentiated value and for derivatives sympy
    leaves unevaluated."""
    sums: dict[sympy.Symbol, sympy.Sum] = {}
    taken = symbol_names(expr) if taken is None else taken

    def hide(e):
        if isinstance(e, sympy.Sum):
            z = fresh_symbol(f"_z{len(sums)}_{tag}", taken)
            sums[z] = e
            return z
        if e.args and not isinstance(e, sympy.Indexed):
            return e.func(*(hide(a) for a in e.args))
        return e

    flat = hide(expr)
    found = [a for a in flat.atoms(sympy.Indexed, sympy.Symbol) if a in sums or a in atoms]
    stand = {a: sympy.Dummy(str(a)) for a in found}
    plain = flat.xreplace(stand)
    back = {v: k for k, v in stand.items()}
    parts = []
    for atom in sorted(found, key=sympy.default_sort_key):
        d = _vjp_clean(diff(plain, stand[atom]).xreplace(back).xreplace(sums))
        parts.append((atom, d, sums.get(atom)))
    return parts


def vjp_obstacle(exprs: list[sympy.Expr], atoms: set) -> str | None:
    """Why the vector-Jacobian products of `exprs` (and of every sum inside them, recursively)
    cannot be derived in closed form, or None when they can."""
    todo = list(exprs)
    try:
        while todo:
            for _, d, body in vjp_parts(todo.pop(), atoms, 0):
                if body is not None and d != 0:
                    todo.append(body.args[0])
    except NotDifferentiable as why:
        return str(why)
    return None
