"""Hub export of a cell: Parquet shards and a dataset card that load back."""

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
    with pytest.raises(export.ExportError, match="train and report cells are not"):
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


def test_import_and_downstream_cells_name_the_imported_set_and_its_license(tmp_path):
    """An imported set exported back out, from the import cell or a compress cell below it."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import datasets

    repo = Path(__file__).resolve().parents[1]
    src = tmp_path / "set"
    shutil.copytree(repo / "tests/fixtures/trace_sets/messages", src)
    (src / "README.md").write_text("---\nlicense: apache-2.0\n---\n")  # the set's card states its license
    grid = {"name": "imp", "output_root": str(tmp_path / "out"),
            "stages": {"import": {"notebook": "notebooks/01_import.py", "params": {"source": str(src)}},
                       "compress": {"notebook": "notebooks/02_compress.py", "inputs": {"traces": "import"},
                                    "params": {"compressor": "extractive", "drop_flagged": False}}}}
    (tmp_path / "imp.yaml").write_text(yaml.safe_dump(grid, sort_keys=False))
    out = subprocess.run([sys.executable, "-m", "cdlib.grid", "run", str(tmp_path / "imp.yaml")], cwd=repo,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for cell, kind in (("import", "import"), ("compress", "compress")):
        info = export.export_cell(tmp_path / "out/imp" / cell, tmp_path / f"hub-{cell}")
        assert (info["kind"], info["rows"]) == (kind, 2)
        card = (tmp_path / f"hub-{cell}/README.md").read_text()
        assert yaml.safe_load(card.split("---")[1])["license"] == "apache-2.0"  # the set's own, not "other"
        assert f"from `{src}`" in card and "The set states its license as `apache-2.0`" in card
        assert datasets.load_dataset(str(tmp_path / f"hub-{cell}"), split="train").num_rows == 2
    info = export.export_cell(tmp_path / "out/imp/import", tmp_path / "hub-x", license="cc-by-4.0")
    assert yaml.safe_load((tmp_path / "hub-x/README.md").read_text().split("---")[1])["license"] == "cc-by-4.0"
