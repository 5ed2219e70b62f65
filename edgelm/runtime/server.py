"""An OpenAI-compatible HTTP server over one Generator, with the standard library only.

    POST /v1/completions   {"prompt": "...", "max_tokens": 16, "temperature": 1.0, "stream": false, ...}
    GET  /v1/models        GET /health        GET /metrics (Prometheus text format, energy included)

A sampling field a request leaves out (temperature, top_k, top_p, repetition_penalty) takes the
value the model's generation_config.json sets, else OpenAI's default (temperature 1: sampling); as in
OpenAI's API, temperature 0 means greedy, whatever the model's do_sample says.

Request threads parse and check each request (a 4xx with a JSON error that says what to fix),
then put it on a bounded queue (full: 429). One worker thread owns the model: it takes up to
``max_batch`` waiting requests, decodes them together as one batch (padded as the artifact says), and hands each
token to its request's thread. SIGINT/SIGTERM stop new requests (503), finish the batch in
flight, and exit.
"""

from __future__ import annotations

import contextlib
import json
import queue
import signal
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..errors import EdgelmError, InputError
from .generator import Generator, Row

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)
_DONE = object()


class Histogram:
    def __init__(self, name: str, help: str, buckets):
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * len(buckets)
        self.total, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.total += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        lines += [f'{self.name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        lines += [f'{self.name}_bucket{{le="+Inf"}} {self.count}', f"{self.name}_sum {self.total:.6f}",
                  f"{self.name}_count {self.count}"]
        return lines


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.latency = Histogram("edgelm_request_latency_seconds", "Time from request to last token.", LATENCY_BUCKETS)
        self.ttft = Histogram("edgelm_time_to_first_token_seconds", "Time from request to first token.",
                              LATENCY_BUCKETS)
        self.batch = Histogram("edgelm_batch_size", "Requests decoded together.", BATCH_BUCKETS)
        self.energy = None  # edgelm.bench.energy.RunningEnergy, set by serve()

    def count(self, status: int) -> None:
        with self.lock:
            self.requests[str(status)] = self.requests.get(str(status), 0) + 1

    def render(self, queue_depth: int) -> str:
        with self.lock:
            lines = ["# HELP edgelm_requests_total Completed HTTP requests by status code.",
                     "# TYPE edgelm_requests_total counter"]
            lines += [f'edgelm_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
            lines += ["# HELP edgelm_prompt_tokens_total Prompt tokens processed.",
                      "# TYPE edgelm_prompt_tokens_total counter", f"edgelm_prompt_tokens_total {self.prompt_tokens}",
                      "# HELP edgelm_generated_tokens_total Tokens generated.",
                      "# TYPE edgelm_generated_tokens_total counter",
                      f"edgelm_generated_tokens_total {self.completion_tokens}",
                      "# HELP edgelm_queue_depth Requests waiting for the model.", "# TYPE edgelm_queue_depth gauge",
                      f"edgelm_queue_depth {queue_depth}"]
            for h in (self.latency, self.ttft, self.batch):
                lines += h.render()
        if self.energy is not None:
            lines += self.energy.prometheus()
        return "\n".join(lines) + "\n"


class Job:
    """One request on its way through the queue: its prepared row and a channel for its events."""

    def __init__(self, row: Row):
        self.row = row
        self.events: queue.Queue = queue.Queue()
        self.created = time.perf_counter()
        self.first_token: float | None = None


class Engine:
    """The worker thread that owns the Generator and batches waiting jobs."""

    def __init__(self, gen: Generator, max_batch: int, max_queue: int, metrics: Metrics):
        self.gen, self.max_batch, self.metrics = gen, max_batch, metrics
        self.waiting: queue.Queue = queue.Queue(maxsize=max_queue)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._work, name="edgelm-engine", daemon=True)

    def submit(self, job: Job) -> bool:
        if self.stopping.is_set():
            return False
        try:
            self.waiting.put_nowait(job)
            return True
        except queue.Full:
            return False

    def _work(self) -> None:
        while True:
            try:
                first = self.waiting.get(timeout=0.1)
            except queue.Empty:
                if self.stopping.is_set():
                    return
                continue
            jobs = [first]
            while len(jobs) < self.max_batch:
                try:
                    jobs.append(self.waiting.get_nowait())
                except queue.Empty:
                    break
            self._run(jobs)

    def _run(self, jobs: list[Job]) -> None:
        with self.metrics.lock:  # handler threads observe the other histograms meanwhile
            self.metrics.batch.observe(len(jobs))
        energy = (contextlib.nullcontext() if self.metrics.energy is None else
                  self.metrics.energy.busy(lambda: sum(len(j.row.ids) for j in jobs)))
        done = [False] * len(jobs)
        try:
            with energy:  # decoding energy, for energy per token in /metrics
                for event in self.gen.run([j.row for j in jobs]):
                    job = jobs[event.row]
                    if job.first_token is None:
                        job.first_token = time.perf_counter()
                    job.events.put(event)
                    if event.finished:  # its client gets its answer now, not when the batch's longest row ends
                        job.events.put(_DONE)
                        done[event.row] = True
        except Exception as exc:  # a failure of the batch reaches every client still waiting in it
            for job, ended in zip(jobs, done):
                if not ended:
                    job.events.put(exc)
        for job, ended in zip(jobs, done):
            if not ended:
                job.events.put(_DONE)

    def drain(self) -> None:
        """Refuse the jobs that never started (server stopping)."""
        while True:
            try:
                job = self.waiting.get_nowait()
            except queue.Empty:
                return
            job.events.put(InputError("the server is shutting down; retry on another instance"))
            job.events.put(_DONE)


UNSUPPORTED = {  # OpenAI fields that would change the output, with the value that changes nothing
    "logprobs": None, "echo": False, "suffix": None, "logit_bias": None,
    "frequency_penalty": 0, "presence_penalty": 0,
}


def parse_completion_request(body: dict, gen: Generator, model_name: str,
                             max_prompts: int = 0) -> tuple[list[Row], bool]:
    """Check an OpenAI completions request; return the prepared rows and whether to stream.

    ``max_prompts`` (0: no limit): the most prompts one request may hold, the server's queue bound,
    since a request that can never fit the queue would otherwise get 429 forever.
    """
    if not isinstance(body, dict):
        raise InputError("the request body must be a JSON object")
    if "model" in body and body["model"] not in (model_name, None):
        raise _NotFound(f"model '{body['model']}' is not served here; GET /v1/models lists '{model_name}'")
    prompt = body.get("prompt")
    if prompt is None:
        raise InputError("'prompt' is required: a string (or a list of strings)")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError("'prompt' must be a string or a non-empty list of strings")
    if max_prompts and len(prompts) > max_prompts:
        raise InputError(f"a request may hold at most {max_prompts} prompts (the server's --max-queue), "
                         f"got {len(prompts)}; split the list over several requests")
    for key in ("n", "best_of"):
        if body.get(key) not in (None, 1):  # null: the default
            raise InputError(f"'{key}' other than 1 is not supported; send one request per completion")
    for key, neutral in UNSUPPORTED.items():
        if body.get(key) not in (None, neutral, {}, ""):
            raise InputError(f"'{key}' is not supported; leave it out")

    def number(key, default, kind=(int, float)):
        value = body.get(key, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, kind):
            names = "an integer" if kind is int else "a number"
            raise InputError(f"'{key}' must be {names}, got {json.dumps(value)}")
        return value

    max_tokens = number("max_tokens", 16, int)
    limit = gen.max_positions
    if not 1 <= max_tokens <= limit:
        raise InputError(f"'max_tokens' must be between 1 and {limit}, got {max_tokens}")
    temperature = number("temperature", None)
    if temperature is not None and temperature < 0:
        raise InputError(f"'temperature' must be >= 0, got {temperature}")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise InputError("'stop' must be a non-empty string or a list of up to 4 of them")
    stream = body.get("stream")
    stream = False if stream is None else stream
    if not isinstance(stream, bool):
        raise InputError("'stream' must be true or false")
    seed = number("seed", None, int) if body.get("seed") is not None else None
    # a field left out takes the model's value where it sets one, else SamplingConfig's (OpenAI's defaults)
    asked = {"temperature": temperature or None, "top_k": number("top_k", None, int), "top_p": number("top_p", None),
             "repetition_penalty": number("repetition_penalty", None)}
    cfg = gen.sampling(max_new_tokens=max_tokens, greedy=temperature == 0, stop=tuple(stop), seed=seed,
                       **{k: v for k, v in asked.items() if v is not None})
    return [gen.prepare(p, cfg) for p in prompts], stream


class _NotFound(InputError):
    status = 404


class _LengthRequired(InputError):
    status = 411


def make_handler(gen: Generator, engine: Engine, metrics: Metrics, model_name: str):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "edgelm"
        timeout = 5  # an idle keep-alive connection must not hold up shutdown

        def log_message(self, fmt, *args):  # quiet; /metrics has the numbers
            pass

        def _send(self, status: int, payload, content_type="application/json") -> None:
            data = payload if isinstance(payload, bytes) else (json.dumps(payload) + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            metrics.count(status)

        def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
            self._send(status, {"error": {"message": message, "type": kind, "code": status}})

        def do_GET(self):
            if self.path == "/health":
                state = "stopping" if engine.stopping.is_set() else "ok"
                self._send(200 if state == "ok" else 503, {"status": state, "model": model_name})
            elif self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [
                    {"id": model_name, "object": "model", "created": 0, "owned_by": "edgelm"}]})
            elif self.path == "/metrics":
                self._send(200, metrics.render(engine.waiting.qsize()).encode(), "text/plain; version=0.0.4")
            else:
                self._error(404, f"no route GET {self.path}; try /v1/models, /health or /metrics", "not_found")

        def do_POST(self):
            if self.path != "/v1/completions":
                self._error(404, f"no route POST {self.path}; completions are at POST /v1/completions", "not_found")
                return
            try:
                if self.headers.get("Transfer-Encoding"):
                    self.close_connection = True  # the chunked body is not read: nothing more on this connection
                    raise _LengthRequired("chunked request bodies are not supported; send the body with a Content-Length header")
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    length = -1
                if length < 0:
                    self.close_connection = True  # the body's end is unknown: nothing more on this connection
                    raise InputError("the Content-Length header must be a whole number of bytes; send the body's length")
                if length > 4 << 20:
                    self.close_connection = True  # its unread body must not be taken for the next request
                    raise InputError("the request body is over 4 MiB; send a shorter prompt")
                try:
                    body = json.loads(self.rfile.read(length) or b"null")
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise InputError(f"the body is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})")
                rows, stream = parse_completion_request(body, gen, model_name, engine.waiting.maxsize)
            except EdgelmError as exc:  # 400, or the status the error class names
                status = getattr(exc, "status", 400)
                self._error(status, str(exc), "not_found" if status == 404 else "invalid_request_error")
                return
            jobs = [Job(r) for r in rows]
            for k, job in enumerate(jobs):
                if not engine.submit(job):
                    for earlier in jobs[:k]:
                        earlier.row.cancelled = True
                    if engine.stopping.is_set():
                        self._error(503, "the server is shutting down; retry on another instance", "unavailable")
                    else:
                        self._error(429, "too many requests are waiting; retry after a moment", "rate_limit")
                    return
            rid = f"cmpl-{uuid.uuid4().hex[:24]}"
            if stream:
                self._stream(rid, jobs)
            else:
                self._complete(rid, jobs)

        def _collect(self, job: Job, on_event=None):
            while True:
                item = job.events.get()
                if item is _DONE:
                    return None
                if isinstance(item, Exception):
                    return item
                if on_event:
                    on_event(item)

        def _finish_metrics(self, jobs):
            now = time.perf_counter()
            with metrics.lock:
                for job in jobs:
                    metrics.prompt_tokens += len(job.row.prompt_ids)
                    metrics.completion_tokens += len(job.row.ids)
                    metrics.latency.observe(now - job.created)
                    if job.first_token is not None:
                        metrics.ttft.observe(job.first_token - job.created)

        def _complete(self, rid: str, jobs: list[Job]) -> None:
            for job in jobs:
                error = self._collect(job)
                if error is not None:
                    status = 503 if isinstance(error, InputError) else 500
                    self._error(status, str(error), "server_error")
                    return
            self._finish_metrics(jobs)
            choices = [{"text": j.row.text, "index": k, "logprobs": None,
                        "finish_reason": "length" if j.row.finished == "length" else "stop"}
                       for k, j in enumerate(jobs)]
            prompt_tokens = sum(len(j.row.prompt_ids) for j in jobs)
            completion_tokens = sum(len(j.row.ids) for j in jobs)
            self._send(200, {"id": rid, "object": "text_completion", "created": int(time.time()),
                             "model": model_name, "choices": choices,
                             "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                       "total_tokens": prompt_tokens + completion_tokens}})

        def _stream(self, rid: str, jobs: list[Job]) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            created = int(time.time())

            def chunk(index, text, finish=None):
                data = {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                        "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": finish}]}
                self.wfile.write(f"data: {json.dumps(data)}\n\n".encode())
                self.wfile.flush()

            try:
                for k, job in enumerate(jobs):
                    def on_event(event, k=k):
                        finish = None
                        if event.finished:
                            finish = "length" if event.finished == "length" else "stop"
                        if event.text or finish:
                            chunk(k, event.text, finish)

                    error = self._collect(job, on_event)
                    if error is not None:
                        self.wfile.write(f"data: {json.dumps({'error': {'message': str(error)}})}\n\n".encode())
                        break
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                metrics.count(200)
                self._finish_metrics(jobs)
            except (BrokenPipeError, ConnectionResetError):
                for job in jobs:  # the client left: stop spending compute on it
                    job.row.cancelled = True
                metrics.count(499)

    return Handler


class _HTTPServer(ThreadingHTTPServer):
    request_queue_size = 256  # listen backlog: many clients connect at once
    daemon_threads = False  # server_close() waits for responses in flight


def serve(args) -> int:
    from pathlib import Path

    # the address first: a busy port is refused before the model loads, and the port stays ours while it
    # does (bound, not yet listening: a client is refused, not left waiting, until the model is ready)
    httpd = _HTTPServer((args.host, args.port), None, bind_and_activate=False)
    try:
        httpd.server_bind()
    except OSError as exc:
        httpd.server_close()
        raise InputError(f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc}); check --host, "
                         "choose another --port, or stop the program using it") from None
    try:
        gen = Generator.load(args.artifact, args.provider, args.threads, args.context_policy, args.weights,
                             args.kernels)
    except BaseException:
        httpd.server_close()
        raise
    model_name = args.model_name or Path(args.artifact).resolve().name
    metrics = Metrics()
    from ..bench.energy import RunningEnergy

    metrics.energy = RunningEnergy().start()  # energy and energy per token in /metrics (CodeCarbon, offline)
    engine = Engine(gen, args.max_batch, args.max_queue, metrics)
    httpd.RequestHandlerClass = make_handler(gen, engine, metrics, model_name)
    httpd.server_activate()
    engine.thread.start()

    def stop(signum, frame):
        if engine.stopping.is_set():
            return
        engine.stopping.set()
        engine.drain()
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    host, port = httpd.server_address[:2]
    print(f"edgelm serve: {model_name} on http://{host}:{port} (provider {args.provider}, {gen.art.kernels} kernels, "
          f"batch up to {args.max_batch}, queue {args.max_queue}); Ctrl-C to stop", flush=True)
    httpd.serve_forever(poll_interval=0.2)
    engine.thread.join(timeout=120)  # finish the batch in flight
    httpd.server_close()
    metrics.energy.stop()
    print("edgelm serve: stopped", flush=True)
    return 0
