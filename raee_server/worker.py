"""The model worker: one thread owns the engine; a bounded queue feeds it; concurrent requests batch.

Torch holds the GIL for much of its work, so a thread pool would only add
contention; one worker thread does all model and store work in order, and the
asyncio side only queues, batches and waits. No transport code here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .engine import Engine, Prediction
from .errors import DeadlineExpired, NotReady, Overloaded, RaeeError
from .metrics import Metrics
from .policies import ExitPolicy

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class ClassifyJob:
    task: str
    texts: list[str]
    policy: str | None
    k: int | None
    deadline: float | None  # time.monotonic() by which compute must have started
    future: asyncio.Future[list[Prediction]]
    enqueued: float = field(default_factory=time.monotonic)


@dataclass
class CallJob:
    """Any other engine work (an ingest chunk, a task lookup), run in queue order on the worker thread."""

    fn: Callable[[Engine], Any]
    future: asyncio.Future[Any]
    enqueued: float = field(default_factory=time.monotonic)


Job = ClassifyJob | CallJob


class ModelWorker:
    def __init__(self, max_batch_size: int, max_wait_s: float, queue_size: int, metrics: Metrics | None = None):
        self.engine: Engine | None = None
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.metrics = metrics
        self._queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=queue_size)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raee-model")
        self._runner: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        self._runner = asyncio.get_running_loop().create_task(self._run(), name="raee-batcher")

    async def load(self, factory: Callable[[], Engine]) -> None:
        """Build the engine on the worker thread (model loading must not block the event loop)."""
        self.engine = await asyncio.get_running_loop().run_in_executor(self._thread, factory)

    async def drain(self) -> None:
        """Finish every queued job, then stop the batcher."""
        await self._queue.join()
        if self._runner:
            self._runner.cancel()

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        if self.engine is not None:
            self.engine.close()

    @property
    def ready(self) -> bool:
        return self.engine is not None

    # -- submitting --------------------------------------------------------------

    def _submit(self, job: Job) -> None:
        if self.engine is None:
            raise NotReady("the model and stores are still loading; retry shortly")
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise Overloaded(f"request queue full ({self._queue.maxsize} waiting); retry with backoff") from None
        if self.metrics:
            self.metrics.queue_depth.set(self._queue.qsize())

    async def classify(self, task: str, texts: list[str], policy: str | None, k: int | None,
                       deadline: float | None = None) -> tuple[list[Prediction], float]:
        """Answers and the seconds the job waited in the queue."""
        future: asyncio.Future[list[Prediction]] = asyncio.get_running_loop().create_future()
        job = ClassifyJob(task, texts, policy, k, deadline, future)
        self._submit(job)
        result = await future
        return result, job.enqueued

    async def call(self, fn: Callable[[Engine], T]) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._submit(CallJob(fn, future))
        return await future

    # -- the batcher -------------------------------------------------------------

    async def _collect(self) -> list[Job]:
        jobs = [await self._queue.get()]
        texts = len(jobs[0].texts) if isinstance(jobs[0], ClassifyJob) else self.max_batch_size
        stop_at = time.monotonic() + self.max_wait_s
        while texts < self.max_batch_size:
            remaining = stop_at - time.monotonic()
            if remaining <= 0:
                break
            try:
                job = await asyncio.wait_for(self._queue.get(), remaining)
            except TimeoutError:
                break
            jobs.append(job)
            texts += len(job.texts) if isinstance(job, ClassifyJob) else self.max_batch_size
        return jobs

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect()
            if self.metrics:
                self.metrics.queue_depth.set(self._queue.qsize())
            try:
                for job in (j for j in jobs if isinstance(j, CallJob)):
                    await self._settle(job.future, loop.run_in_executor(self._thread, job.fn, self.engine))
                classify = [j for j in jobs if isinstance(j, ClassifyJob) and not j.future.done()]
                if classify:
                    results = await loop.run_in_executor(self._thread, self._classify_batch, classify)
                    for job, outcome in zip(classify, results):
                        if not job.future.done():
                            if isinstance(outcome, BaseException):
                                job.future.set_exception(outcome)
                            else:
                                job.future.set_result(outcome)
            finally:
                for _ in jobs:
                    self._queue.task_done()

    @staticmethod
    async def _settle(future: asyncio.Future[Any], work: asyncio.Future[Any]) -> None:
        try:
            result = await work
        except Exception as exc:  # delivered to the caller, mapped to a status code there
            if not future.done():
                future.set_exception(exc)
        else:
            if not future.done():
                future.set_result(result)

    def _classify_batch(self, jobs: list[ClassifyJob]) -> list[list[Prediction] | BaseException]:
        """Runs on the worker thread: drop expired jobs, validate each, batch the rest by (task, policy, k)."""
        assert self.engine is not None
        engine = self.engine
        outcomes: list[list[Prediction] | BaseException | None] = [None] * len(jobs)
        groups: dict[tuple[str, str, int], list[int]] = defaultdict(list)
        policies: dict[str, ExitPolicy] = {}
        now = time.monotonic()
        for i, job in enumerate(jobs):
            if job.deadline is not None and now >= job.deadline:
                outcomes[i] = DeadlineExpired("deadline passed while queued; the request was not computed")
                continue
            try:
                policy, k = engine.validate(job.task, job.texts, job.policy, job.k)
                groups[(job.task, policy.name, k)].append(i)
                policies[policy.name] = policy
            except RaeeError as exc:
                outcomes[i] = exc
        for (task, policy, k), members in groups.items():
            texts = [t for i in members for t in jobs[i].texts]
            start = time.perf_counter()
            try:
                predictions = engine.classify_validated(task, texts, policies[policy], k)
            except Exception as exc:
                if not isinstance(exc, RaeeError):
                    log.exception("batch of %d texts for task %s failed", len(texts), task)
                for i in members:
                    outcomes[i] = exc
                continue
            if self.metrics:
                self.metrics.batch_size.observe(len(texts))
                self.metrics.stage.labels("batch").observe(time.perf_counter() - start)
            offset = 0
            for i in members:
                n = len(jobs[i].texts)
                outcomes[i] = predictions[offset : offset + n]
                offset += n
        return [o if o is not None else RuntimeError("job not processed") for o in outcomes]
