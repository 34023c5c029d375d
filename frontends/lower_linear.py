"""Lower a `linear` block to a LinearScan (attnc/ir/linear.py), checking it as it goes.

    linear gla {
      input g[b, h, t, i]              # per-step tensors: dims b, h, t, then feature axes i / j
      state S[i, j]                    # i: key features (DK), j: value features (DV)
      S[i, j] = exp(g[i]) * S[i, j] + k[i] * v[j]
      o[j] = sum(i) q[i] * scale * S[i, j]
    }

Inside the block everything is one time step t: `q[i]`, `k[i]`, `v[j]`, `g[i]` are the step's
rows, and the b/h/t dims of declared tensors are implicit (`beta` for `input beta[b, h, t]`,
`A` for `param A[h]`). `sum(i) ...` contracts a feature axis; `map q = taylor2(q)` applies a
built-in feature map to q or k as a prologue. Every error points at the culprit's line and column.
"""

from __future__ import annotations

import lark
import sympy

from attnc.expr import symbols as S
from attnc.frontends.lower import NUM, RESERVED, _Lowerer, _position, _Scope
from attnc.ir.cascade import TensorDecl, TensorKind
from attnc.ir.linear import (AXES, DK, DV, OPERAND_AXES, D, FeatureMap, FeatureMapKind, LinearScan,
                             StateDecl, T, Update, contract, read, step_axes, t)

MAPS = {kind.value: kind for kind in FeatureMapKind}

_DECL_SIZES = {"b": S.B, "h": S.H, "t": T, "i": DK, "j": DV, "D": D, "B": S.B, "H": S.H}
_IMPLICIT = (S.B, S.H, T)


class _LinearLowerer(_Lowerer):
    # besides the attention block's names: the output, the feature axes, the step, the feature
    # counts (expressions read these as themselves), and the keywords of a kernel's call
    reserved = frozenset(RESERVED | {"o", "i", "j", "t", "DK", "DV", "initial_state",
                                     "output_final_state", "cu_seqlens", "algorithm"})

    def __init__(self, parent: _Lowerer):
        super().__init__(parent.source, parent.filename, parent.overrides)
        self.states: dict[str, StateDecl] = {}

    # --- the block --------------------------------------------------------------------------
    def linear(self, blk: lark.Tree) -> LinearScan:
        name = str(blk.children[0])
        scope = _Scope()
        stmts = self._declarations(blk.children[1:], scope)
        maps: list[FeatureMap] = []
        updates: dict[str, tuple[Update, lark.Tree]] = {}
        output = None
        for st in stmts:
            kind = st.data
            if kind == "state":
                for sd in st.children:
                    self._state(sd, scope)
            elif kind == "let":
                tok, body = st.children
                if str(tok) in self.reserved or str(tok) in scope.options or str(tok) in scope.lets:
                    raise self.error(tok, f"'{tok}' is already defined")
                scope.lets[str(tok)] = self.expr(body, scope)
            elif kind == "feature_map":
                maps.append(self._feature_map(st, scope, maps))
            elif kind in ("einsum", "assign"):
                target, axes, body = self._target(st)
                if target == "o":
                    if output is not None:
                        raise self.error(st, "the output o is given twice")
                    if axes != ("j",):
                        raise self.error(st, "the output is written o[j]",
                                         hint="o is one row of v's width per step")
                    output = self._body(body, scope, ("j",), "o")
                    continue
                state = self.states.get(target)
                if state is None:
                    raise self.error(st, f"'{target}' is not a declared state",
                                     hint=f"declare it with `state {target}[i, j]` (or [i], "
                                          "or none)")
                if axes != state.axes:
                    raise self.error(st, f"state {target} is indexed [{', '.join(state.axes)}], "
                                         f"written [{', '.join(axes)}]")
                if target in updates:
                    raise self.error(st, f"state {target} is updated twice",
                                     hint=f"first on line {_position(updates[target][1])[0]}")
                updates[target] = (Update(target, self._body(body, scope, axes, target)), st)
            else:  # pragma: no cover - the grammar admits nothing else
                raise self.error(st, f"unexpected statement {kind}")
        if not self.states:
            raise self.error(blk, f"linear {name} declares no state",
                             hint="e.g. `state S[i, j]`")
        for s in self.states.values():
            if s.name not in updates:
                raise self.error(blk, f"state {s.name} is never updated")
        if output is None:
            raise self.error(blk, f"linear {name} has no output",
                             hint="e.g. `o[j] = sum(i) q[i] * S[i, j]`")
        return LinearScan(name=name, decls=tuple(scope.tensors.values()), maps=tuple(maps),
                          states=tuple(self.states.values()),
                          updates=tuple(u for u, _ in updates.values()), output=output,
                          options=tuple(scope.options.items()))

    def _tensor_decl(self, td: lark.Tree, kind: str, scope: _Scope) -> TensorDecl:
        decl = super()._tensor_decl(td, kind, scope)
        dims = decl.dims
        lead = [d for d in dims if d in _IMPLICIT]
        if tuple(lead) != tuple(dims[:len(lead)]) or len(set(lead)) != len(lead) or \
                tuple(lead) not in ((), (S.H,), (S.B, S.H), (S.B, S.H, T)):
            raise self.error(td, f"{decl.name} is laid out [{', '.join(map(str, dims))}]",
                             hint="b, h, t lead, in that order: [b, h, t, i] for a per-step "
                                  "tensor, [h] or [b, h] for a constant")
        return decl

    def _state(self, sd: lark.Tree, scope: _Scope) -> None:
        tok, *axes = sd.children
        name = str(tok)
        if name in self.reserved or name in scope.tensors or name in scope.options \
                or name in self.states:
            raise self.error(tok, f"state name '{name}' is already used")
        names = tuple(str(a) for a in axes)
        if any(a not in AXES for a in names) or names not in ((), ("i",), ("j",), ("i", "j")):
            raise self.error(sd, f"state {name} has axes [{', '.join(names)}]",
                             hint="a state is S[i, j], z[i], y[j] or a scalar: i indexes key "
                                  "features, j value features")
        self.states[name] = StateDecl(name, names)

    def _feature_map(self, st: lark.Tree, scope: _Scope, maps: list) -> FeatureMap:
        tok, call = st.children
        target = str(tok)
        if target not in ("q", "k"):
            raise self.error(tok, f"a feature map replaces q or k, not '{target}'")
        if any(m.target == target for m in maps):
            raise self.error(tok, f"{target} is mapped twice")
        if not (isinstance(call, lark.Tree) and call.data == "call"
                and str(call.children[0]) in MAPS):
            raise self.error(call, "a feature map is one of: " + ", ".join(
                f"{f}({target}{', W' * kind.params})" for f, kind in MAPS.items()),
                hint="elementwise maps (elu(x) + 1, relu, exp) are written inline")
        fn, *args = call.children
        want = MAPS[str(fn)].params
        if len(args) != want + 1 or not (args[0].data == "name"
                                         and str(args[0].children[0]) == target):
            raise self.error(call, f"{fn} takes ({target}{', W' * want})")
        params: list[str] = []
        for a in args[1:]:
            pname = str(a.children[0]) if a.data == "name" else ""
            decl = scope.tensors.get(pname)
            if decl is None or decl.kind is not TensorKind.PARAM:
                raise self.error(a, f"{fn}'s weights are a declared param",
                                 hint="e.g. `param W[h, D, 64]` (D is q's head dim)")
            params.append(pname)
        return FeatureMap(target, MAPS[str(fn)], tuple(params))

    def _target(self, st: lark.Tree):
        tok, *rest = st.children
        axes = []
        while rest and isinstance(rest[0], lark.Token):
            axes.append(rest.pop(0))
        for a in axes:
            if str(a) not in AXES:
                raise self.error(a, f"unknown axis '{a}'", hint="axes are i (key features) "
                                 "and j (value features)")
        return str(tok), tuple(str(a) for a in axes), rest[0]

    def _body(self, node, scope: _Scope, axes: tuple[str, ...], what: str) -> sympy.Expr:
        val = self.expect(node, scope, NUM, what)
        free = {a for a, sym in AXES.items() if sym in val.free_symbols}
        extra = sorted(free - set(axes))
        if extra:
            raise self.error(node, f"axis {extra[0]} is free on the right but {what} has no "
                                   f"{extra[0]} axis", hint=f"contract it: sum({extra[0]}) ...")
        return val

    # --- expressions ------------------------------------------------------------------------
    def _reduce(self, node, scope: _Scope, decl: bool):
        red, body = node.children
        op, args = str(red).split("(", 1)
        over = [a.strip() for a in args.rstrip(")").split(",")]
        if op != "sum" or len(over) != 1 or over[0] not in AXES:
            raise self.error(red, f"unsupported reduction {red}",
                             hint="a linear block contracts one feature axis: sum(i) or sum(j)")
        return contract(self.expect(body, scope, NUM, "summand", decl), AXES[over[0]]), NUM

    def _name(self, tok, scope: _Scope, decl: bool):
        name = str(tok)
        if decl:
            if name in _DECL_SIZES:
                return _DECL_SIZES[name], NUM
            if name in scope.options:
                return scope.options[name], NUM
            raise self.error(tok, f"'{name}' cannot size a tensor",
                             hint="dims use b, h, t, i (key features), j (value features), "
                                  "D (q's head dim), numbers and options")
        if name in scope.options:
            return scope.options[name], NUM
        if name in scope.lets:
            return scope.lets[name]
        if name == "scale":
            return S.scale, NUM
        if name == "h":
            return S.h, NUM
        if name == "H":
            return S.H, NUM
        if name == "t":
            return t, NUM
        if name in ("DK", "DV"):
            return (DK if name == "DK" else DV), NUM
        state = self.states.get(name)
        if state is not None:
            if state.axes:
                raise self.error(tok, f"state {name} must be indexed [{', '.join(state.axes)}]")
            return read(name, ()), NUM
        decl_ = scope.tensors.get(name)
        if decl_ is not None:
            axes = self._axes_of(tok, decl_)
            if axes:
                raise self.error(tok, f"{name} must be indexed [{', '.join(axes)}]")
            return read(name, ()), NUM
        if name in OPERAND_AXES:
            raise self.error(tok, f"{name} must be indexed [{OPERAND_AXES[name][0]}]")
        if name in AXES:
            raise self.error(tok, f"the axis {name} is only an index here")
        raise self.error(tok, f"unknown name '{name}'",
                         hint="names in scope: q, k, v, states, declared tensors, options, "
                              "scale, h, H, t, DK, DV")

    def _axes_of(self, tok, decl: TensorDecl) -> tuple[str, ...]:
        rest = [d for d in decl.dims if d not in _IMPLICIT]
        if any(d not in (DK, DV) for d in rest):
            raise self.error(tok, f"{decl.name} has dims other than b, h, t, i, j",
                             hint="only a feature map's weights may (map q = hedgehog(q, W))")
        return step_axes(decl)

    def _access(self, node, scope: _Scope, decl: bool):
        tok, *idx = node.children
        name = str(tok)
        got = []
        for x in idx:
            if not (isinstance(x, lark.Tree) and x.data == "name" and str(x.children[0]) in AXES):
                raise self.error(x, f"{name} is indexed by the axes i and j only",
                                 hint="inside a linear block every access is at the current step")
            got.append(str(x.children[0]))
        want: tuple[str, ...]
        if name in OPERAND_AXES:
            want = OPERAND_AXES[name]
        elif name in self.states:
            want = self.states[name].axes
        elif name in scope.tensors:
            want = self._axes_of(tok, scope.tensors[name])
        else:
            raise self.error(tok, f"unknown tensor '{name}'",
                             hint="q, k, v, a declared state, or a declared param/input")
        if tuple(got) != want:
            spelled = f"[{', '.join(want)}]" if want else "bare (no brackets)"
            raise self.error(node, f"{name} is indexed {spelled}, got [{', '.join(got)}]")
        return read(name, want), NUM

    def _call(self, node, scope: _Scope, decl: bool):
        tok = node.children[0]
        fn = str(tok)
        if fn in MAPS:
            raise self.error(tok, f"{fn} is a feature map", hint=f"write `map q = {fn}(q...)`")
        if fn == "dot":
            raise self.error(tok, "dot is not used in a linear block",
                             hint="contract explicitly: sum(i) q[i] * S[i, j]")
        return super()._call(node, scope, decl)


def lower_linear(parent: _Lowerer, blk: lark.Tree) -> LinearScan:
    return _LinearLowerer(parent).linear(blk)
