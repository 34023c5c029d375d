"""Triton code generation for general cascades: one kernel per stage of the schedule."""
