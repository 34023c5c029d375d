"""The softmax family's Triton kernels: code generation (forward.py, backward.py) and launching
(launch.py)."""
