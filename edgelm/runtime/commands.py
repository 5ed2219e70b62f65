"""``edgelm generate`` and ``edgelm serve``."""

from __future__ import annotations

import argparse
import json
import sys

from ..cli import command
from ..errors import InputError
from .options import CONTEXT_POLICIES, KERNELS, PROVIDERS, WEIGHT_PLACEMENTS


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got '{text}'") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="artifact folder made by 'edgelm export'")
    p.add_argument("--provider", choices=list(PROVIDERS), default="cpu", help="ONNX Runtime provider (default cpu)")
    p.add_argument("--threads", type=_positive_int, default=None, help="intra-op threads (default: all cores)")
    p.add_argument("--context-policy", choices=CONTEXT_POLICIES, default="error",
                   help="when prompt + new tokens exceed the context: fail (default) or drop the prompt's start")
    p.add_argument("--weights", choices=WEIGHT_PLACEMENTS, default="mapped",
                   help="a packed artifact's weights: mapped from its file (default: instant load, pages shared "
                        "between processes) or copied into memory at load (for long-running processes); "
                        "other layouts' weights are copied into ONNX Runtime's own buffers either way")
    p.add_argument("--kernels", choices=KERNELS, default="auto",
                   help="what runs an fp32 artifact on the CPU: edgelm's operators (a conv- or matmul-layout graph "
                        "is turned into the packed one as it loads, its weights held in memory) or ONNX Runtime's "
                        "own; auto (default): edgelm's where the artifact allows")


def _configure_generate(p: argparse.ArgumentParser) -> None:
    _add_runtime_args(p)
    p.add_argument("prompt", nargs="+", help="the prompt text; several prompts are generated together, as one "
                                             "batch; - reads a prompt from standard input")
    p.add_argument("-n", "--max-new-tokens", type=_positive_int, default=64)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true",
                      help="argmax decoding (the default, unless the model's generation_config.json sets do_sample)")
    mode.add_argument("--temperature", type=float, default=None, help="sample at this temperature")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the model's end-of-text tokens")
    p.add_argument("--stream", action="store_true", help="print tokens as they come")
    p.add_argument("--json", action="store_true", help="print prompt and new token ids, text and timings as JSON")
    p.add_argument("--energy", action="store_true",
                   help="measure the generation's energy with CodeCarbon (offline; country from $EDGELM_COUNTRY, "
                        "else USA): an 'energy' field with --json, one line on stderr otherwise")


def sampling_from_args(args) -> dict:
    """The generate flags as SamplingConfig settings, checked before the model loads; the model's own
    defaults fill in the rest (Generator.sampling). A sampling flag means sampling, --greedy argmax,
    and neither what the model's generation_config.json says (greedy where it says nothing)."""
    from .sampling import SamplingConfig

    sampling = {k: v for k, v in (("temperature", args.temperature), ("top_k", args.top_k), ("top_p", args.top_p))
                if v is not None}
    if args.greedy and sampling:
        raise InputError("--greedy takes the most likely token, so --top-k and --top-p (sampling flags) do not "
                         "apply; drop --greedy to sample, or drop them")
    settings = dict(sampling, max_new_tokens=args.max_new_tokens, stop=tuple(args.stop), seed=args.seed,
                    stop_at_eos=not args.ignore_eos)
    if args.repetition_penalty is not None:
        settings["repetition_penalty"] = args.repetition_penalty
    if args.greedy or sampling:
        settings["greedy"] = args.greedy
    SamplingConfig(**settings)  # a bad value is refused before the model loads
    return settings


@command("generate", "Generate text from an exported artifact with ONNX Runtime (no torch).", _configure_generate)
def run_generate(args: argparse.Namespace) -> int:
    from .generator import Generator

    settings = sampling_from_args(args)
    prompts = _prompts(args.prompt)
    if args.stream and not args.json and len(prompts) > 1:
        raise InputError("--stream prints one prompt's tokens as they come; give one prompt, or drop --stream to "
                         "generate several together")
    gen = Generator.load(args.artifact, args.provider, args.threads, args.context_policy, args.weights, args.kernels)
    cfg = gen.sampling(**settings)
    if not cfg.greedy and "greedy" not in settings and not args.json:
        model = ", ".join(f"{k} {v}" for k, v in gen.art.generation_defaults.items() if k != "do_sample")
        print(f"[sampling, as the model's generation_config.json asks{f' ({model})' if model else ''}; --greedy "
              "for argmax]", file=sys.stderr)
    meter = None
    if args.energy:
        from ..bench.energy import Meter

        meter = Meter().start()
    if args.stream and not args.json:
        sys.stdout.write(prompts[0])
        tokens = 0
        for event in gen.stream(prompts[0], cfg):
            tokens += 1
            sys.stdout.write(event.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if meter:
            _print_energy(meter.stop().to_dict(tokens=tokens))
        return 0
    results = gen.generate(prompts, cfg)
    energy = meter.stop().to_dict(tokens=sum(len(r.token_ids) for r in results)) if meter else None
    if args.json:  # one object for one prompt, a list of them for several
        outs = [dict(r.to_dict(), artifact=str(args.artifact), provider=args.provider, kernels=gen.art.kernels,
                     sampling=cfg.to_dict()) for r in results]
        if energy is not None:  # the batch's, on each of its rows
            for out in outs:
                out["energy"] = energy
        print(json.dumps(outs[0] if len(outs) == 1 else outs, indent=2))
    else:
        for i, (prompt, result) in enumerate(zip(prompts, results)):
            print(("" if i == 0 else "\n") + prompt + result.text)
        t = results[0].timings  # the batch's
        rate = f"{t['decode_tokens_per_s']:.1f} tok/s" if t["decode_tokens_per_s"] else "n/a"
        finish = ", ".join(r.finish_reason for r in results)
        print(f"[{t['new_tokens']} tokens{f' in {len(results)} rows' if len(results) > 1 else ''}, first after "
              f"{t['time_to_first_token_s'] * 1000:.0f} ms, decode {rate}, finish: {finish}]", file=sys.stderr)
        if energy is not None:
            _print_energy(energy)
    return 0


def _prompts(given: list[str]) -> list[str]:
    """The prompts as given, with - read from standard input (once)."""
    if given.count("-") > 1:
        raise InputError("- reads a prompt from standard input, which holds one; give - once")
    if "-" not in given:
        return given
    try:
        text = sys.stdin.buffer.read().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"standard input is not UTF-8 text (byte {exc.start}); convert the prompt to UTF-8") from None
    return [text if p == "-" else p for p in given]


def _print_energy(energy: dict) -> None:
    if energy.get("measured"):
        print(f"[energy: {energy['joules']:.2f} J, {energy['joules_per_token']:.3f} J/token, "
              f"{energy['gco2e_per_1000_tokens']:.4f} gCO2e per 1,000 tokens ({energy['country']}); "
              f"{energy['method']}]", file=sys.stderr)
    else:
        print(f"[energy not measured: {energy['reason']}]", file=sys.stderr)


def _configure_serve(p: argparse.ArgumentParser) -> None:
    _add_runtime_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000; 0: any free one, printed)")
    p.add_argument("--max-batch", type=_positive_int, default=8, help="requests decoded together (default 8)")
    p.add_argument("--max-queue", type=_positive_int, default=64,
                   help="requests waiting beyond that; more get HTTP 429 (default 64)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the folder name)")


@command("serve", "Serve an artifact over an OpenAI-compatible HTTP API.", _configure_serve)
def run_serve(args: argparse.Namespace) -> int:
    from .server import serve

    return serve(args)
