"""``wanpipe serve`` under torchrun: rank 0 serves HTTP and owns the job store, the other ranks follow.

Every rank loads the whole pipeline with the same :class:`~wanpipe.parallel.ParallelMesh`, so each
executor batch must run on every rank at once (its DiT forwards are collectives). The messages, all
sent by rank 0 over the default process group from its worker thread (the only thread of a rank that
talks to the group):

* ``("batch", [WanRequest, ...])`` (``broadcast_object_list``) when the worker takes a batch: the
  requests with every setting resolved and the seed fixed (as the job store keeps them) and the
  uploaded images as decoded arrays. Each rank makes the contexts and calls ``run_contexts``.
* one decision per denoising step (a small int tensor broadcast inside ``should_cancel``, see
  :class:`StepDecisions`): rank 0's flag (every job of the batch deleted, or shutdown: every rank stops
  the batch at the same step) and a mask of the batch's rows whose job was deleted (every rank drops
  those rows at the same step and runs the others on).
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
from collections.abc import Callable, Collection
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


def broadcast_decision(cancel: bool, rows: Collection[int], size: int) -> tuple[bool, frozenset[int]]:
    """Rank 0's step decision on every rank (a collective: every rank calls it, the others' arguments
    are ignored): whether the whole batch stops, and the rows (indices below ``size``) whose work stops."""
    values = [int(cancel)] + [int(i in rows) for i in range(size)]
    mask = torch.tensor(values, dtype=torch.int32, device=_flag_device())
    dist.broadcast(mask, src=0)
    got = mask.tolist()
    return bool(got[0]), frozenset(i for i, v in enumerate(got[1:]) if v)


class StepDecisions:
    """One batch's per-step decisions, the same on every rank. The denoise loop calls
    :meth:`should_cancel` before each step (it broadcasts rank 0's decision: the one collective of the
    check) and :meth:`cancelled_rows` right after (the rows of that decision, no collective).

    ``local`` gives rank 0's own (stop the batch, rows to drop); None on the followers."""

    def __init__(self, size: int, local: Callable[[], tuple[bool, Collection[int]]] | None = None):
        self.size = size
        self._local = local
        self._rows: frozenset[int] = frozenset()

    def should_cancel(self) -> bool:
        cancel, rows = self._local() if self._local is not None else (False, ())
        cancel, self._rows = broadcast_decision(cancel, rows, self.size)
        return cancel

    def cancelled_rows(self) -> frozenset[int]:
        return self._rows


def _receive() -> tuple[str, Any]:
    message: list[Any] = [None]
    dist.broadcast_object_list(message, src=0)
    return message[0]


class BatchLeader:
    """Rank 0's side: the job manager's worker sends each batch, each step's decision and the stop."""

    def send_batch(self, requests: list[WanRequest]) -> None:
        dist.broadcast_object_list([(BATCH, requests)], src=0)

    def steps(self, size: int, local: Callable[[], tuple[bool, Collection[int]]]) -> StepDecisions:
        """The step decisions of a batch of ``size`` jobs: ``local()`` is rank 0's (stop, rows to drop)."""
        return StepDecisions(size, local)

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

    while True:
        kind, payload = _receive()
        if kind == STOP:
            logger.info("rank %d: stop from rank 0", rank)
            return 0
        if kind != BATCH:
            raise RuntimeError(f"rank {rank}: unknown message {kind!r} from rank 0")
        contexts = [pipe.tokenizer.make_context(request) for request in payload]
        steps = StepDecisions(len(contexts))
        try:
            pipe.run_contexts(
                contexts,
                progress=False,
                should_cancel=steps.should_cancel,
                cancelled_rows=steps.cancelled_rows,
            )
        except CancelledError:
            continue
