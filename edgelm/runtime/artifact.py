"""Open an artifact folder: manifest, tokenizer and an ONNX Runtime session on the chosen provider.

Imports only onnxruntime, numpy and tokenizers (a test pins that torch and transformers stay out).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ArtifactError, DependencyError, InputError, UnsupportedModelError
from ..manifest import read_manifest
from . import native
from .native import SCREEN_INPUT
from .options import KERNELS, PROVIDERS, WEIGHT_PLACEMENTS, check_threads

NP_DTYPES = {"float32": np.float32, "float16": np.float16}


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise DependencyError(
            "ONNX Runtime is not installed: run pip install 'edgelm[cpu]' (or 'edgelm[gpu]' for CUDA)"
        ) from None
    return onnxruntime


def check_provider(provider: str) -> str:
    """The ORT provider name for 'cpu' or 'cuda'; a clear error instead of a silent CPU fallback."""
    if provider not in PROVIDERS:
        raise InputError(f"provider '{provider}' is not supported; choose cpu or cuda")
    ort = _ort()
    name = PROVIDERS[provider]
    if name not in ort.get_available_providers():
        raise InputError(
            "CUDA was asked for, but this ONNX Runtime has no CUDA provider: install onnxruntime-gpu "
            "(pip install 'edgelm[gpu]', in an environment without the onnxruntime package) on a machine "
            "with an NVIDIA GPU, or use --provider cpu"
        )
    return name


def check_cuda_graph(folder: Path, manifest: dict) -> None:
    """Refuse a builder graph whose attention ONNX Runtime's CUDA provider cannot run, instead of
    letting ONNX Runtime place it on the CPU (a host round trip of the cache at every step): its
    CUDA GroupQueryAttention is registered for fp16 and bf16 only, and refuses an attention bias
    (onnxruntime/contrib_ops/cuda/bert/group_query_attention.cc), so only fp16 graphs with right
    padding (export/builder.py) run there. Graphs from the optimum backend use standard operators."""
    if manifest["graph"].get("backend") != "builder":
        return
    if manifest["io"]["kv_dtype"] != "float16":
        raise InputError(f"{folder} computes attention in fp32, which ONNX Runtime's CUDA provider has no kernel "
                         "for: export an fp16 artifact for CUDA (edgelm export MODEL --dtype fp16), or use --provider cpu")
    if manifest["io"].get("padding", "left") != "right":
        raise InputError(f"{folder} feeds its attention a padding bias, which ONNX Runtime's CUDA kernel refuses "
                         "(fp16 artifacts exported before edgelm took right padding): export it again, or use --provider cpu")


class Tokenizer:
    """GPT-2 byte-level BPE through the `tokenizers` package (no transformers)."""

    def __init__(self, folder: Path, error: type[Exception] = ArtifactError):
        """``error``: what a missing or unreadable tokenizer raises (an artifact's, or a model folder's)."""
        from tokenizers import Tokenizer as HFTokenizer

        try:
            if (folder / "tokenizer.json").is_file():
                self._tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
            elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
                from tokenizers import decoders, models, pre_tokenizers

                self._tok = HFTokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
                self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
                self._tok.decoder = decoders.ByteLevel()
            else:
                raise error(f"{folder} has no tokenizer.json (or vocab.json + merges.txt); export the model again")
        except Exception as exc:  # the tokenizers library's own errors: a damaged file
            if isinstance(exc, error):
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise error(f"the tokenizer in {folder} cannot be read ({first}); the copy is damaged, copy it "
                        "again (edgelm verify checks an artifact's files)") from None

    @property
    def size(self) -> int:
        """Token ids it can produce: its vocabulary with the added tokens."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def edgelm_refusal(manifest: dict, provider: str) -> str | None:
    """Why this artifact cannot run on edgelm's kernels here (a clause), None when it can."""
    graph, io = manifest["graph"], manifest["io"]
    if provider != "cpu":
        return "edgelm's operators run on the CPU only"
    if graph.get("backend") != "builder":
        return "it was exported by the optimum backend, whose graph edgelm does not rewrite"
    if graph.get("quantization"):
        return "it is quantized, and edgelm's operators are fp32"
    if graph.get("dtype") != "fp32" or io["kv_dtype"] != "float32":
        return "it is not fp32, and edgelm's operators are fp32"
    if io.get("padding", "left") != "left":
        return "it takes right padding, and edgelm's attention reads a left-padded mask"
    if native.library_path() is None:
        return "edgelm's operator library is not built (pip install edgelm needs a C compiler)"
    try:
        import onnx  # noqa: F401  (the graph is rewritten with it)
    except ImportError:
        return "the onnx package is not installed (pip install onnx)"
    return None


def choose_kernels(folder: Path, manifest: dict, provider: str, kernels: str) -> str:
    """"edgelm" or "onnxruntime" for ``kernels`` (KERNELS), or one sentence why not."""
    if kernels not in KERNELS:
        raise InputError(f"kernels '{kernels}' is unknown; choose one of {', '.join(KERNELS)}")
    if manifest["graph"].get("linear_layout") == "packed":
        if kernels == "onnxruntime":
            raise InputError(f"{folder} is in the packed linear layout, which only edgelm's operators run: use "
                             "--kernels auto, or export it with --linear-layout conv for ONNX Runtime's own kernels")
        return "edgelm"
    if kernels == "onnxruntime":
        return kernels
    why = edgelm_refusal(manifest, provider)
    if kernels == "edgelm" and why:
        raise InputError(f"{folder} cannot run on edgelm's kernels: {why}; use --kernels onnxruntime")
    return "onnxruntime" if why else "edgelm"


def kernels_as_exported(manifest: dict) -> str:
    """The ``kernels`` that run a graph as it was exported: "onnxruntime" for the conv and matmul
    layouts (which "auto" would turn into the packed graph), "auto" (edgelm's) for the packed one.
    For comparisons of the layouts themselves."""
    return "auto" if manifest["graph"].get("linear_layout") == "packed" else "onnxruntime"


@dataclass
class Artifact:
    folder: Path
    manifest: dict
    session: object
    provider: str
    tokenizer: Tokenizer
    kernels: str = "onnxruntime"  # what runs the graph: "edgelm" or "onnxruntime" (KERNELS)
    held: tuple = ()  # weights handed to ONNX Runtime without a copy, kept alive with the session

    @property
    def facts(self) -> dict:
        return self.manifest["model"]["facts"]

    @property
    def input_names(self) -> set[str]:
        return {i["name"] for i in self.manifest["io"]["inputs"]}

    @property
    def screens(self) -> bool:
        """Whether the session's LM head takes the screen switch (edgelm's kernels: native/screen.c)."""
        return any(i.name == SCREEN_INPUT for i in self.session.get_inputs())

    @property
    def kv_dtype(self):
        return NP_DTYPES[self.manifest["io"]["kv_dtype"]]

    @property
    def generation_defaults(self) -> dict:
        """The sampling settings of the model's generation_config.json (sampling.model_defaults' names;
        empty where it sets none, and for artifacts exported before edgelm kept them)."""
        return self.manifest.get("generation", {})

    @property
    def eos_token_id(self) -> int | None:
        return self.manifest["tokenizer"].get("eos_token_id")

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every id generation ends on (older manifests name eos_token_id alone)."""
        tokenizer = self.manifest["tokenizer"]
        ids = tokenizer.get("eos_token_ids")
        if ids is None:
            ids = [] if tokenizer.get("eos_token_id") is None else [tokenizer["eos_token_id"]]
        return frozenset(ids)


def load_artifact(folder: str | Path, provider: str = "cpu", threads: int | None = None,
                  weights: str = "mapped", kernels: str = "auto", screen: bool = False) -> Artifact:
    """``weights``: where a packed artifact's weights live, "mapped" or "memory" (WEIGHT_PLACEMENTS);
    ``kernels``: "auto", "edgelm" or "onnxruntime" (KERNELS); ``screen``: where the graph runs on
    edgelm's kernels (rewritten at load, or a packed export), give its LM head the screen's switch
    (native/screen.c), a graph input (SCREEN_INPUT) that every run must then feed, as the Generator does."""
    if weights not in WEIGHT_PLACEMENTS:
        raise InputError(f"weights '{weights}' is unknown; choose one of {', '.join(WEIGHT_PLACEMENTS)}")
    check_threads(threads)
    folder = Path(folder)
    manifest = read_manifest(folder)
    packed = manifest["graph"].get("linear_layout") == "packed"
    if packed and provider != "cpu":
        raise InputError(f"{folder} is in the packed linear layout, whose operator runs on the CPU only: "
                         "use --provider cpu, or export a CUDA artifact (--dtype fp16)")
    if provider == "cuda":
        check_cuda_graph(folder, manifest)
    provider_name = check_provider(provider)
    asked, kernels = kernels, choose_kernels(folder, manifest, provider, kernels)
    ort = _ort()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    if kernels == "edgelm":
        native.register(opts)
    data_name = manifest["graph"].get("external_data")
    in_memory = packed and weights == "memory" and data_name and (folder / data_name).is_file()
    held, rewritten = (), None
    if kernels == "edgelm" and not packed:
        try:
            rewritten = _packed_graph(folder / manifest["graph"]["file"], screen)
        except (UnsupportedModelError, ValueError) as exc:  # a graph the rewrite does not recognize
            if asked == "edgelm":
                raise InputError(f"{folder} cannot run on edgelm's kernels: {exc}; use --kernels onnxruntime") from None
            kernels = "onnxruntime"
    try:
        if rewritten:
            session, held = _in_memory_session(ort, *rewritten, opts, provider_name)
        else:
            graph = folder / manifest["graph"]["file"]
            if packed and screen:  # the graph's LM head with the screen's switch; the weights stay in the file
                graph = _screened_graph(graph, opts)
            session = _session(ort, graph, opts, provider_name, folder / data_name if in_memory else None)
    except DependencyError:
        raise
    except Exception as exc:
        raise ArtifactError(f"ONNX Runtime cannot load {folder / manifest['graph']['file']}: "
                            f"{str(exc).splitlines()[0][:300]}") from None
    graph_inputs = {i.name for i in session.get_inputs()} - {SCREEN_INPUT}  # the runtime's own, when asked for
    listed = {i["name"] for i in manifest["io"]["inputs"]}
    if graph_inputs != listed:
        raise ArtifactError(f"{folder}: the graph's inputs differ from its manifest ({sorted(graph_inputs ^ listed)[:4]}); "
                            "export the model again")
    return Artifact(folder, manifest, session, provider, Tokenizer(folder), kernels, held)


def _packed_graph(graph: Path, screen: bool = False):
    """``graph`` (conv or matmul layout) turned into the packed graph, as (model, {name: array}).

    The weights never pass through protobuf: numpy maps each of them in the data file (or copies the
    graph's inline bytes), transposes and packs them there, straight from the file's pages
    (onnx_edit.load_weights_apart), and copies what is not packed out of the mapping; the model's
    initializers are placeholders. Raises UnsupportedModelError (or ValueError) for a graph the
    rewrite does not recognize."""
    from ..optimize.onnx_edit import conv_to_matmul, load_weights_apart, matmul_to_packed, screen_logits, unmapped

    from google.protobuf.message import DecodeError

    try:
        model, arrays = load_weights_apart(graph, mapped=True)
    except (DecodeError, OSError, EOFError) as exc:  # what ONNX Runtime's own load says of it, below
        raise ArtifactError(f"{graph} is not a readable ONNX graph ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else 'no detail'}); "
                            "export the model again") from None
    conv_to_matmul(model, arrays)
    matmul_to_packed(model, arrays)
    if screen:
        screen_logits(model)
    # what was not packed (position table, biases, norms) leaves the file's mapping; numpy's arrays
    # start 16 bytes into a page, and aligning them to pages, as the data file's tensors are, made no
    # measurable difference in one A/B (DESIGN.md)
    return model, {name: unmapped(arrays.pop(name)) for name in list(arrays)}


def _screened_graph(graph: Path, opts) -> bytes | Path:
    """A packed export's graph with its LM head's screen switch (onnx_edit.screen_logits), as bytes that
    ONNX Runtime reads its weights for from the artifact's folder as it would for the file (mapped, or
    from the copy _session hands it); the graph as it is when it has no such head, or where the onnx
    package is missing (the packed export itself runs without it)."""
    try:
        import onnx

        from ..optimize.onnx_edit import screen_logits
    except ImportError:
        return graph

    model = onnx.load(str(graph), load_external_data=False)
    if not screen_logits(model):
        return graph
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(graph.parent))
    return model.SerializeToString()


def _in_memory_session(ort, model, arrays: dict, opts, provider_name: str):
    """A session of ``model`` whose placeholder initializers are ``arrays``, which ONNX Runtime runs
    on, not on a copy: each is handed over with add_initializer, which overrides the graph's
    initializer of that name with the caller's memory (so the arrays must outlive the session). The
    graph goes as bytes. ONNX Runtime still checks the placeholders' external data, so they point at
    an empty sparse file in a temporary folder, which it never reads (a test zeroes a held array and
    the logits change). Returns (session, what must stay alive with it)."""
    import tempfile

    from ..optimize.onnx_edit import IN_MEMORY

    values = {name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in arrays.items()}
    with tempfile.TemporaryDirectory(prefix="edgelm-") as tmp:
        with open(Path(tmp) / IN_MEMORY, "wb") as f:
            f.truncate(max(a.nbytes for a in arrays.values()))  # sparse: no disk, never read
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", tmp)
        for name, value in values.items():
            opts.add_initializer(name, value)
        session = _open(ort, model.SerializeToString(), opts, provider_name)
    return session, (list(arrays.values()), list(values.values()))


def _session(ort, graph: Path | bytes, opts, provider_name: str, data: Path | None):
    """An ONNX Runtime session of ``graph`` (a file, or a graph's bytes); with ``data`` (its external
    data file), the weights are handed over from a read-only mapping of that file, which ONNX Runtime
    copies into its own memory while it builds the session, and the mapping is closed again."""
    source = graph if isinstance(graph, bytes) else str(graph)
    if data is None:
        return _open(ort, source, opts, provider_name)
    with open(data, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        with memoryview(mapped) as view:
            opts.add_external_initializers_from_files_in_memory([data.name], [view], [len(view)])
            return _open(ort, source, opts, provider_name)


def _open(ort, source, opts, provider_name: str):
    """An InferenceSession on exactly ``provider_name``. ONNX Runtime's Python session falls back to
    the CPU when a provider fails to start (printing a banner to stdout); with onnxruntime-gpu on a
    machine without a working GPU, CUDA would then run on the CPU unannounced. Here that fallback is
    off, and a session that does not run on the provider asked for is refused."""
    try:
        session = ort.InferenceSession(source, opts, providers=[provider_name], enable_fallback=0)
    except Exception as exc:
        if provider_name != PROVIDERS["cuda"]:
            raise
        raise _cuda_failed(str(exc).splitlines()[0][:300]) from None
    if provider_name not in session.get_providers():
        # ONNX Runtime only logs why its CUDA library did not load; loading it here says why
        raise _cuda_failed(_unloadable(Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so")
                           or f"the session runs on {', '.join(session.get_providers())}")
    return session


def _unloadable(library: Path) -> str | None:
    """Why ``library`` cannot be loaded (the loader's message), None when it loads or is absent."""
    import ctypes

    if not library.is_file():
        return None
    try:
        ctypes.CDLL(str(library))
    except OSError as exc:
        return str(exc)[:300]
    return None


def _cuda_failed(why: str) -> DependencyError:
    return DependencyError(
        f"CUDA was asked for, but ONNX Runtime could not start its CUDA provider ({why}): it needs an NVIDIA "
        "GPU and driver, and the CUDA and cuDNN libraries onnxruntime-gpu was built for "
        "(pip install 'onnxruntime-gpu[cuda,cudnn]'); or use --provider cpu")

