"""The data plane: classify and ingest, with no transport code.

The CLI calls it directly; the gRPC servicer calls it from its model worker.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from raee_server import tracing
from raee_server.core.heads import ExitHeads
from raee_server.core.ingest import RecordWrites
from raee_server.core.policies import (
    DEFAULT_POLICY,
    Decision,
    ExitPolicy,
    Resolved,
    bind,
    mix,
    parse_policy,
    reads_heads,
    settle,
    untuned_fallback,
    uses_head_exits,
)
from raee_server.core.prepared import Prepared
from raee_server.core.prior import PriorTracker
from raee_server.errors import InvalidInput, NotReady, StoreMismatch
from raee_server.models.backbone import Backbone, LabelHead
from raee_server.models.encoders import KeyEncoder
from raee_server.models.hardware import dtype_problem
from raee_server.settings import Settings
from raee_server.stores.metadata import MetadataStore, TaskInfo
from raee_server.stores.records import to_features
from raee_server.stores.vectors import VectorStore
from raee_server.types import Example, Neighbour, Prediction, TaskSpec

log = logging.getLogger(__name__)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _us(seconds: float) -> int:
    return int(seconds * 1e6)


class Engine(RecordWrites):
    def __init__(
        self,
        backbone: Backbone,
        encoder: KeyEncoder,
        vectors: VectorStore,
        metadata: MetadataStore,
        settings: Settings | None = None,
    ) -> None:
        self.backbone = backbone
        self.encoder = encoder
        self.vectors = vectors
        self.metadata = metadata
        self.settings = settings or Settings()
        self._tasks: dict[str, tuple[TaskSpec, LabelHead]] = {}
        self._info: dict[str, tuple[float, TaskInfo | None]] = {}  # task -> (read at, its metadata)
        self._trackers: dict[str, PriorTracker] = {}  # tasks that adapt to the traffic's label prior
        self._heads: dict[str, tuple[float, ExitHeads | None]] = {}  # task -> (checked at, loaded heads)

    @classmethod
    def open(cls, settings: Settings) -> Engine:
        """Load the models and open the stores named by the settings."""
        import torch

        from raee_server.models.encoders import load_encoder
        from raee_server.models.loading import load_backbone
        from raee_server.stores.vectors import collection_name, open_vector_store

        if settings.threads:
            torch.set_num_threads(settings.threads)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        backbone = load_backbone(settings.backbone, settings.models_dir, settings.device, settings.dtype,
                                 settings.max_tokens)
        encoder = load_encoder(settings.encoder, settings.device, backbone, settings.key_runtime,
                               settings.models_dir, settings.threads)
        vectors = open_vector_store(settings, collection_name(backbone.model_id, encoder.model_id), encoder.dim)
        return cls(backbone, encoder, vectors, MetadataStore(settings.sql_url), settings)

    @classmethod
    def open_for_serving(cls, settings: Settings) -> Engine:
        """Engine.open, then build pending vector indexes (RAEE_INDEX_ON_START) before any request. A dtype
        the processor would only emulate is refused first: a server must not answer many times slower."""
        if problem := dtype_problem(settings.device, settings.dtype):
            raise InvalidInput(problem, field="dtype")
        engine = cls.open(settings)
        # Exclusive: no other process can be ingesting, so a `running` batch was cut off.
        if engine.vectors.exclusive and (stale := engine.metadata.close_stale_batches()):
            log.warning("%d ingest batch(es) left running by a process that stopped: marked interrupted", stale)
        if settings.index_on_start:
            engine.build_index()
        return engine

    def build_index(self) -> float:
        """Build the vector store's pending indexes; returns the seconds it took. On the embedded store
        this blocks the whole process (EdgeVectorStore): callers run it where no request waits (while
        the server loads, or at the end of a local ingest)."""
        start = time.perf_counter()
        log.info("indexing the vector store (%d points) ...", self.vectors.count())
        changed = self.vectors.optimize()
        seconds = time.perf_counter() - start
        log.info("vector store %s in %.1f s", "indexed" if changed else "already indexed", seconds)
        return seconds

    def close(self) -> None:
        self.vectors.close()
        self.metadata.close()

    @property
    def depth(self) -> int:
        return self.backbone.depth

    # -- tasks ---------------------------------------------------------------

    def create_task(self, spec: TaskSpec) -> None:
        spec.validate()
        self.backbone.check_template(spec.template)  # e.g. a masked LM needs a {mask} slot
        self.backbone.label_token_ids([lb.word for lb in spec.labels])  # rejects colliding label words
        self.metadata.create_task(spec, self.backbone.model_id, self.encoder.model_id)

    def delete_task(self, name: str) -> None:
        self.metadata.task(name)  # TaskNotFound before touching anything
        self.vectors.delete_task(name)
        self.metadata.delete_task(name)
        self._tasks.pop(name, None)
        self._info.pop(name, None)
        self._trackers.pop(name, None)

    def spec(self, name: str) -> TaskSpec:
        """The task's spec, from the in-memory cache (no SQL on the hot path)."""
        return self._task(name)[0]

    def task_info(self, name: str) -> TaskInfo:
        return self.metadata.task(name)

    def _prompt(self, spec: TaskSpec, text: str) -> str:
        return self.backbone.format_prompt(spec.prompt(text))

    def _task(self, name: str) -> tuple[TaskSpec, LabelHead]:
        cached = self._tasks.get(name)
        if cached is None:
            info = self.metadata.task(name)
            if (info.backbone_id, info.encoder_id) != (self.backbone.model_id, self.encoder.model_id):
                raise StoreMismatch(
                    f"task {name!r} was built with backbone {info.backbone_id!r} and encoder {info.encoder_id!r}; "
                    f"this service runs {self.backbone.model_id!r} and {self.encoder.model_id!r}"
                )
            ids = self.backbone.label_token_ids([lb.word for lb in info.spec.labels])
            cached = (info.spec, self.backbone.label_head(ids))
            self._tasks[name] = cached
        return cached

    # -- classify ------------------------------------------------------------

    def texts_of(self, task: str, examples: Sequence[Example], field_name: str = "text") -> list[str]:
        """A request's examples (texts, or the task's inputs by name), checked, in the engine's one text
        form (`TaskSpec.texts_of`)."""
        return self._task(task)[0].texts_of(examples, field_name, self.settings.max_text_chars)

    def keys(self, spec: TaskSpec, texts: Sequence[str]) -> np.ndarray:
        """The retrieval keys [n, d] of texts in the engine's form: a single-text task's texts as they are;
        several inputs as `spec.retrieval_key` says (one text to encode, or each input alone, averaged)."""
        if spec.several and spec.retrieval_key == "mean":
            parts = [np.asarray(self.encoder.encode([spec.values_of(t)[name] for t in texts]), dtype=np.float32)
                     for name in spec.inputs]
            total = np.sum(parts, axis=0)
            return np.asarray(total / np.maximum(np.linalg.norm(total, axis=1, keepdims=True), 1e-12))
        return np.asarray(self.encoder.encode([spec.key_text(t) for t in texts]))

    def check_k(self, k: int | None) -> int:
        k = self.settings.default_k if k is None or k == 0 else k
        if not 1 <= k <= self.settings.max_k:
            raise InvalidInput(f"k: {k} out of range 1..{self.settings.max_k}", "options.k")
        return k

    def validate(self, task: str, policy: str | ExitPolicy | None, k: int | None) -> Resolved:
        """A classify request's policy, k and served name, computing nothing (`texts_of` checks its examples:
        the worker has their normalised form from it already, so they are not parsed twice)."""
        try:
            return self.resolve_policy(task, policy, k)
        except InvalidInput as exc:  # the policy's own checks know what is wrong, not where it came from
            if exc.field is None:
                exc.field = "options.policy"
            raise

    def resolve_policy(self, task: str, policy: str | ExitPolicy | None, k: int | None) -> Resolved:
        """A policy by name (or as given) and its k; none named, or `auto`: the task's stored choice. A
        policy that reads exit heads needs the task's heads (`heads` alone: the exit that scored best)."""
        auto = policy is None or (isinstance(policy, str) and policy.strip() in ("", DEFAULT_POLICY))
        untuned = False
        if policy is None or auto:
            chosen, tuned_k, untuned = self.auto_policy(task)
            k = k or tuned_k
        else:
            chosen = parse_policy(policy) if isinstance(policy, str) else policy
        if reads_heads(chosen):
            heads = self.heads(task)
            if heads is None:
                raise InvalidInput(f"policy: {chosen.name} needs exit heads and task {task!r} has none yet "
                                   "(fit them with `raee-admin fit-heads`)")
            chosen = bind(chosen, heads)
        served = f"auto={chosen.name}{' (no auto choice yet)' if untuned else ''}" if auto else chosen.name
        return Resolved(chosen, self.check_k(k), served)

    def auto_policy(self, task: str) -> tuple[ExitPolicy, int | None, bool]:
        """The task's stored `auto` choice (policy and k; False), or, until a choice is made (a task
        with under auto.MIN_RECORDS records, or before the first tune), `untuned_fallback` (True).
        Never tunes: tuning runs off the request path (raee_server.core.auto). The choice is re-read from
        SQL at most every `retune_check_seconds`, so a choice made by another process shows up.
        """
        info = self._recent_info(task)
        choice = info.tuned if info else None
        if choice is not None:
            return parse_policy(choice.policy), choice.k, False
        return parse_policy(untuned_fallback(info.records if info else 0, self.heads(task) is not None)), None, True

    def forget_choice(self, task: str) -> None:
        """Drop the cached `auto` choice (a new one was just stored)."""
        self._info.pop(task, None)

    def _recent_info(self, task: str) -> TaskInfo | None:
        """The task's metadata as read at most `retune_check_seconds` ago: one SQL read per period for
        what the request path needs of it (the `auto` choice, the records' label mix), so a choice made
        by another process shows up. While SQL is down, the last read (None if there was none)."""
        cached = self._info.get(task)
        now = time.monotonic()
        if cached is None or now - cached[0] > self.settings.retune_check_seconds:
            try:
                cached = (now, self.metadata.task(task))
            except NotReady:  # SQL down
                cached = (now, cached[1] if cached else None)
            self._info[task] = cached
        return cached[1]

    def neighbours(self, task: str, texts: Sequence[str], k: int) -> tuple[list[list[Neighbour]], dict[str, int]]:
        """The k nearest records of each text, each weighed by its label's prior correction."""
        _, found, timings = self.retrieve(task, texts, k)
        return found, timings

    def retrieve(self, task: str, texts: Sequence[str], k: int
                 ) -> tuple[np.ndarray, list[list[Neighbour]], dict[str, int]]:
        """`neighbours`, with the texts' keys [n, d]."""
        t0 = time.perf_counter()
        with tracing.span("raee.encode", texts=len(texts)):
            keys = self.keys(self._task(task)[0], texts)
        t1 = time.perf_counter()
        with tracing.span("raee.retrieve", k=k):
            found = self.vectors.search(task, keys, k)
            weights = self.label_weights(task)
            if weights:
                found = [[replace(n, weight=weights.get(n.label, 1.0)) for n in row] for row in found]
        t2 = time.perf_counter()
        return np.asarray(keys), found, {"encode_us": _us(t1 - t0), "retrieve_us": _us(t2 - t1)}

    def prior_tracker(self, task: str) -> PriorTracker | None:
        """The task's online traffic-prior estimate (None unless the task opted in with
        `adapt_prior`). Its train prior is what the answers assume: the expected shares when the
        votes are corrected toward them, else the records' own mix."""
        spec, _ = self._task(task)
        if not spec.adapt_prior:
            return None
        tracker = self._trackers.get(task)
        if tracker is None:
            if spec.prior_correction:
                train = spec.shares
            else:
                counts = self.metadata.task(task).label_records
                total = sum(counts.values()) or 1
                train = [max(counts.get(name, 0) / total, 1e-3) for name in spec.label_names]
            tracker = PriorTracker(spec.label_names, train)
            self._trackers[task] = tracker
        return tracker

    def active_prior(self, task: str) -> PriorTracker | None:
        """The task's traffic-prior tracker once its estimate is active (reads no store: callable
        from any thread)."""
        tracker = self._trackers.get(task)
        return tracker if tracker is not None and tracker.active else None

    def label_weights(self, task: str) -> dict[str, float]:
        """Per label, its expected traffic share (declared, else equal) over its share of the task's
        records: the weight of a neighbour with that label in votes and in the paper's aggregation,
        so a label the records over-represent does not win by numbers alone. Empty when the task
        opts out (`prior_correction = false`). Re-read at most every `retune_check_seconds`."""
        info = self._recent_info(task)
        if info is None:
            return {}
        total = sum(info.label_records.values())
        if not info.spec.prior_correction or not total:
            return {}
        return {label.name: want * total / info.label_records[label.name]
                for label, want in zip(info.spec.labels, info.spec.shares) if info.label_records.get(label.name)}

    def classify(
        self, task: str, examples: Sequence[Example], policy: str | ExitPolicy | None = None, k: int | None = None
    ) -> list[Prediction]:
        """RAEE inference: retrieve neighbours, decide each row's exit, run only up to it. No policy: `auto`.
        `examples`: texts, or the task's inputs by name."""
        texts = self.texts_of(task, examples)
        chosen, k, served = self.validate(task, policy, k)
        return self.classify_validated(task, texts, chosen, k, served)

    def classify_validated(self, task: str, texts: Sequence[str], chosen: ExitPolicy, k: int,
                           served: str | None = None) -> list[Prediction]:
        """`classify` for a request that `validate` has already checked; `served` names the policy in each
        answer (default: the policy's own name). The two stages in turn: `prepare`, then `complete`."""
        return self.complete(self.prepare(task, texts, chosen, k, served))

    def prepare(self, task: str, texts: Sequence[str], chosen: ExitPolicy, k: int,
                served: str | None = None) -> Prepared:
        """The stage before the backbone: the keys, the neighbours, each row's decision, settled by the
        key head and the records' coverage (`policies.settle`). Rows the key answers need nothing more:
        the server answers them at once, without waiting for the backbone (raee_server.serving.worker)."""
        spec, _ = self._task(task)
        heads = self.heads(task) if reads_heads(chosen) else None
        timings: dict[str, int] = {"encode_us": 0, "retrieve_us": 0}
        if chosen.uses_neighbours:
            keys, found, timings = self.retrieve(task, texts, k)
        else:
            keys, found = None, [[] for _ in texts]
        seen = [self.head_judged(n, heads, spec) for n in found] if heads and uses_head_exits(chosen) else found
        decisions = [chosen.decide(n, self.depth, spec.label_names) for n in seen]
        covered: list[bool | None] = [None] * len(texts)
        learned = heads or (self.heads(task) if keys is not None else None)  # the records' coverage is theirs
        if learned is not None and learned.coverage is not None and keys is not None:  # drift, for any policy
            covered = [learned.covers(t, n) for t, n in zip(texts, found)]
        if heads is not None and keys is not None:
            key_probs = heads.key_probs(keys)
            decisions = [settle(d, None if key_probs is None else key_probs[i], covered[i] is not False)
                         for i, d in enumerate(decisions)]
        return Prepared(task, list(texts), served or chosen.name, decisions, found, covered, timings, heads)

    def complete(self, prepared: Prepared) -> list[Prediction]:
        """The backbone stage of prepared rows: each row runs to its exit (none for rows answered
        without it), then the traffic prior (where the task adapts to it) and the answers."""
        spec, head = self._task(prepared.task)
        timings = dict(prepared.timings)
        t0 = time.perf_counter()
        with tracing.span("raee.forward", policy=prepared.served, texts=len(prepared.texts)):
            probs, exits = self.forward_at(spec, head, prepared.texts, prepared.decisions, prepared.heads)
            tracker = self.prior_tracker(prepared.task)
            if tracker is not None:  # learn from the answers as made, then answer toward the traffic's mix
                tracker.observe(probs)
                probs = tracker.adjust(probs)
        timings["forward_us"] = _us(time.perf_counter() - t0)
        return [
            Prediction(spec.labels[int(p.argmax())].name, p.tolist(), e, self.depth, n, dict(timings),
                       spec.label_names, prepared.served, d.answered_by, c)
            for p, e, n, d, c in zip(probs, exits, prepared.found, prepared.decisions, prepared.covered)
        ]

    @staticmethod
    def head_judged(neighbours: list[Neighbour], heads: ExitHeads, spec: TaskSpec) -> list[Neighbour]:
        """The neighbours with the exits their heads judged correct (out of fold) as their exits."""
        out = []
        for n in neighbours:
            judged = heads.judged(n.id)
            if judged is None:  # ingested after the heads were fit: no head judgment yet
                out.append(replace(n, exits=()))
                continue
            gold = spec.label_index(n.label)
            exits = tuple((layer, float(p[gold])) for layer, p in enumerate(judged) if int(p.argmax()) == gold)
            out.append(replace(n, exits=exits))
        return out

    def forward_at(
        self, spec: TaskSpec, head: LabelHead, texts: Sequence[str], decisions: Sequence[Decision],
        heads: ExitHeads | None = None,
    ) -> tuple[np.ndarray, list[int]]:
        """Label probabilities of each text where its decision exits, and those exits.

        Rows that need the backbone run batched, layer by layer, each leaving the batch at its own
        exit (a row's stop rule, or its fixed exit): no row runs deeper than its exit, and the
        layers below run once for all of them. Fixed exits that are all the same, or a backbone
        whose walk cannot share one pass (encoder-decoder), run grouped by (reader, exit) instead.
        Rows answered without the backbone run nothing. An exit is read by the lens or, for
        `reader="heads"`, by the task's exit head; a decision's prior multiplies it.
        """
        out = np.zeros((len(texts), len(spec.labels)), dtype=np.float64)
        exits = [d.max_layer for d in decisions]
        groups: dict[tuple[str, int], list[int]] = defaultdict(list)
        walking: dict[str, list[int]] = defaultdict(list)
        fixed: dict[str, list[int]] = defaultdict(list)
        for i, d in enumerate(decisions):
            if d.answer is not None:
                out[i], exits[i] = d.answer, 0
            elif d.stop is not None:
                walking[d.reader].append(i)
            else:
                fixed[d.reader].append(i)
        for reader, rows in fixed.items():
            # one exit for all (a lone row, `full`): a plain forward, without the walk's per-layer hooks
            if self.backbone.walks_in_one_pass and len({decisions[i].max_layer for i in rows}) > 1:
                walking[reader] += rows
            else:
                for i in rows:
                    groups[(reader, decisions[i].max_layer)].append(i)
        size = self.settings.forward_batch_size
        for rows in walking.values():
            for start in range(0, len(rows), size):
                self._walk(spec, head, heads, texts, decisions, rows[start : start + size], out, exits)
        for (reader, layer), rows in sorted(groups.items()):
            for start in range(0, len(rows), size):
                chunk = rows[start : start + size]
                prompts = [self._prompt(spec, texts[i]) for i in chunk]
                if reader == "heads":
                    assert heads is not None
                    probs = heads.probs(layer, self.backbone.exit_features(prompts, layer))
                else:
                    probs = softmax(self.backbone.exit_logits(prompts, head, layer).cpu().numpy().astype(np.float64))
                for i, p in zip(chunk, probs):
                    out[i] = mix(p, decisions[i].prior)
        return out, exits

    def _walk(self, spec: TaskSpec, head: LabelHead, heads: ExitHeads | None, texts: Sequence[str],
              decisions: Sequence[Decision], rows: list[int], out: np.ndarray, exits: list[int]) -> None:
        """Rows of one reader in one batched forward, exit by exit: a row's answer is taken at the
        first exit where its stop rule holds, or at its bound (a fixed exit is a bound with no
        rule), and the row leaves the batch there (a shrinking batch: later layers run on the rows
        still open only)."""

        def visit(layer: int, live: list[int], features: torch.Tensor) -> list[int]:
            if not any(layer >= decisions[rows[j]].max_layer or decisions[rows[j]].stop is not None for j in live):
                return []  # only fixed exits further on: nothing to read here
            if decisions[rows[live[0]]].reader == "heads":  # the caller walks one reader at a time
                assert heads is not None
                probs = heads.probs(layer, features)
            else:
                probs = softmax(self.backbone.lens(features, head).cpu().numpy().astype(np.float64))
            done = []
            for j, p in zip(live, probs):
                d = decisions[rows[j]]
                mixed = mix(p, d.prior)
                if layer >= d.max_layer or (d.stop is not None and d.stop(layer, mixed)):
                    out[rows[j]], exits[rows[j]] = mixed, layer
                    done.append(j)
            return done

        last = max(decisions[i].max_layer for i in rows)
        self.backbone.walk_exits([self._prompt(spec, texts[i]) for i in rows], last, visit)

    def all_exits(self, task: str, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """One full forward per row: label-word logits [n, L + 1, C] and exit features
        [n, L + 1, H] (float16, as stored) at every exit."""
        spec, head = self._task(task)
        if not texts:
            return np.zeros((0, self.depth + 1, len(spec.labels))), np.zeros((0, self.depth + 1, 0), np.float16)
        size = self.settings.forward_batch_size
        prompts = [self._prompt(spec, t) for t in texts]
        # Rows of similar length batched together: padding is computed and thrown away, and prompts
        # of 19 and 65 tokens side by side cost two 65-token rows. Answers come back in input order.
        order = np.arange(len(prompts))
        if self.settings.ingest_sort_by_length:
            order = np.argsort(self.backbone.token_counts(prompts), kind="stable")
        logits, features = [], []
        for i in range(0, len(prompts), size):
            f = self.backbone.all_exit_features([prompts[j] for j in order[i : i + size]])
            logits.append(self.backbone.lens(f, head).cpu().numpy())
            features.append(to_features(f.float().cpu().numpy()))
        back = np.argsort(order)
        return np.concatenate(logits)[back], np.concatenate(features)[back]

    # -- exit heads ----------------------------------------------------------

    def heads(self, task: str) -> ExitHeads | None:
        """The task's newest exit heads, loaded once per version; checked for a newer version at
        most every `retune_check_seconds` (a fit elsewhere replaces them atomically)."""
        now = time.monotonic()
        cached = self._heads.get(task)
        if cached is not None and now - cached[0] <= self.settings.retune_check_seconds:
            return cached[1]
        current = cached[1] if cached else None
        try:
            stored = self.metadata.heads(task, newer_than=current.version if current else 0)
        except NotReady:  # SQL down: keep serving the loaded heads
            stored = None
        if stored is not None:
            current = ExitHeads.from_stored(stored)
        self._heads[task] = (now, current)
        return current

    def forget_heads(self, task: str) -> None:
        self._heads.pop(task, None)
