"""A tiny, random-weight Z-Image Turbo checkpoint for tests.

The real ``Tongyi-MAI/Z-Image-Turbo`` is ~30 GB (a 6 B transformer, a Qwen3-4B text encoder),
so tests (and CI) cannot use it. :func:`build_tiny_checkpoint` writes a checkpoint in the *same
on-disk layout* that mflux 0.24.0's real loader reads::

    ZImage(quantize=None, model_path=str(path), model_config=ModelConfig.z_image_turbo())

so the plugin's whole path (weight mapping, on-load quantisation, tokenizer and chat template,
the text encoder, the denoising loop, the VAE decode) runs for real; only the numbers are
meaningless, so the images are noise.

Layout (mirrors the real repository)::

    model_index.json
    scheduler/scheduler_config.json
    text_encoder/{config.json, model.safetensors.index.json, model-0000N-of-00002.safetensors}
    tokenizer/{tokenizer.json, tokenizer_config.json, vocab.json, merges.txt}
    transformer/{config.json, diffusion_pytorch_model.safetensors.index.json,
                 diffusion_pytorch_model-0000N-of-00002.safetensors}
    vae/{config.json, diffusion_pytorch_model.safetensors}

What is shrunk and what cannot be, given mflux's code: mflux builds ``ZImageTransformer()``,
``TextEncoder()`` and ``VAE()`` with fixed arguments (no config is read) and then replaces their
parameters with the checkpoint's, without checking shapes. So:

* Layer counts are fixed (the unused full-size layers would stay): the transformer keeps its 30
  layers + 2 noise-refiner + 2 context-refiner blocks, the text encoder its 36 layers.
* Sizes stored as attributes are fixed: attention is 30 heads x 128 (transformer) and 32 / 8 KV
  heads x 128 (text encoder), so the q/k/v/o projections keep a 3840 / 4096 / 1024 side.
* Everything read off the weights shrinks: the residual width (64 in both), the MLP widths
  (128), the timestep MLP (64), the embedding rows (2048, for the locally trained tokenizer).
* The VAE (FLUX.1's, 16 latent channels, ~84 M parameters) cannot shrink: full size, random.
* Every Linear ``in_features`` is a multiple of 64 (MLX's quantisation group size), so
  ``quantize`` 3..8 work on this checkpoint too.

Every tensor is BF16 (as in the real repository) in PyTorch layout (conv weights OIHW),
written with the shared writer of ``kiapi_core.testing`` (fixed tensor order, fixed RNG
streams per component, ordered JSON, a tokenizer trained on a fixed corpus), so the build is
byte-identical for a given ``seed``. Only numpy and ``tokenizers`` are needed; neither mlx nor
mflux is imported.
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

# Text encoder (Qwen3 shape; layer count and attention heads fixed by mflux's TextEncoder()).
TEXT_LAYERS: Final = 36
TEXT_HIDDEN: Final = 64
TEXT_Q_DIM: Final = 32 * 128
TEXT_KV_DIM: Final = 8 * 128
TEXT_HEAD_DIM: Final = 128
TEXT_INTERMEDIATE: Final = 128
TEXT_VOCAB_ROWS: Final = 2048
TOKENIZER_BPE_VOCAB: Final = 1024

# Transformer (layer counts and the 30 x 128 attention fixed by mflux's ZImageTransformer()).
DIT_LAYERS: Final = 30
DIT_REFINER_LAYERS: Final = 2
DIT_WIDTH: Final = 64
DIT_ATTENTION: Final = 30 * 128
DIT_HEAD_DIM: Final = 128
DIT_FFN: Final = 128
DIT_T_DIM: Final = 64
DIT_T_FREQ: Final = 256  # TimestepEmbedder's frequency_embedding_size, fixed
DIT_PATCH_IN: Final = 2 * 2 * 16  # 2x2 patches of 16 latent channels, fixed

# FLUX.1 VAE, fixed by mflux's VAE().
VAE_BLOCK_OUT: Final = (128, 256, 512, 512)
VAE_LATENT_CHANNELS: Final = 16

# Words for the tokenizer's training corpus, so that typical test prompts tokenise into few
# tokens (the tokenizer pads every prompt to 512 anyway).
_CORPUS_TEXT: Final = (
    "a an the of on in with and at to for by from over under photo portrait landscape "
    "illustration painting render sketch cinematic soft warm cool natural studio golden hour "
    "dramatic neon red green blue yellow orange purple pink white black gray brown cat dog "
    "bird tree house street city mountain sea sky sunset cafe shop book cup coffee tea "
    "hello world kiapi zimage image test prompt simple sharp detailed user assistant system "
    "think"
)


def build_tiny_checkpoint(path: str | os.PathLike[str], seed: int = 0) -> pathlib.Path:
    """Write a tiny random-weight Z-Image Turbo checkpoint to ``path`` and return it.

    ``path`` must not exist yet or be an empty directory (else ``FileExistsError``); ``seed``
    must be >= 0. Files are written to a sibling temporary directory first and renamed into
    place, so a crashed or concurrent build never leaves a half-written checkpoint at ``path``.
    The result is byte-identical for a given ``seed``.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    target = pathlib.Path(path)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"refusing to build a tiny checkpoint into non-empty {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    staging.chmod(0o755)
    try:
        _write_checkpoint(staging, seed)
        if target.exists():
            target.rmdir()
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _write_checkpoint(root: pathlib.Path, seed: int) -> None:
    # Independent RNG streams per component: one component's shapes never move another's bytes.
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
    _write_sharded(root / "text_encoder", "model", _text_encoder_tensors(rng(1)))
    _write_json(root / "transformer" / "config.json", _transformer_config())
    _write_sharded(root / "transformer", "diffusion_pytorch_model", _transformer_tensors(rng(2)))
    _write_json(root / "vae" / "config.json", _vae_config())
    write_safetensors(root / "vae" / "diffusion_pytorch_model.safetensors", _vae_tensors(rng(3)))


def _write_sharded(directory: pathlib.Path, stem: str, tensors: dict[str, Tensor]) -> None:
    """Two shards plus the ``.safetensors.index.json`` transformers/diffusers write."""
    names = sorted(tensors)
    half = len(names) // 2
    weight_map: dict[str, str] = {}
    total = 0
    for index, part in enumerate((names[:half], names[half:]), start=1):
        file = f"{stem}-{index:05d}-of-00002.safetensors"
        write_safetensors(directory / file, {name: tensors[name] for name in part})
        for name in part:
            weight_map[name] = file
            total += len(tensors[name].data)
    _write_json(
        directory / f"{stem}.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": weight_map},
    )


# --- JSON configs ------------------------------------------------------------------------------


def _model_index(seed: int) -> dict[str, Any]:
    return {
        "_class_name": "ZImagePipeline",
        "kiapi_tiny_random_checkpoint": {"seed": seed, "note": "random weights, for tests only"},
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3Model"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "ZImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _scheduler_config() -> dict[str, Any]:
    # Not read by mflux (its linear schedule with a sigma shift lives in code).
    return {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": False,
    }


def _text_encoder_config() -> dict[str, Any]:
    # Informational: mflux's TextEncoder() takes no config. These are the shapes written.
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": TEXT_VOCAB_ROWS,
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": TEXT_INTERMEDIATE,
        "num_hidden_layers": TEXT_LAYERS,
        "num_attention_heads": TEXT_Q_DIM // TEXT_HEAD_DIM,
        "num_key_value_heads": TEXT_KV_DIM // TEXT_HEAD_DIM,
        "head_dim": TEXT_HEAD_DIM,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000,
        "torch_dtype": "bfloat16",
    }


def _transformer_config() -> dict[str, Any]:
    # Informational: mflux's ZImageTransformer() takes no config. These are the shapes written.
    return {
        "_class_name": "ZImageTransformer2DModel",
        "all_patch_size": [2],
        "all_f_patch_size": [1],
        "in_channels": 16,
        "dim": DIT_WIDTH,
        "attention_dim": DIT_ATTENTION,
        "n_layers": DIT_LAYERS,
        "n_refiner_layers": DIT_REFINER_LAYERS,
        "n_heads": DIT_ATTENTION // DIT_HEAD_DIM,
        "norm_eps": 1e-5,
        "qk_norm": True,
        "cap_feat_dim": TEXT_HIDDEN,
        "rope_theta": 256.0,
        "t_scale": 1000.0,
        "axes_dims": [32, 48, 48],
    }


def _vae_config() -> dict[str, Any]:
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": VAE_LATENT_CHANNELS,
        "block_out_channels": list(VAE_BLOCK_OUT),
        "layers_per_block": 2,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "norm_num_groups": 32,
        "act_fn": "silu",
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": True,
    }


def _write_json(file: pathlib.Path, value: dict[str, Any]) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _training_corpus() -> Iterator[str]:
    words = _CORPUS_TEXT.split()
    count = len(words)
    for stride in (1, 3, 7, 11, 13):
        for start in range(count):
            yield " ".join(words[(start + k * stride) % count] for k in range(8))
    for _ in range(4):
        yield "0123456789 <think> </think> {}:,\"'.!?-_()"


# --- Tensors -----------------------------------------------------------------------------------


def _text_encoder_tensors(rng: np.random.Generator) -> dict[str, Tensor]:
    """Qwen3 weights under ``model.`` (the names ZImageWeightMapping reads)."""
    sink = TensorSink(rng)
    sink.bf16("model.embed_tokens.weight", (TEXT_VOCAB_ROWS, TEXT_HIDDEN), std=1.0)
    for layer in range(TEXT_LAYERS):
        base = f"model.layers.{layer}"
        sink.norm(f"{base}.input_layernorm", TEXT_HIDDEN)
        sink.bf16_linear(f"{base}.self_attn.q_proj", TEXT_Q_DIM, TEXT_HIDDEN, False)
        sink.bf16_linear(f"{base}.self_attn.k_proj", TEXT_KV_DIM, TEXT_HIDDEN, False)
        sink.bf16_linear(f"{base}.self_attn.v_proj", TEXT_KV_DIM, TEXT_HIDDEN, False)
        sink.bf16_linear(f"{base}.self_attn.o_proj", TEXT_HIDDEN, TEXT_Q_DIM, False)
        sink.norm(f"{base}.self_attn.q_norm", TEXT_HEAD_DIM)
        sink.norm(f"{base}.self_attn.k_norm", TEXT_HEAD_DIM)
        sink.norm(f"{base}.post_attention_layernorm", TEXT_HIDDEN)
        sink.bf16_linear(f"{base}.mlp.gate_proj", TEXT_INTERMEDIATE, TEXT_HIDDEN, False)
        sink.bf16_linear(f"{base}.mlp.up_proj", TEXT_INTERMEDIATE, TEXT_HIDDEN, False)
        sink.bf16_linear(f"{base}.mlp.down_proj", TEXT_HIDDEN, TEXT_INTERMEDIATE, False)
    sink.norm("model.norm", TEXT_HIDDEN)
    return sink.tensors


def _transformer_tensors(rng: np.random.Generator) -> dict[str, Tensor]:
    """ZImageTransformer2DModel weights in diffusers names (ZImageWeightMapping's sources)."""
    sink = TensorSink(rng)
    width = DIT_WIDTH
    sink.bf16_linear("t_embedder.mlp.0", DIT_T_DIM, DIT_T_FREQ, True)
    sink.bf16_linear("t_embedder.mlp.2", DIT_T_DIM, DIT_T_DIM, True)
    sink.norm("cap_embedder.0", TEXT_HIDDEN)
    sink.bf16_linear("cap_embedder.1", width, TEXT_HIDDEN, True)
    sink.bf16("x_pad_token", (1, width), std=0.02)
    sink.bf16("cap_pad_token", (1, width), std=0.02)
    sink.bf16_linear("all_x_embedder.2-1", width, DIT_PATCH_IN, True)
    sink.bf16_linear("all_final_layer.2-1.linear", DIT_PATCH_IN, width, True)
    sink.bf16_linear("all_final_layer.2-1.adaLN_modulation.1", width, DIT_T_DIM, True)

    def block(base: str, modulated: bool) -> None:
        if modulated:
            sink.bf16_linear(f"{base}.adaLN_modulation.0", 4 * width, DIT_T_DIM, True)
        for projection in ("to_q", "to_k", "to_v"):
            sink.bf16_linear(f"{base}.attention.{projection}", DIT_ATTENTION, width, False)
        sink.bf16_linear(f"{base}.attention.to_out.0", width, DIT_ATTENTION, False)
        sink.norm(f"{base}.attention.norm_q", DIT_HEAD_DIM)
        sink.norm(f"{base}.attention.norm_k", DIT_HEAD_DIM)
        for norm in ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2"):
            sink.norm(f"{base}.{norm}", width)
        sink.bf16_linear(f"{base}.feed_forward.w1", DIT_FFN, width, False)
        sink.bf16_linear(f"{base}.feed_forward.w2", width, DIT_FFN, False)
        sink.bf16_linear(f"{base}.feed_forward.w3", DIT_FFN, width, False)

    for layer in range(DIT_REFINER_LAYERS):
        block(f"noise_refiner.{layer}", modulated=True)
    for layer in range(DIT_REFINER_LAYERS):
        block(f"context_refiner.{layer}", modulated=False)
    for layer in range(DIT_LAYERS):
        block(f"layers.{layer}", modulated=True)
    return sink.tensors


def _vae_tensors(rng: np.random.Generator) -> dict[str, Tensor]:
    """The full FLUX.1 VAE (diffusers AutoencoderKL names, conv weights OIHW)."""
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

    def mid_block(name: str, channels: int) -> None:
        resnet(f"{name}.resnets.0", channels, channels)
        group_norm(f"{name}.attentions.0.group_norm", channels)
        for projection in ("to_q", "to_k", "to_v", "to_out.0"):
            sink.bf16(
                f"{name}.attentions.0.{projection}.weight", (channels, channels), channels**-0.5
            )
            sink.bf16(f"{name}.attentions.0.{projection}.bias", (channels,), std=0.02)
        resnet(f"{name}.resnets.1", channels, channels)

    blocks = VAE_BLOCK_OUT
    conv("encoder.conv_in", blocks[0], 3, 3)
    channels = blocks[0]
    for index, out_ch in enumerate(blocks):
        for res in range(2):
            resnet(f"encoder.down_blocks.{index}.resnets.{res}", channels, out_ch)
            channels = out_ch
        if index < len(blocks) - 1:
            conv(f"encoder.down_blocks.{index}.downsamplers.0.conv", out_ch, out_ch, 3)
    mid_block("encoder.mid_block", blocks[-1])
    group_norm("encoder.conv_norm_out", blocks[-1])
    conv("encoder.conv_out", 2 * VAE_LATENT_CHANNELS, blocks[-1], 3)

    reversed_blocks = tuple(reversed(blocks))
    conv("decoder.conv_in", reversed_blocks[0], VAE_LATENT_CHANNELS, 3)
    mid_block("decoder.mid_block", reversed_blocks[0])
    channels = reversed_blocks[0]
    for index, out_ch in enumerate(reversed_blocks):
        for res in range(3):
            resnet(f"decoder.up_blocks.{index}.resnets.{res}", channels, out_ch)
            channels = out_ch
        if index < len(reversed_blocks) - 1:
            conv(f"decoder.up_blocks.{index}.upsamplers.0.conv", out_ch, out_ch, 3)
    group_norm("decoder.conv_norm_out", reversed_blocks[-1])
    conv("decoder.conv_out", 3, reversed_blocks[-1], 3)
    return sink.tensors
