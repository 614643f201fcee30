"""Placeholder-free bench entry: see run_benches."""
