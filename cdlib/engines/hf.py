"""The transformers engine (``kind: hf``): ``generate`` batched with left padding, the fallback where vLLM
is not available (and for families vLLM cannot load here). No structured JSON output.
"""

from __future__ import annotations

from typing import Any

from cdlib.engines.base import Completion, Engine, Prompt, is_chat, make_completion, prompt_opens_think
from cdlib.params import EngineParams, SamplingParams


class HFEngine(Engine):
    """transformers ``generate``: batched, left-padded, chat template applied; the fallback engine.

    ``batch_size`` prompts are generated together (sorted by length to waste
    little padding). With ``lora_path`` the adapter is loaded with peft.
    Structured JSON output is not available here.
    """

    batch_size = 16

    def __init__(self, params: EngineParams):
        super().__init__(params)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(params.tokenizer or params.model)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = "auto" if params.dtype == "auto" else getattr(torch, params.dtype)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(params.model, dtype=dtype)
        if params.lora_path:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, params.lora_path)
        self.model = model.to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        self.stop_ids = set(eos) | {self.tokenizer.eos_token_id}

    def _texts(self, prompts: list[Prompt], chat: bool) -> list[str]:
        if not chat:
            return list(prompts)
        return [
            self.tokenizer.apply_chat_template(
                m, tokenize=False, add_generation_prompt=True, **self.params.chat_template_kwargs
            )
            for m in prompts
        ]

    def generate(self, prompts, sampling, json_schema=None, rows=None):
        if json_schema is not None:
            raise ValueError("engine kind 'hf' has no structured JSON output; use kind 'vllm' or 'openai'")
        import torch

        prompts = list(prompts)
        if not prompts:
            return []
        texts = self._texts(prompts, is_chat(prompts))
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        result: list[Completion | None] = [None] * len(texts)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        gen_kwargs: dict[str, Any] = {"max_new_tokens": sampling.max_tokens,
                                      "pad_token_id": self.tokenizer.pad_token_id}
        if sampling.temperature > 0:
            gen_kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
            if sampling.top_k > 0:
                gen_kwargs["top_k"] = sampling.top_k
        else:
            gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if sampling.stop:
            gen_kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = self.tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            batch = batch.to(self.device)
            with torch.no_grad():
                out = self.model.generate(**batch, **gen_kwargs)
            new_tokens = out[:, batch["input_ids"].shape[1] :].tolist()
            prompt_lens = batch["attention_mask"].sum(dim=1).tolist()
            for i, tokens, n_prompt in zip(idx, new_tokens, prompt_lens):
                result[i] = self._decode(tokens, int(n_prompt), sampling, prompt_opens_think(texts[i]))
        return result  # type: ignore[return-value]

    def _decode(self, tokens: list[int], n_prompt: int, sampling: SamplingParams, think_prefilled: bool) -> Completion:
        finish = "length"
        for n, t in enumerate(tokens):
            if t in self.stop_ids:
                tokens, finish = tokens[: n + 1], "stop"
                break
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for s in sampling.stop:  # like vLLM: cut at the stop string, which is not returned
            if s in text:
                text, finish = text[: text.index(s)], "stop"
        return make_completion(text, n_prompt, len(tokens), finish, think_prefilled)

    def close(self) -> None:
        del self.model
