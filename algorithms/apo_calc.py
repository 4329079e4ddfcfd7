"""APO on the calculator agent: a critic model reads the rollouts that failed and edits the prompt.

    python -m algorithms.apo_calc                         # the repository's test server plays both models
    python -m algorithms.apo_calc --endpoint URL --model M  # a real model for the agent; the critic from LQ_CRITIC_*

Needs workers running the calculator agent on this queue (``celery -A workers.calc_agent worker``,
from the repository's root); the Trainer waits up to a minute for one. With the test server (it
listens on 127.0.0.1, so the workers must run on this machine) the agent's model uses its
calculator only when the prompt says so, and the scripted critic proposes one edit that makes
things worse and one that fixes them: the search must tell them apart and promote the fix.

The dataset is the demo's arithmetic questions (JSON lines), split in two by input id. The
optimizer starts from the snapshot the pointer ``--pointer`` names (made, with a prompt that
does not mention the calculator, if it does not exist) and promotes its winner there. Run it
twice with the same ``--run`` and the second call resumes (or returns the finished result).
Uses LQ_REDIS_URL / LQ_KEY_PREFIX / LQ_QUEUE like every lightning-queue program.
"""

from __future__ import annotations

import argparse
import uuid
from pathlib import Path

from lightning_queue import APO, LLM, Critic, Dataset, LightningClient, PromptTemplate, Trainer
from lightning_queue.training import APOResult
from workers import calc_agent

DATA = Path(__file__).resolve().parents[1] / "lightning_queue" / "ops" / "demo" / "data" / "arithmetic.jsonl"
START = "Answer the question. Question: {question}"
WORSE = "Answer the question from memory, quickly. Question: {question}"
BETTER = "Answer the question. Use the calculator tool for every operation. Question: {question}"


def optimize(client: LightningClient, llm: LLM, critic: Critic, *, pointer: str, run: str,
             n_runners: int = 1, **config: object) -> APOResult:
    """Start ``pointer`` at the calculator agent with ``llm`` and :data:`START` (unless it exists),
    then run APO from it on the demo's questions; ``config`` is :class:`~lightning_queue.training.APOConfig`'s."""
    if client.get_pointer(pointer) is None:
        start = client.add_resources({"llm": llm, "prompt": PromptTemplate(template=START)}, f"{pointer}-start",
                                     make_latest=False)
        client.set_pointer(pointer, start.resources_id)
    train, val = Dataset.from_jsonl(DATA).split(0.5, seed="apo_calc")
    settings = {"rounds": 2, "branch_factor": 2, "train_batch_size": 4, "val_batch_size": 4, **config}
    apo = APO(critic, start=pointer, promote_to=pointer, **settings)
    with Trainer(apo, client=client, run_name=run, n_runners=n_runners, rollout_timeout=600) as trainer:
        return trainer.fit(calc_agent.agent, train, val)


def report(result: APOResult) -> None:
    for c in result.candidates:
        p = f"{c.p_value:.3g}" if c.p_value is not None else "-"
        mean = f"{c.val_mean:.2f}" if c.val_mean is not None else "-"
        print(f"round {c.round}  {c.verdict:<9}  val mean {mean:>4}  pairs {c.pairs:>2}  p {p:>8}  {c.template!r}")
    for move in result.promotions:
        print(f"round {move.round}: promoted {move.to_id} to {move.pointer!r} (was {move.from_id})")
    if not result.promotions:
        print("nothing beat the start: nothing promoted")
    stats = result.stats
    print(f"{result.rollouts_spent} rollouts; {stats.wall_seconds:.1f} s, {stats.fleet_share:.0%} of it waiting on "
          f"the fleet ({result.stopped})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint", help="the agent's OpenAI-compatible endpoint (default: start the test server)")
    parser.add_argument("--model", default="calc-model", help="the agent's model")
    parser.add_argument("--pointer", default="calc-prod", help="the pointer to start from and promote to")
    parser.add_argument("--run", default=None, help="the run's name (the same name resumes it)")
    args = parser.parse_args()
    run = args.run or f"apo-calc-{uuid.uuid4().hex[:6]}"
    with LightningClient() as client:
        if args.endpoint:
            result = optimize(client, LLM(endpoint=args.endpoint, model=args.model), Critic(),
                              pointer=args.pointer, run=run)
        else:
            from tests.openai_stub import CalcScenario, OpenAIStub  # the repository's test server

            with OpenAIStub() as stub:
                CalcScenario(stub, proposals=[WORSE, BETTER])
                critic = Critic(LLM(endpoint=stub.endpoint, model=CalcScenario.CRITIC_MODEL))
                result = optimize(client, LLM(endpoint=stub.endpoint, model=CalcScenario.CALC_MODEL), critic,
                                  pointer=args.pointer, run=run)
    report(result)


if __name__ == "__main__":
    main()
