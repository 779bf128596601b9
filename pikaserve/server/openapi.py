"""The HTTP API's OpenAPI 3.1 description, generated from the endpoint table the app routes
with: each endpoint's request model and response types (protocol.py) become JSON Schemas
through pydantic, so the spec cannot drift from what the server parses and returns. `/docs`
renders it as one plain HTML page (no scripts, nothing fetched from a CDN).
"""

from __future__ import annotations

import html
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter

from pikaserve.server.protocol import ErrorResponse

REF = "#/components/schemas/{model}"


@dataclass(frozen=True)
class Endpoint:
    path: str
    method: str  # "GET" or "POST"
    handler: Callable[..., Awaitable[Any]]
    summary: str
    request: type | None = None  # the JSON body's pydantic model
    response: Any = None  # the 200 JSON body's type; None: no JSON body
    stream: Any = None  # each SSE event's type, when the request asks for stream: true
    media_type: str = "application/json"  # of a 200 without a `response` type


class _Schemas:
    """Component schemas, each type once, referenced by name."""

    def __init__(self) -> None:
        self.components: dict[str, Any] = {}

    def ref(self, t: Any, mode: str) -> dict[str, str]:
        name = t.__name__
        if name not in self.components:
            schema = TypeAdapter(t).json_schema(ref_template=REF, mode=mode)  # type: ignore[arg-type]
            self.components.update(schema.pop("$defs", {}))
            self.components[name] = schema
        return {"$ref": REF.format(model=name)}


def openapi_spec(endpoints: list[Endpoint], title: str, version: str,
                 api_key: bool) -> dict[str, Any]:
    schemas = _Schemas()
    error = {"description": "OpenAI's error envelope",
             "content": {"application/json": {"schema": schemas.ref(ErrorResponse,
                                                                    "serialization")}}}
    paths: dict[str, dict[str, Any]] = {}
    for e in endpoints:
        ok: dict[str, Any] = {"description": "success"}
        if e.response is not None:
            ok["content"] = {"application/json": {"schema": schemas.ref(e.response,
                                                                        "serialization")}}
        elif e.media_type != "application/json":
            ok["content"] = {e.media_type: {"schema": {"type": "string"}}}
        if e.stream is not None:
            ok.setdefault("content", {})["text/event-stream"] = {
                "schema": schemas.ref(e.stream, "serialization"),
                "description": "with stream: true, `data: <JSON>` events of this shape, then "
                               "`data: [DONE]`"}
        op: dict[str, Any] = {"summary": e.summary, "operationId": _operation_id(e),
                              "responses": {"200": ok, "default": error}}
        if e.request is not None:
            op["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": schemas.ref(e.request, "validation")}}}
        if api_key and e.path.startswith("/v1"):
            op["security"] = [{"bearer": []}]
        paths.setdefault(e.path, {})[e.method.lower()] = op
    spec: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {"schemas": schemas.components},
    }
    if api_key:
        spec["components"]["securitySchemes"] = {"bearer": {"type": "http",
                                                            "scheme": "bearer"}}
    return spec


def _operation_id(e: Endpoint) -> str:
    return e.method.lower() + e.path.replace("/", "_").replace("-", "_")


def docs_page(spec: dict[str, Any]) -> str:
    """The spec as one readable HTML page: each operation, its request and response schemas."""
    title = html.escape(spec["info"]["title"])
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
             "<style>body{font-family:sans-serif;max-width:60em;margin:auto}"
             "pre{background:#f4f4f4;padding:.5em;overflow:auto}</style></head><body>",
             f"<h1>{title} {html.escape(spec['info']['version'])}</h1>",
             "<p>Machine-readable: <a href='/openapi.json'>/openapi.json</a>.</p>"]
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            parts.append(f"<h2>{method.upper()} {html.escape(path)}</h2>"
                         f"<p>{html.escape(op['summary'])}</p>")
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            if body:
                parts.append(f"<p>Request: <code>{_name(body['schema'])}</code></p>")
            for media, content in op["responses"]["200"].get("content", {}).items():
                parts.append(f"<p>200 ({html.escape(media)}): "
                             f"<code>{_name(content['schema'])}</code></p>")
    parts.append("<h2>Schemas</h2>")
    for name, schema in spec["components"]["schemas"].items():
        parts.append(f"<h3 id='{html.escape(name)}'>{html.escape(name)}</h3>"
                     f"<pre>{html.escape(json.dumps(schema, indent=1))}</pre>")
    return "".join(parts) + "</body></html>"


def _name(schema: dict[str, Any]) -> str:
    ref = schema.get("$ref")
    if ref is None:
        return html.escape(schema.get("type", "any"))
    name = html.escape(ref.rsplit("/", 1)[1])
    return f"<a href='#{name}'>{name}</a>"
