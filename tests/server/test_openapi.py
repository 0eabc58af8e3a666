"""The published OpenAPI schema against the daemon: every answer documented, and real answers
(from a real ``ckptd serve`` over TCP with a token) valid against what is published.

A non-Python client is written from ``/openapi.json``: each route's 200 body, the one error
body on every error status, the bearer scheme, ``/metrics`` as Prometheus text, and docs a
browser opens offline without the token.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import torch

from ckptd.engine import TABLE_MEDIA
from ckptd_testlib import Daemon, daemon_in

TOKEN = "s3cret-openapi"
ERROR_REF = "#/components/schemas/ErrorResponse"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    base = tmp_path_factory.mktemp("openapi")
    token = base / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    # leases outlive a slow test (no session renews them here); the last --lease-ttl wins
    yield from daemon_in(base, "--port", "0", "--token-file", str(token), "--lease-ttl", "300")


@pytest.fixture(scope="module")
def http(daemon: Daemon) -> Iterator[httpx.Client]:
    assert daemon.tcp is not None
    with httpx.Client(base_url=daemon.tcp, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def schema(daemon: Daemon) -> dict[str, Any]:
    assert daemon.tcp is not None
    response = httpx.get(f"{daemon.tcp}/openapi.json", timeout=60)  # no token: the schema is not secret
    assert response.status_code == 200
    return response.json()


def _operations(schema: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            yield path, method, operation


# --- the schema -------------------------------------------------------------------------


def test_every_operation_documents_its_answer_and_its_errors(schema: dict[str, Any]) -> None:
    assert "HTTPValidationError" not in schema["components"]["schemas"]  # FastAPI's shape is not ours
    for path, method, operation in _operations(schema):
        responses = operation["responses"]
        successes = [status for status in responses if status.startswith("2")]
        assert successes, (method, path)
        for success in successes:
            if success != "204":
                for body in responses[success]["content"].values():  # a load's table answer is a second type
                    assert body["schema"] not in ({}, None), (method, path)  # not the `{}` FastAPI infers from a Response
        errors = [status for status in responses if status[0] in "45"]
        assert "500" in errors, (method, path)
        for status in errors:
            assert responses[status]["content"] == {"application/json": {"schema": {"$ref": ERROR_REF}}}, (method, path, status)


def test_error_model_is_the_wire_shape(schema: dict[str, Any]) -> None:
    error = schema["components"]["schemas"]["ErrorResponse"]
    assert error["required"] == ["error"]
    detail = schema["components"]["schemas"]["ErrorDetail"]
    assert set(detail["required"]) == {"type", "message"}


def test_bearer_scheme_on_every_route_but_the_probe(schema: dict[str, Any]) -> None:
    assert schema["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": "the daemon's token (--token-file); needed over TCP only",
    }  # fmt: skip
    for path, method, operation in _operations(schema):
        expected = [] if path == "/healthz" else [{"bearerAuth": []}]
        assert operation["security"] == expected, (method, path)
        if expected:
            assert "401" in operation["responses"], (method, path)


def test_metrics_are_prometheus_text(schema: dict[str, Any], http: httpx.Client) -> None:
    content = schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert content == {"text/plain": {"schema": {"type": "string"}}}
    response = http.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain") and "# TYPE ckptd_" in response.text


def test_docs_open_offline_without_the_token(daemon: Daemon) -> None:
    """Swagger UI's page and assets come from the daemon itself (no CDN), token-free; its
    *Authorize* button comes from the bearer scheme."""
    assert daemon.tcp is not None
    page = httpx.get(f"{daemon.tcp}/docs", timeout=60)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
    assert assets and all(url.startswith("/docs/static/") for url in assets), assets
    assert "http://" not in page.text and "https://" not in page.text  # nothing fetched from elsewhere
    assert "url: '/openapi.json'" in page.text
    for url in assets:
        asset = httpx.get(f"{daemon.tcp}{url}", timeout=60)
        assert asset.status_code == 200 and len(asset.content) > 1000, url
    assert httpx.get(f"{daemon.tcp}/v1/stats", timeout=60).status_code == 401  # the API is not opened with them


# --- real answers against the schema ---------------------------------------------------


def _manifest_json(response: httpx.Response) -> Any:
    """A load's answer as JSON: the whole body, or a table answer's JSON part."""
    if response.headers["content-type"] != TABLE_MEDIA:
        return response.json()
    size = int.from_bytes(response.content[:4], "big")
    return json.loads(response.content[4 : 4 + size])


def _check(schema: dict[str, Any], method: str, path: str, response: httpx.Response) -> None:
    """``response`` is documented for (method, path) and its body is valid against the schema."""
    documented = schema["paths"][path][method]["responses"]
    status = str(response.status_code)
    assert status in documented, f"{method.upper()} {path} answered {status}, documented: {sorted(documented)}"
    if status == "204":
        assert response.content == b""
        return
    media = response.headers["content-type"].split(";")[0]
    body_schema = documented[status]["content"][media]["schema"]
    if media == TABLE_MEDIA:  # binary, as documented; its JSON part is the manifest's JSON shape
        assert body_schema == {"type": "string", "format": "binary"}
        body_schema = documented[status]["content"]["application/json"]["schema"]
        body = _manifest_json(response)
    else:
        body = response.text if media == "text/plain" else response.json()
    jsonschema.Draft202012Validator({**body_schema, "components": schema["components"]}).validate(body)


def test_answers_match_the_schema(schema: dict[str, Any], daemon: Daemon, http: httpx.Client, tmp_path: Path) -> None:
    path = daemon.root / "documented.pt"
    torch.save({"w": torch.randn(4, 3), "b": torch.zeros(3, dtype=torch.bfloat16), "step": 3}, path)
    (daemon.root / "garbage.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "outside.pt").write_bytes(b"x")
    calls = [
        ("get", "/healthz", lambda: http.get("/healthz"), 200),
        ("post", "/v1/prefetch", lambda: http.post("/v1/prefetch", json={"path": str(path)}), 200),
        ("post", "/v1/load", lambda: http.post("/v1/load", json={"path": str(path), "map_location": "cpu"}), 200),
        ("post", "/v1/load", lambda: http.post("/v1/load", json={"path": str(path), "table": True}), 200),
        ("get", "/v1/checkpoints", lambda: http.get("/v1/checkpoints"), 200),
        ("get", "/v1/stats", lambda: http.get("/v1/stats"), 200),
        ("get", "/metrics", lambda: http.get("/metrics"), 200),
        ("post", "/v1/load", lambda: http.post("/v1/load", json={"path": str(tmp_path / "outside.pt")}), 403),
        ("post", "/v1/load", lambda: http.post("/v1/load", json={"path": str(daemon.root / "none.pt")}), 404),
        ("post", "/v1/load", lambda: http.post("/v1/load", json={"path": str(daemon.root / "garbage.pt")}), 422),
        ("post", "/v1/load", lambda: http.post("/v1/load", json={"paht": "typo"}), 422),
        ("post", "/v1/load", lambda: http.post("/v1/load", content=b"x" * (2 << 20)), 413),
        ("post", "/v1/load", lambda: httpx.post(f"{daemon.tcp}/v1/load", json={"path": str(path)}), 401),
        ("post", "/v1/leases/{lease}/renew", lambda: http.post("/v1/leases/nope/renew"), 410),
        ("delete", "/v1/checkpoints", lambda: http.delete("/v1/checkpoints", params={"ident": "nope"}), 404),
        ("delete", "/v1/checkpoints", lambda: http.delete("/v1/checkpoints"), 422),
    ]
    leases = []
    for method, template, call, status in calls:
        response = call()
        assert response.status_code == status, (method, template, response.text)
        _check(schema, method, template, response)
        if template == "/v1/load" and status == 200:
            leases.append(_manifest_json(response)["lease"])

    lease, table_lease = leases
    assert http.delete(f"/v1/leases/{table_lease}").status_code == 204
    renewed = http.post(f"/v1/leases/{lease}/renew")
    _check(schema, "post", "/v1/leases/{lease}/renew", renewed)
    busy = http.delete("/v1/checkpoints", params={"ident": str(path)})
    assert busy.status_code == 409
    _check(schema, "delete", "/v1/checkpoints", busy)
    released = http.delete(f"/v1/leases/{lease}")
    assert released.status_code == 204
    _check(schema, "delete", "/v1/leases/{lease}", released)
    evicted = http.delete("/v1/checkpoints", params={"ident": str(path)})
    assert evicted.status_code == 200, evicted.text
    _check(schema, "delete", "/v1/checkpoints", evicted)
    assert sum(evicted.json()["freed_bytes"].values()) > 0
