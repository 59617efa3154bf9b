"""Exploring traces: loading every source with one tokenizer, filters, length statistics, Figure 2,
side by side, the widget browser, question-pool statistics, and the notebook under papermill.

The data are real stage outputs: two toy teachers through stage 1 (generate), stage 2
(extractive, and for one teacher a toy-engine "compressor" whose wrong answers get
flagged) and stage 3 (length-matched truncation), plus two hand-written GSM8K traces
appended to one teacher's store so that there are two datasets to filter.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import polars as pl
import pytest

from cdlib import compress, explore, figures, generate, truncate
from cdlib.params import (CompressParams, EngineParams, ExploreParams, GenerateParams, SamplingParams, ToyParams,
                          TruncateParams)
from cdlib.store import Store

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests/fixtures/datasets"

GSM8K_TRACES = [  # questions of tests/fixtures/datasets/gsm8k.jsonl, reasoning written by hand
    {"id": "gsm8k/train/0", "dataset": "gsm8k", "domain": "Math", "group": "Math", "split": "train",
     "question": "A baker makes 24 rolls in the morning and 18 rolls in the afternoon. He sells 30 of them. "
                 "How many rolls are left?", "choices": None, "gold": "12", "answer_type": "numeric",
     "reasoning": "He makes 24 + 18 = 42 rolls. He sells 30, so 42 - 30 = 12 are left. <b>Check</b>: 12 + 30 = 42.",
     "answer": "The answer is \\boxed{12}."},
    {"id": "gsm8k/train/2", "dataset": "gsm8k", "domain": "Math", "group": "Math", "split": "train",
     "question": "Maya reads 15 pages a day. How many days does she need for a 75-page book?", "choices": None,
     "gold": "5", "answer_type": "numeric", "reasoning": "75 / 15 = 5 days.", "answer": "The answer is \\boxed{5}."},
]


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    """Stage outputs of teachers "a" and "b": {"generate": {...}, "compressed": {...}, "truncated": {...}}."""
    root = tmp_path_factory.mktemp("explore")
    out = {"generate": {}, "compressed": {}, "truncated": {}}
    for teacher, seed in (("a", 0), ("b", 1)):
        g = GenerateParams(out_dir=str(root / teacher / "gen"), seed=seed, rounds=2,
                           toy=ToyParams(n_train=40, n_test=5), sampling=SamplingParams(temperature=1.0, seed=seed))
        generate.run(g)
        c = CompressParams(out_dir=str(root / teacher / "extractive"), traces=g.out_dir)
        compress.run(c)
        t = TruncateParams(out_dir=str(root / teacher / "truncated"), traces=g.out_dir, compressed=c.out_dir)
        truncate.run(t)
        out["generate"][teacher] = g.out_dir
        out["compressed"][f"{teacher}/extractive"] = c.out_dir
        out["truncated"][f"{teacher}/truncated"] = t.out_dir
    # the toy engine as a "compressor": it answers again (answer only), and its slips get flagged
    rewriter = CompressParams(out_dir=str(root / "a" / "rewriter"), traces=out["generate"]["a"], compressor="rewriter",
                              engine=EngineParams(kind="toy"), sampling=SamplingParams(temperature=1.0, seed=5),
                              recompress_attempts=0)
    compress.run(rewriter)
    out["compressed"]["a/rewriter"] = rewriter.out_dir
    Store(Path(out["generate"]["a"]) / "traces.jsonl").append(GSM8K_TRACES)
    return out


@pytest.fixture(scope="module")
def traces(cells):
    return explore.load(cells["generate"], cells["compressed"], cells["truncated"])


def _store(directory: str, name: str) -> list[dict]:
    return Store(Path(directory) / name).read()


# --------------------------------------------------------------------------- load


def test_load_has_every_source_counted_alike(cells, traces):
    assert traces.columns == explore.COLUMNS
    sizes = {(t, s): n for t, s, n in traces.group_by("teacher", "source").len().iter_rows()}
    assert sizes == {
        ("a", "raw"): len(_store(cells["generate"]["a"], "traces.jsonl")),
        ("b", "raw"): len(_store(cells["generate"]["b"], "traces.jsonl")),
        ("a", "extractive"): len(_store(cells["compressed"]["a/extractive"], "compressed.jsonl")),
        ("b", "extractive"): len(_store(cells["compressed"]["b/extractive"], "compressed.jsonl")),
        ("a", "rewriter"): len(_store(cells["compressed"]["a/rewriter"], "compressed.jsonl")),
        ("a", "truncated"): len(_store(cells["truncated"]["a/truncated"], "truncated.jsonl")),
        ("b", "truncated"): len(_store(cells["truncated"]["b/truncated"], "truncated.jsonl")),
    }
    # stage 2 counted with the same (whitespace) tokenizer: its counts must agree with ours
    tokens = {r["id"]: r for r in _store(cells["compressed"]["a/extractive"], "tokens.jsonl")}
    ours = traces.filter((pl.col("teacher") == "a") & (pl.col("source") == "extractive"))
    for r in ours.iter_rows(named=True):
        assert (r["tokens"], r["original_tokens"]) == (tokens[r["id"]]["compressed_tokens"],
                                                      tokens[r["id"]]["original_tokens"])
        assert r["rho_tokens"] == pytest.approx(r["tokens"] / r["original_tokens"])
    # stage 3 re-encoded its cuts with the whitespace tokenizer too
    cut = {r["id"]: r for r in _store(cells["truncated"]["b/truncated"], "truncated.jsonl")}
    ours = traces.filter((pl.col("teacher") == "b") & (pl.col("source") == "truncated"))
    assert {r["id"]: (r["tokens"], r["original_tokens"], r["chars"]) for r in ours.iter_rows(named=True)} == {
        i: (r["truncated_tokens"], r["original_tokens"], r["truncated_chars"]) for i, r in cut.items()}
    raw = traces.filter(pl.col("source") == "raw")
    assert raw["rho_tokens"].to_list() == [1.0] * raw.height and raw["flag"].null_count() == raw.height
    # the same question id under two teachers joins to its own teacher's raw trace
    both = traces.filter(pl.col("source") == "extractive").group_by("id").agg(pl.col("original_chars").n_unique())
    raw_chars = {(t, i): c for t, i, c in raw.select("teacher", "id", "chars").iter_rows()}
    for r in traces.filter(pl.col("source") == "extractive").iter_rows(named=True):
        assert r["original_chars"] == raw_chars[(r["teacher"], r["id"])]
    assert both.height > 0


def test_chars_over_4_is_the_rough_estimate(cells):
    df = explore.load({"a": cells["generate"]["a"]}, tokenizer="chars/4")
    assert df["tokens"].to_list() == [-(-c // 4) for c in df["chars"].to_list()]


def test_load_errors_name_the_key_and_file(cells, tmp_path):
    with pytest.raises(explore.ExploreError, match=r"compressed\['nope'\]: .*nowhere/compressed\.jsonl does not exist"):
        explore.load({"a": cells["generate"]["a"]}, {"nope": str(tmp_path / "nowhere")})
    assert not (tmp_path / "nowhere").exists(), "reading must not create cell directories"
    with pytest.raises(explore.ExploreError, match=r"compressed\['extractive'\]: several teachers \(a, b\); "
                                                   r"write the key as 'teacher/extractive'"):
        explore.load(cells["generate"], {"extractive": cells["compressed"]["a/extractive"]})
    with pytest.raises(explore.ExploreError, match=r"truncated\['c/truncated'\]: teacher 'c' is not a key of generate"):
        explore.load(cells["generate"], truncated={"c/truncated": cells["truncated"]["a/truncated"]})
    with pytest.raises(explore.ExploreError, match="generate: name at least one"):
        explore.load({})
    with pytest.raises(explore.ExploreError, match=r"truncated\['extractive'\]: teacher 'a' already has a source "
                                                   r"'extractive' \(compressed\['extractive'\]\)"):
        explore.load({"a": cells["generate"]["a"]}, {"extractive": cells["compressed"]["a/extractive"]},
                     {"extractive": cells["truncated"]["a/truncated"]})
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "traces.jsonl").write_text("")
    nothing = explore.load({"z": str(empty)})
    assert nothing.height == 0 and nothing.columns == explore.COLUMNS
    one = explore.load({"a": cells["generate"]["a"]}, {"extractive": cells["compressed"]["a/extractive"]})
    assert set(one["teacher"]) == {"a"} and set(one["source"]) == {"raw", "extractive"}


# --------------------------------------------------------------------------- filters and statistics


def test_filters(cells, traces):
    flags = [r["flag"] for r in _store(cells["compressed"]["a/rewriter"], "compressed.jsonl")]
    n_flagged = sum(f is not None for f in flags)
    assert n_flagged > 0, "the toy rewriter's slips must give flagged records to test with"
    assert explore.filter_traces(traces, flagged="only").height == n_flagged
    assert explore.filter_traces(traces, flagged="exclude").height == traces.height - n_flagged
    assert explore.filter_traces(traces).height == traces.height
    gsm = explore.filter_traces(traces, datasets=["gsm8k"])
    assert sorted(gsm["id"]) == ["gsm8k/train/0", "gsm8k/train/2"] and set(gsm["source"]) == {"raw"}
    lo, hi = 10, 40
    kept = explore.filter_traces(traces, min_tokens=lo, max_tokens=hi)
    assert kept.height == sum(lo <= t <= hi for t in traces["tokens"]) and kept.height > 0
    assert explore.filter_traces(traces, min_tokens=hi, max_tokens=hi)["tokens"].to_list() == [hi] * traces[
        "tokens"].to_list().count(hi)
    assert set(explore.filter_traces(traces, teachers=["b"], sources=["raw"])["teacher"]) == {"b"}
    unknown = r"dataset \['gsm9k'\] not in the traces \(have \['gsm8k', 'toy'\]\)"
    with pytest.raises(explore.ExploreError, match=unknown):
        explore.filter_traces(traces, datasets=["gsm9k"])
    with pytest.raises(explore.ExploreError, match=r"min_tokens \(5\) > max_tokens \(4\)"):
        explore.filter_traces(traces, min_tokens=5, max_tokens=4)
    with pytest.raises(explore.ExploreError, match="flagged must be one of"):
        explore.filter_traces(traces, flagged="some")


def test_length_stats_by_hand(traces):
    stats = explore.length_stats(traces)
    assert stats.select("teacher", "source").rows() == [
        ("a", "raw"), ("a", "extractive"), ("a", "rewriter"), ("a", "truncated"),
        ("b", "raw"), ("b", "extractive"), ("b", "truncated")]
    sub = traces.filter((pl.col("teacher") == "a") & (pl.col("source") == "extractive"))
    row = stats.filter((pl.col("teacher") == "a") & (pl.col("source") == "extractive")).row(0, named=True)
    tokens = sub["tokens"].to_list()
    assert row["traces"] == len(tokens) and row["max_tokens"] == max(tokens)
    assert row["median_tokens"] == statistics.median(tokens)
    assert row["mean_tokens"] == pytest.approx(statistics.fmean(tokens))
    assert row["rho_tokens"] == pytest.approx(sum(tokens) / sum(sub["original_tokens"]))
    assert row["rho_tokens"] < 0.5, "extractive compression of toy traces keeps well under half"
    assert stats.filter(pl.col("source") == "rewriter")["flagged"].item() > 0
    per_dataset = explore.length_stats(traces, by=["teacher", "source", "dataset"])
    assert per_dataset.filter(pl.col("dataset") == "gsm8k")["traces"].to_list() == [2]


# --------------------------------------------------------------------------- Figure 2


def test_lengths_chart_panels_counts_and_png(traces, tmp_path):
    import vl_convert as vlc

    chart = figures.lengths_chart(traces, bins=20)
    spec = chart.to_dict()
    titles = [[p["title"] for p in row["hconcat"]] for row in spec["vconcat"]]
    assert titles == [["a · Raw", "a · extractive", "a · rewriter", "a · Truncated"],
                      ["b · Raw", "b · extractive", "b · rewriter (none)", "b · Truncated"]]
    values = pl.DataFrame(spec["data"]["values"]) if "values" in spec["data"] else None
    if values is None:  # altair moved the rows into datasets
        values = pl.DataFrame(spec["datasets"][spec["data"]["name"]])
    assert values["count"].sum() == traces.height
    assert values.filter(pl.col("flagged"))["count"].sum() == traces["flag"].is_not_null().sum()
    assert values["bin"].max() == 19 and values["bin"].min() >= 0
    assert {p["name"] for p in spec["params"]} == {"dataset", "min_tokens", "max_tokens", "include_flagged"}
    static = figures.lengths_chart(traces, controls=False).to_dict()
    assert "params" not in static
    png = vlc.vegalite_to_png(chart.to_json(), scale=1)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    with pytest.raises(ValueError, match="no traces left"):
        figures.lengths_chart(traces.head(0))


# --------------------------------------------------------------------------- side by side and browser


def test_side_by_side(cells, traces):
    flagged_id = traces.filter(pl.col("flag").is_not_null())["id"][0]
    table = explore.side_by_side(traces, flagged_id, teacher="a")
    assert table["source"].to_list() == ["raw", "extractive", "rewriter", "truncated"]
    raw = next(r for r in _store(cells["generate"]["a"], "traces.jsonl") if r["id"] == flagged_id)
    assert table.row(0, named=True)["reasoning"] == raw["reasoning"]
    assert table.filter(pl.col("source") == "rewriter")["flag"].item() == "contradicts_answer"
    both = explore.side_by_side(traces, "toy/train/0")  # a question both teachers answered
    assert both.select("teacher", "source").rows() == [("a", "raw"), ("a", "extractive"), ("a", "rewriter"),
                                                       ("a", "truncated"), ("b", "raw"), ("b", "extractive"),
                                                       ("b", "truncated")]
    page = explore.side_by_side_html(traces, "gsm8k/train/0")
    assert "&lt;b&gt;Check&lt;/b&gt;" in page and "<b>Check</b>" not in page, "trace text is escaped"
    assert "gold <code>12</code>" in page and "a · Raw</b><br>" in page
    with pytest.raises(explore.ExploreError, match=r"no trace with id 'nope' for teacher 'b'"):
        explore.side_by_side(traces, "nope", teacher="b")
    assert explore.pick_example(traces, seed=3) == explore.pick_example(traces, seed=3)
    assert explore.pick_example(traces, "gsm8k/train/2") == "gsm8k/train/2"
    with pytest.raises(explore.ExploreError, match=r"example 'nope' is not among the"):
        explore.pick_example(traces, "nope")


def test_browser_widgets_follow_the_menus(traces):
    box = explore.browser(traces, "gsm8k/train/0")
    teacher, dataset, example = box.children[0].children
    view = box.children[-1]
    assert (teacher.value, dataset.value, example.value) == ("a", "gsm8k", "gsm8k/train/0")
    assert list(example.options) == ["gsm8k/train/0", "gsm8k/train/2"] and "Maya" not in view.value
    example.value = "gsm8k/train/2"
    assert "Maya reads 15 pages" in view.value
    dataset.value = "toy"
    assert example.value.startswith("toy/") and example.value in view.value
    teacher.value = "b"
    assert "b · Raw" in view.value and "a · Raw" not in view.value
    dataset.value = "gsm8k"  # teacher b has no GSM8K traces
    assert example.value is None and "no traces" in view.value


# --------------------------------------------------------------------------- question pool


def test_pool_stats_show_limit_seed_and_rows_per_split():
    P = ExploreParams(out_dir="unused", datasets=["toy", "gsm8k"], data_paths={"gsm8k": str(FIXTURES / "gsm8k.jsonl")},
                      limit=2, seed=7, toy=ToyParams(n_train=30, n_test=10))
    stats = explore.pool_stats(P)
    assert stats.select("dataset", "split", "rows", "limit", "seed").rows() == [
        ("toy", "train", 2, 2, 7), ("toy", "eval", 2, 2, 7), ("gsm8k", "train", 2, 2, 7), ("gsm8k", "eval", 2, 2, 7)]
    assert stats.filter(pl.col("dataset") == "gsm8k")["table1_rows"].to_list() == [7473, 1319]
    whole = explore.pool_stats(P.model_copy(update={"limit": None}), splits=["eval"])
    assert whole.select("dataset", "rows").rows() == [("toy", 10), ("gsm8k", 3)]


# --------------------------------------------------------------------------- the notebook


def test_notebook_runs_headless_under_papermill(cells, tmp_path):
    import papermill

    from cdlib import notebook as nbtools

    out = tmp_path / "cell"
    out.mkdir()  # the grid runner makes the cell directory before papermill writes into it
    params = dict(out_dir=str(out), datasets=["toy"], toy={"n_train": 30, "n_test": 10}, limit=5,
                  generate=cells["generate"], compressed=cells["compressed"], truncated=cells["truncated"],
                  flagged="include", filter_datasets=["toy"], bins=10)
    nb = papermill.execute_notebook(nbtools.read(REPO / "notebooks/00_explore.py"), str(out / "explore.ipynb"),
                                    parameters=params, kernel_name="python3", cwd=str(REPO), progress_bar=False)
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert {p.name for p in out.iterdir()} >= {"metrics.json", "fig2_lengths.png", "fig2_lengths.svg",
                                               "fig2_lengths.html", "explore.ipynb"}
    metrics = json.loads((out / "metrics.json").read_text())
    expected = explore.filter_traces(explore.load(cells["generate"], cells["compressed"], cells["truncated"]),
                                     datasets=["toy"])
    assert metrics["traces"] == expected.height
    assert {(r["teacher"], r["source"]) for r in metrics["per_source"]} == set(
        expected.select("teacher", "source").unique().iter_rows())
    text = json.dumps([c.get("outputs", []) for c in nb.cells])
    assert "table1_rows" in text, "the pool statistics are displayed"
    assert "image/svg+xml" in text, "the chart is displayed (SVG: offline, no script)"
    assert "include_flagged" in (out / "fig2_lengths.html").read_text(), "its controls are in the interactive page"
    assert "application/vnd.jupyter.widget-view+json" in text, "the browser is displayed"


def test_explore_browses_an_imported_set(tmp_path):
    """An import cell is browsed like a generate cell (lengths, dataset menu, side by side)."""
    from cdlib import trace_import
    from cdlib.params import ImportParams

    sets = Path(__file__).resolve().parents[0] / "fixtures/trace_sets"
    m = trace_import.run(ImportParams(out_dir=str(tmp_path / "imp"), source=str(sets)))
    df = explore.load({"public": str(tmp_path / "imp")}, tokenizer="whitespace")
    assert m["kept"] >= 5 and df.height == m["kept"] and set(df["source"]) == {"raw"}  # every kept row, once
    assert df["tokens"].to_list() == [len(t.split()) for t in df["reasoning"].to_list()]  # as str.split() counts
    # no_gold / no_answer flags shown as flags: every row but the one that verifies
    assert df.filter(pl.col("flag").is_not_null()).height == m["kept"] - m["total_correct"] > 0
    log = df.filter(pl.col("question") == "你是谁").row(0, named=True)
    assert "嗯，用户问了一个简单的自我介绍问题" in explore.side_by_side_html(df, log["id"])
    assert explore.length_stats(df, by=["teacher", "source", "dataset"])["traces"].sum() == m["kept"]
