"""POST /plan and /init decode and validate their body in a worker thread (request_body.py), not
on the event loop, with the answers and the OpenAPI document FastAPI gives a declared body."""

from __future__ import annotations

import json
import threading
from typing import Any

import anyio
import httpx
import pytest
from fastapi.responses import JSONResponse

from initserve.app import create_app
from initserve.preparation import dry_run_answer, prepare
from initserve.request import InitRequest
from initserve.routes.generation import PREPARING, DryRunAnswer
from initserve.schemes import SCHEMES
from initserve.settings import Settings

SPEC = {"seed": 22, "tensors": [{"name": "w", "shape": [64, 48], "scheme": "normal"}]}


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/plan", "/init"])
async def test_the_body_is_validated_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """While the body is being validated (held here, inside the spec's own validator, until
    /livez has answered), /livez answers. Were the body validated on the event loop, as FastAPI
    does a declared body, /livez could not answer until validation let go, and validation
    waits for /livez: it gives up after 10 s."""
    validating, livez_answered = threading.Event(), threading.Event()
    released_by_livez: list[bool] = []

    class HeldSchemes(dict[str, Any]):
        """The scheme table, whose first lookup (by a tensor's validator) waits for /livez."""

        def __getitem__(self, name: str) -> Any:
            if not validating.is_set():
                validating.set()
                released_by_livez.append(livez_answered.wait(10))
            return super().__getitem__(name)

    app = create_app(Settings())
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://initserve") as http:
            monkeypatch.setattr("initserve.spec.SCHEMES", HeldSchemes(SCHEMES))
            answers: list[httpx.Response] = []

            async def validated_request() -> None:
                answers.append(await http.post(path, json=SPEC))

            async with anyio.create_task_group() as group:
                group.start_soon(validated_request)
                await anyio.to_thread.run_sync(validating.wait, 10)
                assert (await http.get("/livez")).status_code == 200
                livez_answered.set()
    assert released_by_livez == [True]
    assert answers[0].status_code == 200


def _tensor(**fields: Any) -> bytes:
    return json.dumps(
        {"seed": 1, "tensors": [{"name": "w", "shape": [4], "scheme": "normal", **fields}]}
    ).encode()


JSON = "application/json"
SHARD = {"index": 0, "count": 2, "dim": 0, "split": "chunk"}

# Bodies refused while decoding or validating, before any planning: each as the body, then the
# Content-Type it is sent with.
REFUSED_BODIES: list[tuple[bytes, str]] = [
    (b"", JSON),
    (b"", "text/plain"),
    (b"{", JSON),
    (b'{"seed": 1, "tensors": [}', JSON),
    (b"\xff\xfe{}", JSON),
    (b"\xef\xbb\xbf{}", JSON),
    (b"[" * 100_000 + b"]" * 100_000, JSON),
    (b"null", JSON),
    (b"[]", JSON),
    (b'"spec"', JSON),
    (b"{}", "application/json; charset=utf-8"),
    (b'{"seed": 1}', JSON),
    (json.dumps({"seed": "1", "tensors": json.loads(_tensor())["tensors"]}).encode(), JSON),
    (_tensor(std=float("nan")), JSON),
    (_tensor(scheme="nope", x=1), JSON),
    (json.dumps({**json.loads(_tensor()), "only": ["w"], "shard": SHARD}).encode(), JSON),
    (json.dumps({**json.loads(_tensor()), "regions": {"w": [[0, True]]}}).encode(), JSON),
]


@pytest.mark.parametrize("path", ["/plan", "/init"])
@pytest.mark.parametrize(("body", "media_type"), REFUSED_BODIES)
def test_a_refused_body_is_answered_as_a_declared_body_is(
    live_server: str, path: str, body: bytes, media_type: str
) -> None:
    """/inspect's body is still declared, parsed by FastAPI: /plan and /init answer every body
    it refuses before planning with its status and problem, byte for byte."""
    headers = {"Content-Type": media_type}
    declared = httpx.post(f"{live_server}/inspect", content=body, headers=headers)
    raw = httpx.post(f"{live_server}{path}", content=body, headers=headers)
    assert declared.status_code in (400, 422)
    assert (raw.status_code, raw.headers["content-type"], raw.content) == (
        declared.status_code,
        declared.headers["content-type"],
        declared.content,
    )


def test_the_openapi_document_shows_the_body_as_a_declared_one() -> None:
    """The requestBody of /plan and /init is what FastAPI writes for /inspect's declared
    InitRequest body (the schema schemathesis draws bodies from), examples included."""
    document = create_app(Settings()).openapi()
    declared = document["paths"]["/inspect"]["post"]["requestBody"]
    assert declared["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/InitRequest"
    }
    assert set(declared["content"]["application/json"]["examples"]) == {"mlp", "shard"}
    for path in ("/plan", "/init"):
        assert document["paths"][path]["post"]["requestBody"] == declared


@pytest.mark.parametrize(
    "count", [1, DryRunAnswer.TENSORS_PER_RENDER, 2 * DryRunAnswer.TENSORS_PER_RENDER + 1]
)
def test_a_plan_rendered_in_batches_is_the_bytes_json_response_renders(count: int) -> None:
    """/plan's answer is rendered a batch of tensors at a time, so that the event loop gets the
    GIL between batches; its bytes are JSONResponse's (non-ASCII keys and all)."""
    spec = {
        "seed": 5,
        "tensors": [
            {"name": f"блок.{i}.w", "shape": [3, i % 4], "scheme": "normal"} for i in range(count)
        ],
    }
    answer = dry_run_answer(prepare(InitRequest.model_validate(spec), Settings()))
    assert len(answer["tensors"]) == count
    assert DryRunAnswer(answer).body == JSONResponse(answer).body


@pytest.mark.anyio
async def test_requests_are_planned_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three requests at once: the first is held in planning until the other two are queued
    for their turn (off the event loop), and only then let go; none was ever planned beside
    another, and all three are answered."""
    release = threading.Event()
    planning: list[int] = []
    most_at_once: list[int] = []
    lock = threading.Lock()

    def held_prepare(*args: Any) -> Any:
        with lock:
            planning.append(1)
            most_at_once.append(len(planning))
        release.wait(10)
        try:
            return prepare(*args)
        finally:
            with lock:
                planning.pop()

    app = create_app(Settings())
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://initserve") as http:
            monkeypatch.setattr("initserve.routes.generation.prepare", held_prepare)
            answers: list[httpx.Response] = []

            async def planned_request(seed: int) -> None:
                answers.append(await http.post("/plan", json={**SPEC, "seed": seed}))

            async with anyio.create_task_group() as group:
                for seed in (1, 2, 3):
                    group.start_soon(planned_request, seed)
                with anyio.fail_after(10):
                    while PREPARING.statistics().tasks_waiting < 2:
                        await anyio.sleep(0.01)
                assert (await http.get("/livez")).status_code == 200
                release.set()
    assert most_at_once == [1, 1, 1]
    assert [answer.status_code for answer in answers] == [200, 200, 200]
