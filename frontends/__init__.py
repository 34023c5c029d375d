"""Frontends: spec text (and, later, Python mods) into attnc's IR."""
