"""Kernel contracts: launches bind their values to parameters by name, and the contract is
what the generated `def` line declares."""

from __future__ import annotations

import ast

import pytest

import attnc
from attnc.backends.triton.contract import Bind, ParamType


def _defs(source: str) -> dict[str, list[str]]:
    """Each function of a module: its parameter names in order."""
    return {f.name: [a.arg for a in f.args.args] for f in ast.parse(source).body
            if isinstance(f, ast.FunctionDef)}


@pytest.mark.parametrize("spec, options", [("rel_bias", {}), ("document", {"block_sparse": True}),
                                           ("gated_delta_net", {}), ("flowformer", {})])
def test_contracts_declare_the_generated_signatures(spec, options):
    kernel = attnc.load(spec, **options)
    defs = _defs(kernel.source)
    assert kernel.generated.kernels
    for contract in kernel.generated.kernels:
        if contract.role == "preprocess":  # the prelude's
            assert contract.entry == "_attnc_bwd_preprocess"
        assert defs[contract.entry] == [p.name for p in contract.params], contract.entry


def test_bind_refuses_missing_and_unused_values():
    contract = attnc.load("alibi").generated.kernel("forward")
    values = {p.bind: 0 for p in contract.params}
    bound = contract.bind(values)
    assert list(bound) == [p.name for p in contract.params]
    slopes = next(p for p in contract.params if p.bind == Bind("tensor", "slopes"))
    assert slopes.type is ParamType.FP32_PTR
    with pytest.raises(ValueError, match=r"no value for tensor\(slopes\)"):
        contract.bind({b: v for b, v in values.items() if b != slopes.bind})
    with pytest.raises(ValueError, match="values for no parameter: extra"):
        contract.bind({**values, Bind("extra"): 1})


def test_a_renamed_param_binds_by_the_specs_name():
    """A param called like a local of the kernel is spelled otherwise in the source; the
    launcher still finds it by the spec's name."""
    kernel = attnc.compile("attention r {\n  param g[h]\n"
                           "  score = dot(q, k) * scale + g[h]\n}\n")
    forward = kernel.generated.kernel("forward")
    param = next(p for p in forward.params if p.bind == Bind("tensor", "g"))
    assert param.name == "u_g" and kernel.generated.names["g"] == "u_g"
    assert "for g in range(0, GROUP):" in kernel.source
