"""Greedy decode with the LM head's screen against the full LM head, on edgelm's kernels.

    .venv/bin/python benchmarks/screen_ab.py --model gpt2 --rounds 30
    .venv/bin/python benchmarks/screen_ab.py --model gpt2 --rounds 12 --batch 8

One random-weight model (the default export, run on edgelm's kernels), one generator, in many short
interleaved rounds (fresh shuffled order each round; the same 32 random prompt tokens, 33 greedy new
tokens, EOS ignored; --batch N: N such prompts as one batch), with the screen on (the runtime's
default for greedy rows: the LM head's argmax from its int8 copy and the fp32 panels that may hold
it, native/screen.c) and off (the full fp32 product, what sampling takes). Each round checks that
both gave the same tokens. Writes benchmarks/results/screen_ab-MODEL.json (screen_ab-MODEL-bN.json
for a batch) with the per-round ratio (median, quartiles, rounds won).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS, ab_line, ab_record, decode_ab_args, interleaved_decode_rounds  # noqa: E402
from configs import MODELS  # noqa: E402
from random_checkpoint import ensure_model_folder  # noqa: E402
from runtime_bench import CACHE, cached_artifact  # noqa: E402


class Screened:
    """The one generator with its screen switched on or off for each generation."""

    def __init__(self, gen, on: bool, tokens: dict):
        self.gen, self.on, self.tokens = gen, on, tokens

    def generate(self, prompt, cfg):
        self.gen.screen = self.on
        result = self.gen.generate(prompt, cfg)
        rows = result if isinstance(result, list) else [result]
        self.tokens.setdefault(cfg.max_new_tokens, set()).add(tuple(tuple(r.token_ids) for r in rows))
        return result


def main(argv=None) -> int:
    args = decode_ab_args(__doc__.splitlines()[0], argv, [("--batch", 1, "prompts decoded together (default 1)")])

    from edgelm.runtime import Generator

    model_dir = CACHE / args.model
    ensure_model_folder(MODELS[args.model][1], model_dir)
    gen = Generator.load(cached_artifact(model_dir, args.model, "conv"), kernels="edgelm")
    if not gen.screens:
        raise SystemExit("this generator's LM head takes no screen")
    tokens: dict = {}
    gens = {"full": Screened(gen, False, tokens), "screened": Screened(gen, True, tokens)}
    started = time.time()
    rates = interleaved_decode_rounds(gens, args.rounds, args.new_tokens, batch=args.batch)
    same = all(len(outputs) == 1 for outputs in tokens.values())
    result = ab_record(args.model, args.rounds, args.new_tokens, started, rates, [("full", "screened")],
                       same_tokens=same, batch=args.batch)
    RESULTS.mkdir(exist_ok=True)
    suffix = "" if args.batch == 1 else f"-b{args.batch}"
    (RESULTS / f"screen_ab-{args.model}{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(ab_line(result, "full", "screened") + ("" if same else "; THE TOKENS DIFFERED"))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
