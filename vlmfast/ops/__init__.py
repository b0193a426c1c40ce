"""Ops: each module ``vlmfast.ops.<op>`` holds the torch reference (``<op>_ref``), the backend entries registered
with the dispatcher, and the public entry ``<op>``. One stem per op across kernels/, csrc/, vlmfast/ops/, tests/
and benchmarks/. The stable function names are re-exported by :mod:`vlmfast.functional` (this package does not
re-export them, so that ``vlmfast.ops.<op>`` always names the module)."""
