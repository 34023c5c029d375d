"""The jobs backends/triton/aot_check.py compiles: each kernel of a compiled spec exactly as its
launcher would launch it on a GPU at a given shape, without a GPU.

The launchers themselves run, on meta tensors (shapes and strides, no data), against a module
that records each launch instead of running it: the kernel, its arguments (integers, floats,
and tensors as dtype and byte offset), its constexprs and its options (num_warps, num_stages).
So tiles, warps, stages, key splits and every integer a kernel receives are the launcher's own,
and aot_check specializes on them as Triton's launcher does. What differs on a GPU is set here:
the launch configuration a CUDA device gets (`default_config(..., cuda)`), `SMS` for the key
split rule, and UPCAST off (it is the interpreter's switch). The linear backward's core kernels
run inside eager autograd code that meta tensors cannot drive; their jobs are bound from the
core contracts and the configuration backward.py gives by default.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, cast

import sympy
import torch
import triton

from attnc.backends.triton.contract import KernelContract, ParamType
from attnc.backends.triton.linear import backward as core_backward
from attnc.backends.triton.linear import core
from attnc.backends.triton.linear import launch as linear_launch
from attnc.backends.triton.module import KernelModule
from attnc.backends.triton.softmax import launch as softmax_launch
from attnc.expr import symbols as S
from attnc.ir.around import RowKind, Side, row_values
from attnc.ir.cascade import TensorKind
from attnc.ir.linear_kernel import Algorithm, ScanBackward

# An H100 SXM's streaming multiprocessors: what the forward's key split rule sees on a GPU
SMS = 132
# the tile constexprs a report shows as a kernel's configuration
TILES = ("BLOCK_M", "BLOCK_N", "BLOCK_P", "BLOCK_L", "BLOCK_D", "BLOCK_DV", "BT", "BK", "BV")


@dataclass(frozen=True)
class Shape:
    """The operands' sizes and dtype: q [B, H, M, D], k [B, Hkv, N, D], v [B, Hkv, N, Dv]
    (linear blocks: T = N, Hkv = H); None: H for Hkv, N for M, D for Dv."""

    B: int = 4
    H: int = 16
    N: int = 4096
    D: int = 128
    Dv: int | None = None
    M: int | None = None
    Hkv: int | None = None
    dtype: torch.dtype = torch.bfloat16
    varlen: bool = False  # linear blocks: the B sequences packed into one row (cu_seqlens)

    @property
    def sizes(self) -> dict[str, int]:
        return {"B": self.B, "H": self.H, "M": self.N if self.M is None else self.M,
                "N": self.N, "D": self.D, "Dv": self.D if self.Dv is None else self.Dv,
                "Hkv": self.H if self.Hkv is None else self.Hkv}


@dataclass
class Launch:
    """One recorded kernel launch."""

    contract: KernelContract
    kwargs: dict[str, Any]
    options: dict[str, int]


class _Recorder:
    """Stands for a generated module: `module.<entry>[grid](**kwargs, **options)` records."""

    def __init__(self, contracts, launches: list[Launch]):
        self._by_entry = {c.entry: c for c in contracts}
        self._launches = launches

    def __getattr__(self, entry: str):
        contract = self._by_entry[entry]
        names = {p.name for p in contract.params}

        def run(**kwargs):
            args = {k: v for k, v in kwargs.items() if k in names}
            options = {k: v for k, v in kwargs.items() if k not in names}
            self._launches.append(Launch(contract, args, options))
        return _Grid(run)


class _Grid:
    def __init__(self, run):
        self._run = run

    def __getitem__(self, grid):
        return self._run


def recording(contracts) -> tuple[KernelModule, list[Launch]]:
    """A KernelModule whose launches are recorded into the returned list."""
    launches: list[Launch] = []
    return KernelModule(tuple(contracts), _Recorder(contracts, launches)), launches  # type: ignore


def _meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _operands(shape: Shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    s = shape.sizes
    return (_meta(s["B"], s["H"], s["M"], s["D"], dtype=shape.dtype),
            _meta(s["B"], s["Hkv"], s["N"], s["D"], dtype=shape.dtype),
            _meta(s["B"], s["Hkv"], s["N"], s["Dv"], dtype=shape.dtype))


def _extras(decls, shape: Shape) -> dict[str, torch.Tensor]:
    """A softmax-family spec's params and integer inputs as a model usually holds them: fp32
    (nn.Parameter's default) and int64 (the launchers pass them as they come)."""
    s = shape.sizes
    sizes = {S.B: s["B"], S.H: s["H"], S.M: s["M"], S.N: s["N"], S.D: s["D"]}
    return {d.name: _meta(*(int(sympy.sympify(x).xreplace(sizes)) for x in d.dims),
                          dtype=torch.float32 if d.kind is TensorKind.PARAM else torch.int64)
            for d in decls}


def _arg(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return {"pointer": str(value.dtype).removeprefix("torch."),
                "offset": value.storage_offset() * value.element_size()}
    return value


def job(path: str, launch: Launch, label: str, arch: int = 90, inspect: bool = False) -> dict:
    """The aot_check job of a recorded launch; `label` names the kernel in reports."""
    constexprs = {p.name for p in launch.contract.constexprs()}
    values = {k: _arg(v) for k, v in launch.kwargs.items()}
    # UPCAST is the interpreter's switch (it upcasts dot operands numpy cannot multiply)
    fixed = {k: (False if k == "UPCAST" else v) for k, v in values.items() if k in constexprs}
    return {"path": path, "function": launch.contract.entry, "arch": arch, "kernel": label,
            "constexprs": fixed, "options": dict(launch.options), "inspect": inspect,
            "args": {k: v for k, v in values.items() if k not in constexprs},
            "config": {**{k: v for k, v in fixed.items() if k in TILES}, **launch.options}}


def _specialized(value: Any) -> Any:
    """What Triton's launcher specializes on in a value (aot_check applies Triton's own rule;
    this only tells launches apart): an int's 1, divisibility by 16 and width, a pointer's
    dtype and 16-byte alignment."""
    if isinstance(value, dict):
        return value["pointer"], value["offset"] % 16 == 0
    if isinstance(value, int) and not isinstance(value, bool):
        return value == 1, value % 16 == 0, -2**31 <= value < 2**31
    return type(value).__name__


def _labelled(path: str, launches: list[Launch], arch: int, inspect: bool) -> list[dict]:
    """One job per distinct compilation: a kernel launched again with arguments it specializes
    the same way (the dq kernel over slabs of query tiles) compiles once; one that specializes
    differently is labelled with the values that differ from its first launch."""
    found: list[dict] = []
    seen: dict[tuple, dict] = {}
    for launch in launches:
        new = job(path, launch, launch.contract.role, arch, inspect)
        key = (new["function"], json.dumps(new["constexprs"], sort_keys=True),
               json.dumps(new["options"], sort_keys=True),
               tuple(sorted((k, _specialized(v)) for k, v in new["args"].items())))
        first = next((j for j in found if j["function"] == new["function"]), None)
        if key in seen:
            continue
        if first is not None:
            differ = [f"{k}={v}" for k, v in values(new).items() if values(first).get(k) != v
                      and _specialized(v) != _specialized(values(first).get(k))]
            new["kernel"] += f" [{' '.join(differ)}]"
        seen[key] = new
        found.append(new)
    return found


def values(job_: dict) -> dict[str, Any]:
    """A job's launch values by parameter name (constexprs included)."""
    return {**job_["args"], **job_["constexprs"]}


# --- softmax kernels (attnc.Kernel) ---------------------------------------------------------

def _fixed(kernel) -> dict:
    """The kernel's launch options (block_m, num_warps, ...) as config keys."""
    return {k.upper() if k.startswith("block") else k: v
            for k, v in kernel._overrides.items() if k != "kv_splits"}


# A block mask's block size, as torch's create_block_mask makes them by default
MASK_BLOCK = 128


def _block_mask(shape: Shape) -> tuple[list[torch.Tensor], tuple[int, int]]:
    """A block mask's eight lists (key lists, then query lists) as create_block_mask(mask_mod,
    None, None, M, N) makes them: int32, one for all batches and heads, broadcast to [B, H]."""
    s = shape.sizes
    mb, nb = triton.cdiv(s["M"], MASK_BLOCK), triton.cdiv(s["N"], MASK_BLOCK)

    def lists(rows: int, cols: int) -> list[torch.Tensor]:
        num = _meta(1, 1, rows, dtype=torch.int32).expand(s["B"], s["H"], rows)
        idx = _meta(1, 1, rows, cols, dtype=torch.int32).expand(s["B"], s["H"], rows, cols)
        return [num, idx, num, idx]
    return lists(mb, nb) + lists(nb, mb), (MASK_BLOCK, MASK_BLOCK)


def softmax_jobs(kernel, shape: Shape = Shape(), arch: int = 90, backward: bool = True,
                 inspect: bool = False) -> list[dict]:
    """An attnc.Kernel's forward and (`backward`, when it has one) preprocess, dq and dk/dv,
    with the default launch configuration a CUDA device gets (and the kernel's launch
    options), key splits as on an H100 (SMS). Params are trained (their gradients computed); a
    block-sparse kernel gets a block mask of MASK_BLOCK blocks (_block_mask)."""
    cuda = torch.device("cuda")
    s = shape.sizes
    q, k, v = _operands(shape)
    extras = _extras(kernel.kernel_ir.inputs, shape)
    config = cast(softmax_launch.Config, {
        **softmax_launch.default_config(s["D"], s["Dv"], shape.dtype, cuda), **_fixed(kernel)})
    lists, sizes = _block_mask(shape) if kernel.block_sparse else ([], None)
    bm = min(config["BLOCK_M"], softmax_launch.pow2(s["M"]), *(sizes or ()))
    programs = triton.cdiv(s["M"], bm) * s["B"] * s["H"]
    config["kv_splits"] = softmax_launch.kv_splits(programs, s["N"], SMS,
                                                   kernel._overrides.get("kv_splits"))
    mod, launches = recording(kernel.generated.kernels)
    scale = 1.0 / math.sqrt(s["D"])
    a = kernel.kernel_ir.around
    if not a.plain:
        return _around_jobs(kernel, shape, arch, backward, inspect, extras, config, mod,
                            launches)
    forward = softmax_launch.launch_packed if kernel.packs_heads else softmax_launch.launch
    out, lse = forward(mod, q, k, v, extras, scale, config, lists[:4], sizes)
    if backward and kernel.kernel_ir.grad is not None:
        forward_config = cast(softmax_launch.Config,
                              {k: v for k, v in config.items() if k != "kv_splits"})
        bconfig = cast(softmax_launch.Config, {
            **softmax_launch.backward_config(forward_config, shape.dtype, cuda),
            **softmax_launch.backward_overrides(_fixed(kernel))})
        params = any(d.kind is TensorKind.PARAM for d in kernel.kernel_ir.inputs)
        softmax_launch.launch_backward(
            mod, kernel.kernel_ir, q, k, v, extras, out, lse, torch.empty_like(out), None,
            scale, bconfig, lists[:4], lists[4:], sizes,
            on_partial=(lambda *partial: None) if params else None)
    found = _labelled(kernel.path, launches, arch, inspect)
    for j in found:
        if j["kernel"] == "forward" and config["kv_splits"] > 1:
            j["config"]["kv_splits"] = config["kv_splits"]
    return found


# A declared operand's head dim in the jobs (MLA's decoupled rope part is 64 wide)
OPERAND_DIM = 64


def around_tensors(kernel, shape: Shape) -> tuple[dict, dict, torch.Tensor | None]:
    """Meta tensors of a kernel with an Around: its declared operands (head dim OPERAND_DIM;
    query side [B, H, M, .], key side [B, Hkv, N, .]), its row values as the runtime passes them
    (positions and factors one per row, broadcast over the heads; gains one vector broadcast over
    (b, head); the gate [B, H, M]) and the kv-head map [B, H] (int32, broadcast over b)."""
    a = kernel.kernel_ir.around
    s = shape.sizes
    heads = {Side.QUERY: s["H"], Side.KEY: s["Hkv"]}
    rows_of = {Side.QUERY: s["M"], Side.KEY: s["N"]}
    operands = {o.name: _meta(s["B"], heads[o.side], rows_of[o.side], OPERAND_DIM,
                              dtype=shape.dtype) for o in a.operands}
    width = {"q": s["D"], "k": s["D"], "v": s["Dv"], **{o: OPERAND_DIM for o in operands}}
    if a.value != "v":
        width["v"] = width[a.value]
    rows = {}
    for rv in row_values(a):
        H = heads[rv.side]
        if rv.kind is RowKind.GAIN:
            rows[rv.key] = _meta(1, 1, width[rv.operand]).expand(s["B"], H, width[rv.operand])
        elif rv.kind is RowKind.GATE:
            rows[rv.key] = _meta(s["B"], H, s["M"])
        else:
            rows[rv.key] = _meta(s["B"], 1, rows_of[rv.side]).expand(s["B"], H, rows_of[rv.side])
    kv_map = (_meta(1, s["H"], dtype=torch.int32).expand(s["B"], s["H"])
              if a.kv_head is not None else None)
    return operands, rows, kv_map


def _around_jobs(kernel, shape: Shape, arch: int, backward: bool, inspect: bool, extras,
                 config, mod, launches) -> list[dict]:
    """softmax_jobs of a kernel with an Around: the forward (keeping the ungated output when a
    gated kernel's backward runs) and the backward's kernels, on around_tensors."""
    a = kernel.kernel_ir.around
    q, k, v = _operands(shape)
    operands, rows, kv_map = around_tensors(kernel, shape)
    value = {"v": v, "k": k, **operands}[a.value]
    scale = 1.0 / math.sqrt(shape.sizes["D"])
    grads = backward and kernel.kernel_ir.grad is not None
    args = softmax_launch.AroundArgs(operands, rows, kv_map, save=grads)
    result = softmax_launch.launch(mod, q, k, value, extras, scale, config, around=args)
    out = result[2] if a.gate is not None and grads else result[0]
    if grads:
        cuda = torch.device("cuda")
        forward_config = cast(softmax_launch.Config,
                              {k: v for k, v in config.items() if k != "kv_splits"})
        bconfig = cast(softmax_launch.Config, {
            **softmax_launch.backward_config(forward_config, shape.dtype, cuda),
            **softmax_launch.backward_overrides(_fixed(kernel))})
        params = any(d.kind is TensorKind.PARAM for d in kernel.kernel_ir.inputs)
        tensors = {"q": q, "k": k, **({"v": v} if a.value == "v" else {}), **operands}
        softmax_launch.launch_backward_around(
            mod, kernel.kernel_ir, tensors, extras, rows, kv_map, out, result[1],
            torch.empty_like(result[0]), None, scale, bconfig,
            on_partial=(lambda *partial: None) if params else None)
    found = _labelled(kernel.path, launches, arch, inspect)
    for j in found:
        if j["kernel"] == "forward" and config["kv_splits"] > 1:
            j["config"]["kv_splits"] = config["kv_splits"]
    return found


# --- general cascades (attnc.CascadeKernel) -------------------------------------------------

def cascade_jobs(kernel, shape: Shape = Shape(), arch: int = 90, backward: bool = True,
                 inspect: bool = False) -> list[dict]:
    """A CascadeKernel's stage kernels, forward (storing what the backward reads when
    `backward`) and backward, at the launch configuration runtime/cascade.py uses."""
    q, k, v = _operands(shape)
    extras = tuple(_extras(kernel.plan.inputs, shape).values())
    mod, launches = recording(kernel.generated.kernels)
    scale = 1.0 / math.sqrt(shape.sizes["D"])
    loaded = kernel._module
    kernel._module = mod  # its launches read the module through kernel.module()
    try:
        memory = kernel.forward_memory(q, k, v, extras, scale, save=backward)
        if backward and kernel.plan.has_backward:
            kernel.backward_grads(q, k, v, extras, scale, memory, torch.empty_like(q), None,
                                  [False] * len(extras))
    finally:
        kernel._module = loaded
    return _labelled(kernel.path, launches, arch, inspect)


# --- linear blocks (attnc.LinearKernel) -----------------------------------------------------

def _linear_operands(kernel, shape: Shape):
    """q, k (feature-mapped: fp32 with the map's width), v, the step tensors, cu_seqlens (with
    `shape.varlen`, the B sequences packed into one row) and the key width."""
    from attnc.backends.eager.linear import feature_dim
    s = shape.sizes
    B, H, T = (1, s["H"], s["B"] * s["N"]) if shape.varlen else (s["B"], s["H"], s["N"])
    scan = kernel.scan
    mapped = {p for mp in scan.maps for p in mp.params}
    sizes = {S.B: B, S.H: H, S.T: T, S.DV: s["Dv"], S.D: s["D"], **dict(scan.options)}
    weights = {d.name: torch.zeros(tuple(int(sympy.sympify(x).xreplace(sizes)) for x in d.dims))
               for d in scan.decls if d.name in mapped}
    dk = feature_dim(scan, torch.zeros(B, H, 0, s["D"]), weights) if scan.maps else s["D"]
    sizes[S.DK] = dk
    qk_dtype = torch.float32 if scan.maps else shape.dtype  # maps run in fp32
    q, k = (_meta(B, H, T, dk, dtype=qk_dtype) for _ in range(2))
    v = _meta(B, H, T, s["Dv"], dtype=shape.dtype)
    tensors = {d.name: _meta(*(int(sympy.sympify(x).xreplace(sizes)) for x in d.dims),
                             dtype=shape.dtype) for d in scan.step_tensors}
    cu = torch.arange(0, T + 1, s["N"], dtype=torch.int32) if shape.varlen else None
    return q, k, v, tensors, cu, dk


def linear_jobs(kernel, shape: Shape = Shape(), arch: int = 90, backward: bool = True,
                inspect: bool = False) -> list[dict]:
    """A LinearKernel's generated kernels (recurrent, chunked, and the recurrent backward:
    those it has) with the launcher's tiles and default configuration, and, when its backward
    runs the chunked core kernels, those (core_jobs)."""
    plan = kernel.plan
    q, k, v, tensors, cu, dk = _linear_operands(kernel, shape)
    dv = v.shape[-1]
    scale = dk ** -0.5
    mod, launches = recording(kernel.generated.kernels)
    config = linear_launch.default_config(plan, dk, dv)
    for algorithm in Algorithm:
        if kernel.generated.has(algorithm.value):
            linear_launch.launch(mod, plan, algorithm, q, k, v, tensors, [], scale, cu, config)
    if backward and kernel.generated.has("recurrent_bwd"):
        linear_launch.launch_recurrent_backward(
            mod, plan, q, k, v, tensors, [], scale, cu, torch.empty_like(v),
            [None] * len(kernel.scan.states))
    found = _labelled(kernel.path, launches, arch, inspect)
    if backward and plan.backward is ScanBackward.CORE:
        assert kernel.scan.schedule is not None
        kinds = sorted({(int(p.kind.gate), p.kind.delta) for p in kernel.scan.schedule.states})
        chunk = linear_launch.chunk_tile(plan, dk)
        found += [j for gate, delta in kinds
                  for j in core_jobs(shape, arch, gate, delta, chunk, dk, inspect)]
    return found


def core_jobs(shape: Shape, arch: int, gate: int, delta: bool, chunk: int, dk: int | None = None,
              inspect: bool = False) -> list[dict]:
    """The linear backward's core kernels (core_forward, core_backward) for one decay class
    (`gate` 0 none, 1 scalar, 2 vector; `delta` rule), with the configuration backward.py's
    default `configure` gives, bound from their contracts: tensors contiguous and aligned."""
    s = shape.sizes
    B, H, T, K, V = s["B"], s["H"], s["N"], dk or s["D"], s["Dv"]
    kind = SimpleNamespace(gate=gate, delta=delta, value=f"g{gate}{'-delta' if delta else ''}")
    stand_in = SimpleNamespace(key=_meta(B, H, T, K), value=_meta(B, H, T, V),
                               plan=SimpleNamespace(kind=kind), ieee=shape.dtype == torch.float32)
    ints = {"T": T, "H": H, "K": K, "V": V, "NV_STRIDE": B * H * T}
    pointers = {ParamType.DATA: shape.dtype, ParamType.FP32_PTR: torch.float32,
                ParamType.I32_PTR: torch.int32, ParamType.INDEX_PTR: torch.int64}
    found = []
    for contract in core_backward.CONTRACTS:
        config = core_backward._config(contract.role, stand_in, chunk,  # type: ignore[arg-type]
                                       core_backward.untuned, lambda cfg: ())
        constexprs = {"GATE": gate, "DELTA": delta, "HAS_S0": True, "VARLEN": False, "BT": chunk,
                      "BK": linear_launch.tile(K), "BV": config["BV"],
                      "IEEE": shape.dtype == torch.float32, "UPCAST": False}
        kwargs: dict[str, Any] = {}
        for p in contract.params:
            source = constexprs if p.type is ParamType.CONSTEXPR else ints \
                if p.type is ParamType.INT else None
            if source is not None and p.name not in source:
                raise ValueError(f"{contract.entry}: no launch value for {p.name}")
            kwargs[p.name] = source[p.name] if source is not None else \
                _meta(1, dtype=pointers[p.type])
        launch = Launch(contract, kwargs, {"num_warps": config["num_warps"],
                                           "num_stages": config["num_stages"]})
        found.append(job(core.__file__, launch, f"{contract.role} ({kind.value})", arch,
                         inspect))
    return found


def kernel_jobs(kernel, shape: Shape = Shape(), arch: int = 90, backward: bool = True,
                inspect: bool = False) -> list[dict]:
    """The jobs of any compiled spec: softmax kernel, general cascade, linear block, gathered
    keys (their own kernels) or branches (each branch's jobs, the role prefixed by its name)."""
    from attnc.runtime.branches import BranchedKernel
    from attnc.runtime.cascade import CascadeKernel
    from attnc.runtime.gather import GatherKernel
    from attnc.runtime.linear import LinearKernel
    from attnc.runtime.mixing import MixingKernel
    if isinstance(kernel, BranchedKernel):
        return [{**job, "kernel": f"{br.name}/{job['kernel']}"}
                for br, sub in zip(kernel.branches_ir.branches, kernel.kernels)
                for job in kernel_jobs(sub, shape, arch, backward, inspect)]
    if isinstance(kernel, GatherKernel):
        return kernel.aot_jobs(shape, arch, backward, inspect)
    if isinstance(kernel, MixingKernel):
        raise ValueError(f"{kernel.name}: head-mixing kernels are not compiled ahead of time yet "
                         "(attnc inspect and the sm_90 checks cover the other families)")
    if isinstance(kernel, LinearKernel):
        return linear_jobs(kernel, shape, arch, backward, inspect)
    if isinstance(kernel, CascadeKernel):
        return cascade_jobs(kernel, shape, arch, backward, inspect)
    return softmax_jobs(kernel, shape, arch, backward, inspect)

