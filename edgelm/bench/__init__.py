"""Benchmarks and energy: ``edgelm bench`` and the energy record of every pipeline step.

Public API (nothing here imports torch; CodeCarbon is imported when a tracker starts):
    run_bench(artifacts, BenchSettings(...), tracker=None) -> report dict
    write_report(report, folder, force=False)             -> report.json, report.md, PNG charts
    Meter(tracker).start() / .stop() -> EnergyReading      never raises for the tracker
    measure_step(name, **settings) as step; step.finish() -> the manifest's step record
    default_tracker(country)                               CodeCarbon's offline tracker, or why not
"""

from .energy import (EnergyReading, Meter, NullTracker, StepMeter, Tracker, default_tracker, measure_energy,
                     measure_step)

__all__ = ["BenchSettings", "EnergyReading", "Meter", "NullTracker", "StepMeter", "Tracker", "default_tracker",
           "measure_energy", "measure_step", "run_bench", "write_report"]


def __getattr__(name):  # the runner and the report pull in numpy and tqdm: load them on first use
    if name in ("run_bench", "BenchSettings"):
        from . import runner

        return getattr(runner, name)
    if name == "write_report":
        from .report import write_report

        return write_report
    raise AttributeError(name)
