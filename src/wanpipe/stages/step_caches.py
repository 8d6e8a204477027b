"""Which step cache a batch runs with, and its options completed from the model's published figures.

The request's ``cache`` (with its ``cache_options``) wins; else the runtime's cache, with the request's
``residual_threshold`` (or the runtime's) for the caches that have a threshold; else First-Block-Cache
when the request gives a threshold > 0 alone. TeaCache's coefficients and MagCache's ratios come from
the model (:mod:`wanpipe.runtime.step_cache`, :mod:`wanpipe.runtime.cache_options`).
"""

from __future__ import annotations

from dataclasses import dataclass

from wanpipe.context import Approximations, InvalidRequestError
from wanpipe.models.transformer_layers import TransformerConfig
from wanpipe.runtime.cache_options import build_step_cache, complete_cache_options
from wanpipe.runtime.options import RuntimeOptions
from wanpipe.runtime.step_cache import StepCache, teacache_coefficients, teacache_variant

__all__ = ["CacheModel", "cache_choice", "make_step_cache"]


@dataclass(frozen=True)
class CacheModel:
    """What a step cache's defaults depend on: the DiT's config, whether two experts run (Wan 2.2
    A14B), per-token timesteps (TI2V-5B); ``refused``: the checkpoint kind no step cache applies to
    ("VACE", "Animate"), or None."""

    dit: TransformerConfig
    two_experts: bool
    per_token_timesteps: bool
    refused: str | None = None

    def refusal(self, what: str) -> str:
        """The message refusing ``what`` (a flag or field turning a step cache on)."""
        return (
            "the step caches (first-block, teacache, taylorseer, magcache) do not apply to "
            f"{self.refused} checkpoints yet: leave {what} off"
        )

    def teacache_variant(self) -> str:
        """The published TeaCache coefficients' name for this model (ValueError when none)."""
        return teacache_variant(
            self.dit, two_experts=self.two_experts, per_token_timesteps=self.per_token_timesteps
        )

    def complete(self, kind: str, options: dict, latent_size: tuple[int, int], image: bool) -> dict:
        """``options`` of cache ``kind`` with the model's defaults filled in (ValueError when none)."""
        return complete_cache_options(
            kind,
            options,
            dit=self.dit,
            two_experts=self.two_experts,
            per_token_timesteps=self.per_token_timesteps,
            image=image,
            latent_size=latent_size,
        )


def cache_choice(approximations: Approximations, runtime: RuntimeOptions) -> tuple[str | None, dict]:
    """(the cache's name or None, its options) for a batch, before the model's defaults."""
    requested = approximations.residual_threshold
    if approximations.cache is not None:
        if approximations.cache == "none":
            return None, {}
        return approximations.cache, dict(approximations.cache_options or {})
    kind = runtime.cache if runtime.cache != "none" else None
    if kind is None:
        return ("first-block", {"threshold": requested}) if requested else (None, {})
    options = dict(runtime.cache_options or {})
    if kind in ("first-block", "teacache"):
        options["threshold"] = requested if requested is not None else runtime.residual_threshold
    elif requested is not None and "threshold" in options:
        options["threshold"] = requested
    return kind, options


def make_step_cache(
    model: CacheModel,
    runtime: RuntimeOptions,
    approximations: Approximations,
    latent_size: tuple[int, int] | None = None,
    image: bool = False,
) -> StepCache | None:
    """The step cache for a batch (None: no cache), its options resolved. ``latent_size`` (h, w) and
    ``image`` pick published coefficients and ratios (I2V 480P or 720P, TI2V-5B with or without an
    image). InvalidRequestError when the model has none to pick, or takes no step cache."""
    kind, options = cache_choice(approximations, runtime)
    if kind is None:
        return None
    if model.refused is not None:
        named = approximations.cache is None and approximations.residual_threshold
        what = "residual_threshold" if named else "cache"
        raise InvalidRequestError(model.refusal(what), what)
    size = latent_size or (0, 0)
    if kind == "teacache" and options.get("coefficients") is None:
        try:
            options["coefficients"] = runtime.teacache_coefficients or teacache_coefficients(
                model.teacache_variant(), size, model.dit.patch_size
            )
        except ValueError as e:
            param = "cache" if approximations.cache is None else "cache_options"
            raise InvalidRequestError(str(e), param) from None
    return build_step_cache(kind, model.complete(kind, options, size, image))
