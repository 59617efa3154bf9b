"""GPU cost model of the paper grid: H100-hours per stage from tokens x throughput.

Every token count comes from the paper's own tables (:func:`cdlib.paper.table`): Table 4 (correct traces and
mean tokens per dataset and teacher), Table 5 (compressed tokens), Table 11 (GPUs, GPU-hours and trainable
tokens per training run), Table 9 (evaluation output tokens per run; its gaps take the student's mean), Table 10
(judge counts of the Qwen teacher; Table 4's counts stand in for the gpt-oss teacher, which it does not cover).
The runs are the cells of ``params/paper.yaml`` (:class:`cdlib.grid.Grid`).

Throughput, per stage:

* training: calibrated on the paper's measured runs. For each (student, method) the paper's effective MFU is
  ``k*N*D / (GPU-seconds * peak)`` with ``k`` = 6 (Full) or 4 (LoRA) as in :func:`cdlib.train.flops_estimate`,
  ``N`` the student's active parameters, ``D`` its trainable tokens and the H100 dense BF16 peak;
* teacher generation and compression under the Qwen teacher: calibrated on the paper's measured GPU-hours
  (Appendix H.4, derived from its wall-clock times in :func:`paper_upstream`) over the tokens its tables give;
* what the paper did not measure (the gpt-oss teacher's generation, evaluation, judging): the stated vLLM
  throughputs of :data:`VLLM_TOKENS_PER_GPU_S`, each with its source.

The paper's 705 H100-hours count the Qwen teacher's generation and its two compressions (424, App. H.4) plus
the 55 training runs (280.9) (:data:`PAPER_SCOPE`); the gpt-oss teacher's generation and compressions,
evaluation and judging are projected beside them but outside that comparison, as H.4 leaves them out.
Levers (:data:`LEVERS`) are multipliers on one stage's GPU-hours relative to what the paper did; a factor of
1.0 means the paper already had the lever, and the note says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from cdlib import paper

H100_BF16_DENSE_FLOPS = 989e12  # NVIDIA H100 SXM datasheet: 989 TFLOP/s dense BF16 (1,979 with sparsity)

# Active parameters per training token (MoE: the active ones). Qwen3.5 sizes are the nominal ones in the model
# names (no exact count is in the paper); Llama-3.1-8B 8.03B (model card); gpt-oss-20b 3.6B active of 21B (OpenAI
# gpt-oss model card).
STUDENT_ACTIVE_PARAMS = {"Qwen3.5-0.8B": 0.8e9, "Llama-3.1-8B": 8.03e9, "Qwen3.5-9B": 9.0e9, "gpt-oss-20B": 3.6e9}

TEACHERS = {"qwen3.5-397b": "Qwen3.5-397B-A17B", "gpt-oss-120b": "gpt-oss-120B"}  # grid slug -> paper name
STUDENTS = {"qwen3.5-0.8b": "Qwen3.5-0.8B", "llama-3.1-8b": "Llama-3.1-8B", "qwen3.5-9b": "Qwen3.5-9B",
            "gpt-oss-20b": "gpt-oss-20B"}

# vLLM output tokens per second per H100 at a saturated batch, for the models the paper did not time.
# Source: third-party vLLM benchmarks collected at https://www.morphllm.com/vllm-benchmarks (2025-26):
# Llama 3.1 8B BF16 on 1xH100 ~12,500 tok/s; GPT-OSS-120B on 2xH100 4,741 tok/s at 100 concurrent requests.
# One significant figure of trust: other setups differ by 2x either way.
VLLM_TOKENS_PER_GPU_S = {
    "Qwen3.5-0.8B": 12_500.0,  # no figure found: the 8B figure (a 0.8B model is scheduler-bound, not FLOP-bound)
    "Llama-3.1-8B": 12_500.0,  # Llama 3.1 8B BF16, 1xH100 (morphllm)
    "Qwen3.5-9B": 12_500.0,  # same size class as Llama 3.1 8B
    "gpt-oss-20B": 12_500.0,  # 3.6B active MoE: assumed no faster than a dense 8B
    "gpt-oss-120B": 4_741 / 2,  # GPT-OSS-120B, 2xH100, 100 concurrent (morphllm): teacher and judge
}
# A published figure near the teacher stage, to judge whether the paper's teacher pass left throughput unused:
# Qwen3-235B-A22B-Instruct-2507-FP8 (22B active; Qwen3.5-397B-A17B has 17B) under vLLM on H100, TP4, ShareGPT,
# 1,000 requests: 8,425 total (prompt + output) tokens/s per 4-GPU replica, unoptimised; 7,787 per replica
# tuned (GPUStack performance lab, docs.gpustack.ai/latest/performance-lab/qwen3-235b-a22b/h100). ShareGPT's
# outputs are a few hundred tokens; the teacher's are ~3,700 (Table 4) in a 16k context, which decodes slower.
TEACHER_REFERENCE_TOKENS_PER_GPU_S = 8_425 / 4
PREFILL_WEIGHT = 0.1  # one prompt token costs ~1/10 of a decoded one (prefill is batched thousands per forward)
CHARS_PER_TOKEN = 3.5  # Table 4: mean reasoning chars / mean total tokens is 2.7-4.0 across datasets
EVAL_QUESTIONS_IN_DISTRIBUTION = 12_418  # Table 1 eval splits (cdlib.datasets table1_eval, 10 datasets)
# The paper does not give its OOD evaluation sizes: the public validation/test splits (HellaSwag 10,042,
# WinoGrande 1,267, PIQA 1,838, ARC-Easy 2,376, BoolQ 3,270, TruthfulQA 817, MMLU humanities 4,705,
# social sciences 3,077, other 3,242) are an upper bound.
EVAL_QUESTIONS_OOD = 30_634
JUDGE_OUTPUT_TOKENS = 1_000  # reasoning + the JSON verdict (cap 4,096 in params/paper.yaml); no figure in the paper
JUDGE_PROMPT_TOKENS = 600  # the rubric and instructions around the two traces (paper App. G), an estimate
# benchmarks/README.md: cdlib's engine path vs vLLM direct measured -7.7% (noise): no gain claimed
ENGINE_OVERHEAD = 1.0

PAPER_SCOPE = ("generate/qwen3.5-397b", "compress/qwen3.5-397b", "train")  # what the paper's 705 H100-h count
UPSTREAM_NODE_GPUS = 8  # App. H.1: "Trace generation and trace compression use 8 H100s on a single node"


def paper_upstream() -> pl.DataFrame:
    """Appendix H.4's upstream GPU-hours rebuilt from its own wall-clock times: wall-clock x 8 GPUs per pass.

    H.4 counts exactly three passes, each on one 8 x H100 node (H.1, H.2): the Qwen3.5-397B-A17B teacher pass
    over 345,383 questions, "≈ 43.5 h (≈ 348 H100-h)"; compressing its 283,335 correct traces (Table 4's Qwen
    total) with Ministral-3-14B, "1 h 09 m (≈ 9.2 H100-h)", and with Llama-3.3-70B, "8 h 19 m (≈ 66.5 H100-h)".
    43.5 x 8 = 348.0, 1.15 x 8 = 9.2, 8.317 x 8 = 66.5: 423.7 in all, printed "≈ 424" and equal to H.5's
    704.9 - 280.9 = 424.0. Not counted (H.4 names neither): the gpt-oss-120B teacher's pass over the same
    questions and the two compressions of its 281,911 traces, evaluation, judging. The paper gives no
    throughput; :func:`stages` derives one from these hours and the token counts of Tables 4 and 5.
    Columns: stage, wall_hours, gpus, gpu_hours (derived), printed (the paper's rounded figure).
    """
    passes = (("generate/qwen3.5-397b", "teacher"), ("compress/qwen3.5-397b__llama70b", "compress_llama70b"),
              ("compress/qwen3.5-397b__ministral14b", "compress_ministral14b"))
    return pl.DataFrame([{"stage": stage, "wall_hours": _compute(f"{q}_wall_hours"), "gpus": UPSTREAM_NODE_GPUS,
                          "gpu_hours": _compute(f"{q}_wall_hours") * UPSTREAM_NODE_GPUS,
                          "printed": _compute(f"{q}_gpu_hours")} for stage, q in passes])


@dataclass(frozen=True)
class Lever:
    """A multiplier on one stage's GPU-hours relative to the paper's way of running it."""

    stage: str
    factor: float
    default: bool  # does this implementation use it by default
    source: str


def _compress_prompt_tokens() -> float:
    from cdlib.compress import RECONSTRUCTED_PROMPT  # the shared instructions every compression request repeats

    return len(RECONSTRUCTED_PROMPT) / CHARS_PER_TOKEN


def prefix_cache_factor() -> float:
    """Share of the Qwen-teacher compression cost left when the shared instruction prefix is cached."""
    traces = _traces()
    q = traces.filter(pl.col("teacher") == "Qwen3.5-397B-A17B")
    n = q["n"].sum()
    raw_in = (q["n"] * q["raw_tokens"]).sum()
    out = (q["n"] * (q["llama70b"] + q["ministral14b"])).sum() / 2  # per compressor pass, both averaged
    shared = n * _compress_prompt_tokens()
    full = out + PREFILL_WEIGHT * (raw_in + shared)
    return (full - PREFILL_WEIGHT * shared) / full


def levers() -> dict[str, Lever]:
    """The levers, their factor against the paper's own setup, and whether they are on by default here."""
    return {
        "packing": Lever("train", 1.0, True,
                         "cdlib.training.packing best-fit-decreasing, 99.9% fill (bench_pack); the paper's Axolotl "
                         "already packs (App. H.3), so 1.0 vs paper; vs padded batches it is 1.71x (bench_pack, CPU)"),
        "fused_loss": Lever("train", 1.0, True,
                            "loss_head auto = Cut Cross-Entropy / Liger on a GPU (cdlib.training.losses); the paper "
                            "used both (App. H.3), so 1.0 vs paper; the chunked CPU fallback is 0.12x the memory of "
                            "full logits"),
        "vllm_dp": Lever("compress", 1.0, True,
                         "params/paper.yaml keeps the paper's DP (Ministral DP8, Llama-70B TP4xDP2); the 397B FP8 "
                         "teacher needs all 8 GPUs (TP8), so no DP is possible there"),
        "prefix_cache": Lever("compress", prefix_cache_factor(), True,
                              "vLLM automatic prefix caching (on by default in vLLM V1) skips the shared compression "
                              "instructions' prefill; whether the paper's vLLM had it on is not stated"),
        "no_resample_answered": Lever("generate", 1.0, True,
                                      "cdlib.generate drops answered questions each round; so did the paper "
                                      "(Sec. 3.1)"),
        "mtp_speculative": Lever("generate", 1.0, False,
                                 "Qwen3.5's multi-token-prediction head as vLLM speculative decoding, reachable "
                                 "through engine.vllm_kwargs (speculative_config); lossless, but the 2-3x quoted for "
                                 "it (lambda.ai model page) is not stated for a batch of 512, and speculative gains "
                                 "shrink as batches fill the GPU: no measured factor, so 1.0 and off"),
        "token_budget": Lever("train", float("nan"), False,
                              "compute-matched budgets (train.token_budget): every run capped at the trainable tokens "
                              "of its Llama-70B-compressed counterpart; changes the experiment, so off by default"),
    }


# --------------------------------------------------------------------------- tokens


def train_runs() -> pl.DataFrame:
    """Table 11, one row per training run: gpus, gpu_hours, train_tokens (trainable tokens, not millions)."""
    t = paper.table(11).pivot(on="metric", index=["teacher", "student", "method", "source"], values="value")
    return t.with_columns(train_tokens=pl.col("train_tokens_m") * 1e6).drop("train_tokens_m", "train_hours")


def _traces() -> pl.DataFrame:
    """Per teacher and dataset: correct traces n, raw mean tokens, and each compressor's mean compressed tokens."""
    t4 = paper.table(4).filter(pl.col("dataset") != "Total", pl.col("value").is_not_null())
    t4 = t4.pivot(on="metric", index=["teacher", "dataset"], values="value")
    t5 = paper.table(5).filter(pl.col("metric") == "compressed_tokens")
    t5 = t5.pivot(on="compressor", index=["teacher", "dataset"], values="value")
    out = t4.join(t5, on=["teacher", "dataset"], how="left").rename(
        {"n_correct": "n", "mean_total_tokens": "raw_tokens"})
    out = out.select("teacher", "dataset", "n", "raw_tokens", "llama70b", "ministral14b")
    return out.drop_nulls(["n", "raw_tokens"])


def _compute(q: str) -> float:
    return float(paper.compute().filter(pl.col("quantity") == q)["value"][0])


# --------------------------------------------------------------------------- stages


def training_calibration(runs: pl.DataFrame | None = None) -> pl.DataFrame:
    """Per (student, method): the paper's model FLOPs, GPU-seconds, MFU and trainable tokens per GPU-second."""
    runs = train_runs() if runs is None else runs
    k = pl.when(pl.col("method") == "lora").then(4.0).otherwise(6.0)
    n = pl.col("student").replace_strict(STUDENT_ACTIVE_PARAMS, return_dtype=pl.Float64)
    flops = runs.with_columns(flops=k * n * pl.col("train_tokens"), gpu_s=pl.col("gpu_hours") * 3600)
    return flops.group_by("student", "method", maintain_order=True).agg(
        pl.col("flops").sum(), pl.col("gpu_s").sum(), pl.col("train_tokens").sum()).with_columns(
        mfu=pl.col("flops") / (pl.col("gpu_s") * H100_BF16_DENSE_FLOPS),
        tokens_per_gpu_s=pl.col("train_tokens") / pl.col("gpu_s"))


def training_hours(token_budget: bool = False) -> pl.DataFrame:
    """Projected H100-hours per run at the paper's calibrated MFU; ``token_budget`` caps D as in :func:`levers`."""
    runs = train_runs()
    if token_budget:
        cap = runs.filter(pl.col("source") == "llama70b").select(
            "teacher", "student", "method", cap=pl.col("train_tokens"))
        runs = runs.join(cap, on=["teacher", "student", "method"], how="left").with_columns(
            train_tokens=pl.min_horizontal("train_tokens", pl.col("cap").fill_null(float("inf")))).drop("cap")
    calib = training_calibration().select("student", "method", "mfu")
    k = pl.when(pl.col("method") == "lora").then(4.0).otherwise(6.0)
    n = pl.col("student").replace_strict(STUDENT_ACTIVE_PARAMS, return_dtype=pl.Float64)
    return runs.join(calib, on=["student", "method"]).with_columns(
        projected_h=k * n * pl.col("train_tokens") / (pl.col("mfu") * H100_BF16_DENSE_FLOPS) / 3600)


def grid_rounds(path: str | Path = "params/paper.yaml") -> int:
    """``generate.rounds`` of the grid file: attempts per question, the first included. params/paper.yaml holds
    the value the paper's counts imply (:func:`cdlib.paper.teacher_rounds`: 2)."""
    from cdlib.grid import Grid

    (rounds,) = {c.params["rounds"] for c in Grid(path).cells if c.stage == "generate"}
    return int(rounds)


def teacher_requests(teacher: str, rounds: int) -> int:
    """Requests of one teacher pass over Table 1's training questions with ``rounds`` rounds.

    H.4 counts the Qwen teacher's: 345,383 ("questions", which only requests can be: Table 1 has 310,932).
    For another teacher: every question once, then every never-answered one (Table 1 minus Table 4's kept
    traces) in each later round; the questions answered at a later attempt add requests H.4 gives only for
    the Qwen teacher (6,854 of its 345,383), so this is a lower bound.
    """
    if teacher == "Qwen3.5-397B-A17B":
        return int(_compute("teacher_questions"))
    questions = int(paper.table(1).filter(pl.col("metric") == "train")["value"].sum())
    kept = int(_traces().filter(pl.col("teacher") == teacher)["n"].sum())
    return questions + (rounds - 1) * (questions - kept)


def _generate_tokens(teacher: str) -> float:
    """Decoded tokens of the teacher pass: kept traces, plus one mean-length answer per wrong-answer request
    (:func:`teacher_requests` minus the kept traces) at the grid's rounds (:func:`grid_rounds`)."""
    t = _traces().filter(pl.col("teacher") == teacher)
    kept = (t["n"] * t["raw_tokens"]).sum()
    mean = kept / t["n"].sum()
    wrong = teacher_requests(teacher, grid_rounds()) - t["n"].sum()
    return kept + wrong * mean


def _compress_cost_tokens(teacher: str, compressor: str) -> float:
    """Decode-equivalent tokens of one compression pass: outputs + PREFILL_WEIGHT x (traces + instructions)."""
    t = _traces().filter(pl.col("teacher") == teacher)
    prompt = (t["n"] * (t["raw_tokens"] + _compress_prompt_tokens())).sum()
    return (t["n"] * t[compressor]).sum() + PREFILL_WEIGHT * prompt


def _eval_tokens() -> pl.DataFrame:
    """Per run: output tokens of the evaluation (Table 9 mean completion tokens x questions); gaps take the
    student's mean."""
    t9 = paper.table(9).filter(pl.col("metric") == "mean_completion_tokens").select(
        "teacher", "student", "method", "source", tokens=pl.col("value"))
    runs = train_runs().select("teacher", "student", "method", "source").join(
        t9, on=["teacher", "student", "method", "source"], how="left")
    runs = runs.with_columns(pl.col("tokens").fill_null(pl.col("tokens").mean().over("student")))
    return runs.with_columns(tokens=pl.col("tokens") * (EVAL_QUESTIONS_IN_DISTRIBUTION + EVAL_QUESTIONS_OOD))


def stages(apply: tuple[str, ...] | None = None, factors: dict[str, float] | None = None) -> pl.DataFrame:
    """One row per stage: scope, tokens, paper H100-h, throughput (tokens/GPU-s) and projected H100-h.

    ``apply``: lever names to apply (default: those this implementation uses by default); ``factors`` overrides a
    lever's factor (for what-ifs and tests). ``token_budget`` is applied through the training token counts.
    """
    all_levers = levers()
    apply = tuple(n for n, lv in all_levers.items() if lv.default) if apply is None else apply
    unknown = set(apply) - set(all_levers)
    if unknown:
        raise KeyError(f"cost: unknown lever(s) {sorted(unknown)}; levers are {sorted(all_levers)}")
    factors = {**{n: lv.factor for n, lv in all_levers.items()}, **(factors or {})}
    rows = []
    judge_tps = VLLM_TOKENS_PER_GPU_S["gpt-oss-120B"]
    up = dict(paper_upstream().select("stage", "gpu_hours").iter_rows())  # H.4: wall-clock x 8 GPUs
    # teacher generation: the Qwen pass is calibrated on the paper's 348 H100-h; gpt-oss is not in the paper's 705
    q_gen = _generate_tokens("Qwen3.5-397B-A17B")
    q_gen_tps = q_gen / (up["generate/qwen3.5-397b"] * 3600)
    rows.append(("generate/qwen3.5-397b", "generate", q_gen, up["generate/qwen3.5-397b"], q_gen_tps))
    rows.append(("generate/gpt-oss-120b", "generate", _generate_tokens("gpt-oss-120B"), None, judge_tps))
    # compression: calibrated per compressor on the Qwen teacher's pass, applied to the gpt-oss teacher's traces
    for comp in ("llama70b", "ministral14b"):
        tok = _compress_cost_tokens("Qwen3.5-397B-A17B", comp)
        hours = up[f"compress/qwen3.5-397b__{comp}"]
        tps = tok / (hours * 3600)
        rows.append((f"compress/qwen3.5-397b__{comp}", "compress", tok, hours, tps))
        gpt_oss = _compress_cost_tokens("gpt-oss-120B", comp)
        rows.append((f"compress/gpt-oss-120b__{comp}", "compress", gpt_oss, None, tps))
    # training: 55 runs at the paper's calibrated MFU
    train = training_hours(token_budget="token_budget" in apply)
    calib = train_runs()
    rows.append(("train", "train", train["train_tokens"].sum(), calib["gpu_hours"].sum(),
                 train["train_tokens"].sum() / (train["projected_h"].sum() * 3600)))
    # evaluation: one GPU per run, the student's vLLM throughput
    ev = _eval_tokens().with_columns(
        tps=pl.col("student").replace_strict(VLLM_TOKENS_PER_GPU_S, return_dtype=pl.Float64))
    ev_h = (ev["tokens"] / ev["tps"]).sum() / 3600
    rows.append(("evaluate", "evaluate", ev["tokens"].sum(), None, ev["tokens"].sum() / (ev_h * 3600)))
    # judging: gpt-oss-120B over the compressed traces; Table 10's N (Qwen teacher, MMLU excluded), else Table 4's
    t = _traces()
    t10 = paper.table(10).filter(pl.col("metric") == "n").select("teacher", "dataset", "compressor", n_judged="value")
    for teacher in TEACHERS.values():
        for comp in ("llama70b", "ministral14b"):
            d = t.filter(pl.col("teacher") == teacher).join(
                t10.filter(pl.col("compressor") == comp).drop("compressor"), on=["teacher", "dataset"], how="left")
            if d["n_judged"].is_not_null().any():
                d = d.with_columns(n=pl.col("n_judged").fill_null(0))
            prompt = (d["n"] * (d["raw_tokens"] + d[comp] + JUDGE_PROMPT_TOKENS)).sum()
            tok = d["n"].sum() * JUDGE_OUTPUT_TOKENS + PREFILL_WEIGHT * prompt
            slug = next(s for s, name in TEACHERS.items() if name == teacher)
            rows.append((f"judge/{slug}__{comp}", "judge", tok, None, judge_tps))
    df = pl.DataFrame(rows, schema=["stage", "kind", "tokens", "paper_h", "tokens_per_gpu_s"], orient="row")
    mult = {k: ENGINE_OVERHEAD if k != "train" else 1.0 for k in ("generate", "compress", "train", "evaluate", "judge")}
    for name in apply:
        if name != "token_budget":
            mult[all_levers[name].stage] *= factors[name]
    df = df.with_columns(
        projected_h=pl.col("tokens") / pl.col("tokens_per_gpu_s") / 3600 * pl.col("kind").replace_strict(mult),
        in_paper_scope=pl.col("stage").str.starts_with(PAPER_SCOPE[0]) | pl.col("stage").str.starts_with(PAPER_SCOPE[1])
        | (pl.col("stage") == "train"))
    return df


def summary(df: pl.DataFrame) -> dict[str, float]:
    """Paper-scope totals: the paper's H100-h, the projection, their ratio, and the full-grid projection."""
    scope = df.filter("in_paper_scope")
    paper_total = float(scope["paper_h"].sum())
    proj = float(scope["projected_h"].sum())
    return {"paper_h": paper_total, "projected_h": proj, "ratio": proj / paper_total,
            "goal_h": paper_total / 3, "full_grid_h": float(df["projected_h"].sum())}


def goal_gap(df: pl.DataFrame) -> pl.DataFrame:
    """Per paper-scope stage: projected H100-h, and what the goal (a third of the paper's H100-hours) would ask of it.

    ``alone_over_goal``: the stage by itself already exceeds the goal; ``speedup_if_alone``: the factor this
    stage alone would need with every other stage as projected (null when impossible: the others already
    exceed the goal); ``speedup_if_uniform``: the factor every paper-scope stage would need, cut alike.
    """
    s = summary(df)
    scope = df.filter("in_paper_scope")
    rest = s["projected_h"] - scope["projected_h"]
    budget = s["goal_h"] - rest  # what this stage may cost if every other stage stays as projected
    return scope.select("stage", "projected_h").with_columns(
        alone_over_goal=pl.col("projected_h") > s["goal_h"],
        speedup_if_alone=pl.when(budget > 0).then(pl.col("projected_h") / budget).otherwise(None),
        speedup_if_uniform=pl.lit(s["projected_h"] / s["goal_h"]))


def grid_train_cells(path: str | Path = "params/paper.yaml") -> list[tuple[str, str, str, str]]:
    """(teacher, student, method, source) in the paper's names for every train cell of the grid file."""
    from cdlib.grid import Grid

    cells = [c for c in Grid(path).cells if c.stage == "train"]
    return [(TEACHERS[c.axes["teacher"]], STUDENTS[c.axes["student"]], c.axes["method"], c.axes["source"])
            for c in cells]
