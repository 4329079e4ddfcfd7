"""APO on the calculator agent with a scripted critic: what an accepted improvement costs in
rollouts, and where the optimizer's wall time goes.

    python benchmarks/bench_apo.py [--quick]

Uses the Redis at ``LQ_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``), or starts an
embedded one when nothing answers there, under a fresh key prefix whose keys it deletes at the
end. Starts 2 real ``celery worker`` processes running ``workers/calc_agent.py`` and the
repository's OpenAI-compatible test server (``tests/openai_stub.py``), which plays both models:
the agent's uses its calculator only when its prompt says so, and the critic proposes edits
from a list in which one template (mentioning the calculator) fixes every answer and the
others do not. Each trial is a fresh run (3 rounds, beam 2, 2 edits per template, training
minibatches of 4, validation looks of 4 over 12 inputs) with the good edit at another place in
the critic's list. See ``benchmarks/README.md`` for what each row means.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # workers/, tests/openai_stub.py

from lightning_queue import APO, LLM, Critic, Dataset, LightningClient, PromptTemplate, Settings, Trainer
from lightning_queue.ops.embedded import ensure_redis
from lightning_queue.ops.fleet import LocalFleet
from lightning_queue.training import APOResult
from tests.conftest import delete_prefix
from tests.openai_stub import CalcScenario, OpenAIStub
from workers import calc_agent

DATA = ROOT / "lightning_queue" / "ops" / "demo" / "data" / "arithmetic.jsonl"
START = "Answer the question. Question: {question}"
GOOD = "Answer the question. Use the calculator tool for every operation. Question: {question}"
BAD = [
    "Answer the question from memory, quickly. Question: {question}",
    "Answer the question with a single number. Question: {question}",
    "Think about the question, then answer it. Question: {question}",
    "Answer the question. Be careful with the order of operations. Question: {question}",
]
CONFIG: dict[str, Any] = {"rounds": 3, "beam_width": 2, "branch_factor": 2, "train_batch_size": 4, "val_batch_size": 4}


class SlowCritic:
    """The scenario's critic answering after ``seconds``: a real critic model takes that long or more."""

    def __init__(self, scenario: CalcScenario, seconds: float) -> None:
        self.scenario = scenario
        self.seconds = seconds
        scenario.stub.script(CalcScenario.CRITIC_MODEL, self.answer)

    def answer(self, body: dict[str, Any]) -> str:
        time.sleep(self.seconds)  # the simulated model's latency, not a synchronization
        return self.scenario.critic(body)


def trial(client: LightningClient, stub: OpenAIStub, train: Dataset, val: Dataset, good_at: int,
          test: str, critic_seconds: float = 0.0) -> APOResult:
    """One run whose critic proposes ``good_at`` bad edits before the good one."""
    proposals = [*BAD[:good_at], GOOD, *BAD[good_at:]]
    scenario = CalcScenario(stub, proposals)
    if critic_seconds:
        SlowCritic(scenario, critic_seconds)
    uid = uuid.uuid4().hex[:6]
    pointer = f"calc-{uid}"
    start = client.add_resources({"llm": LLM(endpoint=stub.endpoint, model=CalcScenario.CALC_MODEL),
                                  "prompt": PromptTemplate(template=START)}, f"{pointer}-start", make_latest=False)
    client.set_pointer(pointer, start.resources_id)
    apo = APO(Critic(LLM(endpoint=stub.endpoint, model=CalcScenario.CRITIC_MODEL)), start=pointer,
              promote_to=pointer, test=test, **CONFIG)
    with Trainer(apo, client=client, run_name=f"bench-{uid}", rollout_timeout=300) as trainer:
        return trainer.fit(calc_agent.agent, train, val)


def spread(values: list[float], unit: str = "", digits: int = 0) -> str:
    shown = [f"{v:.{digits}f}" for v in (statistics.median(values), min(values), max(values))]
    return f"{shown[0]}{unit} (min {shown[1]}, max {shown[2]}, {len(values)} runs)"


def run(url: str, prefix: str, quick: bool) -> list[tuple[str, str]]:
    settings = Settings(redis_url=url, key_prefix=prefix, queue=f"{prefix}-q")
    train, val = Dataset.from_jsonl(DATA).split(0.5, seed="bench_apo")
    positions = [0, 2] if quick else [0, 1, 2, 3]
    # scipy (the statistics) costs a second to import, once per process: paid here, not in a run's own work.
    import lightning_queue.experiments.stats  # noqa: F401

    rows: list[tuple[str, str]] = []
    with LocalFleet(settings, None, count=2, app="workers.calc_agent", pythonpath=[str(ROOT)], cwd=str(ROOT)), \
            OpenAIStub() as stub, LightningClient(settings) as client:
        trial(client, stub, train, val, 0, "sequential")  # warm-up: worker caches, connections
        results: dict[str, list[APOResult]] = {}
        for test in ("sequential", "paired"):
            results[test] = [trial(client, stub, train, val, at, test) for at in positions]
        slow = [trial(client, stub, train, val, at, "sequential", critic_seconds=0.5)
                for at in positions[:1 if quick else 2]]

    for test, runs in results.items():
        found = [r for r in runs if r.promoted is not None]
        wrong = [r for r in found if r.best.template != GOOD]
        rows.append((f"{test}: runs that promoted the good edit", f"{len(found) - len(wrong)} of {len(runs)} "
                                                                  f"({len(wrong)} promoted a bad one)"))
        if found:
            rows.append((f"{test}: rollouts spent when the improvement was accepted",
                         spread([float(r.promotions[0].rollouts) for r in found])))
        rows.append((f"{test}: rollouts per accepted improvement, whole run ({CONFIG['rounds']} rounds)",
                     spread([r.rollouts_spent / max(1, len(r.promotions)) for r in runs])))
        rows.append((f"{test}: edits compared per run", spread([float(sum(c.round > 0 for c in r.candidates))
                                                                for r in runs])))
        decided = [c.pairs for r in runs for c in r.candidates if c.round > 0]
        rows.append((f"{test}: validation pairs per compared edit (of {len(val)})", spread([float(p) for p in decided],
                                                                                          digits=1)))
    for label, runs in (("instant critic", results["sequential"]), ("critic answering in 0.5 s", slow)):
        rows.append((f"time per run, {label}: wall", spread([r.stats.wall_seconds for r in runs], " s", 2)))
        rows.append((f"time per run, {label}: waiting on the fleet",
                     spread([100 * r.stats.fleet_share for r in runs], " %", 0)))
        rows.append((f"time per run, {label}: the optimizer's own work",
                     spread([100 * (1 - r.stats.fleet_share) for r in runs], " %", 0)))
        rows.append((f"time per run, {label}: rollouts per second while waiting",
                     spread([r.stats.rollouts_created / max(r.stats.fleet_seconds, 1e-9) for r in runs], "", 0)))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs (a smoke run)")
    args = parser.parse_args()
    url, server = ensure_redis(os.environ.get("LQ_REDIS_URL", "redis://127.0.0.1:6379/0"))
    prefix = f"lqbench-{uuid.uuid4().hex[:10]}"
    print(f"Redis at {url} ({'embedded ' + server.kind if server else 'existing'}), prefix {prefix}, "
          f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, 2 workers x 1 process\n")
    try:
        rows = run(url, prefix, args.quick)
    finally:
        delete_prefix(url, prefix)
        if server is not None:
            server.stop()
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  result")
    print(f"{'-' * width}  ------")
    for measure, result in rows:
        print(f"{measure:<{width}}  {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
