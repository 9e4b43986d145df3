"""The plans and what runs them: a site's data, its candidate plans and their legality, a plan's
program over named tensors, the autograd.Function that executes it, and sparse dropout's ops.

The lowest layer: it imports nothing of runlora_fx above it (tests/test_package.py)."""
