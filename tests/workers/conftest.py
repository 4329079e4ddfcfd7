"""Fixtures for the tests of the example workers."""

from tests.openai_stub import openai_stub  # noqa: F401 (a fixture for these tests)
