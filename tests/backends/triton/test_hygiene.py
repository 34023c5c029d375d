"""Names a spec chooses never collide with the generated code's own: specs whose params and
inputs (and states) are named like every identifier of attnc's generated kernels -- locals,
helpers, `tl`, Python keywords -- compile and compute the right forward and gradients, in every
kernel (softmax forward, dq and dk/dv with GQA's head loop; linear recurrent, chunked, generated
recurrent backward and the chunked core backward), against references written from the math."""

from __future__ import annotations

import keyword

import pytest
import torch

import attnc
from attnc.backends.triton.names import identifiers
from attnc.errors import SpecError
from attnc.frontends.lower import RESERVED
from attnc.pipeline import frontend, read_spec
from attnc.testing import rel_error

GROUP = 8  # names per spec

# derived names: attnc spells a linear tensor `x_<name>`, a state `st_<name>`, ...
LINEAR_PREFIXES = ("x_", "sx_", "dx_", "acc_", "st_", "init_", "final_", "new_", "old_", "lam_",
                   "ck_", "sc_", "dinit_", "dfinal_")


def _declarable(name: str, block: str) -> bool:
    """Whether a spec can declare a tensor called `name` (not a keyword of the language, not
    one of its reserved names)."""
    text = (f"attention t {{\n  param {name}[h]\n  score = dot(q, k) + {name}[h]\n}}\n"
            if block == "attention" else
            f"linear t {{\n  input {name}[b, h, t]\n  state st[i, j]\n"
            "  st[i, j] = st[i, j] + k[i] * v[j]\n  o[j] = sum(i) q[i] * st[i, j]\n}\n")
    try:
        frontend(read_spec(text))
    except SpecError:
        return False
    return True


def _groups(names: list[str], size: int = GROUP) -> list[list[str]]:
    return [names[i:i + size] for i in range(0, len(names), size)]


@pytest.fixture(scope="module")
def softmax_names() -> list[str]:
    """Every identifier of the generated forward and backward kernels of specs that load at
    each level (per head, row, key, element), read an input, and walk block lists."""
    found: set[str] = set()
    for spec, options in (("alibi", {}), ("rel_bias", {}), ("document", {}),
                          ("document", {"block_sparse": True}), ("streaming", {})):
        found |= identifiers(attnc.load(spec, **options).source)
    names = {n for n in found | set(keyword.kwlist) | {"g", "tl", "triton"}
             if n not in RESERVED}
    return sorted(n for n in names if _declarable(n, "attention"))


# per head and per row a param shifts whole rows, which softmax ignores: times (n - m) it counts
SOFTMAX_READS = ("[h] * (n - m)", "[m] * (n - m)", "[n]", "[h, clamp(n - m, -4, 4) + 4]")
SOFTMAX_DIMS = ("[h]", "[m]", "[n]", "[h, 9]")


def _softmax_spec(names: list[str]) -> str:
    decls = ", ".join(f"{n}{SOFTMAX_DIMS[i % 4]}" for i, n in enumerate(names))
    terms = " + ".join(f"0.1 * {n}{SOFTMAX_READS[i % 4]}" for i, n in enumerate(names))
    return (f"attention hyg {{\n  param {decls}\n  score = dot(q, k) * scale + {terms}\n"
            "  mask = n <= m\n}\n")


def _softmax_reference(q, k, v, params: dict, names: list[str]):
    """causal softmax(q.k * scale + the params' terms) @ v, GQA by repeating k/v heads."""
    B, H, M, D = q.shape
    N, group = k.shape[2], H // k.shape[1]
    s = (q @ k.repeat_interleave(group, 1).transpose(-1, -2)) / D ** 0.5
    dist = torch.arange(N)[None, :] - torch.arange(M)[:, None]
    rel = dist.clamp(-4, 4) + 4
    terms = (lambda p: p[None, :, None, None] * dist, lambda p: p[None, None, :, None] * dist,
             lambda p: p[None, None, None, :], lambda p: p[:, rel][None])
    for i, n in enumerate(names):
        s = s + 0.1 * terms[i % 4](params[n])
    s = s.masked_fill(torch.ones(M, N, dtype=torch.bool).tril().logical_not(), float("-inf"))
    return torch.softmax(s, -1) @ v.repeat_interleave(group, 1)


def test_softmax_names_cover_the_generated_locals(softmax_names):
    """The list is long and holds what once collided (`g`, the dk/dv kernel's GQA loop
    variable) and Python's keywords."""
    assert {"g", "tl", "offs_m", "acc", "lambda", "def", "count", "D", "DV", "GROUP",
            "Out", "Lse"} <= set(softmax_names)
    assert len(softmax_names) > 100


def test_every_softmax_local_as_a_param_name(softmax_names):
    gen = torch.Generator().manual_seed(0)
    B, H, Hkv, M, N, D = 1, 4, 2, 12, 12, 16
    for names in _groups(softmax_names):
        kernel = attnc.compile(_softmax_spec(names))
        q = torch.randn(B, H, M, D, generator=gen, requires_grad=True)
        k, v = (torch.randn(B, Hkv, N, D, generator=gen, requires_grad=True) for _ in range(2))
        shapes = {"[h]": (H,), "[m]": (M,), "[n]": (N,), "[h, 9]": (H, 9)}
        params = {n: torch.randn(shapes[SOFTMAX_DIMS[i % 4]], generator=gen,
                                 requires_grad=True) for i, n in enumerate(names)}
        out = kernel(q, k, v, **params)
        want = _softmax_reference(q, k, v, params, names)
        assert rel_error(out, want) < 1e-5, names
        leaves = [q, k, v, *params.values()]
        d_out = torch.randn(out.shape, generator=gen)
        got = torch.autograd.grad((out * d_out).sum(), leaves)
        ref = torch.autograd.grad((want * d_out).sum(), leaves)
        for name, a, b in zip(["q", "k", "v", *names], got, ref):
            assert rel_error(a, b) < 1e-4, (name, names)


@pytest.fixture(scope="module")
def linear_names() -> list[str]:
    """Every identifier of the generated linear kernels, and each with a derived-name prefix
    taken off (a tensor called `g_t` next to one called `g` would meet in `x_g_t`)."""
    found: set[str] = set()
    for spec in ("gla", "gated_delta_net", "flowformer", "lightning"):
        found |= identifiers(attnc.load(spec).source)
    stripped = {x[len(p):] for x in found for p in LINEAR_PREFIXES if x.startswith(p)}
    names = {n for n in found | stripped | set(keyword.kwlist) if n.isidentifier()}
    return sorted(n for n in names if _declarable(n, "linear"))


def _linear_spec(names: list[str], chunked: bool) -> str:
    """A scan reading every name as a per-step scalar input: a scalar decay (chunked), or an
    update coupled to a second state (sequential, with the generated recurrent backward)."""
    gate = " + ".join(names)
    if chunked:
        states = "st[i, j]"
        updates = f"  st[i, j] = exp(-0.5 * sigmoid({gate})) * st[i, j] + k[i] * v[j]\n"
    else:
        states = "st[i, j], zst[i]"
        updates = ("  zst[i] = zst[i] + 0.1 * k[i]\n"
                   f"  st[i, j] = st[i, j] + 0.1 * ({gate}) * zst[i] * v[j] + k[i] * v[j]\n")
    return (f"linear hyg {{\n  input {', '.join(f'{n}[b, h, t]' for n in names)}\n"
            f"  state {states}\n{updates}  o[j] = sum(i) q[i] * st[i, j]\n}}\n")


def _linear_reference(q, k, v, inputs: list[torch.Tensor], chunked: bool):
    """The recurrence, one step at a time."""
    B, H, T, DK = q.shape
    S = q.new_zeros(B, H, DK, v.shape[-1])
    z = q.new_zeros(B, H, DK)
    total = sum(inputs)
    outs = []
    for t in range(T):
        kv = k[:, :, t, :, None] * v[:, :, t, None, :]
        g = total[:, :, t, None, None]
        if chunked:
            S = torch.exp(-0.5 * torch.sigmoid(g)) * S + kv
        else:
            z = z + 0.1 * k[:, :, t]
            S = S + 0.1 * g * z[..., None] * v[:, :, t, None, :] + kv
        outs.append((q[:, :, t, :, None] * S).sum(-2))
    return torch.stack(outs, 2)


def _check_linear(names: list[str], chunked: bool, seed: int) -> None:
    kernel = attnc.compile(_linear_spec(names, chunked))
    assert kernel.algorithm == ("chunked" if chunked else "recurrent")
    gen = torch.Generator().manual_seed(seed)
    B, H, T, D = 1, 2, 9, 16
    q, k, v = (0.5 * torch.randn(B, H, T, D, generator=gen) for _ in range(3))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    inputs = {n: (0.3 * torch.randn(B, H, T, generator=gen)).requires_grad_() for n in names}
    out = kernel(q, k, v, scale=1.0, **inputs)
    want = _linear_reference(q, k, v, list(inputs.values()), chunked)
    assert rel_error(out, want) < 1e-5, names
    leaves = [q, k, v, *inputs.values()]
    got = torch.autograd.grad(out.square().sum(), leaves)
    ref = torch.autograd.grad(want.square().sum(), leaves)
    for name, a, b in zip(["q", "k", "v", *names], got, ref):
        assert rel_error(a, b) < 1e-4, (name, names)


def test_every_linear_local_as_an_input_name(linear_names):
    """In a chunked scan: the chunked kernel forward, the core kernels' backward."""
    assert {"g", "g_t", "beta", "S", "tl"} <= set(linear_names) and len(linear_names) > 60
    for seed, names in enumerate(_groups(linear_names)):
        _check_linear(names, True, seed)


def test_derived_linear_names_in_a_sequential_scan(linear_names):
    """In a sequential scan (the recurrent kernel and its generated backward): the names that
    meet a derived one once attnc's prefixes are added (g next to g_t, beta next to beta_c)
    and the backward kernel's own locals."""
    locals_ = {"tl", "hh", "pv", "row", "bos", "seq_len", "prog", "NSEG", "SEG", "lam_o", "back",
               "start", "stop", "sg", "tt", "t_f"}
    names = [n for n in linear_names if n in locals_ or any(
        f"{p}{n}" in linear_names or n.startswith(p) for p in ("g", "beta", "x_", "st_"))]
    assert {"g", "g_t", "beta", "beta_t", "tl", "prog"} <= set(names)
    _check_linear(names, False, 0)


@pytest.mark.slow
def test_every_linear_local_in_a_sequential_scan(linear_names):
    for seed, names in enumerate(_groups(linear_names, 4 * GROUP)):
        _check_linear(names, False, seed)


STATES = ("S", "x_g", "lam_o", "old_S", "tl", "m_i", "st_S", "new_S", "dx_g", "g_t_t")


def test_states_named_like_linear_locals():
    """States (vector ones besides a matrix one) and inputs named like the generated code's
    locals and like each other's derived names, in a sequential scan (recurrent kernel and
    generated backward) against its recurrence."""
    matrix, vectors = STATES[0], STATES[1:]
    spec = (f"linear states {{\n  input g[b, h, t], g_t[b, h, t]\n"
            f"  state {matrix}[i, j], {', '.join(f'{z}[i]' for z in vectors)}\n"
            f"  {matrix}[i, j] = tanh({matrix}[i, j] + g * k[i] * v[j])\n"
            + "".join(f"  {z}[i] = {z}[i] + {0.1 * (n + 1)} * g_t * k[i]\n"
                      for n, z in enumerate(vectors))
            + f"  o[j] = sum(i) q[i] * {matrix}[i, j] + ("
            + " + ".join(f"sum(i) q[i] * {z}[i]" for z in vectors) + ") * v[j]\n}\n")
    kernel = attnc.compile(spec)
    assert kernel.algorithm == "recurrent" and kernel.generated.has("recurrent_bwd")
    gen = torch.Generator().manual_seed(2)
    B, H, T, D = 1, 2, 7, 16
    q, k, v = (0.5 * torch.randn(B, H, T, D, generator=gen).requires_grad_() for _ in range(3))
    g, g_t = (0.3 * torch.randn(B, H, T, generator=gen).requires_grad_() for _ in range(2))
    out = kernel(q, k, v, g=g, g_t=g_t)
    S = q.new_zeros(B, H, D, D)
    z = [q.new_zeros(B, H, D) for _ in vectors]
    outs = []
    for t in range(T):
        S = torch.tanh(S + g[:, :, t, None, None] * k[:, :, t, :, None] * v[:, :, t, None, :])
        z = [zi + 0.1 * (n + 1) * g_t[:, :, t, None] * k[:, :, t] for n, zi in enumerate(z)]
        read = sum((q[:, :, t] * zi).sum(-1) for zi in z)
        outs.append((q[:, :, t, :, None] * S).sum(-2) + read[..., None] * v[:, :, t])
    want = torch.stack(outs, 2)
    assert rel_error(out, want) < 1e-5
    leaves = [q, k, v, g, g_t]
    for a, b in zip(torch.autograd.grad(out.square().sum(), leaves),
                    torch.autograd.grad(want.square().sum(), leaves)):
        assert rel_error(a, b) < 1e-4


def test_a_spec_named_like_a_helper_keeps_its_kernels_apart():
    """The spec's own name is a user name too: one called like a prelude helper or a
    generated local still compiles to distinct entry points."""
    for name in ("_dot", "tl", "attnc_x_fwd", "lambda"):
        kernel = attnc.compile(f"attention {name} {{\n  mask = n <= m\n}}\n")
        q = torch.randn(1, 2, 8, 16)
        want = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        assert rel_error(kernel(q, q, q), want) < 1e-5
