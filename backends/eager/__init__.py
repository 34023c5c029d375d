"""Sympy IR expressions evaluated on torch tensors: the production path's eager pieces (param
gradients, block masks, the linear family's prologue and feature maps). The reference
interpreters (backends/reference) build on the same evaluator."""
