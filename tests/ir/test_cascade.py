"""The cascade IR's structure: its networkx graph, the checks run after every pass, fresh
names for what passes introduce, and the q.k analysis."""

from __future__ import annotations

from dataclasses import replace

import networkx as nx
import pytest

from attnc.errors import CompileError
from attnc.ir.cascade import fresh_name, qk_factor, verify
from attnc.pipeline import frontend, read_spec, run_passes
from tests.specs import FUSEMAX_3PASS


def _cascade():
    return frontend(read_spec(FUSEMAX_3PASS), {})[1]


def test_graph_has_an_edge_per_read():
    g = _cascade().graph()
    assert nx.is_directed_acyclic_graph(g)
    assert sorted(g.edges()) == [("A", "AV"), ("GM", "SN"), ("K", "QK"), ("Q", "QK"),
                                 ("QK", "GM"), ("QK", "SN"), ("SD", "A"), ("SN", "A"),
                                 ("SN", "SD"), ("V", "AV")]
    assert list(nx.topological_sort(g))[-1] == "AV"


def test_verify_rejects_reads_before_definition_and_so_cycles():
    c = _cascade()
    verify(c)
    nodes = list(c.nodes)
    with pytest.raises(AssertionError, match="reads SN before it is defined"):
        verify(c.with_nodes([nodes[0], nodes[1], nodes[3], nodes[2], *nodes[4:]]))
    # a node reading its own output is a cycle: rejected the same way
    looped = nodes[1].__class__(**{**nodes[1].__dict__, "expr": nodes[2].expr})
    with pytest.raises(AssertionError, match="before it is defined"):
        verify(c.with_nodes([nodes[0], looped, *nodes[2:]]))


def test_verify_rejects_duplicate_names_and_malformed_einsums():
    c = _cascade()
    nodes = list(c.nodes)
    with pytest.raises(AssertionError, match="defined twice"):
        verify(c.with_nodes([nodes[0], replace(nodes[1], name="QK"), *nodes[2:]]))
    with pytest.raises(AssertionError, match="malformed einsum"):
        verify(c.with_nodes([replace(nodes[0], over=()), *nodes[1:]]))  # sum over nothing
    with pytest.raises(AssertionError, match="output out=Nope"):
        verify(replace(c, outputs=(("out", "Nope"),)))
    with pytest.raises(AssertionError, match="masking node"):
        verify(replace(c, mask_node="SM"))


def test_verify_checks_the_backward_it_carries():
    c = run_passes(frontend(read_spec("attention a {\n  param p[h]\n  score = dot(q, k) * "
                                      "scale + p[h]\n}\n"))[1], upto="autodiff")[-1][1]
    verify(c)
    with pytest.raises(AssertionError, match="the backward's node"):
        verify(replace(c, backward=replace(c.backward, dqk="gone")))


def test_qk_factor_refuses_other_reductions():
    c = _cascade()
    assert qk_factor(c, c.einsum("QK")) == 1
    with pytest.raises(CompileError, match="must be the q.k product"):
        qk_factor(c, c.einsum("SD"))


def test_fresh_names_avoid_what_is_taken():
    taken = {"GM", "GM_1"}
    assert fresh_name("GM", taken) == "GM_2" and fresh_name("SD", taken) == "SD"
    assert {"GM_2", "SD"} <= taken
