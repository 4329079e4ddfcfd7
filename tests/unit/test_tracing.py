"""Traces on the worker side (the runner on fakeredis): the root span, nested and emitted spans,
LLM usage and its rollups, the size limit, expiry, trace context, ProxyLLM scoping."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import fakeredis
import pytest
from opentelemetry import trace

from lightning_queue import (
    LLM,
    InvalidRewardError,
    LightningClient,
    PromptTemplate,
    ProxyLLM,
    Rollout,
    RolloutResult,
    emit_exception,
    emit_message,
    emit_object,
    emit_reward,
    llm_call,
    rollout,
)
from lightning_queue.broker.app import make_celery
from lightning_queue.broker.publisher import Publisher
from lightning_queue.core import traces as t
from lightning_queue.core.errors import AttemptNotFoundError, RolloutFailed, RolloutNotFoundError
from lightning_queue.core.traces import LLMPrice, Usage
from lightning_queue.storage.traces import decode_batch, encode_batch, encode_entry
from tests.unit.test_runner import FakeTask, run

PRICES = {"tiny": LLMPrice(input=1.0, output=2.0)}

CHAT_REQUEST = {"model": "tiny", "temperature": 0.2, "messages": [{"role": "user", "content": "What is 2 + 2?"}]}
CHAT_RESPONSE = {"id": "chatcmpl-1", "model": "tiny-2024", "usage": {"prompt_tokens": 10, "completion_tokens": 4},
                 "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "4"}}]}


@pytest.fixture
def priced_client(fake_redis: fakeredis.FakeRedis, fake_client: LightningClient) -> LightningClient:
    settings = fake_client.settings.model_copy(update={"llm_prices": PRICES})
    return LightningClient(settings, redis_client=fake_redis)


@rollout
def traced_agent(task: dict[str, Any], llm: LLM) -> RolloutResult:
    """Opens a span with plain OpenTelemetry, makes two 'LLM calls', uses a tool, emits everything."""
    tracer = trace.get_tracer("test-agent")
    with tracer.start_as_current_span("plan") as plan:
        plan.set_attribute("step", 1)
        for turn in range(2):
            with llm_call({**CHAT_REQUEST, "messages": [{"role": "user", "content": f"turn {turn}"}]}, llm) as call:
                call.record(CHAT_RESPONSE)
            emit_reward(0.1 * (turn + 1), name="step")
        with tracer.start_as_current_span("tool calculator", attributes={t.GEN_AI_TOOL_NAME: "calculator"}):
            pass
        emit_message("thinking done", turn=2)
        emit_object({"plan": [1, 2]}, name="plan")
        emit_exception(ValueError("recovered"))
    emit_reward(1.0, name="accuracy", primary=True)
    emit_reward(0.5, name="brevity")
    return RolloutResult(output={"ok": True})


def test_an_attempt_has_a_root_span_with_its_ids_and_everything_nested_under_it(
    priced_client: LightningClient, llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(priced_client, "publish", lambda rollouts, registry_seq=0: None)
    priced_client.add_resources({"llm": llm}, "rs-t")
    priced_client.update_resources("rs-t", {"llm": llm})
    queued = priced_client.enqueue_rollout({"q": 1}, resources_id="rs-t",
                                           metadata={"experiment": "exp", "variant": "b"})

    run(FakeTask(priced_client, traced_agent), queued.rollout_id)

    done = priced_client.get_rollout(queued.rollout_id)
    assert done.status == "succeeded"
    # The reward is the primary one emitted (the agent returned none); every name's last value is kept.
    assert done.result is not None and done.reward == 1.0
    assert done.result.rewards == {"step": pytest.approx(0.2), "accuracy": 1.0, "brevity": 0.5}
    attempt, = priced_client.get_attempts(queued.rollout_id)
    spans = priced_client.query_spans(queued.rollout_id)
    by_name = {s.name: s for s in spans}
    root = by_name[t.ATTEMPT_SPAN]
    assert root.parent_id is None
    assert root.attributes[t.ROLLOUT_ID] == queued.rollout_id
    assert root.attributes[t.ATTEMPT_ID] == attempt.attempt_id == root.attempt_id
    assert (root.attributes[t.RESOURCES_ID], root.attributes[t.RESOURCES_VERSION]) == ("rs-t", 2)
    assert (root.attributes[t.EXPERIMENT], root.attributes[t.VARIANT]) == ("exp", "b")
    assert (root.attributes[t.STATUS], root.attributes[t.FINAL_REWARD]) == ("succeeded", 1.0)
    plan = by_name["plan"]
    assert plan.parent_id == root.span_id and plan.attributes["step"] == 1
    calls = [s for s in spans if s.is_llm_call]
    assert len(calls) == 2 and {c.parent_id for c in calls} == {plan.span_id}
    assert calls[0].kind == "client" and calls[0].attributes[t.GEN_AI_REQUEST_MODEL] == "tiny"
    assert calls[0].attributes["gen_ai.request.temperature"] == 0.2
    assert (calls[0].input_tokens, calls[0].output_tokens) == (10, 4)
    assert calls[0].cost == pytest.approx((10 * 1.0 + 4 * 2.0) / 1e6)
    assert by_name["tool calculator"].parent_id == plan.span_id
    assert by_name[t.MESSAGE_SPAN].attributes == {t.MESSAGE_TEXT: "thinking done", "turn": 2}
    assert json.loads(by_name[f"{t.OBJECT_SPAN} plan"].attributes[t.OBJECT_JSON]) == {"plan": [1, 2]}
    exception = by_name[t.EXCEPTION_SPAN]
    assert exception.status == "error" and exception.events[0].name == "exception"
    assert [(name, value) for name, value, _, _ in t.rewards(spans)] == [
        ("step", pytest.approx(0.1)), ("step", pytest.approx(0.2)), ("accuracy", 1.0), ("brevity", 0.5)]
    assert {s.trace_id for s in spans} == {root.trace_id}
    depth = {s.name: d for d, s in t.tree(spans)}
    assert depth[t.ATTEMPT_SPAN] == 0 and depth["plan"] == 1 and depth["tool calculator"] == 2
    # Usage: on the attempt, the rollout, the snapshot version and the experiment variant.
    expected = {"attempts": 0, "llm_calls": 2, "input_tokens": 20, "output_tokens": 8,
                "cost_usd": pytest.approx(2 * (10 + 8) / 1e6), "unpriced_calls": 0}
    assert attempt.usage is not None and attempt.usage.model_dump() == expected
    rolled = {**expected, "attempts": 1}
    assert priced_client.get_usage(queued.rollout_id).model_dump() == rolled
    by_version, by_variant = priced_client.usage_by_version("rs-t"), priced_client.usage_by_variant("exp")
    assert list(by_version) == [2] and by_version[2].model_dump() == rolled
    assert list(by_variant) == ["b"] and by_variant["b"].model_dump() == rolled
    # Triplets: one per LLM call, in order; each gets the reward emitted after it (the primary
    # one when several were: the last call is followed by step, accuracy (primary) and brevity).
    first, second = priced_client.get_triplets(queued.rollout_id)
    assert first.prompt == [{"role": "user", "content": "turn 0"}]
    assert second.prompt == [{"role": "user", "content": "turn 1"}]
    assert first.response == {"role": "assistant", "content": "4"}
    assert (first.reward, second.reward) == (pytest.approx(0.1), 1.0)
    assert (first.model, first.input_tokens, first.output_tokens) == ("tiny-2024", 10, 4)


def test_a_returned_reward_wins_and_a_trace_without_llm_calls_costs_nothing(
    fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM
) -> None:
    @rollout
    def agent(task: Any) -> float:
        emit_reward(0.3)
        return 0.9

    fake_client.add_resources({"llm": llm}, "rs-r")
    queued = enqueue(resources_id="rs-r")
    run(FakeTask(fake_client, agent), queued.rollout_id)

    done = fake_client.get_rollout(queued.rollout_id)
    assert done.reward == 0.9 and done.result is not None and done.result.rewards == {"reward": 0.3}
    attempt, = fake_client.get_attempts(queued.rollout_id)
    assert attempt.usage is None
    assert fake_client.usage_by_version("rs-r") == {1: Usage(attempts=1)}
    triplets = fake_client.get_triplets(queued.rollout_id)
    assert triplets == []


def test_a_failed_attempt_keeps_its_trace_with_the_exception_on_the_root(
    fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM
) -> None:
    @rollout
    def agent(task: Any) -> float:
        emit_message("about to fail")
        raise RuntimeError("agent broke")

    fake_client.add_resources({"llm": llm})
    queued = enqueue()
    with pytest.raises(Exception, match="agent broke"):
        run(FakeTask(fake_client, agent), queued.rollout_id)

    spans = fake_client.query_spans(queued.rollout_id)
    root = next(s for s in spans if s.name == t.ATTEMPT_SPAN)
    assert root.status == "error" and root.attributes[t.STATUS] == "failed"
    assert root.events[0].attributes["exception.type"] == "RuntimeError"
    assert [s.name for s in spans if s.parent_id == root.span_id] == [t.MESSAGE_SPAN]


def test_a_trace_past_the_size_limit_is_stored_truncated_with_a_marker_and_nothing_else_is_lost(
    fake_redis: fakeredis.FakeRedis, fake_client: LightningClient, llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = fake_client.settings.model_copy(update={"trace_max_bytes": 8192})
    client = LightningClient(settings, redis_client=fake_redis)
    monkeypatch.setattr(client, "publish", lambda rollouts, registry_seq=0: None)

    @rollout
    def chatty(task: Any) -> RolloutResult:
        tracer = trace.get_tracer("chatty")
        for i in range(500):
            with tracer.start_as_current_span(f"step {i}", attributes={"payload": "x" * 200}):
                pass
        emit_reward(0.7, name="final", primary=True)
        return RolloutResult(output={"steps": 500})

    client.add_resources({"llm": llm})
    queued = client.enqueue_rollout("big")
    run(FakeTask(client, chatty), queued.rollout_id)

    done = client.get_rollout(queued.rollout_id)
    assert (done.status, done.reward, done.result.output) == ("succeeded", 0.7, {"steps": 500})
    attempt, = client.get_attempts(queued.rollout_id)
    spans = client.query_spans(queued.rollout_id)
    names = [s.name for s in spans]
    assert t.ATTEMPT_SPAN in names and names.count(t.TRUNCATED_SPAN) == 1
    marker = next(s for s in spans if s.name == t.TRUNCATED_SPAN)
    kept = sum(n.startswith("step ") for n in names)
    assert 0 < kept < 500
    # Every span the agent made (the steps and the reward) is either stored or counted in the marker.
    stored = [s for s in spans if s.name not in (t.ATTEMPT_SPAN, t.TRUNCATED_SPAN)]
    assert len(stored) + marker.attributes[t.DROPPED_SPANS] == 500 + 1
    assert attempt.spans_dropped == marker.attributes[t.DROPPED_SPANS]
    assert marker.attributes[t.MAX_BYTES] == 8192 and marker.status == "error"
    stored_bytes = sum(len(b) for b in fake_redis.lrange(client.keys.attempt_spans(queued.rollout_id, 1), 0, -1))
    assert stored_bytes < 8192  # compressed, and bounded


def test_the_trace_expires_with_the_rollout(
    fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM
) -> None:
    fake_client.add_resources({"llm": llm})
    queued = enqueue()
    run(FakeTask(fake_client, traced_agent), queued.rollout_id)

    key = fake_client.keys.attempt_spans(queued.rollout_id, 1)
    rollout_ttl = fake_client.redis.ttl(fake_client.keys.rollout(queued.rollout_id))
    assert rollout_ttl > 0 and abs(fake_client.redis.ttl(key) - rollout_ttl) <= 1


def test_a_refused_outcome_still_records_its_trace_and_a_gone_rollout_gets_none(
    fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM
) -> None:
    fake_client.add_resources({"llm": llm})

    @rollout
    def cancelled_meanwhile(task: Any, rollout: Rollout) -> float:
        fake_client.cancel_rollout(rollout.rollout_id, terminate=False)
        emit_reward(0.4)
        return 0.4

    queued = enqueue()
    run(FakeTask(fake_client, cancelled_meanwhile), queued.rollout_id)
    assert fake_client.get_rollout(queued.rollout_id).status == "cancelled"
    spans = fake_client.query_spans(queued.rollout_id)
    assert t.REWARD_SPAN in [s.name for s in spans]
    key = fake_client.keys.attempt_spans(queued.rollout_id, 1)
    assert fake_client.redis.ttl(key) > 0  # written after the rollout finished: expires with it

    @rollout
    def deleted_meanwhile(task: Any, rollout: Rollout) -> float:
        fake_client.redis.delete(fake_client.keys.rollout(rollout.rollout_id))
        return 1.0

    gone = enqueue()
    run(FakeTask(fake_client, deleted_meanwhile), gone.rollout_id)
    assert not fake_client.redis.exists(fake_client.keys.attempt_spans(gone.rollout_id, 1))
    with pytest.raises(RolloutNotFoundError):
        fake_client.query_spans(gone.rollout_id)


def test_unknown_attempt_ids_raise(fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM) -> None:
    fake_client.add_resources({"llm": llm})
    queued = enqueue()
    assert fake_client.query_spans(queued.rollout_id) == []
    with pytest.raises(AttemptNotFoundError, match="has no attempt 'at-nope'"):
        fake_client.query_spans(queued.rollout_id, "at-nope")


def test_the_span_that_enqueued_a_rollout_is_the_parent_of_its_attempt(
    fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM
) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    fake_client.add_resources({"llm": llm})
    algorithm = TracerProvider().get_tracer("algorithm")
    with algorithm.start_as_current_span("optimize step") as step:
        queued = enqueue()
    context = step.get_span_context()
    assert queued.traceparent is not None
    assert queued.traceparent.startswith(f"00-{context.trace_id:032x}-{context.span_id:016x}-")
    assert fake_client.get_rollout(queued.rollout_id).traceparent == queued.traceparent
    # The task message carries it as the W3C header.
    publisher = Publisher(make_celery(fake_client.settings), fake_client.settings)
    message = json.loads(publisher.build([queued], [(None, None)]).by_queue[queued.queue][0])
    assert message["headers"]["traceparent"] == queued.traceparent

    task = FakeTask(fake_client, traced_agent)
    seq = int(fake_client.redis.get(fake_client.keys.seq) or 0)
    from lightning_queue.worker import runner

    runner.run(task.ctx, task.agent, task.hostname, queued.rollout_id, seq, traceparent=queued.traceparent)

    root = next(s for s in fake_client.query_spans(queued.rollout_id) if s.name == t.ATTEMPT_SPAN)
    assert root.trace_id == f"{context.trace_id:032x}" and root.parent_id == f"{context.span_id:016x}"
    assert enqueue().traceparent is None  # no span open: none


def test_a_proxy_llm_is_handed_to_the_agent_scoped_to_its_attempt_without_the_key(
    fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM
) -> None:
    seen: list[LLM] = []

    @rollout
    def agent(task: Any, llm: LLM, prompt: PromptTemplate) -> float:
        seen.append(llm)
        with llm_call(CHAT_REQUEST, llm) as call:
            call.record(CHAT_RESPONSE)
        return 1.0

    proxied = ProxyLLM(proxy_url="http://proxy.local:8088/", llm=llm)
    fake_client.add_resources({"llm": proxied, "prompt": PromptTemplate(template="{q}")})
    queued = enqueue()
    run(FakeTask(fake_client, agent), queued.rollout_id)

    attempt, = fake_client.get_attempts(queued.rollout_id)
    scoped, = seen
    assert scoped.endpoint == (f"http://proxy.local:8088/rollout/{queued.rollout_id}/attempt/{attempt.attempt_id}"
                               "/llm/llm/v1")
    assert scoped.api_key is None and scoped.model == llm.model
    assert scoped.sampling_parameters == llm.sampling_parameters
    # The agent's own span of a proxied call is marked as the client side: the proxy counts it.
    call = next(s for s in fake_client.query_spans(queued.rollout_id) if s.is_llm_call)
    assert call.attributes[t.LLM_PROXIED] is True
    assert attempt.usage is None and fake_client.get_triplets(queued.rollout_id) == []


def test_emitting_outside_an_attempt_does_nothing_and_a_bad_reward_is_refused() -> None:
    emit_reward(1.0)
    emit_message("nobody listens")
    emit_object(object())
    emit_exception(ValueError("x"))
    with llm_call(CHAT_REQUEST) as call:
        call.record(CHAT_RESPONSE)
    for bad in (float("nan"), float("inf"), "1", None, True):
        with pytest.raises(InvalidRewardError, match="finite number"):
            emit_reward(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidRewardError, match="non-empty string"):
        emit_reward(1.0, name="")


def test_batches_round_trip_and_a_damaged_one_reads_as_empty() -> None:
    entry = ["00000000000000aa", None, "s", 1, 1_000_000_000, 3_000_000_000, 1, None, {"k": "v" * 2000}, None, None]
    small = encode_batch("ab" * 16, [encode_entry([*entry[:8], {"k": "v"}, None, None])])
    big = encode_batch("ab" * 16, [encode_entry(entry)])
    assert small[:1] == b"j" and big[:1] == b"z" and len(big) < 500
    span, = decode_batch(big, "ro-1", "at-1", 1)
    assert (span.name, span.kind, span.status, span.duration, span.trace_id) == ("s", "server", "ok", 2.0, "ab" * 16)
    assert (span.rollout_id, span.attempt_id, span.sequence_id) == ("ro-1", "at-1", 1)
    assert decode_batch(b"z garbage") == decode_batch(b"?") == decode_batch(b'j[9,"x",[]]') == []


def _span(name: str, span_id: str, parent: str | None, start: float, attempt: str = "at-1", **attributes: Any) -> t.Span:
    return t.Span(trace_id="t" * 32, span_id=span_id, parent_id=parent, name=name, start_time=start,
                  end_time=start + 1, attributes=attributes, attempt_id=attempt)


def test_a_span_without_a_known_parent_hangs_under_its_attempts_root() -> None:
    root = _span(t.ATTEMPT_SPAN, "r", "enqueuer", 0)
    proxy = _span("lq.proxy chat", "p", None, 2)
    other = _span("elsewhere", "o", "unknown", 1, attempt="at-2")  # its attempt's root is not here
    child = _span("child", "c", "r", 1)
    assert [(d, s.span_id) for d, s in t.tree([proxy, child, root, other])] == [(0, "r"), (1, "c"), (1, "p"), (0, "o")]


def test_triplets_get_the_reward_after_them_and_the_last_one_the_final_reward() -> None:
    def call(span_id: str, start: float, content: str) -> t.Span:
        return _span("chat", span_id, "r", start, **t.chat_request_attributes(
            {"model": "m", "messages": [{"role": "user", "content": content}]}))

    spans = [call("a", 0, "one"), _span(t.REWARD_SPAN, "w", "r", 1.5, **{t.REWARD_VALUE: 0.5}),
             call("b", 3, "two"), call("c", 6, "three")]
    assert [(x.prompt[0]["content"], x.reward) for x in t.to_triplets(spans, final_reward=1.0)] == [
        ("one", 0.5), ("two", None), ("three", 1.0)]
    assert t.call_cost({"*": LLMPrice(input=1, output=1)}, "any", 1_000_000, 0) == 1.0
    assert t.call_cost({}, "any", 1, 1) is None and t.call_cost(PRICES, "tiny", None, 1) is None


async def test_the_async_client_reads_the_same_trace(
    async_client: Any, fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM
) -> None:
    fake_client.add_resources({"llm": llm}, "rs-a")
    queued = enqueue(resources_id="rs-a")
    run(FakeTask(fake_client, traced_agent), queued.rollout_id)

    assert await async_client.query_spans(queued.rollout_id) == fake_client.query_spans(queued.rollout_id)
    assert await async_client.get_triplets(queued.rollout_id) == fake_client.get_triplets(queued.rollout_id)
    assert (await async_client.get_usage(queued.rollout_id)).llm_calls == 2
    assert list(await async_client.usage_by_version("rs-a")) == [1]
    assert await async_client.usage_by_variant("none") == {}


def test_spans_are_exported_over_otlp_only_when_the_standard_variables_ask(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_queue.worker.tracing import _otlp_exporter, new_provider

    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER"):
        monkeypatch.delenv(name, raising=False)
    assert _otlp_exporter() is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:4318/v1/traces")
    exporter = _otlp_exporter()
    assert type(exporter).__name__ == "OTLPSpanExporter"
    exporter.shutdown()
    monkeypatch.setenv("OTEL_SERVICE_NAME", "my-workers")
    provider = new_provider("lightning-queue-worker")
    assert provider.resource.attributes["service.name"] == "my-workers"
    assert type(provider._active_span_processor._span_processors[0]).__name__ == "BatchSpanProcessor"
    provider.shutdown()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert _otlp_exporter() is None


def test_a_snapshots_usage_rollup_is_deleted_with_it(
    fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM
) -> None:
    fake_client.add_resources({"llm": llm}, "rs-gone")
    fake_client.add_resources({"llm": llm}, "rs-other")
    queued = enqueue(resources_id="rs-gone")
    run(FakeTask(fake_client, traced_agent), queued.rollout_id)
    assert fake_client.usage_by_version("rs-gone")[1].llm_calls == 2

    fake_client.delete_resources("rs-gone")
    assert fake_client.usage_by_version("rs-gone") == {}
    assert not fake_client.redis.exists(fake_client.keys.usage_by_version("rs-gone"))


def _comparable(span: t.Span) -> dict[str, Any]:
    """A span without what differs between two attempts (ids, times)."""
    varying = {t.ROLLOUT_ID, t.ATTEMPT_ID}
    return {**span.model_dump(exclude={"span_id", "trace_id", "start_time", "end_time", "rollout_id",
                                       "attempt_id"}),
            "attributes": {k: v for k, v in span.attributes.items() if k not in varying}}


def test_a_root_span_alone_is_stored_in_the_attempt_hash_and_reads_back_as_the_full_batch_would(
    fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_client.add_resources({"llm": llm})

    @rollout
    def quiet(task: Any, rollout: Rollout) -> RolloutResult:
        return RolloutResult(output={"ok": True}, reward=0.25)

    compact, full = enqueue(metadata={"experiment": "e", "variant": "v"}), \
        enqueue(metadata={"experiment": "e", "variant": "v"})
    run(FakeTask(fake_client, quiet), compact.rollout_id)
    import lightning_queue.worker.tracing as worker_tracing

    monkeypatch.setattr(worker_tracing, "compact_root", lambda *args: None)  # the list form, as before
    run(FakeTask(fake_client, quiet), full.rollout_id)

    assert not fake_client.redis.exists(fake_client.keys.attempt_spans(compact.rollout_id, 1))
    assert fake_client.redis.exists(fake_client.keys.attempt_spans(full.rollout_id, 1))
    stored = fake_client.redis.hgetall(fake_client.keys.attempt(compact.rollout_id, 1))
    assert all(len(v) < 64 for v in stored.values())  # the attempt hash stays a listpack
    root, = fake_client.query_spans(compact.rollout_id)
    expected, = fake_client.query_spans(full.rollout_id)
    assert _comparable(root) == _comparable(expected)
    assert root.attributes[t.ROLLOUT_ID] == compact.rollout_id and root.attributes[t.FINAL_REWARD] == 0.25
    assert root.attempt_id == root.attributes[t.ATTEMPT_ID] == fake_client.get_attempts(compact.rollout_id)[0].attempt_id
    assert root.end_time >= root.start_time > 0 and len(root.trace_id) == 32
    attempt, = fake_client.get_attempts(compact.rollout_id)
    assert attempt.status == "succeeded"  # the trace's fields stay out of the attempt model


def test_a_root_span_saying_more_than_the_records_keeps_the_list_form(
    fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM
) -> None:
    fake_client.add_resources({"llm": llm})

    @rollout
    def tagged(task: Any, rollout: Rollout) -> float:
        trace.get_current_span().set_attribute("custom", "kept")  # on the root span itself
        return 1.0

    @rollout
    def raising(task: Any, rollout: Rollout) -> float:
        raise ValueError("boom")  # recorded on the root span as an event and a status message

    for agent in (tagged, raising):
        queued = enqueue()
        try:
            run(FakeTask(fake_client, agent), queued.rollout_id)
        except RolloutFailed:
            pass
        assert fake_client.redis.exists(fake_client.keys.attempt_spans(queued.rollout_id, 1))
    assert fake_client.query_spans(queued.rollout_id)[0].status == "error"
