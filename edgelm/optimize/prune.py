"""``edgelm optimize prune``: remove whole attention heads and MLP neurons, keep a smaller dense model.

Importance (Michel et al., 2019, "Are Sixteen Heads Really Better than One?"): a mask of ones
multiplies every head's output and every MLP neuron's activation; the importance of a unit is the
sum over sequences of |dLoss/dmask|, the first-order estimate of the loss change if that unit were
removed. By default every layer loses the same share (``scope="layer"``); ``scope="global"`` ranks
units across layers instead (head scores L2-normalised per layer, every layer keeps at least one
head and ``multiple`` neurons). On the trained embedded GPT-2, global ranking of MLP neurons
concentrated the cuts in a few layers and lost more than random units chosen per layer, which is
why the per-layer share is the default.

The masks are forward pre-hooks on the output projections, named from the architecture table
(edgelm/export/arch.py), so there is no per-architecture code here. Slicing the weights is also
table-driven: the QKV projection loses the removed heads' rows in each of its q, k and v blocks,
the attention output projection their inputs; the MLP's first projection loses the removed
neurons' outputs, the second their inputs. The pruned model computes exactly what the original
computes with the removed units masked to zero (a test checks it).

Optional recovery: a short distillation from the unpruned model (the same loop as distill).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._fs import atomic_output_dir, check_output
from ..bench.energy import current_step, measured_step
from ..errors import InputError
from .train import TrainConfig, batch_at, check_batch_fits, check_seed, checkpoint_folder, token_ids, train

IMPORTANCE = ("gradient", "random")
SCOPES = ("global", "layer")


@dataclass(frozen=True)
class PruneConfig:
    heads: float = 0.0  # share of attention heads to remove
    mlp: float = 0.0  # share of MLP neurons to remove
    importance: str = "gradient"
    scope: str = "layer"
    multiple: int = 8  # MLP widths are kept at multiples of this (fast kernels; 1 = exact ratio)
    batches: int = 16  # batches of the training text used to score importance (split over the rounds)
    rounds: int = 4  # gradient importance: prune in this many steps, re-scoring the survivors each time
    batch_size: int = 8
    seq_len: int = 128
    seed: int = 0

    def __post_init__(self):
        for name in ("heads", "mlp"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise InputError(f"--{name} is the share to remove, from 0 up to (not including) 1; got {value}")
        if self.heads == 0 and self.mlp == 0:
            raise InputError("nothing to prune: give --heads and/or --mlp, e.g. --heads 0.25 --mlp 0.30")
        if self.importance not in IMPORTANCE:
            raise InputError(f"--importance must be one of {', '.join(IMPORTANCE)}, got '{self.importance}'")
        if self.scope not in SCOPES:
            raise InputError(f"--scope must be one of {', '.join(SCOPES)}, got '{self.scope}'")
        if self.multiple < 1 or self.batches < 1 or self.rounds < 1:
            raise InputError("--multiple, --score-batches and --rounds must be at least 1")
        check_seed(self.seed)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def check_given(self, given) -> None:
        """Refuse settings the user set (field names in ``given``) that this ranking does not use."""
        unused = sorted({"batches": "--score-batches", "rounds": "--rounds"}[k] for k in set(given) & {"batches", "rounds"})
        if unused and self.importance == "random":
            raise InputError(f"--importance random scores nothing, so {' and '.join(unused)} would be ignored; leave "
                             "them out, or rank by gradient")


def _module(model, weight_name: str, i: int, prefix: str):
    return model.get_submodule(prefix + weight_name.format(i=i).rsplit(".", 1)[0])


class UnitMasks:
    """Multiplicative masks on every head output and MLP activation, as forward pre-hooks.

    ``heads[i]`` has one entry per head of layer i, ``neurons[i]`` one per MLP neuron; with
    ``rows=B`` they have a leading batch axis, one mask per sequence of a batch of B. They are
    leaf tensors: after a backward pass their ``.grad`` holds dLoss/dmask (per sequence with rows).
    """

    def __init__(self, model, config: dict, requires_grad: bool = False, rows: int | None = None):
        import torch

        from ..export.arch import arch_for, resolve

        spec, facts = arch_for(config), resolve(config)
        prefix = "transformer."
        lead = () if rows is None else (rows,)
        self.head_size = facts.head_size
        self.heads = [torch.ones(*lead, n, requires_grad=requires_grad) for n in facts.layer_heads]
        self.neurons = [torch.ones(*lead, m, requires_grad=requires_grad) for m in facts.layer_inner]
        self._handles = []
        for i in range(facts.num_layers):
            attn_out = _module(model, spec.attn_out.names[0], i, prefix)
            proj = _module(model, spec.proj.names[0], i, prefix)
            self._handles.append(attn_out.register_forward_pre_hook(self._scale(self.heads[i], self.head_size)))
            self._handles.append(proj.register_forward_pre_hook(self._scale(self.neurons[i], 1)))

    @staticmethod
    def _scale(mask, repeat: int):
        def hook(module, args):
            x = args[0]  # (B, S, units * repeat)
            m = mask.repeat_interleave(repeat, dim=-1) if repeat > 1 else mask
            if m.dim() == 2:  # one mask per sequence
                m = m[:, None, :]
            return (x * m.to(x.dtype),) + tuple(args[1:])
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def importance_scores(model, config: dict, ids: np.ndarray | None, cfg: PruneConfig, progress: bool = False,
                      removed: tuple[list, list] | None = None, batch_offset: int = 0, batches: int | None = None):
    """([per-layer head scores], [per-layer neuron scores]) as numpy arrays; higher = more important.

    gradient: sum over sequences of |dLoss/dmask| (Michel et al. take the absolute value per example,
    before averaging: the masks carry a batch axis so that one backward pass gives every sequence's
    gradient). ``removed`` (per-layer boolean arrays) are masked to zero while scoring and score -inf.
    random: uniform random scores (the baseline; also what the speed benchmarks use).
    """
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from ..export.arch import resolve

    facts = resolve(config)
    if cfg.importance == "random":
        rng = np.random.default_rng(cfg.seed)
        return [rng.random(n) for n in facts.layer_heads], [rng.random(m) for m in facts.layer_inner]
    tcfg = TrainConfig(steps=1, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed + 7919)
    check_batch_fits(tcfg, facts.vocab_size, teacher=False)
    masks = UnitMasks(model, config, requires_grad=True, rows=cfg.batch_size)
    dead = removed or ([np.zeros(n, bool) for n in facts.layer_heads], [np.zeros(m, bool) for m in facts.layer_inner])
    with torch.no_grad():
        for m, d in zip(masks.heads + masks.neurons, dead[0] + dead[1]):
            m[:, torch.from_numpy(d)] = 0.0
    head_acc = [np.zeros(n) for n in facts.layer_heads]
    neuron_acc = [np.zeros(m) for m in facts.layer_inner]
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)  # only the masks need gradients
    model.eval()
    try:
        for b in tqdm(range(batches or cfg.batches), desc="scoring importance", unit="batch", disable=not progress,
                      leave=False):
            batch = torch.from_numpy(batch_at(ids, batch_offset + b, tcfg))
            logits = model(input_ids=batch[:, :-1]).logits
            # summed over tokens: each sequence's gradient is its own loss's, unscaled by the batch
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1),
                                   reduction="sum")
            loss.backward()
            for acc, m in zip(head_acc + neuron_acc, masks.heads + masks.neurons):
                acc += np.abs(m.grad.numpy()).sum(axis=0)
                m.grad = None
    finally:
        masks.remove()
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)

    def normalise(acc, d, rms: bool):
        alive = acc[~d]
        scale = np.linalg.norm(alive) / (math.sqrt(len(alive)) if rms else 1.0) if len(alive) else 1.0
        return np.where(d, -np.inf, acc / (scale or 1.0))

    heads = [normalise(a, d, False) for a, d in zip(head_acc, dead[0])]  # per-layer L2 (Michel et al.)
    neurons = [normalise(a, d, True) for a, d in zip(neuron_acc, dead[1])]
    return heads, neurons


def choose_units(model, config: dict, ids: np.ndarray | None, cfg: PruneConfig, progress: bool = False):
    """(keep_heads, keep_neurons): per layer, the sorted indices of the units to keep.

    Gradient importance is iterative: ``rounds`` times, the units scored lowest are removed (masked)
    up to that round's share of the target and the survivors are scored again with them gone. On
    the trained embedded GPT-2, removing half of the MLP neurons in one shot by first-order score
    lost more than removing them at random; in 5 rounds it lost less (see DESIGN.md).
    """
    from ..export.arch import resolve

    facts = resolve(config)
    if cfg.mlp > 0 and cfg.multiple >= max(facts.layer_inner):
        raise InputError(f"--multiple {cfg.multiple} is not below the MLP width {max(facts.layer_inner)}, so widths "
                         "rounded up to it keep every neuron; choose a smaller --multiple")
    minimum = min(cfg.multiple, min(facts.layer_inner))

    def select(heads, neurons, fraction):
        return (select_units(heads, cfg.heads * fraction, cfg.scope, minimum=1),
                select_units(neurons, cfg.mlp * fraction, cfg.scope, minimum=minimum, multiple=cfg.multiple))

    if cfg.importance == "random":
        return select(*importance_scores(model, config, ids, cfg), 1.0)
    per_round = max(1, cfg.batches // cfg.rounds)
    removed = ([np.zeros(n, bool) for n in facts.layer_heads], [np.zeros(m, bool) for m in facts.layer_inner])
    for r in range(cfg.rounds):
        heads, neurons = importance_scores(model, config, ids, cfg, progress, removed, batch_offset=r * per_round,
                                           batches=per_round)
        keep_h, keep_n = select(heads, neurons, (r + 1) / cfg.rounds)
        removed = ([~np.isin(np.arange(n), k) for n, k in zip(facts.layer_heads, keep_h)],
                   [~np.isin(np.arange(m), k) for m, k in zip(facts.layer_inner, keep_n)])
    return keep_h, keep_n


def _round_up(n: int, multiple: int, limit: int) -> int:
    return min(limit, max(multiple, int(math.ceil(n / multiple)) * multiple)) if multiple > 1 else max(1, n)


def select_units(scores: list[np.ndarray], share: float, scope: str, minimum: int = 1,
                 multiple: int = 1) -> list[np.ndarray]:
    """Per layer, the sorted indices of the units to KEEP after removing ``share`` of all units."""
    sizes = [len(s) for s in scores]
    if share == 0:
        return [np.arange(n) for n in sizes]
    if scope == "layer":
        keep_counts = [_round_up(max(minimum, n - int(round(share * n))), multiple, n) for n in sizes]
    else:
        total_remove = int(round(share * sum(sizes)))
        order = sorted((float(s), i, j) for i, layer in enumerate(scores) for j, s in enumerate(layer))
        keep_counts = list(sizes)
        removed = 0
        for _, i, _j in order:
            if removed >= total_remove:
                break
            if keep_counts[i] > minimum:
                keep_counts[i] -= 1
                removed += 1
        keep_counts = [_round_up(k, multiple, n) for k, n in zip(keep_counts, sizes)]
    return [np.sort(np.argsort(-s, kind="stable")[:k]) for s, k in zip(scores, keep_counts)]


def pruned_tensors(model, config: dict, keep_heads: list[np.ndarray], keep_neurons: list[np.ndarray]):
    """(new config, {parameter name: tensor}) of the model with only the kept heads and neurons."""
    import copy

    import torch

    from ..export.arch import arch_for, resolve

    spec, facts = arch_for(config), resolve(config)
    h = facts.head_size
    state = dict(model.named_parameters())
    prefix = "transformer."
    tensors = {name: p.detach().clone() for name, p in state.items()}

    def cut(name: str, axis: int, index):
        idx = torch.as_tensor(index, dtype=torch.long)
        tensors[name] = torch.index_select(state[name].detach(), axis, idx).clone()

    for i in range(facts.num_layers):
        n_i = facts.layer_heads[i]
        cols = np.concatenate([np.arange(k * h, (k + 1) * h) for k in keep_heads[i]])
        # q, k and v each n_i * h wide: packed in one tensor (GPT-2) or three (GPT-Neo)
        packed = len(spec.qkv.names) == 1
        qkv_index = np.concatenate([cols + b * n_i * h for b in range(3)]) if packed else cols
        out_axis = 0 if spec.qkv.transpose else 1
        for lw, index, axis in ((spec.qkv, qkv_index, out_axis),
                                (spec.attn_out, cols, 1 if spec.attn_out.transpose else 0),
                                (spec.fc, keep_neurons[i], 0 if spec.fc.transpose else 1),
                                (spec.proj, keep_neurons[i], 1 if spec.proj.transpose else 0)):
            for name in lw.names:
                cut(prefix + name.format(i=i), axis, index)
        for lw, index in ((spec.qkv, qkv_index), (spec.fc, keep_neurons[i])):
            for name in lw.bias or ():
                cut(prefix + name.format(i=i), 0, index)
    new_config = copy.deepcopy(config)
    new_config["edgelm_layer_heads"] = [len(k) for k in keep_heads]
    new_config["edgelm_layer_inner"] = [len(k) for k in keep_neurons]
    return new_config, tensors


@measured_step("prune")
def prune_model(model: str, out: str | Path, train_text: str | Path, pcfg: PruneConfig, *,
                recover: TrainConfig | None = None, eval_text: str | Path | None = None,
                eval_length: int | None = None, resume: bool = False, force: bool = False, progress: bool = True,
                checkpoint_dir: str | Path | None = None, keep_checkpoints: bool = False,
                stop_after: int | None = None) -> dict:
    """Prune a model folder into ``out`` (optionally with recovery training); return the step record."""
    from ..export.arch import resolve
    from .distill import EVAL_TEXT
    from ..manifest import read_lineage
    from .evaluate import model_perplexity, read_text
    from .models import build_model, load_model, model_dir_of, parameter_bytes, save_model, tokenizer_for

    out = Path(out)
    inputs = [model, train_text, eval_text]
    check_output(out, force, inputs=inputs)
    work = checkpoint_folder(out, checkpoint_dir, resume, training=recover is not None, inputs=inputs)
    say = print if progress else (lambda *a, **k: None)
    source_dir = model_dir_of(model)
    tokenizer = tokenizer_for(source_dir)
    seq_len = recover.seq_len if recover else pcfg.seq_len
    ids = token_ids(tokenizer, read_text(train_text, "--train-text (train_text in a recipe)"), seq_len)
    eval_path = Path(eval_text) if eval_text else EVAL_TEXT
    eval_ids = token_ids(tokenizer, read_text(eval_path, "--eval-text (eval_text in a recipe)"), 2, "--eval-text")

    original, config = load_model(source_dir)
    facts = resolve(config)
    if seq_len > facts.max_positions:
        raise InputError(f"--seq-len {seq_len} is longer than the model's context ({facts.max_positions})")
    length = min(eval_length or seq_len, facts.max_positions)
    stride = max(1, length // 2)
    score = lambda m: model_perplexity(m, eval_ids, length, stride).perplexity  # noqa: E731

    keep_heads, keep_neurons = choose_units(original, config, ids, pcfg, progress)
    new_config, tensors = pruned_tensors(original, config, keep_heads, keep_neurons)
    pruned = build_model(new_config, tensors)
    del tensors
    ppl_original, ppl_pruned = score(original), score(pruned)
    say(f"pruned heads {sum(facts.layer_heads)} -> {sum(new_config['edgelm_layer_heads'])}, MLP neurons "
        f"{sum(facts.layer_inner)} -> {sum(new_config['edgelm_layer_inner'])}; held-out perplexity "
        f"{ppl_original:.2f} -> {ppl_pruned:.2f}")
    recovery = None
    if recover is not None:
        for p in original.parameters():
            p.requires_grad_(False)
        result = train(pruned, original, ids, recover, work, resume=resume, progress=progress, desc="recovering",
                       stop_after=stop_after, extra_state={"source": str(source_dir), "prune": pcfg.to_dict()})
        ppl_recovered = score(pruned)
        say(f"after {result.steps} recovery steps: held-out perplexity {ppl_recovered:.2f}")
        recovery = {**result.record(recover), "perplexity": round(ppl_recovered, 4)}
    final_ppl = recovery["perplexity"] if recovery else round(ppl_pruned, 4)
    record = {
        "name": "prune", "source": str(model), "train_text": str(train_text), **pcfg.to_dict(),
        "layer_heads": {"before": list(facts.layer_heads), "after": new_config["edgelm_layer_heads"]},
        "layer_inner": {"before": list(facts.layer_inner), "after": new_config["edgelm_layer_inner"]},
        "removed_heads": [sorted(set(range(n)) - set(k.tolist())) for n, k in zip(facts.layer_heads, keep_heads)],
        "weight_bytes": {"before": parameter_bytes(original), "after": parameter_bytes(pruned)},
        "recovery": recovery,
        "perplexity": {"text": str(eval_path), "max_length": length, "stride": stride,
                       "original": round(ppl_original, 4), "pruned": round(ppl_pruned, 4), "final": final_ppl,
                       "increase": round(final_ppl / ppl_original - 1, 4)},
    }
    with atomic_output_dir(out, force) as tmp:
        step = current_step().finish()
        record.update({k: step[k] for k in ("seconds", "peak_rss_bytes", "energy")})
        save_model(pruned, new_config, tmp, source_dir, read_lineage(source_dir) + [record])
    if recover is not None and not keep_checkpoints:
        shutil.rmtree(work, ignore_errors=True)
    return record
