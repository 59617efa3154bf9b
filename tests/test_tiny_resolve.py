"""The 'tiny-random' model name resolves to a tiny model built once per cache directory."""

from pathlib import Path

from cdlib.tiny import resolve


def test_tiny_random_is_built_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("CDLIB_CACHE", str(tmp_path))
    assert resolve("Qwen/Qwen3.5-0.8B-Base") == "Qwen/Qwen3.5-0.8B-Base"
    path = Path(resolve("tiny-random"))
    assert path == tmp_path / "tiny-random" and (path / "config.json").exists()
    stamp = (path / "config.json").stat().st_mtime_ns
    assert resolve("tiny-random") == str(path) and (path / "config.json").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".build-")]


def test_tiny_family_names_are_built_once_with_their_family(tmp_path, monkeypatch):
    import json

    from cdlib.tiny import FAMILIES, family_of

    monkeypatch.setenv("CDLIB_CACHE", str(tmp_path))
    path = Path(resolve("tiny-llama"))
    assert path == tmp_path / "tiny-llama" and family_of(str(path)) == "llama"
    config = json.loads((path / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "llama3"
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    stamp = (path / "config.json").stat().st_mtime_ns
    assert resolve("tiny-llama") == str(path) and (path / "config.json").stat().st_mtime_ns == stamp
    assert set(FAMILIES) == {"qwen3_5", "qwen3_5_moe", "llama", "gpt_oss", "ministral3"}  # params/paper.yaml's
