"""The import stage: a reasoning-trace set someone already has, as the records the generate stage writes.

Most people who want to compress traces already hold them: a public set (OpenThoughts,
OpenR1-Math, Bespoke-Stratos, s1K, LIMO, the ``reasoning_content`` of an OpenAI-compatible
server) or their own vLLM outputs. :func:`run` reads such a set from the hub
(``datasets.load_dataset``; offline with ``HF_HUB_OFFLINE=1`` and a cached copy) or from a
local JSONL/JSON/Parquet file or directory, and writes ``traces.jsonl`` in the generate
stage's record layout (:func:`cdlib.generate.run`), so compress, truncate, train, judge,
export and explore take an import cell wherever they take a generate cell:

* ``question``, ``gold`` (``None`` where the set states no reference answer), ``answer_type``;
* ``response`` (``<think>reasoning</think>answer``), ``reasoning``, ``answer``;
* ``extracted``, ``rule``, ``correct``, ``truncated``: this project's own extraction and
  verification (:mod:`cdlib.answers`), never the set's verdict, which is kept beside it as
  ``source_correct`` where the set has one;
* ``completion_tokens`` (reasoning and answer) and ``prompt_tokens`` (the question), counted
  with the named ``tokenizer`` ("whitespace" or a HF tokenizer id/path);
* ``flag`` and ``drop``: a row whose answer does not verify carries ``flag`` "wrong_answer",
  "no_answer" (nothing extracted, or reasoning that never ended) or "no_gold" (nothing to
  verify against), with ``drop`` false, so downstream stages keep it while explore and the
  tables see it; with ``unverified: drop`` it is left out and only counted in the metrics.

Layouts (:data:`LAYOUTS`) are recognised from a row's columns, each found in the set's public
card or files (the source is named beside each); ``tests/fixtures/trace_sets/`` holds real rows
of them. A row of no known layout is an error naming its columns and the layouts known; the grid
can then name the columns (``columns: {question: ..., reasoning: ... or response: ..., gold: ...}``),
which also override single fields of a recognised layout (e.g. a ``gold`` column). A set with
several generations per question (OpenR1-Math) gives one record per question: the first
generation that verifies, else the first one.
"""

from __future__ import annotations

import ast
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdlib import answers, traces
from cdlib import tokenizer as toklib
from cdlib.params import ImportParams
from cdlib.store import Store

READABLE = (".jsonl", ".json", ".parquet")
FLAGS = ("wrong_answer", "no_answer", "no_gold")
QUESTION_COLUMNS = ("question", "problem", "input", "prompt", "instruction")  # the flat layouts' question, in order

# OpenThoughts / Bespoke-Stratos / Sky-T1 markers around the reasoning and the solution
BEGIN_THOUGHT, END_THOUGHT = "<|begin_of_thought|>", "<|end_of_thought|>"
BEGIN_SOLUTION, END_SOLUTION = "<|begin_of_solution|>", "<|end_of_solution|>"


class ImportFailed(ValueError):
    """Bad import input; the message names the source, the row (file:line or hub row) and the key."""


@dataclass
class Trace:
    """One question's trace as a layout reads it from a raw row."""

    question: str
    reasoning: str
    answer: str
    truncated: bool  # the reasoning never ended (no closing marker)
    gold: str | None = None
    source_correct: bool | None = None  # the set's own verdict, where it states one
    source_id: str | None = None  # the set's own id of the row (uuid, id)


# --------------------------------------------------------------------------- splitting a response


def split_response(text: str) -> tuple[str, str, bool]:
    """(reasoning, answer, truncated) of a response in any of the sets' formats.

    OpenThoughts' ``<|begin_of_thought|>...<|end_of_thought|>`` and ``<|begin_of_solution|>...
    <|end_of_solution|>``; otherwise :func:`cdlib.traces.parse_response` (``<think>``, gpt-oss
    harmony, plain text as the answer alone).
    """
    text = text or ""
    start = text.find(BEGIN_THOUGHT)
    if start >= 0:
        end = text.find(END_THOUGHT, start)
        if end < 0:
            return text[start + len(BEGIN_THOUGHT):].strip(), "", True
        reasoning = text[start + len(BEGIN_THOUGHT):end].strip()
        rest = text[end + len(END_THOUGHT):]
        s = rest.find(BEGIN_SOLUTION)
        if s >= 0:
            rest = rest[s + len(BEGIN_SOLUTION):]
            rest = rest.split(END_SOLUTION, 1)[0]
        return reasoning, rest.strip(), False
    parsed = traces.parse_response(text)
    return parsed.reasoning, parsed.answer, parsed.truncated


def _turns(messages: Any, where: str, role_key: str = "role", text_key: str = "content") -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ImportFailed(f"{where}: expected a list of {{{role_key}, {text_key}}} turns, "
                           f"got {type(messages).__name__}")
    return messages


def _first(turns: list[dict[str, Any]], roles: tuple[str, ...], key: str, where: str) -> dict[str, Any]:
    for t in turns:
        if t.get(key) in roles:
            return t
    raise ImportFailed(f"{where}: no turn whose {key!r} is one of {', '.join(roles)}")


def _text(value: Any, where: str, column: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ImportFailed(f"{where}: column {column!r} is {type(value).__name__}, expected text")
    return value


# --------------------------------------------------------------------------- one reader per layout


def read_conversations(row: dict[str, Any], where: str) -> list[Trace]:
    # open-thoughts/OpenThoughts-114k (config "default"), bespokelabs/Bespoke-Stratos-17k, NovaSky-AI/Sky-T1_data_17k:
    # system, conversations = [{from: user, value}, {from: assistant, value}] with <|begin_of_thought|> markers
    # (OpenThoughts3-1.2M: the same turns with <think>). Source: the sets' cards (dataset_info features) and the
    # Bespoke-Stratos row 0 in tests/fixtures/trace_sets. No reference answer: gold comes from `columns` only.
    turns = _turns(row["conversations"], where, "from", "value")
    user = _first(turns, ("user", "human"), "from", where)
    bot = _first(turns, ("assistant", "gpt"), "from", where)
    reasoning, answer, cut = split_response(_text(bot.get("value"), where, "conversations"))
    return [Trace(_text(user.get("value"), where, "conversations"), reasoning, answer, cut)]


def read_openr1(row: dict[str, Any], where: str) -> list[Trace]:
    # open-r1/OpenR1-Math-220k (configs default, extended, all): problem, solution, answer, uuid, generations (list of
    # "<think>...</think>answer"), correctness_math_verify (list of bool, one per generation), is_reasoning_complete,
    # correctness_llama, finish_reasons, messages. Source: the dataset card's dataset_info features.
    gens = row["generations"] or []
    verdicts = row.get("correctness_math_verify") or []
    out = []
    for k, g in enumerate(gens):
        reasoning, answer, cut = split_response(_text(g, where, f"generations[{k}]"))
        out.append(Trace(_text(row.get("problem"), where, "problem"), reasoning, answer, cut,
                         _gold(row.get("answer")), verdicts[k] if k < len(verdicts) else None,
                         str(row["uuid"]) if row.get("uuid") is not None else None))
    if not out:
        raise ImportFailed(f"{where}: 'generations' is empty")
    return out


def _listed(value: Any) -> Any:
    """A list of texts written as its Python repr (``"['step one', 'step two']"``) read back; else ``value``."""
    if isinstance(value, str) and value.lstrip().startswith("[") and value.rstrip().endswith("]"):
        try:
            parsed = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return value
        if isinstance(parsed, list) and all(isinstance(x, str) for x in parsed):
            return parsed
    return value


def read_s1k(row: dict[str, Any], where: str) -> list[Trace]:
    # simplescaling/s1K: solution (the reference solution or answer), question, cot_type, source_type, metadata, cot,
    # thinking_trajectories (a list holding the Gemini thinking), attempt (the answer written after it).
    # Source: the dataset card's dataset_info features. The gold is the answer extracted from `solution`.
    # A copy written through CSV (datasets' to_csv, then pandas) holds the list as its Python repr, a string:
    # the real row in tests/fixtures/trace_sets/s1k (boovines/SEPO datasets/test_s1k.json) is read back to the list.
    steps = _listed(row["thinking_trajectories"])
    reasoning = "\n".join(steps) if isinstance(steps, list) else _text(steps, where, "thinking_trajectories")
    return [Trace(_text(row.get("question"), where, "question"), reasoning.strip(),
                  _text(row.get("attempt"), where, "attempt").strip(), False, _solution_gold(row.get("solution")))]


def read_s1k_11(row: dict[str, Any], where: str) -> list[Trace]:
    # simplescaling/s1K-1.1: solution, question, cot_type, source_type, metadata, gemini_thinking_trajectory,
    # gemini_attempt, deepseek_thinking_trajectory, deepseek_attempt (the DeepSeek-R1 traces are read), gemini_grade,
    # gemini_grade_reason, deepseek_grade, deepseek_grade_reason. Source: the dataset card's dataset_info features;
    # deepseek_grade is Claude 3.7 Sonnet's "Yes"/"No" on deepseek_attempt against `solution` (simplescaling/s1
    # data/grading.ipynb @ 6a0719d8fd8b5d681b3907d6d4b80ac7023037a0: deepseek_grade Yes 630, No 370), kept as
    # source_correct beside this project's own verdict.
    grade = {"Yes": True, "No": False}.get(row.get("deepseek_grade"))
    return [Trace(_text(row.get("question"), where, "question"),
                  _text(row["deepseek_thinking_trajectory"], where, "deepseek_thinking_trajectory").strip(),
                  _text(row.get("deepseek_attempt"), where, "deepseek_attempt").strip(), False,
                  _solution_gold(row.get("solution")), grade)]


def read_messages(row: dict[str, Any], where: str) -> list[Trace]:
    # messages = [{role: user, content}, {role: assistant, content: "<think>...</think>answer"}]: open-r1's
    # Mixture-of-Thoughts (messages, num_tokens, source), OpenR1-Math-220k's and HuggingFaceH4/Bespoke-Stratos-17k's
    # messages columns (the latter with <|begin_of_thought|> markers). An assistant turn with `reasoning_content` or
    # `reasoning` (an OpenAI-compatible server's message, saved with its request) is read as reasoning plus content.
    turns = _turns(row["messages"], where)
    user = _first(turns, ("user",), "role", where)
    bot = _first(turns, ("assistant",), "role", where)
    reasoning, answer, cut = split_message(bot, where, "messages[]")
    return [Trace(_text(user.get("content"), where, "messages[].content"), reasoning, answer, cut,
                  _gold(row.get("answer")))]


#: Where an OpenAI-compatible server puts the reasoning beside `content`, in the order tried: DeepSeek's API (and
#: vLLM before 0.11) `reasoning_content`; vLLM since 0.11 (ChatMessage.reasoning, vllm-project/vllm
#: vllm/entrypoints/openai/chat_completion/protocol.py), OpenRouter and Groq (reasoning_format "parsed") `reasoning`.
REASONING_FIELDS = ("reasoning_content", "reasoning")


def split_message(message: dict[str, Any], where: str, column: str) -> tuple[str, str, bool]:
    """(reasoning, answer, truncated) of a chat message: a :data:`REASONING_FIELDS` field beside `content`, else the
    content split by :func:`split_response` (Groq's reasoning_format "raw", a server without a reasoning parser:
    ``<think>`` inside the content)."""
    for field in REASONING_FIELDS:
        reasoning = _text(message.get(field), where, f"{column}.{field}")
        if reasoning.strip():
            return reasoning.strip(), _text(message.get("content"), where, f"{column}.content").strip(), False
    return split_response(_text(message.get("content"), where, f"{column}.content"))


def read_chat_log(row: dict[str, Any], where: str) -> list[Trace]:
    # An OpenAI-compatible chat completion saved with its request: {request: {messages, ...}, response: {choices:
    # [{message: {content, reasoning_content or reasoning}, finish_reason}], ...}} (:func:`split_message`). Real
    # answers of DeepSeek, OpenRouter, Groq and a DeepSeek-V4 host in tests/fixtures/trace_sets/chat_log.
    request, response = row["request"], row["response"]
    if not isinstance(request, dict) or not isinstance(response, dict):
        raise ImportFailed(f"{where}: 'request' and 'response' must be JSON objects")
    user = _first(_turns(request.get("messages"), f"{where} request"), ("user",), "role", where)
    choices = response.get("choices") or []
    if not choices or not isinstance(choices[0].get("message"), dict):
        raise ImportFailed(f"{where}: response has no choices[0].message")
    reasoning, answer, cut = split_message(choices[0]["message"], where, "choices[0].message")
    cut = cut or choices[0].get("finish_reason") == "length"
    return [Trace(_text(user.get("content"), where, "request.messages[].content"), reasoning,
                  "" if cut else answer, cut, _gold(row.get("answer")), source_id=response.get("id"))]


def read_reasoning_content(row: dict[str, Any], where: str) -> list[Trace]:
    # Flat reasoning_content and content columns beside the question: Congliu/Chinese-DeepSeek-R1-Distill-data-110k
    # (input, content, reasoning_content, repo_name, prompt_tokens_len, reasoning_content_tokens_len,
    # content_tokens_len, score; from code reading its rows) and one's own saved vLLM outputs.
    column = next((c for c in QUESTION_COLUMNS if c in row), None)
    if column is None:
        raise ImportFailed(f"{where}: reasoning_content rows need a question column, "
                           f"one of {', '.join(QUESTION_COLUMNS)}")
    return [Trace(_text(row[column], where, column),
                  _text(row["reasoning_content"], where, "reasoning_content").strip(),
                  _text(row.get("content"), where, "content").strip(), False, _gold(row.get("answer")))]


#: Where DeepSeek-R1-style text written without reasoning markers starts its answer (LIMO's `solution`).
FINAL_ANSWER = "**Final Answer**"


def split_solution(text: str) -> tuple[str, str, bool]:
    """(reasoning, answer, truncated) of a whole response that may carry no reasoning markers, as LIMO's `solution`
    (DeepSeek-R1's thinking, then a ``**Final Answer**`` line with its ``\\boxed{}``): the text before the last
    ``**Final Answer**`` is the reasoning, the rest the answer. A text with ``<think>`` or OpenThoughts markers is
    split by :func:`split_response`; one with neither is reasoning that never reached its answer (truncated, as an
    unclosed ``<think>`` is: never scored)."""
    text = text or ""
    if BEGIN_THOUGHT in text or traces.THINK_OPEN in text or traces.THINK_CLOSE in text:
        return split_response(text)
    k = text.rfind(FINAL_ANSWER)
    if k < 0:
        return text.strip(), "", True
    return text[:k].strip(), text[k:].strip(), False


def read_limo(row: dict[str, Any], where: str) -> list[Trace]:
    # GAIR/LIMO: question, solution (DeepSeek-R1's whole response, no <think> markers, ending in a **Final Answer**
    # line), answer (the reference answer, "25"). Source: the set's own viewer page (huggingface.co/datasets/GAIR/LIMO:
    # question, solution and answer, in this order) and the authors' file (GAIR-NLP/LIMO train/data/limo.json, the
    # same rows as instruction/input/output); the real row 0 in tests/fixtures/trace_sets/limo.
    reasoning, answer, cut = split_solution(_text(row["solution"], where, "solution"))
    return [Trace(_text(row["question"], where, "question"), reasoning, answer, cut, _gold(row.get("answer")))]


@dataclass(frozen=True)
class Layout:
    """A public set's layout: the columns that recognise it, its reader and the sets it covers."""

    name: str
    needs: tuple[str, ...]
    read: Callable[[dict[str, Any], str], list[Trace]]
    sets: str


#: Known layouts in the order they are tried (the first whose columns a row holds wins).
LAYOUTS: dict[str, Layout] = {lay.name: lay for lay in (
    Layout("openr1_math", ("problem", "generations"), read_openr1, "open-r1/OpenR1-Math-220k"),
    Layout("s1k", ("question", "thinking_trajectories"), read_s1k, "simplescaling/s1K"),
    Layout("s1k_1.1", ("question", "deepseek_thinking_trajectory"), read_s1k_11, "simplescaling/s1K-1.1"),
    Layout("openthoughts", ("conversations",), read_conversations,
           "open-thoughts/OpenThoughts-114k, bespokelabs/Bespoke-Stratos-17k, NovaSky-AI/Sky-T1_data_17k"),
    Layout("messages", ("messages",), read_messages,
           "open-r1/Mixture-of-Thoughts, HuggingFaceH4/Bespoke-Stratos-17k (messages with <think> or thought markers)"),
    Layout("chat_log", ("request", "response"), read_chat_log, "OpenAI-compatible request/response logs"),
    Layout("reasoning_content", ("reasoning_content",), read_reasoning_content,
           "Congliu/Chinese-DeepSeek-R1-Distill-data-110k, own vLLM outputs"),
    Layout("limo", ("question", "solution", "answer"), read_limo, "GAIR/LIMO"),
)}

FIELDS = ("question", "reasoning", "answer", "response", "gold")  # what `columns` may name


def _gold(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _solution_gold(solution: Any) -> str | None:
    """The reference answer in a worked solution (its last ``\\boxed{}``, or the bare answer it is)."""
    text = _gold(solution)
    if text is None:
        return None
    return answers.extract(text, "latex") or (text if len(text) <= 100 else None)


def detect(row: dict[str, Any], where: str, columns: dict[str, str] | None = None) -> str:
    """The name of the first layout of :data:`LAYOUTS` whose columns ``row`` holds, or "columns" when the grid
    names the question and reasoning/response columns; otherwise an error naming what it saw and what is known."""
    for lay in LAYOUTS.values():
        if all(c in row for c in lay.needs):
            return lay.name
    if columns and "question" in columns and ("reasoning" in columns or "response" in columns):
        return "columns"
    known = "; ".join(f"{lay.name} ({', '.join(lay.needs)}: {lay.sets})" for lay in LAYOUTS.values())
    raise ImportFailed(f"{where}: columns ({', '.join(sorted(row))}) match no known trace layout. Known: {known}. "
                       f"Name the columns in the grid instead: columns: {{question: ..., reasoning: ... (or "
                       f"response: ...), answer: ..., gold: ...}}")


def read_row(row: dict[str, Any], layout: str, columns: dict[str, str], where: str) -> list[Trace]:
    """The traces of one raw row in ``layout``, with the grid's ``columns`` overriding single fields."""
    for field, column in columns.items():
        if field not in FIELDS:
            raise ImportFailed(f"{where}: columns: unknown field {field!r}; known: {', '.join(FIELDS)}")
        if column not in row:
            raise ImportFailed(f"{where}: columns[{field!r}]: no column {column!r} (have {', '.join(sorted(row))})")
    if layout == "columns":
        if "response" in columns:
            reasoning, answer, cut = split_response(_text(row[columns["response"]], where, columns["response"]))
        else:
            reasoning, answer, cut = (_text(row[columns["reasoning"]], where, columns["reasoning"]).strip(), "", False)
        found = [Trace(_text(row[columns["question"]], where, columns["question"]), reasoning, answer, cut)]
    else:
        if layout not in LAYOUTS:
            raise ImportFailed(f"{where}: unknown layout {layout!r}; known: {', '.join(LAYOUTS)}, columns, auto")
        missing = [c for c in LAYOUTS[layout].needs if c not in row]
        if missing:
            raise ImportFailed(f"{where}: layout {layout!r} needs column(s) {', '.join(missing)} "
                               f"(have {', '.join(sorted(row))})")
        found = LAYOUTS[layout].read(row, where)
    for t in found:
        if "question" in columns and layout != "columns":
            t.question = _text(row[columns["question"]], where, columns["question"])
        if "reasoning" in columns and layout != "columns":
            t.reasoning = _text(row[columns["reasoning"]], where, columns["reasoning"]).strip()
        if "answer" in columns:
            t.answer = _text(row[columns["answer"]], where, columns["answer"]).strip()
        if "gold" in columns:
            t.gold = _gold(row[columns["gold"]])
        if not t.question.strip():
            raise ImportFailed(f"{where}: empty question")
    return found


# --------------------------------------------------------------------------- reading a source


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in READABLE)
    if not files:
        raise ImportFailed(f"import: {path} holds no {', '.join(READABLE)} file")
    return files


def _file_rows(path: Path) -> Iterator[tuple[dict[str, Any], str]]:
    """Raw rows of one local file with their location, streamed (a set can hold gigabytes of text)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=1000)
            i = 0
            for batch in batches:
                for rec in batch.to_pylist():
                    yield rec, f"{path} row {i}"
                    i += 1
        except OSError as e:
            raise ImportFailed(f"import: cannot read Parquet file {path}: {e}") from None
        return
    if path.suffix not in (".jsonl", ".json"):
        raise ImportFailed(f"import: {path}: unsupported file type; use one of {', '.join(READABLE)}")
    with path.open(encoding="utf-8") as f:  # JSON lines (the hub's .json trace files are JSON lines too)
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                hint = " (a JSON array? write one object per line)" if lineno == 1 and line.lstrip()[:1] == "[" else ""
                raise ImportFailed(f"import: {path}:{lineno}: invalid JSON: {e.msg}{hint}") from None
            if not isinstance(rec, dict):
                raise ImportFailed(f"import: {path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            yield rec, f"{path}:{lineno}"


def _hub_rows(P: ImportParams) -> tuple[Iterator[tuple[dict[str, Any], str]], str | None]:
    """Raw rows of a hub split and the license its metadata states (``datasets.load_dataset``, offline-safe)."""
    import datasets

    try:
        data = datasets.load_dataset(P.source, P.config, split=P.split)
    except Exception as e:  # offline, unknown id, gated repo, unknown config: all end the same way
        offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True")
        raise ImportFailed(
            f"import: cannot load hub dataset {P.source!r} (config {P.config!r}, split {P.split!r}): "
            f"{type(e).__name__}: {e}. " + ("HF_HUB_OFFLINE is set and no cached copy was found; " if offline else "")
            + "point `source` at a local copy (a JSONL/JSON/Parquet file or directory) on machines without network"
        ) from None
    license = (data.info.license or None) if getattr(data, "info", None) else None
    return ((rec, f"{P.source}[{P.config}]/{P.split} row {i}") for i, rec in enumerate(data)), license


def _card_license(path: Path) -> str | None:
    """The ``license:`` of a dataset card (README.md with a YAML header) in the source's folder, if any."""
    folder = path if path.is_dir() else path.parent
    card = folder / "README.md"
    if not card.is_file():
        return None
    text = card.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    found = re.search(r"^license:\s*(\S+)\s*$", text.split("---", 2)[1] if text.count("---") >= 2 else "", re.M)
    return found.group(1).strip("'\"") if found else None


def source_rows(P: ImportParams) -> tuple[Iterator[tuple[dict[str, Any], str]], str | None]:
    """(raw rows with their location, the license the set states) of ``P.source``: a local file or directory,
    else a hub id ("owner/name"). Neither is an error naming the source."""
    path = Path(P.source)
    if path.exists():
        return (r for f in _files(path) for r in _file_rows(f)), _card_license(path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", P.source):
        return _hub_rows(P)
    raise ImportFailed(f"import: source {P.source!r} is neither a local file or directory nor a hub id (owner/name)")


# --------------------------------------------------------------------------- records


def dataset_name(P: ImportParams) -> str:
    """The records' ``dataset``: ``P.dataset``, else the source's last path part without its suffix."""
    if P.dataset:
        return P.dataset
    name = Path(P.source.rstrip("/")).name
    return Path(name).stem if Path(name).suffix in READABLE else name


def answer_type(gold: str | None, wanted: str) -> str:
    """``wanted``, or for "auto": "numeric" when the gold is a plain number, else "latex"."""
    if wanted != "auto":
        return wanted
    if gold is not None and re.fullmatch(r"-?\d[\d,]*(\.\d+)?|-?\.\d+", gold.strip()):
        return "numeric"
    return "latex"


def judge(t: Trace, kind: str) -> tuple[answers.Extraction, str, bool | None, str | None]:
    """(extraction, response text, correct, flag) of one trace, by :mod:`cdlib.answers` alone."""
    response = traces.format_think(t.reasoning, t.answer) if not t.truncated else f"{traces.THINK_OPEN}\n{t.reasoning}"
    ex = answers.extract_detailed(response, kind)
    if ex.value is None:
        return ex, response, False if t.gold is not None else None, "no_answer"
    if t.gold is None:
        return ex, response, None, "no_gold"
    ok = answers.verify(ex.value, t.gold, kind)
    return ex, response, ok, None if ok else "wrong_answer"


def _pick(found: list[Trace], kind_of: Callable[[Trace], str]) -> tuple[Trace, tuple]:
    """The first trace of a row that verifies, else the first one, with its :func:`judge` result."""
    first = None
    for t in found:
        result = judge(t, kind_of(t))
        if first is None:
            first = (t, result)
        if result[2]:
            return t, result
    return first


def run(P: ImportParams) -> dict[str, Any]:
    """Import ``P.source`` into ``P.out_dir/traces.jsonl``; return the metrics (also what metrics.json holds).

    Resumable: records already in the store are skipped (ids are "<dataset>/<row index>", stable for the
    same source). A row that cannot be read is an error naming its file and line (or hub row).
    """
    out = Store(Path(P.out_dir) / "traces.jsonl", writable=True)
    rows, license = source_rows(P)
    name = dataset_name(P)
    tok = toklib.load(P.tokenizer)
    counts = {"rows": 0, "kept": 0, "dropped": 0, "correct": 0, "flags": {f: 0 for f in FLAGS},
              "source_agrees": 0, "source_disagrees": 0}
    layouts: dict[str, int] = {}
    batch: list[dict[str, Any]] = []
    for i, (row, where) in enumerate(rows):
        if P.limit is not None and i >= P.limit:
            break
        counts["rows"] += 1
        lay = P.layout if P.layout != "auto" else detect(row, where, P.columns)
        layouts[lay] = layouts.get(lay, 0) + 1
        t, (ex, response, ok, flag) = _pick(read_row(row, lay, P.columns, where),
                                             lambda tr: answer_type(tr.gold, P.answer_type))
        if flag is not None:
            counts["flags"][flag] += 1
        if t.source_correct is not None and ok is not None:
            counts["source_agrees" if t.source_correct == ok else "source_disagrees"] += 1
        if flag is not None and P.unverified == "drop":
            counts["dropped"] += 1
            continue
        rid = f"{name}/{i}"
        if rid in out:
            counts["kept"] += 1
            counts["correct"] += bool(ok)
            continue
        kind = answer_type(t.gold, P.answer_type)
        counts["kept"] += 1
        counts["correct"] += bool(ok)
        batch.append({
            "id": rid, "dataset": name, "domain": "Imported", "group": "Imported", "split": "train",
            "question": t.question, "choices": None, "gold": t.gold, "answer_type": kind,
            "response": response, "reasoning": t.reasoning, "answer": t.answer,
            "extracted": ex.value, "rule": ex.rule, "round": 0,
            "prompt_tokens": len(tok.encode(t.question)),
            "completion_tokens": len(tok.encode(t.reasoning)) + len(tok.encode(t.answer)),
            "finish_reason": "length" if t.truncated else "stop", "correct": ok, "truncated": ex.truncated,
            "flag": flag, "drop": False, "source": P.source, "source_row": where, "source_id": t.source_id,
            "source_correct": t.source_correct, "layout": lay})
        if len(batch) >= 1000:
            out.append(batch)
            batch = []
    out.append(batch)
    if not counts["rows"]:
        raise ImportFailed(f"import: {P.source} holds no rows")
    if not counts["kept"]:
        raise ImportFailed(f"import: every one of the {counts['rows']} rows of {P.source} was dropped "
                           f"(unverified: drop; flags {counts['flags']}): nothing to import")
    return metrics(P, counts, layouts, license or P.license)


def metrics(P: ImportParams, counts: dict[str, Any], layouts: dict[str, int], license: str | None) -> dict[str, Any]:
    """metrics.json content: where the traces came from and what verified (``kept`` is the store's count)."""
    return {"source": P.source, "config": P.config, "split": P.split, "license": license,
            "layouts": layouts, "tokenizer": P.tokenizer, "rows": counts["rows"], "kept": counts["kept"],
            "dropped": counts["dropped"], "total_correct": counts["correct"],
            "accuracy": counts["correct"] / counts["rows"] if counts["rows"] else None,
            "flags": counts["flags"], "source_agrees": counts["source_agrees"],
            "source_disagrees": counts["source_disagrees"]}


def table(out_dir: str | Path):
    """Per-dataset summary of an import cell: kept traces, verified, flags, mean reasoning chars and tokens."""
    import polars as pl

    df = Store(Path(out_dir) / "traces.jsonl").to_polars()
    if df.is_empty():
        return pl.DataFrame()
    return df.group_by("dataset").agg(
        kept=pl.len(), correct=pl.col("correct").fill_null(False).sum(),
        flagged=pl.col("flag").is_not_null().sum(),
        mean_reasoning_chars=pl.col("reasoning").str.len_chars().mean(),
        mean_completion_tokens=pl.col("completion_tokens").mean()).sort("dataset")
