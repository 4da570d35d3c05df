"""Benchmark scripts and workloads for ordpool (run from the repository root; see README.md).

A package, so that ``ordpool bench --fn bench.tweets:project`` can import its functions in the
parent and in every worker.
"""
