"""The expression layer every IR level shares: sympy symbols for positions and sizes
(`symbols`), the functions specs and mods may call with each backend's spelling (`functions`),
and derivatives (`derivatives`)."""
