"""The shared vocabulary: resources (secrets, templates, user types), validation, configs."""

from __future__ import annotations

import json
from typing import Literal

import pytest
from pydantic import ValidationError

from lightning_queue import (
    LLM,
    InvalidResourcesError,
    PromptTemplate,
    Resource,
    Rollout,
    RolloutConfig,
    RolloutResult,
    UnknownResourceTypeError,
)
from lightning_queue.core.models import ErrorInfo, dump_resources, validate_resources

SECRET = "sk-very-secret"


class Retriever(Resource):
    """A user-defined resource type, registered by being defined."""

    resource_type: Literal["test_models_retriever"] = "test_models_retriever"
    index: str
    top_k: int = 3


# --------------------------------------------------------------------------- secrets


def test_llm_api_key_never_shown(llm: LLM) -> None:
    assert SECRET not in repr(llm)
    assert SECRET not in str(llm)
    assert SECRET not in llm.model_dump_json()
    assert SECRET not in json.dumps(llm.model_dump(mode="json"))
    assert json.loads(llm.model_dump_json())["api_key"] == "**********"
    assert llm.api_key is not None and llm.api_key.get_secret_value() == SECRET


def test_dump_resources_reveals_secret_and_round_trips(llm: LLM, prompt: PromptTemplate) -> None:
    stored = dump_resources({"main": llm, "prompt": prompt})
    assert json.loads(stored)["resources"]["main"]["api_key"] == SECRET

    loaded = validate_resources(json.loads(stored)["resources"])
    assert loaded == {"main": llm, "prompt": prompt}
    assert isinstance(loaded["main"], LLM)
    assert loaded["main"].api_key.get_secret_value() == SECRET  # type: ignore[union-attr]


def test_llm_without_api_key_round_trips() -> None:
    llm = LLM(endpoint="http://e", model="m")
    assert validate_resources(json.loads(dump_resources({"llm": llm}))["resources"]) == {"llm": llm}


# --------------------------------------------------------------------------- prompt templates


def test_prompt_template_fstring() -> None:
    template = PromptTemplate(template="Q: {question} ({n} tries)")
    assert template.format(question="2+2?", n=3) == "Q: 2+2? (3 tries)"
    assert template.variables() == {"question", "n"}


def test_prompt_template_jinja() -> None:
    template = PromptTemplate(template="Q: {{ question }}{% if hint %} hint: {{ hint }}{% endif %}", engine="jinja")
    assert template.format(question="2+2?", hint="even") == "Q: 2+2? hint: even"
    assert template.variables() == {"question", "hint"}


@pytest.mark.parametrize(
    "template",
    [PromptTemplate(template="Q: {question}"), PromptTemplate(template="Q: {{ question }}", engine="jinja")],
    ids=["f-string", "jinja"],
)
def test_prompt_template_missing_variable_raises_key_error_naming_it(template: PromptTemplate) -> None:
    with pytest.raises(KeyError, match="question"):
        template.format(other="x")


def test_prompt_template_rejects_unknown_engine() -> None:
    with pytest.raises(ValidationError):
        PromptTemplate(template="x", engine="mustache")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- resource types


def test_user_resource_type_is_registered_and_validates() -> None:
    assert Resource.registered_types()["test_models_retriever"] is Retriever
    loaded = validate_resources({"docs": {"resource_type": "test_models_retriever", "index": "wiki"}})
    assert loaded == {"docs": Retriever(index="wiki")}
    assert isinstance(loaded["docs"], Retriever)
    assert loaded["docs"].top_k == 3  # type: ignore[attr-defined]


def test_user_resource_type_round_trips_with_builtin_ones(llm: LLM) -> None:
    resources = {"docs": Retriever(index="wiki", top_k=5), "llm": llm}
    assert validate_resources(json.loads(dump_resources(resources))["resources"]) == resources


def test_resource_subclass_without_literal_type_is_refused() -> None:
    with pytest.raises(TypeError, match="resource_type"):

        class Nameless(Resource):
            value: int = 0


def test_resource_type_name_cannot_be_taken_twice() -> None:
    with pytest.raises(TypeError, match="already registered"):

        class NotAnLLM(Resource):
            resource_type: Literal["llm"] = "llm"


def test_unknown_resource_type_has_clear_message() -> None:
    with pytest.raises(UnknownResourceTypeError) as info:
        validate_resources({"x": {"resource_type": "vector_db", "url": "http://db"}})
    message = str(info.value)
    assert "'vector_db'" in message
    assert "llm" in message and "prompt_template" in message  # the known types are listed
    assert "Resource" in message and "Literal" in message  # and what to do about it
    assert info.value.resource_type == "vector_db"
    assert isinstance(info.value, InvalidResourcesError)


def test_missing_resource_type_is_unknown() -> None:
    with pytest.raises(UnknownResourceTypeError, match="None"):
        validate_resources({"x": {"endpoint": "http://e", "model": "m"}})


@pytest.mark.parametrize(
    "resources, fragment",
    [
        ({"llm": {"resource_type": "llm", "endpoint": "http://e"}}, "model"),  # missing field
        ({"llm": {"resource_type": "llm", "endpoint": "http://e", "model": "m", "colour": "red"}}, "colour"),
        ({"llm": 42}, "resource_type"),  # not an object
        ({"p": {"resource_type": "prompt_template", "template": 7}}, "template"),
    ],
    ids=["missing-field", "extra-field", "not-an-object", "wrong-type"],
)
def test_malformed_resources_raise_invalid_resources(resources: dict, fragment: str) -> None:
    with pytest.raises(InvalidResourcesError, match=fragment) as info:
        validate_resources(resources)
    assert not isinstance(info.value, UnknownResourceTypeError)


def test_empty_resources_rejected() -> None:
    with pytest.raises(InvalidResourcesError, match="at least one"):
        validate_resources({})


def test_resources_must_be_a_mapping() -> None:
    with pytest.raises(InvalidResourcesError, match="mapping"):
        validate_resources([LLM(endpoint="http://e", model="m")])  # type: ignore[arg-type]


def test_resources_are_immutable(llm: LLM) -> None:
    with pytest.raises(ValidationError):
        llm.model = "other"  # type: ignore[misc]


# --------------------------------------------------------------------------- rollouts


def test_rollout_config_defaults() -> None:
    config = RolloutConfig()
    assert config.max_attempts == 1
    assert config.timeout_seconds is None
    assert set(config.retry_condition) == {"failed", "timeout", "worker_lost", "unresponsive"}


@pytest.mark.parametrize(
    "fields",
    [{"max_attempts": 0}, {"max_attempts": -1}, {"timeout_seconds": 0}, {"timeout_seconds": -5},
     {"retry_condition": ["crashed"]}, {"unknown_option": 1}],
)
def test_rollout_config_rejects_bad_values(fields: dict) -> None:
    with pytest.raises(ValidationError):
        RolloutConfig(**fields)


def test_rollout_config_accepts_boundaries() -> None:
    assert RolloutConfig(max_attempts=1, timeout_seconds=0.01).max_attempts == 1


def test_rollout_defaults_and_reward() -> None:
    rollout = Rollout(input={"q": 1})
    assert rollout.rollout_id.startswith("ro-")
    assert rollout.status == "queuing" and not rollout.is_finished
    assert rollout.reward is None
    done = rollout.model_copy(update={"status": "succeeded", "result": RolloutResult(reward=0.5)})
    assert done.is_finished and done.reward == 0.5
    assert Rollout(input=1).rollout_id != rollout.rollout_id


def test_error_info_from_exception() -> None:
    try:
        raise ValueError("bad input")
    except ValueError as exc:
        info = ErrorInfo.from_exception(exc)
        bare = ErrorInfo.from_exception(exc, with_traceback=False)
    assert (info.type, info.message) == ("ValueError", "bad input")
    assert info.traceback is not None and "raise ValueError" in info.traceback
    assert bare.traceback is None


def test_reward_summary_averages_succeeded_rewards_only() -> None:
    from lightning_queue import RewardSummary, Rollout, RolloutResult

    rollouts = [
        Rollout(input=1, status="succeeded", result=RolloutResult(reward=1.0)),
        Rollout(input=2, status="succeeded", result=RolloutResult(reward=0.0)),
        Rollout(input=3, status="succeeded", result=RolloutResult()),  # no reward reported
        Rollout(input=4, status="failed"),
        Rollout(input=5, status="cancelled", result=RolloutResult(reward=1.0)),
    ]
    assert RewardSummary.of(rollouts) == RewardSummary(count=5, succeeded=3, failed=2, mean_reward=0.5)
    assert RewardSummary.of([]) == RewardSummary(0, 0, 0, 0.0)
