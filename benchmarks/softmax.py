"""Softmax attention, forward and backward: attnc against FlexAttention, SDPA and FlashAttention-2;
and the library's other normalizers (sigmoid, softplus, relu, standardized, Sinkhorn, a sink
logit, grouped, stick-breaking), which only attnc runs, at the same sizes.

    python -m benchmarks.softmax [--quick] [--device cuda|cpu] [--autotune/--no-autotune]
                                 [--out FILE] [--specs causal alibi ...] [--lengths 1024 4096]
                                 [--head-dims 64 128] [--peers flex sdpa flash] [--modes fwd bwd]
                                 [--flex-compile/--no-flex-compile] [--dtype bf16]

Every spec runs as an attnc kernel and as the same computation written for each peer that can
express it: FlexAttention (score_mod / mask_mod, a torch BlockMask built once, outside timing),
`torch.nn.functional.scaled_dot_product_attention` (causal only, `is_causal=True`, forced onto
the flash backend on CUDA) and `flash_attn` (causal, sliding window, ALiBi, softcap, and the
document mask as packed variable-length sequences). A peer that cannot express a spec, is not
installed or fails shows "-" with the reason in a footnote; the suite carries on. The peers all
compute a softmax, so the normalizer specs (NORMALIZER_SPECS) time attnc alone: their rows sit
next to the softmax rows of the same shape (causal ones next to `causal`, bidirectional ones
next to what `causal` costs at twice the visible pairs).

Before timing, attnc's output (and for the backward dq, dk, dv) is compared with an eager fp32
reference computed on a slice of the batch and heads; a relative error over the dtype's
tolerance fails the run (exit status 1, the table is written all the same). Each peer's forward
output is compared the same way; a peer that disagrees gets a footnote (its times are then for
a different computation), which does not fail the run.
"""

# attnc's Triton backend first: without a GPU it switches Triton to its interpreter, which must
# happen before anything imports Triton (torch.compile and torch's flex_attention machinery do).
import attnc  # noqa: I001
import attnc.backends.triton  # noqa: F401

import argparse
import contextlib
import math
import warnings
from dataclasses import dataclass, field

import torch

from benchmarks import common

SOFTMAX_SPECS = ("causal", "sliding_window", "alibi", "softcap", "document", "prefix_lm",
                 "block_sparse")
# library variants whose weights are not a row softmax (issue 15): attnc only
NORMALIZER_SPECS = ("sigmoid_attn", "softplus_attn", "relu_attn", "standardized", "sinkhorn",
                    "sink_softmax", "grouped", "stick_breaking")
# specs with a prologue fused into the kernel (issue 17): rope, l2norm + gains + rope, absorbed
# MLA; their peers apply the prologue in torch first ("torch glue"), and the `glue` peer is that
# glue followed by attnc's plain causal kernel
PROLOGUE_SPECS = ("rope", "qk_norm", "mla")
SPECS = SOFTMAX_SPECS + NORMALIZER_SPECS + PROLOGUE_SPECS
PEERS = ("flex", "sdpa", "flash")
GLUE = "glue"
MODES = ("fwd", "bwd")
# relative-error tolerance of attnc against the fp32 reference, by input dtype; fp32 leaves room
# for TF32 dot products on a GPU, while Triton's interpreter computes them in fp32 (errors
# measured there: about 3e-7)
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float32: 2e-3}
TOLERANCE_CPU_FP32 = 1e-4
BWD_FACTOR = 2.5  # backward FLOPs / forward FLOPs: 5 matmuls against 2 (FlashAttention-2's count)
REF_ELEMENTS = 1 << 29  # score elements per reference tensor (fp32: 2 GiB)


class Skip(Exception):
    """A peer that does not apply to a case; the message is the footnote."""


# --- counting work -------------------------------------------------------------------------------
def visible_pairs(mask_mod, B: int, H: int, M: int, N: int, device, *, per_batch: bool = True,
                  per_head: bool = False, slab: int = 1 << 24) -> int:
    """Exact number of visible (query, key) pairs summed over all B x H (batch, head) pairs.

    The mask_mod (FlexAttention's convention) is evaluated on the device for slabs of query rows
    (about `slab` elements each) and the True entries summed. A mask that is the same for every
    batch element (head) is evaluated for the first one and multiplied by B (H)."""
    device = torch.device(device)
    keys = torch.arange(N, device=device).view(1, N)
    rows_per_slab = max(1, slab // max(N, 1))
    total = 0
    for b in range(B if per_batch else 1):
        for h in range(H if per_head else 1):
            bt = torch.tensor(b, device=device)
            ht = torch.tensor(h, device=device)
            for m0 in range(0, M, rows_per_slab):
                rows = torch.arange(m0, min(M, m0 + rows_per_slab), device=device).view(-1, 1)
                seen = torch.as_tensor(mask_mod(bt, ht, rows, keys), device=device)
                total += int(torch.broadcast_to(seen, (rows.shape[0], N)).sum())
    return total * (1 if per_batch else B) * (1 if per_head else H)


def flops(pairs: int, head_dim: int, mode: str) -> float:
    """Forward: two matmuls of 2 * D FLOPs per visible pair (QK^T and PV); backward 2.5x that."""
    fwd = 4.0 * head_dim * pairs
    return fwd if mode == "fwd" else BWD_FACTOR * fwd


# --- the cases -----------------------------------------------------------------------------------
@dataclass
class Case:
    """One spec at one size: the attnc kernel and the same computation for the peers."""
    label: str
    kernel: object
    mask_mod: object                   # FlexAttention convention; also counts pairs and masks
    score_mod: object = None           # FlexAttention convention (score arrives scaled)
    inputs: dict = field(default_factory=dict)   # extra attnc tensors (slopes, doc)
    block_mask: object = None          # attnc BlockMask, for a block-sparse kernel
    flex_block_size: int = 128
    per_batch: bool = False            # the mask differs between batch elements
    sdpa_causal: bool = False          # SDPA runs it natively (is_causal=True)
    flash: dict | None = None          # flash_attn_func keyword arguments
    flash_varlen: object = None        # (cu_seqlens, max_seqlen) for flash_attn_varlen_func
    no_flash: str = "flash_attn has no form of this mask"
    # the reference's weights from (scores, visible) for a normalizer spec; None: softmax
    weights: object = None
    # a prologue spec's torch glue: (q, k, v) -> (q', k', v', scale) for plain causal attention
    # (batch and heads may be a leading slice of the case's); the peers and the reference run it
    glue: object = None
    leaves: int = 3  # how many of (q, k, v) the computation reads (mla: no v)


def causal_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def full_mod(b, h, q_idx, kv_idx):
    return (q_idx >= 0) & (kv_idx >= 0)


def strict_causal_mod(b, h, q_idx, kv_idx):
    return q_idx > kv_idx


def document_ids(B: int, N: int, docs: int, generator, device) -> torch.Tensor:
    """[B, N] int32 ids of `docs` contiguous documents of random lengths per sequence."""
    docs = max(1, min(docs, N))
    rows = []
    for _ in range(B):
        cuts = torch.randperm(N - 1, generator=generator)[:docs - 1] + 1
        starts = torch.zeros(N, dtype=torch.int32)
        starts[cuts] = 1
        rows.append(torch.cumsum(starts, 0, dtype=torch.int32))
    return torch.stack(rows).to(device)


def packed_lengths(doc: torch.Tensor) -> tuple[torch.Tensor, int]:
    """cu_seqlens (int32) and the longest document, for the documents of all rows packed."""
    B, N = doc.shape
    flat = (doc.long() + torch.arange(B, device=doc.device).view(-1, 1) * (N + 1)).flatten()
    starts = torch.nonzero(flat[1:] != flat[:-1]).flatten() + 1
    cu = torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), B * N)])
    return cu.to(torch.int32), int((cu[1:] - cu[:-1]).max())


def make_case(spec: str, B: int, H: int, N: int, device, opts, D: int = 64) -> Case:
    """The attnc kernel, FlexAttention mods and peer arguments for one spec at length N."""
    gen = torch.Generator().manual_seed(opts.seed + N)
    if spec in PROLOGUE_SPECS:
        return prologue_case(spec, B, H, N, D, device, gen)
    if spec == "causal":
        return Case("causal", attnc.load("causal"), causal_mod, sdpa_causal=True,
                    flash={"causal": True})
    if spec == "sliding_window":
        window = opts.window

        def window_mod(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < window)
        return Case(f"sliding_window(W={window})", attnc.load("sliding_window", window=window),
                    window_mod, flash={"causal": True, "window_size": (window - 1, 0)})
    if spec == "alibi":
        slopes = torch.tensor([2.0 ** (-8.0 * (i + 1) / H) for i in range(H)],
                              device=device, dtype=torch.float32)

        def alibi_mod(score, b, h, q_idx, kv_idx):
            return score + slopes[h] * (kv_idx - q_idx)
        return Case("alibi", attnc.load("alibi"), causal_mod, score_mod=alibi_mod,
                    inputs={"slopes": slopes}, flash={"causal": True, "alibi_slopes": slopes})
    if spec == "softcap":
        cap = opts.cap

        def softcap_mod(score, b, h, q_idx, kv_idx):
            return cap * torch.tanh(score / cap)  # flex hands the mod qk * scale, as attnc caps
        return Case(f"softcap({cap:g})", attnc.load("softcap", cap=cap), causal_mod,
                    score_mod=softcap_mod, flash={"causal": True, "softcap": cap})
    if spec == "document":
        doc = document_ids(B, N, opts.docs, gen, device)

        def document_mod(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (doc[b, q_idx] == doc[b, kv_idx])
        return Case(f"document({opts.docs} docs)", attnc.load("document"), document_mod,
                    inputs={"doc": doc}, per_batch=True, flash_varlen=packed_lengths(doc))
    if spec == "prefix_lm":
        prefix = N // 4

        def prefix_mod(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) | (kv_idx < prefix)
        return Case("prefix_lm(P=N/4)", attnc.load("prefix_lm", prefix=prefix), prefix_mod,
                    no_flash="flash_attn has no prefix-LM mask")
    if spec == "block_sparse":
        bs = opts.block_size
        blocks = -(-N // bs)
        keep = torch.rand(blocks, blocks, generator=gen) < opts.density
        keep |= torch.eye(blocks, dtype=torch.bool)  # every query block sees its own keys
        keep = keep.to(device)

        def blocks_mod(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & keep[q_idx // bs, kv_idx // bs]
        bm = attnc.create_block_mask(blocks_mod, None, None, N, N, device=device, BLOCK_SIZE=bs)
        return Case(f"block_sparse(causal, {opts.density:.0%} of blocks, {bs})",
                    attnc.load("causal", block_sparse=True), blocks_mod, block_mask=bm,
                    flex_block_size=bs, no_flash="flash_attn has no block-sparse mask")
    if spec in NORMALIZER_SPECS:
        return normalizer_case(spec, H, gen, device)
    raise ValueError(f"unknown spec {spec!r}")


# --- the prologue specs: rope, qk_norm, mla with their torch glue -------------------------------
def rotate(x, pos, theta: float = 10000.0, interleaved: bool = False):
    """RoFormer's rotation of all features of x [b, h, N, D] by pos [b, N] (in x's dtype)."""
    R = x.shape[-1]
    inv = theta ** (-2.0 * torch.arange(R // 2, device=x.device, dtype=torch.float32) / R)
    ang = pos[: x.shape[0], None, :, None].float() * inv
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([a * cos - b * sin, b * cos + a * sin], -1).flatten(-2)
    a, b = x[..., :R // 2], x[..., R // 2:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)


def prologue_case(spec: str, B: int, H: int, N: int, D: int, device, gen) -> Case:
    """rope (all D features rotated), qk_norm (l2norm with gains, then rope) and mla (the
    absorbed form: q over a D-wide latent that is k's first head, the keys' and the values'
    latent, plus a rope part of D / 2 features) as attnc kernels and as torch glue."""
    pos = torch.arange(N, device=device).expand(B, N).contiguous()
    scale = 1.0 / math.sqrt(D)
    if spec == "rope":
        def glue(q, k, v):
            return rotate(q, pos), rotate(k, pos), v, scale
        return Case("rope", attnc.load("rope", rot=D), causal_mod, sdpa_causal=True,
                    inputs={"pos_q": pos, "pos_k": pos}, glue=glue)
    if spec == "qk_norm":
        gq = (0.5 + torch.rand(D, generator=gen)).to(device)
        gk = (0.5 + torch.rand(D, generator=gen)).to(device)

        def norm(x, gain):
            x = x.float()
            return (x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6) * gain)

        def glue(q, k, v):
            return (rotate(norm(q, gq), pos).to(q.dtype), rotate(norm(k, gk), pos).to(k.dtype),
                    v, scale)
        return Case("qk_norm", attnc.load("qk_norm"), causal_mod, sdpa_causal=True,
                    inputs={"pos_q": pos, "pos_k": pos, "gq": gq, "gk": gk}, glue=glue)
    if spec == "mla":
        Dr = max(16, D // 2)
        qr = torch.randn(B, H, N, Dr, generator=gen).to(device)
        kr = torch.randn(B, 1, N, Dr, generator=gen).to(device)
        kernel = attnc.load("mla")

        def glue(q, k, v):
            b, h = q.shape[0], q.shape[1]
            latent = k[:, :1].expand(b, h, N, D)
            return (torch.cat([q, rotate(qr[:b, :h].to(q.dtype), pos, interleaved=True)], -1),
                    torch.cat([latent, rotate(kr[:b].to(k.dtype), pos, interleaved=True)
                               .expand(b, h, N, Dr)], -1), latent, scale)

        class Latent:
            """mla called on the harness's operands: the latent is k's first head, no v."""

            def __call__(self, q, k, v, **inputs):
                return kernel(q, k[:, :1], qr=qr.to(q.dtype), kr=kr.to(q.dtype), **inputs)
        return Case(f"mla(latent {D}, rope {Dr})", Latent(), causal_mod, sdpa_causal=True,
                    inputs={"pos_q": pos, "pos_k": pos}, glue=glue, leaves=2)
    raise ValueError(f"unknown spec {spec!r}")


# --- the normalizer specs: eager weights from the math (the reference's half of each case) ------
NO_PEER = "computes a softmax: it has no form of this normalizer"


def _sigmoid_weights(s, seen):
    return torch.sigmoid(s - math.log(s.shape[-1])) * seen


def _softplus_weights(s, seen):
    M, N = s.shape[-2:]
    keys = (torch.arange(M, device=s.device).view(-1, 1) + 1).clamp(max=N)  # keys row m sees
    f = torch.nn.functional.softplus(torch.log(keys.float()) * s) * seen
    return f / f.sum(-1, keepdim=True)  # every causal row sees a key: the sum is positive


def _relu_weights(s, seen):
    return torch.relu(s) * seen / seen.sum(-1, keepdim=True)


def _standardized_weights(s, seen):
    count = seen.sum(-1, keepdim=True)
    mean = (s * seen).sum(-1, keepdim=True) / count
    var = ((s - mean) ** 2 * seen).sum(-1, keepdim=True) / count
    return (s - mean) / torch.sqrt(var + 1e-6) * seen


def _sinkhorn_weights(iters):
    def weights(s, seen):
        shift = s.masked_fill(~seen, float("-inf")).amax(-1, keepdim=True)
        K = torch.exp(s - shift) * seen  # the first row normalization divides the shift out
        for _ in range(iters):
            K = K / K.sum(-1, keepdim=True)
            K = K / K.sum(-2, keepdim=True)
        return K
    return weights


def _sink_weights(sinks):
    def weights(s, seen):
        sink = sinks[:s.shape[1]].view(1, -1, 1, 1).expand(*s.shape[:-1], 1)
        logits = torch.cat([s.masked_fill(~seen, float("-inf")), sink], dim=-1)
        return torch.softmax(logits, dim=-1)[..., :-1]
    return weights


def _grouped_weights(w):
    def weights(s, seen):
        N, G = s.shape[-1], w.shape[1]
        group = torch.arange(N, device=s.device) * G // N
        mix = torch.softmax(w[:s.shape[1]], dim=-1)  # [heads, G]
        total = 0
        for c in range(G):
            p = torch.softmax(s.masked_fill(~(seen & (group == c)), float("-inf")), dim=-1)
            total = total + mix[:, c].view(1, -1, 1, 1) * p
        return total
    return weights


def _stick_breaking_weights(s, seen):
    log_rest = torch.nn.functional.logsigmoid(-s) * seen  # log(1 - beta) on visible keys
    after = log_rest.flip(-1).cumsum(-1).flip(-1) - log_rest  # keys j > n (visible: j < m)
    return torch.exp(torch.nn.functional.logsigmoid(s) + after) * seen


def normalizer_case(spec: str, H: int, gen, device) -> Case:
    """A library normalizer variant at its default options; the peers do not apply."""
    kernel = attnc.load(spec)
    common_args = {"no_flash": f"flash_attn {NO_PEER}"}
    if spec == "sinkhorn":
        return Case("sinkhorn(iters=3)", kernel, full_mod, weights=_sinkhorn_weights(3),
                    **common_args)
    if spec == "grouped":
        w = torch.randn(H, 4, generator=gen).to(device)
        return Case("grouped(4 groups)", kernel, full_mod, inputs={"w": w},
                    weights=_grouped_weights(w), **common_args)
    if spec == "sink_softmax":
        sinks = torch.randn(H, generator=gen).to(device)
        return Case(spec, kernel, causal_mod, inputs={"sinks": sinks},
                    weights=_sink_weights(sinks), **common_args)
    if spec == "stick_breaking":
        return Case(spec, kernel, strict_causal_mod, weights=_stick_breaking_weights,
                    **common_args)
    weights = {"sigmoid_attn": _sigmoid_weights, "softplus_attn": _softplus_weights,
               "relu_attn": _relu_weights, "standardized": _standardized_weights}[spec]
    return Case(spec, kernel, causal_mod, weights=weights, **common_args)


# --- the eager reference -------------------------------------------------------------------------
def reference(case: Case, q, k, v, grad, scale: float):
    """fp32 eager attention with the case's mods for the leading (batch, head) slice given;
    returns out and (dq, dk, dv) for the upstream gradient `grad`."""
    q, k, v = (t.detach().float().requires_grad_() for t in (q, k, v))
    leaves = (q, k, v)[:case.leaves]
    if case.glue is not None:
        q, k, v, scale = case.glue(q, k, v)
    nb, nh, M, N = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    dev = q.device
    b = torch.arange(nb, device=dev).view(-1, 1, 1, 1)
    h = torch.arange(nh, device=dev).view(1, -1, 1, 1)
    m = torch.arange(M, device=dev).view(1, 1, -1, 1)
    n = torch.arange(N, device=dev).view(1, 1, 1, -1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if case.score_mod is not None:
        s = case.score_mod(s, b, h, m, n)
    seen = torch.broadcast_to(torch.as_tensor(case.mask_mod(b, h, m, n), device=dev), s.shape)
    alive = seen.any(-1, keepdim=True)  # rows that see no key give 0, as the kernels do
    if case.weights is not None:
        out = torch.matmul(case.weights(s, seen) * alive, v)
    else:
        s = s.masked_fill(~seen, float("-inf")).masked_fill(~alive, 0.0)
        out = torch.matmul(torch.softmax(s, -1), v) * alive
    grads = torch.autograd.grad(out, leaves, grad.float())
    return out.detach(), grads


def tolerance(dtype, device) -> float:
    if dtype == torch.float32 and torch.device(device).type == "cpu":
        return TOLERANCE_CPU_FP32
    return TOLERANCE[dtype]



# --- implementations -----------------------------------------------------------------------------
@dataclass
class Runner:
    """How one implementation runs a case: `fwd()` on inputs that need no grad, `train()` on the
    leaves, outputs mapped back to [B, H, N, D] by `to_bhnd`, upstream grads by `grad_in`."""
    fwd: object
    train: object
    leaves: tuple
    to_bhnd: object = None
    grad_in: object = None

    def __post_init__(self):
        self.to_bhnd = self.to_bhnd or _same
        self.grad_in = self.grad_in or _same


def _same(t):
    return t


def attnc_runner(case: Case, q, k, v, opts) -> Runner:
    extra = dict(case.inputs)
    if case.block_mask is not None:
        extra["block_mask"] = case.block_mask
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    return Runner(lambda: case.kernel(qd, kd, vd, **extra),
                  lambda: case.kernel(q, k, v, **extra), (q, k, v)[:case.leaves])


def glue_runner(case: Case, q, k, v, opts) -> Runner:
    """A prologue spec as torch glue then attnc's plain causal kernel."""
    if case.glue is None:
        raise Skip("glue: only the prologue specs have a torch glue")
    causal = attnc.load("causal")

    def run(a, b, c):
        a, b, c, scale = case.glue(a, b, c)
        return causal(a, b, c.contiguous(), scale=scale)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    return Runner(lambda: run(qd, kd, vd), lambda: run(q, k, v), (q, k, v)[:case.leaves])


def flex_runner(case: Case, q, k, v, opts) -> Runner:
    if case.weights is not None:
        raise Skip(f"FlexAttention {NO_PEER}")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    B, N = q.shape[0], q.shape[2]
    block_mask = create_block_mask(case.mask_mod, B if case.per_batch else None, None, N, N,
                                   device=q.device, BLOCK_SIZE=case.flex_block_size)
    fn = flex_attention
    if opts.flex_compile:
        fn = torch.compile(flex_attention, dynamic=False)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    if case.glue is not None:  # the prologue in torch, then FlexAttention
        def glued(a, b, c):
            a, b, c, scale = case.glue(a, b, c)
            return fn(a, b, c, block_mask=block_mask, scale=scale)
        return Runner(lambda: glued(qd, kd, vd), lambda: glued(q, k, v),
                      (q, k, v)[:case.leaves])
    return Runner(lambda: fn(qd, kd, vd, score_mod=case.score_mod, block_mask=block_mask),
                  lambda: fn(q, k, v, score_mod=case.score_mod, block_mask=block_mask),
                  (q, k, v))


def sdpa_runner(case: Case, q, k, v, opts) -> Runner:
    if case.weights is not None:
        raise Skip(f"SDPA {NO_PEER}")
    if not case.sdpa_causal:
        raise Skip("SDPA: no native form of this mask or score (only is_causal)")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def backend():
        if q.is_cuda:
            return sdpa_kernel(SDPBackend.FLASH_ATTENTION)
        return contextlib.nullcontext()

    def run(a, b, c):
        scale = None
        if case.glue is not None:  # the prologue in torch, then SDPA
            a, b, c, scale = case.glue(a, b, c)
        with backend():
            return sdpa(a, b, c, is_causal=True, scale=scale)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    return Runner(lambda: run(qd, kd, vd), lambda: run(q, k, v), (q, k, v)[:case.leaves])


def flash_runner(case: Case, q, k, v, opts) -> Runner:
    if case.flash is None and case.flash_varlen is None:
        raise Skip(case.no_flash)
    try:
        import flash_attn
    except Exception as e:  # noqa: BLE001 (a broken install is as good as none)
        raise Skip(f"flash_attn not importable ({type(e).__name__})") from None
    B, H, N, D = q.shape
    # flash_attn's layout is [B, N, H, D]: copies made once, outside timing
    leaves = tuple(t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    if case.flash_varlen is not None:
        cu, longest = case.flash_varlen
        packed = tuple(t.detach().view(B * N, H, D).requires_grad_() for t in leaves)

        def run_packed(a, b, c):
            return flash_attn.flash_attn_varlen_func(a, b, c, cu, cu, longest, longest,
                                                     causal=True)
        detached = tuple(t.detach() for t in packed)
        return Runner(lambda: run_packed(*detached), lambda: run_packed(*packed), packed,
                      to_bhnd=lambda o: o.view(B, N, H, -1).transpose(1, 2),
                      grad_in=lambda g: g.transpose(1, 2).reshape(B * N, H, -1))
    kwargs = case.flash

    def run(a, b, c):
        return flash_attn.flash_attn_func(a, b, c, **kwargs)
    detached = tuple(t.detach() for t in leaves)
    return Runner(lambda: run(*detached), lambda: run(*leaves), leaves,
                  to_bhnd=lambda o: o.transpose(1, 2),
                  grad_in=lambda g: g.transpose(1, 2).contiguous())


RUNNERS = {"flex": flex_runner, "sdpa": sdpa_runner, "flash": flash_runner, GLUE: glue_runner}


# --- one measurement -----------------------------------------------------------------------------
def time_mode(runner: Runner, mode: str, grad, device, repeat: int):
    """(ms, output in [B, H, N, D], grads or None). The results checked are those of the calls
    timed (the last one; bench's untimed warm-up call comes first). The backward is timed alone:
    torch.autograd.grad through one graph, built before timing and retained (nothing is
    accumulated into .grad)."""
    last: list = []
    if mode == "fwd":
        def forward():
            last[:] = [runner.fwd()]
        ms = common.bench(forward, device, repeat=repeat)
        return ms, runner.to_bhnd(last[0]), None
    out = runner.train()
    g = runner.grad_in(grad)

    def backward():
        last[:] = [torch.autograd.grad(out, runner.leaves, g, retain_graph=True)]
    ms = common.bench(backward, device, repeat=repeat)
    return ms, runner.to_bhnd(out), last[0]


def run_config(spec, D, N, opts, notes, rows, device, dtype) -> bool:
    """Both modes of one (spec, D, N); appends rows, returns False if attnc failed its check."""
    B, H = (opts.batch or max(1, opts.tokens // N)), opts.heads
    ok = True
    try:  # set-up: the case, its visible pairs, the data and the reference
        case = make_case(spec, B, H, N, device, opts, D)
        pairs = visible_pairs(case.mask_mod, B, H, N, N, device, per_batch=case.per_batch)
        torch.manual_seed(opts.seed)
        q, k, v = (common.randn(B, H, N, D, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        grad = common.randn(B, H, N, D, device=device, dtype=dtype)
        # the reference covers the first batch element and as many heads as fit REF_ELEMENTS
        nh = max(1, min(H, REF_ELEMENTS // (N * N)))
        ref_out, ref_grads = reference(case, q[:1, :nh], k[:1, :nh], v[:1, :nh],
                                       grad[:1, :nh], 1.0 / math.sqrt(D))
    except Exception as e:  # noqa: BLE001 (no check possible: counts as a failure)
        mark = notes.mark(f"set-up of {spec}: {common.reason(e)}")
        for mode in opts.modes:
            rows.append([spec, D, N, B, mode, f"ERROR {mark}"] + ["-"] * (2 + 3 * len(opts.peers)))
        common.release(device)
        return False
    tol = tolerance(dtype, device)
    repeat = 1 if opts.quick else 3
    runners = {}
    for name in ["attnc", *opts.peers]:
        try:
            build = attnc_runner if name == "attnc" else RUNNERS[name]
            runners[name] = build(case, q, k, v, opts)
        except Skip as e:
            runners[name] = notes.mark(str(e))
        except Exception as e:  # noqa: BLE001
            runners[name] = notes.mark(f"{name}: {common.reason(e)}")
    for mode in opts.modes:
        work = flops(pairs, D, mode)
        times, cells = {}, {}
        check = "-"
        for name, runner in runners.items():
            if isinstance(runner, str):
                cells[name] = f"- {runner}"
                if name == "attnc":
                    ok, check = False, f"ERROR {runner}"
                continue
            if name == "flex" and mode == "bwd" and device.type == "cpu":
                cells[name] = "- " + notes.mark("flex: FlexAttention has no backward on a CPU")
                continue
            try:
                ms, out, grads = time_mode(runner, mode, grad, device, repeat)
            except Exception as e:  # noqa: BLE001
                who = f"attnc {spec}" if name == "attnc" else name
                mark = notes.mark(f"{who}: {common.reason(e)}")
                cells[name] = f"- {mark}"
                if name == "attnc":
                    ok, check = False, f"ERROR {mark}"
                common.release(device)
                continue
            times[name] = ms
            cells[name] = f"{ms:.3f}"
            err = common.relative_error(out[:1, :nh], ref_out)
            if name == "attnc":
                errs = [err]
                if grads is not None:
                    errs += [common.relative_error(g[:1, :nh], r) for g, r in zip(grads, ref_grads)]
                worst = max(errs)
                passed = worst <= tol
                ok = ok and passed
                check = f"{'ok' if passed else 'FAIL'} {worst:.1e}"
            elif err > tol:
                cells[name] += " " + notes.mark(
                    f"{name}: its output differs from the reference (relative error {err:.1e} "
                    f"for {case.label}), so it computes something else")
            del out, grads
        row = [case.label, D, N, B, mode, check, cells["attnc"], _tflops(work, times.get("attnc"))]
        for name in opts.peers:
            row += [cells[name], _tflops(work, times.get(name)),
                    _ratio(times.get(name), times.get("attnc"))]
        rows.append(row)
        print(" | ".join(str(c) for c in row), flush=True)
    del runners, q, k, v, grad, ref_out, ref_grads
    common.release(device)
    return ok


def _tflops(work: float, ms) -> str:
    if ms is None:
        return "-"
    value = work / (ms * 1e9)
    return f"{value:.1f}" if value >= 1 else f"{value:.3g}"


def _ratio(peer, ours) -> str:
    if peer is None or ours is None:
        return "-"
    value = peer / ours
    return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"



# --- the suite -----------------------------------------------------------------------------------
def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.softmax",
                                     description=__doc__.split("\n")[0])
    common.add_common_arguments(parser, "CPU smoke sizes: B=1, H=2, lengths 64 and 96, D=32, "
                                        "eager FlexAttention")
    parser.add_argument("--specs", nargs="+", choices=SPECS, default=list(SPECS))
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="sequence lengths (default 1024 ... 16384; --quick: 64 96)")
    parser.add_argument("--head-dims", type=int, nargs="+", default=None,
                        help="default 64 128 (--quick: 32)")
    parser.add_argument("--peers", nargs="*", choices=PEERS + (GLUE,), default=None,
                        help="default flex sdpa flash, and glue when a prologue spec runs")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--dtype", default=None,
                        help="bf16, fp16 or fp32 (default: bf16 on a GPU, fp32 on a CPU)")
    parser.add_argument("--flex-compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile FlexAttention (default: on, off with --quick)")
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens per batch: B = tokens // N (default 16384; --quick: B=1)")
    parser.add_argument("--batch", type=int, default=None, help="fix B instead of --tokens")
    parser.add_argument("--heads", type=int, default=None,
                        help="query (= kv) heads (16; --quick 2)")
    parser.add_argument("--window", type=int, default=None,
                        help="sliding window (1024; --quick 40)")
    parser.add_argument("--cap", type=float, default=50.0, help="softcap's cap")
    parser.add_argument("--docs", type=int, default=6, help="documents per sequence")
    parser.add_argument("--block-size", type=int, default=None,
                        help="block_sparse's block size (128; --quick 16)")
    parser.add_argument("--density", type=float, default=0.5,
                        help="block_sparse: share of key blocks kept (the diagonal always is)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {"lengths": [64, 96] if quick else [1024, 2048, 4096, 8192, 16384],
                "head_dims": [32] if quick else [64, 128], "heads": 2 if quick else 16,
                "window": 40 if quick else 1024, "block_size": 16 if quick else 128,
                "tokens": 16384, "flex_compile": not quick}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if quick and args.batch is None:
        args.batch = 1
    if args.peers is None:
        args.peers = list(PEERS) + ([GLUE] if set(args.specs) & set(PROLOGUE_SPECS) else [])
    if args.dtype is None:
        args.dtype = "bf16" if torch.device(args.device).type == "cuda" else "fp32"
    return args


def describe(args, dtype) -> str:
    flex = ("torch.compile(flex_attention, dynamic=False)" if args.flex_compile
            else "eager (unfused) flex_attention")
    return "\n".join([
        f"Softmax attention, {args.heads} query heads = kv heads, {args.dtype}, B = "
        + (f"{args.batch}" if args.batch else f"{args.tokens} // N") + " (column B).",
        "- times in ms (median; see benchmarks/common.py); **fwd** = one forward on inputs "
        "that need no grad; **bwd** = the backward alone: `torch.autograd.grad(out, (q, k, v), "
        "dout, retain_graph=True)` on a graph built once, outside timing, the same for every "
        "implementation (no accumulation into `.grad`).",
        "- TFLOP/s count only visible work: forward 4 * D FLOPs per visible (query, key) pair "
        "(QK^T and PV), backward 2.5x the forward (5 matmuls, FlashAttention-2's convention); "
        "visible pairs are counted exactly by evaluating the mask on the device.",
        "- `flex/attnc` etc.: peer time / attnc time (> 1: attnc is faster).",
        f"- check: attnc's largest relative error ||a - r|| / ||r|| over out (fwd) or out, dq, "
        f"dk, dv (bwd) against an fp32 eager reference on batch element 0 and the first heads; "
        f"tolerance {tolerance(dtype, args.device):g} for {args.dtype}.",
        f"- FlexAttention: {flex}, torch BlockMask from the same mask_mod (BLOCK_SIZE 128; "
        "block_sparse: its own size). SDPA: `is_causal=True` (flash backend on CUDA). "
        "flash_attn: `flash_attn_func` (window_size=(W-1, 0), alibi_slopes, softcap), the "
        "document mask as packed sequences (`flash_attn_varlen_func`).",
        f"- specs: sliding window W = {args.window}; softcap cap = {args.cap:g}; document: "
        f"{args.docs} documents of random lengths per sequence; prefix_lm: prefix N/4; "
        f"block_sparse: `attnc.load('causal', block_sparse=True)` with a block mask of "
        f"{args.density:.0%} random {args.block_size}-blocks (diagonal kept) built by "
        "attnc.create_block_mask from a data-dependent mask_mod.",
        "- normalizer specs (attnc only; library defaults): sigmoid_attn, softplus_attn, "
        "relu_attn, standardized, sink_softmax (random sink logits) causal; stick_breaking "
        "strictly causal; sinkhorn (3 iterations) and grouped (4 groups, random mixing "
        "weights) bidirectional. TFLOP/s count the same 4 * D FLOPs per visible pair as "
        "softmax, whatever the number of passes.",
    ])


def main(argv=None) -> int:
    args = parse_args(argv)
    common.set_autotune(args)
    device = torch.device(args.device)
    dtype = common.dtype_of(args.dtype)
    if args.flex_compile and "flex" in args.peers:
        from torch._functorch import config as functorch_config
        common.raise_recompile_limit(1 << 16)  # each (spec, size) compiles anew
        # a retained graph's backward must not reuse (donate) its saved buffers
        functorch_config.donated_buffer = False
    notes = common.Notes()
    rows: list[list] = []
    ok = True
    with warnings.catch_warnings():
        # eager flex (--no-flex-compile) warns that it is unfused: the section says so already
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
        for spec in args.specs:
            for D in args.head_dims:
                for N in args.lengths:
                    if args.flex_compile and "flex" in args.peers:
                        torch._dynamo.reset()
                    ok = run_config(spec, D, N, args, notes, rows, device, dtype) and ok
    headers = ["spec", "D", "N", "B", "mode", "check", "attnc ms", "attnc TFLOP/s"]
    for name in args.peers:
        headers += [f"{name} ms", f"{name} TFLOP/s", f"{name}/attnc"]
    text = common.table(headers, rows, "lrrrll" + "r" * (len(headers) - 6))
    if notes.texts:
        text += "\n" + notes.render() + "\n"
    common.publish(device, args.out, "softmax", "benchmarks.softmax", argv,
                   describe(args, dtype) + "\n\n" + text)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
