"""Architecture facts as data: one table entry per supported Hugging Face model type.

Everything the exporter and the validator need to know about GPT-2 and GPT-Neo lives here:
config field names, weight names and layouts, attention scale, local windows, activation.
The graph builder reads a ``ModelFacts`` (the resolved numbers for one checkpoint) and never
branches on the architecture name.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

from ..errors import UnsupportedModelError, is_whole

# Activation name in the HF config -> ONNX op that computes it (com.microsoft unless noted).
ACTIVATIONS = {
    "gelu_new": "FastGelu",  # tanh approximation, exactly FastGelu's formula
    "gelu_fast": "FastGelu",
    "gelu_pytorch_tanh": "FastGelu",
    "gelu": "Gelu",  # exact erf form
    "relu": "Relu",  # ONNX domain
}


@dataclass(frozen=True)
class LinearWeight:
    """Where one projection's weight and bias live in the checkpoint.

    ``names`` are concatenated along the output dimension (GPT-Neo's separate q, k, v become one
    packed QKV projection). ``transpose`` is True for nn.Linear ([out, in]); GPT-2's Conv1D is
    already [in, out], the layout MatMul wants.
    """

    names: tuple[str, ...]
    transpose: bool
    bias: tuple[str, ...] | None


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    hf_class: str
    # config field names
    num_layers: str
    num_heads: str
    hidden_size: str
    inner_size: str
    max_positions: str
    layer_norm_eps: str
    # per-layer weight names ({i} is the layer index), without the "transformer." prefix
    qkv: LinearWeight
    attn_out: LinearWeight
    fc: LinearWeight
    proj: LinearWeight
    ln_1: str = "h.{i}.ln_1"
    ln_2: str = "h.{i}.ln_2"
    wte: str = "wte.weight"
    wpe: str = "wpe.weight"
    ln_f: str = "ln_f"
    # config -> list of per-layer ("global", 0) or ("local", window)
    layer_kinds: Callable[[dict], list[tuple[str, int]]] = field(default=lambda cfg: [])
    # config, layer index -> softmax scale
    attention_scale: Callable[[dict, int], float] = field(default=lambda cfg, i: 1.0)
    check: Callable[[dict], None] = field(default=lambda cfg: None)


ARCHITECTURES: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    ARCHITECTURES[spec.model_type] = spec
    return spec


def _gpt2_scale(cfg: dict, i: int) -> float:
    head_size = cfg["n_embd"] // cfg["n_head"]
    scale = 1.0 / math.sqrt(head_size) if cfg.get("scale_attn_weights", True) else 1.0
    if cfg.get("scale_attn_by_inverse_layer_idx", False):
        scale /= i + 1
    return scale


def _gpt2_check(cfg: dict) -> None:
    if cfg.get("add_cross_attention"):
        raise UnsupportedModelError("GPT-2 with cross-attention (add_cross_attention=true) is not supported")


register(
    ArchSpec(
        model_type="gpt2",
        hf_class="GPT2LMHeadModel",
        num_layers="n_layer",
        num_heads="n_head",
        hidden_size="n_embd",
        inner_size="n_inner",
        max_positions="n_positions",
        layer_norm_eps="layer_norm_epsilon",
        qkv=LinearWeight(("h.{i}.attn.c_attn.weight",), False, ("h.{i}.attn.c_attn.bias",)),
        attn_out=LinearWeight(("h.{i}.attn.c_proj.weight",), False, ("h.{i}.attn.c_proj.bias",)),
        fc=LinearWeight(("h.{i}.mlp.c_fc.weight",), False, ("h.{i}.mlp.c_fc.bias",)),
        proj=LinearWeight(("h.{i}.mlp.c_proj.weight",), False, ("h.{i}.mlp.c_proj.bias",)),
        layer_kinds=lambda cfg: [("global", 0)] * cfg["n_layer"],
        attention_scale=_gpt2_scale,
        check=_gpt2_check,
    )
)


def _neo_kinds(cfg: dict) -> list[tuple[str, int]]:
    layers = cfg.get("attention_layers")
    if not layers:  # older configs only carry the compact form [[["global", "local"], 12]]
        if not cfg.get("attention_types"):
            raise UnsupportedModelError("GPT-Neo config.json has neither attention_layers nor attention_types; "
                                        "add the kind of each layer (global or local) to it")
        layers = [kind for kinds, repeat in cfg["attention_types"] for _ in range(repeat) for kind in kinds]
    if len(layers) != cfg["num_layers"]:
        raise UnsupportedModelError(
            f"GPT-Neo config lists {len(layers)} attention layer kinds for {cfg['num_layers']} layers; fix config.json"
        )
    unknown = set(layers) - {"global", "local"}
    if unknown:
        raise UnsupportedModelError(f"GPT-Neo attention kinds {sorted(unknown)} are not supported (only global, local)")
    window = _size(cfg, "window_size", "GPTNeoForCausalLM") if "local" in layers else 0
    return [(kind, window if kind == "local" else 0) for kind in layers]


_NEO_ATTN = "h.{i}.attn.attention."
register(
    ArchSpec(
        model_type="gpt_neo",
        hf_class="GPTNeoForCausalLM",
        num_layers="num_layers",
        num_heads="num_heads",
        hidden_size="hidden_size",
        inner_size="intermediate_size",
        max_positions="max_position_embeddings",
        layer_norm_eps="layer_norm_epsilon",
        qkv=LinearWeight(
            (_NEO_ATTN + "q_proj.weight", _NEO_ATTN + "k_proj.weight", _NEO_ATTN + "v_proj.weight"), True, None
        ),
        attn_out=LinearWeight((_NEO_ATTN + "out_proj.weight",), True, (_NEO_ATTN + "out_proj.bias",)),
        fc=LinearWeight(("h.{i}.mlp.c_fc.weight",), True, ("h.{i}.mlp.c_fc.bias",)),
        proj=LinearWeight(("h.{i}.mlp.c_proj.weight",), True, ("h.{i}.mlp.c_proj.bias",)),
        layer_kinds=_neo_kinds,
        attention_scale=lambda cfg, i: 1.0,  # GPT-Neo does not scale by 1/sqrt(head_size)
    )
)


@dataclass(frozen=True)
class ModelFacts:
    """The resolved numbers of one checkpoint: what the graph and the manifest are built from."""

    model_type: str
    num_layers: int
    num_heads: int
    head_size: int
    hidden_size: int
    inner_size: int
    vocab_size: int
    max_positions: int
    layer_norm_eps: float
    activation: str
    layer_kinds: tuple[tuple[str, int], ...]
    layer_heads: tuple[int, ...]  # attention heads per layer (fewer than num_heads after pruning)
    layer_inner: tuple[int, ...]  # MLP width per layer
    attention_scales: tuple[float, ...]
    tied_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | None  # the first of eos_token_ids (what pads a batch's rows)
    eos_token_ids: tuple[int, ...]  # generation ends on any of them

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layer_kinds"] = [list(k) for k in self.layer_kinds]
        d["attention_scales"] = list(self.attention_scales)
        d["layer_heads"] = list(self.layer_heads)
        d["layer_inner"] = list(self.layer_inner)
        return d


def supported_types() -> str:
    return ", ".join(f"{s.hf_class} (model_type '{t}')" for t, s in ARCHITECTURES.items())


def arch_for(config: dict) -> ArchSpec:
    model_type = config.get("model_type")
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        raise UnsupportedModelError(
            f"model_type '{model_type}' is not supported; edgelm exports {supported_types()}"
        )
    return spec


# Optional config.json fields written by structured pruning: one value per layer. The head size
# stays hidden_size / num_heads; only the number of heads and the MLP width change per layer.
LAYER_HEADS = "edgelm_layer_heads"
LAYER_INNER = "edgelm_layer_inner"


def layer_shapes(config: dict) -> tuple[list[int], list[int]]:
    """Attention heads and MLP width of every layer: the pruning fields, or the config's uniform values."""
    spec = arch_for(config)
    layers, heads, hidden = (_size(config, f, spec) for f in (spec.num_layers, spec.num_heads, spec.hidden_size))
    inner = 4 * hidden if config.get(spec.inner_size) is None else _size(config, spec.inner_size, spec)
    return (_per_layer(config, LAYER_HEADS, heads, layers, "attention head count"),
            _per_layer(config, LAYER_INNER, inner, layers, "MLP width"))


def _size(config: dict, field: str, spec: ArchSpec | str) -> int:
    """A size field of config.json: present, a whole number >= 1 (``spec``: the spec or its class name)."""
    if field not in config:
        name = spec if isinstance(spec, str) else spec.hf_class
        raise UnsupportedModelError(f"config.json has no field '{field}' that a {name} needs")
    value = config[field]
    if not is_whole(value, 1):
        raise UnsupportedModelError(f"config.json's {field} is {value!r}; it must be a whole number >= 1")
    return value


def _per_layer(config: dict, key: str, default: int, layers: int, what: str) -> list[int]:
    values = config.get(key)
    if values is None:
        return [default] * layers
    if not isinstance(values, list):
        raise UnsupportedModelError(
            f"config.json's {key} is {values!r}, not a list; give one {what} per layer, or remove the field"
        )
    if len(values) != layers:
        raise UnsupportedModelError(
            f"config.json's {key} lists {len(values)} values for {layers} layers; give one {what} per layer, "
            "or remove the field"
        )
    for i, v in enumerate(values):
        if not is_whole(v, 1):
            raise UnsupportedModelError(
                f"config.json's {key} gives layer {i} the {what} {v!r}; every layer needs a whole number >= 1"
            )
    return list(values)


def resolve(config: dict, generation: dict | None = None) -> ModelFacts:
    """Check a Hugging Face config.json (as a dict) and resolve it into ModelFacts; ``generation``, the
    model's generation_config.json where it has one, names the end-of-text ids."""
    spec = arch_for(config)
    hidden, heads, layers, vocab, positions = (_size(config, f, spec) for f in (
        spec.hidden_size, spec.num_heads, spec.num_layers, "vocab_size", spec.max_positions))
    if hidden % heads:
        raise UnsupportedModelError(f"hidden size {hidden} is not a multiple of the {heads} heads")
    head_size = hidden // heads
    if head_size % 8:
        raise UnsupportedModelError(
            f"head size {head_size} is not a multiple of 8, which ONNX Runtime's fused attention requires"
        )
    if positions < MIN_POSITIONS:
        raise UnsupportedModelError(f"config.json's {spec.max_positions} is {positions}; edgelm exports models with "
                                    f"a context of at least {MIN_POSITIONS} positions")
    eos = _stop_ids(config, generation or {}, vocab)
    activation = config.get("activation_function", "gelu_new")
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise UnsupportedModelError(
            f"activation '{activation}' is not supported; supported: {', '.join(ACTIVATIONS)}"
        )
    spec.check(config)
    layer_heads, layer_inner = layer_shapes(config)
    return ModelFacts(
        model_type=spec.model_type,
        num_layers=layers,
        num_heads=heads,
        head_size=head_size,
        hidden_size=hidden,
        inner_size=int(config.get(spec.inner_size) or 4 * hidden),
        vocab_size=vocab,
        max_positions=positions,
        layer_norm_eps=_epsilon(config, spec.layer_norm_eps),
        activation=activation,
        layer_kinds=tuple(spec.layer_kinds(config)),
        layer_heads=tuple(layer_heads),
        layer_inner=tuple(layer_inner),
        attention_scales=tuple(spec.attention_scale(config, i) for i in range(layers)),
        tied_embeddings=bool(config.get("tie_word_embeddings", True)),
        bos_token_id=_token_id(config, "bos_token_id", vocab),
        eos_token_id=eos[0] if eos else None,
        eos_token_ids=eos,
    )


MIN_POSITIONS = 8  # validation feeds a prompt and decode steps; fewer positions leave it nothing to run


def _epsilon(config: dict, field: str) -> float:
    value = config.get(field, 1e-5)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise UnsupportedModelError(f"config.json's {field} is {value!r}; it must be a small positive number such as 1e-5")
    return float(value)


def _token_id(config: dict, field: str, vocab: int) -> int | None:
    """A special token id: absent (None), a whole number in the vocabulary, or a list of one such id."""
    value = config.get(field)
    if isinstance(value, list) and len(set(value)) == 1:
        value = value[0]  # transformers also writes one id as a list
    if value is None:
        return None
    if isinstance(value, list):
        raise UnsupportedModelError(f"config.json's {field} lists several ids {value}; edgelm takes one: set "
                                    f"{field} to one of them")
    if not is_whole(value, 0) or value >= vocab:
        raise UnsupportedModelError(f"config.json's {field} is {value!r}; it must be a token id in [0, {vocab})")
    return value


def _stop_ids(config: dict, generation: dict, vocab: int) -> tuple[int, ...]:
    """The ids generation ends on, as transformers' generate takes them: generation_config.json's
    eos_token_id where that file has the field, else config.json's (checked either way); one id or a
    list of ids."""
    def ids(source: str, value) -> tuple[int, ...]:
        if value is None:
            return ()
        listed = value if isinstance(value, list) else [value]
        if not listed or any(not is_whole(i, 0) or i >= vocab for i in listed):
            raise UnsupportedModelError(f"{source}'s eos_token_id is {value!r}; it must be a token id in "
                                        f"[0, {vocab}) or a list of such ids")
        return tuple(dict.fromkeys(listed))

    configured = ids("config.json", config.get("eos_token_id"))
    return ids("generation_config.json", generation["eos_token_id"]) if "eos_token_id" in generation else configured
