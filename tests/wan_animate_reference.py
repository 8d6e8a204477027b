"""The original Wan2.2-Animate model (``WanAnimateModel``), to check wanpipe's Animate loading and forward
against the code that defines the original layout.

Where it comes from: the installed ``wan22==2.2.11`` package (see :mod:`tests.wan_reference`), whose
``wan/modules/animate/{model_animate,face_blocks,motion_encoder}.py`` are byte-identical to those of
Wan-Video/Wan2.2 at commit 42bf4cfaa384bc21833865abc2f9e6c0e67233dc (checked when this file was written).
No upstream code is copied: the files are imported from the installed package, unedited.

What is substituted at import time (no file is edited):

- neither ``wan/__init__.py`` nor ``wan/modules/__init__.py`` nor ``wan/modules/animate/__init__.py``
  is run (they import the pipelines, the CLIP model, flash-attn...): the ``wan`` folder is imported as a
  package of its own, :data:`ROOT`, its subpackages registered empty;
- ``wan/modules/attention.py`` is :func:`tests.wan_reference.flash_attention` (the same attention in
  the inputs' dtype, CPU);
- ``wan/distributed/{sequence_parallel,util}.py`` (used only with ``use_context_parallel=True``) are
  stand-ins that refuse to run;
- ``face_blocks.flash_attn_func`` (flash-attn, CUDA-only, ``None`` when missing) is
  :func:`_flash_attn_func`: ``scaled_dot_product_attention`` on the same (batch, seq, heads, dim) layout.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from unittest import mock

import torch
import torch.nn.functional as F

from tests import wan_reference

ROOT = "wan_animate_reference"
"""The name the original ``wan`` folder is imported under."""


def _flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """flash-attn's ``flash_attn_func`` (softmax scale 1/sqrt(head_dim)): q (B, Lq, H, D), k/v (B, Lk, H, D)
    -> (B, Lq, H, D), in the inputs' dtype."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(
        1, 2
    )


def _context_parallel_only(*args, **kwargs):
    raise RuntimeError("the original's sequence-parallel helpers are not available in these tests")


def load() -> types.SimpleNamespace:
    """The original Animate modules: ``model_animate`` (WanAnimateModel), ``face_blocks``,
    ``motion_encoder``. Raises ModuleNotFoundError when wan22 or einops is missing."""
    name = f"{ROOT}.modules.animate.model_animate"
    if name not in sys.modules:
        import einops  # noqa: F401  (the Animate modules import it; fail before registering anything)

        folder = wan_reference._modules_folder()  # wan/modules of the installed wan22
        packages = {
            ROOT: folder.parent,
            f"{ROOT}.modules": folder,
            f"{ROOT}.modules.animate": folder / "animate",
            f"{ROOT}.distributed": None,
        }
        registered = []
        try:
            for package_name, path in packages.items():
                package = types.ModuleType(package_name)
                package.__path__ = [str(path)] if path is not None else []
                sys.modules[package_name] = package
                registered.append(package_name)
            attention = types.ModuleType(f"{ROOT}.modules.attention")
            attention.flash_attention = wan_reference.flash_attention
            for stub_name in ("sequence_parallel", "util"):
                stub = types.ModuleType(f"{ROOT}.distributed.{stub_name}")
                for fn in ("distributed_attention", "gather_forward", "get_rank", "get_world_size"):
                    setattr(stub, fn, _context_parallel_only)
                sys.modules[stub.__name__] = stub
                registered.append(stub.__name__)
            sys.modules[attention.__name__] = attention
            registered.append(attention.__name__)
            importlib.import_module(name)
            sys.modules[f"{ROOT}.modules.animate.face_blocks"].flash_attn_func = _flash_attn_func
        except BaseException:
            for n in [n for n in sys.modules if n == ROOT or n.startswith(ROOT + ".")]:
                del sys.modules[n]
            raise
    return types.SimpleNamespace(
        model_animate=sys.modules[name],
        face_blocks=sys.modules[f"{ROOT}.modules.animate.face_blocks"],
        motion_encoder=sys.modules[f"{ROOT}.modules.animate.motion_encoder"],
    )


def require() -> types.SimpleNamespace:
    """:func:`load`, or skip where wan22 is not installed (never in CI, see :func:`tests.wan_reference.require`)."""
    wan_reference.require()
    return load()


def load_clip() -> types.ModuleType:
    """The original ``wan/modules/animate/clip.py`` (``XLMRobertaCLIP``, ``VisionTransformer``): the same
    code as Wan 2.1's ``wan/modules/clip.py`` (Wan-Video/Wan2.1 9737cba; only the relative import depth
    differs), which defines the layout of ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``.
    torchvision (imported at its top for the preprocessing transforms, which are not used here) is a stand-in
    module when it is not installed."""
    name = f"{ROOT}.modules.animate.clip"
    if name not in sys.modules:
        load()
        stubs = {}
        if importlib.util.find_spec("torchvision") is None:
            transforms = types.ModuleType("torchvision.transforms")
            vision = types.ModuleType("torchvision")
            vision.transforms = transforms
            stubs = {"torchvision": vision, "torchvision.transforms": transforms}
        with mock.patch.dict(sys.modules, stubs):
            importlib.import_module(name)
            loaded = {n: m for n, m in sys.modules.items() if n.startswith(ROOT)}
        sys.modules.update(loaded)
    return sys.modules[name]
