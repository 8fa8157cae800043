"""Fixtures for tests, benchmarks and the demo: tiny random-weight models built from configs
and synthetic inputs (nothing is downloaded). Not part of the method."""
