"""The Lua scripts of the registry and the store: every multi-key change is one script in ``lua/``."""

from __future__ import annotations

from functools import cache
from importlib import resources as importlib_resources

import redis
from redis.commands.core import Script

from lightning_queue.core.keys import ROLLOUT_STATUSES


@cache
def _script_source(name: str) -> str:
    source = importlib_resources.files("lightning_queue.storage").joinpath("lua", f"{name}.lua").read_text()
    # The rollout statuses, in the order the status index keys are passed (Keys.all_status_indexes).
    return source.replace("__STATUSES__", ", ".join(f"'{s}'" for s in ROLLOUT_STATUSES))


def load_script(client: redis.Redis, name: str, *preludes: str) -> Script:
    """Register ``lua/<name>.lua`` on ``client``, after the shared ``lua/<prelude>.lua``
    files it builds on (EVALSHA, falling back to EVAL)."""
    return client.register_script("".join(_script_source(p) for p in (*preludes, name)))


