"""Which engine runs: :func:`get_engine` builds the back-end that ``EngineParams.kind`` names (``vllm``,
``openai``, ``hf``, ``toy``), resolving tiny model names first and falling back from vLLM to transformers
where vLLM cannot load a family on this machine; :func:`close_all` frees every cached vLLM model.
"""

from __future__ import annotations

import warnings

from cdlib.engines.base import Engine
from cdlib.engines.hf import HFEngine
from cdlib.engines.openai import OpenAIEngine
from cdlib.engines.toy import ToyEngine
from cdlib.engines.vllm import VLLMEngine
from cdlib.engines.vllm import close_all as close_vllm
from cdlib.params import EngineParams, ToyParams
from cdlib.tiny import VLLMUnsupportedError, resolve


def get_engine(params: EngineParams, toy: ToyParams | None = None) -> Engine:
    """The engine for ``params.kind``; ``toy`` sets the toy teacher's slip rate (default ``ToyParams()``).

    The model names ``tiny-random`` and the tiny family names (``tiny-llama``, ``tiny-gpt-oss``, ...)
    are resolved to tiny random models built on first use (:func:`cdlib.tiny.resolve`), so the
    model-based paths run on machines without weights. A ``vllm`` model that vLLM cannot load on this
    machine (:func:`cdlib.tiny.check_vllm_loadable`: Qwen3.5 without torchvision) gets the HF engine,
    with a warning saying why; its ``kind`` says which engine runs.
    """
    if params.kind in ("vllm", "hf") and params.model.startswith("tiny-"):  # tiny-random, tiny-llama, ...
        params = params.model_copy(update={"model": resolve(params.model)})
    if params.kind == "vllm":
        try:
            return VLLMEngine(params)
        except VLLMUnsupportedError as e:  # a family vLLM cannot load on this machine: transformers can
            warnings.warn(f"{e}. Generating with the HF engine (transformers generate) instead.", stacklevel=2)
            return HFEngine(params.model_copy(update={"kind": "hf"}))
    if params.kind == "openai":
        return OpenAIEngine(params)
    if params.kind == "hf":
        return HFEngine(params)
    if params.kind == "toy":
        return ToyEngine(params, toy or ToyParams())
    raise ValueError(f"engine kind {params.kind!r}: expected one of vllm, openai, hf, toy")


def close_all() -> None:
    """Shut every cached ``vllm.LLM`` of this process down (nothing when vLLM was never loaded)."""
    close_vllm()
