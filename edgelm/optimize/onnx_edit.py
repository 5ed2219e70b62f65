"""Small, explicit edits of an in-memory ONNX model (onnx.ModelProto), shared by the quantizers.

Every weight in an edgelm graph is a constant initializer; the edits here read and replace them,
swap nodes in place (the node list stays topologically sorted), and find the two places that need
care: the tied embedding (one [D, V] initializer read by a Gather and by the LM head MatMul) and
the contrib-op outputs that ONNX's own type inference cannot see.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from ..errors import UnsupportedModelError
from ..export.graph import EXTERNAL_DATA_BYTES  # noqa: E402  (one threshold, the exporter's)

MS = "com.microsoft"


def _contiguous(value, dtype=None) -> np.ndarray:
    """A C-contiguous array of ``value`` that keeps a scalar 0-d (np.ascontiguousarray makes it 1-d)."""
    value = np.asarray(value, dtype=dtype)
    return value if value.flags.c_contiguous else value.copy(order="C")


class Graph:
    """An index over ``model.graph`` for edits. Lookups scan the node list (graphs have hundreds of
    nodes, not millions), so the index never goes stale.

    ``arrays`` (optional, see load_weights_apart): the values of the initializers named in it, whose
    tensors in the graph are placeholders (name, type, dims, no data); edits of those weights then
    stay in numpy and never pass through protobuf, whose arena keeps every replaced copy until the
    whole model is freed."""

    def __init__(self, model: onnx.ModelProto, arrays: dict[str, np.ndarray] | None = None):
        self.model = model
        self.graph = model.graph
        self.arrays = arrays
        self._init = {t.name: t for t in self.graph.initializer}

    # -- initializers --------------------------------------------------------------------------
    def initializer(self, name: str) -> TensorProto | None:
        return self._init.get(name)

    def array(self, name: str) -> np.ndarray:
        if self.arrays is not None and name in self.arrays:
            return self.arrays[name]
        return numpy_helper.to_array(self._init[name])

    def _tensor(self, name: str, value, dtype=None) -> TensorProto:
        """The initializer for ``value``: the tensor itself, or a placeholder when arrays are kept apart.
        A kept-apart array may be a view (a transpose, say) that its reader makes contiguous once, at
        the end, instead of a copy at every edit."""
        if self.arrays is None:
            return numpy_helper.from_array(_contiguous(value, dtype), name)
        self.arrays[name] = value = np.asarray(value, dtype=dtype)
        return _placeholder(name, value)

    def add(self, name: str, value: np.ndarray) -> str:
        if name in self._init:
            raise ValueError(f"initializer {name} exists")
        self.graph.initializer.append(self._tensor(name, value))
        self._init[name] = self.graph.initializer[-1]
        return name

    def set(self, name: str, value: np.ndarray) -> None:
        """Replace an initializer's contents (same name, any shape)."""
        self._init[name].CopyFrom(self._tensor(name, value, self.array(name).dtype))

    def rename(self, name: str, new_name: str, value: np.ndarray) -> None:
        """Replace an initializer's contents and name in place (its readers must be re-pointed)."""
        tensor = self._init.pop(name)
        if self.arrays is not None:
            self.arrays.pop(name, None)
        tensor.CopyFrom(self._tensor(new_name, value))
        self._init[new_name] = tensor

    def remove(self, name: str) -> None:
        self.graph.initializer.remove(self._init.pop(name))
        if self.arrays is not None:
            self.arrays.pop(name, None)

    def remove_unused_initializers(self) -> list[str]:
        used = {i for n in self.graph.node for i in n.input} | {o.name for o in self.graph.output}
        dead = [t.name for t in self.graph.initializer if t.name not in used]
        for name in dead:
            self.remove(name)
        return dead

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


IN_MEMORY = "edgelm-in-memory"  # the external-data location of a placeholder: its bytes are in an array


def _placeholder(name: str, value: np.ndarray) -> TensorProto:
    """A tensor with ``value``'s name, type and dims whose data is external, at IN_MEMORY."""
    t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(value.dtype), dims=value.shape)
    t.data_location = TensorProto.EXTERNAL  # (onnx's set_external_data wants raw_data, which a placeholder has not)
    for key, v in (("location", IN_MEMORY), ("offset", "0"), ("length", str(value.nbytes))):
        entry = t.external_data.add()
        entry.key, entry.value = key, v
    return t


def load_weights_apart(path: Path, min_bytes: int = 1024, mapped: bool = False
                       ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The graph at ``path`` with every external initializer and every inline one of ``min_bytes`` or
    more as a placeholder, and {name: array} of their values. Each external one is read into its own
    array (plain reads), or with ``mapped``, is a read-only mapping of its own bytes of the data file:
    nothing is copied until an edit does (packing reads the file's pages straight into the panels),
    the file's pages count as this process's only while some array maps them, and each mapping
    closes with the last array that uses it. Callers keep no mapped array (see unmapped). For
    Graph(model, arrays)."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    arrays: dict[str, np.ndarray] = {}
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL and _tensor_bytes(t) < min_bytes:
            continue
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
        if t.data_location == TensorProto.EXTERNAL:
            info = external_data_helper.ExternalDataInfo(t)
            shape, offset = tuple(t.dims), info.offset or 0
            if mapped and int(np.prod(shape)):
                value = np.memmap(path.parent / info.location, dtype=dtype, mode="r", offset=offset, shape=shape)
            else:
                value = np.fromfile(path.parent / info.location, dtype=dtype, count=int(np.prod(shape)),
                                    offset=offset).reshape(shape)
        else:
            value = numpy_helper.to_array(t).copy()
        arrays[t.name] = value
        t.CopyFrom(_placeholder(t.name, value))
    return model, arrays


def unmapped(value: np.ndarray) -> np.ndarray:
    """``value`` as a C-contiguous array in this process's memory: a copy when it reads a file's
    mapping (load_weights_apart's mapped arrays and their views), else itself when contiguous."""
    base = value
    while base is not None:
        if isinstance(base, mmap.mmap):
            return np.array(value, order="C")
        base = getattr(base, "base", None)
    return np.ascontiguousarray(value)


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
# The LM head's [D, V] table in the MatMul export -> its panels in the packed export (every other
# projection weight: NAME -> NAME + "_panels")
TABLE_PANELS = {"model.embed_tokens.weight_t": "model.embed_tokens.weight_panels", "lm_head.weight_t": "lm_head.weight_panels"}


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
    names = {panels: table for table, panels in TABLE_PANELS.items()}
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


def screen_logits(model: onnx.ModelProto) -> bool:
    """Give the PackedLinear that computes the graph's logits its Screen input, fed by a new graph input
    ``edgelm_screen`` (native.SCREEN_INPUT, int64 scalar, required: the runtime's Generator feeds it): 1 asks
    for the argmax of each row only (greedy decoding), for a quarter of the LM head's reads; 0 the full
    product. Returns whether the graph has that node."""
    from ..runtime.native import SCREEN_INPUT

    head = next((n for n in model.graph.node if n.op_type == "PackedLinear" and list(n.output[:1]) == ["logits"]), None)
    if head is None or any(i.name == SCREEN_INPUT for i in model.graph.input):
        return head is not None
    inputs = list(head.input) + [""] * (7 - len(head.input))
    del head.input[:]
    head.input.extend(inputs + [SCREEN_INPUT])
    model.graph.input.append(helper.make_tensor_value_info(SCREEN_INPUT, TensorProto.INT64, []))
    return True


def matmul_to_packed(model: onnx.ModelProto, arrays: dict[str, np.ndarray] | None = None) -> int:
    """Turn the builder's fp32 MatMul graph into its packed layout: the inverse of packed_to_matmul.

    Each projection ``MatMul(x, W[K, N])`` with its ``Add(b)`` or ``FastGelu(., b)`` becomes
    ``ai.edgelm.PackedLinear(x, W panels, b)`` under the packed export's names (".weight" ->
    ".weight_panels"), taking in the ``SkipLayerNormalization`` before it when that norm feeds it
    alone; the tied table's lookup becomes ``PackedEmbedding`` over the same panels as the LM head;
    each ``GroupQueryAttention`` becomes ``CachedAttention`` reading attention_mask itself, and the
    attention preamble goes. The result is node for node and weight for weight the
    ``linear_layout="packed"`` export (a test holds it to that), so the runtime can run a portable
    artifact on edgelm's kernels. Graphs with right padding (no attention bias) are refused, as the
    packed export refuses them. ``arrays``: as Graph takes it. Returns how many nodes were turned.
    """
    from ..export.builder import PACKED_GELU_TANH
    from ..runtime.native import DOMAIN, pack_panels

    g = Graph(model, arrays)
    attention = [n for n in g.graph.node if n.op_type == "GroupQueryAttention"]
    if any(len(n.input) < 11 or not n.input[10] for n in attention):
        raise UnsupportedModelError("this graph's attention takes right padding, which edgelm's CachedAttention does "
                                    "not (it reads a left-padded attention_mask)")
    turned = 0
    for node in g.constant_matmuls():
        weight = node.input[1]
        new_name = TABLE_PANELS.get(weight, weight + "_panels")
        n = int(g.initializer(weight).dims[1])
        if g.initializer(new_name) is None:
            g.add(new_name, pack_panels(g.array(weight)))
        base = node.name.removesuffix("/MatMul")
        old, out, bias, extra = [node], node.output[0], "", {}
        after = g.consumers(out)
        if len(after) == 1 and after[0].op_type == "FastGelu" and after[0].name == base.rpartition("/")[0] + "/act/FastGelu":
            old.append(after[0])
            out, bias, extra["activation"] = after[0].output[0], after[0].input[1], PACKED_GELU_TANH
        elif len(after) == 1 and after[0].op_type == "Add" and after[0].name == f"{base}/Add":
            old.append(after[0])
            out, bias = after[0].output[0], after[0].input[1]
        inputs, outputs, first = [node.input[0], new_name, bias], [f"{base}/PackedLinear/output_0"], node
        norm = g.producer(node.input[0])
        layer, *proj = base.rsplit("/", 2)  # "/model/layers.0", "attn", "qkv_proj"
        proj = "/".join(proj)
        if (norm is not None and norm.op_type == "SkipLayerNormalization" and proj in NORM_BEFORE
                and norm.name == f"{layer}/{NORM_BEFORE[proj]}/SkipLayerNorm" and len(g.consumers(norm.output[0])) == 1):
            old.append(norm)
            first = norm
            inputs = [norm.input[0], new_name, bias, *norm.input[1:4], *[b for b in norm.input[4:5] if b]]
            outputs.append(norm.output[3] if len(norm.output) > 3 else "")
            extra["epsilon"] = next((a.f for a in norm.attribute if a.name == "epsilon"), 1e-5)
        elif not bias:
            inputs.pop()
        if g.is_graph_output(out):  # the logits keep their name
            outputs[0] = out
        else:
            g.rewire(out, outputs[0])
        packed = helper.make_node("PackedLinear", inputs, outputs, name=f"{base}/PackedLinear", domain=DOMAIN,
                                  n=n, **extra)
        index = list(g.graph.node).index(first)
        for dead in old:
            g.graph.node.remove(dead)
        g.graph.node.insert(index, packed)
        if not g.consumers(weight):  # one copy of each weight at a time (the tied table waits for its lookup)
            g.remove(weight)
        turned += 1
    for node in attention:
        base = node.name.removesuffix("/GroupQueryAttention")
        cached = helper.make_node("CachedAttention", [node.input[0], node.input[3], node.input[4], "", "", "",
                                                      "attention_mask"],
                                  [f"{base}/CachedAttention/output_0", *node.output[1:]], name=f"{base}/CachedAttention",
                                  domain=DOMAIN)
        cached.attribute.extend(node.attribute)
        g.rewire(node.output[0], cached.output[0])
        g.replace(node, [cached])
        turned += 1
    lookup = next((n for n in g.graph.node if n.name == "/model/embed_tokens/Gather" and n.input[0] in TABLE_PANELS), None)
    if lookup is not None:  # the tied table: Transpose(Gather(table [D, V], ids, axis=1)) -> PackedEmbedding
        tokens = g.consumers(lookup.output[0])
        if len(tokens) != 1 or tokens[0].op_type != "Transpose":
            raise UnsupportedModelError("the token lookup is not the builder's Gather + Transpose; export the model again")
        table = TABLE_PANELS[lookup.input[0]]
        embed = helper.make_node("PackedEmbedding", [lookup.input[1], table], ["/model/embed_tokens/PackedEmbedding/output_0"],
                                 name="/model/embed_tokens/PackedEmbedding", domain=DOMAIN,
                                 n=int(g.initializer(lookup.input[0]).dims[1]))
        g.rewire(tokens[0].output[0], embed.output[0])
        g.graph.node.remove(tokens[0])
        g.replace(lookup, [embed])
        turned += 1
    if turned:
        _remove_dead_nodes(g)
        g.remove_unused_initializers()
        if not any(o.domain == DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
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
        g.remove(name)
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


def conv_to_matmul(model: onnx.ModelProto, arrays: dict[str, np.ndarray] | None = None) -> int:
    """Turn the builder's conv-layout projections back into ``MatMul(x, W[K, N])`` (+ ``Add(b)``).

    Pattern (export/builder.py, linear_layout="conv"): Reshape -> Transpose -> Conv(W[N, K, 1, 1], b)
    -> Transpose -> Reshape. The MatMul takes the first Reshape's input, writes the last Reshape's
    output, keeps the weight's name and gets the Conv's name with "Conv" -> "MatMul", so the graph
    is the one ``linear_layout="matmul"`` builds. ``arrays``: as Graph takes it. Returns how many
    projections were turned.
    """
    g = Graph(model, arrays)
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
