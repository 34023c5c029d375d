"""Generate the Triton kernels of a head-mixing AttentionKernel (its `around` has `premix`
and/or `postmix`): programs whose tiles span every query head.

Meaning (for one batch b and query row m; s[g, n] the spec's score of head g, V[g, n] whether
key n is visible to head g, A = premix(·, ·) and P = postmix(·, ·) at (b, m), [Hq, Hq] each,
the identity when absent):

    s'[h, n] = Σ_{g : V[g, n]} A[h, g] · s[g, n]   where V[h, n], else -inf
    w[h, n]  = exp(s'[h, n] - lse[h]),  lse[h] = log Σ_n exp(s'[h, n])   (0 / -inf: no key)
    w'[h, n] = Σ_g P[h, g] · w[g, n]               where V[h, n], else 0
    out[h]   = Σ_n w'[h, n] · v_{kv(h)}[n]

So only visible scores are mixed (an invisible score is neither -inf nor 0 inside a sum: it is
left out), and a pair invisible to head h stays invisible after either mixing. A visible
score is taken finite. The kernels return lse[h], the log-normalizer of the mixed scores.

Backward (dO, dlse given; the mixings are linear, so their adjoints are the transposes):

    dw'[h, n] = dO[h] · v_{kv(h)}[n] where V[h, n];  dP[h, g] = Σ_n dw'[h, n] w[g, n]
    dw[g, n]  = Σ_h P[h, g] dw'[h, n]
    ds'[h, n] = w[h, n] (dw[h, n] - delta[h]),  delta[h] = Σ_n w[h, n] dw[h, n] - dlse[h]
    dA[h, g]  = Σ_n ds'[h, n] s~[g, n]  (s~ = s where V, else 0)
    ds[g, n]  = V[g, n] Σ_h A[h, g] ds'[h, n],  dqk = ds · d score / d qk

Without postmix delta[h] = dO[h] · out[h] - dlse[h]; with it delta needs Σ_n over every head's
dw, so the dq kernel walks the keys twice (delta and dP, then ds', dA and dq). The dk/dv kernel
(one program per (b, key tile), all heads) walks the query tiles with the stored delta.

Layout: a tile is [BLOCK_H, BLOCK_M, BLOCK_N] (head, row, key), q·k a batched dot over the
heads (each head with the k of its kv head), and a mixing a batched dot over the rows of the
[BLOCK_M, BLOCK_H, BLOCK_H] coefficient tile with the permuted scores [BLOCK_M, BLOCK_H,
BLOCK_N], in fp32 (IEEE). BLOCK_H is Hq padded to 16 (tl.dot's least size): padded heads load
q = 0 and have zero coefficients, so they add nothing. With only premix the forward's key walk
is one online-softmax pass; with postmix it is two: the first finds every head's lse of s', the
second mixes the normalized weights (head h's output needs w[g] of every head g) and
multiplies them by v. The coefficients are the runtime's [B, M, Hq, Hq] fp32 tensors
(attnc/runtime/mixing.py). The spec's score, mask and loads are printed with
backends/triton/softmax/forward.py's conventions, with h a tile index here; key segments (and
the backward's query segments) that depend on h are replaced by a walk of every tile, masked.
"""

from __future__ import annotations

from dataclasses import replace

import sympy
import triton

from attnc.backends.triton.contract import (GeneratedModule, GridRule, KernelContract, Param,
                                            ParamType, arg)
from attnc.backends.triton.names import choose
from attnc.backends.triton.prelude import module_head
from attnc.backends.triton.printer import TritonPrinter
from attnc.backends.triton.softmax.forward import (KernelNames, constexprs, emit_segment_walk,
                                                   load_stmt, stride_params, strides,
                                                   tensor_params)
from attnc.backends.triton.softmax.scores import LN2, LOG2E
from attnc.backends.triton.source import CodeBuilder
from attnc.expr import symbols as S
from attnc.ir.cascade import KeySegment
from attnc.ir.kernel import AttentionKernel

INT, PTR = ParamType.INT, ParamType.FP32_PTR
# Query heads one program spans at most (tl.dot's tiles: BLOCK_H x BLOCK_H coefficients).
MAX_HEADS = 16
BLOCK_H = 16
CONSTEXPRS = ("BLOCK_M", "BLOCK_N", "BLOCK_H", "BLOCK_D", "BLOCK_DV", "IEEE", "UPCAST")
# The coefficient tensors ([B, M, Hq, Hq]) and the letters of their strides.
MIXES = (("premix", "Pre", "pre"), ("postmix", "Post", "post"))
_TILE = {S.m: "offs_m[None, :, None]", S.n: "offs_n[None, None, :]", S.h: "hh[:, None, None]",
         S.qk: "qk"}


def mixes(k: AttentionKernel) -> list[tuple[str, str, str]]:
    """(kind, pointer, stride prefix) of the mixings `k` has."""
    return [m for m in MIXES if getattr(k.around, m[0]) is not None]


def printer(k: AttentionKernel, nm: KernelNames) -> TritonPrinter:
    """Expressions over a [head, row, key] tile: h, m and n are tile indices."""
    names = {**_TILE, **{ld.symbol: nm.load(ld) for ld in k.loads}}
    return TritonPrinter(names, frozenset({S.h, S.m, S.n, S.qk} | {ld.symbol for ld in k.loads}))


def read(k: AttentionKernel) -> AttentionKernel:
    """`k` with only the params and inputs its score and mask load: the kernels' tensors (the
    mixing's own reach them as the coefficient tensors)."""
    loaded = {ld.tensor for ld in k.loads}
    return replace(k, inputs=tuple(d for d in k.inputs if d.name in loaded))


def segments(k: AttentionKernel) -> tuple[KeySegment, ...]:
    """The key segments the program walks: the kernel's, unless their bounds depend on the head
    (one program spans every head), then every key tile, masked."""
    if any(sympy.sympify(x).has(S.h) for seg in k.segments
           for x in (seg.lo, seg.hi, seg.full_lo, seg.full_hi)):
        return (KeySegment(sympy.Integer(0), S.N, sympy.Integer(0), sympy.Integer(0)),)
    return k.segments


def grid(v) -> tuple[int, int]:
    """One program per (query tile, b), spanning every query head."""
    return triton.cdiv(v["M"], v["BLOCK_M"]), v["B"]


def key_grid(v) -> tuple[int, int]:
    """One program per (key tile, b), spanning every query head; it walks the query tiles."""
    return triton.cdiv(v["N"], v["BLOCK_N"]), v["B"]


def _coefficient_params(k: AttentionKernel) -> tuple[list[Param], list[Param]]:
    mix = mixes(k)
    return ([arg(ptr, PTR) for _, ptr, _ in mix],
            [arg(f"{p}_s{r}", INT) for _, _, p in mix for r in "bmhg"])


def _sizes() -> list[Param]:
    return [arg(x, INT) for x in ("B", "H", "M", "N", "D", "DV", "GROUP")] + [
        arg("scale", ParamType.FLOAT)]


def forward_contract(k: AttentionKernel, nm: KernelNames) -> KernelContract:
    coeffs, coeff_strides = _coefficient_params(k)
    params = ([arg(x, ParamType.DATA) for x in ("Q", "K", "V", "Out")] + [arg("Lse", PTR)]
              + coeffs + tensor_params(read(k), nm) + strides("stride_", "q k v o")
              + stride_params(read(k), nm) + coeff_strides + _sizes() + constexprs(CONSTEXPRS))
    return KernelContract("forward", nm.entry("forward"), tuple(params),
                          GridRule(grid.__doc__ or "", grid),
                          "head-mixing softmax attention forward: out and lse of every head")


def dq_contract(k: AttentionKernel, nm: KernelNames) -> KernelContract:
    coeffs, coeff_strides = _coefficient_params(k)
    grads = [arg(f"D{ptr}", PTR) for _, ptr, _ in mixes(k)]
    params = ([arg(x, ParamType.DATA) for x in ("Q", "K", "V", "Out", "DO")]
              + [arg(x, PTR) for x in ("Lse", "DLse", "Delta", "DQ")] + coeffs + grads
              + tensor_params(read(k), nm) + strides("stride_", "q k v o do")
              + stride_params(read(k), nm)
              + coeff_strides + _sizes() + constexprs(CONSTEXPRS + ("HAS_DLSE",)))
    return KernelContract("dq", nm.entry("dq"), tuple(params), GridRule(grid.__doc__ or "", grid),
                          "head-mixing backward per query tile: dq (fp32), delta and the "
                          "mixing coefficients' gradients")


def dkdv_contract(k: AttentionKernel, nm: KernelNames) -> KernelContract:
    coeffs, coeff_strides = _coefficient_params(k)
    params = ([arg(x, ParamType.DATA) for x in ("Q", "K", "V", "DO")]
              + [arg(x, PTR) for x in ("Lse", "Delta", "DKacc", "DVacc")] + coeffs
              + tensor_params(read(k), nm) + strides("stride_", "q k v do")
              + stride_params(read(k), nm)
              + coeff_strides + _sizes() + constexprs(CONSTEXPRS))
    return KernelContract("dkdv", nm.entry("dkdv"), tuple(params),
                          GridRule(key_grid.__doc__ or "", key_grid),
                          "head-mixing backward per key tile: dk and dv of every query head "
                          "(fp32; the launcher sums a GQA group's)")


def contracts(k: AttentionKernel, names) -> tuple[KernelContract, ...]:
    """The contracts `generate(k)` returns, spelled with its `names` (a cache hit)."""
    nm = KernelNames(k, names)
    return (forward_contract(k, nm),) + ((dq_contract(k, nm), dkdv_contract(k, nm))
                                         if k.grad is not None else ())


def generate(k: AttentionKernel, header: str = "") -> GeneratedModule:
    """The forward, and with k.grad the two backward kernels."""
    draft = KernelNames(k)
    spelled = choose(_generate(k, header, draft).source, draft.users)
    return _generate(k, header, KernelNames(k, spelled))


def _generate(k: AttentionKernel, header: str, nm: KernelNames) -> GeneratedModule:
    pr = printer(k, nm)
    body = CodeBuilder()
    post = k.around.postmix is not None
    kinds = (["stats", "weights"] if post else ["online"])
    if k.grad is not None:
        kinds += (["dstats"] if post else []) + ["dq", "dkdv"]
    for kind in kinds:
        _emit_step(body, k, pr, nm, kind)
        body()
        body()
    found = [_emit_forward(body, k, pr, nm)]
    if k.grad is not None:
        body()
        body()
        found.append(_emit_dq(body, k, pr, nm))
        body()
        body()
        found.append(_emit_dkdv(body, k, pr, nm))
    return GeneratedModule(module_head(header, pr.helpers) + body.text(), tuple(found),
                           dict(nm.users.spelled or {}))


def _step_name(nm: KernelNames, kind: str) -> str:
    return f"_attnc_{nm.spec}_mix_{kind}"


def _coefficient_tiles(k: AttentionKernel, kind: str) -> list[str]:
    """The coefficient tiles [row, h, g] (and transposed, `...T`) a step reads."""
    pre, post = k.around.premix is not None, k.around.postmix is not None
    return {"stats": ["pre"] if pre else [], "online": ["pre"] if pre else [],
            "weights": (["pre"] if pre else []) + ["post"],
            "dstats": (["pre"] if pre else []) + ["postT"],
            "dq": (["pre", "preT"] if pre else []) + (["postT"] if post else []),
            "dkdv": []}[kind]


def _step_args(k: AttentionKernel, nm: KernelNames, kind: str) -> list[str]:
    """What a step reads: its state, the program's tiles and indices, the spec's tensors (with
    strides), then the tile sizes."""
    pre = k.around.premix is not None
    state = {"stats": ["m_i", "l_i"], "online": ["acc", "m_i", "l_i"],
             "weights": ["acc", "lse2"], "dstats": ["delta", "dpost"],
             "dq": ["dq"] + (["dpre"] if pre else []), "dkdv": ["dk", "dv"]}[kind]
    if kind == "dkdv":
        tiles = ["kt", "v", "start_m", "offs_n", "Q", "DO", "Lse", "Delta"] + [
            ptr for _, ptr, _ in mixes(k)] + [
            f"stride_{t}{r}" for t in ("q", "do") for r in "bhmd"] + [
            f"{p}_s{r}" for _, _, p in mixes(k) for r in "bmhg"]
    else:
        tiles = ["q", "k_base", "v_base", "start_n", "offs_m", "stride_kn", "stride_kd",
                 "stride_vn", "stride_vd"] + (["do", "lse2"] if kind in ("dstats", "dq") else []) \
            + (["delta"] if kind == "dq" else [])
    tensors = [nm.tensor(d.name) for d in read(k).inputs]
    stride_names = [nm.stride(d.name, i) for d in read(k).inputs for i in range(len(d.dims))]
    return (state + tiles + _coefficient_tiles(k, kind)
            + ["offs_d", "offs_dv", "offs_h", "hh", "head_ok", "b", "B", "H", "M", "N", "D",
               "DV", "scale"] + tensors + stride_names + ["BLOCK_M", "BLOCK_N", "BLOCK_H"])


def _mixed(c: CodeBuilder, coeff: str, x: str, out: str) -> None:
    """out[h] = Σ_g coeff[row, h, g] · x[g]: a batched dot over the rows, in fp32."""
    c(f"{out} = tl.permute(_dot({coeff}, tl.permute({x}, (1, 0, 2)), True, UPCAST), (1, 0, 2))")


def _load_coefficients(c: CodeBuilder, k: AttentionKernel, transposed: bool) -> None:
    """The coefficient tiles [row, h, g] of the rows offs_m (and [row, g, h] when
    `transposed`); rows past M and padded heads read 0."""
    for kind, ptr, p in mixes(k):
        c(f"# {kind} coefficients [row, h, g] of the rows offs_m")
        c(f"{p}_ptrs = ({ptr} + b.to(tl.int64) * {p}_sb + offs_m[:, None, None] * {p}_sm"
          f" + offs_h[None, :, None] * {p}_sh")
        c(f"           + offs_h[None, None, :] * {p}_sg)")
        c(f"{p} = tl.load({p}_ptrs, mask=(offs_m[:, None, None] < M) & (offs_h[None, :, None] < "
          "H) & (offs_h[None, None, :] < H), other=0.0)")
        if transposed:
            c(f"{p}T = tl.permute({p}, (0, 2, 1))")


def _emit_scores(c: CodeBuilder, k: AttentionKernel, pr: TritonPrinter, nm: KernelNames,
                 bound: sympy.Expr) -> None:
    """From qk: the spec's loads and score, `vis` in MASKED tiles (the mask, and `bound`, the
    keys or rows in range, in EDGE tiles), with premix `st` (the visible scores of the real
    heads, 0 elsewhere) and the mixed s; then s = -inf where the pair is invisible."""
    for ld in k.loads:
        c(load_stmt(ld, k, pr, nm))
    zeros = "" if k.score.has(S.qk) else " + tl.zeros([BLOCK_H, BLOCK_M, BLOCK_N], tl.float32)"
    c(f"s = {pr(k.score)}{zeros}")
    always = pr(sympy.Ge(bound.lhs, 0))
    with c.block("if MASKED:"):
        with c.block("if EDGE:"):
            c(f"vis = {pr(sympy.And(bound, k.mask if k.mask is not None else sympy.true))}")
        with c.block("else:"):
            c(f"vis = {pr(k.mask) if k.mask is not None else always}")
    if k.around.premix is not None:
        c("# mix only visible scores, of the real heads (padded heads may hold anything)")
        c("st = tl.where(head_ok, s, 0.0)")
        with c.block("if MASKED:"):
            c("st = tl.where(vis, st, 0.0)")
        _mixed(c, "pre", "st", "s")
    with c.block("if MASKED:"):
        c('s = tl.where(vis, s, float("-inf"))')


def _emit_step(c: CodeBuilder, k: AttentionKernel, pr: TritonPrinter, nm: KernelNames,
               kind: str) -> None:
    """One tile of every head. Forward (a key tile): `stats`, the running max and sum of s'
    (postmix's first pass); `online`, the online softmax (premix only); `weights`, the
    normalized weights exp(s' - lse), mixed, times v (postmix's second pass). Backward:
    `dstats` (a key tile, postmix only), delta = Σ_n w dw and the postmix gradient; `dq` (a key
    tile), ds' = w (dw - delta), the premix gradient and dq; `dkdv` (a query tile), dk and dv."""
    args = _step_args(k, nm, kind)
    params = [f"{a}: tl.constexpr" if a.startswith("BLOCK") else a for a in args]
    c("@triton.jit")
    c.call(f"def {_step_name(nm, kind)}(", params + [
        f"{f}: tl.constexpr" for f in ("MASKED", "EDGE", "IEEE", "UPCAST")], "):")
    with c.indented():
        c(f'"""One tile of every head: {kind}."""')
        if kind == "dkdv":
            _dkdv_step_body(c, k, pr, nm)
        else:
            _key_step_body(c, k, pr, nm, kind)


def _key_step_body(c: CodeBuilder, k: AttentionKernel, pr: TritonPrinter, nm: KernelNames,
                   kind: str) -> None:
    post = k.around.postmix is not None
    c("offs_n = start_n + tl.arange(0, BLOCK_N)")
    c("kt_ptrs = k_base + offs_n[None, None, :] * stride_kn + offs_d[None, :, None] * stride_kd")
    c("v_ptrs = v_base + offs_n[None, :, None] * stride_vn + offs_dv[None, None, :] * stride_vd")
    loads_v = kind != "stats"
    with c.block("if EDGE:"):
        c("kt = tl.load(kt_ptrs, mask=(offs_n[None, None, :] < N) & (offs_d[None, :, None] < D), "
          "other=0.0)")
        if loads_v:
            c("v = tl.load(v_ptrs, mask=(offs_n[None, :, None] < N) & (offs_dv[None, None, :] < "
              "DV), other=0.0)")
    with c.block("else:"):
        c("kt = tl.load(kt_ptrs, mask=offs_d[None, :, None] < D, other=0.0)")
        if loads_v:
            c("v = tl.load(v_ptrs, mask=offs_dv[None, None, :] < DV, other=0.0)")
    c("qk = _dot(q, kt, IEEE, UPCAST)")
    _emit_scores(c, k, pr, nm, S.n < S.N)
    if kind in ("stats", "online"):
        c(f"m_new = tl.maximum(m_i, tl.max(s, 2) * {LOG2E!r})")
        c("# rows that have seen no visible key keep max -inf; shift by 0 there (no inf - inf)")
        c('m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)')
        c(f"p = tl.exp2(s * {LOG2E!r} - m_safe[:, :, None])")
        c("alpha = tl.exp2(m_i - m_safe)")
        c("l_i = l_i * alpha + tl.sum(p, 2)")
        if kind == "stats":
            c("return m_new, l_i")
            return
        c("acc = acc * alpha[:, :, None] + _dot(_round(p, v.dtype, UPCAST), v, IEEE, UPCAST)")
        c("return acc, m_new, l_i")
        return
    c("# the normalized weights w (0 for a row without keys: lse2 = inf there)")
    c(f"p = tl.exp2(s * {LOG2E!r} - lse2[:, :, None])")
    c("p = tl.where(head_ok, p, 0.0)")
    if kind == "weights":
        _mixed(c, "post", "p", "p")
        with c.block("if MASKED:"):
            c("p = tl.where(vis, p, 0.0)")
        c("acc += _dot(_round(p, v.dtype, UPCAST), v, IEEE, UPCAST)")
        c("return acc")
        return
    c("# dw'[h] = dO[h] . v[n] where h sees n; dw[g] = Σ_h postmix[h, g] dw'[h]")
    c("dw = _dot(do, tl.permute(v, (0, 2, 1)), IEEE, UPCAST)")
    if post:
        with c.block("if MASKED:"):
            c("dw = tl.where(vis, dw, 0.0)")
    if kind == "dstats":
        c("dpost += _dot(tl.permute(dw, (1, 0, 2)), tl.permute(p, (1, 2, 0)), True, UPCAST)")
        _mixed(c, "postT", "dw", "dw")
        c("delta += tl.sum(p * dw, 2)")
        c("return delta, dpost")
        return
    if post:
        _mixed(c, "postT", "dw", "dw")
    _emit_ds(c, k, pr, "dpre += _dot(tl.permute(ds, (1, 0, 2)), tl.permute(st, (1, 2, 0)), "
             "True, UPCAST)")
    c("dq += _dot(_round(dqk, kt.dtype, UPCAST), tl.permute(kt, (0, 2, 1)), IEEE, UPCAST)")
    c("return " + ("dq, dpre" if k.around.premix is not None else "dq"))


def _emit_ds(c: CodeBuilder, k: AttentionKernel, pr: TritonPrinter, premix_grad: str) -> None:
    """ds' = w (dw - delta) (the softmax's VJP per head), then through premix to the scores
    (ds[g] = Σ_h premix[h, g] ds'[h] where g sees the key), then dqk = ds · d score / d qk."""
    assert k.grad is not None
    c("ds = p * (dw - delta[:, :, None])")
    if k.around.premix is not None:
        if premix_grad:
            c(premix_grad)
        _mixed(c, "preT", "ds", "ds")
        with c.block("if MASKED:"):
            c("ds = tl.where(vis, ds, 0.0)")
    deriv = sympy.sympify(k.grad.dqk)
    if deriv == 1:
        c("dqk = ds")
    elif deriv.is_polynomial():
        c(f"dqk = ds * ({pr(deriv)})")
    else:  # an invisible or padded element contributes nothing even where deriv is not finite
        c(f"dqk = tl.where(ds != 0.0, ds * ({pr(deriv)}), 0.0)")


def _dkdv_step_body(c: CodeBuilder, k: AttentionKernel, pr: TritonPrinter,
                    nm: KernelNames) -> None:
    c("offs_m = start_m + tl.arange(0, BLOCK_M)")
    c("row_ok = (offs_m < M)[None, :, None]")
    c("rows = (offs_h[:, None] < H) & (offs_m[None, :] < M)")
    c("q_ptrs = (Q + b.to(tl.int64) * stride_qb + hh[:, None, None] * stride_qh")
    c("          + offs_m[None, :, None] * stride_qm + offs_d[None, None, :] * stride_qd)")
    c("q = tl.load(q_ptrs, mask=head_ok & row_ok & (offs_d[None, None, :] < D), other=0.0)")
    c("do_ptrs = (DO + b.to(tl.int64) * stride_dob + hh[:, None, None] * stride_doh")
    c("           + offs_m[None, :, None] * stride_dom + offs_dv[None, None, :] * stride_dod)")
    c("do = tl.load(do_ptrs, mask=head_ok & row_ok & (offs_dv[None, None, :] < DV), other=0.0)")
    c("lse = tl.load(Lse + (b * H + hh[:, None]) * M + offs_m[None, :], mask=rows, other=0.0)")
    c(f'lse2 = tl.where(lse == float("-inf"), float("inf"), lse * {LOG2E!r})')
    c("delta = tl.load(Delta + (b * H + hh[:, None]) * M + offs_m[None, :], mask=rows, "
      "other=0.0)")
    _load_coefficients(c, k, transposed=True)
    c("qk = _dot(q, kt, IEEE, UPCAST)")
    _emit_scores(c, k, pr, nm, S.m < S.M)
    c(f"p = tl.exp2(s * {LOG2E!r} - lse2[:, :, None])")
    c("p = tl.where(head_ok, p, 0.0)")
    post = k.around.postmix is not None
    if post:
        _mixed(c, "post", "p", "pp")
        with c.block("if MASKED:"):
            c("pp = tl.where(vis, pp, 0.0)")
    c("dv += _dot(tl.permute(_round(" + ("pp" if post else "p") + ", do.dtype, UPCAST), "
      "(0, 2, 1)), do, IEEE, UPCAST)")
    c("dw = _dot(do, tl.permute(v, (0, 2, 1)), IEEE, UPCAST)")
    if post:
        with c.block("if MASKED:"):
            c("dw = tl.where(vis, dw, 0.0)")
        _mixed(c, "postT", "dw", "dw")
    _emit_ds(c, k, pr, "")
    c("dk += _dot(tl.permute(_round(dqk, q.dtype, UPCAST), (0, 2, 1)), q, IEEE, UPCAST)")
    c("return dk, dv")


def _program_head(c: CodeBuilder, contract: KernelContract, doc: str) -> None:
    c("@triton.jit")
    c.call(f"def {contract.entry}(", [p.declaration for p in contract.params], "):")
    c.depth += 1
    c(f'"""{doc}"""')


def _head_indices(c: CodeBuilder) -> None:
    c("offs_d = tl.arange(0, BLOCK_D)")
    c("offs_dv = tl.arange(0, BLOCK_DV)")
    c("offs_h = tl.arange(0, BLOCK_H)")
    c("# padded heads read head H - 1's tensors (in range) and are masked out of everything")
    c("hh = tl.minimum(offs_h, H - 1)")
    c("head_ok = (offs_h < H)[:, None, None]")
    c("kvh = hh // GROUP")


def _query_program(c: CodeBuilder, k: AttentionKernel, transposed: bool) -> None:
    """The query-tile program's setup (forward and dq kernels): indices, q, the k/v bases per
    head, the coefficient tiles."""
    c("pid_m = tl.program_id(0)")
    c("b = tl.program_id(1)")
    c("m_lo = pid_m * BLOCK_M")
    c("m_hi = tl.minimum(m_lo + BLOCK_M, M) - 1")
    c("zero = m_lo * 0  # a runtime integer, so bound arithmetic never folds to constants")
    c("offs_m = m_lo + tl.arange(0, BLOCK_M)")
    _head_indices(c)
    c("row_ok = (offs_m < M)[None, :, None]")
    c("rows = (offs_h[:, None] < H) & (offs_m[None, :] < M)")
    c("q_ptrs = (Q + b.to(tl.int64) * stride_qb + hh[:, None, None] * stride_qh")
    c("          + offs_m[None, :, None] * stride_qm + offs_d[None, None, :] * stride_qd)")
    c("q = tl.load(q_ptrs, mask=head_ok & row_ok & (offs_d[None, None, :] < D), other=0.0)")
    c("k_base = K + b.to(tl.int64) * stride_kb + kvh[:, None, None] * stride_kh")
    c("v_base = V + b.to(tl.int64) * stride_vb + kvh[:, None, None] * stride_vh")
    _load_coefficients(c, k, transposed)


def _walk(c: CodeBuilder, k: AttentionKernel, pr: TritonPrinter, nm: KernelNames, kind: str,
          result: str) -> None:
    if kind == "dkdv":
        assert k.grad is not None
        emit_segment_walk(c, _row_segments(k), lambda c, masked, edge: _step_call(
            c, k, nm, kind, result, masked, edge), "M", "BLOCK_M", "start_m", pr, edge=True)
        return
    emit_segment_walk(c, segments(k), lambda c, masked, edge: _step_call(
        c, k, nm, kind, result, masked, edge), "N", "BLOCK_N", "start_n", pr, edge=True)


def _row_segments(k: AttentionKernel) -> tuple[KeySegment, ...]:
    """The query segments a key tile walks: the backward's, unless they depend on the head."""
    assert k.grad is not None
    if any(sympy.sympify(x).has(S.h) for seg in k.grad.rows
           for x in (seg.lo, seg.hi, seg.full_lo, seg.full_hi)):
        return (KeySegment(sympy.Integer(0), S.M, sympy.Integer(0), sympy.Integer(0)),)
    return k.grad.rows


def _store_lse_rows(c: CodeBuilder, ptr: str, value: str) -> None:
    c(f"tl.store({ptr} + (b * H + offs_h[:, None]) * M + offs_m[None, :], {value}, mask=rows)")


def _emit_forward(c: CodeBuilder, k: AttentionKernel, pr: TritonPrinter,
                  nm: KernelNames) -> KernelContract:
    contract = forward_contract(k, nm)
    post = k.around.postmix is not None
    _program_head(c, contract, f"{nm.spec}: head-mixing softmax attention forward; one program "
                  "per (query tile, b) spanning every query head.")
    _query_program(c, k, transposed=False)
    c('m_i = tl.full([BLOCK_H, BLOCK_M], float("-inf"), tl.float32)')
    c("l_i = tl.zeros([BLOCK_H, BLOCK_M], tl.float32)")
    c("acc = tl.zeros([BLOCK_H, BLOCK_M, BLOCK_DV], tl.float32)")
    if post:
        c("# pass 1: every head's max and sum of the mixed scores")
        _walk(c, k, pr, nm, "stats", "m_i, l_i")
        c("empty = l_i == 0.0")
        c("l_safe = tl.where(empty, 1.0, l_i)")
        c("# pass 2: normalized weights (0 for a row without keys: lse2 = inf), mixed, @ v")
        c('lse2 = tl.where(empty, float("inf"), m_i + tl.log2(l_safe))')
        _walk(c, k, pr, nm, "weights", "acc")
        c("out = acc")
    else:
        _walk(c, k, pr, nm, "online", "acc, m_i, l_i")
        c("empty = l_i == 0.0")
        c("l_safe = tl.where(empty, 1.0, l_i)")
        c("out = acc / l_safe[:, :, None]")
    c("# m_i is in base-2 units; the lse is stored as a natural logarithm")
    c(f'lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * {LN2!r})')
    c("o_ptrs = (Out + b.to(tl.int64) * stride_ob + offs_h[:, None, None] * stride_oh")
    c("          + offs_m[None, :, None] * stride_om + offs_dv[None, None, :] * stride_od)")
    c("tl.store(o_ptrs, _round(out, Out.dtype.element_ty, UPCAST), "
      "mask=head_ok & row_ok & (offs_dv[None, None, :] < DV))")
    _store_lse_rows(c, "Lse", "lse")
    c.depth -= 1
    return contract


def _emit_dq(c: CodeBuilder, k: AttentionKernel, pr: TritonPrinter,
             nm: KernelNames) -> KernelContract:
    contract = dq_contract(k, nm)
    pre, post = k.around.premix is not None, k.around.postmix is not None
    _program_head(c, contract, f"{nm.spec}: head-mixing backward, one program per (query tile, "
                  "b): delta = Σ_n w dw - dlse, dq and the coefficient gradients of its rows.")
    _query_program(c, k, transposed=True)
    c("do_ptrs = (DO + b.to(tl.int64) * stride_dob + hh[:, None, None] * stride_doh")
    c("           + offs_m[None, :, None] * stride_dom + offs_dv[None, None, :] * stride_dod)")
    c("do = tl.load(do_ptrs, mask=head_ok & row_ok & (offs_dv[None, None, :] < DV), other=0.0)")
    c("lse = tl.load(Lse + (b * H + hh[:, None]) * M + offs_m[None, :], mask=rows, other=0.0)")
    c(f'lse2 = tl.where(lse == float("-inf"), float("inf"), lse * {LOG2E!r})')
    if post:
        c("# pass 1: delta[h] = Σ_n w[h] dw[h] (dw needs every head's dO: a walk of its own)")
        c("delta = tl.zeros([BLOCK_H, BLOCK_M], tl.float32)")
        c("dpost = tl.zeros([BLOCK_M, BLOCK_H, BLOCK_H], tl.float32)")
        _walk(c, k, pr, nm, "dstats", "delta, dpost")
    else:
        c("o_ptrs = (Out + b.to(tl.int64) * stride_ob + hh[:, None, None] * stride_oh")
        c("          + offs_m[None, :, None] * stride_om + offs_dv[None, None, :] * stride_od)")
        c("o = tl.load(o_ptrs, mask=head_ok & row_ok & (offs_dv[None, None, :] < DV), "
          "other=0.0)")
        c("delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 2)")
    with c.block("if HAS_DLSE:"):
        c("delta -= tl.load(DLse + (b * H + hh[:, None]) * M + offs_m[None, :], mask=rows, "
          "other=0.0)")
    _store_lse_rows(c, "Delta", "delta")
    c("dq = tl.zeros([BLOCK_H, BLOCK_M, BLOCK_D], tl.float32)")
    if pre:
        c("dpre = tl.zeros([BLOCK_M, BLOCK_H, BLOCK_H], tl.float32)")
    _walk(c, k, pr, nm, "dq", "dq, dpre" if pre else "dq")
    c("dq_ptrs = DQ + ((b * H + offs_h[:, None, None]) * M + offs_m[None, :, None]) * D + "
      "offs_d[None, None, :]")
    c("tl.store(dq_ptrs, dq, mask=head_ok & row_ok & (offs_d[None, None, :] < D))")
    for kind, ptr, p in mixes(k):
        c(f"# d {kind}: [B, M, H, H] fp32, one program per (b, query tile) writes its rows")
        c(f"d{p}_ptrs = D{ptr} + ((b * M + offs_m[:, None, None]) * H + offs_h[None, :, None]) "
          "* H + offs_h[None, None, :]")
        c(f"tl.store(d{p}_ptrs, d{p}, mask=(offs_m[:, None, None] < M) & "
          "(offs_h[None, :, None] < H) & (offs_h[None, None, :] < H))")
    c.depth -= 1
    return contract


def _emit_dkdv(c: CodeBuilder, k: AttentionKernel, pr: TritonPrinter,
               nm: KernelNames) -> KernelContract:
    contract = dkdv_contract(k, nm)
    _program_head(c, contract, f"{nm.spec}: head-mixing backward, one program per (key tile, "
                  "b): dk and dv of every query head over the query tiles that see it.")
    c("pid_n = tl.program_id(0)")
    c("b = tl.program_id(1)")
    c("n_lo = pid_n * BLOCK_N")
    c("n_hi = tl.minimum(n_lo + BLOCK_N, N) - 1")
    c("zero = n_lo * 0  # a runtime integer, so bound arithmetic never folds to constants")
    c("offs_n = n_lo + tl.arange(0, BLOCK_N)")
    _head_indices(c)
    c("keys = (offs_n < N)[None, :, None]")
    c("kt_ptrs = (K + b.to(tl.int64) * stride_kb + kvh[:, None, None] * stride_kh")
    c("           + offs_n[None, None, :] * stride_kn + offs_d[None, :, None] * stride_kd)")
    c("kt = tl.load(kt_ptrs, mask=(offs_n[None, None, :] < N) & (offs_d[None, :, None] < D), "
      "other=0.0)")
    c("v_ptrs = (V + b.to(tl.int64) * stride_vb + kvh[:, None, None] * stride_vh")
    c("          + offs_n[None, :, None] * stride_vn + offs_dv[None, None, :] * stride_vd)")
    c("v = tl.load(v_ptrs, mask=keys & (offs_dv[None, None, :] < DV), other=0.0)")
    c("dk = tl.zeros([BLOCK_H, BLOCK_N, BLOCK_D], tl.float32)")
    c("dv = tl.zeros([BLOCK_H, BLOCK_N, BLOCK_DV], tl.float32)")
    _walk(c, k, pr, nm, "dkdv", "dk, dv")
    c("dk_ptrs = DKacc + ((b * H + offs_h[:, None, None]) * N + offs_n[None, :, None]) * D + "
      "offs_d[None, None, :]")
    c("tl.store(dk_ptrs, dk, mask=head_ok & keys & (offs_d[None, None, :] < D))")
    c("dv_ptrs = DVacc + ((b * H + offs_h[:, None, None]) * N + offs_n[None, :, None]) * DV + "
      "offs_dv[None, None, :]")
    c("tl.store(dv_ptrs, dv, mask=head_ok & keys & (offs_dv[None, None, :] < DV))")
    c.depth -= 1
    return contract


def _step_call(c: CodeBuilder, k: AttentionKernel, nm: KernelNames, kind: str, result: str,
               masked: str, edge: str) -> None:
    c.call(f"{result} = {_step_name(nm, kind)}(", _step_args(k, nm, kind) + [
        f"MASKED={masked}", f"EDGE={edge}", "IEEE=IEEE", "UPCAST=UPCAST"])


__all__ = ["MAX_HEADS", "BLOCK_H", "generate", "contracts", "forward_contract", "dq_contract",
           "dkdv_contract", "segments"]
