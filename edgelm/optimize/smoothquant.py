"""SmoothQuant (Xiao et al. 2023), folded into the graph's LayerNorms: implemented here.

Static int8 quantizes a whole activation tensor with one scale; GPT-2's LayerNorm outputs carry a
few channels hundreds of times larger than the rest, so that scale leaves the other channels with a
handful of levels (docs/FIELD_NOTES: plain static W8A8 sends GPT-2's perplexity into the thousands).
SmoothQuant moves the difficulty into the weights, whose quantization is per output channel:

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)          (j: input channel of the MatMul)
    X W = (X diag(1/s)) (diag(s) W)

Where X is the output of a LayerNorm, X diag(1/s) is the same LayerNorm with gamma and beta divided
by s, so the smoothing costs nothing at run time. Intel Neural Compressor's SmoothQuant needs Intel
Extension for PyTorch, which has no build for current torch, and ONNX Runtime's hooks into it need
INC 2.x (docs/FIELD_NOTES); hence this module.

Pairs smoothed: every MatMul whose input is output 0 of a (Skip)LayerNormalization used by nothing
else, with a weight and gamma/beta used by nothing else: in edgelm graphs the QKV projection
(after ln_1) and the MLP's first projection (after ln_2) of every layer. The final norm feeds the
tied LM head through a Slice and is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .onnx_edit import Graph

NORMS = {"SkipLayerNormalization": (2, 3), "LayerNormalization": (1, 2)}  # op -> (gamma, beta) input index


@dataclass
class Pair:
    norm: onnx.NodeProto
    matmul: onnx.NodeProto

    @property
    def activation(self) -> str:
        return self.norm.output[0]

    @property
    def weight(self) -> str:
        return self.matmul.input[1]

    @property
    def gamma(self) -> str:
        return self.norm.input[NORMS[self.norm.op_type][0]]

    @property
    def beta(self) -> str | None:
        i = NORMS[self.norm.op_type][1]
        return self.norm.input[i] if len(self.norm.input) > i and self.norm.input[i] else None


def find_pairs(g: Graph) -> list[Pair]:
    pairs = []
    for norm in g.graph.node:
        if norm.op_type not in NORMS:
            continue
        users = g.consumers(norm.output[0])
        if len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[0] != norm.output[0]:
            continue
        pair = Pair(norm, users[0])
        if g.is_graph_output(pair.activation) or g.initializer(pair.weight) is None:
            continue
        owned = [pair.weight, pair.gamma] + ([pair.beta] if pair.beta else [])
        if any(g.initializer(t) is None or len(g.consumers(t)) != 1 for t in owned):
            continue
        pairs.append(pair)
    return pairs


def smoothing_scales(act_max: np.ndarray, weight: np.ndarray, alpha: float) -> np.ndarray:
    """act_max (K,) = max |X_j| over calibration tokens; weight [K, N] -> s (K,)."""
    w_max = np.abs(weight).max(axis=1)  # (K,)
    a = np.maximum(act_max.astype(np.float64), 1e-5)
    w = np.maximum(w_max.astype(np.float64), 1e-5)
    s = a ** alpha / w ** (1.0 - alpha)
    return np.clip(s, 1e-5, 1e5).astype(np.float32)


def smooth(g: Graph, pairs: list[Pair], act_max: dict[str, np.ndarray], alpha: float) -> list[dict]:
    """Fold 1/s into gamma and beta and s into the weight rows; return one record per pair."""
    records = []
    for p in pairs:
        w = g.array(p.weight)  # [K, N]
        s = smoothing_scales(act_max[p.activation], w, alpha)  # (K,)
        g.set(p.weight, w * s[:, None])
        g.set(p.gamma, g.array(p.gamma) / s)
        if p.beta:
            g.set(p.beta, g.array(p.beta) / s)
        ratio = act_max[p.activation].max() / max(float(np.median(act_max[p.activation])), 1e-12)
        records.append({"matmul": p.matmul.name, "norm": p.norm.name,
                        "activation_max_over_median": round(float(ratio), 2),
                        "scale_min": float(f"{s.min():.4g}"), "scale_max": float(f"{s.max():.4g}")})
    return records
