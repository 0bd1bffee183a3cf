"""Throughput and latency harnesses; results are recorded in benchmarks/RESULTS.md."""
