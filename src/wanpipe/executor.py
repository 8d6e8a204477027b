"""WanExecutor: batches contexts into tensors and runs text encoder, DiT denoising loop and VAE.

``prepare_inputs(contexts)`` stacks a batch of contexts that share shape and schedule into a
:class:`WanExecutorInputs`; ``execute(inputs)`` returns :class:`WanExecutorOutputs` with the decoded
frames. The DiT runs block by block (``transformer.blocks``), so later work can compile, offload or
stream blocks one at a time; the conditional and unconditional branches of classifier-free guidance
run as one batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from wanpipe.context import WanContext
from wanpipe.models.text_encoder import WanTextEncoder
from wanpipe.models.transformer import WanTransformerModel
from wanpipe.models.vae import WanVAE
from wanpipe.schedulers import Schedule, new_state, step

StepCallback = Callable[[int, int, float], None]
"""Called after each denoising step with (step index, number of steps, timestep)."""


class CancelledError(RuntimeError):
    """The caller's cancel check asked to stop the denoising loop."""


@dataclass
class WanExecutorInputs:
    """A batch of B contexts as tensors. tokens/mask (B, L); negative_* (B, L) or None when no row
    uses guidance; latents (B, C, f, h, w) float32; timesteps (N,), sigmas (N+1,),
    step_coefficients (N, K) shared by the batch; guidance_scale (B,) float32; do_cfg (B,) bool."""

    tokens: torch.Tensor
    mask: torch.Tensor
    negative_tokens: torch.Tensor | None
    negative_mask: torch.Tensor | None
    latents: torch.Tensor
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    step_coefficients: torch.Tensor
    guidance_scale: torch.Tensor
    do_cfg: torch.Tensor
    num_frames: int

    def to(self, device: torch.device | str) -> WanExecutorInputs:
        moved = {
            f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
            for f in fields(self)
        }
        return WanExecutorInputs(**moved)


@dataclass
class Timings:
    text_encode_s: float = 0.0
    denoise_s: float = 0.0
    decode_s: float = 0.0


@dataclass
class WanExecutorOutputs:
    """frames (B, F, H, W, 3) float32 in [0, 1]: the decoder's output before any 8-bit rounding."""

    frames: torch.Tensor
    timings: Timings = field(default_factory=Timings)

    def to(self, device: torch.device | str) -> WanExecutorOutputs:
        return WanExecutorOutputs(self.frames.to(device), self.timings)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class WanExecutor:
    """Owns the loaded components; runs batches of contexts on one device."""

    def __init__(
        self,
        text_encoder: WanTextEncoder,
        transformer: WanTransformerModel,
        vae: WanVAE,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        vae_dtype: torch.dtype = torch.float32,
        vae_chunk_frames: int = 1,
    ):
        self.text_encoder = text_encoder
        self.transformer = transformer
        self.vae = vae
        self.device = torch.device(device)
        self.dtype = dtype
        self.vae_dtype = vae_dtype
        self.vae_chunk_frames = vae_chunk_frames

    # -- batching -----------------------------------------------------------------------------
    def prepare_inputs(self, contexts: list[WanContext]) -> WanExecutorInputs:
        """Stack contexts (same latent shape and schedule) into CPU tensors."""
        if not contexts:
            raise ValueError("prepare_inputs needs at least one context")
        key = contexts[0].batch_key
        for ctx in contexts[1:]:
            if ctx.batch_key != key:
                raise ValueError(
                    "contexts in one batch must share size, frame count and schedule "
                    f"({contexts[0].request_id} and {ctx.request_id} differ)"
                )
        any_cfg = any(c.do_classifier_free_guidance for c in contexts)

        def stack(arrays: list[np.ndarray]) -> torch.Tensor:
            return torch.from_numpy(np.stack(arrays))

        first = contexts[0]
        return WanExecutorInputs(
            tokens=stack([c.tokens for c in contexts]),
            mask=stack([c.mask for c in contexts]),
            # Rows without guidance reuse their own prompt: their unconditional output is discarded.
            negative_tokens=stack(
                [c.tokens if c.negative_tokens is None else c.negative_tokens for c in contexts]
            )
            if any_cfg
            else None,
            negative_mask=stack([c.mask if c.negative_mask is None else c.negative_mask for c in contexts])
            if any_cfg
            else None,
            latents=stack([c.latents for c in contexts]),
            timesteps=torch.tensor(first.timesteps),
            sigmas=torch.tensor(first.sigmas),
            step_coefficients=torch.tensor(first.step_coefficients),
            guidance_scale=torch.tensor([c.guidance_scale for c in contexts], dtype=torch.float32),
            do_cfg=torch.tensor([c.do_classifier_free_guidance for c in contexts]),
            num_frames=first.num_frames,
        )

    # -- stages -------------------------------------------------------------------------------
    def encode_text(self, inputs: WanExecutorInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> conditional (B, L, D) and unconditional (B, L, D) or None, in the DiT's dtype."""
        tokens, mask = inputs.tokens, inputs.mask
        if inputs.negative_tokens is not None:
            tokens = torch.cat([tokens, inputs.negative_tokens])
            mask = torch.cat([mask, inputs.negative_mask])
        embeds = self.text_encoder(tokens.to(self.device), mask.to(self.device)).to(self.dtype)
        batch = inputs.tokens.shape[0]
        if inputs.negative_tokens is None:
            return embeds, None
        return embeds[:batch], embeds[batch:]

    def denoise(
        self,
        inputs: WanExecutorInputs,
        cond: torch.Tensor,
        uncond: torch.Tensor | None,
        callback: StepCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """The denoising loop: latents (B, C, f, h, w) float32 -> denoised latents, same shape."""
        device = self.device
        latents = inputs.latents.to(device=device, dtype=torch.float32)
        schedule = Schedule(
            timesteps=inputs.timesteps.numpy(),
            sigmas=inputs.sigmas.numpy(),
            step_coefficients=inputs.step_coefficients.numpy(),
        )
        batch = latents.shape[0]
        context = cond if uncond is None else torch.cat([cond, uncond])
        guidance = inputs.guidance_scale.to(device).view(-1, 1, 1, 1, 1)
        do_cfg = inputs.do_cfg.to(device).view(-1, 1, 1, 1, 1)
        timesteps = inputs.timesteps.to(device)
        rows = context.shape[0]
        state = new_state()
        num_steps = len(timesteps)
        for i in range(num_steps):
            if should_cancel is not None and should_cancel():
                raise CancelledError("generation cancelled")
            model_input = latents.to(self.dtype)
            if uncond is not None:
                model_input = torch.cat([model_input, model_input])
            timestep = timesteps[i].expand(rows)
            pred = self.run_transformer(model_input, timestep, context)
            if uncond is None:
                noise_pred = pred
            else:
                pred_cond, pred_uncond = pred[:batch], pred[batch:]
                guided = pred_uncond + guidance.to(pred.dtype) * (pred_cond - pred_uncond)
                noise_pred = torch.where(do_cfg, guided, pred_cond)
            latents = step(schedule, state, i, noise_pred, latents)
            if callback is not None:
                callback(i, num_steps, float(inputs.timesteps[i]))
        return latents

    def run_transformer(
        self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        """One DiT forward, block by block: latents (B, C, f, h, w) -> noise prediction, same shape."""
        dit = self.transformer
        x = dit.embed(latents, timestep, context)
        hidden = x.hidden
        for block in dit.blocks:
            hidden = block(hidden, x.context, x.modulation, x.rope, x.num_image_tokens)
        return dit.head(hidden, x.temb, x.grid)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Denoised latents (B, z, f, h, w) -> frames (B, F, H, W, 3) float32 in [0, 1]."""
        z = self.vae.denormalize_latents(latents.to(self.vae_dtype))
        video = self.vae.decode(z, chunk_frames=self.vae_chunk_frames)
        frames = (video.float() / 2 + 0.5).clamp(0, 1)
        return frames.permute(0, 2, 3, 4, 1).contiguous()

    @torch.inference_mode()
    def execute(
        self,
        inputs: WanExecutorInputs,
        callback: StepCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> WanExecutorOutputs:
        """Text encoding, denoising with guidance, VAE decode: -> frames (B, F, H, W, 3)."""
        timings = Timings()
        t0 = time.perf_counter()
        cond, uncond = self.encode_text(inputs)
        _sync(self.device)
        t1 = time.perf_counter()
        latents = self.denoise(inputs, cond, uncond, callback, should_cancel)
        _sync(self.device)
        t2 = time.perf_counter()
        frames = self.decode(latents)
        _sync(self.device)
        t3 = time.perf_counter()
        timings.text_encode_s, timings.denoise_s, timings.decode_s = t1 - t0, t2 - t1, t3 - t2
        return WanExecutorOutputs(frames=frames, timings=timings)
