"""Our GRPO step against TRL's GRPOTrainer, side by side in one run, on identical work (issue 11).

    python scripts/bench_train.py --preset short --steps 4
    python scripts/bench_train.py --preset gsm8k --steps 4 --json bench_results/bench_train_gsm8k.json
    python scripts/bench_train.py --preset medium --skip-trl      # where TRL is not installed: ours only

What one invocation does:
  1. builds (or reuses, under --work-dir) a byte-level BPE tokenizer trained locally with `tokenizers`
     (16,384 tokens, Qwen2's pre-tokenizer, special tokens and a Qwen2-style chat template; corpus: the
     Python standard library's sources plus generated word problems, so it is the same on every machine
     with the same Python), a random Qwen2 saved once as safetensors (vocab_size = the tokenizer's,
     untied LM head, float32), and the step's 8 prompts as JSONL; nothing is downloaded;
  2. measures the CPU's float32 matmul peak (a large `torch.mm` on the same threads);
  3. ours: starts `ref_server.py` on a free loopback port (beta > 0 needs it) and runs the real entry
     point, `python grpo_ref_split.py --config <generated YAML>` (one process, a world of one), then reads
     its `metrics.jsonl` and the server's `/stats`;
  4. TRL: `GRPOTrainer` in this process on the same model directory, tokenizer, prompts and reward
     functions, with timers wrapped around its phases;
  5. prints per-step medians (steps 2..N: step 1 is the warm-up), the ratio ours / TRL in steps per
     second, both phase tables side by side, and the FLOP table; `--json PATH` writes all of it.

Identical work. Both sides load the same weights and tokenizer from one directory and train on the same
8 prompts at every step (the dataset is exactly those 8 rows, so both samplers draw all of them each
step, in their own order), 8 completions each = 64 completions per step, one generation and one
optimizer update on all 64. Settings, ours (YAML key of grpo_ref_split.py) -> TRL (GRPOConfig field):

    prompts_per_step 8 x num_generations 8   -> generation_batch_size 64 (derived: per_device_train_batch_size
                                                x gradient_accumulation_steps, steps_per_generation = GA)
    gradient_accumulation_steps GA           -> gradient_accumulation_steps GA, per_device_train_batch_size
                                                64 / GA, steps_per_generation GA: one generation of 64 per
                                                optimizer step, split in GA micro-batches (TRL's reference
                                                forward also runs in chunks of 64 / GA rows)
    num_iterations 1                         -> num_iterations 1 (GA % (steps_per_generation x 1) == 0, so
                                                TRL computes no separate old log-probs, nor do we)
    max_completion_length, temperature 1.0, top_p 1.0
                                             -> the same names; TRL top_k 0, min_p None, repetition_penalty 1
                                                (ours samples plain softmax(logits / T) with top-p always)
    beta 0.04, epsilon 0.2, epsilon_high None, loss_type grpo, importance_sampling_level token,
    scale_rewards group, mask_truncated_completions false
                                             -> the same names and values
    (our loss has no such term)              -> use_bias_correction_kl False (TRL's default True multiplies
                                                the KL term by the importance ratio)
    learning_rate, lr_scheduler_type constant, warmup_steps 0, weight_decay 0.0, optim adamw_torch,
    max_grad_norm 1.0, max_steps, seed       -> the same names and values
    gradient_checkpointing false             -> activation_checkpointing False (gradient_checkpointing, its
                                                deprecated alias, defaults to True in TRL)
    dtype float32 (CPU) / bfloat16 (GPU)     -> model_init_kwargs dtype float32, bf16 False, use_cpu True on
                                                the CPU; dtype bfloat16 and bf16 True on a GPU
    reward_funcs [accuracy, format]          -> the same two built-ins (grpo_split.rollouts.rewards) through
                                                adapters that turn TRL's chat messages into text
    system_prompt + prompt column            -> conversational prompts [system, user]: the same chat template,
                                                the same token ids
    max_prompt_length 1024 (filters only)    -> TRL 1.16 has no prompt truncation; no prompt comes near it
    deepspeed: default (ZeRO-2, world of one) -> plain Trainer + accelerate, no DeepSpeed
    logging_steps 1, save_steps > max_steps  -> logging_steps 1, save_strategy no, report_to none

Presets (all: 8 prompts x 8 completions, beta 0.04, loss grpo, lr 1e-6, float32 on the CPU; Qwen2 shape:
heads of 64 dims, a quarter as many KV heads, MLP 5.5 x hidden, untied LM head, vocabulary 16,384):
    short   hidden 256, 4 layers, completions of exactly 32 tokens, short toy-task prompts
    medium  hidden 512, 8 layers, completions of exactly 64 tokens, short toy-task prompts
    gsm8k   hidden 512, 8 layers, a system prompt of 100 words (129 tokens) and GSM8K-like questions (prompts
            of 171-203 tokens), max_completion_length 256 with lengths spread over about 96-256 (see below)
    tiny    hidden 64, 2 layers, 8 tokens, vocabulary 2,048: the test suite's smoke run
A random model almost never emits EOS, so short/medium completions all run to max_completion_length. For
gsm8k the model carries a "clock": one layer-0 attention head attends uniformly to every token so far and
reads a marker that only `<|im_start|>` carries, which gives 3 / (tokens so far) in a residual channel no
other layer writes; the EOS row of the untied LM head reads that channel against a constant one, so the EOS
logit rises with position and completions end between about 96 and 256 tokens (some hit 256), varying
with prompt length and sampling. Both sides load these same weights; the FLOP count of a dense model
does not depend on its weight values.

Where the time goes. Ours: `timing/generate`, `timing/rewards`, `timing/reference`, `timing/update` and
`tokens_per_second/*` from metrics.jsonl when the trainer logs them, else `step_time` only (said in the
output). Our trainer sends the reference request as soon as the rollouts exist and waits for it only where
the first loss needs it, so `timing/reference` is the part of the server's forward not hidden behind the
update's first forward (on one shared CPU the two compete for the cores); the server's /stats gives its
forward time (busy seconds), which the FLOP table uses for the reference phase.
TRL: wall-clock timers around `_generate` (tokenize, generate, decode), `_calculate_rewards`,
`_get_per_token_logps_and_entropies` on the reference model, and the update (`compute_loss`,
`accelerator.backward`, `_clip_grad_norm`, `optimizer.step`); per step from `on_step_begin` to
`on_step_end`. "other" is the step minus the four phases.

FLOP accounting (`phase_flops`): model FLOPs per phase from the token counts of the run (prompt lengths of
the 8 prompts; completion lengths per step: each row's from TRL's `_generate`, the mean and maximum plus
`padding_fraction` from our metrics.jsonl): 2 x (decoder matmul parameters) per position forwarded through
the layers, 2 x hidden x vocab per position whose logits are computed, and attention 4 x layers x hidden x
(context length) per query position (causal); the update is 3 x its forward (forward + backward). Each
side is counted as it computes:
  - generation, both: a KV cache, logits of the last prompt position and of each new token only, finished rows
    kept in the batch until the longest ends, prompts left-padded to the longest (TRL: HF `generate`, which
    draws with torch.multinomial; ours: its own loop, `grpo_split.rollouts.sampling.decode`, inverse-CDF
    draws, in checkouts from 96a1f40 on; HF `generate` before);
  - TRL: every row forwards its own prompt; reference and update forwards over the whole padded batch; its
    fused LM head scores every position on a CPU (prompt positions included; its compact path is for Triton
    devices only);
  - ours: where `grpo_split.modeling.prefix_plan` allows (checked here on the same weights, and in the logs),
    each distinct prompt is forwarded once and its KV cache expanded to its rows, in generation, in the
    reference server's chunks of --max_batch_tokens and in each update micro-batch; micro-batches are cut
    to their own longest prompt and completion (`padding_fraction` gives the positions they hold); the LM
    head runs on completion positions only (its fused backward's extra head matmul is not a model FLOP).
"useful" is the same count over real tokens only, each row with its own prompt, the same definition for both
sides; "extra" = 1 - useful / computed is padding (and TRL's prompt-position logits), negative where shared
prompts save more than padding costs. Achieved FLOP/s per phase and overall are set against the measured
matmul peak (the best of three measurements: the load of other processes lowers each).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python scripts/bench_train.py` from a checkout that was never installed
    sys.path.insert(0, str(REPO))

# Bumped whenever what `build_*` writes changes, so cached models, tokenizers and data are rebuilt.
BUILDER_VERSION = 2

# ---- the work both sides do -------------------------------------------------------------------

PROMPTS_PER_STEP = 8
NUM_GENERATIONS = 8
COMPLETIONS_PER_STEP = PROMPTS_PER_STEP * NUM_GENERATIONS  # 64
BETA = 0.04
LOSS_TYPE = "grpo"
EPSILON = 0.2
TEMPERATURE = 1.0
TOP_P = 1.0
LEARNING_RATE = 1e-6
MAX_GRAD_NORM = 1.0
SEED = 0
REF_MAX_BATCH_TOKENS = 16384  # the reference server's micro-batch budget (its default, passed explicitly)
REWARD_FUNCS = ("accuracy", "format")  # the project's built-ins; TRL gets them through `trl_reward_funcs`

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Qwen2's chat template without its default system message: a system turn only when the prompt has one.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A GSM8K system prompt of about 100 words (configs/gsm8k_qwen2.5.yaml's, plus one sentence of instructions).
GSM8K_SYSTEM_PROMPT = (
    "You are a helpful assistant. A conversation between User and Assistant. The user asks a question, and the "
    "Assistant solves it. The Assistant first thinks about the reasoning process in the mind and then provides "
    "the user with the answer. The reasoning process and answer are enclosed within <think> </think> and "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think><answer> answer here "
    "</answer>. Work through the problem one step at a time, write down every intermediate quantity with its "
    "units, check the arithmetic before you commit to a result, and put only the final number inside the "
    "answer tags."
)


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    hidden_size: int
    num_layers: int
    max_completion_length: int
    task: str  # "toy": short prompts like the toy task's; "gsm8k": system prompt + word problems
    micro_batch: int  # completions per forward/backward micro-batch; gradient_accumulation_steps = 64 / this
    vocab_size: int = 16384
    shape_lengths: bool = False  # the EOS clock (module docstring)

    @property
    def num_heads(self) -> int:
        return max(1, self.hidden_size // 64)

    @property
    def num_kv_heads(self) -> int:
        return max(1, self.num_heads // 4)

    @property
    def intermediate_size(self) -> int:
        return self.hidden_size * 11 // 2

    @property
    def gradient_accumulation_steps(self) -> int:
        return COMPLETIONS_PER_STEP // self.micro_batch


PRESETS = {
    "short": Preset("short", 256, 4, 32, "toy", micro_batch=32),
    "medium": Preset("medium", 512, 8, 64, "toy", micro_batch=16),
    "gsm8k": Preset("gsm8k", 512, 8, 256, "gsm8k", micro_batch=8, shape_lengths=True),
    "tiny": Preset("tiny", 64, 2, 8, "toy", micro_batch=64, vocab_size=2048),
}


@dataclasses.dataclass(frozen=True)
class Arch:
    """The decoder's shape, for FLOP accounting."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def of(cls, preset: Preset) -> Arch:
        return cls(preset.hidden_size, preset.num_layers, preset.num_heads, preset.num_kv_heads,
                   preset.intermediate_size, preset.vocab_size)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def layer_matmul_params(self) -> int:
        """Weights of the decoder layers' matmuls (q, k, v, o, gate, up, down); norms and biases left out."""
        h, q, kv, i = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, \
            self.intermediate_size
        return self.num_layers * (h * q + 2 * h * kv + q * h + 3 * h * i)

    @property
    def head_params(self) -> int:
        return self.hidden_size * self.vocab_size

    @property
    def total_params(self) -> int:
        """Every parameter: embeddings, untied LM head, layers with norms and q/k/v biases, final norm."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        per_layer_extra = 2 * h + (self.num_heads * self.head_dim + 2 * kv)  # two norms, q/k/v biases
        return 2 * self.head_params + self.layer_matmul_params + self.num_layers * per_layer_extra + h


# ---- building the model, tokenizer and data ---------------------------------------------------

_NAMES = ("Natalia", "Weng", "Betty", "Julie", "James", "Albert", "Ken", "Alexis", "Tina", "Randy", "Mark",
          "Carla", "John", "Janet", "Kylie", "Eliza", "Gretchen", "Marie", "Jasmine", "Tobias")
_ITEMS = ("clip", "apple", "cookie", "marble", "pencil", "sticker", "book", "cupcake", "egg", "shell", "card",
          "balloon", "orange", "candle", "ticket")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")


def gsm8k_like_question(rng: random.Random) -> tuple[str, str]:
    """A grade-school word problem in GSM8K's style and its integer answer, from one of six templates."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    kind = rng.randrange(6)
    if kind == 0:
        a, (m1, m2) = 2 * rng.randint(5, 60), rng.sample(_MONTHS, 2)
        return (f"{name} sold {item}s to {a} of her friends in {m1}, and then she sold half as many {item}s in "
                f"{m2}. How many {item}s did {name} sell altogether in {m1} and {m2}?", str(a + a // 2))
    if kind == 1:
        rate, minutes = 2 * rng.randint(3, 15), 30 * rng.randint(1, 6)
        return (f"{name} earns ${rate} an hour for babysitting. Yesterday, she just did {minutes} minutes of "
                "babysitting. How much did she earn?", str(rate * minutes // 60))
    if kind == 2:
        cost, parents = 20 * rng.randint(5, 20), 5 * rng.randint(1, 6)
        return (f"{name} is saving money for a new wallet which costs ${cost}. {name} has only half of the money "
                f"she needs. Her parents decided to give her ${parents} for that purpose, and her grandparents "
                f"twice as much as her parents. How much more money does {name} need to buy the wallet?",
                str(cost - cost // 2 - 3 * parents))
    if kind == 3:
        per_box, boxes, each, friends = rng.randint(6, 24), rng.randint(3, 9), rng.randint(1, 4), rng.randint(2, 5)
        return (f"A box holds {per_box} {item}s. {name} buys {boxes} boxes and gives {each} {item}s to each of "
                f"her {friends} friends. How many {item}s does {name} have left?",
                str(per_box * boxes - each * friends))
    if kind == 4:
        sprints, times, meters = rng.randint(2, 6), rng.randint(2, 5), 20 * rng.randint(2, 10)
        return (f"{name} decides to run {sprints} sprints {times} times a week. He runs {meters} meters each "
                "sprint. How many total meters does he run a week?", str(sprints * times * meters))
    cups, flock = rng.randint(2, 4), rng.randint(10, 30)
    morning, afternoon = rng.randint(5, flock), rng.randint(5, flock)
    return (f"Every day, {name} feeds each of her chickens {cups} cups of mixed chicken feed, containing seeds, "
            f"mealworms and vegetables to help keep them healthy. She gives the chickens their feed in three "
            f"separate meals. In the morning, she gives her flock of chickens {morning} cups of feed. In the "
            f"afternoon, she gives her chickens another {afternoon} cups of feed. How many cups of feed does she "
            f"need to give her chickens in the final meal of the day if the size of {name}'s flock is {flock} "
            "chickens?", str(cups * flock - morning - afternoon))


def make_rows(preset: Preset) -> list[dict[str, str]]:
    """The step's 8 prompts {"prompt", "answer"} (the whole dataset: both sides train on all 8 every step)."""
    if preset.task == "gsm8k":
        rng = random.Random(SEED)
        return [dict(zip(("prompt", "answer"), gsm8k_like_question(rng), strict=True))
                for _ in range(PROMPTS_PER_STEP)]
    from examples.toy.toy_task import make_examples

    return make_examples(PROMPTS_PER_STEP, seed=SEED)


def system_prompt(preset: Preset) -> str | None:
    return GSM8K_SYSTEM_PROMPT if preset.task == "gsm8k" else None


def tokenizer_corpus(max_chars: int) -> list[str]:
    """Text the BPE is trained on: generated word problems, the system prompt, toy prompts, then the
    Python standard library's sources (sorted paths, tests left out) up to `max_chars` in all."""
    import sysconfig

    from examples.toy.toy_task import make_examples

    rng = random.Random(1)
    texts = [GSM8K_SYSTEM_PROMPT] * 50
    texts += [" ".join(gsm8k_like_question(rng)) for _ in range(4000)]
    texts += [f"{e['prompt']} {e['answer']}" for e in make_examples(1000, seed=1)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    total = sum(len(t) for t in texts)
    for path in sorted(stdlib.rglob("*.py")):
        if total >= max_chars:
            break
        if any(part in ("test", "tests", "idlelib", "site-packages") for part in path.relative_to(stdlib).parts):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        total += len(text)
    return texts


def build_tokenizer(vocab_size: int):
    """A `PreTrainedTokenizerFast`: byte-level BPE of `vocab_size` tokens (three of them Qwen2's special
    tokens), Qwen2's pre-tokenization, `<|im_end|>` as EOS, `<|endoftext|>` as pad, a Qwen2-style template."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from examples.toy.make_toy_model import QWEN2_PRETOKENIZE_REGEX

    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=[PAD_TOKEN, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(tokenizer_corpus(max_chars=8_000_000 if vocab_size > 4096 else 1_000_000),
                                  trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD_TOKEN, eos_token=IM_END,
                                   additional_special_tokens=[IM_START, IM_END], clean_up_tokenization_spaces=False,
                                   model_max_length=1024)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(preset: Preset, tokenizer):
    """The preset's random `Qwen2ForCausalLM` (untied head, float32), with the EOS clock when `shape_lengths`."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    pad_id, eos_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN), tokenizer.convert_tokens_to_ids(IM_END)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=preset.hidden_size, intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers, num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_kv_heads, max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id)
    if preset.shape_lengths:
        add_length_clock(model, marker_id=tokenizer.convert_tokens_to_ids(IM_START), eos_id=eos_id)
    return model.eval()


# Residual channels of the EOS clock, and the clock's calibration. The EOS logit minus the log of the
# partition function of the other tokens is about KAPPA x (1 - N0 / n) at n tokens so far (prompt + completion):
# 50% hazard at n = N0. Chosen for completions of about 96-256 tokens after prompts of 171-203 tokens:
# 64 completions sampled from the gsm8k model were 79-256 tokens long, median 168, one of them truncated.
_CLOCK, _CONST, _MARK = 1, 2, 3
CLOCK_KAPPA = 7.0
CLOCK_N0 = 540.0
# The two channels' size, in embedding-row norms: large, so that training cannot move the clock. Adam moves
# every weight by about the learning rate at each step, whatever its gradient, the zeroed rows that would
# write into the channels included. Measured on the gsm8k model, a step of 1e-6 on every weight, each in
# the direction that raises the EOS margin (the worst case), moves it by 0.2 nats at this level, by 0.002
# with random directions; with channels of 8 x a mean embedding entry instead it moved by 48 nats, and the
# first update of a run ended every completion within 14 tokens.
CLOCK_LEVEL = 50.0


@torch.no_grad()
def add_length_clock(model, marker_id: int, eos_id: int, kappa: float = CLOCK_KAPPA, n0: float = CLOCK_N0) -> None:
    """Make the EOS logit rise with position (see the module docstring): a layer-0 head attends uniformly
    (its keys are zero) and reads a marker only `marker_id` carries, writing (markers so far) / (tokens so far)
    into residual channel _CLOCK and a constant into _CONST; no other layer writes either channel, and the
    LM head's EOS row reads only those two."""
    inner = model.model
    h = model.config.hidden_size
    head_dim = h // model.config.num_attention_heads
    emb = inner.embed_tokens.weight  # (V, H)
    # Equal-norm embedding rows: layer 0's RMSNorm then divides every token by the same number, so the
    # marker reaches the head as one exact value.
    row_norm = emb.norm(dim=1).mean()
    emb[:, [_CLOCK, _CONST, _MARK]] = 0.0
    norms = emb.norm(dim=1, keepdim=True)
    emb.mul_(torch.where(norms > 0, row_norm / norms.clamp(min=1e-12), 1.0))  # the pad row stays 0 (always masked)
    emb[marker_id].mul_(math.sqrt(0.75))
    emb[marker_id, _MARK] = 0.5 * row_norm
    marker_in = float(0.5 * row_norm / (row_norm / math.sqrt(h)))  # the marker after layer 0's RMSNorm (weight 1)

    attn = inner.layers[0].self_attn
    attn.k_proj.weight[:head_dim] = 0.0  # KV head 0: every score 0, i.e. uniform over the attended tokens
    attn.k_proj.bias[:head_dim] = 0.0
    attn.v_proj.weight[0:2] = 0.0
    attn.v_proj.weight[0, _MARK] = 1.0 / marker_in  # value dim 0: 1 on the marker, 0 elsewhere
    attn.v_proj.bias[0:2] = torch.tensor([0.0, 1.0])  # value dim 1: always 1
    o = attn.o_proj.weight  # (H, heads x head_dim); query head 0's dims 0 and 1 are its input columns 0 and 1
    o[:, 0:2] = 0.0
    o[[_CLOCK, _CONST]] = 0.0
    const_level = float(CLOCK_LEVEL * row_norm)
    o[_CLOCK, 0] = const_level
    o[_CONST, 1] = const_level
    for i, layer in enumerate(inner.layers):
        layer.mlp.down_proj.weight[[_CLOCK, _CONST]] = 0.0
        if i > 0:
            layer.self_attn.o_proj.weight[[_CLOCK, _CONST]] = 0.0

    # The final norm divides by the residual's rms; measure its mean over a sampled sequence once and
    # fold it into the EOS row (its variation is the clock's remaining noise).
    gen = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, model.config.vocab_size, (4, 256), generator=gen)
    ids[:, [0, 40, 60]] = marker_id
    captured = []
    handle = inner.norm.register_forward_hook(lambda module, args, out: captured.append(args[0]))
    try:
        logits = model(input_ids=ids).logits
    finally:
        handle.remove()
    rms = captured[0][:, 64:].pow(2).mean(-1).sqrt().mean().item()
    others = torch.cat([logits[..., :eos_id], logits[..., eos_id + 1:]], dim=-1)
    log_z = torch.logsumexp(others[:, 64:], dim=-1).mean().item()
    # logit_eos = (W[eos, CLOCK] * const_level * markers / n + W[eos, CONST] * const_level) / rms
    #           = log_z + kappa - kappa * n0 / n   with markers = 3 (system, user, assistant)
    head = model.lm_head.weight
    head[eos_id] = 0.0
    head[eos_id, _CONST] = (log_z + kappa) * rms / const_level
    head[eos_id, _CLOCK] = -kappa * n0 / 3.0 * rms / const_level


def _spec_hash(preset: Preset) -> str:
    spec = {"builder": BUILDER_VERSION, "preset": dataclasses.asdict(preset), "seed": SEED,
            "python": list(sys.version_info[:2]), "kappa": CLOCK_KAPPA, "n0": CLOCK_N0, "level": CLOCK_LEVEL}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def build_all(preset: Preset, work_dir: Path) -> tuple[Path, Path]:
    """(model directory with its tokenizer, dataset JSONL), built once per preset and reused (marker file)."""
    model_dir = work_dir / f"model-{preset.name}"
    data_path = work_dir / f"data-{preset.name}.jsonl"
    marker = model_dir / "bench_train.json"
    digest = _spec_hash(preset)
    if not (marker.is_file() and json.loads(marker.read_text()).get("spec") == digest and data_path.is_file()):
        shutil.rmtree(model_dir, ignore_errors=True)
        model_dir.mkdir(parents=True)
        started = time.perf_counter()
        tokenizer = build_tokenizer(preset.vocab_size)
        model = build_model(preset, tokenizer)
        tokenizer.save_pretrained(model_dir)
        model.save_pretrained(model_dir, safe_serialization=True)
        from examples.toy.toy_task import write_jsonl

        write_jsonl(data_path, make_rows(preset))
        marker.write_text(json.dumps({"spec": digest}) + "\n")
        print(f"built tokenizer ({len(tokenizer)} tokens), model and data for preset {preset.name} in "
              f"{model_dir} ({time.perf_counter() - started:.0f} s)", flush=True)
    return model_dir, data_path


def prompt_lengths(preset: Preset, model_dir: Path) -> list[int]:
    """Token count of each of the 8 chat-formatted prompts, as both sides encode them."""
    from grpo_split.modeling import load_tokenizer
    from grpo_split.rollouts.sampling import encode_prompts

    tokenizer = load_tokenizer(str(model_dir))
    return [len(ids) for ids in encode_prompts(tokenizer, [r["prompt"] for r in make_rows(preset)],
                                               system_prompt(preset))]


# ---- the two sides' configurations --------------------------------------------------------------


def checkout_state() -> str:
    """The commit the runs used, and the tracked files changed beside it (others' work in progress)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = [line.split(maxsplit=1)[1] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()
               if line.strip()]
    return commit + (f" with uncommitted changes to {', '.join(changed)}" if changed else "")


def on_gpu() -> bool:
    return torch.cuda.is_available()


def ours_config(preset: Preset, *, model_dir: Path, data_path: Path, output_dir: Path, steps: int,
                ref_server_url: str, gpu: bool = False) -> dict[str, Any]:
    """Our trainer's YAML values (grpo_ref_split.py fields) for the preset."""
    return {
        "model_name_or_path": str(model_dir),
        "dtype": "bfloat16" if gpu else "float32",
        "gradient_checkpointing": False,
        "dataset_name": str(data_path),
        "prompt_column": "prompt",
        "answer_column": "answer",
        "system_prompt": system_prompt(preset),
        "max_prompt_length": 1024,
        "num_generations": NUM_GENERATIONS,
        "prompts_per_step": PROMPTS_PER_STEP,
        "max_completion_length": preset.max_completion_length,
        "temperature": TEMPERATURE,
        "top_p": TOP_P,
        "mask_truncated_completions": False,
        "reward_funcs": list(REWARD_FUNCS),
        "scale_rewards": "group",
        "beta": BETA,
        "epsilon": EPSILON,
        "epsilon_high": None,
        "loss_type": LOSS_TYPE,
        "num_iterations": 1,
        "importance_sampling_level": "token",
        "learning_rate": LEARNING_RATE,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "optim": "adamw_torch",
        "max_steps": steps,
        "gradient_accumulation_steps": preset.gradient_accumulation_steps,
        "max_grad_norm": MAX_GRAD_NORM,
        "seed": SEED,
        "logging_steps": 1,
        "save_steps": steps + 1,  # no checkpoint inside the run (the trainer still saves once at the end)
        "output_dir": str(output_dir),
        "report_to": "none",
        "ref_server_url": [ref_server_url],
        "ref_server_wait": 300.0,
    }


def trl_config_kwargs(preset: Preset, *, output_dir: Path, steps: int, gpu: bool = False) -> dict[str, Any]:
    """GRPOConfig keyword arguments for the same work (the mapping is in the module docstring)."""
    ga = preset.gradient_accumulation_steps
    return {
        "output_dir": str(output_dir),
        "model_init_kwargs": {"dtype": "bfloat16" if gpu else "float32"},
        "use_cpu": not gpu,
        "bf16": gpu,
        "fp16": False,
        "activation_checkpointing": False,  # transformers 5's name; gradient_checkpointing is its deprecated alias
        "num_generations": NUM_GENERATIONS,
        "per_device_train_batch_size": COMPLETIONS_PER_STEP // ga,
        "gradient_accumulation_steps": ga,
        "steps_per_generation": ga,
        "max_completion_length": preset.max_completion_length,
        "temperature": TEMPERATURE,
        "top_p": TOP_P,
        "top_k": 0,
        "min_p": None,
        "repetition_penalty": 1.0,
        "mask_truncated_completions": False,
        "scale_rewards": "group",
        "beta": BETA,
        "epsilon": EPSILON,
        "epsilon_high": None,
        "loss_type": LOSS_TYPE,
        "num_iterations": 1,
        "importance_sampling_level": "token",
        "use_bias_correction_kl": False,
        "learning_rate": LEARNING_RATE,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "optim": "adamw_torch",
        "max_grad_norm": MAX_GRAD_NORM,
        "max_steps": steps,
        "seed": SEED,
        "shuffle_dataset": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "remove_unused_columns": False,
    }


# (our field, TRL field): settings that must be equal on both sides. The rest of the mapping (batch shape,
# dtype, rewards, prompts) is checked by `check_same_work`.
SAME_SETTINGS = (
    ("num_generations", "num_generations"),
    ("max_completion_length", "max_completion_length"),
    ("temperature", "temperature"),
    ("top_p", "top_p"),
    ("mask_truncated_completions", "mask_truncated_completions"),
    ("scale_rewards", "scale_rewards"),
    ("beta", "beta"),
    ("epsilon", "epsilon"),
    ("epsilon_high", "epsilon_high"),
    ("loss_type", "loss_type"),
    ("num_iterations", "num_iterations"),
    ("importance_sampling_level", "importance_sampling_level"),
    ("learning_rate", "learning_rate"),
    ("lr_scheduler_type", "lr_scheduler_type"),
    ("warmup_steps", "warmup_steps"),
    ("weight_decay", "weight_decay"),
    ("optim", "optim"),
    ("max_grad_norm", "max_grad_norm"),
    ("max_steps", "max_steps"),
    ("gradient_accumulation_steps", "gradient_accumulation_steps"),
    ("seed", "seed"),
    ("gradient_checkpointing", "activation_checkpointing"),
)


def _plain(value: Any) -> Any:
    """Enum members (TrainingArguments turns several strings into enums) as their string values."""
    return getattr(value, "value", value)


def check_same_work(ours: dict[str, Any], trl: Any) -> list[str]:
    """Differences between our YAML values and TRL's settings (a GRPOConfig, or its keyword arguments):
    an empty list when both sides do the same work per step."""
    get = (lambda name: trl.get(name)) if isinstance(trl, dict) else (lambda name: getattr(trl, name))
    problems = [f"{a}={ours[a]!r} but TRL {b}={_plain(get(b))!r}" for a, b in SAME_SETTINGS
                if ours[a] != _plain(get(b))]
    completions = ours["prompts_per_step"] * ours["num_generations"]
    per_update = get("per_device_train_batch_size") * get("gradient_accumulation_steps")
    if per_update != completions:
        problems.append(f"TRL trains on {per_update} completions per update, ours on {completions}")
    if get("steps_per_generation") not in (None, get("gradient_accumulation_steps")):
        problems.append("TRL generates more or less often than once per optimizer step")
    if not isinstance(trl, dict) and trl.generation_batch_size != completions:
        problems.append(f"TRL generates {trl.generation_batch_size} completions per generation, ours {completions}")
    if get("top_k") not in (0, None) or get("min_p") is not None or get("repetition_penalty") != 1.0:
        problems.append("TRL samples from another distribution than softmax(logits / T) with top-p")
    if get("use_bias_correction_kl"):
        problems.append("TRL multiplies the KL term by the importance ratio; our loss does not")
    want_dtype = {"float32": (False, "float32"), "bfloat16": (True, "bfloat16")}[ours["dtype"]]
    have = (bool(get("bf16")), (get("model_init_kwargs") or {}).get("dtype"))
    if have != want_dtype or get("fp16"):
        problems.append(f"precision differs: ours dtype {ours['dtype']}, TRL bf16={have[0]} dtype={have[1]}")
    return problems


# ---- FLOP accounting ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Work:
    """What one phase pushes through the model: positions through the decoder layers, positions whose
    logits are computed, (query, key) pairs of attention, and passes (1 forward; 3 forward + backward)."""

    body_tokens: float
    head_positions: float
    attention_pairs: float
    passes: int = 1

    def flops(self, arch: Arch) -> float:
        per_pass = (2.0 * arch.layer_matmul_params * self.body_tokens + 2.0 * arch.head_params * self.head_positions
                    + 4.0 * arch.num_layers * arch.num_heads * arch.head_dim * self.attention_pairs)
        return self.passes * per_pass

    def __rmul__(self, times: float) -> Work:
        return Work(times * self.body_tokens, times * self.head_positions, times * self.attention_pairs, self.passes)

    def __add__(self, other: Work) -> Work:
        if self.passes != other.passes:
            raise ValueError("cannot add work of different passes")
        return Work(self.body_tokens + other.body_tokens, self.head_positions + other.head_positions,
                    self.attention_pairs + other.attention_pairs, self.passes)


def causal_pairs(length: float) -> float:
    """(query, key) pairs of causal attention over one sequence of `length` tokens."""
    return length * (length + 1) / 2


def generate_work(rows: int, prompt_pad: float, completion_pad: float, *, prefill_rows: int | None = None) -> Work:
    """Decoding with a KV cache (HF `generate`, or our `decode`) on `rows` left-padded prompts of `prompt_pad`
    tokens, until the longest completion (`completion_pad` tokens; finished rows stay in the batch): the prefill, then
    completion_pad - 1 one-token steps; logits for the prefill's last position and each step.
    `prefill_rows` < rows: the first prompt_pad - 1 prompt tokens are forwarded once per distinct prompt
    (`prefill_rows` of them) and expanded to the rows, which then forward their last prompt token each."""
    P, C = prompt_pad, completion_pad
    if prefill_rows is None or prefill_rows >= rows:
        prefill = Work(rows * P, 0.0, rows * causal_pairs(P))
    else:
        prefill = Work(prefill_rows * (P - 1) + rows, 0.0, prefill_rows * causal_pairs(P - 1) + rows * P)
    decode = Work(rows * (C - 1), 0.0, rows * ((C - 1) * P + C * (C - 1) / 2))
    return prefill + decode + Work(0.0, rows * C, 0.0)


def sequence_work(rows: int, length: float, head_positions: float, passes: int) -> Work:
    """A forward (passes=1) or forward + backward (passes=3) of `rows` sequences of `length` tokens."""
    return Work(rows * length, head_positions, rows * causal_pairs(length), passes)


def useful_work(prompt_lengths: Sequence[float], completion_lengths: Sequence[float]) -> dict[str, Work]:
    """The same phases over real tokens only (no padding; each row forwards its own prompt): the cost of
    this step's work at zero padding, the same for both sides (per-row lengths; means where only means
    are known)."""
    rows = len(prompt_lengths)
    prompts, completions = sum(prompt_lengths), sum(completion_lengths)
    generate = Work(prompts + completions - rows, completions,
                    sum(causal_pairs(p + c - 1) for p, c in zip(prompt_lengths, completion_lengths, strict=True)))
    forward = Work(prompts + completions, completions,
                   sum(causal_pairs(p + c) for p, c in zip(prompt_lengths, completion_lengths, strict=True)))
    return {"generate": generate, "reference": forward,
            "update": Work(forward.body_tokens, forward.head_positions, forward.attention_pairs, 3)}


def phase_flops(arch: Arch, works: dict[str, Work]) -> dict[str, float]:
    """FLOPs of each phase's work, and their sum as "step"."""
    flops = {name: work.flops(arch) for name, work in works.items()}
    flops["step"] = sum(flops.values())
    return flops


def measure_matmul_peak(seconds: float = 3.0, size: int = 2048, *, gpu: bool = False) -> float:
    """Best FLOP/s of a `size` x `size` torch.mm over about `seconds`: float32 on this process's CPU threads,
    or bfloat16 on the GPU (size 8192) when the sides train there."""
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    size = 8192 if gpu else size
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    torch.mm(a, b, out=out)
    _sync()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        _sync()
        best = max(best, 2.0 * size**3 / (time.perf_counter() - start))
    return best


# ---- running ours ------------------------------------------------------------------------------

DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class RefServer:
    """`ref_server.py` on a free loopback port (port 0; the URL comes from its ready line), output in a log file."""

    def __init__(self, model_dir: Path, log_path: Path, *, gpu: bool, timeout: float = 300.0):
        cmd = [sys.executable, str(REPO / "ref_server.py"), "--model_name_or_path", str(model_dir), "--port", "0",
               "--device", "cuda" if gpu else "cpu", "--dtype", "bfloat16" if gpu else "float32",
               "--max_batch_tokens", str(REF_MAX_BATCH_TOKENS)]
        self.log_path = log_path
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=_clean_env())
        found: list[str] = []

        def read() -> None:
            for line in self.proc.stdout:
                self.log.write(line)
                self.log.flush()
                match = re.search(r"ready at (http://\S+)", line)
                if match and not found:
                    found.append(match.group(1))

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not found:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the reference server did not become ready; see {log_path}:\n{_tail(log_path)}")
            time.sleep(0.1)
        self.url = found[0]

    def stats(self) -> dict:
        import requests

        return requests.get(f"{self.url}/stats", timeout=30).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _clean_env() -> dict[str, str]:
    # A world of one: no launcher variables inherited from whoever started the benchmark.
    env = {key: value for key, value in os.environ.items() if key not in DIST_ENV}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "".join(Path(path).read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except OSError:
        return ""


def prompt_sharing_plan(model_dir: Path) -> bool:
    """Whether our code forwards each group's prompt once for this model: `grpo_split.modeling.prefix_plan`,
    the check the trainer and the server run at load, run here on the same weights (False in a checkout
    without it)."""
    from grpo_split import modeling

    if not hasattr(modeling, "prefix_plan"):
        return False
    return bool(modeling.prefix_plan(modeling.load_causal_lm(str(model_dir), torch.float32)).shared)


def detect_prompt_sharing(log_text: str, planned: bool) -> bool:
    """`planned` unless the process's log says a prompt was forwarded per row after all (grpo_split.modeling
    warns "Prompt sharing: ... every row forwards its own prompt" when its check fails or checkpointing is on)."""
    return planned and not any("Prompt sharing:" in line and "every row forwards its own prompt" in line
                               for line in log_text.splitlines())


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process, all its threads (Linux /proc); None where unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


class StepCpuPoller(threading.Thread):
    """CPU seconds of our trainer and server processes at each new metrics.jsonl line (one per step): the
    difference between two lines is the CPU a step used, a steadier measure than wall time while other
    processes load the machine (it still grows when threads spin waiting for a core)."""

    def __init__(self, metrics_path: Path, pids: list[int], interval: float = 0.1):
        super().__init__(daemon=True)
        self.metrics_path, self.pids, self.interval = metrics_path, pids, interval
        self.readings: list[float | None] = []  # CPU seconds when line k + 1 appeared
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                lines = self.metrics_path.read_text().count("\n")
            except OSError:
                lines = 0
            if lines > len(self.readings):
                cpu = [process_cpu_seconds(pid) for pid in self.pids]
                total = None if None in cpu else sum(cpu)
                self.readings.extend([total] * (lines - len(self.readings)))
            self.stopped.wait(self.interval)

    def per_step(self) -> list[float | None]:
        """CPU seconds of each step (None for the first, which has no reading before it)."""
        r = self.readings
        return [None] + [b - a if a is not None and b is not None else None for a, b in zip(r, r[1:], strict=False)]


def run_ours(preset: Preset, model_dir: Path, data_path: Path, run_dir: Path, steps: int, *, gpu: bool,
             timeout: float) -> dict:
    """`python grpo_ref_split.py --config ours.yaml` with a reference server; its metrics.jsonl per step."""
    import yaml

    from grpo_split.training.metrics import read_metrics

    output_dir = run_dir / "ours"
    shutil.rmtree(output_dir, ignore_errors=True)
    server = RefServer(model_dir, run_dir / "ref_server.log", gpu=gpu)
    log_path = run_dir / "ours.log"
    try:
        values = ours_config(preset, model_dir=model_dir, data_path=data_path, output_dir=output_dir, steps=steps,
                             ref_server_url=server.url, gpu=gpu)
        config_path = run_dir / "ours.yaml"
        config_path.write_text(yaml.safe_dump(values, sort_keys=False))
        cmd = [sys.executable, str(REPO / "grpo_ref_split.py"), "--config", str(config_path)]
        print(f"ours: $ {' '.join(cmd)}  (reference server at {server.url}; log {log_path})", flush=True)
        started = time.perf_counter()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, env=_clean_env(), stdout=log, stderr=subprocess.STDOUT)
            poller = StepCpuPoller(output_dir / "metrics.jsonl", [proc.pid, server.proc.pid])
            poller.start()
            try:
                returncode = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise
            finally:
                poller.stopped.set()
                poller.join()
        wall = time.perf_counter() - started
        if returncode != 0:
            raise RuntimeError(f"grpo_ref_split.py exited with {returncode}; see {log_path}:\n{_tail(log_path)}")
        server_stats = server.stats()
    finally:
        server.stop()
    metrics = read_metrics(output_dir / "metrics.jsonl")
    for step, cpu in zip(metrics, poller.per_step(), strict=False):
        step["cpu_seconds"] = cpu
    planned = prompt_sharing_plan(model_dir)
    return {"steps": metrics, "server": server_stats, "wall_seconds": wall, "log": str(log_path),
            "prompt_sharing": detect_prompt_sharing(log_path.read_text(errors="replace"), planned),
            "server_prompt_sharing": detect_prompt_sharing(_tail(run_dir / "ref_server.log", 400), planned),
            "timing_logged": all(f"timing/{p}" in metrics[-1] for p in ("generate", "rewards", "reference", "update"))}


# ---- running TRL -------------------------------------------------------------------------------


def _message_texts(items: Sequence[Any]) -> list[str]:
    """TRL hands conversational prompts and completions as message lists; our rewards take their text."""
    return [item if isinstance(item, str) else item[-1]["content"] for item in items]


def trl_reward_funcs() -> list:
    """Our built-in reward functions (REWARD_FUNCS) under their own names, called with TRL's arguments."""
    from grpo_split.rollouts.rewards import BUILTIN_REWARDS

    funcs = []
    for name in REWARD_FUNCS:
        def adapter(prompts, completions, _reward=BUILTIN_REWARDS[name], **columns):
            answer = {"answer": columns["answer"]} if "answer" in columns else {}
            return _reward(_message_texts(prompts), _message_texts(completions), **answer)

        adapter.__name__ = adapter.__qualname__ = name
        funcs.append(adapter)
    return funcs


def trl_rows(preset: Preset) -> list[dict]:
    """The 8 prompts as TRL's conversational dataset rows (system turn first when there is one)."""
    system = system_prompt(preset)
    return [{"prompt": ([{"role": "system", "content": system}] if system else [])
             + [{"role": "user", "content": row["prompt"]}], "answer": row["answer"]} for row in make_rows(preset)]


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class TrlProbe:
    """Wall-clock timers around GRPOTrainer's phases, per optimizer step (built lazily: transformers'
    TrainerCallback is its base class, see `make_trl_probe`)."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self._current: dict[str, float] | None = None
        self._lengths: dict[str, list[int]] = {}
        self._began = self._optimizer_began = self._cpu_began = 0.0

    def instrument(self, trainer) -> None:
        self._wrap(trainer, "_generate", "generate", self._record_lengths)
        self._wrap(trainer, "_calculate_rewards", "rewards")
        self._wrap(trainer, "compute_loss", "update")
        self._wrap(trainer, "_clip_grad_norm", "update")
        self._wrap(trainer.accelerator, "backward", "update")
        original = trainer._get_per_token_logps_and_entropies

        def logps(model, *args, **kwargs):
            if model is not trainer.ref_model:  # the policy's forward inside compute_loss: timed there
                return original(model, *args, **kwargs)
            with self.phase("reference"):
                return original(model, *args, **kwargs)

        trainer._get_per_token_logps_and_entropies = logps

    def _wrap(self, owner, name: str, phase: str, after=None) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            with self.phase(phase):
                result = original(*args, **kwargs)
            if after is not None:
                after(result)
            return result

        setattr(owner, name, timed)

    @contextlib.contextmanager
    def phase(self, name: str):
        _sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            _sync()
            if self._current is not None:
                self._current[name] = self._current.get(name, 0.0) + time.perf_counter() - start

    def _record_lengths(self, result) -> None:
        prompt_ids, completion_ids = result[0], result[1]
        self._lengths = {"prompt_lengths": [len(ids) for ids in prompt_ids],
                         "completion_lengths": [len(ids) for ids in completion_ids]}

    # TrainerCallback hooks
    def on_step_begin(self, args, state, control, **kwargs):
        _sync()
        self._current = {}
        self._began = time.perf_counter()
        self._cpu_began = time.process_time()  # this process's CPU seconds, all threads

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        _sync()
        self._optimizer_began = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kwargs):
        _sync()
        if self._current is not None:
            self._current["update"] = self._current.get("update", 0.0) + time.perf_counter() - self._optimizer_began

    def on_step_end(self, args, state, control, **kwargs):
        _sync()
        step_time = time.perf_counter() - self._began
        phases = {f"timing/{name}": self._current.get(name, 0.0) for name in ("generate", "rewards", "reference",
                                                                              "update")}
        phases["timing/other"] = max(0.0, step_time - sum(phases.values()))
        self.steps.append({"step": state.global_step, "step_time": step_time, **phases, **self._lengths,
                           "cpu_seconds": time.process_time() - self._cpu_began})
        self._current = None
        print(f"TRL step {state.global_step}: {step_time:.1f} s (" + ", ".join(
            f"{name.split('/')[1]} {seconds:.1f}" for name, seconds in phases.items()) + ")", flush=True)


def make_trl_probe() -> TrlProbe:
    from transformers import TrainerCallback

    return type("TrlProbeCallback", (TrlProbe, TrainerCallback), {})()


def run_trl(preset: Preset, model_dir: Path, run_dir: Path, steps: int, *, gpu: bool, ours_values: dict) -> dict:
    """GRPOTrainer in this process on the same model, tokenizer, prompts and rewards; per-step timings."""
    import datasets
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo_split.modeling import load_tokenizer

    args = GRPOConfig(**trl_config_kwargs(preset, output_dir=run_dir / "trl", steps=steps, gpu=gpu))
    problems = check_same_work(ours_values, args)
    if problems:
        raise RuntimeError("the two sides would not do the same work: " + "; ".join(problems))
    probe = make_trl_probe()
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=trl_reward_funcs(), args=args,
                          train_dataset=datasets.Dataset.from_list(trl_rows(preset)),
                          processing_class=load_tokenizer(str(model_dir)), callbacks=[probe])
    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    probe.instrument(trainer)
    print(f"TRL: GRPOTrainer, {steps} steps, in this process (generation_batch_size {args.generation_batch_size}, "
          f"{args.per_device_train_batch_size} x {args.gradient_accumulation_steps} per update)", flush=True)
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    head_compact = gpu  # TRL's fused head scores only the completion positions on Triton devices
    return {"steps": probe.steps, "wall_seconds": wall, "head_all_positions": not head_compact}


# ---- analysis and report -------------------------------------------------------------------------

PHASES = ("generate", "rewards", "reference", "update", "other")
FLOP_PHASES = ("generate", "reference", "update")


def timed_steps(steps: list[dict]) -> list[dict]:
    """The steps that count: all but the first (the warm-up), unless there is only one."""
    return steps[1:] if len(steps) > 1 else steps


def median_of(steps: list[dict], key: str) -> float | None:
    values = [float(s[key]) for s in timed_steps(steps) if isinstance(s.get(key), (int, float))]
    return statistics.median(values) if values else None


def min_of(steps: list[dict], key: str) -> float | None:
    """The fastest timed step: on a shared machine, the one least slowed by other processes."""
    values = [float(s[key]) for s in timed_steps(steps) if isinstance(s.get(key), (int, float))]
    return min(values) if values else None


def shared_prompt_work(rows: int, distinct: int, prompt_pad: float, completion_pad: float, passes: int) -> Work:
    """`completion_hidden` with each distinct prompt forwarded once: the first prompt_pad - 1 tokens of
    `distinct` prompts, then every row's tail (its last prompt token and all but its last completion token,
    completion_pad positions, attending to the cached prompt); logits at the tail's positions."""
    P, C = prompt_pad, completion_pad
    return Work(distinct * (P - 1) + rows * C, rows * C,
                distinct * causal_pairs(P - 1) + rows * (C * P + C * (C - 1) / 2), passes)


def reference_distinct_prompts(rows: int, length: int, max_batch_tokens: int = REF_MAX_BATCH_TOKENS) -> int:
    """Distinct prompts the server forwards for one request: it cuts the rows into chunks of
    max_batch_tokens // length (`grpo_split.modeling.row_chunks`), and a group split over two chunks is
    forwarded in each."""
    per_chunk = max(1, max_batch_tokens // max(length, 1))
    groups = [{r // NUM_GENERATIONS for r in range(start, min(start + per_chunk, rows))}
              for start in range(0, rows, per_chunk)]
    return sum(len(g) for g in groups)


def ours_step_work(preset: Preset, step: dict, prompt_lens: Sequence[int], *, prompt_sharing: bool,
                   server_sharing: bool | None = None) -> tuple[dict[str, Work], dict[str, Work]]:
    """(work as computed, useful work) of one of our steps, from its metrics line and the prompts' lengths.

    The update's micro-batches are trimmed of all-padding columns (grpo_split.training.update.trim_padding):
    `padding_fraction` gives the positions they hold, real tokens / (1 - padding_fraction). A micro-batch of
    exactly one group (gsm8k) has no prompt padding, so its completion columns are the rest; with several
    groups per micro-batch (short, medium: every completion runs to the maximum) each row keeps all C
    completion columns and the rest are prompt columns. With `prompt_sharing`, each micro-batch forwards its
    distinct prompts once (their first P' - 1 tokens) and every row its C' + 1 - 1 tail positions."""
    rows, G = COMPLETIONS_PER_STEP, NUM_GENERATIONS
    P = max(prompt_lens)
    C = int(step["completions/max_length"])
    mean_c = float(step["completions/mean_length"])
    row_prompts = [p for p in prompt_lens for _ in range(G)]
    generate = generate_work(rows, P, C, prefill_rows=PROMPTS_PER_STEP if prompt_sharing else None)
    if prompt_sharing if server_sharing is None else server_sharing:
        reference = shared_prompt_work(rows, reference_distinct_prompts(rows, P + C), P, C, 1)
    else:
        reference = sequence_work(rows, P + C, rows * C, 1)  # the server's fused head: completion positions only
    micro, batches = preset.micro_batch, preset.gradient_accumulation_steps
    padding = step.get("padding_fraction")
    if padding is None:  # a trainer whose micro-batches keep the full width
        prompt_columns, completion_columns = batches * P, batches * C  # summed over the micro-batches
    else:
        computed = (sum(row_prompts) + rows * mean_c) / (1.0 - padding)
        if micro == G:
            prompt_columns = sum(prompt_lens)
            completion_columns = computed / micro - prompt_columns
        else:
            completion_columns = batches * C
            prompt_columns = computed / micro - completion_columns
    mean_p, mean_c_cols = prompt_columns / batches, completion_columns / batches  # per micro-batch
    if prompt_sharing:
        update = batches * shared_prompt_work(micro, micro // G, mean_p, mean_c_cols, 3)
    else:
        update = batches * sequence_work(micro, mean_p + mean_c_cols, micro * mean_c_cols, 3)
    return ({"generate": generate, "reference": reference, "update": update},
            useful_work(row_prompts, [mean_c] * rows))


def trl_step_work(step: dict, *, head_all_positions: bool) -> tuple[dict[str, Work], dict[str, Work]]:
    """(work as computed, useful work) of one TRL step, from the lengths its `_generate` returned."""
    prompts, completions = step["prompt_lengths"], step["completion_lengths"]
    rows, P, C = len(completions), max(prompts), max(completions)
    head = rows * (P + C - 1) if head_all_positions else sum(completions)
    return ({"generate": generate_work(rows, P, C), "reference": sequence_work(rows, P + C, head, 1),
             "update": sequence_work(rows, P + C, head, 3)}, useful_work(prompts, completions))


def side_summary(arch: Arch, steps: list[dict], works: list[tuple[dict, dict]], phase_seconds: dict[str, float]
                 ) -> dict:
    """Medians over the timed steps: seconds per phase, FLOPs (computed, useful) per phase, FLOP/s."""
    kept = works[1:] if len(works) > 1 else works
    flops = {p: statistics.median(phase_flops(arch, w)[p] for w, _ in kept) for p in (*FLOP_PHASES, "step")}
    useful = {p: statistics.median(phase_flops(arch, u)[p] for _, u in kept) for p in (*FLOP_PHASES, "step")}
    rates = {p: flops[p] / phase_seconds[p] if phase_seconds.get(p) else None for p in flops}
    useful_rates = {p: useful[p] / phase_seconds[p] if phase_seconds.get(p) else None for p in flops}
    return {"flops": flops, "useful_flops": useful, "seconds": phase_seconds, "flops_per_second": rates,
            "useful_flops_per_second": useful_rates}


def analyze(preset: Preset, prompt_lens: list[int], ours: dict | None, trl: dict | None) -> dict:
    arch = Arch.of(preset)
    result: dict[str, Any] = {}
    if ours is not None:
        steps = ours["steps"]
        works = [ours_step_work(preset, s, prompt_lens, prompt_sharing=ours["prompt_sharing"],
                                server_sharing=ours.get("server_prompt_sharing", ours["prompt_sharing"]))
                 for s in steps]
        seconds = {p: median_of(steps, f"timing/{p}") for p in PHASES}
        seconds["step"] = median_of(steps, "step_time")
        fastest = min_of(steps, "step_time")
        server = ours.get("server") or {}
        batches = server.get("batches_processed") or 0
        busy = server["tokens_processed"] / server["tokens_per_second"] if server.get("tokens_per_second") else None
        server_forward = busy / batches if busy and batches else None
        flop_seconds = {"generate": seconds["generate"], "reference": server_forward, "update": seconds["update"],
                        "step": seconds["step"]}
        result["ours"] = {**side_summary(arch, steps, works, flop_seconds), "phase_seconds": seconds,
                          "fastest_step_seconds": fastest, "load": ours.get("load"),
                          "cpu_seconds": median_of(steps, "cpu_seconds"),
                          "server_forward_seconds": server_forward,
                          "tokens_per_second": {k: median_of(steps, k) for k in steps[-1]
                                                if k.startswith("tokens_per_second")},
                          "completion_mean": median_of(steps, "completions/mean_length"),
                          "completion_max": median_of(steps, "completions/max_length"),
                          "padding_fraction": median_of(steps, "padding_fraction"),
                          "timing_logged": ours["timing_logged"], "prompt_sharing": ours["prompt_sharing"]}
    if trl is not None:
        steps = trl["steps"]
        for s in steps:
            s["completions/mean_length"] = statistics.fmean(s["completion_lengths"])
            s["completions/max_length"] = max(s["completion_lengths"])
        works = [trl_step_work(s, head_all_positions=trl["head_all_positions"]) for s in steps]
        seconds = {p: median_of(steps, f"timing/{p}") for p in PHASES}
        seconds["step"] = median_of(steps, "step_time")
        result["trl"] = {**side_summary(arch, steps, works, seconds), "phase_seconds": seconds,
                         "fastest_step_seconds": min_of(steps, "step_time"), "load": trl.get("load"),
                         "cpu_seconds": median_of(steps, "cpu_seconds"),
                         "completion_mean": median_of(steps, "completions/mean_length"),
                         "completion_max": median_of(steps, "completions/max_length")}
    if ours is not None and trl is not None:
        result["ratio_ours_over_trl_step_rate"] = result["trl"]["phase_seconds"]["step"] / \
            result["ours"]["phase_seconds"]["step"]
        result["ratio_fastest_steps"] = result["trl"]["fastest_step_seconds"] / result["ours"]["fastest_step_seconds"]
        if result["ours"]["cpu_seconds"] and result["trl"]["cpu_seconds"]:
            result["ratio_cpu_seconds"] = result["trl"]["cpu_seconds"] / result["ours"]["cpu_seconds"]
    return result


def _f(value: float | None, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}{spec}}"


def report(preset: Preset, prompt_lens: list[int], analysis: dict, peaks: list[float], steps: int, *,
           gpu: bool = False, checkout: str | None = None) -> str:
    arch = Arch.of(preset)
    peak = max(peaks)
    out = []
    timed = f"medians of steps 2..{steps}" if steps > 1 else "one step, no warm-up excluded"
    out.append(f"=== bench_train --preset {preset.name}: {steps} steps, {timed} ===")
    if checkout:
        out.append(f"checkout: {checkout}")
    out.append(f"model: random Qwen2, hidden {arch.hidden_size}, {arch.num_layers} layers, {arch.num_heads} heads "
               f"({arch.num_kv_heads} KV), MLP {arch.intermediate_size}, vocabulary {arch.vocab_size}, untied head: "
               f"{arch.total_params / 1e6:.1f}M parameters ({arch.layer_matmul_params / 1e6:.1f}M in layer matmuls, "
               f"{arch.head_params / 1e6:.1f}M LM head)")
    out.append(f"work per step: {PROMPTS_PER_STEP} prompts x {NUM_GENERATIONS} completions, prompts of "
               f"{min(prompt_lens)}-{max(prompt_lens)} tokens, completions of at most {preset.max_completion_length}, "
               f"micro-batches of {preset.micro_batch} (gradient accumulation {preset.gradient_accumulation_steps})")
    kind = "bfloat16 8192^3 torch.mm on the GPU" if gpu else "float32 2048^3 torch.mm"
    out.append(f"machine: {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs; matmul peak ({kind}) "
               f"{' / '.join(f'{p / 1e9:.1f}' for p in peaks)} GFLOP/s (measured before, "
               f"{'between and ' if len(peaks) > 2 else ''}after the runs; the highest is the peak); shared and noisy")
    ours, trl = analysis.get("ours"), analysis.get("trl")
    sides = [(name, side) for name, side in (("ours", ours), ("TRL", trl)) if side is not None]
    out.append("")
    out.append("step time (median): " + "   ".join(f"{n} {s['phase_seconds']['step']:.2f} s" for n, s in sides)
               + "      fastest step: " + "   ".join(f"{n} {s['fastest_step_seconds']:.2f} s" for n, s in sides))
    if "ratio_ours_over_trl_step_rate" in analysis:
        out.append(f"ratio ours / TRL step rate: {analysis['ratio_ours_over_trl_step_rate']:.2f}x from the medians, "
                   f"{analysis['ratio_fastest_steps']:.2f}x from the fastest steps (above 1: ours does a step faster)")
    if all(s.get("cpu_seconds") for _, s in sides):
        out.append("CPU seconds per step (median; all threads; ours = trainer + reference server): " + "   ".join(
            f"{n} {s['cpu_seconds']:.1f}" for n, s in sides)
            + (f"   ratio TRL / ours {analysis['ratio_cpu_seconds']:.2f}x" if "ratio_cpu_seconds" in analysis else ""))
    out.append("machine load (1-min load average at each side's start and end): " + "   ".join(
        f"{n} {s['load'][0]:.1f} -> {s['load'][1]:.1f}" for n, s in sides if s.get("load")))
    out.append("completion length (median of the step means / maxima): "
               + "   ".join(f"{n} {s['completion_mean']:.1f} / {s['completion_max']:.0f}" for n, s in sides))

    out.append("")
    out.append("seconds per step by phase (each phase's own median, so the rows need not add up to the step's; "
               "shares of the median step)")
    out.append(f"{'phase':<11}" + "".join(f"{n + ' s':>11}{'share':>7}" for n, _ in sides))
    for phase in (*PHASES, "step"):
        cells = ""
        for _, side in sides:
            seconds, total = side["phase_seconds"].get(phase), side["phase_seconds"]["step"]
            share = None if seconds is None or not total else 100 * seconds / total
            cells += _f(seconds, ".2f", 11) + (_f(share, ".0f", 6) + "%" if share is not None else f"{'-':>7}")
        out.append(f"{phase:<11}{cells}")
    if ours is not None:
        if not ours["timing_logged"]:
            out.append("ours: this checkout's trainer logs no timing/* keys; only step_time is shown")
        else:
            out.append("ours: reference = the wait for /logps beyond the update's first forward (the request runs "
                       "alongside it, on the same cores here)")
        if ours["server_forward_seconds"] is not None:
            out.append(f"ours: the reference server's forward took {ours['server_forward_seconds']:.2f} s per step "
                       "(its /stats busy seconds / requests)")
        if ours["tokens_per_second"]:
            out.append("ours tokens/s (metrics.jsonl): " + ", ".join(
                f"{k.split('/', 1)[1] if '/' in k else 'step'} {v:.0f}" for k, v in ours["tokens_per_second"].items()
                if v is not None))
    if trl is not None:
        out.append("TRL: timers around _generate, _calculate_rewards, reference-model log-probs, and compute_loss + "
                   "backward + clipping + optimizer.step; other = the rest of the step")

    out.append("")
    out.append(f"model FLOPs per step and achieved rate (peak {peak / 1e9:.1f} GFLOP/s)")
    out.append(f"{'phase':<11}{'side':<6}{'GFLOP':>9}{'useful':>9}{'vs use':>9}{'seconds':>9}{'GFLOP/s':>9}"
               f"{'% peak':>8}{'useful/s':>10}")
    for phase in (*FLOP_PHASES, "step"):
        for name, side in sides:
            flops, useful = side["flops"][phase], side["useful_flops"][phase]
            seconds, rate, urate = side["seconds"].get(phase), side["flops_per_second"][phase], \
                side["useful_flops_per_second"][phase]
            out.append(f"{phase:<11}{name:<6}{flops / 1e9:9.1f}{useful / 1e9:9.1f}"
                       f"{100 * (flops / useful - 1):+8.0f}%" + _f(seconds, ".2f", 9)
                       + _f(None if rate is None else rate / 1e9, ".1f", 9)
                       + (_f(100 * rate / peak, ".1f", 7) + "%" if rate else f"{'-':>8}")
                       + _f(None if urate is None else urate / 1e9, ".1f", 10))
    sharing = bool(ours and ours["prompt_sharing"])
    out.append("GFLOP: as each side computes it, padding included (TRL: LM head on every position on a CPU; ours: on "
               "completion positions, " + ("each group's prompt forwarded once in generation, reference and update"
                                           if sharing else "every row forwarding its own prompt") + "); useful: real "
               "tokens only, each row with its own prompt, the same definition for both sides; vs use: GFLOP / useful "
               "- 1 (+ padding and prompt logits, - shared prompts); ours' reference seconds are the server's forward "
               "time")
    out.append("")
    out.append("where the rest of the time goes")
    for name, side in sides:
        out.extend(f"  {name}: {line}" for line in explain(preset, side, peak, trl=name == "TRL"))
    return "\n".join(out)


def _against_useful(computed: float, useful: float, more: str) -> str:
    """How a phase's computed FLOPs compare with the useful count, and why."""
    change = computed / useful - 1
    if change >= 0:
        return f"{100 * change:.0f}% more FLOPs than the useful count ({more})"
    return f"{-100 * change:.0f}% fewer FLOPs than the useful count (each group's prompt forwarded once; padding " \
        "included)"


def explain(preset: Preset, side: dict, peak: float, *, trl: bool) -> list[str]:
    """A few sentences per side: how far each phase is from the peak, and why (padding, small matmuls, waits)."""
    lines = []
    seconds, flops, useful = side["phase_seconds"], side["flops"], side["useful_flops"]
    step = seconds["step"]
    lines.append(f"at the measured peak this step's {flops['step'] / 1e9:.0f} GFLOP would take "
                 f"{flops['step'] / peak:.2f} s; it took {step:.2f} s ({100 * flops['step'] / peak / step:.0f}% of "
                 "peak overall)")
    gen = seconds.get("generate")
    if gen:
        tokens, mean = side["completion_max"], side["completion_mean"]
        per_step = flops["generate"] / max(tokens, 1) / 1e9
        lines.append(
            f"generate {gen:.2f} s: a prefill, then {tokens - 1:.0f} one-token steps of {COMPLETIONS_PER_STEP} rows, "
            f"{1e3 * gen / max(tokens, 1):.0f} ms and {per_step:.2f} GFLOP each on average: "
            f"matmuls of {COMPLETIONS_PER_STEP} rows, sampling over the vocabulary"
            + (" (torch.multinomial, in HF generate)" if trl else "") + " and per-step overhead keep it at "
            f"{100 * flops['generate'] / peak / gen:.1f}% of peak; rows that ended keep decoding until the longest "
            f"does ({100 * (1 - mean / max(tokens, 1)):.0f}% of the completion positions); "
            + _against_useful(flops["generate"], useful["generate"], "padding"))
    upd = seconds.get("update")
    if upd:
        lines.append(f"update {upd:.2f} s at {100 * flops['update'] / peak / upd:.0f}% of peak; "
                     + _against_useful(flops["update"], useful["update"],
                                       "padding and logits at prompt positions" if trl else "padding"))
    ref = side["seconds"].get("reference")
    if ref and trl:
        lines.append(f"reference forward {ref:.2f} s in the step, at {100 * flops['reference'] / peak / ref:.0f}% of "
                     "peak; " + _against_useful(flops["reference"], useful["reference"],
                                                "padding and logits at prompt positions"))
    elif ref:
        waited = seconds.get("reference")
        rate = 100 * flops["reference"] / peak / ref
        lines.append(f"reference forward {ref:.2f} s in the server process, at {rate:.0f}% of peak; "
                     + (f"the trainer waited {waited:.2f} s for it, the rest ran alongside the update's first forward "
                        "on the same cores" if waited is not None else ""))
    for phase in ("rewards", "other"):
        if seconds.get(phase) is not None:
            what = ("tokenizing, padding, advantages, metrics, logging, the scheduler" if phase == "other"
                    else "the reward functions (math_verify)")
            lines.append(f"{phase} {seconds[phase]:.2f} s ({100 * seconds[phase] / step:.0f}% of the step, {what})")
    return lines


# ---- main --------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="See the module docstring (python -m pydoc scripts/bench_train.py) for "
                                            "the settings mapping and the FLOP accounting.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="short")
    parser.add_argument("--steps", type=int, default=4, help="steps per side; step 1 is the warm-up")
    parser.add_argument("--json", type=Path, help="also write the results (and each side's raw steps) to this file")
    parser.add_argument("--skip-trl", action="store_true", help="run ours only (where TRL is not installed)")
    parser.add_argument("--work-dir", type=Path, default=REPO / "outputs" / "bench_train",
                        help="built models and data (reused) and each run's logs")
    parser.add_argument("--peak-seconds", type=float, default=3.0, help="seconds of each matmul-peak measurement")
    parser.add_argument("--timeout", type=float, default=7200.0, help="seconds our trainer may run")
    parser.add_argument("--report-from", type=Path, metavar="JSON",
                        help="print the report of an earlier run's --json file again (nothing is run)")
    args = parser.parse_args(argv)
    if args.report_from:
        payload = json.loads(args.report_from.read_text())
        preset = Preset(**payload["preset"])
        analysis = analyze(preset, payload["prompt_lengths"], payload["ours"], payload["trl"])
        print(report(preset, payload["prompt_lengths"], analysis, payload["peak_flops_per_second"], payload["steps"],
                     gpu=payload.get("gpu", False), checkout=payload.get("checkout")))
        return 0
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    preset = PRESETS[args.preset]
    gpu = on_gpu()
    if not args.skip_trl:
        try:
            import trl  # noqa: F401
        except ImportError:
            parser.error("TRL is not installed (pip install '.[bench]'); use --skip-trl to run ours only")

    checkout = checkout_state()
    model_dir, data_path = build_all(preset, args.work_dir)
    prompt_lens = prompt_lengths(preset, model_dir)
    run_dir = Path(tempfile.mkdtemp(prefix=f"run-{preset.name}-", dir=args.work_dir))
    print(f"preset {preset.name}: prompts of {prompt_lens} tokens; run directory {run_dir}", flush=True)
    peaks = [measure_matmul_peak(args.peak_seconds, gpu=gpu)]
    print(f"float32 matmul peak: {peaks[0] / 1e9:.1f} GFLOP/s", flush=True)

    load_before = os.getloadavg()[0]
    ours = run_ours(preset, model_dir, data_path, run_dir, args.steps, gpu=gpu, timeout=args.timeout)
    ours["load"] = (load_before, os.getloadavg()[0])
    print(f"ours: done in {ours['wall_seconds']:.0f} s", flush=True)
    trl, failed = None, False
    if not args.skip_trl:
        ours_values = ours_config(preset, model_dir=model_dir, data_path=data_path, output_dir=run_dir / "ours",
                                  steps=args.steps, ref_server_url="http://127.0.0.1:0", gpu=gpu)
        peaks.append(measure_matmul_peak(args.peak_seconds, gpu=gpu))
        load_before = os.getloadavg()[0]
        try:
            trl = run_trl(preset, model_dir, run_dir, args.steps, gpu=gpu, ours_values=ours_values)
        except Exception as exc:  # report ours anyway; the exit code says TRL failed
            print(f"TRL failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            failed = True
        else:
            trl["load"] = (load_before, os.getloadavg()[0])
            print(f"TRL: done in {trl['wall_seconds']:.0f} s", flush=True)
    peaks.append(measure_matmul_peak(args.peak_seconds, gpu=gpu))

    analysis = analyze(preset, prompt_lens, ours, trl)
    print()
    print(report(preset, prompt_lens, analysis, peaks, args.steps, gpu=gpu, checkout=checkout), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"preset": dataclasses.asdict(preset), "steps": args.steps, "prompt_lengths": prompt_lens,
                   "peak_flops_per_second": peaks, "threads": torch.get_num_threads(), "gpu": gpu,
                   "analysis": analysis, "ours": ours, "trl": trl, "run_dir": str(run_dir), "checkout": checkout}
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        print(f"results written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
