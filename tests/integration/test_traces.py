"""Traces with real workers, the repository's OpenAI-compatible test server, and the LLM proxy
run as a user runs it (``lightning-queue proxy``): the calculator agent's attempt traced (root
span with its ids and version under the algorithm's span, LLM and tool spans, emitted rewards,
token counts and cost rolled up), the same agent through the proxy getting the snapshot's model,
sampling parameters and key, a closed attempt's call refused, streaming relayed and recorded,
triplets in order, and a span-heavy attempt stored truncated while the worker goes on."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider

from lightning_queue import LLM, LightningClient, PromptTemplate, ProxyLLM, Settings
from lightning_queue.core import traces as t
from lightning_queue.ops.embedded import free_port
from lightning_queue.ops.fleet import worker_env
from tests.openai_stub import OpenAIStub

REPO_ROOT = Path(__file__).resolve().parents[2]
AGENT = "tests.integration.trace_agents:agent"
PRICES = {"tiny": {"input": 0.5, "output": 1.5}, "snapshot-model": {"input": 2.0, "output": 4.0}}
WAIT = 60.0


@pytest.fixture
def fleet(shared_workers):
    """One worker running the trace agents, with a price table and a trace budget of 64 KiB."""
    return shared_workers(AGENT, count=1, llm_prices=PRICES, trace_max_bytes=64 * 1024)


class Proxy:
    def __init__(self, settings: Settings, logdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = logdir / "proxy.log"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-c", "from lightning_queue.ops.cli import main; main()", "proxy",
                 "--port", str(self.port)],
                cwd=REPO_ROOT, env=worker_env(settings, None), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:  # ready when it accepts connections
            assert self.process.poll() is None, self.log.read_text()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                assert time.monotonic() < deadline, f"the proxy did not listen: {self.log.read_text()}"
                time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture
def proxy(fleet, tmp_path: Path) -> Iterator[Proxy]:
    served = Proxy(fleet.settings, tmp_path)
    yield served
    served.stop()


def _stub_llm(stub: OpenAIStub, **fields) -> LLM:
    return LLM(endpoint=stub.endpoint, **{"model": "tiny", **fields})


def test_a_calc_agent_attempt_is_traced_under_the_span_that_enqueued_it(fleet, openai_stub: OpenAIStub):
    client: LightningClient = fleet.client
    resources = {"llm": _stub_llm(openai_stub, sampling_parameters={"temperature": 0.3}),
                 "prompt": PromptTemplate(template="Calculate: {question}")}
    client.add_resources(resources, "rs-calc")
    client.update_resources("rs-calc", resources)  # version 2
    algorithm = TracerProvider().get_tracer("algorithm")
    with algorithm.start_as_current_span("optimization step") as step:
        queued = client.enqueue_rollout({"question": "What is (2 + 3) * 4?", "answer": 20}, resources_id="rs-calc",
                                        metadata={"experiment": "calc-exp", "variant": "treatment"})
    done, = client.wait_for_rollouts([queued.rollout_id], timeout=WAIT)
    assert done.status == "succeeded" and done.reward == 1.0
    assert done.result.rewards == {"correct": 1.0, "answered": 1.0}

    attempt, = client.get_attempts(queued.rollout_id)
    spans = client.query_spans(queued.rollout_id)
    root = next(s for s in spans if s.name == t.ATTEMPT_SPAN)
    context = step.get_span_context()
    assert (root.trace_id, root.parent_id) == (f"{context.trace_id:032x}", f"{context.span_id:016x}")
    a = root.attributes
    assert (a[t.ROLLOUT_ID], a[t.ATTEMPT_ID], a[t.SEQUENCE_ID]) == (queued.rollout_id, attempt.attempt_id, 1)
    assert (a[t.RESOURCES_ID], a[t.RESOURCES_VERSION]) == ("rs-calc", 2)
    assert (a[t.EXPERIMENT], a[t.VARIANT], a[t.STATUS]) == ("calc-exp", "treatment", "succeeded")
    calls = [s for s in spans if s.is_llm_call]
    tools = [s for s in spans if s.name == "tool calculator"]
    assert len(calls) == 2 and len(tools) == 1
    assert {s.parent_id for s in calls + tools} == {root.span_id}
    # httpx is auto-instrumented (the tracing extra): each call's HTTP request nests under its LLM span.
    http = [s for s in spans if s.kind == "client" and not s.is_llm_call]
    assert sorted(s.parent_id for s in http) == sorted(s.span_id for s in calls)
    assert all(s.name == "POST" for s in http), [(s.name, s.attributes) for s in http]
    assert [s.attributes["gen_ai.request.temperature"] for s in calls] == [0.3, 0.3]
    answers = [_answer(r) for r in openai_stub.chat_requests()]
    assert [(s.input_tokens, s.output_tokens) for s in calls] == [
        (a["usage"]["prompt_tokens"], a["usage"]["completion_tokens"]) for a in answers]
    assert tools[0].attributes["calc_agent.tool.result"] == "20"
    assert [(name, value, primary) for name, value, primary, _ in t.rewards(spans)] == [
        ("correct", 1.0, True), ("answered", 1.0, False)]
    # Tokens and cost, per attempt, rollout, snapshot version and variant.
    tokens_in = sum(s.input_tokens for s in calls)
    tokens_out = sum(s.output_tokens for s in calls)
    cost = (tokens_in * 0.5 + tokens_out * 1.5) / 1e6
    assert (attempt.usage.llm_calls, attempt.usage.input_tokens, attempt.usage.output_tokens) == (2, tokens_in,
                                                                                                 tokens_out)
    assert attempt.usage.cost_usd == pytest.approx(cost)
    assert client.usage_by_version("rs-calc")[2].model_dump() == pytest.approx(
        {"attempts": 1, "llm_calls": 2, "input_tokens": tokens_in, "output_tokens": tokens_out, "cost_usd": cost,
         "unpriced_calls": 0})
    assert client.usage_by_variant("calc-exp")["treatment"].cost_usd == pytest.approx(cost)
    # Triplets: the question and the tool call, then the tool result and the answer, rewarded at the end.
    first, second = client.get_triplets(queued.rollout_id)
    assert first.prompt == [{"role": "user", "content": "Calculate: What is (2 + 3) * 4?"}]
    assert first.response["tool_calls"][0]["function"]["name"] == "calculator" and first.reward is None
    assert [m["role"] for m in second.prompt] == ["user", "assistant", "tool"]
    assert second.response["content"] == "The answer is 20" and second.reward == 1.0


def _answer(request) -> dict:
    """What the stub answered a recorded request (its answer is a function of the request)."""
    from tests.openai_stub import completion

    return completion(request.body)


def test_through_the_proxy_the_snapshot_decides_model_sampling_and_key(fleet, proxy: Proxy,
                                                                       openai_stub: OpenAIStub):
    client: LightningClient = fleet.client
    upstream = LLM(endpoint=openai_stub.endpoint, model="snapshot-model", api_key="sk-snapshot",
                   sampling_parameters={"temperature": 0.11})
    client.add_resources({"llm": ProxyLLM(proxy_url=proxy.url, llm=upstream)}, "rs-proxied")
    queued = client.enqueue_rollout({"kind": "asks_for_another", "question": "What is 6 * 7?", "answer": 42},
                                    resources_id="rs-proxied")
    done, = client.wait_for_rollouts([queued.rollout_id], timeout=WAIT)
    assert done.status == "succeeded" and done.reward == 1.0, done.error

    requests = openai_stub.chat_requests()
    assert len(requests) == 2
    for request in requests:  # the agent asked for another model, temperature and key
        assert request.model == "snapshot-model" and request.body["temperature"] == 0.11
        assert request.body["top_p"] == 0.5  # what the snapshot does not set stays the agent's
        assert request.authorization == "Bearer sk-snapshot"
    attempt, = client.get_attempts(queued.rollout_id)
    spans = client.query_spans(queued.rollout_id)
    proxied = sorted((s for s in spans if s.name.startswith(t.PROXY_SPAN_PREFIX)), key=lambda s: s.start_time)
    assert len(proxied) == 2
    for span in proxied:
        assert span.kind == "server" and span.attributes["lq.proxy.requested_model"] == "model-the-agent-wants"
        assert span.attributes[t.GEN_AI_REQUEST_MODEL] == "snapshot-model"
        assert span.attributes[t.ATTEMPT_ID] == attempt.attempt_id and span.attributes[t.LLM_LATENCY] > 0
        assert span.input_tokens > 0 and span.output_tokens > 0
        assert span.cost == pytest.approx((span.input_tokens * 2.0 + span.output_tokens * 4.0) / 1e6)
    # Counted once: the agent's own spans of those calls are marked as their client side.
    agent_calls = [s for s in spans if s.is_llm_call and s.attributes.get(t.LLM_PROXIED)]
    assert len(agent_calls) == 2
    assert attempt.usage.llm_calls == 2
    assert attempt.usage.input_tokens == sum(s.input_tokens for s in proxied)
    assert [x.span_id for x in client.get_triplets(queued.rollout_id)] == [s.span_id for s in proxied]
    # Every span of the trace hangs under the attempt's root, the proxy's too.
    depths = dict((s.span_id, d) for d, s in t.tree(spans))
    assert all(depths[s.span_id] >= 1 for s in proxied)

    # The attempt is closed now: a late call with its URL is refused.
    base = ProxyLLM(proxy_url=proxy.url, llm=upstream).scoped("llm", queued.rollout_id, attempt.attempt_id).endpoint
    late = httpx.post(f"{base}/chat/completions", json={"model": "x", "messages": [{"role": "user", "content": "1+1"}]},
                      timeout=10)
    assert late.status_code == 403
    assert late.json()["error"]["type"] == "attempt_closed"
    assert "is closed (succeeded)" in late.json()["error"]["message"]
    assert len(openai_stub.chat_requests()) == 2  # nothing was forwarded


def test_the_proxy_relays_a_stream_and_records_it(fleet, proxy: Proxy, openai_stub: OpenAIStub):
    client: LightningClient = fleet.client
    upstream = LLM(endpoint=openai_stub.endpoint, model="snapshot-model", sampling_parameters={"temperature": 0.2})
    client.add_resources({"llm": ProxyLLM(proxy_url=proxy.url, llm=upstream)}, "rs-stream")
    # An attempt held open by hand (claimed and started as a worker would; its message goes to a
    # queue no worker reads), so the test makes the calls.
    opened, = client.enqueue_rollouts([{"kind": "never-run"}], resources_id="rs-stream", queue="lq-nowhere")
    claim = client.store.claim(opened.rollout_id, "test@host")
    assert client.store.start_attempt(opened.rollout_id, claim.sequence_id, "rs-stream", 1)
    base = ProxyLLM(proxy_url=proxy.url, llm=upstream).scoped("llm", opened.rollout_id, claim.attempt_id).endpoint

    assert httpx.get(f"{base}/models", timeout=10).json()["data"][0]["id"] == "snapshot-model"
    body = {"model": "whatever", "stream": True, "messages": [{"role": "user", "content": "What is 3 + 4?"}]}
    with httpx.stream("POST", f"{base}/chat/completions", json=body, timeout=10) as response:
        assert response.status_code == 200
        events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert events[-1]["usage"]["completion_tokens"] > 0  # the proxy asked for the usage chunk
    arguments = "".join(c["delta"].get("tool_calls", [{}])[0].get("function", {}).get("arguments", "")
                        for e in events for c in e["choices"])
    assert json.loads(arguments) == {"expression": "3 + 4"}
    plain = httpx.post(f"{base}/chat/completions", json={**body, "stream": False}, timeout=10)
    assert plain.status_code == 200 and plain.json()["model"] == "snapshot-model"
    wrong = httpx.post(f"{base.replace('/llm/llm/', '/llm/judge/')}/chat/completions", json=body, timeout=10)
    assert wrong.status_code == 404 and "no LLM or ProxyLLM resource named 'judge'" in wrong.json()["error"]["message"]
    bad = httpx.post(f"{base}/chat/completions", content=b"not json", timeout=10)
    assert bad.status_code == 400

    # Recorded after the answers went out: wait for both spans.
    deadline = time.monotonic() + 10
    while len(spans := client.query_spans(opened.rollout_id)) < 2:
        assert time.monotonic() < deadline, "the proxy did not record its calls"
        time.sleep(0.05)
    streamed, answered = sorted(spans, key=lambda s: s.start_time)
    assert json.loads(streamed.attributes[t.GEN_AI_OUTPUT_MESSAGES])[0]["tool_calls"][0]["function"]["name"] == \
        "calculator"
    assert streamed.output_tokens == answered.output_tokens > 0
    assert client.get_usage(opened.rollout_id).llm_calls == 2
    client.cancel_rollout(opened.rollout_id, terminate=False)
    refused = httpx.post(f"{base}/chat/completions", json=body, timeout=10)
    assert refused.status_code == 403 and "closed (cancelled)" in refused.json()["error"]["message"]


def test_a_span_heavy_attempt_is_stored_truncated_and_the_worker_goes_on(fleet):
    client: LightningClient = fleet.client
    client.add_resources({"llm": LLM(endpoint="http://unused.local/v1", model="tiny")}, "rs-heavy")
    heavy, light = client.enqueue_rollouts([{"kind": "span_heavy", "spans": 2000},
                                            {"kind": "span_heavy", "spans": 3}], resources_id="rs-heavy")
    done = client.wait_for_rollouts([heavy.rollout_id, light.rollout_id], timeout=WAIT)
    assert [(r.status, r.reward) for r in done] == [("succeeded", 0.25), ("succeeded", 0.25)]
    assert done[0].result.output == {"spans": 2000} and done[0].result.rewards == {"heavy": 0.25}

    spans = client.query_spans(heavy.rollout_id)
    marker, = (s for s in spans if s.name == t.TRUNCATED_SPAN)
    kept = [s for s in spans if s.name.startswith("step ")]
    assert 0 < len(kept) < 2000
    # Every span the agent made (the steps and the reward) is either stored or counted in the marker.
    stored = [s for s in spans if s.name not in (t.ATTEMPT_SPAN, t.TRUNCATED_SPAN)]
    assert len(stored) + marker.attributes[t.DROPPED_SPANS] == 2000 + 1
    assert any(s.name == t.ATTEMPT_SPAN for s in spans)
    attempt, = client.get_attempts(heavy.rollout_id)
    assert attempt.spans_dropped == marker.attributes[t.DROPPED_SPANS]
    light_spans = client.query_spans(light.rollout_id)
    assert [s.name for s in light_spans].count("step 0") == 1 and not any(
        s.name == t.TRUNCATED_SPAN for s in light_spans)
    fleet.wait_for_log("trace over LQ_TRACE_MAX_BYTES", timeout=10)  # the worker said what it dropped
