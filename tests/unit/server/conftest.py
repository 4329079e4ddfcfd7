"""The server's app on fakeredis: a client with snapshots, pointers, an experiment and rollouts."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import fakeredis
import pytest
from fastapi.testclient import TestClient

from lightning_queue import LLM, LightningClient, PromptTemplate, Rollout
from lightning_queue.core.models import ErrorInfo, RolloutResult
from lightning_queue.experiments.manager import Experiment, Experiments, Variant
from lightning_queue.ops.server import ServerConfig, create_app

API_KEY = "sk-live-0123456789abcdef"  # must never appear in a response
PASSWORD = "correct horse battery staple"
TOKEN = "tok-5e3a9c1d"


def finish(client: LightningClient, rollouts: list[Rollout], outcome: Callable[[Rollout], tuple[str, float | None]]) -> None:
    """Run the rollouts through the store's own scripts, as a worker would."""
    store = client.store
    for rollout in rollouts:
        status, reward = outcome(rollout)
        claim = store.claim(rollout, "sim@host")
        store.start_attempt(rollout.rollout_id, claim.sequence_id, rollout.resources_id or "rs-a",
                            rollout.resources_version or 1)
        if status == "succeeded":
            store.finish_attempt(rollout.rollout_id, claim.sequence_id, "succeeded", "succeeded",
                                 result=RolloutResult(reward=reward, trace=[{"name": "llm", "tokens": 3}]))
        else:
            store.finish_attempt(rollout.rollout_id, claim.sequence_id, "failed", "failed",
                                 error=ErrorInfo(type="ToolError", message="the tool broke"))


@pytest.fixture
def seeded(fake_client: LightningClient, monkeypatch: pytest.MonkeyPatch) -> LightningClient:
    """rs-a (v1, v2: the template and the key changed), rs-b; pointers prod -> rs-a, latest -> rs-b;
    experiment ab running with 80 finished rollouts; 5 plain queued rollouts."""
    client = fake_client
    llm = LLM(endpoint="http://llm.local/v1", model="m1", api_key=API_KEY)
    client.add_resources({"llm": llm, "prompt": PromptTemplate(template="Solve: {question}")}, "rs-a")
    client.update_resources("rs-a", {"llm": llm.model_copy(update={"model": "m2"}),
                                     "prompt": PromptTemplate(template="Think step by step. Solve: {question}")})
    client.add_resources({"llm": llm, "prompt": PromptTemplate(template="b {question}")}, "rs-b")
    client.set_pointer("prod", "rs-a")
    client.set_pointer("prod", "rs-b")
    client.set_pointer("prod", "rs-a")
    monkeypatch.setattr(client, "publish", lambda rollouts, seq=0: None)  # nothing runs unless finished here
    experiments = Experiments(client)
    experiments.create(Experiment(name="ab", unit_key="input.user", variants=[
        Variant(name="control", resources_id="rs-a"), Variant(name="treatment", resources_id="rs-b")]))
    experiments.start("ab")
    rollouts = experiments.enqueue("ab", [{"user": f"u{i}"} for i in range(80)])
    finish(client, rollouts, lambda r: ("failed", None) if r.input["user"] == "u3" else
           ("succeeded", 0.9 if r.metadata["variant"] == "treatment" else 0.4 + 0.01 * (int(r.input["user"][1:]) % 5)))
    client.enqueue_rollouts([{"q": i} for i in range(5)], resources_id="rs-b", mode="val")
    return client


def app_client(client: LightningClient, fake_redis: fakeredis.FakeRedis, **config: Any) -> TestClient:
    server = fake_redis.connection_pool.connection_kwargs["server"]
    app = create_app(ServerConfig(**config), client=client,
                     async_redis=lambda: fakeredis.FakeAsyncRedis(server=server))
    return TestClient(app, base_url=f"http://{config.get('host', '127.0.0.1')}:8780")


@pytest.fixture
def loopback(seeded: LightningClient, fake_redis: fakeredis.FakeRedis) -> Iterator[TestClient]:
    """The server on loopback, with a password: anonymous reads, changes with credentials."""
    with app_client(seeded, fake_redis, password=PASSWORD, token=TOKEN) as http:
        yield http


@pytest.fixture
def exposed(seeded: LightningClient, fake_redis: fakeredis.FakeRedis) -> Iterator[TestClient]:
    """The server as if it listened on every interface: every request needs credentials."""
    with app_client(seeded, fake_redis, host="0.0.0.0", password=PASSWORD, token=TOKEN) as http:
        yield http
