"""Presets for the published few-step Wan weights (wanpipe.presets, docs/fast-sampling.md).

* each preset on a tiny checkpoint of a kind it fits makes the same frames as the same values given
  explicitly, runs the DiT on one row per step (guidance 1: no unconditional branch), and the Euler
  presets match the published step-list loops (LightX2V's ``WanStepDistillScheduler``, Wan2.2-Lightning's
  ``EulerScheduler``, Kijai's ``flowmatch_causvid``) run test-side inside diffusers' own pipeline;
* explicit values override a preset, its schedule as one unit;
* an unknown preset and a preset on the wrong kind of checkpoint are refused, naming ``preset``: from
  Python, the command line (one line, exit 2) and HTTP (400 with ``param``);
* ``wanpipe generate --preset list`` prints the table without loading a model; ``GET /v1/models`` lists them.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch

from tests import tiny_family
from tests.serving_helpers import ThreadServer, assert_error
from wanpipe import InvalidRequestError, WanPipeline, WanRequest
from wanpipe.presets import PRESETS, SCHEDULE_FIELDS, apply_preset, format_presets, shifted_timesteps

FRAME_TOL = 1e-3
SMALL = dict(prompt="a red fox runs through snow", height=32, width=32, num_frames=5, seed=7)


# -- tiny checkpoints of the kinds the presets fit ------------------------------------------------------
@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    """Wan 2.2 T2V-A14B (two experts, boundary 0.875): (our pipeline, diffusers' pipeline)."""
    folder = tmp_path_factory.mktemp("a14b") / "ckpt"
    ref = tiny_family.t2v_a14b(folder)
    return WanPipeline.from_pretrained(folder, device="cpu", dtype="float32"), ref


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory):
    """Wan 2.2 TI2V-5B (48-channel VAE, one expert): our pipeline."""
    folder = tmp_path_factory.mktemp("ti2v") / "ckpt"
    tiny_family.ti2v_5b(folder)
    return WanPipeline.from_pretrained(folder, device="cpu", dtype="float32")


def frames(pipe: WanPipeline, **kw) -> np.ndarray:
    return pipe.generate_batch([WanRequest(**kw)], progress=False)[0].frames


def explicit(name: str) -> dict:
    """The values a preset sets, given as explicit request fields instead."""
    return PRESETS[name].request_values()


# -- the presets as data ---------------------------------------------------------------------------------
def test_the_table() -> None:
    assert list(PRESETS) == ["lightx2v-4step", "lightning-a14b", "fastwan", "causvid"]
    # LightX2V / Lightning: the step list (1000, 750, 500, 250) with sample_shift 5, already shifted
    assert PRESETS["lightx2v-4step"].timesteps == pytest.approx((1000.0, 937.5, 2500 / 3, 625.0))
    assert shifted_timesteps((1000, 750, 500, 250), 1.0) == (1000.0, 750.0, 500.0, 250.0)
    assert PRESETS["lightning-a14b"].guidance_scale_2 == 1.0
    assert PRESETS["fastwan"].sampler == "dmd" and PRESETS["fastwan"].timesteps == (1000.0, 757.0, 522.0)
    for preset in PRESETS.values():
        assert preset.guidance_scale <= 1.0  # CFG-distilled: no unconditional branch
        assert preset.sources and preset.weights and preset.fits
        assert preset.name == preset.name.lower() and " " not in preset.name
    with pytest.raises(ValueError, match="timesteps for"):
        type(PRESETS["fastwan"])(
            name="x", summary="", kinds=(("t2v", 1),), num_inference_steps=2, sampler="euler",
            timesteps=(1000.0,), guidance_scale=1.0,
        )  # fmt: skip


# -- a preset = the same values given explicitly ---------------------------------------------------------
@pytest.mark.parametrize("name", ["lightx2v-4step", "causvid"])
def test_a_wan21_preset_is_its_explicit_values(wan_pipe, dit_rows, name) -> None:
    resolved = wan_pipe.check(WanRequest(**SMALL, preset=name))
    values = explicit(name)
    for field, value in values.items():
        assert getattr(resolved, field) == (pytest.approx(value) if field == "timesteps" else value), field
    dit_rows.clear()
    ours = frames(wan_pipe, **SMALL, preset=name)
    rows = list(dit_rows)
    dit_rows.clear()
    same = frames(wan_pipe, **SMALL, **values)
    diff = float(np.abs(ours - same).max())
    print(f"{name}: preset vs explicit values, worst diff {diff:.3g}")
    assert diff == 0.0
    # guidance 1: one DiT row per step, no unconditional branch
    assert rows == [1] * PRESETS[name].num_inference_steps == list(dit_rows)


def test_lightning_on_a14b_is_its_explicit_values(a14b) -> None:
    pipe, _ = a14b
    resolved = pipe.check(WanRequest(**SMALL, preset="lightning-a14b"))
    assert (resolved.guidance_scale, resolved.guidance_scale_2, resolved.num_inference_steps) == (1.0, 1.0, 4)
    rows: list[tuple[int, str]] = []
    runner, forward = pipe.executor.runner, pipe.executor.runner.forward

    def counted(dit, latents, *args, **kwargs):
        rows.append((latents.shape[0], "high" if dit is pipe.executor.experts.get("high") else "low"))
        return forward(dit, latents, *args, **kwargs)

    runner.forward = counted
    try:
        ours = frames(pipe, **SMALL, preset="lightning-a14b")
    finally:
        del runner.forward
    same = frames(pipe, **SMALL, **explicit("lightning-a14b"))
    print(f"lightning-a14b: preset vs explicit values, worst diff {np.abs(ours - same).max():.3g}")
    assert np.array_equal(ours, same)
    # 937.5 >= 875 > 833.3: two high-noise steps, then two low-noise ones, one row each (guidance 1 on both)
    assert rows == [(1, "high"), (1, "high"), (1, "low"), (1, "low")]


def test_fastwan_on_ti2v_is_its_explicit_values(ti2v) -> None:
    resolved = ti2v.check(WanRequest(**SMALL, preset="fastwan"))
    assert (resolved.sampler, resolved.timesteps, resolved.guidance_scale) == ("dmd", [1000, 757, 522], 1.0)
    ours = frames(ti2v, **SMALL, preset="fastwan")
    same = frames(ti2v, **SMALL, **explicit("fastwan"))
    print(f"fastwan: preset vs explicit values, worst diff {np.abs(ours - same).max():.3g}")
    assert np.array_equal(ours, same)


# -- the Euler presets against the published step-list loops -------------------------------------------
class StepListEuler:
    """A published few-step loop in the scheduler interface diffusers' WanPipeline calls: Euler
    ``x + (sigma_next - sigma) * v`` over fixed sigmas, the last step to 0 (LightX2V's
    ``WanStepDistillScheduler.step_post``, Wan2.2-Lightning's ``EulerScheduler.step``, DiffSynth's
    ``FlowMatchScheduler.step`` under Kijai's ``flowmatch_causvid``). Timesteps are sigma * 1000."""

    order = 1
    config = SimpleNamespace(num_train_timesteps=1000)

    def __init__(self, sigmas: torch.Tensor):
        self.sigmas = sigmas.to(torch.float32)
        self.timesteps = self.sigmas * 1000
        self.index = 0

    @classmethod
    def lightx2v(cls, step_list: list[int], shift: float) -> StepListEuler:
        """``WanStepDistillScheduler.set_denoising_timesteps``: the shifted 1000-point grid
        ``linspace(1, 0, 1001)[:-1]`` picked at ``1000 - t``."""
        grid = torch.linspace(1.0, 0.0, 1001)[:-1]
        grid = shift * grid / (1 + (shift - 1) * grid)
        return cls(grid[[1000 - t for t in step_list]])

    @classmethod
    def lightning(cls, steps: int, shift: float) -> StepListEuler:
        """Wan2.2-Lightning's ``EulerScheduler``: ``linspace(1000, 0, N + 1)`` / 1000, shifted, less the 0."""
        sigmas = torch.from_numpy(np.linspace(1000, 0, steps + 1, dtype=np.float32)) / 1000
        return cls((shift * sigmas / (1 + (shift - 1) * sigmas))[:-1])

    @classmethod
    def causvid(cls, steps: int) -> StepListEuler:
        """Kijai's ``flowmatch_causvid`` (14B list): the first ``steps`` timesteps, sigma = t / 1000."""
        return cls(torch.tensor([999, 934, 862, 756, 603, 410, 250, 140, 74][:steps]) / 1000)

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        assert num_inference_steps == len(self.sigmas)
        self.index = 0

    def set_begin_index(self, begin_index: int = 0) -> None:
        self.index = begin_index

    def step(self, model_output, timestep, sample, return_dict=False):
        sigma = float(self.sigmas[self.index])
        last = self.index == len(self.sigmas) - 1
        sigma_next = 0.0 if last else float(self.sigmas[self.index + 1])
        x0 = sample.float() - sigma * model_output.float()  # LightX2V: x0, then + v * sigma_next
        self.index += 1
        return ((x0 + sigma_next * model_output.float()).to(sample.dtype),)


def with_scheduler(ref, scheduler):
    """A diffusers pipeline of ``ref``'s class over its components, with ``scheduler`` instead of its own."""
    extra = {k: ref.config[k] for k in ("boundary_ratio", "expand_timesteps") if k in ref.config}
    pipe = type(ref)(**{**ref.components, "scheduler": scheduler}, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_frames(ref, scheduler, **kw) -> np.ndarray:
    steps, seed = len(scheduler.sigmas), kw.pop("seed")
    pipe = with_scheduler(ref, scheduler)
    out = pipe(
        **kw,
        num_inference_steps=steps,
        guidance_scale=1.0,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
    ).frames[0]
    return np.asarray(out, dtype=np.float32)


@pytest.mark.parametrize(
    ("name", "scheduler"),
    [
        ("lightx2v-4step", StepListEuler.lightx2v([1000, 750, 500, 250], 5.0)),
        ("causvid", StepListEuler.causvid(9)),
    ],
    ids=["lightx2v-4step", "causvid"],
)
def test_wan21_presets_match_the_published_loops(wan_pipe, reference_pipe, name, scheduler) -> None:
    ours = frames(wan_pipe, **SMALL, preset=name)
    ref = reference_frames(reference_pipe, scheduler, **SMALL)
    diff = float(np.abs(ours - ref).max())
    print(f"{name} vs the published loop in diffusers: worst diff {diff:.3g}")
    assert diff < FRAME_TOL


def test_lightning_matches_wan22_lightning_on_both_experts(a14b) -> None:
    pipe, ref = a14b
    scheduler = StepListEuler.lightning(4, 5.0)
    assert scheduler.timesteps.tolist() == pytest.approx(list(PRESETS["lightning-a14b"].timesteps), abs=1e-3)
    ours = frames(pipe, **SMALL, preset="lightning-a14b")
    reference = reference_frames(ref, scheduler, **SMALL, guidance_scale_2=1.0)
    diff = float(np.abs(ours - reference).max())
    print(f"lightning-a14b vs Wan2.2-Lightning's Euler in diffusers (boundary 0.875): worst diff {diff:.3g}")
    assert diff < FRAME_TOL


# -- explicit values win ---------------------------------------------------------------------------------
def test_explicit_values_override_the_preset(wan_pipe) -> None:
    resolve = wan_pipe.tokenizer.resolve
    # a value of its own: the rest from the preset
    r = resolve(WanRequest(**SMALL, preset="lightx2v-4step", guidance_scale=3.0, flow_shift=2.0))
    assert (r.guidance_scale, r.flow_shift, r.sampler, r.num_inference_steps) == (3.0, 2.0, "euler", 4)
    assert r.timesteps == pytest.approx(list(PRESETS["lightx2v-4step"].timesteps))
    # a schedule of its own (steps, sigmas or timesteps): none of the preset's schedule, the rest fills
    for own, steps in (
        (dict(num_inference_steps=6), 6),
        (dict(sigmas=[0.9, 0.6, 0.3]), 3),
        (dict(timesteps=[900.0, 400.0]), 2),
    ):
        r = resolve(WanRequest(**SMALL, preset="lightx2v-4step", **own))
        assert r.num_inference_steps == steps
        assert r.timesteps == own.get("timesteps") and r.sigmas == own.get("sigmas")
        assert (r.sampler, r.flow_shift, r.guidance_scale) == ("euler", 5.0, 1.0)
    assert set(SCHEDULE_FIELDS) == {"num_inference_steps", "sigmas", "timesteps"}
    # an explicit sampler wins too; resolving twice (or applying twice) changes nothing
    r = resolve(WanRequest(**SMALL, preset="causvid", sampler="unipc"))
    assert r.sampler == "unipc" and r.num_inference_steps == 9
    assert resolve(r) == r and apply_preset(r, wan_pipe.arch) == r
    # and the frames are those of the same explicit values
    own = dict(guidance_scale=2.0, num_inference_steps=3)
    ours = frames(wan_pipe, **SMALL, preset="lightx2v-4step", **own)
    same = frames(wan_pipe, **SMALL, **own, sampler="euler", flow_shift=5.0)
    assert np.array_equal(ours, same)
    assert not np.array_equal(ours, frames(wan_pipe, **SMALL, preset="lightx2v-4step"))


def test_guidance_above_one_with_a_preset_runs_both_branches(wan_pipe, dit_rows) -> None:
    frames(wan_pipe, **SMALL, preset="lightx2v-4step", guidance_scale=1.0)
    assert dit_rows == [1, 1, 1, 1]
    dit_rows.clear()
    frames(wan_pipe, **SMALL, preset="lightx2v-4step", guidance_scale=1.5)
    assert dit_rows == [2, 2, 2, 2]  # cond and uncond rows in one batch


# -- refusals --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("preset", "message"),
    [
        (
            "turbo",
            r"unknown preset 'turbo'; the presets are: lightx2v-4step, lightning-a14b, fastwan, causvid",
        ),
        (3, r"unknown preset 3"),
        ("fastwan", r"preset 'fastwan' is for Wan 2\.2 TI2V-5B checkpoints; this one is wan2\.1-t2v-1\.3b"),
        ("lightning-a14b", r"is for Wan 2\.2 T2V-A14B or Wan 2\.2 I2V-A14B .*use lightx2v-4step, causvid"),
    ],
)
def test_unknown_or_wrong_kind_preset_is_refused(wan_pipe, preset, message) -> None:
    for validate in (wan_pipe.tokenizer.resolve, wan_pipe.check, wan_pipe.tokenizer.make_context):
        with pytest.raises(InvalidRequestError, match=message) as info:
            validate(WanRequest(**SMALL, preset=preset))
        assert info.value.param == "preset"
    with pytest.raises(InvalidRequestError, match=message):
        wan_pipe.generate(**SMALL, preset=preset, progress=False)


def test_wrong_kind_on_the_other_checkpoints(a14b, ti2v) -> None:
    pipe, _ = a14b
    with pytest.raises(
        InvalidRequestError, match=r"'lightx2v-4step' is for Wan 2\.1 T2V or Wan 2\.1 I2V"
    ) as e:
        pipe.check(WanRequest(**SMALL, preset="lightx2v-4step"))
    assert e.value.param == "preset" and "use lightning-a14b" in str(e.value)
    with pytest.raises(
        InvalidRequestError, match=r"this one is wan2\.2-ti2v-5b \(Wan 2\.2 TI2V-5B\): use fastwan"
    ):
        ti2v.check(WanRequest(**SMALL, preset="causvid"))


# -- the command line ------------------------------------------------------------------------------------
def test_preset_list_prints_the_table_without_a_model(monkeypatch, capsys) -> None:
    from wanpipe.cli import main

    def no_loading(*args, **kwargs):
        raise AssertionError("--preset list loaded a model")

    monkeypatch.setattr(WanPipeline, "from_pretrained", no_loading)
    with pytest.raises(SystemExit) as info:
        main(["generate", "--preset", "list"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.strip() == format_presets().strip()
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["preset", "fits", "steps", "sampler"]
    for name, preset in PRESETS.items():
        row = next(line for line in lines if line.startswith(name + " "))
        assert f" {preset.num_inference_steps} " in row and f" {preset.sampler} " in row, row
        assert preset.weights[0] in out
    assert "1000,937.5,833.333,625" in out and "999,934,862,756,603,410,250,140,74" in out
    assert "not measured" in out


def test_cli_generates_with_a_preset(tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    from wanpipe.cli import main

    out = tmp_path / "fox.mp4"
    argv = [
        "generate",
        "--model",
        str(tiny_ckpt),
        "--prompt",
        SMALL["prompt"],
        "--height",
        "32",
        "--width",
        "32",
    ]
    argv += ["--num-frames", "5", "--seed", "7", "--preset", "lightx2v-4step", "--output", str(out)]
    assert main([*argv, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and "seed 7" in printed


# -- HTTP ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def http(wan_pipe, tmp_path_factory):
    from wanpipe.serving.app import create_app
    from wanpipe.serving.manager import JobManager
    from wanpipe.serving.parsing import ServeLimits
    from wanpipe.serving.store import JobStore

    store = JobStore(tmp_path_factory.mktemp("presets-serve") / "out")
    limits = ServeLimits(max_queue=4, max_batch=2, max_pixels=64 * 64, max_frames=9, max_steps=8)
    manager = JobManager(store, lambda: wan_pipe, model_name="wan-tiny", limits=limits)
    with ThreadServer(create_app(manager, api_key=None)) as server:
        assert manager.wait_ready(60)
        with httpx.Client(base_url=server.url, timeout=60) as client:
            yield client


def test_models_lists_the_presets(http) -> None:
    card = http.get("/v1/models").json()["data"][0]
    presets = {p["name"]: p for p in card["presets"]}
    assert list(presets) == list(PRESETS)
    assert {name for name, p in presets.items() if p["fits_model"]} == {"lightx2v-4step", "causvid"}
    assert presets["fastwan"]["fits"] == ["Wan 2.2 TI2V-5B"]
    assert presets["lightning-a14b"]["fits"] == ["Wan 2.2 T2V-A14B", "Wan 2.2 I2V-A14B"]
    assert presets["lightning-a14b"]["guidance_scale_2"] == 1.0
    assert presets["lightx2v-4step"]["timesteps"] == [1000.0, 937.5, 833.3333, 625.0]
    assert all(p["sources"] and p["weights"] for p in presets.values())


BODY = {"prompt": "a cat", "size": "32x32", "num_frames": 5, "seed": 3}


@pytest.mark.parametrize(
    ("preset", "code"),
    [
        ("turbo", "invalid_value"),
        ("fastwan", "invalid_value"),
        ("lightning-a14b", "invalid_value"),
        (7, None),
    ],
)
def test_http_refuses_unknown_and_wrong_kind_presets(http, preset, code) -> None:
    error = assert_error(http.post("/v1/videos", json={**BODY, "preset": preset}), 400, "preset", code)
    assert "preset" in error["message"]
    options = {"steps": 2, "preset": preset}
    body = {
        "input": "a cat",
        "provider_options": {"video": {"height": 32, "width": 32, "num_frames": 5, **options}},
    }
    assert_error(http.post("/v1/responses", json=body), 400, "provider_options.video.preset", code)
    form = {k: str(v) for k, v in {**BODY, "preset": preset}.items()}
    assert_error(http.post("/v1/videos", data=form), 400, "preset", code)


def test_http_preset_job_runs_the_preset(http, wan_pipe, monkeypatch) -> None:
    """The worker makes its context from the stored (resolved) job: the preset's schedule, sampler and
    guidance, as the same request in Python gets them."""
    from tests.serving_helpers import wait_until

    made = []
    make_context = wan_pipe.tokenizer.make_context

    def spy(request):
        made.append(make_context(request))
        return made[-1]

    monkeypatch.setattr(wan_pipe.tokenizer, "make_context", spy)
    created = http.post("/v1/videos", json={**BODY, "preset": "lightx2v-4step"}).json()
    parameters = created["parameters"]
    assert (parameters["preset"], parameters["num_inference_steps"], parameters["guidance_scale"]) == (
        "lightx2v-4step",
        4,
        1.0,
    )

    def done():
        body = http.get(f"/v1/videos/{created['id']}").json()
        return body if body["status"] in ("completed", "failed") else None

    assert wait_until(done, 60, "the preset job")["status"] == "completed"
    served = made[-1]
    direct = make_context(
        WanRequest(prompt="a cat", height=32, width=32, num_frames=5, seed=3, preset="lightx2v-4step")
    )
    assert served.num_inference_steps == direct.num_inference_steps == 4
    assert served.guidance_scale == direct.guidance_scale == 1.0 and served.negative_tokens is None
    np.testing.assert_array_equal(served.timesteps, direct.timesteps)
    np.testing.assert_array_equal(served.sigmas, direct.sigmas)
    assert served.schedule.kind == direct.schedule.kind


# -- a distill LoRA in the published key format, loaded both ways --------------------------------------
def lightx2v_style_lora(model: torch.nn.Module, path: Path, rank: int = 4) -> Path:
    """A random adapter in the key layout of lightx2v's Wan 2.1 distill LoRAs as diffusers'
    ``_convert_non_diffusers_wan_lora_to_diffusers`` reads it: ``diffusion_model.`` names; every block
    linear with ``lora_down`` / ``lora_up`` / ``alpha`` and a ``diff_b`` bias delta; the head, text and
    time embeddings and ``time_projection.1`` with ``lora_down`` / ``lora_up`` / ``diff_b`` (no alpha);
    the norms' ``.diff`` (zero, as diffusers' converter notes they are: it drops them)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(11)
    state: dict[str, torch.Tensor] = {}

    def low_rank(layer: str, alpha: float | None) -> None:
        out_features, in_features = model.get_submodule(layer).weight.shape
        state[f"diffusion_model.{layer}.lora_down.weight"] = torch.randn(rank, in_features, generator=g) * 0.3
        state[f"diffusion_model.{layer}.lora_up.weight"] = torch.randn(out_features, rank, generator=g) * 0.3
        state[f"diffusion_model.{layer}.diff_b"] = torch.randn(out_features, generator=g) * 0.1
        if alpha is not None:
            state[f"diffusion_model.{layer}.alpha"] = torch.tensor(alpha)

    linears = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o")
    linears += ("cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
    norms = ("self_attn.norm_q", "self_attn.norm_k", "cross_attn.norm_q", "cross_attn.norm_k", "norm3")
    for i in range(len(model.blocks)):
        for layer in linears:
            low_rank(f"blocks.{i}.{layer}", alpha=2.0 * rank)
        for norm in norms:
            state[f"diffusion_model.blocks.{i}.{norm}.diff"] = torch.zeros_like(
                model.get_submodule(f"blocks.{i}.{norm}").weight
            )
    for layer in (
        "head.head",
        "text_embedding.0",
        "text_embedding.2",
        "time_embedding.0",
        "time_embedding.2",
    ):
        low_rank(layer, alpha=None)
    low_rank("time_projection.1", alpha=None)
    save_file(state, str(path))
    return path


def test_a_distill_lora_loads_like_diffusers_under_the_preset(tiny_ckpt: Path, tmp_path: Path) -> None:
    from tests import tiny

    ours = WanPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="float32")
    ref = tiny.load_reference(tiny_ckpt)
    lora = lightx2v_style_lora(
        ours.executor.transformer, tmp_path / "wan2.1_t2v_lora_lightx2v_4step.safetensors"
    )
    base = frames(ours, **SMALL, preset="lightx2v-4step")
    report = ours.load_lora(lora, 1.0, strict=True)
    blocks = len(ours.executor.transformer.blocks)
    assert not report.unmatched and len(report.layers) == blocks * (10 + 5) + 6
    ref.load_lora_weights(str(lora))
    with_lora = frames(ours, **SMALL, preset="lightx2v-4step")
    theirs = reference_frames(ref, StepListEuler.lightx2v([1000, 750, 500, 250], 5.0), **SMALL)
    diff = float(np.abs(with_lora - theirs).max())
    print(
        f"lightx2v-format distill LoRA + lightx2v-4step vs diffusers load_lora_weights: worst diff {diff:.3g}"
    )
    assert diff < FRAME_TOL
    assert float(np.abs(with_lora - base).max()) > 1e-2  # the adapter changed the video
