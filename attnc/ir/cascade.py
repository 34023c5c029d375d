"""Cascade IR: attention as a DAG of extended einsums (FuseMax's notation).

A node is an output tensor with named ranks, a sympy map expression over tensor accesses
(`sympy.Indexed`) and index symbols, and an optional reduction over some ranks. Every einsum is
implicitly batched over (b, h). Q[m, e], K[n, e] and V[n, f] are the operands; `param`/`input`
tensors are read by arbitrary index expressions. After `online_softmax`, an `OnlineSoftmax` node
replaces the max/exp/sum/divide chain with a one-pass scan over n. After `autodiff`, a cascade
carries its `Backward`: a cascade of einsums over the forward's operands plus the saved tensors
(O, LSE, dO, dLSE), a `ScatterSum` per param (its gradient, summed at the read indices), and
which of its nodes hold the derivatives the backward kernels evaluate.

All nodes are frozen dataclasses: structurally comparable and hashable. `Cascade.graph()` gives
the networkx DAG; `format_cascade` is the deterministic printer (its text is the cache key's
root); `verify` states what a well-formed cascade is and runs after every pass.

Names a pass introduces (desugar's GM, SD, ..., autodiff's P, dS, ...) are chosen by
`fresh_name` among the names the cascade does not use yet, so they never collide with a
tensor the spec declares; passes find each other's nodes through the fields that name them
(`Cascade.mask_node`, `Backward.dqk`, ...), never by a fixed string.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

import sympy

from attnc.errors import CompileError
from attnc.expr import symbols as S


class TensorKind(enum.Enum):
    OPERAND = "operand"  # q, k, v (Q, K, V in a cascade)
    PARAM = "param"      # a learnable float tensor
    INPUT = "input"      # a runtime tensor that is read, never differentiated (ids, ...)
    SAVED = "saved"      # a forward result the backward reads


class Reduce(enum.Enum):
    SUM = "sum"
    MAX = "max"
    MIN = "min"


class BlockKind(enum.Enum):
    """Which spec block a cascade came from."""

    ATTENTION = "attention"
    CASCADE = "cascade"


class Normalizer(enum.Enum):
    SOFTMAX = "softmax"


class KeySource(enum.Enum):
    """Where a query tile's key tiles come from."""

    SEGMENTS = "segments"      # mask_bounds' segments, decided at compile time
    BLOCK_MASK = "block_mask"  # a block mask's per (b, h, query block) lists, given at call time


class Saved(enum.Enum):
    """The forward results and incoming gradients a backward cascade reads."""

    OUT = "O"
    LSE = "LSE"
    DOUT = "dO"
    DLSE = "dLSE"

    @property
    def ranks(self) -> tuple[str, ...]:
        return ("m", "f") if self in (Saved.OUT, Saved.DOUT) else ("m",)


@dataclass(frozen=True)
class TensorDecl:
    """A tensor the caller passes: an operand (q, k, v), a learnable `param` or an `input`."""

    name: str
    kind: TensorKind
    dims: tuple[sympy.Expr, ...]

    def __str__(self) -> str:
        return f"{self.kind.value} {self.name}[{', '.join(map(str, self.dims))}]"


@dataclass(frozen=True)
class Origin:
    """Where the statement that defines `tensor` starts in the spec (1-based line and column);
    the tensor "" stands for the block itself. Passes name tensors in their errors, and the
    pipeline turns a name into this position."""

    tensor: str
    line: int
    column: int


def origin_of(origins: tuple[Origin, ...], tensor: str | None) -> Origin | None:
    """The statement of `tensor`, else the block's; None when the IR was not built from text."""
    by_name = {o.tensor: o for o in origins}
    return by_name.get(tensor or "") or by_name.get("")


@dataclass(frozen=True)
class Einsum:
    """`name[ranks] = reduce(over) expr`; `reduce` is None for a pure map."""

    name: str
    ranks: tuple[str, ...]
    expr: sympy.Expr
    reduce: Reduce | None = None
    over: tuple[str, ...] = ()

    @property
    def iteration(self) -> tuple[str, ...]:
        return self.ranks + self.over

    def __str__(self) -> str:
        red = f"{self.reduce.value}({', '.join(self.over)}) " if self.reduce else ""
        return f"{self.name}[{', '.join(self.ranks)}] = {red}{self.expr}"


@dataclass(frozen=True)
class OnlineSoftmax:
    """One pass over `over` with a running max RM, running sum RD and rescaled accumulator RNV:

        RM' = max(RM, s[n]);  c = exp(RM - RM');  p = exp(s[n] - RM')
        RD' = RD*c + p;       RNV'[f] = RNV[f]*c + p*value[n, f]
        out = RNV / RD,  lse = RM + log(RD);  rows that see no key: out = 0, lse = -inf
    """

    name: str
    lse: str
    scores: sympy.Expr  # s[m, n], already masked (-oo where masked)
    value: sympy.Expr  # V[n, f]
    over: str = "n"
    ranks: tuple[str, ...] = ("m", "f")

    def __str__(self) -> str:
        s, v = self.scores, self.value
        return (f"{self.name}[m, f], {self.lse}[m] = online_softmax({self.over}) "
                f"scores {s}, value {v}\n"
                f"    RM' = max(RM, {s});  RD' = RD*exp(RM - RM') + exp({s} - RM')\n"
                f"    RNV'[m, f] = RNV[m, f]*exp(RM - RM') + exp({s} - RM')*{v}\n"
                f"    {self.name} = RNV/RD;  {self.lse} = RM + log(RD)   (no visible key: 0, -oo)")


@dataclass(frozen=True)
class ScatterSum:
    """The gradient of a `param`: `name[...] = sum over (b, h, m, n) of each term's value, added
    at the term's index into param`. A param read at several indices in the score has one term
    per read; an index that falls outside the param contributes nothing (the forward's load of
    it read 0 there, a constant)."""

    name: str
    param: str
    terms: tuple[tuple[tuple[sympy.Expr, ...], sympy.Expr], ...]  # (index, value[m, n])

    def __str__(self) -> str:
        return "\n".join(
            f"{self.name}[{', '.join(map(str, ix))}] {'=' if i == 0 else '+='} "
            f"scatter_sum(b, h, m, n) {value}" for i, (ix, value) in enumerate(self.terms))


Node = Einsum | OnlineSoftmax | ScatterSum


@dataclass(frozen=True)
class KeySegment:
    """One contiguous range of keys a query tile visits, with its provably unmasked sub-range.

    All four bounds are sympy expressions in m_lo, m_hi (first/last valid row of the tile),
    M, N and options; [lo, hi) covers every visible key of the segment and every key in
    [full_lo, full_hi) is visible for every row of the tile.
    """

    lo: sympy.Expr
    hi: sympy.Expr
    full_lo: sympy.Expr
    full_hi: sympy.Expr

    def __str__(self) -> str:
        return f"keys [{self.lo}, {self.hi})  full [{self.full_lo}, {self.full_hi})"


@dataclass(frozen=True)
class KeyBounds:
    """mask_bounds' result: ordered segments (by lo) and the score/mask they came from."""

    segments: tuple[KeySegment, ...]
    # For a single row (m_lo = m_hi) the segments are exactly its visible keys: every atom was
    # analyzed (nothing data-dependent) and no union had to be widened to a hull.
    exact: bool
    mask: sympy.Expr | None  # the mask, inlined; None: every key visible
    score: sympy.Expr | None  # the unmasked score, inlined
    # The transpose, for the backward pass over key tiles: query segments per key tile, in n_lo,
    # n_hi (first/last valid key of the tile), M and N. Same contract, rows and keys swapped.
    rows: tuple[KeySegment, ...] = ()

    def __str__(self) -> str:
        head = "key bounds per query tile [m_lo, m_hi]" + (
            "" if self.exact else " (part of the mask is data-dependent: evaluated per element)")
        lines = [head, f"    mask: {self.mask}"]
        lines += [f"    {i}: {s}" for i, s in enumerate(self.segments)]
        if self.rows:
            lines.append("query bounds per key tile [n_lo, n_hi]")
            lines += [f"    {i}: {str(s).replace('keys', 'queries')}"
                      for i, s in enumerate(self.rows)]
        return "\n".join(lines)


@dataclass(frozen=True)
class TileSchedule:
    """tile's result: which ranks are parallel, which rank is the sequential loop, block names,
    and where a query tile's key tiles come from (`keys`)."""

    parallel: tuple[str, ...] = ("b", "h", "m")
    loop: str = "n"
    blocks: tuple[tuple[str, str], ...] = (("m", "BLOCK_M"), ("n", "BLOCK_N"),
                                           ("e", "BLOCK_D"), ("f", "BLOCK_DV"))
    keys: KeySource = KeySource.SEGMENTS

    def __str__(self) -> str:
        blocks = ", ".join(f"{r}:{b}" for r, b in self.blocks)
        source = ("key tiles from the mask bounds" if self.keys is KeySource.SEGMENTS
                  else "key blocks from the call's block mask (partial: masked, full: unmasked)")
        return (f"schedule: grid over ({', '.join(self.parallel)}), "
                f"sequential loop over {self.loop}; tiles {blocks}; {source}")


@dataclass(frozen=True)
class Backward:
    """autodiff's result: the backward cascade (outputs dq, dk, dv and d<param> per param) and
    the nodes the backward kernels evaluate per (row, key): `dqk` holds d score / d (q.k), and
    `dparams` pairs each param read in the score with the node holding d score / d read."""

    cascade: Cascade
    saved: tuple[tuple[Saved, str], ...]
    dqk: str
    dparams: tuple[tuple[sympy.Indexed, str], ...] = ()

    def saved_name(self, role: Saved) -> str:
        return dict(self.saved)[role]


@dataclass(frozen=True)
class Cascade:
    name: str
    decls: tuple[TensorDecl, ...]
    nodes: tuple[Node, ...]
    outputs: tuple[tuple[str, str], ...]  # (role, tensor): ("out", ...), ("lse", ...)
    options: tuple[tuple[str, object], ...] = ()
    source_kind: BlockKind = BlockKind.CASCADE
    block_sparse: bool = False  # visit the key blocks a call's block mask lists
    # desugar's masking einsum where(mask, score, -oo): a block-sparse kernel skips exactly
    # this mask on full blocks
    mask_node: str | None = None
    bounds: KeyBounds | None = None
    schedule: TileSchedule | None = None
    # autodiff's result, or why the score cannot be differentiated
    backward: Backward | None = None
    no_backward: str | None = None
    origins: tuple[Origin, ...] = ()

    def node(self, name: str) -> Node:
        for nd in self.nodes:
            if nd.name == name or (isinstance(nd, OnlineSoftmax) and nd.lse == name):
                return nd
        raise KeyError(name)

    def einsum(self, name: str) -> Einsum:
        nd = self.node(name)
        if not isinstance(nd, Einsum):
            raise KeyError(f"{name} is not an einsum")
        return nd

    def produced(self) -> dict[str, Node]:
        out: dict[str, Node] = {}
        for nd in self.nodes:
            out[nd.name] = nd
            if isinstance(nd, OnlineSoftmax):
                out[nd.lse] = nd
        return out

    def names(self) -> set[str]:
        """Every tensor name the cascade declares or produces."""
        return {d.name for d in self.decls} | set(self.produced())

    def output(self, role: str) -> str | None:
        return dict(self.outputs).get(role)

    @property
    def extra_inputs(self) -> tuple[TensorDecl, ...]:
        return tuple(d for d in self.decls if d.kind in (TensorKind.PARAM, TensorKind.INPUT))

    def graph(self):
        """Tensors as vertices; an edge X -> Y when Y's node reads X (a networkx.DiGraph;
        imported here, since compiling never needs it and the import costs a first compile
        about half a second)."""
        import networkx as nx
        g = nx.DiGraph()
        for d in self.decls:
            g.add_node(d.name, kind=d.kind.value)
        for nd in self.nodes:
            outs = [nd.name] + ([nd.lse] if isinstance(nd, OnlineSoftmax) else [])
            for o in outs:
                g.add_node(o, kind="node")
                for src in reads(nd):
                    g.add_edge(src, o)
        return g

    def with_nodes(self, nodes, **changes) -> Cascade:
        return replace(self, nodes=tuple(nodes), **changes)


@dataclass(frozen=True)
class AttentionSpec:
    """What an `attention` block says, before desugaring into a cascade.

    `score` reads the q.k dot product as QK[m, n] (`QK` below); `mask` is a sympy boolean
    (True = visible) or None for no mask.
    """

    name: str
    decls: tuple[TensorDecl, ...]
    score: sympy.Expr
    mask: sympy.Expr | None
    normalize: Normalizer = Normalizer.SOFTMAX
    options: tuple[tuple[str, object], ...] = ()
    block_sparse: bool = False
    origins: tuple[Origin, ...] = ()  # the block, "score" and "mask" statements

    def __str__(self) -> str:
        lines = [f"attention {self.name}" + ("  # block-sparse" if self.block_sparse else "")]
        if self.options:
            lines.append("option " + ", ".join(f"{k} = {v}" for k, v in self.options))
        lines += [str(d) for d in self.decls]
        lines.append(f"score = {self.score}")
        lines.append(f"mask = {self.mask if self.mask is not None else 'none'}")
        lines.append(f"normalize = {self.normalize.value}")
        return "\n".join(lines) + "\n"


# The operands of every cascade, and the access through which an attention block's score reads
# q.k: names of the spec language, reserved there, so no declared tensor takes them.
QK = "QK"
OPERAND_DECLS = tuple(TensorDecl(name, TensorKind.OPERAND, tuple(S.RANKS[r] for r in ranks))
                      for name, ranks in S.OPERANDS.items())


def fresh_name(base: str, taken: set[str]) -> str:
    """`base`, or `base_1`, `base_2`, ... : the first not in `taken` (which it joins)."""
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def exprs_of(nd: Node) -> tuple[sympy.Expr, ...]:
    if isinstance(nd, Einsum):
        return (nd.expr,)
    if isinstance(nd, ScatterSum):
        return tuple(sympy.sympify(x) for ix, value in nd.terms for x in (*ix, value))
    return (nd.scores, nd.value)


def reads(nd: Node) -> list[str]:
    """Names of the tensors a node reads, in first-seen order."""
    names: list[str] = []
    for ex in exprs_of(nd):
        for acc in sorted(ex.atoms(sympy.Indexed), key=sympy.default_sort_key):
            if str(acc.base) not in names:
                names.append(str(acc.base))
    return names


def verify(c: Cascade) -> None:
    """What a well-formed cascade is (checked after every pass): tensor names are unique; every
    node reads only what earlier nodes or declarations define (so the graph is acyclic); ranks
    are m, n, e, f, a reduction reduces ranks absent from its output and a map reduces none;
    the outputs, the masking node and the backward's named nodes exist."""
    known: set[str] = set()
    for d in c.decls:
        if d.name in known:
            raise AssertionError(f"{c.name}: {d.name} is declared twice")
        known.add(d.name)
    for nd in c.nodes:
        for src in reads(nd):
            if src not in known:
                raise AssertionError(f"{c.name}: {nd.name} reads {src} before it is defined")
        outs = [nd.name] + ([nd.lse] if isinstance(nd, OnlineSoftmax) else [])
        for o in outs:
            if o in known:
                raise AssertionError(f"{c.name}: {o} is defined twice")
            known.add(o)
        if isinstance(nd, Einsum):
            bad = [r for r in nd.iteration if r not in S.RANKS]
            if bad or set(nd.ranks) & set(nd.over) or (nd.reduce is None) != (not nd.over):
                raise AssertionError(f"{c.name}: malformed einsum {nd}")
    for role, name in c.outputs:
        if name not in known:
            raise AssertionError(f"{c.name}: output {role}={name} is not produced")
    if c.mask_node is not None and c.mask_node not in known:
        raise AssertionError(f"{c.name}: the masking node {c.mask_node} is not produced")
    if c.backward is not None:
        bwd = c.backward.cascade
        verify(bwd)
        produced = bwd.produced()
        for name in [c.backward.dqk] + [n for _, n in c.backward.dparams]:
            if name not in produced:
                raise AssertionError(f"{c.name}: the backward's node {name} is not produced")
        declared = {d.name for d in bwd.decls if d.kind is TensorKind.SAVED}
        if {name for _, name in c.backward.saved} != declared:
            raise AssertionError(f"{c.name}: the backward's saved tensors are not declared")


def format_cascade(c: Cascade, passes: int | None = None) -> str:
    """Deterministic math view of a cascade (one einsum per line, FuseMax style)."""
    lines = [f"cascade {c.name}  # from {c.source_kind.value} block"
             + (", block-sparse" if c.block_sparse else "")]
    if passes is not None:
        lines.append(f"# passes over n: {passes}")
    if c.options:
        lines.append("option " + ", ".join(f"{k} = {v}" for k, v in c.options))
    for d in c.decls:
        lines.append(str(d))
    for nd in c.nodes:
        lines.append(str(nd))
    lines.append("outputs " + ", ".join(f"{r}={t}" for r, t in c.outputs))
    if c.bounds is not None:
        lines.append(str(c.bounds))
    if c.schedule is not None:
        lines.append(str(c.schedule))
    if c.backward is not None:
        lines.append("")
        lines.append("backward " + format_cascade(c.backward.cascade).rstrip("\n"))
    elif c.no_backward is not None:
        lines.append(f"no backward: {c.no_backward}")
    return "\n".join(lines) + "\n"



def qk_factor(c: Cascade, einsum: Einsum) -> sympy.Expr:
    """For the q.k product sum(e) Q[m, e]*K[n, e]*factor, the factor (free of e); raises
    CompileError for any other reduction."""
    core = S.access("Q", S.m, S.e) * S.access("K", S.n, S.e)
    factor = sympy.simplify(einsum.expr / core)
    if (einsum.reduce is not Reduce.SUM or einsum.over != ("e",) or factor.has(S.e)
            or factor.atoms(sympy.Indexed)):
        raise CompileError(f"{c.name}: {einsum.name} must be the q.k product "
                           "sum(e) Q[m, e]*K[n, e] (times a factor free of e)",
                           tensor=einsum.name)
    return factor


def qk_products(c: Cascade, ex: sympy.Expr) -> dict[sympy.Indexed, sympy.Expr]:
    """The reductions `ex` reads, each the q.k product times a factor: {access: factor}."""
    found = {}
    for nd in c.nodes:
        if isinstance(nd, Einsum) and nd.reduce is not None:
            acc = S.access(nd.name, *(S.RANKS[r] for r in nd.ranks))
            if ex.has(acc):
                found[acc] = qk_factor(c, nd)
    return found
