"""The linear IR's verifiers: the scan's and the kernel plan's."""

from __future__ import annotations

from dataclasses import replace

import pytest

import attnc
from attnc.ir.linear import Update, verify_scan
from attnc.ir.linear_kernel import Algorithm, ScanBackward, format_plan, verify_plan


def test_a_scan_updates_each_state_once():
    scan = attnc.load("gated_delta_net").scan
    verify_scan(scan)
    with pytest.raises(AssertionError, match="updated exactly once"):
        verify_scan(replace(scan, updates=scan.updates * 2))
    normed = attnc.load("linear_attn").scan  # S[i, j] and z[i]
    s_update, _ = normed.updates
    with pytest.raises(AssertionError, match="free axes"):  # z[i] set from an [i, j] value
        verify_scan(replace(normed, updates=(s_update, Update("z", s_update.expr))))
    with pytest.raises(AssertionError, match="must say why"):
        verify_scan(replace(scan, schedule=replace(scan.schedule, chunked=False, reason="")))


def test_plans_say_which_kernels_run():
    gdn, flow = attnc.load("gated_delta_net").plan, attnc.load("flowformer").plan
    assert (gdn.algorithm, gdn.backward) == (Algorithm.CHUNKED, ScanBackward.CORE)
    assert (flow.algorithm, flow.backward) == (Algorithm.RECURRENT, ScanBackward.RECURRENT)
    assert "flowformer_recurrent_bwd" in format_plan(flow)
    assert "BT = 32, 16 when BK > 128" in format_plan(gdn)
    assert "BT = 16 (diagonal decay)" in format_plan(attnc.load("gla").plan)
    assert "BT = 64 (compile option" in format_plan(attnc.load("gla", chunk_size=64).plan)
    with pytest.raises(AssertionError, match="without a chunked kernel"):
        verify_plan(replace(flow, algorithm=Algorithm.CHUNKED))
    with pytest.raises(AssertionError, match="must say why"):
        verify_plan(replace(flow, backward=ScanBackward.EAGER))
