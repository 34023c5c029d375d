"""Reference interpreters: the meaning of the IR, literally (slow, exact with float64 inputs).
Tests and `attnc check` use them; the compiled path never imports them."""
