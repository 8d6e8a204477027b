"""Samplers and schedules as data: request validation, custom sigmas/timesteps, Euler, LCM and DMD.

Parity against diffusers (Euler with shift, LCM) on tiny random checkpoints and against a test-only
copy of the published DMD step-list loop; see docs/fast-sampling.md.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from wanpipe import InvalidRequestError, WanRequest
from wanpipe.schedulers import (
    SAMPLERS,
    Schedule,
    SchedulerConfig,
    default_sigmas,
    make_schedule,
    new_state,
    step,
)

OK = dict(prompt="a cat", height=32, width=32, num_frames=5)


@pytest.mark.parametrize(
    ("change", "param", "message"),
    [
        (dict(sampler="ddim"), "sampler", "must be one of unipc, euler, lcm, dmd"),
        (dict(sigmas=[0.5, 0.9]), "sigmas", "strictly decreasing"),
        (dict(sigmas=[0.9, 0.9]), "sigmas", "strictly decreasing"),
        (dict(sigmas=[1.5, 0.5]), "sigmas", r"in \(0, 1\]"),
        (dict(sigmas=[0.9, 0.0]), "sigmas", r"in \(0, 1\]"),
        (dict(sigmas=[0.9, float("nan")]), "sigmas", "finite number"),
        (dict(sigmas=[]), "sigmas", "non-empty list"),
        (dict(sigmas="0.9,0.5"), "sigmas", "non-empty list"),
        (dict(timesteps=[1001.0, 500.0]), "timesteps", r"in \(0, 1000\]"),
        (dict(timesteps=[250, 500]), "timesteps", "strictly decreasing"),
        (dict(timesteps=[1000, 500], num_inference_steps=3), "timesteps", "one value per step"),
        (dict(sigmas=[0.9, 0.5], num_inference_steps=3), "sigmas", "one value per step"),
        (dict(sigmas=[0.9, 0.5], timesteps=[900, 500]), "timesteps", "either sigmas or timesteps"),
    ],
)
def test_bad_schedule_request_is_refused(wan_pipe, change, param, message) -> None:
    for validate in (wan_pipe.tokenizer.resolve, wan_pipe.check, wan_pipe.tokenizer.make_context):
        with pytest.raises(InvalidRequestError, match=message) as info:
            validate(WanRequest(**{**OK, **change}))
        assert info.value.param == param


def test_resolve_fills_sampler_and_step_count(wan_pipe) -> None:
    """The sampler defaults to the checkpoint's; a list sets the step count; resolving twice is a no-op;
    different samplers or lists never share a batch."""
    tokenizer = wan_pipe.tokenizer
    plain = tokenizer.resolve(WanRequest(**OK, seed=1))
    assert plain.sampler == wan_pipe.arch.scheduler.kind and plain.sigmas is None and plain.timesteps is None
    listed = tokenizer.resolve(WanRequest(**OK, seed=1, timesteps=[1000, 750, 500, 250]))
    assert listed.num_inference_steps == 4 and listed.timesteps == [1000.0, 750.0, 500.0, 250.0]
    assert tokenizer.resolve(listed) == listed
    sig = tokenizer.resolve(WanRequest(**OK, seed=1, sigmas=(0.9, 0.5), num_inference_steps=2))
    assert sig.sigmas == [0.9, 0.5] and sig.num_inference_steps == 2
    keys = {
        tokenizer.batch_key(tokenizer.resolve(WanRequest(**OK, seed=1, num_inference_steps=4, **extra)))
        for extra in (
            {},
            dict(sampler="euler"),
            dict(sampler="lcm"),
            dict(sampler="dmd"),
            dict(sampler="dmd", timesteps=[1000, 750, 500, 250]),
            dict(sampler="dmd", sigmas=[1.0, 0.75, 0.5, 0.25]),
        )
    }
    assert len(keys) == 6


# ---------------------------------------------------------------------------------------------------
# Schedules as data
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("grid", ["diffusers", "original"])
def test_default_sigmas_given_back_give_the_default_schedule(sampler, grid) -> None:
    """default_sigmas -> make_schedule(sigmas=...) is the default schedule bit for bit (also its
    video-to-video tails), for every sampler, grid, shift and step count tried."""
    for config in (
        SchedulerConfig(kind="unipc", sigma_grid=grid),
        SchedulerConfig(kind="euler", sigma_grid=grid),
        SchedulerConfig(kind="unipc", sigma_grid=grid, final_sigmas_type="sigma_min", solver_order=3),
        SchedulerConfig(kind="euler", shift_terminal=0.1),
    ):
        for n in (1, 2, 3, 4, 8, 20, 50):
            for shift in (1.0, 3.0, 5.0, 8.0, 12.0):
                if config.shift_terminal is not None and n == 1:
                    continue
                default = make_schedule(config, n, shift, sampler=sampler)
                sigmas = default_sigmas(config, n, shift, sampler=sampler)
                assert len(sigmas) == n and all(isinstance(s, float) for s in sigmas)
                given = make_schedule(config, n, 7.0, sampler=sampler, sigmas=sigmas)  # the shift is unused
                assert given == default and given.kind == sampler, (config, n, shift)
                start = n // 2
                if start:
                    tail = make_schedule(config, n, shift, start, sampler=sampler, sigmas=sigmas)
                    assert tail == make_schedule(config, n, shift, start, sampler=sampler)


def test_given_lists_are_used_as_given() -> None:
    """sigmas: the DiT sees sigma * 1000 (UniPC: truncated); timesteps: as given, sigma = t / 1000.
    Neither is shifted again; a first sigma of 1 is nudged for UniPC only (as diffusers does)."""
    euler, unipc = (
        SchedulerConfig(kind="euler", flow_shift=5.0),
        SchedulerConfig(kind="unipc", flow_shift=5.0),
    )
    s = make_schedule(euler, 3, sampler="dmd", sigmas=[1.0, 0.6375, 0.25])
    np.testing.assert_array_equal(s.sigmas, np.float32([1.0, 0.6375, 0.25, 0.0]))
    np.testing.assert_array_equal(s.timesteps, np.float32([1.0, 0.6375, 0.25]) * np.float32(1000))
    t = make_schedule(euler, 4, sampler="lcm", timesteps=[1000, 937.5, 833.3, 625.5])
    np.testing.assert_array_equal(t.timesteps, np.float32([1000, 937.5, 833.3, 625.5]))
    np.testing.assert_array_equal(t.sigmas[:-1], np.float32([1000, 937.5, 833.3, 625.5]) / np.float32(1000))
    np.testing.assert_array_equal(t.step_coefficients[:, 0], t.sigmas[:-1])
    np.testing.assert_array_equal(t.step_coefficients[:, 1], np.float32(1) - t.sigmas[1:])
    np.testing.assert_array_equal(t.step_coefficients[:, 2], t.sigmas[1:])
    assert [t.needs_noise(i) for i in range(4)] == [True, True, True, False]
    u = make_schedule(unipc, 2, sampler="unipc", sigmas=[1.0, 0.7])
    assert u.sigmas[0] == np.float32(1.0 - 1e-6) and u.timesteps.tolist() == [999.0, 700.0]
    e = make_schedule(unipc, 2, sampler="euler", sigmas=[1.0, 0.7])
    assert e.timesteps.tolist() == [1000.0, np.float32(0.7) * np.float32(1000)] and not e.needs_noise(0)


def test_expert_boundary_follows_the_given_timesteps() -> None:
    """Wan 2.2 A14B: the high-noise expert runs while t >= boundary (0.875 * 1000), on the list's own
    timesteps; strength keeps the list's tail."""
    from wanpipe.stages.experts import Experts

    config = SchedulerConfig(kind="euler", flow_shift=5.0)
    s = make_schedule(config, 4, sampler="dmd", timesteps=[1000, 937.5, 833.3, 625])
    assert Experts.plan(s.timesteps, 875.0) == ["high", "high", "low", "low"]
    tail = make_schedule(config, 4, start_step=2, sampler="dmd", timesteps=[1000, 937.5, 833.3, 625])
    assert tail.timesteps.tolist() == [np.float32(833.3), 625.0] and Experts.plan(tail.timesteps, 875.0) == [
        "low",
        "low",
    ]


def test_bad_schedule_arguments_raise() -> None:
    config = SchedulerConfig(kind="euler")
    for kw, match in (
        (dict(sigmas=[0.5, 0.9]), "strictly decreasing"),
        (dict(sigmas=[0.9]), "2 values"),
        (dict(timesteps=[1200, 100]), r"in \(0, 1000\]"),
        (dict(sigmas=[0.9, 0.5], timesteps=[900, 500]), "not both"),
        (dict(sampler="ddim"), "sampler must be one of"),
    ):
        with pytest.raises(ValueError, match=match):
            make_schedule(config, 2, **kw)
    s = make_schedule(config, 2, sampler="lcm")
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="needs fresh noise"):
        step(s, new_state(), 0, x, x)
    e = make_schedule(config, 2, sampler="euler")
    with pytest.raises(ValueError, match="takes no noise"):
        step(e, new_state(), 0, x, x, x)
    with pytest.raises(ValueError, match="does not fit sampler"):
        Schedule(s.timesteps, s.sigmas, s.step_coefficients, sampler="euler")


def test_lcm_scheduler_config_parses_and_refuses_what_is_not_implemented() -> None:
    from diffusers import FlowMatchLCMScheduler

    def saved(**kw) -> dict:  # what save_pretrained writes to scheduler_config.json
        return json.loads(FlowMatchLCMScheduler(**kw).to_json_string())

    config = SchedulerConfig.from_dict(saved(shift=5.0, shift_terminal=0.05))
    assert config == SchedulerConfig(kind="lcm", flow_shift=5.0, shift_terminal=0.05)
    for key, value, match in (
        ("use_dynamic_shifting", True, "dynamic"),
        ("scale_factors", [1.0, 2.0], "scale-wise"),
        ("use_karras_sigmas", True, "Karras"),
        ("invert_sigmas", True, "inverted"),
    ):
        data = {**saved(shift=5.0), key: value}
        with pytest.raises(ValueError, match=f"FlowMatchLCMScheduler with {key}=.*{match}"):
            SchedulerConfig.from_dict(data)


# ---------------------------------------------------------------------------------------------------
# Parity: Euler and LCM against diffusers.WanPipeline with the scheduler swapped in
# ---------------------------------------------------------------------------------------------------

FRAME_TOL = 1e-3
GEN = dict(prompt="a dog runs in the park", height=32, width=48, num_frames=5)


def reference_frames(
    ref, seed: int, *, given: dict | None = None, step_noise: bool = False, **kw
) -> np.ndarray:
    """diffusers' WanPipeline with ``generator=torch.Generator("cpu").manual_seed(seed)``.

    given: sigmas= / timesteps= passed to the scheduler's ``set_timesteps`` (WanPipeline takes none);
    step_noise: FlowMatchLCMScheduler's fresh noise drawn from that same generator (WanPipeline passes
    none to ``scheduler.step``, so diffusers alone would draw it from torch's global RNG)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    scheduler = ref.scheduler
    if given is not None:
        set_timesteps = type(scheduler).set_timesteps
        scheduler.set_timesteps = lambda n=None, device=None, **_: set_timesteps(
            scheduler, None, device=device, **given
        )
    if step_noise:
        scheduler_step = type(scheduler).step
        scheduler.step = lambda *a, **k: scheduler_step(scheduler, *a, generator=generator, **k)
    try:
        out = ref(generator=generator, output_type="np", **kw).frames[0]
    finally:
        vars(scheduler).pop("set_timesteps", None)
        vars(scheduler).pop("step", None)
    return np.asarray(out, dtype=np.float32)


def _swapped(folder, scheduler):
    from tests import tiny

    ref = tiny.load_reference(folder)
    ref.scheduler = scheduler
    return ref


# (case, request fields, diffusers scheduler shift, the list set_timesteps gets): diffusers shifts a
# given list by its own shift, so a list runs against a shift-1 scheduler there.
LIST_CASES = [
    ("default grid", dict(num_inference_steps=4), 3.0, None),
    ("shift override", dict(num_inference_steps=3, flow_shift=7.0), 7.0, None),
    ("sigmas", dict(sigmas=[0.95, 0.7, 0.4, 0.15]), 1.0, dict(sigmas=[0.95, 0.7, 0.4, 0.15])),
    ("timesteps", dict(timesteps=[1000, 750, 500, 250]), 1.0, dict(timesteps=[1000, 750, 500, 250])),
]


@pytest.mark.parametrize(("case", "fields", "shift", "given"), LIST_CASES, ids=[c[0] for c in LIST_CASES])
@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_euler_matches_diffusers(wan_pipe, tiny_ckpt, case, fields, shift, given, guidance) -> None:
    """sampler="euler" on the (UniPC) tiny checkpoint = diffusers' WanPipeline with
    FlowMatchEulerDiscreteScheduler swapped in, on its grid with the shift, or on a given list."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    ref = _swapped(tiny_ckpt, FlowMatchEulerDiscreteScheduler(shift=shift))
    steps = len(given[next(iter(given))]) if given else fields["num_inference_steps"]
    ours = wan_pipe.generate(
        **GEN, **fields, guidance_scale=guidance, seed=7, sampler="euler", progress=False
    )
    theirs = reference_frames(ref, 7, given=given, **GEN, num_inference_steps=steps, guidance_scale=guidance)
    diff = float(np.abs(ours.frames - theirs).max())
    print(f"euler {case} guidance {guidance}: max abs diff {diff:.2e}")
    assert diff <= FRAME_TOL and float(ours.frames.std()) > 1e-3


@pytest.mark.parametrize(("case", "fields", "shift", "given"), LIST_CASES, ids=[c[0] for c in LIST_CASES])
@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_lcm_matches_diffusers(wan_pipe, tiny_ckpt, case, fields, shift, given, guidance) -> None:
    """sampler="lcm" = diffusers' WanPipeline with FlowMatchLCMScheduler swapped in, its step noise
    drawn from the pipeline's seeded generator after the initial latents."""
    from diffusers import FlowMatchLCMScheduler

    ref = _swapped(tiny_ckpt, FlowMatchLCMScheduler(shift=shift))
    steps = len(given[next(iter(given))]) if given else fields["num_inference_steps"]
    ours = wan_pipe.generate(**GEN, **fields, guidance_scale=guidance, seed=11, sampler="lcm", progress=False)
    theirs = reference_frames(
        ref, 11, given=given, step_noise=True, **GEN, num_inference_steps=steps, guidance_scale=guidance
    )
    diff = float(np.abs(ours.frames - theirs).max())
    print(f"lcm {case} guidance {guidance}: max abs diff {diff:.2e}")
    assert diff <= FRAME_TOL
    other_seed = wan_pipe.generate(
        **GEN, **fields, guidance_scale=guidance, seed=12, sampler="lcm", progress=False
    )
    assert float(np.abs(other_seed.frames - ours.frames).max()) > 1e-3


def test_lcm_checkpoint_runs_as_diffusers(tmp_path) -> None:
    """A checkpoint whose scheduler_config.json is FlowMatchLCMScheduler samples with LCM by default."""
    from diffusers import FlowMatchLCMScheduler

    from tests import tiny
    from wanpipe import WanPipeline

    pipe = tiny.make_pipeline(seed=5)
    pipe.scheduler = FlowMatchLCMScheduler(shift=5.0)
    folder = tmp_path / "lcm"
    pipe.save_pretrained(folder)
    ours = WanPipeline.from_pretrained(folder, device="cpu", dtype="float32")
    assert ours.arch.scheduler == SchedulerConfig(kind="lcm", flow_shift=5.0)
    kw = dict(**GEN, num_inference_steps=4, guidance_scale=1.0)
    video = ours.generate(**kw, seed=3, progress=False)
    theirs = reference_frames(tiny.load_reference(folder), 3, step_noise=True, **kw)
    diff = float(np.abs(video.frames - theirs).max())
    print(f"lcm checkpoint: max abs diff {diff:.2e}")
    assert diff <= FRAME_TOL
    assert ours.check(WanRequest(prompt="a cat")).sampler == "lcm"


@pytest.mark.parametrize("sampler", ["unipc", "euler"])
def test_default_sigmas_given_back_give_the_default_frames(wan_pipe, sampler) -> None:
    """A request whose sigmas equal the default schedule's gives exactly the default frames (also with
    video-to-video strength, which keeps the tail of the list as of the default)."""
    kw = dict(**GEN, num_inference_steps=5, guidance_scale=4.0, seed=2, sampler=sampler, progress=False)
    sigmas = default_sigmas(wan_pipe.arch.scheduler, 5, sampler=sampler)
    default = wan_pipe.generate(**kw).frames
    assert np.array_equal(wan_pipe.generate(**kw, sigmas=sigmas).frames, default)
    if sampler == "euler":  # its float32 schedule sigmas work as well
        ctx = wan_pipe.tokenizer.make_context(WanRequest(prompt="x", num_inference_steps=5, sampler="euler"))
        assert np.array_equal(wan_pipe.generate(**kw, sigmas=ctx.sigmas[:-1]).frames, default)
    clip = (np.random.default_rng(0).random((5, 32, 48, 3)) * 255).astype(np.uint8)
    v2v = dict(kw, video=clip, strength=0.6)
    assert np.array_equal(wan_pipe.generate(**v2v, sigmas=sigmas).frames, wan_pipe.generate(**v2v).frames)


# ---------------------------------------------------------------------------------------------------
# DMD: against a test-only copy of LightX2V's step-distill sampler loop
# ---------------------------------------------------------------------------------------------------


class LightX2VStepDistillScheduler:
    """Test-only copy of LightX2V's ``WanStepDistillScheduler`` (the sampler of its Wan 2.1 / 2.2
    4-step distilled checkpoints and distill LoRAs), with the latent preparation of its base
    ``WanScheduler``:

      ModelTC/LightX2V lightx2v/models/schedulers/wan/step_distill/scheduler.py
        @ 45ea417635d1299dbf0aeb7b2735ec9f9bc76b9b (set_denoising_timesteps, add_noise, step_post)
      ModelTC/LightX2V lightx2v/models/schedulers/wan/scheduler.py
        @ 01ea09e00684b5520e1a937078ff720f0b93d818 (prepare_latents)

    One change, the noise convention: LightX2V re-noises with ``torch.randn_like`` (torch's global
    RNG); here, as in SGLang's DMD stage (sgl-project/sglang python/sglang/multimodal_gen/runtime/
    pipelines_core/stages/denoising_dmd.py @ 7db0aee4aef0ec4acaab4d2da8ea091f229aaa81, which draws it
    with ``generator=batch.generator[0]``), each step's noise continues the seeded generator that drew
    the initial latents.
    """

    def __init__(self, denoising_step_list: list[int], sample_shift: float, seed: int):
        self.denoising_step_list = denoising_step_list
        self.infer_steps = len(self.denoising_step_list)
        self.sample_shift = sample_shift
        self.num_train_timesteps = 1000
        self.sigma_max = 1.0
        self.sigma_min = 0.0
        self.seed = seed

    def prepare_latents(self, latent_shape, dtype=torch.float32):
        self.generator = torch.Generator(device="cpu").manual_seed(self.seed)
        self.latents = torch.randn(
            latent_shape[0],
            latent_shape[1],
            latent_shape[2],
            latent_shape[3],
            dtype=dtype,
            generator=self.generator,
        )

    def set_denoising_timesteps(self):
        sigma_start = self.sigma_min + (self.sigma_max - self.sigma_min)
        self.sigmas = torch.linspace(sigma_start, self.sigma_min, self.num_train_timesteps + 1)[:-1]
        self.sigmas = self.sample_shift * self.sigmas / (1 + (self.sample_shift - 1) * self.sigmas)
        self.timesteps = self.sigmas * self.num_train_timesteps
        self.denoising_step_index = [self.num_train_timesteps - x for x in self.denoising_step_list]
        self.timesteps = self.timesteps[self.denoising_step_index]
        self.sigmas = self.sigmas[self.denoising_step_index]

    def add_noise(self, original_samples, noise, sigma):
        sample = (1 - sigma) * original_samples + sigma * noise
        return sample.type_as(noise)

    def step_post(self):
        flow_pred = self.noise_pred.to(torch.float32)
        sigma = self.sigmas[self.step_index].item()
        noisy_image_or_video = self.latents.to(torch.float32) - sigma * flow_pred
        if self.step_index < self.infer_steps - 1:
            sigma = self.sigmas[self.step_index + 1].item()
            noise = torch.randn(noisy_image_or_video.shape, generator=self.generator)  # was randn_like
            noisy_image_or_video = self.add_noise(
                noisy_image_or_video, noise, self.sigmas[self.step_index + 1].item()
            )
        self.latents = noisy_image_or_video.to(self.latents.dtype)


def lightx2v_frames(ref, prompt: str, latent_shape, step_list: list[int], shift: float, seed: int):
    """LightX2V's loop (step_pre: the timestep; the DiT; step_post) on diffusers' DiT of the tiny
    checkpoint, without guidance as its distilled models run; frames decoded as WanPipeline does."""
    scheduler = LightX2VStepDistillScheduler(step_list, shift, seed)
    scheduler.prepare_latents(latent_shape)
    scheduler.set_denoising_timesteps()
    with torch.no_grad():
        embeds, _ = ref.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=512)
        for step_index in range(scheduler.infer_steps):
            scheduler.step_index = step_index
            timestep = torch.stack([scheduler.timesteps[step_index]])
            scheduler.noise_pred = ref.transformer(
                hidden_states=scheduler.latents[None],
                timestep=timestep,
                encoder_hidden_states=embeds,
                return_dict=False,
            )[0][0]
            scheduler.step_post()
        vae = ref.vae
        z = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1)
        std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1)
        video = vae.decode(scheduler.latents[None] / std + mean, return_dict=False)[0]
    frames = ref.video_processor.postprocess_video(video, output_type="np")[0]
    return np.asarray(frames, dtype=np.float32), scheduler


@pytest.mark.parametrize(("step_list", "shift"), [([1000, 750, 500, 250], 5.0), ([1000, 757, 522], 8.0)])
def test_dmd_matches_the_reference_loop(wan_pipe, reference_pipe, step_list, shift) -> None:
    """sampler="dmd" with the reference's final sigmas (or its timesteps) = LightX2V's loop."""
    seed, prompt = 21, GEN["prompt"]
    shape = wan_pipe.tokenizer.latent_shape(GEN["num_frames"], GEN["height"], GEN["width"])
    theirs, ref_sched = lightx2v_frames(reference_pipe, prompt, shape, step_list, shift, seed)
    kw = dict(**GEN, guidance_scale=1.0, seed=seed, sampler="dmd", progress=False)
    by_sigmas = wan_pipe.generate(**kw, sigmas=ref_sched.sigmas.tolist()).frames
    by_timesteps = wan_pipe.generate(**kw, timesteps=ref_sched.timesteps.tolist()).frames
    for name, ours in (("sigmas", by_sigmas), ("timesteps", by_timesteps)):
        diff = float(np.abs(ours - theirs).max())
        print(f"dmd {step_list} shift {shift} by {name}: max abs diff {diff:.2e}")
        assert diff <= FRAME_TOL
    assert (
        float(
            np.abs(
                by_sigmas - wan_pipe.generate(**{**kw, "seed": 22}, sigmas=ref_sched.sigmas.tolist()).frames
            ).max()
        )
        > 1e-3
    )


def test_step_noise_is_per_row_in_a_batch(wan_pipe) -> None:
    """Rows of one batch draw their step noise from their own seeded generators: a batch of LCM / DMD
    requests gives each row the video it gets alone; different samplers never share a batch."""
    common = dict(height=32, width=32, num_frames=5, guidance_scale=1.0)
    requests = [
        WanRequest(prompt=p, seed=seed, sampler="dmd", timesteps=[1000, 750, 500, 250], **common)
        for p, seed in (("a cat walks", 1), ("a dog runs", 2), ("the lazy dog", 3))
    ]
    together = wan_pipe.generate_batch(requests, progress=False)
    for request, video in zip(requests, together):
        alone = wan_pipe.generate_batch([request], progress=False)[0]
        assert float(np.abs(video.frames - alone.frames).max()) <= 1e-4
    # a row cancelled mid-batch: the others keep their own generators (StepNoise.select)
    steps_done: list[int] = []
    contexts = [wan_pipe.tokenizer.make_context(r) for r in requests]
    frames, _ = wan_pipe.run_contexts(
        contexts,
        lambda i, n, t: steps_done.append(i),
        progress=False,
        cancelled_rows=lambda: {0} if len(steps_done) >= 2 else set(),
    )
    assert frames[0] is None
    for i in (1, 2):
        assert float(np.abs(frames[i] - together[i].frames).max()) <= 1e-4
    tokenizer = wan_pipe.tokenizer
    lcm = tokenizer.make_context(
        WanRequest(prompt="a", seed=1, sampler="lcm", num_inference_steps=3, **common)
    )
    dmd = tokenizer.make_context(
        WanRequest(prompt="a", seed=1, sampler="dmd", num_inference_steps=3, **common)
    )
    assert lcm.schedule.step_coefficients.tobytes() == dmd.schedule.step_coefficients.tobytes()
    assert lcm.batch_key != dmd.batch_key
    assert lcm.noise_state is not None and np.array_equal(lcm.noise_state, dmd.noise_state)
    euler = tokenizer.make_context(
        WanRequest(prompt="a", seed=1, sampler="euler", num_inference_steps=3, **common)
    )
    assert euler.noise_state is None
    with pytest.raises(ValueError, match="must share"):
        wan_pipe.executor.prepare_inputs([lcm, dmd])


# ---------------------------------------------------------------------------------------------------
# Interfaces: Python, CLI, server
# ---------------------------------------------------------------------------------------------------


def test_sampler_names_agree_everywhere() -> None:
    from wanpipe.arguments import SAMPLER_NAMES
    from wanpipe.serving import scalars

    assert SAMPLER_NAMES == SAMPLERS == scalars.SAMPLERS


def test_cli_takes_sampler_and_lists(tiny_ckpt, tmp_path, capsys) -> None:
    from wanpipe.cli import build_parser, main

    args = build_parser().parse_args(
        [
            "generate",
            "--prompt",
            "a",
            "--sampler",
            "dmd",
            "--sigmas",
            "0.9, 0.6,0.3",
            "--timesteps",
            "1000,750",
        ]
    )
    assert (args.sampler, args.sigmas, args.timesteps) == ("dmd", [0.9, 0.6, 0.3], [1000.0, 750.0])
    out = tmp_path / "v.mp4"
    argv = ["generate", "--model", str(tiny_ckpt), "--prompt", "a cat", "--height", "32", "--width", "32"]
    argv += ["--num-frames", "5", "--sampler", "dmd", "--timesteps", "1000,750,500", "--output", str(out)]
    assert main([*argv, "--no-progress", "--seed", "4"]) == 0, capsys.readouterr().err
    assert out.is_file() and out.stat().st_size > 0


SERVE_LIMITS_STEPS = 8
SMALL_JOB = {"prompt": "a cat", "size": "32x32", "num_frames": 5}


@pytest.fixture(scope="module")
def http(wan_pipe, tmp_path_factory):
    import httpx

    from tests.serving_helpers import ThreadServer
    from wanpipe.serving.app import create_app
    from wanpipe.serving.manager import JobManager
    from wanpipe.serving.parsing import ServeLimits
    from wanpipe.serving.store import JobStore

    store = JobStore(tmp_path_factory.mktemp("serve-samplers") / "out")
    limits = ServeLimits(
        max_queue=10, max_batch=4, max_pixels=64 * 64, max_frames=17, max_steps=SERVE_LIMITS_STEPS
    )
    manager = JobManager(store, lambda: wan_pipe, model_name="wan-tiny", limits=limits)
    with ThreadServer(create_app(manager)) as srv:
        assert manager.wait_ready(60)
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            yield client


VIDEO_SCHEDULE_ERRORS = [
    # (extra body fields, param, code)
    (dict(sampler="ddim"), "sampler", "invalid_value"),
    (dict(sampler=3), "sampler", "invalid_value"),
    (dict(sigmas=[0.5, 0.9]), "sigmas", "invalid_value"),  # not decreasing
    (dict(sigmas=[1.5, 0.5]), "sigmas", "invalid_value"),  # out of range
    (dict(sigmas="0.9,abc"), "sigmas", "invalid_value"),
    (dict(sigmas=[]), "sigmas", "invalid_value"),
    (dict(sigmas=[True]), "sigmas", "invalid_value"),
    (dict(sigmas={"a": 1}), "sigmas", "invalid_value"),
    (dict(sigmas=[0.9, 0.5], num_inference_steps=3), "sigmas", "invalid_value"),
    (dict(timesteps=[1200, 500]), "timesteps", "invalid_value"),
    (dict(timesteps="0,"), "timesteps", "invalid_value"),
    (dict(sigmas=[0.9], timesteps=[900]), "timesteps", "invalid_value"),
    (dict(timesteps=list(range(1000, 0, -100))), "num_inference_steps", "limit_exceeded"),
]


@pytest.mark.parametrize(("extra", "param", "code"), VIDEO_SCHEDULE_ERRORS)
def test_bad_schedule_http_requests(http, extra, param, code) -> None:
    from tests.serving_helpers import assert_error

    assert_error(http.post("/v1/videos", json={**SMALL_JOB, **extra}), 400, param, code)
    if param in extra and isinstance(extra[param], list | str) and code == "invalid_value":
        renamed = {"steps" if k == "num_inference_steps" else k: v for k, v in extra.items()}
        video = {"height": 32, "width": 32, "num_frames": 5, **renamed}
        body = {"input": "a cat", "provider_options": {"video": video}}
        assert_error(http.post("/v1/responses", json=body), 400, f"provider_options.video.{param}", code)


def test_schedule_http_requests_run_and_are_reported(http) -> None:
    """JSON lists, form text lists: the job runs with them and reports them (and the step count)."""
    from tests.serving_helpers import assert_error, wait_until
    from wanpipe.serving.parsing import JobSpec

    response = http.post("/v1/videos", json={**SMALL_JOB, "sampler": "dmd", "timesteps": [1000, 750, 500]})
    assert response.status_code == 200, response.text
    params = response.json()["parameters"]
    assert (params["sampler"], params["timesteps"], params["sigmas"]) == ("dmd", [1000, 750, 500], None)
    assert params["num_inference_steps"] == 3
    form = {"prompt": "a cat", "size": "32x32", "num_frames": "5", "sampler": "lcm", "sigmas": "0.9, 0.5"}
    formed = http.post("/v1/videos", data=form)
    assert formed.status_code == 200, formed.text
    assert formed.json()["parameters"]["sigmas"] == [0.9, 0.5]
    assert_error(http.post("/v1/videos", data={**form, "sigmas": "0.9;0.5"}), 400, "sigmas", "invalid_value")
    plain = http.post("/v1/videos", json={**SMALL_JOB, "num_inference_steps": 2}).json()["parameters"]
    assert plain["sampler"] == "unipc" and plain["sigmas"] is None  # the checkpoint's, resolved
    for video_id in (response.json()["id"], formed.json()["id"]):

        def done(video_id=video_id):
            body = http.get(f"/v1/videos/{video_id}").json()
            return body if body["status"] in ("completed", "failed") else None

        assert wait_until(done, 60, "the video")["status"] == "completed"
    spec = JobSpec(prompt="a", sampler="dmd", sigmas=(0.9, 0.5))
    assert JobSpec.from_json(spec.to_json()) == spec  # the job store's round trip
    options = {"height": 32, "width": 32, "num_frames": 5, "sampler": "euler", "sigmas": [0.9, 0.5]}
    answer = http.post("/v1/responses", json={"input": "a cat", "provider_options": {"video": options}})
    assert answer.status_code == 200, answer.text


# ---------------------------------------------------------------------------------------------------
# CUDA (run where a GPU is lent)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("sampler", ["lcm", "dmd"])
def test_cuda_step_noise_matches_cpu_without_host_syncs(sampler) -> None:
    """The fresh noise is drawn on the host from the seeded generators and copied without a host sync;
    the trajectory equals the CPU one."""
    from wanpipe.schedulers import StepNoise, generator_state, seeded_generator

    schedule = make_schedule(SchedulerConfig(kind="euler", flow_shift=5.0), 6, sampler=sampler)
    gens = [seeded_generator(s) for s in (3, 4)]
    x = torch.stack([torch.randn(4, 3, 8, 8, generator=g) for g in gens])
    states = [generator_state(g) for g in gens]

    def run(x: torch.Tensor, device: str) -> torch.Tensor:
        noise, state = StepNoise.from_states(states, device), new_state()
        for i in range(schedule.num_inference_steps):
            fresh = noise.draw(x.shape[1:]) if schedule.needs_noise(i) else None
            v = (torch.tanh(x.float()) - 0.5 * x.float()).to(torch.bfloat16)
            x = step(schedule, state, i, v, x, fresh)
        return x

    expected = run(x, "cpu")
    x_cuda = x.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = run(x_cuda, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.device.type == "cuda" and out.dtype == expected.dtype
    torch.testing.assert_close(out.cpu().float(), expected.float(), rtol=0, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("sampler", ["lcm", "dmd", "euler"])
def test_cuda_fp32_samplers_match_cpu(tiny_ckpt, wan_pipe, sampler) -> None:
    from wanpipe import WanPipeline

    gpu = WanPipeline.from_pretrained(tiny_ckpt, device="cuda", dtype="float32")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    kw = dict(
        **GEN, guidance_scale=3.0, seed=4, sampler=sampler, timesteps=[1000, 750, 500, 250], progress=False
    )
    diff = float(np.abs(gpu.generate(**kw).frames - wan_pipe.generate(**kw).frames).max())
    print(f"cuda vs cpu, {sampler}: max abs diff {diff:.2e}")
    assert diff <= 1e-3, diff
