"""The bad-input catalogue, on fakeredis: each mistake a user can make, one test each.

Every case must give a clear error: its own exception type (a
:class:`LightningQueueError`), a message naming the field or id and saying what
to do; and must lose nothing and leave the worker able to go on. Cases that need
real worker processes or a real server are in
``tests/integration/test_bad_input_live.py``. The README's Troubleshooting
table lists every case, by the test names here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import fakeredis
import pytest
from billiard.exceptions import SoftTimeLimitExceeded

from lightning_queue import (
    LLM,
    LightningClient,
    PromptTemplate,
    Rollout,
    RolloutConfig,
    RolloutRequest,
    RolloutResult,
    rollout,
)
from lightning_queue.core.errors import (
    AgentSignatureError,
    ConfigurationError,
    InvalidRedisUrlError,
    InvalidResourcesError,
    InvalidRolloutInputError,
    LightningQueueError,
    PointerError,
    ResourcesExistError,
    ResourcesNotFoundError,
    RolloutFailed,
    RolloutNotFoundError,
    SnapshotCorruptedError,
    SnapshotTooLargeError,
    TemplateRenderError,
    UnknownResourceTypeError,
    VersionConflictError,
)
from lightning_queue.core.models import validate_resources
from lightning_queue.storage.connections import connect
from lightning_queue.worker.app import load_agent
from tests.unit.test_runner import FakeTask, RetryRequested, run

Write = Callable[[], Any]


def clear_error(error: BaseException, kind: type[LightningQueueError], *fragments: str) -> str:
    """``error`` is a ``kind`` (so a LightningQueueError) whose one-paragraph message holds every fragment."""
    assert isinstance(error, kind), f"{type(error).__name__}: {error}"
    assert isinstance(error, LightningQueueError)
    message = str(error)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "Traceback" not in message and "errors.pydantic.dev" not in message
    return message


def raises(write: Write, kind: type[LightningQueueError], *fragments: str) -> str:
    with pytest.raises(LightningQueueError) as info:
        write()
    return clear_error(info.value, kind, *fragments)


@pytest.fixture
def keys_before(fake_redis: fakeredis.FakeRedis) -> Callable[[], set[bytes]]:
    return lambda: set(fake_redis.keys("*"))


def worker_goes_on(client: LightningClient, enqueue: Callable[..., Rollout]) -> None:
    """After a bad rollout the same worker runs the next good one."""

    @rollout
    def good(task: Any) -> float:
        return 1.0

    if client.get_latest_resources() is None:
        client.add_resources({"prompt": PromptTemplate(template="ok")})
    queued = enqueue("next")
    assert run(FakeTask(client, good), queued.rollout_id)["status"] == "succeeded"


def failed_with(client: LightningClient, rollout_id: str, error_type: str, *fragments: str) -> None:
    """The rollout ended ``failed`` (nothing stuck) with an error of that type naming every fragment."""
    done = client.get_rollout(rollout_id)
    assert done.status == "failed" and done.error is not None
    assert done.error.type == error_type, done.error
    for fragment in fragments:
        assert fragment in done.error.message, done.error.message


# --------------------------------------------------------------------------- snapshots


def test_unknown_resource_type(fake_client: LightningClient, keys_before) -> None:
    before = keys_before()
    raises(lambda: fake_client.add_resources({"r": {"resource_type": "retriever", "index": "x"}}),
           UnknownResourceTypeError, "'retriever'", "known types: llm, prompt_lineage, prompt_template", "subclass")
    assert keys_before() == before


def test_missing_field(fake_client: LightningClient) -> None:
    raises(lambda: fake_client.add_resources({"llm": {"resource_type": "llm", "endpoint": "http://h/v1"}}),
           InvalidResourcesError, "llm.model: Field required", "Fix the field")


def test_mistyped_field(fake_client: LightningClient) -> None:
    raises(lambda: fake_client.add_resources({"llm": {"resource_type": "llm", "endpoint": "http://h/v1",
                                                      "model": "m", "sampling_parameters": [0.2]}}),
           InvalidResourcesError, "llm.sampling_parameters", "valid dictionary", "(got list)")


def test_misspelled_field(fake_client: LightningClient) -> None:
    raises(lambda: fake_client.add_resources({"p": {"resource_type": "prompt_template", "tempalte": "Q"}}),
           InvalidResourcesError, "p.tempalte: Extra inputs are not permitted", "p.template: Field required")


def test_mistyped_secret_is_named_but_never_shown(fake_client: LightningClient) -> None:
    message = raises(lambda: fake_client.add_resources({"llm": {"resource_type": "llm", "endpoint": "http://h/v1",
                                                                "model": "m", "api_key": 987654321}}),
                     InvalidResourcesError, "llm.api_key")
    assert "987654321" not in message


def test_llm_endpoint_not_a_url(fake_client: LightningClient) -> None:
    for endpoint in ("localhost:8000", "not a url", "ftp://h/v1", "http://"):
        raises(lambda e=endpoint: fake_client.add_resources({"llm": {"resource_type": "llm", "endpoint": e, "model": "m"}}),
               InvalidResourcesError, "llm.endpoint", repr(endpoint), "http(s) URL", "e.g. http://")


def test_fstring_template_does_not_parse(fake_client: LightningClient) -> None:
    raises(lambda: fake_client.add_resources({"p": {"resource_type": "prompt_template", "template": "Q: {question"}}),
           InvalidResourcesError, "p:", "field template", "does not parse", "double literal braces")


def test_jinja_template_does_not_parse(fake_client: LightningClient) -> None:
    raises(lambda: validate_resources({"p": {"resource_type": "prompt_template", "engine": "jinja",
                                             "template": "{% for x in %}"}}),
           InvalidResourcesError, "p:", "jinja template does not parse", "fix its Jinja syntax")


@pytest.mark.parametrize("engine, template", [("f-string", "Q: {question}"), ("jinja", "Q: {{ question }}")])
def test_template_does_not_render_with_the_variables_given(engine: str, template: str) -> None:
    prompt = PromptTemplate(template=template, engine=engine)  # type: ignore[arg-type]
    with pytest.raises(KeyError) as info:  # still a KeyError, for code that caught that
        prompt.format(q="2+2")
    clear_error(info.value, TemplateRenderError, "question", "variables given: q", "pass every variable")


def test_template_not_rendering_in_an_agent_fails_the_rollout(fake_client: LightningClient, enqueue) -> None:
    @rollout
    def agent(task: Any, prompt: PromptTemplate) -> float:
        prompt.format(**task)
        return 1.0

    fake_client.add_resources({"prompt": PromptTemplate(template="Q: {question}")})
    queued = enqueue({"q": "2+2"})
    with pytest.raises(RolloutFailed):
        run(FakeTask(fake_client, agent), queued.rollout_id)
    failed_with(fake_client, queued.rollout_id, "TemplateRenderError", "'question'", "variables given: q")
    worker_goes_on(fake_client, enqueue)


def test_empty_snapshot(fake_client: LightningClient, keys_before) -> None:
    before = keys_before()
    raises(lambda: fake_client.add_resources({}), InvalidResourcesError, "at least one resource")
    assert keys_before() == before


def test_snapshot_not_a_mapping(fake_client: LightningClient) -> None:
    raises(lambda: fake_client.add_resources([PromptTemplate(template="x")]),  # type: ignore[arg-type]
           InvalidResourcesError, "mapping of name -> resource", "list")


def test_over_size_snapshot(fake_redis: fakeredis.FakeRedis, prefix: str, keys_before) -> None:
    from lightning_queue import Settings

    small = Settings(redis_url="redis://fakeredis.invalid:1/0", key_prefix=prefix, max_snapshot_bytes=1024)
    client = LightningClient(small, redis_client=fake_redis)
    before = keys_before()
    raises(lambda: client.add_resources({"p": PromptTemplate(template="x" * 5000)}, "rs-big"),
           SnapshotTooLargeError, "'rs-big'", "over the limit of 1024 bytes", "LQ_MAX_SNAPSHOT_BYTES")
    assert keys_before() == before


def test_invalid_resources_id(fake_client: LightningClient) -> None:
    raises(lambda: fake_client.add_resources({"p": PromptTemplate(template="x")}, "team a/prompt"),
           PointerError, "'team a/prompt'", "letters, digits")


def test_resources_id_taken(fake_client: LightningClient) -> None:
    fake_client.add_resources({"p": PromptTemplate(template="x")}, "rs-a")
    raises(lambda: fake_client.add_resources({"p": PromptTemplate(template="y")}, "rs-a"),
           ResourcesExistError, "'rs-a'", "update_resources()")
    assert fake_client.get_resources_by_id("rs-a").resources["p"].template == "x"  # type: ignore[attr-defined]


def test_stale_expected_version(fake_client: LightningClient) -> None:
    fake_client.add_resources({"p": PromptTemplate(template="x")}, "rs-a")
    fake_client.update_resources("rs-a", {"p": PromptTemplate(template="y")})
    raises(lambda: fake_client.update_resources("rs-a", {"p": PromptTemplate(template="z")}, expected_version=1),
           VersionConflictError, "'rs-a'", "version 2", "read it again and retry")


def test_corrupted_snapshot_payload(fake_client: LightningClient, fake_redis: fakeredis.FakeRedis, enqueue) -> None:
    fake_client.add_resources({"p": PromptTemplate(template="x")}, "rs-a")
    fake_redis.hset(fake_client.keys.snapshot("rs-a"), "resources", b"\x00garbage")
    raises(lambda: fake_client.get_resources_by_id("rs-a"), SnapshotCorruptedError, "'rs-a'", "store it again")
    queued = enqueue(resources_id="rs-a", config=RolloutConfig(max_attempts=3))
    task = FakeTask(fake_client, load_agent("workers.demo_agent:agent"))
    with pytest.raises(RolloutFailed):
        run(task, queued.rollout_id)
    failed_with(fake_client, queued.rollout_id, "SnapshotCorruptedError", "'rs-a'")
    assert task.retries == []  # another attempt would read the same bytes
    fake_client.update_resources("rs-a", {"p": PromptTemplate(template="x")})  # what the message says to do
    worker_goes_on(fake_client, enqueue)


# --------------------------------------------------------------------------- enqueue


def test_task_input_not_json_serializable(fake_client: LightningClient, published: list[str], keys_before) -> None:
    fake_client.add_resources({"p": PromptTemplate(template="x")})
    before = keys_before()
    for write in (lambda: fake_client.enqueue_rollout({"when": object()}),
                  lambda: fake_client.enqueue_rollouts([{"ok": 1}, {"bad": b"\xff\xfe"}]),
                  lambda: fake_client.enqueue_rollouts([RolloutRequest(input=object())])):
        raises(write, InvalidRolloutInputError, "not JSON-serializable", "convert other objects")
    assert keys_before() == before and published == []  # nothing written, nothing sent


def test_unknown_resources_id_at_enqueue(fake_client: LightningClient, published: list[str], keys_before) -> None:
    fake_client.add_resources({"p": PromptTemplate(template="x")}, "rs-a")
    before = keys_before()
    raises(lambda: fake_client.enqueue_rollouts(["a", "b"], resources_id="rs-typo"),
           ResourcesNotFoundError, "'rs-typo'", "nothing was enqueued", "add the snapshot first")
    assert keys_before() == before and published == []


def test_unknown_pointer_at_enqueue(fake_client: LightningClient, published: list[str]) -> None:
    fake_client.add_resources({"p": PromptTemplate(template="x")}, "rs-a")
    for resolve in ("pinned", "following"):
        raises(lambda r=resolve: fake_client.enqueue_rollout("a", resources_id="prod", resolve=r),  # type: ignore[arg-type]
               ResourcesNotFoundError, "'prod'", "nothing was enqueued")
    assert published == []


def test_unknown_rollout_id(fake_client: LightningClient) -> None:
    raises(lambda: fake_client.get_rollout("ro-nope"), RolloutNotFoundError, "'ro-nope'", "rollouts list")


# --------------------------------------------------------------------------- at run time


def test_unknown_resources_id_at_run_time(fake_client: LightningClient, enqueue) -> None:
    queued = enqueue(resources_id="rs-later", check_resources=False, config=RolloutConfig(max_attempts=3))
    task = FakeTask(fake_client, load_agent("workers.demo_agent:agent"))
    with pytest.raises(RolloutFailed):
        run(task, queued.rollout_id)
    failed_with(fake_client, queued.rollout_id, "ResourcesNotFoundError", "'rs-later'")
    assert task.retries == []
    worker_goes_on(fake_client, enqueue)


def test_unknown_pointer_at_run_time(fake_client: LightningClient, enqueue) -> None:
    fake_client.add_resources({"prompt": PromptTemplate(template="x")}, "rs-a")
    queued = enqueue(resources_id="canary", resolve="following", check_resources=False)
    with pytest.raises(RolloutFailed):
        run(FakeTask(fake_client, load_agent("workers.demo_agent:agent")), queued.rollout_id)
    failed_with(fake_client, queued.rollout_id, "ResourcesNotFoundError", "'canary'")
    worker_goes_on(fake_client, enqueue)


def test_no_snapshot_at_all_for_an_unpinned_rollout(fake_client: LightningClient, enqueue) -> None:
    queued = enqueue()
    with pytest.raises(RolloutFailed):
        run(FakeTask(fake_client, load_agent("workers.demo_agent:agent")), queued.rollout_id)
    failed_with(fake_client, queued.rollout_id, "NoLatestResourcesError", "add_resources")
    worker_goes_on(fake_client, enqueue)


def test_snapshot_deleted_while_queued(fake_client: LightningClient, enqueue) -> None:
    fake_client.add_resources({"prompt": PromptTemplate(template="x")}, "rs-a")
    fake_client.add_resources({"prompt": PromptTemplate(template="y")}, "rs-b")
    queued = enqueue(resources_id="rs-a")
    fake_client.delete_resources("rs-a", force=True)
    failed_with(fake_client, queued.rollout_id, "SnapshotDeletedError", "'rs-a'", "deleted")  # failed at once, not left waiting
    # The message still in the queue is acked without running the agent.
    agent_calls: list[int] = []

    @rollout
    def agent(task: Any) -> float:
        agent_calls.append(1)
        return 1.0

    reply = run(FakeTask(fake_client, agent), queued.rollout_id)
    assert reply["status"] == "failed" and agent_calls == []
    worker_goes_on(fake_client, enqueue)


def test_agent_raises(fake_client: LightningClient, enqueue) -> None:
    @rollout
    def agent(task: Any) -> float:
        raise RuntimeError(f"tool call failed on {task}")

    fake_client.add_resources({"prompt": PromptTemplate(template="x")})
    queued = enqueue("task-7")
    with pytest.raises(RolloutFailed):
        run(FakeTask(fake_client, agent), queued.rollout_id)
    failed_with(fake_client, queued.rollout_id, "RuntimeError", "tool call failed on task-7")
    [attempt] = fake_client.get_attempts(queued.rollout_id)
    assert attempt.error is not None and "Traceback" in (attempt.error.traceback or "")
    worker_goes_on(fake_client, enqueue)


def test_agent_hangs_past_its_time_limit(fake_client: LightningClient, enqueue) -> None:
    @rollout
    def agent(task: Any) -> float:
        raise SoftTimeLimitExceeded()  # what Celery raises inside a hanging agent at the soft limit

    fake_client.add_resources({"prompt": PromptTemplate(template="x")})
    queued = enqueue(config=RolloutConfig(timeout_seconds=5, max_attempts=2))
    task = FakeTask(fake_client, agent)
    with pytest.raises(RetryRequested):
        run(task, queued.rollout_id)
    with pytest.raises(RolloutFailed):
        run(task, queued.rollout_id)
    failed_with(fake_client, queued.rollout_id, "SoftTimeLimitExceeded", "time limit of 5")
    assert [a.status for a in fake_client.get_attempts(queued.rollout_id)] == ["timeout", "timeout"]
    worker_goes_on(fake_client, enqueue)


@pytest.mark.parametrize("returned", ["perfect", [1.0, 2.0]])
def test_agent_returns_the_wrong_type(fake_client: LightningClient, enqueue, returned: Any) -> None:
    @rollout
    def agent(task: Any) -> Any:
        return returned

    fake_client.add_resources({"prompt": PromptTemplate(template="x")})
    queued = enqueue()
    with pytest.raises(RolloutFailed):
        run(FakeTask(fake_client, agent), queued.rollout_id)
    failed_with(fake_client, queued.rollout_id, "InvalidRolloutResultError", type(returned).__name__, "RolloutResult")
    worker_goes_on(fake_client, enqueue)


def test_agent_output_not_json_serializable(fake_client: LightningClient, enqueue) -> None:
    @rollout
    def agent(task: Any) -> RolloutResult:
        return RolloutResult(reward=1.0, output={"handle": object()})

    fake_client.add_resources({"prompt": PromptTemplate(template="x")})
    queued = enqueue()
    with pytest.raises(RolloutFailed):
        run(FakeTask(fake_client, agent), queued.rollout_id)
    failed_with(fake_client, queued.rollout_id, "InvalidRolloutResultError", "not JSON-serializable")
    worker_goes_on(fake_client, enqueue)


def test_agent_asks_for_a_resource_the_snapshot_lacks(fake_client: LightningClient, enqueue) -> None:
    @rollout
    def agent(task: Any, judge: LLM) -> float:
        return 1.0

    fake_client.add_resources({"prompt": PromptTemplate(template="x")}, "rs-prompt-only")
    queued = enqueue(resources_id="rs-prompt-only", config=RolloutConfig(max_attempts=3))
    task = FakeTask(fake_client, agent)
    with pytest.raises(RolloutFailed):
        run(task, queued.rollout_id)
    failed_with(fake_client, queued.rollout_id, "MissingResourceError", "'rs-prompt-only'", "'judge'", "LLM")
    assert task.retries == []
    worker_goes_on(fake_client, enqueue)


def test_agent_with_a_parameter_nothing_can_fill() -> None:
    with pytest.raises(AgentSignatureError) as info:

        @rollout
        def agent(task: Any, temperature: float) -> float:
            return temperature

    clear_error(info.value, AgentSignatureError, "temperature")


def test_worker_agent_spec_that_does_not_import() -> None:
    for spec, fragment in (("workers.no_such_module:agent", "cannot import agent module"),
                           ("workers.demo_agent:no_such_agent", "has no attribute 'no_such_agent'"),
                           ("workers.demo_agent", "must look like 'package.module:attribute'")):
        with pytest.raises(ConfigurationError) as info:
            load_agent(spec)
        clear_error(info.value, ConfigurationError, fragment)


# --------------------------------------------------------------------------- Redis URL


@pytest.mark.parametrize("url", ["http://:s3cret-pw@redis-host:6379/0", "redis://:s3cret-pw@redis-host:port/0",
                                 "redis:/:s3cret-pw@redis-host"])
def test_bad_redis_url(url: str) -> None:
    with pytest.raises(InvalidRedisUrlError) as info:
        connect(url)
    message = clear_error(info.value, InvalidRedisUrlError, "not a usable Redis URL", "redis://", "rediss://")
    assert "s3cret-pw" not in message


# --------------------------------------------------------------------------- settings and the CLI


def test_bad_setting_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    from typer.testing import CliRunner

    from lightning_queue.ops import cli

    env = {"LQ_VISIBILITY_TIMEOUT": "-3"}
    # Importing the package (as `celery -A lightning_queue.app` and the CLI do) does not fail on it...
    done = subprocess.run([sys.executable, "-c", "import lightning_queue, lightning_queue.ops.cli"], capture_output=True,
                          text=True, env={**__import__("os").environ, **env}, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    # ...the command using it names the setting in one line.
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(cli.app, ["rollouts", "list"])
    assert result.exit_code == 1 and result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
    assert "invalid Settings (from LQ_* variables" in result.stderr and "visibility_timeout" in result.stderr
    assert "Traceback" not in result.stderr and "errors.pydantic.dev" not in result.stderr


def test_bad_rollout_option_on_the_command_line(fake_client: LightningClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from lightning_queue.ops import cli

    monkeypatch.setattr(fake_client, "publish", lambda rollouts, registry_seq=0: None)
    result = CliRunner().invoke(cli.app, ["rollouts", "submit", '{"q": 1}', "--mode", "training"],
                                obj=cli.CliContext(client=fake_client))
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "mode: Input should be 'train', 'val' or 'test'" in result.stderr
    assert "Traceback" not in result.stderr and fake_client.query_rollouts() == []


# --------------------------------------------------------------------------- names that could address other keys


@pytest.mark.parametrize("prefix", ["exp:secret", "exp:", ":exp", "exp*", "exp?", "exp[1]", "e x", ""])
def test_a_key_prefix_that_could_nest_or_match_others_is_refused(prefix: str) -> None:
    from pydantic import ValidationError

    from lightning_queue import Settings
    from lightning_queue.core.keys import Keys

    with pytest.raises(ValidationError, match="no ':'"):
        Settings(key_prefix=prefix)
    with pytest.raises(ValueError, match="no ':'"):
        Keys(prefix)
    assert Settings(key_prefix="exp-secret.v2_b").keys.prefix == "exp-secret.v2_b"


def test_a_snapshot_reference_cannot_address_an_earlier_version_or_another_key(
    fake_client: LightningClient, keys_before
) -> None:
    fake_client.add_resources({"p": PromptTemplate(template="v1")}, "rs-a")
    fake_client.update_resources("rs-a", {"p": PromptTemplate(template="v2")})
    before = keys_before()
    for ref in ("rs-a:v:1", "rs-a:*", "../rs-a"):  # rs-a:v:1 is the key of rs-a's version 1
        raises(lambda ref=ref: fake_client.get_resources_by_id(ref), ResourcesNotFoundError, repr(ref), "letters")
        raises(lambda ref=ref: fake_client.delete_resources(ref, force=True), ResourcesNotFoundError, repr(ref))
        raises(lambda ref=ref: fake_client.enqueue_rollout(1, resources_id=ref), ResourcesNotFoundError, repr(ref))
        raises(lambda ref=ref: fake_client.set_pointer("prod", ref), ResourcesNotFoundError, repr(ref))
        raises(lambda ref=ref: fake_client.update_resources(ref, {"p": PromptTemplate(template="x")}),
               ResourcesNotFoundError, repr(ref))
    raises(lambda: fake_client.get_pointer("prod:x"), PointerError, "'prod:x'", "letters")
    assert keys_before() == before
    assert fake_client.get_resources_by_id("rs-a", 1).resources["p"].template == "v1"  # type: ignore[attr-defined]


def test_an_experiment_name_cannot_address_another_experiments_keys(fake_client: LightningClient) -> None:
    from lightning_queue.core.errors import ExperimentNotFoundError, InvalidExperimentError
    from lightning_queue.experiments.manager import Experiments

    experiments = Experiments(fake_client)
    fake_client.add_resources({"p": PromptTemplate(template="x")}, "rs-a")
    experiments.create({"name": "a", "variants": [{"name": "b", "resources_id": "rs-a"},
                                                  {"name": "c", "resources_id": "rs-a"}]})
    with pytest.raises(ExperimentNotFoundError):
        experiments.get("a:rollouts:b")  # experiment a's variant b index, read as an experiment before
    with pytest.raises((InvalidExperimentError, ValueError), match="resources_id"):
        experiments.create({"name": "c", "variants": [{"name": "b", "resources_id": "rs-a:v:1"},
                                                      {"name": "c", "resources_id": "rs-a"}]})
