"""The queue of ``wanpipe serve`` and the one worker thread that owns the model.

:class:`JobManager` runs one worker thread: it loads the pipeline, then loops: claim the oldest queued job
and the later queued jobs of the same batch key (same latent shape and schedule, up to ``max_batch``), run
them as one executor batch, save each video, mark each job. HTTP handlers only talk to the store
(:mod:`wanpipe.serving.store`) and never wait on the model. ``DELETE`` of a running job stops its work at
the next denoising step: its row leaves the batch (``run_contexts(cancelled_rows=)``) and the batch's
other jobs run on; once every job of the batch is deleted the batch stops. Shutdown stops the running
batch at the next step and puts its jobs back in the queue: nothing is finished half-way and nothing is
lost. A batch of several jobs that raises runs again job by job, so one job's bad input or memory need
fails that job alone; a full output disk fails the job whose video did not fit (``disk_full``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from wanpipe.context import InvalidRequestError, WanContext, WanRequest
from wanpipe.executor import CancelledError
from wanpipe.serving.events import JobEvents
from wanpipe.serving.job_request import job_request
from wanpipe.serving.media_store import job_files
from wanpipe.serving.metrics import Metrics
from wanpipe.serving.parsing import NewJob, ServeLimits
from wanpipe.serving.resolve import resolve_job
from wanpipe.serving.step_gate import StepGate
from wanpipe.serving.store import Job, JobStatus, JobStore, new_job_id

if TYPE_CHECKING:
    from wanpipe.pipeline import WanPipeline
    from wanpipe.serving.distributed import BatchLeader
    from wanpipe.serving.loras import LoraLibrary
    from wanpipe.video_writer import FrameSink

logger = logging.getLogger("wanpipe.serving")


class NotReadyError(RuntimeError):
    """The model is still loading (or failed to load)."""


class ShuttingDownError(RuntimeError):
    """The server is stopping and takes no new work."""


class QueueFullError(RuntimeError):
    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class UnknownModelError(ValueError):
    """The request names a model this server does not serve."""


def add_to_queue(manager: Any, job: Job, images: dict[str, Any]) -> Job:
    """Queue ``job`` with its ``images`` in ``manager.store`` if the queue (counted in the store: every
    replica of a PostgreSQL store) is under ``--max-queue``; else QueueFullError with a Retry-After."""
    added = manager.store.add_if_room(job, images, manager.limits.max_queue)
    if added is None:
        queued = manager.store.count(JobStatus.QUEUED)
        manager.metrics.count("rejected", "queue_full")
        raise QueueFullError(
            f"the queue is full ({queued} jobs waiting, --max-queue {manager.limits.max_queue}); try again later",
            manager.retry_after(queued),
        )
    return added


class JobManager:
    """The queue and the one worker thread that owns the pipeline."""

    def __init__(
        self,
        store: JobStore,
        load_pipeline: Callable[[], WanPipeline],
        *,
        model_name: str,
        model_aliases: tuple[str, ...] = (),
        limits: ServeLimits | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
        leader: BatchLeader | None = None,
        loras: LoraLibrary | None = None,
    ):
        """``leader``: under torchrun, rank 0's link to the follower ranks (``wanpipe.serving.distributed``):
        each batch, each step's cancel flag and the stop go to them; any failure stops the server.
        ``loras``: the adapters requests may name (``--lora-dir``); None: a request's ``loras`` is refused."""
        self.store = store
        self.loras = loras
        self._leader = leader
        self._world_broken = False
        self.fatal_error: BaseException | None = None  # under torchrun: the failure that stopped the server
        self.model_name = model_name
        self.model_names = {model_name, *model_aliases}
        self.limits = limits or ServeLimits()
        self.metrics = Metrics()
        # Test-only (WANPIPE_TEST_STEP_GATE): hold the worker before each step until a test allows it.
        self.step_gate: StepGate | None = StepGate.from_environment()
        self.pipe: WanPipeline | None = None
        self.load_error: BaseException | None = None
        self._load_pipeline = load_pipeline
        self._on_fatal = on_fatal
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._paused = False
        self._submit_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._progress: dict[str, int] = {}
        self._running: frozenset[str] = frozenset()
        self._cancelled: set[str] = set()
        self._watchers: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self.events = JobEvents()  # each step, preview and finish, for GET .../events (serving/live.py)
        self.recovery = store.recover(model_name)
        if any(self.recovery.values()):
            logger.info(
                "job store %s: %s", store.folder, ", ".join(f"{k} {v}" for k, v in self.recovery.items())
            )
        self._thread = threading.Thread(target=self._main, name="wanpipe-worker", daemon=True)

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._stopping.is_set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def pause(self) -> None:
        """Start no new batch until :meth:`resume` (the running batch goes on)."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._wake.set()

    def begin_shutdown(self) -> None:
        """Take no new work; stop the running batch at its next step and put its jobs back in the queue."""
        if not self._stopping.is_set():
            logger.info("shutting down: a running batch stops at its next step and stays queued")
        self._stopping.set()
        self._wake.set()
        with self._state_lock:
            job_ids = list(self._watchers)
        for job_id in job_ids:
            self._notify(job_id)
        self.events.notify_all()

    def stop(self, timeout: float = 60.0) -> None:
        self.begin_shutdown()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning(
                "the worker did not stop within %.0f s; its jobs run again after a restart", timeout
            )
        else:
            self.store.close()

    # -- the HTTP side ------------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.model_names:
            raise UnknownModelError(
                f"the model {name!r} is not served here; this server serves {self.model_name!r}"
            )

    def submit(self, new: NewJob, source: str) -> Job:
        """Validate a request against the limits and the model, and queue it. Raises NotReadyError,
        ShuttingDownError, UnknownModelError, InvalidRequestError (LimitExceededError) or QueueFullError."""
        if self._stopping.is_set():
            raise ShuttingDownError("the server is shutting down")
        pipe = self.pipe
        if pipe is None or not self._ready.is_set():
            raise NotReadyError("the model is still loading")
        self.check_model(new.model)
        self.check_loras(new.spec.loras)
        spec, batch_key, images = resolve_job(pipe, self.limits, new)
        job = Job(
            id=new_job_id(),
            status=JobStatus.QUEUED,
            model=self.model_name,
            spec=spec,
            batch_key=batch_key,
            source=source,
            created_at=time.time(),
        )
        with self._submit_lock:  # the limit counted in the store: for all replicas of a PostgreSQL store
            job = add_to_queue(self, job, images)
        self.metrics.count("submitted", source)
        self._wake.set()
        return job

    def check_loras(self, loras: tuple[tuple[str, float], ...]) -> None:
        """InvalidRequestError (``loras``) for adapters this server does not serve."""
        if not loras:
            return
        if self.loras is None:
            raise InvalidRequestError(
                "loras: this server serves no LoRA adapters (start it with --lora-dir DIR)", "loras"
            )
        self.loras.check(loras)

    def retry_after(self, queued: int | None = None) -> int:
        """Seconds until the queue has room, roughly: the batches ahead times a batch's mean time."""
        queued = self.store.count(JobStatus.QUEUED) if queued is None else queued
        per_batch = self.metrics.mean_batch_seconds() or 10.0
        return int(min(3600, max(1, math.ceil(max(queued, 1) / self.limits.max_batch) * per_batch)))

    def progress(self, job: Job) -> int:
        if job.status == JobStatus.COMPLETED:
            return 100
        if job.status == JobStatus.IN_PROGRESS:
            with self._state_lock:
                return self._progress.get(job.id, job.progress)
        return job.progress

    def running_progress(self) -> dict[str, int]:
        """The running jobs' progress (0-95) by id: a PostgreSQL worker's heartbeat stores it for replicas."""
        with self._state_lock:
            return dict(self._progress)

    def running_batch_size(self) -> int:
        with self._state_lock:
            return len(self._running)

    def delete(self, job_id: str) -> Job | None:
        """Delete a job: a queued one never runs, a running one is cancelled (its work stops at the next
        step; the batch stops once all of its jobs are deleted), a finished one's files are removed."""
        job = self.store.delete(job_id)
        if job is None:
            return None
        if job.status == JobStatus.IN_PROGRESS:
            with self._state_lock:
                self._cancelled.add(job_id)
        if not job.finished:
            self.metrics.count("finished", "cancelled")
            logger.info("job %s cancelled (%s)", job_id, job.status.value)
        self.store.remove_files(job_id)
        self._notify(job_id)
        return job

    async def wait_finished(self, job_id: str, is_disconnected: Callable[[], Awaitable[bool]]) -> Job | None:
        """Wait, without blocking the event loop, until a job is finished; None if it was deleted. A client
        that went away ends the wait with the job as it is; ShuttingDownError if the server stops first."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        entry = (loop, event)
        with self._state_lock:
            self._watchers.setdefault(job_id, []).append(entry)
        try:
            while True:
                job = self.store.get(job_id)
                if job is None or job.finished:
                    return job
                if self._stopping.is_set():
                    raise ShuttingDownError("the server is shutting down")
                if await is_disconnected():
                    return job
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), 1.0)
                event.clear()
        finally:
            with self._state_lock:
                watchers = self._watchers.get(job_id, [])
                if entry in watchers:
                    watchers.remove(entry)
                if not watchers:
                    self._watchers.pop(job_id, None)

    def _notify(self, job_id: str) -> None:
        self.events.notify(job_id)
        with self._state_lock:
            watchers = list(self._watchers.get(job_id, []))
        for loop, event in watchers:
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(event.set)

    # -- the worker thread --------------------------------------------------------------------
    def _main(self) -> None:
        t0 = time.perf_counter()
        try:
            self.pipe = self._load_pipeline()
        except BaseException as e:  # noqa: BLE001 - reported to the server, which exits
            self.load_error = e
            logger.error("cannot load the model: %s", e)
            if self._on_fatal is not None:
                self._on_fatal(e)
            return
        logger.info("model %s loaded in %.1f s: ready", self.model_name, time.perf_counter() - t0)
        self._ready.set()
        while not self._stopping.is_set():
            if self._paused:
                self._wake.wait(0.2)
                self._wake.clear()
                continue
            self._wake.clear()
            try:
                batch = self.store.claim_batch(self.limits.max_batch, time.time())
            except (sqlite3.Error, OSError) as e:  # a full disk, say: the queue waits, the server serves on
                logger.error("cannot take the next batch from the job store: %s", e)
                self._stopping.wait(1.0)
                continue
            if not batch:
                self._wake.wait(1.0)
                continue
            try:
                self._run_batch(batch)
            except Exception as e:  # a bug here must not stop the worker: fail the batch, go on
                logger.exception("worker error")
                for job in batch:
                    self._fail(job, "server_error", "internal error in the worker", None)
                if self._leader is not None:
                    self._break_world(e)
        if self._leader is not None and not self._world_broken:
            try:
                self._leader.send_stop()
            except Exception:
                logger.exception("cannot tell the other ranks to stop")
        logger.info("worker stopped")

    def _break_world(self, error: BaseException) -> None:
        """Under torchrun: after a failure the ranks may sit in different collectives; stop the server."""
        self._world_broken = True
        self.fatal_error = error
        logger.error("a batch failed under torchrun (%s): stopping the server; restart it", error)
        self.begin_shutdown()
        if self._on_fatal is not None:
            self._on_fatal(error)

    def _fail(self, job: Job, code: str, message: str, batch_size: int | None) -> None:
        try:
            failed = self.store.fail(job.id, code, message, now=time.time(), batch_size=batch_size)
        except (sqlite3.Error, OSError) as e:  # the job stays running in the store: a restart runs it again
            logger.error("cannot mark job %s failed (%s: %s) in the job store: %s", job.id, code, message, e)
            failed = False
        if failed:
            self.metrics.count("finished", "failed")
            logger.warning("job %s failed (%s): %s", job.id, code, message)
        self._notify(job.id)

    def _run_batch(self, jobs: list[Job]) -> None:
        pipe = self.pipe
        assert pipe is not None
        runnable: list[tuple[Job, WanRequest, WanContext]] = []
        for job in jobs:
            try:
                images = self.store.read_inputs(job)
                request = job_request(job.spec, images.get("image"), images.get("last_image"), images)
                runnable.append((job, request, pipe.tokenizer.make_context(request)))
            except (InvalidRequestError, OSError, ValueError) as e:
                self._fail(job, "invalid_request", str(e), None)
        if not runnable:
            return
        key = (runnable[0][2].batch_key, runnable[0][0].spec.loras)
        later = [job.id for job, _, ctx in runnable if (ctx.batch_key, job.spec.loras) != key]  # a stale key
        if later:
            self.store.requeue(later)
        self._run([item for item in runnable if (item[2].batch_key, item[0].spec.loras) == key])

    def _switch_loras(self, jobs: list[Job]) -> bool:
        """Merge the batch's LoRA set into the DiT (the previous set's layers back to base first); a set
        that cannot be applied (no --lora-dir after a restart, a file gone) fails the jobs: False."""
        loras = jobs[0].spec.loras
        try:
            if self.loras is not None:
                self.loras.activate(self.pipe, loras)
            elif loras:
                self.check_loras(loras)
        except InvalidRequestError as e:
            for job in jobs:
                self._fail(job, "invalid_request", str(e), None)
            return False
        return True

    def _run(self, runnable: list[tuple[Job, WanRequest, WanContext]]) -> None:
        """Run jobs as one executor batch and save their videos. A job deleted meanwhile stops its row at
        the next step (the others run on); shutdown stops the batch and requeues it. When a batch of
        several fails, its jobs run again one by one (without torchrun): a job that fails alone is failed
        with its message, the others complete."""
        pipe = self.pipe
        assert pipe is not None
        jobs = [job for job, _, _ in runnable]
        if not self._switch_loras(jobs):
            return
        if self._leader is not None:
            try:  # the followers make their contexts from the same resolved requests (seeds fixed)
                self._leader.send_batch([request for _, request, _ in runnable])
            except Exception as e:
                self.store.requeue([job.id for job in jobs])
                self._break_world(e)
                return
        ids = frozenset(job.id for job in jobs)
        row_of = {job.id: i for i, job in enumerate(jobs)}
        with self._state_lock:
            self._running = ids
            self._progress.update(dict.fromkeys(ids, 0))

        def on_step(i: int, n: int, _t: float) -> None:
            value = int(95 * (i + 1) / n)
            with self._state_lock:
                self._progress.update(dict.fromkeys(ids, value))
            self.events.step(ids, i, n)

        def local_decision() -> tuple[bool, set[int]]:
            """(stop the batch: shutdown or every job deleted, the rows of the deleted jobs)."""
            gone = self.store.cancelled(ids)  # deleted on another replica, or the lease lost (PostgreSQL)
            with self._state_lock:
                deleted = ids & (self._cancelled | gone)
            return self._stopping.is_set() or deleted == ids, {row_of[job_id] for job_id in deleted}

        def local_cancel() -> bool:
            return local_decision()[0]

        def local_rows() -> set[int]:
            return local_decision()[1]

        decide, cancelled_rows = local_cancel, local_rows
        if self._leader is not None:  # every rank stops the batch, or drops the same rows, at the same step
            steps = self._leader.steps(len(jobs), local_decision)
            decide, cancelled_rows = steps.should_cancel, steps.cancelled_rows
        gate = self.step_gate

        def should_cancel() -> bool:  # called before each denoising step
            if gate is not None:
                gate.wait(self._stopping)
            return decide()

        size = len(jobs)
        t0 = time.perf_counter()
        error: Exception | None = None
        sinks = [
            job_files(self.store.media, job.id, job.spec.fps or ctx.fps, ctx.num_frames)
            for job, _, ctx in runnable
        ]
        try:
            frames, timings = pipe.run_contexts(
                [ctx for _, _, ctx in runnable],
                on_step,
                progress=False,
                should_cancel=should_cancel,
                cancelled_rows=cancelled_rows,
                preview=self.events.previewer([job.id if job.spec.preview else None for job in jobs]),
                sinks=sinks,
            )
        except CancelledError:
            frames = None
        except Exception as e:  # out of memory (WanOutOfMemoryError) or any other failure of the engine
            error = e
        finally:
            with self._state_lock:
                self._running = frozenset()
                for job_id in ids:
                    self._progress.pop(job_id, None)
                cancelled = ids & self._cancelled
                self._cancelled -= ids
        if error is not None:
            self._failed(runnable, error, cancelled)
            return
        if frames is None:
            if self._stopping.is_set():
                n = self.store.requeue(list(ids - cancelled))
                logger.info("stopped a batch of %d at shutdown: %d job(s) stay queued", size, n)
            return
        self.metrics.count("batches", size)
        num_steps = jobs[0].spec.num_inference_steps or 1
        self.metrics.observe("step_seconds", timings.denoise_s / num_steps, num_steps)
        for job, sink, made in zip(jobs, sinks, frames):
            if job.id in cancelled or made is None:
                sink.abort()  # nothing left behind (a no-op for a row not made)
                continue
            self._save(job, sink, size)
        self.metrics.observe("batch_seconds", time.perf_counter() - t0)

    def _failed(
        self, runnable: list[tuple[Job, WanRequest, WanContext]], error: Exception, deleted: frozenset[str]
    ) -> None:
        """A batch raised: under torchrun the world stops; else a batch of several runs again job by job
        (one job's bad input or memory need must not fail the others), a single job is failed."""
        from wanpipe.pipeline import WanOutOfMemoryError

        ids = ", ".join(sorted(job.id for job, _, _ in runnable))
        if len(runnable) > 1 and self._leader is None:
            logger.warning("a batch of %d failed (%s): running its jobs one by one", len(runnable), error)
            pipe = self.pipe
            assert pipe is not None
            for job, request, _ in runnable:
                if job.id in deleted:
                    continue
                if self._stopping.is_set():
                    self.store.requeue([job.id])
                    continue
                self._run([(job, request, pipe.tokenizer.make_context(request))])  # fresh noise, same seed
            return
        code = "out_of_memory" if isinstance(error, WanOutOfMemoryError) else "generation_failed"
        if code == "generation_failed":
            logger.error("generation failed for %s", ids, exc_info=error)
        for job, _, _ in runnable:
            self._fail(job, code, str(error) or type(error).__name__, len(runnable))
        if self._leader is not None:
            self._break_world(error)

    def _save(self, job: Job, sink: FrameSink, batch_size: int) -> None:
        """Finish a job's video and thumbnail (written as decoded), mark it completed (a full disk fails it)."""
        try:
            sink.close()
        except Exception as e:
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                message = f"the output disk is full: cannot save the video in {self.store.media.where}"
                self._fail(job, "disk_full", f"{message} ({e.strerror})", batch_size)
            else:
                logger.exception("saving the video of %s failed", job.id)
                self._fail(job, "save_failed", f"cannot save the video: {e}", batch_size)
            return
        now = time.time()
        try:
            completed = self.store.complete(job.id, batch_size=batch_size, now=now)
        except (sqlite3.Error, OSError) as e:  # the job stays running in the store: a restart runs it again
            logger.error("cannot mark job %s completed in the job store: %s", job.id, e)
            return
        if not completed:  # deleted while it was saved
            self.store.remove_files(job.id)
            return
        wait_s = (job.started_at or now) - job.created_at
        run_s = now - (job.started_at or now)
        self.metrics.count("finished", "completed")
        self.metrics.observe("queue_wait_seconds", wait_s)
        self.metrics.observe("run_seconds", run_s)
        s = job.spec
        logger.info(
            "job %s completed: %dx%d, %d frames, %d steps, batch %d, queue wait %.2f s, run %.2f s", job.id,
            *(s.width, s.height, s.num_frames, s.num_inference_steps, batch_size, wait_s, run_s),
        )  # fmt: skip
        self._notify(job.id)
