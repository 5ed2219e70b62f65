"""edgelm bench and energy: the records, the report files, peers skipped with a note, trackers that
fail or report known joules, energy in export manifests, generate --energy and the server's /metrics.

Tiny models only (the session fixtures), a few tokens, one or two repeats: the numbers are not
the point here, their shape and their arithmetic are.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from edgelm.bench import BenchSettings, Meter, measure_step, run_bench, write_report
from edgelm.bench.energy import JOULES_PER_KWH, EnergyReading
from edgelm.bench.report import FILES, MEASURED_KEYS, RECORD_KEYS
from edgelm.cli import main
from edgelm.runtime import native

JOULES, GRAMS = 3.0, 0.5  # what the fake tracker reports for every run


class FakeTracker:
    """Reports known joules and grams for every measured interval; counts its starts and stops."""

    tool = "fake"

    def __init__(self):
        self.starts = self.stops = 0

    def start(self):
        self.starts += 1

    def stop(self):
        self.stops += 1
        return EnergyReading(measured=True, joules=JOULES, seconds=0.1, gco2e=GRAMS, country="FRA",
                             method="fake: known joules", components={"cpu_j": JOULES / 4, "ram_j": JOULES * 3 / 4},
                             details={"cpu": "fake", "gpu": "none", "ram_watts": 10.0, "ram_share": 0.75,
                                      "scope": "test"}, tool=self.tool)


class FailingTracker:
    tool = "failing"

    def start(self):
        raise RuntimeError("no RAPL and no psutil: nothing to read")

    def stop(self):
        raise AssertionError("stop must not be called after a failed start")


SETTINGS = dict(prompt_len=8, new_tokens=6, repeats=2, bandwidth_gib=0.0625, settle_s=0.0)


@pytest.fixture(scope="module")
def bench(tiny_artifact, tmp_path_factory):
    """One benchmark of the tiny GPT-2 against PyTorch and CTranslate2, batch 1 and 2, fake energy."""
    tracker = FakeTracker()
    settings = BenchSettings(peers=("pytorch", "ctranslate2"), batches=(1, 2), **SETTINGS)
    report = run_bench([tiny_artifact["gpt2"]], settings, tracker=tracker,
                       cache_dir=tmp_path_factory.mktemp("bench_cache"), progress=False, command="test")
    out = write_report(report, tmp_path_factory.mktemp("bench_report") / "report")
    return report, out, tracker


def test_records_have_the_schema(bench):
    report, _, _ = bench
    assert report["format"] == "edgelm-bench" and report["schema_version"] == 1
    for key in ("machine", "versions", "settings", "bandwidth_gbps", "records", "created", "command"):
        assert key in report
    assert report["machine"]["cpus"] >= 1 and report["bandwidth_gbps"] > 0
    assert report["settings"]["batches"] == [1, 2] and report["settings"]["peers"] == ["pytorch", "ctranslate2"]
    # one record per artifact x system x batch size, in that order
    assert [(r["model"], r["system"], r["batch"]) for r in report["records"]] == [
        ("gpt2", s, b) for b in (1, 2) for s in ("edgelm", "pytorch", "ctranslate2")]
    for r in report["records"]:
        assert set(RECORD_KEYS) <= set(r)
        if r["status"] != "ok":
            continue
        assert set(MEASURED_KEYS) <= set(r), set(MEASURED_KEYS) - set(r)
        assert r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0 and r["time_to_first_token_s"] > 0
        assert 0 < r["per_token_latency_p50_s"] <= r["per_token_latency_p95_s"]
        assert len(r["decode_tokens_per_s_all"]) == SETTINGS["repeats"]
        assert r["peak_rss_bytes"] > 10e6 and r["size_bytes"] > 0 and r["cold_start_s"] > 0
        assert r["ceiling_tokens_per_s"] > 0 and r["fraction_of_ceiling"] > 0
        assert r["weight_bytes_per_token"] > 0
        if r["system"] != "edgelm":
            assert r["agreement_with_edgelm"]["of"] == SETTINGS["new_tokens"] and r["kernels"] is None
            assert r["lm_head_screen"] is None
        else:  # the tiny fp32 artifact runs on edgelm's kernels by default (where its library is built)
            assert r["kernels"] == ("edgelm" if native.library_path() else "onnxruntime")
            assert r["lm_head_screen"] is (r["kernels"] == "edgelm")  # its greedy steps screen the LM head
    assert all(r["status"] == "ok" for r in report["records"]), [r["note"] for r in report["records"]]


def test_a_peer_that_does_not_support_the_model_is_skipped_with_a_note(tiny_artifact, tmp_path):
    report = run_bench([tiny_artifact["gpt_neo"]], BenchSettings(peers=("ctranslate2",), batches=(1,), prompt_len=4,
                                                                  new_tokens=3, repeats=1, bandwidth_gib=0.0625,
                                                                  settle_s=0.0),
                       tracker=FakeTracker(), cache_dir=tmp_path, progress=False)
    edgelm, ct2 = report["records"]
    assert edgelm["status"] == "ok" and edgelm["model_type"] == "gpt_neo" and edgelm["decode_tokens_per_s"] > 0
    assert ct2["status"] == "skipped" and "GPT-Neo" in ct2["note"] and "decode_tokens_per_s" not in ct2
    md = write_report(report, tmp_path / "report")
    assert "gpt_neo / ctranslate2 (skipped)" in (md / "report.md").read_text()


def test_fake_tracker_joules_give_exact_figures_per_token(bench):
    report, _, tracker = bench
    ok = [r for r in report["records"] if r["status"] == "ok"]
    # every timed run, plus the tracker's own warm-up before them; no system's warm-up run
    assert tracker.starts == tracker.stops == len(ok) * SETTINGS["repeats"] + 1
    for r in ok:
        e = r["energy"]
        tokens = r["batch"] * SETTINGS["new_tokens"] * SETTINGS["repeats"]
        assert e["measured"] and e["tokens"] == tokens
        assert e["joules"] == pytest.approx(JOULES * SETTINGS["repeats"], rel=1e-12)
        assert e["joules_per_token"] == pytest.approx(JOULES / (r["batch"] * SETTINGS["new_tokens"]), rel=1e-12)
        assert e["kwh"] == pytest.approx(JOULES * SETTINGS["repeats"] / JOULES_PER_KWH, rel=1e-12)
        assert e["gco2e_per_1000_tokens"] == pytest.approx(GRAMS * SETTINGS["repeats"] / tokens * 1000, rel=1e-12)
        assert e["method"] == "fake: known joules" and e["components"]["ram_j"] == pytest.approx(0.75 * e["joules"])
    assert report["energy_method"] == "fake: known joules"


def test_report_files_are_written(bench):
    report, out, _ = bench
    for name in FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in FILES:
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "report.json").read_text())["records"] == json.loads(json.dumps(report["records"]))
    md = (out / "report.md").read_text()
    for fragment in ("## Speed", "## Energy", "## Memory, size, start-up", "fake: known joules",
                     "## Same work", f"{JOULES / SETTINGS['new_tokens']:.3f}", "edgelm ran its artifact on these kernels",
                     *(["a greedy step screens the LM head"] if native.library_path() else [])):
        assert fragment in md, fragment
    assert not list(out.parent.glob(".report.tmp-*"))  # written atomically


def test_a_missing_peer_is_skipped_with_a_note(tiny_artifact, tmp_path, monkeypatch):
    from edgelm.bench import systems

    real = systems.missing_modules
    monkeypatch.setattr(systems, "missing_modules",
                        lambda system, python=None: ["ctranslate2"] if system.name == "ctranslate2" else real(system, python))
    report = run_bench([tiny_artifact["gpt2"]], BenchSettings(peers=("ctranslate2",), batches=(1,), prompt_len=4,
                                                               new_tokens=3, repeats=1, bandwidth_gib=0.0625,
                                                               settle_s=0.0),
                       tracker=FakeTracker(), cache_dir=tmp_path, progress=False)
    edgelm, ct2 = report["records"]
    assert edgelm["status"] == "ok" and edgelm["decode_tokens_per_s"] > 0
    assert ct2["status"] == "skipped" and "not installed" in ct2["note"] and "pip install" in ct2["note"]


def test_a_peer_in_another_environment_is_checked_there():
    from edgelm.bench.systems import SYSTEMS, missing_modules

    other = shutil.which("python3")
    if not other or subprocess.run([other, "-c", "import ctranslate2"], capture_output=True).returncode == 0:
        pytest.skip("no other Python without ctranslate2 on this machine")
    assert "ctranslate2" in missing_modules(SYSTEMS["ctranslate2"], other)


def test_a_tracker_that_fails_leaves_energy_not_measured_and_the_benchmark_succeeds(tiny_artifact, tmp_path):
    report = run_bench([tiny_artifact["gpt2"]], BenchSettings(batches=(1,), prompt_len=4, new_tokens=3, repeats=1,
                                                               bandwidth_gib=0.0625, settle_s=0.0),
                       tracker=FailingTracker(), progress=False)
    (r,) = report["records"]
    assert r["status"] == "ok" and r["decode_tokens_per_s"] > 0
    assert r["energy"]["measured"] is False
    assert "could not start" in r["energy"]["reason"] and "no RAPL" in r["energy"]["reason"]
    assert "joules_per_token" not in r["energy"]
    assert any("energy was not measured" in n for n in report["notes"])
    out = write_report(report, tmp_path / "report")
    assert "not measured" in (out / "report.md").read_text() and (out / "energy_per_token.png").stat().st_size > 0


def test_a_tracker_that_fails_to_stop_is_a_reason_not_an_error():
    class StopFails(FakeTracker):
        def stop(self):
            raise OSError("counter vanished")

    reading = Meter(StopFails()).start().stop()
    assert not reading.measured and "could not stop" in reading.reason and "counter vanished" in reading.reason


def test_a_stop_as_codecarbon_samples_counts_the_interval_once():
    """CodeCarbon's RAM figure is a constant power, so its joules must be that power times the time.

    The sampling thread fires every 0.5 s; each run stops at 1.0 s, just as it fires: measured
    together, both counted the same second (20 J of RAM for 1 s at 10 W).
    """
    pytest.importorskip("codecarbon")
    from edgelm.bench.energy import CodeCarbonTracker

    for _ in range(3):
        tracker = CodeCarbonTracker("FRA", measure_power_secs=0.5)
        tracker.start()
        time.sleep(1.0)
        reading = tracker.stop()
        if not reading.measured:
            pytest.skip(f"CodeCarbon measures nothing here: {reading.reason}")
        expected = reading.details["ram_watts"] * reading.seconds
        assert expected > 0 and 0.9 < reading.components["ram_j"] / expected < 1.1, (reading.components, expected)


def test_energy_per_token_counts_only_the_batches_measured():
    from edgelm.bench.energy import RunningEnergy

    class Counting(FakeTracker):  # 2 J more at every read
        joules = 0.0

        def read(self):
            self.joules += 2.0
            return EnergyReading(measured=True, joules=self.joules, seconds=1.0, method="fake", tool=self.tool)

    energy = RunningEnergy(Counting())
    with energy.busy(lambda: 100):  # the tracker is still starting: these tokens have no energy
        pass
    energy.start()
    assert energy.ready.wait(10)
    with energy.busy(lambda: 4):  # reads 2 J before and 4 J after
        pass
    lines = dict(line.split() for line in energy.prometheus() if line.startswith("edgelm_energy_joules_per_token"))
    assert float(lines["edgelm_energy_joules_per_token"]) == 0.5


def test_combined_repeats_report_the_ram_share_of_the_whole():
    from edgelm.bench.energy import combine

    def reading(joules, ram_j, seconds, ram_watts):
        return EnergyReading(measured=True, joules=joules, seconds=seconds, method="m",
                             components={"cpu_j": joules - ram_j, "ram_j": ram_j},
                             details={"ram_watts": ram_watts, "ram_share": ram_j / joules})

    whole = combine([reading(10.0, 5.0, 1.0, 5.0), reading(30.0, 3.0, 3.0, 1.0)])
    assert whole.joules == 40.0 and whole.components == {"cpu_j": 32.0, "ram_j": 8.0}
    assert whole.details["ram_share"] == 8.0 / 40.0 and whole.details["ram_watts"] == 8.0 / 4.0


def test_a_quantized_artifact_is_labelled_with_its_mode(tiny_artifact, tmp_path):
    from edgelm.bench.runner import Target, _plan
    from edgelm.manifest import read_manifest

    manifest = read_manifest(tiny_artifact["gpt2"])
    plain = Target(tiny_artifact["gpt2"], manifest, "plain")
    _plan(plain, BenchSettings(peers=(), **SETTINGS), tmp_path, {})
    manifest["graph"]["quantization"] = {"mode": "int8-dynamic"}
    quantized = Target(tiny_artifact["gpt2"], manifest, "quantized")
    _plan(quantized, BenchSettings(peers=(), **SETTINGS), tmp_path, {})
    assert plain.entries[0].dtype == "fp32" and quantized.entries[0].dtype == "int8-dynamic"


def test_measure_step_records_the_step_and_stops_on_failure():
    tracker = FakeTracker()
    with measure_step("quantize", tracker, bits=8) as step:
        record = step.finish(extra="kept")
    assert record["name"] == "quantize" and record["bits"] == 8 and record["extra"] == "kept"
    assert record["seconds"] >= 0 and record["peak_rss_bytes"] > 0
    assert record["energy"]["joules"] == JOULES and record["energy"]["method"] == "fake: known joules"
    with pytest.raises(ValueError):
        with measure_step("prune", tracker):
            raise ValueError("the step failed")
    assert tracker.starts == tracker.stops == 2


def test_a_steps_peak_memory_is_its_own():
    """A step's peak RSS starts at the step: what the process held before is not counted, and an
    outer step still sees the peak of a step inside it."""
    import numpy as np

    from edgelm.bench.energy import peak_rss_bytes, reset_peak_rss

    if not reset_peak_rss():
        pytest.skip("this system cannot reset the resident set's high-water mark")
    big = np.ones(400 << 20, np.uint8)  # 400 MB, touched
    held = peak_rss_bytes()
    del big
    with measure_step("outer", FakeTracker()) as outer:
        with measure_step("inner", FakeTracker()) as inner:
            transient = np.ones(200 << 20, np.uint8)
            del transient
            inner_peak = inner.finish()["peak_rss_bytes"]
        outer_peak = outer.finish()["peak_rss_bytes"]
    assert inner_peak < held - (150 << 20)  # the 400 MB before the step are not its peak
    assert outer_peak >= inner_peak


def test_cli_bench_cache_dir_holds_the_converted_peers(tiny_artifact, tmp_path):
    cache = tmp_path / "cache"
    assert main(["bench", str(tiny_artifact["gpt2"]), "--vs", "ctranslate2", "--cache-dir", str(cache),
                 "--new-tokens", "2", "--prompt-len", "4", "--repeats", "1", "--batch", "1",
                 "--bandwidth-gib", "0.0625", "--json"]) == 0
    assert cache.is_dir() and any(cache.rglob("*"))


def test_export_manifest_steps_carry_their_energy(tiny_artifact):
    for folder in tiny_artifact.values():
        step = json.loads((folder / "manifest.json").read_text())["steps"][0]
        energy = step["energy"]
        if energy["measured"]:
            assert energy["joules"] > 0 and energy["kwh"] > 0 and energy["method"] and energy["country"]
            assert energy["tool"].startswith("codecarbon") and "RAM" in energy["method"]
        else:
            assert energy["reason"]


def test_generate_json_reports_energy(tiny_artifact, capsys):
    assert main(["generate", str(tiny_artifact["gpt2"]), "Hello", "-n", "5", "--ignore-eos", "--json",
                 "--energy"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["energy"]["tokens"] == len(out["token_ids"]) == 5
    assert out["energy"]["measured"] is False or out["energy"]["joules_per_token"] > 0


def test_cli_bench_with_codecarbon_writes_the_report(tiny_artifact, tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "edgelm", "bench", str(tiny_artifact["gpt2"]), "--new-tokens", "4",
                           "--prompt-len", "4", "--repeats", "1", "--batch", "1", "--bandwidth-gib", "0.0625",
                           "--country", "fra", "--json", "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    (r,) = report["records"]
    assert r["status"] == "ok" and report["settings"]["country"] == "FRA"
    if r["energy"]["measured"]:  # CodeCarbon says how: RAPL, NVML, or TDP and load; RAM is always a model
        assert r["energy"]["country"] == "FRA" and r["energy"]["joules_per_token"] > 0
        assert any(k in r["energy"]["method"] for k in ("RAPL", "NVML", "TDP", "measured"))
    else:
        assert r["energy"]["reason"]
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)


@pytest.mark.parametrize("args,fragment", [
    (["{missing}"], "is not a folder"),
    (["{art}", "--vs", "pytorch,tensorflow"], "unknown peer 'tensorflow'"),
    (["{art}", "--country", "XYZ"], "no grid carbon intensity for country 'XYZ'"),
    (["{art}", "--country", "France"], "3-letter ISO code"),
    (["{art}", "--new-tokens", "500"], "context of 128"),
    (["{art}", "--repeats", "0"], "repeats must be at least 1"),
    (["{art}", "--threads", "100000"], "(4 per core), got 100000"),
    (["{art}", "-o", "{exists}"], "pass --force"),
    (["{art}", "--python-for", "ctranslate2"], "PEER=PYTHON"),
    (["{art}", "-o", "{art}", "--force"], "is or holds the input"),
    (["{art}", "--batch", "1,8,1"], "give each batch size once"),
])
def test_bad_input_is_one_clear_line(tiny_artifact, tmp_path, capsys, args, fragment):
    (tmp_path / "exists").mkdir()
    values = {"art": str(tiny_artifact["gpt2"]), "missing": str(tmp_path / "nope"), "exists": str(tmp_path / "exists")}
    assert main(["bench", *(a.format(**values) for a in args)]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1 and err.startswith("edgelm bench: error:")


@pytest.mark.parametrize("case", ["env-country", "unwritable-output", "proc-output"])
def test_bad_setup_is_refused_before_the_run(tiny_artifact, tmp_path, capsys, monkeypatch, case):
    import edgelm.bench.runner

    def never(*args, **kwargs):
        raise AssertionError("the benchmark ran before its setup was checked")

    monkeypatch.setattr(edgelm.bench.runner, "run_bench", never)
    (tmp_path / "file").write_text("in the way")
    args = ["bench", str(tiny_artifact["gpt2"])]
    if case == "env-country":
        monkeypatch.setenv("EDGELM_COUNTRY", "XYZ")
        fragment = "no grid carbon intensity for country 'XYZ' (EDGELM_COUNTRY)"
    elif case == "unwritable-output":
        args += ["-o", str(tmp_path / "file" / "report")]
        fragment = "is a file; choose a writable location with -o"
    else:  # a folder no one can make anything in, whatever its permission bits say (to root, all is allowed)
        args += ["-o", "/proc/edgelm-report"]
        fragment = "cannot write in /proc ("
    assert main(args) == 2
    assert fragment in capsys.readouterr().err


@pytest.mark.parametrize("command", [["generate", "{art}", "Hello", "-n", "2", "--energy"], ["serve", "{art}"]])
def test_a_bad_country_in_the_environment_is_one_sentence(tiny_artifact, monkeypatch, command):
    pytest.importorskip("codecarbon")
    monkeypatch.setenv("EDGELM_COUNTRY", "XYZ")
    args = [a.replace("{art}", str(tiny_artifact["gpt2"])) for a in command]
    r = subprocess.run([sys.executable, "-m", "edgelm", *args], capture_output=True, text=True, timeout=120)
    err = r.stderr.strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1, err
    assert "no grid carbon intensity for country 'XYZ' (EDGELM_COUNTRY)" in err


def test_bench_imports_no_torch():
    code = ("import sys, edgelm.bench, edgelm.bench.commands, edgelm.bench.runner, edgelm.bench.report; "
            "print(sorted(m for m in ('torch', 'transformers', 'codecarbon', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_metrics_expose_energy(tiny_artifact):
    from test_server import Server

    s = Server(tiny_artifact["gpt2"])
    try:
        deadline = time.time() + 60  # the tracker starts in the background (CodeCarbon probes the hardware)
        while 'measured="starting"' in s.get("/metrics")[1] and time.time() < deadline:
            time.sleep(0.3)
        status, _ = s.post({"prompt": "Hello", "max_tokens": 8, "temperature": 0})
        assert status == 200
        _, metrics = s.get("/metrics")
        assert "edgelm_energy_info{" in metrics
        if 'measured="true"' in metrics:
            values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                      if line.startswith("edgelm_energy_") and not line.startswith("edgelm_energy_info")}
            assert values["edgelm_energy_joules_total"] > 0
            assert values["edgelm_energy_decoding_joules_total"] > 0 and values["edgelm_energy_joules_per_token"] > 0
            assert 'method="CPU' in metrics and "edgelm_emissions_grams_total" in metrics
        else:
            assert 'reason="' in metrics
    finally:
        s.stop()


def test_the_read_probe_readers_read_the_whole_buffer():
    """Every reader of the probe (also runtime_bench's memory-read system) reads the whole buffer,
    whatever its length: the float sums count every element of a buffer of ones."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from edgelm.bench.machine import READ_CHUNK, read_kernels, timed_read
    from edgelm.runtime import native

    buf = np.ones(3 * READ_CHUNK + 12_345, dtype=np.float32)
    readers = read_kernels()
    assert len(readers) == (4 if native.library_path() else 2)
    with ThreadPoolExecutor(2) as pool:
        for i, reader in enumerate(readers):
            totals = reader(pool, 2, buf)
            if i != 1:  # reader 1 ORs 64-bit words
                assert sum(float(t) for t in totals) == buf.size
            assert timed_read(pool, 2, reader, buf) > 0
    if native.library_path():  # chunks t, t + 3, ... of three readers cover the buffer once
        lib = native.kernels()
        assert sum(lib.edgelm_read_chunks(buf.ctypes.data, buf.size, 1000, t, 3) for t in range(3)) == buf.size


def test_a_worker_killed_by_the_kernel_is_reported_as_out_of_memory(tiny_artifact, tmp_path):
    """SIGKILL leaves no log line; the out-of-memory killer is what sends it, so the note says so."""
    import os
    import signal

    from edgelm.bench.runner import Worker, WorkerError

    worker = Worker("edgelm", {"model": str(tiny_artifact["gpt2"]), "provider": "cpu", "threads": 1}, sys.executable,
                    dict(os.environ), tmp_path)
    os.kill(worker.proc.pid, signal.SIGKILL)
    with pytest.raises(WorkerError, match=r"killed \(SIGKILL\), most likely because the machine ran out of memory; "
                                          "lower --batch"):
        worker.run([[1, 2, 3]], 2)
    worker.close()
