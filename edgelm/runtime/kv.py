"""The KV cache: buffers allocated once per generation and bound to both past and present.

Per layer, from the manifest's ``io.kv_cache`` (``heads`` may differ per layer in a pruned model):
- ``full``   one (B, N, max_len, H) buffer bound as past and present; the attention operator
             writes the new rows in place (no per-step allocation, no copy of the cache);
- ``window`` one (B, N, window + slack, H) buffer; the operator keeps the most recent rows at the
             front and compacts every ``slack + 1`` steps (GPT-Neo's local layers);
- ``concat`` (graphs from other exporters) present = past + new rows: the outputs of one step are
             fed back as the next inputs, as ORT values, without a trip through NumPy.
"""

from __future__ import annotations

import numpy as np

WINDOW_SLACK = 64


class KVCache:
    def __init__(self, ort, cache_spec: list[dict], batch: int, max_len: int, heads: int, head_size: int,
                 dtype, device: str = "cpu"):
        self.batch, self.max_len, self.device = batch, max_len, device
        self.dtype, self.itemsize = np.dtype(dtype).type, np.dtype(dtype).itemsize
        self.spec = cache_spec
        self.values: dict[str, object] = {}  # past name -> OrtValue
        self._host: list[np.ndarray] = []  # CPU buffers backing the OrtValues (kept alive)
        self.concat = [e for e in cache_spec if e["kind"] == "concat"]
        self.nbytes = 0  # bytes of the preallocated buffers
        for e in cache_spec:
            # ORT's CUDA kernel takes a window cache only at exactly the window's capacity
            slack = WINDOW_SLACK if device == "cpu" else 0
            length = {"full": max_len, "window": (e.get("window") or 0) + slack, "concat": 0}[e["kind"]]
            # heads per layer (pruned models); older manifests have one count for every layer
            shape = (batch, int(e.get("heads", heads)), length, int(e.get("head_size", head_size)))
            self.nbytes += 2 * int(np.prod(shape)) * np.dtype(dtype).itemsize
            for name in (e["past_key"], e["past_value"]):
                if device == "cpu" or e["kind"] == "concat":
                    host = np.zeros(shape, dtype=dtype)
                    self._host.append(host)
                    value = ort.OrtValue.ortvalue_from_numpy(host) if e["kind"] != "concat" else host
                else:  # resident on the GPU for the whole generation; zeros, as on the CPU (the rows past
                    # the sequence are never read, but uninitialised memory could hold NaN patterns)
                    value = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=dtype), "cuda", 0)
                self.values[name] = value

    def bind(self, binding) -> None:
        """Bind past inputs and present outputs; for shared buffers, once per generation is enough."""
        for e in self.spec:
            for past, present in ((e["past_key"], e["present_key"]), (e["past_value"], e["present_value"])):
                value = self.values[past]
                if e["kind"] == "concat":
                    if isinstance(value, np.ndarray):
                        binding.bind_cpu_input(past, value)
                    else:
                        binding.bind_ortvalue_input(past, value)
                    binding.bind_output(present, self.device)
                else:
                    binding.bind_ortvalue_input(past, value)
                    binding.bind_ortvalue_output(present, value)

    def bind_row(self, binding, row: int) -> None:
        """Bind one row of every shared buffer as a batch of one, past and present alike: right-padded
        graphs prefill prompts of different lengths one row at a time (builder.py)."""
        for e in self.spec:
            if e["kind"] == "concat":
                raise ValueError("a concat cache has no buffer to bind a row of")
            for past, present in ((e["past_key"], e["present_key"]), (e["past_value"], e["present_value"])):
                value = self.values[past]
                shape = value.shape()
                row_bytes = int(np.prod(shape[1:])) * self.itemsize
                address = value.data_ptr() + row * row_bytes
                for bind, name in ((binding.bind_input, past), (binding.bind_output, present)):
                    bind(name, self.device, 0, self.dtype, [1, *shape[1:]], address)

    def after_step(self, binding, bound_before: list[str]) -> None:
        """Concat caches: this step's presents become the next step's pasts (no copy).

        ``bound_before``: the outputs bound before this cache's (ORT returns outputs in binding order).
        """
        if not self.concat:
            return
        order = bound_before + [name for e in self.spec for name in (e["present_key"], e["present_value"])]
        outs = dict(zip(order, binding.get_outputs()))
        for e in self.concat:
            self.values[e["past_key"]] = outs[e["present_key"]]
            self.values[e["past_value"]] = outs[e["present_value"]]
        self.bind(binding)

    def buffer_addresses(self) -> dict[str, int]:
        """Data pointers of the bound buffers (tests use them to show nothing is reallocated)."""
        return {name: (v.data_ptr() if hasattr(v, "data_ptr") else v.ctypes.data) for name, v in self.values.items()}
