"""Jobs, tasks and executors: how jaxalign runs on one core, many processes or a Dask cluster.

The pipeline is *dynamic dispatch* (paper, "Distributed alignment of blocks"): there is no static graph
of all tasks. A **job** is a generator that yields batches of **tasks**; the driver runs each batch on
an executor, waits for all of it (a **barrier**), and sends the batch's results back into the
generator, which then decides what to yield next::

  def my_job(volume_url):
    fields = yield Batch([Task("field/z=0", compute_field, (volume_url, 0)), ...], "fields")
    yield Batch([Task("render/z=0", render_section, (volume_url, 0, fields[0])), ...], "render")
    return "done"

  run_job(my_job(url), make_executor("processes", workers=2), records=CompletionRecords(url))

Tasks are idempotent and picklable (a module-level function plus arguments) and carry a unique
key. With a `CompletionRecords` store, the worker writes a completion record (holding the task's
small, picklable result) *after* the task's own writes returned, so:

- a worker that dies mid-task leaves no record; the executor re-runs the task (chunk-aligned,
  idempotent writes make the second attempt overwrite whatever the first left);
- a restarted run skips every task that has a record and gets its recorded result back, so a
  crash loses no finished work and nothing is executed twice.

Executors share one interface (`Executor.map_unordered`) and are thin adapters over existing
schedulers, never a home-made queue: `InlineExecutor` (this process), `ProcessExecutor`
(`concurrent.futures.ProcessPoolExecutor` with the *spawn* start method, because JAX's thread pools
do not survive `fork`), `DaskExecutor` (`distributed.Client` on a `LocalCluster` or an existing
scheduler address, e.g. one started by dask-jobqueue on SLURM or dask-kubernetes; see
docs/distributed.md).
"""

from __future__ import annotations

import abc
import concurrent.futures as cf
import dataclasses
import multiprocessing
import os
import pickle
from typing import Any, Callable, Generator, Iterable, Iterator, Mapping, Sequence

from absl import logging

from jaxalign.errors import InputError

EXECUTORS = ("inline", "processes", "dask")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """Executor defaults.

  Attributes:
    max_restarts: how many times a process pool that lost a worker is rebuilt (per batch) before
      the run gives up; each rebuild re-runs only the tasks without a result.
    dask_retries: `retries=` passed to every Dask task (a task whose worker died is rescheduled by
      the scheduler itself, up to `distributed.scheduler.allowed-failures`; retries cover
      exceptions raised inside the task, e.g. a transient storage error).
    records_prefix: folder of completion records inside the output volume.
  """
  max_restarts: int = 3
  dask_retries: int = 2
  records_prefix: str = "_done/"


DEFAULT = DistributedConfig()


@dataclasses.dataclass(frozen=True)
class Task:
  """One idempotent unit of work: `fn(*args, **dict(kwargs))`, identified by `key`.

  Attributes:
    key: unique name within a records store, e.g. "fields/z=00012" ('/'-separated, no spaces).
    fn: a module-level function (so that spawn workers and Dask can unpickle it by name).
    args: positional arguments, picklable (paths/URLs and small arrays, not open handles).
    kwargs: keyword arguments as a tuple of (name, value) pairs (kept hashable).
  The result must be small and picklable: it is stored in the completion record.
  """
  key: str
  fn: Callable[..., Any]
  args: tuple = ()
  kwargs: tuple = ()

  def __post_init__(self):
    if not isinstance(self.key, str) or not self.key or any(c.isspace() for c in self.key):
      raise ValueError(f"task key must be a non-empty string without whitespace, got {self.key!r}")
    qualname = getattr(self.fn, "__qualname__", "")
    if not callable(self.fn) or "<" in qualname or not getattr(self.fn, "__module__", None):
      # Lambdas and closures would work inline but not on processes/Dask: refuse them everywhere
      # so the output never depends on the executor.
      raise TypeError(f"task {self.key!r}: fn must be a module-level function, got {self.fn!r}")
    if isinstance(self.kwargs, Mapping):
      object.__setattr__(self, "kwargs", tuple(sorted(self.kwargs.items())))

  def __call__(self) -> Any:
    return self.fn(*self.args, **dict(self.kwargs))


@dataclasses.dataclass(frozen=True)
class Batch:
  """Tasks that may run in any order and in parallel; the job resumes when all have finished."""
  tasks: Sequence[Task]
  desc: str = "tasks"


# A job yields Batch (or a plain list of Task), receives the batch's results as a list (same order
# as the tasks) and finally returns its value.
Job = Generator[Batch | Sequence[Task], list, Any]


# ----------------------------------------------------------------------------------------------
# Completion records


def _kvstore_url(url: str) -> str:
  """tensorstore kvstore URL of a volume root: local paths become file:// URLs, others pass."""
  if "://" in url:
    return url if url.endswith("/") else url + "/"
  return "file://" + os.path.abspath(url) + "/"


class CompletionRecords:
  """Completion records stored next to the output arrays (`<url>/_done/<key>`), via tensorstore's
  kvstore, so they live wherever the volume lives (local disk, gs://, s3://).

  A record holds the pickled result of its task. Records are written by the worker only after
  the task returned, i.e. after its data writes completed; the file kvstore writes atomically
  (temporary file + rename), so a record is either absent or complete.

  Args:
    url: volume root (local path or kvstore URL).
    prefix: folder of the records inside the volume.
  """

  def __init__(self, url: str, prefix: str = DEFAULT.records_prefix):
    self.url = url
    self.prefix = prefix
    self._kv = None

  def __getstate__(self):
    return {"url": self.url, "prefix": self.prefix}

  def __setstate__(self, state):
    self.__init__(state["url"], state["prefix"])

  @property
  def kv(self):
    if self._kv is None:
      import tensorstore as ts
      self._kv = ts.KvStore.open(_kvstore_url(self.url) + self.prefix).result()
    return self._kv

  def get(self, key: str, default: Any = None) -> Any:
    """The recorded result of task `key`, or `default` if it has no record."""
    r = self.kv.read(key).result()
    if r.state != "value":
      return default
    return pickle.loads(r.value)

  def has(self, key: str) -> bool:
    return self.kv.read(key).result().state == "value"

  def put(self, key: str, result: Any) -> None:
    self.kv.write(key, pickle.dumps(result)).result()

  def keys(self) -> list[str]:
    """All recorded task keys, sorted."""
    return sorted(k.decode() for k in self.kv.list().result())

  def done(self, keys: Iterable[str]) -> dict[str, Any]:
    """{key: recorded result} for those of `keys` that have a record (one listing, not N reads)."""
    present = set(self.keys())
    return {k: self.get(k) for k in keys if k in present}

  def clear(self) -> None:
    """Deletes all records (a forced full re-run)."""
    import tensorstore as ts
    self.kv.delete_range(ts.KvStore.KeyRange()).result()


def execute(task: Task, records: CompletionRecords | None) -> Any:
  """Runs one task on a worker and records its completion. Module-level, so it pickles by name.

  A task that already has a record (a duplicate attempt, e.g. after a lost worker) is not run again.
  """
  if records is not None:
    r = records.kv.read(task.key).result()
    if r.state == "value":
      return pickle.loads(r.value)
  result = task()
  if records is not None:
    records.put(task.key, result)
  return result


# ----------------------------------------------------------------------------------------------
# Executors


class Executor(abc.ABC):
  """Runs `fn(item)` for many items somewhere; the only interface the pipeline uses."""

  name: str = "executor"
  workers: int = 1

  @abc.abstractmethod
  def map_unordered(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
    """Yields `(index, fn(items[index]))` as results arrive, each index exactly once.

    Work lost with a dead worker is re-run (tasks are idempotent); an exception raised by `fn`
    itself propagates.
    """

  def close(self) -> None:
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class InlineExecutor(Executor):
  """Runs everything in this process, in order (debugging, tests, the reference output)."""

  name = "inline"

  def map_unordered(self, fn, items):
    for i, item in enumerate(items):
      yield i, fn(item)


class ProcessExecutor(Executor):
  """Local worker processes: `concurrent.futures.ProcessPoolExecutor` with the spawn start method.

  A worker that dies (killed, out of memory, `os._exit`) breaks the whole pool in concurrent.futures;
  the executor then rebuilds the pool and resubmits only the tasks that have no result yet.

  Args:
    workers: number of processes (default: os.cpu_count()).
    max_restarts: pool rebuilds allowed per `map_unordered` call.
  """

  name = "processes"

  def __init__(self, workers: int | None = None, max_restarts: int = DEFAULT.max_restarts):
    self.workers = int(workers or os.cpu_count() or 1)
    if self.workers < 1:
      raise InputError(f"workers must be >= 1, got {workers}")
    self.max_restarts = max_restarts
    self.restarts = 0
    self._pool: cf.ProcessPoolExecutor | None = None

  def _get_pool(self) -> cf.ProcessPoolExecutor:
    if self._pool is None:
      self._pool = cf.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
    return self._pool

  def map_unordered(self, fn, items):
    pending = dict(enumerate(items))
    rebuilds = 0
    while pending:
      pool = self._get_pool()
      futures = {pool.submit(fn, item): i for i, item in pending.items()}
      broken = False
      for fut in cf.as_completed(futures):
        exc = fut.exception()
        if isinstance(exc, cf.process.BrokenProcessPool):
          broken = True  # keep draining: futures finished before the break still hold results
          continue
        if exc is not None:
          raise exc
        i = futures[fut]
        del pending[i]
        yield i, fut.result()
      if broken:
        rebuilds += 1
        self.restarts += 1
        logging.warning("process pool lost a worker; rebuilding it and re-running %d task(s) (%d/%d)",
                        len(pending), rebuilds, self.max_restarts)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None
        if rebuilds > self.max_restarts:
          raise RuntimeError(f"worker processes died {rebuilds} times in one batch; giving up "
                             f"({len(pending)} task(s) unfinished, finished work is recorded)")

  def close(self):
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)
      self._pool = None


class DaskExecutor(Executor):
  """Dask distributed: a `LocalCluster` of `workers` single-threaded processes by default, or the
  cluster behind `scheduler` (an address such as "tcp://10.0.0.1:8786", e.g. started by
  dask-jobqueue's SLURMCluster or dask-kubernetes; see docs/distributed.md).

  Dask reschedules the tasks of a lost worker itself; `retries` re-runs tasks that raised.
  """

  name = "dask"

  def __init__(self, workers: int | None = None, scheduler: str | None = None, *,
               retries: int = DEFAULT.dask_retries, processes: bool = True):
    try:
      import distributed
    except ImportError as e:  # pragma: no cover - dask is an optional dependency
      raise InputError("--executor=dask needs dask[distributed] (pip install 'jaxalign[distributed]')") from e
    self.retries = retries
    self._cluster = None
    if scheduler:
      self.client = distributed.Client(scheduler)
    else:
      self._cluster = distributed.LocalCluster(
        n_workers=int(workers or os.cpu_count() or 1), threads_per_worker=1, processes=processes,
        dashboard_address=None)
      self.client = distributed.Client(self._cluster)
    self.workers = len(self.client.scheduler_info().get("workers", {})) or int(workers or 1)

  def map_unordered(self, fn, items):
    import distributed
    futures = [self.client.submit(fn, item, pure=False, retries=self.retries) for item in items]
    index = {f.key: i for i, f in enumerate(futures)}
    for fut in distributed.as_completed(futures):
      yield index[fut.key], fut.result()

  def close(self):
    self.client.close()
    if self._cluster is not None:
      self._cluster.close()




def make_executor(kind: str = "inline", workers: int | None = None, scheduler: str | None = None) -> Executor:
  """Executor by name: "inline", "processes" or "dask" (scheduler address optional)."""
  if kind == "inline":
    return InlineExecutor()
  if kind == "processes":
    return ProcessExecutor(workers)
  if kind == "dask":
    return DaskExecutor(workers, scheduler)
  raise InputError(f"unknown executor {kind!r}; expected one of {', '.join(EXECUTORS)}")


# ----------------------------------------------------------------------------------------------
# Driver


@dataclasses.dataclass
class RunStats:
  """What a run did: tasks executed here vs skipped because a record said they were done."""
  executed: int = 0
  skipped: int = 0
  batches: int = 0


def _call_execute(item):
  task, records = item
  return execute(task, records)


def run_batch(tasks: Sequence[Task], executor: Executor, records: CompletionRecords | None = None, *,
              desc: str = "tasks", progress: bool = True, stats: RunStats | None = None) -> list:
  """Runs one batch to completion (a barrier) and returns the results in task order.

  Tasks with a completion record are skipped and their recorded results returned.
  """
  from tqdm.auto import tqdm
  tasks = list(tasks)
  keys = [t.key for t in tasks]
  if len(set(keys)) != len(keys):
    dup = sorted({k for k in keys if keys.count(k) > 1})
    raise ValueError(f"duplicate task keys in one batch: {dup[:5]}")
  results: list = [None] * len(tasks)
  done = records.done(keys) if records is not None else {}
  todo = []
  for i, t in enumerate(tasks):
    if t.key in done:
      results[i] = done[t.key]
    else:
      todo.append(i)
  if stats is not None:
    stats.skipped += len(tasks) - len(todo)
    stats.batches += 1
  if done:
    logging.info("%s: %d/%d task(s) already done, skipped", desc, len(done), len(tasks))
  with tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc=desc, disable=not progress,
            unit="task", leave=False) as bar:
    for j, result in executor.map_unordered(_call_execute, [(tasks[i], records) for i in todo]):
      results[todo[j]] = result
      if stats is not None:
        stats.executed += 1
      bar.update(1)
  return results


def run_job(job: Job, executor: Executor | None = None, *, records: CompletionRecords | None = None,
            progress: bool = True, stats: RunStats | None = None) -> Any:
  """Drives a job to its end: each yielded batch runs on `executor`, then (barrier) its results are
  sent back into the job. Returns the job's return value.

  Args:
    job: a generator yielding `Batch` (or lists of `Task`) and receiving lists of results.
    executor: where tasks run (default: inline).
    records: completion records; with them the run is resumable and skips finished tasks.
    progress: show a tqdm bar per batch.
    stats: if given, filled with counts of executed and skipped tasks.
  """
  executor = executor or InlineExecutor()
  try:
    batch = next(job)
    while True:
      if not isinstance(batch, Batch):
        batch = Batch(list(batch))
      results = run_batch(batch.tasks, executor, records, desc=batch.desc, progress=progress, stats=stats)
      batch = job.send(results)
  except StopIteration as stop:
    return stop.value
