"""Benchmark: extract and verify the paper's 283k generated responses on one core.

The mix follows the paper's Table 4 (Appendix A): per-dataset counts of correct
traces and mean reasoning length in characters, for the Qwen3.5-397B teacher
(``<think>`` responses) or the gpt-oss-120B teacher (harmony channels). Answer
types come from Table 1 (GSM8k/MultiArith/SVAMP numeric, the rest letter).
Table 4 has no LaTeX dataset; a small MATH-style LaTeX slice (``--latex-share``)
is added so the math-verify path is part of the measurement.

Responses are synthetic but shaped like real ones: reasoning cut from a seeded
corpus of arithmetic sentences (numbers, option letters, "####" and bold
recitals inside the reasoning), then a final answer in one of the formats the
cascade handles. A share is wrong or truncated on purpose; the benchmark checks
every verdict against the expected one and reports disagreements.

Generation is seeded, done in chunks, and not timed. Only
``extract_with_rule`` + ``verify`` are timed, in this single process.

    .venv/bin/python benchmarks/bench_answers.py            # the full 283,000
    .venv/bin/python benchmarks/bench_answers.py --n 20000 --teacher gpt-oss
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter

from cdlib.answers import extract_with_rule, verify

# Table 4, Qwen3.5-397B-A17B: dataset -> (correct traces, mean reasoning chars).
TABLE4_QWEN = {
    "AQUA-RAT": (87_441, 7_583),
    "GSM8k": (7_186, 4_688),
    "MultiArith": (416, 1_750),
    "SVAMP": (960, 2_926),
    "ARC-Challenge": (1_079, 4_264),
    "GPQA Diamond": (135, 18_734),
    "CommonsenseQA": (8_593, 6_418),
    "MedExpQA": (395, 11_541),
    "MedMCQA": (167_277, 6_801),
    "MedQA": (9_778, 10_806),
    "MMLU-Medical": (33, 9_876),
    "MMLU-STEM": (42, 9_347),
}
# Table 4, gpt-oss-120B.
TABLE4_GPT_OSS = {
    "AQUA-RAT": (89_796, 3_360),
    "GSM8k": (7_268, 1_878),
    "MultiArith": (413, 716),
    "SVAMP": (967, 1_368),
    "ARC-Challenge": (1_079, 1_554),
    "GPQA Diamond": (152, 13_407),
    "CommonsenseQA": (8_434, 4_292),
    "MedExpQA": (395, 5_321),
    "MedMCQA": (163_480, 4_043),
    "MedQA": (9_850, 4_537),
    "MMLU-Medical": (33, 3_286),
    "MMLU-STEM": (44, 4_031),
}
# Table 1 answer types and the number of options of the letter datasets.
ANSWER_TYPE = {
    "GSM8k": ("numeric", 0),
    "MultiArith": ("numeric", 0),
    "SVAMP": ("numeric", 0),
    "AQUA-RAT": ("letter", 5),
    "ARC-Challenge": ("letter", 4),
    "GPQA Diamond": ("letter", 4),
    "CommonsenseQA": ("letter", 5),
    "MedExpQA": ("letter", 4),
    "MedMCQA": ("letter", 4),
    "MedQA": ("letter", 4),
    "MMLU-Medical": ("letter", 4),
    "MMLU-STEM": ("letter", 4),
}
LATEX_DATASET = ("MATH-style (added, not in Table 4)", 3_000)

WORDS = (
    "pressure volume patient dose enzyme artery kidney ratio speed train price profit "
    "cells membrane protein nerve liver acid base heart lung infection fever therapy "
    "angle circle triangle area length distance hours minutes apples books marbles"
).split()

# (gold latex, equivalent prediction spelling) pairs for the LaTeX slice.
LATEX_PAIRS = (
    ("\\frac{1}{2}", "0.5"),
    ("\\frac{3}{4}", "\\dfrac{3}{4}"),
    ("2\\sqrt{3}", "\\sqrt{12}"),
    ("[0, 1)", "[0,1)"),
    ("\\frac{\\pi}{4}", "\\frac{\\pi}{4}"),
    ("x^2 + 1", "1 + x^2"),
    ("\\sqrt{2}", "\\sqrt{2}"),
    ("(2, 5]", "(2,5]"),
    ("\\frac{5}{6}", "\\frac{10}{12}"),
    ("3\\pi", "3\\pi"),
)


def build_corpus(rng: random.Random, size: int = 2_000_000) -> str:
    """Seeded reasoning-like text with many numbers and distractors."""
    templates = (
        "So {a} + {b} = {c}. ",
        "Let me double-check: {a} times {b} is {p}. ",
        "Wait, maybe the {w} is {a} rather than {b}. ",
        "Option {L} mentions the {w}, which does not fit. ",
        "Hmm, so the {w} would be {a}/{b} of the total. ",
        "Consider the {w} and the {v}; they differ by {d}. ",
        "An example: #### {a} was the answer to a similar problem. ",
        "Note **{w}** matters here, about {a}% of cases. ",
        "I think the answer is {b}, but let me verify again.\n",
        "Therefore the {w} costs ${a},{t:03d}.\n",
    )
    parts: list[str] = []
    total = 0
    while total < size:
        a, b = rng.randint(1, 999), rng.randint(1, 99)
        s = rng.choice(templates).format(
            a=a, b=b, c=a + b, p=a * b, d=abs(a - b), t=rng.randint(0, 999),
            w=rng.choice(WORDS), v=rng.choice(WORDS), L=rng.choice("ABCDE"),
        )
        parts.append(s)
        total += len(s)
    return "".join(parts)


def scaled_counts(table: dict[str, tuple[int, int]], n: int, latex_share: float) -> dict[str, int]:
    """Table 4 counts scaled to ``n`` responses (largest remainder), plus the LaTeX slice."""
    n_latex = round(n * latex_share)
    rest = n - n_latex
    total = sum(count for count, _ in table.values())
    exact = {name: rest * count / total for name, (count, _) in table.items()}
    counts = {name: int(x) for name, x in exact.items()}
    for name in sorted(exact, key=lambda k: exact[k] - counts[k], reverse=True)[: rest - sum(counts.values())]:
        counts[name] += 1
    counts[LATEX_DATASET[0]] = n_latex
    return counts


def numeric_answer(rng: random.Random, value: int | float) -> tuple[str, str]:
    """A final answer stating ``value`` in one of the formats models use; also the spelled value."""
    if isinstance(value, float):
        spelled = f"{value:.2f}"
    elif value >= 1000 and rng.random() < 0.5:
        spelled = f"{value:,}"
    else:
        spelled = str(value)
    form = rng.randrange(9)
    if form == 0:
        text = f"The total is computed above.\n\n\\boxed{{{spelled}}}"
    elif form == 1:
        text = f"She has {spelled} left.\n#### {spelled}"
    elif form == 2:
        text = f"Adding everything, the final answer is ${spelled}."
    elif form == 3:
        text = f"**Answer:** {spelled} dollars"
    elif form == 4:
        text = f"So Tom needs **{spelled}** minutes in total."
    elif form == 5:
        text = f"After 3 steps the result is {spelled}."
    elif form == 6:
        text = f"**Final Answer**\n\\[\n\\boxed{{{spelled}}}\n\\]"
    elif form == 7:  # LaTeX thousands separator
        text = f"So the total is $\\boxed{{{spelled.replace(',', '{,}')}}}$."
    else:  # a boxed subtotal, then the statement that overrides it
        text = f"The subtotal is \\boxed{{3}}. Adding the rest, the final answer is ${spelled}$."
    return text, spelled


def letter_answer(rng: random.Random, letter: str, option: str) -> str:
    form = rng.randrange(7)
    if form == 0:
        return f"The best match is option {letter}.\n\n\\boxed{{{letter}}}"
    if form == 1:
        return f"The answer is ({letter}) {option}."
    if form == 2:
        return f"**Answer: {letter}) {option}**"
    if form == 3:
        return f"Answer: {letter}"
    if form == 4:
        return f"The correct answer is **{letter}**. The other options do not fit."
    if form == 5:
        return f"\\boxed{{\\text{{({letter})}}}}"
    return f"It is most consistent with {option}."


def make_chunk(rng: random.Random, corpus: str, plan: list[tuple[str, int]], teacher: str):
    """Build responses for ``plan`` = [(dataset, mean reasoning chars)]; returns
    [(response, gold, answer_type, choices, expected verdict)]."""
    out = []
    span = len(corpus)
    for dataset, mean_chars in plan:
        length = int(mean_chars * (0.4 + 1.2 * rng.random()))
        start = rng.randrange(0, span - length)
        reasoning = corpus[start:start + length]
        roll = rng.random()
        truncated, wrong = roll < 0.01, 0.01 <= roll < 0.06
        choices = None
        if dataset == LATEX_DATASET[0]:
            answer_type = "latex"
            gold, pred = rng.choice(LATEX_PAIRS)
            if wrong:
                pred = "\\frac{7}{9}"
            final = rng.choice((f"Therefore the answer is ${pred}$.", f"\\boxed{{{pred}}}"))
        elif ANSWER_TYPE[dataset][0] == "numeric":
            answer_type = "numeric"
            value = rng.choice((rng.randint(1, 500), rng.randint(1000, 99_999), rng.randint(1, 999) + 0.5))
            gold = str(value)
            final, _ = numeric_answer(rng, value + 7 if wrong else value)
        else:
            answer_type = "letter"
            n_options = ANSWER_TYPE[dataset][1]
            choices = [" ".join(rng.sample(WORDS, 3)) + f" {i}" for i in range(n_options)]
            index = rng.randrange(n_options)
            gold = "ABCDE"[index]
            shown = (index + 1) % n_options if wrong else index
            final = letter_answer(rng, "ABCDE"[shown], choices[shown])
        if teacher == "gpt-oss":
            head = "<|channel|>analysis<|message|>" + reasoning
            tail = "<|end|><|start|>assistant<|channel|>final<|message|>" + final + "<|return|>"
            response = head if truncated else head + tail
        else:
            response = "<think>\n" + reasoning + ("" if truncated else "\n</think>\n\n" + final)
        out.append((response, gold, answer_type, choices, not (truncated or wrong)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=283_000, help="number of responses (default: the paper's 283,000)")
    parser.add_argument("--teacher", choices=("qwen", "gpt-oss"), default="qwen",
                        help="Table 4 block and response format")
    parser.add_argument("--latex-share", type=float, default=0.005, help="share of added LaTeX (MATH-style) responses")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk", type=int, default=10_000, help="responses generated (untimed) per batch")
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    table = TABLE4_QWEN if args.teacher == "qwen" else TABLE4_GPT_OSS
    means = {name: chars for name, (_, chars) in table.items()}
    means[LATEX_DATASET[0]] = LATEX_DATASET[1]
    counts = scaled_counts(table, args.n, args.latex_share)
    plan = [(name, means[name]) for name, count in counts.items() for _ in range(count)]
    rng.shuffle(plan)

    t0 = time.perf_counter()
    corpus = build_corpus(rng)
    gen_seconds = time.perf_counter() - t0

    wall = cpu = 0.0
    chars = 0
    rules: Counter[str] = Counter()
    by_type: Counter[str] = Counter()
    disagreements = []
    n_disagree = correct = 0
    for begin in range(0, len(plan), args.chunk):
        t0 = time.perf_counter()
        chunk = make_chunk(rng, corpus, plan[begin:begin + args.chunk], args.teacher)
        gen_seconds += time.perf_counter() - t0
        chars += sum(len(item[0]) for item in chunk)
        verdicts = []
        c0, w0 = time.process_time(), time.perf_counter()
        for response, gold, answer_type, choices, _ in chunk:
            value, rule = extract_with_rule(response, answer_type, choices)
            verdicts.append((value, rule, verify(value, gold, answer_type)))
        wall += time.perf_counter() - w0
        cpu += time.process_time() - c0
        for (response, gold, answer_type, _, expected), (value, rule, ok) in zip(chunk, verdicts):
            rules[rule] += 1
            by_type[answer_type] += 1
            correct += ok
            n_disagree += ok != expected
            if ok != expected and len(disagreements) < 10:
                disagreements.append((answer_type, gold, value, rule, response[-160:]))
    n = len(plan)
    print(f"teacher={args.teacher} responses={n:,} chars={chars / 1e6:,.0f}M seed={args.seed}")
    print("mix: " + ", ".join(f"{name}={count:,}" for name, count in counts.items()))
    print("types: " + ", ".join(f"{k}={v:,}" for k, v in sorted(by_type.items())))
    print("rules: " + ", ".join(f"{k}={v:,}" for k, v in rules.most_common()))
    print(f"scored correct: {correct:,} ({correct / n:.1%}); disagreements with the expected verdict: {n_disagree:,}")
    for item in disagreements:
        print("  DISAGREE", item)
    print(f"generation (untimed): {gen_seconds:.1f} s")
    print(f"extract+verify: total {wall:.2f} s wall, {cpu:.2f} s CPU (this process, one core)")
    print(f"throughput: {n / wall:,.0f} responses/s per core (wall), {n / cpu:,.0f} per CPU-second")
    return 1 if disagreements else 0


if __name__ == "__main__":
    sys.exit(main())
