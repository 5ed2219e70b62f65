"""``run_bench``: every system on every artifact and batch size, interleaved, energy in every run.

For each artifact and batch size, each system starts in its own worker process (one after the
other: the time to its first "ready" is its cold start), generates once untimed, then the
timed repeats run system after system within each repeat (the order rotates from one repeat to
the next), each run inside the energy tracker. A short pause before each run lets the previous
system's threads go idle. When the systems would not fit in memory together they run one at a
time instead, and the records say so (``interleaved: false``).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..runtime.options import check_threads
from . import systems as S
from .energy import DEFAULT_COUNTRY, EnergyReading, Meter, Tracker, combine, default_tracker
from .machine import machine_info, measure_bandwidth, parameter_count, versions, weight_bytes_per_token

FORMAT = "edgelm-bench"
SCHEMA_VERSION = 1
LOAD_TIMEOUT_S = 900
RUN_TIMEOUT_S = 3600
PROMPT_TEXT = Path(__file__).resolve().parent.parent / "assets" / "text" / "heldout.txt"


@dataclass(frozen=True)
class BenchSettings:
    """What to measure; checked when made, recorded in every report."""

    peers: tuple[str, ...] = ()
    prompt_len: int = 32
    new_tokens: int = 128
    batches: tuple[int, ...] = (1, 8)
    repeats: int = 5
    provider: str = "cpu"
    country: str = DEFAULT_COUNTRY
    threads: int | None = None
    bandwidth_gib: float = 1.0
    settle_s: float = 0.25  # pause before each timed run: the previous system's spinning threads go idle
    python_for: tuple[tuple[str, str], ...] = ()  # (peer, python executable of its own environment)

    def __post_init__(self):
        unknown = [p for p in self.peers if p not in S.PEERS]
        if unknown:
            raise InputError(f"unknown peer {', '.join(repr(p) for p in unknown)}; choose among {', '.join(S.PEERS)}")
        for name in ("prompt_len", "new_tokens", "repeats"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.new_tokens < 2:
            raise InputError("new-tokens must be at least 2: decode speed needs a step after the first token")
        if not self.batches or any(b < 1 for b in self.batches):
            raise InputError(f"batch sizes must be whole numbers >= 1, got {list(self.batches)}")
        if self.provider not in ("cpu", "cuda"):
            raise InputError(f"provider '{self.provider}' is not supported; choose cpu or cuda")
        if len(self.country) != 3 or not self.country.isalpha():
            raise InputError(f"country must be a 3-letter ISO code such as USA, FRA or DEU, got '{self.country}'")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"threads must be at least 1, got {self.threads}")
        check_threads(self.threads)
        if self.settle_s < 0:
            raise InputError(f"the pause between runs must be zero or more seconds, got {self.settle_s}")
        if not 0 < self.bandwidth_gib <= 64:
            raise InputError(f"the bandwidth buffer must be between 0 and 64 GiB, got {self.bandwidth_gib}")
        for peer, python in self.python_for:
            if peer not in S.PEERS:
                raise InputError(f"--python-for names '{peer}', which is not a peer; choose among {', '.join(S.PEERS)}")
            if not os.access(python, os.X_OK):
                raise InputError(f"--python-for {peer}={python}: not an executable Python; give its full path")

    def to_dict(self) -> dict:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        d["python_for"] = dict(self.python_for)
        return d


# -- one worker process per system ---------------------------------------------------------------
class WorkerError(RuntimeError):
    pass


class Worker:
    """A system in its own process; JSON lines over its stdin/stdout, its log in a file."""

    def __init__(self, system: str, spec: dict, python: str, env: dict, log_dir: Path):
        self.system = system
        self.log = log_dir / f"{system}-{os.getpid()}-{time.monotonic_ns()}.log"
        self._log_file = open(self.log, "w")
        started = time.perf_counter()
        self.proc = subprocess.Popen([python, str(S.WORKER), "serve", json.dumps({"system": system, **spec})],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log_file,
                                     text=True, env=env)
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        ready = self._receive(LOAD_TIMEOUT_S)
        self.cold_start_s = time.perf_counter() - started  # interpreter, imports and model load
        self.load_s = ready["load_s"]
        self.kernels = ready.get("kernels")  # edgelm's: which kernels ran its graph
        self.lm_head_screen = ready.get("lm_head_screen")  # edgelm's: whether greedy steps screen the LM head
        self.peak_rss_bytes = ready["peak_rss_bytes"]

    def _read(self):
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _receive(self, timeout: float) -> dict:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            self.close()
            raise WorkerError(f"no answer within {timeout:.0f} s") from None
        if line is None:
            raise self._ended()
        msg = json.loads(line)
        if "error" in msg:
            raise WorkerError(msg["error"])
        return msg

    def _ended(self) -> WorkerError:
        """Why the process is gone: its exit code and its log's last lines; a SIGKILL, which leaves no log,
        is most often the kernel's out-of-memory killer."""
        self.proc.wait(timeout=10)
        code = self.proc.returncode
        if code == -signal.SIGKILL:
            return WorkerError("its process was killed (SIGKILL), most likely because the machine ran out of "
                               f"memory; lower --batch, the prompt or the new tokens: {S.log_tail(self.log)}")
        return WorkerError(f"its process ended (exit code {code}): {S.log_tail(self.log)}")

    def run(self, prompts: list[list[int]], new_tokens: int) -> dict:
        try:
            self.proc.stdin.write(json.dumps({"cmd": "run", "prompts": prompts, "new_tokens": new_tokens}) + "\n")
            self.proc.stdin.flush()
        except OSError:  # the process is gone: its log says why
            raise self._ended() from None
        msg = self._receive(RUN_TIMEOUT_S)
        self.peak_rss_bytes = max(self.peak_rss_bytes, msg["peak_rss_bytes"])
        if len(msg["stamps"]) != new_tokens:
            raise WorkerError(f"it generated {len(msg['stamps'])} steps where {new_tokens} were asked for")
        return msg

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()


# -- the plan: which systems run on which artifact, and which are skipped ------------------------
@dataclass
class Entry:
    system: S.System
    model: Path | None = None  # what its worker loads
    size_bytes: int | None = None
    dtype: str = "fp32"
    bytes_per_token: int | None = None
    python: str = sys.executable
    note: str | None = None  # set when skipped or failed
    status: str = "ok"


@dataclass
class Target:
    folder: Path
    manifest: dict
    name: str
    entries: list[Entry] = field(default_factory=list)


def _load_targets(artifacts: list[str | Path]) -> list[Target]:
    from ..manifest import read_manifest

    if not artifacts:
        raise InputError("no artifact given; pass at least one folder made by 'edgelm export'")
    targets, names = [], set()
    for a in artifacts:
        folder = Path(a)
        manifest = read_manifest(folder, verify_checksums=True)  # a damaged copy would be measured, not refused
        name = folder.resolve().name
        while name in names:
            name += "'"
        names.add(name)
        targets.append(Target(folder, manifest, name))
    return targets


def _plan(target: Target, settings: BenchSettings, cache: Path, env: dict) -> None:
    m = target.manifest
    facts, graph = m["model"]["facts"], m["graph"]
    fp32_per_token = weight_bytes_per_token(facts, "fp32")
    edgelm = Entry(S.SYSTEMS["edgelm"], target.folder,
                   size_bytes=sum(f["bytes"] for f in m["files"].values()) + (target.folder / "manifest.json").stat().st_size,
                   dtype=(graph.get("quantization") or {}).get("mode") or graph["dtype"],  # int8-dynamic, int4-weight, ...
                   bytes_per_token=weight_bytes_per_token(facts, graph["dtype"], graph.get("weight_bytes")
                                                          if graph.get("backend") == "builder" else None))
    target.entries.append(edgelm)
    source, why = S.source_folder(m) if settings.peers else (None, "")
    python_for = dict(settings.python_for)
    for peer in settings.peers:
        system = S.SYSTEMS[peer]
        entry = Entry(system, dtype="fp32", bytes_per_token=fp32_per_token, python=python_for.get(peer, sys.executable))
        target.entries.append(entry)
        if system.model_types is not None and facts["model_type"] not in system.model_types:
            entry.status, entry.note = "skipped", f"not supported: {system.unsupported}"
            continue
        missing = S.missing_modules(system, entry.python)
        if missing:
            entry.status = "skipped"
            entry.note = f"not installed: {', '.join(missing)} does not import; {system.install}"
            continue
        if source is None:
            entry.status, entry.note = "skipped", why
            continue
        staged = S.staged_source(source, target.folder, cache)
        if system.prepared:
            try:
                entry.model = S.prepared_model(system, staged, settings.provider, entry.python, env)
            except RuntimeError as exc:
                entry.status, entry.note = "failed", str(exc)
                continue
        else:
            entry.model = staged
        entry.size_bytes = S.folder_bytes(entry.model)


def _prompts(target: Target, prompt_len: int, batch: int) -> list[list[int]]:
    """``batch`` different prompts of exactly ``prompt_len`` tokens, from held-out Austen text."""
    from ..runtime.artifact import Tokenizer

    ids = Tokenizer(target.folder).encode(PROMPT_TEXT.read_text())
    vocab = int(target.manifest["model"]["facts"]["vocab_size"])
    ids = [i for i in ids if i < vocab] or [0]
    need = prompt_len * batch
    ids = (ids * (need // len(ids) + 1))[:need]
    return [ids[b * prompt_len:(b + 1) * prompt_len] for b in range(batch)]


# -- measuring ------------------------------------------------------------------------------------
@dataclass
class Samples:
    ttft: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)
    steps: list[float] = field(default_factory=list)  # per-token (per-step) latencies of every decode step
    energy: list[EnergyReading] = field(default_factory=list)
    tokens: list[int] | None = None


def run_bench(artifacts: list[str | Path], settings: BenchSettings | None = None, tracker: Tracker | None = None,
              cache_dir: str | Path | None = None, progress: bool = True, command: str | None = None) -> dict:
    """Benchmark ``artifacts`` against ``settings.peers``; return the report (see edgelm.bench.report)."""
    settings = settings or BenchSettings()
    targets = _load_targets(artifacts)
    for t in targets:
        limit = int(t.manifest["model"]["facts"]["max_positions"])
        if settings.prompt_len + settings.new_tokens > limit:
            raise InputError(f"{t.folder}: prompt-len {settings.prompt_len} + new-tokens {settings.new_tokens} is more "
                             f"than the model's context of {limit}; ask for fewer tokens")
    if settings.provider == "cuda":
        from ..runtime.artifact import check_provider

        check_provider("cuda")
    meter = Meter(tracker if tracker is not None else default_tracker(settings.country, measure_power_secs=0.5))
    cache = S.cache_root(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    package_root = str(Path(__file__).resolve().parents[2])  # edgelm importable in workers from a clone, too
    env["PYTHONPATH"] = package_root + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else package_root

    report = {"format": FORMAT, "schema_version": SCHEMA_VERSION,
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": command, "machine": machine_info(), "versions": versions(), "settings": settings.to_dict(),
              "records": [], "notes": []}
    say = _say(progress)
    say(f"measuring memory bandwidth ({settings.bandwidth_gib:g} GiB buffer) ...")
    report["bandwidth_gbps"] = measure_bandwidth(settings.bandwidth_gib)
    say(f"memory bandwidth: {report['bandwidth_gbps']:.1f} GB/s")
    meter.start()  # CodeCarbon probes the hardware on its first start (about 2 s): not before a timed run
    meter.stop()
    with tempfile.TemporaryDirectory(prefix="edgelm-bench-") as logs:
        for target in targets:
            _plan(target, settings, cache, env)
            for batch in settings.batches:
                report["records"] += _bench_setting(target, batch, settings, meter, env, Path(logs),
                                                    report["bandwidth_gbps"], progress)
    try:  # a shared machine: how busy it was, next to the load at start
        report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        pass
    energies = [r["energy"] for r in report["records"] if r["status"] == "ok"]
    measured = [e for e in energies if e.get("measured")]
    report["energy_method"] = measured[0]["method"] if measured else None
    report["energy_tool"] = next((e.get("tool") for e in energies if e.get("tool")), None)
    if energies and not measured:
        report["notes"].append(f"energy was not measured: {energies[0].get('reason')}")
    return report


def _say(progress: bool):
    def say(text: str) -> None:
        if progress:
            print(text, file=sys.stderr, flush=True)
    return say


def _fits_together(entries: list[Entry], facts: dict) -> bool:
    """Whether every system's worker fits in memory at once (a rough estimate from the fp32 weights)."""
    try:
        import psutil
    except ImportError:
        return True
    fp32 = parameter_count(facts) * 4
    need = sum(e.system.memory_factor * fp32 for e in entries) + 0.5e9
    return need < 0.6 * psutil.virtual_memory().available


def _bench_setting(target: Target, batch: int, settings: BenchSettings, meter: Meter, env: dict, logs: Path,
                   bandwidth: float, progress: bool) -> list[dict]:
    from tqdm import tqdm

    runnable = [e for e in target.entries if e.status == "ok"]
    prompts = _prompts(target, settings.prompt_len, batch)
    interleaved = _fits_together(runnable, target.manifest["model"]["facts"])
    groups = [runnable] if interleaved else [[e] for e in runnable]
    samples = {e.system.name: Samples() for e in runnable}
    workers: dict[str, Worker] = {}
    total = len(runnable) * (settings.repeats + 1)
    bar = tqdm(total=total, desc=f"{target.name} batch {batch}", unit="run", disable=not progress, leave=False,
               file=sys.stderr)
    try:
        for group in groups:
            for e in group:  # one after the other: cold starts do not compete for the cores
                bar.set_postfix_str(f"starting {e.system.name}")
                try:
                    spec = {"model": str(e.model), "provider": settings.provider, "threads": settings.threads}
                    workers[e.system.name] = Worker(e.system.name, spec, e.python, env, logs)
                    workers[e.system.name].run(prompts, settings.new_tokens)  # warm-up: one full run, untimed
                except WorkerError as exc:
                    e.status, e.note = "failed", f"{e.system.name} failed to start: {exc}"
                bar.update(1)
            for r in range(settings.repeats):
                live = [e for e in group if e.status == "ok"]
                shift = r % len(live) if live else 0
                for e in live[shift:] + live[:shift]:  # rotate the order between repeats
                    bar.set_postfix_str(e.system.name)
                    try:
                        _timed_run(workers[e.system.name], prompts, settings.new_tokens, meter,
                                   samples[e.system.name], settings.settle_s)
                    except WorkerError as exc:
                        e.status, e.note = "failed", f"{e.system.name} failed during a run: {exc}"
                    bar.update(1)
            if not interleaved:
                for e in group:
                    if e.system.name in workers:
                        workers[e.system.name].close()
    finally:
        bar.close()
        for w in workers.values():
            w.close()
    reference = samples.get("edgelm").tokens if "edgelm" in samples else None
    return [_record(target, e, batch, settings, samples.get(e.system.name), workers.get(e.system.name), bandwidth,
                    interleaved, reference) for e in target.entries]


def _timed_run(worker: Worker, prompts, new_tokens: int, meter: Meter, into: Samples, settle_s: float) -> None:
    time.sleep(settle_s)
    meter.start()
    try:
        msg = worker.run(prompts, new_tokens)
    finally:
        reading = meter.stop()
    stamps = np.asarray(msg["stamps"])
    batch = len(prompts)
    into.ttft.append(float(stamps[0]))
    into.decode.append((len(stamps) - 1) * batch / float(stamps[-1] - stamps[0]))
    into.steps += np.diff(stamps).tolist()
    into.energy.append(reading)
    if into.tokens is None:
        into.tokens = msg["tokens"]


def _record(target: Target, e: Entry, batch: int, settings: BenchSettings, s: Samples | None, worker: Worker | None,
            bandwidth: float, interleaved: bool, reference: list[int] | None) -> dict:
    facts = target.manifest["model"]["facts"]
    rec = {
        "artifact": str(target.folder), "model": target.name, "model_type": facts["model_type"],
        "source": target.manifest["model"]["source"], "system": e.system.name, "label": e.system.label,
        "status": e.status, "note": e.note,
        "batch": batch, "prompt_tokens": settings.prompt_len, "new_tokens": settings.new_tokens,
        "repeats": settings.repeats, "provider": settings.provider, "dtype": e.dtype, "greedy": True,
        "interleaved": interleaved,
    }
    if e.status != "ok" or s is None or not s.decode:
        return rec
    decode = float(np.median(s.decode))
    ttft = float(np.median(s.ttft))
    tokens = batch * settings.new_tokens * len(s.energy)
    ceiling = batch * bandwidth * 1e9 / e.bytes_per_token if e.bytes_per_token else None
    agree = None
    if reference is not None and s.tokens is not None:
        k = next((i for i, (a, b) in enumerate(zip(s.tokens, reference)) if a != b), min(len(s.tokens), len(reference)))
        agree = {"leading_tokens_equal": k, "of": len(reference)}
    rec.update({
        "time_to_first_token_s": ttft,
        "prefill_tokens_per_s": batch * settings.prompt_len / ttft,
        "decode_tokens_per_s": decode,
        "decode_tokens_per_s_all": [round(x, 3) for x in s.decode],
        "per_token_latency_p50_s": float(np.percentile(s.steps, 50)),
        "per_token_latency_p95_s": float(np.percentile(s.steps, 95)),
        "peak_rss_bytes": worker.peak_rss_bytes if worker else None,
        "size_bytes": e.size_bytes,
        "cold_start_s": worker.cold_start_s if worker else None,
        "load_s": worker.load_s if worker else None,
        "kernels": worker.kernels if worker else None,
        "lm_head_screen": worker.lm_head_screen if worker else None,
        "weight_bytes_per_token": e.bytes_per_token,
        "bandwidth_gbps": bandwidth,
        "ceiling_tokens_per_s": ceiling,
        "fraction_of_ceiling": decode / ceiling if ceiling else None,
        "energy": combine(s.energy).to_dict(tokens=tokens),
        "agreement_with_edgelm": agree,
    })
    return rec

