"""What a plan costs: counted (FLOPs, bytes, saved bytes, GEMM calls, random draws), predicted
by the roofline model, or timed on the device (with the cache that keeps measurements); and
what the partitioned graphs really save and compute, the check on those counts.

Imports only `ir` (tests/test_package.py)."""
