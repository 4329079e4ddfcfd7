"""core/errors.py: what a message may show of a Redis URL."""

from __future__ import annotations

import pytest

from lightning_queue.core.errors import RedisUnavailableError, redacted_url


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:6379/0",
    "redis://reader@h:6379/0",  # a user name alone is not a secret
    "redis://:@h:6379/0",  # an empty password neither
    "rediss://h:6380/0?ssl_ca_certs=/etc/lq/ca.pem&ssl_check_hostname=false",  # file paths are not secrets
    "unix:///run/redis.sock?db=2",
    "sentinel://h1:26379;sentinel://h2:26379/0",
])
def test_a_url_without_a_password_is_shown_unchanged(url: str) -> None:
    assert redacted_url(url) == url


@pytest.mark.parametrize("url, shown", [
    ("redis://:s3cret@h:6379/0", "redis://:**@h:6379/0"),
    ("rediss://lq:s3cret@h:6380/0?ssl_ca_certs=/ca.pem", "rediss://lq:**@h:6380/0?ssl_ca_certs=/ca.pem"),
    ("redis://h:6379/0?password=s3cret&db=1", "redis://h:6379/0?password=**&db=1"),
    ("redis://:s3@cr?et/x@h:6379/0", "redis://:**@h:6379/0"),  # unencoded @ ? / in the password
    ("sentinel://:s3cret@h1:26379;sentinel://:s3cret@h2:26379", "sentinel://:**@h1:26379;sentinel://:**@h2:26379"),
    ("redis:/:s3cret@redis-host", "redis:/:**@redis-host"),  # malformed, masked all the same
])
def test_only_the_password_is_masked(url: str, shown: str) -> None:
    assert redacted_url(url) == shown and "s3" not in shown


def test_error_messages_use_it() -> None:
    assert "redis://reader@h:1/0" in str(RedisUnavailableError("redis://reader@h:1/0"))
    assert "s3cret" not in str(RedisUnavailableError("redis://:s3cret@h:1/0"))
