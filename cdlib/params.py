"""Pydantic models of every stage's parameters, and of the grid files under ``params/``.

Each stage notebook declares its parameters as literals in its ``parameters``
cell and validates them in the next cell with :func:`from_notebook`. The grid
runner validates each cell's resolved parameters with :func:`validate` before it
starts papermill, so a typo in a grid file fails up front with the key and the
file named, instead of as a papermill warning half-way through a grid.

Defaults are the paper's settings (sections 3, 4 and Appendix H) where it gives
one; the toy world overrides them in ``params/demo.yaml``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ParamsError(ValueError):
    """Invalid parameters; the message names the file, the key and what is wrong."""


class Strict(BaseModel):
    """Base model: unknown keys and wrong types are errors, nothing is coerced silently.

    Pydantic's strict mode: a string is never read as a number or a bool (``"8"`` or
    ``"true"`` is refused, naming the key), nor a float or a bool as an int. The one
    conversion made is int -> float (``epochs: 1``). YAML's own scalars keep their types
    (``8``, ``0.5``, ``true``), and :func:`load_yaml` reads ``1e-4`` as a float too.
    """

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _hide_keys(cls, data: Any) -> Any:
        """An ``api_key_env`` that is no variable name may be the key itself: replace it (:func:`hide_keys`)
        before any error message of this model, which may quote its whole input, can show it."""
        return hide_keys(data)


# --------------------------------------------------------------------------- engines


class EngineParams(Strict):
    """Which generation backend to use and how to configure it (see ``cdlib.engines``)."""

    kind: Literal["vllm", "openai", "hf", "toy"] = "toy"
    model: str = "toy-teacher"  # HF hub id, local directory, or served model name
    tokenizer: str | None = None  # defaults to model
    dtype: str = "auto"
    # vLLM parallelism and memory: passed through to vllm.LLM, never re-implemented
    tensor_parallel_size: int = Field(1, ge=1)
    data_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    distributed_executor_backend: Literal["mp", "ray", "uni"] | None = None  # "ray": multi-node
    max_model_len: int | None = Field(None, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)  # on CPU: share of RAM (~0.2)
    quantization: str | None = None  # e.g. "fp8"
    kv_cache_dtype: str = "auto"
    enforce_eager: bool = False
    reasoning_parser: str | None = None  # e.g. "qwen3", "deepseek_r1", "openai_gptoss"
    enable_lora: bool = False
    max_lora_rank: int = Field(64, ge=1)
    lora_path: str | None = None  # adapter directory to generate with (LoRA students)
    chat_template_kwargs: dict[str, Any] = {}
    vllm_kwargs: dict[str, Any] = {}  # any other vllm.LLM argument
    # OpenAI-compatible servers
    base_url: str | None = None
    api_key_env: str | None = None  # NAME of the environment variable holding the key
    max_concurrency: int = Field(32, ge=1)
    max_retries: int = Field(5, ge=0)
    request_timeout_s: float = Field(600, gt=0)

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not is_env_name(value):  # a key-shaped value arrives as NOT_SHOWN
            raise ValueError("must be the NAME of the environment variable that holds the API key (letters, digits "
                             "and '_', e.g. OPENAI_API_KEY), not the key; the value given is not shown")
        return value


NOT_SHOWN = "<not shown>"
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
# sk-/hf_-style prefixes, or 20+ characters mixing lower case, upper case and digits: a token, not a name
_TOKEN_SHAPED_RE = re.compile(r"(?:sk|pk|rk|hf|ghp|gho|ghs|github_pat)_.{16}|(?=.*[a-z])(?=.*[A-Z])(?=.*[0-9]).{20}")


def is_env_name(value: str) -> bool:
    """Whether ``value`` looks like an environment variable's name (``OPENAI_API_KEY``) rather than a secret
    (``sk-...``, ``hf_...``, a long random mix of cases and digits)."""
    return bool(_ENV_NAME_RE.fullmatch(value)) and not _TOKEN_SHAPED_RE.match(value)


def hide_keys(value: Any) -> Any:
    """``value`` with every ``api_key_env`` that is no variable name (perhaps the key, or a list or mapping
    holding it) replaced by :data:`NOT_SHOWN`, in nested dicts and lists too: for error messages that quote
    a whole input."""
    if isinstance(value, dict):
        return {k: NOT_SHOWN if k == "api_key_env" and v is not None and not (isinstance(v, str) and is_env_name(v))
                else hide_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [hide_keys(v) for v in value]
    return value


# a key's prefix (sk-..., hf_..., ghp_..., Slack's xoxb-...) or a bearer token, anywhere in a string
_KEY_PREFIX_RE = re.compile(r"(?:\b|_)(?:sk|pk|rk|hf|ghp|gho|ghs|github_pat|xox[abp])[-_][A-Za-z0-9_-]{10,}"
                            r"|\bBearer\s+\S")


def looks_secret(text: str) -> bool:
    """Whether a string may hold a credential: a key's prefix (``sk-``, ``hf_``...), ``Bearer ...``, or a run
    of 20 or more letters, digits and ``_`` that mixes lower case, upper case and digits (a random token;
    a model name such as ``Llama-3.1-8B-Instruct`` has no such run)."""
    return bool(_KEY_PREFIX_RE.search(text)) or any(
        re.search("[a-z]", run) and re.search("[A-Z]", run) and re.search("[0-9]", run)
        for run in re.findall(r"[A-Za-z0-9_]{20,}", text))


def shown(value: Any) -> Any:
    """``value`` as an error message may quote it: :func:`hide_keys`, then every string that
    :func:`looks_secret` replaced by :data:`NOT_SHOWN` and URL credentials scrubbed (:mod:`cdlib.secrets`),
    in dicts, lists and tuples alike."""
    from cdlib.secrets import scrub_text

    value = hide_keys(value)
    if isinstance(value, str):
        return NOT_SHOWN if looks_secret(value) else scrub_text(value)
    if isinstance(value, dict):
        return {shown(k): shown(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(shown(v) for v in value)
    return value


class SamplingParams(Strict):
    """Sampling settings shared by every engine."""

    temperature: float = Field(0.6, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int = -1
    max_tokens: int = Field(32768, ge=1)
    seed: int | None = None
    stop: list[str] = []


class ToyParams(Strict):
    """Knobs of the toy world (``cdlib.toy``): seeded multi-step arithmetic word problems."""

    seed: int = 0  # seed of the world itself (questions), independent of a stage's sampling seed
    n_train: int = Field(2000, ge=1)
    n_test: int = Field(200, ge=1)
    # the "pretrain" split, the demo base model's corpus (cdlib.toy): every one-step fact, each
    # pretrain_fact_repeats times, then n_pretrain problems of two to pretrain_max_steps steps
    n_pretrain: int = Field(1000, ge=0)
    pretrain_max_steps: int = Field(2, ge=1)
    pretrain_fact_repeats: int = Field(1, ge=1)
    # the teacher works out in words each step that crosses a ten (make-ten) before its step line, and
    # the base knows by heart only the facts that cross no ten (cdlib.toy.teacher_response)
    work_in_words: bool = False
    min_steps: int = Field(2, ge=1)
    max_steps: int = Field(3, ge=1)
    max_start: int = Field(9, ge=1)  # start values drawn from 1..max_start
    max_operand: int = Field(9, ge=1)  # operands drawn from 1..max_operand
    ops: list[Literal["+", "-", "*"]] = ["+", "-"]
    slip_rate: float = Field(0.1, ge=0, le=1)  # teacher slip probability per step at temperature 1

    @model_validator(mode="after")
    def _steps(self) -> ToyParams:
        if self.max_steps < self.min_steps:
            raise ValueError("max_steps must be >= min_steps")
        return self


# --------------------------------------------------------------------------- stages


class StageParams(Strict):
    """Parameters every stage notebook has."""

    out_dir: str  # the cell directory; the grid runner sets it
    seed: int = 0


class DataParams(StageParams):
    """Which questions a stage works on."""

    datasets: list[str] = ["toy"]  # names in cdlib.datasets.REGISTRY
    data_paths: dict[str, str] = {}  # dataset -> local JSONL/Parquet in the original layout
    limit: int | None = Field(None, ge=1)  # per dataset, after a seeded shuffle
    toy: ToyParams = ToyParams()


class GenerateParams(DataParams):
    """Stage 1: teacher traces with rejection sampling (paper 3.1)."""

    split: Literal["train", "eval", "pretrain"] = "train"  # pretrain: the toy world's base-model corpus
    engine: EngineParams = EngineParams()
    sampling: SamplingParams = SamplingParams()
    rounds: int = Field(4, ge=1)  # K: resampling rounds for wrong answers
    chunk_size: int | None = Field(None, ge=1)  # None: a round's pending questions in one engine call
    shard_index: int = Field(0, ge=0)  # Slurm array task id
    num_shards: int = Field(1, ge=1)
    # Mixed-Policy Distillation: the student samples trajectories for the training questions
    model: str | None = None  # replaces engine.model: a train cell directory (its checkpoint), model dir or hub id
    keep: Literal["correct", "all"] = "correct"  # "all": keep every answered attempt with its verdict (no rejection)

    @model_validator(mode="after")
    def _shard(self) -> GenerateParams:
        if self.shard_index >= self.num_shards:
            raise ValueError("shard_index must be < num_shards")
        return self


class CompressParams(StageParams):
    """Stage 2: trace compression (paper 3.2)."""

    traces: str  # input cell directory (generate, or student samples for MPD)
    compressor: str = "extractive"  # "extractive" (no model) or a label for the model engine
    engine: EngineParams = EngineParams()
    sampling: SamplingParams = SamplingParams(temperature=0.3, max_tokens=8192)
    # "reconstructed" (our wording of the paper's unprinted prompt), "rewrite_student" (MPD), or a prompt file
    prompt: str = "reconstructed"
    tokenizer: str | None = None  # for token counts; defaults to engine.tokenizer/model
    check_answer: bool = True  # flag compressions that drop or contradict the answer
    recompress_attempts: int = Field(1, ge=0)  # retries for flagged compressions (paper: 0)
    drop_flagged: bool = True  # leave still-flagged compressions out downstream (paper: false, every trace kept)
    limit: int | None = Field(None, ge=1)


class TruncateParams(StageParams):
    """Stage 3: length-matched truncation (paper 3.3) and ratio truncation (Distilling the Essence)."""

    traces: str  # generate cell directory
    compressed: str | None = None  # compress cell directory to match lengths to
    mode: Literal["length_matched", "ratio"] = "length_matched"
    ratio: float = Field(0.5, gt=0, le=1)
    tokenizer: str = "whitespace"  # the compressor's tokenizer (paper: Ministral's)
    tolerance: int = Field(1, ge=0)
    drop_flagged: bool = True  # leave cuts that miss the target by more than tolerance out (paper: false)


class TrainParams(StageParams):
    """Stage 4: student fine-tuning (paper 3.3, 4, Appendix C)."""

    data: str  # input cell directory (generate, compress or truncate)
    source: str = "raw"  # raw | answer_only | truncated | <compressor name> | mpd
    # compress cell directories: questions one of them failed to compress (a permanent engine error) are left
    # out of this run whatever its source, so runs naming the same cells train on the same question ids
    same_questions_as: list[str] = []
    student: str = "toy-student"  # HF hub id, local directory, or "toy-student" (from scratch)
    chat_format: Literal["auto", "qwen", "llama3", "harmony", "plain"] = "auto"
    chat_template_kwargs: dict[str, Any] = {}  # same as the evaluate engine's, so training text matches inference
    # answer-only: "none" removes the whole think block (paper 3.3, H.3), "empty" keeps an empty closed one
    answer_only_think: Literal["none", "empty"] = "none"
    method: Literal["full", "lora"] = "full"
    learning_rate: float | None = Field(None, gt=0)  # default: 2e-5 full, 1e-4 LoRA
    lora_rank: int = Field(64, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_target_modules: str | list[str] = "all-linear"
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    token_budget: int | None = Field(None, ge=1)  # compute-matched: train this many tokens
    seq_len: int = Field(16384, ge=8)
    packing: bool = True
    overlong: Literal["error", "truncate", "drop"] = "error"
    micro_batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    # paper H.3: adamw_bnb_8bit (bitsandbytes, LoRA), adamw_torch_8bit (torchao, 0.8B full); adamw_8bit is
    # adamw_bnb_8bit (transformers' alias). Without a CUDA GPU or the package: torch AdamW, saying why
    optimizer: Literal["adamw_8bit", "adamw_bnb_8bit", "adamw_torch_8bit", "adamw"] = "adamw_8bit"
    gradient_checkpointing: bool = True
    bf16: bool = True  # ignored on CPU
    tf32: bool = True  # paper H.3: TF32 matmuls and convolutions on a CUDA GPU (ignored without one)
    val_fraction: float = Field(0.05, ge=0, lt=1)
    loss_on: list[Literal["prompt", "cot", "answer"]] = ["cot", "answer"]  # section masks
    truncate_ratio: float | None = Field(None, gt=0, le=1)  # Distilling the Essence
    truncate_span: Literal["sequence", "reasoning"] = "sequence"
    objective: Literal["sft", "kl"] = "sft"  # "kl": Mixed-Policy Distillation
    kl_teacher: str | None = None
    kl_direction: Literal["forward", "reverse", "jsd"] = "forward"
    # objective kl: loss = kl_weight x divergence + (1 - kl_weight) x cross-entropy on the same tokens. 1.0 is
    # MPD's pure KL; Distilling the Essence's public code (training.sh, distillation_loss_ratio) mixes 0.5 / 0.5
    kl_weight: float = Field(1.0, ge=0, le=1)
    save: Literal["merged", "adapter"] = "adapter"  # LoRA only; full runs always save the model
    log_every: int = Field(10, ge=1)
    accelerate_config: str | None = None  # path under slurm/accelerate/ for FSDP2
    limit: int | None = Field(None, ge=1)
    # added for cdlib.train:
    # auto: flash_attention_2 on GPU if installed, else sdpa_varlen (sdpa per packed example, no L x L mask);
    # sdpa / eager: rows padded to the longest with 4D block masks
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa_varlen", "sdpa", "eager"] = "auto"
    max_grad_norm: float = Field(1.0, ge=0)  # gradient clipping (0: off); Axolotl's default 1.0
    tiny_hidden: int = Field(128, ge=64)  # toy students from scratch: hidden size (heads of dim 64)
    tiny_layers: int = Field(4, ge=1)  # toy students: decoder layers
    tiny_vocab: int = Field(1000, ge=300)  # toy students: BPE vocabulary trained on the input records
    # toy students: the cell whose records train the tokenizer (default: the training data; one cell for all = one
    # vocabulary)
    tiny_tokenizer_data: str | None = None
    kl_chunk_tokens: int = Field(2048, ge=0)  # objective kl: positions per chunk of the divergence (0: all at once)
    save_every: int = Field(200, ge=0)  # optimizer steps between resumable states in <out_dir>/resume/ (0: off)
    # SFT loss head: auto = cce/liger on GPU where installed, else chunked (no full logits)
    loss_head: Literal["auto", "full", "chunked", "liger", "cce"] = "auto"
    loss_chunk_tokens: int = Field(512, ge=1)  # chunked loss head: positions per chunk (memory ~ chunk x vocab fp32)
    # paper H.3's Liger plugin: fused RMSNorm, RoPE, SwiGLU on a GPU where liger-kernel is installed
    liger_kernels: bool = False
    # experiment tracker (accelerate): loss, lr, throughput
    report_to: Literal["none", "tensorboard", "wandb", "mlflow", "trackio"] = "none"
    tracker_project: str = "compress-distill"  # tracker project; the run is named after the cell directory

    @model_validator(mode="after")
    def _kl(self) -> TrainParams:
        if self.objective == "kl" and not self.kl_teacher:
            raise ValueError("objective 'kl' needs kl_teacher")
        if self.objective != "kl" and self.kl_weight != 1.0:
            raise ValueError(f"kl_weight {self.kl_weight} weighs the KL term of objective 'kl'; this run's objective "
                             f"is {self.objective!r} (set objective: kl and kl_teacher, or drop kl_weight)")
        return self


class EvaluateParams(DataParams):
    """Stage 5: student evaluation (paper 4, 5.4)."""

    model: str  # train cell directory, checkpoint directory or hub id
    split: Literal["train", "eval"] = "eval"
    chat_format: Literal["auto", "qwen", "llama3", "harmony", "plain"] = "auto"
    engine: EngineParams = EngineParams(kind="vllm")
    sampling: SamplingParams = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=8192)
    grouping: Literal["paper", "dataset"] = "paper"  # report groups (cdlib.evaluate.GROUPINGS)


class JudgeParams(StageParams):
    """Stage 6: faithfulness judge of compressions (Appendix G)."""

    compressed: str  # compress cell directory
    judge: Literal["llm", "rule"] = "llm"
    engine: EngineParams = EngineParams(kind="vllm")
    sampling: SamplingParams = SamplingParams(temperature=0.0, max_tokens=2048)
    raw_chars: int = Field(40000, ge=100)
    compressed_chars: int = Field(12000, ge=100)
    exclude_datasets: list[str] = []  # datasets not judged (paper Table 10: the MMLU groups)
    limit: int | None = Field(None, ge=1)


class ReportParams(StageParams):
    """Stage 7: the paper's tables and figures from a grid's outputs."""

    grid_dir: str  # outputs/<grid>
    side_by_side: bool = True  # regenerated tables beside the published numbers
    pue: float = Field(1.15, ge=1)  # paper H.5
    grid_kg_co2_per_kwh: float = Field(0.079, ge=0)  # paper H.5: Finland 2023, 79 g/kWh
    gpu_watts: float = Field(700, gt=0)  # H100 SXM board power


class ExploreParams(DataParams):
    """Exploring traces (notebooks/00_explore.py): question pool, length distributions, side by side.

    ``datasets``, ``data_paths``, ``limit``, ``seed`` and ``toy`` describe the question
    pool whose statistics are shown; the cell directories name the traces to browse.
    Keys of ``compressed`` and ``truncated`` are a source name ("llama70b") when there
    is one teacher, or "teacher/source" to say which teacher's traces they hold.
    """

    # teacher label -> generate cell dir (default: make demo's)
    generate: dict[str, str] = {"toy": "outputs/demo/generate/toy"}
    # compressor ("teacher/compressor") -> compress cell dir
    compressed: dict[str, str] = {"extractive": "outputs/demo/compress/toy__extractive"}
    truncated: dict[str, str] = {"truncated": "outputs/demo/truncate/toy"}  # label ("teacher/label") -> truncate cell
    splits: list[Literal["train", "eval"]] = ["train", "eval"]  # splits of the question-pool statistics
    tokenizer: str = "whitespace"  # counts every source alike: "whitespace", "chars/4" or a HF id/path
    filter_datasets: list[str] = []  # show only these datasets (empty: all)
    min_tokens: int | None = Field(None, ge=0)  # shortest reasoning shown (tokens)
    max_tokens: int | None = Field(None, ge=0)  # longest reasoning shown (tokens)
    flagged: Literal["exclude", "include", "only"] = "exclude"  # flagged compressions/truncations
    example: str | None = None  # trace id shown side by side (None: one picked with `seed`)
    bins: int = Field(50, ge=1)  # histogram bins of the length figures


class ImportParams(StageParams):
    """Importing a public or own reasoning-trace set as a generate cell's records (cdlib.trace_import)."""

    source: str  # hub dataset id, or a local JSONL/JSON/Parquet file or directory
    config: str | None = None  # hub config (e.g. OpenR1-Math-220k's "default")
    split: str = "train"  # hub split (a local file or directory is read whole)
    layout: str = "auto"  # a name of cdlib.trace_import.LAYOUTS, "columns", or "auto" (recognised from the columns)
    columns: dict[str, str] = {}  # question, reasoning, answer, response, gold -> column names (override the layout)
    dataset: str | None = None  # the records' dataset name (default: the source's last path part)
    answer_type: Literal["auto", "numeric", "latex", "letter", "boolean"] = "auto"  # auto: numeric gold, else latex
    tokenizer: str = "whitespace"  # counts completion tokens: "whitespace" or a HF tokenizer id/path
    unverified: Literal["flag", "drop"] = "flag"  # rows whose answer does not verify: kept with a flag, or left out
    limit: int | None = Field(None, ge=1)  # the first rows only
    license: str | None = None  # the set's license where its files state none


STAGE_MODELS: dict[str, type[StageParams]] = {
    "explore": ExploreParams,
    "generate": GenerateParams,
    "import": ImportParams,
    "compress": CompressParams,
    "truncate": TruncateParams,
    "train": TrainParams,
    "evaluate": EvaluateParams,
    "judge": JudgeParams,
    "report": ReportParams,
}


# --------------------------------------------------------------------------- validation


def did_you_mean(word: Any, candidates: Any) -> str:
    """``"; did you mean 'x'?"`` for the candidate closest to a mistyped ``word`` (difflib), else ``""``."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _fields_at(model: Any, loc: tuple) -> list[str]:
    """The field names of the (nested) model that holds the key at ``loc``; [] where that is not a model."""
    import typing

    tp, parts = model, list(loc[:-1])
    while parts:
        origin = typing.get_origin(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(str(parts.pop(0)))
            if field is None:
                return []
            tp = field.annotation
        elif origin in (dict, list):  # a mapping's key or a list's index
            parts.pop(0)
            tp = typing.get_args(tp)[-1]
        else:  # Optional[...], a union: the one model among its members
            found = [a for a in typing.get_args(tp) if isinstance(a, type) and issubclass(a, BaseModel)
                     or typing.get_origin(a) in (dict, list)]
            if len(found) != 1:
                return []
            tp = found[0]
    return list(tp.model_fields) if isinstance(tp, type) and issubclass(tp, BaseModel) else []


def error_items(err: ValidationError, model: Any = None) -> list[tuple[tuple, str, str]]:
    """Each error of ``err`` as (loc, dotted key, message); an unknown key of ``model`` (the model validated)
    says which of its fields it is closest to."""
    items = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key" + (did_you_mean(e["loc"][-1], _fields_at(model, e["loc"])) if model else "")
        elif e["type"] == "missing":
            msg = "required key is missing"
        if e["loc"] and e["loc"][-1] == "api_key_env" and not (isinstance(e["input"], str) and is_env_name(e["input"])):
            e["input"] = NOT_SHOWN
        if e["type"] not in ("extra_forbidden", "missing"):
            msg += f" (got {shown(e['input'])!r})"
        items.append((tuple(e["loc"]), key, msg))
    return items


def format_errors(err: ValidationError, source: str, model: Any = None) -> str:
    """A pydantic error as lines ``<source>: key '<key>': <message>``, one per problem (:func:`error_items`)."""
    return "\n".join(f"{source}: key '{key}': {msg}" for _, key, msg in error_items(err, model))


def validate(model: type[BaseModel] | str, values: dict[str, Any], source: str = "<params>") -> Any:
    """Validate ``values`` against a stage model (or its name); raise :class:`ParamsError`.

    ``source`` names where the values came from (a file, a grid cell) and starts
    every line of the message, so the user knows what to fix and where.
    """
    cls = model if not isinstance(model, str) else STAGE_MODELS.get(model)
    if cls is None:
        raise ParamsError(f"{source}: unknown stage {model!r}; known: {', '.join(STAGE_MODELS)}")
    try:
        return cls.model_validate(values)
    except ValidationError as e:
        raise ParamsError(format_errors(e, source, cls)) from None


def from_notebook(stage: str, namespace: dict[str, Any]) -> Any:
    """Validate a notebook's parameters: pick the stage's fields out of ``namespace`` (``globals()``).

    First moves to the repository root when the kernel runs inside a checkout
    (:func:`cdlib.notebook.enter_project_root`), so the same relative paths work in
    JupyterLab, under papermill and in the grid runner.
    """
    from cdlib.notebook import enter_project_root

    enter_project_root()
    cls = STAGE_MODELS[stage]
    values = {k: namespace[k] for k in cls.model_fields if k in namespace}
    return validate(cls, values, source=f"notebook parameters of stage '{stage}'")


def yaml_loader() -> type:
    """PyYAML's SafeLoader, made stricter in two ways: a key given twice in one mapping is an
    error naming both lines (PyYAML keeps the last silently), and ``1e-4`` is read as a float as
    YAML 1.2 does (PyYAML's YAML 1.1 reads it as a string, which strict params would refuse)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        def flatten_mapping(self, node: Any) -> None:
            # The first call per node comes before ``<<`` merges are folded in; keys they bring may be overridden.
            checked = self.__dict__.setdefault("_checked", set())
            if id(node) not in checked:
                checked.add(id(node))
                first: dict[Any, int] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        if key in first:
                            raise yaml.constructor.ConstructorError(
                                None, None, f"duplicate key {key!r} (first given on line {first[key]})",
                                key_node.start_mark)
                        first[key] = key_node.start_mark.line + 1
                    except TypeError:  # an unhashable key: PyYAML reports it
                        continue
            super().flatten_mapping(node)

    Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))
    return Loader


def load_yaml(path: str | Path) -> Any:
    """Read a YAML file with :func:`yaml_loader`; syntax errors and duplicate keys name the file, line and column."""
    import yaml

    path = Path(path)
    try:
        return yaml.load(path.read_text(), Loader=yaml_loader())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ParamsError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
