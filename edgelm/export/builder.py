"""Build the one decoder graph (prompt and decode) for any architecture in ``arch.ARCHITECTURES``.

Graph, per layer (pre-LayerNorm transformer; fused com.microsoft operators; each MatMul below is
a 1x1 Conv in the conv linear layout):

    x, resid = SkipLayerNormalization(prev_mlp_out, prev_resid, ln_1, bias=prev_proj_bias)
    qkv      = MatMul(x, W_qkv) [+ b_qkv]                               # (B, S, 3*N*H)
    attn, present_k, present_v = GroupQueryAttention(qkv, past_k, past_v, seqlens_k, total_len,
                                                     attention_bias)   # (B, S, N*H), (B, N, L, H)
    x, resid = SkipLayerNormalization(MatMul(attn, W_o), resid, ln_2, bias=b_o)
    mlp_out  = MatMul(FastGelu(MatMul(x, W_fc), b_fc), W_proj)   # packed: PackedLinear(x, W_fc, b_fc, gelu)

N (heads) and the MLP width may differ per layer (structurally pruned models: ``facts.layer_heads``,
``facts.layer_inner``); the head size H is the same in every layer.

The first LayerNorm adds the token and position embeddings with the same SkipLayerNormalization,
and the last one applies ln_f. The tied embedding is stored once, as [D, V]: the LM head reads it
as a constant MatMul weight (the layout ONNX Runtime's quantizers expect) and the embedding
lookup gathers its columns.

Linear layout (``linear_layout``; the manifest's ``graph.linear_layout``):
- ``matmul``: every projection is ``MatMul(x, W[K, N])``, the layout ONNX Runtime's quantizers take.
- ``packed``: every projection and the LM head is ``ai.edgelm.PackedLinear(x, W, b)``, edgelm's own
  operator (edgelm/runtime/native), over W stored as panels of 16 output columns, (N/16, K, 16):
  one decode step reads each weight once, front to back. The tied embedding is stored once, packed;
  the lookup is ``ai.edgelm.PackedEmbedding`` over the same panels. The LayerNorm before the QKV and
  MLP projections runs inside their PackedLinear. Attention is ``ai.edgelm.CachedAttention``, with
  GroupQueryAttention's attributes and the cache contract below; it takes attention_mask itself, so
  the packed graph has none of the 15 nodes that turn the mask into GroupQueryAttention's inputs.
  Needs edgelm's operator library wherever the graph runs (edgelm's runtime registers it); fp32, CPU.
- ``conv``: every projection inside the layers is a 1x1 convolution over the tokens,
  ``Reshape(x, [1, T, 1, K]) -> Transpose -> Conv(W[N, K, 1, 1], b) -> Transpose -> Reshape``.
  ONNX Runtime's CPU provider turns it into its blocked NCHWc convolution: whole decode 1.04-1.08x
  the MatMul form (benchmarks/layout_ab.py), and the QKV bias rides in the same kernel. fp32 only
  (the NCHWc kernels are fp32); quantization turns it back into MatMul (``optimize.onnx_edit.conv_to_matmul``).

Cache contract (written to the manifest, read by the runtime):
- global layers ("full"): past has any length P, present has P + S rows; or past and present are
  one preallocated buffer of the maximum length, bound to both (the operator appends in place).
- local layers ("window", GPT-Neo): past and present are one buffer of a capacity C >= window
  that the operator compacts itself (``sliding_window_cache``); rows [0, L(T)) hold the most
  recent positions, L(T) = T if T <= C else T - G * ceil((T - C) / G), G = C - window + 1.
- attention_mask covers past and new tokens; position_ids are given by the caller. How a batch
  of prompts of different lengths is laid out is the manifest's ``io.padding``:
  - ``left`` (fp32 graphs): left padding allowed, every row at the same length; padded keys are
    masked through GroupQueryAttention's attention bias (CachedAttention reads the mask itself).
  - ``right`` (fp16 graphs, which are for CUDA, whose GroupQueryAttention takes no attention bias):
    each row's tokens are a prefix of its cache rows and of its attention_mask, which is 1 on the
    row's first T_b positions and 0 after them; seqlens_k = T_b - 1 per row. A batched call
    appends S rows to every row, so rows of different lengths are prefilled one row at a time
    (the runtime binds each row's slice of the cache) and then decoded together.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto

from ..errors import UnsupportedModelError
from ..runtime.native import pack_panels
from .arch import ACTIVATIONS, LAYER_HEADS, LAYER_INNER, ArchSpec, ModelFacts
from .checkpoint import Checkpoint
from .graph import GraphBuilder

DTYPES = {"fp32": (np.float32, TensorProto.FLOAT), "fp16": (np.float16, TensorProto.FLOAT16)}
MASK_VALUE = -1.0e9  # the attention bias of masked keys (fp32 graphs; fp16 graphs have no bias)
OPSET_NOTE = {"ai.onnx": 17, "com.microsoft": 1}
LINEAR_LAYOUTS = ("matmul", "conv", "packed")
PACKED_GELU_TANH = 1  # PackedLinear's activation attribute for FastGelu (edgelm/runtime/native/ops.c)


def default_linear_layout(dtype: str) -> str:
    """conv for fp32 (faster on ONNX Runtime's CPU provider), matmul for fp16 (GPU kernels)."""
    return "conv" if dtype == "fp32" else "matmul"


PADDINGS = ("left", "right")


def default_padding(dtype: str) -> str:
    """The manifest's ``io.padding`` (module docstring): "right" for fp16 graphs (CUDA), "left" for fp32."""
    return "right" if dtype == "fp16" else "left"


def io_spec(facts: ModelFacts, dtype: str, padding: str | None = None) -> dict:
    """Every input and output with dtype and symbolic shape, the cache kind of each layer and the
    batch padding (``padding``: None for the dtype's default)."""
    # the KV cache takes the graph's dtype: GPT-Neo's attention too is fp16 in fp16 graphs. HF upcasts
    # GPT-Neo's q and k to fp32 because its scores are unscaled; GroupQueryAttention sums q.k in fp32
    # whatever its inputs (ONNX Runtime's CPU kernel in fp32, its CUDA flash and memory-efficient
    # kernels in fp32 registers), and the CUDA provider has it for fp16 and bf16 only.
    kv = {"fp32": "float32", "fp16": "float16"}[dtype]
    h = facts.head_size
    inputs = [
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
        {"name": "position_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
        {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "total_sequence"]},
        {"name": "num_logits_to_keep", "dtype": "int64", "shape": []},
    ]
    outputs = [{"name": "logits", "dtype": "float32", "shape": ["batch", "logits_sequence", facts.vocab_size]}]
    cache = []
    for i, (kind, window) in enumerate(facts.layer_kinds):
        n = facts.layer_heads[i]
        past_len = "past_sequence" if kind == "global" else "window_capacity"
        present_len = "past_sequence + sequence" if kind == "global" else "window_capacity"
        for part in ("key", "value"):
            inputs.append({"name": f"past_key_values.{i}.{part}", "dtype": kv, "shape": ["batch", n, past_len, h]})
            outputs.append({"name": f"present.{i}.{part}", "dtype": kv, "shape": ["batch", n, present_len, h]})
        cache.append({
            "layer": i,
            "past_key": f"past_key_values.{i}.key", "past_value": f"past_key_values.{i}.value",
            "present_key": f"present.{i}.key", "present_value": f"present.{i}.value",
            "kind": "full" if kind == "global" else "window",
            "window": window or None,
            "share_buffer": True,
            "heads": n, "head_size": h,  # per layer: a pruned model keeps fewer heads in some layers
        })
    return {"inputs": inputs, "outputs": outputs, "kv_cache": cache, "kv_dtype": kv,
            "padding": padding or default_padding(dtype)}


class _Weights:
    """Reads, lays out and casts checkpoint tensors for one ArchSpec."""

    def __init__(self, spec: ArchSpec, ckpt: Checkpoint, np_dtype):
        self.spec, self.ckpt, self.np_dtype = spec, ckpt, np_dtype

    def linear(self, lw, i: int):
        parts = []
        for name in lw.names:
            w = self.ckpt.read(name.format(i=i))
            parts.append(w.T if lw.transpose else w)  # -> [in, out]
        weight = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        bias = None
        if lw.bias:
            bias = np.concatenate([self.ckpt.read(b.format(i=i)) for b in lw.bias])
        return weight.astype(self.np_dtype), None if bias is None else bias.astype(self.np_dtype)

    def norm(self, prefix: str, i: int | None = None):
        p = prefix.format(i=i)
        return self.ckpt.read(p + ".weight").astype(self.np_dtype), self.ckpt.read(p + ".bias").astype(self.np_dtype)


class _Linear:
    """Emits one projection y = x @ W [+ b] in the graph's linear layout; W is [in, out]."""

    def __init__(self, g: GraphBuilder, layout: str, batch: str):
        self.g, self.layout, self.batch = g, layout, batch
        self._shapes: dict[tuple[str, int], str] = {}

    def _shape(self, kind: str, size: int) -> str:
        key = (kind, size)
        if key not in self._shapes:
            p = f"/model/linear/{kind}{size}"
            if kind == "in":  # (B, S, K) -> (1, B*S, 1, K): the tokens become the conv's spatial axis
                self._shapes[key] = self.g.const(p, [1, -1, 1, size])
            else:  # (1, B*S, 1, N) -> (B, S, N)
                self._shapes[key] = self.g.node("Concat", [self.batch, self.g.const(f"{p}/rest", [-1, size])],
                                                name=p, axis=0)
        return self._shapes[key]

    def __call__(self, x: str, name: str, weight: np.ndarray, bias: np.ndarray | None, prefix: str,
                 gelu: bool = False, norm: tuple | None = None):
        """Packed layout only: ``gelu``, GELU's tanh form on the output; ``norm``, the residual stream's
        SkipLayerNormalization before the projection, in the same operator: (skip, gamma, beta,
        skip_bias or None, epsilon, name of the new residual stream). With ``norm``, ``x`` is the
        LayerNorm's input and the call returns (output, residual stream)."""
        g = self.g
        if self.layout == "packed":
            inputs = [x, g.weight(f"{name}.weight_panels", pack_panels(weight)),
                      g.weight(f"{name}.bias", bias) if bias is not None else ""]
            extra = {"activation": PACKED_GELU_TANH} if gelu else {}
            outputs: list[str] | int = 1
            if norm:
                skip, gamma, beta, skip_bias, eps, residual = norm
                inputs += [skip, gamma, beta] + ([skip_bias] if skip_bias else [])
                extra["epsilon"] = eps
                outputs = [f"{prefix}/PackedLinear/output_0", residual]
            elif bias is None:
                inputs.pop()
            return g.node("PackedLinear", inputs, outputs, name=f"{prefix}/PackedLinear", n=weight.shape[1], **extra)
        if gelu or norm:
            raise ValueError("a fused activation or LayerNorm needs the packed layout")
        if self.layout == "matmul":
            y = g.node("MatMul", [x, g.weight(f"{name}.weight", weight)], name=f"{prefix}/MatMul")
            if bias is not None:
                y = g.node("Add", [y, g.weight(f"{name}.bias", bias)], name=f"{prefix}/Add")
            return y
        k, n = weight.shape
        w = g.weight(f"{name}.weight", weight.T.reshape(n, k, 1, 1))
        inputs = [w] if bias is None else [w, g.weight(f"{name}.bias", bias)]
        r = g.node("Reshape", [x, self._shape("in", k)], name=f"{prefix}/ToTokens")
        t = g.node("Transpose", [r], name=f"{prefix}/ToChannels", perm=[0, 3, 1, 2])  # (1, K, B*S, 1)
        c = g.node("Conv", [t] + inputs, name=f"{prefix}/Conv")  # (1, N, B*S, 1)
        t = g.node("Transpose", [c], name=f"{prefix}/FromChannels", perm=[0, 2, 3, 1])  # (1, B*S, 1, N)
        return g.node("Reshape", [t, self._shape("out", n)], name=f"{prefix}/FromTokens")


def _skip_layer_norm(g: GraphBuilder, x: str, norm: tuple, p: str) -> tuple[str, str]:
    """SkipLayerNormalization of ``x`` (``norm`` as _Linear takes it) -> (normalized, residual stream)."""
    skip, gamma, beta, skip_bias, eps, residual = norm
    inputs = [x, skip, gamma, beta] + ([skip_bias] if skip_bias else [])
    out, _, _, resid = g.node("SkipLayerNormalization", inputs, [f"{p}/output_0", "", "", residual],
                              name=f"{p}/SkipLayerNorm", epsilon=eps)
    return out, resid


def _check_shape(what: str, weight: np.ndarray, expected: tuple[int, int], implied: str, fix: str) -> None:
    """The graph is built from the weights' shapes, the cache and the manifest from the config's: they must agree."""
    if weight.shape != expected:
        raise UnsupportedModelError(f"{what} is {list(weight.shape)} where config.json implies {list(expected)} "
                                    f"({implied}); {fix}")


def _check_layer(facts: ModelFacts, i: int, what: str, weight: np.ndarray, expected: tuple[int, int]) -> None:
    _check_shape(f"layer {i}'s {what} weight", weight, expected,
                 f"[in, out]: {facts.layer_heads[i]} heads of {facts.head_size}, MLP width {facts.layer_inner[i]}",
                 f"a pruned model's config.json needs {LAYER_HEADS} and {LAYER_INNER} that match its weights")


def _check_embedding(spec: ArchSpec, facts: ModelFacts, name: str, weight: np.ndarray, field: str, rows: int) -> None:
    """wte, wpe, lm_head: [config's ``field``, hidden]. More rows are logits the manifest does not list;
    fewer, token or position ids that ONNX Runtime's Gather refuses at generate time."""
    _check_shape(f"the checkpoint's {name}", weight, (rows, facts.hidden_size),
                 f"{field} {rows}, {spec.hidden_size} {facts.hidden_size}",
                 "correct config.json to match the checkpoint, or download the model again")


def attention_metadata(g: GraphBuilder, ids: str, mask: str, dtype: str, padding: str = "left"):
    """GroupQueryAttention's inputs from input_ids and attention_mask, shared by every layer: the batch
    size (1-d), seqlens_k (B,), total_sequence_length (int32 scalar) and the attention bias (B, 1, S, T),
    0 where the mask is 1 and MASK_VALUE where it is 0.
    optimize.onnx_edit.packed_to_matmul writes the same nodes when it turns CachedAttention back.

    ``padding`` "right": no bias (None), and seqlens_k is each row's own length - 1, the sum of its
    mask row - 1 (module docstring)."""
    np_dtype, elem = DTYPES[dtype]
    p = "/model/attn_mask"
    mask_shape = g.node("Shape", [mask], name=f"{p}/Shape")
    ids_shape = g.node("Shape", [ids], name=f"{p}/ShapeIds")
    total64 = g.node("Gather", [mask_shape, g.const(f"{p}/one", 1)], name=f"{p}/Total", axis=0)
    batch = g.node("Slice", [ids_shape, g.const(f"{p}/s0", [0]), g.const(f"{p}/s1", [1])], name=f"{p}/Batch")
    total = g.node("Cast", [total64], name=f"{p}/TotalInt32", to=TensorProto.INT32)
    if padding == "right":
        lengths = g.node("ReduceSum", [mask, g.const(f"{p}/axis1", [1])], name=f"{p}/RowLengths", keepdims=0)
        lengths32 = g.node("Cast", [lengths], name=f"{p}/RowLengthsInt32", to=TensorProto.INT32)
        seqlens_k = g.node("Sub", [lengths32, g.const(f"{p}/one32", 1, np.int32)], name=f"{p}/SeqlensK")
        return batch, seqlens_k, total, None
    seq = g.node("Slice", [ids_shape, g.const(f"{p}/s1b", [1]), g.const(f"{p}/s2", [2])], name=f"{p}/Seq")
    last = g.node("Sub", [total, g.const(f"{p}/one32", 1, np.int32)], name=f"{p}/Last")
    seqlens_k = g.node("Expand", [last, batch], name=f"{p}/SeqlensK")
    mask_f = g.node("Cast", [mask], name=f"{p}/MaskFloat", to=elem)
    neg = g.node("Sub", [mask_f, g.const(f"{p}/onef", 1.0, np_dtype)], name=f"{p}/MaskMinusOne")
    bias2d = g.node("Mul", [neg, g.const(f"{p}/big", -MASK_VALUE, np_dtype)], name=f"{p}/Bias2d")
    bias4d = g.node("Unsqueeze", [bias2d, g.const(f"{p}/axes", [1, 2])], name=f"{p}/Bias4d")
    total_1d = g.node("Unsqueeze", [total64, g.const(f"{p}/axis0", [0])], name=f"{p}/Total1d")
    bias_shape = g.node("Concat", [batch, g.const(f"{p}/one1d", [1]), seq, total_1d], name=f"{p}/BiasShape", axis=0)
    attn_bias = g.node("Expand", [bias4d, bias_shape], name=f"{p}/AttentionBias")
    return batch, seqlens_k, total, attn_bias


def build_graph(spec: ArchSpec, facts: ModelFacts, ckpt: Checkpoint, dtype: str, onnx_path: Path,
                external: bool, progress=None, linear_layout: str = "matmul", padding: str | None = None) -> dict:
    """Write ``onnx_path`` (and ``onnx_path + '.data'`` when ``external``); return a summary.

    ``padding``: the batch contract (module docstring), None for the dtype's default."""
    padding = padding or default_padding(dtype)
    if linear_layout not in LINEAR_LAYOUTS:
        raise ValueError(f"linear layout {linear_layout!r} is not one of {LINEAR_LAYOUTS}")
    if padding not in PADDINGS or (padding == "right" and linear_layout == "packed"):
        raise ValueError(f"padding {padding!r} is not one of {PADDINGS} (the packed layout's attention takes left padding)")
    if linear_layout != "matmul" and dtype != "fp32":
        raise ValueError(f"the {linear_layout} linear layout is for fp32 graphs (its kernels are fp32)")
    np_dtype, elem = DTYPES[dtype]
    g = GraphBuilder("edgelm_decoder", onnx_path.with_name(onnx_path.name + ".data") if external else None)
    w = _Weights(spec, ckpt, np_dtype)
    h, d = facts.head_size, facts.hidden_size
    try:
        ids = g.input("input_ids", TensorProto.INT64, ["batch", "sequence"])
        pos_ids = g.input("position_ids", TensorProto.INT64, ["batch", "sequence"])
        mask = g.input("attention_mask", TensorProto.INT64, ["batch", "total_sequence"])
        keep = g.input("num_logits_to_keep", TensorProto.INT64, [])
        for i, (kind, _) in enumerate(facts.layer_kinds):
            length = "past_sequence" if kind == "global" else "window_capacity"
            for part in ("key", "value"):
                g.input(f"past_key_values.{i}.{part}", elem, ["batch", facts.layer_heads[i], length, h])

        # -- attention metadata, shared by every layer: (B,), scalar, (B, 1, S, T) ---------
        # (edgelm's CachedAttention derives them from the mask itself)
        batch = seqlens_k = total = attn_bias = None
        if linear_layout != "packed":
            batch, seqlens_k, total, attn_bias = attention_metadata(g, ids, mask, dtype, padding)
        linear = _Linear(g, linear_layout, batch)

        # -- embeddings: the tied [D, V] weight is gathered by column ------------------------
        p = "/model/embed_tokens"
        wte = ckpt.read(spec.wte).astype(np_dtype)  # (V, D)
        _check_embedding(spec, facts, spec.wte, wte, "vocab_size", facts.vocab_size)
        if facts.tied_embeddings and linear_layout == "packed":
            emb_table = g.weight("model.embed_tokens.weight_panels", pack_panels(wte.T))  # (V/16, D, 16)
            tok = g.node("PackedEmbedding", [ids, emb_table], name=f"{p}/PackedEmbedding", n=facts.vocab_size)
            lm_head = emb_table
        elif facts.tied_embeddings:
            emb_table = g.weight("model.embed_tokens.weight_t", wte.T)  # (D, V), shared with lm_head
            cols = g.node("Gather", [emb_table, ids], name=f"{p}/Gather", axis=1)  # (D, B, S)
            tok = g.node("Transpose", [cols], name=f"{p}/Transpose", perm=[1, 2, 0])  # (B, S, D)
            lm_head = emb_table
        else:
            tok = g.node("Gather", [g.weight("model.embed_tokens.weight", wte), ids], name=f"{p}/Gather")
            head = ckpt.read("lm_head.weight").astype(np_dtype)
            _check_embedding(spec, facts, "lm_head.weight", head, "vocab_size", facts.vocab_size)
            head = head.T  # (D, V)
            lm_head = (g.weight("lm_head.weight_panels", pack_panels(head)) if linear_layout == "packed"
                       else g.weight("lm_head.weight_t", head))
        del wte
        wpe = ckpt.read(spec.wpe).astype(np_dtype)  # (P, D)
        _check_embedding(spec, facts, spec.wpe, wpe, spec.max_positions, facts.max_positions)
        pos = g.node("Gather", [g.weight("model.embed_positions.weight", wpe), pos_ids],
                     name="/model/embed_positions/Gather")
        del wpe

        eps = facts.layer_norm_eps
        stream_in, stream_skip, stream_bias = tok, pos, None
        act_op = ACTIVATIONS[facts.activation]
        layers = range(facts.num_layers)
        for i in (progress(layers, desc="writing layers", unit="layer") if progress else layers):
            p = f"/model/layers.{i}"
            kind, window = facts.layer_kinds[i]
            n, m = facts.layer_heads[i], facts.layer_inner[i]
            gamma, beta = w.norm(spec.ln_1, i)
            ln_1 = (stream_skip, g.weight(f"{p}.ln_1.weight", gamma), g.weight(f"{p}.ln_1.bias", beta), stream_bias,
                    eps, f"{p}/ln_1/output_3")
            # attention
            wq, bq = w.linear(spec.qkv, i)
            _check_layer(facts, i, "attention QKV", wq, (d, 3 * n * h))
            if linear_layout == "packed":  # the LayerNorm runs inside the projection's operator
                qkv, resid = linear(stream_in, f"{p}.attn.qkv_proj", wq, bq, f"{p}/attn/qkv_proj", norm=ln_1)
            else:
                x, resid = _skip_layer_norm(g, stream_in, ln_1, f"{p}/ln_1")
                qkv = linear(x, f"{p}.attn.qkv_proj", wq, bq, f"{p}/attn/qkv_proj")
            attrs = dict(num_heads=n, kv_num_heads=n, scale=float(facts.attention_scales[i]))
            if kind == "local":
                attrs.update(local_window_size=int(window), sliding_window_cache=1)
            past = [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
            if linear_layout == "packed":  # edgelm's own operator: the same contract, read at memory speed
                op, inputs = "CachedAttention", [qkv, *past, "", "", "", mask]
            else:
                op, inputs = "GroupQueryAttention", [qkv, "", "", *past, seqlens_k, total, "", "", "", attn_bias or ""]
            attn, _, _ = g.node(op, inputs, [f"{p}/attn/{op}/output_0", f"present.{i}.key", f"present.{i}.value"],
                                name=f"{p}/attn/{op}", **attrs)
            wo, bo = w.linear(spec.attn_out, i)
            _check_layer(facts, i, "attention output", wo, (n * h, d))
            o = linear(attn, f"{p}.attn.o_proj", wo, None, f"{p}/attn/o_proj")
            gamma, beta = w.norm(spec.ln_2, i)
            ln_2 = (resid, g.weight(f"{p}.ln_2.weight", gamma), g.weight(f"{p}.ln_2.bias", beta),
                    g.weight(f"{p}.attn.o_proj.bias", bo), eps, f"{p}/ln_2/output_3")
            # MLP
            wf, bf = w.linear(spec.fc, i)
            _check_layer(facts, i, "MLP input", wf, (d, m))
            if linear_layout == "packed":  # LayerNorm, bias and (GELU's tanh form) inside the operator
                fused = act_op == "FastGelu"
                a, resid = linear(o, f"{p}.mlp.fc", wf, bf, f"{p}/mlp/fc", gelu=fused, norm=ln_2)
                if not fused:
                    a = g.node(act_op, [a], name=f"{p}/mlp/act/{act_op}")
            else:
                x, resid = _skip_layer_norm(g, o, ln_2, f"{p}/ln_2")
                f = linear(x, f"{p}.mlp.fc", wf, None, f"{p}/mlp/fc")
                if act_op == "FastGelu":
                    a = g.node("FastGelu", [f, g.weight(f"{p}.mlp.fc.bias", bf)], name=f"{p}/mlp/act/FastGelu")
                else:
                    f = g.node("Add", [f, g.weight(f"{p}.mlp.fc.bias", bf)], name=f"{p}/mlp/fc/Add")
                    a = g.node(act_op, [f], name=f"{p}/mlp/act/{act_op}")
            wp, bp = w.linear(spec.proj, i)
            _check_layer(facts, i, "MLP output", wp, (m, d))
            stream_in = linear(a, f"{p}.mlp.proj", wp, None, f"{p}/mlp/proj")
            stream_skip, stream_bias = resid, g.weight(f"{p}.mlp.proj.bias", bp)

        p = "/model/norm"
        gamma, beta = w.norm(spec.ln_f)
        final, _, _, _ = g.node(
            "SkipLayerNormalization",
            [stream_in, stream_skip, g.weight("model.norm.weight", gamma), g.weight("model.norm.bias", beta),
             stream_bias],
            [f"{p}/output_0", "", "", ""], name=f"{p}/SkipLayerNorm", epsilon=eps)
        # Only the last num_logits_to_keep positions go through the LM head: generation asks for 1,
        # perplexity for all. (B, S, D) -> (B, K, D)
        p = "/model/keep_logits"
        start = g.node("Neg", [g.node("Unsqueeze", [keep, g.const(f"{p}/axis0", [0])], name=f"{p}/Unsqueeze")],
                       name=f"{p}/Neg")
        final = g.node("Slice", [final, start, g.const(f"{p}/end", [np.iinfo(np.int64).max]),
                                 g.const(f"{p}/axis1", [1])], name=f"{p}/Slice")
        if linear_layout == "packed":
            logits = g.node("PackedLinear", [final, lm_head], ["logits"], name="/lm_head/PackedLinear", n=facts.vocab_size)
        else:
            logits = g.node("MatMul", [final, lm_head], ["logits" if dtype == "fp32" else "/lm_head/MatMul/output_0"],
                            name="/lm_head/MatMul")
        if dtype != "fp32":
            g.node("Cast", [logits], ["logits"], name="/lm_head/Cast", to=TensorProto.FLOAT)
        g.output("logits", "logits", TensorProto.FLOAT, ["batch", "logits_sequence", facts.vocab_size])
        for i, (kind, _) in enumerate(facts.layer_kinds):
            length = "present_sequence" if kind == "global" else "window_capacity"
            for part in ("key", "value"):
                g.output(f"present.{i}.{part}", f"present.{i}.{part}", elem,
                         ["batch", facts.layer_heads[i], length, h])
        g.save(onnx_path)
    except BaseException:
        g.abort()
        raise
    return {"weight_bytes": g.weight_bytes, "external_data": external}


def count_ops(onnx_path: Path) -> dict[str, int]:
    """Operator counts of a saved graph (reads the protobuf only, never the weights)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))
