"""Flow-matching samplers (UniPC, Euler, LCM, DMD step lists) with precomputed step coefficients."""

from wanpipe.schedulers.common import Schedule, SolverState, add_noise, shift_sigmas
from wanpipe.schedulers.config import SAMPLERS, TIMESTEP_SCALE, SchedulerConfig, SchedulerKind
from wanpipe.schedulers.noise import StepNoise, generator_state, seeded_generator
from wanpipe.schedulers.sampling import default_sigmas, make_schedule, new_state, step

__all__ = [
    "SAMPLERS",
    "TIMESTEP_SCALE",
    "Schedule",
    "SchedulerConfig",
    "SchedulerKind",
    "SolverState",
    "StepNoise",
    "add_noise",
    "default_sigmas",
    "generator_state",
    "make_schedule",
    "new_state",
    "seeded_generator",
    "shift_sigmas",
    "step",
]
