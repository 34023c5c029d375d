"""Lower what an attention block says around its score into `attnc.ir.around.Around`.

Called by `frontends/lower.py` (`_Lowerer.attention`) with the block's scope; every check
reports the line and column of the culprit.

* `operand qr[m], kr[n]`: one dimension, `m` (QUERY side, laid out like q) or `n` (KEY side, like
  k); names follow the rules of params and inputs; one nothing dots (and that is not the value)
  is refused like any unused declaration.
* `X = <chain>` for X in q, k, v or an operand: a prologue. The chain nests `rope(x, pos, theta[,
  dims])`, `rope_interleaved(...)`, `l2norm(x[, gain])`, `x * f`, `f * x` and `x / f` around X
  itself; its ops are stored innermost first (application order), and successive statements
  for X append to X's one Prologue. Positions and factors are expressions of b, h, the
  operand's row index (m on the query side, n on the key side), sizes, options and inputs
  (factors also params; positions never: they are not differentiated); on the key side, h is
  the K/V head. theta is a positive number or option, dims a positive even integer. A gain is
  an access of a param whose indices use the feature index `d` (and optionally b, h).
* `v = k` / `v = c` (a bare key-side operand): the value, that operand after its prologue (so
  `v = k` with `k = rope(k, ...)` averages the rotated keys). Any other bare rename (`q = qr`)
  is refused (branches rename keys in frontends/lower_branches.py); `v` cannot be both renamed
  and transformed.
* Several dots (`combine_dots`): the score must depend on its dots dot_i only through one sum
  Σ w_i·dot_i with number weights; it is rewritten in terms of that sum (the access QK[m, n],
  as a plain `dot(q, k)` score is), the weights taken relative to dot(q, k) when present, else
  to the first dot.
* `gate` (b, h, m, params, inputs, options), `kv_head` (h, options and inputs indexed by h only;
  integer valued), `premix` / `postmix` (h, `g` the other head, b, m, params, inputs, options);
  none may read a dot product or the key index n.
* `n in idx[b, h, m, :]` / `n // C in idx[b, h, m // C', :]` as a top-level `and` conjunct of
  the mask: the Gather; the tensor is an input with one more dimension than its index, which
  reads b, h and m only. The other conjuncts remain the mask.

Origins (for errors of later passes): "operand <name>" for each operand's declaration,
"prologue <X>" for X's first assignment, "value" for `v = ...`, "gate", "kv_head", "premix",
"postmix", and "gather" for the `in` conjunct. These contain no einsum name: a space or a
keyword.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import lark
import sympy

from attnc.expr import symbols as S
from attnc.expr.functions import ArgKind
from attnc.ir import around as A
from attnc.ir.around import (Around, DotTerm, Gather, L2Norm, Op, OperandDecl, Prologue, Rope,
                             RopeStyle, RowScale, Side)
from attnc.ir.cascade import QK, Origin, TensorKind

if TYPE_CHECKING:
    from attnc.frontends.lower import _Lowerer, _Scope

NUM, BOOL = ArgKind.NUMBER.value, ArgKind.CONDITION.value
PROLOGUE_CALLS = ("rope", "rope_interleaved", "l2norm")
STATEMENTS = ("gate", "kv_head", "premix", "postmix")
SIZES = {S.B, S.H, S.M, S.N}
_ROW = {Side.QUERY: "m", Side.KEY: "n"}
_CHAIN_HINT = ("a prologue nests rope(x, pos, theta[, dims]), rope_interleaved(...), "
               "l2norm(x[, gain]), x * f and x / f around the operand it assigns, e.g. "
               "q = rope(l2norm(q), pos[b, m], 10000.0)")


def qk_access() -> sympy.Indexed:
    return S.access(QK, S.m, S.n)


def _name_of(node) -> str | None:
    """The name of a bare-name expression node, else None."""
    if isinstance(node, lark.Tree) and node.data == "name":
        return str(node.children[0])
    return None


def _index_symbols(value: sympy.Expr) -> set[sympy.Symbol]:
    """The symbols `value` uses, tensor names (the accesses' labels) left out."""
    labels = {acc.base.label for acc in value.atoms(sympy.Indexed)}
    return {x for x in value.free_symbols if isinstance(x, sympy.Symbol)} - labels


class AroundLowering:
    """One attention block's around-the-score statements, collected as they are lowered."""

    def __init__(self, lw: _Lowerer, scope: _Scope):
        self.lw = lw
        self.scope = scope
        self.prologues: dict[str, list[Op]] = {}
        self.value = "v"
        self.value_node: lark.Tree | None = None
        self.exprs: dict[str, sympy.Expr] = {}
        self.gather: Gather | None = None
        self.origins: list[Origin] = []

    def _origin(self, name: str, node) -> None:
        from attnc.frontends.lower import _origin
        if all(o.tensor != name for o in self.origins):
            self.origins.append(_origin(name, node))

    # --- operands ---------------------------------------------------------------------------
    def declare(self, st: lark.Tree) -> None:
        """`operand x[m], y[n]`."""
        scope = self.scope
        for td in st.children:
            tok, *dims = td.children
            assert isinstance(tok, lark.Token)
            name = str(tok)
            if name in self.lw.reserved or name in scope.tensors or name in scope.options \
                    or name in scope.operands:
                raise self.lw.error(tok, f"operand name '{name}' is " + (
                    "reserved" if name in self.lw.reserved else "already declared"))
            if len(dims) != 1 or _name_of(dims[0]) not in ("m", "n"):
                raise self.lw.error(td, f"operand {name} has one dimension, m or n",
                                    hint=f"operand {name}[m] is laid out like q ([B, Hq, M, D_"
                                         f"{name}]), operand {name}[n] like k ([B, Hkv, N, "
                                         f"D_{name}])")
            scope.operands[name] = Side.QUERY if _name_of(dims[0]) == "m" else Side.KEY
            scope.declared[name] = tok
            self._origin(f"operand {name}", td)

    def side(self, name: str) -> Side:
        return A.side_of(name, tuple(OperandDecl(n, s) for n, s in self.scope.operands.items()))

    def _operand_names(self) -> set[str]:
        return set(A.BASE_OPERANDS) | set(self.scope.operands)

    # --- dots -------------------------------------------------------------------------------
    def dot(self, node: lark.Tree) -> sympy.Expr:
        """`dot(x, y)`: QK[m, n] for dot(q, k), else a placeholder symbol of the pair that
        `combine_dots` resolves."""
        lw, scope = self.lw, self.scope
        _, *args = node.children
        names = [_name_of(a) for a in args]
        if len(args) != 2 or None in names:
            raise lw.error(node, "dot takes two operand names: dot(q, k)",
                           hint="dot(x, y) dots a query-side operand x (q or one declared "
                                "[m]) with a key-side one y (k or one declared [n])")
        x, y = str(names[0]), str(names[1])
        for arg, name in zip(args, (x, y)):
            if name not in self._operand_names():
                raise lw.error(arg, f"unknown operand '{name}'",
                               hint=f"declare it: operand {name}[m] (query side) or "
                                    f"operand {name}[n] (key side)")
            if name == "v":
                raise lw.error(arg, "dot cannot read v: the values are averaged, not dotted",
                               hint="dot a key-side operand, or make it the value: v = k")
        if self.side(x) is not Side.QUERY or self.side(y) is not Side.KEY:
            raise lw.error(node, f"dot({x}, {y}) must dot a query-side operand with a "
                                 "key-side one",
                           hint="the first argument is q or an operand declared [m], the "
                                "second k or one declared [n]: dot(q, k)")
        scope.used.update({x, y} & set(scope.operands))
        if (x, y) == ("q", "k"):
            value: sympy.Expr = qk_access()
        else:
            value = sympy.Symbol(f"dot({x}, {y})", real=True)
        scope.dots.setdefault((x, y), value)
        return value

    def _dots_in(self, value: sympy.Expr) -> list[tuple[tuple[str, str], sympy.Expr]]:
        return [(pair, t) for pair, t in self.scope.dots.items() if value.has(t)]

    def no_dots(self, value: sympy.Expr, node, what: str, hint: str = "") -> None:
        """Refuse a dot other than q.k in `value` (a mask or weight reads q.k alone)."""
        other = [pair for pair, _ in self._dots_in(value) if pair != ("q", "k")]
        if other:
            x, y = other[0]
            raise self.lw.error(node, f"a {what} cannot read dot({x}, {y})",
                                hint=hint or "only the score reads dots other than dot(q, k)")

    def combine_dots(self, score: sympy.Expr, node) -> tuple[sympy.Expr, tuple[DotTerm, ...]]:
        """The score in terms of one qk = Σ w_i·dot_i (the access QK[m, n]) and its terms."""
        found = self._dots_in(score)
        if not found or [pair for pair, _ in found] == [("q", "k")]:
            return score, Around().dots
        # dot(q, k) first when present: the weights are relative to it
        found.sort(key=lambda item: item[0] != ("q", "k"))
        ts = [sympy.Symbol(f"_attnc_t{i}", real=True) for i in range(len(found))]
        s = score.xreplace({t: x for (_, t), x in zip(found, ts)})
        d0 = sympy.diff(s, ts[0])
        weights = []
        for (pair, _), t in zip(found[1:], ts[1:]):
            w = sympy.simplify(sympy.diff(s, t) / d0)
            if not (w.is_number and w.is_finite and not w.is_zero):
                raise self._not_one_sum(node, found, w)
            weights.append(w)
        qk = sympy.Symbol("_attnc_qk", real=True)
        s = s.xreplace({ts[0]: qk - sum(w * t for w, t in zip(weights, ts[1:]))})
        if any(sympy.simplify(sympy.diff(s, t)) != 0 for t in ts[1:]):
            raise self._not_one_sum(node, found, None)
        s = s.xreplace({t: 0 for t in ts[1:]}).xreplace({qk: qk_access()})
        terms = (DotTerm(*found[0][0]),) + tuple(
            DotTerm(x, y, w) for ((x, y), _), w in zip(found[1:], weights))
        return s, terms

    def _not_one_sum(self, node, found, w) -> Exception:
        dots = ", ".join(f"dot({x}, {y})" for (x, y), _ in found)
        got = "" if w is None else f" (a relative weight is {w}, not a nonzero number)"
        return self.lw.error(node, f"the score must depend on {dots} only through one sum of "
                                   f"them with number weights{got}",
                             hint="write the dots as one weighted sum inside the score, e.g. "
                                  "score = (dot(q, k) + dot(qr, kr)) * scale")

    # --- assignments ------------------------------------------------------------------------
    def assign(self, st: lark.Tree) -> None:
        """`X = <chain>` (a prologue of X) or `v = k` / `v = c` (the value)."""
        lw = self.lw
        tok, body = st.children
        x = str(tok)
        if x not in self._operand_names():
            raise lw.error(tok, f"cannot assign to '{x}'",
                           hint="an assignment transforms q, k, v or a declared operand (a "
                                "prologue: q = rope(q, pos[b, m], 10000.0)); name an "
                                "expression with `let`")
        other = _name_of(body)
        if other is not None and other != x and x == "v":
            self._value(st, body, other)
            return
        if other == x:
            raise lw.error(body, f"`{x} = {x}` changes nothing", hint=_CHAIN_HINT)
        if other is not None:
            raise lw.error(st, f"{x} cannot be renamed to {other}",
                           hint=f"a prologue transforms {x} itself ({x} = l2norm({x})); only "
                                "the value may be another (key-side) operand: v = k or v = c")
        if x == "v" and self.value_node is not None:
            raise lw.error(st, f"v is {self.value} here: it cannot also be transformed",
                           hint=f"transform {self.value} itself: {self.value} = ...")
        ops = self._chain(body, x, self.side(x))
        self.prologues.setdefault(x, []).extend(ops)
        self._origin(f"prologue {x}", st)

    def _value(self, st: lark.Tree, node, name: str) -> None:
        lw = self.lw
        if self.value_node is not None:
            raise lw.error(st, "'v' is given twice",
                           hint=f"first given on line {self.value_node.meta.line}")
        if name not in self._operand_names():
            raise lw.error(node, f"unknown operand '{name}'",
                           hint=f"declare it: operand {name}[n]")
        if self.side(name) is not Side.KEY:
            raise lw.error(node, f"the value must be a key-side operand, {name} is query-side",
                           hint="v = k, or v = c with operand c[n]")
        if "v" in self.prologues:
            raise lw.error(st, f"v is transformed by a prologue: it cannot also be {name}",
                           hint=f"transform {name} itself: {name} = ...")
        self.value, self.value_node = name, st
        self.scope.used.add(name)
        self._origin("value", st)

    def _is_chain(self, node) -> bool:
        if not isinstance(node, lark.Tree):
            return False
        if node.data == "name":
            return str(node.children[0]) in self._operand_names()
        if node.data == "call":
            return str(node.children[0]) in PROLOGUE_CALLS
        if node.data == "binop" and str(node.children[1]) in ("*", "/"):
            return self._is_chain(node.children[0]) or (
                str(node.children[1]) == "*" and self._is_chain(node.children[2]))
        return False

    def _chain(self, node, x: str, side: Side) -> list[Op]:
        """The ops of a prologue chain around `x`, innermost first."""
        lw = self.lw
        name = _name_of(node)
        if name == x:
            return []
        if name in self._operand_names():
            raise lw.error(node, f"a prologue of {x} transforms {x} itself, not {name}",
                           hint=_CHAIN_HINT)
        if isinstance(node, lark.Tree) and node.data == "call" \
                and str(node.children[0]) in PROLOGUE_CALLS:
            fn, *args = node.children
            if not args:
                raise lw.error(node, f"{fn} takes the operand first: {fn}({x}, ...)")
            return self._chain(args[0], x, side) + [self._op(node, str(fn), args, side)]
        if isinstance(node, lark.Tree) and node.data == "binop" \
                and str(node.children[1]) in ("*", "/"):
            left, op, right = node.children
            if self._is_chain(left):
                inner, factor_node = left, right
            elif str(op) == "*" and self._is_chain(right):
                inner, factor_node = right, left
            else:
                raise lw.error(node, f"a prologue of {x} applies to {x}", hint=_CHAIN_HINT)
            factor = self.row(factor_node, side, "a row factor", params=True)
            if str(op) == "/":
                if factor.is_zero:
                    raise lw.error(op, "division by zero")
                factor = 1 / factor
            return self._chain(inner, x, side) + [RowScale(factor)]
        raise lw.error(node, f"this is no prologue of {x}", hint=_CHAIN_HINT)

    def _op(self, node, fn: str, args, side: Side) -> Op:
        lw = self.lw
        if fn == "l2norm":
            if len(args) > 2:
                raise lw.error(node, "l2norm takes (x[, gain])")
            return L2Norm(self._gain(args[1]) if len(args) == 2 else None)
        if len(args) not in (3, 4):
            raise lw.error(node, f"{fn} takes (x, position, theta[, dims]), got {len(args)} "
                                 "arguments")
        position = self.row(args[1], side, "a rope position", params=False)
        theta = lw.expect(args[2], self.scope, NUM, "theta")
        if not (theta.is_number and theta.is_positive and theta.is_finite):
            raise lw.error(args[2], f"rope's theta must be a positive number, got {theta}",
                           hint="a number or an option, e.g. 10000.0")
        dims = None
        if len(args) == 4:
            value = lw.expect(args[3], self.scope, NUM, "dims")
            if not (value.is_Integer and value > 0 and value % 2 == 0):
                raise lw.error(args[3], f"rope's dims must be a positive even integer, got "
                                        f"{value}",
                               hint="the number of leading features rotated, in pairs")
            dims = int(value)
        style = RopeStyle.HALF if fn == "rope" else RopeStyle.INTERLEAVED
        return Rope(position, float(theta), dims, style)

    def _gain(self, node) -> sympy.Expr:
        lw, scope = self.lw, self.scope
        hint = "a gain is a param indexed by the feature d: l2norm(q, g[d]) or g[h, d]"
        if not (isinstance(node, lark.Tree) and node.data == "access"):
            raise lw.error(node, "l2norm's gain must be a param access", hint=hint)
        scope.feature_index = True
        try:
            value = lw.expect(node, scope, NUM, "gain")
        finally:
            scope.feature_index = False
        name = str(node.children[0])
        if scope.tensors[name].kind is not TensorKind.PARAM:
            raise lw.error(node, f"l2norm's gain must be a param, {name} is an input", hint=hint)
        used = _index_symbols(value)
        if S.d not in used or not used <= {S.d, S.b, S.h} | SIZES:
            raise lw.error(node, f"l2norm's gain is indexed by d (and optionally b and h), "
                                 f"got {value}", hint=hint)
        return value

    # --- row expressions ----------------------------------------------------------------------
    def row(self, node, side: Side, what: str, params: bool) -> sympy.Expr:
        """A position or factor: one value per row of `side`."""
        r = _ROW[side]
        reads = "params, inputs" if params else "inputs"
        hint = (f"{what} is one value per {'query' if side is Side.QUERY else 'key'} row: an "
                f"expression of b, h, {r}, {reads} and options")
        if not params:
            hint += " (positions are never differentiated: declare their tensors `input`)"
        value = self.lw.expect(node, self.scope, NUM, what)
        self.check_reads(value, node, what, {S.b, S.h, S.RANKS[r]}, params, hint)
        return value

    def check_reads(self, value: sympy.Expr, node, what: str, index: set[sympy.Symbol],
                    params: bool, hint: str) -> None:
        lw = self.lw
        dots = self._dots_in(value)
        if dots:
            x, y = dots[0][0]
            raise lw.error(node, f"{what} cannot read dot({x}, {y})", hint=hint)
        bad = sorted(_index_symbols(value) - index - SIZES, key=str)
        if bad:
            raise lw.error(node, f"{what} cannot use {bad[0]}", hint=hint)
        for acc in sorted(value.atoms(sympy.Indexed), key=str):
            name = str(acc.base)
            if not params and self.scope.tensors[name].kind is TensorKind.PARAM:
                raise lw.error(node, f"{what} cannot read param {name}", hint=hint)

    def statement(self, kind: str, st: lark.Tree) -> None:
        """`gate`, `kv_head`, `premix` or `postmix`."""
        lw, scope = self.lw, self.scope
        node = st.children[0]
        if kind == "kv_head":
            value = lw.expect(node, scope, NUM, "kv_head")
            hint = ("kv_head is the K/V head query head h reads: an integer expression of h, "
                    "options and inputs indexed by h, e.g. kv_head = hmap[h]")
            # h is its only index symbol, so its inputs are indexed by h (and numbers) only
            self.check_reads(value, node, "kv_head", {S.h}, False, hint)
            ints = {acc: sympy.Dummy(integer=True) for acc in value.atoms(sympy.Indexed)}
            if value.xreplace(ints).is_integer is not True:
                raise lw.error(node, f"kv_head must be an integer expression, got {value}",
                               hint=hint + " (h // 2, not h / 2)")
        elif kind == "gate":
            value = lw.expect(node, scope, NUM, "gate")
            self.check_reads(value, node, "gate", {S.b, S.h, S.m}, True,
                             "a gate is one value per query row: an expression of b, h, m, "
                             "params, inputs and options, e.g. sigmoid(gt[b, h, m])")
        else:
            scope.mix_heads = True
            try:
                value = lw.expect(node, scope, NUM, kind)
            finally:
                scope.mix_heads = False
            self.check_reads(value, node, kind, {S.b, S.h, S.m, A.g}, True,
                             f"{kind} weighs head g's {'scores' if kind == 'premix' else 'weights'}"
                             " in head h: an expression of h, g, b, m, params, inputs and "
                             f"options, e.g. {kind} = w[h, g]")
        self.exprs[kind] = value
        self._origin(kind, st)

    # --- gathered keys ------------------------------------------------------------------------
    def mask(self, node) -> sympy.Expr:
        """The mask, a gathered-key list among its top-level `and` conjuncts split off."""
        lw, scope = self.lw, self.scope
        conjuncts = _conjuncts(node)
        members = [c for c in conjuncts if c.data == "member"]
        if not members:
            return lw.expect(node, scope, BOOL, "mask")
        if len(members) > 1:
            raise lw.error(members[1], "a mask lists gathered keys once",
                           hint="one `n in idx[b, h, m, :]` conjunct per block")
        self.gather = self._member(members[0])
        rest = [lw.expect(c, scope, BOOL, "mask") for c in conjuncts if c is not members[0]]
        return sympy.And(*rest)

    def _member(self, node: lark.Tree) -> Gather:
        lw, scope = self.lw, self.scope
        left, tok, *index = node.children
        hint = ("gathered keys: n in idx[b, h, m, :] (a list of keys per query) or n // C in "
                "blk[b, h, m // C, :] (a list of key blocks of C keys)")
        key = lw.expect(left, scope, NUM, "gathered key")
        block = 1
        if key != S.n:
            arg = key.args[0] if isinstance(key, sympy.floor) else None
            coeff, rest = arg.as_coeff_Mul() if arg is not None else (None, None)
            if rest != S.n or coeff is None or not (coeff > 0 and (1 / coeff).is_Integer):
                raise lw.error(left, f"the left side of `in` is n or n // C (C a positive "
                                     f"integer), got {key}", hint=hint)
            block = int(1 / coeff)
        name = str(tok)
        decl = scope.tensors.get(name)
        if decl is None or decl.kind is not TensorKind.INPUT:
            raise lw.error(tok, f"gathered keys are listed in an input, {name} is "
                                + ("no declared tensor" if decl is None else "a param"),
                           hint=f"declare it: input {name}[b, h, m, 8]")
        if len(decl.dims) != len(index) + 1:
            raise lw.error(node, f"{name} has {len(decl.dims)} dimensions: index all but its "
                                 f"last, then ':'", hint=hint)
        scope.used.add(name)
        values = []
        for i in index:
            v = lw.expect(i, scope, NUM, "index")
            if not v.is_integer:
                raise lw.error(i, f"an index of {name} must be an integer expression")
            self.check_reads(v, i, f"an index of {name}", {S.b, S.h, S.m}, True, hint)
            values.append(v)
        self._origin("gather", node)
        return Gather(name, tuple(values), block)

    # --- result -----------------------------------------------------------------------------
    def around(self, dots: tuple[DotTerm, ...]) -> Around:
        operands = tuple(OperandDecl(n, s) for n, s in self.scope.operands.items())
        return Around(operands=operands, dots=dots, value=self.value,
                      prologues=tuple(Prologue(x, tuple(ops))
                                      for x, ops in self.prologues.items()),
                      gate=self.exprs.get("gate"), kv_head=self.exprs.get("kv_head"),
                      gather=self.gather, premix=self.exprs.get("premix"),
                      postmix=self.exprs.get("postmix"))


def _conjuncts(node) -> list[lark.Tree]:
    """The operands of a chain of top-level `and`s."""
    if isinstance(node, lark.Tree) and node.data == "and_":
        return [c for kid in node.children for c in _conjuncts(kid)]
    return [node]
