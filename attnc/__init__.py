"""attnc: a compiler for attention variants."""
