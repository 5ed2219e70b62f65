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
    ({"prompt": "hi", "seed": -1}, None, "seed must be an integer >= 0"),
    ({"prompt": "hi", "logit_bias": {"50256": -100}}, None, "'logit_bias' is not supported"),
    ({"prompt": "hi", "frequency_penalty": 0.5}, None, "'frequency_penalty' is not supported"),
    ({"prompt": "hi", "presence_penalty": 1}, None, "'presence_penalty' is not supported"),
    ({"prompt": "hi", "suffix": " the end"}, None, "'suffix' is not supported"),
    ({"prompt": ["hi"] * 65}, None, "at most 64 prompts"),
])
def test_bad_requests_get_a_400_with_a_json_error(server, body, raw, fragment):
    status, text = server.post(body, raw)
    assert status == 400
    assert fragment in json.loads(text)["error"]["message"]


def test_null_and_neutral_fields_mean_the_default(server):
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "n": None, "best_of": None, "stream": None,
            "logprobs": None, "echo": False, "suffix": None, "logit_bias": {}, "frequency_penalty": 0,
            "presence_penalty": 0.0}
    status, text = server.post(body)
    assert status == 200, text
    plain = json.loads(server.post({"prompt": PROMPT, "max_tokens": 4, "temperature": 0})[1])
    assert json.loads(text)["choices"][0]["text"] == plain["choices"][0]["text"]


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


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_request_in_flight_and_exits(embedded_artifact, signum):
    s = Server(embedded_artifact["gpt2"])
    req = urllib.request.Request(s.url + "/v1/completions", data=json.dumps(
        {"prompt": PROMPT, "max_tokens": 300, "temperature": 0, "stream": True}).encode())
    with urllib.request.urlopen(req, timeout=120) as r:
        first = r.readline().decode()
        assert first.startswith("data: ")  # the request is being decoded
        s.proc.send_signal(signum)
        rest = first + r.read().decode()
    events = [line[len("data: "):] for line in rest.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert s.proc.wait(timeout=60) == 0
    with pytest.raises(OSError):  # and no longer listens
        s.get("/health")


def test_the_default_address_is_loopback(server):
    line = server.proc.stdout.readline()  # the startup line: the address it bound
    assert f"on http://127.0.0.1:{server.port} " in line, line


def test_metrics_count_tokens_and_latency(server):
    def numbers():
        text = server.get("/metrics")[1]
        return dict((name, float(value)) for name, value in
                    (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")))

    before = numbers()
    status, body = server.post({"prompt": PROMPT, "max_tokens": 12, "temperature": 0})
    assert status == 200
    usage, after = json.loads(body)["usage"], numbers()
    assert after["edgelm_prompt_tokens_total"] - before["edgelm_prompt_tokens_total"] == usage["prompt_tokens"]
    assert after["edgelm_generated_tokens_total"] - before["edgelm_generated_tokens_total"] == usage["completion_tokens"]
    assert after["edgelm_request_latency_seconds_count"] == before["edgelm_request_latency_seconds_count"] + 1
    assert after["edgelm_request_latency_seconds_sum"] > before["edgelm_request_latency_seconds_sum"]
    assert after['edgelm_request_latency_seconds_bucket{le="+Inf"}'] == after["edgelm_request_latency_seconds_count"]


@pytest.mark.parametrize("length", ["abc", "-5"])
def test_a_bad_content_length_is_a_400(server, length):
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode())
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 400") and "Content-Length header" in json.loads(body)["error"]["message"]


def test_a_chunked_body_asks_for_a_content_length_and_closes(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        body = b'{"prompt": "hi"}'
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):  # ends: the server closes the connection
            reply += chunk
    head, _, rest = reply.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 411") and "Content-Length header" in json.loads(rest)["error"]["message"]
    assert "HTTP/1.1" not in rest  # the chunks were not taken for another request


class _Gate:
    """A stand-in generator: row 0 ends at once, row 1 only when the test lets it (or fails)."""

    def __init__(self, fail: bool = False):
        import threading

        self.proceed, self.fail = threading.Event(), fail

    def run(self, rows):
        from edgelm.runtime.generator import StreamEvent

        yield StreamEvent(0, 1, "a", "length")
        assert self.proceed.wait(30)
        if self.fail:
            raise RuntimeError("the batch failed")
        yield StreamEvent(1, 2, "b", "length")


@pytest.mark.parametrize("fail", [False, True])
def test_a_row_that_ends_is_answered_before_its_batch_ends(fail):
    import threading
    from types import SimpleNamespace

    from edgelm.runtime.server import _DONE, Engine, Job, Metrics

    gate = _Gate(fail)
    engine = Engine(gate, max_batch=8, max_queue=8, metrics=Metrics())
    jobs = [Job(SimpleNamespace()), Job(SimpleNamespace())]
    worker = threading.Thread(target=engine._run, args=(jobs,))
    worker.start()
    assert jobs[0].events.get(timeout=30).text == "a"
    assert jobs[0].events.get(timeout=30) is _DONE  # while row 1 is still decoding
    assert not gate.proceed.is_set()
    gate.proceed.set()
    worker.join(timeout=30)
    rest = [jobs[1].events.get(timeout=30) for _ in range(2)]
    assert (isinstance(rest[0], RuntimeError) if fail else rest[0].text == "b") and rest[1] is _DONE
    assert jobs[0].events.empty()  # the finished row got nothing more, the failure included


def test_long_and_short_requests_share_a_batch(embedded_artifact):
    """Through the engine: a long prompt asking for few tokens and a short one asking for many,
    480 + 400 positions together in a context of 512, each answered as if alone."""
    from edgelm.runtime.server import _DONE, Engine, Job, Metrics

    gen = Generator.load(embedded_artifact["gpt2"])
    prompts = ["word " * 480, PROMPT]
    cfgs = [SamplingConfig(max_new_tokens=8, stop_at_eos=False), SamplingConfig(max_new_tokens=400, stop_at_eos=False)]
    jobs = [Job(gen.prepare(p, c)) for p, c in zip(prompts, cfgs)]
    Engine(gen, max_batch=8, max_queue=8, metrics=Metrics())._run(jobs)
    for job, p, c in zip(jobs, prompts, cfgs):
        items = []
        while (item := job.events.get(timeout=5)) is not _DONE:
            items.append(item)
        assert not any(isinstance(i, Exception) for i in items), items
        assert [i.token_id for i in items] == gen.generate(p, c).token_ids


def test_busy_port_is_one_sentence(server, embedded_artifact):
    r = subprocess.run([sys.executable, "-m", "edgelm", "serve", str(embedded_artifact["gpt2"]), "--port",
                        str(server.port)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "choose another --port" in r.stderr


@pytest.mark.parametrize("args,words", [
    (["--port", "99999"], "expected a port from 0 to 65535, got 99999"),
    (["--port", "http"], "expected a port number, got 'http'"),
    (["--host", "no-such-host.invalid", "--port", "0"], "cannot listen on no-such-host.invalid:0"),
    (["--port", "BUSY"], "cannot listen on 127.0.0.1:"),  # refused before the (missing) model is read
])
def test_a_bad_address_is_one_sentence_before_the_model_loads(server, tmp_path, args, words):
    args = [str(server.port) if a == "BUSY" else a for a in args]
    r = subprocess.run([sys.executable, "-m", "edgelm", "serve", str(tmp_path / "no-artifact"), *args],
                       capture_output=True, text=True, timeout=60)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and words in lines[0], r.stderr
