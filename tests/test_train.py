"""Student training: data loading, run planning, KL losses, and real training runs on tiny models.

The runs train tiny Qwen2 models on the toy world's traces for real (CPU, a few
seconds to a minute each): the notebook trains a student from scratch and its loss
falls, a LoRA run is saved and merged, the KL objective decreases against a teacher
sharing the tokenizer, and two processes over gloo train the same model a single
process trains with the same global batch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cdlib import outputs
from cdlib.training import data as train_data, losses, sft
from cdlib import train as T
from cdlib.params import GenerateParams, ToyParams, TrainParams
from cdlib.store import Store

REPO = Path(__file__).resolve().parents[1]
QUICK = dict(seq_len=1024, gradient_checkpointing=False, log_every=1, tiny_layers=1)


@pytest.fixture(scope="module")
def toy_traces(tmp_path_factory) -> Path:
    """A generate cell of the toy world: 150 verified teacher traces."""
    import cdlib.generate

    out = tmp_path_factory.mktemp("gen") / "generate"
    cdlib.generate.run(GenerateParams(out_dir=str(out), toy=ToyParams(n_train=150)))
    return out


def _curve(out_dir: Path) -> list[dict]:
    return sorted(Store(out_dir / "loss.jsonl").read(), key=lambda r: r["step"])


# --------------------------------------------------------------------------- data and plan


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Store(path).append(rows)


def test_load_records_detects_the_file_and_skips_flagged(tmp_path):
    rows = [{"id": f"q{i}", "question": "1+1?", "gold": "2", "answer_type": "numeric", "reasoning": "1+1=2",
             "answer": "\\boxed{2}", "flag": "answer_dropped" if i == 1 else None} for i in range(4)]
    _write(tmp_path / "c" / "compressed.jsonl", rows)
    recs, info = train_data.load_records(tmp_path / "c", source="llama70b")
    assert [r["id"] for r in recs] == ["q0", "q2", "q3"]
    assert info["n_read"] == 4 and info["n_flagged"] == 1 and info["flags"] == {"answer_dropped": 1}
    assert info["file"].endswith("compressed.jsonl")
    with pytest.raises(T.TrainError, match="source 'raw' expects traces.jsonl"):
        train_data.load_records(tmp_path / "c", source="raw")
    assert len(train_data.load_records(tmp_path / "c", source="answer_only", limit=2)[0]) == 2
    _write(tmp_path / "c" / "truncated.jsonl", rows)
    with pytest.raises(T.TrainError, match="several record files"):
        train_data.load_records(tmp_path / "c")
    with pytest.raises(T.TrainError, match="none of"):
        train_data.load_records(tmp_path / "empty")


def _fake_examples(lengths: list[int]) -> list[dict]:
    return [{"id": str(i), "input_ids": [1] * n, "labels": [-100] + [1] * (n - 1)} for i, n in enumerate(lengths)]


def test_plan_epochs_steps_and_token_budget():
    ex = _fake_examples([30, 50, 20, 70, 40, 10])  # 6 examples, 214 supervised tokens
    base = dict(out_dir="x", data="x", seq_len=100, micro_batch_size=1)
    one = T.plan(ex, TrainParams(**base))
    assert sorted(i for mb in one for b in mb for i in b) == list(range(6)), "one epoch: every example once"
    two = T.plan(ex, TrainParams(**base, epochs=2))
    assert sorted(i for mb in two for b in mb for i in b) == sorted(list(range(6)) * 2)
    assert len(T.plan(ex, TrainParams(**base, max_steps=5, grad_accum=2), world_size=2)) == 20
    budget = 500  # more than two passes: the data is cycled
    plan = T.plan(ex, TrainParams(**base, token_budget=budget))
    seen = [sum(sft.supervised_count(ex[i]) for b in mb for i in b) for mb in plan]
    assert sum(seen) >= budget > sum(seen[:-1]), "stops at the first micro-batch that reaches the budget"
    assert T.budget_mode(TrainParams(**base, token_budget=budget)) == "tokens"
    # the label metrics.json records and the report prints
    assert T.budget_label(TrainParams(**base, token_budget=12000)) == "compute-matched (12,000 tokens)"
    assert T.budget_label(TrainParams(**base, max_steps=5)) == "max_steps 5"
    assert [T.budget_label(TrainParams(**base, epochs=e)) for e in (1, 2.5)] == ["epoch-based (1 epoch)",
                                                                             "epoch-based (2.5 epochs)"]
    with pytest.raises(T.TrainError, match="either token_budget or max_steps"):
        T.plan(ex, TrainParams(**base, token_budget=10, max_steps=3))


def test_validation_split_is_seeded_and_disjoint():
    ex = _fake_examples([5] * 40)
    tr, va = train_data.split_validation(ex, 0.05, seed=3)
    assert len(va) == 2 and len(tr) == 38 and not {e["id"] for e in tr} & {e["id"] for e in va}
    assert [e["id"] for e in va] == [e["id"] for e in train_data.split_validation(ex, 0.05, seed=3)[1]]
    assert train_data.split_validation(ex, 0.0, seed=3)[1] == []


# --------------------------------------------------------------------------- losses


def test_kl_directions_match_their_definitions():
    torch.manual_seed(0)
    s, t = torch.randn(1, 4, 7), torch.randn(1, 4, 7)
    labels = torch.tensor([[-100, 3, -100, 5]])  # targets at positions 1 and 3 -> logits 0 and 2
    p, q = t[0, [0, 2]].softmax(-1), s[0, [0, 2]].softmax(-1)
    forward = (p * (p.log() - q.log())).sum()
    reverse = (q * (q.log() - p.log())).sum()
    m = (p + q) / 2
    jsd = 0.5 * (p * (p.log() - m.log())).sum() + 0.5 * (q * (q.log() - m.log())).sum()
    for direction, want in [("forward", forward), ("reverse", reverse), ("jsd", jsd)]:
        got, n = losses.kl_sum(s, t, labels, direction)
        assert n == 2 and torch.allclose(got, want, atol=1e-5), direction
    assert float(losses.kl_sum(s, s, labels)[0]) == pytest.approx(0.0, abs=1e-6)
    ce, n = losses.cross_entropy_sum(s, labels)
    want = -(s[0, 0].log_softmax(-1)[3] + s[0, 2].log_softmax(-1)[5])
    assert n == 2 and torch.allclose(ce, want, atol=1e-5)


def test_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    ddp = load_config_from_file(str(REPO / "slurm/accelerate/ddp.yaml"))
    assert ddp.distributed_type == "MULTI_GPU" and ddp.mixed_precision == "bf16"
    fsdp = load_config_from_file(str(REPO / "slurm/accelerate/fsdp2.yaml"))
    assert fsdp.distributed_type == "FSDP"
    assert fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp.fsdp_config["fsdp_activation_checkpointing"] is True
    assert fsdp.fsdp_config["fsdp_reshard_after_forward"] is True
    assert fsdp.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"  # resumable states; the model is gathered


# --------------------------------------------------------------------------- real runs


def test_notebook_trains_a_toy_student_from_scratch(toy_traces, tmp_path):
    """The notebook under papermill: the loss falls, metrics and checkpoint are complete and load."""
    import papermill
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cdlib import notebook as nbtools
    from cdlib.outputs import resolve_model

    out = tmp_path / "train"
    out.mkdir()
    params = dict(out_dir=str(out), data=str(toy_traces), seq_len=1024, max_steps=40, tiny_layers=2,
                  gradient_checkpointing=False, log_every=5, learning_rate=2e-3)
    nb = papermill.execute_notebook(nbtools.read(REPO / "notebooks/04_train.py"), str(out / "train.ipynb"),
                                    parameters=params, kernel_name="python3", cwd=str(REPO), progress_bar=False)
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    text = json.dumps([c.get("outputs", []) for c in nb.cells], ensure_ascii=False)
    assert "mask audit" in text and "⟦" in text, "the audit is shown"
    assert "image/svg+xml" in text, "the loss chart is shown"

    m = json.loads((out / "metrics.json").read_text())
    curve = _curve(out)
    assert [r["step"] for r in curve] == list(range(1, 41)) and m["steps"] == 40
    first, last = sum(r["loss"] for r in curve[:5]) / 5, sum(r["loss"] for r in curve[-5:]) / 5
    assert last < first - 1.0, f"loss did not fall: {first:.2f} -> {last:.2f}"
    assert curve[1]["ema"] == pytest.approx(0.08 * curve[1]["loss"] + 0.92 * curve[0]["loss"])
    assert curve[-1]["tokens"] == m["trainable_tokens"] > 0
    assert math.isfinite(m["val_loss"]) and m["val_loss"] < first
    assert m["budget_mode"] == "steps" and m["optimizer"] == "torch.AdamW" and m["precision"] == "fp32"
    assert m["budget_label"] == "max_steps 40", "metrics.json names the budget as the report prints it"
    assert m["total_tokens_seen"] > m["trainable_tokens"], "prompts are seen but not supervised"
    sec = m["tokens_per_section"]
    assert sec["supervised_prompt"] == 0 and sec["supervised"] == sec["supervised_cot"] + sec["supervised_answer"]
    assert m["gpus"] == 0 and m["gpu_hours"] == 0 and m["peak_memory_gb"] > 0 and m["wall_clock_s"] > 0
    assert m["flops"] > 6 * m["params_total"] * m["total_tokens_seen"] * 0.5 and "6*N*D" in m["flops_formula"]

    target = resolve_model(str(out))
    assert target == {"model": str((out / "model").resolve()), "adapter": None}
    model = AutoModelForCausalLM.from_pretrained(target["model"])
    tok = AutoTokenizer.from_pretrained(target["model"])
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    ckpt = json.loads((out / "checkpoint.json").read_text())
    assert ckpt["chat_format"] == "qwen" and ckpt["source"] == "raw" and ckpt["method"] == "full"
    assert (out / "base" / "config.json").exists(), "the from-scratch base is kept"
    # the saved weights are the trained ones: their validation loss is the one reported
    ids = tok(tok.apply_chat_template([{"role": "user", "content": "Ann has 3 pens."}], tokenize=False,
                                      add_generation_prompt=True) + "<think>\n", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_lora_run_with_token_budget_saves_adapter_and_merged_model(toy_traces, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cdlib.outputs import resolve_model

    out = tmp_path / "lora"
    P = TrainParams(out_dir=str(out), data=str(toy_traces), method="lora", save="merged", lora_rank=8,
                    lora_alpha=16, learning_rate=5e-3, token_budget=6000, limit=60, **QUICK)
    m = T.run(P, progress=False, log=lambda *a: None)
    assert m["budget_mode"] == "tokens" and m["trainable_tokens"] >= 6000
    assert m["budget_label"] == "compute-matched (6,000 tokens)"
    assert m["params_trainable"] < m["params_total"] / 5 and "4*N*D" in m["flops_formula"]
    curve = _curve(out)
    assert curve[-1]["loss"] < curve[0]["loss"]
    target = resolve_model(str(out))
    assert target == {"model": str((out / "model").resolve()), "adapter": None}
    ckpt = outputs.read_checkpoint(out)  # checkpoint.json names paths in the output tree relative to the cell
    assert ckpt["unmerged_adapter"] == str((out / "adapter").resolve())
    ids = torch.tensor([[5, 17, 42, 9, 3, 77]])
    base = AutoModelForCausalLM.from_pretrained(out / "base")
    with torch.no_grad():
        base_logits = base(ids).logits
        peft_logits = PeftModel.from_pretrained(base, str(out / "adapter")).eval()(ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(out / "model")(ids).logits
    assert not torch.allclose(peft_logits, base_logits, atol=1e-4), "the adapter was trained"
    assert torch.allclose(merged_logits, peft_logits, atol=1e-4), "merged model == base + adapter"


def test_kl_objective_decreases_and_mismatched_tokenizers_fail(toy_traces, tmp_path):
    from cdlib.tiny import default_corpus, make_tiny_model

    teacher = make_tiny_model(tmp_path / "teacher", seed=0, num_layers=2)
    student = make_tiny_model(tmp_path / "student", seed=1, num_layers=1)  # same corpus -> same tokenizer
    P = TrainParams(out_dir=str(tmp_path / "kl"), data=str(toy_traces), student=str(student), objective="kl",
                    kl_teacher=str(teacher), max_steps=8, learning_rate=3e-3, warmup_ratio=0, limit=60, **QUICK)
    m = T.run(P, progress=False, log=lambda *a: None)
    curve = _curve(tmp_path / "kl")
    assert curve[-1]["loss"] < 0.6 * curve[0]["loss"], [r["loss"] for r in curve]
    assert all("ce" in r for r in curve) and m["val_kl"] is not None and m["kl_direction"] == "forward"
    assert "2*N_teacher*D" in m["flops_formula"]

    other = make_tiny_model(tmp_path / "other", corpus=default_corpus(50, seed=3), vocab_size=400, num_layers=1)
    bad = P.model_copy(update={"kl_teacher": str(other), "out_dir": str(tmp_path / "bad")})
    with pytest.raises(T.TrainError, match="share a tokenizer") as err:
        T.run(bad, progress=False, log=lambda *a: None)
    assert str(student) in str(err.value) and str(other) in str(err.value)


def test_kl_weight_mixes_divergence_and_cross_entropy(toy_traces, tmp_path):
    """Distilling the Essence's loss (its training.sh: distillation_loss_ratio 0.5): on the first step, where both
    runs hold the same weights and batch, the mixed loss is 0.3 x KL + 0.7 x CE of the pure-KL run."""
    from cdlib.tiny import make_tiny_model

    teacher = make_tiny_model(tmp_path / "teacher", seed=0, num_layers=2)
    student = make_tiny_model(tmp_path / "student", seed=1, num_layers=1)
    P = TrainParams(out_dir=str(tmp_path / "kl"), data=str(toy_traces), student=str(student), objective="kl",
                    kl_teacher=str(teacher), max_steps=2, warmup_ratio=0, limit=20, val_fraction=0, **QUICK)
    T.run(P, progress=False, log=lambda *a: None)
    mixed = P.model_copy(update={"out_dir": str(tmp_path / "mixed"), "kl_weight": 0.3})
    m = T.run(mixed, progress=False, log=lambda *a: None)
    pure, mix = _curve(tmp_path / "kl")[0], _curve(tmp_path / "mixed")[0]
    assert mix["ce"] == pytest.approx(pure["ce"], rel=1e-6)
    assert mix["loss"] == pytest.approx(0.3 * pure["loss"] + 0.7 * pure["ce"], rel=1e-5)
    assert abs(mix["loss"] - pure["loss"]) > 1e-3  # the two terms differ, so the weight is visible
    assert m["kl_weight"] == 0.3 and m["objective"] == "kl"
    # Distilling the Essence's own protocol end to end: half of each whole sequence, loss on all of it, half KD
    dte = P.model_copy(update={"out_dir": str(tmp_path / "dte"), "kl_weight": 0.5, "truncate_ratio": 0.5,
                               "loss_on": ["prompt", "cot", "answer"]})
    m = T.run(dte, progress=False, log=lambda *a: None)
    assert (m["loss_on"], m["kl_weight"], m["kept_fraction"]) == ("prompt+cot+answer", 0.5, 0.5)
    assert 0.45 < m["kept_token_fraction"] <= 0.5 and m["dataset_tokens"]["supervised_prompt"] > 0
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["ce"]) for r in _curve(tmp_path / "dte"))
    with pytest.raises(ValueError, match="kl_weight 0.5 weighs the KL term"):
        TrainParams(out_dir=str(tmp_path / "sft"), data=str(toy_traces), kl_weight=0.5)


def test_two_processes_match_one_process_with_the_same_global_batch(toy_traces, tmp_path):
    """torchrun, 2 CPU ranks over gloo (1 micro-batch each per step) vs 1 rank accumulating 2 micro-batches."""
    from transformers import AutoModelForCausalLM

    common = dict(data=str(toy_traces), max_steps=3, limit=40, seq_len=512, gradient_checkpointing=False,
                  log_every=1, tiny_layers=1, warmup_ratio=0, val_fraction=0.1)
    two = TrainParams(out_dir=str(tmp_path / "two"), grad_accum=1, **common)
    m2 = T.launch(two, num_processes=2, cpu=True, env={"OMP_NUM_THREADS": "1"}, timeout=240)
    assert m2["processes"] == 2 and m2["ranks_finished"] == 2 and m2["distributed_type"] == "MULTI_CPU"
    assert all(math.isfinite(r["loss"]) for r in _curve(tmp_path / "two"))
    AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "model")

    one = TrainParams(out_dir=str(tmp_path / "one"), grad_accum=2, **common)
    m1 = T.run(one, progress=False, log=lambda *a: None)
    assert m1["micro_batches"] == m2["micro_batches"] == 6
    assert m1["trainable_tokens"] == m2["trainable_tokens"]
    losses1 = [r["loss"] for r in _curve(tmp_path / "one")]
    losses2 = [r["loss"] for r in _curve(tmp_path / "two")]
    assert losses1 == pytest.approx(losses2, rel=1e-4), "token-weighted loss across ranks = across micro-batches"
    assert m1["val_loss"] == pytest.approx(m2["val_loss"], rel=1e-4)


def test_toy_student_for_kl_takes_the_teacher_tokenizer(toy_traces, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    from cdlib.tiny import default_corpus, make_tiny_model

    teacher = make_tiny_model(tmp_path / "teacher", corpus=default_corpus(60, seed=5), vocab_size=400, num_layers=1)
    records, _ = train_data.load_records(toy_traces, limit=20)
    P = TrainParams(out_dir=str(tmp_path), data=str(toy_traces), objective="kl", kl_teacher=str(teacher),
                    tiny_layers=1)
    own = train_data.make_toy_student(tmp_path / "own", records, P)  # trained on the records: another vocabulary
    shared = train_data.make_toy_student(tmp_path / "shared", records, P, tokenizer_from=str(teacher))
    t_tok = AutoTokenizer.from_pretrained(teacher)
    T.check_same_tokenizer(AutoTokenizer.from_pretrained(shared), t_tok, str(shared), str(teacher))
    assert AutoConfig.from_pretrained(shared).vocab_size == len(t_tok)
    with pytest.raises(T.TrainError, match="share a tokenizer"):
        T.check_same_tokenizer(AutoTokenizer.from_pretrained(own), t_tok, str(own), str(teacher))


def test_overlong_samples_are_dropped_and_counted_or_named_in_an_error(toy_traces, tmp_path):
    """Paper mode drops samples over seq_len as Axolotl does and counts them; the default stops at the first."""
    from cdlib.grid import Grid

    assert {c.params["overlong"] for c in Grid(REPO / "params/paper.yaml").select("train")} == {"drop"}
    assert TrainParams(out_dir="x", data="y").overlong == "error"
    base = dict(data=str(toy_traces), limit=40, max_steps=1, val_fraction=0.0, **{**QUICK, "seq_len": 4096})
    lengths = sorted(len(ex["input_ids"]) for ex in train_data.prepare(
        TrainParams(out_dir=str(tmp_path / "probe"), **base)).train)
    cap = lengths[len(lengths) // 2]
    over = sum(n > cap for n in lengths)
    assert 0 < over < len(lengths)
    with pytest.raises(ValueError, match=rf"\(id '.+'\) has length \d+ > seq_len {cap}"):
        train_data.prepare(TrainParams(out_dir=str(tmp_path / "err"), **{**base, "seq_len": cap}))
    said: list[str] = []
    m = T.run(TrainParams(out_dir=str(tmp_path / "drop"), **{**base, "seq_len": cap, "overlong": "drop"}),
              progress=False, log=lambda *a: said.append(" ".join(map(str, a))))
    assert (m["overlong"], m["overlong_dropped"], m["overlong_cut"]) == ("drop", over, 0)
    assert m["n_train"] == len(lengths) - over
    assert any(f"{over} example(s) longer than seq_len {cap} dropped" in line for line in said), said
