from __future__ import annotations

import pytest

from fixtures import TINY_CONFIGS, make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """{arch: folder} of tiny Hugging Face checkpoints, built once per session."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: make_tiny_model(arch, root / arch) for arch in TINY_CONFIGS}


@pytest.fixture(scope="session")
def tiny_artifact(tiny_model_dir, tmp_path_factory):
    """{arch: artifact folder} exported in fp32 with the builder backend, once per session."""
    from edgelm.export import export_model

    root = tmp_path_factory.mktemp("tiny_artifacts")
    return {arch: export_model(str(d), root / arch, progress=False) and root / arch
            for arch, d in tiny_model_dir.items()}


@pytest.fixture(scope="session")
def embedded_artifact(tmp_path_factory):
    """{name: artifact folder} of the trained embedded models (real text, real tokenizer)."""
    from edgelm.export import export_model
    from edgelm.export.embedded import EMBEDDED_MODELS

    root = tmp_path_factory.mktemp("embedded_artifacts")
    return {name: export_model(str(d), root / name, progress=False) and root / name
            for name, d in EMBEDDED_MODELS.items()}
