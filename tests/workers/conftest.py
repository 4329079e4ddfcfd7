"""Fixtures for the tests of the example workers: ``openai_stub`` is in ``tests/conftest.py``."""
