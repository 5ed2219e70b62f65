"""The ``optimum`` backend: optimum-onnx's exporter, described in edgelm's manifest schema.

Optimum writes one decoder graph with a KV cache (task ``text-generation-with-past``): the first
step gets an empty past of length 0 and every step returns the whole cache, past rows plus new
ones (cache kind "concat", for GPT-Neo's local layers too). It fuses no attention, which is what
the builder backend is measured against. Optimum writes into a scratch folder next to the output;
only ``model.onnx`` (and one ``model.onnx.data`` for large weights) are kept.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from pathlib import Path

from ..errors import InputError, UnsupportedModelError, require
from .arch import ModelFacts

from .graph import EXTERNAL_DATA_BYTES  # noqa: E402  (one threshold for every exporter)
DATA_FILE = "model.onnx.data"
_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_PRESENT = re.compile(r"^present\.(\d+)\.(key|value)$")


def export_with_optimum(model_dir: Path, facts: ModelFacts, dtype: str, out_dir: Path) -> tuple[dict, dict]:
    """Export with optimum-onnx into ``out_dir``; return the manifest's ``graph`` and ``io`` entries."""
    if set(facts.layer_heads) != {facts.num_heads} or set(facts.layer_inner) != {facts.inner_size}:
        raise UnsupportedModelError(
            f"optimum's exporter builds every layer with {facts.num_heads} heads and an MLP width of "
            f"{facts.inner_size}, but this model is pruned (heads per layer {list(facts.layer_heads)}, MLP widths "
            f"{list(facts.layer_inner)}); export it with --backend builder (the default)")
    require("optimum.exporters.onnx", "optimum")
    import torch

    if dtype == "fp16" and not torch.cuda.is_available():
        raise InputError("optimum's fp16 export needs a CUDA GPU and none is available here; "
                         "use --backend builder for fp16 on this machine")
    from optimum.exporters.onnx import main_export

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix=f"{out_dir.name}.optimum-", dir=out_dir.parent) as scratch:
        with warnings.catch_warnings():  # torch's tracer warns about every Python branch it sees
            warnings.simplefilter("ignore")
            main_export(str(model_dir), output=scratch, task="text-generation-with-past",
                        device="cuda" if dtype == "fp16" else "cpu", dtype=dtype,
                        do_validation=False)  # edgelm validates with a longer, left-padded schedule
        external = _place(Path(scratch) / "model.onnx", out_dir)
    model = _load_proto(out_dir / "model.onnx")
    io = io_from_graph(model.graph, facts)
    graph = {"file": "model.onnx", "external_data": external, "dtype": dtype, "backend": "optimum",
             "opset": {imp.domain or "ai.onnx": imp.version for imp in model.opset_import},
             "weight_bytes": _weight_bytes(model.graph)}
    return graph, io


def _load_proto(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=False)


def _place(src: Path, out_dir: Path) -> str | None:
    """Move optimum's graph into ``out_dir`` as model.onnx (+ one model.onnx.data); return the data file name."""
    import onnx

    if not src.is_file():
        raise UnsupportedModelError("optimum-onnx wrote no model.onnx for this model; use --backend builder")
    proto = _load_proto(src)
    has_external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    if not has_external and _weight_bytes(proto.graph) <= EXTERNAL_DATA_BYTES:
        os.replace(src, out_dir / "model.onnx")  # same file system: a rename
        return None
    # Optimum may have written many loose tensor files: gather every weight into one file.
    del proto
    proto = onnx.load(str(src), load_external_data=True)
    onnx.save_model(proto, str(out_dir / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
    return DATA_FILE


def _weight_bytes(graph) -> int:
    """Bytes of every initializer, read from the protobuf (external tensors by their recorded length)."""
    import numpy as np
    import onnx

    total = 0
    for t in graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            total += int({e.key: e.value for e in t.external_data}.get("length", 0))
        else:
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
            total += int(np.prod(t.dims, dtype=np.int64)) * itemsize
    return total


def _value_info(v) -> dict:
    import numpy as np
    import onnx

    tt = v.type.tensor_type
    shape = [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None)
             for d in tt.shape.dim]
    return {"name": v.name, "dtype": np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)).name,
            "shape": shape}


def io_from_graph(graph, facts: ModelFacts) -> dict:
    """The manifest's ``io`` entry (builder.io_spec's schema) read from the graph's own inputs and outputs."""
    inputs = [_value_info(v) for v in graph.input]
    outputs = [_value_info(v) for v in graph.output]
    past = _pairs(inputs, _PAST)
    present = _pairs(outputs, _PRESENT)
    layers = set(range(facts.num_layers))
    if set(past) != layers or set(present) != layers or "logits" not in {o["name"] for o in outputs}:
        raise UnsupportedModelError(
            f"optimum-onnx's graph does not have the expected logits output and past_key_values.N.key/value -> "
            f"present.N.key/value pairs for layers 0..{facts.num_layers - 1} (inputs: "
            f"{[i['name'] for i in inputs]}, outputs: {[o['name'] for o in outputs]}); use --backend builder"
        )
    kv_dtypes = {e["dtype"] for i in layers for e in (*past[i].values(), *present[i].values())}
    if len(kv_dtypes) != 1 or not kv_dtypes <= {"float32", "float16"}:
        raise UnsupportedModelError(f"optimum-onnx's KV cache has dtypes {sorted(kv_dtypes)}; "
                                    "expected one of float32, float16; use --backend builder")
    cache = [{
        "layer": i,
        "past_key": past[i]["key"]["name"], "past_value": past[i]["value"]["name"],
        "present_key": present[i]["key"]["name"], "present_value": present[i]["value"]["name"],
        "kind": "concat",  # present = past rows + new rows, for local layers too
        "window": window or None,
        "share_buffer": False,
        "heads": facts.layer_heads[i], "head_size": facts.head_size,
    } for i, (_, window) in enumerate(facts.layer_kinds)]
    return {"inputs": inputs, "outputs": outputs, "kv_cache": cache, "kv_dtype": kv_dtypes.pop(), "padding": "left"}


def _pairs(values: list[dict], pattern: re.Pattern) -> dict[int, dict[str, dict]]:
    """{layer: {"key": value, "value": value}} for names matching ``pattern``; only complete pairs."""
    found: dict[int, dict[str, dict]] = {}
    for v in values:
        m = pattern.match(v["name"])
        if m:
            found.setdefault(int(m.group(1)), {})[m.group(2)] = v
    return {i: kv for i, kv in found.items() if len(kv) == 2}
