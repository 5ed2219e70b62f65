"""Calibration text -> token windows -> graph inputs; and capturing intermediate tensors while they run.

``capture`` adds the wanted tensors as extra graph outputs (on the in-memory model, removed again
afterwards), writes a scratch copy to a temporary folder, runs every window through ONNX Runtime
and hands each captured array to a callback, so statistics (channel maxima, Hessians) accumulate
without keeping activations around.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..errors import InputError
from .evaluate import prompt_feed
from .onnx_edit import save_model

MIN_TOKENS = 16


@dataclass(frozen=True)
class Windows:
    """Token windows cut from a calibration text."""

    chunks: tuple[np.ndarray, ...]  # each (1, S) int64
    source: str
    text_tokens: int

    @property
    def tokens(self) -> int:
        return sum(c.shape[1] for c in self.chunks)

    def describe(self) -> dict:
        return {"text": self.source, "windows": len(self.chunks), "window_tokens": int(self.chunks[0].shape[1]),
                "tokens": self.tokens, "text_tokens": self.text_tokens}


def make_windows(tokenizer, text: str, length: int, count: int, source: str) -> Windows:
    """Up to ``count`` windows of ``length`` tokens, spread evenly over the text, not overlapping."""
    ids = np.array(tokenizer.encode(text), dtype=np.int64)
    if len(ids) < MIN_TOKENS:
        raise InputError(f"the calibration text {source} has {len(ids)} tokens; give at least {MIN_TOKENS} "
                         "(a few paragraphs of the kind of text the model will see) with --calib-text")
    length = min(length, len(ids))
    available = len(ids) // length
    starts = np.linspace(0, (available - 1) * length, num=min(count, available)).astype(int)
    starts = sorted({int(s) // length * length for s in starts})
    return Windows(tuple(ids[s:s + length][None] for s in starts), source, len(ids))


class Reader:
    """ONNX Runtime's CalibrationDataReader protocol (get_next, rewind) over the windows."""

    def __init__(self, windows: Windows, manifest: dict, progress: bool = False, desc: str = "calibrating"):
        self.windows, self.manifest, self.progress, self.desc = windows, manifest, progress, desc
        self.rewind()

    def rewind(self) -> None:
        from tqdm import tqdm

        self._it = iter(tqdm(self.windows.chunks, desc=self.desc, unit="window", disable=not self.progress,
                             leave=False))

    def get_next(self) -> dict | None:
        chunk = next(self._it, None)
        return None if chunk is None else prompt_feed(self.manifest, chunk)

    def __iter__(self):
        return self

    def __next__(self):
        feed = self.get_next()
        if feed is None:
            raise StopIteration
        return feed

    def __len__(self) -> int:
        return len(self.windows.chunks)


def capture(model: onnx.ModelProto, tensors: list[str], windows: Windows, manifest: dict,
            on_array: Callable[[str, np.ndarray], None], progress: bool = False, desc: str = "calibrating") -> None:
    """Run every window through ``model`` and call ``on_array(name, value)`` for each wanted tensor."""
    import onnxruntime as ort

    added = [helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in tensors]
    model.graph.output.extend(added)
    try:
        with tempfile.TemporaryDirectory(prefix="edgelm-calib-") as tmp:
            path = Path(tmp) / "scratch.onnx"
            save_model(model, path, keep=True)
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    finally:
        for _ in added:
            model.graph.output.pop()
    for feed in Reader(windows, manifest, progress, desc):
        for name, value in zip(tensors, session.run(tensors, feed)):
            on_array(name, value)
    del session
