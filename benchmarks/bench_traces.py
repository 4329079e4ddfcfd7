"""What tracing and the LLM proxy cost, measured.

    python benchmarks/bench_traces.py [--quick] [--redis-url URL]

1. Tracing overhead, end to end: no-op rollouts through real ``celery worker`` processes (2
   prefork processes, like ``bench_queue.py``), one worker with ``LQ_TRACING=false`` and one with
   tracing on, each on its own queue; short rounds alternate which goes first; medians. Target:
   the traced rollout costs under 10% more than the untraced one. Also each side's Redis CPU
   per rollout and the worker's own task time (median), which other load on the machine
   disturbs less than wall time.
2. Tracing in the worker process alone: start the root span, scope the resources, end it and
   encode the batch, for a no-op attempt and for a calculator-like one (2 LLM calls, a tool, 2
   rewards); and the bytes each stores.
3. The proxy's added latency: the same chat completion sent to the repository's test server
   (``tests/openai_stub.py``) directly and through ``lightning-queue proxy`` (run as a user runs
   it, for an attempt held open by hand), interleaved, one at a time, over keep-alive
   connections. Target: p50 added under 2 ms.

Starts its own ``redis-server`` unless ``--redis-url`` is given. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import redis

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # bench_queue's helpers and bench_agents, as the workers import them
sys.path.insert(0, str(REPO))  # tests.openai_stub

from bench_queue import Row, cpu_now, format_table, percentile, redis_for, workers

from lightning_queue import LLM, LightningClient, PromptTemplate, ProxyLLM, ResourcesUpdate, Rollout, Settings
from lightning_queue.ops.embedded import free_port
from lightning_queue.ops.fleet import worker_env
from tests.openai_stub import OpenAIStub


def end_to_end(url: str, quick: bool, logdir: str, rows: list[Row]) -> None:
    """(1) no-op rollouts end to end with tracing off and on; the Redis CPU and the worker time
    (Celery's own measure of the task) each costs, which the machine's other load disturbs less."""
    n, rounds = (100, 2) if quick else (500, 10)
    prefix = f"lqbench-tr-{uuid.uuid4().hex[:8]}"
    base = Settings(redis_url=url, key_prefix=prefix)
    sides = {"off": base.model_copy(update={"queue": f"{prefix}-off", "tracing": False}),
             "on": base.model_copy(update={"queue": f"{prefix}-on", "tracing": True})}
    client = LightningClient(base)
    client.add_resources({"prompt": PromptTemplate(template="{question}")}, "bench")
    seconds: dict[str, list[float]] = {"off": [], "on": []}
    cpu: dict[str, float] = {"off": 0.0, "on": 0.0}
    task: dict[str, float] = {}
    try:
        envs = {side: worker_env(s, "bench_agents:noop", [str(HERE), str(REPO)]) for side, s in sides.items()}
        with workers("lightning_queue.app", envs["off"], sides["off"].queue, 2, name="untraced", logdir=logdir) as w0, \
                workers("lightning_queue.app", envs["on"], sides["on"].queue, 2, name="traced", logdir=logdir) as w1:
            for side in sides:  # warm-up: imports, the tracer provider, the snapshot caches
                run(client, sides[side].queue, 50)
            marks = {"off": len(task_seconds(w0.log())), "on": len(task_seconds(w1.log()))}
            for r in range(rounds):
                for side in (("off", "on") if r % 2 == 0 else ("on", "off")):
                    before = cpu_now(client.redis)
                    seconds[side].append(run(client, sides[side].queue, n))
                    cpu[side] += cpu_now(client.redis) - before
            for side, worker in (("off", w0), ("on", w1)):
                task[side] = statistics.median(task_seconds(worker.log())[marks[side]:]) * 1000
    finally:
        keys = list(client.redis.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.redis.delete(*keys[i:i + 500])
        client.close()
    off, on = (statistics.median(seconds[s]) / n * 1000 for s in ("off", "on"))
    rows.append((f"end to end, no-op, 2 prefork procs, LQ_TRACING=false (median of {rounds} x {n})",
                 f"{off:.3f} ms/rollout", ""))
    rows.append(("end to end, no-op, 2 prefork procs, traced", f"{on:.3f} ms/rollout", ""))
    rows.append(("tracing overhead per no-op rollout, end to end", f"{on - off:+.3f} ms ({(on - off) / off:+.1%})",
                 "< +10%"))
    rows.append(("worker time per no-op rollout (Celery's task time, median): off / on",
                 f"{task['off']:.3f} / {task['on']:.3f} ms ({task['on'] - task['off']:+.3f})", ""))
    per = {side: cpu[side] / (rounds * n) * 1e6 for side in cpu}
    rows.append(("Redis CPU per no-op rollout: off / on", f"{per['off']:.0f} / {per['on']:.0f} µs "
                 f"({per['on'] - per['off']:+.0f})", ""))


def task_seconds(log: str) -> list[float]:
    """Each task's run time, as the worker logs it (``... succeeded in 0.0016s``), in order."""
    return [float(x) for x in re.findall(r"succeeded in ([0-9.e-]+)s", log)]


def run(client: LightningClient, queue: str, n: int) -> float:
    start = time.perf_counter()
    rollouts = client.enqueue_rollouts([{"i": i} for i in range(n)], queue=queue)
    done = client.wait_for_rollouts([r.rollout_id for r in rollouts], timeout=600)
    elapsed = time.perf_counter() - start
    if len(done) != n or any(r.status != "succeeded" for r in done):
        raise RuntimeError(f"{len(done)}/{n} finished on {queue}: {[(r.status, r.error) for r in done][:3]}")
    return elapsed


def in_process(quick: bool, rows: list[Row]) -> None:
    """(2) the tracing work of one attempt in the worker process, and what it stores."""
    from lightning_queue import emit_reward, llm_call
    from lightning_queue.core.models import RolloutResult
    from lightning_queue.worker.tracing import Tracing

    tracing = Tracing(Settings(redis_url="redis://unused.invalid:1/0", key_prefix="bench"))
    snapshot = ResourcesUpdate(resources_id="rs", version=1, create_time=0, update_time=0,
                               resources={"llm": LLM(endpoint="http://llm.local/v1", model="tiny")})
    rollout = Rollout(input={"question": "What is 2 + 2?"})
    request = {"model": "tiny", "temperature": 0.2, "messages": [{"role": "user", "content": "What is 2 + 2?"}]}
    response = {"id": "c1", "model": "tiny", "usage": {"prompt_tokens": 9, "completion_tokens": 5},
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "4"}}]}

    def noop() -> None:
        pass

    def calc_like() -> None:
        from opentelemetry import trace

        for _ in range(2):
            with llm_call(request) as call:
                call.record(response)
        with trace.get_tracer("bench").start_as_current_span("tool calculator"):
            pass
        emit_reward(1.0, name="correct", primary=True)
        emit_reward(1.0, name="answered")

    n = 1000 if quick else 5000
    for label, body in (("no-op", noop), ("calculator-like (2 LLM calls, 1 tool, 2 rewards)", calc_like)):
        def attempt(body: Callable[[], None] = body) -> int:
            traced = tracing.start(rollout, 1, "at-bench", snapshot, "w@h")
            traced.scope(snapshot.resources)
            with traced.active():
                body()
            written, _ = traced.finish("succeeded", RolloutResult())
            assert written is not None
            return len(written.batch)

        for _ in range(100):
            size = attempt()
        start = time.perf_counter()
        for _ in range(n):
            size = attempt()
        per = (time.perf_counter() - start) / n
        rows.append((f"tracing in the worker process, {label}", f"{per * 1e6:.0f} µs, {size} bytes stored", ""))


def proxy_latency(url: str, quick: bool, logdir: str, rows: list[Row]) -> None:
    """(3) p50/p95 of the same call direct and through the proxy, interleaved."""
    n = 100 if quick else 1000
    prefix = f"lqbench-px-{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=url, key_prefix=prefix, queue=f"{prefix}-nowhere")
    client = LightningClient(settings)
    port = free_port()
    log = Path(logdir) / "proxy.log"
    with OpenAIStub() as stub, open(log, "wb") as out:
        upstream = LLM(endpoint=stub.endpoint, model="tiny", sampling_parameters={"temperature": 0.1})
        proxy = subprocess.Popen([sys.executable, "-c", "from lightning_queue.ops.cli import main; main()", "proxy",
                                  "--port", str(port)], env=worker_env(settings, None), cwd=str(REPO), stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_listening(port, proxy, log)
            client.add_resources({"llm": ProxyLLM(proxy_url=f"http://127.0.0.1:{port}", llm=upstream)}, "rs-px")
            rollout, = client.enqueue_rollouts([{"held": "open"}], resources_id="rs-px")
            claim = client.store.claim(rollout.rollout_id, "bench@host")
            client.store.start_attempt(rollout.rollout_id, claim.sequence_id, "rs-px", 1)
            base = ProxyLLM(proxy_url=f"http://127.0.0.1:{port}", llm=upstream).scoped(
                "llm", rollout.rollout_id, claim.attempt_id).endpoint
            body = {"model": "tiny", "temperature": 0.1, "messages": [{"role": "user", "content": "What is 3 + 4?"}]}
            direct, proxied = [], []
            with httpx.Client(timeout=30) as http:
                for i in range(n + 50):
                    pair = []
                    for target in (f"{stub.endpoint}/chat/completions", f"{base}/chat/completions"):
                        start = time.perf_counter()
                        answer = http.post(target, json=body)
                        pair.append(time.perf_counter() - start)
                        answer.raise_for_status()
                    if i >= 50:  # the first calls warm connections, the snapshot and the scripts
                        direct.append(pair[0])
                        proxied.append(pair[1])
        finally:
            proxy.send_signal(signal.SIGTERM)  # a graceful stop: it writes the records still pending
            try:
                proxy.wait(10)
            except subprocess.TimeoutExpired:
                proxy.kill()
            recorded = client.get_usage(rollout.rollout_id).llm_calls
            client.redis.delete(*client.redis.keys(f"{prefix}:*") or ["-"])
            client.close()
    for q, label in ((0.5, "p50"), (0.95, "p95")):
        d, p = percentile(direct, q) * 1000, percentile(proxied, q) * 1000
        rows.append((f"one chat call, {label}: direct / through the proxy ({n} each)", f"{d:.2f} / {p:.2f} ms", ""))
        rows.append((f"latency the proxy adds, {label}", f"{p - d:+.2f} ms", "< 2 ms" if q == 0.5 else ""))
    rows.append(("proxy calls recorded in the attempt's trace", f"{recorded} of {n + 50}", f"{n + 50}"))


def wait_listening(port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the proxy exited: {log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the proxy did not listen within {timeout} s: {log.read_text()}") from None
            time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rollouts, calls and rounds (a smoke run)")
    parser.add_argument("--redis-url", help="use this Redis instead of starting a redis-server of our own")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    url, server = redis_for(args.redis_url)
    info = redis.Redis.from_url(url).info("server")
    print(f"Redis {info.get('redis_version')} at {url} ({'own redis-server' if server else 'given'}), "
          f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs{', quick run' if args.quick else ''}\n",
          flush=True)
    rows: list[Row] = []
    try:
        with tempfile.TemporaryDirectory(prefix="lq-bench-traces-") as logdir:
            end_to_end(url, args.quick, logdir, rows)
            in_process(args.quick, rows)
            proxy_latency(url, args.quick, logdir, rows)
    finally:
        if server:
            server.stop()
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
