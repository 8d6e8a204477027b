"""The original Wan modules, to check wanpipe's loaders against the code that defines the layouts.

Where they come from: the Wan team's own release of their repository on PyPI, ``wan22==2.2.11``
(github.com/Wan-Video/Wan2.2), installed with ``--no-deps`` (its requirements name flash-attn, which
has no CPU build) by ``.ci/run``; einops, which its VAE imports, is a test dependency. No upstream
code is copied into this repository: the files are imported from the installed package, unedited.
The package is Apache-2.0 (``wan22-2.2.11.dist-info/licenses/LICENSE.txt``).

- ``wan/modules/{model,t5,vae2_1,vae2_2}.py`` of wan22 2.2.11 are byte-identical to those of
  Wan-Video/Wan2.2 at commit 42bf4cfaa384bc21833865abc2f9e6c0e67233dc;
- against Wan-Video/Wan2.1 at commit 9737cba9c1c3c4d04b33fcad41c111989865d315: ``t5.py`` is identical,
  ``vae.py`` differs from ``vae2_1.py`` only in the wrapper class's name (``WanVAE`` / ``Wan2_1_VAE``);
  ``model.py`` is Wan 2.2's ``WanModel``: the same module and parameter names for T2V, plus per-token
  timesteps (TI2V) and Wan 2.2's I2V (36 input channels), but without Wan 2.1's CLIP branch
  (``img_emb``, ``cross_attn.k_img``/``v_img``: I2V-14B and FLF2V), which these tests cannot cover.

What is substituted at import time (no file is edited):

- ``wan/__init__.py`` is not run (it imports the pipelines, flash-attn, dashscope...): the
  ``wan/modules`` folder is imported as a package of its own, :data:`PACKAGE`;
- its ``attention`` module is replaced by :func:`flash_attention` below: flash-attn is CUDA-only and
  casts q, k, v to bf16; the stand-in computes the same attention (softmax scale 1/sqrt(head_dim), keys
  past ``k_lens`` masked) in the inputs' dtype with ``scaled_dot_product_attention``;
- ``t5.py`` gives ``T5EncoderModel.__init__`` the default ``device=torch.cuda.current_device()``,
  evaluated when the module is imported: ``torch.cuda.current_device`` returns 0 during that import
  (the class is not used here; ``T5Encoder`` is).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
import types
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

DISTRIBUTION = "wan22"
VERSION = "2.2.11"
PACKAGE = "wan_reference_modules"
"""The name the original ``wan/modules`` folder is imported under."""


def flash_attention(
    q,
    k,
    v,
    q_lens=None,
    k_lens=None,
    dropout_p=0.0,
    softmax_scale=None,
    q_scale=None,
    causal=False,
    window_size=(-1, -1),
    deterministic=False,
    dtype=torch.bfloat16,
    version=None,
):
    """``wan.modules.attention.flash_attention``'s contract (q (B, Lq, N, C), k/v (B, Lk, N, C) ->
    (B, Lq, N, C)), in the inputs' dtype, for the arguments the original modules pass."""
    if q_lens is not None or causal or tuple(window_size) != (-1, -1) or dropout_p or q_scale is not None:
        raise NotImplementedError("the reference attention covers full, non-causal, unwindowed attention")
    mask = None
    if k_lens is not None:
        mask = torch.arange(k.size(1), device=k.device)[None, :] < k_lens.to(k.device)[:, None]
        mask = mask[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=softmax_scale
    )
    return out.transpose(1, 2).contiguous().type(q.dtype)


def _modules_folder() -> Path:
    dist = importlib.metadata.distribution(DISTRIBUTION)
    if dist.version != VERSION:
        raise ModuleNotFoundError(f"{DISTRIBUTION}=={VERSION} is needed, {dist.version} is installed")
    folder = Path(str(dist.locate_file("wan/modules")))
    if not (folder / "model.py").is_file():
        raise ModuleNotFoundError(f"{DISTRIBUTION} is installed but {folder / 'model.py'} is missing")
    return folder


def load() -> types.SimpleNamespace:
    """The original modules: ``model`` (WanModel), ``t5`` (T5Encoder, umt5_xxl), ``vae21`` (WanVAE_,
    Wan2_1_VAE), ``vae22`` (Wan 2.2's WanVAE_). Raises ModuleNotFoundError when wan22 or einops is missing."""
    if PACKAGE not in sys.modules:
        import einops  # noqa: F401  (the VAEs need it; fail before registering anything)

        folder = _modules_folder()
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(folder)]
        attention = types.ModuleType(f"{PACKAGE}.attention")
        attention.flash_attention = flash_attention
        attention.__all__ = ["flash_attention"]
        sys.modules[PACKAGE] = package
        sys.modules[f"{PACKAGE}.attention"] = attention
        try:
            with mock.patch.object(torch.cuda, "current_device", lambda: 0):
                for name in ("model", "t5", "vae2_1", "vae2_2"):
                    importlib.import_module(f"{PACKAGE}.{name}")
        except BaseException:
            for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
                del sys.modules[name]
            raise
    return types.SimpleNamespace(
        model=sys.modules[f"{PACKAGE}.model"],
        t5=sys.modules[f"{PACKAGE}.t5"],
        vae21=sys.modules[f"{PACKAGE}.vae2_1"],
        vae22=sys.modules[f"{PACKAGE}.vae2_2"],
    )


def require() -> types.SimpleNamespace:
    """:func:`load`, or skip the test where wan22 is not installed (never in CI: there it must be)."""
    import pytest

    try:
        return load()
    except (ModuleNotFoundError, importlib.metadata.PackageNotFoundError) as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(
            f"the original Wan code is not installed ({e}): pip install --no-deps {DISTRIBUTION}=={VERSION} einops"
        )


CONFIGS_PACKAGE = "wan_reference_configs"
"""The name the original ``wan/configs`` folder is imported under (its ``__init__.py`` runs: it only
imports the config modules)."""


class _EasyDict(dict):
    """The part of ``easydict.EasyDict`` the original configs use (attribute access to items,
    ``EasyDict(__name__=...)``, ``update``), for when easydict (not a test dependency) is missing."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value


def load_configs() -> types.ModuleType:
    """The original ``wan/configs`` package of wan22 (``WAN_CONFIGS``: t2v-A14B, i2v-A14B, ti2v-5B,
    animate-14B, s2v-14B; each with sample_shift, sample_steps, sample_guide_scale, frame_num,
    sample_fps, sample_neg_prompt...). Wan 2.1's configs are not in wan22."""
    if CONFIGS_PACKAGE not in sys.modules:
        folder = _modules_folder().parent / "configs"
        spec = importlib.util.spec_from_file_location(
            CONFIGS_PACKAGE, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        module = importlib.util.module_from_spec(spec)
        stub = types.ModuleType("easydict")
        stub.EasyDict = _EasyDict
        extra = {} if importlib.util.find_spec("easydict") else {"easydict": stub}
        with mock.patch.dict(sys.modules, {CONFIGS_PACKAGE: module, **extra}):
            spec.loader.exec_module(module)
            loaded = {n: m for n, m in sys.modules.items() if n.startswith(CONFIGS_PACKAGE)}
        sys.modules.update(loaded)
    return sys.modules[CONFIGS_PACKAGE]
