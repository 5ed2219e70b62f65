"""One benchmarked system in its own process: load once, then generate on request.

    python worker.py serve '{"system": "pytorch", "model": "/path/to/hf-folder", "provider": "cpu"}'
    python worker.py prepare '{"system": "ctranslate2", "source": "/hf-folder", "out": "/cache/ct2"}'

The parent (edgelm.bench.runner) talks JSON lines over stdin/stdout: it sends
``{"cmd": "run", "prompts": [[ids]], "new_tokens": N}`` and gets back the time of every step's
first token (``stamps``, seconds from the call), the first row's tokens and the process's peak
RSS. Own process per system: its peak memory and cold start are its own, and a peer whose
packages conflict with edgelm's can run under another environment's Python (this file imports
only the standard library at the top, and edgelm only for the edgelm system).

Every system generates greedily, exactly ``new_tokens`` tokens per row (end-of-text ignored),
from the same token ids.
"""

from __future__ import annotations

import json
import os
import sys
import time

if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # run as a file: this folder's modules must not shadow top-level packages

from edgelm.bench.energy import peak_rss_bytes  # noqa: E402  (this program's own peak, VmHWM)


# -- systems: load(spec) -> object with run(prompts, new_tokens) -> (stamps, first row's tokens) --------
class EdgelmSystem:
    def __init__(self, spec):
        from edgelm.runtime import Generator

        self.gen = Generator.load(spec["model"], spec.get("provider", "cpu"), spec.get("threads"))
        self.kernels = self.gen.art.kernels  # the runtime's default choice: edgelm's or ONNX Runtime's
        self.lm_head_screen = self.gen.screens  # greedy steps read the LM head's int8 screen (native/screen.c)

    def run(self, prompts, new_tokens):
        from edgelm.runtime import SamplingConfig

        cfg = SamplingConfig(max_new_tokens=new_tokens, stop_at_eos=False)
        batch = len(prompts)
        stamps, tokens = [], []
        t0 = time.perf_counter()
        rows = [self.gen.prepare(p, cfg) for p in prompts]
        for k, event in enumerate(self.gen.run(rows)):  # the runtime's streaming events: B per step
            if k % batch == 0:
                stamps.append(time.perf_counter() - t0)
            if event.row == 0:
                tokens.append(event.token_id)
        return stamps, tokens


class _HFGenerate:
    """PyTorch and Optimum both go through transformers' ``generate``; a stopping criterion stamps each step."""

    model = None
    device = "cpu"

    def run(self, prompts, new_tokens):
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        stamps = []

        class Stamp(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                stamps.append(time.perf_counter() - t0)
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        ids = torch.tensor(prompts, dtype=torch.long, device=self.device)
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                                      pad_token_id=self.pad_id, eos_token_id=None,
                                      stopping_criteria=StoppingCriteriaList([Stamp()]))
        return stamps, out[0, ids.shape[1]:].tolist()


class PytorchSystem(_HFGenerate):
    def __init__(self, spec):
        import torch
        import transformers

        if spec.get("threads"):
            torch.set_num_threads(int(spec["threads"]))
        self.device = "cuda" if spec.get("provider") == "cuda" else "cpu"
        self.model = transformers.AutoModelForCausalLM.from_pretrained(spec["model"], torch_dtype=torch.float32)
        self.model = self.model.to(self.device).eval()
        self.pad_id = _pad_id(self.model.config)


def _pad_id(config) -> int:
    """The first end-of-text id (config.json may list several), or 0: only padding, never read back."""
    eos = config.eos_token_id
    eos = eos[0] if isinstance(eos, list) and eos else eos
    return eos if isinstance(eos, int) else 0


class OptimumSystem(_HFGenerate):
    def __init__(self, spec):
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForCausalLM

        opts = ort.SessionOptions()
        if spec.get("threads"):
            opts.intra_op_num_threads = int(spec["threads"])
        provider = "CUDAExecutionProvider" if spec.get("provider") == "cuda" else "CPUExecutionProvider"
        self.device = "cuda" if spec.get("provider") == "cuda" else "cpu"
        self.model = ORTModelForCausalLM.from_pretrained(spec["model"], use_io_binding=True, provider=provider,
                                                         session_options=opts)
        self.pad_id = _pad_id(self.model.config)


class Ctranslate2System:
    def __init__(self, spec):
        import ctranslate2

        folder = spec["model"]
        with open(os.path.join(folder, "vocabulary.json")) as f:
            self.vocab = json.load(f)  # id -> token string: CTranslate2 takes token strings
        self.gen = ctranslate2.Generator(folder, device="cuda" if spec.get("provider") == "cuda" else "cpu",
                                         intra_threads=int(spec.get("threads") or 0))

    def run(self, prompts, new_tokens):
        stamps, seen = [], set()

        def step(result):  # called for every generated token of every row
            if result.step not in seen:
                seen.add(result.step)
                stamps.append(time.perf_counter() - t0)
            return False

        tokens = [[self.vocab[i] for i in p] for p in prompts]
        t0 = time.perf_counter()
        out = self.gen.generate_batch(tokens, max_length=new_tokens, min_length=new_tokens, sampling_topk=1,
                                      include_prompt_in_result=False, callback=step)
        return stamps, list(out[0].sequences_ids[0])


SYSTEMS = {"edgelm": EdgelmSystem, "pytorch": PytorchSystem, "optimum": OptimumSystem,
           "ctranslate2": Ctranslate2System}


# -- preparation: a peer's own model format, made once and cached --------------------------------
def prepare(spec) -> None:
    system, source, out = spec["system"], spec["source"], spec["out"]
    if system == "optimum":
        from optimum.exporters.onnx import main_export

        main_export(source, out, task="text-generation-with-past", do_validation=False,
                    device="cuda" if spec.get("provider") == "cuda" else "cpu")
    elif system == "ctranslate2":
        from ctranslate2.converters import TransformersConverter

        TransformersConverter(source).convert(out, force=True)
    else:
        raise ValueError(f"nothing to prepare for {system}")


# -- the loop ------------------------------------------------------------------------------------
def serve(spec, channel) -> int:
    def send(msg):
        channel.write(json.dumps(msg) + "\n")
        channel.flush()

    try:
        t = time.perf_counter()
        system = SYSTEMS[spec["system"]](spec)
        send({"ready": True, "load_s": time.perf_counter() - t, "peak_rss_bytes": peak_rss_bytes(),
              "kernels": getattr(system, "kernels", None), "lm_head_screen": getattr(system, "lm_head_screen", None)})
    except Exception as exc:  # noqa: BLE001 - the parent turns this into a note
        send({"error": f"{type(exc).__name__}: {str(exc).strip()[:500]}"})
        return 1
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "quit":
            break
        try:
            stamps, tokens = system.run(msg["prompts"], msg["new_tokens"])
            send({"stamps": stamps, "tokens": tokens, "peak_rss_bytes": peak_rss_bytes()})
        except Exception as exc:  # noqa: BLE001
            send({"error": f"{type(exc).__name__}: {str(exc).strip()[:500]}"})
    return 0


def main(argv) -> int:
    mode, spec = argv[1], json.loads(argv[2])
    channel = os.fdopen(os.dup(1), "w")  # the protocol's own copy of stdout ...
    os.dup2(2, 1)  # ... and anything a library prints goes to the log (stderr)
    if mode == "prepare":
        prepare(spec)
        return 0
    return serve(spec, channel)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
