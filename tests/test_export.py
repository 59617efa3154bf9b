"""Hub export of a cell (issue 16 item 5): Parquet shards and a dataset card that load back."""

from __future__ import annotations

import json

import pytest
import yaml

from cdlib import export


@pytest.mark.parametrize("cell,store", [("compress/toy__extractive", "compressed.jsonl"),
                                        ("generate/toy", "traces.jsonl"), ("truncate/toy", "truncated.jsonl")])
def test_export_loads_back_with_load_dataset(demo_checkout, tmp_path, cell, store):
    import datasets

    src = demo_checkout / "outputs/demo" / cell
    records = [json.loads(line) for line in (src / store).read_text().splitlines()]
    info = export.export_cell(src, tmp_path / "hub", license="cc-by-4.0", shard_rows=16)
    assert info["rows"] == len(records) and info["shards"] == -(-len(records) // 16) > 1 and not info["pushed"]
    ds = datasets.load_dataset(str(tmp_path / "hub"), split="train")
    assert ds.num_rows == len(records)
    assert ds["id"] == [r["id"] for r in records]  # every record, in order, across the shards
    row = ds[3]
    assert {k: row[k] for k in ("id", "question", "gold")} == {k: records[3][k] for k in ("id", "question", "gold")}
    card = (tmp_path / "hub/README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["license"] == "cc-by-4.0" and header["configs"][0]["data_files"][0]["path"] == "data/train-*.parquet"
    metrics = json.loads((src / "metrics.json").read_text())
    assert json.dumps(metrics, indent=2) in card  # the cell's statistics
    assert (src / "params.yaml").read_text().strip() in card  # and the parameters that produced it


def test_export_refuses_unfinished_or_other_cells(demo_checkout, tmp_path):
    train = tmp_path / "train"
    train.mkdir()
    (train / "manifest.json").write_text(json.dumps({"status": "done"}))
    with pytest.raises(export.ExportError, match="only generate, compress and truncate"):
        export.export_cell(train, tmp_path / "x")
    (train / "manifest.json").write_text(json.dumps({"status": "running"}))
    with pytest.raises(export.ExportError, match="not finished"):
        export.export_cell(train, tmp_path / "x")
    with pytest.raises(export.ExportError, match="no manifest"):
        export.export_cell(tmp_path, tmp_path / "x")


def test_push_without_token_says_so_and_keeps_the_export(demo_checkout, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored login either
    with pytest.raises(export.ExportError, match="no hub token"):
        export.export_cell(demo_checkout / "outputs/demo/generate/toy", tmp_path / "hub", repo_id="someone/traces")
    assert (tmp_path / "hub/README.md").exists()
