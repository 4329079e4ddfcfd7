"""The server's settings (``LQ_SERVER_*``), and the rule for who may read and who may change."""

from __future__ import annotations

import ipaddress
import secrets

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from lightning_queue.core.errors import ServerCredentialsError


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (``127.0.0.0/8``, ``::1``, ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


class ServerConfig(BaseSettings):
    """How ``lightning-queue server`` listens and whom it lets in.

    Reads are anonymous only while the server listens on loopback; changes (pointer moves,
    rollbacks, promotions, stops) always need credentials: HTTP basic auth (``user`` and
    ``password``) or a bearer ``token``. Listening beyond loopback without either is refused
    (:class:`ServerCredentialsError`); on loopback, a password is made up at start and printed
    when none is set, so the page can still change things.
    """

    model_config = SettingsConfigDict(env_prefix="LQ_SERVER_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8780, ge=0, le=65535, description="Port to listen on (0: any free port).")
    user: str = Field("admin", min_length=1, description="User name of HTTP basic auth.")
    password: SecretStr | None = Field(None, description="Password of HTTP basic auth.")
    token: SecretStr | None = Field(None, description="Bearer token accepted besides basic auth.")
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Other origins whose pages may call the API (JSON list); none by default: same origin only.",
    )
    stream_seconds: float = Field(
        600.0, gt=0, description="An event stream is closed after this long; browsers reconnect on their own."
    )

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    def with_credentials(self) -> tuple[ServerConfig, str | None]:
        """This config, made safe to serve: refused beyond loopback without credentials
        (:class:`ServerCredentialsError`); on loopback without any, a random password is set
        and also returned (to be shown to whoever started the server), else None."""
        if self.password is not None or self.token is not None:
            return self, None
        if not self.loopback:
            raise ServerCredentialsError(self.host)
        made = secrets.token_urlsafe(12)
        return self.model_copy(update={"password": SecretStr(made)}), made
