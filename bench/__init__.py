"""Benchmarks of the serving pipeline (`python -m bench`, `make bench`); not part of the tests."""
