"""The API fuzzed against its own OpenAPI schema (schemathesis): no input makes it fail with a server error.

Every operation but the event stream (an endless response) is called with generated parameters
and bodies, authenticated, on a seeded fakeredis; the responses are checked by schemathesis's
checks (no 5xx, and each status, content type and body as the schema declares them).
"""

from __future__ import annotations

import base64
from typing import Any

import fakeredis
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance

from lightning_queue import LightningClient
from lightning_queue.ops.server import ServerConfig, create_app
from tests.unit.server.conftest import PASSWORD

AUTH = {"Authorization": "Basic " + base64.b64encode(f"admin:{PASSWORD}".encode()).decode()}


def test_no_input_makes_a_server_error(seeded: LightningClient, fake_redis: fakeredis.FakeRedis) -> None:
    app = create_app(ServerConfig(host="0.0.0.0", password=PASSWORD), client=seeded)
    schema = schemathesis.openapi.from_asgi("/api/v1/openapi.json", app, headers=AUTH).exclude(path="/api/v1/events")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def call(case: Any) -> None:
            # A value can match the schema and still mean nothing (a page cursor the server never handed
            # out): that is a 400, not the acceptance this check expects of every schema-valid request.
            case.call_and_validate(headers=AUTH, excluded_checks=[positive_data_acceptance])

        call()
