"""The artifact manifest: what an exported folder is, read by the runtime instead of guessing.

Schema (version 1), all keys always present unless marked optional:

    format, schema_version, created, edgelm_version
    model:      source, architecture, model_type, facts (layers, heads, head size, windows, scales, ...)
    graph:      file, external_data (file name or null), dtype, backend, opset, operators {op: count}
    io:         inputs/outputs [{name, dtype, shape}], kv_cache [{layer, past_key, past_value,
                present_key, present_value, kind: full|window|concat, window, share_buffer}], kv_dtype
    tokenizer:  files, bos_token_id, eos_token_id, eos_token_ids (optional: every id generation ends on,
                eos_token_id first; older artifacts have eos_token_id alone)
    generation: (optional) the sampling settings of the model's generation_config.json that the runtime
                starts from: do_sample, temperature, top_k, top_p, repetition_penalty (those it sets)
    steps:      [{name, ... settings, seconds, peak_rss_bytes, versions, energy}]  (the lineage, in order;
                energy: edgelm.bench.energy's record of the step, measured or not and why)
    validation: status (passed|not_validated), reason (optional), atol, provider, schedule,
                max_abs_diff {output: value}
    files:      {name: {bytes, sha256}}
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ArtifactError, is_whole

FORMAT = "edgelm-artifact"
SCHEMA_VERSION = 1
# Beside a Hugging Face folder made by a training step (distill, prune): the steps that made it.
# The exporter puts them first in the manifest's ``steps``, so an artifact carries its whole lineage.
LINEAGE_FILE = "edgelm_steps.json"
FACT_SIZES = ("num_layers", "num_heads", "head_size", "hidden_size", "vocab_size", "max_positions")
KV_DTYPES = ("float32", "float16")
REQUIRED = ("format", "schema_version", "model", "graph", "io", "tokenizer", "steps", "validation", "files")
CACHE_KINDS = ("full", "window", "concat")  # io.kv_cache[].kind
CACHE_NAMES = ("past_key", "past_value", "present_key", "present_value")  # io.kv_cache[]: the graph's names
SECTIONS = {"model": dict, "graph": dict, "io": dict, "tokenizer": dict, "steps": list, "validation": dict,
            "files": dict}  # their JSON types


def write_manifest(folder: Path, manifest: dict) -> Path:
    path = Path(folder) / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


def read_manifest(folder: str | Path, verify_checksums: bool = False, progress: bool = False) -> dict:
    """Read and check an artifact's manifest: every required key with its type, the graph's files listed,
    every listed file present with its size.

    ``verify_checksums``: also hash every file against its sha256 (about 1 GiB/s here, so 6 s for
    gpt2-xl's weights): ``edgelm verify``, ``bench`` and ``eval`` do, since a damaged copy of the
    same size would otherwise run and give wrong numbers. ``progress``: a bar over the bytes hashed.
    """
    folder = Path(folder)
    path = folder / "manifest.json"
    if not folder.is_dir():
        raise ArtifactError(f"{folder} is not a folder; pass an artifact folder made by 'edgelm export'")
    if not path.is_file():
        raise ArtifactError(f"{folder} has no manifest.json; pass a folder made by 'edgelm export'")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); export the model again") from None
    _check_structure(path, manifest)
    if manifest["schema_version"] > SCHEMA_VERSION:
        raise ArtifactError(
            f"{path} has schema version {manifest['schema_version']}, newer than this edgelm understands "
            f"({SCHEMA_VERSION}); upgrade edgelm"
        )
    for name, meta in manifest["files"].items():
        f = folder / name
        if not f.is_file():
            raise ArtifactError(f"{folder} lacks {name}, which its manifest lists; copy the whole artifact folder")
        if f.stat().st_size != meta["bytes"]:
            raise ArtifactError(f"{f} has {f.stat().st_size} bytes, its manifest says {meta['bytes']}; the copy is damaged")
    if verify_checksums:
        _verify_checksums(folder, manifest["files"], progress)
    return manifest


def _check_structure(path: Path, manifest) -> None:
    """The keys and types every command relies on, so that a damaged or hand-edited manifest is refused here
    in one sentence, not met as a traceback wherever a command first reads the bad part."""
    if not isinstance(manifest, dict):
        problem = "not a JSON object"
    elif manifest.get("format") != FORMAT or any(k not in manifest for k in REQUIRED):
        problem = f"missing {[k for k in REQUIRED if k not in manifest] or ['format']}"
    elif not is_whole(manifest["schema_version"]):
        problem = f"schema_version is {manifest['schema_version']!r}, not a whole number"
    elif wrong := [key for key, kind in SECTIONS.items() if not isinstance(manifest[key], kind)]:
        problem = f"{wrong[0]} is not a JSON {'array' if SECTIONS[wrong[0]] is list else 'object'}"
    else:
        files, graph = manifest["files"], manifest["graph"]
        bad = [name for name, meta in files.items()
               if name in ("", ".", "..") or Path(name).name != name  # a file of this folder, not a path out of it
               or not isinstance(meta, dict) or not is_whole(meta.get("bytes")) or not isinstance(meta.get("sha256"), str)]
        graph_files = [graph.get("file")] + ([graph["external_data"]] if graph.get("external_data") is not None else [])
        unlisted = [name for name in graph_files if not isinstance(name, str) or name not in files]
        io, tokenizer = manifest["io"], manifest["tokenizer"]
        caches = io.get("kv_cache")
        facts = manifest["model"].get("facts")
        sizes = facts if isinstance(facts, dict) else {}
        vocab = sizes.get("vocab_size")
        ids = [tokenizer.get(k) for k in ("bos_token_id", "eos_token_id")] + (
            tokenizer["eos_token_ids"] if isinstance(tokenizer.get("eos_token_ids"), list) else [])
        if bad:
            problem = f"its files entry {bad[0]!r} is not a file name with bytes and sha256"
        elif unlisted:
            problem = f"the graph's file {unlisted[0]!r} is not among its files"
        elif not isinstance(facts, dict) or not all(is_whole(sizes.get(k), 1) for k in FACT_SIZES):
            problem = f"its model.facts lacks whole numbers {', '.join(FACT_SIZES)}"
        elif io.get("kv_dtype") not in KV_DTYPES or not all(isinstance(io.get(k), list) for k in ("inputs", "outputs")):
            problem = f"its io lacks kv_dtype ({' or '.join(KV_DTYPES)}), inputs or outputs"
        elif not all(isinstance(t, dict) and isinstance(t.get("name"), str) for k in ("inputs", "outputs") for t in io[k]):
            problem = "its io.inputs or io.outputs has an entry without a name"
        elif not caches:
            problem = "its io.kv_cache lists no layer"
        elif not isinstance(caches, list) or not all(
                isinstance(c, dict) and c.get("kind") in CACHE_KINDS and all(isinstance(c.get(k), str) for k in CACHE_NAMES)
                for c in caches):
            problem = f"its io.kv_cache is not a list of {{kind, {', '.join(CACHE_NAMES)}}}"
        elif any(tokenizer.get(k) is not None and not is_whole(tokenizer.get(k)) for k in ("bos_token_id", "eos_token_id")):
            problem = "its tokenizer's bos_token_id or eos_token_id is not one token id"
        elif tokenizer.get("eos_token_ids") is not None and not (
                isinstance(tokenizer["eos_token_ids"], list) and all(is_whole(i) for i in tokenizer["eos_token_ids"])):
            problem = "its tokenizer's eos_token_ids is not a list of token ids"
        elif any(i is not None and not 0 <= i < vocab for i in ids):
            problem = f"a token id of its tokenizer is outside the model's vocabulary of {vocab}"
        elif (generation := _generation_problem(manifest.get("generation", {}))) is not None:
            problem = generation
        else:
            return
    raise ArtifactError(f"{path} is damaged or not an edgelm manifest ({problem}); export the model again")


def _generation_problem(generation) -> str | None:
    """What is wrong with a manifest's ``generation`` (its model's sampling defaults), else None."""
    from .errors import InputError
    from .runtime.sampling import model_defaults

    if not isinstance(generation, dict):
        return "its generation is not a JSON object"
    try:
        model_defaults(generation, "its generation")
    except InputError as exc:
        return str(exc).rsplit(";", 1)[0]
    return None


def _verify_checksums(folder: Path, files: dict, progress: bool) -> None:
    from tqdm import tqdm

    from ._fs import sha256_file

    with tqdm(total=sum(meta["bytes"] for meta in files.values()), unit="B", unit_scale=True,
              desc=f"verifying {folder.name}", disable=not progress, leave=False) as bar:
        for name, meta in files.items():
            if sha256_file(folder / name, on_block=bar.update) != meta["sha256"]:
                raise ArtifactError(f"{folder / name} does not match its sha256 in the manifest; the copy is damaged, "
                                    "copy or export the artifact again")


def read_lineage(model_dir: str | Path) -> list[dict]:
    """The step records in a model folder's edgelm_steps.json ([] when it has none)."""
    path = Path(model_dir) / LINEAGE_FILE
    if not path.is_file():
        return []
    try:
        steps = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError(f"{path} is not valid JSON; restore it or delete it (it only records the lineage)") from None
    return steps if isinstance(steps, list) else []
