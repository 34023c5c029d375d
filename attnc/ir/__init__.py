"""attnc's IR levels: the cascade (cascade.py: FuseMax's extended einsums, the softmax family's
frontend and middle level), the attention kernel (kernel.py), the scan (linear.py: a `linear`
block) and its kernel plan (linear_kernel.py). Each module states what valid IR is (`verify`)."""
