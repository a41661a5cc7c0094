"""Write a tiny, randomly initialised Qwen3-VL checkpoint that the real vLLM engine can serve.

Run from the repo root with the ENGINE venv (scripts/engine/install.sh):

    VENV/bin/python -m scripts.engine.tiny_model OUT_DIR

Why: tests of the real engine need a model directory, and no model hub is reachable. This
builds one offline in seconds: the real `Qwen3VLForConditionalGeneration` architecture at
~0.5 M parameters, a byte-level BPE tokenizer with Qwen's special tokens, a ChatML chat
template that takes OpenAI content-part lists (images, videos), and Qwen's image/video
processors with a small pixel budget. Its answers are noise; its plumbing is real.

Deterministic (fixed seed, fixed corpus): two runs give byte-identical files. Idempotent:
an OUT_DIR that already carries this GENERATOR_VERSION is left alone. The output appears
atomically (built beside OUT_DIR, then renamed), so a killed run leaves no half model.
Imports nothing from the repo: only the engine venv's torch / transformers / tokenizers.
"""

# The project venv (which pyright uses) has no torch/transformers: they live only in the
# engine venv this module runs in.
# pyright: reportMissingImports=false

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

# Bump whenever the output changes (shape, tokenizer, template, processor settings): the
# stamp is how callers (make, tests) know a cached OUT_DIR is still the right model.
GENERATOR_VERSION = "2"
STAMP_NAME = ".tiny-qwen3-vl-generator"
SEED = 20261204

VOCAB_SIZE = 512  # embedding rows; the tokenizer uses up to all of them
HIDDEN = 64  # text hidden size == vision out_hidden_size (the merger projects into it)
PATCH = 16  # Qwen3-VL's patch size
MERGE = 2  # 2x2 patches -> one image token
# 256x256 px at most: a 64x64 image is 4 tokens, the largest 64, so prompts stay tiny.
MIN_PIXELS = (PATCH * MERGE) ** 2
MAX_PIXELS = 256 * 256

# Qwen's special tokens, in Qwen2.5/Qwen3's order (their ids sit after the regular vocab
# as in the real tokenizer, only lower).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# ChatML as Qwen writes it. Content may be a string or a list of OpenAI-style parts; vLLM
# sees the loop over message['content'] and passes parts through ("openai" content
# format), with image_url parts turned into {"type": "image"}. Each image or video becomes
# Qwen's <|vision_start|><|image_pad|><|vision_end|> placeholder, which the processor
# expands to one pad per image token. Text goes out via expressions, so the `-` whitespace
# trimming only eats the template's own indentation.
CHAT_TEMPLATE = """\
{%- for message in messages -%}
  {{- '<|im_start|>' + message['role'] + '\\n' -}}
  {%- if message['content'] is string -%}
    {{- message['content'] -}}
  {%- else -%}
    {%- for part in message['content'] -%}
      {%- if part['type'] == 'text' -%}
        {{- part['text'] -}}
      {%- elif part['type'] in ('image', 'image_url', 'image_pil', 'image_embeds') -%}
        {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
      {%- elif part['type'] in ('video', 'video_url') -%}
        {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
  {{- '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\\n' -}}
{%- endif -%}
"""

# Fixed BPE training text: chat-like English so common words get merges. Any fixed text
# works; changing it changes the tokenizer (bump GENERATOR_VERSION).
CORPUS = (
    "You are a helpful assistant. Describe the image in one sentence.",
    "What is in this picture? The picture shows a red square on a white background.",
    "Hello! How are you today? I am fine, thank you. Say hello in three words.",
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { }",
    "user assistant system image video text content role message the and of to in is it",
    "A photo of a cat sitting on a blue chair next to a green plant by the window.",
    "Please answer briefly: which colour is the circle, and how many lines are there?",
    "Streaming tokens one by one from the server; the client counts chunks and stops.",
)


def main(argv: list[str]) -> int:
    """Entry point: one argument, the output directory."""
    # An option is never an OUT_DIR: `--help` would otherwise build a model in ./--help.
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m scripts.engine.tiny_model OUT_DIR", file=sys.stderr)
        return 2
    out = Path(argv[0]).resolve()
    if is_current(out):
        print(f"tiny model in {out} is up to date (generator {GENERATOR_VERSION})")
        return 0
    write_model(out)
    print(f"tiny model written to {out} (generator {GENERATOR_VERSION})")
    return 0


def is_current(out: Path) -> bool:
    """True when OUT_DIR was written by this generator version (the stamp is written last)."""
    stamp = out / STAMP_NAME
    return stamp.is_file() and stamp.read_text().strip() == GENERATOR_VERSION


def write_model(out: Path) -> None:
    """Build everything in a sibling temp dir, then swap it in: no half-written OUT_DIR."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tokenizer = build_tokenizer()
        config = build_config(tokenizer)
        save_weights(config, tmp)
        save_processors(tokenizer, tmp)
        save_generation_config(tokenizer, tmp)
        (tmp / STAMP_NAME).write_text(GENERATOR_VERSION + "\n")
        # mkdtemp makes 0700 and save_pretrained may write 0600: others (an engine run as
        # another user, a container bind mount) must be able to read the model.
        tmp.chmod(0o755)
        for path in tmp.iterdir():
            path.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_tokenizer():
    """Qwen2Tokenizer (Qwen's byte-level BPE pipeline) over a BPE trained on CORPUS."""
    from transformers import AddedToken, Qwen2Tokenizer

    vocab, merges = train_bpe(VOCAB_SIZE - len(SPECIAL_TOKENS))
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )
    # Special tokens get the ids right after the regular vocab, in Qwen's order
    # (<|endoftext|>, <|im_start|>, <|im_end|>, ...), so all fit the VOCAB_SIZE rows.
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True) for t in SPECIAL_TOKENS]}
    )
    # Only now: naming it in the constructor would give <|im_end|> the first special id.
    tokenizer.eos_token = "<|im_end|>"  # the chat model's end of turn, as in *-Instruct
    # Like the real Qwen (151,665 tokens, 151,936 rows) the embedding may have spare rows.
    if len(tokenizer) > VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, more than {VOCAB_SIZE}")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def train_bpe(size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE of at most `size` tokens: the 256 byte symbols + merges from CORPUS.

    Trained with the same NFC + Qwen split regex + ByteLevel pipeline the tokenizer runs,
    so every merge is reachable. The trainer is deterministic for a fixed input.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    # Borrow the exact normalizer / pre-tokenizer Qwen2Tokenizer builds for itself.
    template = Qwen2Tokenizer()._tokenizer
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = template.normalizer
    bpe.pre_tokenizer = template.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges: list[tuple[str, str]] = []
    for merge in model["merges"]:  # "a b" strings in older tokenizers, [a, b] in newer ones
        first, second = merge.split(" ", 1) if isinstance(merge, str) else merge
        merges.append((first, second))
    return model["vocab"], merges


def build_config(tokenizer):
    """Qwen3-VL's real config classes, scaled down (~0.5 M parameters)."""
    from transformers import Qwen3VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    # 32 is the smallest head size vLLM's CPU attention kernel takes (16 fails at the first
    # request: "Unsupported CPU attention configuration").
    head_dim = 32
    text = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,  # GQA as in the real model, so vLLM's KV paths match
        "head_dim": head_dim,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        # M-RoPE (time, height, width) sections add up to head_dim / 2, split like the
        # real model's [24, 20, 20] of 64.
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": [6, 5, 5],
            "mrope_interleaved": True,
        },
    }
    vision = {
        "depth": 2,
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_heads": 4,
        "patch_size": PATCH,
        "temporal_patch_size": 2,
        "spatial_merge_size": MERGE,
        "out_hidden_size": HIDDEN,
        # A square grid (8x8) of learnt position embeddings, interpolated per image.
        "num_position_embeddings": 64,
        # One DeepStack layer: encoder output width = HIDDEN * (1 + 1) = 128.
        "deepstack_visual_indexes": [1],
    }
    return Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        dtype="bfloat16",
    )


def save_weights(config, out: Path) -> None:
    """Random weights from a fixed seed, saved (bf16 safetensors) with config.json."""
    import torch
    import transformers
    from transformers import Qwen3VLForConditionalGeneration

    transformers.utils.logging.disable_progress_bar()  # one tiny shard: no bar needed
    torch.manual_seed(SEED)
    model = Qwen3VLForConditionalGeneration(config).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    print(f"Qwen3VLForConditionalGeneration: {params:,} parameters")
    model.save_pretrained(out, safe_serialization=True)


def save_processors(tokenizer, out: Path) -> None:
    """Tokenizer, chat template and image/video processor configs, laid out as in the real
    Qwen3-VL repos (preprocessor_config.json, video_preprocessor_config.json), which
    AutoProcessor assembles into a Qwen3VLProcessor."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLVideoProcessor

    # Qwen3-VL normalises with mean = std = 0.5 (not CLIP's), patch 16, merge 2.
    common = {
        "patch_size": PATCH,
        "temporal_patch_size": 2,
        "merge_size": MERGE,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
    }
    tokenizer.save_pretrained(out)  # also writes chat_template.jinja
    Qwen2VLImageProcessor(**common).save_pretrained(out)
    # Few frames: vLLM's memory profile builds a dummy video of the largest allowed size.
    Qwen3VLVideoProcessor(**common, fps=2, min_frames=2, max_frames=8).save_pretrained(out)


def save_generation_config(tokenizer, out: Path) -> None:
    """Stop on either end marker, as Qwen's instruct checkpoints do."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    config = {"eos_token_id": ids, "pad_token_id": ids[1], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
