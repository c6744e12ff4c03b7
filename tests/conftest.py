"""Shared fixtures. The intake tests have their own in tests/intake/conftest.py."""
