"""The public API: compile/load/variants, argument validation, kernel attributes, torch ops."""

from __future__ import annotations

import math

import pytest
import torch

import attnc

CAUSAL = "attention causal_t {\n  mask = n <= m\n}\n"
ALIBI = ("attention alibi_t {\n  param slopes[h]\n"
         "  score = dot(q, k) * scale + slopes[h] * (n - m)\n  mask = n <= m\n}\n")
DOC = "attention doc_t {\n  input doc[b, n]\n  mask = doc[b, m] == doc[b, n]\n}\n"


def _qkv(B=1, H=2, Hkv=1, M=20, N=24, D=16, Dv=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, M, D, generator=g).to(dtype),
            torch.randn(B, Hkv, N, D, generator=g).to(dtype),
            torch.randn(B, Hkv, N, Dv, generator=g).to(dtype))


def _dense(q, k, v, bias=None, mask=None, scale=None):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1).double(), v.repeat_interleave(group, 1).double()
    s = q.double() @ k.transpose(-1, -2) * (scale or 1 / math.sqrt(q.shape[-1]))
    if bias is not None:
        s = s + bias
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf)
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def test_compile_runs_and_matches_dense_softmax():
    q, k, v = _qkv(H=4, Hkv=2, M=21, N=33, D=24, Dv=40)
    out, lse = attnc.compile(CAUSAL)(q, k, v, return_lse=True)
    causal = torch.arange(33)[None, :] <= torch.arange(21)[:, None]
    ref, ref_lse = _dense(q, k, v, mask=causal)
    assert out.shape == (1, 4, 21, 40) and lse.shape == (1, 4, 21) and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-4, atol=1e-5)


def test_explicit_scale_and_params_by_name():
    q, k, v = _qkv()
    slopes = torch.rand(2) + 0.1
    out = attnc.compile(ALIBI)(q, k, v, scale=0.3, slopes=slopes)
    rel = torch.arange(24)[None, :] - torch.arange(20)[:, None]
    ref, _ = _dense(q, k, v, bias=slopes[:, None, None].double() * rel, scale=0.3,
                    mask=rel <= 0)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_non_contiguous_inputs():
    q, k, v = _qkv(M=20, N=20)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    kern = attnc.compile(CAUSAL)
    torch.testing.assert_close(kern(qt, k, v), kern(q, k, v))


def test_spec_from_path_and_library_names(tmp_path):
    path = tmp_path / "mine.attn"
    path.write_text(CAUSAL)
    assert attnc.compile(str(path)).name == "causal_t"
    assert attnc.compile(path).name == "causal_t"
    assert "causal" in attnc.variants()
    assert attnc.load("causal").name == "causal"
    with pytest.raises(ValueError, match="no library variant 'nope'"):
        attnc.load("nope")


def test_options_override_spec_defaults():
    spec = "attention w {\n  option window = 4\n  mask = n <= m and m - n < window\n}\n"
    assert "m - n < 4" in attnc.compile(spec).ir("cascade")
    assert "m - n < 9" in attnc.compile(spec, window=9).ir("cascade")
    with pytest.raises(ValueError, match="unknown option 'widow'"):
        attnc.compile(spec, widow=3)
    with pytest.raises(ValueError, match="integer option"):
        attnc.compile(spec, window=2.5)
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        attnc.compile(spec, block_m=24)


def test_compile_is_memoized_in_process():
    assert attnc.compile(CAUSAL) is attnc.compile(CAUSAL)


def test_kernel_exposes_source_and_ir_per_stage():
    kern = attnc.compile(ALIBI)
    assert "@triton.jit" in kern.source and "def attnc_alibi_t_fwd" in kern.source
    from attnc.pipeline import STAGES
    for stage in STAGES:
        assert kern.ir(stage).strip(), stage
    assert "online_softmax(n)" in kern.ir("online_softmax")
    assert kern.inputs == ("slopes",)


@pytest.mark.parametrize("call,message", [
    (lambda k, q, kk, v: k(q[0], kk, v), "q must be 4-D"),
    (lambda k, q, kk, v: k(q, kk.double(), v), "k has dtype torch.float64"),
    (lambda k, q, kk, v: k(q, kk.half(), v.half()), "share a dtype"),
    (lambda k, q, kk, v: k(q, kk[:, :, :5], v), "same length"),
    (lambda k, q, kk, v: k(q, kk[..., :8], v), "k head dim 8 differs"),
    (lambda k, q, kk, v: k(q[:, :1].expand(1, 3, 20, 16), kk.expand(1, 2, 24, 16),
                           v.expand(1, 2, 24, 16)), "multiple of k/v heads"),
    (lambda k, q, kk, v: k(q, kk, v, slopes=torch.rand(2), foo=1), "unknown input 'foo'"),
    (lambda k, q, kk, v: k(q, kk, v), "missing param 'slopes'"),
    (lambda k, q, kk, v: k(q, kk, v, slopes=torch.rand(3)),
     r"slopes has shape \(3,\), expected \(2,\)"),
    (lambda k, q, kk, v: k(q, kk, v, slopes=torch.arange(2)), "must be floating point"),
    (lambda k, q, kk, v: k(q, kk, v, slopes=[1.0, 2.0]), "must be a torch.Tensor"),
    (lambda k, q, kk, v: k(q, kk, v, slopes=torch.rand(2), scale="x"), "scale must be"),
    (lambda k, q, kk, v: k(q, kk, v[..., :0], slopes=torch.rand(2)), "supported 1..256"),
    (lambda k, q, kk, v: k(None, kk, v, slopes=torch.rand(2)), "q must be a torch.Tensor"),
    (lambda k, q, kk, v: k(q, kk, None, slopes=torch.rand(2)), "v must be a torch.Tensor"),
    (lambda k, q, kk, v: k(q, kk, v, slopes=None), "slopes must be a torch.Tensor"),
    (lambda k, q, kk, v: k(q, kk, v, slopes=torch.rand(2), return_lse="yes"),
     "return_lse must be True or False"),
    (lambda k, q, kk, v: k(q.int(), kk.int(), v.int(), slopes=torch.rand(2)),
     "q has dtype torch.int32"),
    (lambda k, q, kk, v: k(q.to("meta"), kk.to("meta"), v.to("meta"), slopes=torch.rand(2)),
     "device meta is not supported"),
])
def test_bad_arguments_name_the_argument(call, message):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=message):
        call(attnc.compile(ALIBI), q, k, v)


def test_out_of_range_index_is_an_error():
    spec = "attention r {\n  param bias[h, 8]\n  score = dot(q, k) * scale + bias[h, n - m]\n}\n"
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"index 1 of bias .* ranges over \[-19, 23\]"):
        attnc.compile(spec)(q, k, v, bias=torch.rand(2, 8))


def test_document_ids_need_one_id_per_query():
    q, k, v = _qkv(M=30, N=24)
    with pytest.raises(ValueError, match=r"index 1 of doc .* \[0, 29\].*size 24"):
        attnc.compile(DOC)(q, k, v, doc=torch.zeros(1, 24, dtype=torch.long))


def test_bool_and_int_inputs():
    q, k, v = _qkv(M=24, N=24)
    doc = torch.tensor([[0] * 10 + [1] * 14])
    kern = attnc.compile(DOC)
    ref, _ = _dense(q, k, v, mask=doc[0][:, None] == doc[0][None, :])
    torch.testing.assert_close(kern(q, k, v, doc=doc).double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kern(q, k, v, doc=doc.bool()).double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("joint", ["and", "or", None])
def test_mask_on_a_per_head_param(joint):
    """A mask term that depends only on h (a scalar in the program) mixed with tile terms."""
    mask = "p[h] > 1" if joint is None else f"p[h] > 1 {joint} n <= m"
    kern = attnc.compile(f"attention ph {{\n  param p[h]\n  mask = {mask}\n}}\n")
    q, k, v = _qkv(H=4, Hkv=2, M=20, N=24)
    p = torch.tensor([0.5, 2.0, 3.0, -1.0])
    head = (p > 1).view(1, 4, 1, 1)
    causal = torch.ones(20, 24).tril().bool()
    dense = {"and": head & causal, "or": head | causal, None: head.expand(1, 4, 20, 24)}[joint]
    ref, ref_lse = _dense(q, k, v, mask=dense.expand(1, 4, 20, 24))
    out, lse = kern(q, k, v, p=p, return_lse=True)
    ref = torch.nan_to_num(ref)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))


def test_empty_keys_and_queries():
    kern = attnc.compile(CAUSAL)
    q, k, v = _qkv(M=5, N=7)
    out, lse = kern(q, k[:, :, :0], v[:, :, :0], return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    assert kern(q[:, :, :0], k, v).shape == (1, 2, 0, 16)


@pytest.mark.parametrize("N", [0, 7])
def test_testing_check_handles_empty_and_nonempty_keys(N):
    """`attnc check` compares against the cascade interpreter, whose max over no keys is -inf."""
    from attnc import testing

    res = testing.check(attnc.compile(CAUSAL), B=1, H=2, Hkv=1, M=5, N=N, D=16, Dv=16)
    assert res["ok"], res


def test_kernel_is_a_torch_op():
    kern = attnc.compile(CAUSAL)
    assert kern._op._qualname.startswith("attnc::causal_t_")
    q, k, v = _qkv()
    torch.library.opcheck(kern._op, (q, k, v, [], [], [], 0.25),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    kern = attnc.compile(ALIBI)
    slopes = torch.rand(2)

    def layer(q, k, v):
        return kern(q, k, v, slopes=slopes, scale=0.2) * 2 + 1

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    q, k, v = _qkv()
    torch.testing.assert_close(compiled(q, k, v), layer(q, k, v))


def test_meta_and_fake_tensors():
    """Meta tensors are refused with a ValueError; fake tensors (shape propagation, as
    torch.compile runs it) give outputs of the right shapes and dtypes without running."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    kern = attnc.compile(ALIBI)
    with FakeTensorMode():
        q, k, v = _qkv(H=4, Hkv=2, M=20, N=24, Dv=8)
        out, lse = kern(q, k, v, slopes=torch.rand(4), return_lse=True)
    assert out.shape == (1, 4, 20, 8) and out.dtype == torch.float32
    assert lse.shape == (1, 4, 20) and lse.dtype == torch.float32


def _inf_key(q, k):
    """k with one element +inf: the rows whose query has a positive entry there get a +inf
    score, those with a negative entry a -inf one."""
    k = k.clone()
    k[0, 0, 5, 3] = math.inf
    assert (q[0, :, :, 3] > 0).any() and (q[0, :, :, 3] < 0).any()
    return k


@pytest.mark.parametrize("options", [{}, {"kv_splits": 2}])
def test_a_plus_inf_score_gives_lse_plus_inf_as_torch(options):
    """logsumexp of a row with a +inf score is +inf (it was NaN: inf - inf in the online
    softmax); the row's output is NaN, as torch's softmax gives. Rows where the key's score is
    -inf are ordinary. Also through the key-split merge."""
    q, k, v = _qkv(H=2, Hkv=2, M=20, N=64)
    k = _inf_key(q, k)
    out, lse = attnc.load("full", **options)(q, k, v, return_lse=True)
    s = (q.double() @ k.double().transpose(-1, -2)) / 4
    ref_lse = torch.logsumexp(s, -1)
    ref = torch.softmax(s, -1) @ v.double()
    hot = torch.isposinf(ref_lse)
    assert hot.any() and (~hot).any()
    assert torch.equal(torch.isposinf(lse), hot) and not lse.isnan().any()
    assert torch.equal(out.isnan(), ref.isnan())
    torch.testing.assert_close(lse[~hot].double(), ref_lse[~hot], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[~hot].double(), ref[~hot], rtol=1e-4, atol=1e-5)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.equal(out.isnan(), sdpa.isnan())
