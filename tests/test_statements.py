"""Every statement of a spec reaches the kernel, or the compiler refuses it at its line.

For each statement of each spec below, a perturbed spec is built — the statement's right side
changed, an option's value changed, a declared tensor's values changed — and compiled. The
perturbed kernel's output must differ from the original's, or compiling must fail with a
located error (SpecError or CompileError with a line). A statement the compiler drops on the
floor (as a cascade's epilogue once was) keeps the output unchanged and fails here.
"""

from __future__ import annotations

import re

import pytest
import torch

import attnc
from attnc.errors import SpecError
from attnc.backends.reference.check_around import random_around_inputs
from attnc.library import variant_path, variants
from attnc.testing import random_inputs, random_linear_inputs
from tests.specs import FUSEMAX_3PASS

B, H, N, D = 1, 2, 24, 16
# Options small enough that each matters at N = 24 (defaults like window = 256 would not).
SMALL_OPTIONS = {"window": 6, "sinks": 2, "prefix": 5, "kernel_size": 7, "dilation": 2,
                 "chunk": 8, "max_distance": 4, "topk": 8,
                 "stride": 2}
# Options whose value changes no output by itself: `count` only sizes nsa_selected's block lists
# (at these lengths there is one key block, listed or not whatever the count)
SIZING_ONLY = {"count"}

CASCADE_3PASS = FUSEMAX_3PASS  # the README's cascade

CASCADE_BIAS = """\
cascade biased {
  param bias[h, n]
  QK[m, n] = Q[m, e] * K[n, e] * 0.25
  X[m, n]  = where(n <= m, QK[m, n] + bias[h, n], -1e30)
  GM[m]    = max(n) X[m, n]
  SN[m, n] = exp(X[m, n] - GM[m])
  SD[m]    = sum(n) SN[m, n]
  AV[m, f] = sum(n) SN[m, n] * V[n, f]
  O[m, f]  = AV[m, f] / SD[m]
}
"""

# The README's cascade followed by an output gate (an epilogue): fused into the same one pass by
# the general path, never dropped.
CASCADE_GATED = CASCADE_3PASS.replace(
    "cascade attention_3pass {\n", "cascade gated {\n  param G[b, h, m]\n").replace(
    "}\n", "  OUT[m, f] = AV[m, f] * sigmoid(G[b, h, m])\n}\n")

_RHS = re.compile(r"^(\s*(?:map\s+)?[A-Za-z_]\w*(?:\[[^\]]*\])?\s*=\s*)(.*)$")
_REDUCTION = re.compile(r"^((?:max|sum)\([a-z, ]+\)\s*)(.*)$")


def _specs() -> list[tuple[str, str]]:
    named = [(name, variant_path(name).read_text()) for name in variants()]
    return named + [("cascade_3pass", CASCADE_3PASS), ("cascade_bias", CASCADE_BIAS),
                    ("cascade_gated", CASCADE_GATED)]


def _perturbed_rhs(line: str) -> str | None:
    """The statement with its right side changed, or None for a line that is no statement."""
    found = _RHS.match(line)
    if found is None or line.strip().startswith(("option", "normalize")):
        return None
    lead, rhs = found.groups()
    if lead.strip().startswith("mask"):
        # hides the diagonal and the key before it (a strictly causal mask has no diagonal)
        return f"{lead}({rhs}) and n != m and n != m - 1"
    reduction = _REDUCTION.match(rhs)
    if reduction is not None:
        prefix, body = reduction.groups()
        if prefix.startswith("max"):
            # a max that only stabilizes cancels from the output whatever its value (a row
            # shift); lowered far enough, exp overflows: its effect is the output staying finite
            return f"{lead}{prefix}({body}) - 1000"
        return f"{lead}{prefix}({body}) * 1.25 + 0.5"
    return f"{lead}({rhs}) * 1.25 + 0.5"


def _options(text: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.strip().startswith("option"):
            for name, value in re.findall(r"(\w+)\s*=\s*([-\d.e]+)", line):
                found[name] = SMALL_OPTIONS.get(name, float(value) if "." in value or "e" in value
                                                else int(value))
    return found


def _bigger(value):
    return 2 * value + 1 if isinstance(value, int) else 2 * value + 0.5


def _run(kernel, seed: int, perturbed: str | None = None) -> torch.Tensor:
    """The kernel's output on fixed random q, k, v and its declared tensors (`perturbed`: the
    declared tensor whose values are changed)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    around = getattr(getattr(kernel, "kernel_ir", None), "around", None)
    if isinstance(kernel, attnc.LinearKernel):
        tensors = random_linear_inputs(kernel, B, H, N, D, D, torch.Generator().manual_seed(1))
    elif around is not None and not around.plain:
        tensors = random_around_inputs(kernel, B, H, H, N, N, D, torch.Generator().manual_seed(1))
        v = v if around.value == "v" else None
    else:
        tensors = random_inputs(kernel, B, H, N, N, generator=torch.Generator().manual_seed(1),
                                D=D)
    gather = getattr(kernel, "gather", None) or (around.gather if around is not None else None)
    if perturbed is not None and gather is not None and perturbed == gather.tensor:
        tensors[perturbed] = torch.full_like(tensors[perturbed], -1)  # every list empty
    elif perturbed is not None:
        x = tensors[perturbed]
        tensors[perturbed] = (x * 1.5 + 0.25 if x.is_floating_point()
                                  else torch.arange(x.shape[-1]).expand(x.shape) // 5)
    out = kernel(q, k, v, **tensors)
    return out[0] if isinstance(out, tuple) else out


def _cases(text: str):
    """(what, spec text, options, the declared tensor whose values change or None)."""
    options = _options(text)
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        changed = _perturbed_rhs(line.rstrip("\n"))
        if changed is not None:
            new = "".join(lines[:i]) + changed + "\n" + "".join(lines[i + 1:])
            yield f"line {i + 1}: {changed.strip()}", new, options, None
        declared = re.match(r"\s*(param|input)\s+(\w+)", line)
        if declared is not None:
            yield f"values of {declared[2]}", text, options, declared[2]
    for name, value in options.items():
        if name in SIZING_ONLY:
            continue
        bumped = {**options, name: _bigger(value)}
        yield f"option {name} = {bumped[name]}", text, bumped, None


@pytest.mark.parametrize("name,text", _specs(), ids=[n for n, _ in _specs()])
def test_every_statement_changes_the_output_or_is_refused(name, text):
    base = _run(attnc.compile(text, **_options(text)), 0)
    for what, changed, options, tensor in _cases(text):
        try:
            kernel = attnc.compile(changed, **options)
        except SpecError as err:  # a CompileError is a SpecError too
            assert err.line >= 1, f"{name}, {what}: refused without a location: {err}"
            continue
        out = _run(kernel, 0, tensor)
        # a perturbation may overflow (NaN or inf where the original was finite): that too is
        # an observable change
        assert not torch.allclose(out, base, rtol=1e-3, atol=1e-4), \
            f"{name}, {what}: the output did not change"


def test_a_cascade_epilogue_is_fused_into_the_same_pass():
    kernel = attnc.compile(CASCADE_GATED)
    assert len(kernel.plan.forward) == 1
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 24, 16, generator=g) for _ in range(3))
    gate = torch.randn(1, 2, 24, generator=g)
    ref = torch.softmax(q @ k.transpose(-1, -2), -1) @ v * torch.sigmoid(gate)[..., None]
    out = kernel(q, k, v, scale=1.0, G=gate)
    assert ((out - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize("extra,line,what", [
    ("  X[m] = sum(n) SN[m, n]\n", 6, "X is computed but never used"),
    ("  param W[h]\n", 6, "param W is declared but never used"),
    ("  option unused = 3\n", 6, "option unused is declared but never used"),
])
def test_a_statement_without_effect_is_refused(extra, line, what):
    text = CASCADE_3PASS.replace("  A[m, n]", extra + "  A[m, n]")
    with pytest.raises(SpecError) as caught:
        attnc.compile(text)
    assert caught.value.line == line and caught.value.message == what, str(caught.value)


def test_attention_block_declarations_must_be_read():
    text = "attention a {\n  input doc[b, n]\n  let w = 3\n  mask = n <= m\n}\n"
    with pytest.raises(SpecError, match=r"<spec>:2:9: input doc is declared but never used"):
        attnc.compile(text)
    with pytest.raises(SpecError, match=r"<spec>:2:7: let w is declared but never used"):
        attnc.compile(text.replace("  input doc[b, n]\n", "").replace("mask = n <= m",
                                                                       "mask = n <= m\n"))


@pytest.mark.parametrize("extra, kernels", [("QK[m, n] / GM[m]", 1),
                                           ("sigmoid(QK[m, n] - GM[m])", 2)])
def test_a_multi_pass_cascade_compiles_to_one_kernel_per_pass(extra, kernels):
    """QK / GM divides by the max: moved out of the sum, it costs no pass. sigmoid(QK - GM)
    needs the max before the sums can use it: a second pass over n, so a second kernel. Both
    agree with the math."""
    text = CASCADE_3PASS.replace("  A[m, n]  = SN[m, n] / SD[m]\n",
                                 f"  A[m, n]  = SN[m, n] / SD[m] + {extra}\n")
    kernel = attnc.compile(text)
    assert len(kernel.plan.forward) == kernels
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 24, 16, generator=g) for _ in range(3))
    s = q @ k.transpose(-1, -2)
    gm = s.amax(-1, keepdim=True)
    added = s / gm if kernels == 1 else torch.sigmoid(s - gm)
    ref = (torch.softmax(s, -1) + added) @ v
    assert ((kernel(q, k, v, scale=1.0) - ref).norm() / ref.norm()) < 1e-5


def test_a_cascade_beyond_the_kernel_limit_is_refused_at_the_statement_starting_it():
    from attnc.passes.schedule import MAX_KERNELS
    lines = ["cascade chain {", "  QK[m, n] = Q[m, e] * K[n, e]", "  R0[m] = sum(n) QK[m, n]"]
    for i in range(1, MAX_KERNELS + 1):  # each sum reads the last inside exp: a pass each
        lines.append(f"  R{i}[m] = sum(n) exp(QK[m, n] * R{i - 1}[m])")
    lines += [f"  O[m, f] = sum(n) QK[m, n] * R{MAX_KERNELS}[m] * V[n, f]", "}"]
    with pytest.raises(SpecError) as caught:
        attnc.compile("\n".join(lines) + "\n")
    assert caught.value.line == 3 + MAX_KERNELS and "pass" in caught.value.message


