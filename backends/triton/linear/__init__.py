"""The linear family's Triton kernels: generated forward and recurrent backward (forward.py,
recurrent_backward.py), the spec-independent chunked core kernels (core.py) and the chunked
backward around them (backward.py), launching (launch.py)."""
