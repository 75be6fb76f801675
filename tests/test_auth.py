"""API-key middleware (api.auth) on a tiny FastAPI app."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient

from api.auth import API_KEY_ENV, ApiKeyMiddleware, api_keys_from_env_and_args, install_auth


def _app(keys, **kw) -> TestClient:
    app = FastAPI()

    @app.get("/health")
    def health():
        return {"ok": True}

    @app.get("/metrics")
    def metrics():
        return "m"

    @app.get("/v1/models")
    def models():
        return {"data": []}

    @app.get("/v1/stream")
    def stream():
        return StreamingResponse(iter([b"a", b"b", b"c"]), media_type="text/plain")

    install_auth(app, keys, **kw)
    return TestClient(app)


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_no_keys_means_open():
    client = _app([])
    assert client.get("/v1/models").status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {},
        _bearer("wrong"),
        _bearer("sk-one-extra"),
        _bearer("sk-on"),
        {"Authorization": "Basic c2stb25lOg=="},
        {"Authorization": "sk-one"},
        {"Authorization": "Bearer "},
        {"X-Api-Key": "sk-one"},
    ],
)
def test_rejected_with_openai_envelope(headers):
    response = _app(["sk-one", "sk-two"]).get("/v1/models", headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json() == {
        "error": {
            "message": response.json()["error"]["message"],
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    assert "sk-one" not in response.text


@pytest.mark.parametrize("key", ["sk-one", "sk-two"])
def test_every_configured_key_accepted(key):
    client = _app(["sk-one", "sk-two"])
    assert client.get("/v1/models", headers=_bearer(key)).status_code == 200
    assert client.get("/v1/models", headers={"authorization": f"bearer {key}"}).status_code == 200


def test_streaming_response_passes_through():
    response = _app(["k"]).get("/v1/stream", headers=_bearer("k"))
    assert response.status_code == 200 and response.text == "abc"


def test_open_paths_need_no_key():
    client = _app(["k"])
    assert client.get("/health").status_code == 200
    assert client.get("/metrics").status_code == 200
    assert client.get("/health/").status_code == 401  # exact paths only
    assert client.get("/does-not-exist").status_code == 401  # no route probing without a key


def test_custom_open_paths():
    client = _app(["k"], open_paths=frozenset({"/v1/models"}))
    assert client.get("/v1/models").status_code == 200
    assert client.get("/health").status_code == 401


def test_empty_key_never_matches():
    middleware = ApiKeyMiddleware(app=None, api_keys=["k"])
    assert middleware.is_authorized("k")
    assert not middleware.is_authorized("")
    assert not middleware.is_authorized(None)


def test_keys_from_args_and_env(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, " env-a , env-b,,")
    assert api_keys_from_env_and_args(["cli-a", "cli-b,env-a"]) == ["cli-a", "cli-b", "env-a", "env-b"]
    assert api_keys_from_env_and_args("single") == ["single", "env-a", "env-b"]
    monkeypatch.delenv(API_KEY_ENV)
    assert api_keys_from_env_and_args(None) == []
    assert api_keys_from_env_and_args(["", "  "]) == []


def test_server_settings_take_keys_from_flags_and_env(monkeypatch):
    """`--api-key` is repeatable and comma-separated (docs/security.md), plus INFINITEVL_API_KEY."""
    import argparse

    from api.settings import add_server_args, settings_from_args

    monkeypatch.setenv("INFINITEVL_API_KEY", " env-key , k1 ")
    parser = argparse.ArgumentParser()
    add_server_args(parser)
    args = parser.parse_args(["--api-key", "k1,k2", "--api-key", "k3"])
    settings = settings_from_args(args, model_path="m")
    assert settings.api_keys == ("k1", "k2", "k3", "env-key")
