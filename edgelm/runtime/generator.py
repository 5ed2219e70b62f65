"""The generation loop: one ONNX Runtime call per step, IO binding, a cache that never moves.

    gen = Generator.load("out/gpt2")                         # artifact folder
    gen.generate("Once upon a time", SamplingConfig(max_new_tokens=32))
    for event in gen.stream("Once upon a time"): print(event.text, end="")
    gen.generate(["First prompt", "A second, longer prompt"])   # a batch

Batches are laid out as the artifact's manifest says (io.padding, export/builder.py): left-padded,
or, for right-padded graphs (fp16, for CUDA), each row's tokens at the front of its cache rows,
prompts of different lengths prefilled one row at a time and decoded together at their own
lengths. Every row stops on its own (EOS, a stop string, or its token budget) and the batch ends
when every row has.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import InputError
from .artifact import Artifact, load_artifact
from .kv import KVCache
from .native import SCREEN_INPUT
from .options import CONTEXT_POLICIES
from .sampling import SamplingConfig, next_tokens, sampling_settings


# The most rows a screened step takes (benchmarks/screen_ab.py, GPT-2 124M and GPT-Neo 125M shapes, AVX-512):
# the screen against the full head at batch 1 1.28x and 1.21x, at 4 rows 1.17x and 1.18x, at 8 rows 1.02x and 0.92x.
SCREEN_MAX_ROWS = 4


@dataclass
class GenerationResult:
    prompt: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "eos" | "stop" | "length"
    timings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "prompt_ids": self.prompt_ids, "token_ids": self.token_ids,
                "text": self.text, "finish_reason": self.finish_reason, "timings": self.timings}


@dataclass
class StreamEvent:
    row: int
    token_id: int
    text: str  # the new text this token completed (may be "" while a UTF-8 character is incomplete)
    finished: str | None = None  # finish reason once the row is done


class Row:
    """Per-row state: generated ids, the text emitted so far, stop strings, finish reason."""

    def __init__(self, tokenizer, prompt: str, prompt_ids: list[int], cfg: SamplingConfig, eos: frozenset[int],
                 live_text: bool = True):
        self.tokenizer, self.prompt, self.prompt_ids, self.cfg, self.eos = tokenizer, prompt, prompt_ids, cfg, eos
        # False: nobody reads the text before the row ends (generate() without stop strings), so no
        # step decodes; `final_text` decodes the ids once
        self.live_text = live_text or bool(cfg.stop)
        self.ids: list[int] = []
        self.text = ""
        self.finished: str | None = None
        self.cancelled = False  # set by a server when the client goes away
        self.timings: dict = {}  # the batch's timings, filled when the batch ends
        self.rng = np.random.default_rng(cfg.seed)
        self._clean_at, self._clean_text = 0, ""  # ids[:_clean_at] decode to _clean_text, a whole UTF-8 text

    def push(self, token: int) -> str:
        """Add a token; return the text that became final; set ``finished`` when the row is done.

        Text is held back while it ends in an incomplete UTF-8 character or in what could be the
        start of a stop string, so a stream never shows text that a stop string later removes.
        """
        if self.cfg.stop_at_eos and token in self.eos:
            self.finished = "eos"
            return self._emit(self._decoded()) if self.live_text else ""
        self.ids.append(token)
        if not self.live_text:
            if len(self.ids) >= self.cfg.max_new_tokens:
                self.finished = "length"
            return ""
        full = self._decoded()
        cuts = [cut for cut in (full.find(stop) for stop in self.cfg.stop) if cut >= 0]
        if cuts:  # the earliest match wins, whatever the order the stop strings were given in
            self.finished = "stop"
            return self._emit(full[:min(cuts)])
        if len(self.ids) >= self.cfg.max_new_tokens:
            self.finished = "length"
            return self._emit(full)
        if full.endswith("\ufffd"):
            return ""
        return self._emit(full[: len(full) - self._held(full)])

    def final_text(self) -> str:
        """The row's text: what was emitted, or, for a row without live text, its ids decoded once."""
        return self.text if self.live_text else self.tokenizer.decode(self.ids)

    def _decoded(self) -> str:
        """The text of every id so far, decoding only the ids after the last whole-character boundary.

        Byte-level BPE decodes a concatenation of token runs to the concatenation of their texts
        when the first run ends on a whole UTF-8 character, so each step decodes a short tail instead
        of the whole generation.
        """
        tail = self.tokenizer.decode(self.ids[self._clean_at:])
        text = self._clean_text + tail
        if len(self.ids) - self._clean_at >= 8 and not tail.endswith("\ufffd"):
            self._clean_at, self._clean_text = len(self.ids), text
        return text

    def _held(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins a stop string."""
        hold = 0
        for stop in self.cfg.stop:
            for k in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:k]):
                    hold = k
                    break
        return hold

    def _emit(self, text: str) -> str:
        delta = text[len(self.text):] if len(text) > len(self.text) else ""
        self.text = max(self.text, text, key=len) if self.finished is None else text
        return delta


class Generator:
    """Generates from an exported artifact with ONNX Runtime alone (no torch, no transformers)."""

    def __init__(self, artifact: Artifact, context_policy: str = "error"):
        if context_policy not in CONTEXT_POLICIES:
            raise InputError(f"context policy '{context_policy}' is unknown; choose one of {', '.join(CONTEXT_POLICIES)}")
        self.art = artifact
        self.context_policy = context_policy
        facts = artifact.facts
        self.max_positions = int(facts["max_positions"])
        self.vocab = int(facts["vocab_size"])
        # the cache's shape when a manifest's kv_cache entries carry no per-layer "heads" (older artifacts)
        self.heads, self.head_size = int(facts["num_heads"]), int(facts["head_size"])
        self.pad_id = artifact.eos_token_id if artifact.eos_token_id is not None else 0
        self.device = "cuda" if artifact.provider == "cuda" else "cpu"
        self.last_cache: KVCache | None = None  # the cache of the last generation (tests inspect it)
        self.screens = artifact.screens  # its LM head can give the argmax alone (native/screen.c)
        self.screen = True  # use it where it gives the same tokens (screened); False: the full product always

    @classmethod
    def load(cls, folder: str | Path, provider: str = "cpu", threads: int | None = None,
             context_policy: str = "error", weights: str = "mapped", kernels: str = "auto") -> "Generator":
        """``weights``: "mapped" or "memory", where a packed artifact's weights live (options.WEIGHT_PLACEMENTS);
        ``kernels``: "auto", "edgelm" or "onnxruntime", what runs an fp32 graph on the CPU (options.KERNELS)."""
        return cls(load_artifact(folder, provider, threads, weights, kernels, screen=True), context_policy)

    @property
    def tokenizer(self):
        return self.art.tokenizer

    # -- public API ---------------------------------------------------------------------------
    def sampling(self, **settings) -> SamplingConfig:
        """A SamplingConfig that starts from the model's own defaults (what its generation_config.json
        sets of do_sample, temperature, top_k, top_p and repetition_penalty, as transformers' generate
        starts from them), with ``settings`` (SamplingConfig's fields) over them; SamplingConfig's own
        defaults (greedy) fill the rest."""
        return SamplingConfig(**{**sampling_settings(self.art.generation_defaults), **settings})

    def generate(self, prompts, cfg: SamplingConfig | None = None, **kwargs):
        """One prompt (text or token ids) -> GenerationResult; a list of them -> a list (one padded batch).
        Without ``cfg``, the settings are the model's defaults with ``kwargs`` over them (``sampling``)."""
        single = self._single(prompts)
        cfg = cfg or self.sampling(**kwargs)
        rows = self._rows([prompts] if single else list(prompts), cfg, live_text=False)
        for _ in self.run(rows):
            pass
        results = [self.result(r) for r in rows]
        return results[0] if single else results

    def stream(self, prompts, cfg: SamplingConfig | None = None, **kwargs) -> Iterator[StreamEvent]:
        """One prompt (text or token ids) or a list of them (one padded batch) -> StreamEvents as the
        tokens come; each event's ``row`` is its prompt's index (0 for a single prompt). Without ``cfg``,
        the model's defaults with ``kwargs`` over them, as ``generate``."""
        cfg = cfg or self.sampling(**kwargs)
        yield from self.run(self._rows([prompts] if self._single(prompts) else list(prompts), cfg))

    def run_rows(self, prompts: list[str], cfgs: list[SamplingConfig]):
        """For servers: rows with their own configs; yields StreamEvents, then returns results."""
        rows = [self.prepare(p, c) for p, c in zip(prompts, cfgs)]
        yield from self.run(rows)
        return [self.result(r) for r in rows]

    # -- internals ----------------------------------------------------------------------------
    @staticmethod
    def _single(prompts) -> bool:
        """One prompt (a string or a list of token ids), not a list of prompts."""
        return isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and bool(prompts)
                                            and all(isinstance(t, (int, np.integer)) for t in prompts))

    def _rows(self, prompts: list[str], cfg: SamplingConfig, live_text: bool = True) -> list[Row]:
        if not prompts:
            raise InputError("no prompt given; pass at least one prompt")
        return [self.prepare(p, cfg, live_text) for p in prompts]

    def prepare(self, prompt: str | list[int], cfg: SamplingConfig, live_text: bool = True) -> Row:
        """Tokenize (a string) or check (a list of token ids) one prompt against the context.

        ``live_text``: False when nobody reads the row's text before it ends (see Row).
        """
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, (int, np.integer)) for t in prompt):
            ids = [int(t) for t in prompt]
            if any(not 0 <= t < self.vocab for t in ids):
                raise InputError(f"token ids must be in [0, {self.vocab}); got one outside")
            prompt = self.tokenizer.decode(ids)
        else:
            raise InputError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            if self.art.manifest["tokenizer"].get("bos_token_id") is None:
                raise InputError("the prompt is empty; give at least one character")
            ids = [int(self.art.manifest["tokenizer"]["bos_token_id"])]
        room = self.max_positions - cfg.max_new_tokens
        if len(ids) > room:
            if self.context_policy == "truncate" and room >= 1:
                ids = ids[-room:]
            elif self.context_policy == "truncate":  # no room even for one prompt token
                raise InputError(f"{cfg.max_new_tokens} new tokens leave no room for the prompt in the model's "
                                 f"context of {self.max_positions}; ask for at most {self.max_positions - 1}")
            else:
                raise InputError(
                    f"the prompt has {len(ids)} tokens and {cfg.max_new_tokens} new tokens were asked for, "
                    f"more than the model's context of {self.max_positions}; shorten the prompt, ask for fewer "
                    "tokens, or choose the 'truncate' context policy (keeps the end of the prompt)"
                )
        return Row(self.tokenizer, prompt, ids, cfg, self.art.eos_token_ids, live_text)

    def screened(self, rows: list[Row]) -> bool:
        """Whether these rows' steps take the LM head's screen (native/screen.c): where every row takes the
        argmax of its logits as they are (greedy, no repetition penalty), only the panels of the LM head
        that may hold it are computed in fp32, the others estimated from an int8 copy; the tokens are the
        same, for a quarter of the head's reads. Up to SCREEN_MAX_ROWS rows: with more, the estimates'
        arithmetic outweighs the reads they save."""
        return (self.screens and self.screen and len(rows) <= SCREEN_MAX_ROWS
                and all(r.cfg.greedy and r.cfg.repetition_penalty == 1.0 for r in rows))

    def result(self, row: Row) -> GenerationResult:
        return GenerationResult(row.prompt, row.prompt_ids, row.ids, row.final_text(), row.finished or "length",
                                row.timings)

    def run(self, rows: list[Row]) -> Iterator[StreamEvent]:
        import onnxruntime as ort

        sess, names = self.art.session, self.art.input_names
        batch = len(rows)
        lengths = np.array([len(r.prompt_ids) for r in rows])
        prompt_len = int(lengths.max())
        max_len = prompt_len + max(r.cfg.max_new_tokens for r in rows)
        right = self.art.manifest["io"].get("padding", "left") == "right"
        started = time.perf_counter()

        ids = np.full((batch, prompt_len), self.pad_id, dtype=np.int64)  # (B, P), padded
        mask = np.zeros((batch, max_len), dtype=np.int64)  # (B, max_len)
        for b, (r, n) in enumerate(zip(rows, lengths)):
            cols = slice(0, n) if right else slice(prompt_len - n, prompt_len)
            ids[b, cols] = r.prompt_ids
            mask[b, cols] = 1
        positions = np.maximum(np.cumsum(mask[:, :prompt_len], axis=1) - 1, 0)  # (B, P)
        seen = np.zeros((batch, self.vocab), dtype=bool) if any(r.cfg.repetition_penalty != 1.0 for r in rows) else None
        if seen is not None:
            for b, r in enumerate(rows):
                seen[b, r.prompt_ids] = True

        cache = KVCache(ort, self.art.manifest["io"]["kv_cache"], batch, max_len, self.heads, self.head_size,
                        self.art.kv_dtype, self.device)
        self.last_cache = cache
        binding = sess.io_binding()
        logits = np.zeros((batch, 1, self.vocab), dtype=np.float32)  # (B, 1, V), reused every step
        logits_value = ort.OrtValue.ortvalue_from_numpy(logits)
        keep_all = "num_logits_to_keep" not in names  # graphs from other exporters return every position
        if not keep_all:
            binding.bind_ortvalue_output("logits", logits_value)
            binding.bind_cpu_input("num_logits_to_keep", np.array(1, dtype=np.int64))
        else:
            binding.bind_output("logits", "cpu")  # bound first: output 0 of the binding
        if self.screens:
            binding.bind_cpu_input(SCREEN_INPUT, np.array(int(self.screened(rows)), dtype=np.int64))
        cache.bind(binding)

        total, step_ids, step_pos = prompt_len, ids, positions
        first_token_at = None
        steps = 0
        while True:
            if steps == 0 and right and (lengths < prompt_len).any():
                self._prefill_row_by_row(binding, cache, ids, positions, lengths, logits)
                binding.bind_ortvalue_output("logits", logits_value)
                cache.bind(binding)
            else:
                binding.bind_cpu_input("input_ids", np.ascontiguousarray(step_ids))
                binding.bind_cpu_input("attention_mask", np.ascontiguousarray(mask[:, :total]))
                if "position_ids" in names:
                    binding.bind_cpu_input("position_ids", np.ascontiguousarray(step_pos))
                if keep_all:
                    binding.bind_output("logits", "cpu")  # its shape changes with the step: let ORT allocate
                sess.run_with_iobinding(binding)
            last = logits[:, -1] if not keep_all else binding.get_outputs()[0].numpy()[:, -1]  # (B, V)
            cache.after_step(binding, ["logits"])
            steps += 1
            tokens = np.empty(batch, dtype=np.int64)
            for b, r in enumerate(rows):
                if r.cancelled and not r.finished:
                    r.finished = "cancelled"
                if r.finished:
                    tokens[b] = self.pad_id
                    continue
                tokens[b] = next_tokens(last[b:b + 1], r.cfg, r.rng, None if seen is None else seen[b:b + 1])[0]
            if first_token_at is None:
                first_token_at = time.perf_counter()
            for b, r in enumerate(rows):
                if r.finished:
                    continue
                delta = r.push(int(tokens[b]))
                if seen is not None:
                    seen[b, tokens[b]] = True
                yield StreamEvent(b, int(tokens[b]), delta, r.finished)
            if all(r.finished for r in rows) or total >= max_len:
                break
            step_ids = tokens[:, None]  # (B, 1)
            # A finished row keeps stepping as padding: its position stops at the model's last (a long
            # prompt that asked for few tokens, batched with a short one that asked for many, would
            # otherwise run past the position table); no live row gets that far (prepare).
            step_pos = np.minimum(step_pos[:, -1:] + 1, self.max_positions - 1)  # (B, 1)
            if right:  # each row's new token right after its own tokens
                mask[np.arange(batch), step_pos[:, 0]] = 1
            else:
                mask[:, total] = 1
            total += 1
        done = time.perf_counter()
        new_tokens = sum(len(r.ids) for r in rows)
        decoded = sum(max(len(r.ids) - 1, 0) for r in rows)  # after each row's first: finished rows' padding not counted
        timings = {
            "time_to_first_token_s": round(first_token_at - started, 6),
            "decode_tokens_per_s": round(decoded / (done - first_token_at), 3) if steps > 1 else None,
            "decode_steps": steps - 1,
            "total_s": round(done - started, 6),
            "prompt_tokens": prompt_len,
            "new_tokens": new_tokens,
            "batch": batch,
            "kv_cache_bytes": cache.nbytes,
        }
        for r in rows:
            r.timings = timings

    def _prefill_row_by_row(self, binding, cache: KVCache, ids: np.ndarray, positions: np.ndarray,
                            lengths: np.ndarray, logits: np.ndarray) -> None:
        """Right-padded graphs, prompts of different lengths: each prompt on its own, as a batch of
        one bound to its row of the cache and of the logits (a batched call would append the longest
        prompt's length to every row)."""
        for b, n in enumerate(lengths):
            binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids[b:b + 1, :n]))
            binding.bind_cpu_input("attention_mask", np.ones((1, n), dtype=np.int64))
            if "position_ids" in self.art.input_names:
                binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions[b:b + 1, :n]))
            binding.bind_output("logits", "cpu", 0, np.float32, [1, 1, self.vocab], logits[b].ctypes.data)
            cache.bind_row(binding, b)
            self.art.session.run_with_iobinding(binding)
