"""The quantization modes, registered by a decorator: each turns an fp32 edgelm graph into a quantized one.

    int8-dynamic  ONNX Runtime's quantize_dynamic: QOperator MatMulInteger (fused by ORT into
                  DynamicQuantizeMatMul), int8 weights per output channel, activations quantized at run time
    int8-static   our SmoothQuant, then ONNX Runtime's quantize_static in QDQ form, calibrated on text
                  (per-tensor activations, per-channel int8 weights)
    int8-weight   weight-only MatMulNBits, 8-bit blocks along K (our RTN or our GPTQ)
    int4-weight   weight-only MatMulNBits, 4-bit blocks along K (our RTN or our GPTQ)

The tied embedding (one [D, V] initializer: lookup Gather + LM head MatMul) is handled on purpose
(``--embeddings``): ``keep`` leaves the LM head in fp32 and the lookup reading the same fp32 table;
``quantize`` quantizes the LM head and serves the lookup from the SAME quantized bytes, so the table
is stored once:
- weight-only: MatMulNBits for the head, com.microsoft GatherBlockQuantized for the lookup, reading a
  Reshape view [V, k_blocks * blob] of the head's [V, k_blocks, blob] bytes with the same scales and
  zero points. With GPTQ the shared table is tuned for the head's output (the lookup then sees a
  larger per-weight error; measured on the embedded GPT-2 at 4 bits: +0.15% perplexity with GPTQ on
  the table against +0.51% with RTN, so the head's error is what matters);
- int8 modes: the int8 head weight [D, V] (per-column scales) is gathered as int8 and scaled:
  Gather(W_q, ids, axis=1) -> Cast -> Mul(Gather(scale, ids)).
The position table stays fp32 (it is small and only gathered).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import helper

from ..errors import InputError
from . import blockwise
from .onnx_edit import MS, Embedding, Graph, declare_float_outputs, find_embedding, load_model, save_model
from .targets import Target


@dataclass(frozen=True)
class Mode:
    name: str
    bits: int
    summary: str
    default_limit: float  # default --max-ppl-increase for this mode (a fraction)
    needs_calibration: Callable[[object], bool]
    transform: Callable[["Job"], tuple[onnx.ModelProto, dict]]


MODES: dict[str, Mode] = {}


def mode(name: str, bits: int, summary: str, default_limit: float, needs_calibration=lambda cfg: False):
    def register(fn):
        MODES[name] = Mode(name, bits, summary, default_limit, needs_calibration, fn)
        return fn

    return register


@dataclass
class Job:
    """Everything a mode needs: the source model on disk, settings, target, and shared calibration."""

    source_model: Path
    manifest: dict
    config: object  # QuantizeConfig
    target: Target
    calibration: "Calibration | None"
    progress: bool
    workdir: Path

    def load(self) -> onnx.ModelProto:
        return load_model(self.source_model)


@dataclass
class Calibration:
    """Statistics captured from the fp32 source model on the calibration windows, computed once and
    shared by every candidate that needs them."""

    windows: object  # calibration.Windows
    manifest: dict
    progress: bool
    _max: dict[str, np.ndarray] = field(default_factory=dict)
    _hessian: dict[str, np.ndarray] = field(default_factory=dict)

    def channel_max(self, model: onnx.ModelProto, tensors: list[str]) -> dict[str, np.ndarray]:
        """max |x_j| over every calibration token, per channel j, of each tensor (..., K)."""
        from .calibration import capture

        missing = [t for t in tensors if t not in self._max]
        if missing:
            def take(name, x):
                m = np.abs(x.reshape(-1, x.shape[-1])).max(axis=0)
                self._max[name] = np.maximum(self._max[name], m) if name in self._max else m

            capture(model, missing, self.windows, self.manifest, take, self.progress, "calibrating (channel max)")
        return {t: self._max[t] for t in tensors}

    def hessians(self, model: onnx.ModelProto, tensors: list[str], keep: bool = True) -> dict[str, np.ndarray]:
        """H = sum over calibration tokens of x^T x (K, K), float64, for each MatMul input tensor.

        ``keep=False`` hands them over without caching (large models: they do not all fit)."""
        from .calibration import capture

        wanted = list(dict.fromkeys(tensors))
        fresh: dict[str, np.ndarray] = {}
        missing = [t for t in wanted if t not in self._hessian]
        if missing:
            def take(name, x):
                x2 = x.reshape(-1, x.shape[-1]).astype(np.float64)  # (tokens, K)
                h = x2.T @ x2
                fresh[name] = fresh[name] + h if name in fresh else h

            capture(model, missing, self.windows, self.manifest, take, self.progress, "calibrating (Hessians)")
            if keep:
                self._hessian.update(fresh)
        return {t: self._hessian[t] if t in self._hessian else fresh[t] for t in wanted}


def _node_name(matmul: onnx.NodeProto, op: str) -> str:
    base, _, last = matmul.name.rpartition("/")
    return f"{base}/{op}" if last == "MatMul" else f"{matmul.name}_{op}"


# -- weight-only: MatMulNBits -----------------------------------------------------------------------
def _weight_only(job: Job, bits: int) -> tuple[onnx.ModelProto, dict]:
    cfg = job.config
    model = job.load()
    g = Graph(model)
    emb = find_embedding(g)
    quantize_head = cfg.embeddings == "quantize"
    hidden = int(job.manifest["model"]["facts"]["hidden_size"])
    if quantize_head and hidden % cfg.block_size:
        raise InputError(f"--block-size {cfg.block_size} does not divide the hidden size {hidden}, which the "
                         "quantized embedding lookup needs; choose a block size that divides it, or --embeddings keep")
    if cfg.block_size > hidden:  # every block would be mostly padding: a bigger model than the fp32 one
        raise InputError(f"--block-size {cfg.block_size} is larger than the hidden size {hidden}; choose at most {hidden}")
    targets = [m for m in g.constant_matmuls() if quantize_head or m is not emb.head]

    from tqdm import tqdm

    # Quantize first (Hessians from the untouched fp32 graph, a chunk at a time so that they fit in
    # memory), then swap the nodes.
    packed, errors = {}, []
    bar = tqdm(total=len(targets), desc=f"quantizing ({cfg.algorithm})", unit="matmul", disable=not job.progress,
               leave=False)
    for chunk in _hessian_chunks(g, targets) if cfg.algorithm == "gptq" else [targets]:
        hessians = {}
        if cfg.algorithm == "gptq":
            inputs = [m.input[0] for m in chunk]
            hessians = job.calibration.hessians(model, inputs, keep=len(chunk) == len(targets))
        for m in chunk:
            w = g.array(m.input[1])  # [K, N]
            h = hessians.get(m.input[0])
            qw = blockwise.gptq(w, h, bits, cfg.block_size) if h is not None else blockwise.rtn(w, bits, cfg.block_size)
            if h is not None:
                rtn_err = _hessian_error(w, blockwise.rtn(w, bits, cfg.block_size), h)
                errors.append({"matmul": m.name, "rtn": rtn_err, "gptq": _hessian_error(w, qw, h)})
            packed[m.name] = (w.shape, blockwise.pack(qw))
            bar.update()
        del hessians
    bar.close()

    accuracy = job.target.nbits_accuracy_level
    for m in targets:
        (k, n), (b, scales, zeros) = packed.pop(m.name)
        base = m.input[1]
        names = (g.add(f"{base}.q{bits}", b), g.add(f"{base}.scales", scales), g.add(f"{base}.zero_points", zeros))
        attrs = dict(K=int(k), N=int(n), bits=bits, block_size=cfg.block_size)
        if accuracy:
            attrs["accuracy_level"] = accuracy
        node = helper.make_node("MatMulNBits", [m.input[0], *names], [m.output[0]], name=_node_name(m, "MatMulNBits"),
                                domain=MS, **attrs)
        g.replace(m, [node])

    lookup = "fp32 Gather (kept)"
    if quantize_head:
        if emb.tied:
            base = emb.head_weight
            _serve_lookup_nbits(g, emb, f"{base}.q{bits}", f"{base}.scales", f"{base}.zero_points", bits, cfg.block_size)
            lookup = ("GatherBlockQuantized on the LM head's MatMulNBits bytes (a Reshape view; stored once), "
                      f"{bits}-bit {cfg.algorithm.upper()}")
        else:
            table = g.array(emb.table)  # [V, D]
            b, scales, zeros = blockwise.pack(blockwise.rtn(table.T, bits, cfg.block_size))
            base = emb.table
            names = (g.add(f"{base}.q{bits}", b), g.add(f"{base}.scales", scales), g.add(f"{base}.zero_points", zeros))
            _serve_lookup_nbits(g, emb, *names, bits, cfg.block_size)
            lookup = f"GatherBlockQuantized on its own {bits}-bit RTN table (embedding not tied)"
    removed = g.remove_unused_initializers()
    record = {
        "format": "MatMulNBits (com.microsoft), QOperator",
        "bits": bits, "block_size": cfg.block_size, "algorithm": cfg.algorithm,
        "accuracy_level": accuracy, "symmetric": False,
        "quantized_matmuls": len(targets), "removed_fp32_initializers": len(removed),
        "embeddings": {
            "setting": cfg.embeddings, "tied": emb.tied,
            "lm_head": (f"MatMulNBits {bits}-bit, block {cfg.block_size}, {cfg.algorithm.upper()}"
                        + (" (the same bytes serve the lookup)" if emb.tied else ""))
            if quantize_head else "fp32 MatMul (kept)",
            "lookup": lookup,
            "positions": "fp32 Gather (kept: small, only gathered)",
        },
    }
    if errors:
        record["gptq_output_error"] = {
            "what": "relative output error on the calibration tokens, ||X(W-Q)|| / ||XW||, per MatMul",
            "mean_rtn": float(f"{np.mean([e['rtn'] for e in errors]):.4g}"),
            "mean_gptq": float(f"{np.mean([e['gptq'] for e in errors]):.4g}"),
            "per_matmul": [{k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in e.items()}
                           for e in errors],
            "damp": 0.01, "act_order": False, "sequential": False,
        }
    return model, record


HESSIAN_BUDGET_BYTES = 2 << 30  # GPTQ: Hessians held at once (float64 K x K each)


def _hessian_chunks(g: Graph, targets: list[onnx.NodeProto]) -> list[list[onnx.NodeProto]]:
    """Targets in graph order, grouped so that each group's Hessians fit the budget (one pass each)."""
    chunks, size = [[]], 0
    for m in targets:
        k = g.initializer(m.input[1]).dims[0]
        if chunks[-1] and size + 8 * k * k > HESSIAN_BUDGET_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(m)
        size += 8 * k * k
    return chunks


def _hessian_error(w: np.ndarray, qw: blockwise.BlockQuantized, h: np.ndarray) -> float:
    """||X (W - Q)||_F / ||X W||_F from H = X^T X alone."""
    d = (w - qw.dequantize()).astype(np.float64)
    num = float(np.einsum("kn,kl,ln->", d, h, d))
    den = float(np.einsum("kn,kl,ln->", w.astype(np.float64), h, w.astype(np.float64)))
    return (max(num, 0.0) / max(den, 1e-30)) ** 0.5


def _serve_lookup_nbits(g: Graph, emb: Embedding, b: str, scales: str, zeros: str, bits: int, block_size: int):
    """Replace the lookup Gather by GatherBlockQuantized over a [V, k_blocks * blob] view of ``b``."""
    lookup = emb.lookup
    p = lookup.name.rpartition("/")[0] or "/model/embed_tokens"
    v = g.initializer(b).dims[0]
    shape = g.add(f"{p}/view_shape", np.array([v, -1], dtype=np.int64))
    view = helper.make_node("Reshape", [b, shape], [f"{p}/table_view"], name=f"{p}/TableView")
    axis = next((a.i for a in lookup.attribute if a.name == "axis"), 0)
    out = lookup.output[0]
    replaced = [lookup]
    if axis == 1:  # tied [D, V] table: the Gather gave (D, B, S); a Transpose(1, 2, 0) follows
        users = g.consumers(out)
        perm = [list(a.ints) for a in users[0].attribute if a.name == "perm"] if len(users) == 1 else []
        if len(users) == 1 and users[0].op_type == "Transpose" and perm == [[1, 2, 0]]:
            final, transpose = users[0].output[0], []
            replaced.append(users[0])
        else:
            final = f"{p}/GatherBlockQuantized/output_0"
            transpose = [helper.make_node("Transpose", [final], [out], name=f"{p}/ToColumns", perm=[2, 0, 1])]
    else:
        final, transpose = out, []
    gbq = helper.make_node("GatherBlockQuantized", [f"{p}/table_view", lookup.input[1], scales, zeros], [final],
                           name=f"{p}/GatherBlockQuantized", domain=MS, gather_axis=0, quantize_axis=1,
                           block_size=block_size, bits=bits)
    for extra in replaced[1:]:
        g.graph.node.remove(extra)
    g.replace(lookup, [view, gbq, *transpose])


@mode("int8-weight", 8, "weight-only int8 MatMulNBits (block-wise, RTN or GPTQ)", 0.015,
      needs_calibration=lambda cfg: cfg.algorithm == "gptq")
def int8_weight(job: Job):
    return _weight_only(job, 8)


@mode("int4-weight", 4, "weight-only int4 MatMulNBits (block-wise, RTN or GPTQ)", 0.05,
      needs_calibration=lambda cfg: cfg.algorithm == "gptq")
def int4_weight(job: Job):
    return _weight_only(job, 4)


# -- int8 with ONNX Runtime's quantizers ------------------------------------------------------------
def _serve_lookup_int8(g: Graph, lookup: onnx.NodeProto) -> str:
    """The lookup reads the LM head's int8 [D, V] weight: QOperator leaves it as ``<table>_quantized``
    (+ ``_scale``, ``_zero_point``); QDQ puts a DequantizeLinear in front of both users."""
    base = lookup.input[0]
    dq = g.producer(base)
    if dq is not None and dq.op_type == "DequantizeLinear":
        q, scale, zero = dq.input[0], dq.input[1], dq.input[2]
    else:
        q, scale, zero = f"{base}_quantized", f"{base}_scale", f"{base}_zero_point"
    if any(g.initializer(t) is None for t in (q, scale, zero)) or len(g.initializer(scale).dims) != 1:
        raise RuntimeError(f"ONNX Runtime's quantizer did not leave {q}/{scale}/{zero} (per-channel) for the "
                           "LM head; cannot share the int8 table with the lookup")
    p = lookup.name.rpartition("/")[0] or "/model/embed_tokens"
    ids, out = lookup.input[1], lookup.output[0]
    nodes = [helper.make_node("Gather", [q, ids], [f"{p}/columns_int8"], name=f"{p}/GatherInt8", axis=1),  # (D,B,S)
             helper.make_node("Cast", [f"{p}/columns_int8"], [f"{p}/columns"], name=f"{p}/Cast", to=onnx.TensorProto.FLOAT)]
    cols = f"{p}/columns"
    if np.any(g.array(zero)):
        nodes += [helper.make_node("Gather", [zero, ids], [f"{p}/zero_int8"], name=f"{p}/GatherZero", axis=0),
                  helper.make_node("Cast", [f"{p}/zero_int8"], [f"{p}/zero"], name=f"{p}/CastZero",
                                   to=onnx.TensorProto.FLOAT),
                  helper.make_node("Sub", [cols, f"{p}/zero"], [f"{p}/centered"], name=f"{p}/SubZero")]
        cols = f"{p}/centered"
    nodes += [helper.make_node("Gather", [scale, ids], [f"{p}/scale"], name=f"{p}/GatherScale", axis=0),  # (B, S)
              helper.make_node("Mul", [cols, f"{p}/scale"], [out], name=f"{p}/Dequantize")]  # (D,B,S)*(B,S)
    g.replace(lookup, nodes)
    return "int8 Gather on the LM head's int8 bytes, scaled per token (Gather -> Cast -> Mul; stored once)"


def _run_ort_quantizer(job: Job, holder: list, quantize: Callable[[str, str, bool], None]) -> onnx.ModelProto:
    """Save the model in ``holder`` (a one-item list, emptied so that only ORT's copy stays in memory)
    to the work folder, let ORT quantize it file to file, and load the result."""
    import logging

    root = logging.getLogger()
    level = root.level
    with tempfile.TemporaryDirectory(prefix="ort-q-", dir=job.workdir) as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        big = save_model(holder.pop(), src) is not None
        root.setLevel(logging.ERROR)  # ORT's quantizers warn on the root logger about pre-processing we do not need
        try:
            quantize(str(src), str(dst), big)
        finally:
            root.setLevel(level)
        return load_model(dst)


def _embedding_names(model: onnx.ModelProto) -> tuple[str, str, bool]:
    """(lookup node, LM head node, tied) by name: names survive ORT's quantizers, node objects do not."""
    emb = find_embedding(Graph(model))
    return emb.lookup.name, emb.head.name, emb.tied


def _int8_embedding(job: Job, model: onnx.ModelProto, lookup: str, tied: bool,
                    what_head: str) -> tuple[onnx.ModelProto, dict]:
    """After ORT's quantizer: serve the lookup (found by its node name) from the int8 head weight."""
    g = Graph(model)
    record = {"setting": job.config.embeddings, "tied": tied, "positions": "fp32 Gather (kept: small, only gathered)"}
    if job.config.embeddings == "quantize":
        record["lm_head"] = what_head
        record["lookup"] = (_serve_lookup_int8(g, g.node(lookup)) if tied
                            else "fp32 Gather (kept: the embedding is not tied to the LM head)")
    else:
        record["lm_head"], record["lookup"] = "fp32 MatMul (kept)", "fp32 Gather (kept)"
    removed = g.remove_unused_initializers()
    return model, {"embeddings": record, "removed_fp32_initializers": len(removed)}


@mode("int8-dynamic", 8, "dynamic int8 (ONNX Runtime quantize_dynamic, QOperator MatMulInteger)", 0.015)
def int8_dynamic(job: Job):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if "int8-dynamic" not in job.target.modes:
        raise InputError(f"int8-dynamic has no kernels on target {job.target.name}: {job.target.why}")
    model = job.load()
    declare_float_outputs(model)
    lookup, head, tied = _embedding_names(model)
    exclude = [] if job.config.embeddings == "quantize" else [head]
    reduce_range = job.target.dynamic_reduce_range

    def run(src, dst, big):
        quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=reduce_range,
                         weight_type=QuantType.QInt8, nodes_to_exclude=exclude, use_external_data_format=big,
                         extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})

    holder = [model]
    del model
    model = _run_ort_quantizer(job, holder, run)
    model, emb_record = _int8_embedding(job, model, lookup, tied, "MatMulInteger int8, per-column scales")
    return model, {"format": "QOperator (MatMulInteger + DynamicQuantizeLinear; ORT fuses them into "
                             "DynamicQuantizeMatMul at load)",
                   "weights": "int8 symmetric, per output channel" + (" (7-bit)" if reduce_range else ""),
                   "activations": "uint8, quantized per tensor at run time",
                   "reduce_range": reduce_range, **emb_record}


@mode("int8-static", 8, "static int8 QDQ, calibrated, with SmoothQuant", 0.015, needs_calibration=lambda cfg: True)
def int8_static(job: Job):
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from .calibration import Reader
    from .smoothquant import find_pairs, smooth

    cfg, target = job.config, job.target
    model = job.load()
    smoothing = []
    if cfg.smooth_alpha:
        g = Graph(model)
        pairs = find_pairs(g)
        act_max = job.calibration.channel_max(model, [p.activation for p in pairs])
        smoothing = smooth(g, pairs, act_max, cfg.smooth_alpha)
        del g, pairs
    declare_float_outputs(model)
    lookup, head, tied = _embedding_names(model)
    exclude = [] if cfg.embeddings == "quantize" else [head]
    symmetric = target.static_activations == "int8"

    def run(src, dst, big):
        quantize_static(src, dst, Reader(job.calibration.windows, job.manifest, job.progress, "calibrating (ranges)"),
                        quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"], per_channel=True,
                        reduce_range=target.static_reduce_range,
                        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                        weight_type=QuantType.QInt8, nodes_to_exclude=exclude, use_external_data_format=big,
                        calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT,
                                       "OpTypesToExcludeOutputQuantization": ["MatMul"],
                                       "ActivationSymmetric": symmetric, "WeightSymmetric": True})

    holder = [model]
    del model
    model = _run_ort_quantizer(job, holder, run)
    model, emb_record = _int8_embedding(job, model, lookup, tied, "QDQ int8 (DequantizeLinear per column) -> MatMul")
    return model, {"format": "QDQ (QuantizeLinear/DequantizeLinear around every MatMul input)",
                   "weights": "int8 symmetric, per output channel" + (" (7-bit)" if target.static_reduce_range else ""),
                   "activations": ("int8 symmetric" if symmetric else "uint8 asymmetric") + ", per tensor, MinMax "
                                  "calibration; MatMul outputs stay float",
                   "smoothquant": {"alpha": cfg.smooth_alpha, "pairs": smoothing} if cfg.smooth_alpha else "off",
                   **emb_record}
