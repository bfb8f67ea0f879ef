"""Benchmarks that write JSON: ``python -m rankwise.bench <overhead|inference> run=<id> ...``."""
