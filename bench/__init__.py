"""Benchmarks of tera_tn (not part of the installed package; see docs/benchmarks.md).

``python -m bench.suite --quick`` runs the whole comparison in one process; the single-topic
scripts (``bench_layer.py``, ``bench_materialize.py``, ``bench_spectrum.py``) run on their own too.
"""
