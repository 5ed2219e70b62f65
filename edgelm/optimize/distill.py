"""``edgelm optimize distill``: a shallower student, initialised from chosen teacher layers, trained on
the teacher's soft targets plus the next-token loss.

Layer choice: the student's layers are spread evenly over the teacher's depth, and each student
layer takes a teacher layer of the kind it needs. For GPT-Neo's alternating global/local stack the
student keeps the same alternation (global, local, global, ...), so it has both kinds; taking every
other teacher layer would keep only one of them. ``--student-config`` gives any other student of
the same family: with the teacher's width it is initialised from teacher layers the same way,
otherwise from scratch.

The step measures what it gained on held-out text: perplexity of the teacher, of the student
before training (the truncated teacher) and after, and the share of that gap it closed.
"""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path

from .._fs import atomic_output_dir, check_output
from ..bench.energy import current_step, measured_step
from ..errors import InputError
from .train import TrainConfig, check_batch_fits, checkpoint_folder, token_ids, train

EVAL_TEXT = Path(__file__).resolve().parent.parent / "assets" / "text" / "heldout.txt"


def layer_kind_names(config: dict) -> list[str]:
    from ..export.arch import resolve

    return [kind for kind, _ in resolve(config).layer_kinds]


def choose_layers(teacher_kinds: list[str], student_kinds: list[str]) -> list[int]:
    """Teacher layer indices for each student layer: evenly spread over the depth, of the right kind,
    in increasing order. The first and last teacher layers are kept when their kinds allow it."""
    n, total = len(student_kinds), len(teacher_kinds)
    if not 1 <= n <= total:
        raise InputError(f"the student needs between 1 and {total} layers (the teacher's depth), got {n}")

    def fits(after: int, j: int) -> bool:  # can student layers j.. still be matched after teacher layer `after`?
        it = iter(teacher_kinds[after + 1:])
        return all(any(k == want for k in it) for want in student_kinds[j:])

    chosen, prev = [], -1
    for j, want in enumerate(student_kinds):
        target = 0 if n == 1 else j * (total - 1) / (n - 1)
        options = [i for i in range(prev + 1, total) if teacher_kinds[i] == want and fits(i, j + 1)]
        if not options:
            raise InputError(f"the teacher has no {want} layer left for student layer {j}; choose a student "
                             f"whose layer kinds ({', '.join(student_kinds)}) appear in the teacher's order")
        prev = min(options, key=lambda i: (abs(i - target), -i))
        chosen.append(prev)
    return chosen


def parse_layers(value: str, teacher_kinds: list[str], name: str = "--student-layers") -> list[int]:
    """``"6"`` (a depth: layers chosen for you) or ``"0,3,5"`` (teacher layers to keep, in order);
    ``name`` is what the user wrote it as (the flag, or a recipe's key)."""
    value = str(value).strip()
    try:
        if "," not in value:
            n = int(value)
            if not 1 <= n <= len(teacher_kinds):
                raise InputError(f"{name} must be from 1 to {len(teacher_kinds)} (the teacher's depth), "
                                 f"got {n}")
            # the student follows the teacher's own pattern of kinds (GPT-Neo: global, local, ...)
            return choose_layers(teacher_kinds, teacher_kinds[:n])
        layers = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{name} takes a number of layers or a list such as 0,3,5; got '{value}'") from None
    if not layers or sorted(set(layers)) != layers or layers[0] < 0 or layers[-1] >= len(teacher_kinds):
        raise InputError(f"{name} must list distinct teacher layers in increasing order, each from 0 "
                         f"to {len(teacher_kinds) - 1}; got '{value}'")
    return layers


def student_config(teacher_config: dict, layers: list[int]) -> dict:
    """The teacher's config, cut to ``layers`` (layer kinds and per-layer shapes follow)."""
    from ..export.arch import arch_for

    spec = arch_for(teacher_config)
    config = copy.deepcopy(teacher_config)
    config[spec.num_layers] = len(layers)
    kinds = layer_kind_names(teacher_config)
    if "attention_layers" in config or "attention_types" in config:  # GPT-Neo
        config["attention_layers"] = [kinds[i] for i in layers]
        config["attention_types"] = [[config["attention_layers"], 1]]
    for key in ("edgelm_layer_heads", "edgelm_layer_inner"):
        if key in config:
            config[key] = [config[key][i] for i in layers]
    return config


def take_layers(teacher, layers: list[int], prefix: str = "transformer.h.") -> dict:
    """{student parameter name: teacher tensor}: everything outside the blocks, and block i -> block j."""
    renumber = {str(i): str(j) for j, i in enumerate(layers)}
    tensors = {}
    for name, p in teacher.named_parameters():
        if name.startswith(prefix):
            index, rest = name[len(prefix):].split(".", 1)
            if index not in renumber:
                continue
            name = f"{prefix}{renumber[index]}.{rest}"
        tensors[name] = p
    return tensors


POSITIONS = "transformer.wpe.weight"  # the position table, in GPT-2 and GPT-Neo alike


def _same_width(a: dict, b: dict) -> bool:
    from ..export.arch import resolve

    fa, fb = resolve(a), resolve(b)
    return (fa.hidden_size, fa.head_size, fa.vocab_size) == (fb.hidden_size, fb.head_size, fb.vocab_size)


def read_student_config(path: str | Path, teacher_config: dict) -> dict:
    """A student's config.json, checked against its teacher's config: one architecture, one vocabulary,
    a context no longer than the teacher's."""
    from ..export.arch import resolve
    from ..export.checkpoint import read_json_object

    path = Path(path)
    if not path.is_file():
        raise InputError(f"no student config {path}; pass a config.json of the student architecture")
    config = read_json_object(path)  # not JSON, or not an object: one sentence
    if config.get("model_type") != teacher_config.get("model_type"):
        raise InputError(f"the student config is a '{config.get('model_type')}' and the teacher a "
                         f"'{teacher_config.get('model_type')}'; distill within one architecture")
    positions, teacher_positions = resolve(config).max_positions, resolve(teacher_config).max_positions
    if config.get("vocab_size") != teacher_config.get("vocab_size"):
        raise InputError("the student's vocab_size differs from the teacher's; they must share the tokenizer")
    if positions > teacher_positions:
        raise InputError(f"the student's context of {positions} positions is longer than the teacher's "
                         f"{teacher_positions}, which it could not learn from; give it at most {teacher_positions}")
    return config


def make_student(teacher, teacher_config: dict, student_layers: str | None = None,
                 student_config_file: str | Path | None = None):
    """(student model, student config, teacher layers it came from or None when initialised from scratch)."""
    from ..export.arch import resolve
    from .models import build_model

    teacher_kinds = layer_kind_names(teacher_config)
    if (student_layers is None) == (student_config_file is None):
        raise InputError("give either --student-layers or --student-config (exactly one)")
    if student_layers is not None:
        layers = parse_layers(student_layers, teacher_kinds)
        config = student_config(teacher_config, layers)
        return build_model(config, take_layers(teacher, layers)), config, layers
    config = read_student_config(student_config_file, teacher_config)
    positions = resolve(config).max_positions
    if _same_width(config, teacher_config):
        layers = choose_layers(teacher_kinds, layer_kind_names(config))
        want_heads, want_inner = resolve(config).layer_heads, resolve(config).layer_inner
        cut = resolve(student_config(teacher_config, layers))
        if (cut.layer_heads, cut.layer_inner) == (want_heads, want_inner):
            tensors = take_layers(teacher, layers)
            tensors[POSITIONS] = tensors[POSITIONS][:positions]  # a shorter context keeps the first positions
            return build_model(config, tensors), config, layers
    return build_model(config, seed=0), config, None


@measured_step("distill")
def distill_model(teacher: str, out: str | Path, train_text: str | Path, cfg: TrainConfig, *,
                  student_layers: str | None = None, student_config_file: str | Path | None = None,
                  eval_text: str | Path | None = None, eval_length: int | None = None, resume: bool = False,
                  force: bool = False, progress: bool = True, checkpoint_dir: str | Path | None = None,
                  keep_checkpoints: bool = False, stop_after: int | None = None) -> dict:
    """Distill ``teacher`` into a student model folder ``out``; return the step record (also in the lineage)."""
    from ..export.arch import resolve
    from ..manifest import read_lineage
    from .evaluate import model_perplexity, read_text
    from .models import load_model, model_dir_of, parameter_bytes, save_model, tokenizer_for

    out = Path(out)
    inputs = [teacher, train_text, eval_text, student_config_file]
    check_output(out, force, inputs=inputs)
    work = checkpoint_folder(out, checkpoint_dir, resume, inputs=inputs)
    started = time.perf_counter()
    teacher_dir = model_dir_of(teacher)
    say = print if progress else (lambda *a, **k: None)
    tokenizer = tokenizer_for(teacher_dir)
    train_ids = token_ids(tokenizer, read_text(train_text, "--train-text (train_text in a recipe)"), cfg.seq_len)
    eval_path = Path(eval_text) if eval_text else EVAL_TEXT
    eval_ids = token_ids(tokenizer, read_text(eval_path, "--eval-text (eval_text in a recipe)"), 2, "--eval-text")

    teacher_model, teacher_config = load_model(teacher_dir)
    facts = resolve(teacher_config)
    if cfg.seq_len > facts.max_positions:
        raise InputError(f"--seq-len {cfg.seq_len} is longer than the model's context ({facts.max_positions})")
    check_batch_fits(cfg, facts.vocab_size, teacher=True)  # before the evaluations: a batch too large for memory
    for p in teacher_model.parameters():
        p.requires_grad_(False)
    student, config, layers = make_student(teacher_model, teacher_config, student_layers, student_config_file)
    positions = resolve(config).max_positions  # a student config may give the student a shorter context
    if cfg.seq_len > positions:
        raise InputError(f"--seq-len {cfg.seq_len} is longer than the student's context ({positions}); lower "
                         "--seq-len or give the student config more positions")
    length = min(eval_length or cfg.seq_len, positions)
    stride = max(1, length // 2)
    kinds = layer_kind_names(config)
    say(f"student: {len(kinds)} layers ({', '.join(kinds)})"
        + (f" from teacher layers {layers}" if layers is not None else " initialised from scratch"))

    score = lambda model, name: model_perplexity(model, eval_ids, length, stride, name).perplexity  # noqa: E731
    ppl_teacher = score(teacher_model, "teacher")
    ppl_before = score(student, "student before training")
    say(f"held-out perplexity ({length}-token windows): teacher {ppl_teacher:.2f}, student before training "
        f"{ppl_before:.2f}")
    result = train(student, teacher_model, train_ids, cfg, work, resume=resume, progress=progress,
                   desc="distilling", stop_after=stop_after,
                   extra_state={"teacher": str(teacher_dir), "layers": layers, "student_kinds": kinds})
    ppl_after = score(student, "student")
    gap = ppl_before - ppl_teacher
    closed = (ppl_before - ppl_after) / gap if gap > 0 else None
    say(f"held-out perplexity: student after training {ppl_after:.2f}"
        + (f" (closed {100 * closed:.1f}% of the gap to the teacher)" if closed is not None else ""))

    record = {
        "name": "distill", "teacher": str(teacher), "train_text": str(train_text),
        "student_layers": layers, "student_layer_kinds": kinds,
        "initialisation": "teacher layers" if layers is not None else "random",
        "parameters": {"teacher": sum(p.numel() for p in teacher_model.parameters()),
                       "student": sum(p.numel() for p in student.parameters())},
        "weight_bytes": {"teacher": parameter_bytes(teacher_model), "student": parameter_bytes(student)},
        "training": result.record(cfg),
        "perplexity": {"text": str(eval_path), "max_length": length, "stride": stride, "teacher": round(ppl_teacher, 4),
                       "student_before": round(ppl_before, 4), "student_after": round(ppl_after, 4),
                       "gap_closed": None if closed is None else round(closed, 4)},
    }
    with atomic_output_dir(out, force) as tmp:
        step = current_step().finish(seconds_total=round(time.perf_counter() - started, 2))
        record.update({k: step[k] for k in ("seconds", "peak_rss_bytes", "energy")})
        save_model(student, config, tmp, teacher_dir, read_lineage(teacher_dir) + [record])
    if not keep_checkpoints:
        shutil.rmtree(work, ignore_errors=True)
    return record
