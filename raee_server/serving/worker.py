"""The model worker: two threads, one per stage; a bounded queue feeds them; concurrent requests batch.

A classify request passes two stages (raee_server.core.engine: `prepare`, then `complete`). The key
thread validates it, encodes its key, retrieves its neighbours and settles each row's decision; a row
the key head answers (a key-first cascade) is answered there and then, and never waits for the
backbone, even while the backbone is busy with other rows. The model thread runs the backbone for
the rest, and all other engine work (ingest chunks, lookups) in order. The asyncio side only queues,
schedules and waits. No transport code here.

Scheduling is fair across requests: a classify request is cut into chunks, and
each model batch takes a share of texts from every waiting request in turn, so
one large ClassifyBatch cannot hold the worker while a single Classify waits.
Between chunks a request whose caller cancelled or whose deadline passed is
dropped. Any other engine work (an ingest chunk, a task lookup) alternates with
the classify batches, one job per turn.

The batcher loop survives any exception: a failing job fails alone (with its
traceback logged), and `alive` tells the health service whether the loop runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from raee_server import tracing
from raee_server.core.engine import Engine
from raee_server.core.policies import ExitPolicy, Resolved
from raee_server.core.prepared import Prepared
from raee_server.errors import DeadlineExpired, NotReady, Overloaded, RaeeError
from raee_server.serving.metrics import Metrics
from raee_server.types import Example, Prediction

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class ClassifyJob:
    task: str
    examples: list[Example]  # as the caller gave them
    policy: str | ExitPolicy | None
    k: int | None
    deadline: float | None  # time.monotonic() by which the caller stops waiting
    future: asyncio.Future[list[Prediction]]
    texts: list[str] = field(default_factory=list)  # the examples in the engine's text form, once validated
    enqueued: float = field(default_factory=time.monotonic)
    # Set by the scheduler once the job has been validated on the worker thread.
    resolved: Resolved | None = None
    keyed: int = 0  # texts [0, keyed) have passed the key stage or are in it
    backlog: list[int] = field(default_factory=list)  # texts the key stage left for the backbone, in order
    prepared: dict[int, Prepared] = field(default_factory=dict)  # each backlog text, as the key stage left it
    taken: int = 0  # backlog[0:taken] are answered or in the backbone batch being computed
    answered: int = 0  # texts with an answer
    results: list[Prediction] = field(default_factory=list)
    trace_context: Any = None  # the caller's trace (raee_server.tracing), continued by the batch's span

    def abandoned(self, now: float) -> bool:
        """The caller is gone (cancelled, or its deadline passed): computing more is waste."""
        return self.future.done() or (self.deadline is not None and now >= self.deadline)


@dataclass
class CallJob:
    """Any other engine work (an ingest chunk, a task lookup), run in queue order on the worker thread."""

    fn: Callable[[Engine], Any]
    future: asyncio.Future[Any]
    enqueued: float = field(default_factory=time.monotonic)


Job = ClassifyJob | CallJob
Slice = tuple[ClassifyJob, int, int]  # a job and the [start, end) of its texts (or backlog) in one batch


class ModelWorker:
    def __init__(self, max_batch_size: int, max_wait_s: float, queue_size: int, metrics: Metrics | None = None):
        self.engine: Engine | None = None
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.metrics = metrics
        self.queue_size = queue_size  # jobs waiting to start, at most
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raee-model")
        self._key_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raee-key")
        self._runner: asyncio.Task[None] | None = None
        self._model_runner: asyncio.Task[None] | None = None
        self._backbone_work = asyncio.Event()  # a backlog or a call job is waiting for the model thread
        self._active: deque[ClassifyJob] = deque()  # classify jobs taken from the queue, not yet settled
        self._calls: deque[CallJob] = deque()
        self._unsettled = 0  # jobs accepted and not yet answered (drain waits for 0)
        self._settled = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._runner = loop.create_task(self._run(), name="raee-key-stage")
        self._model_runner = loop.create_task(self._run_model(), name="raee-batcher")

    async def load(self, factory: Callable[[], Engine]) -> None:
        """Build the engine on the worker thread (model loading must not block the event loop)."""
        self.engine = await asyncio.get_running_loop().run_in_executor(self._thread, factory)

    @property
    def alive(self) -> bool:
        """The batcher loop is running (liveness: false means the process should be restarted)."""
        return all(r is not None and not r.done() for r in (self._runner, self._model_runner))

    async def drain(self) -> None:
        """Finish every accepted job, then stop the batcher."""
        while self._unsettled and self.alive:
            self._settled.clear()
            await self._settled.wait()
        for runner in (self._runner, self._model_runner):
            if runner:
                runner.cancel()

    def close(self) -> None:
        self._key_thread.shutdown(wait=True)
        self._thread.shutdown(wait=True)
        if self.engine is not None:
            self.engine.close()

    # -- submitting --------------------------------------------------------------

    def _submit(self, job: Job) -> None:
        if self.engine is None:
            raise NotReady("the model and stores are still loading; retry shortly")
        if not self.alive:
            raise NotReady("the model worker is not running; the service is restarting")
        if self.waiting >= self.queue_size:
            raise Overloaded(f"request queue full ({self.queue_size} waiting); retry with backoff")
        self._queue.put_nowait(job)
        self._unsettled += 1
        self._gauge()

    async def classify(self, task: str, texts: Sequence[Example], policy: str | ExitPolicy | None, k: int | None,
                       deadline: float | None = None) -> tuple[list[Prediction], float]:
        """Answers and the time the job was queued (time.monotonic())."""
        future: asyncio.Future[list[Prediction]] = asyncio.get_running_loop().create_future()
        job = ClassifyJob(task, list(texts), policy, k, deadline, future, trace_context=tracing.current())
        self._submit(job)
        result = await future
        return result, job.enqueued

    async def call(self, fn: Callable[[Engine], T]) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._submit(CallJob(fn, future))
        return await future

    async def call_now(self, fn: Callable[[Engine], T]) -> T:
        """Run `fn` on the worker thread past the queue: bookkeeping that must happen even when the
        queue is full or the caller is being cancelled (e.g. closing an ingest batch's row)."""
        if self.engine is None:
            raise NotReady("the model and stores are still loading")
        engine = self.engine
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, engine)

    # -- the scheduler -----------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Accepted jobs whose backbone compute has not started, and none of whose texts is answered
        (the bounded queue's length)."""
        # a job counts until its first answer or backbone batch: the key stage is quick, the backbone is not
        return self._queue.qsize() + len(self._calls) + sum(1 for j in self._active if j.taken == j.answered == 0)

    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(self.waiting)

    def _take(self, job: Job) -> None:
        if isinstance(job, CallJob):
            self._calls.append(job)
            self._backbone_work.set()
        else:
            self._active.append(job)

    def _settle_job(self) -> None:
        self._unsettled -= 1
        self._settled.set()
        self._gauge()

    def _key_work(self) -> int:
        """Texts waiting for the key stage (or jobs for validation)."""
        return sum(len(j.examples) - j.keyed + (j.resolved is None) for j in self._active)

    async def _collect(self) -> None:
        """Move queued jobs into the scheduler; with nothing for the key stage, wait for work, then up
        to `max_wait_s` for more to fill the batch (so concurrent single requests batch)."""
        while not self._queue.empty():
            self._take(self._queue.get_nowait())
        if self._key_work():
            return
        self._take(await self._queue.get())
        stop_at = time.monotonic() + self.max_wait_s
        while self._key_work() < self.max_batch_size and not self._calls:
            remaining = stop_at - time.monotonic()
            if remaining <= 0:
                break
            try:
                self._take(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break

    async def _run(self) -> None:
        """The key stage's loop: new jobs validated, then a batch of their texts through the key stage."""
        loop = asyncio.get_running_loop()
        while True:
            await self._collect()
            try:
                await self._key_turn(loop)
            except asyncio.CancelledError:
                raise
            except BaseException:  # never let one job stop the loop
                log.exception("key stage turn failed; its jobs were answered INTERNAL")
                self._fail_active(RuntimeError("the model worker failed on this request"))

    async def _run_model(self) -> None:
        """The model thread's loop: one call job, then one backbone batch, per turn (neither starves)."""
        loop = asyncio.get_running_loop()
        while True:
            await self._backbone_work.wait()
            try:
                if self._calls:
                    job = self._calls.popleft()
                    try:
                        if not job.future.done():
                            assert self.engine is not None  # _submit takes no job before the engine is loaded
                            await self._deliver(job.future, loop.run_in_executor(self._thread, job.fn, self.engine))
                    finally:
                        self._settle_job()
                await self._backbone_turn(loop)
            except asyncio.CancelledError:
                raise
            except BaseException:
                log.exception("model worker turn failed; its jobs were answered INTERNAL")
                self._fail_active(RuntimeError("the model worker failed on this request"))
            if not self._calls and not self._plan_ready():
                self._backbone_work.clear()

    def _fail_active(self, exc: BaseException) -> None:
        for job in list(self._active):
            self._finish(job, exc)

    async def _key_turn(self, loop: asyncio.AbstractEventLoop) -> None:
        self._drop_abandoned()
        fresh = [j for j in self._active if j.resolved is None]
        if fresh:
            errors = await loop.run_in_executor(self._key_thread, self._validate, fresh)
            for job, error in zip(fresh, errors):
                if error is not None:
                    self._finish(job, error)
        batch = self._plan_keys()
        if not batch:
            return
        outcomes = await loop.run_in_executor(self._key_thread, self._prepare, batch)
        for (job, start, end), outcome in zip(batch, outcomes):
            if isinstance(outcome, BaseException) or job not in self._active:  # failed, or dropped meanwhile
                self._finish(job, outcome if isinstance(outcome, BaseException) else job.results)
                continue
            prepared, answered = outcome
            for i, row in enumerate(range(start, end)):
                if row in answered:
                    job.results[row] = answered[row]
                    job.answered += 1
                else:
                    job.backlog.append(row)
                    job.prepared[row] = prepared.rows([i])
            if job.answered == len(job.texts):
                self._finish(job, job.results)
            elif job.backlog:
                self._backbone_work.set()

    async def _backbone_turn(self, loop: asyncio.AbstractEventLoop) -> None:
        self._drop_abandoned()
        batch = self._plan()
        if not batch:
            return
        outcomes = await loop.run_in_executor(self._thread, self._compute, batch)
        for (job, start, end), outcome in zip(batch, outcomes):
            if isinstance(outcome, BaseException):
                self._finish(job, outcome)
            elif job in self._active:
                for row, prediction in zip(job.backlog[start:end], outcome):
                    job.results[row] = prediction
                job.answered += end - start
                if job.answered == len(job.texts):
                    self._finish(job, job.results)

    def _drop_abandoned(self) -> None:
        now = time.monotonic()
        for job in [j for j in self._active if j.abandoned(now)]:
            expired = DeadlineExpired("deadline passed before the request was computed; the rest was dropped")
            self._finish(job, expired)

    def _finish(self, job: ClassifyJob, outcome: list[Prediction] | BaseException) -> None:
        if job not in self._active:
            return
        self._active.remove(job)
        if not job.future.done():
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)
        self._settle_job()

    def _slices(self, jobs: list[ClassifyJob], counter: str, end: Callable[[ClassifyJob], int]) -> list[Slice]:
        """Up to `max_batch_size` texts, an equal share from each job in turn (oldest first), each job's
        from its `counter` ("keyed": its texts; "taken": its backlog) on, which advances; a job that was
        served goes to the back of the line."""
        budget = self.max_batch_size
        share = max(1, -(-budget // max(len(jobs), 1)))
        batch: list[Slice] = []
        for job in jobs:
            if budget <= 0:
                break
            at = getattr(job, counter)
            n = min(share, budget, end(job) - at)
            batch.append((job, at, at + n))
            setattr(job, counter, at + n)
            budget -= n
            self._active.remove(job)
            self._active.append(job)
        return batch

    def _plan_keys(self) -> list[Slice]:
        """The key stage's next batch: texts of the validated jobs, round-robin; a job's texts in order."""
        jobs = [j for j in self._active if j.resolved is not None and j.keyed < len(j.texts)]
        return self._slices(jobs, "keyed", lambda j: len(j.texts))

    def _plan_ready(self) -> bool:
        return any(j.taken < len(j.backlog) for j in self._active)

    def _plan(self) -> list[Slice]:
        """The backbone's next batch: backlog texts, round-robin over the jobs that have some; a slice is
        the [start, end) of a job's backlog."""
        return self._slices([j for j in self._active if j.taken < len(j.backlog)], "taken", lambda j: len(j.backlog))

    # -- on the worker thread ------------------------------------------------------

    def _validate(self, jobs: list[ClassifyJob]) -> list[BaseException | None]:
        """Check each new job once (task, texts, policy, k); its chunks then run without re-checking."""
        assert self.engine is not None
        errors: list[BaseException | None] = []
        for job in jobs:
            try:
                job.texts = self.engine.texts_of(job.task, job.examples)
                job.resolved = self.engine.validate(job.task, job.policy, job.k)
                job.results = [None] * len(job.texts)  # type: ignore[list-item]  # filled chunk by chunk
                errors.append(None)
            except RaeeError as exc:
                errors.append(exc)
            except Exception as exc:
                log.exception("validating a request for task %r failed", job.task)
                errors.append(exc)
        return errors

    def _groups(self, batch: list[Slice]) -> dict[tuple[str, str, int], list[int]]:
        """Slices of one batch by (task, policy as served, k): each group is one engine call."""
        groups: dict[tuple[str, str, int], list[int]] = defaultdict(list)
        for i, (job, _, _) in enumerate(batch):
            assert job.resolved is not None
            groups[(job.task, job.resolved.served, job.resolved.k)].append(i)
        return groups

    def _prepare(self, batch: list[Slice]) -> list[tuple[Prepared, dict[int, Prediction]] | BaseException]:
        """The key stage of one batch (on the key thread): per slice, its prepared rows and the answers
        of the rows that need no backbone, by text index. A failing group fails alone."""
        assert self.engine is not None
        outcomes: list[tuple[Prepared, dict[int, Prediction]] | BaseException | None] = [None] * len(batch)
        for (task, served, k), members in self._groups(batch).items():
            policy = batch[members[0]][0].resolved.policy  # type: ignore[union-attr]  # grouped: resolved
            texts = [t for i in members for t in batch[i][0].texts[batch[i][1] : batch[i][2]]]
            callers = [batch[i][0].trace_context for i in members]
            try:
                with tracing.span("raee.key_stage", parent=callers[0], linked=callers, task=task, policy=served,
                                  k=k, texts=len(texts), requests=len(members)):
                    prepared = self.engine.prepare(task, texts, policy, k, served)
                    early = prepared.without_backbone
                    answers = dict(zip(early, self.engine.complete(prepared.rows(early)))) if early else {}
            except Exception as exc:
                if not isinstance(exc, RaeeError):
                    log.exception("key stage of %d texts for task %s failed", len(texts), task)
                for i in members:
                    outcomes[i] = exc
                continue
            if self.metrics and early:
                self.metrics.classified.inc(len(early))
            offset = 0
            for i in members:
                job, start, end = batch[i]
                n = end - start
                mine = prepared.rows(range(offset, offset + n))
                outcomes[i] = (mine, {start + j - offset: a for j, a in answers.items() if offset <= j < offset + n})
                offset += n
        return [o if o is not None else RuntimeError("slice not prepared") for o in outcomes]

    def _compute(self, batch: list[Slice]) -> list[list[Prediction] | BaseException]:
        """One backbone batch (on the model thread): prepared rows grouped by (task, policy as served, k);
        a failing group fails alone."""
        assert self.engine is not None
        outcomes: list[list[Prediction] | BaseException | None] = [None] * len(batch)
        for (task, policy_name, k), members in self._groups(batch).items():
            rows = [job.prepared[row] for job, start, end in (batch[i] for i in members)
                    for row in job.backlog[start:end]]
            start = time.perf_counter()
            callers = [batch[i][0].trace_context for i in members]
            try:
                with tracing.span("raee.batch", parent=callers[0], linked=callers, task=task, policy=policy_name,
                                  k=k, texts=len(rows), requests=len(members)):
                    predictions = self.engine.complete(Prepared.join(rows))
            except Exception as exc:
                if not isinstance(exc, RaeeError):
                    log.exception("batch of %d texts for task %s failed", len(rows), task)
                for i in members:
                    outcomes[i] = exc
                continue
            if self.metrics:
                self.metrics.batch_size.observe(len(rows))
                self.metrics.classified.inc(len(rows))
                self.metrics.stage.labels("batch").observe(time.perf_counter() - start)
            offset = 0
            for i in members:
                n = batch[i][2] - batch[i][1]
                outcomes[i] = predictions[offset : offset + n]
                offset += n
        return [o if o is not None else RuntimeError("slice not computed") for o in outcomes]

    @staticmethod
    async def _deliver(future: asyncio.Future[Any], work: asyncio.Future[Any]) -> None:
        try:
            result = await work
        except Exception as exc:  # delivered to the caller, mapped to a status code there
            if not isinstance(exc, RaeeError):
                log.exception("worker call failed")
            if not future.done():
                future.set_exception(exc)
        else:
            if not future.done():
                future.set_result(result)
