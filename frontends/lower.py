"""Lower a parse tree to IR: an `attention` block to an AttentionSpec, a `cascade` block to a
Cascade. Every semantic check happens here and reports the line and column of the culprit.

Expressions become sympy: `dot(q, k)` is the access QK[m, n]; `where` is a Piecewise; `//` and
`%` are floor and Mod; options are substituted as numbers (they are compile-time constants).

An attention block's `normalize` takes an argument for `l1(f)`, `mean(f)` (f pointwise) and
`sinkhorn(k)` (k a literal or an option); `weight` is written in the score's language and
`sink` in it without q.k or n; a sink needs softmax, a weight neither standardize nor sinkhorn.
Their statements' positions are recorded as origins "weight", "sink" and "normalize", like
"score" and "mask".

What an attention block says around its score (`operand` declarations, prologue assignments
`q = rope(q, ...)`, the value `v = c`, several dots in the score, `gate`, `kv_head`, `premix`,
`postmix`, and gathered keys `n in idx[b, h, m, :]` as a top-level `and` conjunct of the mask)
is lowered by frontends/lower_around.py into `AttentionSpec.around`; a block with `branch`
statements goes to frontends/lower_branches.py. In an attention block `d` sizes a declared
dimension as q's head dim D, and is the feature index inside an l2norm's gain; `g` is the other
head inside premix and postmix.

A cascade block is lowered to einsums over m, n, e, f only:
- `rank c = 4` declares an extra rank, which is unrolled: an einsum with c on its left becomes
  one einsum per value 0..3 (named X_c0, X_c1, ... among the free names); `X[m, c]` under a
  bound c reads its copy, `X[m, 2]` (any constant index) a fixed one; the value of a bound c is
  a number in expressions (`w[h, c]`, `where(g[b, n] == c, ...)`). A reduction over extra ranks
  adds (sum) or takes the Max / Min of the copies of its operand, one per value:
  `sum(n, c) x` is `sum(n) (x_0 + x_1 + ...)`.
- A reduction or scan nested in an expression is hoisted into an einsum of its own (named
  `<einsum>_<op>` among the free names, identical ones shared), whose ranks are those its
  operand uses less the reduced ones (a scan keeps its rank); the outermost one on an einsum's
  right side is that einsum's reduction, as before.
- `mask = <condition>` (m, n, b, h, M, N, options, params and inputs) becomes `Cascade.mask`;
  its position is recorded as the origin "mask" (an einsum cannot take that name: it is a
  keyword at the start of a statement).
- Refused, at the statement: a tensor read before (or by) the statement that defines it, so
  every cascade is acyclic; a rank on the left that the right side does not use; a reduction
  over a rank its operand lacks; a scan whose rank is not kept on the left; an output (the last
  einsum) not indexed [m, f]; a statement or declaration nothing reaches. Copies and hoisted
  einsums the output does not reach are dropped.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import lark
import sympy

from attnc.errors import CompileError, SpecError
from attnc.expr import symbols as S
from attnc.expr.functions import BY_NAME, ArgKind
from attnc.frontends import limits
from attnc.frontends.lower_around import PROLOGUE_CALLS, STATEMENTS, AroundLowering
from attnc.ir.around import Around, Side, g
from attnc.ir.branches import Branches
from attnc.ir.cascade import (OPERAND_DECLS, POINTWISE, QK, AttentionSpec, BlockKind, Cascade,
                              Einsum, Normalizer, Origin, Reduce, TensorDecl, TensorKind,
                              fresh_name, reads)

if TYPE_CHECKING:
    from attnc.ir.linear import LinearScan

NUM, BOOL = ArgKind.NUMBER.value, ArgKind.CONDITION.value
NORMALIZERS = tuple(nz.value for nz in Normalizer)
POINTWISE_NAMES = tuple(nz.value for nz in POINTWISE)
# how each normalizer is written, for hints
NORMALIZER_FORMS = tuple({"l1": "l1(f)", "mean": "mean(f)", "sinkhorn": "sinkhorn(k)"}.get(nz, nz)
                         for nz in NORMALIZERS)
# an extra rank's values combined by a reduction over it
_COMBINE = {"sum": sympy.Add, "max": sympy.Max, "min": sympy.Min}
# The language's own names, and the keyword arguments of a compiled kernel's call (a tensor is
# passed by its name: one called `block_mask` could not be).
RESERVED = {"b", "h", "m", "n", "e", "f", "B", "H", "M", "N", "q", "k", "v", "scale",
            "Q", "K", "V", QK, "return_lse", "block_mask"}


@dataclass
class _Scope:
    """Names visible in an expression and what they mean."""

    options: dict[str, sympy.Expr] = field(default_factory=dict)
    lets: dict[str, tuple[sympy.Expr, str]] = field(default_factory=dict)
    tensors: dict[str, TensorDecl] = field(default_factory=dict)
    cascade_tensors: dict[str, tuple[str, ...]] = field(default_factory=dict)
    allow_dot: bool = False
    in_cascade: bool = False
    declared: dict[str, lark.Token] = field(default_factory=dict)  # option/tensor/let names
    used: set[str] = field(default_factory=set)  # the declared names an expression read
    unroll: _Unroll | None = None  # a cascade block's einsums and extra ranks
    in_mask: bool = False  # lowering a cascade's mask: no einsum may be read
    # an attention block's statements around its score (frontends/lower_around.py): dots
    # beyond dot(q, k), and `d` as a declared dimension (the head dim D)
    around: AroundLowering | None = None
    feature_index: bool = False  # lowering an l2norm's gain: `d` is the feature index
    mix_heads: bool = False  # lowering premix / postmix: `g` is the other head
    operands: dict[str, Side] = field(default_factory=dict)  # declared operands
    # each dot(x, y) read so far: QK[m, n] for dot(q, k), a placeholder symbol for the others
    dots: dict[tuple[str, str], sympy.Expr] = field(default_factory=dict)


@dataclass
class _Unroll:
    """A cascade block's lowering state: its extra ranks and their bindings where lowering is,
    the einsums built so far (in order), and the copy of each tensor per extra-rank values."""

    einsum_names: dict[str, lark.Token]  # every einsum statement's name, defined yet or not
    taken: set[str]  # names fresh ones must avoid
    ranks: dict[str, int] = field(default_factory=dict)  # extra rank -> size
    bound: dict[str, int] = field(default_factory=dict)  # extra rank -> its value here
    read: set[str] = field(default_factory=set)  # extra ranks the current statement read
    copies: dict[str, dict[tuple[int, ...], str]] = field(default_factory=dict)
    nodes: list[Einsum] = field(default_factory=list)
    origins: list[Origin] = field(default_factory=list)
    hoisted: dict[tuple, str] = field(default_factory=dict)  # (op, over, ranks, expr) -> name
    # the nested reductions of the current statement: id -> (token, op, over, ranks used)
    nested: dict[int, tuple[lark.Token, str, tuple[str, ...], set[str]]] = field(
        default_factory=dict)
    target: str = ""  # the einsum being lowered, which names the reductions it hoists

    @contextmanager
    def binding(self, ranks: tuple[str, ...], values: tuple[int, ...]):
        self.bound.update(zip(ranks, values))
        try:
            yield
        finally:
            for r in ranks:
                del self.bound[r]


class _Lowerer:
    reserved: frozenset[str] = frozenset(RESERVED)  # names no declaration may take

    def __init__(self, source: str, filename: str, overrides: dict):
        self.source = source
        self.filename = filename
        self.overrides = dict(overrides)
        self.guard = limits.ExprGuard()  # the bounds of frontends/limits.py, per node

    # --- errors -----------------------------------------------------------------------------
    def error(self, node, message: str, hint: str = "") -> SpecError:
        line, col = _position(node)
        return SpecError(message, source=self.source, filename=self.filename, line=line,
                         column=col, hint=hint)

    # --- blocks -----------------------------------------------------------------------------
    def block(self, tree: lark.Tree):
        blocks = tree.children
        if len(blocks) != 1:
            raise self.error(blocks[1], "a spec holds exactly one block",
                             hint="put each variant in its own file or string")
        blk = blocks[0]
        if blk.data == "linear":
            from attnc.frontends.lower_linear import lower_linear
            return lower_linear(self, blk)
        if blk.data == "attention" and any(isinstance(st, lark.Tree) and st.data in (
                "branch", "combine") for st in blk.children[1:]):
            from attnc.frontends.lower_branches import lower_branches
            return lower_branches(self, blk)
        return self.attention(blk) if blk.data == "attention" else self.cascade(blk)

    def _declarations(self, stmts, scope: _Scope) -> list:
        """Handle option/param/input statements; return the remaining statements in order."""
        rest = []
        for st in stmts:
            if st.data == "option":
                for od in st.children:
                    self._option(od, scope)
                    scope.declared[str(od.children[0])] = od.children[0]
            elif st.data in ("param", "input"):
                for td in st.children:
                    decl = self._tensor_decl(td, str(st.data), scope)
                    scope.tensors[decl.name] = decl
                    scope.declared[decl.name] = td.children[0]
            else:
                rest.append(st)
        unknown = set(self.overrides) - set(scope.options)
        if unknown:
            declared = ", ".join(sorted(scope.options)) or "none"
            raise SpecError(f"unknown option {sorted(unknown)[0]!r}; this spec declares: "
                            f"{declared}", filename=self.filename)
        return rest

    def attention(self, blk: lark.Tree) -> AttentionSpec:
        """One attention block without branches (a branched block goes through `block`, which
        hands it to frontends/lower_branches.py; that lowers each branch here)."""
        name = str(blk.children[0])
        scope = _Scope()
        around = scope.around = AroundLowering(self, scope)
        stmts = self._declarations(blk.children[1:], scope)
        for st in stmts:
            if st.data == "operand":
                around.declare(st)
        score = mask = weight = sink = None
        normalize: tuple[Normalizer, Normalizer | None, int] = (Normalizer.SOFTMAX, None, 0)
        seen: dict[str, lark.Tree] = {}
        for st in stmts:
            kind = st.data
            if kind == "operand":
                continue
            if kind == "assign":
                around.assign(st)
                continue
            if kind == "let":
                tok, body = st.children
                if str(tok) in RESERVED or str(tok) in scope.options or str(tok) in scope.lets \
                        or str(tok) in scope.operands:
                    raise self.error(tok, f"'{tok}' is already defined")
                scope.allow_dot = True
                scope.lets[str(tok)] = self.expr(body, scope)
                scope.declared[str(tok)] = tok
                scope.allow_dot = False
                continue
            if kind in seen:
                raise self.error(st, f"'{kind}' is given twice",
                                 hint=f"first given on line {_position(seen[kind])[0]}")
            seen[kind] = st
            if kind in ("score", "weight"):
                scope.allow_dot = True
                value = self.expect(st.children[0], scope, NUM, str(kind))
                scope.allow_dot = False
                score, weight = (value, weight) if kind == "score" else (score, value)
            elif kind == "mask":
                mask = around.mask(st.children[0])
                around.no_dots(mask, st.children[0], "mask")
            elif kind in STATEMENTS:
                around.statement(str(kind), st)
            elif kind == "sink":
                sink = self._sink(st.children[0], scope)
            elif kind == "normalize":
                normalize = self._normalizer(st, scope)
            else:  # pragma: no cover - the grammar admits nothing else
                raise self.error(st, f"unexpected statement {kind}")
        nz, pointwise, iterations = normalize
        if "sink" in seen and nz is not Normalizer.SOFTMAX:
            raise self.error(seen["sink"], f"a sink needs normalize = softmax, this block "
                             f"normalizes with {nz.value}",
                             hint="a sink is a logit added to the softmax's denominator")
        if "weight" in seen and nz in (Normalizer.STANDARDIZE, Normalizer.SINKHORN):
            raise self.error(seen["weight"], f"a weight cannot follow normalize = {nz.value}",
                             hint="a weight multiplies the weights of softmax, a pointwise "
                                  "function, l1(f) or mean(f)")
        if score is None:
            score = S.access(QK, S.m, S.n) * S.scale
        dots = Around().dots
        if "score" in seen:
            score, dots = around.combine_dots(score, seen["score"].children[0])
        if weight is not None:
            around.no_dots(weight, seen["weight"].children[0], "weight")
        if mask is sympy.true:
            mask = None
        self._check_declarations_used(scope)
        origins = (_origin("", blk),) + tuple(
            _origin(kind, seen[kind]) for kind in ("score", "mask", "normalize", "weight", "sink")
            if kind in seen) + tuple(around.origins)
        return AttentionSpec(name=name, decls=tuple(scope.tensors.values()), score=score,
                             mask=mask, normalize=nz, options=tuple(scope.options.items()),
                             origins=origins, pointwise=pointwise, iterations=iterations,
                             weight=weight, sink=sink, around=around.around(dots))

    def _normalizer(self, st: lark.Tree, scope: _Scope
                    ) -> tuple[Normalizer, Normalizer | None, int]:
        """`normalize = name` or `name(arg)`: (normalizer, pointwise f, iterations)."""
        tok, *arg = st.children
        name = str(tok)
        if name not in NORMALIZERS:
            raise self.error(tok, f"normalizer '{tok}' is not supported",
                             hint="supported: " + ", ".join(NORMALIZER_FORMS))
        nz = Normalizer(name)
        if nz in (Normalizer.L1, Normalizer.MEAN):
            if not arg:
                raise self.error(tok, f"{name} takes the function it normalizes: {name}(f)",
                                 hint="f is one of " + ", ".join(POINTWISE_NAMES))
            if str(arg[0]) not in POINTWISE_NAMES:
                raise self.error(arg[0], f"{name}({arg[0]}): the function must be one of "
                                 + ", ".join(POINTWISE_NAMES))
            return nz, Normalizer(str(arg[0])), 0
        if nz is Normalizer.SINKHORN:
            if not arg:
                raise self.error(tok, "sinkhorn takes its number of iterations: sinkhorn(k)")
            assert isinstance(arg[0], lark.Token)
            return nz, None, self._iterations(arg[0], scope)
        if arg:
            raise self.error(arg[0], f"normalizer {name} takes no argument")
        return nz, None, 0

    def _iterations(self, tok: lark.Token, scope: _Scope) -> int:
        """sinkhorn's k: a positive integer literal or option, at most the limit."""
        if tok.type == "NUMBER":
            k = self._literal(tok)
        elif str(tok) in scope.options:
            scope.used.add(str(tok))
            k = scope.options[str(tok)]
        else:
            raise self.error(tok, f"unknown name '{tok}'",
                             hint="sinkhorn's iterations are a number or an option")
        if not (k.is_Integer and 1 <= k <= limits.MAX_SINKHORN_ITERATIONS):
            given = (f" (with {tok} = {self.overrides[str(tok)]!r} given by the caller)"
                     if str(tok) in self.overrides else "")
            raise self.error(tok, f"sinkhorn takes 1 to {limits.MAX_SINKHORN_ITERATIONS} "
                                  f"iterations, got {k}{given}")
        return int(k)

    def _sink(self, node, scope: _Scope) -> sympy.Expr:
        """A per-row logit: the score's language without q.k and n."""
        sink = self.expect(node, scope, NUM, "sink")
        if S.n in sink.free_symbols:
            raise self.error(node, "a sink is one logit per row: it cannot depend on n",
                             hint="write it in b, h, m, params and options, e.g. sinks[h]")
        return sink

    def cascade(self, blk: lark.Tree) -> Cascade:
        name = str(blk.children[0])
        scope = _Scope(in_cascade=True, cascade_tensors=dict(S.OPERANDS))
        stmts = self._declarations(blk.children[1:], scope)
        einsums: dict[str, lark.Token] = {}
        for st in stmts:
            if st.data == "einsum":
                einsums.setdefault(str(st.children[0]), st.children[0])
        state = scope.unroll = _Unroll(
            einsum_names=einsums,
            taken=set(RESERVED) | set(scope.options) | set(scope.tensors) | set(einsums),
            copies={op: {(): op} for op in S.OPERANDS})
        groups: list[tuple[lark.Tree, list[str]]] = []  # each einsum statement and its nodes
        mask, mask_st = None, None
        for st in stmts:
            if st.data == "rank":
                self._rank(st, scope)
            elif st.data == "mask":
                if mask_st is not None:
                    raise self.error(st, "'mask' is given twice",
                                     hint=f"first given on line {_position(mask_st)[0]}")
                mask, mask_st = self._cascade_mask(st, scope), st
            else:
                groups.append((st, self._einsum(st, scope)))
        if not groups:
            raise self.error(blk, f"cascade {name} defines no einsum")
        last, _ = groups[-1]
        out_ranks = scope.cascade_tensors[str(last.children[0])]
        if out_ranks != ("m", "f"):
            raise self.error(last, f"the output {last.children[0]} is indexed "
                             f"[{', '.join(out_ranks)}]; a cascade's output is indexed [m, f]",
                             hint="the last einsum is the output: O[m, f] = ...")
        nodes = self._reachable(state.nodes, groups)
        if mask_st is not None and not any(
                nd.reduce is not None and set(nd.over) & {"m", "n"} for nd in nodes):
            raise self.error(mask_st, "the mask has no effect: no einsum reduces or scans "
                             "over m or n")
        self._check_declarations_used(scope)
        live = {nd.name for nd in nodes}
        origins = [_origin("", blk)] + ([_origin("mask", mask_st)] if mask_st else []) + [
            o for o in state.origins if o.tensor in live]
        return Cascade(name=name, decls=OPERAND_DECLS + tuple(scope.tensors.values()),
                       nodes=tuple(nodes), outputs=(("out", nodes[-1].name),),
                       options=tuple(scope.options.items()), source_kind=BlockKind.CASCADE,
                       origins=tuple(origins), mask=mask)

    def _check_declarations_used(self, scope: _Scope) -> None:
        """An option, tensor, `let` or extra rank nothing reads would be a statement without
        effect (a param whose gradient is always zero, an option whose override changes
        nothing): refused."""
        for name, tok in scope.declared.items():
            if name not in scope.used:
                what = ("option" if name in scope.options else "let" if name in scope.lets
                        else scope.tensors[name].kind.value if name in scope.tensors
                        else "operand" if name in scope.operands else "rank")
                hint = (f"remove it, or read {name} in the score, mask or an einsum"
                        if what != "operand" else
                        f"remove it, or dot it in the score (dot(q, {name}) or dot({name}, k)) "
                        f"or make it the value (v = {name})")
                raise self.error(tok, f"{what} {name} is declared but never used", hint=hint)

    def _reachable(self, nodes: list[Einsum], groups) -> list[Einsum]:
        """The einsums the output (the last) reads, directly or not, in order. The last einsum
        is the output; every other statement must reach it through one of its copies: one
        whose value reaches nothing would compile to a kernel that silently ignores it."""
        by_name = {nd.name: nd for nd in nodes}
        live: set[str] = set()
        stack = [nodes[-1].name]
        while stack:
            name = stack.pop()
            if name in by_name and name not in live:
                live.add(name)
                stack.extend(reads(by_name[name]))
        for st, names in reversed(groups[:-1]):
            if not live & set(names):
                out = groups[-1][0].children[0]
                raise self.error(st, f"{st.children[0]} is computed but never used",
                                 hint=f"the cascade's output is its last einsum, {out}; remove "
                                      f"{st.children[0]} or use it")
        return [nd for nd in nodes if nd.name in live]

    # --- statements -------------------------------------------------------------------------
    def _option(self, od: lark.Tree, scope: _Scope) -> None:
        tok, num = od.children
        name = str(tok)
        if name in self.reserved or name in scope.options:
            raise self.error(tok, f"option name '{name}' is "
                             + ("reserved" if name in self.reserved else "declared twice"))
        value = self._literal(num.children[0])
        if num.data == "neg_number":
            value = -value
        if name in self.overrides:
            # the caller's value has no place in the spec: its errors name the option instead
            try:
                value = limits.check_option_override(name, self.overrides[name],
                                                     integer=isinstance(value, sympy.Integer))
            except limits.Refused as err:
                raise SpecError(err.message, filename=self.filename) from None
        scope.options[name] = value

    def _tensor_decl(self, td: lark.Tree, kind: str, scope: _Scope) -> TensorDecl:
        tok, *dims = td.children
        name = str(tok)
        if name in self.reserved or name in scope.tensors or name in scope.options:
            raise self.error(tok, f"tensor name '{name}' is "
                             + ("reserved" if name in self.reserved else "already declared"))
        sizes: list[sympy.Expr] = []
        for d in dims:
            val = self.expect(d, scope, NUM, "dimension", decl=True)
            if not val.is_integer:
                raise self.error(d, "a dimension must be an integer expression")
            if val.is_positive is False:
                raise self.error(d, f"dimension {len(sizes) + 1} of {name} is {val}, not "
                                    f"positive{self._overridden_in(d)}")
            sizes.append(val)
        return TensorDecl(name, TensorKind(kind), tuple(sizes))

    def _overridden_in(self, node) -> str:
        """` (with window = 3 given by the caller)` for the caller's options `node` reads: a
        value outside the spec is named where the error shows the spec."""
        names = sorted({str(t) for t in node.scan_values(lambda v: isinstance(v, lark.Token))
                        if str(t) in self.overrides})
        given = ", ".join(f"{n} = {self.overrides[n]!r}" for n in names)
        return f" (with {given} given by the caller)" if given else ""

    def _rank(self, st: lark.Tree, scope: _Scope) -> None:
        """`rank c = <size>`: an extra rank of 1 to limits.MAX_RANK_SIZE values."""
        tok, body = st.children
        assert isinstance(tok, lark.Token)
        name = str(tok)
        state = scope.unroll
        assert state is not None
        if (name in self.reserved or name in S.RANKS or name in scope.options
                or name in scope.tensors or name in state.ranks or name in state.einsum_names):
            raise self.error(tok, f"'{name}' is already defined")
        size = self.expect(body, scope, NUM, "rank size")
        if not size.is_Integer:
            raise self.error(body, f"the size of rank {name} must be an integer of numbers and "
                                   f"options, got {size}")
        if not 1 <= size <= limits.MAX_RANK_SIZE:
            raise self.error(body, f"rank {name} has {size} values; an extra rank has 1 to "
                                   f"{limits.MAX_RANK_SIZE}{self._overridden_in(body)}",
                             hint="extra ranks are unrolled into one einsum per value")
        state.ranks[name] = int(size)
        state.taken.add(name)
        scope.declared[name] = tok

    def _cascade_mask(self, st: lark.Tree, scope: _Scope) -> sympy.Expr | None:
        """A cascade's `mask`: which (m, n) pairs its reductions and scans see."""
        body = st.children[0]
        scope.in_mask = True
        try:
            mask = self.expect(body, scope, BOOL, "mask")
        finally:
            scope.in_mask = False
        wrong = [r for r in ("e", "f") if S.RANKS[r] in mask.free_symbols]
        if wrong:
            raise self.error(body, f"a mask is a condition on (m, n) pairs: it cannot use "
                                   f"rank {wrong[0]}")
        return None if mask is sympy.true else mask

    def _einsum(self, st: lark.Tree, scope: _Scope) -> list[str]:
        """Lower an einsum statement into one einsum per value of its extra ranks (after the
        reductions it hoists); returns their names."""
        state = scope.unroll
        assert state is not None
        kids = list(st.children)
        name_tok = kids.pop(0)
        name = str(name_tok)
        rank_toks = []
        while kids and isinstance(kids[0], lark.Token) and kids[0].type == "NAME":
            rank_toks.append(kids.pop(0))
        body = kids[0]
        reduction = None
        if body.data == "reduce":  # a cascade's reduction prefixes the whole right side
            reduction, body = body.children
        if (name in scope.cascade_tensors or name in scope.tensors or name in scope.options
                or name in state.ranks or name in RESERVED - {"QK"}):
            raise self.error(name_tok, f"'{name}' is already defined")
        for r in rank_toks:
            if str(r) not in S.RANKS and str(r) not in state.ranks:
                also = f", and the extra ranks {', '.join(state.ranks)}" if state.ranks else ""
                raise self.error(r, f"unknown rank '{r}'", hint=f"ranks are m, n, e, f{also}")
        out_ranks = tuple(str(r) for r in rank_toks)
        if len(set(out_ranks)) != len(out_ranks):
            raise self.error(name_tok, "a rank appears twice on the left")
        left = tuple(r for r in out_ranks if r in S.RANKS)
        extra = tuple(r for r in out_ranks if r not in S.RANKS)
        op: str | None = None
        over: tuple[str, ...] = ()
        extra_over: tuple[str, ...] = ()
        if reduction is not None:
            op, over, extra_over = self._reduction(reduction, state, extra)
        copies: dict[tuple[int, ...], str] = {}
        exprs = []
        for values in itertools.product(*(range(state.ranks[r]) for r in extra)):
            copy = (fresh_name(name + "".join(f"_{r}{v}" for r, v in zip(extra, values)),
                               state.taken) if extra else name)
            state.target, state.read = copy, set()
            with state.binding(extra, values):
                exprs.append(self._combine(body, scope, op, extra_over))
            unread = [t for t in rank_toks if str(t) in extra and str(t) not in state.read]
            if unread:
                raise self.error(unread[0], f"rank {unread[0]} of {name} is not used on the "
                                            "right side",
                                 hint="every rank on the left must appear on the right")
            copies[values] = copy
        self._check_hoisted(state)
        # checked over all copies at once: a copy's expression may have lost a rank to its
        # value (`QK[m, n] * c` is 0 for c = 0)
        used = {r for ex in exprs for r in _ranks_of(ex)}
        red, over = self._einsum_reduction(left, used, op, over, reduction, rank_toks, body,
                                           name)
        for copy, expr in zip(copies.values(), exprs):
            self._add(state, Einsum(copy, left, expr, red, over), st)
        scope.cascade_tensors[name] = out_ranks
        state.copies[name] = copies
        return list(copies.values())

    def _einsum_reduction(self, left: tuple[str, ...], used: set[str], op: str | None,
                          over: tuple[str, ...], reduction, rank_toks, body, name: str
                          ) -> tuple[Reduce | None, tuple[str, ...]]:
        """The reduction of `name[left] = op(over) ...`, whose right side uses the ranks
        `used`, checked: without an explicit reduction, the ranks that appear only on the
        right are summed; with one, it reduces exactly those (a scan: none, and its rank stays
        on the left); every rank on the left appears on the right."""
        implicit = tuple(r for r in ("m", "n", "e", "f") if r in used and r not in left)
        if op is not None and Reduce(op).is_scan:
            if over[0] not in left:
                raise self.error(reduction, f"{op}({over[0]}) keeps rank {over[0]}: it must be "
                                            "on the left",
                                 hint=f"a scan's result has the ranks of its operand; sum over "
                                      f"{over[0]} with sum({over[0]})")
            if over[0] not in used:
                raise self.error(reduction, f"{op}({over[0]}) scans rank {over[0]}, which its "
                                            "operand does not have")
            if implicit:
                raise self.error(body, f"rank {implicit[0]} appears only on the right of a "
                                       "scan, which reduces nothing",
                                 hint=f"reduce it inside: {op}({over[0]}) sum({implicit[0]}) ...")
        elif op is not None and (over or implicit):
            lacking = [r for r in over if r not in used]
            if lacking and set(implicit) <= set(over):
                raise self.error(reduction, f"{op}({', '.join(over)}) reduces rank "
                                            f"{lacking[0]}, which its operand does not have")
            if set(over) != set(implicit):
                raise self.error(reduction, f"{reduction} must reduce exactly the ranks that "
                                 f"appear only on the right: ({', '.join(implicit)})")
        else:
            op, over = Reduce.SUM.value, implicit
        for t in rank_toks:
            # a sum over n kept per row m (sum(n) V[n, f]) is a row's value: which keys it
            # sees depends on m through the mask, so m may stand on the left unused (and n
            # for a sum over m)
            partner = {"m": "n", "n": "m"}.get(str(t))
            if str(t) in left and str(t) not in used and partner not in over:
                raise self.error(t, f"rank {t} of {name} is not used on the right side",
                                 hint="every rank on the left must appear on the right")
        return (Reduce(op) if over else None), tuple(over)

    def _check_hoisted(self, state: _Unroll) -> None:
        """A nested reduction must reduce ranks its operand has, in at least one of the copies
        it was lowered for (one copy's operand may have lost them to its value)."""
        for red, op, over, used in state.nested.values():
            lacking = [r for r in over if r not in used]
            if lacking:
                raise self.error(red, f"{op}({', '.join(over)}) reduces rank {lacking[0]}, "
                                      "which its operand does not have")
        state.nested.clear()

    def _add(self, state: _Unroll, node: Einsum, where) -> None:
        if len(state.nodes) >= limits.MAX_CASCADE_EINSUMS:
            raise self.error(where, f"the cascade unrolls into more than "
                                    f"{limits.MAX_CASCADE_EINSUMS} einsums",
                             hint="use fewer or smaller extra ranks")
        state.nodes.append(node)
        state.origins.append(_origin(node.name, where))

    def _reduction(self, red: lark.Token, state: _Unroll, left_extra: tuple[str, ...] = ()
                   ) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
        """A REDUCTION token: (op, the ranks of m, n, e, f it reduces, the extra ranks)."""
        op, args = str(red).split("(", 1)
        over = tuple(a.strip() for a in args.rstrip(")").split(","))
        bad = [r for r in over if r not in S.RANKS and r not in state.ranks]
        if bad:
            raise self.error(red, f"unknown rank '{bad[0]}' in reduction")
        if len(set(over)) != len(over):
            raise self.error(red, "a rank appears twice in the reduction")
        extra = tuple(r for r in over if r in state.ranks)
        taken = [r for r in extra if r in state.bound or r in left_extra]
        if taken:
            raise self.error(red, f"rank {taken[0]} is bound here (by the left side or an "
                                  "enclosing reduction): it cannot be reduced again")
        real = tuple(r for r in over if r in S.RANKS)
        if Reduce(op).is_scan and (extra or len(real) != 1 or real[0] not in ("m", "n")):
            raise self.error(red, f"{op} scans one rank, m or n",
                             hint=f"write {op}(n) ... or {op}(m) ...")
        return op, real, extra

    def _combine(self, body, scope: _Scope, op: str | None, extra: tuple[str, ...]):
        """`body` lowered, or for a reduction over extra ranks the Add / Max / Min of its
        copies, one per value of those ranks."""
        if not extra:
            return self.expect(body, scope, NUM, "einsum")
        state = scope.unroll
        assert state is not None and op is not None
        scope.used.update(extra)
        terms = []
        for values in itertools.product(*(range(state.ranks[r]) for r in extra)):
            with state.binding(extra, values):
                terms.append(self.expect(body, scope, NUM, "einsum"))
        return _COMBINE[op](*terms)

    # --- expressions ------------------------------------------------------------------------
    def expect(self, node, scope: _Scope, kind: str, what: str, decl: bool = False):
        val, typ = self.expr(node, scope, decl)
        if typ != kind:
            raise self.error(node, f"{what} must be a {kind} expression, this is a {typ}",
                             hint="a mask is a condition like `n <= m`; a score is a number"
                             if what in ("mask", "score") else "")
        return val

    def expr(self, node, scope: _Scope, decl: bool = False):
        """Lower an expression node to (sympy value, kind), within frontends/limits.py's
        bounds: each node is checked as it is built, so an error points at the smallest
        expression that crosses one."""
        try:
            value, kind = self._lower(node, scope, decl)
        except SpecError:
            raise
        except (TypeError, ValueError, ArithmeticError) as err:
            # sympy failing to build a well-formed expression (its simplification of a
            # Piecewise may evaluate a subexpression at a point where it is undefined)
            line, column = _position(node)
            raise CompileError(f"sympy cannot build this expression ({type(err).__name__}: "
                               f"{err})", source=self.source, filename=self.filename,
                               line=line, column=column) from None
        try:
            return self.guard.admit(value), kind
        except limits.Refused as err:
            raise self.error(node, err.message, err.hint) from None

    def _literal(self, tok):
        try:
            return limits.literal(str(tok))
        except limits.Refused as err:
            raise self.error(tok, err.message, err.hint) from None

    def _lower(self, node, scope: _Scope, decl: bool):
        if isinstance(node, lark.Token):  # pragma: no cover - the grammar wraps tokens
            raise self.error(node, f"unexpected token {node}")
        rule = node.data
        kids = node.children
        if rule == "number":
            return self._literal(kids[0]), NUM
        if rule == "name":
            return self._name(kids[0], scope, decl)
        if rule == "neg":
            return -self.expect(kids[0], scope, NUM, "operand of '-'", decl), NUM
        if rule == "factor":  # unary plus
            return self.expect(kids[0], scope, NUM, "operand of '+'", decl), NUM
        if rule == "pow":
            base = self.expect(kids[0], scope, NUM, "base", decl)
            exp = self.expect(kids[1], scope, NUM, "exponent", decl)
            try:
                limits.check_power(base, exp)  # before sympy computes 2 ** 2 ** 65536 exactly
            except limits.Refused as err:
                raise self.error(node, err.message, err.hint) from None
            return base ** exp, NUM
        if rule == "binop":
            a = self.expect(kids[0], scope, NUM, f"left operand of '{kids[1]}'", decl)
            c = self.expect(kids[2], scope, NUM, f"right operand of '{kids[1]}'", decl)
            op = str(kids[1])
            # is_zero, not == 0: sympy's Float 0.0 does not equal its Integer 0
            if op in ("/", "//", "%") and c.is_zero:
                raise self.error(kids[1], "division by zero")
            return {"+": lambda: a + c, "-": lambda: a - c, "*": lambda: a * c,
                    "/": lambda: a / c, "//": lambda: sympy.floor(a / c),
                    "%": lambda: sympy.Mod(a, c)}[op](), NUM
        if rule == "compare":
            a = self.expect(kids[0], scope, NUM, "comparison operand", decl)
            c = self.expect(kids[2], scope, NUM, "comparison operand", decl)
            return S.compare(str(kids[1]), a, c), BOOL
        if rule in ("and_", "or_"):
            a = self.expect(kids[0], scope, BOOL, f"operand of '{rule[:-1]}'", decl)
            c = self.expect(kids[1], scope, BOOL, f"operand of '{rule[:-1]}'", decl)
            return (sympy.And(a, c) if rule == "and_" else sympy.Or(a, c)), BOOL
        if rule == "not_":
            return sympy.Not(self.expect(kids[0], scope, BOOL, "operand of 'not'", decl)), BOOL
        if rule == "call":
            return self._call(node, scope, decl)
        if rule == "access":
            return self._access(node, scope, decl)
        if rule == "member":
            raise self.error(node, "`in` (gathered keys) is only allowed as a top-level `and` "
                                   "conjunct of a mask",
                             hint="mask = n <= m and n in idx[b, h, m, :]")
        if rule == "reduce":
            return self._reduce(node, scope, decl)
        raise self.error(node, f"unsupported expression '{rule}'")  # pragma: no cover

    def _reduce(self, node, scope: _Scope, decl: bool):
        """A reduction or scan inside an expression: in a cascade, hoisted into an einsum of its
        own (shared with an identical one) whose access takes its place."""
        state = scope.unroll
        red, body = node.children
        if state is None:
            raise self.error(node, "a reduction is only allowed in a cascade block")
        if scope.in_mask:
            raise self.error(node, "a mask cannot reduce",
                             hint="a mask is a condition on m, n, options and declared tensors")
        op, over, extra = self._reduction(red, state)
        expr = self._combine(body, scope, op, extra)
        if not over:
            return expr, NUM
        used = _ranks_of(expr)
        # checked once the statement is lowered, over every copy (see _check_hoisted)
        seen = state.nested.setdefault(id(red), (red, op, over, set()))[3]
        seen.update(used)
        kept = used | set(over) if Reduce(op).is_scan else used - set(over)
        ranks = tuple(r for r in ("m", "n", "e", "f") if r in kept)
        key = (op, over, ranks, expr)
        name = state.hoisted.get(key)
        if name is None:
            name = state.hoisted[key] = fresh_name(f"{state.target}_{op}", state.taken)
            self._add(state, Einsum(name, ranks, expr, Reduce(op), over), red)
        return S.access(name, *(S.RANKS[r] for r in ranks)), NUM

    def _name(self, tok, scope: _Scope, decl: bool):
        name = str(tok)
        state = scope.unroll
        if state is not None and name in state.ranks:
            if name not in state.bound:
                raise self.error(tok, f"rank {name} is not bound here",
                                 hint=f"put {name} on the left, or reduce over it: "
                                      f"sum({name}) ...")
            scope.used.add(name)
            state.read.add(name)
            return sympy.Integer(state.bound[name]), NUM
        if scope.mix_heads and name == "g":
            return g, NUM
        if name in scope.options or name in scope.lets:
            scope.used.add(name)
            return (scope.options[name], NUM) if name in scope.options else scope.lets[name]
        if name == "d" and scope.around is not None:
            if decl:
                return S.D, NUM
            if scope.feature_index:
                return S.d, NUM
            raise self.error(tok, "'d' (the feature index) is only allowed in an l2norm's gain "
                                  "and as a declared dimension",
                             hint="l2norm(q, g[h, d]) with param g[h, d]; as a dimension, d is "
                                  "the head dim D of q and k")
        if decl:
            if name in S.INDEX:
                return S.SIZE_OF[S.INDEX[name]], NUM
            if name in ("M", "N", "B", "H"):
                return S.SIZES[name], NUM
            raise self.error(tok, f"'{name}' cannot size a tensor",
                             hint="dimensions use b, h, m, n (their extents), M, N, numbers "
                                  "and options")
        if name in S.INDEX or (scope.in_cascade and name in S.RANKS):
            return (S.INDEX.get(name) or S.RANKS[name]), NUM
        if name in ("M", "N"):
            return S.SIZES[name], NUM
        if name == "scale":
            return S.scale, NUM
        if name in ("q", "k", "v") or name in scope.operands:
            raise self.error(tok, f"'{name}' is not a number here",
                             hint="the query-key product is written dot(q, k)")
        if name in scope.tensors or name in scope.cascade_tensors:
            raise self.error(tok, f"tensor '{name}' must be indexed",
                             hint=f"write {name}[...]")
        if name in ("true", "false"):
            return (sympy.true if name == "true" else sympy.false), BOOL
        raise self.error(tok, f"unknown name '{name}'",
                         hint="names in scope: b, h, m, n, M, N, scale, options "
                              f"({', '.join(scope.options) or 'none'}) and declared tensors")

    def _call(self, node, scope: _Scope, decl: bool):
        tok, *args = node.children
        fn = str(tok)
        if fn == "dot":
            if not scope.allow_dot:
                raise self.error(tok, "dot(q, k) is only allowed in a score, a weight or a let")
            if scope.around is not None:
                return scope.around.dot(node), NUM
            if [str(a.children[0]) if isinstance(a, lark.Tree) and a.data == "name" else None
                    for a in args] != ["q", "k"]:
                raise self.error(node, "dot takes exactly (q, k)")
            return S.access(QK, S.m, S.n), NUM
        if fn in PROLOGUE_CALLS:
            raise self.error(tok, f"{fn} is only allowed in a prologue",
                             hint=f"transform an operand with an assignment, e.g. "
                                  f"q = {fn}(q, ...), then dot it in the score")
        if len(args) > limits.MAX_CALL_ARGS:
            raise self.error(node, f"{fn} takes at most {limits.MAX_CALL_ARGS} arguments here, "
                                   f"got {len(args)}", hint="nest the calls: max(max(...), ...)")
        entry = BY_NAME.get(fn)
        if entry is None:
            raise self.error(tok, f"unknown function '{fn}'",
                             hint="functions: " + ", ".join(sorted(set(BY_NAME) | {"dot"})))
        if len(args) < len(entry.args) or (len(args) > len(entry.args) and not entry.variadic):
            least = "at least " if entry.variadic else ""
            count = len(entry.args)
            raise self.error(node, f"{fn} takes {least}{count} argument{'s' * (count > 1)}, "
                                   f"got {len(args)}")
        kinds = list(entry.args) + [entry.args[-1]] * (len(args) - len(entry.args))
        vals = [self.expect(a, scope, kind.value, _argument(fn, i), decl)
                for i, (a, kind) in enumerate(zip(args, kinds))]
        return entry.build(*vals), NUM

    def _access(self, node, scope: _Scope, decl: bool):
        tok, *idx = node.children
        name = str(tok)
        if name in scope.cascade_tensors and scope.in_cascade:
            return self._cascade_access(node, scope), NUM
        state = scope.unroll
        if state is not None and name in state.einsum_names and name not in scope.tensors:
            line = state.einsum_names[name].line
            raise self.error(tok, f"{name} is read before it is defined",
                             hint=f"{name} is defined on line {line}; an einsum reads only "
                                  "tensors defined above it (a cascade has no cycles)")
        if name not in scope.tensors:
            raise self.error(tok, f"unknown tensor '{name}'",
                             hint="declare it with `param` or `input`")
        scope.used.add(name)
        dims = scope.tensors[name].dims
        if len(idx) != len(dims):
            raise self.error(node, f"{name} has {len(dims)} dimension{'s' * (len(dims) != 1)}, "
                                   f"indexed with {len(idx)}")
        vals = []
        for i in idx:
            v = self.expect(i, scope, NUM, "index", decl)
            if not v.is_integer:
                raise self.error(i, f"an index of {name} must be an integer expression")
            vals.append(v)
        return S.access(name, *vals), NUM


    def _cascade_access(self, node, scope: _Scope) -> sympy.Indexed:
        """X[m, n] of a cascade tensor: indexed by its own rank names, in order; at an extra
        rank, any constant index of it (a bound rank, a number, an option) picks the copy."""
        tok, *idx = node.children
        name = str(tok)
        if scope.in_mask:
            raise self.error(tok, f"a mask cannot read {name}",
                             hint="a mask is a condition on m, n, options and declared "
                                  "params and inputs")
        state = scope.unroll
        assert state is not None
        ranks = scope.cascade_tensors[name]
        got, key = [], []
        for pos, i in enumerate(idx):
            if pos < len(ranks) and ranks[pos] in state.ranks:
                key.append(self._copy_index(i, name, ranks[pos], scope))
                got.append(ranks[pos])
                continue
            if not (isinstance(i, lark.Tree) and i.data == "name"
                    and str(i.children[0]) in S.RANKS):
                raise self.error(i, f"{name} is indexed by rank names ({', '.join(ranks)})")
            got.append(str(i.children[0]))
        if tuple(got) != ranks:
            raise self.error(node, f"{name} is indexed [{', '.join(ranks)}], "
                                   f"got [{', '.join(got)}]")
        return S.access(state.copies[name][tuple(key)],
                        *(S.RANKS[r] for r in ranks if r in S.RANKS))

    def _copy_index(self, node, name: str, rank: str, scope: _Scope) -> int:
        state = scope.unroll
        assert state is not None
        value = self.expect(node, scope, NUM, "index")
        size = state.ranks[rank]
        if not (value.is_Integer and 0 <= value < size):
            raise self.error(node, f"{name}'s index along rank {rank} must be a constant in "
                                   f"0..{size - 1}, got {value}",
                             hint=f"write {rank}, a number or an option")
        return int(value)


def _ranks_of(expr: sympy.Expr) -> set[str]:
    """The ranks (m, n, e, f) an expression uses."""
    return {r for r, sym in S.RANKS.items() if sym in expr.free_symbols}


def _argument(fn: str, i: int) -> str:
    """How an argument is named in a type error (`condition of where`, ...)."""
    if fn == "where":
        return ("condition of where", "where's second argument", "where's third argument")[i]
    return f"argument of {fn}"


def _origin(tensor: str, node) -> Origin:
    return Origin(tensor, *_position(node))


def _position(node) -> tuple[int, int]:
    if isinstance(node, lark.Token):
        return node.line or 0, node.column or 0
    meta = getattr(node, "meta", None)
    if meta is not None and not meta.empty:
        return meta.line, meta.column
    for child in getattr(node, "children", ()):
        pos = _position(child)
        if pos[0]:
            return pos
    return 0, 0


def lower(tree: lark.Tree, source: str, filename: str = "<spec>",
          options: dict | None = None) -> AttentionSpec | Cascade | LinearScan | Branches:
    """Lower a parsed spec; `options` override the spec's `option` defaults."""
    return _Lowerer(source, filename, options or {}).block(tree)
