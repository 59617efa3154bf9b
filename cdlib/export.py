"""Export any stage's records (import, generate, compress, truncate, evaluate, judge) as a Hugging Face dataset.

``python -m cdlib.export outputs/demo/compress/toy__extractive exports/toy-extractive``
writes Parquet shards (``data/train-0000k-of-0000n.parquet``) and a dataset card
(``README.md``) whose YAML header names the license, the source datasets and the data
files, and whose body holds the cell's statistics (``metrics.json``), the parameters that
produced it (``params.yaml``), the package versions and run facts (``manifest.json``).
``datasets.load_dataset(folder)`` loads it back. With ``--repo-id user/name`` and a token
(``HF_TOKEN`` or ``huggingface-cli login``) the folder is pushed to the hub as a dataset
repository; without a token nothing leaves the machine.

The records are the cell's store as written (every field, flagged compressions
included, with their ``flag``), so a user can filter as the training stage does. The card
says where the traces came from: for an import cell (and every cell downstream of one) the
imported set (``source``, config, split) and the license the set states, which also becomes
the card's license field unless ``--license`` names one.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from cdlib.datasets import REGISTRY
from cdlib.outputs import read_manifest, read_metrics
from cdlib.store import UpstreamError, check_upstream

#: the store of each exportable stage kind (an import cell writes the generate stage's records)
STORES = {"generate": "traces.jsonl", "import": "traces.jsonl", "compress": "compressed.jsonl",
          "truncate": "truncated.jsonl", "evaluate": "outputs.jsonl", "judge": "judgements.jsonl"}
WHAT = {"generate": "verified teacher reasoning traces (rejection sampling)",
        "import": "imported reasoning traces, verified by compress-distill's own answer extraction",
        "compress": "compressed reasoning traces beside the originals",
        "truncate": "length-matched truncated reasoning traces",
        "evaluate": "student answers to evaluation questions, scored",
        "judge": "faithfulness verdicts on compressed traces"}


class ExportError(ValueError):
    """A cell that cannot be exported, with the path and the reason."""


def cell_store(cell_dir: str | Path) -> tuple[str, Path]:
    """``(kind, store path)`` of a finished cell with records (its manifest's ``kind``, else the store it holds),
    or an ExportError saying why not."""
    d = Path(cell_dir)
    manifest = read_manifest(d, strict=True)
    if manifest is None:
        raise ExportError(f"export: {d} has no manifest.json: not a cell directory of a grid run")
    if manifest.get("status") != "done":
        raise ExportError(f"export: {d} is not finished (status {manifest.get('status')!r}); run the grid first")
    kind = manifest.get("kind")
    if kind in STORES and (d / STORES[kind]).exists():
        return kind, d / STORES[kind]
    found = [(kind, d / name) for kind, name in STORES.items() if (d / name).exists()]
    if not found:
        raise ExportError(f"export: {d} holds none of {', '.join(sorted(set(STORES.values())))}: the cells of "
                          f"{', '.join(STORES)} are datasets (train and report cells are not)")
    return found[0]


def imported_from(cell_dir: str | Path) -> dict[str, Any] | None:
    """The import a cell's traces come from: ``{source, config, split, license, cell}`` of the cell itself or of
    the nearest import cell upstream (its manifest's ``inputs``, read in the grid's folder); None if none."""
    d = Path(cell_dir)
    seen: set[Path] = set()
    todo = [d]
    while todo:
        c = todo.pop(0)
        if c in seen:
            continue
        seen.add(c)
        manifest = read_manifest(c, strict=True) or {}
        if manifest.get("kind") == "import":
            metrics = read_metrics(c, strict=True) or {}
            return {k: metrics.get(k) for k in ("source", "config", "split", "license")} | {
                "cell": manifest.get("cell", c.name)}
        levels = len(str(manifest.get("cell", "")).split("/"))  # "stage/slug", or "stage" for a cell without axes
        grid_dir = c.parents[levels - 1]
        todo += [grid_dir / v for v in (manifest.get("inputs") or {}).values() if isinstance(v, str)]
    return None


def _size_category(n: int) -> str:
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                        (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if n < bound:
            return name
    return "n>10M"


def _source_datasets(names: list[str]) -> list[str]:
    return sorted({REGISTRY[n].hub_id for n in names if n in REGISTRY and REGISTRY[n].hub_id})


def card(cell_dir: str | Path, kind: str, rows: int, columns: list[str], dataset_names: list[str],
         num_shards: int, license: str = "other", pretty_name: str | None = None):
    """The dataset card (``huggingface_hub.DatasetCard``) of an exported cell."""
    import yaml
    from huggingface_hub import DatasetCard, DatasetCardData

    d = Path(cell_dir)
    manifest = read_manifest(d, strict=True) or {}
    metrics = read_metrics(d, strict=True) or {}
    params = (d / "params.yaml").read_text() if (d / "params.yaml").exists() else "{}\n"
    sources = _source_datasets(dataset_names)
    origin = imported_from(d)
    if origin and origin["source"] and "/" in origin["source"] and not Path(origin["source"]).exists():
        sources = sorted({*sources, origin["source"]})  # a hub id: the card's source_datasets names it
    data = DatasetCardData(
        license=license,
        pretty_name=pretty_name or f"compress-distill {manifest.get('cell', d.name)}",
        size_categories=_size_category(rows),
        source_datasets=sources or None,
        task_categories=["text-generation"],
        tags=["reasoning-traces", "distillation", f"compress-distill-{kind}"],
        configs=[{"config_name": "default",
                  "data_files": [{"split": "train", "path": "data/train-*.parquet"}]}],
    )
    what = WHAT[kind]
    where = [] if origin is None else [
        "## Where the traces came from",
        "",
        f"Imported by the cell `{origin['cell']}` from `{origin['source']}`"
        + (f" (config `{origin['config']}`)" if origin["config"] else "") + f", split `{origin['split']}`: "
        "a trace set written by others, not generated by this grid. "
        + (f"The set states its license as `{origin['license']}`." if origin["license"]
           else "The set states no license; check its own card before sharing."),
        "",
    ]
    body = [
        f"# {data.pretty_name}",
        "",
        f"{rows:,} records of {what}, exported from the grid cell `{manifest.get('cell', d.name)}` "
        f"of compress-distill, in {num_shards} Parquet shard(s).",
        "",
        *where,
        "## Licenses",
        "",
        f"The card's license field says `{license}` (set it with `--license`). Each question keeps the license "
        "of its source dataset" + (f" ({', '.join(sources)})" if sources else "") + ", and the generated text "
        "the terms of the model that wrote it (the parameters below name it).",
        "",
        "## Columns",
        "",
        ", ".join(f"`{c}`" for c in columns),
        "",
        "## Statistics (metrics.json)",
        "",
        "```json",
        json.dumps(metrics, indent=2, default=str),
        "```",
        "",
        "## Parameters that produced it (params.yaml)",
        "",
        "```yaml",
        params.rstrip(),
        "```",
        "",
        "## Run (manifest.json)",
        "",
        "```yaml",
        yaml.safe_dump({k: manifest.get(k) for k in ("cell", "stage", "axes", "status", "start", "end",
                                                     "wall_clock_s", "gpu_hours", "device", "versions")},
                       sort_keys=False).rstrip(),
        "```",
    ]
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")


def export_cell(cell_dir: str | Path, out_dir: str | Path, license: str = "other", shard_rows: int = 100_000,
                repo_id: str | None = None, private: bool = True, token: str | None = None) -> dict[str, Any]:
    """Write the cell's records as Parquet shards plus a dataset card under ``out_dir``; push if asked.

    Returns ``{"kind", "rows", "shards", "out_dir", "pushed"}``. ``out_dir`` is replaced
    as a whole. ``repo_id`` pushes the folder to that hub dataset repository when a token
    is available (``token`` or the one ``huggingface_hub`` finds); without one, an
    ExportError says so and nothing is sent.
    """
    import datasets

    kind, store = cell_store(cell_dir)
    origin = imported_from(cell_dir)
    if license == "other" and origin and origin["license"]:
        license = origin["license"]  # the imported set's own license, unless --license names one
    try:
        check_upstream(store, "export")  # every record the cell finished with, none cut since
    except UpstreamError as e:
        raise ExportError(str(e)) from None
    ds = datasets.load_dataset("json", data_files=str(store), split="train")
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    (out / "data").mkdir(parents=True)
    shards = max(1, math.ceil(len(ds) / shard_rows))
    for k in range(shards):
        ds.shard(shards, k, contiguous=True).to_parquet(str(out / "data" / f"train-{k:05d}-of-{shards:05d}.parquet"))
    names = sorted(set(ds["dataset"])) if "dataset" in ds.column_names else []
    card(cell_dir, kind, len(ds), ds.column_names, names, shards, license).save(out / "README.md")
    pushed = None
    if repo_id:
        from huggingface_hub import HfApi, get_token

        token = token or get_token()
        if not token:
            raise ExportError(f"export: no hub token to push {out} to {repo_id}: set HF_TOKEN or run "
                              f"`huggingface-cli login` (the export itself is written)")
        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        pushed = api.upload_folder(folder_path=str(out), repo_id=repo_id, repo_type="dataset",
                                   commit_message=f"compress-distill export of {Path(cell_dir).name}").commit_url
    return {"kind": kind, "rows": len(ds), "shards": shards, "out_dir": str(out), "pushed": pushed}


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cdlib.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("cell_dir", help="a cell directory of an import, generate, compress, truncate, evaluate or "
                                         "judge stage")
    parser.add_argument("out_dir", help="folder for the Parquet shards and the dataset card")
    parser.add_argument("--license", default="other",
                        help="the card's license field (default: the imported set's own, else other)")
    parser.add_argument("--shard-rows", type=int, default=100_000, help="records per Parquet shard")
    parser.add_argument("--repo-id", help="push to this hub dataset repository (needs a token)")
    parser.add_argument("--public", action="store_true", help="create the hub repository public (default private)")
    args = parser.parse_args(argv)
    try:
        info = export_cell(args.cell_dir, args.out_dir, args.license, args.shard_rows, args.repo_id,
                           private=not args.public)
    except ExportError as e:
        raise SystemExit(str(e)) from None
    print(json.dumps(info))


if __name__ == "__main__":
    main()
