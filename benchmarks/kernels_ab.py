"""Decode speed of the default export on the runtime's two kernel choices, against the packed export.

    .venv/bin/python benchmarks/kernels_ab.py --model gpt2 --rounds 30

Three generators of one random-weight model, in many short interleaved rounds (fresh shuffled order
each round; the same 32 random prompt tokens, 33 greedy new tokens, EOS ignored):
- edgelm: the default (conv) export on edgelm's kernels (`--kernels auto`): turned into the packed
  graph as it loads, its weights in the process's memory;
- packed: the `--linear-layout packed` export, its weights mapped from its data file;
- onnxruntime: the default export on ONNX Runtime's own kernels (`--kernels onnxruntime`).
The graph of the first two is the same node for node (a test shows it); this measures what is left:
where the weights live. Writes benchmarks/results/kernels_ab-MODEL.json with per-round ratios
(median, quartiles, rounds won) against the packed export.
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


def main(argv=None) -> int:
    args = decode_ab_args(__doc__.splitlines()[0], argv)

    from edgelm.runtime import Generator

    model_dir = CACHE / args.model
    ensure_model_folder(MODELS[args.model][1], model_dir)
    conv, packed = (cached_artifact(model_dir, args.model, layout) for layout in ("conv", "packed"))
    gens = {"edgelm": Generator.load(conv, kernels="edgelm"), "packed": Generator.load(packed),
            "onnxruntime": Generator.load(conv, kernels="onnxruntime")}
    started = time.time()
    rates = interleaved_decode_rounds(gens, args.rounds, args.new_tokens)
    result = ab_record(args.model, args.rounds, args.new_tokens, started, rates,
                       [("packed", "edgelm"), ("packed", "onnxruntime")])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"kernels_ab-{args.model}.json").write_text(json.dumps(result, indent=2) + "\n")
    for name in ("edgelm", "onnxruntime"):
        print(ab_line(result, "packed", name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
