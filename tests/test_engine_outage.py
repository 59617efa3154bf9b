"""Errors are not answers.

An OpenAI-compatible server on 127.0.0.1 answers the toy world correctly, then
goes down (HTTP 500) after a number of requests. Every stage that asks an engine
(generate, compress, evaluate, judge) must end failed while items are unanswered
because of the outage, store nothing for them, and a rerun against the healthy
server must send exactly those items, once each. And a kill between generate's
trace and attempt appends must not change Table 4 after the resume.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import polars as pl
import pytest

from cdlib import compress, evaluate, generate, judge
from cdlib.engines import NothingAnsweredError, UnansweredError
from cdlib.params import (CompressParams, EngineParams, EvaluateParams, GenerateParams, JudgeParams, SamplingParams,
                          ToyParams)
from cdlib.store import Store

REPO = Path(__file__).resolve().parents[1]
TOY = ToyParams(n_train=40, n_test=20, slip_rate=0.0)


class OutageServer(ThreadingHTTPServer):
    """Answers chat completions with ``respond(prompt)``; after ``fail_after`` requests, HTTP 500 for every one.
    ``reject``: HTTP 400 for every request (True) or for the prompts it returns True for (a callable)."""

    daemon_threads = True

    def __init__(self, respond):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.respond, self.fail_after, self.reject = respond, None, False
        self.prompts: list[str] = []  # prompts answered (not failed)
        self.count = 0
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        srv: OutageServer = self.server  # type: ignore[assignment]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        with srv.lock:
            srv.count += 1
            down = srv.fail_after is not None and srv.count > srv.fail_after
            if not down:
                srv.prompts.append(prompt)
        if srv.reject(prompt) if callable(srv.reject) else srv.reject:
            data, status = b'{"error": {"message": "prompt longer than the context"}}', 400
        elif down:
            data, status = b'{"error": {"message": "upstream unavailable"}}', 500
        else:
            msg = {"role": "assistant", "content": srv.respond(prompt)}
            data = json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                               "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}],
                               "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
            status = 200
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _toy_answer(prompt: str) -> str:
    """The toy world's right answer, computed from the question inside any stage's prompt."""
    from cdlib import toy

    m = re.search(r"([A-Z]\w* has \d+ \w+\..*?have now\?)", prompt, re.DOTALL)
    answer = toy.parse_question(m.group(1)).answer if m else 0
    return (f"<think>\nWorking it out step by step, with every number checked twice before the end.\n</think>\n\n"
            f"The answer is \\boxed{{{answer}}}.")


def _respond(prompt: str) -> str:
    if "faithful" in prompt.lower() and "compressed" in prompt.lower():
        return json.dumps({"faithfulness": 5, "coverage": 5, "clarity": 5, "verdict": "faithful",
                           "answer_alignment": True, "failure_modes": [], "rationale": "ok"})
    return _toy_answer(prompt)


@pytest.fixture
def server():
    srv = OutageServer(_respond)
    yield srv
    srv.shutdown()
    srv.server_close()


def _engine(srv, tokenizer=None) -> EngineParams:
    return EngineParams(kind="openai", model="teacher", base_url=srv.base_url, max_retries=0, max_concurrency=4,
                        tokenizer=tokenizer)


def _outage_then_rerun(srv, run, fail_after: int):
    """Run a stage through an outage (it must fail), then against the healthy server; return both prompt lists."""
    srv.fail_after, srv.count, srv.prompts = fail_after, 0, []
    with pytest.raises(UnansweredError, match="unanswered because of engine errors") as err:
        run()
    served_during = list(srv.prompts)
    assert len(served_during) == fail_after
    srv.fail_after, srv.prompts = None, []
    run()
    return served_during, list(srv.prompts), err.value


def test_every_stage_fails_through_an_outage_and_a_rerun_sends_exactly_the_rest(server, tmp_path, tiny_model_dir):
    gen = GenerateParams(out_dir=str(tmp_path / "gen"), toy=TOY, rounds=2, engine=_engine(server),
                         sampling=SamplingParams(max_tokens=64, seed=0))
    before, after, err = _outage_then_rerun(server, lambda: generate.run(gen), fail_after=15)
    assert len(err.failed) == 25
    assert len(after) == 25 and not set(after) & set(before), "the rerun asks exactly the unanswered questions"
    traces = Store(tmp_path / "gen/traces.jsonl").read()
    assert len(traces) == 40 == len({t["id"] for t in traces})
    t4 = generate.table4(gen.out_dir).row(0, named=True)
    assert t4["attempts"] == 40 and t4["accuracy"] == 1.0 and t4["first_round_accuracy"] == 1.0, \
        "an engine error used up a round"
    assert t4["errors"] == 50  # 25 questions x 2 failed requests in the first run (rounds=2 per run)

    comp = CompressParams(out_dir=str(tmp_path / "comp"), traces=gen.out_dir, compressor="teacher",
                          engine=_engine(server, str(tiny_model_dir)), recompress_attempts=1)
    before, after, err = _outage_then_rerun(server, lambda: compress.run(comp), fail_after=10)
    assert len(after) == 30 and not set(after) & set(before)
    recs = Store(tmp_path / "comp/compressed.jsonl").read()
    assert len(recs) == 40 and not any(r["flag"] for r in recs) and all(r["attempts"] == 1 for r in recs)

    ev = EvaluateParams(out_dir=str(tmp_path / "eval"), model=str(tiny_model_dir), toy=TOY,
                        engine=_engine(server, str(tiny_model_dir)), sampling=SamplingParams(max_tokens=64))
    before, after, err = _outage_then_rerun(server, lambda: evaluate.run(ev), fail_after=5)
    outs = Store(tmp_path / "eval/outputs.jsonl").read()
    assert len(after) == 15 and len(outs) == 20 and all(o["correct"] for o in outs), "an error was scored as wrong"

    jd = JudgeParams(out_dir=str(tmp_path / "judge"), compressed=comp.out_dir, engine=_engine(server))
    before, after, err = _outage_then_rerun(server, lambda: judge.run(jd), fail_after=10)
    verdicts = Store(tmp_path / "judge/judgements.jsonl").read()
    assert len(after) == 30 and len(verdicts) == 40 and not any(v["parse_error"] for v in verdicts)


def test_a_rejected_request_is_an_answer_and_uses_its_round(server, tmp_path):
    """HTTP 400 (e.g. a prompt longer than the context) cannot succeed when sent again: it uses its round.
    A cell whose every request was rejected answered nothing: it fails naming the first error, and so
    does its rerun, which sends nothing."""
    server.reject = True
    gen = GenerateParams(out_dir=str(tmp_path / "gen"), toy=TOY, rounds=2, engine=_engine(server),
                         sampling=SamplingParams(max_tokens=64))
    nothing = r"generate: the engine answered none of 80 items; the first error: BadRequestError: .* HTTP 400"
    with pytest.raises(NothingAnsweredError, match=nothing):  # not an UnansweredError: every question had its rounds
        generate.run(gen)
    t4 = generate.table4(gen.out_dir).row(0, named=True)
    assert t4["attempts"] == 80 and t4["errors"] == 80 and t4["n_correct"] == 0
    assert server.count == 80
    with pytest.raises(NothingAnsweredError, match=nothing):
        generate.run(gen)
    assert server.count == 80


def test_every_stage_whose_engine_rejects_every_request_fails_naming_the_error(server, tmp_path, tiny_model_dir):
    gen = GenerateParams(out_dir=str(tmp_path / "gen"), toy=TOY, rounds=1, engine=_engine(server),
                         sampling=SamplingParams(max_tokens=64, seed=0))
    generate.run(gen)
    server.reject = True
    first = r"the engine answered none of (\d+) items; the first error: BadRequestError: .* HTTP 400"
    comp = CompressParams(out_dir=str(tmp_path / "comp"), traces=gen.out_dir, compressor="teacher",
                          engine=_engine(server, str(tiny_model_dir)), recompress_attempts=0)
    with pytest.raises(NothingAnsweredError, match="compress: " + first):
        compress.run(comp)
    ev = EvaluateParams(out_dir=str(tmp_path / "eval"), model=str(tiny_model_dir), toy=TOY,
                        engine=_engine(server, str(tiny_model_dir)), sampling=SamplingParams(max_tokens=64))
    with pytest.raises(NothingAnsweredError, match="evaluate: " + first):
        evaluate.run(ev)
    server.reject = False
    good = CompressParams(out_dir=str(tmp_path / "good"), traces=gen.out_dir, compressor="teacher",
                          engine=_engine(server, str(tiny_model_dir)))
    compress.run(good)
    server.reject = True
    with pytest.raises(NothingAnsweredError, match="judge: " + first):
        judge.run(JudgeParams(out_dir=str(tmp_path / "judge"), compressed=good.out_dir, engine=_engine(server)))


def test_compress_counts_recompression_attempts_across_reruns(server, tmp_path, tiny_model_dir):
    """Every first compression is flagged, every second request meets an outage: the flagged attempts are
    on disk before the next try, so the rerun sends each trace its second attempt only (budget 1 + 1)."""
    gen = GenerateParams(out_dir=str(tmp_path / "gen"), toy=TOY, rounds=1, engine=_engine(server),
                         sampling=SamplingParams(max_tokens=64, seed=0))
    generate.run(gen)
    server.respond = lambda prompt: "<think>\nshort\n</think>\n\nThe answer is \\boxed{999999}."  # contradicts
    comp = CompressParams(out_dir=str(tmp_path / "comp"), traces=gen.out_dir, compressor="teacher",
                          engine=_engine(server, str(tiny_model_dir)), recompress_attempts=1)
    first, rerun, err = _outage_then_rerun(server, lambda: compress.run(comp), fail_after=40)
    assert len(err.failed) == 40 and len(first) == 40
    assert len(rerun) == 40, "the rerun sent first attempts again: the budget of 2 per trace was exceeded"
    recs = Store(tmp_path / "comp/compressed.jsonl").read()
    assert len(recs) == 40 and all(r["flag"] == "contradicts_answer" and r["attempts"] == 2 for r in recs)


_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from cdlib import generate
    from cdlib.params import GenerateParams, SamplingParams, ToyParams
    from cdlib.store import Store

    real_append, calls = Store.append, {"n": 0}

    def append(self, records):
        records = list(records)
        if self.path.name == "attempts.jsonl":
            calls["n"] += 1
            if calls["n"] == int(sys.argv[2]):  # traces of this chunk are on disk, its attempts are not
                os.kill(os.getpid(), signal.SIGKILL)
        return real_append(self, records)

    Store.append = append
    P = GenerateParams(out_dir=sys.argv[1], toy=ToyParams(n_train=60, n_test=5, slip_rate=0.5), rounds=3,
                       chunk_size=10, sampling=SamplingParams(temperature=1.0, max_tokens=2000, seed=0))
    generate.run(P)
""")


def test_a_kill_between_trace_and_attempt_leaves_table4_as_an_uninterrupted_run(tmp_path):
    P = GenerateParams(out_dir=str(tmp_path / "whole"), toy=ToyParams(n_train=60, n_test=5, slip_rate=0.5), rounds=3,
                       chunk_size=10, sampling=SamplingParams(temperature=1.0, max_tokens=2000, seed=0))
    generate.run(P)
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    p = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(killed), "3"], env=env, capture_output=True)
    assert p.returncode == -9, p.stderr.decode()[-2000:]
    assert len(Store(killed / "traces.jsonl")) > 0
    generate.run(P.model_copy(update={"out_dir": str(killed)}))
    assert generate.table4(killed).to_dicts() == generate.table4(P.out_dir).to_dicts()
    assert len(Store(killed / "attempts.jsonl")) == len(Store(tmp_path / "whole/attempts.jsonl"))


def _generate_grid(server, tmp_path, name: str, n_train: int, rounds: int) -> Path:
    """A grid file of one generate cell asking ``server`` (its output under ``tmp_path/out/<name>``)."""
    import yaml

    spec = {"name": name, "output_root": str(tmp_path / "out"),
            "stages": {"generate": {"notebook": "notebooks/01_generate.py", "params": {
                "toy": {"n_train": n_train, "n_test": 2}, "rounds": rounds,
                "engine": {"kind": "openai", "model": "teacher", "base_url": server.base_url, "max_retries": 0},
                "sampling": {"temperature": 0, "max_tokens": 64}}}}}
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(spec))
    return grid


@pytest.mark.slow
def test_a_grid_cell_ends_failed_through_an_outage_and_a_rerun_completes_it(server, tmp_path):
    """The grid's view: the cell is failed (status says so, naming the unanswered count), a rerun finishes it."""
    grid = _generate_grid(server, tmp_path, "o", n_train=12, rounds=2)
    cmd = [sys.executable, "-m", "cdlib.grid"]
    server.fail_after = 5
    first = subprocess.run(cmd + ["run", str(grid)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert first.returncode != 0
    status = subprocess.run(cmd + ["status", str(grid)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert "failed" in status.stdout and "7 of 12 items unanswered" in status.stdout + status.stderr, status.stdout
    server.fail_after, server.prompts = None, []
    second = subprocess.run(cmd + ["run", str(grid)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert len(server.prompts) == 7
    cell = tmp_path / "out/o/generate"
    assert json.loads((cell / "manifest.json").read_text())["status"] == "done"
    assert len(Store(cell / "traces.jsonl")) == 12


def test_a_grid_cell_whose_every_request_is_rejected_ends_failed_not_done(server, tmp_path):
    """The grid's view of a server that rejects everything: the cell is failed with the error, not done."""
    server.reject = True
    grid = _generate_grid(server, tmp_path, "r", n_train=6, rounds=1)
    run = subprocess.run([sys.executable, "-m", "cdlib.grid", "run", str(grid)], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode != 0
    manifest = json.loads((tmp_path / "out/r/generate/manifest.json").read_text())
    assert manifest["status"] == "failed", manifest
    assert "NothingAnsweredError" in json.dumps(manifest["error"]) and "HTTP 400" in json.dumps(manifest["error"])


def _done_cell(grid: Path, cid: str, kind: str, axes: dict, inputs: dict, metrics: dict) -> Path:
    """Mark ``grid/cid`` finished as the runner does (manifest and metrics), so cdlib.results reads it."""
    d = grid / cid
    d.mkdir(parents=True, exist_ok=True)
    (d / "manifest.json").write_text(json.dumps({"status": "done", "kind": kind, "cell": cid, "axes": axes,
                                                 "inputs": inputs}))
    (d / "metrics.json").write_text(json.dumps(metrics, default=str))
    return d


def test_a_compression_that_never_came_back_leaves_its_question_out_of_every_source(server, tmp_path, tiny_model_dir):
    """Two compress cells meet HTTP 400 (a permanent error) for different questions. Neither keeps an empty trace;
    the truncate cell cuts nothing to 0 tokens; every source of training, named with both compress cells as
    paper.yaml names them, trains on the same question ids; Tables 2 and 5 count the failures."""
    from cdlib import report, results, tables, truncate
    from cdlib.training import data as train_data
    from cdlib.grid import Grid
    from cdlib.params import TrainParams, TruncateParams

    grid = tmp_path / "g"
    gen = GenerateParams(out_dir=str(grid / "generate/toy"), toy=TOY, rounds=1, engine=_engine(server),
                         sampling=SamplingParams(max_tokens=64, seed=0))
    _done_cell(grid, "generate/toy", "generate", {"teacher": "toy"}, {}, generate.run(gen))
    questions = {t["id"]: t["question"] for t in Store(grid / "generate/toy/traces.jsonl").read()}
    ids = sorted(questions)
    lost = {"llama70b": set(ids[:3]), "ministral14b": set(ids[2:7])}  # overlapping: 7 questions in all
    comp: dict[str, str] = {}
    for name, gone in lost.items():
        server.reject = lambda prompt, gone=gone: any(f"Question:\n{questions[i]}\n" in prompt for i in gone)
        P = CompressParams(out_dir=str(grid / f"compress/toy__{name}"), traces=gen.out_dir, compressor="teacher",
                           engine=_engine(server, str(tiny_model_dir)), recompress_attempts=0, drop_flagged=False)
        m = compress.run(P)
        assert m["failed"] == len(gone) and m["dropped"] == len(gone)
        recs = Store(Path(P.out_dir) / "compressed.jsonl").read()
        assert {r["id"] for r in recs if r["flag"] == "error"} == gone
        assert all(r["drop"] for r in recs if r["flag"] == "error"), "a failed compression is kept as an empty trace"
        comp[name] = _done_cell(grid, f"compress/toy__{name}", "compress", {"teacher": "toy", "compressor": name},
                                {"traces": "generate/toy"}, m).as_posix()
    server.reject = False
    trunc = TruncateParams(out_dir=str(grid / "truncate/toy"), traces=gen.out_dir, compressed=comp["ministral14b"],
                           tokenizer="whitespace", mode="length_matched", drop_flagged=False)
    _done_cell(grid, "truncate/toy", "truncate", {"teacher": "toy"},
               {"traces": "generate/toy", "compressed": "compress/toy__ministral14b"}, truncate.run(trunc))
    cut = Store(grid / "truncate/toy/truncated.jsonl").read()
    assert {r["id"] for r in cut} == set(ids) - lost["ministral14b"] and min(r["target_tokens"] for r in cut) > 0

    # every source, with the compress cells paper.yaml names for its train cells
    (cell,) = [c for c in Grid("params/paper.yaml").select("train") if c.axes["source"] == "raw"][:1]
    assert [Path(d).name for d in cell.params["same_questions_as"]] == [f"qwen3.5-397b__{n}" for n in lost]
    same = [comp[n] for n in lost]
    data = {"raw": gen.out_dir, "answer_only": gen.out_dir, "llama70b": comp["llama70b"],
            "ministral14b": comp["ministral14b"], "truncated": trunc.out_dir}
    kept = set(ids) - lost["llama70b"] - lost["ministral14b"]
    for source, d in data.items():
        P = TrainParams(out_dir=str(tmp_path / f"train_{source}"), data=d, source=source, same_questions_as=same,
                        seq_len=512, val_fraction=0.1)
        prepared = train_data.prepare(P)
        assert {ex["id"] for ex in prepared.train + prepared.val} == kept, source
        assert prepared.data_info["n_failed"] == prepared.data_info["n_read"] - len(kept), source
        assert prepared.data_info["flags"] == {}, source

    g = results.read_grid(grid)
    every = results.grid_compression(g, include_flagged=True)
    t2 = tables.table2(every)
    assert dict(zip(t2["compressor"], t2["failed"])) == {"llama70b": 3, "ministral14b": 5}
    assert t2["rho"].is_finite().all() and (t2["mean_compressed_chars"] > 0).all()
    t5 = tables.table5(every)
    overall = t5.filter(pl.col("dataset") == "Overall").row(0, named=True)
    assert (overall["llama70b_failed"], overall["ministral14b_failed"]) == (3, 5)
    assert t5.filter(pl.col("dataset") != "Overall")["ministral14b_failed"].sum() == 5
    frames = report.read_frames(g)
    assert frames.compression.height == 2 * len(ids) - 8, "failed compressions are in the kept frame"
