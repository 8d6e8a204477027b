"""``wanpipe serve`` under torchrun: rank 0 serves HTTP and owns the job store, the other ranks follow.

Every rank loads the whole pipeline with the same :class:`~wanpipe.parallel.ParallelMesh`, so each
executor batch must run on every rank at once (its DiT forwards are collectives). The messages, all
sent by rank 0 over the default process group from its worker thread (the only thread of a rank that
talks to the group):

* ``("batch", [WanRequest, ...])`` (``broadcast_object_list``) when the worker takes a batch: the
  requests with every setting resolved and the seed fixed (as the job store keeps them) and the
  uploaded images as decoded arrays. Each rank makes the contexts and calls ``run_contexts``.
* one flag per denoising step (a one-element tensor broadcast inside ``should_cancel``): rank 0's
  decision (every job of the batch deleted, or shutdown); every rank stops at the same step.
* ``("stop", None)`` when rank 0's worker stops (SIGTERM, Ctrl-C): the followers return 0.

Failures are fail-fast: an exception other than the agreed cancel, on any rank, may leave the ranks
in different collectives, so the world is not used again. A follower logs it and exits 1; rank 0 fails
the batch's jobs and stops the server (exit 1). The other ranks see the lost peer in their next
collective (gloo: an error as the connection closes; NCCL: torchrun stops the whole job when one
worker fails; at the latest the process group's timeout) and exit too. After a restart the job store
puts jobs that were running back in the queue (three crashes fail a job).
"""

from __future__ import annotations

import logging
import signal
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from wanpipe.executor import CancelledError

if TYPE_CHECKING:
    from wanpipe.context import WanRequest
    from wanpipe.pipeline import WanPipeline

logger = logging.getLogger("wanpipe.serving")

BATCH = "batch"
STOP = "stop"


def _flag_device() -> torch.device | None:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None


def broadcast_flag(value: bool) -> bool:
    """Rank 0's ``value`` on every rank (a collective: every rank calls it, the others' value is ignored)."""
    flag = torch.tensor([int(value)], dtype=torch.int32, device=_flag_device())
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def _receive() -> tuple[str, Any]:
    message: list[Any] = [None]
    dist.broadcast_object_list(message, src=0)
    return message[0]


class BatchLeader:
    """Rank 0's side: the job manager's worker sends each batch, each step's cancel flag and the stop."""

    def send_batch(self, requests: list[WanRequest]) -> None:
        dist.broadcast_object_list([(BATCH, requests)], src=0)

    def should_cancel(self, local: bool) -> bool:
        return broadcast_flag(local)

    def send_stop(self) -> None:
        dist.broadcast_object_list([(STOP, None)], src=0)


def follow(pipe: WanPipeline) -> int:
    """A follower rank: run every batch rank 0 sends, until it sends stop (-> 0). An exception other
    than the agreed cancel propagates (the rank exits; see the module's note on failures)."""
    rank = dist.get_rank()

    def ignore(signum: int, _frame: object) -> None:  # torchrun and Ctrl-C signal every rank
        logger.info("rank %d: got signal %d; waiting for rank 0 to stop the server", rank, signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, ignore)

    def should_cancel() -> bool:
        return broadcast_flag(False)

    while True:
        kind, payload = _receive()
        if kind == STOP:
            logger.info("rank %d: stop from rank 0", rank)
            return 0
        if kind != BATCH:
            raise RuntimeError(f"rank {rank}: unknown message {kind!r} from rank 0")
        contexts = [pipe.tokenizer.make_context(request) for request in payload]
        try:
            pipe.run_contexts(contexts, progress=False, should_cancel=should_cancel)
        except CancelledError:
            continue
