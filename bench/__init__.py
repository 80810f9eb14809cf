"""Benchmarks: the same datums through datumflow, Celery on Redis and multiprocessing.Pool.

Run `python -m bench` from the repository root; bench/README.md describes what runs and why.
"""
