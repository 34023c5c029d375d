"""The cascade IR's structure: its networkx graph, and the checks run after every pass."""

from __future__ import annotations

import networkx as nx
import pytest

from attnc.ir import verify
from attnc.pipeline import frontend, read_spec
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
