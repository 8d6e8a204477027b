"""WanExecutor: batches contexts into tensors and runs text encoder, DiT denoising loop and VAE.

``prepare_inputs(contexts)`` stacks a batch of contexts that share shape and schedule into a
:class:`WanExecutorInputs`; ``execute(inputs)`` returns :class:`WanExecutorOutputs` with the decoded
frames. The DiT runs block by block (``transformer.blocks``), so later work can compile, offload or
stream blocks one at a time; the conditional and unconditional branches of classifier-free guidance
run as one batch. Around the loop:

- image-to-video (Wan 2.1 I2V, FLF2V, Wan 2.2 I2V-A14B): CLIP image tokens (2.1) and a condition of
  4 mask channels + the VAE latents of the image(s) followed by zero frames, concatenated to the noise;
- TI2V-5B (``expand_timesteps``): per-token timesteps, and with an image its first latent frame kept
  clean (timestep 0 on its tokens);
- Wan 2.2 A14B: the high-noise expert while t >= the boundary, the low-noise one after, each with its
  own guidance scale; both resident, or one set of modules whose weights are swapped in place;
- video-to-video: the input video's latents noised to the first step's sigma;
- the text embeddings' zero padding compressed once per request (``RuntimeOptions.compress_text``):
  each row's prompt tokens plus one padding key whose logit gets + log(n) for its n padding rows.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import numpy as np
import torch

from wanpipe.context import WanContext
from wanpipe.models.image_encoder import WanImageEncoder
from wanpipe.models.text_encoder import WanTextEncoder
from wanpipe.models.transformer import WanTransformerModel, compress_text_padding
from wanpipe.models.vae import WanVAE
from wanpipe.runtime.attention import attention_backend, sdpa_choice
from wanpipe.runtime.memory import configure_host_memory, trim_host_memory
from wanpipe.runtime.options import RuntimeOptions
from wanpipe.runtime.runner import DiTRunner
from wanpipe.runtime.step_cache import make_step_cache
from wanpipe.runtime.text_cache import TextEmbeddingCache
from wanpipe.schedulers import Schedule, add_noise, new_state, step

if TYPE_CHECKING:
    from wanpipe.parallel.mesh import ParallelMesh

StepCallback = Callable[[int, int, float], None]
"""Called after each denoising step with (step index, number of steps, timestep)."""


class CancelledError(RuntimeError):
    """The caller's cancel check asked to stop the denoising loop."""


@dataclass
class WanExecutorInputs:
    """A batch of B contexts as tensors.

    tokens/mask (B, L); negative_* (B, L) or None when no row uses guidance; latents (B, C, f, h, w)
    float32 noise; timesteps (N,), sigmas (N+1,), step_coefficients (N, K) shared by the batch;
    guidance_scale, guidance_scale_2 (B,) float32; do_cfg (B,) bool; boundary_timestep: the expert
    switch or None; condition_pixels (B, K, 3, H, W) in [-1, 1] (first / last frame) or None;
    clip_pixels (B, K, 3, S, S) or None; video_pixels (B, 3, F, H, W) in [-1, 1] or None.
    """

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
    guidance_scale_2: torch.Tensor | None = None
    boundary_timestep: float | None = None
    condition_pixels: torch.Tensor | None = None
    clip_pixels: torch.Tensor | None = None
    video_pixels: torch.Tensor | None = None
    residual_threshold: float | None = None
    cfg_truncation: float | None = None

    def to(self, device: torch.device | str) -> WanExecutorInputs:
        moved = {
            f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
            for f in fields(self)
        }
        return WanExecutorInputs(**moved)

    @property
    def schedule(self) -> Schedule:
        return Schedule(
            timesteps=self.timesteps.cpu().numpy(),
            sigmas=self.sigmas.cpu().numpy(),
            step_coefficients=self.step_coefficients.cpu().numpy(),
        )


@dataclass
class Timings:
    text_encode_s: float = 0.0
    denoise_s: float = 0.0
    decode_s: float = 0.0
    compile_s: float = 0.0  # torch.compile warm-up of a new shape, not counted in denoise_s
    skipped_steps: int = 0  # step cache: steps whose conditional DiT blocks were skipped
    guided_steps: int = 0  # steps run with classifier-free guidance (cfg_truncation)
    # the SDPA kernels of the DiT's self- and cross-attention, e.g. "self: flash, cross: flash"
    attention: str = ""


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


class Experts:
    """Which DiT runs a step: one model; or Wan 2.2's high- and low-noise experts, either both
    resident or one set of modules whose weights are swapped in place (``reload_model_weights``)
    while the other expert's weights wait memory-mapped or in host memory."""

    def __init__(
        self,
        high: WanTransformerModel,
        low: WanTransformerModel | None = None,
        *,
        swap_states: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    ):
        if low is not None and swap_states is not None:
            raise ValueError("experts are either both resident or swapped, not both")
        if swap_states is not None and set(swap_states) != {"high", "low"}:
            raise ValueError("swap_states needs the 'high' and 'low' state dicts")
        self.high = high
        self.low = low
        self.swap_states = swap_states
        self.active = "high"
        self.swaps = 0

    @property
    def two(self) -> bool:
        return self.low is not None or self.swap_states is not None

    @property
    def mode(self) -> str:
        return "single" if not self.two else ("swap" if self.swap_states is not None else "resident")

    def get(self, which: str) -> WanTransformerModel:
        if which == "high" or not self.two:
            which = "high"
        if self.swap_states is None:
            return self.high if which == "high" else self.low  # type: ignore[return-value]
        if which != self.active:
            self.high.reload_model_weights(self.swap_states[which])
            self.active = which
            self.swaps += 1
        return self.high


class WanExecutor:
    """Owns the loaded components; runs batches of contexts on one device."""

    def __init__(
        self,
        text_encoder: WanTextEncoder | None,
        transformer: WanTransformerModel | Experts,
        vae: WanVAE,
        *,
        image_encoder: WanImageEncoder | None = None,
        expand_timesteps: bool = False,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        vae_dtype: torch.dtype = torch.float32,
        vae_chunk_frames: int = 1,
    ):
        self.text_encoder = text_encoder
        self.experts = transformer if isinstance(transformer, Experts) else Experts(transformer)
        self.vae = vae
        self.image_encoder = image_encoder
        self.expand_timesteps = expand_timesteps
        self.device = torch.device(device)
        self.dtype = dtype
        self.vae_dtype = vae_dtype
        self.vae_chunk_frames = vae_chunk_frames
        # Speed / memory (wanpipe.runtime.apply_runtime_options): the plain path by default.
        self.runtime = RuntimeOptions()
        if self.device.type == "cpu":
            configure_host_memory(self.runtime.host_memory)
        self.runner = DiTRunner()
        self.text_cache: TextEmbeddingCache | None = None
        self.offload = None  # a ModelOffload for offload="model"
        # Sequence / CFG parallelism (``wanpipe.parallel``): every DiT forward of the denoising loop
        # runs across this mesh's ranks. With it (and a world > 1) only rank 0 runs the text and image
        # encoders and broadcasts their outputs; the other ranks may hold no text encoder at all
        # (``text_encoder=None``, ``from_pretrained(load_text_encoder=False)``). The VAE runs whole
        # on every rank, unless ``vae_halo`` (latent rows, ``--vae-parallel``) is set: then each rank
        # decodes a band of rows with that halo and the bands are all-gathered (an approximation).
        self.parallel: ParallelMesh | None = None
        self.vae_halo: int | None = None
        self.last_cache_stats = None
        self._report: dict[str, float] = {}

    @property
    def transformer(self) -> WanTransformerModel:
        """The (high-noise) DiT."""
        return self.experts.high

    def check_parallel(self, inputs: WanExecutorInputs | None = None) -> None:
        """Raise ValueError if ``parallel`` is set together with something it does not combine with
        yet: compiled or streamed DiT blocks (``--compile``, ``--offload block``) or a step cache
        (the runtime's, or ``inputs``' residual_threshold). Same answer on every rank."""
        if self.parallel is None:
            return
        cache = None if inputs is None else self._make_cache(inputs)
        clash = [
            name
            for name, on in (
                ("--compile", self.runner.compiled is not None),
                ("--offload block", self.runner.streamer is not None),
                ("a step cache (--cache / residual_threshold)", cache is not None),
            )
            if on
        ]
        if clash:
            raise ValueError(
                f"sequence/CFG parallelism (--ulysses/--ring/--cfg-parallel) does not combine with "
                f"{', '.join(clash)} yet: leave {'them' if len(clash) > 1 else 'it'} off"
            )

    # -- batching -----------------------------------------------------------------------------
    def prepare_inputs(self, contexts: list[WanContext]) -> WanExecutorInputs:
        """Stack contexts (same latent shape, schedule and kind of conditioning) into CPU tensors."""
        if not contexts:
            raise ValueError("prepare_inputs needs at least one context")
        key = contexts[0].batch_key
        for ctx in contexts[1:]:
            if ctx.batch_key != key:
                raise ValueError(
                    "contexts in one batch must share size, frame count, schedule and conditioning "
                    f"({contexts[0].request_id} and {ctx.request_id} differ)"
                )
        any_cfg = any(c.do_classifier_free_guidance for c in contexts)

        def stack(arrays: list[np.ndarray]) -> torch.Tensor:
            return torch.from_numpy(np.stack(arrays))

        def optional(name: str) -> torch.Tensor | None:
            arrays = [getattr(c, name) for c in contexts]
            return None if arrays[0] is None else stack(arrays)

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
            guidance_scale_2=torch.tensor([c.guidance_scale_2 for c in contexts], dtype=torch.float32)
            if first.guidance_scale_2 is not None
            else None,
            boundary_timestep=first.boundary_timestep,
            condition_pixels=optional("condition_pixels"),
            clip_pixels=optional("clip_pixels"),
            video_pixels=optional("video_pixels"),
            residual_threshold=getattr(first, "residual_threshold", None),
            cfg_truncation=getattr(first, "cfg_truncation", None),
        )

    # -- placement ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def on_device(self, module: torch.nn.Module | None) -> Iterator[None]:
        """With model offload, ``module`` is on the device only inside this block."""
        if self.offload is None or module is None:
            yield
            return
        with self.offload.use(module):
            yield

    def _trim(self) -> None:
        if self.device.type == "cpu" and (
            self.runtime.trim_host_memory or self.runtime.host_memory == "lean"
        ):
            trim_host_memory()

    # -- stages -------------------------------------------------------------------------------
    def _encodes_on_rank0(self) -> bool:
        """True when ``parallel`` is set in a world of more than one rank: rank 0 alone runs the
        encoders and broadcasts their outputs (:meth:`_broadcast_from_rank0`)."""
        if self.parallel is None:
            return False
        from wanpipe.parallel.mesh import world_size

        return world_size() > 1

    def _broadcast_from_rank0(self, tensor: torch.Tensor | None, ndim: int) -> torch.Tensor:
        """Rank 0's ``tensor`` (``ndim`` dims, on ``self.device`` in the DiT's dtype) on every rank:
        its shape first, then its values, over the default group from rank 0 (a collective: every
        rank calls it; ``tensor`` is ignored on the others). Device tensors, as NCCL needs."""
        import torch.distributed as dist

        first = dist.get_rank() == 0
        shape = torch.zeros(ndim, dtype=torch.int64, device=self.device)
        if first:
            assert tensor is not None and tensor.dim() == ndim
            shape.copy_(torch.tensor(tensor.shape, dtype=torch.int64))
        dist.broadcast(shape, src=0)
        if first:
            out = tensor.to(self.device, self.dtype).contiguous()  # type: ignore[union-attr]
        else:
            out = torch.empty(tuple(shape.tolist()), dtype=self.dtype, device=self.device)
        dist.broadcast(out, src=0)
        return out

    def _run_text_encoder(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.text_encoder is None:
            raise RuntimeError(
                "this pipeline was loaded without its text encoder (load_text_encoder=False): it can "
                "only run as a rank other than 0 of a parallel run, where rank 0 encodes the prompts"
            )
        device = torch.device(self.runtime.text_encoder_device or self.device)
        if self.runtime.text_encoder_device is not None:
            embeds = self.text_encoder(tokens.to(device), mask.to(device))
        else:
            with self.on_device(self.text_encoder):
                embeds = self.text_encoder(tokens.to(device), mask.to(device))
        return embeds.to(self.device, self.dtype)

    def _encode_tokens(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Through the prompt cache (runtime ``text_cache_size`` prompts): repeated prompts, typically the
        negative one, are not encoded again."""
        size = self.runtime.text_cache_size
        if self.text_cache is None or self.text_cache.capacity != size:
            self.text_cache = TextEmbeddingCache(size)
        return self.text_cache.encode(tokens, mask, self._run_text_encoder)

    def encode_text(self, inputs: WanExecutorInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> conditional (B, L, D) and unconditional (B, L, D) or None, in the DiT's dtype.

        With ``parallel`` in a world > 1, rank 0 encodes and broadcasts (a collective)."""
        tokens, mask = inputs.tokens, inputs.mask
        if inputs.negative_tokens is not None:
            tokens = torch.cat([tokens, inputs.negative_tokens])
            mask = torch.cat([mask, inputs.negative_mask])
        if self._encodes_on_rank0():
            import torch.distributed as dist

            embeds = self._encode_tokens(tokens, mask) if dist.get_rank() == 0 else None
            embeds = self._broadcast_from_rank0(embeds, ndim=3)
        else:
            embeds = self._encode_tokens(tokens, mask)
        batch = inputs.tokens.shape[0]
        if inputs.negative_tokens is None:
            return embeds, None
        return embeds[:batch], embeds[batch:]

    def encode_images(self, inputs: WanExecutorInputs) -> torch.Tensor | None:
        """CLIP tokens of the first (and last) frame: (B, K * T, D) in the DiT's dtype, or None."""
        if inputs.clip_pixels is None or self.image_encoder is None:
            return None
        batch, k = inputs.clip_pixels.shape[:2]
        if self._encodes_on_rank0():
            import torch.distributed as dist

            # Every rank loaded the same checkpoint, so all of them reach this point or none.
            tokens = self._run_image_encoder(inputs, batch, k) if dist.get_rank() == 0 else None
            return self._broadcast_from_rank0(tokens, ndim=3)
        return self._run_image_encoder(inputs, batch, k)

    def _run_image_encoder(self, inputs: WanExecutorInputs, batch: int, k: int) -> torch.Tensor:
        assert inputs.clip_pixels is not None and self.image_encoder is not None
        with self.on_device(self.image_encoder):
            tokens = self.image_encoder(inputs.clip_pixels.flatten(0, 1).to(self.device))
        return tokens.reshape(batch, k * tokens.shape[1], tokens.shape[2]).to(self.dtype)

    def _encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> normalised latents (B, z, f, h, w) float32 (posterior mode)."""
        with self.on_device(self.vae):
            z = self.vae.encode_mean(video.to(self.device, self.vae_dtype)).float()
        return self.vae.normalize_latents(z)

    def prepare_condition(self, inputs: WanExecutorInputs) -> torch.Tensor | None:
        """The image condition of an image-to-video model.

        36-channel models: mask (B, 4, f, h, w) + latents of [first, zeros..., (last)] -> (B, 4 + z, f, h, w).
        TI2V (``expand_timesteps``): latents of the first frame alone, (B, z, 1, h, w).
        """
        pixels = inputs.condition_pixels
        if pixels is None:
            return None
        batch, k, _, height, width = pixels.shape
        num_frames = inputs.num_frames
        first = pixels[:, 0].unsqueeze(2)
        if self.expand_timesteps:
            return self._encode_video(first)
        zeros = first.new_zeros(batch, 3, num_frames - k, height, width)
        video = torch.cat([first, zeros] + ([pixels[:, 1].unsqueeze(2)] if k == 2 else []), dim=2)
        latents = self._encode_video(video)
        stride = self.vae.config.temporal_stride
        f, h, w = latents.shape[2:]
        mask = torch.zeros(batch, 1, num_frames, h, w, device=latents.device)
        mask[:, :, 0] = 1
        if k == 2:
            mask[:, :, -1] = 1
        # The first frame stands for `stride` frames: the mask is (B, 4, f, h, w), frame-major.
        mask = torch.cat([mask[:, :, :1].repeat_interleave(stride, dim=2), mask[:, :, 1:]], dim=2)
        mask = mask.view(batch, f, stride, h, w).transpose(1, 2)
        return torch.cat([mask, latents], dim=1)

    def initial_latents(self, inputs: WanExecutorInputs) -> torch.Tensor:
        """The noise; for video-to-video the input video's latents noised to the first sigma."""
        noise = inputs.latents.to(device=self.device, dtype=torch.float32)
        if inputs.video_pixels is None:
            return noise
        clean = self._encode_video(inputs.video_pixels)
        return add_noise(clean, noise, inputs.sigmas[0].to(self.device))

    def denoise(
        self,
        inputs: WanExecutorInputs,
        cond: torch.Tensor,
        uncond: torch.Tensor | None,
        callback: StepCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """The denoising loop: -> denoised latents (B, C, f, h, w) float32."""
        device = self.device
        latents = self.initial_latents(inputs)
        condition = self.prepare_condition(inputs)
        image_embeds = self.encode_images(inputs)
        schedule = inputs.schedule
        batch = latents.shape[0]
        cfg = uncond is not None
        context = cond if uncond is None else torch.cat([cond, uncond])
        text_bias = None
        if self.runtime.compress_text:
            # Once per request (one host read): each row's zero padding becomes one key with logit + log n.
            multiple = 16 if device.type == "cuda" else 1  # aligned key length for fused SDPA kernels
            context, text_bias = compress_text_padding(context, multiple_of=multiple)
            cond = context[:batch]
        if image_embeds is not None and cfg:
            image_embeds = torch.cat([image_embeds, image_embeds])
        rows = context.shape[0]
        cond_bias = None if text_bias is None else text_bias[:batch]
        do_cfg = inputs.do_cfg.to(device).view(-1, 1, 1, 1, 1)
        guidances = {"high": inputs.guidance_scale.to(device).view(-1, 1, 1, 1, 1)}
        if inputs.guidance_scale_2 is not None:
            guidances["low"] = inputs.guidance_scale_2.to(device).view(-1, 1, 1, 1, 1)
        # Which expert runs each step is known up front: no device-to-host read in the loop.
        boundary = inputs.boundary_timestep
        experts = [
            "high" if boundary is None or float(t) >= boundary else "low" for t in schedule.timesteps.tolist()
        ]
        timesteps = inputs.timesteps.to(device)
        first_frame_mask = None
        if self.expand_timesteps:
            # 0 on the first latent frame when it is the clean image condition, 1 elsewhere.
            first_frame_mask = torch.ones(1, 1, *latents.shape[2:], device=device)
            if condition is not None:
                first_frame_mask[:, :, 0] = 0
        patch = self.transformer.config.patch_size
        state = new_state()
        num_steps = len(timesteps)
        guided_steps = self._guided_steps(inputs, num_steps) if cfg else 0
        self.check_parallel(inputs)
        cache = self._make_cache(inputs)
        streams_cfg = {"cond": slice(0, batch), "uncond": slice(batch, rows)}
        streams_cond = {"cond": slice(0, batch)}
        image_cond = None if image_embeds is None else image_embeds[:batch]
        self._report = {"compile_s": 0.0, "guided_steps": guided_steps}
        self._report["attention"] = self._attention_report(latents, context, text_bias)
        current = None
        scope = contextlib.ExitStack()
        try:
            scope.enter_context(attention_backend(self.runtime.attention_backend))
            for i in range(num_steps):
                if should_cancel is not None and should_cancel():
                    raise CancelledError("generation cancelled")
                guided = cfg and i < guided_steps
                step_rows = rows if guided else batch
                t = timesteps[i]
                if first_frame_mask is not None:
                    model_input = (
                        latents
                        if condition is None
                        else (1 - first_frame_mask) * condition + first_frame_mask * latents
                    )
                    token_mask = first_frame_mask[0, 0, :: patch[0], :: patch[1], :: patch[2]]
                    timestep = (token_mask * t).flatten().unsqueeze(0).expand(step_rows, -1)
                else:
                    model_input = latents if condition is None else torch.cat([latents, condition], dim=1)
                    timestep = t.expand(step_rows)
                model_input = model_input.to(self.dtype)
                if guided:
                    model_input = torch.cat([model_input, model_input])
                which = experts[i]
                dit = self.experts.get(which)
                if self.offload is not None and dit is not current:
                    if current is not None:
                        current.to(self.offload.storage)
                    dit.to(self.offload.device)
                    current = dit
                step_context = context if guided else cond
                step_bias = text_bias if guided else cond_bias
                step_images = image_embeds if guided else image_cond
                if self.parallel is not None:
                    from wanpipe.parallel.dit import parallel_forward

                    pred = parallel_forward(
                        self.parallel, dit, model_input, timestep, step_context, step_images, step_bias
                    )
                else:
                    self._compile_warmup(dit, model_input, timestep, step_context, step_images, step_bias)
                    pred = self.runner.forward(
                        dit,
                        model_input,
                        timestep,
                        step_context,
                        step_images,
                        text_bias=step_bias,
                        cache=cache,
                        streams=streams_cfg if guided else streams_cond,
                        step=i,
                        num_steps=num_steps,
                    )
                if not guided:
                    noise_pred = pred
                else:
                    pred_cond, pred_uncond = pred[:batch], pred[batch:]
                    guidance = guidances.get(which, guidances["high"]).to(pred.dtype)
                    guided_pred = pred_uncond + guidance * (pred_cond - pred_uncond)
                    noise_pred = torch.where(do_cfg, guided_pred, pred_cond)
                latents = step(schedule, state, i, noise_pred, latents)
                if callback is not None:
                    callback(i, num_steps, float(schedule.timesteps[i]))
        finally:
            scope.close()
            if self.offload is not None and current is not None:
                current.to(self.offload.storage)
        self.last_cache_stats = None if cache is None else cache.stats
        if first_frame_mask is not None and condition is not None:
            latents = (1 - first_frame_mask) * condition + first_frame_mask * latents
        return latents

    def _attention_report(
        self, latents: torch.Tensor, context: torch.Tensor, text_bias: torch.Tensor | None
    ) -> str:
        """Which SDPA kernels this request's self- and cross-attention get (see wanpipe.runtime.attention)."""
        if self.parallel is not None:
            return "sequence-parallel"
        cfg = self.transformer.config
        f, h, w = latents.shape[2:]
        tokens = (f // cfg.patch_size[0]) * (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
        head_dim = cfg.dim // cfg.num_attention_heads
        with attention_backend(self.runtime.attention_backend):
            own = sdpa_choice(tokens, tokens, head_dim, self.dtype, self.device)
            cross = sdpa_choice(
                tokens, context.shape[1], head_dim, self.dtype, self.device, text_bias is not None
            )
        if "none" in (own, cross):
            raise ValueError(
                f"attention backend {self.runtime.attention_backend!r} cannot run this model's attention on "
                f"{self.device.type} in {self.dtype} (head size {head_dim}); use 'auto' to let PyTorch choose"
            )
        return f"self: {own}, cross: {cross}"

    def _guided_steps(self, inputs: WanExecutorInputs, num_steps: int) -> int:
        """How many leading steps use guidance: all, unless cfg_truncation (request, else runtime) < 1."""
        fraction = inputs.cfg_truncation if inputs.cfg_truncation is not None else self.runtime.cfg_truncation
        if fraction is None or fraction >= 1.0:
            return num_steps
        return max(0, min(num_steps, math.ceil(fraction * num_steps - 1e-9)))

    def _make_cache(self, inputs: WanExecutorInputs):
        """The step cache for this batch: the runtime's kind with the request's (or runtime's) threshold;
        a request threshold > 0 alone turns on First-Block-Cache. None (off) when the threshold is 0."""
        threshold = (
            inputs.residual_threshold
            if inputs.residual_threshold is not None
            else self.runtime.residual_threshold
        )
        kind = self.runtime.cache
        if kind is None and inputs.residual_threshold:
            kind = "first-block"
        cache = make_step_cache(kind, threshold)
        if cache is not None and hasattr(cache, "coefficients"):
            from wanpipe.runtime.step_cache import TEACACHE_WAN_COEFFICIENTS, teacache_variant

            cfg = self.transformer.config
            f, h, w = inputs.latents.shape[2:]
            area = (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
            cache.coefficients = TEACACHE_WAN_COEFFICIENTS[teacache_variant(cfg.dim, cfg.in_channels, area)]
        return cache

    def _compile_warmup(self, dit, model_input, timestep, context, image_embeds, text_bias=None) -> None:
        """Compile for a new shape before timing steps: one discarded forward, timed as compile_s."""
        compiled = self.runner.compiled
        if compiled is None:
            return
        key = (
            tuple(model_input.shape),
            tuple(timestep.shape),
            tuple(context.shape),
            None if image_embeds is None else tuple(image_embeds.shape),
            None if text_bias is None else tuple(text_bias.shape),
            model_input.dtype,
            self.device,
        )
        if key in compiled.warmed:
            return
        t0 = time.perf_counter()
        self.runner.forward(dit, model_input, timestep, context, image_embeds, text_bias=text_bias)
        _sync(self.device)
        self._report["compile_s"] += time.perf_counter() - t0
        compiled.warmed.add(key)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Denoised latents (B, z, f, h, w) -> frames (B, F, H, W, 3) float32 in [0, 1]."""
        z = self.vae.denormalize_latents(latents.to(self.device, self.vae_dtype))
        with self.on_device(self.vae):
            if self.vae_halo is not None and self._encodes_on_rank0():
                from wanpipe.parallel.vae import parallel_decode

                video = parallel_decode(self.vae, z, self.vae_halo, chunk_frames=self.vae_chunk_frames)
            else:
                # No trim between chunks: the next chunk would fault the same pages back in (measured
                # 25-30% of the CPU decode time for ~15 MB less peak RSS); stages still trim.
                video = self.vae.decode(z, chunk_frames=self.vae_chunk_frames)
        del z
        if video.dtype == torch.float32:  # in place: no second copy of the video
            frames = video.div_(2).add_(0.5).clamp_(0, 1)
        else:
            frames = (video.float() / 2 + 0.5).clamp(0, 1)
        del video
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
        self._trim()
        t1 = time.perf_counter()
        self._report = {}
        latents = self.denoise(inputs, cond, uncond, callback, should_cancel)
        del cond, uncond
        _sync(self.device)
        self._trim()
        t2 = time.perf_counter()
        frames = self.decode(latents)
        del latents
        _sync(self.device)
        t3 = time.perf_counter()
        self._trim()
        timings.compile_s = self._report.get("compile_s", 0.0)
        timings.guided_steps = self._report.get("guided_steps", 0)
        timings.attention = self._report.get("attention", "")
        if self.last_cache_stats is not None:
            timings.skipped_steps = self.last_cache_stats.skipped_steps
        timings.text_encode_s, timings.denoise_s, timings.decode_s = (
            t1 - t0,
            t2 - t1 - timings.compile_s,
            t3 - t2,
        )
        return WanExecutorOutputs(frames=frames, timings=timings)
