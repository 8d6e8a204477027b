"""schemathesis hooks for tests/test_openapi.py (loaded through ``SCHEMATHESIS_HOOKS``).

``refused_only_for_rules_in_words``: a schema-valid request that the server refuses with a 400 must
name, in its error body, one of the rules the OpenAPI document can only state in words. Any other
400 to a schema-valid request means the document and the parser disagree, and fails the run.
"""

from __future__ import annotations

import json

import schemathesis

IMAGE = {"invalid_image", "unsupported_url", "invalid_value"}  # not an image, a URL, not on this checkpoint
VIDEO_OPTIONS = "provider_options.video."
# operation -> param -> the codes of a 400 that a schema-valid request may get ("limit_exceeded", a
# request over --max-pixels/--max-frames/--max-steps, may come with any param)
RULES_IN_WORDS: dict[str, dict[str, set[str]]] = {
    "POST /v1/videos": {
        "size": {"invalid_value"},  # a multiple of the checkpoint's spatial multiple, at least 1
        "num_frames": {"invalid_value"},  # 4k+1
        "seconds": {"invalid_value"},  # seconds and num_frames disagree
        # bounds of numbers given as text (a pattern states the sign, not a bound)
        "fps": {"invalid_value"},  # over 240
        "seed": {"invalid_value"},  # over 2^63-1
        "guidance_scale": {"invalid_value"},  # over 100
        "flow_shift": {"invalid_value"},  # under 0.01 or over 100
        "guidance_scale_2": {"invalid_value"},  # a one-expert checkpoint (or over 100 as text)
        "input_reference": IMAGE,
        "last_image": IMAGE,
        # a schedule's list: strictly decreasing, its length the step count, a number as text at most
        # 64 characters, in range when given as text; not both lists
        "sigmas": {"invalid_value"},
        "timesteps": {"invalid_value"},
        "preset": {"invalid_value"},  # a preset for another kind of checkpoint
        # VACE's fields: refused on a checkpoint without VACE blocks (and not a video / an image)
        "video": {"invalid_video", "invalid_value", "unsupported_url"},
        "mask": {"invalid_video", *IMAGE},
        "reference_image": IMAGE,
        "conditioning_scale": {"invalid_value"},
        # a step cache's options are checked against the cache and the checkpoint (MagCache's ratios,
        # TeaCache's coefficients, which the tiny checkpoint has none of)
        "cache_options": {"invalid_value"},
        # Animate's fields: refused on other checkpoints (and a video that is not one)
        **dict.fromkeys(
            ("pose_video", "face_video", "background_video", "mask_video"),
            {"invalid_video", "invalid_value", "unsupported_url"},
        ),
        **dict.fromkeys(
            ("mode", "segment_frame_length", "prev_segment_conditioning_frames"), {"invalid_value"}
        ),
        # a LoRA the server serves (--lora-dir), each name once; a JSON text that is the list
        "loras": {"invalid_value"},
        # prompt travel: only with context_frames, ranges covering the video in order without gaps or
        # overlaps, non-empty prompts; in a form, a JSON text that is the list
        "prompts": {"invalid_value"},
    },
    "POST /v1/responses": {
        "input": IMAGE,  # an image that is not one, more than two, or on a text-to-video checkpoint
        "seed": {"invalid_value"},
        VIDEO_OPTIONS + "height": {"invalid_value"},
        VIDEO_OPTIONS + "width": {"invalid_value"},
        VIDEO_OPTIONS + "num_frames": {"invalid_value"},
        VIDEO_OPTIONS + "frames_per_second": {"invalid_value"},
        VIDEO_OPTIONS + "guidance_scale": {"invalid_value"},
        VIDEO_OPTIONS + "guidance_scale_2": {"invalid_value"},
        VIDEO_OPTIONS + "flow_shift": {"invalid_value"},
        VIDEO_OPTIONS + "sigmas": {"invalid_value"},
        VIDEO_OPTIONS + "timesteps": {"invalid_value"},
        VIDEO_OPTIONS + "preset": {"invalid_value"},
        VIDEO_OPTIONS + "cache_options": {"invalid_value"},
        VIDEO_OPTIONS + "loras": {"invalid_value"},
    },
    "GET /v1/videos": {"after": {"not_found"}},  # an id that does not exist
}


@schemathesis.check
def refused_only_for_rules_in_words(ctx, response, case) -> bool | None:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 400:
        return None
    rules = RULES_IN_WORDS.get(case.operation.label)
    if rules is None:  # the default positive_data_acceptance already refuses this 400
        return None
    error = json.loads(response.content)["error"]
    if error["code"] == "limit_exceeded" or error["code"] in rules.get(error["param"], set()):
        return None
    raise AssertionError(
        f"a schema-valid request was refused for a rule the document does not state: {error}"
    )


@schemathesis.deserializer("text/html")
def html(ctx, response):
    return response.content.decode("utf-8")
