"""Lower a parse tree to IR: an `attention` block to an AttentionSpec, a `cascade` block to a
Cascade. Every semantic check happens here and reports the line and column of the culprit.

Expressions become sympy: `dot(q, k)` is the access QK[m, n]; `where` is a Piecewise; `//` and
`%` are floor and Mod; options are substituted as numbers (they are compile-time constants).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import lark
import sympy

from attnc.errors import CompileError, SpecError
from attnc.expr import symbols as S
from attnc.expr.functions import BY_NAME, ArgKind
from attnc.frontends import limits
from attnc.ir.cascade import (OPERAND_DECLS, QK, AttentionSpec, BlockKind, Cascade, Einsum,
                              Normalizer, Origin, Reduce, TensorDecl, TensorKind, reads)

NUM, BOOL = ArgKind.NUMBER.value, ArgKind.CONDITION.value
NORMALIZERS = tuple(nz.value for nz in Normalizer)
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
        name = str(blk.children[0])
        scope = _Scope()
        stmts = self._declarations(blk.children[1:], scope)
        score = mask = normalize = None
        seen: dict[str, lark.Tree] = {}
        for st in stmts:
            kind = st.data
            if kind == "let":
                tok, body = st.children
                if str(tok) in RESERVED or str(tok) in scope.options or str(tok) in scope.lets:
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
            if kind == "score":
                scope.allow_dot = True
                score = self.expect(st.children[0], scope, NUM, "score")
                scope.allow_dot = False
            elif kind == "mask":
                mask = self.expect(st.children[0], scope, BOOL, "mask")
            elif kind == "normalize":
                tok = st.children[0]
                if str(tok) not in NORMALIZERS:
                    raise self.error(tok, f"normalizer '{tok}' is not supported",
                                     hint="supported: " + ", ".join(NORMALIZERS))
                normalize = Normalizer(str(tok))
            else:  # pragma: no cover - the grammar admits nothing else
                raise self.error(st, f"unexpected statement {kind}")
        if score is None:
            score = S.access(QK, S.m, S.n) * S.scale
        if mask is sympy.true:
            mask = None
        self._check_declarations_used(scope)
        origins = (_origin("", blk),) + tuple(_origin(kind, seen[kind])
                                             for kind in ("score", "mask") if kind in seen)
        return AttentionSpec(name=name, decls=tuple(scope.tensors.values()), score=score,
                             mask=mask, normalize=normalize or Normalizer.SOFTMAX,
                             options=tuple(scope.options.items()), origins=origins)

    def cascade(self, blk: lark.Tree) -> Cascade:
        name = str(blk.children[0])
        scope = _Scope(in_cascade=True, cascade_tensors=dict(S.OPERANDS))
        stmts = self._declarations(blk.children[1:], scope)
        nodes, origins = [], [_origin("", blk)]
        for st in stmts:
            nodes.append(self._einsum(st, scope))
            origins.append(_origin(nodes[-1].name, st))
        if not nodes:
            raise self.error(blk, f"cascade {name} defines no einsum")
        self._check_all_used(nodes, stmts)
        self._check_declarations_used(scope)
        return Cascade(name=name, decls=OPERAND_DECLS + tuple(scope.tensors.values()),
                       nodes=tuple(nodes), outputs=(("out", nodes[-1].name),),
                       options=tuple(scope.options.items()), source_kind=BlockKind.CASCADE,
                       origins=tuple(origins))

    def _check_declarations_used(self, scope: _Scope) -> None:
        """An option, tensor or `let` nothing reads would be a statement without effect (a param
        whose gradient is always zero, an option whose override changes nothing): refused."""
        for name, tok in scope.declared.items():
            if name not in scope.used:
                what = ("option" if name in scope.options else "let" if name in scope.lets
                        else scope.tensors[name].kind.value)
                raise self.error(tok, f"{what} {name} is declared but never used",
                                 hint=f"remove it, or read {name} in the score, mask or an einsum")

    def _check_all_used(self, nodes: list[Einsum], stmts) -> None:
        """The last einsum is the output; every other must feed a later one. A statement whose
        value reaches nothing would compile to a kernel that silently ignores it."""
        read = set().union(*(reads(nd) for nd in nodes))
        for nd, st in zip(nodes[:-1], stmts):
            if nd.name not in read:
                raise self.error(st, f"{nd.name} is computed but never used",
                                 hint=f"the cascade's output is its last einsum, "
                                 f"{nodes[-1].name}; remove {nd.name} or use it")

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

    def _einsum(self, st: lark.Tree, scope: _Scope) -> Einsum:
        kids = list(st.children)
        name_tok = kids.pop(0)
        name = str(name_tok)
        reduction = None
        ranks = []
        while kids and isinstance(kids[0], lark.Token) and kids[0].type == "NAME":
            ranks.append(kids.pop(0))
        body = kids[0]
        if body.data == "reduce":  # a cascade's reduction prefixes the whole right side
            reduction, body = body.children
        if name in scope.cascade_tensors or name in scope.tensors or name in RESERVED - {"QK"}:
            raise self.error(name_tok, f"'{name}' is already defined")
        for r in ranks:
            if str(r) not in S.RANKS:
                raise self.error(r, f"unknown rank '{r}'", hint="ranks are m, n, e, f")
        out_ranks = tuple(str(r) for r in ranks)
        if len(set(out_ranks)) != len(out_ranks):
            raise self.error(name_tok, "a rank appears twice on the left")
        expr = self.expect(body, scope, NUM, "einsum")
        used = [r for r in ("m", "n", "e", "f") if S.RANKS[r] in expr.free_symbols]
        implicit = tuple(r for r in used if r not in out_ranks)
        op, over = Reduce.SUM.value, implicit
        if reduction is not None:
            op, args = str(reduction).split("(", 1)
            over = tuple(a.strip() for a in args.rstrip(")").split(","))
            bad = [r for r in over if r not in S.RANKS]
            if bad:
                raise self.error(reduction, f"unknown rank '{bad[0]}' in reduction")
            if set(over) != set(implicit):
                raise self.error(reduction, f"{op}({', '.join(over)}) must reduce exactly the "
                                 f"ranks that appear only on the right: ({', '.join(implicit)})")
        scope.cascade_tensors[name] = out_ranks
        return Einsum(name, out_ranks, expr, Reduce(op) if over else None, tuple(over))

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
        if rule == "reduce":
            return self._reduce(node, scope, decl)
        raise self.error(node, f"unsupported expression '{rule}'")  # pragma: no cover

    def _reduce(self, node, scope: _Scope, decl: bool):
        raise self.error(node, "a reduction here must prefix the whole right side",
                         hint="write `X[m] = sum(n) ...` with the reduction first")

    def _name(self, tok, scope: _Scope, decl: bool):
        name = str(tok)
        if name in scope.options or name in scope.lets:
            scope.used.add(name)
            return (scope.options[name], NUM) if name in scope.options else scope.lets[name]
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
        if name in ("q", "k", "v"):
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
                raise self.error(tok, "dot(q, k) is only allowed in a score")
            if [str(a.children[0]) if isinstance(a, lark.Tree) and a.data == "name" else None
                    for a in args] != ["q", "k"]:
                raise self.error(node, "dot takes exactly (q, k)")
            return S.access(QK, S.m, S.n), NUM
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
            ranks = scope.cascade_tensors[name]
            got = []
            for i in idx:
                if not (isinstance(i, lark.Tree) and i.data == "name"
                        and str(i.children[0]) in S.RANKS):
                    raise self.error(i, f"{name} is indexed by rank names ({', '.join(ranks)})")
                got.append(str(i.children[0]))
            if tuple(got) != ranks:
                raise self.error(node, f"{name} is indexed [{', '.join(ranks)}], "
                                       f"got [{', '.join(got)}]")
            return S.access(name, *(S.RANKS[r] for r in ranks)), NUM
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
          options: dict | None = None) -> AttentionSpec | Cascade:
    """Lower a parsed spec; `options` override the spec's `option` defaults."""
    return _Lowerer(source, filename, options or {}).block(tree)
