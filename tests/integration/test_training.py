"""Training against real workers: APO on the calculator agent, its critic and model scripted on the
repository's OpenAI-compatible test server; a crashed run resumed; dev mode against a worker.

The workers (``workers/calc_agent.py``'s app) are one fleet shared by the module; each test names
its own snapshots, pointers and run, so the tests do not see each other's. The models are
:class:`~tests.openai_stub.CalcScenario`'s: the agent's uses its calculator only when its prompt
says so, the critic proposes the edits a test lists.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from lightning_queue import LLM, LightningClient, PromptTemplate, Rollout
from lightning_queue.ops.fleet import worker_env
from lightning_queue.training import APO, Critic, Trainer, lineage
from tests.integration.conftest import REPO_ROOT
from tests.openai_stub import CalcScenario, OpenAIStub, last_user_text
from workers import calc_agent

APP = "workers.calc_agent"
FLEET = {"count": 2, "app": APP, "watchdog_interval": 1.0}  # health recorded every second: n_runners sees it soon
SEED = "Question: {question}"
BETTER = "Use the calculator tool for every step. Question: {question}"
WORSE = "Answer from memory. Question: {question}"


def questions(start: int, n: int) -> list[dict[str, Any]]:
    return [{"id": f"q{i}", "question": f"What is {i} * 13 + 4?", "answer": i * 13 + 4} for i in range(start, start + n)]


TRAIN = questions(1, 8)
VAL = questions(20, 8)


@pytest.fixture
def share(shared_workers: Any) -> Any:
    return shared_workers(None, **FLEET)


@pytest.fixture
def names() -> Iterator[tuple[str, str]]:
    """A run name and a pointer of this test's own."""
    uid = uuid.uuid4().hex[:6]
    yield f"apo-{uid}", f"prod-{uid}"


def start_at(client: LightningClient, stub: OpenAIStub, pointer: str, template: str) -> str:
    snapshot = client.add_resources({
        "llm": LLM(endpoint=stub.endpoint, model="calc-model", api_key="sk-test"),
        "prompt": PromptTemplate(template=template),
    }, f"{pointer}-start")
    client.set_pointer(pointer, snapshot.resources_id)
    return snapshot.resources_id


def critic(stub: OpenAIStub) -> Critic:
    return Critic(LLM(endpoint=stub.endpoint, model="critic-model", api_key="sk-critic"))


def test_apo_finds_the_better_prompt_within_its_budget_and_promotes_it(share: Any, openai_stub: OpenAIStub,
                                                                       names: tuple[str, str]) -> None:
    client, (run, pointer) = share.client, names
    scripted = CalcScenario(openai_stub, [WORSE, BETTER])
    start = start_at(client, openai_stub, pointer, SEED)
    latest = client.get_pointer("latest")
    apo = APO(critic(openai_stub), rounds=2, branch_factor=2, train_batch_size=4, val_batch_size=4,
              max_rollouts=60, start=pointer, promote_to=pointer)

    with Trainer(apo, client=client, run_name=run, n_runners=2, rollout_timeout=60, runners_timeout=30) as trainer:
        result = trainer.fit(calc_agent.agent, TRAIN, VAL)

    assert result.best.template == BETTER and result.best.verdict == "better"
    assert result.rollouts_spent <= 60 and result.stopped == "rounds"
    assert result.promoted is not None and result.promoted.round == 1
    assert (result.promoted.from_id, result.promoted.to_id) == (start, result.best.resources_id)
    assert client.get_pointer(pointer) == client.get_pointer(f"{run}.best") == result.best.resources_id
    assert client.get_pointer("latest") == latest  # candidates never took over unpinned rollouts
    steps = lineage(client, result.best.resources_id)
    assert [(s.template, s.critique, s.round) for s in steps] == [(BETTER, scripted.critique, 1), (SEED, None, 0)]
    assert (steps[-1].parent_id, steps[-1].parent_version) == (start, 1)
    assert scripted.critiques == 2  # round 1 on the start; round 2 on the start again (the winner failed nothing)
    assert set(scripted.first_turns().values()) == {1}
    # What the fleet runs when it follows the pointer is the winner, with its lineage beside it.
    followed = client.wait_for_rollouts([r.rollout_id for r in client.enqueue_rollouts(
        VAL[:2], resources_id=pointer, resolve="following")], timeout=60)
    assert [r.reward for r in followed] == [1.0, 1.0]
    assert [a.resources_id for r in followed for a in client.get_attempts(r.rollout_id)] == \
        [result.best.resources_id] * 2
    assert 0 < trainer.last_run.stats.fleet_share < 1  # type: ignore[union-attr]


def test_apo_with_a_critic_that_only_makes_things_worse_promotes_nothing(share: Any, openai_stub: OpenAIStub,
                                                                        names: tuple[str, str]) -> None:
    client, (run, pointer) = share.client, names
    CalcScenario(openai_stub, [WORSE, "Reply with a number only. Question: {question}"])
    start = start_at(client, openai_stub, pointer, BETTER)
    latest = client.get_pointer("latest")
    # Every rollout counts as bad (reward < 2): the critic is asked even about this perfect prompt.
    apo = APO(critic(openai_stub), rounds=1, branch_factor=2, val_batch_size=4, success_threshold=2.0,
              start=pointer, promote_to=pointer)

    with Trainer(apo, client=client, run_name=run, rollout_timeout=60) as trainer:
        result = trainer.fit(calc_agent.agent, TRAIN, VAL)

    assert result.promoted is None and not result.improved
    assert [c.verdict for c in result.candidates if c.round] == ["worse", "worse"]
    assert client.get_pointer(pointer) == start and client.get_pointer("latest") == latest
    assert [m.to_id for m in client.pointer_history(pointer)] == [start]


def test_a_crashed_apo_run_resumes_from_its_snapshots_and_pointers(share: Any, openai_stub: OpenAIStub,
                                                                  names: tuple[str, str]) -> None:
    client, (run, pointer) = share.client, names
    scripted = CalcScenario(openai_stub, [WORSE, BETTER])
    start_at(client, openai_stub, pointer, SEED)
    # The model holds its answers for one validation input: the optimizer is then waiting on the
    # fleet, midway through its first look, with rollouts finished, running and queued.
    hold, held = threading.Event(), threading.Event()

    def calc(body: dict[str, Any]) -> str | None:
        if VAL[1]["question"] in last_user_text(body) and len(body["messages"]) == 1:
            held.set()
            hold.wait(30)
        return scripted.calc(body)

    openai_stub.script("calc-model", calc)
    optimizer = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.apo_process", openai_stub.endpoint, run, pointer],
        env=worker_env(share.settings, None, [str(REPO_ROOT)]), cwd=REPO_ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    try:
        assert held.wait(60), optimizer.communicate(timeout=5)[0] if optimizer.poll() is not None else "no hold"
        optimizer.kill()  # SIGKILL: nothing of it survives but what it wrote to Redis
        optimizer.wait(10)
    finally:
        hold.set()
        if optimizer.poll() is None:
            optimizer.kill()
    assert optimizer.returncode == -signal.SIGKILL
    assert scripted.critiques == 1 and client.get_pointer(f"{run}.best") is not None
    spent_before = int(client.redis.hget(client.keys.training_run(run), "rollouts") or 0)
    assert spent_before == 4 + 12  # the training batch, and the first look it was waiting on

    # A new process: a new optimizer and Trainer, the same run name.
    apo = APO(critic(openai_stub), rounds=1, branch_factor=2, val_batch_size=4, start=pointer, promote_to=pointer)
    with Trainer(apo, client=LightningClient(share.settings), run_name=run, rollout_timeout=60) as trainer:
        result = trainer.fit(calc_agent.agent, TRAIN, VAL)

    assert scripted.critiques == 1  # the critique and its proposals were kept, not asked for again
    assert result.best.template == BETTER and client.get_pointer(pointer) == result.best.resources_id
    assert trainer.last_run is not None
    # The look it died waiting on was waited for, not enqueued again; the training batch, whose
    # critique was kept, was not even asked for.
    assert trainer.last_run.stats.rollouts_reused == 12
    assert trainer.last_run.stats.rollouts_created == result.rollouts_spent - spent_before
    # Every rollout of the run ran once on the fleet, the crash notwithstanding.
    assert set(scripted.first_turns().values()) == {1}
    assert sum(scripted.first_turns().values()) == result.rollouts_spent


def test_dev_runs_the_agent_inline_with_the_results_a_worker_gives(share: Any, openai_stub: OpenAIStub,
                                                                  names: tuple[str, str]) -> None:
    client, (_, pointer) = share.client, names
    CalcScenario(openai_stub, [])
    snapshot = start_at(client, openai_stub, pointer, "Use the calculator. {question}")
    inputs = [*questions(40, 2), {"id": "plain", "question": "Say hello", "answer": 1}]

    on_workers = client.wait_for_rollouts(
        [r.rollout_id for r in client.enqueue_rollouts(inputs, resources_id=snapshot)], timeout=60)
    inline = Trainer(client=client).dev(calc_agent.agent, inputs, snapshot)

    def seen(r: Rollout) -> tuple[Any, ...]:
        assert r.result is not None
        trace = [{k: v for k, v in m.items() if k not in ("tool_call_id", "tool_calls")} for m in r.result.trace or []]
        return r.status, r.attempt_count, r.reward, r.result.output, trace

    assert [seen(r) for r in inline] == [seen(r) for r in on_workers]
    assert [r.reward for r in inline] == [1.0, 1.0, 0.0]
    assert [(r.resources_id, r.resources_version) for r in inline] == [(snapshot, 1)] * 3
