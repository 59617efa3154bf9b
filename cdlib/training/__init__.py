"""What the train stage (:mod:`cdlib.train`) is made of, one concern per module:

- :mod:`cdlib.training.data`: the input cell's records, the toy student, the SFT examples, the validation
  split and the plan of every micro-batch with its token counts ahead of time;
- :mod:`cdlib.training.sft`: SFT examples in the student's chat format (qwen, llama3, harmony, plain) with
  loss masks, and the mask audit;
- :mod:`cdlib.training.packing`: best-fit-decreasing packing and the attention layout of packed rows;
- :mod:`cdlib.training.models`: loading the student and the KL teacher, LoRA targets, optimizers, TF32, Liger;
- :mod:`cdlib.training.losses`: SFT cross-entropy without full logits, and MPD's chunked KL;
- :mod:`cdlib.training.checkpoint`: the resumable state, the saved student and LoRA merges;
- :mod:`cdlib.training.launch`: a run across processes (``accelerate launch``, torchrun on CPU);
- :mod:`cdlib.training.trackers`: the experiment tracker (TensorBoard, W&B, MLflow, trackio).

None of them imports a stage: a trained cell's ``checkpoint.json`` is read through :mod:`cdlib.outputs`.
"""

from cdlib.training import checkpoint, data, launch, losses, models, packing, sft, trackers

__all__ = ["checkpoint", "data", "launch", "losses", "models", "packing", "sft", "trackers"]
