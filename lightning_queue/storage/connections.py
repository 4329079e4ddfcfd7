"""Redis connections: one configured client per process, with retries, Sentinel, TLS and a start-up check."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import parse_qsl, unquote, urlparse

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from lightning_queue.core.errors import (
    ConfigurationError,
    InvalidRedisUrlError,
    RedisAuthError,
    RedisUnavailableError,
    redacted_url,
)

log = logging.getLogger(__name__)


def text(value: object) -> str:
    """A Redis reply as ``str`` (clients here return bytes: snapshot payloads are binary)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def connect(
    url: str, sentinel_master: str | None = None, *, check: bool = True, retry_seconds: float = 10.0
) -> redis.Redis:
    """A client for ``url`` that rides out short connection drops.

    Commands are retried with exponential backoff for up to ``retry_seconds``
    (``Settings.redis_retry_seconds``) on connection errors and time-outs, so a
    Redis restart or a network blip does not fail a rollout half way; a longer
    outage raises ``redis.ConnectionError``.

    ``url`` is a ``redis://`` / ``rediss://`` URL, or Redis Sentinel in kombu's
    form, ``sentinel://[:password@]host:26379[/db];sentinel://host2:26379...``,
    with ``sentinel_master`` the name the Sentinels monitor the primary under:
    the client then asks the Sentinels for the current primary, and again after
    a failover (the password and db are the primary's; the Sentinels themselves
    are reached without one, as kombu does).

    With ``check`` (the default) the server is asked once now, so a bad
    configuration fails here with a clear error rather than on first use:
    :class:`InvalidRedisUrlError` for a URL Redis clients cannot parse,
    :class:`RedisAuthError` for refused credentials (at once, not retried),
    :class:`RedisUnavailableError` when nothing answers through the backoff.
    Every message names the URL with its password masked.
    TLS options go in the URL's query (``rediss://host:6380/0?ssl_ca_certs=/ca.pem``).
    """
    options: dict[str, Any] = {
        "retry": retry_policy(retry_seconds),
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
        "health_check_interval": 30,
        "socket_keepalive": True,
    }
    if is_sentinel_url(url):
        client = _sentinel_primary(url, sentinel_master, options)
    else:
        try:
            client = redis.Redis.from_url(url, **options)
        except ValueError as exc:
            raise InvalidRedisUrlError(url, exc) from None
    if check:
        check_connection(url, client)
    return client


_BACKOFF_BASE, _BACKOFF_CAP = 0.05, 2.0


def retry_policy(budget_seconds: float) -> Retry:
    """Exponential backoff (0.1, 0.2, 0.4 ... capped at 2 s between tries) with as many retries as
    fit in ``budget_seconds`` of waiting: 10 s gives 8 retries, 0 none."""
    retries, waited = 0, 0.0
    while True:
        delay = min(_BACKOFF_CAP, _BACKOFF_BASE * 2 ** (retries + 1))
        if waited + delay > budget_seconds:
            break
        waited += delay
        retries += 1
    return Retry(ExponentialBackoff(cap=_BACKOFF_CAP, base=_BACKOFF_BASE), retries=retries)


def is_sentinel_url(url: str) -> bool:
    return url.startswith("sentinel://")


def _sentinel_primary(url: str, master: str | None, options: dict[str, Any]) -> redis.Redis:
    if not master:
        raise ConfigurationError(
            f"LQ_REDIS_URL {redacted_url(url)!r} is a Redis Sentinel URL: set LQ_SENTINEL_MASTER to the "
            "name the Sentinels monitor the primary under (their `sentinel monitor <name> ...`)"
        )
    hosts, password, username, db = [], None, None, 0
    for part in filter(None, url.split(";")):
        parsed = urlparse(part)
        if parsed.scheme != "sentinel" or not parsed.hostname:
            raise ConfigurationError(
                f"{redacted_url(part)!r} in LQ_REDIS_URL is not a sentinel://host:port URL; "
                "list the Sentinels as sentinel://host1:26379;sentinel://host2:26379"
            )
        hosts.append((parsed.hostname, parsed.port or 26379))
        password = password or (unquote(parsed.password) if parsed.password else None)
        username = username or (unquote(parsed.username) if parsed.username else None)
        if parsed.path.strip("/"):
            db = int(parsed.path.strip("/"))
    sentinels = Sentinel(hosts, socket_timeout=5.0, socket_connect_timeout=5.0)
    primary: redis.Redis = sentinels.master_for(master, password=password, username=username, db=db, **options)
    return primary


def _ping_through(url: str, client: redis.Redis) -> None:
    try:
        client.ping()  # through the client's backoff: Redis may be starting
    except (redis.AuthenticationError, redis.exceptions.NoPermissionError) as exc:
        raise RedisAuthError(url, exc) from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise RedisUnavailableError(url, exc) from None


def check_connection(url: str, client: redis.Redis | None = None) -> None:
    """Raise :class:`RedisAuthError`, :class:`RedisUnavailableError` or
    :class:`InvalidRedisUrlError` unless Redis at ``url`` answers a PING.

    Credentials are checked first on a connection without retries: the
    retrying client counts a refused password as a connection error and would
    spend its whole backoff on it. A Sentinel URL is checked through ``client``
    (which asked the Sentinels for the primary); without one it is left to
    first use.
    """
    if is_sentinel_url(url):
        if client is not None:
            _ping_through(url, client)
        return
    try:
        probe = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    except ValueError as exc:
        raise InvalidRedisUrlError(url, exc) from None
    try:
        probe.ping()
    except (redis.AuthenticationError, redis.exceptions.NoPermissionError) as exc:
        raise RedisAuthError(url, exc) from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        if client is None:
            raise RedisUnavailableError(url, exc) from None
        _ping_through(url, client)
    finally:
        probe.close()


def broker_ssl_options(url: str) -> dict[str, Any] | None:
    """The TLS options of a ``rediss://`` URL, as kombu's ``broker_use_ssl`` wants them.

    redis-py reads ``ssl_cert_reqs``, ``ssl_ca_certs``, ``ssl_certfile`` and
    ``ssl_keyfile`` from the URL's query itself; kombu ignores them there and,
    given no options, silently connects *without verifying* the server. This
    hands it the same options, with ``ssl_cert_reqs=required`` (redis-py's
    default) unless the URL says otherwise. ``None`` for a plain URL.
    """
    parsed = urlparse(url)
    if parsed.scheme != "rediss":
        return None
    query = dict(parse_qsl(parsed.query))
    options: dict[str, Any] = {name: query[name] for name in _SSL_QUERY_OPTIONS if name in query}
    options.setdefault("ssl_cert_reqs", "required")
    if "ssl_check_hostname" in options:  # kombu passes values on as they are: a bool, as redis-py parses it
        options["ssl_check_hostname"] = options["ssl_check_hostname"].lower() in ("1", "true", "yes", "y", "on")
    return options


_SSL_QUERY_OPTIONS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname")


def ping(url: str, timeout: float = 1.0) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False
