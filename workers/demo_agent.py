"""The demo's agent as a worker entry point: ``celery -A workers.demo_agent worker``.

The agent itself (a simulated model that answers arithmetic the way the prompt asks, and a
grader) ships with the package in :mod:`lightning_queue.ops.demo.agent`, so that
``lightning-queue demo`` works from any install. Copy that module as the start of your own
agent, and this file as the start of its worker entry point.

    lightning-queue worker --agent workers.demo_agent:agent
"""

from __future__ import annotations

from lightning_queue import create_app
from lightning_queue.ops.demo.agent import agent

app = create_app(agent=agent)
"""So that ``celery -A workers.demo_agent worker`` works too."""

__all__ = ["agent", "app"]
