"""Tiny Stable Diffusion 1.x pipelines built from configs, for tests and the offline quick start.

Everything here is deterministic: the tokenizer's vocabulary and merges are learned by a small
byte-level BPE over a fixed word list, and the weights come from a seeded generator. The result
is saved with `save_pretrained`, so it loads through `from_pretrained` exactly like a hub id.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import torch

# Words the tests and the quick start put in prompts; every one becomes a single token.
WORDS = (
    "a an the of in on at with and photo picture render drawing painting style sks zwx "
    "dog cat icon lego brick set toy figure 3d object background white black red green blue "
    "yellow orange purple pink gray small big round square cube sphere shiny matte studio "
    "light view front side top close up high quality"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte -> printable character table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def build_clip_vocab(words=WORDS) -> tuple[dict[str, int], list[str]]:
    """A CLIP-layout vocabulary (bytes, bytes+</w>, merges, specials) and its BPE merges.

    Merges are learned greedily (most frequent adjacent pair first, ties broken by the pair
    itself) until every word in `words` is one token, so the result never depends on hashing.
    """
    byte_chars = list(_bytes_to_unicode().values())
    vocab_tokens = byte_chars + [c + "</w>" for c in byte_chars]
    corpus = {w: [*w[:-1], w[-1] + "</w>"] for w in sorted(set(words))}
    merges: list[str] = []
    while True:
        pairs = Counter()
        for symbols in corpus.values():
            pairs.update(zip(symbols, symbols[1:]))
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(f"{best[0]} {best[1]}")
        vocab_tokens.append(best[0] + best[1])
        for w, symbols in corpus.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            corpus[w] = out
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {}
    for tok in vocab_tokens:
        vocab.setdefault(tok, len(vocab))
    return vocab, merges


def write_tokenizer_files(folder: str | os.PathLike, words=WORDS) -> tuple[Path, Path]:
    """Write `vocab.json` and `merges.txt` (CLIP's file layout) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_clip_vocab(words)
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def build_tokenizer(folder: str | os.PathLike, max_length: int = 77, words=WORDS):
    """A CLIPTokenizer read from the vocabulary and merges files written into `folder`."""
    from transformers import CLIPTokenizer

    vocab_file, merges_file = write_tokenizer_files(folder, words)
    return CLIPTokenizer(vocab=str(vocab_file), merges=str(merges_file), model_max_length=max_length)


def _tiny_vae(sample_size: int, **extra):
    """2 levels, 16/32 channels: 2x the latent size in pixels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(16, 32),
                         norm_num_groups=8, sample_size=sample_size * 2, **{"latent_channels": 4, **extra})


def _tiny_text_config(tokenizer, hidden_size: int, **extra):
    """A 2-layer CLIP text encoder config for the project's tokenizer."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra)


def build_tiny_pipeline(seed: int = 0, sample_size: int = 32, cross_attention_dim: int = 32, sd2: bool = False):
    """A StableDiffusionPipeline in SD 1.x layout (or SD 2.x: linear proj_in/proj_out,
    v-prediction) with a few hundred thousand random parameters.

    UNet: one plain and one cross-attention down block (and their up twins) with
    `to_q/to_k/to_v/to_out.0` projections; VAE: 2 levels (64 px images for `sample_size=32`);
    text encoder: a 2-layer CLIPTextModel with `q_proj/k_proj/v_proj/out_proj`.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(tmp)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        attention_head_dim=4,
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=8,
        use_linear_projection=sd2,
        upcast_attention=sd2,
    )
    torch.manual_seed(seed + 1)
    vae = _tiny_vae(sample_size)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_tiny_text_config(tokenizer, cross_attention_dim))
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1, prediction_type="v_prediction" if sd2 else "epsilon",
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sdxl_pipeline(seed: int = 0, sample_size: int = 32):
    """A StableDiffusionXLPipeline with SDXL's structure at toy size: two text encoders
    (CLIPTextModel and CLIPTextModelWithProjection, hidden states concatenated into the UNet's
    64-wide cross-attention), pooled text embeddings and time ids through the UNet's
    `text_time` addition embedding, linear proj_in/proj_out, Euler scheduler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(tmp)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_2 = build_tokenizer(tmp)
    width, projection, time_dim = 32, 32, 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=(2, 4), norm_num_groups=8,
        use_linear_projection=True, transformer_layers_per_block=(1, 2), cross_attention_dim=2 * width,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + projection,
    )
    torch.manual_seed(seed + 1)
    vae = _tiny_vae(sample_size, scaling_factor=0.13025)

    def text_config():
        return _tiny_text_config(tokenizer, width, projection_dim=projection, hidden_act="gelu")

    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(text_config())
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(text_config())
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)


def t5_rows(tokenizer) -> int:
    """T5's table size: the tokenizer's, padded to a multiple of 64 as T5-XXL pads its 32100 tokens to
    32128 rows (so code that appends tokens meets the same gap as with the real model)."""
    return -(-len(tokenizer) // 64) * 64


def _tiny_t5_config(tokenizer, width: int):
    """A 2-layer T5 encoder config (gated GELU, as T5 v1.1) for the local T5 tokenizer."""
    from transformers import T5Config

    return T5Config(vocab_size=t5_rows(tokenizer), d_model=width, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                    relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def build_t5_tokenizer(words=WORDS, max_length: int = 32):
    """A T5TokenizerFast from a small Unigram model over the project's words (T5's special tokens:
    <pad> 0, </s> 1, <unk> 2), built locally: the hub's tokenizers are out of reach."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces = dict.fromkeys(["\u2581" + w for w in words] + [w for w in words] + list("abcdefghijklmnopqrstuvwxyz0123456789"))
    vocab += [(p, -float(i + 1) / 100) for i, p in enumerate(pieces)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=max_length)


def build_tiny_flux_pipeline(seed: int = 0, sample_size: int = 32, guidance: bool = True):
    """A FluxPipeline with FLUX.1's structure at toy size: a FluxTransformer2DModel with one double
    (MM-DiT) and one single block (`to_q/k/v`, `add_*_proj`, `to_add_out`, `proj_mlp/proj_out`,
    feed-forwards), packed 2x2 latents with position ids, dev's guidance embedding (`guidance`);
    CLIP-L's pooled output and a 2-layer T5 encoder (max 32 tokens); a 1-level VAE with FLUX's
    shift and scale (a 16-channel latent, so the transformer sees 64 channels as FLUX does)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(tmp)
    tokenizer_2 = build_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=guidance, axes_dims_rope=[4, 4, 8])
    torch.manual_seed(seed + 1)
    vae = _tiny_vae(sample_size, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                    shift_factor=0.1159, scaling_factor=0.3611)  # FLUX.1's 16 channels, shift and scale
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_tiny_text_config(tokenizer, 32, hidden_act="gelu"))
    torch.manual_seed(seed + 3)
    text_encoder_2 = T5EncoderModel(_tiny_t5_config(tokenizer_2, 32))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)


# Qwen3's chat template for one user turn, as its tokenizer renders it with thinking off
QWEN_CHAT = ("{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
             "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
             "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
             "{%- endif %}{%- endif %}")


def build_qwen_tokenizer(words=WORDS, max_length: int = 512):
    """A Qwen2 tokenizer (byte-level BPE, Qwen's special tokens and chat template) learned from the
    project's words, built locally: the hub's Qwen3 tokenizer is out of reach. Deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(words), *(" " + w for w in words), "user assistant"], trainer)
    return Qwen2TokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
                              chat_template=QWEN_CHAT, model_max_length=max_length)


def build_tiny_flux2_klein_pipeline(seed: int = 0, sample_size: int = 32):
    """A Flux2KleinPipeline with FLUX.2 [klein]'s structure at toy size: a Flux2Transformer2DModel with
    one double and one single block (fused to_qkv_mlp_proj), no guidance embedding, 4-D rope; a
    28-layer Qwen3 (16 wide: layers 9, 18, 27 give 48-wide prompt embeddings) with a local tokenizer;
    a 2-level Flux2 VAE (8 latent channels, 2x2-patchified to the transformer's 32) whose batch-norm
    statistics are not the identity, so their use is checked."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = build_qwen_tokenizer()
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=32, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                          timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
                                          guidance_embeds=False)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLFlux2(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=8, norm_num_groups=8,
                             sample_size=sample_size * 2, layers_per_block=1)
    vae.bn.running_mean.uniform_(-0.2, 0.2)
    vae.bn.running_var.uniform_(0.5, 2.0)
    torch.manual_seed(seed + 2)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer) + 8, hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=28, num_attention_heads=2, num_key_value_heads=1,
                                                head_dim=8, max_position_embeddings=1024, tie_word_embeddings=True))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer)


def build_tiny_z_image_pipeline(seed: int = 0, sample_size: int = 32):
    """A ZImagePipeline with Z-Image's structure at toy size: a ZImageTransformer2DModel (one noise and
    one context refiner block, two main blocks, 32 wide), a 2-layer Qwen3Model (16 wide) with the
    local Qwen tokenizer, a VAE with FLUX.1's 16-channel latent, shift and scale."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = build_qwen_tokenizer()
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32,
                                           n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                                           axes_dims=[4, 6, 6], axes_lens=[512, 64, 64])
    torch.manual_seed(seed + 1)
    vae = _tiny_vae(sample_size, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                    shift_factor=0.1159, scaling_factor=0.3611)  # FLUX.1's 16 channels, shift and scale
    torch.manual_seed(seed + 2)
    text_encoder = Qwen3Model(Qwen3Config(vocab_size=len(tokenizer) + 8, hidden_size=16, intermediate_size=32,
                                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                          max_position_embeddings=1024))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)


def build_tiny_chroma_pipeline(seed: int = 0, sample_size: int = 32):
    """A ChromaPipeline with Chroma's structure at toy size: a ChromaTransformer2DModel with one double
    and one single block and a one-layer distilled guidance network, packed 2x2 latents; a 2-layer T5
    with the local T5 tokenizer; a VAE with FLUX.1's 16-channel latent, shift and scale."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import T5EncoderModel

    tokenizer = build_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                           axes_dims_rope=(4, 4, 8), approximator_num_channels=16,
                                           approximator_hidden_dim=32, approximator_layers=1)
    torch.manual_seed(seed + 1)
    vae = _tiny_vae(sample_size, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                    shift_factor=0.1159, scaling_factor=0.3611)  # FLUX.1's 16 channels, shift and scale
    torch.manual_seed(seed + 2)
    text_encoder = T5EncoderModel(_tiny_t5_config(tokenizer, 32))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return ChromaPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)


def build_tiny_sd3_pipeline(seed: int = 0, sample_size: int = 32):
    """A StableDiffusion3Pipeline with SD 3's structure at toy size: an SD3Transformer2DModel with two
    joint (MM-DiT) blocks, CLIP-L and CLIP-G with projections (32 wide each, pooled 64) and a 2-layer
    T5 (64 wide, the joint attention's width), a VAE with SD 3's 16-channel latent, shift and scale."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(tmp)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_2 = build_tokenizer(tmp)
    tokenizer_3 = build_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=sample_size, patch_size=2, in_channels=16, out_channels=16,
                                        num_layers=2, attention_head_dim=8, num_attention_heads=4,
                                        joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
                                        pos_embed_max_size=96)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(16, 32),
                        latent_channels=16, norm_num_groups=8, sample_size=sample_size * 2, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305)

    def clip_config():
        return _tiny_text_config(tokenizer, 32, projection_dim=32, hidden_act="gelu")

    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModelWithProjection(clip_config())
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(clip_config())
    torch.manual_seed(seed + 4)
    text_encoder_3 = T5EncoderModel(_tiny_t5_config(tokenizer_3, 64))
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                    text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                                    text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)


def save_tiny_pipeline(path: str | os.PathLike, seed: int = 0, sd2: bool = False, sdxl: bool = False,
                       flux: bool = False, sd3: bool = False, flux2_klein: bool = False,
                       z_image: bool = False, chroma: bool = False) -> Path:
    """Build the tiny pipeline and save it atomically (temp folder + rename) in diffusers layout."""
    path = Path(path)
    if (path / "model_index.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pipe = (build_tiny_flux_pipeline(seed=seed) if flux else build_tiny_sd3_pipeline(seed=seed) if sd3
            else build_tiny_flux2_klein_pipeline(seed=seed) if flux2_klein
            else build_tiny_z_image_pipeline(seed=seed) if z_image
            else build_tiny_chroma_pipeline(seed=seed) if chroma
            else build_tiny_sdxl_pipeline(seed=seed) if sdxl
            else build_tiny_pipeline(seed=seed, sd2=sd2))
    pipe.save_pretrained(tmp)
    from ..outputs import make_readable

    make_readable(tmp)  # a shared cache: safetensors alone leaves its files 0600
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return path


def save_tiny_clip(path: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny random CLIPModel with its tokenizer and image processor, in the layout
    `CLIPModel.from_pretrained` reads (for evaluation tests; CLIP-I / CLIP-T code paths)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    path = Path(path)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(path)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 77, "bos_token_id": tokenizer.bos_token_id,
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 37,
                       "num_hidden_layers": 2, "num_attention_heads": 4},
        projection_dim=16)
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def save_tiny_vit(path: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny random ViTModel (DINO's architecture) with its image processor."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    path = Path(path)
    torch.manual_seed(seed)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=37)
    ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path
