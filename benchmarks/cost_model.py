"""Project the paper grid's H100-hours per stage for this implementation beside the paper's 705 (issue 18, item 5).

    .venv/bin/python benchmarks/cost_model.py

Tokens come from the paper's tables, throughput from the paper's own measured runs (training, the Qwen teacher's
generation and compression) or from the stated vLLM figures in cdlib.cost; see cdlib/cost.py for every assumption.
Prints markdown tables: training calibration, levers, stages (defaults and with compute-matched budgets), totals.
"""

from __future__ import annotations

from cdlib import cost


def _row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main() -> None:
    print("Training calibration (Table 11; k*N*D model FLOPs, H100 dense BF16 989 TFLOP/s):\n")
    print(_row("student", "method", "trainable tokens", "GPU-h", "tokens/GPU-s", "MFU"))
    print(_row(*["---"] * 6))
    for r in cost.training_calibration().iter_rows(named=True):
        print(_row(r["student"], r["method"], f"{r['train_tokens'] / 1e9:.2f}B", f"{r['gpu_s'] / 3600:.1f}",
                   f"{r['tokens_per_gpu_s']:,.0f}", f"{r['mfu']:.0%}"))

    print("\nLevers (factor on the stage's GPU-hours against the paper's own setup):\n")
    print(_row("lever", "stage", "factor vs paper", "default here", "where the value comes from"))
    print(_row(*["---"] * 5))
    for name, lv in cost.levers().items():
        factor = "per run (below)" if name == "token_budget" else f"{lv.factor:.3f}"
        print(_row(name, lv.stage, factor, "yes" if lv.default else "no", lv.source))

    default = cost.stages()
    with_budget = cost.stages(apply=tuple(n for n, lv in cost.levers().items() if lv.default) + ("token_budget",))
    print("\nStages (H100-hours; 'in 705' marks what the paper's total counts):\n")
    print(_row("stage", "in 705", "tokens", "tokens/GPU-s", "paper", "projected (defaults)", "+ token_budget"))
    print(_row(*["---"] * 7))
    for a, b in zip(default.iter_rows(named=True), with_budget.iter_rows(named=True)):
        paper_h = "-" if a["paper_h"] is None else f"{a['paper_h']:.1f}"
        print(_row(a["stage"], "yes" if a["in_paper_scope"] else "no", f"{a['tokens'] / 1e6:,.0f}M",
                   f"{a['tokens_per_gpu_s']:,.0f}", paper_h, f"{a['projected_h']:.1f}", f"{b['projected_h']:.1f}"))
    for label, df in (("defaults", default), ("+ token_budget", with_budget)):
        s = cost.summary(df)
        verdict = "meets" if s["projected_h"] <= s["goal_h"] else "misses"
        print(f"\n{label}: paper scope {s['projected_h']:.0f} H100-h vs the paper's {s['paper_h']:.0f} "
              f"({s['ratio']:.2f}x; goal <= {s['goal_h']:.0f}, {verdict}); whole grid incl. gpt-oss teacher, "
              f"evaluation, judge: {s['full_grid_h']:.0f} H100-h")


if __name__ == "__main__":
    main()
