"""A batch of contexts as tensors: what the executor's stages read (MAX's ``WanExecutorInputs``)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch

from wanpipe.context import Approximations, PromptTravel, WanContext
from wanpipe.schedulers import Schedule


@dataclass
class WanExecutorInputs:
    """A batch of B contexts as tensors.

    tokens/mask (B, L); negative_* (B, L) or None when no row uses guidance; latents (B, C, f, h, w)
    float32 noise; ``schedule`` (timesteps (N,), sigmas (N+1,), step_coefficients (N, K)) shared by the
    batch; guidance_scale, guidance_scale_2 (B,) float32; do_cfg (B,) bool; boundary_timestep: the
    expert switch or None; condition_pixels (B, K, 3, H, W) in [-1, 1] (first / last frame) or None;
    clip_pixels (B, K, 3, S, S) or None; video_pixels (B, 3, F, H, W) in [-1, 1] or None;
    ``approximations``: the batch's opt-in approximations; noise_states: per row the uint8 state of its
    seeded generator for the step noise of LCM / DMD (host data, not moved), None for other samplers.
    VACE (each None elsewhere, and the first three when not given): control_pixels (B, 3, F, H, W) in
    [-1, 1]; control_mask (B, 1, F, H, W) in [0, 1], 1 = generate; reference_pixels (B, R, 3, H, W) in
    [-1, 1]; conditioning_scale (B, N) float32.
    Animate (None elsewhere; see
    :class:`~wanpipe.context.ConditioningInputs`): pose_frames (B, T', H, W, 3), face_frames
    (B, T', M, M, 3), background_frames (B, T', H, W, 3), mask_frames (B, T', H, W) uint8;
    segment_noise (B, N - 1, C, f, h, w) float32; segment_frame_length, prev_segment_conditioning_frames.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    negative_tokens: torch.Tensor | None
    negative_mask: torch.Tensor | None
    latents: torch.Tensor
    schedule: Schedule
    guidance_scale: torch.Tensor
    do_cfg: torch.Tensor
    num_frames: int
    guidance_scale_2: torch.Tensor | None = None
    boundary_timestep: float | None = None
    condition_pixels: torch.Tensor | None = None
    clip_pixels: torch.Tensor | None = None
    video_pixels: torch.Tensor | None = None
    approximations: Approximations = field(default_factory=Approximations)
    noise_states: tuple[np.ndarray, ...] | None = None
    control_pixels: torch.Tensor | None = None
    control_mask: torch.Tensor | None = None
    reference_pixels: torch.Tensor | None = None
    conditioning_scale: torch.Tensor | None = None
    pose_frames: torch.Tensor | None = None
    face_frames: torch.Tensor | None = None
    background_frames: torch.Tensor | None = None
    mask_frames: torch.Tensor | None = None
    segment_noise: torch.Tensor | None = None
    segment_frame_length: int | None = None
    prev_segment_conditioning_frames: int | None = None
    prompt_travel: PromptTravel | None = None  # per-window prompts (shared by the batch's rows)

    @property
    def segments(self) -> int:
        """How many segments the video is made in: 1, except Animate's long driving videos."""
        return 1 if self.segment_noise is None else 1 + self.segment_noise.shape[1]

    def select(self, keep: list[int]) -> WanExecutorInputs:
        """Only the rows ``keep`` (rows cancelled while a video made in segments runs)."""
        batch = self.latents.shape[0]
        cut = {
            f.name: v[keep]
            for f in fields(self)
            if isinstance(v := getattr(self, f.name), torch.Tensor) and v.ndim and v.shape[0] == batch
        }
        return replace(self, **cut)

    def to(self, device: torch.device | str) -> WanExecutorInputs:
        """The tensors moved to ``device`` (the schedule stays host data)."""
        moved = {
            f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
            for f in fields(self)
        }
        return WanExecutorInputs(**moved)


def collate(contexts: list[WanContext]) -> WanExecutorInputs:
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

    def optional(arrays: list[np.ndarray | None]) -> torch.Tensor | None:
        return None if arrays[0] is None else stack(arrays)  # type: ignore[arg-type]

    first = contexts[0]
    cond = [c.conditioning for c in contexts]
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
        schedule=first.schedule,
        guidance_scale=torch.tensor([c.guidance_scale for c in contexts], dtype=torch.float32),
        do_cfg=torch.tensor([c.do_classifier_free_guidance for c in contexts]),
        num_frames=first.num_frames,
        guidance_scale_2=torch.tensor([c.guidance_scale_2 for c in contexts], dtype=torch.float32)
        if first.guidance_scale_2 is not None
        else None,
        boundary_timestep=first.boundary_timestep,
        condition_pixels=optional([c.condition_pixels for c in cond]),
        clip_pixels=optional([c.clip_pixels for c in cond]),
        video_pixels=optional([c.video_pixels for c in cond]),
        approximations=first.approximations,
        noise_states=tuple(c.noise_state for c in contexts)  # type: ignore[misc]
        if first.schedule.stochastic
        else None,
        control_pixels=optional([c.control_pixels for c in cond]),
        control_mask=optional([c.control_mask for c in cond]),
        reference_pixels=optional([c.reference_pixels for c in cond]),
        conditioning_scale=optional([c.conditioning_scale for c in cond]),
        pose_frames=optional([c.pose_frames for c in cond]),
        face_frames=optional([c.face_frames for c in cond]),
        background_frames=optional([c.background_frames for c in cond]),
        mask_frames=optional([c.mask_frames for c in cond]),
        segment_noise=optional([c.segment_noise for c in cond]),
        segment_frame_length=cond[0].segment_frame_length,
        prev_segment_conditioning_frames=cond[0].prev_segment_conditioning_frames,
        prompt_travel=first.prompt_travel,
    )
