"""The HTTP edge of ``wanpipe serve``, outbound: the response bodies (pydantic models).

OpenAI's Video object (with Wan's ``parameters`` and ``batch_size``), lists and deletions, an Open
Responses ``response`` holding the video, the model cards, and the error body
``{"error": {"message", "type", "param", "code"}}``. Requests are parsed in :mod:`wanpipe.serving.parsing`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

VideoStatus = Literal["queued", "in_progress", "completed", "failed"]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class VideoError(BaseModel):
    code: str
    message: str


class LoraUse(BaseModel):
    """One LoRA adapter a job applies: a file of the server's ``--lora-dir`` by name, and its scale."""

    name: str
    scale: float


class VideoParameters(BaseModel):
    """Wan's settings of a job, every default resolved (an extension of OpenAI's Video object)."""

    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    fps: float | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    guidance_scale_2: float | None = None
    flow_shift: float | None = None
    seed: int | None = None
    negative_prompt: str | None = None
    image: bool = False
    last_image: bool = False
    sampler: str | None = None
    sigmas: list[float] | None = None
    timesteps: list[float] | None = None
    preset: str | None = None
    video: bool = False  # VACE: a control video was given
    mask: bool = False
    reference_images: int = 0
    conditioning_scale: float | list[float] | None = None  # VACE: one per layer
    cache: str | None = None
    cache_options: dict[str, Any] | None = None
    pose_video: bool = False  # Animate: which driving videos were given
    face_video: bool = False
    background_video: bool = False
    mask_video: bool = False
    mode: str | None = None  # Animate: animate or replace, and the segments
    segment_frame_length: int | None = None
    prev_segment_conditioning_frames: int | None = None
    loras: list[LoraUse] = Field(default_factory=list)  # the job's LoRA adapters (--lora-dir)
    decoder: str = "vae"  # what decodes (decoded) the video: "vae" or "tiny" (TAEHV)
    preview: bool = True  # live previews on (GET /v1/videos/{id}/preview)
    preview_every: int | None = None  # one every this many steps


class VideoObject(BaseModel):
    """OpenAI's Video object, plus ``parameters`` and ``batch_size`` (how many jobs ran together)."""

    id: str
    object: Literal["video"] = "video"
    status: VideoStatus
    progress: int = Field(ge=0, le=100)
    created_at: int
    completed_at: int | None = None
    expires_at: int | None = None
    model: str
    prompt: str
    size: str
    seconds: str
    error: VideoError | None = None
    remixed_from_video_id: str | None = None
    parameters: VideoParameters
    batch_size: int | None = None


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VideoObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = True


class OutputVideo(BaseModel):
    type: Literal["output_video"] = "output_video"
    video_url: str | None = None
    video_data: str | None = None
    format: str = "mp4"
    frames_per_second: float
    num_frames: int


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    role: Literal["assistant"] = "assistant"
    status: Literal["completed"] = "completed"
    content: list[OutputVideo]


class ResponseObject(BaseModel):
    """An Open Responses ``response`` whose one output message holds the video."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    completed_at: int | None = None
    status: Literal["completed"] = "completed"
    model: str
    output: list[OutputMessage]
    seed: int | None = None
    video_id: str


class PresetCard(BaseModel):
    """A few-step preset (``wanpipe.presets``): the checkpoint kinds it fits, whether the served model is
    one of them, the values it sets, the weights it is meant for and the sources of its figures."""

    name: str
    summary: str
    fits: list[str]
    fits_model: bool
    num_inference_steps: int
    sampler: str
    timesteps: list[float]
    flow_shift: float | None = None
    guidance_scale: float
    guidance_scale_2: float | None = None
    weights: list[str]
    sources: list[str]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "wanpipe"
    task: str
    defaults: dict[str, Any]
    limits: dict[str, Any]
    presets: list[PresetCard] = Field(default_factory=list)
    # the upload fields of POST /v1/videos this checkpoint takes: image (input_reference), last_image,
    # video / mask / reference_image (VACE), pose_video / face_video (Animate); image_required: i2v/flf2v
    inputs: dict[str, bool] = Field(default_factory=dict)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoraCard(BaseModel):
    """A LoRA adapter this server serves (a file of ``--lora-dir``); ``layers`` and ``unmatched_keys``
    once a request has used it (the file is read then)."""

    id: str
    object: Literal["lora"] = "lora"
    file: str
    size_bytes: int
    experts: str  # the Wan 2.2 A14B experts it goes to: high, low or both (one DiT: that one)
    layers: int | None = None
    unmatched_keys: int | None = None


class LoraList(BaseModel):
    object: Literal["list"] = "list"
    data: list[LoraCard]
