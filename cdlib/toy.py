"""The toy world: seeded multi-step arithmetic word problems and a scripted teacher.

It is the default world that runs on a laptop without any download (see
DESIGN.md). Questions use the row schema of ``cdlib.datasets`` and a small,
templated vocabulary, so a tiny tokenizer trained on them covers everything::

    Tom has 5 apples. Tom gets 3 more apples. Then Tom gives away 2 apples.
    How many apples does Tom have now?

The difficulty knobs live in :class:`cdlib.params.ToyParams` (start values,
operands, number of steps, allowed operations, sizes, seed). Train and test
problems never share the same arithmetic (start value and steps).

The scripted teacher (:func:`teacher_response`) writes a ``<think>`` trace as a
reasoning model does: the work first, one load-bearing step line per step that
names the step it computes (``Tom gets 3 more: 5 + 3 = 8``, a line of its own
that matches :data:`EQUATION_RE`; with ``work_in_words``, a step that crosses a
ten says so right after its numbers, is worked out in words, then written bare:
``Tom gets 7 more: 8 + 7 crosses a ten.`` / ``Let me think: 8 and 2 make 10,
and 5 more make 15.`` / ``8 + 7 = 15``), the answer, then the overthinking:
re-checks and a backwards check that spell the numbers out in words, so they
never match, and two closing checks. At temperature > 0 it slips now and
then: a wrong intermediate result that it carries on with to a wrong final
answer, which is what gives rejection sampling its work. :func:`solution_steps`
gives the true minimal step lines of a question, :func:`concise_solution` the
toy teacher's rewrite.

The pretraining corpus of the demo's base model (:func:`base_response` on the
``pretrain`` split) is toy-world text that is not the teacher's traces: every
one-step problem (the arithmetic facts, drilled as a step line) and two-step
problems worked in the world's reasoning style without a slip, none of them a
question the teacher is asked. A tiny model pretrained on it reads the problems,
reasons and ends its answers, and solves some of the world's problems (up to
three steps) but not most, as a pretrained student does before reasoning
distillation; the teacher's traces then teach it the longer problems.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from cdlib.params import ToyParams

DATASET = "toy"
DOMAIN = "Toy arithmetic"
GROUP = "Math"

NAMES = ("Tom", "Ana", "Sam", "Mia", "Ben", "Eva")
ITEMS = ("apples", "books", "coins", "pens", "cards", "shells")

# Question sentences per operation: {name}, {k}, {item}. Steps after the first
# may start with "Then ". The parser below recognises exactly these.
STEP_TEMPLATES: dict[str, tuple[str, ...]] = {
    "+": ("{name} gets {k} more {item}.", "{name} finds {k} more {item}."),
    "-": ("{name} gives away {k} {item}.", "{name} loses {k} {item}."),
    "*": ("{name} ends up with {k} times as many {item}.",),
}
_START_RE = re.compile(r"^(\w+) has (\d+) (\w+)\.$")
_STEP_RES: dict[str, re.Pattern[str]] = {
    "+": re.compile(r"^(?:Then )?\w+ (?:gets|finds) (\d+) more \w+\.$"),
    "-": re.compile(r"^(?:Then )?\w+ (?:gives away|loses) (\d+) \w+\.$"),
    "*": re.compile(r"^(?:Then )?\w+ ends up with (\d+) times as many \w+\.$"),
}
_QUESTION_RE = re.compile(r"^How many (\w+) does (\w+) have now\?$")

#: A load-bearing step line of a trace: ``a op b = c``, optionally after the step it computes and a colon
#: (``Tom gets 3 more: 5 + 3 = 8``), and nothing else.
EQUATION_RE = re.compile(r"^(?:[A-Za-z][^:=\d]*\d+[^:=\d]*: )?(-?\d+) ([+*-]) (\d+) = (-?\d+)$")

_OP_WORDS = {"+": "plus", "-": "minus", "*": "times"}
_OP_ACTIONS = {  # the step a line computes, as the question states it: the pointer a student copies
    "+": "{name} gets {k} more",
    "-": "{name} gives away {k}",
    "*": "{name} ends up with {k} times as many",
}
_OPENERS = (
    "Okay, let me read the problem carefully.",
    "Alright, let me think about this step by step.",
    "Let me work through this problem slowly.",
)
_RESTATEMENTS = (
    "So {name} starts with {start} {item}.",
    "{name} starts with {start} {item}.",
)
_VERIFY = (
    "Wait, let me double check every step before I answer.",
    "Hmm, let me verify that by going through it again.",
    "Before I answer, let me check each step once more.",
)
_HEDGES = (
    "Hmm, I think that is right, but let me keep going.",
    "I should be careful not to mix up the numbers.",
    "Okay, that seems fine so far.",
    "Wait, let me make sure I read that part right. Yes, I did.",
)
_CHECKS = (
    "Let me double check: {a} {word} {k} makes {r}. Yes, that is right.",
    "Let me double check that: {a} {word} {k} is {r}. Good.",
)
_CLOSERS = (
    "Wait, did I miss anything? No, those were all the changes.",
    "Let me reread the question to be sure. Yes, it asks for the number at the end.",
)


class ToyError(ValueError):
    """A toy question that cannot be parsed, or knobs that cannot fill a split."""


@dataclass(frozen=True)
class Problem:
    """The arithmetic behind one toy question."""

    name: str
    item: str
    start: int
    steps: tuple[tuple[str, int], ...]  # (operation, operand) in order

    @property
    def key(self) -> tuple[int, tuple[tuple[str, int], ...]]:
        """The arithmetic alone; train and test never share a key."""
        return (self.start, self.steps)

    def values(self) -> list[int]:
        """The running value after the start and after every step."""
        out = [self.start]
        for op, k in self.steps:
            out.append(apply(op, out[-1], k))
        return out

    @property
    def answer(self) -> int:
        return self.values()[-1]


def apply(op: str, a: int, k: int) -> int:
    """``a op k`` for the toy's operations."""
    if op == "+":
        return a + k
    if op == "-":
        return a - k
    if op == "*":
        return a * k
    raise ToyError(f"unknown operation {op!r}")


def equation(a: int, op: str, k: int, result: int, step: str = "") -> str:
    """A step line as the teacher and :func:`solution_steps` write it: ``Tom gets 3 more: 5 + 3 = 8``
    (``step`` names what the line computes, as the question says it), or ``5 + 3 = 8`` without ``step``."""
    return f"{step}: {a} {op} {k} = {result}" if step else f"{a} {op} {k} = {result}"


def step_label(problem: Problem, op: str, k: int) -> str:
    """What a step line computes, in the question's words: ``Tom gets 3 more``."""
    return _OP_ACTIONS[op].format(name=problem.name, k=k)


def is_equation_line(line: str) -> bool:
    """True for a load-bearing equation line (``a op b = c`` alone on the line)."""
    return EQUATION_RE.match(line.strip()) is not None


def equation_is_correct(line: str) -> bool:
    """True if an equation line's arithmetic holds (``5 + 3 = 8``), False if it is a slip."""
    m = EQUATION_RE.match(line.strip())
    if m is None:
        raise ToyError(f"not an equation line: {line!r}")
    a, op, k, r = int(m[1]), m[2], int(m[3]), int(m[4])
    return apply(op, a, k) == r


def question_text(problem: Problem, rng: random.Random) -> str:
    """The templated wording of ``problem``; ``rng`` picks among equivalent phrasings."""
    sentences = [f"{problem.name} has {problem.start} {problem.item}."]
    for i, (op, k) in enumerate(problem.steps):
        sentence = rng.choice(STEP_TEMPLATES[op]).format(name=problem.name, k=k, item=problem.item)
        if i > 0 and rng.random() < 0.5:
            sentence = "Then " + sentence
        sentences.append(sentence)
    sentences.append(f"How many {problem.item} does {problem.name} have now?")
    return " ".join(sentences)


def parse_question(question: str, row_id: str = "<question>") -> Problem:
    """Recover the :class:`Problem` behind a toy question; a foreign text is a :class:`ToyError`."""
    sentences = re.split(r"(?<=[.?])\s+", question.strip())
    if len(sentences) < 3:
        raise ToyError(f"row {row_id!r}: not a toy question: {question!r}")
    start = _START_RE.match(sentences[0])
    ask = _QUESTION_RE.match(sentences[-1])
    if start is None or ask is None:
        raise ToyError(f"row {row_id!r}: not a toy question: {question!r}")
    steps = []
    for sentence in sentences[1:-1]:
        for op, pattern in _STEP_RES.items():
            m = pattern.match(sentence)
            if m:
                steps.append((op, int(m[1])))
                break
        else:
            raise ToyError(f"row {row_id!r}: unknown toy sentence {sentence!r}")
    return Problem(name=start[1], item=start[3], start=int(start[2]), steps=tuple(steps))


def solution_steps(row: dict[str, Any]) -> list[str]:
    """The true minimal solution of a toy row: one step line per step, e.g.
    ``['Tom gets 3 more: 5 + 3 = 8', 'Tom gives away 2: 8 - 2 = 6']``."""
    problem = parse_question(row["question"], row.get("id", "<row>"))
    return _work(problem, problem.values())


def _work(problem: Problem, values: list[int], work_in_words: bool = False) -> list[str]:
    """The step lines of ``problem`` with the running ``values`` (start, then after each step, as the writer has
    them). With ``work_in_words`` a step that crosses a ten is three lines: its label and numbers followed by
    :data:`CROSSES`, the words (:func:`_in_words`), and the bare step line. The choice to work in words is then made
    right after the two numbers it depends on, and the label is written once (written twice, it made the students
    lose count of the steps: benchmarks/README.md)."""
    lines = []
    for (op, k), a, r in zip(problem.steps, values, values[1:]):
        label = step_label(problem, op, k)
        if work_in_words and crosses_ten(a, op, k):
            lines += [f"{label}: {a} {op} {k} {CROSSES}", _in_words(a, op, k, r), equation(a, op, k, r)]
        else:
            lines.append(equation(a, op, k, r, label))
    return lines


def _conclusion(problem: Problem, value: int) -> str:
    return f"So the final number of {problem.item} is {value}."


CONCLUSION_RE = re.compile(r"So the final number of \w+ is (\d+)\.")  # reads back what _conclusion writes


def concise_solution(row: dict[str, Any], work_in_words: bool = False) -> str:
    """The toy teacher's concise rewrite of a trajectory for ``row``: the start, its step lines, each crossing of
    a ten worked in words first when the trajectory works that way (``work_in_words``), and the conclusion.

    What Mixed-Policy Distillation's teacher does to a student's trajectory, for the toy world: the
    filler and the re-checks go, the student's way of working (the start it reads off the question, its
    words) stays, every value is right.
    """
    problem = parse_question(row["question"], row.get("id", "<row>"))
    return "\n".join([f"{problem.name} starts with {problem.start} {problem.item}.",
                      *_work(problem, problem.values(), work_in_words), _conclusion(problem, problem.answer)])


def _random_problem(rng: random.Random, params: ToyParams) -> Problem | None:
    """One random problem within the knobs, or None when the drawn path dead-ends."""
    value = rng.randint(1, params.max_start)
    start = value
    steps = []
    for _ in range(rng.randint(params.min_steps, params.max_steps)):
        feasible = [
            op
            for op in params.ops
            if op == "+" or (op == "-" and value >= 1) or (op == "*" and params.max_operand >= 2)
        ]
        if not feasible:
            return None
        op = rng.choice(feasible)
        if op == "+":
            k = rng.randint(1, params.max_operand)
        elif op == "-":
            k = rng.randint(1, min(params.max_operand, value))  # never below zero
        else:
            k = rng.randint(2, params.max_operand)
        value = apply(op, value, k)
        steps.append((op, k))
    return Problem(name=rng.choice(NAMES), item=rng.choice(ITEMS), start=start, steps=tuple(steps))


def _problems(params: ToyParams, split: str, n: int, exclude: set) -> list[tuple[Problem, str]]:
    """``n`` distinct problems (and their wording) whose keys are not in ``exclude``."""
    rng = random.Random(f"cdlib.toy/{params.seed}/{split}")
    seen = set(exclude)
    out: list[tuple[Problem, str]] = []
    attempts, max_attempts = 0, 100 * n + 10_000
    while len(out) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ToyError(
                f"toy {split} split: found only {len(out)} of {n} distinct problems with "
                f"max_start={params.max_start}, max_operand={params.max_operand}, "
                f"steps {params.min_steps}..{params.max_steps}, ops={params.ops}; "
                "widen these knobs or lower n_train/n_test"
            )
        problem = _random_problem(rng, params)
        if problem is None or problem.key in seen:
            continue
        seen.add(problem.key)
        out.append((problem, question_text(problem, rng)))
    return out


def _pretrain_problems(params: ToyParams, exclude: set) -> list[tuple[Problem, str]]:
    """The base model's corpus: every arithmetic fact a trace can need, then two-step problems.

    Every one-step problem from 1 to the largest running value of the world
    (``max_start + max_steps x max_operand``), ``pretrain_fact_repeats`` times each (a new wording
    each time), then ``n_pretrain`` problems of two to ``pretrain_max_steps`` steps starting anywhere
    up to twice ``max_start``: a base that has seen two-step solutions but not three-step ones
    solves some of the world's problems, not most.
    """
    rng = random.Random(f"cdlib.toy/{params.seed}/pretrain-facts")
    top = params.max_start + params.max_steps * params.max_operand
    facts = []
    for _ in range(params.pretrain_fact_repeats):
        for start in range(1, top + 1):
            for op in params.ops:
                for k in range(2 if op == "*" else 1, params.max_operand + 1):
                    if (op == "-" and k > start) or (op == "*" and start * k > 10 * top):
                        continue
                    problem = Problem(name=rng.choice(NAMES), item=rng.choice(ITEMS), start=start, steps=((op, k),))
                    if problem.key not in exclude:
                        facts.append((problem, question_text(problem, rng)))
    shorter = params.model_copy(update={"min_steps": min(2, params.pretrain_max_steps),
                                        "max_steps": params.pretrain_max_steps, "max_start": 2 * params.max_start})
    rest = _problems(shorter, "pretrain", params.n_pretrain, exclude | {p.key for p, _ in facts})
    return facts + rest


def _row(problem: Problem, text: str, source_split: str, index: int) -> dict[str, Any]:
    return {
        "id": f"{DATASET}/{source_split}/{index}",
        "dataset": DATASET,
        "domain": DOMAIN,
        "group": GROUP,
        "split": "eval" if source_split == "test" else "train",
        "question": text,
        "choices": None,
        "gold": str(problem.answer),
        "answer_type": "numeric",
    }


def generate(params: ToyParams | None = None, split: str = "train") -> list[dict[str, Any]]:
    """The toy questions of one split ("train", "test" or "pretrain") as schema rows, deterministic in ``params``.

    Ids are ``toy/<split>/<index>``; the row's ``split`` is its role, "train"
    or "eval" (the test split is the eval split). Train problems never repeat
    the arithmetic of a test problem. The ``pretrain`` split (the base model's
    corpus, :func:`_pretrain_problems`: one-step facts, then problems of two to
    ``pretrain_max_steps`` steps) repeats neither a test nor a train problem.
    """
    params = params or ToyParams()
    if split not in ("train", "test", "pretrain"):
        raise ToyError(f"toy split must be 'train', 'test' or 'pretrain', not {split!r}")
    test = _problems(params, "test", params.n_test, exclude=set())
    if split == "test":
        chosen = test
    else:
        chosen = _problems(params, "train", params.n_train, exclude={p.key for p, _ in test})
    if split == "pretrain":
        chosen = _pretrain_problems(params, exclude={p.key for p, _ in test + chosen})
    return [_row(problem, text, split, i) for i, (problem, text) in enumerate(chosen)]


def crosses_ten(a: int, op: str, k: int) -> bool:
    """True when ``a op k`` carries or borrows across a ten (``8 + 7``, ``23 - 5``): a step worked in words."""
    if op == "+":
        return a % 10 + k >= 10
    if op == "-":
        return a >= 10 and 0 < a % 10 < k
    return False


#: What follows a step's numbers when it crosses a ten and is worked in words (``Tom gets 7 more: 8 + 7 crosses a
#: ten.``): the choice to work in words is made right after the two numbers it depends on.
CROSSES = "crosses a ten."

#: What opens a step worked out in words (:func:`_in_words`); :func:`works_in_words` looks for it.
IN_WORDS = "Let me think:"


def works_in_words(reasoning: str | None) -> bool:
    """True when a trajectory works at least one step out in words, as the teacher works a crossing of a ten."""
    return IN_WORDS in (reasoning or "")


def _in_words(a: int, op: str, k: int, result: int) -> str:
    """Make-ten in words, the way the teacher works a step that crosses a ten before writing it:
    ``Let me think: 8 and 2 make 10, and 5 more make 15.`` (``result`` as the teacher has it)."""
    if op == "+":
        c = 10 - a % 10
        rest = f", and {k - c} more make {result}" if k > c else ""
        return f"{IN_WORDS} {a} and {c} make {a + c}{rest}."
    c = a % 10
    return f"{IN_WORDS} {a} take away {c} leaves {a - c}, and {k - c} more leaves {result}."


def _slipped(rng: random.Random, true: int) -> int:
    """A wrong result near ``true`` (off by one or two), never negative unless ``true`` is."""
    delta = rng.choice((-2, -1, 1, 2))
    wrong = true + delta
    return wrong if wrong >= 0 or true < 0 else true + abs(delta)


def teacher_response(row: dict[str, Any], rng: random.Random, temperature: float, slip_rate: float,
                     work_in_words: bool = False) -> str:
    """The scripted toy teacher's full response to a toy row.

    A ``<think>...</think>`` trace: the work (one step line per step), the answer, the re-checks,
    then ``The answer is \\boxed{N}.``. Each step slips (a wrong result, carried
    on to the end) with probability ``min(1, slip_rate * temperature)``, so there
    are no slips at temperature 0. The text is a function of the row and the
    ``rng`` state; at temperature 0 it is a function of the row alone (greedy
    decoding), whatever ``rng`` is passed.
    """
    problem = parse_question(row["question"], row.get("id", "<row>"))
    if temperature <= 0:
        rng = random.Random(f"cdlib.toy.greedy/{row.get('id')}/{row['question']}")
    p_slip = min(1.0, slip_rate * temperature) if temperature > 0 else 0.0
    name, item = problem.name, problem.item

    lines = [rng.choice(_OPENERS), rng.choice(_RESTATEMENTS).format(name=name, start=problem.start, item=item)]
    values = [problem.start]  # as the teacher has them: a slip carries on
    for op, k in problem.steps:
        result = apply(op, values[-1], k)
        values.append(_slipped(rng, result) if rng.random() < p_slip else result)
    value = values[-1]
    # the work: one line per step, the step it computes before the colon
    lines += [*_work(problem, values, work_in_words), _conclusion(problem, value)]
    # the overthinking after the answer is found: every step re-checked in words, then backwards
    lines.append(rng.choice(_VERIFY))
    for (op, k), a, r in zip(problem.steps, values, values[1:]):
        lines.append(rng.choice(_CHECKS).format(a=a, word=_OP_WORDS[op], k=k, r=r))
        if rng.random() < 0.3:
            lines.append(rng.choice(_HEDGES))
    lines.append(f"Going backwards from {value}: " + ", ".join(
        f"undoing {_OP_WORDS[op]} {k} gives {a}" for (op, k), a in zip(reversed(problem.steps), reversed(values[:-1])))
        + f", and {name} started with {problem.start}.")
    lines += rng.sample(_CLOSERS, len(_CLOSERS))
    lines.append(_conclusion(problem, value))
    return "<think>\n" + "\n".join(lines) + "\n</think>\n\n" + f"The answer is \\boxed{{{value}}}."


def base_response(row: dict[str, Any], work_in_words: bool = False) -> str:
    """What the demo's pretraining corpus says after a toy question: a worked solution, with no slip.

    A one-step question (an arithmetic fact) is answered by its step line alone, as drills are
    (dense facts: a tiny model learns its sums only from them), except, with ``work_in_words``, a
    fact that crosses a ten, which is worked in the world's reasoning style like every longer
    problem (:func:`teacher_response` at temperature 0, never slipping): the base then knows by
    heart only the facts that cross no ten. Corpora measured on the way: benchmarks/README.md,
    "The demo's base".
    """
    problem = parse_question(row["question"], row.get("id", "<row>"))
    if len(problem.steps) == 1 and not (work_in_words and crosses_ten(problem.start, *problem.steps[0])):
        r = problem.answer
        return ("<think>\n" + "\n".join([*_work(problem, problem.values()), _conclusion(problem, r)])
                + f"\n</think>\n\nThe answer is \\boxed{{{r}}}.")
    return teacher_response(row, random.Random(0), temperature=0.0, slip_rate=0.0, work_in_words=work_in_words)
