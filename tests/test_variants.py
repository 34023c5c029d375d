"""Every library variant (variants/*.attn), compiled, against an independent eager reference.

The references in tests/reference.py are written from each variant's math with dense float64
torch ops. Cases spread dtypes (fp32, bf16), ragged lengths, GQA / MQA, M != N, head dims
32/64/96/128 (and Dv != D), small option overrides that make the masks bite at small sizes, and
16x16 tiles so several full and partial tiles are visited. Kernels run through Triton's
interpreter on CPU (or natively on CUDA when available).
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import pytest
import torch

import attnc
from attnc.library import describe
from attnc.testing import rel_error
from tests import reference as R

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
# lse is computed from fp32 scores whatever the input dtype; compared with the reference's lse
# computed from the same (rounded) inputs, so it is tight in both dtypes.
LSE_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-3, torch.float16: 1e-3}

VARIANTS = ("full", "causal", "sliding_window", "alibi", "softcap", "streaming", "prefix_lm",
            "document", "rel_bias", "neighborhood_1d", "dilated", "chunked_local", "zerotuning")

# Option overrides that make each mask / bias bite at small sizes: two sets per variant.
SMALL = {
    "sliding_window": [{"window": 16}, {"window": 21}],
    "softcap": [{"cap": 2.0}, {"cap": 1.5}],
    "streaming": [{"sinks": 2, "window": 16}, {"sinks": 5, "window": 9}],
    "prefix_lm": [{"prefix": 10}, {"prefix": 33}],
    "rel_bias": [{"max_distance": 8}, {"max_distance": 20}],
    "neighborhood_1d": [{"kernel_size": 5}, {"kernel_size": 6}],
    "dilated": [{"window": 8, "dilation": 3}, {"window": 5, "dilation": 2}],
    "chunked_local": [{"chunk": 16}, {"chunk": 12}],
}

HEAD_DIMS = (32, 64, 96, 128)

# Case templates: (id, dtype, B, Hq, Hkv, M, N, Dv rule, tiles, option set, explicit scale)
# Dv rule: "same" -> Dv = D, else an int.
CASES = [
    ("fp32-gqa", torch.float32, 1, 4, 2, 45, 77, "same", None, 0, None),
    ("bf16-mqa-t16", torch.bfloat16, 2, 2, 1, 70, 70, 48, (16, 16), 1, None),
    ("fp32-mha-t16-scale", torch.float32, 1, 2, 2, 77, 45, 40, (16, 16), 1, 0.3),
    ("bf16-gqa", torch.bfloat16, 1, 4, 2, 33, 50, "same", None, 0, None),
]


def _shape_ok(name, M, N, opts):
    if name == "document" and M > N:
        return False
    if name == "neighborhood_1d" and N < opts.get("kernel_size", 7):
        return False
    return True


def _case_params():
    params = []
    for vi, name in enumerate(VARIANTS):
        for ci, (cid, dtype, B, H, Hkv, M, N, dv, tiles, oset, scale) in enumerate(CASES):
            opts = SMALL[name][oset] if name in SMALL else {}
            if not _shape_ok(name, M, N, opts):
                M, N = N, M  # swap so that M <= N
            D = HEAD_DIMS[(vi + ci) % len(HEAD_DIMS)]
            Dv = D if dv == "same" else dv
            params.append(pytest.param(name, dtype, (B, H, Hkv, M, N, D, Dv), tiles, opts, scale,
                                       id=f"{name}-{cid}-{M}x{N}-D{D}-Dv{Dv}"))
    return params


def make_inputs(name, B, H, M, N, opts, g):
    """Params / runtime inputs of a library variant, from the math (not from attnc's IR)."""
    o = {**R.DEFAULTS[name], **opts}
    if name == "alibi":
        return {"slopes": torch.rand(H, generator=g) + 0.1}
    if name == "rel_bias":
        return {"bias": torch.randn(H, 2 * int(o["max_distance"]) + 1, generator=g)}
    if name == "zerotuning":
        return {"gamma": torch.rand(H, generator=g) + 0.5}
    if name == "document":
        return {"doc": torch.randint(0, 3, (B, N), generator=g).sort(dim=-1).values}
    return {}


def operands(B, H, Hkv, M, N, D, Dv, dtype, g):
    q = torch.randn(B, H, M, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, N, Dv, generator=g).to(dtype)
    return q, k, v


def run(kern, q, k, v, scale, inputs):
    dev = {n: t.to(DEVICE) for n, t in inputs.items()}
    out, lse = kern(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), scale=scale, return_lse=True, **dev)
    return out.cpu(), lse.cpu()


def assert_matches(out, lse, ref_out, ref_lse, dtype, what=""):
    """out within the relative tolerance, lse -inf exactly where the reference's is, finite lse
    close; never NaN."""
    assert out.dtype == dtype, f"{what}: output dtype {out.dtype}, expected {dtype}"
    assert lse.dtype == torch.float32, f"{what}: lse dtype {lse.dtype}"
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert not torch.isnan(out).any(), f"{what}: NaN in out"
    assert not torch.isnan(lse).any(), f"{what}: NaN in lse"
    ref_empty = torch.isneginf(ref_lse)
    got_empty = torch.isneginf(lse)
    assert torch.equal(got_empty, ref_empty), (
        f"{what}: lse -inf at {got_empty.sum().item()} rows, reference at "
        f"{ref_empty.sum().item()}; first mismatch at "
        f"{(got_empty != ref_empty).nonzero()[0].tolist()}")
    assert torch.isfinite(lse[~ref_empty]).all(), f"{what}: non-finite lse on a visible row"
    if ref_empty.any():
        assert (out[ref_empty] == 0).all(), f"{what}: rows that see no key must be 0"
    err = rel_error(out, ref_out)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]}"
    if (~ref_empty).any():
        diff = (lse.double()[~ref_empty] - ref_lse[~ref_empty]).abs()
        bound = LSE_TOL[dtype] * (1 + ref_lse[~ref_empty].abs())
        worst = (diff / bound).max().item()
        assert worst <= 1, f"{what}: lse error {diff.max().item():.3g} beyond tolerance"


def check_variant(name, dtype, shape, tiles, opts, scale, seed, q_mult=1.0):
    B, H, Hkv, M, N, D, Dv = shape
    launch = {"block_m": tiles[0], "block_n": tiles[1]} if tiles else {}
    kern = attnc.load(name, **opts, **launch)
    g = torch.Generator().manual_seed(seed)
    q, k, v = operands(B, H, Hkv, M, N, D, Dv, dtype, g)
    q = (q.float() * q_mult).to(dtype)
    inputs = make_inputs(name, B, H, M, N, opts, g)
    out, lse = run(kern, q, k, v, scale, inputs)
    # the reference sees exactly the (rounded) operands the kernel saw
    ref_out, ref_lse = R.reference(name, q, k, v, scale=scale, inputs=inputs, options=opts)
    assert_matches(out, lse, ref_out, ref_lse, dtype, f"{name} {dtype} {shape} {opts}")
    return ref_lse


# --- the library -----------------------------------------------------------------------------
# Variants with something around the score, each checked against its own reference in the test
# module named here (prologues, operands, gates; gathered keys; branches; head mixing).
AROUND = {"rope": "test_around", "qk_norm": "test_around", "mla": "test_around",
          "gated_heads": "test_around", "token_topk": "test_gather", "nsa_selected": "test_gather",
          "local_plus_compressed": "test_branches", "head_mixing": "test_mixing"}


def test_library_is_13_softmax_8_normalizer_8_around_and_11_linear_variants():
    from tests.normalizer_reference import VARIANTS as NORMALIZERS
    from tests.test_linear import SPECS as LINEAR
    assert set(attnc.variants()) == set(VARIANTS) | set(NORMALIZERS) | set(LINEAR) | set(AROUND)
    here = Path(__file__).parent
    for name, module in AROUND.items():
        assert f'"{name}"' in (here / f"{module}.py").read_text(), f"{module} never loads {name}"
    assert set(R.VARIANTS) == set(VARIANTS)
    assert len(LINEAR) == 11 and len(NORMALIZERS) == 8


@pytest.mark.parametrize("name", attnc.variants())
def test_variant_describes_itself(name):
    line = describe(name)
    assert line.startswith(f"{name}:"), line
    assert "(" in line and ")" in line, f"{name}: first comment line must name its source: {line}"


@pytest.mark.parametrize("name,dtype,shape,tiles,opts,scale", _case_params())
def test_variant_matches_reference(name, dtype, shape, tiles, opts, scale):
    check_variant(name, dtype, shape, tiles, opts, scale,
                  seed=zlib.crc32(f"{name}{shape}{dtype}".encode()))


def test_options_really_bite():
    """The option overrides used above change the mask (guards against vacuous cases)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = operands(1, 2, 2, 45, 77, 32, 32, torch.float32, g)
    for name, sets in SMALL.items():
        inputs = make_inputs(name, 1, 2, 45, 77, sets[0], g)
        a, _ = R.reference(name, q, k, v, inputs=inputs, options=sets[0])
        b, _ = R.reference(name, q, k, v, inputs=make_inputs(name, 1, 2, 45, 77, {}, g))
        assert not (a.isnan().any() or b.isnan().any()), f"{name}: NaN in the reference"
        assert rel_error(a, b) > 1e-3, f"{name}: options {sets[0]} do not change the output"


# --- defaults: the spec's default option values match the math --------------------------------
@pytest.mark.parametrize("name", ["prefix_lm", "neighborhood_1d", "dilated", "rel_bias"])
def test_default_options(name):
    """Defaults that bite at N < 200 (prefix 64, kernel 7, window 64 x dilation 2, distance 128)."""
    check_variant(name, torch.float32, (1, 2, 1, 150, 150, 64, 64), None, {}, None, seed=7)


@pytest.mark.parametrize("name", ["sliding_window", "streaming", "chunked_local", "rel_bias"])
def test_default_options_long(name):
    """Defaults of the long-range variants (window 256, chunk 128, distance 128) at N = 400."""
    check_variant(name, torch.float32, (1, 2, 1, 400, 400, 64, 64), (64, 64), {}, None, seed=8)


@pytest.mark.parametrize("name,opts", [("causal", {}), ("streaming", {"sinks": 2, "window": 16}),
                                       ("rel_bias", {"max_distance": 8})])
def test_fp16(name, opts):
    check_variant(name, torch.float16, (1, 4, 2, 45, 77, 64, 32), (16, 16), opts, None, seed=9)


# --- rows that see no key ----------------------------------------------------------------------
LATE = """# late: each query sees keys up to m - 5
attention late {
  mask = n <= m - 5
}
"""


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tiles", [None, (16, 16)], ids=["t32", "t16"])
def test_fully_masked_rows(dtype, tiles):
    launch = {"block_m": tiles[0], "block_n": tiles[1]} if tiles else {}
    kern = attnc.compile(LATE, **launch)
    g = torch.Generator().manual_seed(3)
    B, H, Hkv, M, N, D, Dv = 1, 2, 1, 37, 37, 64, 32
    q, k, v = operands(B, H, Hkv, M, N, D, Dv, dtype, g)
    out, lse = run(kern, q, k, v, None, {})
    qd, kd, vd, scale = R._prepare(q, k, v, None)
    m, n = R._positions(M, N)
    ref_out, ref_lse = R.masked_softmax(torch.einsum("bhmd,bhnd->bhmn", qd, kd) * scale,
                                        n <= m - 5, vd)
    assert torch.isneginf(ref_lse[..., :5]).all() and torch.isfinite(ref_lse[..., 5:]).all()
    assert (out[..., :5, :] == 0).all()
    assert torch.isneginf(lse[..., :5]).all()
    assert_matches(out, lse, ref_out, ref_lse, dtype, "late rows")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_window_rows_past_the_keys(dtype):
    """sliding_window with M > N: queries m >= N + window - 1 see no key at all."""
    B, H, Hkv, M, N, D, Dv = 1, 2, 2, 60, 20, 32, 32
    ref_lse = check_variant("sliding_window", dtype, (B, H, Hkv, M, N, D, Dv), (16, 16),
                            {"window": 8}, None, seed=11)
    assert torch.isneginf(ref_lse[..., 27:]).all() and torch.isfinite(ref_lse[..., :27]).all()


# --- large scores ------------------------------------------------------------------------------
@pytest.mark.parametrize("name,opts", [("full", {}), ("causal", {}), ("alibi", {}),
                                       ("sliding_window", {"window": 16}),
                                       ("document", {}), ("zerotuning", {}),
                                       ("rel_bias", {"max_distance": 8})])
def test_large_scores_fp32(name, opts):
    """q * 20: scores in the hundreds; the online softmax must not overflow or lose the max."""
    lse = check_variant(name, torch.float32, (1, 2, 1, 45, 77, 64, 64), (16, 16), opts, None,
                        seed=5, q_mult=20.0)
    assert lse[torch.isfinite(lse)].abs().max() > 50  # the scores really are large


# --- the reference itself --------------------------------------------------------------------
def test_zerotuning_reference_matches_log_formulation():
    """The probability-side reference equals softmax with log(gamma) added on column 0."""
    g = torch.Generator().manual_seed(1)
    q, k, v = operands(2, 3, 1, 9, 12, 8, 5, torch.float64, g)
    gamma = torch.rand(3, generator=g) + 0.5
    out, lse = R.zerotuning(q, k, v, gamma=gamma)
    qd, kd, vd, scale = R._prepare(q, k, v, None)
    s = torch.einsum("bhmd,bhnd->bhmn", qd, kd) * scale
    s[..., 0] += torch.log(gamma.double()).view(1, -1, 1)
    m, n = R._positions(9, 12)
    o2, l2 = R.masked_softmax(s, n <= m, vd)
    torch.testing.assert_close(out, o2)
    torch.testing.assert_close(lse, l2)
    assert not math.isnan(out.sum().item())
