"""Schemathesis over the API's own OpenAPI document, against a live uvicorn server and a real
Redis holding a run's state: every operation, generated parameters and bodies (valid and not),
all of Schemathesis's checks (no 5xx, responses match their documented schema and status codes,
control refuses requests without the token). Each request has a timeout, so a hang fails the
test instead of stalling it; the example count keeps the whole module under a minute here.

Hypothesis drives Schemathesis's strategies directly (one test per operation): its pytest plugin
does not run under pytest 9.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.api.app import create_app
from services.api.serve import serve_in_thread
from services.transport.bundle import Transport
from services.transport.redis_server import EmbeddedRedis

schemathesis = pytest.importorskip("schemathesis", reason="needs the schemathesis package")
from schemathesis import GenerationMode  # noqa: E402  (after the skip check)

pytestmark = pytest.mark.integration

TOKEN = "fuzz-token"
REQUEST_TIMEOUT_S = 5.0
EXAMPLES = 30
SETTINGS: dict[str, Any] = {
    "max_examples": EXAMPLES,
    "deadline": None,
    "suppress_health_check": list(HealthCheck),
    "derandomize": True,  # the same examples every run: a failure reproduces
    "database": None,
}


def write_state(t: Transport) -> None:
    """A run in progress: every route has something to show."""
    t.state.write_schedule(
        {
            "step": 11,
            "total_steps": 100,
            "progress": 0.1,
            "sample_ratio": 0.5,
            "token_ratio": 0.3,
            "preset": "d3s",
        }
    )
    for step in range(1, 11):
        t.state.record_step(
            step,
            {
                "reward_mean": step / 10,
                "samples_total": 8.0 * step,
                "wall_time": 100.0 + step,
                "learner_tokens_total": 90.0 * step,
                "learner_seconds_total": 0.4 * step,
            },
        )
    t.state.set_metrics({"reward_mean": 1.0, "learner_version": 10, "loss": float("nan")})
    t.state.record_heartbeat("rollout-0", {"weight_version": 9, "groups_published": 30})
    t.state.record_checkpoint(10, "runs/fuzz/checkpoints/step_10")
    t.state.set_config(json.dumps({"service": {"control_token": TOKEN}, "train": {"seed": 1}}))


# The operations, from the app itself (building it opens no connection).
OPERATIONS = sorted(
    (method.upper(), path)
    for path, ops in create_app("redis://127.0.0.1:1/0").openapi()["paths"].items()
    for method in ops
)


@pytest.fixture(scope="module")
def live_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The OpenAPI document as Schemathesis loads it from a live server over a written run."""
    import redis

    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as server:
        client = redis.Redis.from_url(server.url)
        t = Transport.open(client, "fuzz")
        write_state(t)
        app = create_app(server.url, t.namespace, control_token=TOKEN)
        with serve_in_thread(app) as url:
            yield schemathesis.openapi.from_url(f"{url}/openapi.json")
        client.close()


def _cases(live_schema: Any, method: str, path: str) -> st.SearchStrategy[Any]:
    operation = live_schema[path][method]
    # Valid inputs and invalid ones (wrong types, out-of-range values, bad bodies).
    return st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    )


def _timed(call: Any) -> Any:
    start = time.monotonic()
    response = call()
    elapsed = time.monotonic() - start
    assert elapsed < REQUEST_TIMEOUT_S, f"took {elapsed:.1f}s"
    return response


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_api_conforms_to_its_openapi_document(live_schema: Any, method: str, path: str) -> None:
    """Schemathesis's checks on every example: no 5xx, documented status codes and schemas,
    control refused without the token."""

    @given(case=_cases(live_schema, method, path))
    @settings(**SETTINGS)
    def check(case: Any) -> None:
        _timed(lambda: case.call_and_validate(timeout=REQUEST_TIMEOUT_S))

    check()


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_api_with_the_control_token(live_schema: Any, method: str, path: str) -> None:
    """The same operations with the right token, so control routes get past the guard."""

    @given(case=_cases(live_schema, method, path))
    @settings(**{**SETTINGS, "max_examples": EXAMPLES // 3})
    def check(case: Any) -> None:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        response = _timed(lambda: case.call(headers=headers, timeout=REQUEST_TIMEOUT_S))
        assert response.status_code < 500, response.text
        assert TOKEN not in response.text

    check()
