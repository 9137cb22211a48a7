"""Tiny models of the real architectures, built offline: the demo's default input and the tests'.

Real Transformers classes from small configs, fixed seed, random weights, a byte-level BPE tokenizer
trained here with ``tokenizers``, and the processor files a served VLM needs. Linear widths are
multiples of 128 so the block format and the run-time kernels apply as they do at full size.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|image_pad|>", "<|video_pad|>"]

# Qwen-style chat template, shortened: text and image parts, generation prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "A cat sits on a red sofa in a sunny living room.",
    "An astronaut in a white suit holds a flag on the moon.",
    "Describe this image concisely with key subjects, setting, and actions.",
    "Return one detailed sentence about the photo.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "A cup of coffee with latte art on a wooden table in a cafe.",
    "Rockets launch from the pad at dawn while the crowd watches.",
    "def quantize(weight, scale): return weight / scale",
    "FP8 keeps eight bits per weight and one scale per block of 128 by 128 values.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000, punctuation: ; , . ! ? ( ) [ ] { }",
]

CARD = """---
license: apache-2.0
tags:
- tiny
- test-model
---

# tiny model

Random weights, built by fp8vl for its demo and tests.
"""


def train_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained on a small built-in corpus, with Qwen's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL[1:])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _ids(tok) -> dict[str, int]:
    return {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}


def qwen3_vl_config(tok, kind: str = "dense"):
    """Small Qwen3-VL (or Qwen3-VL-MoE) config: text hidden 256, 2 layers, vision hidden 128.
    ``wide``: a dense one with text hidden 1024, intermediate 2048 and head_dim 128, wide enough in K
    (8+ blocks of 128) that the decode GEMVs split K on a GPU, as they do at the real sizes."""
    ids = _ids(tok)
    wide = kind == "wide"
    text = dict(vocab_size=len(tok), hidden_size=1024 if wide else 256, intermediate_size=2048 if wide else 512,
                num_hidden_layers=2, num_attention_heads=8 if wide else 4, num_key_value_heads=2,
                head_dim=128 if wide else 64, max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_interleaved": True,
                                 "mrope_section": [24, 20, 20] if wide else [12, 10, 10]},
                tie_word_embeddings=kind == "tied", pad_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], bos_token_id=None)
    vision = dict(depth=2, hidden_size=128, intermediate_size=344, num_heads=2, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=text["hidden_size"],
                  num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                  tie_word_embeddings=kind == "tied")
    if kind == "moe":
        from transformers import Qwen3VLMoeConfig

        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=384, decoder_sparse_step=1,
                    mlp_only_layers=[])
        return Qwen3VLMoeConfig(text_config=text, vision_config=vision, **common)
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(text_config=text, vision_config=vision, **common)


def processor_for(tok):
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    # 32x32-pixel units (patch 16, merge 2); at most 128x128 pixels: 16 image tokens per picture.
    size = {"shortest_edge": 32 * 32, "longest_edge": 128 * 128}
    image = Qwen2VLImageProcessor(size=size, patch_size=16, merge_size=2, temporal_patch_size=2,
                                  image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    video = Qwen3VLVideoProcessor(size=size, patch_size=16, merge_size=2, temporal_patch_size=2)
    return Qwen3VLProcessor(image_processor=image, tokenizer=tok, video_processor=video,
                            chat_template=CHAT_TEMPLATE)


def build_tiny_qwen3_vl(path: str | Path, kind: str = "dense", seed: int = 0, dtype=torch.bfloat16) -> Path:
    """Write a tiny Qwen3-VL checkpoint (``kind``: dense, tied, moe or wide) with processor files to ``path``."""
    from transformers import AutoModelForImageTextToText, GenerationConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    config = qwen3_vl_config(tok, kind)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    _spread_weights(model, seed)
    model.to(dtype).save_pretrained(path)
    processor = processor_for(tok)
    processor.save_pretrained(path)
    # The separate files Qwen's own repos ship (and vLLM reads): preprocessor_config.json,
    # video_preprocessor_config.json.
    processor.image_processor.save_pretrained(path)
    processor.video_processor.save_pretrained(path)
    GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, top_k=20,
                     eos_token_id=[tok.convert_tokens_to_ids("<|im_end|>")],
                     pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>")).save_pretrained(path)
    (path / "README.md").write_text(CARD)
    return path


ARCHS = ("qwen3_vl", "qwen3_vl_tied", "qwen3_vl_moe", "qwen2_5_vl", "gemma3", "qwen3", "llama")
TEXT = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, max_position_embeddings=2048)


def _other_config(tok, arch: str):
    """Small configs of the other families fp8vl plans for (text widths multiples of 128)."""
    import transformers as tf

    ids = _ids(tok)
    base = dict(TEXT, vocab_size=len(tok), pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    if arch == "qwen3":
        return tf.Qwen3Config(**base, tie_word_embeddings=False)
    if arch == "llama":
        return tf.LlamaConfig(**base, tie_word_embeddings=False)
    if arch == "qwen2_5_vl":
        text = dict(base, bos_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                              "mrope_section": [8, 12, 12]})
        vision = dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=2, out_hidden_size=256,
                      patch_size=14, spatial_merge_size=2, window_size=56, fullatt_block_indexes=[1])
        return tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                                   video_token_id=ids["<|video_pad|>"],
                                   vision_start_token_id=ids["<|vision_start|>"])
    if arch == "gemma3":
        vision = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                      image_size=64, patch_size=16)
        return tf.Gemma3Config(text_config=base, vision_config=vision, mm_tokens_per_image=4,
                               image_token_index=ids["<|image_pad|>"], boi_token_index=ids["<|vision_start|>"],
                               eoi_token_index=ids["<|vision_end|>"])
    raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHS)}")


def build_tiny(path: str | Path, arch: str = "qwen3_vl", seed: int = 0, dtype=torch.bfloat16) -> Path:
    """A tiny model of ``arch`` (see ARCHS). Qwen3-VL variants come with their processor files;
    the others with the tokenizer and chat template only."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    kinds = {"qwen3_vl": "dense", "qwen3_vl_tied": "tied", "qwen3_vl_moe": "moe"}
    if arch in kinds:
        return build_tiny_qwen3_vl(path, kinds[arch], seed, dtype)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    config = _other_config(tok, arch)
    torch.manual_seed(seed)
    cls = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    model = cls.from_config(config, dtype=torch.float32)
    _spread_weights(model, seed)
    model.to(dtype).save_pretrained(path)
    if arch == "qwen2_5_vl":
        _qwen2_5_vl_processor(tok).save_pretrained(path)
    else:
        tok.save_pretrained(path)
    (path / "README.md").write_text(CARD)
    return path


def _qwen2_5_vl_processor(tok):
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    size = {"shortest_edge": 28 * 28, "longest_edge": 112 * 112}  # patch 14, merge 2
    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(size=size, patch_size=14, merge_size=2),
                               tokenizer=tok, video_processor=Qwen2VLVideoProcessor(size=size, patch_size=14,
                                                                                    merge_size=2),
                               chat_template=CHAT_TEMPLATE)


def _spread_weights(model: torch.nn.Module, seed: int) -> None:
    """Random weights with the spread of a trained model (std ~ 1/sqrt(fan_in)) and a few outliers,
    so that logits are far from uniform and quantization error shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel() if p.ndim > 3 else p.shape[-1]  # conv: in*t*h*w
                # lm_head x4: logits with a trained model's spread (peaked, not near-uniform)
                gain = 4.0 if name.startswith("lm_head") else 1.0
                p.copy_(gain * torch.randn(p.shape, generator=g) / fan_in**0.5)
                outliers = torch.rand(p.shape, generator=g) < 1e-3
                p[outliers] *= 8
            elif "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))



# ---------------------------------------------------------------- full-size Qwen3-VL-8B shapes (benchmarks)

def full_size_tokenizer(vocab_size: int = 151936):
    """A tokenizer with Qwen3's vocabulary size, built offline: a word-level vocabulary of
    ``w0 .. wN`` plus Qwen's special tokens, so every id a random model emits decodes to text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab_size - len(SPECIAL))}
    words.update({s: len(words) + i for i, s in enumerate(SPECIAL)})
    tok = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL[1:])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def qwen3_vl_8b_config(tok, layers: int = 36):
    """Qwen3-VL-8B-Instruct's published shapes (text 4096 x 36 layers, vision 1152 x 27 blocks)."""
    from transformers import Qwen3VLConfig

    ids = _ids(tok)
    text = dict(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=layers,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                                    "mrope_interleaved": True, "mrope_section": [24, 20, 20]},
                tie_word_embeddings=False, pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                bos_token_id=None)
    vision = dict(depth=VD, hidden_size=VH, intermediate_size=VI, num_heads=16, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=OUT, num_position_embeddings=2304,
                  deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh")
    return Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                         video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                         vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)


def build_qwen3_vl_8b(path: str | Path, layers: int = 36, device: str = "cuda") -> Path:
    """A Qwen3-VL-8B-shaped BF16 checkpoint with random weights, a full-size tokenizer and Qwen3-VL's
    own processor sizes (a 512x512 image: 1024 patches, 256 image tokens); built on ``device``."""
    from transformers import AutoModelForImageTextToText, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = full_size_tokenizer()
    config = qwen3_vl_8b_config(tok, layers)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="5GB")
    del model
    size = {"shortest_edge": 65536, "longest_edge": 16777216}
    image = Qwen2VLImageProcessor(size=size, patch_size=16, merge_size=2, temporal_patch_size=2,
                                  image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    video = Qwen3VLVideoProcessor(size=size, patch_size=16, merge_size=2, temporal_patch_size=2)
    processor = Qwen3VLProcessor(image_processor=image, tokenizer=tok, video_processor=video,
                                 chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(path)
    image.save_pretrained(path)
    video.save_pretrained(path)
    return path


# ---------------------------------------------------------------- full-size shapes without data

H, I, V, L_FULL = 4096, 12288, 151936, 36         # Qwen3-VL-8B text
VH, VI, VD, OUT = 1152, 4304, 27, 4096             # vision tower


def qwen3_vl_8b_shapes(layers: int = L_FULL) -> dict[str, tuple[int, ...]]:
    """Qwen3-VL-8B's tensor names and shapes (transformers 4.57+ layout), ``layers`` text layers."""
    s: dict[str, tuple[int, ...]] = {}
    v = "model.visual."
    s[v + "patch_embed.proj.weight"] = (VH, 3, 2, 16, 16)
    s[v + "patch_embed.proj.bias"] = (VH,)
    s[v + "pos_embed.weight"] = (2304, VH)
    for b in range(VD):
        p = f"{v}blocks.{b}."
        for n in ("norm1", "norm2"):
            s[p + n + ".weight"], s[p + n + ".bias"] = (VH,), (VH,)
        for n, shp in (("attn.qkv", (3 * VH, VH)), ("attn.proj", (VH, VH)), ("mlp.linear_fc1", (VI, VH)),
                       ("mlp.linear_fc2", (VH, VI))):
            s[p + n + ".weight"], s[p + n + ".bias"] = shp, (shp[0],)
    for m in ["merger"] + [f"deepstack_merger_list.{j}" for j in range(3)]:
        norm = VH if m == "merger" else 4 * VH
        s[f"{v}{m}.norm.weight"], s[f"{v}{m}.norm.bias"] = (norm,), (norm,)
        s[f"{v}{m}.linear_fc1.weight"], s[f"{v}{m}.linear_fc1.bias"] = (4 * VH, 4 * VH), (4 * VH,)
        s[f"{v}{m}.linear_fc2.weight"], s[f"{v}{m}.linear_fc2.bias"] = (OUT, 4 * VH), (OUT,)
    t = "model.language_model."
    s[t + "embed_tokens.weight"] = (V, H)
    for n in range(layers):
        p = f"{t}layers.{n}."
        s[p + "input_layernorm.weight"] = s[p + "post_attention_layernorm.weight"] = (H,)
        s[p + "self_attn.q_norm.weight"] = s[p + "self_attn.k_norm.weight"] = (128,)
        for name, shp in (("self_attn.q_proj", (H, H)), ("self_attn.k_proj", (1024, H)),
                          ("self_attn.v_proj", (1024, H)), ("self_attn.o_proj", (H, H)),
                          ("mlp.gate_proj", (I, H)), ("mlp.up_proj", (I, H)), ("mlp.down_proj", (H, I))):
            s[p + name + ".weight"] = shp
    s[t + "norm.weight"] = (H,)
    s["lm_head.weight"] = (V, H)
    return s


def qwen3_vl_8b_config_dict(layers: int = L_FULL) -> dict:
    """Qwen3-VL-8B's config.json, as far as fp8vl's planner and vLLM's memory arithmetic read it."""
    return {"architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
            "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "text_config": {"hidden_size": H, "intermediate_size": I, "num_hidden_layers": layers,
                            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                            "vocab_size": V, "model_type": "qwen3_vl_text",
                            "max_position_embeddings": 262144},
            "vision_config": {"depth": VD, "hidden_size": VH, "intermediate_size": VI, "patch_size": 16,
                              "spatial_merge_size": 2,
                              "out_hidden_size": OUT, "model_type": "qwen3_vl"}}


def write_header_only(folder: Path, cfg: dict, shapes: dict[str, tuple[int, ...]], fmt: str = "fp8",
                      scale_dtype: str = "F32") -> Path:
    """The FP8 checkpoint fp8vl would write for ``shapes`` (its planner, its output layout), as a real
    header over a sparse file: full-size inputs for ``plan``, ``serve`` and ``verify`` at no disk cost."""
    import json

    from ..checkpoint.formats import quantization_config
    from ..options import QuantizeOptions
    from ..conversion.output import out_slots
    from ..checkpoint.plan import make_plan
    from ..checkpoint.shards import DTYPES, ITEMSIZE, TensorInfo, layout

    folder.mkdir(parents=True, exist_ok=True)
    plan = make_plan(cfg, shapes, QuantizeOptions(format=fmt))
    slots = [s for e in plan.entries
             for s in out_slots(e, TensorInfo(e.name, "BF16", e.shape, folder, 0, math.prod(e.shape) * ITEMSIZE["BF16"]),
                                fmt, DTYPES[scale_dtype])]
    head, placed = layout(slots, {"format": "pt"})
    with open(folder / "model.safetensors", "wb") as f:
        f.write(head)
        f.truncate(len(head) + sum(s.nbytes for s in placed))
    (folder / "config.json").write_text(json.dumps(
        {**cfg, "quantization_config": quantization_config(fmt, list(plan.not_converted))}, indent=2))
    return folder
