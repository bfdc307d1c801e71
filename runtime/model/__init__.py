"""The forward pass: the transformer (prompt path, Python over kernels), its ops, and the compiled one-token decode step (step)."""
