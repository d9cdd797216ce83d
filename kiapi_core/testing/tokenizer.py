"""A Qwen-style byte-level BPE tokenizer trained locally, for tiny test checkpoints.

Qwen-family text encoders (Ideogram 4's Qwen3-VL, Z-Image's Qwen3) load their tokenizer with
transformers' ``Qwen2Tokenizer`` from ``tokenizer.json``, ``tokenizer_config.json``,
``vocab.json`` and ``merges.txt``. :func:`write_qwen_tokenizer` trains one on a fixed corpus
with the ``tokenizers`` library (deterministic: the same corpus gives the same bytes), with
Qwen's pre-tokenisation, special tokens and a small chat template.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable
from typing import Any, Final

__all__ = ["CHAT_TEMPLATE", "QWEN_SPECIAL_TOKENS", "write_qwen_tokenizer"]

QWEN_SPECIAL_TOKENS: Final = (
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

# Qwen2's pre-tokenisation regex (splits contractions, letters, single digits, punctuation
# runs and whitespace) so that the BPE behaves like Qwen's on the same text.
QWEN_PRETOKENIZE_REGEX: Final = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# A minimal Qwen-style chat template: apply_chat_template is called with plain-string content
# (Z-Image) or content=[{"type": "text", "text": ...}] (Ideogram 4), with
# add_generation_prompt=True; extra keywords (enable_thinking) are ignored.
CHAT_TEMPLATE: Final = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def write_qwen_tokenizer(
    directory: pathlib.Path,
    corpus: Iterable[str],
    *,
    vocab_size: int = 1024,
    chat_template: str = CHAT_TEMPLATE,
) -> int:
    """Train a byte-level BPE the way Qwen's tokenizer is built and write it in HF format.

    ``corpus`` is the fixed training text (the same corpus gives the same files);
    ``vocab_size`` the BPE vocabulary (256 byte symbols + merges). Returns the total number
    of tokens (BPE vocabulary + special tokens): the embedding needs at least that many rows.
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        # All 256 byte symbols, so any input (including non-ASCII) tokenises without <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    # Qwen keeps its special tokens after the BPE vocabulary, as added tokens.
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in QWEN_SPECIAL_TOKENS]
    )

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer_json = tokenizer.to_str(pretty=True) + "\n"
    (directory / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    # vocab.json + merges.txt: the slow-tokenizer files the real repository also ships, and
    # the ones mflux's Qwen2Tokenizer workaround reads.
    tokenizer.model.save(str(directory))

    added_tokens_decoder = {
        str(tokenizer.token_to_id(token)): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token in QWEN_SPECIAL_TOKENS
    }
    _write_json(
        directory / "tokenizer_config.json",
        {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": added_tokens_decoder,
            "bos_token": None,
            "chat_template": chat_template,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 262144,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        },
    )
    return int(tokenizer.get_vocab_size(with_added_tokens=True))


def _write_json(file: pathlib.Path, value: dict[str, Any]) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    # Fixed key order and formatting keep the bytes stable.
    file.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
