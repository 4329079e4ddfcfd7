"""The Lua scripts of the registry and the store: every multi-key change is one script in ``lua/``.

Scripts name statuses through placeholders filled in from :mod:`lightning_queue.core.models`
(``__STATUSES__`` the status index order, ``__TERMINAL__``, ``__OPEN__``, ``__CLOSED__`` and ``__WAITING__``
the sets), so a status is spelled once, in Python (and so are the metric histograms' bucket bounds,
``__DURATION_BUCKETS__`` and ``__QUEUE_WAIT_BUCKETS__``, from :mod:`lightning_queue.core.metrics`); key
infixes likewise come from :class:`~lightning_queue.core.keys.Keys`, and ``__SPANS_SUFFIX__`` derives an
attempt's spans key as :mod:`~lightning_queue.core.keys` does.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from importlib import resources as importlib_resources

import redis
from redis.commands.core import Script

from lightning_queue.core.keys import Keys
from lightning_queue.core.metrics import DURATION_BUCKETS, OTHER, QUEUE_WAIT_BUCKETS
from lightning_queue.core.models import (
    CLOSED_ATTEMPT_STATUSES,
    OPEN_STATUSES,
    ROLLOUT_STATUSES,
    TERMINAL_STATUSES,
    WAITING_STATUSES,
)


def _lua_set(names: Iterable[str]) -> str:
    return ", ".join(f"['{name}'] = true" for name in sorted(names))


_PLACEHOLDERS = {
    "__STATUSES__": ", ".join(f"'{s}'" for s in ROLLOUT_STATUSES),
    "__TERMINAL__": _lua_set(TERMINAL_STATUSES),
    "__OPEN__": _lua_set(OPEN_STATUSES),
    "__CLOSED__": _lua_set(CLOSED_ATTEMPT_STATUSES),
    "__WAITING__": _lua_set(WAITING_STATUSES),
    # Key infixes (core/keys.py) the experiment tally builds its keys from.
    "__ROLLOUT_INFIX__": Keys.ROLLOUT_INFIX,
    "__EXPERIMENT_INFIX__": Keys.EXPERIMENT_INFIX,
    "__TALLY_INFIX__": Keys.TALLY_INFIX,
    "__REWARDS_INFIX__": Keys.REWARDS_INFIX,
    "__UNIT_REWARDS_INFIX__": Keys.UNIT_REWARDS_INFIX,
    "__SPANS_SUFFIX__": Keys.SPANS_SUFFIX,
    # The Prometheus aggregates (lua/_final_metrics.lua): their keys and histogram bounds.
    "__METRICS_INFIX__": Keys.METRICS_INFIX,
    "__METRICS_SNAPSHOTS_SUFFIX__": Keys.METRICS_SNAPSHOTS_SUFFIX,
    "__METRICS_SNAPSHOT_SUFFIX__": Keys.METRICS_SNAPSHOT_SUFFIX,
    "__METRICS_VARIANTS_SUFFIX__": Keys.METRICS_VARIANTS_SUFFIX,
    "__METRICS_VARIANT_SUFFIX__": Keys.METRICS_VARIANT_SUFFIX,
    "__METRICS_OTHER__": OTHER,
    "__DURATION_BUCKETS__": ", ".join(repr(float(b)) for b in DURATION_BUCKETS),
    "__QUEUE_WAIT_BUCKETS__": ", ".join(repr(float(b)) for b in QUEUE_WAIT_BUCKETS),
    # Keys the finished-rollouts cursor (_finished_stream.lua) derives from a rollout key.
    "__ENDED_SUFFIX__": Keys.ENDED_SUFFIX,
    "__FINISHED_SUFFIX__": Keys.FINISHED_SUFFIX,
}


@cache
def script_source(name: str) -> str:
    source = importlib_resources.files("lightning_queue.storage").joinpath("lua", f"{name}.lua").read_text()
    for placeholder, value in _PLACEHOLDERS.items():
        source = source.replace(placeholder, value)
    return source


def load_script(client: redis.Redis, name: str, *preludes: str) -> Script:
    """Register ``lua/<name>.lua`` on ``client``, after the shared ``lua/<prelude>.lua``
    files it builds on (EVALSHA, falling back to EVAL)."""
    return client.register_script("".join(script_source(p) for p in (*preludes, name)))
