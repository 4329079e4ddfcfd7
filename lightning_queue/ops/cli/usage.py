"""How traces and LLM usage are shown: a trace as a tree, usage rollups as tables."""

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from rich.markup import escape
from rich.tree import Tree

from lightning_queue.ops.cli.output import Listing, console

if TYPE_CHECKING:
    from lightning_queue.core.models import Attempt
    from lightning_queue.core.traces import Span, Usage

_ATTRIBUTE_SHOWN = 60


def _seconds(value: float) -> str:
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def _label(span: "Span") -> str:
    from lightning_queue.core import traces as t

    a = span.attributes
    parts = [f"[bold]{escape(span.name)}[/]", _seconds(span.duration)]
    if span.name == t.ATTEMPT_SPAN:
        parts.append(f"attempt {a.get(t.SEQUENCE_ID)} {a.get(t.ATTEMPT_ID)}  {a.get(t.RESOURCES_ID)} "
                     f"v{a.get(t.RESOURCES_VERSION)}  {a.get(t.STATUS, '')}")
        for name, key in (("experiment", t.EXPERIMENT), ("variant", t.VARIANT), ("reward", t.FINAL_REWARD)):
            if key in a:
                parts.append(f"{name} {a[key]}")
    elif span.is_llm_call:
        model = a.get(t.GEN_AI_RESPONSE_MODEL) or a.get(t.GEN_AI_REQUEST_MODEL)
        parts.append(f"model {model}")
        if span.input_tokens is not None or span.output_tokens is not None:
            parts.append(f"tokens {span.input_tokens or 0} in / {span.output_tokens or 0} out")
        if span.cost is not None:
            parts.append(f"${span.cost:.6f}")
        if a.get(t.LLM_PROXIED):
            parts.append("(through the proxy)")
    elif span.name == t.REWARD_SPAN:
        primary = " (primary)" if a.get(t.REWARD_PRIMARY) else ""
        parts.append(f"{a.get(t.REWARD_NAME)} = {a.get(t.REWARD_VALUE)}{primary}")
    elif span.name == t.MESSAGE_SPAN:
        parts.append(str(a.get(t.MESSAGE_TEXT, ""))[:_ATTRIBUTE_SHOWN])
    elif span.name == t.TRUNCATED_SPAN:
        parts.append(f"[red]{a.get(t.DROPPED_SPANS)} spans ({a.get(t.DROPPED_BYTES)} bytes) dropped past "
                     f"LQ_TRACE_MAX_BYTES={a.get(t.MAX_BYTES)}[/]")
    if span.status == "error":
        parts.append(f"[red]error[/] {escape(span.status_message or '')}")
    return "  ".join(p if p.startswith("[") else escape(p) for p in parts)


def show_trace(rollout_id: str, spans: "Sequence[Span]", attempts: "Sequence[Attempt]") -> None:
    """Each attempt's spans as a tree (children under their parent, by start time), then the
    usage of each attempt."""
    from lightning_queue.core.traces import Usage, tree

    shown = Tree(f"rollout {escape(rollout_id)}")
    path = [shown]  # path[d]: the node spans of depth d hang from
    for depth, span in tree(spans):
        del path[depth + 1:]
        path.append(path[depth].add(_label(span)))
    console.print(shown if spans else f"rollout {rollout_id}: no spans recorded (yet)", highlight=False)
    usage = Listing("#", "status", "calls", "tokens in", "tokens out", "USD", "unpriced", "dropped")
    for a in attempts:
        u = a.usage or Usage()
        usage.add_row(str(a.sequence_id), a.status, str(u.llm_calls), str(u.input_tokens), str(u.output_tokens),
                      f"{u.cost_usd:.6f}", str(u.unpriced_calls), str(a.spans_dropped))
    if attempts:
        console.print(usage)


def show_usage(title: str, by: str, rollups: "Mapping[str, Usage]") -> None:
    """A usage rollup (per version, per variant) as a table; ``unpriced`` counts the calls the
    price table (``LQ_LLM_PRICES``) does not price, left out of the cost."""
    shown = Listing(by, "attempts", "calls", "tokens in", "tokens out", "USD", "USD/attempt", "unpriced",
                    title=title)
    for key, u in rollups.items():
        per = f"{u.cost_usd / u.attempts:.6f}" if u.attempts else ""
        shown.add_row(key, str(u.attempts), str(u.llm_calls), str(u.input_tokens), str(u.output_tokens),
                      f"{u.cost_usd:.6f}", per, str(u.unpriced_calls))
    console.print(shown if rollups else f"{title}: nothing recorded yet", highlight=False)
