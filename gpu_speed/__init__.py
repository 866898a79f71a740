"""Answering fast on a GPU: fast_inference.py (fused projections, a compiled and CUDA-graphed
prefill and decode step); bench.py measures speed and memory (the README's table,
docs/bench-notes.md)."""
