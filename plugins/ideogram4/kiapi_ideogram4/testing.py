"""A tiny, random-weight Ideogram 4 checkpoint for tests.

The real ``ideogram-ai/ideogram-4-fp8`` checkpoint is gated and tens of gigabytes, so tests
(and CI) cannot use it. :func:`build_tiny_checkpoint` writes a checkpoint with the *same
on-disk layout* that mflux's real loader accepts::

    Ideogram4(quantize=None, model_path=str(path), model_config=ModelConfig.ideogram4_fp8())

and that passes ``Ideogram4WeightDefinition.validate_fp8_checkpoint(path)``. That way the
plugin's whole path (weight loading, fp8 dequantisation, on-load quantisation, tokenizer and
chat template, the denoising loop, the VAE decode) runs for real; only the numbers are
meaningless, so the images are noise.

Layout (mirrors the real repository)::

    model_index.json
    scheduler/scheduler_config.json
    text_encoder/{config.json, model.safetensors}
    tokenizer/{tokenizer.json, tokenizer_config.json, vocab.json, merges.txt}
    transformer/{config.json, diffusion_pytorch_model.safetensors}
    unconditional_transformer/{config.json, diffusion_pytorch_model.safetensors}
    vae/{config.json, diffusion_pytorch_model.safetensors}

What is shrunk and what cannot be, given mflux 0.24.0's code:

* The text encoder keeps its 36 layers because mflux taps hidden states from the fixed
  layers 0, 3, ..., 33, 35; every layer is tiny instead (hidden 64, 2 heads / 1 KV head).
* The diffusion transformers keep ``in_channels`` 128 (the latent packing is fixed) and
  ``llm_features_dim`` = 13 taps x text hidden size; everything else is shrunk to 2 layers,
  width 64.
* The VAE cannot be shrunk: mflux builds ``Flux2VAE()`` without reading ``vae/config.json``,
  so its ~84 M parameters are written at full size (≈168 MB BF16). This dominates the size.
* Every Linear ``in_features`` is a multiple of 64 (MLX's default quantisation group size),
  so ``quantize=4`` and ``quantize=8`` work on this checkpoint too.

Weights follow the FP8 checkpoint's conventions: each Linear stores an ``F8_E4M3`` weight
(out, in) plus an ``F32`` per-row ``weight_scale`` (row amax / 448) and a ``BF16`` bias where
the layer has one; norms and embeddings are ``BF16``; the VAE is ``BF16`` in PyTorch (OIHW)
layout. ``text_encoder/config.json`` carries ``"ideogram_fp8_weight_only": true``, which is
what mflux's FP8 validator looks for.

The build is deterministic: for a given ``seed`` every file is byte-identical (fixed RNG
streams, sorted/ordered JSON, a hand-written safetensors serialiser with a fixed tensor order,
a tokenizer trained on a fixed in-module corpus). It takes a few seconds and ≈170 MB.

Only numpy and ``tokenizers`` are needed (both already dependencies of mflux); neither mlx
nor mflux is imported, so importing this module is cheap and the build does not initialise
MLX. The ``safetensors`` package is deliberately not used: numpy has no float8 dtype, and the
format is simple enough to write directly.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any, Final

import numpy as np

from kiapi_core.testing import Tensor, TensorSink, write_qwen_tokenizer, write_safetensors

__all__ = ["build_tiny_checkpoint"]

# --- Sizes -----------------------------------------------------------------------------------
# Text encoder (Qwen3-VL language model shape, shrunk). mflux hard-codes the tap layers
# (0, 3, ..., 33, 35), so fewer than 36 layers would fail at the first prompt encode.
TEXT_NUM_LAYERS: Final = 36
TEXT_TAP_LAYERS: Final = 13
TEXT_HIDDEN: Final = 64
TEXT_HEADS: Final = 2
TEXT_KV_HEADS: Final = 1
TEXT_HEAD_DIM: Final = 32
TEXT_INTERMEDIATE: Final = 128
# Embedding rows; the trained tokenizer (vocabulary + special tokens) must fit below this.
TEXT_VOCAB_ROWS: Final = 2048
# Target size of the trained byte-level BPE vocabulary (256 byte symbols + merges).
TOKENIZER_BPE_VOCAB: Final = 1024

# Diffusion transformers (the conditional and the unconditional one share a shape).
DIT_HEADS: Final = 2
DIT_HEAD_DIM: Final = 32
DIT_WIDTH: Final = DIT_HEADS * DIT_HEAD_DIM
DIT_LAYERS: Final = 2
DIT_INTERMEDIATE: Final = 128
DIT_ADALN_DIM: Final = 64
# Fixed by mflux: 32 VAE latent channels packed 2x2.
DIT_IN_CHANNELS: Final = 128
DIT_LLM_FEATURES: Final = TEXT_TAP_LAYERS * TEXT_HIDDEN
# Rotary sections per (t, h, w) axis; they must sum to head_dim / 2.
DIT_MROPE_SECTION: Final = (6, 5, 5)

# FLUX.2 VAE, fixed by mflux's Flux2VAE() (it takes no config).
VAE_BLOCK_OUT: Final = (128, 256, 512, 512)
VAE_LAYERS_PER_BLOCK: Final = 2
VAE_LATENT_CHANNELS: Final = 32

# Words for the tokenizer's training corpus: the JSON-caption vocabulary mflux's verifier
# knows plus ordinary prompt words, so that typical test prompts tokenise into few tokens.
_CORPUS_TEXT: Final = (
    "high_level_description style_description compositional_deconstruction aesthetics "
    "lighting photo art_style medium color_palette background elements type bbox text desc "
    "obj a an the of on in with and at to for by from over under poster sign logo label "
    "photograph illustration painting render sketch vector flat minimal bold vintage modern "
    "soft warm cool natural studio golden hour dramatic neon red green blue yellow orange "
    "purple pink white black gray brown cat dog bird tree house street city mountain sea sky "
    "sunset cafe shop book cover title headline letter word font typography serif sans "
    "handwritten centered large small wooden paper wall window door table cup coffee tea "
    "hello world kiapi ideogram image test prompt simple sharp detailed user assistant system"
)


def build_tiny_checkpoint(path: str | os.PathLike[str], seed: int = 0) -> pathlib.Path:
    """Write a tiny random-weight Ideogram 4 FP8 checkpoint to ``path`` and return it.

    ``path`` must not exist yet or be an empty directory (else ``FileExistsError``); ``seed``
    must be >= 0. The files are first written to a sibling temporary directory and then
    renamed into place, so a crashed or concurrent build never leaves a half-written
    checkpoint at ``path``.

    The result is byte-identical for a given ``seed``. It loads offline with
    ``Ideogram4(quantize=None | 4 | 8, model_path=str(path),
    model_config=ModelConfig.ideogram4_fp8())``.
    """
    if seed < 0:
        # numpy's SeedSequence rejects negative entropy; say so in our terms.
        raise ValueError(f"seed must be >= 0, got {seed}")
    target = pathlib.Path(path)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"refusing to build a tiny checkpoint into non-empty {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    # A unique sibling (same filesystem, so the final rename is atomic); unique per call, so
    # concurrent builders (threads, pytest-xdist workers) never share a staging directory.
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    # mkdtemp creates the directory 0700; a checkpoint is ordinary readable data.
    staging.chmod(0o755)
    try:
        _write_checkpoint(staging, seed)
        if target.exists():
            # An empty directory: rename cannot replace it on every platform.
            target.rmdir()
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


# --- Top-level writer --------------------------------------------------------------------------


def _write_checkpoint(root: pathlib.Path, seed: int) -> None:
    """Write every component below ``root``."""

    # Independent RNG streams per component: changing one component's shape or order does not
    # change the bytes of the others.
    def rng(component: int) -> np.random.Generator:
        return np.random.default_rng([seed, component])

    vocab_size = write_qwen_tokenizer(
        root / "tokenizer", _training_corpus(), vocab_size=TOKENIZER_BPE_VOCAB
    )
    if vocab_size > TEXT_VOCAB_ROWS:
        raise AssertionError(f"tokenizer has {vocab_size} tokens > {TEXT_VOCAB_ROWS} rows")

    _write_json(root / "model_index.json", _model_index(seed))
    _write_json(root / "scheduler" / "scheduler_config.json", _scheduler_config())

    _write_json(root / "text_encoder" / "config.json", _text_encoder_config())
    write_safetensors(
        root / "text_encoder" / "model.safetensors",
        _text_encoder_tensors(rng(1)),
    )

    for index, name in ((2, "transformer"), (3, "unconditional_transformer")):
        _write_json(root / name / "config.json", _transformer_config())
        write_safetensors(
            root / name / "diffusion_pytorch_model.safetensors",
            _transformer_tensors(rng(index)),
        )

    _write_json(root / "vae" / "config.json", _vae_config())
    write_safetensors(root / "vae" / "diffusion_pytorch_model.safetensors", _vae_tensors(rng(4)))


# --- JSON configs ------------------------------------------------------------------------------


def _model_index(seed: int) -> dict[str, Any]:
    # mflux only needs the file to exist (it is in the download patterns); the marker says
    # where the checkpoint came from, so nobody mistakes it for real weights.
    return {
        "_class_name": "Ideogram4Pipeline",
        "kiapi_tiny_random_checkpoint": {"seed": seed, "note": "random weights, for tests only"},
        "scheduler": ["ideogram4", "Ideogram4Scheduler"],
        "text_encoder": ["transformers", "Qwen3VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["ideogram4", "Ideogram4Transformer"],
        "unconditional_transformer": ["ideogram4", "Ideogram4Transformer"],
        "vae": ["diffusers", "AutoencoderKLFlux2"],
    }


def _scheduler_config() -> dict[str, Any]:
    # Not read by mflux (its presets live in code); present because the real layout has it.
    return {
        "_class_name": "Ideogram4Scheduler",
        "presets": ["V4_QUALITY_48", "V4_DEFAULT_20", "V4_TURBO_12"],
    }


def _text_encoder_config() -> dict[str, Any]:
    # mflux reads text_config.* (Ideogram4Initializer._text_encoder_kwargs) and the FP8 marker.
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        "ideogram_fp8_weight_only": True,
        "text_config": {
            "model_type": "qwen3_vl_text",
            "vocab_size": TEXT_VOCAB_ROWS,
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": TEXT_INTERMEDIATE,
            "num_hidden_layers": TEXT_NUM_LAYERS,
            "num_attention_heads": TEXT_HEADS,
            "num_key_value_heads": TEXT_KV_HEADS,
            "head_dim": TEXT_HEAD_DIM,
            "max_position_embeddings": 262144,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0},
        },
    }


def _transformer_config() -> dict[str, Any]:
    # The keys mflux reads in Ideogram4Initializer._transformer_config.
    return {
        "_class_name": "Ideogram4Transformer",
        "num_attention_heads": DIT_HEADS,
        "attention_head_dim": DIT_HEAD_DIM,
        "num_layers": DIT_LAYERS,
        "intermediate_size": DIT_INTERMEDIATE,
        "adaln_dim": DIT_ADALN_DIM,
        "in_channels": DIT_IN_CHANNELS,
        "llm_features_dim": DIT_LLM_FEATURES,
        "rope_theta": 5000000,
        "mrope_section": list(DIT_MROPE_SECTION),
        "norm_eps": 1e-5,
    }


def _vae_config() -> dict[str, Any]:
    # Informational only: mflux's Flux2VAE() is built with fixed sizes.
    return {
        "_class_name": "AutoencoderKLFlux2",
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": VAE_LATENT_CHANNELS,
        "block_out_channels": list(VAE_BLOCK_OUT),
        "layers_per_block": VAE_LAYERS_PER_BLOCK,
        "down_block_types": ["DownEncoderBlock2D"] * len(VAE_BLOCK_OUT),
        "up_block_types": ["UpDecoderBlock2D"] * len(VAE_BLOCK_OUT),
        "norm_num_groups": 32,
        "act_fn": "silu",
        "patch_size": [2, 2],
        "batch_norm_eps": 1e-4,
        "batch_norm_momentum": 0.1,
        "mid_block_add_attention": True,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
    }


def _write_json(file: pathlib.Path, value: dict[str, Any]) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    # Fixed key order and formatting keep the bytes stable.
    file.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --- Tokenizer ---------------------------------------------------------------------------------


def _training_corpus() -> Iterator[str]:
    """A fixed corpus: word sequences, a JSON caption, digits and punctuation."""
    words = _CORPUS_TEXT.split()
    count = len(words)
    # Deterministic "sentences" built by striding through the word list (no RNG needed).
    for stride in (1, 3, 7, 11, 13):
        for start in range(count):
            yield " ".join(words[(start + k * stride) % count] for k in range(8))
    caption = {
        "high_level_description": "A red poster with the word hello.",
        "style_description": {
            "aesthetics": "bold",
            "lighting": "soft",
            "photo": "studio",
            "medium": "photograph",
        },
        "compositional_deconstruction": {
            "background": "a white wall",
            "elements": [
                {
                    "type": "text",
                    "bbox": [100, 200, 300, 800],
                    "text": "hello",
                    "desc": "big letters",
                }
            ],
        },
    }
    for _ in range(4):
        yield json.dumps(caption, ensure_ascii=False, separators=(",", ":"))
        yield "0123456789 #FF0000 #00FF00 #0000FF [0, 1000] {}:,\"'.!?-_()"


# --- Tensors ---------------------------------------------------------------------------------


def _text_encoder_tensors(rng: np.random.Generator) -> dict[str, Tensor]:
    """Qwen3-VL language-model weights under the ``language_model.`` prefix mflux filters on."""
    sink = TensorSink(rng)
    prefix = "language_model"
    q_dim = TEXT_HEADS * TEXT_HEAD_DIM
    kv_dim = TEXT_KV_HEADS * TEXT_HEAD_DIM
    sink.bf16(f"{prefix}.embed_tokens.weight", (TEXT_VOCAB_ROWS, TEXT_HIDDEN), std=1.0)
    for layer in range(TEXT_NUM_LAYERS):
        base = f"{prefix}.layers.{layer}"
        sink.norm(f"{base}.input_layernorm", TEXT_HIDDEN)
        sink.fp8_linear(f"{base}.self_attn.q_proj", q_dim, TEXT_HIDDEN, False)
        sink.fp8_linear(f"{base}.self_attn.k_proj", kv_dim, TEXT_HIDDEN, False)
        sink.fp8_linear(f"{base}.self_attn.v_proj", kv_dim, TEXT_HIDDEN, False)
        sink.fp8_linear(f"{base}.self_attn.o_proj", TEXT_HIDDEN, q_dim, False)
        sink.norm(f"{base}.self_attn.q_norm", TEXT_HEAD_DIM)
        sink.norm(f"{base}.self_attn.k_norm", TEXT_HEAD_DIM)
        sink.norm(f"{base}.post_attention_layernorm", TEXT_HIDDEN)
        sink.fp8_linear(f"{base}.mlp.gate_proj", TEXT_INTERMEDIATE, TEXT_HIDDEN, False)
        sink.fp8_linear(f"{base}.mlp.up_proj", TEXT_INTERMEDIATE, TEXT_HIDDEN, False)
        sink.fp8_linear(f"{base}.mlp.down_proj", TEXT_HIDDEN, TEXT_INTERMEDIATE, False)
    sink.norm(f"{prefix}.norm", TEXT_HIDDEN)
    return sink.tensors


def _transformer_tensors(rng: np.random.Generator) -> dict[str, Tensor]:
    """Ideogram4Transformer weights; names are mflux's module paths (no key mapping applies)."""
    sink = TensorSink(rng)
    width = DIT_WIDTH
    sink.fp8_linear("input_proj", width, DIT_IN_CHANNELS, True)
    sink.norm("llm_cond_norm", DIT_LLM_FEATURES)
    sink.fp8_linear("llm_cond_proj", width, DIT_LLM_FEATURES, True)
    sink.fp8_linear("t_embedding.mlp_in", width, width, True)
    sink.fp8_linear("t_embedding.mlp_out", width, width, True)
    sink.fp8_linear("adaln_proj", DIT_ADALN_DIM, width, True)
    sink.bf16("embed_image_indicator.weight", (2, width), std=0.02)
    for layer in range(DIT_LAYERS):
        base = f"layers.{layer}"
        sink.fp8_linear(f"{base}.adaln_modulation", 4 * width, DIT_ADALN_DIM, True)
        sink.fp8_linear(f"{base}.attention.qkv", 3 * width, width, False)
        sink.fp8_linear(f"{base}.attention.o", width, width, False)
        sink.norm(f"{base}.attention.norm_q", DIT_HEAD_DIM)
        sink.norm(f"{base}.attention.norm_k", DIT_HEAD_DIM)
        sink.fp8_linear(f"{base}.feed_forward.w1", DIT_INTERMEDIATE, width, False)
        sink.fp8_linear(f"{base}.feed_forward.w2", width, DIT_INTERMEDIATE, False)
        sink.fp8_linear(f"{base}.feed_forward.w3", DIT_INTERMEDIATE, width, False)
        for norm in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2"):
            sink.norm(f"{base}.{norm}", width)
    sink.fp8_linear("final_layer.adaln_modulation", width, DIT_ADALN_DIM, True)
    sink.fp8_linear("final_layer.linear", DIT_IN_CHANNELS, width, True)
    return sink.tensors


def _vae_tensors(rng: np.random.Generator) -> dict[str, Tensor]:
    """The full FLUX.2 VAE in diffusers names and PyTorch layouts (conv weights OIHW).

    mflux maps these names with Flux2WeightMapping.get_vae_mapping (identical names except
    ``to_out.0`` -> ``to_out``, conv weights transposed to OHWI).
    """
    sink = TensorSink(rng)

    def conv(name: str, out_ch: int, in_ch: int, kernel: int) -> None:
        fan_in = in_ch * kernel * kernel
        sink.bf16(f"{name}.weight", (out_ch, in_ch, kernel, kernel), std=fan_in**-0.5)
        sink.bf16(f"{name}.bias", (out_ch,), std=0.02)

    def group_norm(name: str, channels: int) -> None:
        sink.bf16(f"{name}.weight", (channels,), std=0.02, mean=1.0)
        sink.bf16(f"{name}.bias", (channels,), std=0.02)

    def resnet(name: str, in_ch: int, out_ch: int) -> None:
        group_norm(f"{name}.norm1", in_ch)
        conv(f"{name}.conv1", out_ch, in_ch, 3)
        group_norm(f"{name}.norm2", out_ch)
        conv(f"{name}.conv2", out_ch, out_ch, 3)
        if in_ch != out_ch:
            conv(f"{name}.conv_shortcut", out_ch, in_ch, 1)

    def linear(name: str, dim: int) -> None:
        sink.bf16(f"{name}.weight", (dim, dim), std=dim**-0.5)
        sink.bf16(f"{name}.bias", (dim,), std=0.02)

    def mid_block(name: str, channels: int) -> None:
        resnet(f"{name}.resnets.0", channels, channels)
        group_norm(f"{name}.attentions.0.group_norm", channels)
        for projection in ("to_q", "to_k", "to_v", "to_out.0"):
            linear(f"{name}.attentions.0.{projection}", channels)
        resnet(f"{name}.resnets.1", channels, channels)

    blocks = VAE_BLOCK_OUT
    conv("encoder.conv_in", blocks[0], 3, 3)
    channels = blocks[0]
    for index, out_ch in enumerate(blocks):
        for res in range(VAE_LAYERS_PER_BLOCK):
            resnet(f"encoder.down_blocks.{index}.resnets.{res}", channels, out_ch)
            channels = out_ch
        if index < len(blocks) - 1:
            conv(f"encoder.down_blocks.{index}.downsamplers.0.conv", out_ch, out_ch, 3)
    mid_block("encoder.mid_block", blocks[-1])
    group_norm("encoder.conv_norm_out", blocks[-1])
    conv("encoder.conv_out", 2 * VAE_LATENT_CHANNELS, blocks[-1], 3)

    conv("quant_conv", 2 * VAE_LATENT_CHANNELS, 2 * VAE_LATENT_CHANNELS, 1)
    conv("post_quant_conv", VAE_LATENT_CHANNELS, VAE_LATENT_CHANNELS, 1)

    reversed_blocks = tuple(reversed(blocks))
    conv("decoder.conv_in", reversed_blocks[0], VAE_LATENT_CHANNELS, 3)
    mid_block("decoder.mid_block", reversed_blocks[0])
    channels = reversed_blocks[0]
    for index, out_ch in enumerate(reversed_blocks):
        for res in range(VAE_LAYERS_PER_BLOCK + 1):
            resnet(f"decoder.up_blocks.{index}.resnets.{res}", channels, out_ch)
            channels = out_ch
        if index < len(reversed_blocks) - 1:
            conv(f"decoder.up_blocks.{index}.upsamplers.0.conv", out_ch, out_ch, 3)
    group_norm("decoder.conv_norm_out", reversed_blocks[-1])
    conv("decoder.conv_out", 3, reversed_blocks[-1], 3)

    # Latent BatchNorm statistics over the 2x2-patchified latent (4 x 32 channels). Ideogram 4
    # normalises latents with its own constants, but the VAE mapping requires these.
    sink.bf16("bn.running_mean", (4 * VAE_LATENT_CHANNELS,), std=0.1)
    sink.bf16("bn.running_var", (4 * VAE_LATENT_CHANNELS,), std=0.02, mean=1.0)
    return sink.tensors
