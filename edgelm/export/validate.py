"""Validate an exported graph against PyTorch before anything is written to the output folder.

The schedule: a batch of two random prompts, the second 5 tokens shorter, then three decode steps,
with a total length beyond the local window of every windowed layer and a window cache small
enough that the operator evicts during the decode steps. The shorter prompt is laid out as the
graph's ``io.padding`` says (builder.py): left-padded, or, for "right", a prefix of its row:
ONNX Runtime prefills each row on its own and decodes both together, each at its own length,
while PyTorch sees the same tokens with the gap masked. PyTorch runs first and keeps only what
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
    padding: str = "left"  # "right": the shorter prompt's gap follows its tokens (masked for PyTorch)

    def feed(self, k: int):
        a, b = self.steps[k]
        return self.input_ids[:, a:b], self.position_ids[:, a:b], self.attention_mask[:, :b]


def make_schedule(facts: ModelFacts, batch: int = 2, seed: int = 0, padding: str = "left") -> Schedule:
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
        if padding == "right":
            mask[row] = np.roll(mask[row, :prompt], -pads).tolist() + [1] * (total - prompt)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    steps = [(0, prompt)] + [(t, t + 1) for t in range(prompt, total)]
    return Schedule(ids, mask, positions.astype(np.int64), steps, window + 2 if window else None, padding)


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

    Right padding: the rows this step added, for every kind, in PyTorch's positions; ONNX keeps a
    row's tokens at the front of its cache, so its rows are gathered row by row (``_ragged_rows``).
    The window caches' eviction is then checked through the logits of every step.
    """
    a, b = sched.steps[k]
    ragged = sched.padding == "right"
    everything = k in (0, len(sched.steps) - 1)
    out = {}
    for i, (kind, window) in enumerate(facts.layer_kinds):
        if cache_kinds[i] != "window" or ragged:
            sl = slice(a, b)
        else:
            resident = resident_rows(b, sched.window_capacity, window)
            first = 0 if everything else resident - 1
            sl = slice(first, resident) if from_onnx else slice(b - resident + first, b)
        for j, part in enumerate(("key", "value")):
            if ragged:  # PyTorch's rows (run row by row) are never evicted
                evicts = from_onnx and cache_kinds[i] == "window"
                rows = _ragged_rows(presents[2 * i + j], sched, a, b, window if evicts else None)
            else:
                rows = presents[2 * i + j][:, :, sl]
            # ONNX Runtime's arrays stay alive as the next step's past: views cost nothing; PyTorch's
            # cache is freed, so its rows are copied
            out[f"present.{i}.{part}"] = np.asarray(rows, dtype=np.float32) if from_onnx \
                else np.array(rows, dtype=np.float32)
    return out


def _stack_rows(rows: list[dict]) -> dict:
    """One batch's outputs from one output dict per row, each padded with zeros to the longest
    (right-padded prompts run row by row; what lies past a row's length is never read)."""
    out = {}
    for name in rows[0]:
        parts = [row[name] for row in rows]
        axis = 1 if name == "logits" else 2  # (1, S, V) or (1, N, L, H)
        longest = max(part.shape[axis] for part in parts)
        out[name] = np.concatenate([np.pad(part, [(0, longest - part.shape[axis]) if d == axis else (0, 0)
                                                  for d in range(part.ndim)]) for part in parts])
    return out


def _ragged_rows(cache: np.ndarray, sched: Schedule, a: int, b: int, window: int | None) -> np.ndarray:
    """A right-padded cache's rows for PyTorch's positions [a, b): (B, N, b - a, H).

    Row r holds its t-th token at index t (less what a window cache evicted); positions in the gap
    of a shorter prompt take index 0 (compare skips them: the mask is 0 there)."""
    out = []
    for r in range(cache.shape[0]):
        index = np.maximum(np.cumsum(sched.attention_mask[r, :b])[a:b] - 1, 0)
        if window is not None:  # the operator keeps the most recent rows at the front
            tokens = int(sched.attention_mask[r, :b].sum())
            index = np.maximum(index - (tokens - resident_rows(tokens, sched.window_capacity, window)), 0)
        out.append(cache[r][:, index])
    return np.stack(out)


class SpilledSteps:
    """Per-step output dicts kept on disk (.npz) and read back one step at a time.

    The PyTorch reference is computed before ONNX Runtime maps the weights; keeping it on disk
    instead of in memory takes it out of the peak of the ONNX Runtime phase.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.paths: list[Path | None] = []

    def append(self, step: dict) -> None:
        path = self.folder / f"step{len(self.paths)}.npz"
        np.savez(path, **step)
        self.paths.append(path)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, k: int) -> "_SpilledStep":
        if self.paths[k] is None:
            raise IndexError(f"step {k} was dropped")
        return _SpilledStep(self.paths[k])

    def __setitem__(self, k: int, value) -> None:  # compare() drops a step once used
        if value is None and self.paths[k] is not None:
            self.paths[k].unlink(missing_ok=True)
            self.paths[k] = None


class _SpilledStep:
    """One spilled step, read one output at a time as ``items()`` goes (a prompt step of GPT-Neo
    1.3B holds 0.3 GB of logits and cache rows: read whole, it sat beside ONNX Runtime's)."""

    def __init__(self, path: Path):
        self.path = path

    def items(self):
        with np.load(self.path) as data:
            for name in data.files:
                yield name, data[name]

    def __getitem__(self, name: str) -> np.ndarray:
        with np.load(self.path) as data:
            return data[name]


def torch_reference(model_dir: Path, facts: ModelFacts, sched: Schedule,
                    cache_kinds: list[str] | None = None, spill_to: Path | None = None, dtype: str = "fp32"):
    """PyTorch's outputs for the schedule; ``cache_kinds`` (per layer, from io["kv_cache"]) picks the rows kept.

    With ``spill_to`` (a folder), the steps are written there (SpilledSteps) instead of held in memory.
    ``dtype`` "fp16": PyTorch's own fp16, the yardstick of an fp16 graph (compare); outputs in fp32.
    Right padding: each row runs on its own, without the gap (in one batch, HF's GPT-Neo would count
    the gap's masked positions inside its local window), and the rows are stacked as ONNX's are.
    """
    import torch

    from .torch_model import load_torch_model

    cache_kinds = cache_kinds or default_cache_kinds(facts)
    model = load_torch_model(model_dir, facts, dtype)
    results = SpilledSteps(spill_to) if spill_to is not None else []
    rows = range(sched.input_ids.shape[0]) if sched.padding == "right" else [None]
    caches = {row: None for row in rows}

    def run(row, ids, pos, mask):
        if row is not None:  # the row's own tokens (the gap left out), batch 1
            keep = mask[row, -ids.shape[1]:].astype(bool)
            ids, pos = ids[row:row + 1, keep], pos[row:row + 1, keep]
            mask = np.ones((1, int(mask[row].sum())), dtype=np.int64)
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(pos), past_key_values=caches[row], use_cache=True)
        caches[row] = out.past_key_values
        step = {"logits": out.logits.float().numpy().copy()}
        for layer in range(facts.num_layers):
            key, value = _cache_layer(caches[row], layer)
            step[2 * layer], step[2 * layer + 1] = key.numpy(), value.numpy()
        return step

    with torch.inference_mode():
        for k in range(len(sched.steps)):
            outs = [run(row, *sched.feed(k)) for row in rows]
            outs = _stack_rows(outs) if len(outs) > 1 else outs[0]
            presents = [outs[j] for j in range(2 * facts.num_layers)]
            step = {"logits": outs["logits"]}
            step.update(_compare_rows(facts, sched, k, presents, from_onnx=False, cache_kinds=cache_kinds))
            results.append(step)
            del outs, presents
    del model, caches
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

    def run(ids, pos, mask, past):
        feed = {"input_ids": ids, "position_ids": pos, "attention_mask": mask,
                "num_logits_to_keep": np.array(ids.shape[1], dtype=np.int64)}
        feed = {name: value for name, value in feed.items() if name in wanted}
        return dict(zip(names, sess.run(None, {**feed, **past})))

    for k in range(len(sched.steps)):
        ids, pos, mask = sched.feed(k)
        if sched.padding != "right":
            outs = run(ids, pos, mask, past)
        elif k == 0:  # each row's prompt on its own: its tokens at the front of its cache rows
            outs = _stack_rows([run(ids[r:r + 1, :n], pos[r:r + 1, :n], mask[r:r + 1, :n],
                                    {name: value[r:r + 1] for name, value in past.items()})
                                for r, n in enumerate(mask.sum(axis=1))])
        else:  # every row at its own length: the mask is 1 on a row's first tokens
            lengths = mask.sum(axis=1)
            outs = run(ids, pos, (np.arange(lengths.max()) < lengths[:, None]).astype(np.int64), past)
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


FP16_FACTOR = 2.0  # an fp16 graph may differ from fp32 PyTorch by this much more than PyTorch's own fp16


@dataclass
class Differences:
    """Per output, over every step and valid position: the largest and the mean |a - b|, and the
    largest |a - b| / (atol + rtol * |a|) (above 1 fails numpy.allclose's rule)."""
    largest: dict[str, float]
    mean: dict[str, float]
    excess: dict[str, float]


COMPARE_ELEMENTS = 1 << 20  # about how many values differences() compares at a time


def differences(reference, candidate, sched: Schedule, atol: float, rtol: float = 0.0,
                drop: bool = True) -> Differences:
    """Compare ``candidate``'s steps with ``reference``'s (valid positions only). ``candidate`` may be
    a generator; with ``drop``, each reference step is dropped once compared, to free its memory."""
    largest: dict[str, float] = {}
    excess: dict[str, float] = {}
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    steps = 0
    for k, got in enumerate(candidate):
        steps = k + 1
        if k >= len(sched.steps):
            break
        ref = reference[k]
        a, b = sched.steps[k]
        for name, r in ref.items():
            c = got[name]
            if r.shape != c.shape:
                largest[name] = excess[name] = sums[name] = math.inf
                counts[name] = counts.get(name, 0) + 1
                continue
            # valid positions only: (B, S) for logits (B, S, V); (B, rows) for cache rows (B, N, rows, H)
            rows = r.shape[1] if name == "logits" else r.shape[2]
            valid = sched.attention_mask[:, b - rows : b].astype(bool) if rows <= b else None
            worst = ratio = total = 0.0
            count = 0
            for row in range(r.shape[0]):  # one batch row at a time
                rr, cc = r[row], c[row]
                if name != "logits":
                    rr, cc = rr.transpose(1, 0, 2), cc.transpose(1, 0, 2)  # (rows, N, H)
                # and a few positions at a time: small float32 temporaries (a whole row of a prompt's
                # logits is 52 MB on GPT-2's vocabulary at 260 tokens, and the rule takes four)
                chunk = max(1, COMPARE_ELEMENTS // max(1, rr[:1].size))
                for p in range(0, rr.shape[0], chunk):
                    rp, cp = rr[p:p + chunk], cc[p:p + chunk]
                    if valid is not None:
                        rp, cp = rp[valid[row, p:p + chunk]], cp[valid[row, p:p + chunk]]
                    if not rp.size:
                        continue
                    err = np.abs(rp - cp)
                    worst = max(worst, float(err.max()))
                    ratio = max(ratio, float((err / (atol + rtol * np.abs(rp))).max()))
                    total, count = total + float(err.sum(dtype=np.float64)), count + err.size
            if not np.isfinite(worst) or np.isnan(c).any():
                worst = ratio = total = math.inf
            largest[name] = max(largest.get(name, 0.0), worst)
            excess[name] = max(excess.get(name, 0.0), ratio)
            sums[name], counts[name] = sums.get(name, 0.0) + total, counts.get(name, 0) + count
        del ref, got
        if drop:
            reference[k] = None
    if steps != len(sched.steps):  # a short candidate would otherwise pass on what it did give
        raise ValidationError(f"the comparison got {steps} steps of outputs where the schedule has "
                              f"{len(sched.steps)}; nothing was validated past step {min(steps, len(sched.steps))}",
                              ["steps"])
    mean = {name: sums[name] / max(counts[name], 1) for name in sums}
    return Differences(largest, mean, excess)


def compare(reference: list[dict], candidate, sched: Schedule, atol: float, rtol: float = 0.0,
            own: Differences | None = None) -> Differences:
    """The differences per output over every step (valid positions only).

    An element fails when |onnx - torch| > atol + rtol * |torch| (numpy.allclose's rule): deep
    models with large logits accumulate rounding in proportion to the values. ``own``: PyTorch's own
    fp16 against its fp32 (fp16 graphs): an output that fails that rule still passes when its
    largest and its mean |difference| are both within FP16_FACTOR times PyTorch fp16's; an fp16
    graph cannot be closer to fp32 than fp16 arithmetic allows (PyTorch's own fp16 gpt-neo-2.7B
    differs from its fp32 by up to 1.1 in the logits). Raises once, listing every failing output.
    ``candidate`` may be a generator; each reference step is dropped from ``reference`` once
    compared, to free its memory.
    """
    d = differences(reference, candidate, sched, atol, rtol)

    def within_fp16(name: str) -> bool:  # (PyTorch fp16 overflowing to inf or NaN is no yardstick)
        return own is not None and name in own.largest and all(
            math.isfinite(theirs[name]) and ours[name] <= FP16_FACTOR * theirs[name]
            for ours, theirs in ((d.largest, own.largest), (d.mean, own.mean)))

    rule = f"atol {atol:g}" + (f" + rtol {rtol:g} x |torch|" if rtol else "")
    if own is not None:
        rule += f", or within {FP16_FACTOR:g}x PyTorch fp16's own largest and mean |diff|"
    failures = [f"{name}: max |diff| {d.largest[name]:.3g} exceeds {rule} ({value:.2f}x the allowance"
                + (f"; PyTorch fp16: {own.largest[name]:.3g}" if own is not None and name in own.largest else "") + ")"
                for name, value in d.excess.items() if not value <= 1.0 and not within_fp16(name)]
    if failures:
        raise ValidationError(
            f"the ONNX graph disagrees with PyTorch on {len(failures)} output(s) ({rule}): "
            + "; ".join(failures[:8]) + (" ..." if len(failures) > 8 else ""),
            failures,
        )
    return d
