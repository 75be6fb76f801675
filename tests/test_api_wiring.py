"""create_app wiring: API keys (through api.auth), per-route HTTP metrics, in-flight accounting."""

from __future__ import annotations

import httpx
from fake_engine import FakeEngine, FakeProcessor, ServerThread

from api.app import create_app
from api.settings import ServerSettings


class RecordingMetrics:
    def __init__(self) -> None:
        self.http: list[tuple[str, str, int]] = []

    def on_http(self, route: str, method: str, status: int, seconds: float) -> None:
        assert seconds >= 0
        self.http.append((route, method, status))

    def render(self) -> tuple[bytes, str]:
        return b"# fake\n", "text/plain; version=0.0.4"


def test_keys_metrics_inflight():
    metrics = RecordingMetrics()
    settings = ServerSettings(served_model_name="m", model_path="p", api_keys=("secret",))
    app = create_app(FakeEngine(), FakeProcessor(), settings, metrics=metrics)
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    with ServerThread(app) as server, httpx.Client(base_url=server.base_url) as http:
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 401 and set(r.json()["error"]) >= {"message", "type"}
        assert (
            http.post(
                "/v1/chat/completions", json=body, headers={"Authorization": "Bearer wrong"}
            ).status_code
            == 401
        )
        ok = http.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer secret"})
        assert ok.status_code == 200, ok.text
        assert http.get("/health").status_code == 200  # open by default
        m = http.get("/metrics")
        assert m.status_code == 200 and m.content == b"# fake\n"
        assert http.get("/no/such/route", headers={"Authorization": "Bearer secret"}).status_code == 404
    assert ("/v1/chat/completions", "POST", 200) in metrics.http
    assert ("/health", "GET", 200) in metrics.http
    assert ("unmatched", "GET", 404) in metrics.http
    assert app.state.in_flight == 0
