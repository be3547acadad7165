"""Strata's benchmark harness: ``python -m bench`` (``make bench``).

Every figure is measured against a real Kafka broker and, where it has a
baseline, reported as a ratio against the raw client on the same topic in
the same run. See :mod:`bench.registry` for adding a benchmark.
"""
