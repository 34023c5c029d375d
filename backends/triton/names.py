"""Hygiene for generated code: a name that comes from a spec never collides with attnc's own.

The code generators write every name a spec chose (its name, its tensors, its states) through
`UserNames.of`, and whatever they derive from it (`<name>_s0`, `x_<name>_t`) around it. A
module is generated twice: first with placeholders for those names, then `choose` reads the
draft's identifiers (those without a placeholder are attnc's own: locals, helpers, `tl`, launch
keywords, ...) and picks each name's spelling, and the module is generated again with them
(so lines wrap as the final names need). A spec name keeps its spelling when none of the
identifiers derived from it is one of attnc's own or derived from another spec name, else it
becomes `u_<name>` (`u2_<name>`, ... if need be). So a param called `g`, `tl`, `offs_m` or
`lambda` compiles like any other, and a spec without such a clash generates exactly the text
it would without this step.
"""

from __future__ import annotations

import builtins
import io
import keyword
import tokenize
from collections.abc import Iterable, Mapping

MARK = "ATTNCUSER"
# Keyword arguments of a Triton launch: a kernel parameter may not take these names.
LAUNCH_KEYWORDS = {"grid", "num_warps", "num_stages", "num_ctas", "maxnreg", "warmup",
                   "enable_fp_fusion", "launch_cooperative_grid", "launch_pdl", "debug"}


class UserNames:
    """How generated code spells the names a spec chose: placeholders (a draft), or the
    spellings `choose` picked (`spelled`, by name)."""

    def __init__(self, names: Iterable[str] = (), spelled: Mapping[str, str] | None = None):
        self.placeholders: dict[str, str] = {}
        self.spelled = spelled
        for name in names:
            self.of(name)

    def of(self, name: str) -> str:
        if self.spelled is not None:
            return self.spelled[name]
        if name not in self.placeholders:
            self.placeholders[name] = f"{MARK}{len(self.placeholders)}X"
        return self.placeholders[name]


def identifiers(source: str) -> set[str]:
    return {tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type == tokenize.NAME}


def choose(source: str, users: UserNames) -> dict[str, str]:
    """{name: spelling} for a draft `source` generated with `users`' placeholders."""
    found = identifiers(source)
    taken = {x for x in found if MARK not in x}
    taken |= set(keyword.kwlist) | set(dir(builtins)) | LAUNCH_KEYWORDS
    chosen = {}
    for name, ph in users.placeholders.items():
        derived = [x for x in found if ph in x]
        for k in range(len(taken) + 2):
            base = name if k == 0 else f"u_{name}" if k == 1 else f"u{k}_{name}"
            spelled = {x.replace(ph, base) for x in derived}
            if not spelled & taken:
                break
        chosen[name] = base
        taken |= spelled
    return chosen
