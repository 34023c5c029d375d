"""Blocks of branches (`branch` / `combine`): lowering, the Branches IR, and BranchedKernel
against an eager reference written here from the math.

The reference builds each branch's dense scores (its keys, its mask, its score) in float64 and
either concatenates them along the keys and takes one softmax over the union (combine =
softmax), or normalizes each apart and sums them weighed by their gates (combine = gates). Cases
cover fp32 and bf16, ragged M and N (and Nc) against 16x16 tiles, GQA, rows that see no key in
any branch, forward and gradients of q, k, v, kc, vc and the params.
"""

from __future__ import annotations

import math

import pytest
import torch

import attnc
from attnc.errors import SpecError
from attnc.ir.branches import Branches, Combine, verify_branches
from attnc.pipeline import read_spec, show
from attnc.testing import rel_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 4e-2}
TILES = {"block_m": 16, "block_n": 16}

# Rows m < 3 see no local key and rows m < 10 no compressed one: rows 0..2 see nothing at all.
JOINT = """\
attention late_two {
  option window = 12, stride = 8
  param slopes[h]
  operand kc[n], vc[n]
  branch local {
    score = dot(q, k) * scale + slopes[h] * (n - m)
    mask = n <= m - 3 and m - n < window
  }
  branch compressed {
    k = kc
    v = vc
    mask = (n + 1) * stride + 2 <= m
  }
  combine = softmax
}
"""

GATES = """\
attention gated_two {
  option window = 12
  param gl[h], gc[b, h, m]
  operand kc[n], vc[n]
  branch local {
    mask = n <= m - 3 and m - n < window
    gate = sigmoid(gl[h])
  }
  branch compressed {
    k = kc
    v = vc
    gate = tanh(gc[b, h, m])
  }
  combine = gates
}
"""


# --- the reference ---------------------------------------------------------------------------
def scores(q, k, scale, H):
    """scale · q kᵀ with each query head h reading K head h // (H / Hkv), float64."""
    k = k.double().repeat_interleave(H // k.shape[1], dim=1)
    return q.double() @ k.transpose(-1, -2) * scale


def expand(v, H):
    return v.double().repeat_interleave(H // v.shape[1], dim=1)


def reference(q, parts, scale, combine, gates=None):
    """parts: per branch (scores [B, H, M, Ni], visible [M, Ni], values [B, Hkv, Ni, Dv]).
    Returns (out, lse) in float64 (lse None for gates)."""
    H = q.shape[1]
    if combine == "softmax":
        s = torch.cat([x.masked_fill(~vis, -math.inf) for x, vis, _ in parts], -1)
        vals = torch.cat([expand(v, H) for _, _, v in parts], -2)
        lse = torch.logsumexp(s, -1)
        finite = torch.isfinite(lse)
        p = torch.exp(s - torch.where(finite, lse, 0)[..., None])
        return p @ vals, lse
    out = 0
    for (x, vis, v), gate in zip(parts, gates):
        s = x.masked_fill(~vis, -math.inf)
        lse = torch.logsumexp(s, -1)
        p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0)[..., None])
        out = out + gate[..., None] * (p @ expand(v, H))
    return out, None


def positions(M, N):
    return torch.arange(M)[:, None], torch.arange(N)[None, :]


def joint_parts(q, k, v, kc, vc, slopes, scale, window=12, stride=8):
    H = q.shape[1]
    m, n = positions(q.shape[2], k.shape[2])
    local = scores(q, k, scale, H) + slopes.double()[None, :, None, None] * (n - m)
    mc, nc = positions(q.shape[2], kc.shape[2])
    return [(local, (n <= m - 3) & (m - n < window), v),
            (scores(q, kc, scale, H), (nc + 1) * stride + 2 <= mc, vc)]


def variant_parts(q, k, v, kc, vc, scale, window, stride):
    m, n = positions(q.shape[2], k.shape[2])
    mc, nc = positions(q.shape[2], kc.shape[2])
    H = q.shape[1]
    return [(scores(q, k, scale, H), (n <= m) & (m - n < window), v),
            (scores(q, kc, scale, H), (nc + 1) * stride - 1 <= mc, vc)]


def gate_parts(q, k, v, kc, vc, gl, gc, scale, window=12):
    m, n = positions(q.shape[2], k.shape[2])
    H = q.shape[1]
    every = torch.ones(q.shape[2], kc.shape[2], dtype=torch.bool)
    parts = [(scores(q, k, scale, H), (n <= m - 3) & (m - n < window), v),
             (scores(q, kc, scale, H), every, vc)]
    gates = [torch.sigmoid(gl.double())[None, :, None], torch.tanh(gc.double())]
    return parts, gates


# --- helpers ---------------------------------------------------------------------------------
def make(shape, dtype, seed, Nc):
    B, H, Hkv, M, N, D, Dv = shape
    g = torch.Generator().manual_seed(seed)
    t = {"q": torch.randn(B, H, M, D, generator=g), "k": torch.randn(B, Hkv, N, D, generator=g),
         "v": torch.randn(B, Hkv, N, Dv, generator=g),
         "kc": torch.randn(B, Hkv, Nc, D, generator=g),
         "vc": torch.randn(B, Hkv, Nc, Dv, generator=g)}
    return {n: x.to(dtype) for n, x in t.items()}, g


def leaves(tensors, device="cpu"):
    return {n: x.detach().clone().to(device).requires_grad_(True) for n, x in tensors.items()}


def on_device(tensors):
    return {n: x.to(DEVICE) for n, x in tensors.items()}


def assert_close(got, want, tol, what):
    assert not torch.isnan(got).any(), f"{what}: NaN"
    err = rel_error(got, want)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


def check_lse(lse, ref_lse, what):
    assert lse.dtype == torch.float32
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), f"{what}: -inf rows differ"
    finite = torch.isfinite(ref_lse)
    assert (lse.double()[finite] - ref_lse[finite]).abs().max() <= 1e-3 * (
        1 + ref_lse[finite].abs().max()), f"{what}: lse"


# --- the library variant ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype,shape,opts", [
    (torch.float32, (1, 4, 2, 35, 50, 32, 16), {"window": 20, "stride": 8}),
    (torch.bfloat16, (2, 2, 1, 33, 45, 16, 24), {"window": 20, "stride": 8}),
])
def test_variant_matches_reference(dtype, shape, opts):
    kern = attnc.load("local_plus_compressed", **opts, **TILES)
    N, stride = shape[4], opts["stride"]
    t, _ = make(shape, dtype, 1, N // stride)
    d = on_device(t)
    out, lse = kern(d["q"], d["k"], d["v"], kc=d["kc"], vc=d["vc"], return_lse=True)
    out, lse = out.cpu(), lse.cpu()
    scale = 1 / math.sqrt(shape[5])
    ref, ref_lse = reference(t["q"], variant_parts(t["q"], t["k"], t["v"], t["kc"], t["vc"],
                                                   scale, opts["window"], stride), scale,
                             "softmax")
    assert out.dtype == dtype
    assert_close(out, ref, TOL[dtype], "out")
    check_lse(lse, ref_lse, "variant")


# --- combine = softmax: forward, fully masked rows, gradients ---------------------------------
@pytest.mark.parametrize("dtype,shape,Nc", [
    (torch.float32, (1, 4, 2, 33, 40, 16, 16), 5),
    (torch.bfloat16, (2, 2, 2, 29, 21, 16, 8), 3),
])
def test_joint_softmax_forward_and_gradients(dtype, shape, Nc):
    kern = attnc.compile(JOINT, **TILES)
    t, g = make(shape, dtype, 2, Nc)
    slopes = torch.rand(shape[1], generator=g) + 0.1
    x = leaves({**t, "slopes": slopes}, DEVICE)
    out, lse = kern(x["q"], x["k"], x["v"], kc=x["kc"], vc=x["vc"], slopes=x["slopes"],
                    scale=0.3, return_lse=True)
    out, lse = out.cpu(), lse.cpu()
    ref_x = leaves({n: y.double() for n, y in {**t, "slopes": slopes}.items()})
    ref, ref_lse = reference(ref_x["q"], joint_parts(ref_x["q"], ref_x["k"], ref_x["v"],
                                                     ref_x["kc"], ref_x["vc"], ref_x["slopes"],
                                                     0.3), 0.3, "softmax")
    empty = torch.isneginf(ref_lse)
    assert empty[..., :3].all() and not empty[..., 3:].any()  # the rows seeing no key
    assert (out[empty] == 0).all()
    assert_close(out, ref, TOL[dtype], "out")
    check_lse(lse, ref_lse, "joint")
    dout = torch.randn(out.shape, generator=g)
    dlse = torch.randn(lse.shape, generator=g)
    (out.float() * dout).sum().add((torch.where(empty, 0, lse) * dlse).sum()).backward()
    (ref * dout).sum().add((torch.where(empty, 0, ref_lse) * dlse).sum()).backward()
    for name in ("q", "k", "v", "kc", "vc", "slopes"):
        assert_close(x[name].grad, ref_x[name].grad, GRAD_TOL[dtype], f"d{name}")


def test_merge_never_makes_nan():
    """Every branch empty on a row, or one of them: out 0 / the other's, lse -inf / the other's,
    finite gradients."""
    from attnc.runtime.branches import merge
    lse_a = torch.tensor([[[-math.inf, 1.0, -math.inf]]], requires_grad=True)
    lse_b = torch.tensor([[[-math.inf, -math.inf, 2.0]]], requires_grad=True)
    out_a = torch.ones(1, 1, 3, 2, requires_grad=True)
    out_b = torch.full((1, 1, 3, 2), 3.0, requires_grad=True)
    out, lse = merge([out_a, out_b], [lse_a, lse_b])
    assert out[0, 0].tolist() == [[0, 0], [1, 1], [3, 3]]
    assert lse[0, 0, 0] == -math.inf and lse[0, 0, 1:].tolist() == [1.0, 2.0]
    (out.sum() + torch.where(torch.isfinite(lse), lse, 0).sum()).backward()
    for t in (lse_a, lse_b, out_a, out_b):
        assert torch.isfinite(t.grad).all()


def test_merge_gradcheck_float64():
    """The merge's gradient (into the branch outputs and their lse) against finite differences,
    a row empty in one branch included."""
    from attnc.runtime.branches import merge
    g = torch.Generator().manual_seed(5)
    outs = [torch.randn(1, 2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
            for _ in range(2)]
    lses = [torch.randn(1, 2, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    lses[1][0, 0, 1] = -math.inf
    lses = [x.requires_grad_() for x in lses]

    def fn(a, b, la, lb):
        out, lse = merge([a, b], [la, lb])
        return out, lse
    assert torch.autograd.gradcheck(fn, (*outs, *lses))


# --- combine = gates ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,shape,Nc", [
    (torch.float32, (1, 4, 2, 37, 45, 16, 16), 7),
    (torch.bfloat16, (1, 2, 1, 20, 19, 16, 16), 4),
])
def test_gated_branches_forward_and_gradients(dtype, shape, Nc):
    kern = attnc.compile(GATES, **TILES)
    B, H, _, M = shape[:4]
    t, g = make(shape, dtype, 3, Nc)
    params = {"gl": torch.randn(H, generator=g), "gc": torch.randn(B, H, M, generator=g)}
    x = leaves({**t, **params}, DEVICE)
    out = kern(x["q"], x["k"], x["v"], kc=x["kc"], vc=x["vc"], gl=x["gl"], gc=x["gc"]).cpu()
    ref_x = leaves({n: y.double() for n, y in {**t, **params}.items()})
    parts, gates = gate_parts(ref_x["q"], ref_x["k"], ref_x["v"], ref_x["kc"], ref_x["vc"],
                              ref_x["gl"], ref_x["gc"], 1 / math.sqrt(shape[5]))
    ref, _ = reference(ref_x["q"], parts, None, "gates", gates)
    assert out.dtype == dtype
    assert_close(out, ref, TOL[dtype], "out")
    dout = torch.randn(out.shape, generator=g)
    (out.float() * dout).sum().backward()
    (ref * dout).sum().backward()
    for name in ("q", "k", "v", "kc", "vc", "gl", "gc"):
        assert_close(x[name].grad, ref_x[name].grad, GRAD_TOL[dtype], f"d{name}")
    # the memory branch's gate tanh(gc) is 0 on the first 16 rows (a whole query tile, which
    # its kernel may skip without gradients): those rows are the local branch's alone
    params["gc"][:, :, :16] = 0
    with torch.no_grad():
        out = kern(*(t[n].to(DEVICE) for n in ("q", "k", "v")), kc=t["kc"].to(DEVICE),
                   vc=t["vc"].to(DEVICE), **on_device(params)).cpu()
    parts, gates = gate_parts(*(t[n].double() for n in ("q", "k", "v", "kc", "vc")),
                              params["gl"], params["gc"], 1 / math.sqrt(shape[5]))
    assert_close(out, reference(t["q"], parts, None, "gates", gates)[0], TOL[dtype], "gate 0")


def test_gates_have_no_single_lse():
    kern = attnc.compile(GATES, **TILES)
    t = on_device(make((1, 2, 2, 8, 8, 16, 16), torch.float32, 0, 2)[0])
    with pytest.raises(ValueError, match="return_lse"):
        kern(t["q"], t["k"], t["v"], kc=t["kc"], vc=t["vc"], gl=torch.zeros(2, device=DEVICE),
             gc=torch.zeros(1, 2, 8, device=DEVICE), return_lse=True)


# --- branches with operands and prologues (frontends/lower_around.py) ----------------------------
AROUND = """\
attention around_two {
  option window = 8
  operand kc[n], vc[n], qr[m], kr[n]
  q = l2norm(q)
  branch local {
    score = (dot(q, k) + dot(qr, kr)) * scale
    mask = n <= m and m - n < window
  }
  branch memory {
    k = kc
    v = vc
  }
  combine = softmax
}
"""


def test_shared_prologue_and_a_branch_s_own_dots():
    """The shared l2norm of q reaches both branches; qr, kr only the local one, whose spec
    alone declares them; gradients reach every operand."""
    local, memory = lowered(AROUND).branches
    assert [o.name for o in local.spec.around.operands] == ["qr", "kr"]
    assert memory.spec.around.operands == ()
    assert local.spec.around.prologue("q") and memory.spec.around.prologue("q")
    kern = attnc.compile(AROUND, **TILES)
    g = torch.Generator().manual_seed(4)
    B, H, M, N, D, Nc = 1, 2, 21, 19, 16, 5
    t = {"q": torch.randn(B, H, M, D, generator=g), "k": torch.randn(B, H, N, D, generator=g),
         "v": torch.randn(B, H, N, D, generator=g), "kc": torch.randn(B, H, Nc, D, generator=g),
         "vc": torch.randn(B, H, Nc, D, generator=g), "qr": torch.randn(B, H, M, 8, generator=g),
         "kr": torch.randn(B, H, N, 8, generator=g)}
    x = leaves(t, DEVICE)
    out = kern(x["q"], x["k"], x["v"], kc=x["kc"], vc=x["vc"], qr=x["qr"], kr=x["kr"]).cpu()
    r = leaves({n: y.double() for n, y in t.items()})
    qn = r["q"] / torch.sqrt((r["q"] ** 2).sum(-1, keepdim=True) + 1e-6)
    m, n = positions(M, N)
    local_s = scores(qn, r["k"], 0.25, H) + scores(r["qr"], r["kr"], 0.25, H)
    every = torch.ones(M, Nc, dtype=torch.bool)
    ref, _ = reference(qn, [(local_s, (n <= m) & (m - n < 8), r["v"]),
                            (scores(qn, r["kc"], 0.25, H), every, r["vc"])], None, "softmax")
    assert_close(out, ref, TOL[torch.float32], "out")
    dout = torch.randn(out.shape, generator=g)
    (out * dout).sum().backward()
    (ref * dout).sum().backward()
    for name in t:
        assert_close(x[name].grad, r[name].grad, GRAD_TOL[torch.float32], f"d{name}")


def test_value_alias_inside_a_branch_is_no_rename():
    """`v = c` of an operand the branch also dots is MLA's value alias, not a rename."""
    text = AROUND.replace("    v = vc\n",
                          "    v = vc\n    score = (dot(q, k) + dot(qr, vc)) * scale\n")
    memory = lowered(text).branches[1]
    assert (memory.keys, memory.values) == ("kc", "v") and memory.spec.around.value == "vc"


# --- call checks -------------------------------------------------------------------------------
def test_call_arguments_are_checked_by_name():
    kern = attnc.compile(JOINT, **TILES)
    t = on_device(make((1, 2, 2, 8, 8, 16, 16), torch.float32, 0, 2)[0])
    ones = torch.ones(2, device=DEVICE)
    base = {"kc": t["kc"], "vc": t["vc"], "slopes": ones}
    with pytest.raises(ValueError, match="missing 'vc'"):
        kern(t["q"], t["k"], t["v"], kc=t["kc"], slopes=ones)
    with pytest.raises(ValueError, match="unknown input 'bias'"):
        kern(t["q"], t["k"], t["v"], **base, bias=ones)
    with pytest.raises(ValueError, match=r"branch compressed \(k = kc\) \(v = vc\).*head dim"):
        kern(t["q"], t["k"], t["v"], **{**base, "kc": t["kc"][..., :8]})
    with pytest.raises(ValueError, match="block_sparse does not apply"):
        attnc.compile(JOINT, block_sparse=True)
    gated = attnc.compile(GATES, **TILES)
    with pytest.raises(ValueError, match=r"gc has shape \(2, 8\), expected \(1, 2, 8\)"):
        gated(t["q"], t["k"], t["v"], kc=t["kc"], vc=t["vc"], gl=ones,
              gc=torch.zeros(2, 8, device=DEVICE))


# --- lowering and the IR ---------------------------------------------------------------------
def lowered(text: str, **options) -> Branches:
    from attnc.pipeline import frontend
    ir = frontend(read_spec(text), options)[1]
    assert isinstance(ir, Branches)
    return ir


def test_lowering_renames_keys_and_splits_declarations():
    ir = lowered(JOINT)
    local, compressed = ir.branches
    assert ir.combine is Combine.JOINT
    assert (local.keys, local.values, compressed.keys, compressed.values) == ("k", "v", "kc", "vc")
    assert [d.name for d in local.spec.decls] == ["slopes"] and compressed.spec.decls == ()
    assert dict(local.spec.options) == {"window": 12}
    assert dict(compressed.spec.options) == {"stride": 8}
    assert ir.tensors == ("slopes", "kc", "vc")
    assert lowered(JOINT, stride=4).branches[1].spec.mask != compressed.spec.mask


def test_shared_statements_and_overrides():
    text = JOINT.replace("  branch local {\n    score = dot(q, k) * scale + slopes[h] * (n - m)\n",
                         "  score = dot(q, k) * scale + slopes[h] * (n - m)\n  branch local {\n")
    text = text.replace("    mask = (n + 1) * stride + 2 <= m\n",
                        "    mask = (n + 1) * stride + 2 <= m\n    score = dot(q, k) * 0.5\n")
    local, compressed = lowered(text).branches
    assert "slopes" in str(local.spec.score)
    assert "slopes" not in str(compressed.spec.score)


def test_printer_is_deterministic_and_verified():
    ir = lowered(GATES)
    assert str(ir) == str(lowered(GATES))
    text = str(ir)
    assert text.startswith("branches gated_two\ncombine = gates\n")
    assert "branch local\n" in text and "  gate = sigmoid(gl[h])\n" in text
    assert "branch compressed; k = kc; v = vc\n" in text and "  gate = tanh(gc[b, h, m])" in text
    from dataclasses import replace
    with pytest.raises(AssertionError, match="two or more"):
        verify_branches(replace(ir, branches=ir.branches[:1]))
    with pytest.raises(AssertionError, match="without a gate"):
        local = ir.branches[0]
        ungated = replace(local, spec=replace(local.spec,
                                              around=replace(local.spec.around, gate=None)))
        verify_branches(replace(ir, branches=(ungated, ir.branches[1])))


def test_show_and_ir_print_each_branch():
    src = read_spec("local_plus_compressed")
    kernel_text = show(src, "kernel")
    assert kernel_text.count("# branch ") == 2
    assert "kernel local_plus_compressed_compressed" in kernel_text
    assert show(src, "cascade").startswith("branches local_plus_compressed\n")
    kern = attnc.load("local_plus_compressed", window=20, stride=8, **TILES)  # as above
    assert kern.ir("fuse").count("# branch ") == 2
    assert kern.source.count("# branch ") == 2
    assert len(kern.kernels) == 2


SPEC_ERRORS = [
    # (replace, with, line, message part)
    ("  combine = softmax\n", "", 1, "needs `combine = softmax` or `combine = gates`"),
    ("combine = softmax", "combine = mean", 14, "combine 'mean' is not supported"),
    ("  combine = softmax\n", "  combine = softmax\n  combine = softmax\n", 15,
     "'combine' is given twice"),
    ("branch compressed", "branch local", 9, "branch local is defined twice"),
    ("    mask = (n + 1) * stride + 2 <= m\n", "    mask = (n + 1) * stride + 2 <= m\n"
     "    gate = 1\n", 13, "a gate with combine = softmax"),
    ("operand kc[n], vc[n]", "operand kc[m], vc[n]", 10, "kc is a query-side operand"),
    ("    k = kc\n", "    k = slopes\n", 10, "slopes is no key-side operand"),
    ("  param slopes[h]\n", "  param slopes[h], unused[h]\n", 3,
     "param unused is declared but never used"),
    ("    k = kc\n", "    k = kc\n    param w[h]\n", 11, "a param inside a branch"),
    ("    k = kc\n", "    k = kc\n    combine = gates\n", 11, "a combine inside a branch"),
    ("    k = kc\n", "    k = kc\n    normalize = sigmoid\n", 11,
     "branch compressed normalizes with sigmoid"),
    ("    k = kc\n", "    k = kc\n    sink = 0.5\n", 11, "a sink in branch compressed"),
]


@pytest.mark.parametrize("old,new,line,message", SPEC_ERRORS)
def test_spec_errors_are_located(old, new, line, message):
    assert old in JOINT
    with pytest.raises(SpecError) as caught:
        lowered(JOINT.replace(old, new, 1))
    assert caught.value.line == line and message in str(caught.value), str(caught.value)
    assert caught.value.hint


def test_gate_errors_are_located():
    with pytest.raises(SpecError, match="branch compressed has no gate") as caught:
        lowered(GATES.replace("    gate = tanh(gc[b, h, m])\n", "").replace(", gc[b, h, m]", ""))
    assert caught.value.line == 9
    with pytest.raises(SpecError, match="gate cannot use n") as caught:
        lowered(GATES.replace("tanh(gc[b, h, m])", "tanh(gc[b, h, m]) * n"))
    assert caught.value.line == 12
    one = "attention one {\n  branch a {\n    mask = n <= m\n  }\n  combine = softmax\n}\n"
    with pytest.raises(SpecError, match="two or more, this one has 1") as caught:
        lowered(one)
    assert caught.value.line == 2
