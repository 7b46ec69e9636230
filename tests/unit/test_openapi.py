"""The OpenAPI document stays true: it is valid OpenAPI 3.1, every route an app registers is
documented and every documented operation is served, and each service serves the document of
exactly its own operations."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema_rs
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from schemathesis.specs.openapi.definitions import OPENAPI_31

from services import http, openapi
from services.aggregate.service import add_aggregate
from services.aggregate.sources import LocalLog
from services.ingest.publish import LocalPublisher
from services.ingest.service import create_ingest_app
from services.settings import Settings
from services.sites import Registry
from services.standalone import create_standalone_app

REGISTRY = Registry.parse('[sites.dongha]\ntimezone = "Asia/Ho_Chi_Minh"\n')


def settings(tmp_path: Path) -> Settings:
    return replace(
        Settings(),
        secret=b"k",
        data_dir=tmp_path,
        spool_dir=tmp_path / "spool",
        clickhouse_url=f"chdb://{tmp_path}/clickhouse",
    )


def apps(tmp_path: Path) -> dict[str, web.Application]:
    """The three apps as their factories make them (the aggregate's routes do not depend on
    its source; the in-process log stands in for Kafka, as nothing is started)."""
    s = settings(tmp_path)
    aggregate = http.new_app(s)
    add_aggregate(aggregate, s, REGISTRY, LocalLog())
    return {
        "run": create_standalone_app(s, REGISTRY),
        "ingest": create_ingest_app(s, REGISTRY, LocalPublisher(lambda r: None)),
        "aggregate": aggregate,
    }


def test_the_document_is_valid_openapi_3_1() -> None:
    doc = openapi.document()
    jsonschema_rs.Draft202012Validator(OPENAPI_31).validate(json.loads(json.dumps(doc)))
    assert doc["openapi"] == "3.1.0"
    ids = [
        op["operationId"]
        for item in doc["paths"].values()
        for method, op in item.items()
        if method in openapi.METHODS
    ]
    assert len(ids) == len(set(ids))


# answers in the kind of their route: readiness in text, an image and a page for an unknown site
NOT_JSON = {("/readyz", "503"), ("/v1/sites/{site}/counter.svg", "404"), ("/widget/{site}", "404")}


def test_every_operation_documents_its_statuses_and_every_error_is_json() -> None:
    for path, item in openapi.document()["paths"].items():
        if "{site}" in path:
            assert item["parameters"][0]["name"] == "site"
        for method, op in item.items():
            if method not in openapi.METHODS:
                continue
            responses: dict[str, Any] = op["responses"]
            # protocol-level refusals
            assert {"400", "417", "503"} <= set(responses), (path, method)
            for status, response in responses.items():
                assert response["description"]
                if int(status) >= 400 and (path, status) not in NOT_JSON:
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (path, status)
    collect = openapi.document()["paths"]["/collect"]["post"]["responses"]
    assert set(collect) == {"202", "400", "403", "408", "413", "415", "417", "429", "503"}
    assert "Retry-After" in collect["429"]["headers"]


async def test_every_route_is_documented_and_every_operation_is_served(tmp_path: Path) -> None:
    built = apps(tmp_path)
    run = openapi.registered(built["run"].router)
    assert run == openapi.documented(openapi.document())
    ingest = openapi.registered(built["ingest"].router)
    aggregate = openapi.registered(built["aggregate"].router)
    assert ingest | aggregate | {("/", "get")} == run
    assert {p for p, _ in ingest} >= {"/collect", "/collect.gif", "/beacon.js", "/openapi.json"}
    for name, app in built.items():
        assert openapi.documented(openapi.document_for(app.router)) == openapi.registered(
            app.router
        ), name
    # HEAD goes with GET (on the pixel: its headers, and nothing counted)
    heads = {r.resource.canonical for r in built["run"].router.routes() if r.method == "HEAD"}
    gets = {p for p, m in run if m == "get"}
    assert heads == gets


async def test_each_service_serves_its_own_document(tmp_path: Path) -> None:
    records: list[Any] = []
    app = create_ingest_app(settings(tmp_path), REGISTRY, LocalPublisher(records.append))
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/openapi.json")
        assert resp.status == 200 and resp.content_type == "application/json"
        doc = await resp.json()
    assert doc == json.loads(json.dumps(openapi.document_for(app.router)))
    assert "/collect" in doc["paths"] and "/v1/sites/{site}/counter" not in doc["paths"]
