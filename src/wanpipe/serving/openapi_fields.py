"""The request fields of the OpenAPI document as JSON schemas: value patterns (the parser's own text
forms, wanpipe.serving.scalars), numbers, schedules, step caches, images, and VACE's and Animate's
fields. :mod:`wanpipe.serving.openapi` assembles them into the request bodies."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from wanpipe.context import CONTEXT_BLENDS, CONTEXT_SCHEDULES, DECODERS
from wanpipe.presets import PRESETS
from wanpipe.serving.parsing import (
    MAX_REFERENCE_IMAGES,
    ServeLimits,
)
from wanpipe.serving.scalars import (
    EXPONENT,
    FLOAT_TEXT,
    FLOW_SHIFT_RANGE,
    GUIDANCE_RANGE,
    MANTISSA,
    MAX_NUMBER_TEXT,
    SAMPLERS,
    SPACE,
)

if TYPE_CHECKING:
    pass

# ---------------------------------------------------------------------------------------------------------
# Value patterns: the parser's own (scalars.INT_TEXT, FLOAT_TEXT, SIZE_TEXT), narrowed to a minimum


ZERO = r"(?:0+\.?0*|\.0+)"
INT_MIN_0 = rf"{SPACE}(?:\+?[0-9]+|-0+){SPACE}"
INT_MIN_1 = rf"{SPACE}\+?0*[1-9][0-9]*{SPACE}"
FLOAT_ANY = FLOAT_TEXT  # any float the parser takes
FLOAT_MIN_0 = rf"{SPACE}(?:\+?{MANTISSA}|-{ZERO}){EXPONENT}{SPACE}"
FLOAT_ABOVE_0 = rf"{SPACE}\+?(?:[0-9]*[1-9][0-9]*\.?[0-9]*|[0-9]*\.[0-9]*[1-9][0-9]*){EXPONENT}{SPACE}"


def text_schema(pattern: str, bounded: bool = True) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string", "pattern": f"^{pattern}$"}
    if bounded:
        schema["maxLength"] = MAX_NUMBER_TEXT
    return schema


def field_schema(description: str, *alternatives: dict[str, Any], nullable: bool) -> dict[str, Any]:
    options = [*alternatives, {"type": "null"}] if nullable else list(alternatives)
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "description": description}


def integer_schema(minimum: int, maximum: int | None, description: str, *, json: bool) -> dict[str, Any]:
    number: dict[str, Any] = {"type": "integer", "minimum": minimum}
    if maximum is not None:
        number["maximum"] = maximum
    text = text_schema(INT_MIN_1 if minimum == 1 else INT_MIN_0)
    if not json:
        return field_schema(description, text, nullable=False)
    return field_schema(description, number, text, nullable=True)


def number_schema(
    description: str,
    *,
    json: bool,
    minimum: float | None = None,
    above: float | None = None,
    maximum: float | None = None,
) -> dict[str, Any]:
    """A number: JSON's with its bounds, or text whose pattern states the sign only (``minimum`` 0:
    no minus; ``above``: no zero either). A bound the pattern cannot state is said in the description."""
    number: dict[str, Any] = {"type": "number"}
    if minimum is not None:
        number["minimum"] = minimum
    if above is not None:
        number["exclusiveMinimum"] = above
    if maximum is not None:
        number["maximum"] = maximum
    if minimum is not None and minimum > 0 or above is not None:
        text = text_schema(FLOAT_ABOVE_0)
    elif minimum == 0:
        text = text_schema(FLOAT_MIN_0)
    else:
        text = text_schema(FLOAT_ANY)
    if not json:
        return field_schema(description, text, nullable=False)
    return field_schema(description, number, text, nullable=True)


def guidance_schema(what: str, *, json: bool) -> dict[str, Any]:
    low, high = GUIDANCE_RANGE
    return number_schema(f"{what}, in [{low:g}, {high:g}].", json=json, minimum=low, maximum=high)


def flow_shift_schema(*, json: bool) -> dict[str, Any]:
    low, high = FLOW_SHIFT_RANGE
    description = f"Schedule shift, in [{low:g}, {high:g}]. Default: the checkpoint's."
    return number_schema(description, json=json, minimum=low, maximum=high)


def fps_schema(description: str, *, json: bool) -> dict[str, Any]:
    return number_schema(description, json=json, above=0, maximum=240)


def preset_schema(*, json: bool) -> dict[str, Any]:
    """A known preset's name; one that does not fit the served checkpoint's kind gets 400 (in words)."""
    fits = "; ".join(f"{p.name}: {' or '.join(p.fits)}" for p in PRESETS.values())
    description = (
        "A published few-step setting (steps, sampler, step list, shift, guidance) that fills the values "
        f"left out; explicit values win. Each fits some checkpoints only (another: 400): {fits}. "
        "GET /v1/models lists them."
    )
    return field_schema(description, {"type": "string", "enum": list(PRESETS)}, nullable=json)


def decoder_schema(*, json: bool) -> dict[str, Any]:
    """``decoder``: which decoder makes the final video."""
    return field_schema(
        "The final decode: vae (default) the full VAE; tiny the tiny autoencoder TAEHV, much faster and "
        "lower quality (needs the server started with --tiny-vae, else 400). The video object's "
        "parameters.decoder says which one made it.",
        {"type": "string", "enum": list(DECODERS)},
        nullable=json,
    )


def string_schema(description: str, *, json: bool) -> dict[str, Any]:
    return field_schema(description, {"type": "string"}, nullable=json)


LIST_TEXT = rf"{FLOAT_TEXT}(?:,{FLOAT_TEXT})*"  # scalars.parse_number_list's text: numbers and commas
SCHEDULE_WORDS = (
    "Used as given, not shifted again; one value per step (it sets num_inference_steps, or must equal "
    "it), strictly decreasing, each number as text at most {chars} characters; give sigmas or timesteps, "
    "not both. See docs/fast-sampling.md."
)


def sampler_schema(*, json: bool) -> dict[str, Any]:
    values: list[Any] = list(SAMPLERS) + ([None] if json else [])
    return {
        "enum": values,
        "description": "unipc, euler, lcm or dmd (the step-list sampler of distilled checkpoints). "
        "Default: the checkpoint's scheduler.",
    }


def schedule_list_schema(what: str, maximum: float, limits: ServeLimits, *, json: bool) -> dict[str, Any]:
    """sigmas / timesteps: a JSON array of numbers in (0, maximum], or the numbers as text with commas."""
    text = {
        **text_schema(LIST_TEXT, bounded=False),
        "description": "numbers separated by commas, e.g. 0.9,0.6",
    }
    description = f"{what}, each in (0, {maximum:g}], at most {limits.max_steps} (--max-steps). " + (
        SCHEDULE_WORDS.format(chars=MAX_NUMBER_TEXT)
    )
    if not json:
        return field_schema(description, text, nullable=False)
    array = {
        "type": "array",
        "items": {"type": "number", "exclusiveMinimum": 0, "maximum": maximum},
        "minItems": 1,
        "maxItems": limits.max_steps,
    }
    return field_schema(description, array, text, nullable=True)


def schedule_fields_schema(limits: ServeLimits, *, json: bool) -> dict[str, Any]:
    return {
        "sampler": sampler_schema(json=json),
        "sigmas": schedule_list_schema(
            "The schedule's own sigmas (the trailing 0 implied)", 1, limits, json=json
        ),
        "timesteps": schedule_list_schema(
            "The schedule's own timesteps on the 0-1000 scale (sigma = t / 1000; e.g. 1000,750,500,250)",
            1000,
            limits,
            json=json,
        ),
    }


NON_BLANK = r"\S"  # some character that str.strip() keeps
CACHES = ["first-block", "teacache", "taylorseer", "magcache", "none"]
CACHE_FORM_KEY = r"^cache_options\[[A-Za-z_][A-Za-z0-9_]*\]$"


def cache_schema(*, json: bool) -> dict[str, Any]:
    return field_schema(
        "Step cache (an approximation): first-block, teacache, taylorseer (Modular MAX's), magcache, or none. "
        "Default: none.",
        {"type": "string", "enum": CACHES},
        nullable=json,
    )


def cache_options_schema(*, json: bool) -> dict[str, Any]:
    description = (
        "The options of cache, as in diffusers (taylorseer: cache_interval, disable_cache_before_step, "
        "disable_cache_after_step, max_order, use_lite_mode; magcache: threshold, max_skip_steps, "
        "retention_ratio, mag_ratios as numbers; first-block, teacache: threshold, coefficients), checked "
        "against the cache and the checkpoint (400 with param cache_options); no calibrate or files here. "
        + (
            "An object, or its JSON text."
            if json
            else "JSON text, or one cache_options[KEY] field per option."
        )
    )
    if not json:
        return {"type": "string", "description": description}
    return field_schema(description, {"type": "object"}, {"type": "string"}, nullable=True)


DATA_URL = "a base64 data URL (data:image/png;base64,...); the server fetches no http(s) URL"
IMAGE_FILE = "an image file: PNG, JPEG, WebP, GIF or BMP, a still image whose type matches its content type"


VIDEO_DATA_URL = "a base64 data URL (data:video/mp4;base64,...)"
VIDEO_FILE = "a video file: MP4, MOV, WebM/Matroska, AVI, or an animated GIF or WebP"


def vace_properties(form: str | None) -> dict[str, Any]:
    """VACE's fields (a checkpoint without VACE blocks refuses each of them; docs/vace.md)."""
    multipart = form == "multipart"
    upload = {"type": "string", "format": "binary"} if multipart else {"type": "string"}
    video = "VACE checkpoints: the control or source video, at least as large as the output (resized to it): "
    mask = (
        "VACE checkpoints, with video: white = generate, black = keep; one image for every frame, or a "
        "video of one mask frame per video frame, at the video's size: "
    )
    reference = (
        f"VACE checkpoints: a reference image (a subject, face or object), at most {MAX_REFERENCE_IMAGES}"
    )
    scale = "VACE checkpoints: the control's strength, one number or one per VACE layer. Default 1."
    both = f"{IMAGE_FILE}, or {VIDEO_FILE}"
    if form is None:
        image = {"type": "string", "description": DATA_URL}
        image_url = {
            "type": "object",
            "properties": {"image_url": image},
            "required": ["image_url"],
            "additionalProperties": False,
        }
        numbers = {"type": "array", "items": {"type": "number"}, "minItems": 1}
        return {
            "video": field_schema(video + VIDEO_DATA_URL, {"type": "string"}, nullable=True),
            "mask": field_schema(
                mask + f"{DATA_URL}, or {VIDEO_DATA_URL}", {"type": "string"}, nullable=True
            ),
            "reference_image": field_schema(
                reference + f" (a list for several): {DATA_URL}",
                image,
                image_url,
                {"type": "array", "items": {"anyOf": [image, image_url]}, "maxItems": MAX_REFERENCE_IMAGES},
                nullable=True,
            ),
            "conditioning_scale": field_schema(
                scale, {"type": "number"}, text_schema(FLOAT_ANY), numbers, nullable=True
            ),
        }
    listed = rf"{FLOAT_ANY}(?:,{FLOAT_ANY})*"
    return {
        "video": {**upload, "description": video + (VIDEO_FILE if multipart else VIDEO_DATA_URL)},
        "mask": {**upload, "description": mask + (both if multipart else f"{DATA_URL}, or {VIDEO_DATA_URL}")},
        "reference_image": {
            "type": "array",
            "items": upload,
            "maxItems": MAX_REFERENCE_IMAGES,
            "description": reference
            + f" (the field repeated for several): {IMAGE_FILE if multipart else DATA_URL}",
        },
        "conditioning_scale": {**text_schema(listed, bounded=False), "description": scale + " X or X,Y,..."},
    }


def animate_properties(form: str | None, *, json: bool) -> dict[str, Any]:
    """Wan2.2-Animate's fields (other checkpoints refuse each; docs/animate.md). input_reference is the
    character there; the videos are the original preprocessing script's, with one frame per pose frame."""
    video = VIDEO_FILE if form == "multipart" else VIDEO_DATA_URL
    upload = {"type": "string", "format": "binary"} if form == "multipart" else {"type": "string"}
    what = {
        "pose_video": "Animate: the driving pose video (src_pose.mp4); the output is as long",
        "face_video": "Animate: the driving face video (src_face.mp4), one frame per pose frame",
        "background_video": 'Animate, mode "replace": the driving video without its person (src_bg.mp4)',
        "mask_video": 'Animate, mode "replace": white where the character goes (src_mask.mp4)',
    }
    out = {name: field_schema(f"{text}: {video}", upload, nullable=json) for name, text in what.items()}
    mode = {"type": "string", "enum": ["animate", "replace"]}
    out["mode"] = field_schema(
        "Animate: animate (default) the character, or replace the person", mode, nullable=json
    )
    out["segment_frame_length"] = integer_schema(
        5, None, "Animate: frames per segment, 4k+1. Default 77.", json=json
    )
    out["prev_segment_conditioning_frames"] = field_schema(
        "Animate: frames each segment continues from, 1 (default) or 5",
        {"type": "integer", "enum": [1, 5]} if json else text_schema(r" *[15] *", bounded=False),
        nullable=json,
    )
    return out


def window_properties(*, json: bool) -> dict[str, Any]:
    """The context windows of long videos (text- and image-to-video; docs/long-video.md), in video frames."""
    return {
        "context_frames": integer_schema(
            1,
            None,
            "Long videos: the window length, 4k+1 frames, at most num_frames. Default: none.",
            json=json,
        ),
        "context_overlap": integer_schema(
            1, None, "Long videos: frames two windows share, a multiple of 4 below context_frames.", json=json
        ),
        "context_schedule": field_schema(
            "Long videos: how windows are placed (default uniform_standard)",
            {"type": "string", "enum": list(CONTEXT_SCHEDULES)},
            nullable=json,
        ),
        "context_blend": field_schema(
            "Long videos: window weights (default linear ramps)",
            {"type": "string", "enum": list(CONTEXT_BLENDS)},
            nullable=json,
        ),
        "prompts": prompts_schema(json=json),
    }


def prompts_schema(*, json: bool) -> dict[str, Any]:
    """``prompts``: prompt travel, a prompt per range of video frames (with context_frames)."""
    description = (
        "Long videos (with context_frames): a prompt per range of video frames, [{start, end, prompt}] "
        "(inclusive, from 0 to num_frames - 1 without gaps or overlaps); each window takes the prompt of "
        "its middle frame, instead of prompt. "
        + ("A list, or its JSON text." if json else "The list's JSON text.")
    )
    if not json:
        return {"type": "string", "description": description}
    item = {
        "type": "object",
        "properties": {
            "start": {"type": "integer", "minimum": 0},
            "end": {"type": "integer", "minimum": 0},
            "prompt": {"type": "string", "minLength": 1},
        },
        "required": ["start", "end", "prompt"],
        "additionalProperties": False,
    }
    return field_schema(
        description, {"type": "array", "items": item, "minItems": 1}, {"type": "string"}, nullable=True
    )


def loras_schema(names: list[str] | None, *, json: bool) -> dict[str, Any]:
    """``loras``: the job's LoRA adapters, files of ``--lora-dir`` by name (``names``: those served when
    the document was made; None: a server without ``--lora-dir``, which takes an empty list alone)."""
    from wanpipe.serving.scalars import MAX_LORA_SCALE, MAX_LORAS

    if names is None:
        description = (
            "LoRA adapters: this server serves none (it runs without --lora-dir): an empty list only."
        )
        empty_text = {"type": "string", "pattern": r"^\s*\[\s*\]\s*$"}
        if not json:
            return {**empty_text, "description": description}
        return field_schema(description, {"type": "array", "maxItems": 0}, empty_text, nullable=True)
    description = (
        "LoRA adapters merged for this job: files of the server's --lora-dir by name (GET /v1/loras lists "
        f"them; a name gone since: 400 with param loras), scale in [-{MAX_LORA_SCALE:g}, {MAX_LORA_SCALE:g}] "
        f"(default 1); at most {MAX_LORAS}, each name once. Jobs with the same set run in one batch. "
        + ("A list, one object, or the list's JSON text." if json else "The list's JSON text.")
    )
    if not json:
        return {"type": "string", "description": description}
    item = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "enum": list(names)},
            "scale": {"type": "number", "minimum": -MAX_LORA_SCALE, "maximum": MAX_LORA_SCALE},
        },
        "required": ["name"],
        "additionalProperties": False,
    }
    return field_schema(
        description,
        {"type": "array", "items": item, "maxItems": MAX_LORAS},
        item,
        {"type": "string"},
        nullable=True,
    )


def preview_properties(*, json: bool) -> dict[str, Any]:
    """``preview`` and ``preview_every`` of ``POST /v1/videos``: live previews while the job samples."""
    flag = {"type": "string", "enum": ["true", "false"]}
    return {
        "preview": field_schema(
            "Live previews while it samples (GET /v1/videos/{id}/preview, preview_url in GET "
            "/v1/videos/{id}/events). Default: true.",
            *([{"type": "boolean"}, flag] if json else [flag]),
            nullable=json,
        ),
        "preview_every": integer_schema(
            1, None, "Steps between live previews (and one at the last step). Default: 2.", json=json
        ),
    }
