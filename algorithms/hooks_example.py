"""Hooks: one JSON line per finished rollout and per pointer move, to a log file and/or a webhook.

    python -m algorithms.hooks_example --workers 2      # a local fleet whose workers run these hooks

Hooks run in the process where the event happens: pointer moves and enqueues in the algorithm,
a rollout's start, success and failure in the worker that ran it. So they are connected on
both sides: the algorithm calls :func:`install`, and the worker's ``-A`` app module does too,
at import, before Celery starts. This module is such an app module itself::

    HOOKS_LOG=/tmp/lq-hooks.jsonl LQ_AGENT=workers.demo_agent:agent celery -A algorithms.hooks_example worker

or, in your own worker module (``workers/my_agent.py``)::

    from algorithms.hooks_example import install
    install()
    app = create_app(agent=agent)

Where the lines go (environment variables, read by :func:`install`):

* ``HOOKS_LOG``: a file each event is appended to as one JSON line;
* ``HOOKS_WEBHOOK``: a URL each event is POSTed to as ``{"text": ...}`` (Slack-compatible),
  from a background thread, so a slow endpoint never holds up a rollout.

Uses only the public API of lightning_queue (``hooks``, ``create_app``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from lightning_queue import LightningClient, PromptTemplate, create_app, hooks

log = logging.getLogger(__name__)
_lock = threading.Lock()
_webhook_queue: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=10_000)


def finished_line(event: hooks.RolloutFinished) -> dict[str, Any]:
    return {"event": event.status, "rollout_id": event.rollout_id, "attempt": event.attempt,
            "snapshot": f"{event.resources_id}@{event.version}" if event.resources_id else None,
            "reward": event.reward, "error": event.error, "worker": event.worker_id, "pid": os.getpid()}


def pointer_line(event: hooks.PointerMoved) -> dict[str, Any]:
    return {"event": "pointer_move", "pointer": event.pointer, "from": event.from_id, "to": event.to_id,
            "by": event.by, "op": event.op, "reason": event.reason}


def _append(path: str, line: dict[str, Any]) -> None:
    with _lock, Path(path).open("a") as f:  # one write per line: lines of several processes do not interleave
        f.write(json.dumps(line) + "\n")


def _post_forever(url: str) -> None:
    with httpx.Client(timeout=5.0) as http:
        while True:
            line = _webhook_queue.get()
            try:
                http.post(url, json={"text": json.dumps(line)})
            except httpx.HTTPError as exc:
                log.warning("webhook %s: %s", url, exc)


def _emit(line: dict[str, Any]) -> None:
    path = os.environ.get("HOOKS_LOG")
    if path:
        _append(path, line)
    if os.environ.get("HOOKS_WEBHOOK"):
        try:
            _webhook_queue.put_nowait(line)
        except queue.Full:
            log.warning("webhook queue full; dropping %s", line.get("event"))


def on_finished(event: hooks.RolloutFinished) -> None:
    _emit(finished_line(event))


def on_pointer_move(event: hooks.PointerMoved) -> None:
    if event.pointer != "latest":  # latest moves on every write: only named pointers are news
        _emit(pointer_line(event))


_installed = False


def install() -> None:
    """Connect the hooks in this process (calling it again changes nothing)."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    hooks.on_success.connect(on_finished)
    hooks.on_failure.connect(on_finished)
    hooks.on_pointer_move.connect(on_pointer_move)
    url = os.environ.get("HOOKS_WEBHOOK")
    if url:
        threading.Thread(target=_post_forever, args=(url,), name="hooks-webhook", daemon=True).start()


def __getattr__(name: str) -> Any:
    """``app`` for ``celery -A algorithms.hooks_example worker``: the hooks installed, then the
    worker app (agent from ``LQ_AGENT``), made on first use rather than at import."""
    if name == "app":
        install()
        globals()["app"] = worker_app = create_app()
        return worker_app
    raise AttributeError(name)


def demo(client: LightningClient, rollouts: int = 4) -> None:
    """Two snapshots, prod protected and moved with a reason, a few rollouts waited on."""
    install()
    a = client.add_resources({"prompt": PromptTemplate(template="Q: {question}")}, message="baseline")
    b = client.add_resources({"prompt": PromptTemplate(template="Think, then answer. Q: {question}")},
                             message="ask it to think", parent=a.resources_id)
    client.set_pointer("prod", a.resources_id, reason="first release")
    client.protect_pointer("prod", "serves users")
    client.set_pointer("prod", b.resources_id, force=True, reason="the A/B test said so")
    enqueued = client.enqueue_rollouts([{"question": f"{i} + {i}", "answer": 2 * i} for i in range(rollouts)],
                                       resources_id="prod")
    client.wait_for_rollouts([r.rollout_id for r in enqueued], timeout=120)
    client.unprotect_pointer("prod")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=0, help="start a local fleet of N workers (default: use yours)")
    parser.add_argument("--rollouts", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("HOOKS_LOG", "hooks.jsonl")
    from algorithms.local import client_for

    with client_for(args.workers, app="algorithms.hooks_example") as client:
        started = time.monotonic()
        demo(client, args.rollouts)
        print(f"done in {time.monotonic() - started:.1f}s; events in {os.environ['HOOKS_LOG']}")


if __name__ == "__main__":
    main()
