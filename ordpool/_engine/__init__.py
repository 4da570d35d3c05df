"""The engine: one ordered pipeline, whatever carries the batches (processes or Ray actors).

Data flow, each stage with the module that owns it::

    producer thread(s)       enqueue(stream, index, item)   |  a feeder thread per imap/map,
        |                    (intake.Intake.enqueue)        |  pulling its input
        |                                                   |  (feeding.Feeder.run)
        v                                                   v
    intake: items collect in a stream (_core.streams); a batch is cut when full, when a worker
        |   sits idle (paced: Scheduler.paced), or by the flusher after max_delay (flusher.Flusher)
        |   encode: pickle before commit, an unpicklable item fails at its position (wire)
        v
    scheduler: tasks (a batch, or its items per worker when keys route them) to a slot:
        |   pinned tasks to their slot, others to the least loaded ready slot, `depth` each
        |   transport.send(slot, bid, failed, payload, call): never waits for a worker
        v
    transport (_transport.process / _transport.ray) -> worker: fn over the items -> results
        |   (a task that overruns, or an item running longer than max_delay: the results before
        |   it go ahead, PART)
        v
    transport's thread -> Engine.on_result, on_part / supervisor.Supervisor.on_ready, ...
        |   supervisor: a dead worker's running item is blamed, the rest re-queued, or the
        |   pool breaks
        v
    delivery: all tasks of a batch answered -> ordered stream: its reorder buffer (min-heap
        |   on seq), its early parts first; callback stream: on_batch(batch) outside the lock
        v
    consumer thread: delivery.next_batch() pops the next seq in order; decoding unpickles it,
                     a chunk at a time, outside every lock

The parts, one module each: ``coordinator`` (:class:`Engine`: wiring, lifecycle, the stream
registry, stats), ``intake``, ``feeding``, ``flusher``, ``scheduler``, ``supervisor``,
``delivery``, ``decoding``; the pure data structures they drive live in :mod:`ordpool._core`.

Threading model
---------------
Threads the engine and its transports start, and what each owns:

* **caller threads** (any number): producers call ``Intake.enqueue``; a consumer per stream
  iterates it (``Delivery.next_batch``, then ``decoding`` outside the lock). ``enqueue`` and
  ``close`` encode batches in the caller's thread.
* **ordpool-flusher** (one per engine, :class:`~.flusher.Flusher`): sends partial batches
  that waited ``max_delay``.
* **ordpool-imap-feeder**, **ordpool-executor-map-feeder** (one per numbered stream, started by
  the pool or executor, running :meth:`~.feeding.Feeder.run`): reads the stream's input and
  encodes its batches. It alone appends to its stream's ``feed``, without the lock.
* **ordpool-collector** (one per process transport): waits in one ``selectors`` call over every
  result pipe, process sentinel and a wakeup pipe; reports results, READY, init errors,
  retirements and deaths to the engine. Completing an executor's futures runs here too.
* **ordpool-sender-N** (one per worker process): writes a task whose write could block; the
  collector never writes, so a slow worker can never deadlock the reading side.
* **ordpool-ray-collector** (one per Ray transport): waits on Ray's futures, reports as above.
* **ordpool-worker-N** names the worker processes themselves (not threads of this process).
* The executor adds **ordpool-executor-start** (starts the workers off the caller's thread)
  and **ordpool-executor-gc** (shuts down an executor that was garbage-collected).

Shared state and its guard: everything mutable in the coordinator, intake, scheduler,
supervisor and delivery (streams, slots, queues, counters, the window, the lifecycle state) is
guarded by one lock, ``Engine.lock`` (an ``RLock``: see the comment where it is made). Three
conditions share it: ``Engine.space`` (producers and feeders wait for room in the window or
the queue), ``Engine.ready`` (consumers wait for a batch; ``start``/``join`` wait for a state)
and ``Flusher.cond`` (the flusher sleeps).

Read or written without the lock, by design (each a single attribute, atomic under the GIL):

* a numbered stream's ``feed``: appended by its one feeder; takers remove from the front under
  the lock;
* ``Scheduler.idle`` and ``Flusher.idle``, read by a feeder as hints: a stale value costs a
  batch cut early or late, or a flusher woken for nothing, never a wrong result;
* ``Engine.state``, read before taking the lock where a stale value only costs the lock
  (``terminate``, ``check_open``, the supervisor's policy hook), and ``Slot.retiring`` in
  ``Supervisor.on_death``, written by the same transport thread that reports the death;
* ``Engine.streams`` by the pool's face, to refuse a second stream: a list read whole.

The gate, ``Engine.gate`` (a plain ``Lock``, held for a few steps, never while waiting, and
taken after ``Engine.lock`` when both are): ``enqueue`` appends an item that cuts no batch to
an indexed stream's pending items under the gate alone (``Intake.enqueue``), reading the
scheduler's fields as hints. So every change to an indexed stream's pending items (a take, an
append, ``enqueue_many``'s extend, a drop) and every end of the intake (``close``, a break,
``terminate``, an abandoned stream) happens under the gate too: an item appended without the
lock is either in the next take or refused.

Pickling and unpickling happen outside the lock: a producer encoding a large batch never
delays the transport's thread. The transport's thread encodes batches itself only when a
worker has gone idle with items waiting (``Intake.take_for_idle_locked``): then nothing else
would send them. Callbacks of callback streams run outside the lock too, because a future's
callbacks run user code, which may call back into the pool.

Accounting, the invariant behind "nothing lost, nothing duplicated": every item taken into a
batch is answered exactly once, by its batch being delivered (see :mod:`.delivery`); a task
whose worker dies is re-queued or failed, never both (see :mod:`.supervisor`).
"""

from __future__ import annotations

from .coordinator import Engine
from .feeding import Feeder
from .intake import PacedSequence
from .supervisor import Supervision

__all__ = ["Engine", "Feeder", "PacedSequence", "Supervision"]
