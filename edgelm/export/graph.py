"""A small ONNX graph builder that streams weights to disk as they are added.

``GraphBuilder.weight(name, array)`` writes the array's bytes to the single external data file at
once (page-aligned, so ONNX Runtime can map it) and keeps only a TensorProto that points there.
The protobuf itself stays small, so models beyond 2 GB save as one ``model.onnx`` plus one
``model.onnx.data``; small models keep their weights inside ``model.onnx``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..runtime.native import DOMAIN as EDGELM_DOMAIN  # edgelm's own operators

MS_DOMAIN = "com.microsoft"
EDGELM_OPS = {"PackedLinear", "PackedEmbedding", "CachedAttention"}
OPSET = 17
ALIGN = 4096
# Weights above 64 MiB go to one external data file, which ONNX Runtime maps instead of copying:
# inlined weights are copied several times while the protobuf is built, serialized and parsed.
EXTERNAL_DATA_BYTES = 64 << 20
_NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
               np.dtype(np.int64): TensorProto.INT64, np.dtype(np.int32): TensorProto.INT32}


class GraphBuilder:
    def __init__(self, name: str, data_path: Path | None):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[TensorProto] = []
        self.weight_bytes = 0
        self._names: set[str] = set()
        self._data_path = data_path
        self._data = open(data_path, "wb") if data_path is not None else None
        self._offset = 0

    # -- values -----------------------------------------------------------------------------
    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: list) -> str:
        if value != name:
            self.node("Identity", [value], [name], name=f"/model/outputs/{name}")
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def weight(self, name: str, array: np.ndarray) -> str:
        """Add a constant; large ones go to the external data file right away."""
        array = np.asarray(array)
        if not array.flags.c_contiguous:
            array = array.copy(order="C")  # (np.ascontiguousarray would turn scalars into 1-d)
        if name in self._names:
            raise ValueError(f"duplicate initializer {name}")
        self._names.add(name)
        self.weight_bytes += array.nbytes
        if self._data is None or array.nbytes < 1024:
            self.initializers.append(numpy_helper.from_array(array, name))
            return name
        pad = (-self._offset) % ALIGN
        if pad:
            self._data.write(b"\0" * pad)
            self._offset += pad
        self._data.write(array.tobytes())
        tensor = TensorProto(name=name, data_type=_NP_TO_ONNX[array.dtype], dims=array.shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self._data_path.name), ("offset", str(self._offset)),
                           ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self._offset += array.nbytes
        self.initializers.append(tensor)
        return name

    def const(self, name: str, value, dtype=np.int64) -> str:
        return self.weight(name, np.array(value, dtype=dtype))

    def node(self, op: str, inputs: list[str], outputs: list[str] | int = 1, name: str = "", **attrs):
        """Add a node; ``outputs`` is a list of names or a count (names derive from the node name)."""
        if isinstance(outputs, int):
            outputs = [f"{name}/output_{k}" for k in range(outputs)]
        domain = MS_DOMAIN if op in {"GroupQueryAttention", "SkipLayerNormalization", "FastGelu", "Gelu",
                                     "MatMulNBits", "GatherBlockQuantized"} else ""
        if op in EDGELM_OPS:
            domain = EDGELM_DOMAIN
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    # -- finish -----------------------------------------------------------------------------
    def save(self, path: Path) -> onnx.ModelProto:
        if self._data is not None:
            self._data.close()
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
        if any(n.domain == EDGELM_DOMAIN for n in self.nodes):
            opsets.append(helper.make_opsetid(EDGELM_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="edgelm")
        model.ir_version = 8
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
        return model

    def abort(self) -> None:
        if self._data is not None and not self._data.closed:
            self._data.close()
