"""Golden IR dumps: `attnc.pipeline.show` after every stage but `triton`, for four small softmax
specs (one with prologues), a spec with two branches, two general cascades (one pass without a
max; several kernels) and two linear ones, compared with tests/golden/<spec>/<stage>.txt; and
the generated Triton source of every library variant, pinned by its digest
(tests/golden/triton_digests.txt, first written
before the code generators were reorganized: the source stayed byte for byte).

After an intended change to a pass, a printer or a code generator, rewrite the files and review
the diff (for the source, with `attnc compile`):

    python -m pytest tests/test_golden.py --update-golden
    git diff tests/golden
"""

from __future__ import annotations

import difflib
import hashlib
from pathlib import Path

import pytest

import attnc
from attnc.pipeline import LINEAR_STAGES, STAGES, read_spec, show
from tests.specs import FUSEMAX_3PASS

GOLDEN = Path(__file__).parent / "golden"

SPECS = {
    "causal": """\
attention causal {
  mask = n <= m
}
""",
    "alibi": """\
attention alibi {
  param slopes[h]
  score = dot(q, k) * scale + slopes[h] * (n - m)
  mask = n <= m
}
""",
    "attention_3pass": FUSEMAX_3PASS,  # FuseMax's 3-pass softmax cascade, written out by hand
    # a one-pass non-softmax normalizer (stage kernels, no max)
    "sigmoid": """\
attention sigmoid {
  mask = n <= m
  normalize = sigmoid
}
""",
    # a multi-pass cascade: one Sinkhorn iteration, row and column kernels, then the output
    "sinkhorn": """\
attention sinkhorn {
  normalize = sinkhorn(1)
}
""",
    # prologues: rope at explicit positions (partial dims on q) and l2norm with learnable gains
    "rope_qknorm": """\
attention rope_qknorm {
  option theta = 10000.0
  input pos_q[b, m], pos_k[b, n]
  param gq[d], gk[h, d]
  q = rope(l2norm(q, gq[d]), pos_q[b, m], theta, 32)
  k = rope(l2norm(k, gk[h, d]), pos_k[b, n], theta)
  mask = n <= m
}
""",
    # two branches (a window, compressed keys) under one softmax: a library variant
    "local_plus_compressed": "local_plus_compressed",
}

LINEAR_SPECS = {
    "gated_delta_net": "gated_delta_net",  # a library variant: the (gated) delta-rule class
    "tanh_state": """\
linear tanh_state {
  state S[i, j]
  S[i, j] = tanh(S[i, j] + k[i] * v[j])
  o[j] = sum(i) q[i] * S[i, j]
}
""",
}

# the generated Triton source is covered by the runtime tests, not pinned here
GOLDEN_STAGES = tuple(s for s in STAGES if s != "triton")
CASES = [(spec, stage) for spec in SPECS for stage in GOLDEN_STAGES] + [
    (spec, stage) for spec in LINEAR_SPECS for stage in LINEAR_STAGES if stage != "triton"]


@pytest.fixture(scope="module")
def update_golden(request) -> bool:
    return request.config.getoption("--update-golden")


def dump(spec: str, stage: str) -> str:
    text = show(read_spec({**SPECS, **LINEAR_SPECS}[spec]), stage)
    return text if text.endswith("\n") else text + "\n"


@pytest.mark.parametrize("spec, stage", CASES)
def test_golden(spec, stage, update_golden):
    path = GOLDEN / spec / f"{stage}.txt"
    actual = dump(spec, stage)
    if update_golden:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_text() != actual:
            path.write_text(actual)
        return
    if not path.is_file():
        pytest.fail(f"{path} is missing; create it with `pytest tests/test_golden.py "
                    "--update-golden`")
    expected = path.read_text()
    if actual != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), actual.splitlines(True),
                                            f"golden/{spec}/{stage}.txt", "actual"))
        pytest.fail(f"{spec} after {stage} differs from its golden file (if intended, rerun "
                    f"with --update-golden and review the diff):\n{diff}", pytrace=False)


def test_no_stale_golden_files():
    expected = {(spec, f"{stage}.txt") for spec, stage in CASES}
    found = {(p.parent.name, p.name) for p in GOLDEN.glob("*/*.txt")}
    assert found - expected == set(), "golden files for no spec/stage; delete them"


DIGESTS = GOLDEN / "triton_digests.txt"


def _source_digests() -> dict[str, str]:
    """Each library variant's (and each softmax one's block-sparse) source, header left out."""
    out = {}
    for name in attnc.variants():
        kernel = attnc.load(name)
        builds = [(name, kernel)]
        if isinstance(kernel, attnc.Kernel):
            builds.append((f"{name}_bs", attnc.load(name, block_sparse=True)))
        for label, k in builds:
            body = k.source.split("\n", 1)[1]
            out[label] = hashlib.sha256(body.encode()).hexdigest()
    return out


def test_generated_sources_keep_their_digests(update_golden):
    got = _source_digests()
    if update_golden:
        header = [line for line in DIGESTS.read_text().splitlines() if line.startswith("#")]
        DIGESTS.write_text("\n".join(header + [f"{n} {d}" for n, d in sorted(got.items())])
                           + "\n")
        return
    want = dict(line.split() for line in DIGESTS.read_text().splitlines()
                if line and not line.startswith("#"))
    changed = sorted(n for n in set(got) | set(want) if got.get(n) != want.get(n))
    assert not changed, (f"the generated source of {changed} changed; if intended, rerun with "
                         "--update-golden")
