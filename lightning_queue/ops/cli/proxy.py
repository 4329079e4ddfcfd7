"""``lightning-queue proxy``: serve the OpenAI-compatible LLM proxy until stopped."""

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lightning_queue.ops.cli.context import cli_context
from lightning_queue.ops.cli.output import err

if TYPE_CHECKING:
    from lightning_queue.core.traces import LLMPrice

app = typer.Typer()


@app.command()
def proxy(
    ctx: typer.Context,
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8088,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    prices: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False,
                     help="JSON price table: model -> {\"input\": USD, \"output\": USD} per million tokens "
                          "('*': any other model). Default: LQ_LLM_PRICES."),
    ] = None,
    upstream_timeout: Annotated[
        float, typer.Option(min=1, help="Seconds an LLM endpoint may take to answer one call.")
    ] = 300.0,
) -> None:
    """Serve the LLM proxy: each attempt's calls go to its snapshot's LLM and are recorded in its trace."""
    try:
        import uvicorn

        from lightning_queue.ops.proxy import create_proxy_app
    except ImportError as exc:
        from lightning_queue.core.errors import ConfigurationError

        raise ConfigurationError(
            f"the proxy needs the server extra ({exc}): pip install 'lightning-queue[server]'"
        ) from None

    context = cli_context(ctx)
    table = _prices(prices) if prices is not None else None
    served = create_proxy_app(context.settings, table, upstream_timeout)
    err.print(f"serving the LLM proxy on http://{host}:{port} (prefix {context.settings.key_prefix}); agents get "
              "their base URL from a ProxyLLM resource", soft_wrap=True)
    uvicorn.run(served, host=host, port=port, log_level="warning", access_log=False)


def _prices(path: Path) -> "dict[str, LLMPrice]":
    """The price table in ``path``; :class:`InvalidPriceTableError` when it does not parse."""
    from pydantic import TypeAdapter, ValidationError

    from lightning_queue.core.errors import InvalidPriceTableError
    from lightning_queue.core.models import describe_validation_error
    from lightning_queue.core.traces import LLMPrice

    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise InvalidPriceTableError(str(path), f"not JSON: {exc}") from None
    try:
        return dict(TypeAdapter(dict[str, LLMPrice]).validate_python(raw))
    except ValidationError as exc:
        raise InvalidPriceTableError(str(path), describe_validation_error(exc)) from None
