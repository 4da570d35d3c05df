"""Ray transport: the engine's workers are Ray actors, on this machine or across a cluster.

    engine --send(slot, bid, failed, payload)--> actor.run.remote(bid, failed, payload)
                                                     |  one encoded blob per batch (``_wire``);
                                                     |  Ray moves it (inline, or through its
                                                     v  object store when over ~100 KB)
                                     actor of the slot (its own process; one per slot)
                                                     |  run_task: decode, run, encode
                                                     v  returns (seconds, results blob, retire)
    Ray's thread: ref completed --> ObjectRef.future() callback --> SimpleQueue
                                                     |
    engine <--on_result/on_ready/on_init_error/on_retire/on_death-- [collector thread]

Which thread does what: the engine's threads submit (``send``, ``start_worker``); Ray's own
thread only appends "this reference completed" to a queue; one collector thread reads that
queue and makes every call into the engine, so the engine sees a single reporting thread, as
with the process transport.

Why actors, fed one batch per call: an actor keeps the worker's ``state`` (``init`` runs once in
its constructor) and runs its calls one at a time in submission order (``max_concurrency=1``), so
keyed items keep their order and state, exactly as in a worker process. The engine already
bounds what is in flight (``window``, ``DEPTH`` tasks per slot), so the transport adds no queue
of its own. ``ActorPool.map`` (submits the whole input, no backpressure) and
``ray.util.multiprocessing.Pool`` (keeps every result in memory) were considered and rejected
for those reasons.

Why a queue fed by ``ObjectRef.future()`` callbacks, not a loop over ``ray.wait``: ``ray.wait``
only watches the references it was given, so a new batch for an idle slot would go unseen until
a timeout; polling with a short timeout costs driver CPU and latency. The callbacks wake the
collector exactly once per answered call (and per control message: a new actor, a kill, stop),
and it sleeps otherwise: "one wait, many sources", as in the process transport.

Why answers are reported oldest first, per slot: a slot's results must reach the engine in the
order its tasks were sent, and two references of one actor may complete out of order as far as
the driver can see. A completed call is marked done; the collector reports a slot's calls from
the oldest while they are done, and stops at the first that is not.

Failures:

- ``init`` raising: the constructor catches it and ``ready()`` returns it, encoded like the
  process worker's INITERR frame (type kept, traceback as ``__cause__``) -> ``on_init_error``.
- An actor lost (``ray.kill``, its process or node gone): its oldest outstanding call fails
  with a ``RayActorError`` -> ``on_death(slot, None, pid, (bid of that call, -1))``, once per
  actor. Position -1: Ray cannot say which item was running, so the engine blames every item of
  that task (re-run with ``retries >= 1``, else ``WorkerCrashed`` at their indices) and re-queues
  the actor's later tasks. Any other error on a call (an object lost with its node) is treated as
  the actor's loss too: the actor is killed and replaced. Ray itself neither restarts the actor
  nor retries its calls (``max_restarts=0``, ``max_task_retries=0``): retrying is the engine's
  job, which alone knows what was delivered.
- An actor lost while idle is noticed when its next call fails (one killed through
  :meth:`RayTransport.kill` is reported at once).
- An actor that is not ready within ``start_timeout`` seconds (not enough CPUs in the cluster
  for every worker, say) -> ``on_init_error`` with a ``TimeoutError`` that says so.

Ray is imported only here, and only when a pool asks for ``backend="ray"``.
"""

from __future__ import annotations

import functools
import os
import pickle
import threading
import time
from array import array
from collections import deque
from concurrent.futures import Future
from queue import Empty, SimpleQueue
from typing import Any, Callable

from . import wire as _wire
from . import worker as _worker
from .base import TransportEvents

__all__ = ["OrdpoolActor", "RayTransport", "transport_factory"]

# Options of ``ray_options`` that are not ``ray.init`` arguments.
_OWN_OPTIONS = ("actor_options", "start_timeout")
# Actor options the transport sets itself: changing them would break ordering or recovery.
_FIXED_ACTOR_OPTIONS = {"max_concurrency": 1, "max_restarts": 0, "max_task_retries": 0}
_DEFAULT_START_TIMEOUT = 60.0


def _import_ray() -> Any:
    """``import ray``, or an ImportError that names the extra to install."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(
            "backend='ray' needs Ray, which is not installed: pip install 'ordpool[ray]'"
        ) from exc
    return ray


# -- the actor (runs in a Ray worker process) --------------------------------------------------


class OrdpoolActor:
    """One worker slot's actor: ``init`` once, then batches, one call at a time.

    Instantiated by Ray (``ray.remote(OrdpoolActor)``) in a process of its own; the driver never
    builds one. It is the Ray counterpart of :func:`.worker.worker_main`: the same spec
    bytes, the same batch step (:func:`.worker.run_task`), the same encodings.
    """

    def __init__(self, spec: bytes) -> None:
        # [bid running, position running, bid to cancel, position to cancel], as in a worker
        # process; nobody writes the last two here, so ordpool.cancelled() stays False.
        self._progress = array("q", [-1, 0, -1, -1])
        # worker_local() and cancelled() read these module globals of the actor's process.
        _worker._local = {}
        _worker._progress = self._progress
        self._call: Callable[[Any], Any] | None = None
        self._calls: dict[bytes, Callable[[Any], Any]] = {}  # stream callables, unpickled
        self._writer = _wire.ChunkWriter()  # results, in memory (no region here)
        self._initerr: bytes | None = None  # the INITERR frame when init raised
        self._max_tasks: int | None = None  # retire after this many items (max_tasks_per_child)
        self._done = 0  # items run by this actor
        self._retired = False
        try:
            fn, init, initargs, self._max_tasks = pickle.loads(spec)
            self._call = functools.partial(fn, init(*initargs)) if init is not None else fn
        except BaseException as exc:  # reported to the driver by ready()
            self._initerr = _wire.initerr_frame(exc)

    def ready(self) -> tuple[int, bytes | None]:
        """``(pid, None)`` once ``init`` has run, or ``(pid, INITERR frame)`` if it raised."""
        return os.getpid(), self._initerr

    def run(
        self, bid: int, failed: tuple[int, ...], payload: bytes, call: bytes = b""
    ) -> tuple[float, bytes, int, bool]:
        """Run one batch; returns ``(worker seconds, encoded results, items failed, retire)``.

        ``retire`` is True when this call reached ``max_tasks``: the actor runs nothing more
        (later calls return an empty answer that the driver ignores) and is replaced.
        """
        if self._retired or self._call is None:
            return 0.0, b"", 0, False
        start = time.perf_counter()
        progress = self._progress
        progress[0] = bid
        progress[1] = 0
        fn = _worker.stream_call(call, self._call, self._calls)
        encoded, nerrors, ran = _worker.run_task(
            fn, memoryview(payload), None, set(failed), progress, self._writer
        )
        assert encoded is not None  # no region given: the results come back in memory
        self._done += ran
        self._retired = self._max_tasks is not None and self._done >= self._max_tasks
        return time.perf_counter() - start, encoded, nerrors, self._retired


@functools.lru_cache(maxsize=1)
def _actor_class() -> Any:
    """The Ray actor class (built on first use: decorating needs Ray imported)."""
    ray = _import_ray()
    return ray.remote(**_FIXED_ACTOR_OPTIONS)(OrdpoolActor)


# -- who started Ray ---------------------------------------------------------------------------

_RAY_LOCK = threading.Lock()  # guards the two globals below
# Job id of the driver connection this module opened with ray.init(), or None: we shut it down
# when the last transport using it stops, and never touch a connection somebody else opened.
_owned_job: str | None = None
_owned_users = 0  # live transports on that connection (2)


def _acquire_ray(ray: Any, address: str | None, init_options: dict[str, Any]) -> bool:
    """Make sure Ray is initialised; returns True when this module opened the connection."""
    global _owned_job, _owned_users
    with _RAY_LOCK:
        if not ray.is_initialized():
            kwargs = dict(init_options)
            if address is None:
                # A new local instance: no dashboard (seconds of startup, ~100 MiB) unless asked.
                kwargs.setdefault("include_dashboard", False)
            ray.init(address=address, **kwargs)
            _owned_job = ray.get_runtime_context().get_job_id()
            _owned_users = 0
        elif _owned_job is None or ray.get_runtime_context().get_job_id() != _owned_job:
            _owned_job = None  # initialised by someone else (or re-initialised since)
            return False
        _owned_users += 1
        return True


def _release_ray(ray: Any) -> None:
    """One owning transport stopped: disconnect (and stop a local instance) after the last."""
    global _owned_job, _owned_users
    with _RAY_LOCK:
        _owned_users -= 1
        if _owned_users > 0 or _owned_job is None:
            return
        try:
            mine = ray.is_initialized() and ray.get_runtime_context().get_job_id() == _owned_job
        except Exception:  # a half-shut-down Ray: nothing left to release
            mine = False
        _owned_job = None
        if mine:
            ray.shutdown()


# -- the driver side ---------------------------------------------------------------------------


class _Actor:
    """Driver-side record of one actor; a slot gets a new one after each loss."""

    __slots__ = ("calls", "dead", "deadline", "handle", "pid", "ready", "slot")

    def __init__(self, slot: int, handle: Any, deadline: float | None) -> None:
        self.slot = slot
        self.handle = handle  # the ray ActorHandle
        self.pid = 0  # the actor's process id, known once ready
        self.ready = False  # ready() answered
        self.dead = False  # lost, killed, retired or stopped: its late answers are ignored
        self.deadline = deadline  # monotonic time by which it must be ready, or None
        self.calls: deque[_Call] = deque()  # run() calls not yet reported, oldest first


class _Call:
    """One ``run.remote()`` of an actor, from submission until it is reported."""

    __slots__ = ("bid", "future", "ref")

    def __init__(self, bid: int, ref: Any) -> None:
        self.bid = bid  # the engine's task id (17)
        self.ref = ref  # the ObjectRef of the answer
        self.future: Future[Any] | None = None  # set by the collector once the answer is in


# What the collector reads from its queue: (kind, actor, call or None, future or None).
_READY, _DONE, _KILLED, _WAKE = "ready", "done", "killed", "wake"


class RayTransport:
    """Starts one actor per worker slot and moves batches to and from them (see the module
    docstring). Made by the factory that :func:`transport_factory` returns."""

    # Seconds of work per batch this transport would like the engine to aim for. A Ray call
    # costs the driver about 1.7 ms of CPU whatever its size (submission, the argument and the
    # answer through the object store), so longer batches cost less per message (the figures
    # are in docs/ray.md and docs/design.md). Read by the engine.
    batch_target: float | None = 0.05
    max_payload: int | None = None  # payloads go through Ray's object store, whatever their size
    max_depth: int = 1 << 16  # Ray queues an actor's calls itself: no limit of its own

    def __init__(
        self,
        spec: bytes,
        events: TransportEvents,
        *,
        address: str | None = None,
        init_options: dict[str, Any] | None = None,
        actor_options: dict[str, Any] | None = None,
        start_timeout: float | None = _DEFAULT_START_TIMEOUT,
    ) -> None:
        self._ray = ray = _import_ray()
        self._events = events
        self._owns_ray = _acquire_ray(ray, address, init_options or {})
        try:
            self._spec_ref = ray.put(spec)  # stored once, shared by every actor and replacement
            self._class = _actor_class().options(**(actor_options or {}))
        except BaseException:
            if self._owns_ray:
                _release_ray(ray)
            raise
        self._start_timeout = start_timeout
        self._lock = threading.Lock()  # guards _actors and _closing
        self._actors: dict[int, _Actor] = {}  # slot -> its current actor ({0: <_Actor>, ...})
        self._closing = False
        # (kind, actor, call, future) from Ray's thread and the engine's; None: stop
        self._queue: SimpleQueue[tuple[str, _Actor | None, _Call | None, Any] | None] = (
            SimpleQueue()
        )
        self._collector = threading.Thread(
            target=self._collect, name="ordpool-ray-collector", daemon=True
        )
        self._collector.start()

    # -- called by the engine ------------------------------------------------------------------

    def start_worker(self, slot: int) -> None:
        """Create the actor of ``slot``; READY (or the init error) is reported later.

        Never waits for the actor: creating one only registers it with Ray. Safe to call from
        ``on_death``, i.e. from the collector thread.
        """
        timeout = self._start_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        actor = _Actor(slot, self._class.remote(self._spec_ref), deadline)
        with self._lock:
            closing = self._closing
            if not closing:
                self._actors[slot] = actor
        if closing:
            self._kill_handle(actor.handle)
            return
        future = actor.handle.ready.remote().future()
        future.add_done_callback(functools.partial(self._post, _READY, actor, None))
        self._queue.put((_WAKE, None, None, None))  # the collector must track its deadline

    def send(
        self,
        slot: int,
        bid: int,
        failed: tuple[int, ...],
        payload: _wire.Payload,
        call: bytes = b"",
    ) -> None:
        """Submit one batch to the actor of ``slot``; never blocks.

        If that actor was just lost (its death not reported yet), the batch is dropped here:
        the engine re-queues every task it holds for the slot when the death is reported.
        """
        actor = self._actors.get(slot)
        if actor is None or actor.dead:
            return
        pending = _Call(bid, actor.handle.run.remote(bid, failed, payload.join(), call))
        actor.calls.append(pending)  # before the callback can fire: the collector looks it up
        pending.ref.future().add_done_callback(functools.partial(self._post, _DONE, actor, pending))

    def pids(self) -> dict[int, int]:
        """``{slot: pid}`` of the actors that are ready (pids are on their own nodes)."""
        with self._lock:
            return {s: a.pid for s, a in self._actors.items() if a.ready and not a.dead}

    def start_workers(self, slots: list[int]) -> None:
        """Create the first actors (none is waited for)."""
        for slot in slots:
            self.start_worker(slot)

    def cancel(self, slot: int, bid: int, position: int) -> None:
        """Does nothing: an actor runs one call at a time and takes no message while it does,
        so a running item cannot be told to stop; ``ordpool.cancelled()`` stays False."""

    def cancel_all(self) -> None:
        """Does nothing, as :meth:`cancel`."""

    def kill(self, slot: int) -> None:
        """``ray.kill`` the actor of ``slot`` (tests, stuck jobs); reported as its death."""
        with self._lock:
            actor = self._actors.get(slot)
        if actor is not None:
            self._kill_handle(actor.handle)
            # So that a kill while idle is reported now, not when the next call fails.
            self._queue.put((_KILLED, actor, None, None))

    def stop(self, *, graceful: bool, timeout: float = 5.0) -> None:
        """Stop every actor this transport started; idempotent, callable from any thread.

        ``graceful`` waits up to ``timeout`` seconds for outstanding calls (the engine stops
        gracefully only when none are left); then the actors are killed either way. Ray itself
        is shut down (or disconnected) only if this module initialised it, after the last pool
        using it stopped.
        """
        with self._lock:
            if self._closing:
                return
            self._closing = True
            actors = list(self._actors.values())
            self._actors.clear()
            for actor in actors:
                actor.dead = True
        self._queue.put(None)
        ray = self._ray
        if graceful:
            refs = [call.ref for actor in actors for call in actor.calls]
            if refs:
                try:
                    ray.wait(refs, num_returns=len(refs), timeout=timeout)
                except Exception:  # Ray going away: the kill below is moot
                    pass
        for actor in actors:
            self._kill_handle(actor.handle)
        if threading.current_thread() is not self._collector:
            self._collector.join(timeout)
        if self._owns_ray:
            self._owns_ray = False
            _release_ray(ray)

    # -- the collector thread ------------------------------------------------------------------

    def _post(self, kind: str, actor: _Actor, call: _Call | None, future: Future[Any]) -> None:
        # Runs in Ray's thread: only hand over.
        self._queue.put((kind, actor, call, future))

    def _kill_handle(self, handle: Any) -> None:
        try:
            self._ray.kill(handle)
        except Exception:  # already gone, or Ray shut down (interpreter exit)
            pass

    def _collect(self) -> None:
        get = self._queue.get
        while True:
            wait = self._next_deadline()
            if wait is not None and wait <= 0:
                self._expire()
                continue
            try:
                msg = get(timeout=wait)
            except Empty:
                continue
            if msg is None or self._closing:
                return
            kind, actor, call, future = msg
            if actor is None or actor.dead:
                continue  # a wake-up, or news of an actor already given up on
            if kind == _DONE:
                assert call is not None  # a _DONE message always carries its call
                call.future = future
                self._report(actor)
            elif kind == _READY:
                self._on_ready(actor, future)
            elif kind == _KILLED and not actor.calls:
                # Killed while idle: nothing will fail to tell us. (With calls outstanding,
                # their answers tell: a call that finished before the kill is a real result.)
                self._lose(actor, -1)

    def _next_deadline(self) -> float | None:
        """Seconds until the earliest start deadline, or None to sleep until told."""
        with self._lock:
            deadlines = [a.deadline for a in self._actors.values() if a.deadline is not None]
        if not deadlines:
            return None
        return min(deadlines) - time.monotonic()

    def _expire(self) -> None:
        """Give up on actors not ready by their deadline: an init error the engine reports."""
        now = time.monotonic()
        with self._lock:
            late = [
                a for a in self._actors.values() if a.deadline is not None and a.deadline <= now
            ]
        for actor in late:
            if self._discard(actor):
                exc = TimeoutError(
                    f"the Ray actor of worker {actor.slot} was not ready within "
                    f"{self._start_timeout} seconds: does the cluster have room for every "
                    "worker? (each asks for ray_options['actor_options']['num_cpus'], default 1)"
                )
                self._events.on_init_error(actor.slot, exc)

    def _on_ready(self, actor: _Actor, future: Future[Any]) -> None:
        try:
            pid, initerr = future.result()
        except BaseException:  # it died in init: the engine says so
            self._lose(actor, -1)
            return
        if initerr is not None:
            if self._discard(actor):
                self._events.on_init_error(actor.slot, _wire.decode_initerr(initerr))
            return
        actor.pid = pid
        actor.ready = True
        actor.deadline = None
        self._events.on_ready(actor.slot, pid)

    def _report(self, actor: _Actor) -> None:
        """Report the actor's answered calls, oldest first, up to the first unanswered one."""
        calls, events, slot = actor.calls, self._events, actor.slot
        while calls and calls[0].future is not None and not actor.dead and not self._closing:
            call = calls.popleft()
            future = call.future
            assert future is not None
            if future.exception() is not None:
                self._lose(actor, call.bid)
                return
            seconds, payload, nerrors, retire = future.result()
            if retire:
                # Before the result, so the engine sends nothing more to this actor.
                events.on_retire(slot)
            events.on_result(slot, call.bid, seconds, payload, nerrors)
            if retire:
                self._lose(actor, -1, exitcode=0)
                return

    def _discard(self, actor: _Actor) -> bool:
        """Mark ``actor`` dead and kill it; True if it was the slot's current actor."""
        with self._lock:
            if actor.dead:
                return False
            actor.dead = True
            current = self._actors.get(actor.slot) is actor and not self._closing
            if current:
                del self._actors[actor.slot]
        self._kill_handle(actor.handle)
        return current

    def _lose(self, actor: _Actor, bid: int, exitcode: int | None = None) -> None:
        """The actor is gone (or retired): report its death once; the engine replaces it."""
        if self._discard(actor):
            actor.calls.clear()  # their answers, failed or not, are ignored: the engine re-queues
            self._events.on_death(actor.slot, exitcode, actor.pid, (bid, -1))


def transport_factory(
    spec: bytes, *, address: str | None = None, options: dict[str, Any] | None = None
) -> Callable[[TransportEvents], RayTransport]:
    """The transport factory of ``ProcessOrderedPool(..., backend="ray")``.

    Args:
        spec: the worker spec (:func:`ordpool._transport.worker.worker_spec`).
        address: the cluster to connect to (``"auto"``, ``"10.0.0.1:6379"``,
            ``"ray://head:10001"``), passed to ``ray.init``; ``None`` lets ``ray.init()``
            choose (``RAY_ADDRESS``, else the last ``ray start``, else a new local instance).
            A Ray already initialised in this process is used as it is, whatever ``address``
            and the ``ray.init`` options say.
        options: ``ray_options``. Every key is passed to ``ray.init`` (when this call is the one
            that initialises Ray: ``num_cpus``, ``_temp_dir``, ``runtime_env``,
            ``include_dashboard`` (default False for a local instance), ...), except:

            - ``actor_options``: a dict for each actor's ``.options()``: ``num_cpus`` (default
              1; fractions let several workers share a CPU), ``memory``, ``resources``,
              ``scheduling_strategy``, ``runtime_env``, ``name``... ``max_concurrency``,
              ``max_restarts`` and ``max_task_retries`` are fixed (1, 0, 0): ordering needs one
              call at a time, and recovery is the engine's.
            - ``start_timeout``: seconds an actor may take to be scheduled and run ``init``
              before the pool gives up on it (default 60; ``None`` waits forever, e.g. for an
              autoscaler to add nodes).

    Returns:
        ``factory(events) -> RayTransport``; calling it initialises Ray if needed.

    Raises:
        ImportError: Ray is not installed (``pip install 'ordpool[ray]'``).
        ValueError: a fixed actor option was given.
    """
    _import_ray()
    init_options = {k: v for k, v in (options or {}).items() if k not in _OWN_OPTIONS}
    own = options or {}
    actor_options: dict[str, Any] = {"num_cpus": 1, **(own.get("actor_options") or {})}
    fixed = sorted(set(actor_options) & set(_FIXED_ACTOR_OPTIONS))
    if fixed:
        raise ValueError(
            f"ray_options['actor_options'] cannot set {', '.join(fixed)}: "
            "actors run one call at a time, and the pool (retries=) handles their loss"
        )
    start_timeout = own.get("start_timeout", _DEFAULT_START_TIMEOUT)

    def factory(events: TransportEvents) -> RayTransport:
        return RayTransport(
            spec,
            events,
            address=address,
            init_options=init_options,
            actor_options=actor_options,
            start_timeout=start_timeout,
        )

    return factory
