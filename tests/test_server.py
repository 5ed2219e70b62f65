"""The HTTP server, started on a loopback port: API shape, streaming, concurrency, 429, errors, shutdown."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from edgelm.runtime import Generator, SamplingConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, artifact, *extra):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "edgelm", "serve", str(artifact), "--port",
                                      str(self.port), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        self.proc.kill()
        raise RuntimeError("server did not start: " + self.proc.stderr.read())

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.status, r.read().decode()

    def post(self, body, raw: bytes | None = None, timeout=120):
        data = raw if raw is not None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + "/v1/completions", data=data,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def server(embedded_artifact):
    s = Server(embedded_artifact["gpt2"], "--max-batch", "8", "--max-queue", "64")
    yield s
    s.stop()


PROMPT = "It was a truth universally acknowledged, that"


def test_models_health_and_greedy_completion(server, embedded_artifact):
    status, body = server.get("/v1/models")
    assert status == 200 and json.loads(body)["data"][0]["id"] == "gpt2"
    status, body = server.post({"model": "gpt2", "prompt": PROMPT, "max_tokens": 20, "temperature": 0})
    assert status == 200
    out = json.loads(body)
    expected = Generator.load(embedded_artifact["gpt2"]).generate(PROMPT, SamplingConfig(max_new_tokens=20))
    assert out["choices"][0]["text"] == expected.text
    assert out["usage"]["completion_tokens"] == len(expected.token_ids)
    assert out["object"] == "text_completion"


def test_streaming_sends_the_same_text_as_events(server):
    status, body = server.post({"prompt": PROMPT, "max_tokens": 20, "temperature": 0, "stream": True})
    assert status == 200
    events = [line[len("data: "):] for line in body.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) > 3
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert chunks[-1]["finish_reason"] in ("length", "stop")
    _, plain = server.post({"prompt": PROMPT, "max_tokens": 20, "temperature": 0})
    assert "".join(c["text"] for c in chunks) == json.loads(plain)["choices"][0]["text"]


def test_32_concurrent_clients_are_batched_without_errors(server):
    def one(k):
        return server.post({"prompt": f"{PROMPT} {k}", "max_tokens": 24, "temperature": 0.8, "seed": k})

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert [s for s, _ in results] == [200] * 32
    assert all(json.loads(b)["usage"]["completion_tokens"] >= 1 for _, b in results)
    _, metrics = server.get("/metrics")
    batch_sum = float(next(line.split()[1] for line in metrics.splitlines() if line.startswith("edgelm_batch_size_sum")))
    batch_count = float(next(line.split()[1] for line in metrics.splitlines()
                             if line.startswith("edgelm_batch_size_count")))
    assert batch_sum / batch_count > 1.5  # requests were really decoded together
    assert 'edgelm_requests_total{status="200"}' in metrics and "edgelm_time_to_first_token_seconds_bucket" in metrics


@pytest.mark.parametrize("body,raw,fragment", [
    ({"max_tokens": 5}, None, "'prompt' is required"),
    ({"prompt": "hi", "max_tokens": 0}, None, "'max_tokens' must be between 1 and 512"),
    ({"prompt": "hi", "max_tokens": "5"}, None, "'max_tokens' must be an integer"),
    ({"prompt": 42}, None, "'prompt' must be a string"),
    ({"prompt": "hi", "temperature": "hot"}, None, "'temperature' must be a number"),
    ({"prompt": "word " * 600, "max_tokens": 8}, None, "context of 512"),
    ({"prompt": "hi", "stream": "yes"}, None, "'stream' must be true or false"),
    (None, b"{not json", "not valid JSON"),
    (None, b"[1, 2]", "JSON object"),
])
def test_bad_requests_get_a_400_with_a_json_error(server, body, raw, fragment):
    status, text = server.post(body, raw)
    assert status == 400
    assert fragment in json.loads(text)["error"]["message"]


def test_unknown_model_and_route_are_404(server):
    status, text = server.post({"model": "gpt-4", "prompt": "hi"})
    assert status == 404 and "GET /v1/models" in json.loads(text)["error"]["message"]
    try:
        server.get("/nope")
    except urllib.error.HTTPError as e:
        assert e.code == 404


def test_full_queue_answers_429(embedded_artifact):
    s = Server(embedded_artifact["gpt2"], "--max-batch", "1", "--max-queue", "1")
    try:
        with ThreadPoolExecutor(8) as pool:
            statuses = [st for st, _ in pool.map(
                lambda k: s.post({"prompt": PROMPT, "max_tokens": 150, "temperature": 0}), range(8))]
        assert 429 in statuses and 200 in statuses
        assert set(statuses) <= {200, 429}
    finally:
        s.stop()


def test_sigterm_finishes_the_request_in_flight_and_exits(embedded_artifact):
    s = Server(embedded_artifact["gpt2"])
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(s.post, {"prompt": PROMPT, "max_tokens": 200, "temperature": 0})
        time.sleep(0.5)
        s.proc.send_signal(signal.SIGTERM)
        status, body = pending.result(timeout=120)
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 200
    assert s.proc.wait(timeout=60) == 0


def test_busy_port_is_one_sentence(server, embedded_artifact):
    r = subprocess.run([sys.executable, "-m", "edgelm", "serve", str(embedded_artifact["gpt2"]), "--port",
                        str(server.port)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "choose another --port" in r.stderr
