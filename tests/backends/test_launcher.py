"""The launcher: key splits (flash-decoding) give the same results as one split -- outputs,
lse and gradients, for static, data-dependent and block-sparse kernels, empty rows included --
and the split heuristic; short queries shrink the query tile."""

from __future__ import annotations

import pytest
import torch

import attnc
from attnc.backends.triton.softmax import launch as launcher
from attnc.testing import rel_error
from tests.reference import reference
from tests.sparse_reference import masked_attention

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def test_split_heuristic():
    assert launcher.kv_splits(32, 131072, None) == 1          # the interpreter
    assert launcher.kv_splits(32, 131072, 132, fixed=3) == 3  # the launch option wins
    assert launcher.kv_splits(264, 131072, 132) == 1          # a full wave already
    assert launcher.kv_splits(32, 131072, 132) == 9           # about two programs per SM
    assert launcher.kv_splits(1, 1 << 20, 132) == launcher.MAX_SPLITS
    assert launcher.kv_splits(8, 1500, 132) == 2              # at least MIN_SPLIT_KEYS each
    assert launcher.kv_splits(8, 300, 132) == 1


def _operands(M, N, dtype, Hq=4, Hkv=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, Hq, M, 32, generator=g).to(dtype),
            torch.randn(2, Hkv, N, 32, generator=g).to(dtype),
            torch.randn(2, Hkv, N, 24, generator=g).to(dtype))


CASES = {
    "full": ({}, {}),
    "sliding_window": ({"window": 40}, {}),
    "alibi": ({}, {"slopes": torch.linspace(0.1, 0.6, 4)}),
    "document": ({}, {"doc": torch.tensor([[0] * 70 + [1] * 80, [0] * 20 + [1] * 130]).long()}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 19])
@pytest.mark.parametrize("name", sorted(CASES))
def test_key_splits_match_the_reference(name, M, dtype):
    options, inputs = CASES[name]
    q, k, v = _operands(M, 150, dtype)
    want, want_lse = reference(name, q, k, v, inputs=inputs, options=options)
    for splits in (1, 2, 5):
        kernel = attnc.load(name, kv_splits=splits, **options)
        out, lse = kernel(q, k, v, return_lse=True, **inputs)
        assert out.dtype == dtype and out.shape == (2, 4, M, 24)
        assert rel_error(out, want) < TOL[dtype], splits
        assert torch.allclose(lse.double(), want_lse, atol=1e-3 if dtype != torch.float32
                              else 1e-5)


def test_rows_no_split_sees_stay_empty():
    # row 0 sees no key at all; most rows see keys in only some of the splits
    spec = "attention strict {\n  mask = n < m and m - n < 8\n}\n"
    q, k, v = _operands(70, 70, torch.float32)
    out, lse = attnc.compile(spec, kv_splits=4)(q, k, v, return_lse=True)
    m = torch.arange(70)[:, None]
    n = torch.arange(70)[None, :]
    want, want_lse = masked_attention(q, k, v, ((n < m) & (m - n < 8)).expand(2, 4, 70, 70),
                                      return_lse=True)
    assert not out.isnan().any()
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
    assert torch.isneginf(lse[:, :, 0]).all()
    assert rel_error(out, want) < 1e-5
    assert torch.allclose(lse[:, :, 1:].double(), want_lse[:, :, 1:], atol=1e-5)


def test_gradients_after_a_split_forward():
    q, k, v = (t.requires_grad_() for t in _operands(19, 150, torch.float32))
    slopes = torch.linspace(0.1, 0.6, 4).requires_grad_()
    grads = []
    for splits in (1, 3):
        out = attnc.load("alibi", kv_splits=splits)(q, k, v, slopes=slopes)
        grads.append(torch.autograd.grad((out * out).sum(), (q, k, v, slopes)))
    for a, b in zip(*grads):
        assert rel_error(a, b) < 1e-5


def test_block_sparse_kernel_splits_its_block_lists():
    # the kernel's own mask (causal) applies inside partial blocks; the block mask (causal and
    # a per-head pattern of whole blocks) selects which blocks are visited
    q, k, v = _operands(150, 150, torch.float32)

    def blocks(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((kv_idx // 16 + q_idx // 16 + h) % 3 != 0)
    bm = attnc.create_block_mask(blocks, 2, 4, 150, 150, BLOCK_SIZE=16)
    m = torch.arange(150)[:, None]
    n = torch.arange(150)[None, :]
    h = torch.arange(4)[:, None, None]
    visible = ((n <= m) & ((n // 16 + m // 16 + h) % 3 != 0)).expand(2, 4, 150, 150)
    want = masked_attention(q, k, v, visible)
    for splits in (1, 4):
        kernel = attnc.compile("causal", block_sparse=True, kv_splits=splits)
        assert rel_error(kernel(q, k, v, block_mask=bm), want) < 1e-5


def test_each_kernel_object_keeps_its_own_launch_options(monkeypatch):
    # regression: equal kernels compiled with different launch options share a torch op name
    # prefix; each must still launch with its own options
    seen = []
    real = launcher.kv_splits

    def spy(programs, N, sms, fixed=None):
        seen.append(fixed)
        return real(programs, N, sms, fixed)
    monkeypatch.setattr(launcher, "kv_splits", spy)
    q, k, v = _operands(1, 64, torch.float32)
    for splits in (2, 3):
        attnc.load("full", kv_splits=splits)(q, k, v)
    assert seen == [2, 3]


def test_short_queries_shrink_the_query_tile():
    q, _, _ = _operands(3, 8, torch.float32)
    common = launcher._constexprs({"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4,
                                   "num_stages": 2}, q, 32, 24, None)
    assert common["BLOCK_M"] == 16 and common["BLOCK_N"] == 64


NEWEST = "attention newest {\n  option window = 40\n  mask = n >= N - window\n}\n"


def test_which_kernels_pack_gqa_heads():
    assert attnc.load("full").packs_heads and attnc.compile(NEWEST).packs_heads
    for name in ("causal", "alibi", "document", "prefix_lm"):  # read m, h or per-head params
        assert not attnc.load(name).packs_heads, name
    assert not attnc.compile("attention short {\n  mask = n < M\n}\n").packs_heads
    assert not attnc.load("full", block_sparse=True).packs_heads


@pytest.mark.parametrize("M", [1, 3])
def test_packed_gqa_heads_match_the_reference(M, monkeypatch):
    heads = []
    real = launcher.launch

    def spy(fn, q, *args, **kw):
        heads.append(q.shape[1])
        return real(fn, q, *args, **kw)
    monkeypatch.setattr(launcher, "launch", spy)
    q, k, v = _operands(M, 150, torch.float32, Hq=8, Hkv=2)
    n = torch.arange(150)
    for kernel, visible in ((attnc.load("full", kv_splits=3), n >= 0),
                            (attnc.compile(NEWEST), n >= 110)):
        out, lse = kernel(q, k, v, return_lse=True)
        want, want_lse = masked_attention(q, k, v, visible.expand(2, 8, M, 150), return_lse=True)
        assert rel_error(out, want) < 1e-5
        assert torch.allclose(lse.double(), want_lse, atol=1e-5)
    assert heads == [2, 2]  # launched over the 2 kv heads, 4 query heads stacked per program


def test_backward_kernels_launch_with_their_own_tiles(monkeypatch):
    # the dq and dk/dv kernels take their own tiles, warps and stages from one backward config,
    # and the gradients do not depend on them
    from attnc.backends.triton.contract import Bind
    from attnc.backends.triton.module import KernelModule
    seen = {}
    real = KernelModule.launch

    def spy(self, role, values, grid=None, options=None):
        if role in ("dq", "dkdv"):
            seen[role] = (values[Bind("BLOCK_M")], values[Bind("BLOCK_N")], dict(options))
        return real(self, role, values, grid, options)
    monkeypatch.setattr(KernelModule, "launch", spy)
    q, k, v = (t.requires_grad_() for t in _operands(20, 36, torch.float32))
    slopes = torch.linspace(0.1, 0.6, 4).requires_grad_()
    kernel = attnc.load("alibi")
    want = torch.autograd.grad((kernel(q, k, v, slopes=slopes) ** 2).sum(), (q, k, v, slopes))
    config = {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1,
              "DQ_BLOCK_M": 32, "DQ_BLOCK_N": 16, "dq_num_warps": 2, "dq_num_stages": 2}
    monkeypatch.setattr(type(kernel), "backward_config", lambda self, *a, **kw: config)
    got = torch.autograd.grad((kernel(q, k, v, slopes=slopes) ** 2).sum(), (q, k, v, slopes))
    assert seen == {"dq": (32, 16, {"num_warps": 2, "num_stages": 2}),
                    "dkdv": (16, 32, {"num_warps": 4, "num_stages": 1})}
    for a, b in zip(got, want):
        assert rel_error(a, b) < 1e-5


def test_role_configs_split_a_backward_config():
    both = {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}
    split = launcher.role_configs({**both, "DQ_BLOCK_M": 128, "DQ_BLOCK_N": 32,
                                   "dq_num_warps": 8, "dq_num_stages": 2})
    assert split == {"dkdv": both, "dq": {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8,
                                          "num_stages": 2}}
    # a config without the dq kernel's keys (a forward one) gives both kernels the same
    assert launcher.role_configs(both) == {"dkdv": both, "dq": both}
