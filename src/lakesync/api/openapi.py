"""The OpenAPI document as the server really answers: every status each route can give,
and the bearer token marked as required only when LAKESYNC_API_TOKEN is set."""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from lakesync.api.auth import needs_token
from lakesync.api.hosts import PROBES
from lakesync.api.netlify import CLIENT_JOB_ID
from lakesync.operations import JobOptions

ERROR_SCHEMA = {
    "type": "object",
    "properties": {"error": {"type": "string"}},
    "required": ["error"],
}
WHY = {
    400: "Bad request: invalid JSON, a bad option or source, or a Host not in "
    "LAKESYNC_ALLOWED_HOSTS",
    401: "Missing or wrong API token",
    403: "Cross-site request (Origin / Sec-Fetch-Site) refused",
    404: "No such job (or its status expired)",
    405: "Method not allowed",
    409: "The job's state does not allow this",
    413: "Request body larger than 64 KiB",
    415: "The body is not application/json",
    422: "Invalid request parameters",
    503: "MongoDB, or the lake (an S3 endpoint), is not answering; retry later",
}
STATE_CHANGING = {"post", "put", "patch", "delete"}
NO_DATABASE = {"/healthz"}
#: query parameters the server answers 400 without (FastAPI cannot declare that itself)
REQUIRED_QUERY = {("/.netlify/functions/simple-status", "jobId")}
PRINTABLE = "^[^\\u0000-\\u001f\\u007f]*$"


def job_request_schema(schema: dict[str, Any], operations: list[str]) -> None:
    """Describe POST /api/jobs as validated: known operation names, the accepted options."""
    options = JobOptions.model_json_schema()
    options["properties"]["source"]["anyOf"][0]["pattern"] = PRINTABLE
    schema["properties"]["operation"]["enum"] = operations
    schema["properties"]["options"] = {"anyOf": [options, {"type": "null"}]}


def statuses(path: str, method: str, operation: dict[str, Any], token: bool) -> set[int]:
    """The error statuses a route can answer besides those FastAPI already lists."""
    codes = set() if path in PROBES else {400}  # a foreign Host
    if token and needs_token(path):
        codes.add(401)
    if method in STATE_CHANGING:
        codes |= {403, 413, 415, 422}
    if "{" in path:
        codes |= {404, 422}
        if method in STATE_CHANGING:
            codes.add(409)
    if operation.get("parameters"):
        codes.add(422)
    if path == "/api/jobs" and method == "post":
        codes |= {404, 409}  # an Idempotency-Key's job that expired; single-flight race
    if any(p == path for p, _ in REQUIRED_QUERY):
        codes.add(404)  # the job named by the query parameter
    if path == "/api/jobs" and method == "get":
        codes.add(404)  # `before` names no job (it expired)
    if path == "/.netlify/functions/copy-taskdetail":
        codes.add(409)  # a client-named jobId that names another job, or a running copy's
    if path not in NO_DATABASE:
        codes.add(503)
    return codes


def document(app: FastAPI, token: bool, operations: list[str]) -> dict[str, Any]:
    """The app's OpenAPI document, completed (cached on the app)."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    schemas = doc.get("components", {}).get("schemas", {})
    if "JobRequest" in schemas:
        job_request_schema(schemas["JobRequest"], operations)
    for path, methods in doc.get("paths", {}).items():
        for method, operation in methods.items():
            for param in operation.get("parameters", []):
                if (path, param["name"]) in REQUIRED_QUERY:
                    param["required"] = True
                    param["schema"] = {"type": "string", "minLength": 1, "maxLength": 200}
                if path == "/.netlify/functions/copy-taskdetail" and param["name"] == "jobId":
                    param["schema"] = {"type": "string", "pattern": f"^{CLIENT_JOB_ID.pattern}$"}
                if path == "/api/jobs/{job_id}/errors" and param["name"] == "after":
                    # a cursor is `<row>:<file>` (`next` of a page); others answer 400
                    param["schema"] = {"type": "string", "pattern": "^([0-9]+:.*)?$"}
                if path.startswith("/api/operations/{name}") and param["name"] == "name":
                    param["schema"] = {"type": "string", "enum": operations}
            if not token:
                operation.pop("security", None)
            answers = operation.setdefault("responses", {})
            if method == "post" and path == "/api/jobs":
                answers.setdefault(
                    "200",
                    {
                        "description": "The same job is already running "
                        "(single flight) or the Idempotency-Key is known"
                    },
                )
            if method == "get" and path == "/api/jobs/{job_id}/errors":  # ?format=csv|ndjson
                content = answers.setdefault("200", {}).setdefault("content", {})
                for kind in ("text/csv", "application/x-ndjson"):
                    content.setdefault(kind, {"schema": {"type": "string"}})
            for code in sorted(statuses(path, method, operation, token)):
                answers.setdefault(
                    str(code),
                    {
                        "description": WHY[code],
                        "content": {"application/json": {"schema": ERROR_SCHEMA}},
                    },
                )
    if not token:
        doc.get("components", {}).pop("securitySchemes", None)
    app.openapi_schema = doc
    return doc


def install(app: FastAPI, token: bool, operations: list[str]) -> None:
    """Serve the completed document at /openapi.json (and to /docs)."""

    def openapi() -> dict[str, Any]:
        return document(app, token, operations)

    app.openapi = openapi  # type: ignore[method-assign]


def allowed_methods(app: FastAPI, path: str) -> str | None:
    """The `Allow` header for a 405 on `path`: every method documented for it (the router
    names only the first route it matched)."""
    for template, methods in app.openapi().get("paths", {}).items():
        if re.fullmatch(re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)), path):
            return ", ".join(m.upper() for m in methods)
    return None
