"""Conditioning: what each generation mode adds to the denoising loop, prepared once before it.

A :class:`Conditioning` is made by its ``prepare`` (timed as the "condition" stage: VAE encodes of
input images and videos, CLIP image tokens; it also hands back the initial latents) and then answers, per step, the same
few questions: what the DiT sees (:meth:`~Conditioning.model_input`), the timestep tensor
(:meth:`~Conditioning.timestep`), the DiT's extra inputs (:meth:`~Conditioning.dit_kwargs`), and at
the end the fix-up of the result (:meth:`~Conditioning.finish`). The loop never asks which mode runs.

Modes (:func:`conditioning_class` picks one from the inputs and the model):

- :class:`TextToVideo`: the latents as they are, one timestep per row;
- :class:`VideoToVideo`: the same per step, starting from the input video's latents noised to the
  first sigma;
- :class:`ImageConcat` (Wan 2.1 I2V, FLF2V, Wan 2.2 I2V-A14B): 4 mask channels + the VAE latents of
  the image(s) followed by zero frames, concatenated to the latents; Wan 2.1's CLIP image tokens;
- :class:`CleanFirstFrame` (TI2V-5B, ``expand_timesteps``): per-token timesteps, and with an image
  its first latent frame kept clean (timestep 0 on its tokens);
- :class:`VaceControl` (VACE checkpoints, whatever the inputs): the control (the kept and generated
  parts of the video, VAE-encoded, and the mask) given to the VACE blocks at every step; one latent frame
  per reference image put first, and dropped at the end.
- :class:`AnimateSegments` (Wan2.2-Animate): the character's latent frame and the previous segment's
  last frames (or the background and mask) concatenated to the latents, pose latents and face pixels
  as DiT inputs; the video is made segment by segment (:meth:`Conditioning.next_segment`).

A mode whose video is made in several segments (``inputs.segments`` > 1: Animate's long driving
videos) is asked by the executor, after each segment is denoised and decoded, for the next segment's
initial latents (:meth:`~Conditioning.next_segment`) and which decoded frames are new
(:meth:`~Conditioning.new_frames`); the loop itself never knows.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from wanpipe.batch import WanExecutorInputs
from wanpipe.models.image_encoder import WanImageEncoder
from wanpipe.models.vae import WanVAE
from wanpipe.schedulers import add_noise
from wanpipe.stages.decode import encode
from wanpipe.stages.placement import Placement


@dataclass
class ConditionEncoders:
    """What conditioning needs to prepare: the VAE (encoder side), CLIP, and where they run."""

    vae: WanVAE
    image_encoder: WanImageEncoder | None
    placement: Placement
    vae_dtype: torch.dtype
    expand_timesteps: bool
    patch_size: tuple[int, int, int]
    vace_layers: tuple[int, ...] | None = None  # a VACE DiT's layers that take hints (None: not VACE)
    vae_memory: int | None = None  # --vae-memory: tiled (exact) encodes when a frame does not fit

    def encode_video(self, video: Tensor) -> Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> normalised latents (B, z, f, h, w) float32 (posterior mode)."""
        place = self.placement
        with place.on_device(self.vae):
            z = encode(self.vae, video.to(place.device, self.vae_dtype), self.vae_memory).float()
        return self.vae.normalize_latents(z)

    def encode_images(self, clip_pixels: Tensor | None) -> Tensor | None:
        """CLIP tokens of the first (and last) frame: (B, K, 3, S, S) -> (B, K * T, D) in the DiT's
        dtype, or None (no images, or a model without CLIP). Rank 0 encodes in a parallel run."""
        if clip_pixels is None or self.image_encoder is None:
            return None
        encoder, place = self.image_encoder, self.placement
        batch, k = clip_pixels.shape[:2]

        def run() -> Tensor:
            with place.on_device(encoder):
                tokens = encoder(clip_pixels.flatten(0, 1).to(place.device))
            return tokens.reshape(batch, k * tokens.shape[1], tokens.shape[2]).to(place.dtype)

        # Every rank loaded the same checkpoint, so all of them reach this point or none.
        return self.placement.from_rank0(run, ndim=3)


class Conditioning:
    """The base answers, per step, as text-to-video does."""

    def __init__(self, image_embeds: Tensor | None = None) -> None:
        self.image_embeds = image_embeds  # (B, Li, image_dim) or None
        self._image_embeds_guided: Tensor | None = None

    @classmethod
    def prepare(cls, inputs: WanExecutorInputs, encoders: ConditionEncoders) -> tuple[Conditioning, Tensor]:
        """Encode what this mode needs from ``inputs``, once -> (the object, the initial latents
        (B, C, f, h, w) float32 the loop starts from)."""
        return cls(), _noise(inputs, encoders)

    def model_input(self, latents: Tensor) -> Tensor:
        """latents (B, C, f, h, w) -> what the DiT sees (B, C_in, f, h, w)."""
        return latents

    def timestep(self, t: Tensor, rows: int) -> Tensor:
        """The step's timestep () -> the DiT's timestep tensor for ``rows`` rows: (rows,) or (rows, L)."""
        return t.expand(rows)

    def dit_kwargs(self, guided: bool) -> dict[str, Any]:
        """The DiT's extra inputs for the step's rows (with guidance the rows are cond then uncond)."""
        images = self.image_embeds
        if images is not None and guided:
            if self._image_embeds_guided is None:
                self._image_embeds_guided = torch.cat([images, images])
            images = self._image_embeds_guided
        return {"image_embeds": images}

    def finish(self, latents: Tensor) -> Tensor:
        """The denoised latents -> the latents to decode."""
        return latents

    def next_segment(self, index: int, frames: Tensor) -> Tensor:
        """Videos made in segments: prepare segment ``index`` >= 1 from the decoded frames of the one
        before ((B, F, H, W, 3) in [0, 1]) -> its initial latents (B, C, f, h, w) float32."""
        raise NotImplementedError(f"{type(self).__name__} makes its video in one segment")

    def new_frames(self, index: int, frames: Tensor) -> Tensor:
        """The decoded frames (B, F, H, W, 3) of segment ``index`` -> those it adds to the video."""
        return frames

    def select(self, keep: Sequence[int]) -> Conditioning:
        """Only the batch rows ``keep`` (a row cancelled mid-batch): a copy with every per-row tensor cut."""
        out = copy.copy(self)
        for name, value in vars(self).items():
            if name in self.shared:
                continue
            if isinstance(value, Tensor):
                setattr(out, name, value[list(keep)])
        out._image_embeds_guided = None
        return out

    shared: tuple[str, ...] = ()
    """Attributes that are the same for every row (not cut by :meth:`select`)."""


def _noise(inputs: WanExecutorInputs, encoders: ConditionEncoders) -> Tensor:
    return inputs.latents.to(device=encoders.placement.device, dtype=torch.float32)


class TextToVideo(Conditioning):
    """Text-to-video (and text-to-image): the base behaviour."""


class VideoToVideo(Conditioning):
    """Video-to-video: the input video's latents noised to the first step's sigma."""

    @classmethod
    def prepare(cls, inputs: WanExecutorInputs, encoders: ConditionEncoders) -> tuple[Conditioning, Tensor]:
        assert inputs.video_pixels is not None
        clean = encoders.encode_video(inputs.video_pixels)
        noise = _noise(inputs, encoders)
        sigma = torch.tensor(inputs.schedule.sigmas[0], device=noise.device)
        return cls(), add_noise(clean, noise, sigma)


class ImageConcat(Conditioning):
    """Image-to-video with a 36-channel DiT: the condition (B, 4 + z, f, h, w), a frame mask and the
    VAE latents of [first, zeros..., (last)], concatenated to the latents at every step."""

    def __init__(self, condition: Tensor, image_embeds: Tensor | None) -> None:
        super().__init__(image_embeds)
        self.condition = condition

    @classmethod
    def prepare(cls, inputs: WanExecutorInputs, encoders: ConditionEncoders) -> tuple[Conditioning, Tensor]:
        pixels = inputs.condition_pixels
        assert pixels is not None
        batch, k, _, height, width = pixels.shape
        num_frames = inputs.num_frames
        first = pixels[:, 0].unsqueeze(2)
        zeros = first.new_zeros(batch, 3, num_frames - k, height, width)
        video = torch.cat([first, zeros] + ([pixels[:, 1].unsqueeze(2)] if k == 2 else []), dim=2)
        latents = encoders.encode_video(video)
        stride = encoders.vae.config.temporal_stride
        f, h, w = latents.shape[2:]
        mask = torch.zeros(batch, 1, num_frames, h, w, device=latents.device)
        mask[:, :, 0] = 1
        if k == 2:
            mask[:, :, -1] = 1
        # The first frame stands for `stride` frames: the mask is (B, 4, f, h, w), frame-major.
        mask = torch.cat([mask[:, :, :1].repeat_interleave(stride, dim=2), mask[:, :, 1:]], dim=2)
        mask = mask.view(batch, f, stride, h, w).transpose(1, 2)
        condition = torch.cat([mask, latents], dim=1)
        images = encoders.encode_images(inputs.clip_pixels)
        return cls(condition, images), _noise(inputs, encoders)

    def model_input(self, latents: Tensor) -> Tensor:
        return torch.cat([latents, self.condition], dim=1)


class CleanFirstFrame(Conditioning):
    """TI2V-5B (``expand_timesteps``): one timestep per token; with an image, the first latent frame
    is the image's latents (B, z, 1, h, w), kept clean (timestep 0 on its tokens) at every step and
    put back at the end. Without an image every token gets the step's timestep."""

    shared = ("mask", "token_mask")

    def __init__(self, latents: Tensor, condition: Tensor | None, patch_size: tuple[int, int, int]) -> None:
        super().__init__()
        self.condition = condition
        # 0 on the first latent frame when it is the clean image condition, 1 elsewhere.
        self.mask = torch.ones(1, 1, *latents.shape[2:], device=latents.device)
        if condition is not None:
            self.mask[:, :, 0] = 0
        pt, ph, pw = patch_size
        self.token_mask = self.mask[0, 0, ::pt, ::ph, ::pw]

    @classmethod
    def prepare(cls, inputs: WanExecutorInputs, encoders: ConditionEncoders) -> tuple[Conditioning, Tensor]:
        pixels = inputs.condition_pixels
        condition = None if pixels is None else encoders.encode_video(pixels[:, 0].unsqueeze(2))
        latents = _noise(inputs, encoders)
        return cls(latents, condition, encoders.patch_size), latents

    def model_input(self, latents: Tensor) -> Tensor:
        return self.finish(latents)

    def timestep(self, t: Tensor, rows: int) -> Tensor:
        return (self.token_mask * t).flatten().unsqueeze(0).expand(rows, -1)

    def finish(self, latents: Tensor) -> Tensor:
        if self.condition is None:
            return latents
        return (1 - self.mask) * self.condition + self.mask * latents


class VaceControl(Conditioning):
    """VACE: the control (B, 2 z + s*s, R + f, h, w) that the VACE blocks read at every step, made once:
    the VAE latents of the video's kept part (where the mask is <= 0.5) and of its generated part
    (> 0.5), the mask folded from s x s pixels to s*s channels per latent pixel (nearest frame); before
    them one latent frame per reference image, the last image first (its latents, zeros, a zero mask).
    The latents carry those R frames too, and :meth:`finish` drops them. ``scale`` (B, N): the
    conditioning scale of each VACE layer. Without a video the video is zeros, without a mask all ones."""

    def __init__(self, control: Tensor, scale: Tensor, references: int) -> None:
        super().__init__()
        self.control = control
        self.scale = scale
        self.references = references
        self._guided: tuple[Tensor, Tensor] | None = None

    @classmethod
    def prepare(cls, inputs: WanExecutorInputs, encoders: ConditionEncoders) -> tuple[Conditioning, Tensor]:
        latents = _noise(inputs, encoders)
        batch, _, _, h, w = latents.shape
        stride = encoders.vae.config.spatial_stride
        shape = (batch, 3, inputs.num_frames, h * stride, w * stride)
        video, mask = inputs.control_pixels, inputs.control_mask
        if video is None:
            inactive = reactive = encoders.encode_video(torch.zeros(shape))
        elif mask is None:
            inactive, reactive = encoders.encode_video(torch.zeros(shape)), encoders.encode_video(video)
        else:
            keep = (mask > 0.5).to(video.dtype)
            inactive = encoders.encode_video(video * (1 - keep))
            reactive = encoders.encode_video(video * keep)
        control = torch.cat([inactive, reactive], dim=1)
        del inactive, reactive
        f = control.shape[2]
        if mask is None:
            folded = control.new_ones(batch, stride * stride, f, h, w)
        else:
            frames = mask.shape[2]
            folded = mask[:, 0].reshape(batch, frames, h, stride, w, stride).permute(0, 3, 5, 1, 2, 4)
            folded = folded.reshape(batch, stride * stride, frames, h, w).to(control.device)
            folded = F.interpolate(folded, size=(f, h, w), mode="nearest-exact")
        refs = inputs.reference_pixels
        count = 0 if refs is None else refs.shape[1]
        if refs is not None:
            encoded = [encoders.encode_video(refs[:, i].unsqueeze(2)) for i in reversed(range(count))]
            first = torch.cat([torch.cat([z, torch.zeros_like(z)], dim=1) for z in encoded], dim=2)
            control = torch.cat([first, control], dim=2)
            folded = torch.cat([folded.new_zeros(batch, stride * stride, count, h, w), folded], dim=2)
        place = encoders.placement
        control = torch.cat([control, folded], dim=1).to(place.dtype)
        scale = inputs.conditioning_scale
        if scale is None:
            scale = torch.ones(batch, len(encoders.vace_layers or ()))
        return cls(control, scale.to(place.device, place.dtype), count), latents

    def dit_kwargs(self, guided: bool) -> dict[str, Any]:
        control, scale = self.control, self.scale
        if guided:
            if self._guided is None:
                self._guided = (torch.cat([control, control]), torch.cat([scale, scale]))
            control, scale = self._guided
        return {
            **super().dit_kwargs(guided),
            "control_hidden_states": control,
            "control_hidden_states_scale": scale,
        }

    def finish(self, latents: Tensor) -> Tensor:
        return latents[:, :, self.references :]

    def select(self, keep: Sequence[int]) -> Conditioning:
        out = super().select(keep)
        assert isinstance(out, VaceControl)
        out._guided = None
        return out


class AnimateSegments(Conditioning):
    """Wan2.2-Animate, one segment of S frames at a time (f = (S - 1) / 4 + 1 latent frames).

    The latents (B, C, 1 + f, h, w) have the character's latent frame first. ``condition``
    (B, 4 + z, 1 + f, h, w), concatenated to them at every step: the character's latents under an
    all-ones mask, then the latents of the segment's conditioning video under its mask: the last P
    decoded frames of the segment before (mask 1), then zeros (animate, mask 0) or the background
    video (replace, mask 1 - the person mask); the first segment starts from zeros / the background,
    with no frame marked kept. ``pose`` (B, z, f, h, w) the pose video's latents and ``face``
    (B, 3, S, M, M) the face pixels in [-1, 1] go to the DiT (the unconditional rows of guidance see a
    blank face, -1). :meth:`finish` drops the character's frame; :meth:`new_frames` the P frames a
    later segment repeats."""

    def __init__(self, inputs: WanExecutorInputs, encoders: ConditionEncoders, reference: Tensor) -> None:
        super().__init__(encoders.encode_images(inputs.clip_pixels))
        self.inputs, self.encoders = inputs, encoders
        self.reference = reference  # (B, 4 + z, 1, h, w): all-ones mask + the character's latents
        self.condition = self.pose = self.face = reference
        self._guided: tuple[Tensor, Tensor] | None = None

    @classmethod
    def prepare(cls, inputs: WanExecutorInputs, encoders: ConditionEncoders) -> tuple[Conditioning, Tensor]:
        assert inputs.condition_pixels is not None
        character = encoders.encode_video(inputs.condition_pixels[:, :1].transpose(1, 2))
        mask = character.new_ones(
            character.shape[0], encoders.vae.config.temporal_stride, *character.shape[2:]
        )
        out = cls(inputs, encoders, torch.cat([mask, character], dim=1))
        out._segment(0, None)
        return out, _noise(inputs, encoders)

    def next_segment(self, index: int, frames: Tensor) -> Tensor:
        assert self.inputs.segment_noise is not None and self.inputs.prev_segment_conditioning_frames
        previous = frames[:, -self.inputs.prev_segment_conditioning_frames :]
        self._segment(index, previous.permute(0, 4, 1, 2, 3) * 2 - 1)
        noise = self.inputs.segment_noise[self._rows, index - 1]
        return noise.to(device=self.encoders.placement.device, dtype=torch.float32)

    def new_frames(self, index: int, frames: Tensor) -> Tensor:
        return frames if index == 0 else frames[:, self.inputs.prev_segment_conditioning_frames :]

    _rows: list[int] | slice = slice(None)  # the input rows still made (rows cancelled mid-batch go)

    def _segment(self, index: int, previous: Tensor | None) -> None:
        """Encode segment ``index``'s pose, face and conditioning video; ``previous`` (B, 3, P, H, W)
        in [-1, 1]: the last frames of the segment before (None for the first)."""
        inputs, encoders, place = self.inputs, self.encoders, self.encoders.placement
        length, prev = inputs.segment_frame_length, inputs.prev_segment_conditioning_frames
        assert length is not None and prev is not None and inputs.pose_frames is not None
        start = index * (length - prev)
        span, rows = slice(start, start + length), self._rows

        def pixels(frames: Tensor) -> Tensor:  # uint8 (B, S, H, W, 3) -> (B, 3, S, H, W) in [-1, 1]
            return frames[rows, span].to(place.device).permute(0, 4, 1, 2, 3).float() / 255.0 * 2 - 1

        assert inputs.face_frames is not None
        self.pose = encoders.encode_video(pixels(inputs.pose_frames)).to(place.dtype)
        self.face = pixels(inputs.face_frames).to(place.dtype)
        batch, (height, width) = self.face.shape[0], inputs.pose_frames.shape[2:4]
        h, w = self.reference.shape[3:]
        if inputs.background_frames is not None and inputs.mask_frames is not None:  # replace
            background = pixels(inputs.background_frames)
            first = background[:, :, :prev] if previous is None else previous.to(background.dtype)
            video = torch.cat([first, background[:, :, prev:]], dim=2)
            person = inputs.mask_frames[rows, span].to(place.device).float() / 255.0
            keep = F.interpolate(1 - person, size=(h, w), mode="nearest").unsqueeze(1)
        else:  # animate
            first = self.face.new_zeros(batch, 3, prev, height, width, dtype=torch.float32)
            first = first if previous is None else previous.float()
            video = torch.cat([first, first.new_zeros(batch, 3, length - prev, height, width)], dim=2)
            keep = video.new_zeros(batch, 1, length, h, w)
        latents = encoders.encode_video(video)
        if index > 0:
            keep[:, :, :prev] = 1
        stride = encoders.vae.config.temporal_stride
        keep = torch.cat([keep[:, :, :1].repeat_interleave(stride, dim=2), keep[:, :, 1:]], dim=2)
        keep = keep.view(batch, -1, stride, h, w).transpose(1, 2)
        self.condition = torch.cat([self.reference, torch.cat([keep, latents], dim=1)], dim=2)
        self._guided = None

    def model_input(self, latents: Tensor) -> Tensor:
        return torch.cat([latents, self.condition], dim=1)

    def dit_kwargs(self, guided: bool) -> dict[str, Any]:
        pose, face = self.pose, self.face
        if guided:
            if self._guided is None:
                self._guided = (torch.cat([pose, pose]), torch.cat([face, torch.full_like(face, -1.0)]))
            pose, face = self._guided
        return {**super().dit_kwargs(guided), "pose_hidden_states": pose, "face_pixel_values": face}

    def finish(self, latents: Tensor) -> Tensor:
        return latents[:, :, 1:]

    def select(self, keep: Sequence[int]) -> Conditioning:
        out = super().select(keep)
        assert isinstance(out, AnimateSegments)
        rows = range(self.inputs.latents.shape[0])[self._rows]
        out._rows = [rows[k] for k in keep]
        out._guided = None
        return out

    shared = ("inputs", "encoders")


def conditioning_class(
    inputs: WanExecutorInputs, expand_timesteps: bool, vace: bool = False
) -> type[Conditioning]:
    """The mode of a batch, from its inputs and the model (``expand_timesteps``: TI2V; ``vace``: a
    VACE DiT, whatever the inputs)."""
    if vace:
        return VaceControl
    if inputs.pose_frames is not None:  # only Animate checkpoints take a pose video
        return AnimateSegments
    if inputs.video_pixels is not None:
        return VideoToVideo
    if expand_timesteps:
        return CleanFirstFrame
    if inputs.condition_pixels is not None:
        return ImageConcat
    return TextToVideo


def prepare_conditioning(
    inputs: WanExecutorInputs, encoders: ConditionEncoders
) -> tuple[Conditioning, Tensor]:
    """The batch's conditioning, prepared (the "condition" stage), and the initial latents."""
    mode = conditioning_class(inputs, encoders.expand_timesteps, encoders.vace_layers is not None)
    return mode.prepare(inputs, encoders)
