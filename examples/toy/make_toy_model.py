"""Build the toy model: a tiny random Qwen2 and a locally trained tokenizer, saved in Hugging Face format.

The demo and the tests train on this model because it learns the toy task (examples/toy/toy_task.py)
within minutes on two CPU cores, yet loads through the same code path as a real checkpoint:
`AutoTokenizer.from_pretrained(OUT_DIR)` and `AutoModelForCausalLM.from_pretrained(OUT_DIR)`.

    python examples/toy/make_toy_model.py outputs/toy_model            # seed 0; reused when already built
    python examples/toy/make_toy_model.py outputs/toy_model --seed 1 --force

What is built:
  - a byte-level BPE tokenizer trained with the `tokenizers` library on the toy task's text, in
    Qwen2's exact pipeline, with one token per answer tag (`<answer>` ...) and per digit, Qwen2's
    special tokens (`<|endoftext|>` pad, `<|im_start|>`, `<|im_end|>` eos) and a Qwen2-style chat
    template: 74 tokens. Its alphabet is the toy text's characters only (every extra token
    dilutes what a random model samples), so other characters are dropped when encoding.
  - a `Qwen2ForCausalLM` with random weights and tied input/output embeddings (79k parameters),
    float32, saved as safetensors.
The same seed gives byte-identical files. A marker file (`toy_model.json`) records the seed, the
builder version and the hash of every file, so a second call with the same seed reuses the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as `python examples/toy/make_toy_model.py` from anywhere
    sys.path.insert(0, str(REPO))

from examples.toy import toy_task  # noqa: E402

# Bumped whenever what this script writes changes, so stale toy models are rebuilt.
BUILDER_VERSION = 2
MARKER = "toy_model.json"

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)

# Upper bound on the BPE vocabulary; the toy corpus is merged into whole words well below it.
BPE_VOCAB_LIMIT = 512
# transformers' Qwen2 pre-tokenization regex (models/qwen2/tokenization_qwen2.py, PRETOKENIZE_REGEX).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2's chat template without its default system message (which would add words, and so
# tokens, that the toy vocabulary does not need).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class ToyArch:
    """Shape of the toy Qwen2 model; the defaults are what the toy run (configs/toy_cpu.yaml) was tuned with."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256
    # Five times Qwen2's 0.02. At 0.02 attention is uniform and the prompt's digit reaches the
    # answer position as about 0.1% of the residual stream, too faint for GRPO's noisy gradient:
    # the model learned the answer format but never which digit to copy (up to 600 steps, over
    # several learning rates, batch sizes and betas), although supervised training learns it in 25
    # steps. At 0.1 accuracy rises from 0.04 to 0.2-0.5 within 200-300 steps of the toy run.
    initializer_range: float = 0.1


def build_tokenizer(seed: int = 0):
    """A `PreTrainedTokenizerFast` trained on the toy task's text, with Qwen2's special tokens and chat template."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Qwen2's byte-level BPE pipeline, exactly: transformers 5 loads every `qwen2` checkpoint's tokenizer
    # as `Qwen2Tokenizer`, which keeps the vocabulary and merges of tokenizer.json but rebuilds this
    # pipeline around them, so any other pipeline would tokenize differently once reloaded.
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_LIMIT, min_frequency=1, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    tokenizer.train_from_iterator(_tokenizer_corpus(seed), trainer=trainer)
    # One token per tag, as chat models give their reasoning tags: a random model then emits a tag
    # with probability 1/V per position instead of the product of several.
    tokenizer.add_tokens([AddedToken(tag, normalized=False, special=False) for tag in toy_task.TAGS])

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
        model_max_length=ToyArch.max_position_embeddings,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _tokenizer_corpus(seed: int) -> list[str]:
    # The fixed vocabulary text guarantees every word any seed's dataset can contain; the chat-formatted
    # examples (special tokens left out: the BPE trainer would split them) set merge order by frequency.
    corpus = [toy_task.VOCABULARY_TEXT]
    for example in toy_task.make_examples(256, seed):
        corpus.append(f"user\n{example['prompt']}\nassistant\n{example['answer']}\n")
    return corpus


def build_model(tokenizer, seed: int = 0, arch: ToyArch = ToyArch()):
    """A random `Qwen2ForCausalLM` sized for `tokenizer`, with tied embeddings; the same seed gives the same weights."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        max_position_embeddings=arch.max_position_embeddings,
        initializer_range=arch.initializer_range,
        tie_word_embeddings=True,
        bos_token_id=pad_id,  # as in Qwen2.5: no BOS is prepended, <|endoftext|> stands in
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    # A private RNG stream: building a model must not change the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id)
    return model.eval()


def _file_hashes(out_dir: Path) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(out_dir.iterdir())
        if path.is_file() and path.name != MARKER
    }


def _expected_marker(seed: int, arch: ToyArch) -> dict:
    return {
        "builder_version": BUILDER_VERSION,
        "task_version": toy_task.TASK_VERSION,
        "seed": seed,
        "arch": dataclasses.asdict(arch),
    }


def is_built(out_dir: str | Path, seed: int = 0, arch: ToyArch = ToyArch()) -> bool:
    """True when `out_dir` holds a complete toy model of this seed, architecture and builder version, unmodified."""
    marker_path = Path(out_dir) / MARKER
    try:
        marker = json.loads(marker_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    files = marker.pop("files", None)
    if marker != _expected_marker(seed, arch) or not isinstance(files, dict) or "model.safetensors" not in files:
        return False
    for name, digest in files.items():
        path = Path(out_dir) / name
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            return False
    return True


def build_toy_model(out_dir: str | Path, seed: int = 0, *, arch: ToyArch = ToyArch(), force: bool = False) -> Path:
    """Build (or reuse) the toy tokenizer and model in `out_dir`; returns the directory.

    Reused when `is_built(out_dir, seed, arch)`, unless `force`. The marker is written last and
    removed first, so an interrupted build is never mistaken for a complete one.
    """
    out_dir = Path(out_dir)
    if not force and is_built(out_dir, seed, arch):
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).unlink(missing_ok=True)
    tokenizer = build_tokenizer(seed)
    model = build_model(tokenizer, seed, arch)
    tokenizer.save_pretrained(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    marker = {**_expected_marker(seed, arch), "files": _file_hashes(out_dir)}
    (out_dir / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: build the toy model into OUT_DIR unless an identical one is already there."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="directory to write the tokenizer and model into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tokenizer corpus and the random weights")
    parser.add_argument("--force", action="store_true", help="rebuild even when OUT_DIR already holds this model")
    args = parser.parse_args(argv)

    if not args.force and is_built(args.out_dir, args.seed):
        print(f"toy model (seed {args.seed}) already built in {args.out_dir}; reusing it (--force rebuilds)")
        return 0
    build_toy_model(args.out_dir, args.seed, force=True)
    num_params = sum(p.numel() for p in _load_params(args.out_dir))
    print(f"built toy model (seed {args.seed}, {num_params:,} parameters) in {args.out_dir}")
    return 0


def _load_params(out_dir: Path) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    return list(load_file(out_dir / "model.safetensors").values())


if __name__ == "__main__":
    raise SystemExit(main())
