"""Tiny Qwen2-architecture models with their own tokenizer, built locally.

No weights can be downloaded on the machines this project is tested on, so the
toy world's students (and every test that needs a real model in vLLM or
transformers) use a model made here: a byte-level BPE tokenizer trained on a
small corpus, wrapped as a transformers tokenizer with the chat special tokens
and a Qwen-style chat template, and a randomly initialised ``Qwen2ForCausalLM``.

Facts that shaped the defaults (DESIGN.md): vLLM's CPU backend fails with a
head dimension of 16, so ``head_dim`` is 64; a 2-layer hidden-128 model loads
into vLLM on CPU in about 30 s.

The paper's own model families are built here too, at tiny scale
(:func:`make_family_model`, names ``tiny-qwen3.5``, ``tiny-qwen3.5-moe``,
``tiny-llama``, ``tiny-gpt-oss``, ``tiny-ministral3`` for :func:`resolve`): random
weights in each family's transformers architecture with the real configs'
shapes scaled down (layer types, GQA ratio, rope scaling, MoE routing), and a
tokenizer carrying the family's special tokens and chat template. They are the
ground truth the toy Qwen2 students stand in for (see :data:`FAMILIES`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from cdlib.chat_templates import load_template

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"  # end of a turn; the model's eos token
THINK_START = "<think>"
THINK_END = "</think>"

# A Qwen-style ChatML template written for this project. ``enable_thinking``
# (default true) follows the Qwen3 convention: when false, the generation
# prompt ends with an empty think block so the model answers directly.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif -%}"
    "{%- endif -%}"
)

_NAMES = ["Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana"]
_ITEMS = ["apples", "pens", "coins", "books", "stamps", "shells"]


def default_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Small arithmetic sentences in chat format, with think blocks and a little JSON.

    Enough for a BPE tokenizer to learn merges for numbers, operators, the
    reasoning words the toy teacher uses and the chat markup.
    """
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        op = rng.choice(["+", "-", "*"])
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
        verb = {"+": "gets", "-": "gives away", "*": "multiplies by"}[op]
        question = f"{name} has {a} {item}. {name} {verb} {b}. How many {item} does {name} have now?"
        thought = (f"Let me think. {name} starts with {a}. Then {a} {op} {b} = {result}. Wait, let me check: "
                   f"{a} {op} {b} is {result}. So the answer is {result}.")
        lines.append(
            f"{IM_START}user\n{question}{IM_END}\n{IM_START}assistant\n"
            f"{THINK_START}\n{thought}\n{THINK_END}\n\nThe answer is \\boxed{{{result}}}.{IM_END}\n"
        )
        lines.append(f'{{"faithful": true, "score": {result % 10}, "reason": "step {a} {op} {b}"}}')
    return lines


def train_tokenizer(corpus: list[str], vocab_size: int = 1000):
    """Train a byte-level BPE tokenizer on ``corpus`` and return it as a transformers ``Qwen2Tokenizer``.

    The BPE merges are learnt with the Qwen2 tokenizer's own normalizer and
    pre-tokenizer (taken from transformers, so training and use split text the
    same way: ``AutoTokenizer`` rebuilds a Qwen2 model's tokenizer with them).
    Byte-level, so any text (real prompts, JSON) encodes without unknown tokens.
    ``<|im_start|>``/``<|im_end|>``/``<|endoftext|>`` are special tokens;
    ``<think>``/``</think>`` are single non-special tokens, so that decoding
    with ``skip_special_tokens=True`` (vLLM's default) keeps them.
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    reference = Qwen2Tokenizer().backend_tokenizer
    tok = Tokenizer(models.BPE())
    tok.normalizer = reference.normalizer
    tok.pre_tokenizer = reference.pre_tokenizer
    specials = [PAD_TOKEN, IM_START, IM_END]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    bpe = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]
    wrapped = Qwen2Tokenizer(
        vocab=bpe["vocab"],
        merges=merges,
        unk_token=None,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        padding_side="left",
        model_max_length=4096,
    )
    wrapped.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK_START, THINK_END)])
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def make_tiny_model(
    out_dir: str | Path,
    corpus: list[str] | None = None,
    vocab_size: int = 1000,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int | None = None,
    head_dim: int = 64,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 4096,
    initializer_range: float = 0.02,
    tie_word_embeddings: bool = True,
    seed: int = 0,
) -> Path:
    """Create a randomly initialised Qwen2 model and its tokenizer in HF layout under ``out_dir``.

    The tokenizer is trained on ``corpus`` (default: :func:`default_corpus`).
    ``head_dim`` must be at least 64 for vLLM's CPU attention backend.
    Deterministic for a given ``seed``. Returns the directory, ready for
    ``vllm.LLM(model=...)``, ``AutoModelForCausalLM.from_pretrained`` and peft.
    """
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if head_dim < 64:
        raise ValueError(f"head_dim={head_dim}: vLLM's CPU backend needs a head dimension of at least 64")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(corpus if corpus is not None else default_corpus(), vocab_size=vocab_size)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# --------------------------------------------------------------------------- the paper's families


class UnknownFamilyError(ValueError):
    """A family or tiny model name this module does not know; the message lists the known ones."""


class VLLMUnsupportedError(RuntimeError):
    """vLLM cannot load this checkpoint on this machine; the message names the model and the reason."""


#: The paper's architecture families (transformers ``model_type`` of the real checkpoints, the text
#: model for Qwen3.5) and what each needs. ``real``: the paper's models of the family; ``chat_format``:
#: the ``cdlib.training.sft`` format of its template; ``template``: the bundled template of the tiny model
#: (None: the tokenizer brings its own). Shapes of the tiny configs are in :func:`family_config`.
FAMILIES: dict[str, dict[str, object]] = {
    "qwen3_5": {"tiny": "tiny-qwen3.5", "model_type": "qwen3_5_text", "chat_format": "qwen", "template": "qwen3_5",
                "real": ["Qwen/Qwen3.5-0.8B-Base", "Qwen/Qwen3.5-9B-Base"]},
    "qwen3_5_moe": {"tiny": "tiny-qwen3.5-moe", "model_type": "qwen3_5_moe_text", "chat_format": "qwen",
                    "template": "qwen3_5", "real": ["Qwen/Qwen3.5-397B-A17B-FP8"]},
    "llama": {"tiny": "tiny-llama", "model_type": "llama", "chat_format": "llama3", "template": "llama3",
              "real": ["meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.3-70B-Instruct"]},
    "gpt_oss": {"tiny": "tiny-gpt-oss", "model_type": "gpt_oss", "chat_format": "harmony", "template": "gpt_oss",
                "real": ["openai/gpt-oss-20b", "openai/gpt-oss-120b"]},
    "ministral3": {"tiny": "tiny-ministral3", "model_type": "ministral3", "chat_format": "llama3", "template": None,
                   "real": ["mistralai/Ministral-3-14B-Instruct-2512"]},
}
#: model_type (as in config.json) -> family, for checkpoints of any size
MODEL_TYPES = {f["model_type"]: name for name, f in FAMILIES.items()} | {"qwen3_5": "qwen3_5",
                                                                          "qwen3_5_moe": "qwen3_5_moe"}
#: tiny model name -> family (the names :func:`resolve` builds)
TINY_FAMILIES = {str(f["tiny"]): name for name, f in FAMILIES.items()}

# Special tokens of each BPE family (the real tokenizers' strings); eos = end of an assistant turn.
_LLAMA3 = {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "pad": "<|finetune_right_pad_id|>",
           "specials": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|eot_id|>", "<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>"]}
_HARMONY = {"bos": "<|startoftext|>", "eos": "<|return|>", "pad": "<|endoftext|>",
            "specials": ["<|startoftext|>", "<|endoftext|>", "<|start|>", "<|message|>", "<|channel|>",
                         "<|constrain|>", "<|end|>", "<|return|>", "<|call|>"]}
_QWEN = {"bos": None, "eos": IM_END, "pad": PAD_TOKEN, "specials": [PAD_TOKEN, IM_START, IM_END]}


def family_of(model: str | Path | dict) -> str:
    """The family of a checkpoint (directory, tiny name or hub id of a paper model) or of a config dict.

    Raises :class:`UnknownFamilyError` naming the model and its ``model_type`` when it is none of
    :data:`FAMILIES`.
    """
    if isinstance(model, dict):
        config, name = model, model.get("_name_or_path") or "config"
    else:
        name = str(model)
        if name in TINY_FAMILIES:
            return TINY_FAMILIES[name]
        for family, f in FAMILIES.items():
            if name in f["real"]:
                return family
        path = Path(name) / "config.json"
        if not path.exists():
            raise UnknownFamilyError(f"model {name!r}: no config.json there and not one of the paper's models "
                                     f"or tiny names ({', '.join(TINY_FAMILIES)})")
        config = json.loads(path.read_text())
    model_type = config.get("model_type") or ""
    if model_type not in MODEL_TYPES:
        raise UnknownFamilyError(f"model {name!r}: model_type {model_type!r} is none of the paper's families "
                                 f"({', '.join(FAMILIES)})")
    return MODEL_TYPES[model_type]


def _bpe_tokenizer(corpus: list[str], vocab_size: int, tokens: dict[str, object], template: str | None):
    """Byte-level BPE learnt on ``corpus`` with a family's special tokens, as a transformers tokenizer.

    The Qwen2 tokenizer class carries it (a GPT-style byte-level BPE with a regex pre-tokenizer, like
    the Llama-3 and o200k tokenizers of the real families); ``<think>``/``</think>`` are single
    non-special tokens, as in the Qwen tokenizers.
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    reference = Qwen2Tokenizer().backend_tokenizer
    tok = Tokenizer(models.BPE())
    tok.normalizer = reference.normalizer
    tok.pre_tokenizer = reference.pre_tokenizer
    specials = list(tokens["specials"])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    bpe = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]
    wrapped = Qwen2Tokenizer(
        vocab=bpe["vocab"], merges=merges, unk_token=None, bos_token=tokens["bos"], eos_token=tokens["eos"],
        pad_token=tokens["pad"], additional_special_tokens=[t for t in specials if t != tokens["pad"]],
        padding_side="left", model_max_length=4096,
    )
    wrapped.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK_START, THINK_END)])
    if template is not None:
        wrapped.chat_template = load_template(template)
    return wrapped


def tekken_tokenizer(n_bpe: int = 1000):
    """Mistral's Tekken tokenizer as shipped by ``mistral_common`` (``data/tekken_240911.json``), cut to
    its first ``n_bpe`` BPE ranks (the 1000 special tokens stay), converted by transformers with
    mistral_common's own chat template. Raises naming the file when ``mistral_common`` lacks it."""
    import tempfile

    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    try:
        import mistral_common
    except ImportError as e:
        raise UnknownFamilyError(f"family 'ministral3' needs mistral_common's Tekken files: {e}") from None
    src = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
    if not src.exists():
        raise FileNotFoundError(f"{src}: Tekken tokenizer file missing from mistral_common")
    raw = json.loads(src.read_text())
    raw["vocab"] = raw["vocab"][:n_bpe]
    raw["config"]["default_vocab_size"] = raw["config"]["default_num_special_tokens"] + n_bpe
    raw["config"]["num_vocab_tokens"] = n_bpe
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tekken.json"
        path.write_text(json.dumps(raw))
        return convert_tekken_tokenizer(str(path))


def family_config(family: str, vocab_size: int, special_ids: dict[str, int | None], **overrides):
    """The tiny transformers config of ``family``: the real config's shape, scaled down.

    * qwen3_5: 3 gated delta-net (linear attention) layers then 1 full-attention layer (the real
      3:1 pattern), GQA 4:1, partial rotary 0.25, conv kernel 4, more value than key heads.
    * qwen3_5_moe: the same hybrid with routed experts (8, top 2) and a shared expert.
    * llama: Llama-3.1's ``llama3`` rope scaling (factor 8, original 8192, theta 500000), GQA.
    * gpt_oss: alternating sliding (window 128) / full attention with sinks, 4 experts top 2,
      yarn rope (factor 32, original 4096), attention bias, swiglu limit.
    * ministral3: yarn rope with Llama-4 attention scaling (the 2512 models), GQA 4:1.

    Attention heads have dimension 64 (vLLM's CPU backend needs at least 64). ``overrides``
    replace any field (e.g. ``sliding_window=8`` to make the window bite in a short test).
    """
    import transformers as tf

    ids = {"bos_token_id": special_ids.get("bos"), "eos_token_id": special_ids["eos"],
           "pad_token_id": special_ids["pad"]}
    context = {"qwen3_5": 262144, "qwen3_5_moe": 262144, "llama": 131072, "gpt_oss": 131072, "ministral3": 262144}
    common = {"vocab_size": vocab_size, "max_position_embeddings": context.get(family, 4096),
              "tie_word_embeddings": False, **ids}
    if family in ("qwen3_5", "qwen3_5_moe"):
        fields = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 1,
                  "head_dim": 64, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
                  "linear_key_head_dim": 32, "linear_value_head_dim": 32, "linear_conv_kernel_dim": 4,
                  "layer_types": ["linear_attention"] * 3 + ["full_attention"],
                  "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
                  **common}
        if family == "qwen3_5":
            cls, fields["intermediate_size"] = tf.Qwen3_5TextConfig, 256
        else:
            cls = tf.Qwen3_5MoeTextConfig
            fields |= {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                       "shared_expert_intermediate_size": 64}
    elif family == "llama":
        cls = tf.LlamaConfig
        fields = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
                  "num_key_value_heads": 1, "head_dim": 64, "rms_norm_eps": 1e-5,
                  "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}, **common}
    elif family == "gpt_oss":
        cls = tf.GptOssConfig
        fields = {"hidden_size": 128, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                  "num_key_value_heads": 1, "head_dim": 64, "num_local_experts": 4, "num_experts_per_tok": 2,
                  "sliding_window": 128, "layer_types": ["sliding_attention", "full_attention"] * 2,
                  "rope_parameters": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                      "truncate": False, "original_max_position_embeddings": 4096,
                                      "rope_theta": 150000.0}, **common}
    elif family == "ministral3":
        cls = tf.Ministral3Config
        fields = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 1, "head_dim": 64,
                  "rope_parameters": {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 16.0,
                                      "original_max_position_embeddings": 16384, "max_position_embeddings": 262144,
                                      "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0,
                                      "llama_4_scaling_beta": 0.1}, **common}
    else:
        raise UnknownFamilyError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    return cls(**(fields | overrides))


def make_family_model(family: str, out_dir: str | Path, *, corpus: list[str] | None = None,
                      vocab_size: int = 1000, seed: int = 0, **overrides) -> Path:
    """A tiny random model of one of the paper's families, with its tokenizer, in HF layout under ``out_dir``.

    ``family`` is a key of :data:`FAMILIES` or a tiny name (``tiny-llama``, ...). The BPE families
    (Qwen3.5, Llama, gpt-oss) get a byte-level BPE learnt on ``corpus`` (default :func:`default_corpus`)
    with their special tokens and chat template (``cdlib/chat_templates``); ministral3 gets the real
    Tekken tokenizer cut to ``vocab_size`` BPE ranks (:func:`tekken_tokenizer`). ``overrides`` change
    config fields (:func:`family_config`). Deterministic for a ``seed``. Raises
    :class:`UnknownFamilyError` for a family that is not one of the paper's.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    family = TINY_FAMILIES.get(family, family)
    if family not in FAMILIES:
        raise UnknownFamilyError(f"unknown family {family!r}; known: {', '.join(FAMILIES)} "
                                 f"(tiny names: {', '.join(TINY_FAMILIES)})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = FAMILIES[family]
    if family == "ministral3":
        tokenizer = tekken_tokenizer(vocab_size)
        names = {"bos": tokenizer.bos_token, "eos": tokenizer.eos_token, "pad": tokenizer.pad_token}
    else:
        tokens = _QWEN if family.startswith("qwen") else _LLAMA3 if family == "llama" else _HARMONY
        tokenizer = _bpe_tokenizer(corpus if corpus is not None else default_corpus(), vocab_size, tokens,
                                   spec["template"])
        names = {k: tokens[k] for k in ("bos", "eos", "pad")}
    special_ids = {k: tokenizer.convert_tokens_to_ids(v) if v else None for k, v in names.items()}
    config = family_config(family, len(tokenizer), special_ids, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    eos = [special_ids["eos"]]
    if family == "gpt_oss":  # the real generation config stops on <|return|>, <|call|> and <|endoftext|>
        eos += [tokenizer.convert_tokens_to_ids(t) for t in ("<|call|>", "<|endoftext|>")]
    model.generation_config = GenerationConfig(bos_token_id=special_ids["bos"], eos_token_id=eos,
                                               pad_token_id=special_ids["pad"])
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def check_vllm_loadable(model: str, lora: bool = False) -> None:
    """Raise :class:`VLLMUnsupportedError` naming ``model`` and the reason when vLLM cannot load it here.

    Known cases: vLLM's Qwen3.5 model imports torchvision, which the CPU set-up removes
    (it breaks ``import transformers`` beside the CPU torch; DESIGN.md); and with ``lora``, a
    mixture-of-experts family (gpt-oss, Qwen3.5-MoE) without a GPU: vLLM wraps its expert layers
    for LoRA with Triton kernels, which fail on the CPU ("triton.language has no attribute
    float32"; found by params/archs.yaml). The HF engine (``kind: hf``) runs both.
    Models that are not a local directory or one of the paper's names are left to vLLM.
    """
    import importlib.util

    import torch

    try:
        family = family_of(model)
    except UnknownFamilyError:
        return
    if family in ("qwen3_5", "qwen3_5_moe") and importlib.util.find_spec("torchvision") is None:
        raise VLLMUnsupportedError(
            f"model {model!r} (family {family}) cannot be loaded by vLLM on this machine: vLLM's Qwen3.5 model "
            "imports torchvision, which is not installed here (the CPU set-up removes it); use engine kind 'hf'")
    if lora and family in ("gpt_oss", "qwen3_5_moe") and not torch.cuda.is_available():
        raise VLLMUnsupportedError(
            f"model {model!r} (family {family}) with a LoRA adapter cannot run in vLLM without a GPU: vLLM's LoRA "
            "layer for mixture-of-experts blocks runs Triton kernels; use engine kind 'hf'")


#: Model name that engines resolve to a random tiny model built on first use (see :func:`resolve`).
TINY_RANDOM = "tiny-random"


def resolve(model: str) -> str:
    """``model`` itself, or for a tiny name the directory of its tiny model, built once.

    ``"tiny-random"``: the toy Qwen2 model (:func:`make_tiny_model`; the demo's model-based
    compressor uses it). ``"tiny-qwen3.5"``, ``"tiny-qwen3.5-moe"``, ``"tiny-llama"``,
    ``"tiny-gpt-oss"``, ``"tiny-ministral3"``: the paper's families (:func:`make_family_model`), so
    a grid can name them as models. The models live under ``$CDLIB_CACHE`` (default
    ``~/.cache/compress-distill``) and are built atomically. Another ``tiny-*`` name that is not a
    directory raises :class:`UnknownFamilyError` listing the known names.
    """
    import os
    import shutil
    import tempfile

    if model != TINY_RANDOM and model not in TINY_FAMILIES:
        if model.startswith("tiny-") and not Path(model).exists():
            raise UnknownFamilyError(f"model {model!r}: no such tiny model; known: "
                                     f"{', '.join([TINY_RANDOM, *TINY_FAMILIES])}")
        return model
    root = Path(os.environ.get("CDLIB_CACHE", "~/.cache/compress-distill")).expanduser()
    target = root / model
    if not (target / "config.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".build-"))
        if model == TINY_RANDOM:
            make_tiny_model(tmp / "m", seed=0)
        else:
            make_family_model(model, tmp / "m", seed=0)
        try:
            (tmp / "m").rename(target)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
