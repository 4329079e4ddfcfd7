"""core/keys.py: queue names that can be broker keys, and the ones that cannot."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lightning_queue import Settings
from lightning_queue.core.errors import InvalidQueueNameError
from lightning_queue.core.keys import check_queue_name


@pytest.mark.parametrize("name", ["lightning_queue", "celery", "gpu.large", "team-a_calc", "q1", "A" * 100])
def test_ordinary_queue_names_are_accepted(name: str) -> None:
    assert check_queue_name(name) == name


@pytest.mark.parametrize("name, why", [
    ("unacked", "the broker keeps its own keys"),  # kombu's unacked hash: a list there crashed every worker
    ("unacked_index", "the broker keeps its own keys"),
    ("unacked_mutex", "the broker keeps its own keys"),
    ("reply.celery.pidbox", "the broker keeps its own keys"),
    ("w1@host.celery.pidbox", "letters, digits"),
    ("celeryev", "the broker keeps its own keys"),
    ("_kombu.binding.q", "letters, digits"),
    ("q\x06\x163", "letters, digits"),  # kombu's priority separator
    ("a:b", "letters, digits"),
    ("", "letters, digits"),
    ("A" * 101, "letters, digits"),
    ("-leading", "letters, digits"),
])
def test_names_that_collide_with_broker_keys_or_leave_the_safe_characters_are_refused(name: str, why: str) -> None:
    with pytest.raises(InvalidQueueNameError, match=why):
        check_queue_name(name)


def test_settings_refuse_such_a_queue() -> None:
    with pytest.raises(ValidationError, match="queue name 'unacked' cannot be used"):
        Settings(queue="unacked")
