"""Snapshot and enqueue performance, measured side by side in one run.

    python benchmarks/bench_snapshots.py [--quick]

Uses the Redis at ``LQ_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``),
or starts an embedded one when nothing answers there. Everything is written
under a fresh key prefix (``lqbench-<random>``) and only those keys are
deleted at the end. See ``benchmarks/README.md`` for the latest numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

from lightning_queue import LLM, LightningClient, PromptTemplate, Settings
from lightning_queue.core.models import dump_resources
from lightning_queue.ops.embedded import ensure_redis
from lightning_queue.storage.connections import connect
from lightning_queue.storage.registry import SnapshotRegistry
from lightning_queue.worker.cache import SnapshotCache

# Common English words, most frequent first: sampled with Zipf weights, as words occur in real text.
WORDS = """
the of and to a in is you that it he was for on are as with his they at be this have from or one had by
word but not what all were we when your can said there use an each which she do how their if will up other
about out many then them these so some her would make like him into time has look two more write go see
number no way could people my than first water been call who oil its now find long down day did get come
made may part answer question step check result reason explain example tool call user assistant model
response context instruction follow careful correct final output format json field value list item
number compute calculate verify assume given problem solution error retry search document source cite
summary short detailed clear concise helpful honest safe request task goal plan first second third next
before after always never only must should may might include avoid using within without between each
every same different important relevant specific general simple complex input table row column name
date time amount total price unit currency percent increase decrease compare difference ratio average
code function argument return string integer float boolean array object key missing invalid empty
""".split()

OPENINGS = [
    "You are a careful assistant that solves {task} problems step by step.",
    "Read the question, think about the relevant facts, then answer in the requested format.",
    "When a tool is available, call it instead of guessing; check its result before you answer.",
    "If the input is ambiguous, state the assumption you make and continue.",
]


def english_like(rng: random.Random, n_bytes: int) -> str:
    """Varied prompt-like text: instructions, numbered rules and few-shot examples.

    Each sentence is drawn word by word, so it has little of the repetition real prompts have: a worst case
    for compression. :func:`few_shot_prompt` is the realistic counterpart."""
    weights = [1 / (rank + 1) for rank in range(len(WORDS))]
    parts: list[str] = [rng.choice(OPENINGS).replace("{task}", rng.choice(["math", "retrieval", "coding"]))]
    size, example = 0, 0
    while size < n_bytes:
        kind = rng.random()
        words = rng.choices(WORDS, weights, k=rng.randint(8, 24))
        sentence = " ".join(words).capitalize() + rng.choice([".", ".", ".", "?", ":"])
        if kind < 0.15:
            example += 1
            a, b = rng.randint(2, 999), rng.randint(2, 999)
            block = f"\n\nExample {example}:\nQ: {sentence}\nWhat is {a} * {b}?\nA: {a} * {b} = {a * b}."
        elif kind < 0.35:
            block = f"\n{rng.randint(1, 20)}. {sentence}"
        else:
            block = " " + sentence
        parts.append(block)
        size += len(block)
    parts.append("\n\nQuestion: {{question}}\nAnswer:")
    return "".join(parts)


# Names, items and places for the few-shot examples: small lists, as in real hand-written prompts.
NAMES = ["Ava", "Ben", "Chloe", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jamal", "Kofi", "Lena",
         "Mateo", "Nadia", "Omar", "Priya"]
ITEMS = ["apples", "marbles", "stamps", "books", "pencils", "seashells", "coins", "stickers", "tickets", "cookies"]
CITIES = ["Lisbon", "Osaka", "Nairobi", "Toronto", "Krakow", "Lima", "Hanoi", "Oslo"]
PRODUCTS = ["laptop stand", "desk lamp", "water bottle", "backpack", "headphones", "notebook", "phone case"]

SYSTEM_RULES = [
    "Read the whole question before you start; note every quantity it gives and what it asks for.",
    "Reason step by step and write down each intermediate result with its unit.",
    "Prefer calling a tool to guessing: look up orders, prices and dates instead of assuming them.",
    "Check the result of every tool call before you use it; if a call fails, say so and retry once.",
    "If the question is ambiguous, state the reading you chose in one sentence and continue.",
    "Never invent customer data, order numbers or prices that no tool returned.",
    "Round money to two decimals and counts down to whole units, and say that you rounded.",
    "Keep the reasoning short and plain; the user reads the answer, not the reasoning.",
    "Answer in the language of the question.",
    "If a request is outside your tools and knowledge, say what you cannot do and what the user can try instead.",
]

TOOLS = [
    ("search_orders", "Find a customer's orders, newest first.",
     {"customer": ("string", "Customer name as written in the question."),
      "status": ("string", "One of 'open', 'shipped', 'delivered', 'returned'."),
      "limit": ("integer", "At most this many orders (1-50).")}),
    ("get_price", "Current unit price of a product, in the given currency.",
     {"product": ("string", "Product name."), "currency": ("string", "ISO 4217 code, e.g. 'EUR'.")}),
    ("convert_currency", "Convert an amount between currencies at today's rate.",
     {"amount": ("number", "Amount to convert."), "from": ("string", "ISO 4217 code."),
      "to": ("string", "ISO 4217 code.")}),
    ("calculator", "Evaluate an arithmetic expression exactly.",
     {"expression": ("string", "E.g. '(17 + 5) / 4'. Only + - * / ( ) and numbers.")}),
    ("weather", "Forecast for a city and date.",
     {"city": ("string", "City name."), "date": ("string", "ISO date, e.g. '2024-06-07'.")}),
    ("shipping_time", "Estimated delivery days between two cities.",
     {"origin": ("string", "City name."), "destination": ("string", "City name."),
      "express": ("boolean", "Whether express shipping is used.")}),
]

OUTPUT_FORMAT = """## Output format

Reply with exactly one JSON object and nothing else:

{"reasoning": "<your step-by-step reasoning, at most 120 words>",
 "tool_calls": [{"name": "<tool name>", "arguments": {<arguments>}}],
 "answer": "<the final answer: a number, a date, or one short sentence>",
 "confidence": <a number between 0 and 1>}

- "tool_calls" lists the calls you made, in order; use [] when you made none.
- "answer" must not repeat the reasoning.
- Numbers in "answer" have no thousands separators and use "." for decimals."""


def tool_schema(name: str, description: str, params: dict[str, tuple[str, str]]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object",
        "properties": {p: {"type": t, "description": d} for p, (t, d) in params.items()},
        "required": list(params)[:2],
    }}}


def shot(rng: random.Random) -> str:
    """One worked example, ``Question/Reasoning/Answer``, of one of a few kinds of question."""
    name, other = rng.sample(NAMES, 2)
    item, kind = rng.choice(ITEMS), rng.randrange(4)
    if kind == 0:
        a, b, c = rng.randint(5, 300), rng.randint(2, 90), rng.randint(2, 12)
        return (f"Question: {name} has {a} {item}. {other} gives {name} {b} more, and {name} then shares them "
                f"equally among {c} friends, keeping none. How many {item} does each friend get?\n"
                f"Reasoning: {name} starts with {a} {item} and receives {b}, so {a} + {b} = {a + b}. "
                f"Split among {c} friends: {a + b} / {c} = {(a + b) / c:.2f}, rounded down to {(a + b) // c}.\n"
                f"Answer: {(a + b) // c}")
    if kind == 1:
        product, qty = rng.choice(PRODUCTS), rng.randint(2, 9)
        price, rate = rng.randint(500, 20000) / 100, rng.randint(80, 160) / 100
        return (f"Question: {name} wants {qty} of the {product} and pays in USD. What is the total?\n"
                f'Reasoning: I call get_price with {{"product": "{product}", "currency": "EUR"}}: {price:.2f} EUR. '
                f"{qty} x {price:.2f} = {qty * price:.2f} EUR. I call convert_currency with "
                f'{{"amount": {qty * price:.2f}, "from": "EUR", "to": "USD"}}: rate {rate:.2f}, '
                f"{qty * price * rate:.2f} USD.\n"
                f"Answer: {qty * price * rate:.2f}")
    if kind == 2:
        origin, dest = rng.sample(CITIES, 2)
        days, express = rng.randint(2, 14), rng.random() < 0.5
        taken = max(1, days // 2) if express else days
        return (f"Question: {name} ordered {item} shipped from {origin} to {dest}"
                f"{' with express shipping' if express else ''}, on day {rng.randint(1, 20)} of the month. "
                f"How many days until delivery?\n"
                f'Reasoning: I call shipping_time with {{"origin": "{origin}", "destination": "{dest}", '
                f'"express": {str(express).lower()}}}: {taken} days. No other delay is mentioned.\n'
                f"Answer: {taken}")
    n, status = rng.randint(0, 6), rng.choice(["open", "shipped", "delivered", "returned"])
    orders = [f"#{rng.randint(10000, 99999)}" for _ in range(n)]
    return (f"Question: Which of {name}'s orders are {status}?\n"
            f'Reasoning: I call search_orders with {{"customer": "{name}", "status": "{status}", "limit": 50}}: '
            f"{n} order{'s' if n != 1 else ''}{': ' + ', '.join(orders) if orders else ''}.\n"
            f"Answer: {', '.join(orders) if orders else f'{name} has no {status} orders.'}")


def few_shot_prompt(rng: random.Random, n_bytes: int) -> str:
    """A prompt built like a real one: instructions, tools as JSON schemas, an output format, then
    worked examples in a fixed structure with varied content, up to about ``n_bytes``."""
    task = rng.choice(["customer support", "shopping assistant", "order tracking"])
    rules = rng.sample(SYSTEM_RULES, rng.randint(6, len(SYSTEM_RULES)))
    tools = [tool_schema(*t) for t in rng.sample(TOOLS, rng.randint(4, len(TOOLS)))]
    parts = [f"You are a careful {task} agent for an online store. Follow these rules:\n"
             + "\n".join(f"{i}. {rule}" for i, rule in enumerate(rules, 1)),
             "## Tools\n\nYou can call these functions:\n\n" + json.dumps(tools, indent=2),
             OUTPUT_FORMAT, "## Examples"]
    size = sum(len(p) + 2 for p in parts)
    while size < n_bytes:
        parts.append(shot(rng))
        size += len(parts[-1]) + 2
    parts.append("Question: {question}\nReasoning:")
    return "\n\n".join(parts)


def prompt_snapshot(rng: random.Random, total_bytes: int, n_prompts: int = 6,
                    text: Callable[[random.Random, int], str] = english_like) -> dict[str, Any]:
    resources: dict[str, Any] = {
        "main_llm": LLM(endpoint="http://llm.local/v1", model="policy-7b", sampling_parameters={"temperature": 0.7}),
    }
    for i in range(n_prompts):
        resources[f"prompt_{i}"] = PromptTemplate(template=text(rng, total_bytes // n_prompts))
    return resources


def realistic_snapshot(rng: random.Random, total_bytes: int) -> dict[str, Any]:
    """An LLM with a policy prompt and a judge prompt, each built like :func:`few_shot_prompt`."""
    return prompt_snapshot(rng, total_bytes, n_prompts=2, text=few_shot_prompt)


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def timed(fn: Callable[[], Any], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


class CommandCounter:
    """Counts commands and connection check-outs of one redis client (pipelines and scripts included)."""

    def __init__(self, client: redis.Redis) -> None:
        self.commands = self.checkouts = 0
        execute, get_connection = client.execute_command, client.connection_pool.get_connection

        def counted_execute(*args: Any, **options: Any) -> Any:
            self.commands += 1
            return execute(*args, **options)

        def counted_checkout(*args: Any, **kwargs: Any) -> Any:
            self.checkouts += 1
            return get_connection(*args, **kwargs)

        client.execute_command = counted_execute  # type: ignore[method-assign]
        client.connection_pool.get_connection = counted_checkout  # type: ignore[method-assign]


def delete_prefix(url: str, prefix: str) -> int:
    client = redis.Redis.from_url(url)
    deleted = 0
    try:
        batch = []
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += client.delete(*batch)
                batch.clear()
        if batch:
            deleted += client.delete(*batch)
    finally:
        client.close()
    return deleted


def run(url: str, prefix: str, quick: bool) -> list[tuple[str, str, str]]:
    rng = random.Random(20240607)
    rows: list[tuple[str, str, str]] = []  # (measure, result, target)
    hits_n, fetch_runs = (2000, 20) if quick else (20000, 100)

    on = Settings(redis_url=url, key_prefix=prefix, queue=f"{prefix}-q")
    off = on.model_copy(update={"compress_threshold_bytes": 1 << 40})
    client = LightningClient(on)
    plain = SnapshotRegistry(connect(url), on.keys, off)

    def cold_fetch(resources: dict[str, Any], name: str, corpus: str) -> tuple[str, float]:
        """Store ``resources`` compressed and not, fetch both ``fetch_runs`` times; the compressed id
        and its median fetch time."""
        raw_size = len(dump_resources(resources).encode())
        z = client.registry.add_resources(resources, f"{name}-zstd")
        p = plain.add_resources(resources, f"{name}-plain")
        # Interleaved, so a noisy neighbour slows both sides alike.
        fetch_on, fetch_off, transfer_on, transfer_off = [], [], [], []
        for _ in range(fetch_runs):
            fetch_on += timed(lambda: client.registry.fetch(z.resources_id), 1)
            fetch_off += timed(lambda: plain.fetch(p.resources_id), 1)
            transfer_on += timed(lambda: client.redis.hget(on.keys.snapshot(z.resources_id), "resources"), 1)
            transfer_off += timed(lambda: client.redis.hget(on.keys.snapshot(p.resources_id), "resources"), 1)
        (on_med, on_p99), (off_med, off_p99) = percentiles(fetch_on), percentiles(fetch_off)
        stored_z = client.redis.hstrlen(on.keys.snapshot(z.resources_id), "resources")
        stored_p = client.redis.hstrlen(on.keys.snapshot(p.resources_id), "resources")
        rows.append((f"cold fetch {raw_size / 1e6:.2f} MB {corpus}, zstd (default threshold)",
                     f"median {on_med * 1e3:.2f} ms, p99 {on_p99 * 1e3:.2f} ms", "< 10 ms"))
        rows.append((f"cold fetch {raw_size / 1e6:.2f} MB {corpus}, uncompressed",
                     f"median {off_med * 1e3:.2f} ms, p99 {off_p99 * 1e3:.2f} ms", ""))
        rows.append(("  of which the payload transfer (HGET), zstd / plain",
                     f"{statistics.median(transfer_on) * 1e3:.2f} ms / {statistics.median(transfer_off) * 1e3:.2f} ms",
                     ""))
        rows.append(("  stored bytes, zstd / plain", f"{stored_z:,} / {stored_p:,}", ""))
        return z.resources_id, on_med

    # (2) and (3): ~1 MB prompt-heavy snapshots, stored compressed and not, and compression ratios. The
    # realistic corpus has its own RNG so the random-word snapshots stay the same as before it was added.
    realistic_rng = random.Random(20240608)
    big_id, on_med = cold_fetch(prompt_snapshot(rng, 1_000_000), "big", "random words")
    cold_fetch(realistic_snapshot(realistic_rng, 1_000_000), "big-realistic", "realistic")
    for size in (10_000, 100_000, 1_000_000):
        for corpus, resources in (("random-word", prompt_snapshot(rng, size)),
                                  ("realistic", realistic_snapshot(realistic_rng, size))):
            raw = len(dump_resources(resources).encode())
            snap = client.registry.add_resources(resources)
            stored = client.redis.hstrlen(on.keys.snapshot(snap.resources_id), "resources")
            rows.append((f"compression ratio, {raw / 1e3:.0f} KB {corpus} snapshot", f"{raw / stored:.2f}x", ">= 3x"))

    # (1) cache hits, on the 1 MB snapshot and a small one.
    client.registry.set_pointer("prod", big_id)
    small = client.registry.add_resources(prompt_snapshot(rng, 2_000, 1), "small")
    cache = SnapshotCache(client.registry, 256 * 1024 * 1024)
    assert cache.start(), "the cache listener did not subscribe"
    cache.prewarm()
    seq = int(client.redis.get(on.keys.seq))
    while cache.stats()["applied_seq"] < seq:
        time.sleep(0.001)
    counter = CommandCounter(client.redis)
    samples: dict[str, list[float]] = {"small": [], "prod": [], "pinned": []}
    refs = {"small": (small.resources_id, None), "prod": ("prod", None), "pinned": (big_id, 1)}
    for _ in range(hits_n):
        for name, (ref, version) in refs.items():
            start = time.perf_counter_ns()
            cache.get(ref, version, seq)
            samples[name].append((time.perf_counter_ns() - start) / 1e3)
    stats = cache.stats()
    cache.close()
    gets = hits_n * len(refs)
    for name, label in (("small", "small snapshot by id"), ("prod", "1 MB snapshot via pointer 'prod'"),
                        ("pinned", "1 MB snapshot pinned (id, version)")):
        med, p99 = percentiles(samples[name])
        rows.append((f"cache hit, {label}", f"median {med:.2f} µs, p99 {p99:.2f} µs", "< 50 µs"))
    rows.append((f"Redis commands during {gets:,} hits",
                 f"{counter.commands} commands, {counter.checkouts} connections", "0"))
    summary = (f"hits {stats['hits']:,}, misses {stats['misses']}, entries {stats['entries']}, "
               f"{stats['bytes'] / 1e6:.1f} MB")
    rows.append(("  cache stats after the hit loop", summary, ""))
    hit_med = statistics.median(samples["pinned"]) / 1e6
    rows.append(("  1 MB snapshot: cold fetch / cache hit", f"{on_med / hit_med:,.0f}x faster", ""))

    # (4) batches: 200 snapshots, 500 rollouts.
    items = [{"main_llm": LLM(endpoint="http://llm.local/v1", model=f"m{i}"),
              "prompt": PromptTemplate(template=english_like(rng, 1500))} for i in range(200)]
    start = time.perf_counter()
    for i, item in enumerate(items):
        client.add_resources(item, f"one-{i}")
    one_by_one = time.perf_counter() - start
    start = time.perf_counter()
    client.add_resources_batch([(f"batch-{i}", item) for i, item in enumerate(items)])
    batched = time.perf_counter() - start
    rows.append(("add 200 snapshots: one by one / add_resources_batch",
                 f"{one_by_one * 1e3:.1f} ms / {batched * 1e3:.1f} ms = {one_by_one / batched:.1f}x", ""))

    client.enqueue_rollout({"warm": "up"})  # opens the broker connection outside the timing
    start = time.perf_counter()
    for i in range(500):
        client.enqueue_rollout({"i": i})
    one_by_one = time.perf_counter() - start
    start = time.perf_counter()
    client.enqueue_rollouts([{"i": i} for i in range(500)])
    batched = time.perf_counter() - start
    rows.append(("enqueue 500 rollouts: enqueue_rollout / enqueue_rollouts",
                 f"{one_by_one * 1e3:.1f} ms / {batched * 1e3:.1f} ms = {one_by_one / batched:.1f}x", ""))
    client.celery.pool.force_close_all()
    plain.redis.close()
    client.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    args = parser.parse_args()
    url, server = ensure_redis(os.environ.get("LQ_REDIS_URL", "redis://127.0.0.1:6379/0"))
    prefix = f"lqbench-{uuid.uuid4().hex[:10]}"
    info = redis.Redis.from_url(url).info("server")
    print(f"Redis {info.get('redis_version')} at {url} ({'embedded ' + server.kind if server else 'existing'}), "
          f"prefix {prefix}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs\n")
    try:
        rows = run(url, prefix, args.quick)
    finally:
        deleted = delete_prefix(url, prefix)
    width = max(len(r[0]) for r in rows)
    rwidth = max(len(r[1]) for r in rows)
    print(f"{'measure':<{width}}  {'result':<{rwidth}}  target")
    print(f"{'-' * width}  {'-' * rwidth}  ------")
    for measure, result, target in rows:
        print(f"{measure:<{width}}  {result:<{rwidth}}  {target}")
    print(f"\n(deleted the {deleted} keys under {prefix}:)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
