"""The variant library: `variants/*.attn`, shipped as package data, and what each entry's
options and calls must satisfy (`ENTRIES`)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from attnc.frontends.limits import INT_LIMIT


def _root() -> Path:
    return Path(str(resources.files("attnc.variant_files")))


def variants() -> list[str]:
    """Names of the library's variants, sorted."""
    return sorted(p.stem for p in _root().glob("*.attn"))


def variant_path(name: str) -> Path | None:
    """The file of the variant `name`, or None. Only plain names (letters, digits, `_`) name
    variants: no other string reaches the file system (a path, or a name too long to look up)."""
    if not isinstance(name, str) or not re.fullmatch(r"\w{1,100}", name, flags=re.ASCII):
        return None
    path = _root() / f"{name}.attn"
    return path if path.is_file() else None


def describe(name: str) -> str:
    """The first comment line of a variant file: what it is and where it comes from."""
    path = variant_path(name)
    if path is None:
        raise ValueError(f"no library variant {name!r}")
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


# --- what a library variant's options and calls must satisfy ----------------------------------
# A spec's `option` is any number to the language, but most library options only make sense in a
# domain (a window of 0 keys or a dilation of 0 would compile and silently return zeros or NaN),
# and some variants also constrain the call's sizes (neighborhood_1d's window is clamped into
# [0, N), so it needs N >= kernel_size). Each library entry declares both here; attnc.compile
# checks the options once the spec's defaults and the caller's overrides are merged, and the
# kernel checks the requirements at every call, before anything launches.

@dataclass(frozen=True)
class Domain:
    """Values an option may take: finite, an integer when `integer`, at least `low` (more than
    `low` when `strict`), at most `high` when given."""

    integer: bool
    low: float
    strict: bool = False
    high: float | None = None

    def admits(self, value: float) -> bool:
        if not math.isfinite(value) or (self.integer and not float(value).is_integer()):
            return False
        if self.high is not None and value > self.high:
            return False
        return value > self.low if self.strict else value >= self.low

    def __str__(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        text = f"{kind} {'>' if self.strict else '>='} {_shown(self.low)}"
        return text if self.high is None else f"{text} and <= {_shown(self.high)}"


def _shown(bound: float) -> int | float:
    return int(bound) if float(bound).is_integer() else bound


@dataclass(frozen=True)
class Requirement:
    """A condition on a call: `condition` is an expression over the call's sizes (B, H, M, N
    for attention; B, H, T, DK, DV for linear blocks) and the spec's options. `argument` is
    the call argument that carries the offending size (named in the error), `why` says what
    breaks otherwise."""

    condition: str
    argument: str
    why: str


@dataclass(frozen=True)
class Entry:
    options: Mapping[str, Domain] = field(default_factory=dict)
    requires: tuple[Requirement, ...] = ()


POSITIONS = Domain(integer=True, low=1)      # a count of positions (window, chunk, stride)
COUNT = Domain(integer=True, low=0)          # a count that may be zero (sinks, a prefix)
POSITIVE = Domain(integer=False, low=0, strict=True)
EPSILON = Domain(integer=False, low=0)
# an extra cascade rank (`rank c = groups`) is unrolled into one copy per value: 1 to 16
EXTRA_RANK = Domain(integer=True, low=1, high=16)

ENTRIES: dict[str, Entry] = {
    "sliding_window": Entry({"window": POSITIONS}),
    "softcap": Entry({"cap": POSITIVE}),                      # cap = 0 divides by zero
    "streaming": Entry({"sinks": COUNT, "window": POSITIONS}),
    "prefix_lm": Entry({"prefix": COUNT}),
    "rel_bias": Entry({"max_distance": COUNT}),               # the table has 2R + 1 entries
    "neighborhood_1d": Entry({"kernel_size": POSITIONS}, (
        Requirement("N >= kernel_size", "k",
                    "each query attends to exactly kernel_size keys"),)),
    "dilated": Entry({"window": POSITIONS, "dilation": POSITIONS}),   # dilation 0: % 0
    "chunked_local": Entry({"chunk": POSITIONS}),                     # chunk 0: // 0
    "local_plus_compressed": Entry({"window": POSITIONS, "stride": POSITIONS}),
    "linear_attn": Entry({"eps": EPSILON}),
    "based": Entry({"eps": EPSILON}),
    "hedgehog": Entry({"features": POSITIONS, "eps": EPSILON}),
    "lightning": Entry({"eps": EPSILON}),
    "flowformer": Entry({"eps": EPSILON}),
    "sinkhorn": Entry({"iters": POSITIONS, "tau": POSITIVE}),    # tau = 0 divides by zero
    # rotary embeddings: theta = 0 has no logarithm; rot features rotate in pairs (the
    # frontend refuses an odd count at its line, the call one above the head dim)
    "rope": Entry({"theta": POSITIVE, "rot": Domain(integer=True, low=2)}),
    "qk_norm": Entry({"theta": POSITIVE}),
    "mla": Entry({"theta": POSITIVE}),
    "token_topk": Entry({"topk": POSITIONS}),     # list lengths (a list of 0 entries: no key)
    "nsa_selected": Entry({"count": POSITIONS}),
    "grouped": Entry({"groups": EXTRA_RANK}, (
        Requirement("N >= groups", "k",
                    "every group of keys must hold a key: an empty group's softmax is 0 / 0"),)),
}


def entry_of(filename: str, text: str) -> tuple[str, Entry] | None:
    """The library entry a spec source is, when it is a library file's text unchanged (by
    name, or read from its path); None for any other spec."""
    name = Path(filename).stem
    path = variant_path(name)
    if path is None or path.read_text() != text:
        return None
    return name, ENTRIES.get(name, Entry())


def check_options(filename: str, text: str, options: Mapping[str, object]) -> None:
    """Raise ValueError naming the first of the caller's option overrides that lies outside its
    library domain (the library's own defaults lie inside; options that are no number, or that
    the spec does not declare, are the frontend's to report)."""
    found = entry_of(filename, text)
    if found is None:
        return
    name, entry = found
    for option, value in options.items():
        domain = entry.options.get(option)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, int) and abs(value) > INT_LIMIT:
            continue  # beyond int32: the frontend's limits refuse it, naming the option
        if domain is not None and not domain.admits(float(value)):
            shown = int(value) if float(value).is_integer() else float(value)
            raise ValueError(f"{name}: option {option} must be {domain}, got {shown}")


class CallCheck:
    """One Requirement with the options substituted: `check(kernel, sizes)` raises ValueError
    naming the argument when the call's sizes break it."""

    def __init__(self, req: Requirement, options: Mapping[str, float], sizes: tuple[str, ...]):
        import sympy
        names = {s: sympy.Symbol(s) for s in sizes}
        condition = sympy.sympify(req.condition, locals={**names, **{
            o: sympy.Symbol(o) for o in options}})
        used = sorted(str(s) for s in condition.free_symbols if str(s) in options)
        self.req = req
        self.shown = ", ".join(f"{o} = {options[o]}" for o in used)
        self.sizes = tuple(s for s in sizes if names[s] in condition.free_symbols)
        self._holds = sympy.lambdify([names[s] for s in self.sizes],
                                     condition.subs({sympy.Symbol(o): v
                                                     for o, v in options.items()}), "math")

    def check(self, kernel: str, sizes: Mapping[str, int]) -> None:
        if not self._holds(*(sizes[s] for s in self.sizes)):
            got = ", ".join(f"{s} = {sizes[s]}" for s in self.sizes)
            raise ValueError(f"{kernel}: {self.req.argument}: the call needs "
                             f"{self.req.condition} ({self.req.why}), got {got} with "
                             f"{self.shown}")


def call_checks(filename: str, text: str, options, sizes: tuple[str, ...]) -> list[CallCheck]:
    """The call-time checks of a library entry's requirements (none for other specs)."""
    found = entry_of(filename, text)
    if found is None:
        return []
    values = {name: (int(v) if float(v).is_integer() else float(v)) for name, v in options}
    return [CallCheck(r, values, sizes) for r in found[1].requires]
