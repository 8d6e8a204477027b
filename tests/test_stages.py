"""The per-row pieces of the denoising loop cut to a subset of the batch (a row cancelled mid-batch):
each answers for the kept rows exactly what it answered for them in the whole batch."""

from __future__ import annotations

import torch

from wanpipe.runtime.step_cache import FirstBlockCache, TeaCache
from wanpipe.schedulers.common import SolverState
from wanpipe.stages.conditioning import CleanFirstFrame, ImageConcat, TextToVideo
from wanpipe.stages.denoise import Guidance
from wanpipe.stages.text import TextContext

KEEP = [0, 2]


def _rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


def test_conditioning_objects_cut_their_rows() -> None:
    latents = _rand(3, 4, 2, 4, 4)
    t = torch.tensor(500.0)
    objects = [
        TextToVideo(),
        ImageConcat(condition=_rand(3, 8, 2, 4, 4), image_embeds=_rand(3, 5, 6)),
        ImageConcat(condition=_rand(3, 8, 2, 4, 4), image_embeds=None),
        CleanFirstFrame(latents, _rand(3, 4, 1, 4, 4), (1, 2, 2)),
        CleanFirstFrame(latents, None, (1, 2, 2)),
    ]
    for whole in objects:
        whole.dit_kwargs(True)  # the guided image tokens are made (and must not leak into the cut)
        part = whole.select(KEEP)
        assert type(part) is type(whole)
        assert torch.equal(part.model_input(latents[KEEP]), whole.model_input(latents)[KEEP])
        assert torch.equal(part.finish(latents[KEEP]), whole.finish(latents)[KEEP])
        assert torch.equal(part.timestep(t, 2), whole.timestep(t, 3)[:2])
        for guided in (False, True):
            got, full = part.dit_kwargs(guided)["image_embeds"], whole.dit_kwargs(guided)["image_embeds"]
            if full is None:
                assert got is None
                continue
            want = full[KEEP] if not guided else torch.cat([full[:3][KEEP], full[3:][KEEP]])
            assert torch.equal(got, want)


def test_text_guidance_and_solver_memory_cut_their_rows() -> None:
    embeds, bias = _rand(6, 7, 8), _rand(6, 7)
    text = TextContext(embeds, bias, batch=3).select(KEEP)
    assert text.batch == 2 and text.guided
    assert torch.equal(text.embeds, embeds[[0, 2, 3, 5]]) and torch.equal(text.bias, bias[[0, 2, 3, 5]])
    assert torch.equal(text.rows(False)[0], embeds[KEEP])
    unguided = TextContext(embeds[:3], None, batch=3).select(KEEP)
    assert not unguided.guided and torch.equal(unguided.embeds, embeds[KEEP]) and unguided.bias is None

    do_cfg = torch.tensor([True, False, True]).view(-1, 1, 1, 1, 1)
    guidance = Guidance(do_cfg, {"high": torch.tensor([5.0, 1.0, 2.0]).view(-1, 1, 1, 1, 1)}, steps=4)
    pred = _rand(6, 2, 1, 2, 2)
    part = guidance.select(KEEP)
    assert torch.equal(
        part.combine(torch.cat([pred[:3][KEEP], pred[3:][KEEP]]), 2, "high"),
        guidance.combine(pred, 3, "high")[KEEP],
    )

    state = SolverState(step_index=3, last_sample=_rand(3, 2), x0_history=(_rand(3, 4), _rand(3, 5)))
    cut = state.select(KEEP)
    assert cut.step_index == 3 and torch.equal(cut.last_sample, state.last_sample[KEEP])
    assert all(torch.equal(a, b[KEEP]) for a, b in zip(cut.x0_history, state.x0_history, strict=True))


def test_step_caches_cut_their_rows() -> None:
    first = FirstBlockCache(0.1)
    first.store("cond", _rand(3, 4, 8), _rand(3, 4, 9))
    first.store("uncond", _rand(3, 4, 10), _rand(3, 4, 11))
    before = {k: v.clone() for k, v in first.residuals.items()}
    first_before = {k: v.clone() for k, v in first.first_residuals.items()}
    first.select(KEEP)
    for s in ("cond", "uncond"):
        assert torch.equal(first.residuals[s], before[s][KEEP])
        assert torch.equal(first.first_residuals[s], first_before[s][KEEP])
    tea = TeaCache(0.2, (1.0, 0.0))
    tea.residuals["cond"] = _rand(3, 4, 8)
    tea.previous = _rand(3, 12)
    previous = tea.previous.clone()
    tea.select(KEEP)
    assert tea.residuals["cond"].shape[0] == 2 and torch.equal(tea.previous, previous[KEEP])
