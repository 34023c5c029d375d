"""Fused chunked kernels for the backward of chunked `linear` scans.

The backward splits a scan in three: a prologue (per-step key, value, query, log-decay and beta
tensors, elementwise in q, k, v and the inputs), the core recurrence of one state

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T    (delta rules)
    S_t = diag(a_t) S_{t-1} + k_t v_t^T                             (additive / decays)
    r_t = x_t^T S_t

and an epilogue (the output from the readouts r). Prologue and epilogue are elementwise and are
differentiated by torch autograd; the core runs here, as two kernels independent of the spec:

* `core_forward` recomputes the readouts and stores the state entering every segment of
  STATE_STEPS steps (a whole chunk when chunks are longer): O(T / 64) states, not O(T);
* `core_backward` walks the chunks in reverse with the state's adjoint dS in registers and
  returns dx, dk, dv, d(log decay), dbeta and dS0. On reaching a segment it replays its chunks
  from the stored state, keeping the states entering them in `scratch` ([N, H, chunks per
  segment, K, V], small enough to stay in L2).

One program per (sequence, head, value tile). dv and dS0 are exact per value tile; dx, dk,
dlog-decay and dbeta sum over all value features, so each tile writes its own slice of a
[NV, ...] buffer and the caller adds them up (deterministic, no atomics). GATE is an
attnc.ir.linear.Gate: 0 none, 1 scalar per step, 2 vector per step (over key features).
Tensors are contiguous: x, k, g [B, H, T, K|1], v, r, dr [B, H, T, V], states [.., K, V].
x, k and v are in the data's dtype and every dot takes its operands in that dtype (bf16/fp16
tensor cores; fp32 data keeps exact fp32 products with IEEE), accumulating in fp32; the
states, gates, beta, dr and every output are fp32.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import triton
import triton.language as tl


def _prelude():
    """backends/triton/prelude.py, loaded by its path: this file imports nothing from attnc,
    so the AOT check can compile it under any Python with Triton (like a generated module)."""
    path = Path(__file__).resolve().parents[1] / "prelude.py"
    spec = importlib.util.spec_from_file_location("attnc_core_prelude", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_dot = _prelude()._dot
_round = _prelude()._round

# Steps between the states core_forward stores (a whole chunk when chunks are longer): the
# backward replays a segment's chunks from its state (fla stores every 64 steps too)
STATE_STEPS = 64
_STATE_STEPS = tl.constexpr(STATE_STEPS)


def segment(chunk: int) -> int:
    """Steps between stored states for chunks of `chunk` steps (a multiple of it)."""
    return max(STATE_STEPS, chunk)


@triton.jit
def _sequence(cu_seqlens, chunk_offsets, n, hh, T, H, VARLEN: tl.constexpr):
    """Program n's sequence: its length, its first chunk's index among all sequences' chunks,
    and the row of its step 0 for head hh in the [B, H, T] layout."""
    if VARLEN:
        bos = tl.load(cu_seqlens + n).to(tl.int64)
        seq_len = (tl.load(cu_seqlens + n + 1).to(tl.int64) - bos).to(tl.int32)
        bb = 0
    else:
        bos = 0
        seq_len = T
        bb = n
    return seq_len, tl.load(chunk_offsets + n).to(tl.int64), (bb * H + hh).to(tl.int64) * T + bos


@triton.jit
def _rows(ptr, base, row, tm, offs, width, fmask):
    """A [rows, features] tile in its stored dtype (elementwise use promotes it to fp32)."""
    return tl.load(ptr + base + row[:, None] * width + offs[None, :],
                   mask=tm[:, None] & fmask[None, :], other=0.0)


@triton.jit
def _store_rows(ptr, base, row, tm, offs, width, fmask, value):
    tl.store(ptr + base + row[:, None] * width + offs[None, :], value,
             mask=tm[:, None] & fmask[None, :])


@triton.jit
def _operand(a, DT: tl.constexpr, UPCAST: tl.constexpr):
    """A dot operand in the data dtype DT: an fp32 tile is rounded once (bf16/fp16 tensor
    cores); a tile already in DT (x, k, v as loaded), or fp32 data, passes unchanged."""
    if a.dtype != DT:
        a = _round(a, DT, UPCAST)
    return a


@triton.jit
def _mm(a, b, DT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b on DT operands with an fp32 accumulator."""
    return _dot(_operand(a, DT, UPCAST), _operand(b, DT, UPCAST), IEEE, UPCAST)


@triton.jit
def _gates(g, base_g, row, tmask, offs_k, mask_k, K, GATE: tl.constexpr, BT: tl.constexpr,
           BK: tl.constexpr):
    """Per-step log decays: a [BT, BK] tile (GATE 2) or a [BT] vector (else; a cumsum over a
    [BT, 1] column trips an assertion in Triton 3.6's scan lowering)."""
    if GATE == 2:
        gg = _rows(g, base_g * K, row, tmask, offs_k, K, mask_k)
    elif GATE == 1:
        gg = tl.load(g + base_g + row, mask=tmask, other=0.0).to(tl.float32)
    else:
        gg = tl.zeros([BT], tl.float32)
    return gg


@triton.jit
def _wy(kk, gs, bt, offs_t, DT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
        BT: tl.constexpr):
    """The delta rule's unit lower-triangular inverse tinv = (I + diag(b) L)^-1 with
    L = strict(exp(G_t - G_s) k_t.k_s), by forward substitution; also returns L and the decay."""
    lower = offs_t[:, None] >= offs_t[None, :]
    strict = offs_t[:, None] > offs_t[None, :]
    Gt = tl.cumsum(gs, axis=0)
    decay = tl.where(lower, tl.exp(tl.where(lower, Gt[:, None] - Gt[None, :], 0.0)), 0.0)
    L = tl.where(strict, decay * _mm(kk, tl.trans(kk), DT, IEEE, UPCAST), 0.0)
    a_low = L * bt[:, None]
    tinv = tl.where(offs_t[:, None] == offs_t[None, :], 1.0, 0.0)
    for r in range(1, BT):
        a_row = tl.sum(tl.where(offs_t[:, None] == r, a_low, 0.0), axis=0)
        t_row = tl.where(offs_t == r, 1.0, 0.0) - tl.sum(a_row[:, None] * tinv, axis=0)
        tinv = tl.where(offs_t[:, None] == r, t_row[None, :], tinv)
    return tinv, L, decay, Gt


@triton.jit
def _advance(S, kk, vv, gg, bt, offs_t, GATE: tl.constexpr, DELTA: tl.constexpr,
             BT: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """The state after one chunk (core_forward's update, without its readouts)."""
    if DELTA:
        tinv, L, decay, Gt = _wy(kk, gg, bt, offs_t, DT, IEEE, UPCAST, BT)
        kb = kk * (bt * tl.exp(Gt))[:, None]
        delta = _mm(tinv, vv * bt[:, None] - _mm(kb, S, DT, IEEE, UPCAST), DT, IEEE, UPCAST)
        gl = tl.sum(gg, axis=0)
        S = S * tl.exp(gl) + _mm(tl.trans(kk * tl.exp(gl - Gt)[:, None]), delta, DT, IEEE,
                                 UPCAST)
    elif GATE == 2:
        G = tl.cumsum(gg, axis=0)
        g_last = tl.sum(gg, axis=0)
        S = S * tl.exp(g_last)[:, None] + _mm(tl.trans(kk * tl.exp(g_last[None, :] - G)), vv,
                                              DT, IEEE, UPCAST)
    else:
        Gt = tl.cumsum(gg, axis=0)
        gl = tl.sum(gg, axis=0)
        S = S * tl.exp(gl) + _mm(tl.trans(kk * tl.exp(gl - Gt)[:, None]), vv, DT, IEEE, UPCAST)
    return S


@triton.jit
def _replay(k, v, g, beta, h, own, seg, s0, last, seq_len, base, hh, H, K, V, kv, m_kv,
            offs_t, offs_k, mask_k, offs_v, mask_v, GATE: tl.constexpr, DELTA: tl.constexpr,
            BT: tl.constexpr, BK: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr,
            UPCAST: tl.constexpr):
    """Writes the states entering chunks 0..last of the segment starting at step s0 (stored
    state `seg`) into `own`, replaying chunks 0..last-1 from the stored state. The barriers
    order these global writes against the CTA's reads of `own` before and after (a state's
    store and load may spread it over the threads differently)."""
    tl.debug_barrier()
    S = tl.load(h + (seg * H + hh) * K * V + kv, mask=m_kv, other=0.0)
    for jj in range(0, last):
        tl.store(own + jj * K * V + kv, S, mask=m_kv)
        row = s0 + jj * BT + offs_t
        tmask = row < seq_len
        kk = _rows(k, base * K, row, tmask, offs_k, K, mask_k)
        vv = _rows(v, base * V, row, tmask, offs_v, V, mask_v)
        gg = _gates(g, base, row, tmask, offs_k, mask_k, K, GATE, BT, BK)
        if DELTA:
            bt = tl.load(beta + base + row, mask=tmask, other=0.0).to(tl.float32)
        else:
            bt = tl.zeros([BT], tl.float32)
        S = _advance(S, kk, vv, gg, bt, offs_t, GATE, DELTA, BT, DT, IEEE, UPCAST)
    tl.store(own + last * K * V + kv, S, mask=m_kv)
    tl.debug_barrier()


@triton.jit
def core_forward(x, k, v, g, beta, s0, r, h, s_final, cu_seqlens, chunk_offsets, T, H, K, V,
                 GATE: tl.constexpr, DELTA: tl.constexpr, HAS_S0: tl.constexpr,
                 VARLEN: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                 IEEE: tl.constexpr, UPCAST: tl.constexpr):
    DT: tl.constexpr = v.dtype.element_ty  # the dots' operand dtype: the data's
    n = tl.program_id(0)
    hh = tl.program_id(1)
    pv = tl.program_id(2)
    seq_len, first_chunk, base = _sequence(cu_seqlens, chunk_offsets, n, hh, T, H, VARLEN)
    offs_t = tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    offs_v = pv * BV + tl.arange(0, BV)
    mask_k = offs_k < K
    mask_v = offs_v < V
    m_kv = mask_k[:, None] & mask_v[None, :]
    kv = offs_k[:, None] * V + offs_v[None, :]
    lower = offs_t[:, None] >= offs_t[None, :]
    S = tl.zeros([BK, BV], tl.float32)
    if HAS_S0:
        S = tl.load(s0 + (n * H + hh).to(tl.int64) * K * V + kv, mask=m_kv, other=0.0)
    SEG: tl.constexpr = (_STATE_STEPS + BT - 1) // BT * BT  # = segment(BT)
    for c0 in range(0, seq_len, BT):
        if c0 // SEG * SEG == c0:  # (no `%`: an int % constexpr fails in the interpreter)
            tl.store(h + ((first_chunk + c0 // SEG) * H + hh) * K * V + kv, S, mask=m_kv)
        row = c0 + offs_t
        tmask = row < seq_len
        xx = _rows(x, base * K, row, tmask, offs_k, K, mask_k)
        kk = _rows(k, base * K, row, tmask, offs_k, K, mask_k)
        vv = _rows(v, base * V, row, tmask, offs_v, V, mask_v)
        gg = _gates(g, base, row, tmask, offs_k, mask_k, K, GATE, BT, BK)
        if DELTA:
            bt = tl.load(beta + base + row, mask=tmask, other=0.0).to(tl.float32)
            tinv, L, decay, Gt = _wy(kk, gg, bt, offs_t, DT, IEEE, UPCAST, BT)
            # delta = u - w S with u = tinv vb, w = tinv kb, as tinv (vb - kb S): no [BT, BK] w
            kb = kk * (bt * tl.exp(Gt))[:, None]
            delta = _mm(tinv, vv * bt[:, None] - _mm(kb, S, DT, IEEE, UPCAST), DT, IEEE, UPCAST)
            scores = _mm(xx, tl.trans(kk), DT, IEEE, UPCAST) * decay
            rr = _mm(xx, S, DT, IEEE, UPCAST) * tl.exp(Gt)[:, None] \
                + _mm(scores, delta, DT, IEEE, UPCAST)
            gl = tl.sum(gg, axis=0)  # padded rows have zero log decay
            k_end = kk * tl.exp(gl - Gt)[:, None]
            S = S * tl.exp(gl) + _mm(tl.trans(k_end), delta, DT, IEEE, UPCAST)
        elif GATE == 2:
            G = tl.cumsum(gg, axis=0)
            g_last = tl.sum(gg, axis=0)
            xg = xx * tl.exp(G)
            scores = tl.where(lower, _mm(xg, tl.trans(kk * tl.exp(-G)), DT, IEEE, UPCAST), 0.0)
            rr = _mm(xg, S, DT, IEEE, UPCAST) + _mm(scores, vv, DT, IEEE, UPCAST)
            S = S * tl.exp(g_last)[:, None] + _mm(tl.trans(kk * tl.exp(g_last[None, :] - G)),
                                                   vv, DT, IEEE, UPCAST)
        else:
            Gt = tl.cumsum(gg, axis=0)
            gl = tl.sum(gg, axis=0)
            decay = tl.where(lower, tl.exp(tl.where(lower, Gt[:, None] - Gt[None, :], 0.0)), 0.0)
            scores = _mm(xx, tl.trans(kk), DT, IEEE, UPCAST) * decay
            rr = _mm(xx, S, DT, IEEE, UPCAST) * tl.exp(Gt)[:, None] \
                + _mm(scores, vv, DT, IEEE, UPCAST)
            S = S * tl.exp(gl) + _mm(tl.trans(kk * tl.exp(gl - Gt)[:, None]), vv, DT, IEEE,
                                     UPCAST)
        tl.store(r + base * V + row[:, None] * V + offs_v[None, :], rr,
                 mask=tmask[:, None] & mask_v[None, :])
    tl.store(s_final + (n * H + hh).to(tl.int64) * K * V + kv, S, mask=m_kv)


@triton.jit
def core_backward(x, k, v, g, beta, h, scratch, dr, ds_final, dx, dk, dv, dg, dbeta, ds0,
                  cu_seqlens, chunk_offsets, T, H, K, V, NV_STRIDE, GATE: tl.constexpr,
                  DELTA: tl.constexpr,
                  VARLEN: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  IEEE: tl.constexpr, UPCAST: tl.constexpr):
    DT: tl.constexpr = v.dtype.element_ty  # the dots' operand dtype: the data's
    n = tl.program_id(0)
    hh = tl.program_id(1)
    pv = tl.program_id(2)
    seq_len, first_chunk, base = _sequence(cu_seqlens, chunk_offsets, n, hh, T, H, VARLEN)
    part = pv.to(tl.int64) * NV_STRIDE  # this value tile's slice of the partial-sum buffers
    offs_t = tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    offs_v = pv * BV + tl.arange(0, BV)
    mask_k = offs_k < K
    mask_v = offs_v < V
    m_kv = mask_k[:, None] & mask_v[None, :]
    kv = offs_k[:, None] * V + offs_v[None, :]
    lower = offs_t[:, None] >= offs_t[None, :]
    dS = tl.load(ds_final + (n * H + hh).to(tl.int64) * K * V + kv, mask=m_kv, other=0.0)
    NSUB: tl.constexpr = (_STATE_STEPS + BT - 1) // BT  # chunks per stored state
    own = scratch + (n * H + hh).to(tl.int64) * NSUB * K * V  # this head's replayed states
    n_chunks = tl.cdiv(seq_len, BT)
    for it in range(0, n_chunks):
        ci = n_chunks - 1 - it
        c0 = ci * BT
        if NSUB == 1:
            S = tl.load(h + ((first_chunk + ci) * H + hh) * K * V + kv, mask=m_kv, other=0.0)
        else:
            j = ci - ci // NSUB * NSUB
            if (j == NSUB - 1) | (it == 0):
                _replay(k, v, g, beta, h, own, first_chunk + ci // NSUB, c0 - j * BT, j,
                        seq_len, base, hh, H, K, V, kv, m_kv, offs_t, offs_k, mask_k, offs_v,
                        mask_v, GATE, DELTA, BT, BK, DT, IEEE, UPCAST)
            S = tl.load(own + j * K * V + kv, mask=m_kv, other=0.0)
        row = c0 + offs_t
        tmask = row < seq_len
        xx = _rows(x, base * K, row, tmask, offs_k, K, mask_k)
        kk = _rows(k, base * K, row, tmask, offs_k, K, mask_k)
        vv = _rows(v, base * V, row, tmask, offs_v, V, mask_v)
        dd = _rows(dr, base * V, row, tmask, offs_v, V, mask_v)
        gg = _gates(g, base, row, tmask, offs_k, mask_k, K, GATE, BT, BK)
        if DELTA:
            bt = tl.load(beta + base + row, mask=tmask, other=0.0).to(tl.float32)
            tinv, L, decay, Gt = _wy(kk, gg, bt, offs_t, DT, IEEE, UPCAST, BT)
            eG = tl.exp(Gt)
            gl = tl.sum(gg, axis=0)
            kb = kk * (bt * eG)[:, None]
            # delta = u - w S, u = tinv vb, w = tinv kb, tinv = (I + diag(b) L)^-1, computed as
            # tinv p with p = vb - kb S. Then d vb = tinv^T d delta, d kb = -d vb S^T,
            # d tinv = d delta p^T and dS gets -w^T d delta = -kb^T d vb: w never formed.
            p = vv * bt[:, None] - _mm(kb, S, DT, IEEE, UPCAST)
            delta = _mm(tinv, p, DT, IEEE, UPCAST)
            scores = _mm(xx, tl.trans(kk), DT, IEEE, UPCAST) * decay
            k_end = kk * tl.exp(gl - Gt)[:, None]
            # r = eG x S + scores delta;  S' = e^gl S + k_end^T delta
            d_delta = _mm(tl.trans(scores), dd, DT, IEEE, UPCAST) \
                + _mm(k_end, dS, DT, IEEE, UPCAST)
            d_scores = tl.where(lower, _mm(dd, tl.trans(delta), DT, IEEE, UPCAST), 0.0)
            d_qk = d_scores * decay
            # [BT, BK] products are stored as soon as they are complete (fewer live tiles)
            dS_x = _mm(dd, tl.trans(S), DT, IEEE, UPCAST)              # [BT, BK]
            dG = tl.sum(xx * dS_x, axis=1) * eG
            _store_rows(dx, part * K + base * K, row, tmask, offs_k, K, mask_k,
                        dS_x * eG[:, None] + _mm(d_qk, kk, DT, IEEE, UPCAST))
            d_last = tl.exp(gl) * tl.sum(S * dS)
            d_vb = _mm(tl.trans(tinv), d_delta, DT, IEEE, UPCAST)
            _store_rows(dv, base * V, row, tmask, offs_v, V, mask_v, d_vb * bt[:, None])
            d_kb = -_mm(d_vb, tl.trans(S), DT, IEEE, UPCAST)          # [BT, BK]
            d_m = -_mm(_mm(tl.trans(tinv), _mm(d_delta, tl.trans(p), DT, IEEE, UPCAST), DT,
                           IEEE, UPCAST), tl.trans(tinv), DT, IEEE, UPCAST)
            strict = offs_t[:, None] > offs_t[None, :]
            d_m = tl.where(strict, d_m, 0.0)
            d_b = tl.sum(d_m * L, axis=1) + tl.sum(vv * d_vb, axis=1) \
                + tl.sum(kk * d_kb, axis=1) * eG
            tl.store(dbeta + part + base + row, d_b, mask=tmask)
            d_l = d_m * bt[:, None]
            d_kk = d_l * decay
            dG += tl.sum(d_l * L, axis=1) - tl.sum(d_l * L, axis=0) + tl.sum(kb * d_kb, axis=1)
            d_k = d_kb * (bt * eG)[:, None] + _mm(tl.trans(d_qk), xx, DT, IEEE, UPCAST) \
                + _mm(d_kk + tl.trans(d_kk), kk, DT, IEEE, UPCAST)
            d_kend = _mm(delta, tl.trans(dS), DT, IEEE, UPCAST)        # [BT, BK]
            d_k += d_kend * tl.exp(gl - Gt)[:, None]
            _store_rows(dk, part * K + base * K, row, tmask, offs_k, K, mask_k, d_k)
            dG += tl.sum(d_scores * scores, axis=1) - tl.sum(d_scores * scores, axis=0) \
                - tl.sum(k_end * d_kend, axis=1)
            d_last += tl.sum(k_end * d_kend)
            dG = tl.where(offs_t == BT - 1, dG + d_last, dG)
            if GATE != 0:  # a delta rule without decay has no d log decay buffer
                tl.store(dg + part + base + row, tl.sum(dG, axis=0) - tl.cumsum(dG, axis=0) + dG,
                         mask=tmask)
            dS_prev = dS * tl.exp(gl) + _mm(tl.trans(xx * eG[:, None]), dd, DT, IEEE, UPCAST) \
                - _mm(tl.trans(kb), d_vb, DT, IEEE, UPCAST)
        elif GATE == 2:
            # each [BT, BK] product stored as soon as it is complete (as below)
            G = tl.cumsum(gg, axis=0)
            g_last = tl.sum(gg, axis=0)
            xg = xx * tl.exp(G)
            k_in = kk * tl.exp(-G)
            d_scores = tl.where(lower, _mm(dd, tl.trans(vv), DT, IEEE, UPCAST), 0.0)
            d_xg = _mm(dd, tl.trans(S), DT, IEEE, UPCAST) + _mm(d_scores, k_in, DT, IEEE, UPCAST)
            _store_rows(dx, part * K + base * K, row, tmask, offs_k, K, mask_k, d_xg * tl.exp(G))
            dG2 = xg * d_xg
            d_last = tl.exp(g_last) * tl.sum(S * dS, axis=1)
            scores = tl.where(lower, _mm(xg, tl.trans(k_in), DT, IEEE, UPCAST), 0.0)
            d_kin = _mm(tl.trans(d_scores), xg, DT, IEEE, UPCAST)
            dG2 -= k_in * d_kin
            e_end = tl.exp(g_last[None, :] - G)
            d_kend = _mm(vv, tl.trans(dS), DT, IEEE, UPCAST)
            _store_rows(dk, part * K + base * K, row, tmask, offs_k, K, mask_k,
                        d_kin * tl.exp(-G) + d_kend * e_end)
            k_end = kk * e_end
            _store_rows(dv, base * V, row, tmask, offs_v, V, mask_v,
                        _mm(tl.trans(scores), dd, DT, IEEE, UPCAST)
                        + _mm(k_end, dS, DT, IEEE, UPCAST))
            dG2 -= k_end * d_kend
            d_last += tl.sum(k_end * d_kend, axis=0)
            dG2 = tl.where(offs_t[:, None] == BT - 1, dG2 + d_last[None, :], dG2)
            _store_rows(dg, part * K + base * K, row, tmask, offs_k, K, mask_k,
                        tl.sum(dG2, axis=0)[None, :] - tl.cumsum(dG2, axis=0) + dG2)
            dS_prev = dS * tl.exp(g_last)[:, None] + _mm(tl.trans(xg), dd, DT, IEEE, UPCAST)
        else:
            # ordered so each [BT, BK] product is stored as soon as it is complete: at most
            # two of them live beside S and dS (fewer registers than computing all, then
            # storing)
            Gt = tl.cumsum(gg, axis=0)
            gl = tl.sum(gg, axis=0)
            eG = tl.exp(Gt)
            e_end = tl.exp(gl - Gt)
            decay = tl.where(lower, tl.exp(tl.where(lower, Gt[:, None] - Gt[None, :], 0.0)),
                             0.0)
            d_scores = tl.where(lower, _mm(dd, tl.trans(vv), DT, IEEE, UPCAST), 0.0)
            d_qk = d_scores * decay
            dS_x = _mm(dd, tl.trans(S), DT, IEEE, UPCAST)
            if GATE == 1:
                dG = tl.sum(xx * dS_x, axis=1) * eG
                s_ds = tl.sum(S * dS)
            _store_rows(dx, part * K + base * K, row, tmask, offs_k, K, mask_k,
                        dS_x * eG[:, None] + _mm(d_qk, kk, DT, IEEE, UPCAST))
            scores = _mm(xx, tl.trans(kk), DT, IEEE, UPCAST) * decay
            _store_rows(dv, base * V, row, tmask, offs_v, V, mask_v,
                        _mm(tl.trans(scores), dd, DT, IEEE, UPCAST)
                        + _mm(kk * e_end[:, None], dS, DT, IEEE, UPCAST))
            d_kend = _mm(vv, tl.trans(dS), DT, IEEE, UPCAST)
            if GATE == 1:
                kd = tl.sum(kk * d_kend, axis=1) * e_end
                dG += tl.sum(d_scores * scores, axis=1) - tl.sum(d_scores * scores, axis=0) - kd
                dG = tl.where(offs_t == BT - 1, dG + tl.sum(kd, axis=0) + tl.exp(gl) * s_ds, dG)
                d_g = tl.sum(dG, axis=0) - tl.cumsum(dG, axis=0) + dG
                tl.store(dg + part + base + row, d_g, mask=tmask)
            _store_rows(dk, part * K + base * K, row, tmask, offs_k, K, mask_k,
                        _mm(tl.trans(d_qk), xx, DT, IEEE, UPCAST) + d_kend * e_end[:, None])
            dS_prev = dS * tl.exp(gl) + _mm(tl.trans(xx * eG[:, None]), dd, DT, IEEE, UPCAST)
        dS = dS_prev
    tl.store(ds0 + (n * H + hh).to(tl.int64) * K * V + kv, dS, mask=m_kv)

