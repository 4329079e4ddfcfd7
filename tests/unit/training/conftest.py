"""Training on fakeredis: an inline fleet (each published rollout runs at once through the real
runner, in this process) and a critic scripted through httpx's mock transport."""

from __future__ import annotations

import itertools
import json
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from celery.exceptions import Retry

from lightning_queue import LLM, LightningClient, LitAgent, PromptTemplate, Rollout, RolloutResult, rollout
from lightning_queue.broker.app import make_celery
from lightning_queue.broker.publisher import Publisher
from lightning_queue.core.errors import RolloutFailed
from lightning_queue.training import Critic
from lightning_queue.training.critic import CRITIQUE_INSTRUCTIONS, EDIT_INSTRUCTIONS
from lightning_queue.worker import runner
from lightning_queue.worker.context import WorkerContext
from lightning_queue.worker.heartbeat import Heartbeat

SEED = "Q: {question}"
BETTER = "Use the calculator for every step. Q: {question}"
WORSE = "Answer at once, never use tools. Q: {question}"


@rollout
def calc(task: dict[str, Any], prompt: PromptTemplate) -> RolloutResult:
    """A deterministic stand-in for the calculator agent: a prompt that asks for the calculator
    gets every answer right; without it only the easy ones; "never" gets none."""
    text = prompt.format(question=task["question"])
    right = "never" not in text and ("calculator" in text or task.get("easy", False))
    return RolloutResult(reward=1.0 if right else 0.0, output={"prompt": text},
                         trace=[{"role": "user", "content": text}])


def arithmetic(n: int, prefix: str = "q") -> list[dict[str, Any]]:
    """``n`` questions, every fourth one easy."""
    return [{"id": f"{prefix}{i}", "question": f"{i} * 7 + 3", "answer": i * 7 + 3, "easy": i % 4 == 0}
            for i in range(n)]


@dataclass
class InlineFleet:
    """Runs every rollout the client publishes at once, through :func:`runner.run` on a worker
    context over the same fakeredis: the real claim, resolution, injection, recording and retry
    (a retry the runner publishes runs next, without its backoff)."""

    client: LightningClient
    agent: LitAgent
    ran: list[str] = field(default_factory=list)
    before_run: Callable[[str], None] | None = None

    def publish(self, rollouts: Sequence[Rollout], registry_seq: int = 0, countdown: float | None = None) -> None:
        settings = self.client.settings
        ctx = WorkerContext(settings=settings, redis=self.client.redis, registry=self.client.registry,
                            store=self.client.store, publisher=Publisher(make_celery(settings), settings),
                            heartbeat=Heartbeat(self.client.store, 3600))
        queue = deque(r.rollout_id for r in rollouts)
        ctx.publisher.publish = lambda again, *_, **__: queue.extend(  # type: ignore[method-assign]
            r.rollout_id for r in again)
        while queue:
            rollout_id = queue.popleft()
            if self.before_run is not None:
                self.before_run(rollout_id)
            self.ran.append(rollout_id)
            try:
                runner.run(ctx, self.agent, "inline@test", rollout_id, registry_seq)
            except (RolloutFailed, Retry):
                pass  # recorded on the rollout, as on a worker


@pytest.fixture
def fleet(fake_client: LightningClient, monkeypatch: pytest.MonkeyPatch) -> InlineFleet:
    inline = InlineFleet(fake_client, calc)
    monkeypatch.setattr(fake_client, "publish", inline.publish)
    return inline


@dataclass
class ScriptedCritic:
    """What a critic model answers: one critique text, then the edits in ``proposals`` in turn."""

    critique: str = "- the model guesses: tell it to use the calculator"
    proposals: list[str] = field(default_factory=lambda: [WORSE, BETTER])
    requests: list[dict[str, Any]] = field(default_factory=list)
    fail_on: int | None = None  # answer HTTP 500 to this request (1-based)

    def __post_init__(self) -> None:
        self._edits = itertools.cycle(self.proposals)

    def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.requests.append(body)
        if self.fail_on is not None and len(self.requests) == self.fail_on:
            return httpx.Response(500, json={"error": {"message": "scripted failure"}})
        system = body["messages"][0]["content"]
        if system == CRITIQUE_INSTRUCTIONS:
            content = self.critique
        else:
            assert system == EDIT_INSTRUCTIONS
            content = next(self._edits)
        return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": content}}]})

    @property
    def critiques(self) -> int:
        return sum(b["messages"][0]["content"] == CRITIQUE_INSTRUCTIONS for b in self.requests)

    def critic(self) -> Critic:
        return Critic(LLM(endpoint="http://critic.local/v1", model="critic-model", api_key="sk-critic"),
                      transport=httpx.MockTransport(self.handle))


@pytest.fixture
def scripted() -> Iterator[ScriptedCritic]:
    yield ScriptedCritic()
