"""The softmax backward kernels of specs with something around the score (operand prologues,
several dots, a value alias, a gate, a kv-head map: backends/triton/softmax/backward_around.py).

The oracle is torch autograd through an eager reference written here from the math of the
constructs (rope pairs rotated by position * theta^(-2i/dims), l2norm x / sqrt(sum x^2 + eps)
times a gain, row factors, qk = sum_t w_t dot(x_t, y_t), out = gate * softmax(s) @ v', K/V head
of query head h = map[h]) -- never from attnc's IR. The kernels are launched directly
(`launch_backward_around`) with the reference's out and lse, so they are checked on their own:
the gradients of the operands and the adjoints of the row values (factors, gains, the gate)
against the reference's, fp32 tight and bf16 loose, ragged M and N, GQA, a fully masked row.
A float64 gradcheck checks the prologue VJP algebra the kernels emit (a transcription of the
emitted formulas) against finite differences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import sympy
import torch

import attnc
from attnc.backends.triton.softmax.launch import backward_config, default_config, \
    launch_backward_around
from attnc.testing import rel_error

GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
B, HQ, HKV, M, N, D, DV = 1, 4, 2, 21, 19, 24, 16


# --- the reference -----------------------------------------------------------------------------

def rope(x, pos, theta, dims=None, interleaved=False):
    """Pairs (i, i + R/2) (or (2i, 2i + 1)) of the first R features rotated by
    pos * theta^(-2i/R); the rest pass through."""
    R = dims or x.shape[-1]
    i = torch.arange(R // 2, dtype=torch.float64, device=x.device)
    ang = pos[..., None].to(x.dtype) * (theta ** (-2.0 * i / R)).to(x.dtype)
    c, s = ang.cos(), ang.sin()
    rot, rest = x[..., :R], x[..., R:]
    if interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((a * c - b * s, b * c + a * s), -1).flatten(-2)
    else:
        a, b = rot[..., :R // 2], rot[..., R // 2:]
        out = torch.cat((a * c - b * s, b * c + a * s), -1)
    return torch.cat((out, rest), -1)


def l2norm(x, gain=None, eps=1e-6):
    y = x / torch.sqrt((x * x).sum(-1, keepdim=True) + eps)
    return y if gain is None else y * gain[..., None, :]


def apply(x, ops, rows):
    """An operand's prologue: ("rope", key, theta, dims, interleaved), ("l2norm", gain key or
    None), ("scale", key) in order, reading the row values `rows` by key."""
    for op in ops:
        if op[0] == "rope":
            x = rope(x, rows[op[1]], op[2], op[3], op[4])
        elif op[0] == "l2norm":
            x = l2norm(x, None if op[1] is None else rows[op[1]])
        else:
            x = x * rows[op[1]][..., None]
    return x


def attention(case, tensors, rows, scale, params=None):
    """(out gated, out ungated, lse) of the case's spec on these operands and row values (and
    params, for a score term besides the dots)."""
    heads = case.heads()
    t = {x: apply(v, case.prologues.get(x, ()), rows) for x, v in tensors.items()}
    s = sum(w * torch.einsum("bhmd,bhnd->bhmn", t[x], t[y][:, heads]) for x, y, w in case.dots)
    s = s * scale
    if case.bias is not None:
        s = s + case.bias(params)
    m = torch.arange(M)[:, None]
    n = torch.arange(N)[None, :]
    visible = case.mask(m, n).to(s.device)
    empty = ~visible.any(-1)
    s = torch.where(visible, s, -math.inf)
    lse = torch.logsumexp(torch.where(empty[:, None], 0.0, s), -1)
    p = torch.where(visible, torch.exp(s - lse[..., None]), 0.0)
    out = p @ t[case.value][:, heads]
    lse = torch.where(empty, -math.inf, lse)
    gated = out * rows["gate"][..., None] if case.gate else out
    return gated, out, lse


# --- the cases ---------------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    spec: str
    prologues: dict = field(default_factory=dict)
    dots: tuple = (("q", "k", 1.0),)
    value: str = "v"
    operands: dict = field(default_factory=dict)  # declared operand -> (side, head dim)
    gate: bool = False
    kv_map: tuple | None = None
    mask: object = staticmethod(lambda m, n: n <= m)
    bias: object = None  # params -> a term added to the score (after the scale)

    def heads(self):
        return torch.tensor(self.kv_map) if self.kv_map else torch.arange(HQ) // (HQ // HKV)

    def shapes(self) -> dict:
        out = {"q": (B, HQ, M, D), "k": (B, HKV, N, D)}
        if self.value == "v":
            out["v"] = (B, HKV, N, DV)
        for x, (side, dim) in self.operands.items():
            out[x] = (B, HQ, M, dim) if side == "q" else (B, HKV, N, dim)
        return out

    def side(self, x):
        return "q" if x == "q" else "k" if x in ("k", "v") else self.operands[x][0]

    def rows(self, g) -> dict:
        """Random row values by key: positions (integers), positive factors, gains, a gate
        with an exact 0."""
        out = {}
        for x, ops in self.prologues.items():
            heads, rows = (HQ, M) if self.side(x) == "q" else (HKV, N)
            dim = self.shapes()[x][-1]
            for op in ops:
                if op[0] == "rope":
                    out[op[1]] = torch.randint(0, 3 * max(M, N), (B, heads, rows),
                                               generator=g).float()
                elif op[0] == "l2norm" and op[1] is not None:
                    out[op[1]] = 1.0 + 0.3 * torch.randn(B, heads, dim, generator=g)
                elif op[0] == "scale":
                    out[op[1]] = 0.5 + torch.rand(B, heads, rows, generator=g)
        if self.gate:
            gate = torch.rand(B, HQ, M, generator=g)
            gate[0, 1, 3] = 0.0  # d gate still flows: rowsum(dO * ungated out)
            out["gate"] = gate
        return out


# an expression for IR nodes the gradcheck builds (the values come from its own row tensors)
S_POS = sympy.Symbol("p")
SPEC_HEAD = "attention t {\n  input pos_q[b, m], pos_k[b, n]\n"
ROPE_Q = ("rope", "q_position0", 10000.0, None, False)
ROPE_K = ("rope", "k_position0", 10000.0, None, False)

CASES = [
    Case("rope_half", SPEC_HEAD + "  q = rope(q, pos_q[b, m], 10000.0)\n"
         "  k = rope(k, pos_k[b, n], 10000.0)\n  score = dot(q, k) * scale\n  mask = n <= m\n}\n",
         {"q": (ROPE_Q,), "k": (ROPE_K,)}),
    Case("rope_interleaved_partial", SPEC_HEAD
         + "  q = rope_interleaved(q, pos_q[b, m], 500.0, 16)\n"
         "  k = rope_interleaved(k, pos_k[b, n], 500.0, 16)\n  score = dot(q, k) * scale\n"
         "  mask = n <= m\n}\n",
         {"q": (("rope", "q_position0", 500.0, 16, True),),
          "k": (("rope", "k_position0", 500.0, 16, True),)}),
    Case("rope_half_partial_masked_row", SPEC_HEAD + "  q = rope(q, pos_q[b, m], 100.0, 8)\n"
         "  k = rope(k, pos_k[b, n], 100.0, 8)\n  score = dot(q, k) * scale\n  mask = n < m\n}\n",
         {"q": (("rope", "q_position0", 100.0, 8, False),),
          "k": (("rope", "k_position0", 100.0, 8, False),)}, mask=lambda m, n: n < m),
    Case("qk_norm_gain", "attention t {\n  param gq[d], gk[h, d]\n  q = l2norm(q, gq[d])\n"
         "  k = l2norm(k, gk[h, d])\n  score = dot(q, k) * 4.0\n  mask = n <= m\n}\n",
         {"q": (("l2norm", "q_gain0"),), "k": (("l2norm", "k_gain0"),)}),
    Case("norm_then_rope", SPEC_HEAD.replace("\n", "\n  param gq[d]\n", 1)
         + "  q = rope(l2norm(q, gq[d]), pos_q[b, m], 10000.0)\n"
         "  k = rope(l2norm(k), pos_k[b, n], 10000.0)\n  score = dot(q, k) * 4.0\n}\n",
         {"q": (("l2norm", "q_gain0"), ("rope", "q_position1", 10000.0, None, False)),
          "k": (("l2norm", None), ("rope", "k_position1", 10000.0, None, False))},
         mask=lambda m, n: n >= 0),
    Case("temperature_value_scale", "attention t {\n  param temp[b, h, m], vs[b, h, n]\n"
         "  q = q * temp[b, h, m]\n  v = v * vs[b, h, n]\n  score = dot(q, k) * scale\n"
         "  mask = n <= m\n}\n",
         {"q": (("scale", "q_factor0"),), "v": (("scale", "v_factor0"),)}),
    Case("mla_two_dots", "attention t {\n  input pos_q[b, m], pos_k[b, n]\n"
         "  operand qr[m], c[n], kr[n]\n  qr = rope(qr, pos_q[b, m], 10000.0)\n"
         "  kr = rope(kr, pos_k[b, n], 10000.0)\n  v = c\n"
         "  score = (dot(q, c) + 0.5 * dot(qr, kr)) * scale\n  mask = n <= m\n}\n",
         {"qr": (("rope", "qr_position0", 10000.0, None, False),),
          "kr": (("rope", "kr_position0", 10000.0, None, False),)},
         dots=(("q", "c", 1.0), ("qr", "kr", 0.5)), value="c",
         operands={"qr": ("q", 16), "c": ("k", D), "kr": ("k", 16)}),
    Case("value_alias_k", "attention t {\n  param vs[b, n]\n  k = k * vs[b, n]\n  v = k\n"
         "  score = dot(q, k) * scale\n  mask = n <= m\n}\n",
         {"k": (("scale", "k_factor0"),)}, value="k"),
    Case("value_operand", "attention t {\n  param vs[b, n]\n  operand c[n]\n"
         "  c = c * vs[b, n]\n  v = c\n  score = dot(q, k) * scale\n  mask = n <= m\n}\n",
         {"c": (("scale", "c_factor0"),)}, value="c", operands={"c": ("k", DV)}),
    Case("gate", "attention t {\n  param gt[b, h, m]\n  score = dot(q, k) * scale\n"
         "  gate = sigmoid(gt[b, h, m])\n  mask = n <= m\n}\n", gate=True),
    Case("kv_head_map", "attention t {\n  input hmap[h]\n  score = dot(q, k) * scale\n"
         "  kv_head = hmap[h]\n  mask = n <= m\n}\n", kv_map=(1, 1, 1, 1)),  # kv head 0 unread
]


def _compile(case: Case):
    return attnc.compile(case.spec, block_m=16, block_n=16)


def _direct(case: Case, dtype, seed=0):
    """(kernel grads, reference grads) of the operands and row values, the kernels launched
    on the reference's out and lse."""
    g = torch.Generator().manual_seed(seed)
    kern = _compile(case)
    tensors = {x: torch.randn(s, generator=g).to(dtype) for x, s in case.shapes().items()}
    rows = case.rows(g)
    leaves = {x: t.double().requires_grad_() for x, t in tensors.items()}
    rleaves = {x: t.double().requires_grad_(not x.split("_")[-1].startswith("position"))
               for x, t in rows.items()}
    scale = 4.0 if "4.0" in case.spec else 1 / math.sqrt(D)
    gated, ungated, lse = attention(case, leaves, rleaves, scale)
    dout = torch.randn(gated.shape, generator=g)
    dlse = torch.randn(lse.shape, generator=g)
    finite = torch.isfinite(lse)
    loss = (gated * dout.double()).sum() + (torch.where(finite, lse, 0.0) * dlse.double()).sum()
    learn = [t for t in rleaves.values() if t.requires_grad]
    want = [torch.zeros_like(t) if w is None else w for t, w in zip(
        list(leaves.values()) + learn,
        torch.autograd.grad(loss, list(leaves.values()) + learn, allow_unused=True))]
    kv = torch.tensor(case.kv_map) if case.kv_map else None
    cfg = backward_config(default_config(D, DV, dtype, torch.device("cpu")), dtype,
                          torch.device("cpu"))
    cfg.update(BLOCK_M=16, BLOCK_N=16)
    # the spec's params and inputs: the kernels read them only through the row values
    sizes = {"B": B, "H": HQ, "M": M, "N": N, "D": D}
    extras = {d.name: torch.zeros([int(sympy.sympify(x).subs(
        {s: sizes[s.name] for s in sympy.sympify(x).free_symbols})) for x in d.dims],
                                  dtype=torch.int64 if d.kind.value == "input" else torch.float32)
              for d in kern.kernel_ir.inputs}
    grads, adjoints = launch_backward_around(
        kern.module(), kern.kernel_ir, tensors, extras, rows, kv, ungated.detach().to(dtype),
        lse.detach().float(), dout.to(dtype), dlse, scale, cfg)
    names = list(leaves) + [x for x, t in rleaves.items() if t.requires_grad]
    got = [grads[x] for x in leaves] + [adjoints[x] for x in rleaves if rleaves[x].requires_grad]
    return names, got, want


# bf16 runs every case too; the default suite keeps the two that exercise the most rounding
# paths (two dots with an aliased value, the gate), the rest are marked slow
BF16_DEFAULT = ("mla_two_dots", "gate")
KERNEL_CASES = [pytest.param(c, dt, id=f"{c.name}-{name}", marks=[pytest.mark.slow] if (
    dt == torch.bfloat16 and c.name not in BF16_DEFAULT) else [])
    for c in CASES for dt, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))]


@pytest.mark.parametrize("case, dtype", KERNEL_CASES)
def test_kernel_gradients(case, dtype):
    names, got, want = _direct(case, dtype)
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape, name
        err = rel_error(a, b)
        assert err <= GRAD_TOL[dtype], f"{case.name} d{name}: relative error {err:.3g}"


# --- the VJP algebra against finite differences ------------------------------------------------

class _Ptr:
    """A pointer into a flat float64 tensor, as the emitted code's arithmetic builds it."""

    def __init__(self, flat, offset=0):
        self.flat, self.offset = flat, offset

    def __add__(self, other):
        return _Ptr(self.flat, self.offset + other)


class _TL:
    """The few `tl` functions the prologue emitters use, over float64 torch tensors."""

    float32, int64, int32 = torch.float64, torch.int64, torch.int32
    where, cos, sin, sqrt = staticmethod(torch.where), staticmethod(torch.cos), \
        staticmethod(torch.sin), staticmethod(torch.sqrt)

    @staticmethod
    def arange(lo, hi):
        return torch.arange(lo, hi)

    @staticmethod
    def exp2(x):
        return torch.exp2(x)

    @staticmethod
    def sum(x, axis):
        return x.sum(axis)

    @staticmethod
    def broadcast_to(x, shape):
        return torch.broadcast_to(x, shape)

    @staticmethod
    def gather(x, index, axis):
        return torch.gather(x, axis, index)

    @staticmethod
    def load(ptr, mask=None, other=0.0):
        off = torch.as_tensor(ptr.offset)
        safe = off.clamp(0, ptr.flat.numel() - 1)
        value = ptr.flat[safe]
        return value if mask is None else torch.where(mask, value, other)

    @staticmethod
    def store(ptr, value, mask=None):
        off, value = torch.broadcast_tensors(torch.as_tensor(ptr.offset), value)
        keep = torch.ones_like(off, dtype=torch.bool) if mask is None else \
            torch.broadcast_to(mask, off.shape)
        ptr.flat[off[keep]] = value[keep]


def _run(text: str, scope: dict) -> dict:
    scope = {**scope, "tl": _TL, "_round": lambda x, dtype, upcast: x, "UPCAST": False,
             "_rope_cos_sin": lambda angle: (torch.cos(angle), torch.sin(angle))}
    exec(text, scope)
    return scope


def _prologue_function(spec_ops, ops_rows):
    """(forward, vjp) of a query operand's prologue as the kernels emit it: the forward is
    prologue.emit_tile's text (the forward kernels'), the vjp prologue_vjp's, both executed
    over torch float64 tensors on one [BM, BD] tile of one (b, h) (rope's fp32 cos/sin helper
    is torch's there: what is checked is the algebra around it)."""
    from attnc.backends.triton.softmax import prologue as P
    from attnc.backends.triton.softmax.prologue_vjp import Slots, emit_chain, emit_vjp
    from attnc.backends.triton.source import CodeBuilder
    from attnc.ir.around import Around, Prologue
    a = Around(prologues=(Prologue("q", tuple(spec_ops)),))
    tile = P.query_tile("q", str)
    fwd, bwd = CodeBuilder(), CodeBuilder()
    P.emit_tile(fwd, tile, "y", a, "None")
    bwd("raw = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, "
        "mask=(offs_m[:, None] < M) & (offs_d[None, :] < D), other=0.0)")
    xs = emit_chain(bwd, tile, a, "raw", "(BM, BD)", "t")
    bwd(f"dx = {emit_vjp(bwd, tile, a, xs, 'dy', Slots('1', 'M', '0', '1'), 't')}")
    return fwd.text(), bwd.text()


def _scope(x, rows, Mr, Dr, BM, BD):
    scope = {"q_base": _Ptr(x.reshape(-1)), "stride_qm": Dr, "stride_qd": 1, "D": Dr, "M": Mr,
             "offs_m": torch.arange(BM), "offs_d": torch.arange(BD), "BM": BM, "BD": BD,
             "b": torch.tensor(0), "h": 0}
    for key, t in rows.items():
        scope[f"rv_{key}"] = _Ptr(t.reshape(-1))
        scope.update({f"rv_{key}_s0": 0, f"rv_{key}_s1": 0, f"rv_{key}_s2": 1})
        scope[f"d_rv_{key}"] = _Ptr(torch.zeros(t.numel(), dtype=torch.float64))
    return scope


@pytest.mark.parametrize("ops", ["rope_half", "rope_interleaved_partial", "l2norm_gain_rope",
                                 "scale_l2norm_rope_scale"])
def test_prologue_vjp_gradcheck(ops):
    """The emitted vjp is the adjoint of the emitted forward: torch.autograd.gradcheck (float64,
    finite differences) of a Function whose forward runs prologue.emit_tile's text and whose
    backward runs prologue_vjp's, for x and the factors and gains (ragged rows and features)."""
    from attnc.ir.around import L2Norm, Rope, RopeStyle, RowScale
    Mr, Dr, BM, BD = 5, 12, 8, 16
    g = torch.Generator().manual_seed(3)
    pos = torch.randint(0, 50, (Mr,), generator=g).double()
    spec_ops, rows = {
        "rope_half": ([Rope(S_POS, 100.0)], {"q_position0": pos}),
        "rope_interleaved_partial": ([Rope(S_POS, 10.0, 8, RopeStyle.INTERLEAVED)],
                                     {"q_position0": pos}),
        "l2norm_gain_rope": ([L2Norm(S_POS), Rope(S_POS, 100.0, 6)],
                             {"q_gain0": 1 + torch.rand(Dr, generator=g, dtype=torch.float64),
                              "q_position1": pos}),
        "scale_l2norm_rope_scale": ([RowScale(S_POS), L2Norm(), Rope(S_POS, 100.0),
                                     RowScale(S_POS)],
                                    {"q_factor0": 0.5 + torch.rand(Mr, generator=g,
                                                                   dtype=torch.float64),
                                     "q_position2": pos,
                                     "q_factor3": 0.5 + torch.rand(Mr, generator=g,
                                                                   dtype=torch.float64)})}[ops]
    fwd, bwd = _prologue_function(spec_ops, rows)
    keys = list(rows)
    learn = [key for key in keys if "position" not in key]

    class Prologue(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, *values):
            ctx.save_for_backward(x, *values)
            named = {**dict(zip(learn, values)), **{k: rows[k] for k in keys if k not in learn}}
            return _run(fwd, _scope(x, named, Mr, Dr, BM, BD))["y"]

        @staticmethod
        def backward(ctx, dy):
            x, *values = ctx.saved_tensors
            named = {**dict(zip(learn, values)), **{k: rows[k] for k in keys if k not in learn}}
            scope = _run(bwd, {**_scope(x, named, Mr, Dr, BM, BD), "dy": dy})
            dx = scope["dx"][:Mr, :Dr]
            return (dx, *(scope[f"d_rv_{key}"].flat.view_as(rows[key]) for key in learn))

    def f(x, *values):
        return Prologue.apply(x, *values)[:Mr, :Dr]

    x = torch.randn(Mr, Dr, generator=g, dtype=torch.float64, requires_grad=True)
    values = [rows[key].clone().requires_grad_() for key in learn]
    assert torch.autograd.gradcheck(f, (x, *values))


# --- through the public call: params chained by the runtime --------------------------------------

EVERYTHING = Case(
    "everything",
    "attention everything {\n  param gq[d], gk[h, d], temp[b, h, m], vs[b, n], gt[b, h, m]\n"
    "  input pos_q[b, m], pos_k[b, n], hmap[h]\n  q = l2norm(q, gq[d])\n  q = q * temp[b, h, m]\n"
    "  q = rope(q, pos_q[b, m], 10000.0)\n"
    "  k = rope_interleaved(l2norm(k, gk[h, d]), pos_k[b, n], 10000.0, 16)\n"
    "  v = v * vs[b, n]\n  score = dot(q, k) * scale\n  gate = sigmoid(gt[b, h, m])\n"
    "  kv_head = hmap[h]\n  mask = n < m\n}\n",
    {"q": (("l2norm", "gq"), ("scale", "temp"), ROPE_Q),
     "k": (("l2norm", "gk"), ("rope", "k_position0", 10000.0, 16, True)),
     "v": (("scale", "vs"),)},
    gate=True, kv_map=(1, 1, 0, 1), mask=lambda m, n: n < m)
MLA = next(c for c in CASES if c.name == "mla_two_dots")
ALIAS = next(c for c in CASES if c.name == "value_alias_k")
# a score param besides the prologues: its partial sums ride along in the same kernels
ALIBI = Case("rope_alibi", SPEC_HEAD.replace("\n", "\n  param slope[h]\n", 1)
             + "  q = rope(q, pos_q[b, m], 10000.0)\n  k = rope(k, pos_k[b, n], 10000.0)\n"
             "  score = dot(q, k) * scale - slope[h] * (m - n)\n  mask = n <= m\n}\n",
             {"q": (ROPE_Q,), "k": (ROPE_K,)},
             bias=lambda p: -p["slope"][:, None, None] * (torch.arange(M)[:, None]
                                                         - torch.arange(N)[None, :]))


def _params(case: Case, g):
    """The call's params and inputs, and the row values they make (in the reference's terms:
    key side `h` is the K/V head)."""
    if case is EVERYTHING:
        t = {"gq": 1 + 0.3 * torch.randn(D, generator=g),
             "gk": 1 + 0.3 * torch.randn(HQ, D, generator=g),
             "temp": 0.5 + torch.rand(B, HQ, M, generator=g),
             "vs": 0.5 + torch.rand(B, N, generator=g), "gt": torch.randn(B, HQ, M, generator=g),
             "pos_q": torch.randint(0, 100, (B, M), generator=g),
             "pos_k": torch.randint(0, 100, (B, N), generator=g),
             "hmap": torch.tensor(case.kv_map)}
    elif case is ALIAS:
        t = {"vs": 0.5 + torch.rand(B, N, generator=g)}
    else:
        t = {"pos_q": torch.randint(0, 100, (B, M), generator=g),
             "pos_k": torch.randint(0, 100, (B, N), generator=g)}
        if case is ALIBI:
            t["slope"] = torch.rand(HQ, generator=g)

    def rows(p):
        if case is EVERYTHING:
            return {"gq": p["gq"].expand(B, HQ, D), "gk": p["gk"][:HKV].expand(B, HKV, D),
                    "temp": p["temp"], "q_position0": p["pos_q"][:, None].expand(B, HQ, M),
                    "k_position0": p["pos_k"][:, None].expand(B, HKV, N),
                    "vs": p["vs"][:, None].expand(B, HKV, N), "gate": torch.sigmoid(p["gt"])}
        if case is ALIAS:
            return {"k_factor0": p["vs"][:, None].expand(B, HKV, N)}
        query, key = ("qr", "kr") if case is MLA else ("q", "k")
        return {f"{query}_position0": p["pos_q"][:, None].expand(B, HQ, M),
                f"{key}_position0": p["pos_k"][:, None].expand(B, HKV, N)}
    return t, rows


def _call_grads(case: Case, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = {x: torch.randn(s, generator=g).to(dtype) for x, s in case.shapes().items()}
    params, rows = _params(case, g)
    kern = _compile(case)
    leaves = {x: t.clone().requires_grad_() for x, t in tensors.items()}
    learn = {x: t.clone().requires_grad_(t.is_floating_point()) for x, t in params.items()}
    ops = {x: leaves[x] for x in case.operands}
    out, lse = kern(leaves["q"], leaves["k"], leaves.get("v"), return_lse=True, **ops, **learn)
    dout, dlse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    wrt = list(leaves.values()) + [t for t in learn.values() if t.requires_grad]
    finite = torch.isfinite(lse)

    def loss(o, l):
        return (o.double() * dout.double()).sum() + (torch.where(finite, l.double(), 0.0)
                                                     * dlse.double()).sum()
    got = torch.autograd.grad(loss(out, lse), wrt)
    rleaves = {x: t.double().requires_grad_() for x, t in tensors.items()}
    rlearn = {x: (t.double().requires_grad_() if t.is_floating_point() else t)
              for x, t in params.items()}
    gated, _, ref_lse = attention(case, rleaves, {x: t.double() for x, t in rows(rlearn).items()},
                                  1 / math.sqrt(D), rlearn)
    want = torch.autograd.grad(loss(gated, ref_lse), list(rleaves.values()) + [
        t for t in rlearn.values() if t.requires_grad], allow_unused=True)
    names = list(leaves) + [x for x, t in learn.items() if t.requires_grad]
    return names, got, [torch.zeros_like(a) if b is None else b for a, b in zip(got, want)]


@pytest.mark.parametrize("case, dtype", [
    (EVERYTHING, torch.float32),
    pytest.param(EVERYTHING, torch.bfloat16, marks=pytest.mark.slow),
    (MLA, torch.float32), (ALIAS, torch.float32), (ALIBI, torch.float32)],
    ids=["everything-fp32", "everything-bf16", "mla-fp32", "alias-fp32", "alibi-fp32"])
def test_call_gradients(case, dtype):
    """Gradients through `kernel(...)`: q, k, v (or the aliased operand), the declared operands
    and every param (gains, factors, the gate's), the runtime chaining the row values'
    adjoints into the params."""
    names, got, want = _call_grads(case, dtype)
    for name, a, b in zip(names, got, want):
        err = rel_error(a, b)
        assert err <= GRAD_TOL[dtype], f"{case.name} d{name}: relative error {err:.3g}"


def test_gradients_are_reproducible():
    """Two backward runs give bitwise equal gradients and row-value adjoints (gains' partial
    sums are reduced in a fixed order, nothing uses float atomics)."""
    norm = next(c for c in CASES if c.name == "qk_norm_gain")
    first = _direct(norm, torch.float32, seed=5)[1]
    again = _direct(norm, torch.float32, seed=5)[1]
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_block_sparse_gradients():
    """A block-sparse kernel (causal block mask) walks the mask's lists in both backward
    kernels; its gradients match the reference's (rope, an l2norm gain, a gate)."""
    case = Case("block_sparse", SPEC_HEAD.replace("\n", "\n  param gq[d], gt[b, h, m]\n", 1)
                + "  q = rope(l2norm(q, gq[d]), pos_q[b, m], 100.0)\n"
                "  k = rope(k, pos_k[b, n], 100.0)\n  score = dot(q, k) * scale\n"
                "  gate = sigmoid(gt[b, h, m])\n  mask = n <= m\n}\n",
                {"q": (("l2norm", "gq"), ("rope", "q_position1", 100.0, None, False)),
                 "k": (("rope", "k_position0", 100.0, None, False),)}, gate=True)
    g = torch.Generator().manual_seed(4)
    kern = attnc.compile(case.spec, block_sparse=True, block_m=16, block_n=16)
    mask = attnc.create_block_mask(lambda b, h, m, n: n <= m, B, HQ, M, N, BLOCK_SIZE=16)
    leaves = {x: torch.randn(s, generator=g).requires_grad_() for x, s in case.shapes().items()}
    gq = (1 + torch.rand(D, generator=g)).requires_grad_()
    gt = torch.randn(B, HQ, M, generator=g).requires_grad_()
    pos_q, pos_k = torch.randint(0, 50, (B, M), generator=g), torch.randint(0, 50, (B, N),
                                                                              generator=g)
    out = kern(leaves["q"], leaves["k"], leaves["v"], gq=gq, gt=gt, pos_q=pos_q, pos_k=pos_k,
               block_mask=mask)
    dout = torch.randn(out.shape, generator=g)
    wrt = [*leaves.values(), gq, gt]
    got = torch.autograd.grad((out * dout).sum(), wrt)
    rows = {"gq": gq.expand(B, HQ, D), "q_position1": pos_q[:, None].expand(B, HQ, M),
            "k_position0": pos_k[:, None].expand(B, HKV, N), "gate": torch.sigmoid(gt)}
    ref = attention(case, leaves, rows, 1 / math.sqrt(D))[0]
    want = torch.autograd.grad((ref * dout).sum(), wrt)
    for name, a, b in zip(["q", "k", "v", "gq", "gt"], got, want):
        assert rel_error(a, b) <= GRAD_TOL[torch.float32], name
