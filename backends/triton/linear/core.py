"""Fused chunked kernels for the backward of chunked `linear` scans.

The backward splits a scan in three: a prologue (per-step key, value, query, log-decay and beta
tensors, elementwise in q, k, v and the inputs), the core recurrence of one state

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T    (delta rules)
    S_t = diag(a_t) S_{t-1} + k_t v_t^T                             (additive / decays)
    r_t = x_t^T S_t

and an epilogue (the output from the readouts r). Prologue and epilogue are elementwise and are
differentiated by torch autograd; the core runs here, as two kernels independent of the spec:

* `core_forward` recomputes the readouts and stores the state entering every chunk (what the
  backward needs: O(T / BT) states, not O(T));
* `core_backward` walks the chunks in reverse with the state's adjoint dS in registers and
  returns dx, dk, dv, d(log decay), dbeta and dS0.

One program per (sequence, head, value tile). dv and dS0 are exact per value tile; dx, dk,
dlog-decay and dbeta sum over all value features, so each tile writes its own slice of a
[NV, ...] buffer and the caller adds them up (deterministic, no atomics). GATE is an
attnc.ir.linear.Gate: 0 none, 1 scalar per step, 2 vector per step (over key features).
Tensors are contiguous: x, k, g [B, H, T, K|1], v, r, dr [B, H, T, V], states [.., K, V] in
fp32.
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
    return tl.load(ptr + base + row[:, None] * width + offs[None, :],
                   mask=tm[:, None] & fmask[None, :], other=0.0).to(tl.float32)


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
def _wy(kk, gs, bt, offs_t, IEEE: tl.constexpr, UPCAST: tl.constexpr, BT: tl.constexpr):
    """The delta rule's unit lower-triangular inverse tinv = (I + diag(b) L)^-1 with
    L = strict(exp(G_t - G_s) k_t.k_s), by forward substitution; also returns L and the decay."""
    lower = offs_t[:, None] >= offs_t[None, :]
    strict = offs_t[:, None] > offs_t[None, :]
    Gt = tl.cumsum(gs, axis=0)
    decay = tl.where(lower, tl.exp(tl.where(lower, Gt[:, None] - Gt[None, :], 0.0)), 0.0)
    L = tl.where(strict, decay * _dot(kk, tl.trans(kk), IEEE, UPCAST), 0.0)
    a_low = L * bt[:, None]
    tinv = tl.where(offs_t[:, None] == offs_t[None, :], 1.0, 0.0)
    for r in range(1, BT):
        a_row = tl.sum(tl.where(offs_t[:, None] == r, a_low, 0.0), axis=0)
        t_row = tl.where(offs_t == r, 1.0, 0.0) - tl.sum(a_row[:, None] * tinv, axis=0)
        tinv = tl.where(offs_t[:, None] == r, t_row[None, :], tinv)
    return tinv, L, decay, Gt


@triton.jit
def core_forward(x, k, v, g, beta, s0, r, h, s_final, cu_seqlens, chunk_offsets, T, H, K, V,
                 GATE: tl.constexpr, DELTA: tl.constexpr, HAS_S0: tl.constexpr,
                 VARLEN: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                 IEEE: tl.constexpr, UPCAST: tl.constexpr):
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
    for c0 in range(0, seq_len, BT):
        tl.store(h + ((first_chunk + c0 // BT) * H + hh) * K * V + kv, S, mask=m_kv)
        row = c0 + offs_t
        tmask = row < seq_len
        xx = _rows(x, base * K, row, tmask, offs_k, K, mask_k)
        kk = _rows(k, base * K, row, tmask, offs_k, K, mask_k)
        vv = _rows(v, base * V, row, tmask, offs_v, V, mask_v)
        gg = _gates(g, base, row, tmask, offs_k, mask_k, K, GATE, BT, BK)
        if DELTA:
            bt = tl.load(beta + base + row, mask=tmask, other=0.0).to(tl.float32)
            tinv, L, decay, Gt = _wy(kk, gg, bt, offs_t, IEEE, UPCAST, BT)
            u = _dot(tinv, vv * bt[:, None], IEEE, UPCAST)
            w = _dot(tinv, kk * (bt * tl.exp(Gt))[:, None], IEEE, UPCAST)
            delta = u - _dot(w, S, IEEE, UPCAST)
            scores = _dot(xx, tl.trans(kk), IEEE, UPCAST) * decay
            rr = _dot(xx, S, IEEE, UPCAST) * tl.exp(Gt)[:, None] + _dot(scores, delta, IEEE,
                                                                        UPCAST)
            gl = tl.sum(gg, axis=0)  # padded rows have zero log decay
            k_end = kk * tl.exp(gl - Gt)[:, None]
            S = S * tl.exp(gl) + _dot(tl.trans(k_end), delta, IEEE, UPCAST)
        elif GATE == 2:
            G = tl.cumsum(gg, axis=0)
            g_last = tl.sum(gg, axis=0)
            xg = xx * tl.exp(G)
            scores = tl.where(lower, _dot(xg, tl.trans(kk * tl.exp(-G)), IEEE, UPCAST), 0.0)
            rr = _dot(xg, S, IEEE, UPCAST) + _dot(scores, vv, IEEE, UPCAST)
            S = S * tl.exp(g_last)[:, None] + _dot(tl.trans(kk * tl.exp(g_last[None, :] - G)),
                                                   vv, IEEE, UPCAST)
        else:
            Gt = tl.cumsum(gg, axis=0)
            gl = tl.sum(gg, axis=0)
            decay = tl.where(lower, tl.exp(tl.where(lower, Gt[:, None] - Gt[None, :], 0.0)), 0.0)
            scores = _dot(xx, tl.trans(kk), IEEE, UPCAST) * decay
            rr = _dot(xx, S, IEEE, UPCAST) * tl.exp(Gt)[:, None] + _dot(scores, vv, IEEE, UPCAST)
            S = S * tl.exp(gl) + _dot(tl.trans(kk * tl.exp(gl - Gt)[:, None]), vv, IEEE, UPCAST)
        tl.store(r + base * V + row[:, None] * V + offs_v[None, :], rr,
                 mask=tmask[:, None] & mask_v[None, :])
    tl.store(s_final + (n * H + hh).to(tl.int64) * K * V + kv, S, mask=m_kv)


@triton.jit
def core_backward(x, k, v, g, beta, h, dr, ds_final, dx, dk, dv, dg, dbeta, ds0, cu_seqlens,
                  chunk_offsets, T, H, K, V, NV_STRIDE, GATE: tl.constexpr, DELTA: tl.constexpr,
                  VARLEN: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  IEEE: tl.constexpr, UPCAST: tl.constexpr):
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
    n_chunks = tl.cdiv(seq_len, BT)
    for it in range(0, n_chunks):
        ci = n_chunks - 1 - it
        c0 = ci * BT
        S = tl.load(h + ((first_chunk + ci) * H + hh) * K * V + kv, mask=m_kv, other=0.0)
        row = c0 + offs_t
        tmask = row < seq_len
        xx = _rows(x, base * K, row, tmask, offs_k, K, mask_k)
        kk = _rows(k, base * K, row, tmask, offs_k, K, mask_k)
        vv = _rows(v, base * V, row, tmask, offs_v, V, mask_v)
        dd = _rows(dr, base * V, row, tmask, offs_v, V, mask_v)
        gg = _gates(g, base, row, tmask, offs_k, mask_k, K, GATE, BT, BK)
        if DELTA:
            bt = tl.load(beta + base + row, mask=tmask, other=0.0).to(tl.float32)
            tinv, L, decay, Gt = _wy(kk, gg, bt, offs_t, IEEE, UPCAST, BT)
            eG = tl.exp(Gt)
            gl = tl.sum(gg, axis=0)
            kb = kk * (bt * eG)[:, None]
            vb = vv * bt[:, None]
            u = _dot(tinv, vb, IEEE, UPCAST)
            w = _dot(tinv, kb, IEEE, UPCAST)
            delta = u - _dot(w, S, IEEE, UPCAST)
            qk = _dot(xx, tl.trans(kk), IEEE, UPCAST)
            scores = qk * decay
            k_end = kk * tl.exp(gl - Gt)[:, None]
            # r = eG x S + scores delta;  S' = e^gl S + k_end^T delta;  delta = u - w S
            d_delta = _dot(tl.trans(scores), dd, IEEE, UPCAST) + _dot(k_end, dS, IEEE, UPCAST)
            d_scores = tl.where(lower, _dot(dd, tl.trans(delta), IEEE, UPCAST), 0.0)
            d_qk = d_scores * decay
            dS_x = _dot(dd, tl.trans(S), IEEE, UPCAST)              # [BT, BK]
            d_x = dS_x * eG[:, None] + _dot(d_qk, kk, IEEE, UPCAST)
            d_k = _dot(tl.trans(d_qk), xx, IEEE, UPCAST)
            d_kend = _dot(delta, tl.trans(dS), IEEE, UPCAST)        # [BT, BK]
            d_k += d_kend * tl.exp(gl - Gt)[:, None]
            dG = tl.sum(xx * dS_x, axis=1) * eG + tl.sum(d_scores * scores, axis=1) \
                - tl.sum(d_scores * scores, axis=0) - tl.sum(k_end * d_kend, axis=1)
            d_last = tl.sum(k_end * d_kend) + tl.exp(gl) * tl.sum(S * dS)
            # delta = u - w S, u = tinv vb, w = tinv kb, tinv = (I + diag(b) L)^-1
            d_w = -_dot(d_delta, tl.trans(S), IEEE, UPCAST)           # [BT, BK]
            d_tinv = _dot(d_delta, tl.trans(vb), IEEE, UPCAST) + _dot(d_w, tl.trans(kb), IEEE,
                                                                       UPCAST)
            d_vb = _dot(tl.trans(tinv), d_delta, IEEE, UPCAST)
            d_kb = _dot(tl.trans(tinv), d_w, IEEE, UPCAST)
            d_m = -_dot(_dot(tl.trans(tinv), d_tinv, IEEE, UPCAST), tl.trans(tinv), IEEE,
                        UPCAST)
            strict = offs_t[:, None] > offs_t[None, :]
            d_m = tl.where(strict, d_m, 0.0)
            d_b = tl.sum(d_m * L, axis=1) + tl.sum(vv * d_vb, axis=1) \
                + tl.sum(kk * d_kb, axis=1) * eG
            d_l = d_m * bt[:, None]
            d_kk = d_l * decay
            d_k += _dot(d_kk, kk, IEEE, UPCAST) + _dot(tl.trans(d_kk), kk, IEEE, UPCAST)
            d_k += d_kb * (bt * eG)[:, None]
            dG += tl.sum(d_l * L, axis=1) - tl.sum(d_l * L, axis=0) + tl.sum(kb * d_kb, axis=1)
            d_v = d_vb * bt[:, None]
            dG = tl.where(offs_t == BT - 1, dG + d_last, dG)
            d_g = tl.sum(dG, axis=0) - tl.cumsum(dG, axis=0) + dG
            dS_prev = dS * tl.exp(gl) + _dot(tl.trans(xx * eG[:, None]), dd, IEEE, UPCAST) \
                - _dot(tl.trans(w), d_delta, IEEE, UPCAST)
            tl.store(dbeta + part + base + row, d_b, mask=tmask)
            tl.store(dg + part + base + row, d_g, mask=tmask)
        elif GATE == 2:
            G = tl.cumsum(gg, axis=0)
            g_last = tl.sum(gg, axis=0)
            xg = xx * tl.exp(G)
            k_in = kk * tl.exp(-G)
            k_end = kk * tl.exp(g_last[None, :] - G)
            scores = tl.where(lower, _dot(xg, tl.trans(k_in), IEEE, UPCAST), 0.0)
            d_scores = tl.where(lower, _dot(dd, tl.trans(vv), IEEE, UPCAST), 0.0)
            d_xg = _dot(dd, tl.trans(S), IEEE, UPCAST) + _dot(d_scores, k_in, IEEE, UPCAST)
            d_kin = _dot(tl.trans(d_scores), xg, IEEE, UPCAST)
            d_kend = _dot(vv, tl.trans(dS), IEEE, UPCAST)
            d_v = _dot(tl.trans(scores), dd, IEEE, UPCAST) + _dot(k_end, dS, IEEE, UPCAST)
            d_x = d_xg * tl.exp(G)
            d_k = d_kin * tl.exp(-G) + d_kend * tl.exp(g_last[None, :] - G)
            dG2 = xg * d_xg - k_in * d_kin - k_end * d_kend
            d_last = tl.sum(k_end * d_kend, axis=0) + tl.exp(g_last) * tl.sum(S * dS, axis=1)
            dG2 = tl.where(offs_t[:, None] == BT - 1, dG2 + d_last[None, :], dG2)
            d_g2 = tl.sum(dG2, axis=0)[None, :] - tl.cumsum(dG2, axis=0) + dG2
            dS_prev = dS * tl.exp(g_last)[:, None] + _dot(tl.trans(xg), dd, IEEE, UPCAST)
            tl.store(dg + part * K + base * K + row[:, None] * K + offs_k[None, :], d_g2,
                     mask=tmask[:, None] & mask_k[None, :])
        else:
            Gt = tl.cumsum(gg, axis=0)
            gl = tl.sum(gg, axis=0)
            eG = tl.exp(Gt)
            decay = tl.where(lower, tl.exp(tl.where(lower, Gt[:, None] - Gt[None, :], 0.0)),
                             0.0)
            qk = _dot(xx, tl.trans(kk), IEEE, UPCAST)
            scores = qk * decay
            k_end = kk * tl.exp(gl - Gt)[:, None]
            d_scores = tl.where(lower, _dot(dd, tl.trans(vv), IEEE, UPCAST), 0.0)
            d_qk = d_scores * decay
            dS_x = _dot(dd, tl.trans(S), IEEE, UPCAST)
            d_x = dS_x * eG[:, None] + _dot(d_qk, kk, IEEE, UPCAST)
            d_kend = _dot(vv, tl.trans(dS), IEEE, UPCAST)
            d_k = _dot(tl.trans(d_qk), xx, IEEE, UPCAST) + d_kend * tl.exp(gl - Gt)[:, None]
            d_v = _dot(tl.trans(scores), dd, IEEE, UPCAST) + _dot(k_end, dS, IEEE, UPCAST)
            if GATE == 1:
                dG = tl.sum(xx * dS_x, axis=1) * eG + tl.sum(d_scores * scores, axis=1) \
                    - tl.sum(d_scores * scores, axis=0) - tl.sum(k_end * d_kend, axis=1)
                d_last = tl.sum(k_end * d_kend) + tl.exp(gl) * tl.sum(S * dS)
                dG = tl.where(offs_t == BT - 1, dG + d_last, dG)
                d_g = tl.sum(dG, axis=0) - tl.cumsum(dG, axis=0) + dG
                tl.store(dg + part + base + row, d_g, mask=tmask)
            dS_prev = dS * tl.exp(gl) + _dot(tl.trans(xx * eG[:, None]), dd, IEEE, UPCAST)
        tl.store(dx + part * K + base * K + row[:, None] * K + offs_k[None, :], d_x,
                 mask=tmask[:, None] & mask_k[None, :])
        tl.store(dk + part * K + base * K + row[:, None] * K + offs_k[None, :], d_k,
                 mask=tmask[:, None] & mask_k[None, :])
        tl.store(dv + base * V + row[:, None] * V + offs_v[None, :], d_v,
                 mask=tmask[:, None] & mask_v[None, :])
        dS = dS_prev
    tl.store(ds0 + (n * H + hh).to(tl.int64) * K * V + kv, dS, mask=m_kv)

