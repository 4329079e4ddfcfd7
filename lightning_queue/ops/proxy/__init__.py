"""``lightning-queue proxy``: an OpenAI-compatible LLM proxy that runs every call of an attempt
with the LLM of the snapshot that attempt runs with, and records each call in its trace.

An agent is given its base URL by a :class:`~lightning_queue.ProxyLLM` resource (the worker
scopes it to the rollout and attempt); see :mod:`.app` for the routes and :mod:`.service` for
what happens to a call.
"""

from lightning_queue.ops.proxy.app import create_proxy_app
from lightning_queue.ops.proxy.service import LLMProxy

__all__ = ["LLMProxy", "create_proxy_app"]
