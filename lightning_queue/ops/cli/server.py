"""``lightning-queue server``: the dashboard and its HTTP API, until stopped."""

from typing import Annotated

import typer

from lightning_queue.ops.cli.context import cli_context
from lightning_queue.ops.cli.output import err

app = typer.Typer()


@app.command()
def server(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="Address to listen on (env LQ_SERVER_HOST, default 127.0.0.1).")]
    = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on (env LQ_SERVER_PORT, default 8780).")] = None,
) -> None:
    """Serve the dashboard and its JSON API (/api/v1, OpenAPI at /api/v1/openapi.json) until stopped.

    Credentials, LQ_SERVER_PASSWORD (basic auth, user LQ_SERVER_USER, default admin) or LQ_SERVER_TOKEN (bearer),
    are needed for every request beyond loopback and for every change; on loopback without either, a password is
    made up and printed.
    """
    # FastAPI and uvicorn are imported here only: `lightning-queue --help` stays fast without them.
    import uvicorn

    from lightning_queue.core.errors import redacted_url
    from lightning_queue.ops.server import ServerConfig, create_app

    context = cli_context(ctx)
    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    # Checked before Redis is reached: beyond loopback without credentials is refused at once.
    config, generated = ServerConfig(**overrides).with_credentials()  # type: ignore[arg-type]  # pydantic validates
    app = create_app(config, client=context.client())
    where = f"http://{'[' + config.host + ']' if ':' in config.host else config.host}:{config.port}/"
    err.print(f"dashboard on {where} (prefix {context.settings.key_prefix}, Redis "
              f"{redacted_url(context.settings.redis_url)})")
    if generated:
        err.print(f"changes need user [bold]{config.user}[/] and password [bold]{generated}[/] "
                  "(made up for this run: set LQ_SERVER_PASSWORD to choose one)")
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", proxy_headers=False)
