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
from attnc.ir.around import Around, verify_around


class TensorKind(enum.Enum):
    OPERAND = "operand"  # q, k, v (Q, K, V in a cascade)
    PARAM = "param"      # a learnable float tensor
    INPUT = "input"      # a runtime tensor that is read, never differentiated (ids, ...)
    SAVED = "saved"      # a forward result the backward reads


class Reduce(enum.Enum):
    SUM = "sum"
    MAX = "max"
    MIN = "min"
    # scans along one rank (which stays on the left): inclusive prefix sums in ascending order
    # (cumsum: the keys j <= n) or descending order (rcumsum: the keys j >= n)
    CUMSUM = "cumsum"
    RCUMSUM = "rcumsum"

    @property
    def is_scan(self) -> bool:
        return self in (Reduce.CUMSUM, Reduce.RCUMSUM)


class BlockKind(enum.Enum):
    """Which spec block a cascade came from."""

    ATTENTION = "attention"
    CASCADE = "cascade"


class Normalizer(enum.Enum):
    """An attention block's `normalize`: how the weights of a row come from its scores s.

    The pointwise ones give w = f(s) and out = sum(n) w*v (no division); `l1(f)` divides by
    sum(n) f(s), `mean(f)` by the number of visible keys; standardize and sinkhorn are FuseMax
    cascades of their own (desugar writes each out)."""

    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"
    SOFTPLUS = "softplus"
    RELU = "relu"
    RELU2 = "relu2"
    NONE = "none"
    L1 = "l1"
    MEAN = "mean"
    STANDARDIZE = "standardize"
    SINKHORN = "sinkhorn"

    @property
    def pointwise(self) -> bool:
        return self in POINTWISE


POINTWISE = (Normalizer.SIGMOID, Normalizer.SOFTPLUS, Normalizer.RELU, Normalizer.RELU2,
             Normalizer.NONE)


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
    the tensor "" stands for the block itself, and "score", "mask", "weight", "sink" and
    "normalize" for those statements (no einsum can take these names). Passes name tensors in
    their errors, and the pipeline turns a name into this position."""

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
    # online_rescale's mark on a sum over n (or m): the max reduction of the same pass whose
    # running value it is rescaled by. The expression is exp(-X) times a factor free of X, so
    # an accumulator built with a running X is brought to a new X' by exp(X - X').
    stabilizer: str | None = None

    @property
    def iteration(self) -> tuple[str, ...]:
        if self.reduce is not None and self.reduce.is_scan:
            return self.ranks
        return self.ranks + self.over

    @property
    def is_scan(self) -> bool:
        return self.reduce is not None and self.reduce.is_scan

    def __str__(self) -> str:
        red = f"{self.reduce.value}({', '.join(self.over)}) " if self.reduce else ""
        online = f"    # rescaled by running {self.stabilizer}" if self.stabilizer else ""
        return f"{self.name}[{', '.join(self.ranks)}] = {red}{self.expr}{online}"


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
    it read 0 there, a constant). A term's value is [m, n] (summed over the visible pairs) or,
    for a read in a row's value (a sink, a group weight), [m] or [n] or a constant of (b, h):
    summed over the ranks it has, once each."""

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


class Order(enum.Enum):
    """The order a stage walks its loop rank in (a scan decides it; reductions take either)."""

    ASCENDING = "ascending"
    DESCENDING = "descending"


@dataclass(frozen=True)
class Stage:
    """One kernel of a general cascade's schedule: programs own tiles of `parallel` (m or n)
    and walk `loop` (the other, or None for no loop) in `order`; it evaluates `nodes` (the
    cascade's nodes in order; [m, n] maps it needs are recomputed, never read from memory),
    loads `reads` (declared tensors and earlier stages' results) and stores `writes` (what a
    later stage or the caller reads). Nothing of rank [m, n] is ever in `reads` or `writes`."""

    parallel: str
    loop: str | None
    nodes: tuple[str, ...]
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    order: Order = Order.ASCENDING
    # Scans along the loop rank whose carry this stage stores at every loop tile (the sum over
    # the tiles walked before it, per row: a [P, tiles of L] checkpoint) ...
    checkpoints: tuple[str, ...] = ()
    # ... and scans along the PARALLEL rank this stage rebuilds from such a checkpoint, written
    # by an earlier stage whose tiles of that rank are this stage's: the checkpoint at the
    # program's tile plus the scan inside the tile. (A sum over m of a value that reads a scan
    # along n, say dK of stick-breaking attention, so runs parallel over n.)
    resumes: tuple[str, ...] = ()

    def __str__(self) -> str:
        walk = (f"loop over {self.loop} ({self.order.value})" if self.loop else "no loop")
        extra = (f"; stores the carry of {', '.join(self.checkpoints)} per {self.loop} tile"
                 if self.checkpoints else "")
        extra += (f"; resumes {', '.join(self.resumes)} from their carries" if self.resumes
                  else "")
        return (f"grid over (b, h, {self.parallel} tiles), {walk}; computes "
                f"{', '.join(self.nodes)}; reads {', '.join(self.reads) or '-'}; "
                f"writes {', '.join(self.writes) or '-'}{extra}")


@dataclass(frozen=True)
class Backward:
    """autodiff's result: the backward cascade (outputs dq, dk, dv and d<param> per param) and
    the nodes the backward kernels evaluate per (row, key): `dqk` holds d score / d (q.k), and
    `dparams` pairs each param read in the score with the node holding d score / d read."""

    cascade: Cascade
    saved: tuple[tuple[Saved, str], ...]
    dqk: str | None  # None for a general cascade's backward: its own einsums say everything
    dparams: tuple[tuple[sympy.Indexed, str], ...] = ()
    # a general cascade's backward reads forward results besides the Saved roles: (forward
    # tensor, its SAVED declaration's name in the backward cascade)
    residuals: tuple[tuple[str, str], ...] = ()

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
    # A general cascade's mask (a `mask` statement): which (m, n) pairs exist. Reductions and
    # scans over n or m see only the visible pairs; None: all pairs are visible.
    mask: sympy.Expr | None = None
    # schedule's result for a general (not OnlineSoftmax) cascade: its kernels, in order
    stages: tuple[Stage, ...] = ()
    # an attention block's operands, prologues, gate, head map and gather, carried to the kernel
    around: Around = Around()

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
    origins: tuple[Origin, ...] = ()  # the block, "score", "mask", ... statements
    # `l1(f)` / `mean(f)`: the pointwise f; `sinkhorn(k)`: k iterations
    pointwise: Normalizer | None = None
    iterations: int = 0
    weight: sympy.Expr | None = None  # `weight = <expr>`: multiplies the normalized weights
    sink: sympy.Expr | None = None  # `sink = <expr>`: a logit in the softmax's denominator
    # operands, prologues, gate, head map and gather around the score (attnc/ir/around.py)
    around: Around = Around()

    def __str__(self) -> str:
        lines = [f"attention {self.name}" + ("  # block-sparse" if self.block_sparse else "")]
        if self.options:
            lines.append("option " + ", ".join(f"{k} = {v}" for k, v in self.options))
        lines += [str(d) for d in self.decls]
        lines += self.around.lines()
        lines.append(f"score = {self.score}")
        lines.append(f"mask = {self.mask if self.mask is not None else 'none'}")
        arg = (f"({self.pointwise.value})" if self.pointwise else
               f"({self.iterations})" if self.normalize is Normalizer.SINKHORN else "")
        lines.append(f"normalize = {self.normalize.value}{arg}")
        if self.weight is not None:
            lines.append(f"weight = {self.weight}")
        if self.sink is not None:
            lines.append(f"sink = {self.sink}")
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
    produced_before: dict[str, Node] = {}
    verify_around(c.around, c.name)
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
            bad = [r for r in nd.ranks + nd.over if r not in S.RANKS]
            scan_ok = len(nd.over) == 1 and nd.over[0] in nd.ranks
            if (bad or (nd.reduce is None) != (not nd.over)
                    or (not scan_ok if nd.is_scan else bool(set(nd.ranks) & set(nd.over)))):
                raise AssertionError(f"{c.name}: malformed einsum {nd}")
            if nd.stabilizer is not None:
                stab = produced_before.get(nd.stabilizer)
                if (nd.reduce is not Reduce.SUM or not isinstance(stab, Einsum)
                        or stab.reduce is not Reduce.MAX or stab.over != nd.over):
                    raise AssertionError(f"{c.name}: {nd.name}'s stabilizer {nd.stabilizer} "
                                         "is no earlier max over the same rank")
            produced_before[nd.name] = nd
    for role, name in c.outputs:
        if name not in known:
            raise AssertionError(f"{c.name}: output {role}={name} is not produced")
    if c.mask_node is not None and c.mask_node not in known:
        raise AssertionError(f"{c.name}: the masking node {c.mask_node} is not produced")
    for stage in c.stages:
        if stage.parallel not in ("m", "n") or stage.loop not in (None, "m", "n"):
            raise AssertionError(f"{c.name}: malformed stage {stage}")
        for name in stage.nodes + stage.reads + stage.writes:
            if name not in known:
                raise AssertionError(f"{c.name}: a stage names {name}, which is not defined")
    if c.stages:
        done = {d.name for d in c.decls}
        stored: set[str] = set()
        for stage in c.stages:
            early = [r for r in stage.reads if r not in done]
            if early:
                raise AssertionError(f"{c.name}: a stage reads {early[0]} before it is written")
            missing = [r for r in stage.resumes if r not in stored]
            if missing:
                raise AssertionError(f"{c.name}: a stage resumes {missing[0]} before its carry "
                                     "is stored")
            done |= set(stage.writes)
            stored |= set(stage.checkpoints)
        missing = [t for _, t in c.outputs if t not in done]
        if missing:
            raise AssertionError(f"{c.name}: no stage writes the output {missing[0]}")
    if c.backward is not None:
        bwd = c.backward.cascade
        verify(bwd)
        produced = bwd.produced()
        named = [c.backward.dqk] if c.backward.dqk is not None else []
        for name in named + [n for _, n in c.backward.dparams]:
            if name not in produced:
                raise AssertionError(f"{c.name}: the backward's node {name} is not produced")
        declared = {d.name for d in bwd.decls if d.kind is TensorKind.SAVED}
        if ({name for _, name in c.backward.saved}
                | {name for _, name in c.backward.residuals}) != declared:
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
    lines += c.around.lines()
    if c.mask is not None:
        lines.append(f"mask {c.mask}")
    for nd in c.nodes:
        lines.append(str(nd))
    lines.append("outputs " + ", ".join(f"{r}={t}" for r, t in c.outputs))
    if c.stages:
        lines.append(f"schedule: {len(c.stages)} kernel(s)")
        lines += [f"    kernel {i + 1}: {st}" for i, st in enumerate(c.stages)]
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
