"""The multi-GPU flags of ``wanpipe generate`` and ``wanpipe serve``: ``--ulysses U --ring R
--cfg-parallel --vae-parallel --vae-halo ROWS``, and the layout they ask for under torchrun.

Only argparse here (``wanpipe.parallel.mesh`` is imported when a layout is built), so both commands
can add the flags without importing each other.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from wanpipe import arguments as a

if TYPE_CHECKING:
    from wanpipe.parallel.mesh import ParallelConfig

VAE_HALO = 4
"""Default ``--vae-halo`` in latent rows (32 pixels at 8x; see docs/parallel.md for its error)."""


def add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    """``--ulysses U --ring R --cfg-parallel`` (``generate`` and ``serve``); read by :func:`parallel_config`."""
    g = p.add_argument_group("multi-GPU (under torchrun: U x R (x 2 with --cfg-parallel) = the world size)")
    degree = a.integer(1, what="ranks")
    g.add_argument("--ulysses", type=degree, default=1, metavar="U", help="Ulysses sequence-parallel degree")
    g.add_argument(
        "--ring", type=degree, default=1, metavar="R", help="ring-attention sequence-parallel degree"
    )
    g.add_argument(
        "--cfg-parallel",
        action="store_true",
        help="run the conditional and unconditional guidance rows on two halves of the ranks",
    )
    g.add_argument(
        "--vae-parallel",
        action="store_true",
        help="split the VAE decode across the ranks by bands of rows, exact (the mid block once, each "
        "band with the upsampling levels' full receptive field: see docs/speed.md)",
    )
    g.add_argument(
        "--vae-halo",
        type=a.integer(0, what="latent rows"),
        default=None,
        metavar="ROWS",
        help=f"with --vae-parallel: the older approximate bands, each decoded whole with this many latent "
        f"rows borrowed from its neighbours (e.g. {VAE_HALO}; default: exact bands)",
    )


def vae_halo(args: argparse.Namespace) -> int | None:
    """The executor's ``vae_halo`` for ``--vae-parallel``/``--vae-halo``: None (off) by default, -1
    (``wanpipe.parallel.vae.EXACT_HALO``) for the exact bands, ROWS for the approximate ones."""
    if not getattr(args, "vae_parallel", False):
        return None
    halo = getattr(args, "vae_halo", None)
    return -1 if halo is None else halo


def parallel_config(args: argparse.Namespace) -> ParallelConfig | None:
    """The layout that :func:`add_parallel_arguments`' flags ask for against torchrun's WORLD_SIZE:
    None for a plain single-process run (WORLD_SIZE unset or 1, default degrees); ValueError (the
    message for the user) when the degrees do not fit the world (the heads are checked at load)."""
    from wanpipe.parallel.mesh import ParallelConfig

    world = int(os.environ.get("WORLD_SIZE", "1"))
    config = ParallelConfig(ulysses=args.ulysses, ring=args.ring, cfg_parallel=args.cfg_parallel)
    if (getattr(args, "vae_halo", None) or 0) < 0:
        raise ValueError(f"--vae-halo must be >= 0 latent rows, got {args.vae_halo}")
    if world == 1 and config == ParallelConfig():
        return None
    config.validate(world)
    return config
