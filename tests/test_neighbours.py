"""The neighbouring methods in the same grid: Distilling the Essence (DtE) and Mixed-Policy Distillation (MPD).

DtE: the grid files expand into ratio-truncation and section-mask cells with the right
params, and ratio-truncated students train for real on the toy world, recording the kept
fraction, tokens, peak memory and FLOPs. MPD: a toy student samples trajectories (every
one kept), the toy rewriter rewrites them, and the student trains by KL against a trained
toy teacher, starting from its own trained checkpoint. The report draws the DtE figure and
puts both methods on the Pareto plot.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from cdlib import compress, figures, generate, report, results, student_runs, toy
from cdlib import train as T
from cdlib.grid import Grid
from cdlib.params import CompressParams, EngineParams, GenerateParams, SamplingParams, ToyParams, TrainParams
from cdlib.store import Store

REPO = Path(__file__).resolve().parents[1]
TOY = ToyParams(n_train=40, n_test=10)
QUICK = dict(seq_len=1024, gradient_checkpointing=False, log_every=1, tiny_layers=1, tiny_hidden=64, tiny_vocab=400,
             val_fraction=0.1, learning_rate=3e-3, warmup_ratio=0.0)
SILENT = dict(progress=False, log=lambda *a: None)


@pytest.fixture(scope="module")
def toy_cells(tmp_path_factory) -> dict[str, Path]:
    """A toy generate cell (about 40 verified teacher traces) and its extractive compression."""
    root = tmp_path_factory.mktemp("neighbours")
    generate.run(GenerateParams(out_dir=str(root / "generate"), toy=TOY,
                                sampling=SamplingParams(temperature=0.7, max_tokens=2000, seed=0)))
    compress.run(CompressParams(out_dir=str(root / "extractive"), traces=str(root / "generate")))
    return {"generate": root / "generate", "extractive": root / "extractive"}


# --------------------------------------------------------------------------- grid files


def test_dte_grid_cells_expand_with_the_right_params():
    g = Grid(REPO / "params/dte.yaml", root=REPO)
    train = {c.slug: c for c in g.select("train")}
    ratios = {"r0.25": 0.25, "r0.5": 0.5, "r0.75": 0.75, "r1.0": None}
    masks = {"cot-answer": ["cot", "answer"], "cot": ["cot"], "all": ["prompt", "cot", "answer"]}
    for c in train.values():
        ax, p = c.axes, c.params
        assert p.get("truncate_ratio") == ratios[ax["ratio"]], c.slug
        assert p["truncate_span"] == ax["span"] and p["loss_on"] == masks[ax["mask"]], c.slug
        assert p.get("token_budget") == (71_000_000 if ax["budget"] == "matched" else None), c.slug
        assert p["data"].endswith("/generate/qwen3.5-397b") and p["source"] == "raw"
        kd = ax["objective"] == "kd"
        assert (p.get("objective", "sft"), p.get("kl_weight", 1.0)) == (("kl", 0.5) if kd else ("sft", 1.0)), c.slug
    sft = {s: c for s, c in train.items() if c.axes["objective"] == "sft"}
    # excluded combinations are not run: the uncut run once, section masks uncut and epoch-based
    assert not [s for s, c in train.items() if c.axes["ratio"] == "r1.0" and c.axes["span"] == "reasoning"]
    masked = {(c.axes["ratio"], c.axes["span"], c.axes["budget"])
              for c in sft.values() if c.axes["mask"] != "cot-answer"}
    assert masked == {("r1.0", "sequence", "epochs")}
    per_student = {(a["ratio"], a["span"], a["mask"], a["budget"]) for a in (c.axes for c in sft.values())}
    assert len(per_student) == 16 and len(sft) == 32
    # that paper's own protocol: every ratio of the whole sequence, loss on all of it, with KD, for the 0.8B student
    kd = {(c.axes["student"], c.axes["ratio"], c.axes["span"], c.axes["mask"], c.axes["budget"])
          for c in train.values() if c.axes["objective"] == "kd"}
    assert kd == {("qwen3.5-0.8b", r, "sequence", "all", "epochs") for r in ratios}
    evaluated = {c.params["model"].split("/train/")[1] for c in g.select("evaluate")}
    assert evaluated == set(train), "every DtE run is evaluated"
    assert [c.params["source"] for c in g.select("compressed")] == ["ministral14b"] * 2


def test_demo_and_mpd_grid_files_wire_the_mpd_chain():
    g = Grid(REPO / "params/demo_neighbours.yaml", root=REPO)
    out = "outputs/demo-neighbours"
    dte = {c.axes["source"]: c.params for c in g.select("train")}
    assert (dte["dte-0.5"]["truncate_ratio"], dte["dte-0.5"]["truncate_span"]) == (0.5, "sequence")
    assert (dte["dte-0.5-reasoning"]["truncate_ratio"], dte["dte-0.5-reasoning"]["truncate_span"]) == (0.5, "reasoning")
    assert dte["dte-cot"]["loss_on"] == ["cot"] and "truncate_ratio" not in dte["dte-cot"]
    assert "kd" not in dte and "mpd" not in dte
    teacher = f"{out}/train/toy__tiny__full__extractive"
    kd = g.cell("kd/toy__tiny__full").params
    assert (kd["objective"], kd["kl_teacher"], kd["student"]) == ("kl", teacher, "toy-student")
    sample = g.cell("sample/toy__tiny__full").params
    assert (sample["keep"], sample["rounds"], sample["model"]) == ("all", 1, f"{out}/kd/toy__tiny__full")
    rewrite = g.cell("rewrite/toy__tiny__full").params
    assert (rewrite["compressor"], rewrite["prompt"]) == ("toy-rewriter", "rewrite_student")
    mpd = g.cell("mpd/toy__tiny__full").params
    assert (mpd["source"], mpd["objective"], mpd["kl_direction"]) == ("mpd", "kl", "forward")
    assert (mpd["data"], mpd["student"], mpd["kl_teacher"]) == (
        f"{out}/rewrite/toy__tiny__full", f"{out}/kd/toy__tiny__full", teacher)
    assert g.cell("evaluate/toy__tiny__full__mpd").params["model"] == f"{out}/mpd/toy__tiny__full"

    paper = Grid(REPO / "params/mpd.yaml", root=REPO)
    runs = {c.axes["objective"]: c.params for c in paper.select("train")}
    assert {k: (p["objective"], p.get("kl_direction", "forward")) for k, p in runs.items()} == {
        "kl-forward": ("kl", "forward"), "kl-reverse": ("kl", "reverse"), "jsd": ("kl", "jsd"),
        "sft": ("sft", "forward")}
    assert all(p["student"] == "Qwen/Qwen3-1.7B" and p["kl_teacher"] == "Qwen/Qwen3-8B" for p in runs.values())
    assert paper.cell("sample/qwen3-1.7b").params["keep"] == "all"
    assert paper.cell("rewrite/qwen3-1.7b__qwen3-8b").params["prompt"] == "rewrite_student"


# --------------------------------------------------------------------------- DtE: real training


def test_ratio_truncation_trains_and_records_kept_fraction_tokens_memory_and_flops(toy_cells, tmp_path):
    common = dict(data=str(toy_cells["generate"]), epochs=1, limit=16, **QUICK)
    runs = {}
    for name, extra in {"full": {}, "sequence": {"truncate_ratio": 0.5},
                        "reasoning": {"truncate_ratio": 0.5, "truncate_span": "reasoning"}}.items():
        runs[name] = T.run(TrainParams(out_dir=str(tmp_path / name), **common, **extra), **SILENT)
    full, seq, rsn = runs["full"], runs["sequence"], runs["reasoning"]
    assert (full["kept_fraction"], seq["kept_fraction"], rsn["kept_fraction"]) == (1.0, 0.5, 0.5)
    assert (full["truncate_span"], seq["truncate_span"], rsn["truncate_span"]) == (None, "sequence", "reasoning")
    assert seq["kept_token_fraction"] == pytest.approx(0.5, abs=0.02), "the first half of every sequence"
    assert rsn["kept_cot_fraction"] == pytest.approx(0.5, abs=0.1) and rsn["kept_token_fraction"] > 0.55
    # what a run sees shrinks with the cut, and so do its FLOPs (same examples, one epoch)
    assert seq["total_tokens_seen"] == pytest.approx(0.5 * full["total_tokens_seen"], rel=0.05)
    assert seq["trainable_tokens"] < 0.5 * full["trainable_tokens"], "the cut takes CoT and answer, not the prompt"
    assert full["flops"] > rsn["flops"] > seq["flops"] > 0
    assert seq["flops"] < 0.55 * full["flops"]
    # the reasoning cut keeps every answer token; the sequence cut drops the answers
    sections = {k: m["tokens_per_section"] for k, m in runs.items()}
    assert sections["reasoning"]["supervised_answer"] == sections["full"]["supervised_answer"] > 0
    assert sections["sequence"]["supervised_answer"] == 0
    for m in runs.values():
        assert m["peak_memory_gb"] > 0 and m["peak_memory_kind"] and m["max_row_tokens"] <= 1024
        assert m["loss_on"] == "cot+answer" and math.isfinite(m["train_loss"]) and m["steps"] >= 1

    # section mask: loss on the CoT only (prompt and answer tokens are seen, never supervised)
    P = TrainParams(out_dir=str(tmp_path / "cot"), data=str(toy_cells["generate"]), loss_on=["cot"], limit=16, **QUICK)
    data = T.prepare(P)
    tokens = data.build_info["tokens"]
    assert tokens["supervised_cot"] > 0 and tokens["supervised_prompt"] == tokens["supervised_answer"] == 0
    assert tokens["total_answer"] > 0 and data.extra["dte"]["loss_on"] == "cot"
    assert student_runs.neighbour_label(P.model_dump()) == "dte-cot"


# --------------------------------------------------------------------------- MPD: real chain


def test_mpd_chain_samples_rewrites_and_distills_against_a_trained_teacher(toy_cells, tmp_path):
    # the KL teacher: a toy student trained on extractive traces (its train cell directory is passed on)
    teacher = tmp_path / "teacher"
    T.run(TrainParams(out_dir=str(teacher), data=str(toy_cells["extractive"]), source="extractive", max_steps=8,
                      **QUICK), **SILENT)
    # the student, distilled off-policy first: a toy student made around the teacher's tokenizer
    kd = tmp_path / "kd"
    m_kd = T.run(TrainParams(out_dir=str(kd), data=str(toy_cells["extractive"]), source="extractive", objective="kl",
                             kl_teacher=str(teacher), max_steps=4, **QUICK), **SILENT)
    assert m_kd["kl_teacher_model"] == str((teacher / "model").resolve())
    assert m_kd["model_source"] == str(kd / "base")

    # 1. the student samples one trajectory per question (transformers engine), every one kept
    sample = tmp_path / "sample"
    m_s = generate.run(GenerateParams(out_dir=str(sample), toy=TOY, limit=6, keep="all", rounds=1, model=str(kd),
                                      engine=EngineParams(kind="hf", dtype="float32"),
                                      sampling=SamplingParams(temperature=0.7, max_tokens=48, seed=0)))
    traces, attempts = Store(sample / "traces.jsonl").read(), Store(sample / "attempts.jsonl").read()
    assert len(traces) == len(attempts) == m_s["kept"] == 6
    assert m_s["total_correct"] == sum(t["correct"] for t in traces) == sum(a["correct"] for a in attempts)
    assert {t["id"] for t in traces} == {a["question_id"] for a in attempts}

    # 2. the teacher rewrites each one concisely (toy rewriter): the minimal correct steps, the gold answer
    rewrite = tmp_path / "rewrite"
    m_r = compress.run(CompressParams(out_dir=str(rewrite), traces=str(sample), compressor="toy-rewriter",
                                      prompt="rewrite_student"))
    rewritten = {r["id"]: r for r in Store(rewrite / "compressed.jsonl").read()}
    assert m_r["n"] == 6 and m_r["flagged"] == 0
    for t in traces:
        r = rewritten[t["id"]]
        assert r["reasoning"].splitlines()[1:-1] == toy.solution_steps(t)
        item = toy.parse_question(t["question"]).item
        assert r["reasoning"].splitlines()[-1] == f"So the final number of {item} is {t['gold']}."
        assert r["original_reasoning"] == t["reasoning"] and r["flag"] is None
        if not t["correct"]:
            assert r["answer"] == f"The answer is \\boxed{{{t['gold']}}}." and r["original_correct"] is False

    # 3. the student trains from its own checkpoint by forward KL to the teacher on the rewrites
    mpd = tmp_path / "mpd"
    m = T.run(TrainParams(out_dir=str(mpd), data=str(rewrite), source="mpd", student=str(kd), objective="kl",
                          kl_teacher=str(teacher), max_steps=4, val_fraction=0.2,
                          **{k: v for k, v in QUICK.items() if k != "val_fraction"}), **SILENT)
    assert m["model_source"] == str((kd / "model").resolve()), "starts from the kd cell's checkpoint"
    assert m["kl_teacher_model"] == str((teacher / "model").resolve()) and m["kl_direction"] == "forward"
    assert m["objective"] == "kl" and m["learning_rate"] == 3e-3 and m["data"]["n_used"] == 6
    assert m["val_kl"] is not None and math.isfinite(m["val_kl"]) and "2*N_teacher*D" in m["flops_formula"]
    curve = sorted(Store(mpd / "loss.jsonl").read(), key=lambda r: r["step"])
    assert len(curve) == 4 and all("ce" in r and math.isfinite(r["loss"]) for r in curve)
    assert json.loads((mpd / "checkpoint.json").read_text())["student"] == str(kd)


# --------------------------------------------------------------------------- report


def _cell(root: Path, stage: str, slug: str, axes: dict, params: dict, metrics: dict) -> Path:
    d = root / stage / slug
    d.mkdir(parents=True)
    (d / "params.yaml").write_text(yaml.safe_dump({**params, "out_dir": str(d)}))
    (d / "metrics.json").write_text(json.dumps(metrics))
    (d / "manifest.json").write_text(json.dumps({"cell": f"{stage}/{slug}", "stage": stage, "axes": axes,
                                                 "notebook": "notebooks/04_train.py" if stage != "evaluate" else
                                                 "notebooks/05_evaluate.py", "status": "done", "gpus": 1,
                                                 "wall_clock_s": 600.0, "gpu_hours": 1 / 6}))
    return d


def _neighbour_grid(root: Path) -> Path:
    """Hand-written train and evaluate cells: uncut and DtE runs (no source axis), an MPD run, a compressed one."""
    runs = {  # slug: (train params, accuracy, mean completion tokens, FLOPs)
        "full": ({}, 0.60, 900, 8e15),
        "seq-0.5": ({"truncate_ratio": 0.5}, 0.55, 700, 4e15),
        "seq-0.25": ({"truncate_ratio": 0.25}, 0.40, 500, 2e15),
        "rsn-0.5": ({"truncate_ratio": 0.5, "truncate_span": "reasoning"}, 0.52, 650, 5e15),
        "cot": ({"loss_on": ["cot"]}, 0.58, 880, 8e15),
        "matched": ({"truncate_ratio": 0.5, "token_budget": 5000}, 0.57, 720, 8e15),
        "mpd": ({"source": "mpd", "objective": "kl", "kl_teacher": "Qwen/Qwen3-8B"}, 0.62, 400, 9e15),
        "compressed": ({"source": "ministral14b"}, 0.61, 300, 2e15),
        "kd": ({"source": "extractive", "objective": "kl", "kl_teacher": "Qwen/Qwen3-8B"}, 0.59, 350, 3e15),
        # Distilling the Essence as its own code trains: loss on every section, half CE and half KD
        "seq-0.5-kd": ({"truncate_ratio": 0.5, "loss_on": ["prompt", "cot", "answer"], "objective": "kl",
                        "kl_teacher": "Qwen/Qwen3.5-9B", "kl_weight": 0.5}, 0.56, 690, 6e15),
        "full-kd": ({"loss_on": ["prompt", "cot", "answer"], "objective": "kl", "kl_teacher": "Qwen/Qwen3.5-9B",
                     "kl_weight": 0.5}, 0.61, 880, 12e15),
    }
    for slug, (extra, acc, tokens, flops) in runs.items():
        axes = {"teacher": "qwen3.5-397b", "student": "qwen3.5-0.8b", "run": slug}
        params = {"data": str(root / "generate/qwen3.5-397b"), "source": "raw", "student": "Qwen/Qwen3.5-0.8B-Base",
                  "method": "full", "loss_on": ["cot", "answer"], "truncate_span": "sequence", **extra}
        t = _cell(root, "train", slug, axes, params, {"trainable_tokens": 1000, "flops": flops,
                                                       "peak_memory_gb": 20.0 * flops / 8e15})
        _cell(root, "evaluate", slug, axes, {"model": str(t)},
              {"n": 100, "accuracy": acc, "accuracy_se": 0.05, "mean_completion_tokens": tokens,
               "median_reasoning_tokens": tokens * 0.8, "acc_per_1k_tokens": acc / tokens * 1000})
    return root


def test_neighbour_labels():
    assert student_runs.neighbour_label({"source": "raw"}) is None
    assert student_runs.neighbour_label({"source": "raw", "truncate_ratio": 0.5}) == "dte-0.5"
    assert student_runs.neighbour_label({"truncate_ratio": 0.25, "truncate_span": "reasoning"}) == "dte-0.25-reasoning"
    assert student_runs.neighbour_label({"loss_on": ["prompt", "cot", "answer"]}) == "dte-prompt+cot+answer"
    assert student_runs.neighbour_label({"loss_on": ["answer", "cot"]}) is None, "the default mask in any order"
    assert student_runs.neighbour_label({"source": "extractive", "truncate_ratio": 0.5}) == "extractive+dte-0.5"
    assert student_runs.neighbour_label({"source": "mpd", "objective": "kl"}) == "mpd"
    assert student_runs.neighbour_label({"source": "mpd"}) == "mpd-sft"
    assert student_runs.neighbour_label({"source": "extractive", "objective": "kl"}) == "kl-extractive"


def test_report_draws_the_dte_figure_and_neighbours_on_the_pareto_plot(tmp_path):
    grid_dir = _neighbour_grid(tmp_path / "grid")
    runs = student_runs.grid_runs(results.read_grid(grid_dir))
    ov = runs.filter(runs["group"] == "overall")
    by_cell = dict(zip(ov["train_cell"], ov["source"]))
    assert by_cell == {"train/full": "raw", "train/seq-0.5": "dte-0.5", "train/seq-0.25": "dte-0.25",
                       "train/rsn-0.5": "dte-0.5-reasoning", "train/cot": "dte-cot", "train/matched": "dte-0.5",
                       "train/mpd": "mpd", "train/compressed": "ministral14b", "train/kd": "kl-extractive",
                       "train/seq-0.5-kd": "kl-dte-0.5-prompt+cot+answer", "train/full-kd": "kl-dte-prompt+cot+answer"}
    kept = dict(zip(ov["train_cell"], ov["kept_fraction"]))
    assert kept["train/full"] == kept["train/cot"] == 1.0 and kept["train/seq-0.25"] == 0.25

    dte = figures.dte_runs(runs)
    assert set(dte["variant"]) == {"cut: sequence", "cut: reasoning", "no cut, loss on cot",
                                   "cut: sequence, loss on prompt+cot+answer, KD"}
    # the uncut run closes both span curves at 1.0; MPD and the compressed run are not DtE runs
    full = dte.filter(dte["train_cell"] == "train/full")
    assert full["variant"].sort().to_list() == ["cut: reasoning", "cut: sequence"]
    assert not set(dte["train_cell"]) & {"train/mpd", "train/compressed", "train/kd"}
    # the uncut run with the same mask and KD closes that curve, not the plain SFT one
    kd = dte.filter(dte["variant"] == "cut: sequence, loss on prompt+cot+answer, KD")
    assert kd["train_cell"].to_list() == ["train/seq-0.5-kd", "train/full-kd"]
    chart = figures.fig_dte_kept_fraction(runs).to_dict()
    assert len(chart["vconcat"]) == 2, "accuracy vs kept fraction, and vs training FLOPs"

    out = report.build_report(grid_dir, tmp_path / "report")
    figs = out["figures"]
    assert {"fig_dte_kept_fraction", "pareto"} <= set(figs)
    png = next(p for p in figs["fig_dte_kept_fraction"] if p.suffix == ".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pareto_html = next(p for p in figs["pareto"] if p.suffix == ".html").read_text()
    for label in ("dte-0.5", "dte-0.5-reasoning", "dte-cot", "mpd", "ministral14b"):
        assert f'"{label}"' in pareto_html, label
    table = (tmp_path / "report/tables/runs.md").read_text()
    assert "compute-matched (5,000 tokens)" in table and "epoch-based (1 epoch)" in table
    assert "kept_fraction" in table and "train_flops" in table and "peak_memory_gb" in table


def test_pareto_gives_every_source_its_own_colour(tmp_path):
    runs = student_runs.grid_runs(results.read_grid(_neighbour_grid(tmp_path / "grid")))
    layers = figures.pareto(runs).to_dict()["spec"]["layer"]
    color = next(layer["encoding"]["color"] for layer in layers if "color" in layer.get("encoding", {}))
    domain, colours = color["scale"]["domain"], color["scale"]["range"]
    assert {"dte-0.5", "dte-0.5-reasoning", "dte-0.25", "dte-cot", "mpd", "kl-extractive", "Raw"} <= set(domain)
    assert len(set(colours)) == len(colours) == len(domain)


def test_toy_students_share_one_vocabulary_when_pointed_at_one_cell(toy_cells, tmp_path):
    """tiny_tokenizer_data: students on raw and on compressed traces get the same toy tokenizer
    (so one can be the other's KL teacher); without it each trains its own on its own data."""
    def vocab(name, data, source, shared):
        P = TrainParams(out_dir=str(tmp_path / name), data=str(data), source=source, student="toy-student",
                        max_steps=1, tiny_tokenizer_data=str(toy_cells["generate"]) if shared else None, **QUICK)
        return T.prepare(P, audit_show=0).tokenizer.get_vocab()

    shared = [vocab(f"s-{s}", toy_cells[c], s, True) for c, s in (("generate", "raw"), ("extractive", "extractive"))]
    assert shared[0] == shared[1]
    own = vocab("own-extractive", toy_cells["extractive"], "extractive", False)
    assert own != shared[1]
