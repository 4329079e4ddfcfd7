"""An optimizer in a process of its own, so a test can kill it (``python -m tests.integration.apo_process``).

Runs APO on the calculator agent with settings from ``LQ_*``; the critic's endpoint, the
run name and the pointer come from the command line. Prints the result's best snapshot.
"""

from __future__ import annotations

import sys

from lightning_queue import LLM
from lightning_queue.training import APO, Critic, Trainer
from tests.integration.test_training import TRAIN, VAL
from workers import calc_agent


def main(endpoint: str, run: str, pointer: str) -> None:
    critic = Critic(LLM(endpoint=endpoint, model="critic-model", api_key="sk-critic"))
    apo = APO(critic, rounds=1, branch_factor=2, val_batch_size=4, start=pointer, promote_to=pointer)
    with Trainer(apo, run_name=run, rollout_timeout=60) as trainer:
        result = trainer.fit(calc_agent.agent, TRAIN, VAL)
    print(result.best.resources_id)


if __name__ == "__main__":
    main(*sys.argv[1:])
