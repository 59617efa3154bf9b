"""A trained LoRA student served through vLLM's OpenAI-compatible server.

The student is a train cell as cdlib.train leaves it (``checkpoint.json`` naming the base
model and the adapter); :func:`cdlib.serve.command` starts the server on CPU, and the
OpenAI client answers through the adapter, which differs from the base model's answer.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import httpx
import pytest

from cdlib import serve


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lora_cell(tiny_model_dir, tiny_lora_dir, tmp_path_factory):
    cell = tmp_path_factory.mktemp("train") / "toy__tiny__lora__extractive"
    cell.mkdir()
    (cell / "checkpoint.json").write_text(json.dumps(
        {"model": str(tiny_model_dir), "adapter": str(tiny_lora_dir), "method": "lora"}))
    return cell


def test_command_for_lora_full_and_missing(lora_cell, tiny_model_dir, tiny_lora_dir, tmp_path):
    cmd = serve.command(str(lora_cell), port=1234, cpu=True)
    assert cmd[cmd.index("--model") + 1] == str(tiny_model_dir)
    assert f"toy__tiny__lora__extractive={tiny_lora_dir}" in cmd and "--enable-lora" in cmd
    assert cmd[cmd.index("--max-lora-rank") + 1] == "8"
    assert "--dtype" in cmd and cmd[cmd.index("--port") + 1] == "1234"
    full = serve.command(str(tiny_model_dir), extra=["--dtype", "bfloat16"], cpu=True)
    assert "--enable-lora" not in full and full.count("--dtype") == 1 and full[-1] == "bfloat16"
    assert full[full.index("--served-model-name") + 1] == tiny_model_dir.name
    broken = tmp_path / "cell"
    broken.mkdir()
    (broken / "checkpoint.json").write_text(json.dumps({"model": str(tmp_path / "gone"), "adapter": None}))
    with pytest.raises(FileNotFoundError, match="gone"):
        serve.command(str(broken))


@pytest.mark.slow  # a second vLLM server start (~1 min): the default tier keeps the command test
def test_served_lora_student_answers_through_openai_client(lora_cell, tiny_model_dir, tmp_path):
    from openai import OpenAI

    port = _free_port()
    log_path = tmp_path / "server.log"
    cmd = serve.command(str(lora_cell), port=port, extra=["--max-model-len", "512"])
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:  # wait on /health, not a fixed sleep
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(1)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        names = {m.id for m in client.models.list().data}
        assert "toy__tiny__lora__extractive" in names and str(tiny_model_dir) in names
        messages = [{"role": "user", "content": "Ann has 3 apples. Ann gets 4 more. How many apples?"}]
        answers = {}
        for name in ("toy__tiny__lora__extractive", str(tiny_model_dir)):
            r = client.chat.completions.create(model=name, messages=messages, max_tokens=12, temperature=0)
            assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1
            answers[name] = r.choices[0].message.content
        assert answers["toy__tiny__lora__extractive"] != answers[str(tiny_model_dir)]  # the adapter is applied
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_served_template_wraps_a_bare_question_in_the_training_prompt(lora_cell, tiny_model_dir):
    """The server's chat template renders a bare question exactly as training and evaluation render
    the row (cdlib.prompts.build_messages); --no-train-prompt leaves the model's own template."""
    from transformers import AutoTokenizer

    from cdlib.prompts import build_messages

    cmd = serve.command(str(lora_cell), cpu=True)
    template = open(cmd[cmd.index("--chat-template") + 1]).read()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    row = {"id": "q", "question": "Ann has 3 pens and buys 2. How many pens?", "answer_type": "numeric"}
    trained = tok.apply_chat_template(build_messages(row), tokenize=False, add_generation_prompt=True)
    bare = [{"role": "user", "content": row["question"]}]
    assert tok.apply_chat_template(bare, chat_template=template, tokenize=False, add_generation_prompt=True) == trained
    wrapped_already = build_messages(row)  # a client that sends the training prompt itself gets it once
    assert tok.apply_chat_template(wrapped_already, chat_template=template, tokenize=False,
                                   add_generation_prompt=True) == trained
    assert tok.apply_chat_template(bare, tokenize=False, add_generation_prompt=True) != trained
    assert "--chat-template" not in serve.command(str(lora_cell), cpu=True, train_prompt=False)
