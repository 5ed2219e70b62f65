"""edgelm eval: the sliding window, ONNX == PyTorch on the same windows, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from fixtures import make_tiny_model

from edgelm.errors import InputError
from edgelm.export.embedded import ASSETS
from edgelm.optimize.evaluate import onnx_perplexity, read_text, torch_perplexity, windows

TEXT = (ASSETS / "text" / "heldout.txt").read_text()[:6000]


@pytest.mark.parametrize("n,length,stride", [(100, 32, 16), (100, 32, 31), (33, 32, 8), (5, 32, 16), (64, 16, 5)])
def test_windows_score_every_token_once_with_context(n, length, stride):
    scored = [t for _, end, first in windows(n, length, stride) for t in range(first, end)]
    assert scored == list(range(1, n))
    for begin, end, first in windows(n, length, stride):
        assert end - begin <= length and first - begin >= min(first, length - stride)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neo"])
def test_onnx_and_pytorch_agree(tiny_artifact, tiny_model_dir, arch):
    a = onnx_perplexity(tiny_artifact[arch], TEXT, stride=24, max_length=48)
    b = torch_perplexity(tiny_model_dir[arch], TEXT, stride=24, max_length=48)
    assert a.tokens == b.tokens and a.windows == b.windows
    assert abs(a.perplexity - b.perplexity) / b.perplexity < 1e-4
    assert 1 < a.perplexity < 60000  # random tiny model: about the vocabulary size, never 0 or inf


def test_trained_model_scores_far_better_than_chance(embedded_artifact):
    r = onnx_perplexity(embedded_artifact["gpt2"], TEXT, stride=64, max_length=128)
    assert r.perplexity < 300  # uniform over 50257 tokens would be 50257


def test_eval_errors(tmp_path, tiny_artifact):
    with pytest.raises(InputError, match="no text file"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(InputError, match="empty"):
        read_text(tmp_path / "empty.txt")
    for stride in (0, 48, 100):
        with pytest.raises(InputError, match="--stride"):
            onnx_perplexity(tiny_artifact["gpt2"], TEXT, stride=stride, max_length=48)
    context = json.loads((tiny_artifact["gpt2"] / "manifest.json").read_text())["model"]["facts"]["max_positions"]
    for length in (0, 1, context + 1):  # 0 used to mean the default window, past the context a crash
        with pytest.raises(InputError, match=f"--max-length must be between 2 and the model's context of {context}"):
            onnx_perplexity(tiny_artifact["gpt2"], TEXT, max_length=length)
    with pytest.raises(InputError, match="with --train-text"):
        read_text(tmp_path / "missing.txt", "--train-text")
    r = subprocess.run([sys.executable, "-m", "edgelm", "eval", str(tiny_artifact["gpt2"]), "--text",
                        str(tmp_path / "missing.txt")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "no text file" in r.stderr


def test_a_broken_model_scores_inf_not_a_traceback(tmp_path):
    model = make_tiny_model("gpt2", tmp_path / "loud", scale=100.0)  # logits in the thousands: exp(nll) overflows
    (tmp_path / "t.txt").write_text(TEXT[:800])
    r = subprocess.run([sys.executable, "-m", "edgelm", "eval", str(model), "--text", str(tmp_path / "t.txt"),
                        "--max-length", "48", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["perplexity"] == float("inf") and result["nll"] > 709


def test_eval_provider_and_byte_order_mark(tmp_path, tiny_model_dir):
    (tmp_path / "bom.txt").write_bytes("\ufeffIt was a truth.".encode("utf-8"))
    assert read_text(tmp_path / "bom.txt") == "It was a truth."
    r = subprocess.run([sys.executable, "-m", "edgelm", "eval", str(tiny_model_dir["gpt2"]), "--provider", "cuda",
                        "--text", str(tmp_path / "bom.txt")], capture_output=True, text=True, timeout=60)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "applies to ONNX artifacts" in lines[0], r.stderr
