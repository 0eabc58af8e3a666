"""The daemon honours its own OpenAPI schema under generated requests (schemathesis, bounded).

schemathesis reads ``/openapi.json`` from a real ``ckptd serve`` (TCP, with a token) and
sends requests made from it, valid and invalid: no answer may be a 500, and every answer
must have a status, content type and body the schema documents for that operation. A
few examples per operation, derandomized, keep it bounded for CI; the session watch
(a stream that lasts as long as the client holds it) is left to tests/server/test_daemon.py.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from ckptd_testlib import Daemon, daemon_in

# in the test extra (CI installs it); a development venv made before it was added skips
schemathesis = pytest.importorskip("schemathesis", reason="pip install -e '.[test]' (schemathesis)")
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

TOKEN = "s3cret-schemathesis"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    base = tmp_path_factory.mktemp("schemathesis")
    token = base / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    yield from daemon_in(base, "--port", "0", "--token-file", str(token), "--lease-ttl", "300")


@pytest.fixture(scope="module")
def api(daemon: Daemon) -> Any:
    assert daemon.tcp is not None
    loaded = schemathesis.openapi.from_url(f"{daemon.tcp}/openapi.json")
    return loaded.exclude(path="/v1/sessions/{session}")  # answers for as long as the client listens


def test_generated_requests_get_documented_answers(api: Any, daemon: Daemon) -> None:
    # schemathesis's pytest integration (from_fixture) reads a pytest-private attribute that
    # pytest 9 no longer has: each operation's strategy runs under hypothesis here instead
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 10, [op.label for op in operations]  # the schema was read whole

    for operation, mode in itertools.product(operations, (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)):

        @settings(
            max_examples=6, deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )  # fmt: skip
        @given(case=operation.as_strategy(generation_mode=mode))
        def answers_as_documented(case: Any) -> None:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            case.call_and_validate(base_url=daemon.tcp, headers=headers, checks=CHECKS, timeout=30)

        try:
            answers_as_documented()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE  # an operation without parameters has no invalid form
