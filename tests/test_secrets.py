"""API keys never reach a stage's outputs.

``engine.api_key_env`` holds the NAME of an environment variable; a value shaped
like a key is refused with a message that does not quote it. A real server on
127.0.0.1 that echoes the request's headers (and the key itself) in its 500
bodies drives the generate stage through the openai engine; afterwards every
file the stage wrote is searched for the key.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
import zlib
from pathlib import Path

import pytest
import yaml
from test_engine_bodies import ScriptedServer, completion_body

from cdlib import engines, generate, toy
from cdlib.engines.base import scrub
from cdlib.grid import Grid
from cdlib.params import EngineParams, GenerateParams, ParamsError, SamplingParams, ToyParams, validate

REPO = Path(__file__).resolve().parents[1]
KEY_VAR = "CDLIB_TEST_SECRET_KEY"

KEY_SHAPED = ["sk-abc123def456ghi789jkl", "sk_live_AbC123xyz456QWE789", "hf_AbCdEfGhIjKlMnOpQrStUvWx",
              "aB3dE5gH7jK9mN1pQ3sT5vW7", "Bearer abc.def", "my key"]


@pytest.mark.parametrize("value", KEY_SHAPED)
def test_a_key_in_api_key_env_is_refused_without_being_quoted(value):
    engine = {"kind": "openai", "api_key_env": value}
    with pytest.raises(ParamsError) as refused:
        validate("generate", {"out_dir": "o", "engine": engine}, source="grid.yaml")
    message = str(refused.value)
    assert "grid.yaml: key 'engine.api_key_env': Value error, must be the NAME of the environment variable" in message
    assert value not in message
    with pytest.raises(ParamsError) as in_a_list:  # an error quoting a whole input that holds the key
        validate("generate", {"out_dir": "o", "engine": [engine]}, source="grid.yaml")
    assert "key 'engine'" in str(in_a_list.value) and value not in str(in_a_list.value)
    for construct in (lambda: EngineParams(**engine), lambda: GenerateParams(engine=engine)):  # pydantic's own text
        with pytest.raises(ValueError) as raw:  # the second also quotes its whole input: out_dir is missing
            construct()
        assert "api_key_env" in str(raw.value) and value not in str(raw.value)


def test_a_grid_cell_with_a_key_in_api_key_env_is_refused_before_anything_is_written(tmp_path):
    value = KEY_SHAPED[0]
    spec = {"name": "s", "output_root": str(tmp_path / "out"),
            "stages": {"generate": {"notebook": "notebooks/01_generate.py", "params": {
                "engine": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key_env": value}}}}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ParamsError) as in_grid:
        Grid(tmp_path / "grid.yaml", root=REPO).validate_cells()
    assert "key 'engine.api_key_env'" in str(in_grid.value) and value not in str(in_grid.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["OPENAI_API_KEY", "HF_TOKEN", "my_key", "_K2", "AZURE_OPENAI_API_KEY_V2"])
def test_variable_names_are_accepted(name):
    assert EngineParams(kind="openai", api_key_env=name).api_key_env == name


def test_scrub_hides_auth_headers_and_the_key():
    text = ('{"Authorization": "Bearer sk-1", "api-key": "k2"} authorization: Basic dXNlcg==\r\n'
            "x-api-key=k3&q=1 'Proxy-Authorization': 'tok' then the key sk-1 again; api_key_env: MY_KEY")
    assert scrub(text, ["sk-1"]) == (
        '{"Authorization": "***", "api-key": "***"} authorization: ***\r\n'
        "x-api-key=***&q=1 'Proxy-Authorization': '***' then the key *** again; api_key_env: MY_KEY")


def _teacher_echoing_headers_on_500(prompt: str, headers: dict[str, str]):
    """The toy teacher's right answer, except that half the questions always get a 500 whose body
    echoes the request's headers and quotes the key back, as some proxies and gateways do."""
    question = prompt.split("\n\n")[0]
    if zlib.crc32(question.encode()) % 2:
        key = {k.lower(): v for k, v in headers.items()}["authorization"].removeprefix("Bearer ")
        body = {"error": {"message": f"upstream failed; invalid api key {key} for this model", "headers": headers}}
        return 500, "application/json", json.dumps(body).encode()
    answer = toy.parse_question(question).answer
    return 200, "application/json", completion_body(f"<think>I count it up.</think> The answer is \\boxed{{{answer}}}.")


def _files_holding(root: Path, secret: str) -> list[str]:
    """Every file under ``root`` whose bytes contain the secret or its last 12 characters."""
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if secret.encode() in data or secret[-12:].encode() in data:
            found.append(str(path.relative_to(root)))
    return found


@pytest.fixture
def echo_server():
    server = ScriptedServer(_teacher_echoing_headers_on_500)
    yield server
    server.close()


def test_a_server_echoing_headers_leaks_no_key_into_the_generate_stage(echo_server, tmp_path, monkeypatch):
    key = f"sk-proj-{uuid.uuid4().hex}"
    monkeypatch.setenv(KEY_VAR, key)
    engine = {"kind": "openai", "model": "teacher", "base_url": echo_server.base_url, "api_key_env": KEY_VAR,
              "max_retries": 0}
    P = GenerateParams(out_dir=str(tmp_path / "gen"), toy=ToyParams(n_train=8, n_test=2), rounds=2,
                       engine=EngineParams(**engine), sampling=SamplingParams(temperature=0, max_tokens=64))
    try:
        generate.run(P)
        messages = []
    except engines.UnansweredError as e:  # the questions that only ever got a 500
        messages = [str(e)]
    assert _files_holding(tmp_path, key) == []
    assert not any(key in m or key[-12:] in m for m in messages)
    attempts = [json.loads(line) for line in (tmp_path / "gen/attempts.jsonl").read_text().splitlines()]
    errors = [a["error"] for a in attempts if a["finish_reason"] == "error"]
    assert errors and any(a["correct"] for a in attempts), "some questions failed, others were answered"
    assert all("answered HTTP 500" in e and '"authorization": "***' in e for e in errors), errors[0]
    assert "invalid api key *** for this model" in errors[0]  # the key itself, outside any header


@pytest.mark.slow
def test_a_grid_cell_against_a_server_echoing_headers_leaks_no_key_anywhere(echo_server, tmp_path):
    """The whole grid path: params.yaml, manifest.json, log, executed notebook, stores."""
    key = f"sk-proj-{uuid.uuid4().hex}"
    engine = {"kind": "openai", "model": "teacher", "base_url": echo_server.base_url, "api_key_env": KEY_VAR,
              "max_retries": 0}
    spec = {"name": "s", "output_root": str(tmp_path / "out"),
            "stages": {"generate": {"notebook": "notebooks/01_generate.py", "params": {
                "toy": {"n_train": 8, "n_test": 2}, "rounds": 2, "engine": engine,
                "sampling": {"temperature": 0, "max_tokens": 64}}}}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, KEY_VAR: key}
    out = subprocess.run([sys.executable, "-m", "cdlib.grid", "run", str(tmp_path / "grid.yaml")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    cell = tmp_path / "out/s/generate"
    written = {str(p.relative_to(cell)) for p in cell.rglob("*") if p.is_file()}
    assert {"params.yaml", "manifest.json", "attempts.jsonl", "01_generate.ipynb"} <= written, (written, out.stderr)
    assert _files_holding(tmp_path, key) == []
    assert "answered HTTP 500" in (cell / "attempts.jsonl").read_text()
    # the failed cell's error (questions left unanswered) reached the manifest and the notebook, scrubbed
    manifest = json.loads((cell / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "invalid api key *** for this model" in manifest["error"]["message"]
    assert "invalid api key *** for this model" in (cell / "01_generate.ipynb").read_text()
    assert key not in out.stdout + out.stderr and key[-12:] not in out.stdout + out.stderr


def _teacher_quoting_its_url_on_500(prompt: str, headers: dict[str, str]):
    """The toy teacher's right answer for half the questions; a 500 for the others."""
    question = prompt.split("\n\n")[0]
    if zlib.crc32(question.encode()) % 2:
        return 500, "text/plain", b"upstream failed"
    answer = toy.parse_question(question).answer
    return 200, "application/json", completion_body(f"<think>I count it up.</think> The answer is \\boxed{{{answer}}}.")


def test_credentials_in_a_base_url_are_written_nowhere(tmp_path):
    """A key in the URL's userinfo and one in its query string: the grid's whole output tree, the runner's own
    output and ``grid status`` hold neither (params.yaml, manifest.json, log.txt, the executed notebook, stores)."""
    server = ScriptedServer(_teacher_quoting_its_url_on_500)
    user_key, query_key = f"sk-user-{uuid.uuid4().hex}", f"sk-query-{uuid.uuid4().hex}"
    host = server.base_url.removeprefix("http://")
    engine = {"kind": "openai", "model": "teacher", "max_retries": 0,
              "base_url": f"http://me:{user_key}@{host}?api_key={query_key}"}  # the scripted server ignores paths
    spec = {"name": "s", "output_root": str(tmp_path / "out"),
            "stages": {"generate": {"notebook": "notebooks/01_generate.py", "params": {
                "toy": {"n_train": 8, "n_test": 2}, "rounds": 1, "engine": engine,
                "sampling": {"temperature": 0, "max_tokens": 64}}}}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(spec))
    try:
        run = subprocess.run([sys.executable, "-m", "cdlib.grid", "run", str(tmp_path / "grid.yaml")], cwd=REPO,
                             capture_output=True, text=True, timeout=600)
        status = subprocess.run([sys.executable, "-m", "cdlib.grid", "status", str(tmp_path / "grid.yaml")],
                                cwd=REPO, capture_output=True, text=True, timeout=600)
    finally:
        server.close()
    cell = tmp_path / "out/s/generate"
    written = {str(p.relative_to(cell)) for p in cell.rglob("*") if p.is_file()}
    assert {"params.yaml", "manifest.json", "attempts.jsonl", "log.txt", "01_generate.ipynb"} <= written, (
        written, run.stdout, run.stderr)
    assert "upstream failed" in (cell / "attempts.jsonl").read_text(), "the failing requests were recorded"
    assert "http://***@127.0.0.1" in (cell / "params.yaml").read_text()
    assert "?api_key=***" in (cell / "params.yaml").read_text()
    for key in (user_key, query_key):
        assert _files_holding(tmp_path / "out", key) == []
        said = run.stdout + run.stderr + status.stdout + status.stderr
        assert key not in said and key[-12:] not in said, said


@pytest.mark.parametrize("given", [["sk-abc123def456ghi789jkl"], {"k": "sk-abc123def456ghi789jkl"},
                                   12345678901234567890])
def test_an_api_key_env_of_another_type_is_refused_without_being_quoted(given):
    with pytest.raises(ParamsError) as refused:
        validate("generate", {"out_dir": "o", "engine": {"kind": "openai", "api_key_env": given}}, source="grid.yaml")
    message = str(refused.value)
    assert "grid.yaml: key 'engine.api_key_env'" in message, message
    assert "sk-abc123def456ghi789jkl" not in message and "12345678901234567890" not in message, message


def test_validation_errors_hide_secret_shaped_values_and_url_credentials():
    engine = {"kind": "openai", "base_url": 5, "model": ["hf_AbCdEfGhIjKlMnOpQrStUvWx"],
              "max_retries": "http://me:sk-abc123def456ghi789jkl@host/v1"}
    with pytest.raises(ParamsError) as refused:
        validate("generate", {"out_dir": "o", "engine": engine}, source="grid.yaml")
    message = str(refused.value)
    assert "key 'engine.model'" in message and "key 'engine.max_retries'" in message, message
    assert "hf_AbCdEfGhIjKlMnOpQrStUvWx" not in message and "sk-abc123def456ghi789jkl" not in message, message


def test_log_txt_gets_no_credentials_from_output_at_the_file_descriptor_level(tmp_path):
    """What the kernel's children write straight to their stdout/stderr (a vLLM server's log, a rank's) reaches
    ``log.txt`` scrubbed; a progress bar's unfinished line still arrives."""
    from cdlib.grid.cells import _output_to

    key = f"sk-{uuid.uuid4().hex}"
    child = ("import os, sys, time\n"
             f"os.write(2, b'connecting to http://me:{key}@host/v1\\n')\n"
             f"os.write(1, b'GET /v1/models?api_key={key}&x=1 200\\n')\n"
             "os.write(2, b'\\rwork: 1/3 [')\n"
             "time.sleep(1)\n")
    with _output_to(tmp_path / "log.txt"):
        subprocess.run([sys.executable, "-c", child], check=True)
    text = (tmp_path / "log.txt").read_bytes().decode()  # read_text() would turn the bar's \r into \n
    assert key not in text and key[-12:] not in text, text
    assert "connecting to http://***@host/v1\n" in text and "?api_key=***&x=1 200" in text, text
    assert text.endswith("\rwork: 1/3 ["), text
