"""Follow the rollouts that finish, and resume after a crash exactly where it stopped.

    python -m algorithms.finished_log JOURNAL [--idle SECONDS] [--experiment NAME] [--pace SECONDS]

Appends one line per finished rollout to JOURNAL (``cursor rollout_id status reward``), in the order
they finished, until none finished for ``--idle`` seconds (default 10). Kill it at any moment (even
``kill -9``) and start it again: it reads the cursor from the journal's last line and goes on right
after it, so the journal holds every finished rollout exactly once.

Why exactly once: handling an item and saving its cursor are the same write here (one line, flushed
and fsynced). When what you do with a rollout lives elsewhere (a database, a model update), save the
cursor after doing it: a crash between the two then handles that one rollout again on restart (at
least once); write the cursor in the same transaction as the effect to make it exactly once.
Uses LQ_REDIS_URL / LQ_KEY_PREFIX like every lightning-queue program.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from lightning_queue import LightningClient, RolloutFilter


def last_cursor(journal: Path) -> str | None:
    """The cursor of the journal's last complete line (a line cut short by a crash is dropped)."""
    if not journal.exists():
        return None
    data = journal.read_bytes()
    if data and not data.endswith(b"\n"):  # torn by a crash mid-write: not handled, drop it
        data = data[: data.rfind(b"\n") + 1]
        with journal.open("r+b") as f:
            f.truncate(len(data))
    lines = data.decode().splitlines()
    return lines[-1].split()[0] if lines else None


def follow(client: LightningClient, journal: Path, idle_seconds: float, experiment: str | None = None,
           pace: float = 0.0) -> int:
    """Append every rollout finished after the journal's last cursor; return how many were appended."""
    wanted = RolloutFilter(experiment=experiment) if experiment else None
    appended = 0
    with journal.open("a") as out:
        for item in client.iter_finished_rollouts(last_cursor(journal), idle_seconds=idle_seconds, filter=wanted):
            reward = item.rollout.reward if item.rollout is not None else None
            out.write(f"{item.cursor} {item.rollout_id} {item.status} {reward}\n")
            out.flush()
            os.fsync(out.fileno())
            appended += 1
            if pace:
                time.sleep(pace)  # stands in for real work done with each rollout
    return appended


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("journal", type=Path)
    parser.add_argument("--idle", type=float, default=10.0, help="stop after this many seconds with nothing new")
    parser.add_argument("--experiment", help="only the rollouts of this experiment")
    parser.add_argument("--pace", type=float, default=0.0, help="seconds spent on each rollout")
    args = parser.parse_args()
    with LightningClient() as client:
        count = follow(client, args.journal, args.idle, args.experiment, args.pace)
    print(f"{count} finished rollouts appended to {args.journal}")


if __name__ == "__main__":
    main()
