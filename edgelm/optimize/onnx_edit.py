"""Small, explicit edits of an in-memory ONNX model (onnx.ModelProto), shared by the quantizers.

Every weight in an edgelm graph is a constant initializer; the edits here read and replace them,
swap nodes in place (the node list stays topologically sorted), and find the two places that need
care: the tied embedding (one [D, V] initializer read by a Gather and by the LM head MatMul) and
the contrib-op outputs that ONNX's own type inference cannot see.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import UnsupportedModelError
from ..export.graph import EXTERNAL_DATA_BYTES  # noqa: E402  (one threshold, the exporter's)

MS = "com.microsoft"


def _contiguous(value, dtype=None) -> np.ndarray:
    """A C-contiguous array of ``value`` that keeps a scalar 0-d (np.ascontiguousarray makes it 1-d)."""
    value = np.asarray(value, dtype=dtype)
    return value if value.flags.c_contiguous else value.copy(order="C")


class Graph:
    """An index over ``model.graph`` for edits. Lookups scan the node list (graphs have hundreds of
    nodes, not millions), so the index never goes stale."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self._init = {t.name: t for t in self.graph.initializer}

    # -- initializers --------------------------------------------------------------------------
    def initializer(self, name: str) -> TensorProto | None:
        return self._init.get(name)

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self._init[name])

    def add(self, name: str, value: np.ndarray) -> str:
        if name in self._init:
            raise ValueError(f"initializer {name} exists")
        t = numpy_helper.from_array(_contiguous(value), name)
        self.graph.initializer.append(t)
        self._init[name] = self.graph.initializer[-1]
        return name

    def set(self, name: str, value: np.ndarray) -> None:
        """Replace an initializer's contents (same name, any shape)."""
        old = self._init[name]
        old.CopyFrom(numpy_helper.from_array(_contiguous(value, numpy_helper.to_array(old).dtype),
                                             name))

    def rename(self, name: str, new_name: str, value: np.ndarray) -> None:
        """Replace an initializer's contents and name in place (its readers must be re-pointed)."""
        tensor = self._init.pop(name)
        tensor.CopyFrom(numpy_helper.from_array(_contiguous(value), new_name))
        self._init[new_name] = tensor

    def remove_unused_initializers(self) -> list[str]:
        used = {i for n in self.graph.node for i in n.input} | {o.name for o in self.graph.output}
        dead = [t for t in self.graph.initializer if t.name not in used]
        for t in dead:
            self.graph.initializer.remove(t)
            del self._init[t.name]
        return [t.name for t in dead]

    # -- nodes ---------------------------------------------------------------------------------
    def consumers(self, tensor: str) -> list[onnx.NodeProto]:
        return [n for n in self.graph.node if tensor in n.input]

    def rewire(self, tensor: str, new_tensor: str) -> None:
        """Make every node that reads ``tensor`` read ``new_tensor`` instead."""
        for consumer in self.consumers(tensor):
            consumer.input[:] = [new_tensor if i == tensor else i for i in consumer.input]

    def producer(self, tensor: str) -> onnx.NodeProto | None:
        return next((n for n in self.graph.node if tensor in n.output), None)

    def node(self, name: str) -> onnx.NodeProto:
        return next(n for n in self.graph.node if n.name == name)

    def is_graph_output(self, tensor: str) -> bool:
        return any(o.name == tensor for o in self.graph.output)

    def replace(self, old: onnx.NodeProto, new: list[onnx.NodeProto]) -> None:
        """Put ``new`` where ``old`` was (inputs of new nodes must be available at that point)."""
        index = list(self.graph.node).index(old)
        self.graph.node.remove(old)
        for offset, node in enumerate(new):
            self.graph.node.insert(index + offset, node)

    def constant_matmuls(self) -> list[onnx.NodeProto]:
        """MatMul nodes whose B is a 2-D float32 initializer (every projection in an edgelm graph)."""
        out = []
        for n in self.graph.node:
            if n.op_type != "MatMul":
                continue
            t = self._init.get(n.input[1])
            if t is not None and t.data_type == TensorProto.FLOAT and len(t.dims) == 2:
                out.append(n)
        return out

    def weight_bytes(self) -> int:
        return sum(_tensor_bytes(t) for t in self.graph.initializer)


def _tensor_bytes(t: TensorProto) -> int:
    n = int(np.prod(t.dims)) if t.dims else 1
    return n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


@dataclass
class Embedding:
    """Where the token embedding lives: its lookup Gather and the LM head MatMul, and whether they
    share one initializer (the builder stores the tied weight once, as [D, V])."""

    lookup: onnx.NodeProto  # Gather(table, input_ids)
    head: onnx.NodeProto  # MatMul(hidden, W[D, V]) -> logits
    tied: bool

    @property
    def table(self) -> str:
        return self.lookup.input[0]

    @property
    def head_weight(self) -> str:
        return self.head.input[1]


def find_embedding(g: Graph) -> Embedding:
    """The lookup Gather (reads ``input_ids``) and the MatMul that produces the logits."""
    lookup = next((n for n in g.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids"
                   and g.initializer(n.input[0]) is not None), None)
    head = None
    for n in g.graph.node:
        if n.op_type != "MatMul":
            continue
        out = n.output[0]
        nxt = g.consumers(out)
        if out == "logits" or (len(nxt) == 1 and nxt[0].op_type == "Cast" and nxt[0].output[0] == "logits"):
            head = n
    if lookup is None or head is None:
        raise ValueError("the graph has no token-embedding Gather or no LM head MatMul; it was not made by "
                         "edgelm's builder")
    return Embedding(lookup, head, lookup.input[0] == head.input[1])


def declare_float_outputs(model: onnx.ModelProto) -> int:
    """Give every com.microsoft node output a float32 type in value_info.

    ONNX's shape inference does not know contrib operators, and ONNX Runtime's quantizers skip (or
    fail on) tensors of unknown type; the builder's fp32 graphs produce float32 from all of them.
    """
    known = {v.name for v in (*model.graph.value_info, *model.graph.input, *model.graph.output)}
    added = 0
    for n in model.graph.node:
        if n.domain != MS:
            continue
        for o in n.output:
            if o and o not in known:
                model.graph.value_info.append(helper.make_tensor_value_info(o, TensorProto.FLOAT, None))
                known.add(o)
                added += 1
    return added


def load_model(path: Path) -> onnx.ModelProto:
    """Load a graph for editing, its projections as MatMul (conv- and packed-layout graphs are turned back)."""
    model = onnx.load(str(path), load_external_data=True)
    conv_to_matmul(model)
    packed_to_matmul(model)
    return model


NORM_BEFORE = {"attn/qkv_proj": "ln_1", "mlp/fc": "ln_2"}  # the builder's LayerNorm before each fused projection


def packed_to_matmul(model: onnx.ModelProto) -> int:
    """Turn the builder's packed layout (edgelm's operators) back into the MatMul graph.

    Each ``ai.edgelm.CachedAttention`` becomes the ``GroupQueryAttention`` it stands for (same
    attributes and cache contract); a PackedLinear with a LayerNorm (Gamma) gives back its
    ``SkipLayerNormalization`` first. Each ``PackedLinear(x, W panels, b)`` becomes
    ``MatMul(x, W[K, N])`` (+ ``Add(b)``), its weight unpacked under the name the MatMul export gives
    it (".weight_panels" -> ".weight", and the tied table -> "model.embed_tokens.weight_t"); the
    ``ai.edgelm.PackedEmbedding`` lookup becomes ``Transpose(Gather(table, ids, axis=1))``. Where
    CachedAttention takes attention_mask, the builder's attention preamble is written first.
    The result is node for node the ``linear_layout="matmul"`` export. Returns how many nodes were turned.
    """
    from ..runtime.native import DOMAIN, unpack_panels

    g = Graph(model)
    if any(n.name == "/model/embed_tokens/GatherLane" for n in g.graph.node):
        raise UnsupportedModelError("this packed artifact was exported by an older edgelm (its embedding lookup is "
                                    "nine nodes, not PackedEmbedding): export it again to optimize it")
    names = {"model.embed_tokens.weight_panels": "model.embed_tokens.weight_t", "lm_head.weight_panels": "lm_head.weight_t"}
    turned = 0
    for node in [n for n in g.graph.node if n.op_type == "PackedLinear"]:
        n = next(a.i for a in node.attribute if a.name == "n")
        weight = node.input[1]
        new_name = names.get(weight, weight.removesuffix("_panels"))
        if g.initializer(new_name) is None:  # the tied table: unpacked once, for the head and the lookup
            g.rename(weight, new_name, unpack_panels(g.array(weight), n))
        base = node.name.removesuffix("/PackedLinear")
        out = node.output[0]
        activation = next((a.i for a in node.attribute if a.name == "activation"), 0)
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        nodes, x = [], node.input[0]
        if len(node.input) > 4 and node.input[4]:  # the LayerNorm before it: the builder's SkipLayerNormalization
            layer, *proj = base.rsplit("/", 2)  # "/model/layers.0", "attn", "qkv_proj"
            norm = f"{layer}/{NORM_BEFORE['/'.join(proj)]}"
            skip, gamma, beta, *skip_bias = node.input[3:]
            residual = node.output[1] if len(node.output) > 1 else ""
            eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
            nodes.append(helper.make_node("SkipLayerNormalization", [x, skip, gamma, beta, *[b for b in skip_bias if b]],
                                          [f"{norm}/output_0", "", "", residual], name=f"{norm}/SkipLayerNorm",
                                          domain=MS, epsilon=eps))
            x = nodes[-1].output[0]
        nodes.append(helper.make_node("MatMul", [x, new_name], [f"{base}/MatMul/output_0"], name=f"{base}/MatMul"))
        if activation:  # the builder's MLP: FastGelu(MatMul(x, W_fc), b_fc)
            act = base.rpartition("/")[0] + "/act/FastGelu"
            nodes.append(helper.make_node("FastGelu", [nodes[-1].output[0], bias], [f"{act}/output_0"], name=act,
                                          domain=MS))
        elif bias:
            nodes.append(helper.make_node("Add", [nodes[-1].output[0], bias], [f"{base}/Add/output_0"], name=f"{base}/Add"))
        if g.is_graph_output(out):
            nodes[-1].output[0] = out
        else:
            g.rewire(out, nodes[-1].output[0])
        g.replace(node, nodes)
        turned += 1
    metadata = None  # GroupQueryAttention's inputs, when CachedAttention took the mask itself
    for node in [n for n in g.graph.node if n.op_type == "CachedAttention"]:  # the same contract as GQA's
        qkv, past_k, past_v, seqlens_k, total, *bias = node.input
        if len(bias) > 1 and bias[1]:  # attention_mask: the builder's preamble gives the other three
            if metadata is None:
                metadata = _attention_metadata(g)
            seqlens_k, total, bias = metadata[1], metadata[2], [metadata[3]]
        base = node.name.removesuffix("/CachedAttention")
        gqa = helper.make_node("GroupQueryAttention",
                               [qkv, "", "", past_k, past_v, seqlens_k, total, "", "", "", *bias],
                               [f"{base}/GroupQueryAttention/output_0", *node.output[1:]],
                               name=f"{base}/GroupQueryAttention", domain=MS)
        gqa.attribute.extend(node.attribute)
        g.rewire(node.output[0], gqa.output[0])
        g.replace(node, [gqa])
        turned += 1
    for node in [n for n in g.graph.node if n.op_type == "PackedEmbedding"]:  # the tied table's lookup
        lookup = node.name.removesuffix("/PackedEmbedding")
        ids, table = node.input
        gathered = helper.make_node("Gather", [names.get(table, table), ids], [f"{lookup}/Gather/output_0"],
                                    name=f"{lookup}/Gather", axis=1)  # (D, B, S)
        tokens = helper.make_node("Transpose", [gathered.output[0]], [f"{lookup}/Transpose/output_0"],
                                  name=f"{lookup}/Transpose", perm=[1, 2, 0])  # (B, S, D)
        g.rewire(node.output[0], tokens.output[0])
        g.replace(node, [gathered, tokens])
        turned += 1
    if turned:
        _remove_dead_nodes(g)
        g.remove_unused_initializers()
        domains = [o for o in model.opset_import if o.domain == DOMAIN]
        for o in domains:
            model.opset_import.remove(o)
    return turned


def _attention_metadata(g: Graph, padding: str = "left") -> tuple[str, str, str, str | None]:
    """The builder's attention preamble (export.builder.attention_metadata, fp32), put first in the
    graph: its nodes and constants, the same names. Returns (batch, seqlens_k, total, attention_bias)."""
    from ..export.builder import attention_metadata
    from ..export.graph import GraphBuilder

    pre = GraphBuilder("preamble", None)
    outputs = attention_metadata(pre, "input_ids", "attention_mask", "fp32", padding)
    for tensor in pre.initializers:
        g.add(tensor.name, numpy_helper.to_array(tensor))
    for k, node in enumerate(pre.nodes):
        g.graph.node.insert(k, node)
    return outputs


CACHE_PREFIXES = ("past_key_values.", "present.")


def attention_for_cuda(model: onnx.ModelProto) -> int:
    """Give an fp32 builder graph the attention ONNX Runtime's CUDA provider runs: fp16
    GroupQueryAttention (its CUDA kernel has no other) over an fp16 KV cache, and right padding
    instead of an attention bias, which that kernel refuses (export/builder.py). q, k and v are cast
    to fp16 on the way in, the attention's output back to fp32; every projection keeps its dtype
    (and its quantization). Returns how many attention nodes were changed."""
    g = Graph(model)
    attention = [n for n in g.graph.node if n.op_type == "GroupQueryAttention"]
    if not attention:
        return 0
    preamble = "/model/attn_mask/"  # export.builder.attention_metadata's names
    for node in [n for n in g.graph.node if n.name.startswith(preamble)]:
        g.graph.node.remove(node)
    for name in [t.name for t in g.graph.initializer if t.name.startswith(preamble)]:
        g.graph.initializer.remove(g._init.pop(name))
    _, seqlens_k, total, _ = _attention_metadata(g, padding="right")
    for node in attention:
        base = node.name.removesuffix("/GroupQueryAttention")
        to_half = helper.make_node("Cast", [node.input[0]], [f"{base}/CastQKV/output_0"], name=f"{base}/CastQKV",
                                   to=TensorProto.FLOAT16)
        to_float = helper.make_node("Cast", [f"{base}/GroupQueryAttention/half_0"], [node.output[0]],
                                    name=f"{base}/CastOut", to=TensorProto.FLOAT)
        inputs = list(node.input[:10])
        inputs[0], inputs[5], inputs[6] = to_half.output[0], seqlens_k, total
        node.input[:] = inputs  # no attention bias
        node.output[0] = to_float.input[0]
        g.replace(node, [to_half, node, to_float])
    for value in [*g.graph.input, *g.graph.output]:
        if value.name.startswith(CACHE_PREFIXES):
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    _remove_dead_nodes(g)
    g.remove_unused_initializers()
    return len(attention)


def io_for_cuda(io: dict) -> dict:
    """A manifest's ``io`` for a graph that went through attention_for_cuda."""
    io = {**io, "kv_dtype": "float16", "padding": "right"}
    io["inputs"], io["outputs"] = ([{**e, "dtype": "float16"} if e["name"].startswith(CACHE_PREFIXES) else e
                                    for e in io[key]] for key in ("inputs", "outputs"))
    return io


def conv_to_matmul(model: onnx.ModelProto) -> int:
    """Turn the builder's conv-layout projections back into ``MatMul(x, W[K, N])`` (+ ``Add(b)``).

    Pattern (export/builder.py, linear_layout="conv"): Reshape -> Transpose -> Conv(W[N, K, 1, 1], b)
    -> Transpose -> Reshape. The MatMul takes the first Reshape's input, writes the last Reshape's
    output, keeps the weight's name and gets the Conv's name with "Conv" -> "MatMul", so the graph
    is the one ``linear_layout="matmul"`` builds. Returns how many projections were turned.
    """
    g = Graph(model)
    turned = 0
    for conv in [n for n in g.graph.node if n.op_type == "Conv"]:
        w = g.initializer(conv.input[1])
        if w is None or len(w.dims) != 4 or list(w.dims[2:]) != [1, 1]:
            continue
        to_channels = g.producer(conv.input[0])
        to_tokens = g.producer(to_channels.input[0]) if to_channels is not None else None
        after = g.consumers(conv.output[0])
        from_channels = after[0] if len(after) == 1 else None
        after = g.consumers(from_channels.output[0]) if from_channels is not None else []
        from_tokens = after[0] if len(after) == 1 else None
        chain = [to_tokens, to_channels, from_channels, from_tokens]
        if [n.op_type if n is not None else None for n in chain] != ["Reshape", "Transpose", "Transpose", "Reshape"]:
            raise ValueError(f"{conv.name} is a 1x1 Conv outside the builder's conv layout; export the model again")
        n_out, k = int(w.dims[0]), int(w.dims[1])
        g.set(conv.input[1], g.array(conv.input[1]).reshape(n_out, k).T)
        base, _, _ = conv.name.rpartition("/")
        out = from_tokens.output[0]
        nodes = [helper.make_node("MatMul", [to_tokens.input[0], conv.input[1]],
                                  [out if len(conv.input) < 3 else f"{base}/MatMul/output_0"], name=f"{base}/MatMul")]
        if len(conv.input) >= 3 and conv.input[2]:
            nodes.append(helper.make_node("Add", [nodes[0].output[0], conv.input[2]], [out], name=f"{base}/Add"))
        g.replace(conv, nodes)
        for n in chain:
            g.graph.node.remove(n)
        turned += 1
    if turned:  # the shape constants and Concats only the Reshapes read
        _remove_dead_nodes(g)
        g.remove_unused_initializers()
    return turned


def _remove_dead_nodes(g: Graph) -> None:
    outputs = {o.name for o in g.graph.output}
    while True:
        used = {i for n in g.graph.node for i in n.input} | outputs
        dead = [n for n in g.graph.node if not any(o in used for o in n.output if o)]
        if not dead:
            return
        for n in dead:
            g.graph.node.remove(n)


def save_model(model: onnx.ModelProto, path: Path, external: bool | None = None, keep: bool = False) -> str | None:
    """Write ``path`` (+ ``path.data`` when the weights pass EXTERNAL_DATA_BYTES (64 MiB) or ``external``); return the data file name.

    With external data, onnx turns the in-memory tensors into references to the file; ``keep`` reads
    them back so that ``model`` stays usable (otherwise do not use it afterwards)."""
    path = Path(path)
    if external is None:
        external = Graph(model).weight_bytes() > EXTERNAL_DATA_BYTES
    data = path.name + ".data" if external else None
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)
        if keep:
            onnx.load_external_data_for_model(model, str(path.parent))
    else:
        onnx.save_model(model, str(path))
    return data


def count_ops(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items()))
