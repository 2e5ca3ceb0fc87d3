"""Schemathesis against the OpenAPI schema: no generated request may produce a 5xx."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from pydantic import SecretStr
from schemathesis.checks import not_a_server_error

from lakesync.api.app import create_app
from lakesync.config import Settings
from lakesync.runtime import Runtime

TOKEN = "fuzz-token-0123456789"


@pytest.mark.parametrize("token", [None, TOKEN], ids=["open", "with-token"])
def test_no_generated_request_gets_a_5xx(settings: Settings, token: str | None) -> None:
    settings = settings.model_copy(update={"api_token": SecretStr(token) if token else None})
    with Runtime(settings) as rt:  # no executor: jobs stay pending; the API is what is fuzzed
        schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(rt))
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        tried = 0
        for result in schema.get_all_operations():
            operation = result.ok()

            @given(case=operation.as_strategy())
            @hsettings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck),
                       database=None)  # fmt: skip
            def check(case: Any) -> None:
                case.call_and_validate(headers=headers, checks=[not_a_server_error])

            check()
            tried += 1
        assert tried >= 8
