# %% [markdown]
# # Stage 4: student fine-tuning
#
# Paper section 3.3, 4, Appendix C and H.3 (and Mixed-Policy Distillation's KL objective).
# The student learns `User: q -> Assistant: <think> t </think> a` with loss on the chosen
# sections only, on packed sequences, with LoRA or full fine-tuning. The mask audit runs
# before every training; the loss curve, token counts, wall-clock, GPU-hours, peak memory
# and a FLOPs estimate are recorded; the checkpoint is saved in HF layout for vLLM, and
# `checkpoint.json` tells the evaluation stage what to load. With `accelerate_config` set
# and several GPUs visible, training is launched across them with `accelerate launch`.

# %% tags=["parameters"]
out_dir: str = "outputs/scratch/train"  # cell directory (the grid runner sets it)
seed: int = 0  # seed of the split, the shuffles, LoRA init and a toy student's weights
data: str = "outputs/demo/compress/toy__extractive"  # input cell: generate (traces), compress or truncate directory
source: str = "raw"  # raw | answer_only | truncated | <compressor name> | mpd
same_questions_as: list = []  # compress cells: questions one of them failed to compress are left out of any source
student: str = "toy-student"  # HF hub id, local or train cell directory (start from it), or toy-* (from scratch)
chat_format: str = "auto"  # auto, qwen, llama3, harmony or plain
chat_template_kwargs: dict = {}  # the evaluate engine's chat_template_kwargs, so training text matches inference
answer_only_think: str = "none"  # answer-only: "none" strips the whole think block (paper), "empty" keeps an empty one
method: str = "full"  # full or lora
learning_rate: float = None  # None: 2e-5 full, 1e-4 LoRA (1e-3 for toy students from scratch)
lora_rank: int = 64  # LoRA rank (paper: 64)
lora_alpha: int = 32  # LoRA alpha (paper: 32)
lora_dropout: float = 0.05  # LoRA dropout (paper: 0.05)
lora_target_modules: str = "all-linear"  # "all-linear" or a list of module names
epochs: float = 1.0  # passes over the data (paper: 1)
max_steps: int = None  # optimizer steps instead of epochs
token_budget: int = None  # compute-matched: train until this many supervised tokens were seen
seq_len: int = 16384  # packed sequence length (paper: 16,384)
packing: bool = True  # best-fit-decreasing sample packing
overlong: str = "error"  # examples longer than seq_len: error, truncate or drop
micro_batch_size: int = 1  # packed rows per micro-batch (paper: 1)
grad_accum: int = 1  # micro-batches per optimizer step and process (paper: 8)
lr_scheduler: str = "cosine"  # transformers scheduler name
warmup_ratio: float = 0.1  # share of steps with linear warmup (paper: 10%)
weight_decay: float = 0.0  # AdamW weight decay
optimizer: str = "adamw_8bit"  # adamw_8bit (bitsandbytes), adamw_torch_8bit (torchao) or adamw; CPU: torch AdamW
gradient_checkpointing: bool = True  # recompute activations in backward
bf16: bool = True  # BF16 autocast on GPU (ignored on CPU)
tf32: bool = True  # TF32 matmuls on a CUDA GPU (paper H.3; ignored on CPU)
val_fraction: float = 0.05  # held-out share for the validation loss (paper: 5%)
loss_on: list = ["cot", "answer"]  # supervised sections: prompt, cot, answer
truncate_ratio: float = None  # Distilling the Essence: keep the first X of the tokens
truncate_span: str = "sequence"  # what truncate_ratio cuts: sequence or reasoning
objective: str = "sft"  # sft (cross-entropy) or kl (Mixed-Policy Distillation)
kl_teacher: str = None  # objective kl's teacher: hub id, model or train cell directory (the student's tokenizer)
kl_direction: str = "forward"  # forward KL(teacher||student), reverse, or jsd
kl_weight: float = 1.0  # objective kl: weight of the KL term (the rest: cross-entropy); Distilling the Essence: 0.5
save: str = "adapter"  # LoRA: adapter, or merged (also a merged model/)
log_every: int = 10  # steps between writes of the loss curve
accelerate_config: str = None  # slurm/accelerate/ddp.yaml or fsdp2.yaml: launch across the visible GPUs
limit: int = None  # train on at most this many records (seeded sample)
attn_implementation: str = "auto"  # auto (flash_attention_2 on GPU if installed, else sdpa_varlen), sdpa, eager
max_grad_norm: float = 1.0  # gradient clipping (0: off)
tiny_hidden: int = 128  # toy students: hidden size
tiny_layers: int = 4  # toy students: decoder layers
tiny_vocab: int = 1000  # toy students: BPE vocabulary size trained on the records
tiny_tokenizer_data: str = None  # toy students: cell whose records train the tokenizer (None: the training data)
kl_chunk_tokens: int = 2048  # objective kl: positions per chunk of the divergence (0: all at once)
save_every: int = 200  # optimizer steps between resumable states in <out_dir>/resume/ (0: off)
loss_head: str = "auto"  # auto (CCE / Liger on a GPU where installed, else chunked), full, chunked, liger, cce
loss_chunk_tokens: int = 512  # chunked loss head: positions per chunk (memory ~ chunk x vocab fp32)
liger_kernels: bool = False  # Liger's fused RMSNorm, RoPE, SwiGLU on a GPU where liger-kernel is installed (paper H.3)
report_to: str = "none"  # experiment tracker through accelerate: none, tensorboard, wandb, mlflow or trackio
tracker_project: str = "compress-distill"  # tracker project; the run is named after the cell directory

# %%
import cdlib.figures
import cdlib.outputs
import cdlib.params
import cdlib.train
import cdlib.training.models

P = cdlib.params.from_notebook("train", globals())
P

# %% [markdown]
# The training data: records read (flagged ones skipped), SFT examples built in the
# student's chat format, and the mask audit: supervised tokens are shown between ⟦ ⟧.

# %%
prepared = cdlib.train.prepare(P)
print(prepared.data_info)
print(f"{len(prepared.train)} training / {len(prepared.val)} validation examples, format {prepared.chat_format}")
print(prepared.audit)

# %% [markdown]
# Training (progress bar per optimizer step; loss and its EMA in the bar).

# %%
metrics = cdlib.train.train(P, data=prepared)
cdlib.outputs.write_metrics(P.out_dir, metrics)
{k: metrics[k] for k in ("budget_mode", "steps", "train_loss_first", "train_loss", "val_loss", "trainable_tokens",
                         "total_tokens_seen", "wall_clock_s", "gpu_hours", "peak_memory_gb", "flops")}

# %% [markdown]
# How the rows were laid out (packing is refused, with the reason, for models whose layers cannot
# take example boundaries) and, for LoRA, which modules got adapters, how many parameters, which
# listed targets matched nothing and which weights got no adapter.

# %%
cdlib.training.models.layout_summary(metrics)

# %% [markdown]
# Loss curve (thin: per step; bold: EMA with alpha 0.08, as in the paper's Figure 3).

# %%
cdlib.figures.loss_chart(cdlib.train.loss_frame(P.out_dir), title=f"{P.student} {P.method} on {P.source}")

# %% [markdown]
# Tokens per section seen in training (Table 6 counts the supervised tokens of one pass)
# and what the evaluation stage will load.

# %%
print(metrics["tokens_per_section"])
metrics["checkpoint"]
