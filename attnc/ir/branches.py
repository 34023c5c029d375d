"""Branches IR: one `attention` block whose query rows attend through several branches.

A block holding `branch NAME { ... }` statements lowers (frontends/lower_branches.py) to a
`Branches`: one `Branch` per branch, each a whole `AttentionSpec` (the block's shared
statements with the branch's own overriding them) plus the call arguments that hold its keys
and values (`k = kc` inside a branch renames its keys to the key-side operand kc). Every branch
sees the same query rows; they differ in keys, masks, scores or prologues. `combine` says how
their outputs meet:

* `JOINT` (`combine = softmax`): one softmax over the union of the branches' keys. With
  lse_i and out_i each branch's log-sum-exp and normalized output,
  lse = log Σ_i exp(lse_i) and out = Σ_i exp(lse_i − lse) · out_i (the lse merge). A row that
  sees no key in any branch has lse −inf and out 0.
* `GATES` (`combine = gates`): each branch is normalized on its own and weighed by its gate
  (its spec's `around.gate`, an expression of b, h, m, params and inputs, applied by its
  kernel): out = Σ_i gate_i · out_i (NSA's gated mix; a gate of h only is a per-head mix of
  branches).

This module is the IR only: no torch. `Branches.__str__` is the deterministic printer (each
branch's spec indented under a header), `verify_branches` states what well-formed means, and
`show` prints any pipeline stage branch by branch (the pipeline runs once per branch).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from attnc.ir.cascade import AttentionSpec, Cascade, Normalizer, Origin
from attnc.ir.linear import LinearScan

if TYPE_CHECKING:  # the pipeline imports this module
    from attnc.pipeline import Source

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class Combine(enum.Enum):
    JOINT = "softmax"  # one softmax over every branch's keys: the lse merge
    GATES = "gates"    # separately normalized branches, weighed by their gates


@dataclass(frozen=True)
class Branch:
    """One branch: its spec (named `<block>_<branch>`; under GATES its `around.gate` is the
    branch's gate) and the call arguments holding its keys and values ("k"/"v" or key-side
    operand names)."""

    name: str
    spec: AttentionSpec
    keys: str = "k"
    values: str = "v"

    def header(self) -> str:
        renamed = [f"{role} = {arg}" for role, arg in (("k", self.keys), ("v", self.values))
                   if arg != role]
        return f"branch {self.name}" + "".join(f"; {x}" for x in renamed)


@dataclass(frozen=True)
class Branches:
    name: str
    branches: tuple[Branch, ...]
    combine: Combine
    options: tuple[tuple[str, object], ...] = ()  # the block's options (all branches')
    origins: tuple[Origin, ...] = ()  # the block "", "combine", and "branch <name>" each

    @property
    def tensors(self) -> tuple[str, ...]:
        """Every keyword tensor of a call, in first-declared order: each branch's params,
        inputs and operands, and its renamed keys and values."""
        seen: dict[str, None] = {}
        for br in self.branches:
            for name in ([d.name for d in br.spec.decls]
                         + [o.name for o in br.spec.around.operands]
                         + [x for x in (br.keys, br.values) if x not in ("k", "v")]):
                seen.setdefault(name, None)
        return tuple(seen)

    def __str__(self) -> str:
        lines = [f"branches {self.name}", f"combine = {self.combine.value}"]
        if self.options:
            lines.append("option " + ", ".join(f"{k} = {v}" for k, v in self.options))
        for br in self.branches:
            lines.append(br.header())
            lines += ["  " + line for line in str(br.spec).rstrip("\n").split("\n")]
        return "\n".join(lines) + "\n"

    def show(self, src: Source, stage: str) -> str:
        """What `attnc show --stage STAGE` prints: the stage of each branch's pipeline under a
        `# branch NAME` line (`cascade` is this IR itself)."""
        from attnc.pipeline import run_passes, stage_text
        if stage == "cascade":
            return str(self)
        parts = []
        for br in self.branches:
            if stage == "triton":
                from attnc.backends.triton import codegen
                final = run_passes(br.spec, src=src)[-1][1]
                assert not isinstance(final, (AttentionSpec, Cascade, LinearScan))
                text = codegen.generate(final).source
            else:
                trail = run_passes(br.spec, upto=None if stage == "kernel" else stage, src=src)
                text = stage_text(trail, br.spec, stage)
            parts.append(f"# branch {br.name}\n{text.rstrip(chr(10))}\n")
        return "\n".join(parts)


def verify_branches(ir: Branches) -> None:
    """Well-formed: two branches or more, named apart; keys and values are "k"/"v" or operand
    names other than q's; every branch normalizes with a plain softmax (the lse merge and the
    gated mix both combine softmax outputs); under GATES each branch has a gate, under JOINT
    none has one."""
    where = f"branches {ir.name}"
    if len(ir.branches) < 2:
        raise AssertionError(f"{where}: {len(ir.branches)} branch(es); a block of branches has "
                             "two or more")
    names = [br.name for br in ir.branches]
    if len(set(names)) != len(names):
        raise AssertionError(f"{where}: branch names repeat: {names}")
    for br in ir.branches:
        at = f"{where}, branch {br.name}"
        if not _NAME.match(br.keys) or not _NAME.match(br.values) or "q" in (br.keys,
                                                                             br.values):
            raise AssertionError(f"{at}: keys {br.keys!r} / values {br.values!r}")
        if br.spec.normalize is not Normalizer.SOFTMAX or br.spec.sink is not None or \
                br.spec.weight is not None:
            raise AssertionError(f"{at}: a branch is a plain softmax (no sink, no weight)")
        gate = br.spec.around.gate
        if (ir.combine is Combine.GATES) != (gate is not None):
            raise AssertionError(f"{at}: combine = {ir.combine.value} with"
                                 f"{'out' if gate is None else ''} a gate")
