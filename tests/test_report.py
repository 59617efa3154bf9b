"""Tables, writers and figures of cdlib.report, drawn from the published numbers and small hand-made frames."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import polars as pl
import pytest

from cdlib import accounting, figures, page, paper, report, tables

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EXPECTED_ROWS = {2: 4, 3: 14, 4: 26, 5: 22, 6: 14, 7: 55, 8: 7, 9: 55, 10: 11, 11: 55}


def check_chart_files(paths):
    png, svg, html = paths
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000
    root = ET.fromstring(svg.read_text())
    assert root.tag.endswith("svg")
    assert "vega" in html.read_text()


def has_tooltip(chart) -> bool:
    return '"tooltip"' in chart.to_json()


@pytest.fixture(scope="module")
def published_runs():
    return paper.runs()


@pytest.fixture(scope="module")
def written_tables(tmp_path_factory):
    return report.paper_tables(tmp_path_factory.mktemp("tables"))


@pytest.fixture(scope="module")
def written_figures(tmp_path_factory):
    out = tmp_path_factory.mktemp("figures")
    return out, figures.paper_figures(out)


def test_paper_tables_writes_markdown_and_latex_with_the_right_rows(written_tables):
    assert sorted(written_tables) == list(range(2, 12))
    for n, (md, tex) in written_tables.items():
        lines = md.read_text().strip().splitlines()
        assert len(lines) == 2 + EXPECTED_ROWS[n], n  # header, separator, rows
        assert lines[1].startswith("|---")
        text = tex.read_text()
        assert r"\begin{tabular}" in text and r"\bottomrule" in text and f"Table {n}" in text
        body = text.split(r"\midrule")[1].split(r"\bottomrule")[0]
        assert body.count(r"\\") == EXPECTED_ROWS[n], n
        assert "_" not in body.replace(r"\_", ""), n  # underscores escaped


def test_table3_regenerated_from_table7_equals_published_table3(published_runs):
    ours = tables.table3(published_runs).unpivot(index=["teacher", "student", "method"], variable_name="source",
                                                 value_name="accuracy")
    pub = paper.table(3).select(*paper.RUN_KEYS, pl.col("value").alias("accuracy"))
    sbs = tables.side_by_side(ours, pub, paper.RUN_KEYS, "accuracy")
    assert sbs.height == 42 and sbs["diff"].abs().max() == 0


def test_table8_regenerated_equals_published_table8(published_runs):
    ours = tables.table8(published_runs)
    assert ours.columns == ["teacher", "student", "method", "truncated", "llama70b", "ministral14b"]
    ours = ours.unpivot(index=["teacher", "student", "method"], variable_name="source", value_name="accuracy")
    pub = paper.table(8).select(*paper.RUN_KEYS, pl.col("value").alias("accuracy"))
    assert tables.side_by_side(ours, pub, paper.RUN_KEYS, "accuracy")["diff"].abs().max() == 0


def test_table2_and_table5_aggregates_reproduce_the_published_overall_rows():
    comp = paper.compression()
    t2 = tables.table2(comp)
    pub = paper.table(2).pivot("metric", index=["teacher", "compressor"], values="value")
    rho = tables.side_by_side(t2, pub, ["teacher", "compressor"], "rho")
    chars = tables.side_by_side(t2, pub, ["teacher", "compressor"], "mean_compressed_chars")
    assert rho["diff"].abs().max() < 0.0006 and chars["diff"].abs().max() <= 1
    t5 = tables.table5(comp)
    overall = t5.filter(pl.col("dataset") == "Overall")
    assert overall.height == 2 and overall["llama70b_mean_compressed_tokens"].null_count() == 2  # printed as a dash
    assert [round(x, 3) for x in overall["ministral14b_rho"]] == [0.086, 0.147]


def test_table4_totals_and_table10_overall(published_runs):
    t4 = tables.table4(paper.generation())
    assert t4.filter(pl.col("dataset") == "Total")["n_correct"].to_list() == [283335, 281911]
    assert t4["dataset"][12] == "Total"  # each teacher's total follows its datasets
    t10 = tables.table10(paper.judge())
    overall = t10.filter(pl.col("dataset") == "Overall").row(0, named=True)
    assert overall["llama70b_n"] == 283260
    assert abs(overall["llama70b_faithfulness"] - 4.98) < 0.01 and abs(overall["llama70b_pct_faithful"] - 98.1) < 0.1
    assert abs(overall["ministral14b_pct_aligned"] - 97.2) < 0.1


def test_table6_uses_published_speedups_and_computes_missing_ones(published_runs):
    t6 = tables.table6(published_runs)
    first = t6.row(0, named=True)
    assert (first["hours_raw"], first["speedup_answer_only"], first["tokens_m_raw"]) == (1.1, 16.8, 635.0)
    assert "speedup_raw" not in t6.columns
    ours = pl.DataFrame({"teacher": ["t", "t"], "student": ["s", "s"], "method": ["full", "full"],
                         "source": ["raw", "extractive"], "train_hours": [2.0, 0.5], "train_tokens": [4e6, 1e6]})
    t = tables.table6(ours)
    assert t["speedup_extractive"].to_list() == [4.0] and t["tokens_m_raw"].to_list() == [4.0]


def test_table7_and_table9_shapes(published_runs):
    t7 = tables.table7(published_runs)
    assert t7.columns[4:7] == ["math", "math_se", "math_ci95"]
    assert t7.columns[-3:] == ["overall", "overall_se", "overall_ci95"]
    # the paper's ± is 1.96 x SE: the published ± comes back unchanged in _ci95
    row = t7.row(0, named=True)
    assert row["math_ci95"] == pytest.approx(1.96 * row["math_se"])
    answer_only_full = t7.filter((pl.col("source") == "answer_only") & (pl.col("method") == "full"))
    assert answer_only_full["overall"].to_list() == [0.001, 0.181, 0.550]
    t9 = tables.table9(published_runs)
    assert t9["acc_per_1k_tokens"].null_count() == 4  # the 4 rows lost in the extraction
    toy = pl.DataFrame({"teacher": ["t"], "student": ["s"], "method": ["lora"], "source": ["raw"], "group": ["overall"],
                        "accuracy": [0.5], "mean_completion_tokens": [250.0]})
    assert tables.table9(toy)["acc_per_1k_tokens"].to_list() == [2.0]


def test_missing_columns_are_named():
    runs = pl.DataFrame({"teacher": ["t"], "student": ["s"], "method": ["lora"], "source": ["raw"]})
    with pytest.raises(ValueError, match="accuracy"):
        tables.table3(runs)
    with pytest.raises(ValueError, match="reasoning_tokens"):
        figures.fig2_reasoning_lengths(pl.DataFrame({"teacher": ["t"], "source": ["raw"]}))


def test_side_by_side_on_a_hand_made_frame():
    ours = pl.DataFrame({"student": ["a", "b", "c"], "method": ["lora"] * 3, "accuracy": [0.5, 0.7, 0.9]})
    pub = pl.DataFrame({"student": ["a", "b", "d"], "method": ["lora"] * 3, "accuracy": [0.4, 0.75, 0.1]})
    sbs = tables.side_by_side(ours, pub, ["student", "method"], "accuracy")
    assert sbs.columns == ["student", "method", "ours", "paper", "diff"]
    rows = {r["student"]: r for r in sbs.iter_rows(named=True)}
    assert rows["a"]["diff"] == pytest.approx(0.1) and rows["b"]["diff"] == pytest.approx(-0.05)
    assert rows["c"]["paper"] is None and rows["c"]["diff"] is None
    assert rows["d"]["ours"] is None and rows["d"]["paper"] == 0.1
    with pytest.raises(ValueError, match="not unique"):
        tables.side_by_side(pl.concat([ours, ours]), pub, ["student", "method"], "accuracy")
    with pytest.raises(ValueError, match="paper.*accuracy"):
        tables.side_by_side(ours, pub.drop("accuracy"), ["student", "method"], "accuracy")


def test_markdown_and_latex_formatting(tmp_path):
    df = pl.DataFrame({"name": ["a|b", "x_y & 5%"], "n": [1, 2], "acc": [0.12345, None]})
    md, tex = page.write_table(df, tmp_path / "sub" / "t", digits={"acc": 2})
    lines = md.read_text().splitlines()
    assert lines[0] == "| name | n | acc |"
    assert lines[2] == "| a\\|b | 1 | 0.12 |" and lines[3].endswith("| 2 | — |")
    text = tex.read_text()
    assert r"x\_y \& 5\%" in text and "{lrr}" in text and "---" in text


def test_compute_energy_reproduces_appendix_h5():
    e = accounting.compute_energy(704.9)  # paper defaults: 700 W, PUE 1.15, 79 g/kWh
    assert e["effective_watts"] == pytest.approx(805)
    assert round(e["energy_kwh"], 1) == paper.compute_value("energy_kwh") == 567.4
    assert round(e["emissions_kg_co2"], 1) == paper.compute_value("emissions_kg_co2") == 44.8
    e = accounting.compute_energy(10, gpu_watts=500, pue=1.0, kg_co2_per_kwh=0.5)
    assert e["emissions_kg_co2"] == pytest.approx(2.5)
    with pytest.raises(ValueError, match="pue"):
        accounting.compute_energy(1, pue=0.5)


def test_compute_table_matches_appendix_h4_h5(published_runs):
    ours = accounting.compute_table(published_runs, upstream_gpu_hours=paper.compute_value("upstream_gpu_hours"))
    sbs = tables.side_by_side(ours, paper.compute().select("quantity", "value"), ["quantity"], "value")
    sbs = sbs.drop_nulls("diff")
    assert set(sbs["quantity"]) >= {"student_training_gpu_hours", "main_grid_gpu_hours",
                                    "truncation_ablation_gpu_hours", "total_gpu_hours", "energy_kwh",
                                    "emissions_kg_co2"}
    assert (sbs["diff"].abs() <= 0.05).all(), sbs  # the paper rounds to 0.1


def test_paper_figures_writes_png_svg_html_and_explains_figures_2_and_3(written_figures):
    out, made = written_figures
    assert sorted(made) == ["fig1_compression_by_domain", "fig4_accuracy_vs_length", "pareto"]
    for paths in made.values():
        check_chart_files(paths)
    readme = (out / "README.md").read_text()
    assert "Figures 2" in readme and "does not publish" in readme.replace("\n", " ")


def test_published_figures_have_tooltips_and_complete_facet_grids(published_runs):
    fig1 = figures.fig1_compression_by_domain(paper.compression())
    fig4 = figures.fig4_accuracy_vs_length(published_runs, x="median_reasoning_chars")
    par = figures.pareto(published_runs)
    for chart in (fig1, fig4, par):
        assert has_tooltip(chart)
    # the Qwen-teacher gpt-oss-20B runs have no published inference numbers; the facet grid
    # still needs a cell for them or Vega-Lite shifts that teacher's row
    data = fig4.data
    assert data.select("teacher", "student").n_unique() == 8
    domain = fig1.data.group_by("teacher", "compressor", "domain").agg(pl.col("rho").first())
    assert domain.height == 16 and domain["rho"].max() < 0.25


def test_fig4_draws_iqr_bars_only_when_quartiles_are_given():
    runs = pl.DataFrame({"teacher": ["t"] * 2, "student": ["s"] * 2, "method": ["lora"] * 2,
                         "source": ["raw", "llama70b"], "accuracy": [0.8, 0.7],
                         "median_reasoning_tokens": [1000.0, 200.0]})
    without = figures.fig4_accuracy_vs_length(runs).to_dict()
    quartiles = runs.with_columns(reasoning_tokens_q1=pl.lit(100.0), reasoning_tokens_q3=pl.lit(2000.0))
    with_iqr = figures.fig4_accuracy_vs_length(quartiles).to_dict()
    assert len(without["spec"]["layer"]) == 1 and len(with_iqr["spec"]["layer"]) == 2
    assert with_iqr["spec"]["layer"][0]["mark"]["type"] == "rule"


def test_fig2_bins_every_trace(tmp_path):
    traces = pl.DataFrame({
        "teacher": ["q"] * 300 + ["g"] * 200,
        "source": (["raw"] * 100 + ["llama70b"] * 100 + ["ministral14b"] * 100) + (["raw"] * 100 + ["llama70b"] * 100),
        "reasoning_tokens": [float(i % 97 * 30) for i in range(500)],
    })
    chart = figures.fig2_reasoning_lengths(traces, bins=20)
    panels = [p for row in chart.vconcat for p in row.hconcat]
    titles = [p.title for p in panels]
    # a panel for every (teacher, source), empty ones named so
    assert len(panels) == 6 and "g · Ministral-14B comp. (none)" in titles
    binned = pl.concat([p.data for p in panels if p.data.height])
    assert binned["count"].sum() == 500 and binned["bin"].max() == 19
    for p in panels:  # each panel holds only its own teacher's and source's counts
        if p.data.height:
            teacher, label = p.title.split(" · ")
            assert set(p.data["teacher"]) == {teacher} and set(p.data["source_label"]) == {label}
    assert all(has_tooltip(p) for p in panels)
    check_chart_files(figures.save_chart(chart, tmp_path / "fig2"))


def test_ema_follows_its_definition_per_run():
    losses = pl.DataFrame({"teacher": ["t"] * 6, "student": ["s"] * 6, "method": ["lora"] * 6,
                           "source": ["raw"] * 3 + ["llama70b"] * 3, "step": [2, 1, 3, 1, 2, 3],
                           "loss": [0.0, 1.0, 0.0, 4.0, 4.0, 0.0]})
    out = figures.ema(losses, alpha=0.5)
    raw = out.filter(pl.col("source") == "raw")["ema"].to_list()
    other = out.filter(pl.col("source") == "llama70b")["ema"].to_list()
    assert raw == [1.0, 0.5, 0.25]  # sorted by step: 1.0, 0.0, 0.0
    assert other == [4.0, 4.0, 2.0]


def test_fig3_loss_curves_render(tmp_path):
    rows = []
    for student in ["Qwen3.5-0.8B", "gpt-oss-20B"]:
        for source in ["raw", "ministral14b"]:
            for method in (["lora", "full"] if student != "gpt-oss-20B" else ["full"]):
                for step in range(1, 41):
                    base = 1.2 if source == "raw" else 1.6
                    loss = base / step**0.3 + 0.05 * ((step * 7) % 5)
                    rows.append(("Qwen3.5-397B-A17B", student, method, source, step, loss))
    losses = pl.DataFrame(rows, schema=["teacher", "student", "method", "source", "step", "loss"], orient="row")
    chart = figures.fig3_loss_curves(losses)
    assert has_tooltip(chart)
    data = chart.data
    assert data["loss"].null_count() == data["ema"].null_count() == 0 and data.height == 6 * 40  # 6 runs x 40 steps
    check_chart_files(figures.save_chart(chart, tmp_path / "fig3"))


def test_pareto_front_keeps_only_undominated_runs():
    runs = pl.DataFrame({"teacher": ["t"] * 4, "student": ["s"] * 4, "method": ["lora"] * 4,
                         "source": ["a", "b", "c", "d"], "accuracy": [0.5, 0.6, 0.55, 0.9],
                         "mean_completion_tokens": [100.0, 200.0, 300.0, 1000.0]})
    assert figures.pareto_front(runs)["source"].to_list() == ["a", "b", "d"]


def test_table4_from_per_trace_records():
    traces = pl.DataFrame({"teacher": ["t"] * 3, "domain": ["math"] * 3, "dataset": ["gsm8k", "gsm8k", "svamp"],
                           "reasoning": ["abcd", "ab", "abcdef"], "completion_tokens": [10, 20, 5]})
    t4 = tables.table4(traces)
    assert t4["dataset"].to_list() == ["gsm8k", "svamp", "Total"]
    assert t4["n_correct"].to_list() == [2, 1, 3]
    assert t4["mean_reasoning_chars"].to_list()[:2] == [3.0, 6.0]
    assert t4["mean_completion_tokens"].to_list()[:2] == [15.0, 5.0]


def test_pareto_marks_lora_and_full_runs_apart():
    runs = pl.DataFrame({"teacher": ["t"] * 3, "student": ["s"] * 3, "method": ["full", "full", "lora"],
                         "source": ["raw", "extractive", "extractive"], "accuracy": [0.1, 0.8, 0.2],
                         "mean_completion_tokens": [200.0, 50.0, 48.0]})
    spec = figures.pareto(runs).to_dict()
    shape = spec["spec"]["layer"][1]["encoding"]["shape"]
    assert shape["field"] == "student_method"
    values = {r["student_method"] for r in spec["datasets"][next(iter(spec["datasets"]))]}
    assert values == {"s, full", "s, lora"}
    one_method = figures.pareto(runs.filter(pl.col("method") == "full")).to_dict()
    assert one_method["spec"]["layer"][1]["encoding"]["shape"]["field"] == "student"


def test_table6_side_by_side_sets_our_source_tokens_beside_the_papers_count():
    """The paper counts training + validation tokens (App. H.4): our source_tokens, not the 95% train split."""
    pub = paper.runs()
    ours = pub.with_columns(source_tokens=pl.col("train_tokens"), train_tokens=(pl.col("train_tokens") * 0.95))
    t6 = tables.grid_side_by_side(runs=ours)["table6"]
    tokens = t6.filter(pl.col("metric").str.contains("tokens"))
    assert tokens["metric"].unique().to_list() == ["source_tokens"]
    assert tokens.height == 55 and (tokens["diff"] == 0).all(), tokens


def _chart_data(chart) -> pl.DataFrame:
    spec = chart.to_dict()
    return pl.DataFrame(next(iter(spec["datasets"].values())), infer_schema_length=None)


def test_figures_1_and_4_of_a_grid_are_drawn_beside_the_papers_numbers():
    """Both origins in one chart, the paper's side read from cdlib/data/paper (Tables 4, 5, 7, 9)."""
    runs = paper.runs().filter(pl.col("student") == "Qwen3.5-9B").with_columns(
        teacher=pl.col("teacher").replace({"Qwen3.5-397B-A17B": "qwen3.5-397b"}),  # the grid's spelling
        accuracy=pl.col("accuracy") - 0.1)
    data = _chart_data(figures.fig4_beside_paper(runs))
    pub = data.filter(pl.col("teacher").str.ends_with(" · paper"))
    assert set(data["teacher"]) == {f"{t} · {o}" for t in paper.TEACHERS for o in ("paper", "this grid")}
    want = paper.table(9).filter((pl.col("metric") == "median_reasoning_chars") & (pl.col("student") == "Qwen3.5-9B")
                                 & (pl.col("value") > 0))
    assert sorted(pub["median_reasoning_chars"].to_list()) == sorted(want["value"].to_list())
    comp = paper.compression().filter(pl.col("compressor") == "llama70b")
    comp = comp.with_columns(compressed_chars=pl.col("compressed_chars") / 2)
    fig1 = _chart_data(figures.fig1_beside_paper(comp))
    assert set(fig1["teacher"]) == {f"{t} · {o}" for t in paper.TEACHERS for o in ("paper", "this grid")}
    assert set(fig1["compressor"]) == {"llama70b"}  # only the pairs this grid has
    with pytest.raises(ValueError, match="no run of this grid"):
        figures.fig4_beside_paper(runs.with_columns(student=pl.lit("toy-student")))


def test_a_long_runs_loss_chart_fits_altairs_embedded_rows():
    """The train notebook's loss chart of a 3,344-step run (the demo's base) failed with MaxRowsError (6,688 rows)."""
    from cdlib import figures

    losses = pl.DataFrame({"step": range(1, 3345), "loss": [1.0] * 3344, "ema": [1.0] * 3344})
    spec = figures.loss_chart(losses).to_dict()  # raises MaxRowsError past 5,000 rows
    values = next(iter(spec["datasets"].values()))
    assert len(values) <= 2000 and values[-1]["step"] == 3344
