"""The OpenAPI document of wanpipe serve tells the truth.

* schemathesis (every check, a fixed seed, a bounded number of examples per operation) against a live
  server on the tiny checkpoint finds nothing: no 5xx, no undocumented status, content type or header,
  no schema-valid request refused (but for the rules the document states in words: tests/openapi/hooks.py),
  no schema-invalid request accepted, 405 with ``Allow``, a key that is enforced;
* the text patterns of numbers in the document accept exactly what the parser accepts;
* each route documents the statuses it answers, the content types it serves.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import jsonschema_rs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.serving_helpers import ThreadServer, assert_error
from wanpipe.serving import openapi, openapi_fields
from wanpipe.serving.app import create_app
from wanpipe.serving.errors import APIError
from wanpipe.serving.manager import JobManager
from wanpipe.serving.parsing import ServeLimits
from wanpipe.serving.scalars import SIZE_TEXT, parse_float, parse_int, parse_size
from wanpipe.serving.store import JobStore

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "openapi-key"
# Tiny jobs: a schema-valid request that passes runs 1 frame of at most 512 pixels in 1 step.
LIMITS = ServeLimits(max_queue=4, max_batch=4, max_pixels=512, max_frames=1, max_steps=1)
SEED = 20261129
EXAMPLES = 20  # per operation, for the fuzzing and stateful phases (the coverage phase has its own)


@pytest.fixture(scope="module")
def server(wan_pipe, tmp_path_factory):
    store = JobStore(tmp_path_factory.mktemp("openapi") / "out")
    manager = JobManager(store, lambda: wan_pipe, model_name="wan-tiny", limits=LIMITS)
    with ThreadServer(create_app(manager, api_key=API_KEY, max_body_bytes=2**20)) as srv:
        assert manager.wait_ready(60)
        yield srv


@pytest.fixture(scope="module")
def document(server) -> dict:
    response = httpx.get(f"{server.url}/openapi.json", timeout=30)
    assert response.status_code == 200
    return response.json()


# -- schemathesis --------------------------------------------------------------------------------------
def test_schemathesis_finds_nothing(server, tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(ROOT / "tests" / "openapi" / "schemathesis.toml"),
        "run",
        f"{server.url}/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        str(EXAMPLES),
        "--seed",
        str(SEED),
        "--workers",
        "1",
        "--no-shrink",
        "--request-timeout",
        "60",
        "--header",
        f"Authorization: Bearer {API_KEY}",
    ]
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "tests.openapi.hooks",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "NO_COLOR": "1",
    }
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-12000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", output)
    assert counts and counts[1] == counts[2] and int(counts[1]) > 500, output[-4000:]
    for phase in ("Examples", "Coverage", "Fuzzing", "Stateful"):  # every phase ran
        assert re.search(rf"✅\s+{phase}", output), output[-4000:]
    assert "Selected: 14/14" in output and "Tested: 14" in output, output[-4000:]


# -- the patterns of numbers given as text ---------------------------------------------------------
def _accepts(parse, value) -> bool:
    try:
        parse(value)
    except APIError:
        return False
    return True


def _at_least_0(value) -> None:
    if parse_float(value, "x") < 0:
        raise APIError(400, "negative")


def _above_0(value) -> None:
    if parse_float(value, "x") <= 0:
        raise APIError(400, "not positive")


PARSER_RULES = {  # pattern: the parser's rule that pattern states
    openapi_fields.INT_MIN_0: lambda value: parse_int(value, "x", 0),
    openapi_fields.INT_MIN_1: lambda value: parse_int(value, "x", 1),
    openapi_fields.FLOAT_ANY: lambda value: parse_float(value, "x"),
    openapi_fields.FLOAT_MIN_0: _at_least_0,
    openapi_fields.FLOAT_ABOVE_0: _above_0,
}
NEAR_MISSES = st.text(alphabet=" \t\n\r\x0b\x0c\x1c+-.eE0123456789_x\u0663\u00a0", max_size=70)


@pytest.mark.parametrize(
    "pattern", list(PARSER_RULES), ids=["int>=0", "int>=1", "float", "float>=0", "float>0"]
)
@settings(max_examples=300, deadline=None, database=None)
@given(data=st.data())
def test_number_patterns_are_the_parser(pattern: str, data) -> None:
    """A text value matches the document's schema exactly when the parser takes it."""
    schema = openapi.text_schema(pattern)
    value = data.draw(st.one_of(st.from_regex(re.compile(f"^{pattern}$", re.ASCII)), NEAR_MISSES))
    valid = jsonschema_rs.validator_for(schema).is_valid(value)
    assert valid == _accepts(PARSER_RULES[pattern], value), (value, valid)


@settings(max_examples=300, deadline=None, database=None)
@given(value=st.one_of(st.from_regex(re.compile(f"^{SIZE_TEXT}$", re.ASCII)), NEAR_MISSES))
def test_size_pattern_is_the_parser(value: str) -> None:
    valid = jsonschema_rs.validator_for(openapi.text_schema(SIZE_TEXT, bounded=False)).is_valid(value)
    assert valid == _accepts(parse_size, value), value


# -- what each route documents -------------------------------------------------------------------------
STATUSES = {
    ("post", "/v1/videos"): {"200", "400", "401", "404", "413", "415", "429", "500", "503"},
    ("get", "/v1/videos"): {"200", "400", "401", "500"},
    ("get", "/v1/videos/{video_id}"): {"200", "401", "404", "500"},
    ("delete", "/v1/videos/{video_id}"): {"200", "401", "404", "500"},
    ("get", "/v1/videos/{video_id}/content"): {"200", "307", "400", "401", "404", "409", "500"},
    ("get", "/v1/videos/{video_id}/events"): {"200", "401", "404", "500"},
    ("get", "/v1/videos/{video_id}/preview"): {"200", "401", "404", "500"},
    ("post", "/v1/responses"): {"200", "204", "400", "401", "404", "409", "413", "429", "500", "503"},
    ("get", "/v1/models"): {"200", "401", "500", "503"},
    ("get", "/v1/loras"): {"200", "401", "500"},
    ("get", "/health"): {"200", "500"},
    ("get", "/ready"): {"200", "500", "503"},
    ("get", "/metrics"): {"200", "500"},
    ("get", "/"): {"200", "500"},
}


def test_every_route_documents_its_statuses_bodies_and_types(document) -> None:
    operations = {(m, p): op for p, ops in document["paths"].items() for m, op in ops.items()}
    assert set(operations) == set(STATUSES)
    for key, statuses in STATUSES.items():
        responses = operations[key]["responses"]
        assert set(responses) == statuses, (key, sorted(responses))
        for status, response in responses.items():
            if int(status) >= 400:
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (key, status)
        assert ("security" in operations[key]) == key[1].startswith("/v1/"), key
    assert operations["post", "/v1/videos"]["responses"]["429"]["headers"]["Retry-After"]["required"]
    assert operations["post", "/v1/videos"]["responses"]["200"]["headers"]["openai-poll-after-ms"]
    bodies = operations["post", "/v1/videos"]["requestBody"]["content"]
    assert set(bodies) == {"application/json", "multipart/form-data", "application/x-www-form-urlencoded"}
    form = bodies["multipart/form-data"]["schema"]["properties"]
    assert form["input_reference"]["format"] == "binary" and form["num_frames"]["type"] == "string"
    assert (
        bodies["application/json"]["schema"]["properties"]["num_inference_steps"]["anyOf"][0]["maximum"] == 1
    )
    assert bodies["application/json"]["example"] == {
        "prompt": "A red fox trots through fresh snow at dawn",
        "size": "32x16",  # the checkpoint's 832x480, shrunk to --max-pixels 512 on multiples of 16
        "num_frames": 1,
        "num_inference_steps": 1,
    }
    assert set(operations["post", "/v1/responses"]["requestBody"]["content"]) == {"application/json"}
    content = operations["get", "/v1/videos/{video_id}/content"]["responses"]["200"]["content"]
    assert set(content) == {"video/mp4", "image/jpeg"}
    events = operations["get", "/v1/videos/{video_id}/events"]["responses"]["200"]["content"]
    assert set(events) == {"text/event-stream"}
    assert set(operations["get", "/v1/videos/{video_id}/preview"]["responses"]["200"]["content"]) == {
        "image/webp"
    }
    assert set(operations["get", "/metrics"]["responses"]["200"]["content"]) == {
        "text/plain; version=0.0.4; charset=utf-8"
    }
    assert set(operations["get", "/"]["responses"]["200"]["content"]) == {"text/html"}
    assert "HTTPValidationError" not in document["components"]["schemas"]  # nothing answers 422


def test_without_a_key_nothing_documents_401(wan_pipe, tmp_path: Path) -> None:
    manager = JobManager(JobStore(tmp_path / "out"), lambda: wan_pipe, model_name="wan-tiny", limits=LIMITS)
    app = create_app(manager)
    document = app.openapi()  # before the model is loaded: no example yet
    assert "securitySchemes" not in document.get("components", {})
    for operations in document["paths"].values():
        for operation in operations.values():
            assert "401" not in operation["responses"] and "security" not in operation
    assert (
        "example" not in document["paths"]["/v1/videos"]["post"]["requestBody"]["content"]["application/json"]
    )
    manager.store.close()


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("OPTIONS", "/v1/videos", "GET, POST"),
        ("PUT", "/v1/videos", "GET, POST"),
        ("PATCH", "/v1/videos/video_x", "GET, DELETE"),
        ("POST", "/v1/videos/video_x/content", "GET"),
        ("DELETE", "/v1/responses", "POST"),
        ("POST", "/metrics", "GET"),
    ],
)
def test_405_names_every_allowed_method(server, method, path, allowed) -> None:
    response = httpx.request(method, server.url + path, headers={"Authorization": f"Bearer {API_KEY}"})
    error = assert_error(response, 405, None, "method_not_allowed")
    assert response.headers["allow"] == allowed and allowed in error["message"]
