"""Flow-matching samplers (UniPC, Euler) with precomputed step coefficients."""

from wanpipe.schedulers.common import Schedule, SolverState, add_noise, shift_sigmas
from wanpipe.schedulers.config import SAMPLERS, TIMESTEP_SCALE, SchedulerConfig, SchedulerKind
from wanpipe.schedulers.sampling import make_schedule, new_state, step

__all__ = [
    "SAMPLERS",
    "TIMESTEP_SCALE",
    "Schedule",
    "SchedulerConfig",
    "SchedulerKind",
    "SolverState",
    "add_noise",
    "make_schedule",
    "new_state",
    "shift_sigmas",
    "step",
]
