"""Agents and a resource type for the security tests (``LQ_AGENT=tests.integration.security_agents:<name>``)."""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Literal

from pydantic import SecretStr

from lightning_queue import LLM, Resource, RolloutResult, rollout

log = logging.getLogger(__name__)


class Vault(Resource):
    """A user's resource type with a secret field: masked everywhere but in storage."""

    resource_type: Literal["vault"] = "vault"
    url: str
    token: SecretStr


def sha(secret: SecretStr | None) -> str:
    return hashlib.sha256(secret.get_secret_value().encode()).hexdigest() if secret else ""


@rollout
def secret_user(task: dict[str, Any], llm: LLM, vault: Vault) -> RolloutResult:
    """Proves it got both secrets in clear (by their hashes), logs its resources the way
    careless code would (``%r``), and fails when asked to, with them in the message."""
    log.warning("running with %r and %r", llm, vault)
    if task.get("fail"):
        raise RuntimeError(f"upstream refused {llm} / {vault}")
    return RolloutResult(reward=1.0, output={"api_key_sha": sha(llm.api_key), "token_sha": sha(vault.token)})
