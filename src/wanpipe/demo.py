"""The built-in demo checkpoint: a tiny random-weight Wan 2.1 T2V in the diffusers layout.

Made once, with wanpipe's own modules, in the user's cache (``$WANPIPE_CACHE`` or
``~/.cache/wanpipe``), so ``wanpipe generate`` works on any machine offline. Its weights are random:
the video it makes is noise. It exists to show the tool end to end; pass ``--model`` for real weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from wanpipe.models.transformer import WanTransformerModel
from wanpipe.models.transformer_layers import TransformerConfig
from wanpipe.models.vae import VAEConfig, WanVAE
from wanpipe.weights.keymap import KeyMap, remap_state_dict
from wanpipe.weights.transformer_keys import TRANSFORMER_TO_DIFFUSERS_KEYS
from wanpipe.weights.vae_keys import VAE_TO_DIFFUSERS_KEYS

DEMO_VERSION = "demo-v1"

# A few sentences to train the demo's sentencepiece-style (Unigram) tokenizer on.
_CORPUS = [
    "a cat walks on the grass in the garden",
    "a dog runs along the beach at sunset, waves rolling in",
    "a red car drives down a city street at night with neon lights",
    "an astronaut floats in space above the blue earth",
    "a bird flies over snowy mountains under a clear sky",
    "a cup of coffee steams on a wooden table by the window",
    "waves crash against the rocks, slow motion, cinematic lighting",
    "a child laughs while playing with a kite in a green park",
    "the quick brown fox jumps over the lazy dog",
    "bright tones, overexposed, static, blurred details, subtitles, worst quality, low quality",
]

TRANSFORMER_CONFIG: dict[str, Any] = {
    "_class_name": "WanTransformer3DModel",
    "patch_size": [1, 2, 2],
    "num_attention_heads": 2,
    "attention_head_dim": 32,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 32,
    "freq_dim": 32,
    "ffn_dim": 128,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
    "pos_embed_seq_len": None,
}

VAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKLWan",
    "base_dim": 16,
    "z_dim": 16,
    "dim_mult": [1, 1, 2, 2],
    "num_res_blocks": 1,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
}

TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "architectures": ["UMT5EncoderModel"],
    "model_type": "umt5",
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 16,
    "feed_forward_proj": "gated-gelu",
    "dense_act_fn": "gelu_new",
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-6,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
    "tie_word_embeddings": True,
}

SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "UniPCMultistepScheduler",
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
    "solver_order": 2,
    "solver_type": "bh2",
    "predict_x0": True,
    "lower_order_final": True,
    "final_sigmas_type": "zero",
    "timestep_spacing": "linspace",
}

MODEL_INDEX: dict[str, Any] = {
    "_class_name": "WanPipeline",
    "_wanpipe_demo": True,
    "boundary_ratio": None,
    "expand_timesteps": False,
    "scheduler": ["diffusers", "UniPCMultistepScheduler"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "WanTransformer3DModel"],
    "transformer_2": [None, None],
    "vae": ["diffusers", "AutoencoderKLWan"],
}


def cache_root() -> Path:
    return Path(os.environ.get("WANPIPE_CACHE", Path.home() / ".cache" / "wanpipe")).expanduser()


def _randomize(module: nn.Module, generator: torch.Generator) -> None:
    """Random weights with sane scales: unit norms, fan-in scaled matrices, small biases."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name or name.endswith("gamma"):
                p.fill_(1.0)
            elif p.ndim >= 2 and "modulation" not in name:
                fan_in = max(1, p[0].numel())
                p.copy_(torch.randn(p.shape, generator=generator) / fan_in**0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def train_tokenizer(corpus: list[str], vocab_size: int) -> Any:
    """A small UMT5-style tokenizer made offline with the ``tokenizers`` library: a Unigram model with
    the sentencepiece Metaspace pre-tokenizer, ``<pad>`` = 0, ``</s>`` = 1 appended to each text.

    The vocabulary is counted, not trained: ``tokenizers``' Unigram trainer is not deterministic (its
    pieces and scores change from run to run, and so did the tokens of a test prompt, and with them
    every tiny test model built on it). Here: the special tokens, every character of the corpus, then the
    most frequent whole words, each scored by its log frequency; ties go by the text. The same corpus
    always gives the same tokenizer.
    """
    import math
    import unicodedata
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    specials = ["<pad>", "</s>", "<unk>"]
    words: Counter[str] = Counter()
    chars: Counter[str] = Counter()
    for text in corpus:
        for word in unicodedata.normalize("NFKC", text).split():
            piece = "\u2581" + word  # the Metaspace form of a word
            words[piece] += 1
            chars.update(piece)
    total = sum(words.values()) + sum(chars.values())
    # Characters first (every text can be spelled), scored low so that whole words win where they exist.
    vocab = [
        (c, math.log(n / total) - 10.0) for c, n in sorted(chars.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    room = max(0, vocab_size - len(specials) - len(vocab))
    ranked = sorted(((w, n) for w, n in words.items() if len(w) > 1), key=lambda kv: (-kv[1], kv[0]))
    vocab += [(w, math.log(n / total)) for w, n in ranked[:room]]
    tok = Tokenizer(models.Unigram([(t, 0.0) for t in specials] + vocab, unk_id=2, byte_fallback=False))
    tok.add_special_tokens(specials)
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    return tok


def _write_tokenizer(folder: Path) -> int:
    tok = train_tokenizer(_CORPUS * 4, vocab_size=200)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    _write_json(
        folder / "tokenizer_config.json",
        {"tokenizer_class": "T5Tokenizer", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"},
    )
    return tok.get_vocab_size()


def write_demo_checkpoint(folder: Path, seed: int = 0) -> Path:
    """Write the demo checkpoint into ``folder`` (created); returns it."""
    from transformers import UMT5Config, UMT5EncoderModel

    folder = Path(folder)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    _write_json(folder / "model_index.json", MODEL_INDEX)
    _write_json(folder / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    vocab_size = _write_tokenizer(folder / "tokenizer")

    te_config = {**TEXT_ENCODER_CONFIG, "vocab_size": vocab_size}
    encoder = UMT5EncoderModel(UMT5Config(**{k: v for k, v in te_config.items() if k != "architectures"}))
    state = {k: v.contiguous() for k, v in encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}
    _write_json(folder / "text_encoder" / "config.json", te_config)
    save_file(state, str(folder / "text_encoder" / "model.safetensors"))

    transformer = WanTransformerModel(TransformerConfig.from_dict(TRANSFORMER_CONFIG))
    _write_component(
        folder / "transformer", transformer, TRANSFORMER_CONFIG, TRANSFORMER_TO_DIFFUSERS_KEYS, generator
    )
    vae = WanVAE(VAEConfig.from_dict(VAE_CONFIG))
    _write_component(folder / "vae", vae, VAE_CONFIG, VAE_TO_DIFFUSERS_KEYS, generator)
    return folder


def _write_component(
    folder: Path, module: nn.Module, config: dict[str, Any], rules: KeyMap, generator: torch.Generator
) -> None:
    """Randomize ``module`` and write it as a diffusers component folder (config, weights renamed by ``rules``)."""
    _randomize(module, generator)
    _write_json(folder / "config.json", config)
    state = remap_state_dict(module.state_dict(), rules)
    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(folder / "diffusion_pytorch_model.safetensors")
    )


def ensure_demo_checkpoint(root: Path | None = None) -> Path:
    """The demo checkpoint's folder, written on first use (atomically: a half-made one is never seen)."""
    root = Path(root) if root is not None else cache_root()
    target = root / DEMO_VERSION
    if (target / "model_index.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_VERSION}-", dir=root))
    try:
        write_demo_checkpoint(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "model_index.json").is_file():  # not a concurrent writer that won
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
