"""The training loop that distillation and pruning recovery share: a student learns from a teacher.

Loss per token: ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross_entropy(student, next token)``,
where ``_T`` is the softmax at temperature T (Hinton et al.; the T^2 keeps the gradient scale of the
soft term independent of T). The default T = 1 lets both terms share one vocabulary softmax.

Reproducible and resumable by construction:
- batch ``k`` is drawn from a generator seeded with (seed, k), so the data order does not depend on
  where a run was interrupted;
- a checkpoint holds the student, the optimizer, the torch RNG state, the step, the time spent
  and the loss history, written atomically (temporary file, then rename);
- a resumed run therefore continues the exact sequence of updates: it ends with the same weights as
  a run that was never interrupted (a test checks this bit for bit).

With a time budget (``minutes``) the learning-rate schedule runs on time instead of steps: its
progress is the share of the budget spent (saved in the checkpoint, so a resumed run continues
where it stopped). A busy machine then trains fewer steps, never a schedule cut short or overrun.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .._fs import input_within, within
from ..errors import InputError, is_whole

STATE_FILE = "state.pt"


@dataclass
class TrainConfig:
    steps: int | None = None  # exact number of optimizer steps, or
    minutes: float | None = None  # a wall-clock budget for the training steps
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    temperature: float = 1.0
    alpha: float = 0.5  # weight of the soft (KL) term; 1 - alpha goes to the next-token loss
    checkpoint_every: int = 100
    seed: int = 0
    log_every: int = 10
    precision: str = "auto"  # fp32, bf16 (autocast matrix products) or auto (bf16 where the CPU has it)
    # fields that must match between a checkpoint and the run resuming it
    _RESUME_KEYS: tuple = field(default=("batch_size", "seq_len", "lr", "min_lr_ratio", "warmup_steps",
                                         "weight_decay", "grad_clip", "temperature", "alpha", "seed", "precision"),
                                 repr=False)

    def __post_init__(self):
        if (self.steps is None) == (self.minutes is None):
            raise InputError("give either --steps or --minutes (exactly one) for the training length")
        if self.steps is not None and self.steps < 1:
            raise InputError(f"--steps must be at least 1, got {self.steps}")
        if self.minutes is not None and not 0 < self.minutes < math.inf:
            raise InputError(f"--minutes must be a positive number, got {self.minutes}")
        if self.batch_size < 1 or self.seq_len < 2:
            raise InputError("the batch size must be at least 1 and the sequence length at least 2 tokens")
        if not 0.0 <= self.alpha <= 1.0:
            raise InputError(f"--alpha must be between 0 and 1, got {self.alpha}")
        if not 0 < self.temperature < math.inf:
            raise InputError(f"--temperature must be a positive number, got {self.temperature}")
        if not 0 < self.lr < math.inf:
            raise InputError(f"--lr must be a positive number, got {self.lr}")
        check_seed(self.seed)
        if self.precision not in ("fp32", "bf16", "auto"):
            raise InputError(f"--precision must be fp32, bf16 or auto, got '{self.precision}'")
        if self.checkpoint_every < 1:
            raise InputError(f"--checkpoint-every must be at least 1, got {self.checkpoint_every}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("_RESUME_KEYS")
        return d


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float  # training time of this and earlier (resumed) sessions
    resumed_from: int | None
    history: list[dict]  # [{step, loss, soft, ce, lr}] every log_every steps

    def record(self, cfg: "TrainConfig") -> dict:
        """The training part of a step record: the settings and what the run did."""
        return {**cfg.to_dict(), "steps_done": self.steps, "tokens": self.tokens, "train_seconds": self.seconds,
                "resumed_from": self.resumed_from, "precision_used": resolved_precision(cfg),
                "tokens_per_s": round(self.tokens / self.seconds, 1) if self.seconds else None,
                "first_loss": self.first_loss, "last_loss": self.last_loss, "history": self.history}

    @property
    def first_loss(self) -> float | None:
        return self.history[0]["loss"] if self.history else None

    @property
    def last_loss(self) -> float | None:
        return self.history[-1]["loss"] if self.history else None


def check_seed(seed) -> None:
    if not is_whole(seed, 0):
        raise InputError(f"--seed must be a whole number >= 0, got {seed!r}")


class Interrupted(InputError):
    """Training stopped by the user; the checkpoint to resume from was written."""

    exit_code = 130


# TrainConfig's fields that only training reads: a prune step without recovery has no use for them
# (the batch size, sequence length and seed also shape its importance scores)
TRAINING_ONLY = ("lr", "temperature", "alpha", "precision", "checkpoint_every")


def check_batch_fits(cfg: TrainConfig, vocab: int, teacher: bool) -> None:
    """Refuse a batch whose logits alone cannot fit in the memory free now, in one sentence, instead of
    running until the system kills the process. A step holds the student's logits, their gradient and
    their log-softmax, and with a teacher its logits and soft targets too: at least 3 (5) float32
    tensors of batch x sequence x vocabulary (the estimate leaves out the activations: a floor)."""
    need = cfg.batch_size * cfg.seq_len * vocab * 4 * (5 if teacher else 3)
    free = available_memory()
    if free is not None and need > free:
        raise InputError(f"a batch of {cfg.batch_size} x {cfg.seq_len} tokens needs at least {need / 1e9:.1f} GB "
                         f"for its logits over the {vocab}-token vocabulary, more than the {free / 1e9:.1f} GB "
                         "of memory free; lower --batch-size or --seq-len")


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux's MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def checkpoint_folder(out: Path, checkpoint_dir: str | Path | None, resume: bool, training: bool = True,
                      inputs=()) -> Path:
    """Where a step's checkpoints go (default OUT.ckpt beside the output); refuses to start over on top of
    an earlier run's checkpoint unless asked to resume it.

    The folder is deleted once the output is written, so it must be new, empty or a checkpoint folder
    (it holds state.pt), and hold none of ``inputs`` (the models and texts the step reads).
    """
    work = Path(checkpoint_dir) if checkpoint_dir else out.parent / f"{out.name}.ckpt"
    if within(work, out) or within(out, work):
        raise InputError(f"the checkpoint folder {work} and the output {out} must be apart (neither inside the "
                         "other): the checkpoints are deleted once the output is written; choose another --checkpoint-dir")
    given = input_within(work, inputs)
    if given is not None:
        raise InputError(f"the checkpoint folder {work} is or holds the input {given}, and it is deleted once "
                         "the output is written; choose another --checkpoint-dir")
    # a checkpoint's own files: state.pt, and state.pt.tmp-PID from a run killed while writing its first one
    if work.is_dir() and not (work / STATE_FILE).is_file() and any(
            not p.name.startswith(STATE_FILE) for p in work.iterdir()):
        raise InputError(f"{work} holds files but no checkpoint ({STATE_FILE}), and the checkpoint folder is deleted "
                         "once the output is written; choose a new or empty --checkpoint-dir")
    if work.exists() and not work.is_dir():
        raise InputError(f"{work} is a file; choose a new or empty folder with --checkpoint-dir")
    if training and (work / STATE_FILE).is_file() and not resume:
        raise InputError(f"{work} holds a checkpoint of an earlier run; pass --resume to continue it, or delete "
                         "that folder to start over")
    return work


def token_ids(tokenizer, text: str, seq_len: int, flag: str = "--train-text") -> np.ndarray:
    """The text's token ids; ``flag`` names the text given (--train-text, --eval-text) when it is too short."""
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    if len(ids) < seq_len + 1:
        if flag != "--train-text":
            raise InputError(f"the {flag} text has {len(ids)} tokens, fewer than the {seq_len + 1} a score needs; "
                             f"pass a longer {flag}")
        raise InputError(f"the training text has {len(ids)} tokens, fewer than one sequence of {seq_len}; "
                         "pass a longer --train-text or a smaller --seq-len")
    return ids


def batch_at(ids: np.ndarray, step: int, cfg: TrainConfig) -> np.ndarray:
    """Batch ``step``: random windows of seq_len + 1 tokens (inputs and the next-token targets), the same
    for a given (seed, step) every time."""
    rng = np.random.default_rng([cfg.seed, step])
    starts = rng.integers(0, len(ids) - cfg.seq_len, size=cfg.batch_size)
    return np.stack([ids[s:s + cfg.seq_len + 1] for s in starts])


def lr_at(step: int, total: int | None, cfg: TrainConfig, spent: float = 0.0) -> float:
    """Linear warm-up over warmup_steps, then cosine decay to lr * min_lr_ratio at step ``total``
    (or, with a time budget, when the share ``spent`` of it reaches 1)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if total is None:
        progress = min(1.0, spent)
    else:
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def distillation_loss(student_logits, teacher_logits, targets, cfg: TrainConfig):
    """(loss, soft, ce) over every position; logits (B, S, V), targets (B, S).

    ``soft`` is the teacher term: T^2 * KL at temperature T, or, at T = 1, the cross-entropy against
    the teacher's distribution (KL plus the teacher's entropy, a constant). At T = 1 both terms are
    one cross-entropy against the mixed target ``alpha * p_teacher + (1 - alpha) * one_hot``, a single
    softmax over the vocabulary instead of three (the vocabulary softmax dominates a small model's step).
    """
    import torch
    import torch.nn.functional as F

    v = student_logits.shape[-1]
    s = student_logits.reshape(-1, v).float()
    y = targets.reshape(-1)
    if teacher_logits is None or cfg.alpha == 0.0:
        ce = F.cross_entropy(s, y)
        return ce, ce.new_zeros(()), ce
    t = teacher_logits.reshape(-1, v).float()
    if cfg.temperature == 1.0:
        with torch.no_grad():
            mixed = torch.softmax(t, dim=-1).mul_(cfg.alpha)
            mixed[torch.arange(len(y)), y] += 1.0 - cfg.alpha
            ce = (torch.logsumexp(s, dim=-1) - s.gather(1, y[:, None])[:, 0]).mean()
        loss = F.cross_entropy(s, mixed)
        soft = (loss.detach() - (1 - cfg.alpha) * ce) / cfg.alpha
        return loss, soft, ce
    temp = cfg.temperature
    ce = F.cross_entropy(s, y)
    kl = F.kl_div(F.log_softmax(s / temp, dim=-1), F.log_softmax(t / temp, dim=-1), log_target=True,
                  reduction="batchmean") * temp * temp
    return cfg.alpha * kl + (1 - cfg.alpha) * ce, kl, ce


def autocast(cfg: TrainConfig):
    """bfloat16 matrix products where the CPU has native bf16 (fp32 weights and optimizer, as usual)."""
    import contextlib

    import torch

    if resolved_precision(cfg) == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolved_precision(cfg: TrainConfig) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    import torch

    try:
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    except (AttributeError, RuntimeError):
        return "fp32"


def _save_state(path: Path, state: dict) -> None:
    import torch

    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(work_dir: Path) -> dict | None:
    import torch

    path = Path(work_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise InputError(f"the checkpoint {path} cannot be read ({str(exc)[:100]}); delete {work_dir} and "
                         "start without --resume") from None


def train(student, teacher, ids: np.ndarray, cfg: TrainConfig, work_dir: Path, resume: bool = False,
          progress: bool = True, desc: str = "training", stop_after: int | None = None,
          extra_state: dict | None = None) -> TrainResult:
    """Train ``student`` in place on ``ids`` (optionally from ``teacher``'s soft targets).

    ``work_dir`` holds the checkpoint. ``stop_after`` ends the run after that many steps as if it had
    been interrupted (the tests use it). ``extra_state`` is saved in the checkpoint and must match on
    resume (for example which teacher layers the student came from).
    """
    import torch
    from tqdm import tqdm

    work_dir = Path(work_dir)
    check_batch_fits(cfg, int(student.config.vocab_size), teacher is not None)
    state = load_state(work_dir) if resume else None
    if resume and state is None:  # before the folder is made: a failed resume leaves nothing behind
        raise InputError(f"--resume was given but {work_dir} holds no checkpoint; run without --resume")
    work_dir.mkdir(parents=True, exist_ok=True)
    params = [p for p in student.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    step, total, elapsed, history, resumed_from = 0, cfg.steps, 0.0, [], None
    if resume:
        saved = state["config"]
        changed = [k for k in cfg._RESUME_KEYS if saved.get(k) != getattr(cfg, k)]
        if (extra_state or {}) != state.get("extra", {}):
            changed.append("model or student layers")
        if changed:
            raise InputError(f"the checkpoint in {work_dir} was made with other settings ({', '.join(changed)}); "
                             "resume with the same settings, or start over without --resume")
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        step, elapsed, history = state["step"], state["elapsed"], state["history"]
        total = cfg.steps
        resumed_from = step
    else:
        torch.manual_seed(cfg.seed)

    def checkpoint():
        _save_state(work_dir / STATE_FILE, {
            "step": step, "elapsed": elapsed, "history": history,
            "config": cfg.to_dict(), "extra": extra_state or {}, "rng": torch.get_rng_state(),
            "student": student.state_dict(), "optimizer": optimizer.state_dict(),
        })

    budget = None if cfg.minutes is None else cfg.minutes * 60.0
    student.train()
    if teacher is not None:
        teacher.eval()
    bar = tqdm(total=total if budget is None else round(budget), initial=step if budget is None else round(elapsed),
               desc=desc, unit="step" if budget is None else "s", disable=not progress, dynamic_ncols=True)
    session_start, session_steps = time.perf_counter(), 0
    loss_sum = kl_sum = ce_sum = 0.0
    window = 0
    try:
        while True:
            if total is not None and step >= total:
                break
            if budget is not None and elapsed >= budget:
                break
            if stop_after is not None and session_steps >= stop_after:
                checkpoint()
                raise Interrupted(f"stopped after {step} steps; checkpoint in {work_dir}")
            t0 = time.perf_counter()
            batch = torch.from_numpy(batch_at(ids, step, cfg))
            inputs, targets = batch[:, :-1], batch[:, 1:]
            teacher_logits = None
            if teacher is not None and cfg.alpha > 0:
                with torch.inference_mode(), autocast(cfg):
                    teacher_logits = teacher(input_ids=inputs).logits
                teacher_logits = teacher_logits.clone()  # leave inference mode for autograd
            lr = lr_at(step, total, cfg, spent=0.0 if budget is None else elapsed / budget)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast(cfg):
                logits = student(input_ids=inputs).logits
            loss, kl, ce = distillation_loss(logits, teacher_logits, targets, cfg)
            if not math.isfinite(loss.item()):  # the weights would be NaN from here on: stop before the step
                raise InputError(f"training diverged at step {step + 1} (the loss is {loss.item()}); run again with "
                                 f"a lower --lr than {cfg.lr:g}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            del logits, teacher_logits
            step += 1
            session_steps += 1
            elapsed += time.perf_counter() - t0
            loss_sum, kl_sum, ce_sum, window = loss_sum + loss.item(), kl_sum + kl.item(), ce_sum + ce.item(), window + 1
            if step % cfg.log_every == 0 or step == total:
                history.append({"step": step, "loss": round(loss_sum / window, 5), "soft": round(kl_sum / window, 5),
                                "ce": round(ce_sum / window, 5), "lr": lr})
                loss_sum = kl_sum = ce_sum = 0.0
                window = 0
            tokens_per_s = session_steps * cfg.batch_size * cfg.seq_len / (time.perf_counter() - session_start)
            bar.set_postfix(step=step, loss=f"{loss.item():.3f}", ce=f"{ce.item():.3f}", tok_s=f"{tokens_per_s:.0f}")
            bar.update(1 if budget is None else round(elapsed) - bar.n)
            if step % cfg.checkpoint_every == 0:
                checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        bar.close()
        raise Interrupted(f"interrupted at step {step}; the checkpoint is in {work_dir}: run the same command "
                          "with --resume to continue") from None
    bar.close()
    if window:
        history.append({"step": step, "loss": round(loss_sum / window, 5), "soft": round(kl_sum / window, 5),
                        "ce": round(ce_sum / window, 5), "lr": lr})
    checkpoint()
    student.eval()
    return TrainResult(steps=step, tokens=step * cfg.batch_size * cfg.seq_len, seconds=round(elapsed, 2),
                       resumed_from=resumed_from, history=history)
