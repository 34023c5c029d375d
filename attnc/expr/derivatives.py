"""Derivatives in closed form, for both families' backward passes.

`derivative` differentiates an expression in one access with sympy; kinks become Piecewise
expressions (Heaviside and sign never reach a backend), and an expression sympy cannot
differentiate in closed form raises `NotDifferentiable`. The functions with heads of their own
get their derivatives from the op table (attnc.expr.functions).
"""

from __future__ import annotations

import sympy


class NotDifferentiable(ValueError):
    """sympy leaves a derivative unevaluated, or it reads floor or modulo."""


def _step(x):
    return sympy.Piecewise((1, x > 0), (0, True))


def _sign(x):
    return sympy.Piecewise((1, x > 0), (-1, x < 0), (0, True))


def closed_form(d: sympy.Expr) -> sympy.Expr:
    """Heaviside and sign as Piecewise, so backends need no new functions."""
    return d.replace(sympy.Heaviside, lambda arg, *_: _step(arg)).replace(sympy.sign, _sign)


def derivative(ex: sympy.Expr, wrt: sympy.Expr) -> sympy.Expr:
    """d ex / d wrt for an access (or symbol) `wrt`, in closed form. Raises NotDifferentiable
    if sympy leaves a Derivative behind."""
    x = sympy.Dummy("x", real=True)
    d = closed_form(sympy.diff(ex.xreplace({wrt: x}), x).xreplace({x: wrt}))
    if d.has(sympy.Derivative, sympy.Subs, sympy.DiracDelta):
        raise NotDifferentiable(f"sympy leaves d({ex})/d({wrt}) unevaluated")
    return d


def _vjp_clean(d: sympy.Expr) -> sympy.Expr:
    d = closed_form(d)
    if d.has(sympy.Derivative, sympy.Subs, sympy.DiracDelta) or d.has(sympy.floor, sympy.Mod):
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
    NotDifferentiable for floor, modulo and derivatives sympy leaves unevaluated."""
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
        d = _vjp_clean(sympy.diff(plain, stand[atom]).xreplace(back).xreplace(sums))
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
