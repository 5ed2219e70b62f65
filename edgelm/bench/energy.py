"""Energy of a piece of work, and the method behind the figure.

    meter = Meter(default_tracker(country="FRA"))   # CodeCarbon's offline tracker: no network, ever
    meter.start(); work(); reading = meter.stop()     # an EnergyReading, measured or not (and why)
    reading.to_dict(tokens=128)                       # joules, kWh, J/token, gCO2e per 1,000 tokens, method

    with measure_step("quantize", method="dynamic-int8") as step:   # for pipeline steps
        ...
        record = step.finish()    # {"name", ...settings, "seconds", "peak_rss_bytes", "energy": {...}}

A tracker is anything with ``start()`` and ``stop() -> EnergyReading`` (tests inject fakes that
report known joules). ``Meter`` wraps one so that nothing it does can fail the work it measures: a
tracker that cannot start or stop yields ``EnergyReading(measured=False, reason=...)``.

The method is read from CodeCarbon's own hardware objects after it has chosen them
(``tracker._hardware``: RAM, CPU with its ``_mode`` and ``_tdp``, GPU): "RAPL measured",
"NVML measured", or "estimated from TDP and CPU load (no RAPL)", with RAM's share stated, since
CodeCarbon's RAM figure is a constant power, not a measurement. Nothing here imports CodeCarbon
until a tracker starts.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import os
import resource
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol

from ..errors import InputError

JOULES_PER_KWH = 3.6e6
DEFAULT_COUNTRY = "USA"  # the grid for gCO2e when neither --country nor EDGELM_COUNTRY says otherwise
ENV_SWITCH = "EDGELM_ENERGY"  # EDGELM_ENERGY=0 switches every tracker off
TRACKING_SCOPE = "process"  # this process and its children: other users of a shared machine are not counted


@dataclass(frozen=True)
class EnergyReading:
    """Energy of one measured interval. ``measured=False`` comes with the ``reason``."""

    measured: bool
    joules: float | None = None
    seconds: float | None = None
    gco2e: float | None = None
    country: str | None = None
    method: str | None = None  # one line: how the figure was produced
    components: dict = field(default_factory=dict)  # {"cpu_j", "gpu_j", "ram_j"}
    details: dict = field(default_factory=dict)  # {"cpu": ..., "gpu": ..., "ram": ..., "scope": ...}
    tool: str | None = None
    reason: str | None = None

    @classmethod
    def not_measured(cls, reason: str, tool: str | None = None, seconds: float | None = None) -> "EnergyReading":
        return cls(measured=False, reason=reason, tool=tool, seconds=seconds)

    @property
    def kwh(self) -> float | None:
        return None if self.joules is None else self.joules / JOULES_PER_KWH

    def to_dict(self, tokens: int | None = None) -> dict:
        """The reading as a record; with ``tokens``, also joules per token and gCO2e per 1,000 tokens."""
        if not self.measured:
            out = {"measured": False, "reason": self.reason, "tool": self.tool}
            if tokens is not None:
                out["tokens"] = tokens
            return out
        out = asdict(self)
        out["kwh"] = self.kwh
        out["grid_gco2e_per_kwh"] = self.gco2e / self.kwh if self.gco2e is not None and self.kwh else None
        if tokens is not None:
            out["tokens"] = tokens
            out["joules_per_token"] = self.joules / tokens if tokens else None
            out["gco2e_per_1000_tokens"] = (self.gco2e / tokens * 1000) if tokens and self.gco2e is not None else None
        out.pop("reason")
        return out


def combine(readings: list[EnergyReading]) -> EnergyReading:
    """The sum of several readings (repeats of one measurement); not measured if any one was not."""
    if not readings:
        return EnergyReading.not_measured("nothing was measured")
    for r in readings:
        if not r.measured:
            return r
    first = readings[0]
    keys = {k for r in readings for k in r.components}
    components = {k: sum(r.components.get(k, 0.0) for r in readings) for k in sorted(keys)}
    joules, seconds = sum(r.joules for r in readings), sum(r.seconds or 0.0 for r in readings)
    details = dict(first.details)  # the method's words; the RAM figures are the whole's, not the first's
    if "ram_share" in details:
        details["ram_share"] = components.get("ram_j", 0.0) / joules if joules else None
    if "ram_watts" in details and seconds and all(r.seconds and "ram_watts" in r.details for r in readings):
        details["ram_watts"] = sum(r.details["ram_watts"] * r.seconds for r in readings) / seconds
    return EnergyReading(
        measured=True,
        joules=joules,
        seconds=seconds,
        gco2e=None if any(r.gco2e is None for r in readings) else sum(r.gco2e for r in readings),
        country=first.country,
        method=first.method if all(r.method == first.method for r in readings) else
        "; ".join(sorted({r.method for r in readings if r.method})),
        components=components,
        details=details,
        tool=first.tool,
    )


class Tracker(Protocol):
    def start(self) -> None: ...

    def stop(self) -> EnergyReading: ...


class TrackerError(RuntimeError):
    """A tracker that could not start or stop; the message is the reason shown in reports."""


class NullTracker:
    """Measures nothing, and says why (switched off, CodeCarbon missing)."""

    def __init__(self, reason: str):
        self.reason = reason
        self._started = 0.0

    def start(self) -> None:
        self._started = time.perf_counter()

    def stop(self) -> EnergyReading:
        return EnergyReading.not_measured(self.reason, seconds=time.perf_counter() - self._started)

    def read(self) -> EnergyReading:
        return self.stop()


# -- CodeCarbon ---------------------------------------------------------------------------------
class _Capture(logging.Handler):
    """Keeps CodeCarbon's recent warnings (the reason a tracker failed) instead of printing them."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: deque[str] = deque(maxlen=20)

    def emit(self, record):
        try:
            self.records.append(record.getMessage().strip().splitlines()[0][:300])
        except Exception:  # a log message must never break a measurement
            pass


_capture = _Capture()
_setup_lock = threading.Lock()


def _quiet_codecarbon() -> None:
    """Route CodeCarbon's log to the capture handler (it adds a stderr handler on every tracker)."""
    log = logging.getLogger("codecarbon")
    log.handlers = [h for h in log.handlers if not isinstance(h, logging.StreamHandler)]
    if _capture not in log.handlers:
        log.addHandler(_capture)
    log.propagate = False
    log.setLevel(logging.WARNING)


def codecarbon_version() -> str | None:
    import importlib.metadata as md

    try:
        return md.version("codecarbon")
    except md.PackageNotFoundError:
        return None


def country_codes() -> dict[str, str]:
    """{ISO3: country name} for every country CodeCarbon has a grid carbon intensity for."""
    from codecarbon.input import DataSource

    return {k: v.get("country_name", k) for k, v in DataSource().get_global_energy_mix_data().items()}


class CodeCarbonTracker:
    """CodeCarbon's ``OfflineEmissionsTracker``: no geolocation call, the grid of ``country``.

    A fresh CodeCarbon tracker per start (CodeCarbon caches its hardware probe per process, so
    only the first start is slow, about 2 s). ``scope`` "process" counts this process and its
    children (CPU time share of the TDP, RAM from their resident memory); "machine" counts the
    whole machine, every other user of it included.
    """

    def __init__(self, country: str = DEFAULT_COUNTRY, measure_power_secs: float = 1.0,
                 scope: str = TRACKING_SCOPE):
        self.country, self.measure_power_secs, self.scope = country.upper(), measure_power_secs, scope
        self._tracker = None
        self._started = 0.0
        self.tool = f"codecarbon {codecarbon_version()}"

    def start(self) -> None:
        from codecarbon import OfflineEmissionsTracker

        with _setup_lock:
            _quiet_codecarbon()
            _capture.records.clear()
            tracker = OfflineEmissionsTracker(
                country_iso_code=self.country, output_methods=[], log_level="warning",  # no files, no API
                measure_power_secs=self.measure_power_secs, tracking_mode=self.scope,
                allow_multiple_runs=True,  # no lock file in /tmp, no signal handlers taken from us
            )
            _quiet_codecarbon()
            _serialize_measurements(tracker)
            tracker.start()  # CodeCarbon swallows its own exceptions here: check that it really started
            if getattr(tracker, "_start_time", None) is None:
                raise TrackerError("CodeCarbon's tracker did not start: " + self._log_tail())
        self._tracker, self._started = tracker, time.perf_counter()

    def stop(self) -> EnergyReading:
        tracker, self._tracker = self._tracker, None
        if tracker is None:
            raise TrackerError("the tracker was stopped without having started")
        seconds = time.perf_counter() - self._started
        with _setup_lock:
            if getattr(tracker, "_scheduler", None) is not None:
                tracker._scheduler.stop()  # no sample after the end; one in flight finishes first (the lock)
            try:  # CodeCarbon skips its last measurement when the previous one is under 50 ms old:
                tracker._measure_power_and_energy()  # a short run would lose its end
            except Exception:  # noqa: BLE001 - stop() below reports what went wrong
                pass
            emissions_kg = tracker.stop()  # also swallows exceptions: None means it failed
            data = getattr(tracker, "final_emissions_data", None)
            if emissions_kg is None or data is None:
                raise TrackerError("CodeCarbon's tracker did not report: " + self._log_tail())
        return self._reading(tracker, data, seconds)

    def read(self) -> EnergyReading:
        """The energy since start, without stopping (for a server's /metrics)."""
        tracker = self._tracker
        if tracker is None:
            raise TrackerError("the tracker is not running")
        with _setup_lock:  # CodeCarbon's flush() skips measuring when the last one is under 50 ms old
            tracker._measure_power_and_energy()  # measure up to now, then CodeCarbon's own totals
            data = tracker._prepare_emissions_data()
        return self._reading(tracker, data, time.perf_counter() - self._started)

    def _log_tail(self) -> str:
        return " / ".join(_capture.records) or "no reason given in CodeCarbon's log"

    def _reading(self, tracker, data, seconds: float) -> EnergyReading:
        kwh = float(data.energy_consumed or 0.0)
        components = {"cpu_j": float(data.cpu_energy or 0.0) * JOULES_PER_KWH,
                      "gpu_j": float(data.gpu_energy or 0.0) * JOULES_PER_KWH,
                      "ram_j": float(data.ram_energy or 0.0) * JOULES_PER_KWH}
        joules = kwh * JOULES_PER_KWH
        method, details = describe_method(tracker, ram_watts=float(data.ram_power or 0.0),
                                          ram_share=components["ram_j"] / joules if joules else None)
        details["scope"] = _scope(self.scope, details)
        return EnergyReading(measured=True, joules=joules, seconds=seconds,
                             gco2e=float(data.emissions or 0.0) * 1000.0, country=data.country_iso_code or self.country,
                             method=method, components=components, details=details, tool=self.tool)


def _serialize_measurements(tracker) -> None:
    """One measurement at a time: CodeCarbon's sampling thread and a foreground one (``stop``, ``read``).

    A measurement counts the time since the previous one; two at once both count the same interval.
    A run stopped just as the sampling thread fired reported twice its energy (1.0 s idle: 20 J of
    RAM at CodeCarbon's constant 10 W). The lock makes the second wait, then count the few ms since.
    """
    measure, lock = tracker._measure_power_and_energy, threading.Lock()

    def one_at_a_time():
        with lock:
            measure()

    tracker._measure_power_and_energy = one_at_a_time  # CodeCarbon's own calls (stop, flush) included
    if getattr(tracker, "_scheduler", None) is not None:  # made in the constructor, with the method unlocked
        tracker._scheduler.function = one_at_a_time


def describe_method(tracker, ram_watts: float, ram_share: float | None) -> tuple[str, dict]:
    """How CodeCarbon produced its figure, read from the hardware objects it chose.

    CodeCarbon 3.3 keeps them in ``tracker._hardware``: a ``CPU`` whose ``_mode`` is "intel_rapl"
    (RAPL energy counters), "windows_emi", "intel_power_gadget", "cpu_load" (its TDP ``_tdp``
    times the CPU load) or "constant"; a ``GPU`` (NVML's energy counter, or AMD SMI); a ``RAM``
    that is always a power model (5 W per estimated DIMM, at least two), never a measurement.
    """
    cpu = gpu = None
    for hw in getattr(tracker, "_hardware", []):
        kind = type(hw).__name__
        if kind == "CPU":
            mode, tdp = getattr(hw, "_mode", None), getattr(hw, "_tdp", None)
            if mode == "intel_rapl":
                cpu = "RAPL measured"
            elif mode == "windows_emi":
                cpu = "RAPL measured (Windows EMI)"
            elif mode == "intel_power_gadget":
                cpu = "Intel Power Gadget measured"
            elif mode == "cpu_load":
                cpu = f"estimated from TDP ({tdp:g} W{_generic_tdp_note()}) and CPU load (no RAPL)"
            elif mode == "constant":
                cpu = f"estimated as a constant share of TDP ({tdp} W; no RAPL, no load reading)"
            else:
                cpu = f"CodeCarbon CPU mode '{mode}'"
        elif kind == "GPU":
            devices = getattr(hw, "devices", None)
            vendor = "AMD SMI" if devices is not None and "amd" in type(devices).__module__.lower() else "NVML"
            gpu = f"{vendor} measured"
        elif kind == "AppleSiliconChip":
            cpu = cpu or "powermetrics measured"
        elif kind == "Raspberry":
            cpu = cpu or "Raspberry Pi PMIC measured"
    ram = f"RAM a constant {ram_watts:g} W (CodeCarbon's model, not measured)"  # its share: details["ram_share"]
    parts = [f"CPU {cpu}" if cpu else "CPU method unknown (no CPU among CodeCarbon's hardware objects)"]
    if gpu:
        parts.append(f"GPU {gpu}")
    parts.append(ram)
    headline = "; ".join(parts)
    return headline, {"cpu": cpu, "gpu": gpu or "none", "ram": ram, "ram_watts": ram_watts, "ram_share": ram_share}


def _scope(tracking_mode: str, details: dict) -> str:
    """What the figure covers: an estimate follows this process tree; hardware counters see everyone."""
    if tracking_mode != "process":
        return "the whole machine"
    parts = []
    if (details.get("cpu") or "").startswith("estimated"):
        parts.append("CPU: this process and its children (their share of CPU time)")
    elif details.get("cpu"):
        parts.append("CPU: the whole package (hardware counter, every process on it)")
    if details.get("gpu") not in (None, "none"):
        parts.append("GPU: the whole device")
    parts.append("RAM: this process and its children")
    return "; ".join(parts)


@functools.lru_cache(maxsize=1)
def _generic_tdp_note() -> str:
    """', generic 4 W per thread' when CodeCarbon's CPU table does not know this CPU model (asked once)."""
    try:
        from codecarbon.core import cpu as cc_cpu
        from codecarbon.core.hardware_cache import get_cached_tdp

        tdp = get_cached_tdp(cc_cpu)
        if tdp._get_cpu_power_from_registry(tdp.model) is None:
            return f": '{tdp.model}' is not in CodeCarbon's table, generic {cc_cpu.DEFAULT_POWER_PER_CORE} W per thread"
    except Exception:
        pass
    return ""


def default_country() -> str:
    return (os.environ.get("EDGELM_COUNTRY") or DEFAULT_COUNTRY).strip().upper()


def check_country(code: str, source: str = "--country") -> None:
    """A clear error for a country CodeCarbon has no grid data for (when CodeCarbon is installed)."""
    import importlib.util

    if importlib.util.find_spec("codecarbon") is None:
        return
    if code.upper() not in country_codes():
        raise InputError(f"CodeCarbon has no grid carbon intensity for country '{code}' ({source}); give an "
                         "ISO 3166 alpha-3 code such as USA, FRA, DEU, GBR or IND")


def default_tracker(country: str | None = None, measure_power_secs: float = 1.0) -> Tracker:
    """CodeCarbon's offline tracker, or a NullTracker that says why energy is not measured.

    ``country`` (ISO 3166 alpha-3) picks the grid for gCO2e; default EDGELM_COUNTRY, else USA.
    A country CodeCarbon does not know is an InputError here, before any work is done.
    """
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "off", "false", "no"):
        return NullTracker(f"energy tracking is switched off ({ENV_SWITCH}={os.environ[ENV_SWITCH]})")
    import importlib.util

    if importlib.util.find_spec("codecarbon") is None:
        return NullTracker("CodeCarbon is not installed; run  pip install 'edgelm[bench]'  to measure energy")
    code = country or default_country()
    check_country(code, "country" if country else "EDGELM_COUNTRY")
    return CodeCarbonTracker(code, measure_power_secs)


class Meter:
    """Wraps a tracker so that it never fails the work it measures."""

    def __init__(self, tracker: Tracker | None = None):
        self.tracker = tracker if tracker is not None else default_tracker()
        self.failed: str | None = None
        self.reading: EnergyReading | None = None
        self._started = 0.0

    def start(self) -> "Meter":
        self.failed, self.reading = None, None
        self._started = time.perf_counter()
        try:
            self.tracker.start()
        except Exception as exc:  # noqa: BLE001 - any failure of a tracker becomes a reason
            self.failed = f"the energy tracker could not start: {_text(exc)}"
        return self

    def stop(self) -> EnergyReading:
        seconds = time.perf_counter() - self._started
        tool = getattr(self.tracker, "tool", None)
        if self.failed:
            self.reading = EnergyReading.not_measured(self.failed, tool, seconds)
        else:
            try:
                self.reading = self.tracker.stop()
            except Exception as exc:  # noqa: BLE001
                self.reading = EnergyReading.not_measured(f"the energy tracker could not stop: {_text(exc)}",
                                                          tool, seconds)
        return self.reading

    def read(self) -> EnergyReading:
        """The energy so far, for a tracker that keeps running (a server)."""
        if self.failed:
            return EnergyReading.not_measured(self.failed, getattr(self.tracker, "tool", None))
        try:
            return self.tracker.read()
        except Exception as exc:  # noqa: BLE001
            return EnergyReading.not_measured(f"the energy tracker could not be read: {_text(exc)}",
                                              getattr(self.tracker, "tool", None))


def _text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextmanager
def measure_energy(tracker: Tracker | None = None):
    """``with measure_energy() as m: work()`` then ``m.reading``; never raises for the tracker."""
    meter = Meter(tracker).start()
    try:
        yield meter
    finally:
        if meter.reading is None:
            meter.stop()


def peak_rss_bytes() -> int:
    """Peak resident set size of this program so far (Linux VmHWM; ru_maxrss elsewhere).

    Linux's ru_maxrss also keeps the parent's high-water mark from before exec; VmHWM does not.
    """
    import sys

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def reset_peak_rss() -> bool:
    """Start a new high-water mark of the resident set (Linux: VmHWM, by /proc/self/clear_refs);
    False where that cannot be done, and peak_rss_bytes() keeps the process's peak so far."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


_MEASURING: list["StepMeter"] = []  # steps being measured, outermost first (a recipe's steps nest)
_MEASURING_LOCK = threading.Lock()


class StepMeter:
    """Time, peak memory and energy of one pipeline step, as the record a manifest keeps.

    Its peak RSS is the step's own: the high-water mark is reset when it starts (an earlier step of
    the same process, or a caller's transient, is not counted); a step that starts inside another
    hands the outer one the mark so far first."""

    def __init__(self, name: str, tracker: Tracker | None = None, **settings):
        self.name, self.settings = name, settings
        self.meter = Meter(tracker)
        self.record: dict | None = None
        self._started = 0.0
        self._peak = 0  # the high-water marks of this step's intervals before the last reset
        self._own_peak = True  # False where the mark could not be reset (the process's peak, then)

    def start(self) -> "StepMeter":
        with _MEASURING_LOCK:
            now = peak_rss_bytes()
            for outer in _MEASURING:
                outer._peak = max(outer._peak, now)
            self._own_peak = reset_peak_rss()
            _MEASURING.append(self)
        self._started = time.perf_counter()
        self.meter.start()
        return self

    def finish(self, **extra) -> dict:
        """Stop measuring (once) and return the step record: name, settings, seconds, peak RSS, energy."""
        if self.record is None:
            seconds = time.perf_counter() - self._started
            reading = self.meter.stop()
            peak = self._leave()
            self.record = {"name": self.name, **self.settings, "seconds": round(seconds, 2),
                           "peak_rss_bytes": peak, "energy": reading.to_dict()}
            if not self._own_peak:
                self.record["peak_rss_scope"] = "process"  # this system cannot reset the mark
        self.record.update(extra)
        return self.record

    def _leave(self) -> int:
        """Stop counting this step among those measured; its peak RSS."""
        with _MEASURING_LOCK:
            if self in _MEASURING:
                _MEASURING.remove(self)
            return max(self._peak, peak_rss_bytes())


@contextmanager
def measure_step(name: str, tracker: Tracker | None = None, **settings):
    """``with measure_step("quantize", bits=8) as step: ...; record = step.finish()``.

    The tracker stops when the block ends even if the step fails; a tracker that fails never
    fails the step (its record says energy was not measured, and why).
    """
    step = StepMeter(name, tracker, **settings).start()
    try:
        yield step
    finally:
        if step.record is None:
            step.meter.stop()
            step._leave()


_CURRENT_STEP: contextvars.ContextVar[StepMeter | None] = contextvars.ContextVar("edgelm_step", default=None)


def measured_step(name: str, **settings):
    """Decorator: run the function inside ``measure_step(name)``; the function reads it with ``current_step()``.

    For pipeline functions whose body builds the manifest: ``"energy": current_step().finish()["energy"]``.
    """
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with measure_step(name, **settings) as step:
                token = _CURRENT_STEP.set(step)
                try:
                    return fn(*args, **kwargs)
                finally:
                    _CURRENT_STEP.reset(token)
        return wrapper
    return decorate


def current_step() -> StepMeter:
    """The step being measured by ``measured_step``; outside one, a step that says energy was not measured."""
    step = _CURRENT_STEP.get()
    if step is None:
        step = StepMeter("unmeasured", NullTracker("the step ran outside measure_step")).start()
    return step


class RunningEnergy:
    """A tracker that runs as long as a server does: total energy, and energy while decoding.

    ``busy(tokens)`` wraps each batch, so energy per token excludes idle time; the total includes it.
    Only the batches it measured count, their joules and their tokens (``tokens()`` after the
    batch): tokens generated while the tracker was still starting have no energy to share.
    The tracker starts in a background thread (CodeCarbon's first start probes the hardware for
    about 2 s) so the server answers at once.
    """

    def __init__(self, tracker: Tracker | None = None):
        self.meter = Meter(tracker if tracker is not None else default_tracker(measure_power_secs=5.0))
        self.busy_joules, self.busy_tokens = 0.0, 0
        self.ready = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> "RunningEnergy":
        def run():
            self.meter.start()
            self.ready.set()

        threading.Thread(target=run, name="edgelm-energy", daemon=True).start()
        return self

    def read(self) -> EnergyReading | None:
        return self.meter.read() if self.ready.is_set() else None

    @contextmanager
    def busy(self, tokens: Callable[[], int]):
        before = self.read()
        try:
            yield
        finally:
            after = self.read()
            if before is not None and after is not None and before.measured and after.measured:
                with self._lock:
                    self.busy_joules += max(0.0, after.joules - before.joules)
                    self.busy_tokens += tokens()

    def stop(self) -> EnergyReading | None:
        return self.meter.stop() if self.ready.is_set() else None

    def prometheus(self) -> list[str]:
        """Lines for a Prometheus /metrics page."""
        reading = self.read()
        if reading is None:
            return ["# HELP edgelm_energy_info How energy is measured (the tracker is still starting).",
                    "# TYPE edgelm_energy_info gauge", 'edgelm_energy_info{measured="starting"} 1']
        if not reading.measured:
            return ["# HELP edgelm_energy_info How energy is measured; here: not measured, and why.",
                    "# TYPE edgelm_energy_info gauge",
                    f'edgelm_energy_info{{measured="false",reason="{_label(reading.reason)}"}} 1']
        with self._lock:
            busy, tokens = self.busy_joules, self.busy_tokens
        return [
            "# HELP edgelm_energy_info How the energy figures are produced (CodeCarbon, offline).",
            "# TYPE edgelm_energy_info gauge",
            f'edgelm_energy_info{{measured="true",method="{_label(reading.method)}",country="{_label(reading.country)}",'
            f'tool="{_label(reading.tool)}",scope="{_label(reading.details.get("scope"))}"}} 1',
            "# HELP edgelm_energy_joules_total Energy of this server process since it started, idle time included.",
            "# TYPE edgelm_energy_joules_total counter",
            f"edgelm_energy_joules_total {reading.joules:.6f}",
            "# HELP edgelm_energy_decoding_joules_total Energy while batches were being decoded.",
            "# TYPE edgelm_energy_decoding_joules_total counter",
            f"edgelm_energy_decoding_joules_total {busy:.6f}",
            "# HELP edgelm_energy_joules_per_token Decoding energy per token generated in the measured batches.",
            "# TYPE edgelm_energy_joules_per_token gauge",
            f"edgelm_energy_joules_per_token {busy / tokens if tokens else 0.0:.6f}",
            "# HELP edgelm_emissions_grams_total gCO2e of the total energy on the chosen country's grid.",
            "# TYPE edgelm_emissions_grams_total counter",
            f"edgelm_emissions_grams_total {reading.gco2e or 0.0:.9f}",
        ]


def _label(value) -> str:
    """A Prometheus label value: backslash, double quote and newline escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

