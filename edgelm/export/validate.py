"""Validate an exported graph against PyTorch before anything is written to the output folder.

The schedule: a batch of two random prompts (the second left-padded), then three decode steps,
with a total length beyond the local window of every windowed layer and a window cache small
enough that the operator evicts during the decode steps. PyTorch runs first and keeps only what
is compared (the logits of every step, the new cache rows of every step); its model is freed
before ONNX Runtime loads the graph, so the two never hold the weights at the same time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ValidationError
from ..runtime import native
from .arch import ModelFacts
from .checkpoint import release_memory

DEFAULT_ATOL = {"fp32": 2e-3, "fp16": 5e-2}
DEFAULT_RTOL = {"fp32": 1e-3, "fp16": 1e-2}
DECODE_STEPS = 3


@dataclass
class Schedule:
    input_ids: np.ndarray  # (B, T_final)
    attention_mask: np.ndarray  # (B, T_final)
    position_ids: np.ndarray  # (B, T_final)
    steps: list[tuple[int, int]]  # [start, end) of the new tokens at each step
    window_capacity: int | None

    def feed(self, k: int):
        a, b = self.steps[k]
        return self.input_ids[:, a:b], self.position_ids[:, a:b], self.attention_mask[:, :b]


def make_schedule(facts: ModelFacts, batch: int = 2, seed: int = 0) -> Schedule:
    windows = [w for kind, w in facts.layer_kinds if kind == "local"]
    window = max(windows, default=0)
    prompt = window + 2 if window else 24
    total = prompt + DECODE_STEPS
    if total > facts.max_positions:
        prompt = facts.max_positions - DECODE_STEPS
        total = facts.max_positions
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, facts.vocab_size, size=(batch, total), dtype=np.int64)
    mask = np.ones((batch, total), dtype=np.int64)
    pads = min(5, prompt // 3)
    for row in range(1, batch):
        mask[row, :pads] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    steps = [(0, prompt)] + [(t, t + 1) for t in range(prompt, total)]
    return Schedule(ids, mask, positions.astype(np.int64), steps, window + 2 if window else None)


def resident_rows(total: int, capacity: int, window: int) -> int:
    """How many rows a sliding_window_cache of ``capacity`` holds after ``total`` tokens."""
    if total <= capacity:
        return total
    g = capacity - window + 1
    return total - g * math.ceil((total - capacity) / g)


def default_cache_kinds(facts: ModelFacts) -> list[str]:
    """The builder's cache kind per layer: "full" for global layers, "window" for local ones."""
    return ["full" if kind == "global" else "window" for kind, _ in facts.layer_kinds]


def _compare_rows(facts: ModelFacts, sched: Schedule, k: int, presents: list[np.ndarray], from_onnx: bool,
                  cache_kinds: list[str]):
    """The cache rows to compare after step k, aligned by position: {name: (B, N, rows, H)}.

    "full" and "concat" caches: the rows this step added (positions a..b-1). "window" caches: after
    the prompt and after the last step, every resident row (positions b-L..b-1: ONNX keeps them at
    rows [0, L), PyTorch at the end of its full cache), which checks the operator's eviction; in
    between, the newest row only (holding every resident row of every step would cost a model's
    worth of memory on GPT-Neo 2.7B).
    """
    a, b = sched.steps[k]
    everything = k in (0, len(sched.steps) - 1)
    out = {}
    for i, (kind, window) in enumerate(facts.layer_kinds):
        if cache_kinds[i] != "window":
            sl = slice(a, b)
        else:
            resident = resident_rows(b, sched.window_capacity, window)
            first = 0 if everything else resident - 1
            sl = slice(first, resident) if from_onnx else slice(b - resident + first, b)
        for j, part in enumerate(("key", "value")):
            rows = presents[2 * i + j][:, :, sl]
            # ONNX Runtime's arrays stay alive as the next step's past: views cost nothing; PyTorch's
            # cache is freed, so its rows are copied
            out[f"present.{i}.{part}"] = np.asarray(rows, dtype=np.float32) if from_onnx \
                else np.array(rows, dtype=np.float32)
    return out


class SpilledSteps:
    """Per-step output dicts kept on disk (.npz) and read back one step at a time.

    The PyTorch reference is computed before ONNX Runtime maps the weights; keeping it on disk
    instead of in memory takes it out of the peak of the ONNX Runtime phase.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.paths: list[Path | None] = []

    def append(self, step: dict) -> None:
        path = self.folder / f"step{len(self.paths)}.npz"
        np.savez(path, **step)
        self.paths.append(path)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, k: int) -> dict:
        with np.load(self.paths[k]) as data:
            return {name: data[name] for name in data.files}

    def __setitem__(self, k: int, value) -> None:  # compare() drops a step once used
        if value is None and self.paths[k] is not None:
            self.paths[k].unlink(missing_ok=True)
            self.paths[k] = None


def torch_reference(model_dir: Path, facts: ModelFacts, sched: Schedule,
                    cache_kinds: list[str] | None = None, spill_to: Path | None = None):
    """PyTorch's outputs for the schedule; ``cache_kinds`` (per layer, from io["kv_cache"]) picks the rows kept.

    With ``spill_to`` (a folder), the steps are written there (SpilledSteps) instead of held in memory.
    """
    import torch

    from .torch_model import load_torch_model

    cache_kinds = cache_kinds or default_cache_kinds(facts)
    model = load_torch_model(model_dir, facts)
    results = SpilledSteps(spill_to) if spill_to is not None else []
    cache = None
    with torch.inference_mode():
        for k in range(len(sched.steps)):
            ids, pos, mask = (torch.from_numpy(x) for x in sched.feed(k))
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            presents = []
            for layer in range(facts.num_layers):
                key, value = _cache_layer(cache, layer)
                presents += [key.numpy(), value.numpy()]
            step = {"logits": out.logits.float().numpy().copy()}
            step.update(_compare_rows(facts, sched, k, presents, from_onnx=False, cache_kinds=cache_kinds))
            results.append(step)
            del out, presents
    del model, cache
    release_memory()
    return results


def _cache_layer(cache, layer: int):
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache[layer]


class NotRunnable(Exception):
    """ONNX Runtime on this machine cannot run the graph (e.g. no fp16 kernels on this CPU)."""


def onnx_outputs(onnx_path: Path, facts: ModelFacts, sched: Schedule, io: dict):
    """Run the schedule through ONNX Runtime, feeding each step's presents back as the next past.

    A generator of one dict per step: ``compare`` checks each step as it comes, so only one step
    of ONNX outputs is alive at a time.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # Prepacking would hold a second copy of every MatMul weight while the session loads.
    opts.add_session_config_entry("session.disable_prepacking", "1")
    opts.enable_cpu_mem_arena = False  # give activations back after each step, not at session end
    if native.library_path():  # packed-layout graphs run edgelm's own operator
        native.register(opts)
    try:
        sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        if "NOT_IMPLEMENTED" in str(exc) or "Could not find an implementation" in str(exc):
            first = str(exc).split("\n")[0][:300]
            raise NotRunnable(f"ONNX Runtime's CPU provider cannot run this graph here ({first})") from None
        raise
    np_kv = np.float16 if io["kv_dtype"] == "float16" else np.float32
    batch = sched.input_ids.shape[0]
    wanted = {i["name"] for i in io["inputs"]}
    past = {}
    for entry in io["kv_cache"]:
        length = sched.window_capacity if entry["kind"] == "window" else 0
        # per-layer heads (pruned models); manifests written before the key had one count for all layers
        shape = (batch, entry.get("heads", facts.num_heads), length, entry.get("head_size", facts.head_size))
        past[entry["past_key"]] = np.zeros(shape, np_kv)
        past[entry["past_value"]] = np.zeros(shape, np_kv)
    cache_kinds = [entry["kind"] for entry in io["kv_cache"]]
    names = [o.name for o in sess.get_outputs()]
    for k in range(len(sched.steps)):
        ids, pos, mask = sched.feed(k)
        feed = {"input_ids": ids, "position_ids": pos, "attention_mask": mask,
                "num_logits_to_keep": np.array(ids.shape[1], dtype=np.int64)}
        feed = {name: value for name, value in feed.items() if name in wanted}
        feed.update(past)
        outs = dict(zip(names, sess.run(None, feed)))
        presents = []
        for entry in io["kv_cache"]:
            past[entry["past_key"]] = outs[entry["present_key"]]
            past[entry["past_value"]] = outs[entry["present_value"]]
            presents += [outs[entry["present_key"]], outs[entry["present_value"]]]
        step = {"logits": np.asarray(outs["logits"], dtype=np.float32)}  # no copy: logits are fp32
        step.update(_compare_rows(facts, sched, k, presents, from_onnx=True, cache_kinds=cache_kinds))
        del outs, presents
        yield step
    del sess, past
    release_memory()


def compare(reference: list[dict], candidate, sched: Schedule, atol: float, rtol: float = 0.0) -> dict:
    """Max |difference| per output over every step (valid positions only).

    An element fails when |onnx - torch| > atol + rtol * |torch| (numpy.allclose's rule): deep
    models with large logits accumulate rounding in proportion to the values. Raises once, listing
    every failing output; returns {output: max |difference|}. ``candidate`` may be a generator;
    each reference step is dropped from ``reference`` once compared, to free its memory.
    """
    diffs: dict[str, float] = {}
    excess: dict[str, float] = {}  # max of |diff| / (atol + rtol * |ref|): > 1 fails
    for k, got in enumerate(candidate):
        ref, reference[k] = reference[k], None
        a, b = sched.steps[k]
        for name, r in ref.items():
            c = got[name]
            if r.shape != c.shape:
                diffs[name] = excess[name] = math.inf
                continue
            # valid positions only: (B, S) for logits (B, S, V); (B, rows) for cache rows (B, N, rows, H)
            rows = r.shape[1] if name == "logits" else r.shape[2]
            valid = sched.attention_mask[:, b - rows : b].astype(bool) if rows <= b else None
            worst = ratio = 0.0
            for row in range(r.shape[0]):  # one batch row at a time: small temporaries, float32
                rr, cc = r[row], c[row]
                if name != "logits":
                    rr, cc = rr.transpose(1, 0, 2), cc.transpose(1, 0, 2)  # (rows, N, H)
                if valid is not None:
                    rr, cc = rr[valid[row]], cc[valid[row]]
                if not rr.size:
                    continue
                err = np.abs(rr - cc)
                worst = max(worst, float(err.max()))
                ratio = max(ratio, float((err / (atol + rtol * np.abs(rr))).max()))
            if not np.isfinite(worst) or np.isnan(c).any():
                worst = ratio = math.inf
            diffs[name] = max(diffs.get(name, 0.0), worst)
            excess[name] = max(excess.get(name, 0.0), ratio)
        del ref, got
    rule = f"atol {atol:g}" + (f" + rtol {rtol:g} x |torch|" if rtol else "")
    failures = [f"{name}: max |diff| {diffs[name]:.3g} exceeds {rule} ({value:.2f}x the allowance)"
                for name, value in excess.items() if not value <= 1.0]
    if failures:
        raise ValidationError(
            f"the ONNX graph disagrees with PyTorch on {len(failures)} output(s) ({rule}): "
            + "; ".join(failures[:8]) + (" ..." if len(failures) > 8 else ""),
            failures,
        )
    return diffs
