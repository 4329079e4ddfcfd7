"""The critic: an LLM that reads rollouts that went badly and proposes edited prompt templates.

Two chat calls to any OpenAI-compatible endpoint (``POST {endpoint}/chat/completions``),
as in APO / ProTeGi's "textual gradients": a *critique* of the template from the failed
rollouts (their inputs, outputs, errors and, where the agent reported one, traces), then
*edits* that apply the critique, one call per proposal. The endpoint, model, key and
sampling parameters come from an :class:`~lightning_queue.LLM` resource, or from
``LQ_CRITIC_*`` settings (:class:`CriticSettings`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import httpx
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from lightning_queue.core.errors import ConfigurationError, CriticError, redacted_url
from lightning_queue.core.models import LLM, Rollout

CRITIQUE_INSTRUCTIONS = (
    "You improve the prompt templates of an AI agent. You are shown a template and rollouts in which the "
    "agent, prompted with it, did badly. Find what in the template caused these failures."
)
CRITIQUE_TASK = (
    "List, as short bullet points, the causes of these failures that a change to the template could fix, "
    "each with the concrete change to make (wording, required output format, constraints, order, definitions). "
    "Do not rewrite the template yet."
)
EDIT_INSTRUCTIONS = (
    "You revise prompt templates. Apply the critique to the template. Keep every placeholder in curly braces "
    "exactly as it is written. Answer with the revised template only: no explanation, no heading, no code fence."
)


class CriticSettings(BaseSettings):
    """The critic's endpoint from the environment: ``LQ_CRITIC_ENDPOINT``, ``LQ_CRITIC_MODEL``,
    ``LQ_CRITIC_API_KEY`` and ``LQ_CRITIC_TEMPERATURE``."""

    model_config = SettingsConfigDict(env_prefix="LQ_CRITIC_", extra="ignore")

    endpoint: str | None = Field(None, description="Base URL of an OpenAI-compatible server, e.g. http://host:8000/v1.")
    model: str | None = Field(None, description="The model the critic asks.")
    api_key: SecretStr | None = Field(None, description="Sent as 'Authorization: Bearer <key>'.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature of critiques and edits.")

    def llm(self) -> LLM:
        if not self.endpoint or not self.model:
            raise ConfigurationError(
                "no critic model is configured; pass Critic(LLM(endpoint=..., model=...)), or set LQ_CRITIC_ENDPOINT "
                "and LQ_CRITIC_MODEL (and LQ_CRITIC_API_KEY if the server needs one)"
            )
        return LLM(endpoint=self.endpoint, model=self.model, api_key=self.api_key,
                   sampling_parameters={"temperature": self.temperature})


class Critic:
    """Critiques a prompt template from failed rollouts and proposes edits, through ``llm``.

    ``max_chars`` bounds how much of each rollout (input, output, trace) the critique
    request shows; ``timeout`` bounds each call. Raises :class:`CriticError` when the
    endpoint cannot be reached or answers with an error or something that is not a chat
    completion. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, llm: LLM | None = None, *, timeout: float = 120.0, max_chars: int = 3000,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.llm = llm if llm is not None else CriticSettings().llm()
        self.max_chars = max_chars
        self._http = httpx.Client(timeout=timeout, transport=transport or httpx.HTTPTransport(retries=2))

    @property
    def model(self) -> str:
        return self.llm.model

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Critic:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def critique(self, template: str, failures: Sequence[Rollout]) -> str:
        """What in ``template`` made the agent fail on ``failures`` (the critique, as text)."""
        shown = "\n\n".join(self._describe(i, r) for i, r in enumerate(failures, start=1))
        messages = [
            {"role": "system", "content": CRITIQUE_INSTRUCTIONS},
            {"role": "user", "content": f"## Prompt template\n{template}\n\n## Rollouts that went badly "
                                        f"({len(failures)})\n{shown}\n\n## Your task\n{CRITIQUE_TASK}"},
        ]
        answer = self._chat(messages)
        if not answer.strip():
            raise CriticError(self._where, "it answered an empty critique")
        return answer.strip()

    def propose(self, template: str, critique: str, count: int) -> list[str]:
        """``count`` edited templates that apply ``critique`` to ``template`` (one call each, so
        sampling makes them differ), as the model wrote them, code fences removed."""
        proposals = []
        for k in range(1, count + 1):
            messages = [
                {"role": "system", "content": EDIT_INSTRUCTIONS},
                {"role": "user", "content": f"## Prompt template\n{template}\n\n## Critique\n{critique}\n\n"
                                            f"## Revised template (variant {k} of {count})"},
            ]
            proposals.append(strip_fences(self._chat(messages)))
        return proposals

    # -- the endpoint -------------------------------------------------------------------------

    @property
    def _where(self) -> str:
        return redacted_url(self.llm.endpoint)

    def _chat(self, messages: list[dict[str, Any]]) -> str:
        url = self.llm.endpoint.rstrip("/") + "/chat/completions"
        body = {**self.llm.sampling_parameters, "model": self.llm.model, "messages": messages}
        headers = {"Authorization": f"Bearer {self.llm.api_key.get_secret_value()}"} if self.llm.api_key else {}
        try:
            response = self._http.post(url, json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise CriticError(self._where, f"cannot reach it ({type(exc).__name__}: {exc})") from exc
        if response.status_code >= 400:
            raise CriticError(self._where, f"it answered HTTP {response.status_code}: {response.text[:300]}")
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise CriticError(self._where, f"it answered something that is not a chat completion: "
                                           f"{response.text[:300]}") from None
        return content if isinstance(content, str) else ""

    def _describe(self, index: int, rollout: Rollout) -> str:
        parts = [f"### Rollout {index}: {rollout.status}, reward {rollout.reward}",
                 f"input: {self._json(rollout.input)}"]
        result = rollout.result
        if result is not None and result.output is not None:
            parts.append(f"output: {self._json(result.output)}")
        if rollout.error is not None:
            parts.append(f"error: {rollout.error.type}: {rollout.error.message[:self.max_chars]}")
        if result is not None and result.trace:
            parts.append(f"trace: {self._json(result.trace)}")
        return "\n".join(parts)

    def _json(self, value: Any) -> str:
        text = json.dumps(value, ensure_ascii=False, default=str)
        return text if len(text) <= self.max_chars else text[: self.max_chars - 20] + " ... (cut)"


def strip_fences(text: str) -> str:
    """A template as a model wrote it, without the Markdown code fence it may wrap it in."""
    body = text.strip()
    if body.startswith("```") and body.endswith("```") and len(body) >= 6:
        body = body[3:-3]
        first, _, rest = body.partition("\n")
        body = rest if first.strip().isidentifier() or not first.strip() else body  # ```text\n...
    return body.strip()
