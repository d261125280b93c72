"""Run slow, independent callables at once in child Python processes.

    user_count, order_count = concurrency.run([
        lambda: count("users"),
        lambda: count("orders"),
    ])

Using it
    run(tasks, timeout=None, return_exceptions=False, progress=False)
        Runs a mapping of key -> callable (returns a dict, same keys), an
        iterable of callables (returns a list, same order) or one callable
        (a one-item list), up to the driver's max_workers at once, and
        returns when all have ended.  run_async() is the same for asyncio;
        as_completed() and as_completed_async() yield (key, result) as tasks
        end.  Callables take no arguments: bind loop variables
        (lambda t=t: count(t), functools.partial(count, t)).
    map(fn, iterable, chunksize=None, timeout=None, return_exceptions=False,
        progress=False)
        fn(item) for each item, a list in input order: fn travels once per
        worker, the items in chunks, the input read as chunks are needed.
    defer(tasks, always=False), deferring()
        Fire and forget after the current unit of work (a deferring()
        scope), in detached processes that outlive the interpreter; a
        failure is reported on stderr.
    Drivers
        "process" (default): warm worker interpreters; tasks travel pickled,
        what can't be imported there by value.  "fork": os.fork() per run;
        tasks are inherited.  Both need a POSIX system.  "sync": one after
        another in this process, for tests.  "dask": on a Dask cluster (see
        DaskDriver), each task in a child of a Dask worker; needs Dask's
        distributed.  driver(name) picks one,
        set_default_driver(name) changes the default, extend(name, factory)
        registers a custom Driver subclass.
    Configuration
        concurrency.ini in the current directory (or the file named by
        CONCURRENCY_CONFIG): default driver, max_workers, timeout;
        dask_address; CONCURRENCY_DRIVER overrides the default and
        CONCURRENCY_DASK_ADDRESS the address.  Write one with
        ``python -m concurrency config:publish``.
    Errors
        A task's exception is re-raised as its own class, with the child's
        traceback as its cause.  The library's own all derive from
        ConcurrencyError: TaskTimeout, WorkerCrashed (the process died),
        SerializationError (a task or result can't travel), RemoteError (an
        exception that can't be rebuilt), ConfigError.  Bad input raises
        TypeError or ValueError before anything starts.
    Logging
        A task's log records go through this process's loggers, levels and
        handlers (on dask: its Dask worker's).

Internals
---------

Data flow of the default ``process`` driver:

    run(tasks) --> _Batch ----------> payload per task: "p" + C pickle (what
                   (validated keys,   the child can't import, by value), or
                    callables, shape) "d" + dill's, for the rare rest
                                            |  CONTEXT (cwd, environ,
                                            |  sys.path, argv), TASK frames
                                            v
                                   worker.py "serve" (warm child)
                                            |  unserialize, call, pickle
                                            |  RESULT | ERROR frame; large
                                            |  buffers stay in the child, and
                                            v  _copy_lent() reads them there
    results / first error  <-- _Outcomes <-- _Run: the parent's select() loop

The sections below follow that flow: errors, the facade, the registry and
the drivers; input and outcomes (_Batch, _Outcomes, and a map's _Map, which
cuts its input into chunks run as tasks); serialization; the
outcomes children send, decoded; the task context and the logging that
travels with it; starting workers; children and the run loop; the
processes, pipes and signals both child drivers use; each driver's own
internals; detached deferred tasks; the process-wide state (_ProcessState);
the config file; the command line.  The wire itself -- frames, their kinds,
reading and writing them, encoding and decoding values -- is worker.py's.

_Batch
    Checks the input before anything starts and remembers its shape: a
    mapping gives back a dict with the same keys, anything else a list.

ProcessDriver
    Keeps a pool of warm ``worker.py`` children, started with
    ``sys.executable`` by path (never ``import worker``).  Each run checks out
    the warm workers there are, or starts one per core, first, so that their
    start-up overlaps the serializing; more once its tasks prove slow (see
    _Run).  _TaskSerializer pickles the tasks with worker.ValuePickler: the
    C pickler, sending by value the functions and classes the worker could
    not import (lambdas, closures, all of ``__main__``), code a run's tasks
    share once; importable modules travel by name; dill serves the rare
    rest.  A task that can't be serialized fails with SerializationError,
    naming the global that pulled in what can't travel, before any task
    starts.  Tasks and outcomes travel on two private pipes per worker, never
    on stdout, so a task's ``print()`` reaches the terminal and can't corrupt
    a result.

worker.py
    Unserializes a task, calls it, pickles the value (C pickle, dill when
    that fails) or the exception (pickled, as class+args, and as text), and
    ends what the task started.  It exits by itself when its parent's end of
    the task pipe hangs up, so no worker outlives its parent; idle workers
    exit after ``idle_timeout``.

ForkDriver
    Forks one child per core when a run starts, more once its tasks prove
    slow, up to ``max_workers``; they inherit the tasks, so nothing is
    serialized but the outcomes, encoded by worker.py's code.

SyncDriver
    Calls the tasks one after another in this process: for tests and
    debugging.

DaskDriver
    Serializes the tasks as ProcessDriver does and submits them, in chunks
    sized by what they took so far, as Dask tasks that call
    worker.dask_task() on a Dask worker; that runs them in a warm child of
    its own (_run_for_dask: this module, uploaded there, runs a _ProcessRun)
    and returns the outcome frames undecoded, for _DaskRun to decode here.
    Large buffers the tasks capture are scattered once a run and reach the
    chunks as Dask's data (_DaskRun.shared_call); large results are lent by
    the child and go back as the bytes Dask sends as they are.

as_completed(), run_async(), progress=True
    All built on each driver's ``_completions`` generator, which yields the
    index of each task as it ends; closing it kills what still runs.

A run ends when every task has an outcome: its value, or an exception (its
own, WorkerCrashed, TaskTimeout, SerializationError).  The first exception in
task order is raised, unless ``return_exceptions=True``.
"""

from __future__ import annotations

# The overloads of run() and its kin read a mapping first: one whose keys are
# callables is also an iterable of tasks, an overlap no caller means.
# mypy: disable-error-code="overload-overlap"

__all__ = [
    "run",
    "map",
    "run_async",
    "as_completed",
    "as_completed_async",
    "defer",
    "deferring",
    "driver",
    "extend",
    "set_default_driver",
    "default_driver",
    "Driver",
    "ProcessDriver",
    "ForkDriver",
    "SyncDriver",
    "DaskDriver",
    "ConcurrencyError",
    "ConfigError",
    "TaskTimeout",
    "WorkerCrashed",
    "SerializationError",
    "RemoteError",
    "RemoteTraceback",
]

__version__ = "0.1.0"

import atexit
import collections
import collections.abc
import contextvars
import errno
import functools
import io
import itertools
import marshal
import math
import os
import pickle
import select
import selectors
import signal
import sys
import threading
import time
import types
import weakref

TYPE_CHECKING = False  # typing.TYPE_CHECKING's meaning, without its import
if TYPE_CHECKING:
    # What type checkers read (an installed copy's stub is made of this block
    # and the public signatures, see setup.py); never imported at run time,
    # where typing would add to the import.
    from typing import (Any, AsyncGenerator, Awaitable, Callable, Generator, Iterable, Literal,
                        Mapping, TypeVar, Union, overload)
    _K = TypeVar("_K")  # a task's key
    _T = TypeVar("_T")  # what a task returns
    _X = TypeVar("_X")  # an item of map()'s input
    _F = TypeVar("_F", bound=Callable[..., Any])  # a function deferring() decorates
    # A task is called with no arguments, and a coroutine it returns is
    # awaited.  Each signature reads _AsyncTask first, for mypy, which can't
    # solve _T from _Task's union; the union keeps pyright from giving up
    # (as Any) between the two on a mapping of coroutine functions.
    _AsyncTask = Callable[[], Awaitable[_T]]
    _Task = Callable[[], Union[_T, Awaitable[_T]]]
    _Pairs = Generator[tuple[_K, _T], None, None]  # as_completed()
    _AsyncPairs = AsyncGenerator[tuple[_K, _T], None]  # as_completed_async()
    _Tasks = Union[Mapping[Any, Callable[[], Any]], Callable[[], Any],  # defer()'s
                   Iterable[Callable[[], Any]]]
else:
    def overload(function):
        """typing.overload for the checkers; at run time the last
        definition, the implementation, is what stays."""
        return function

try:
    # At import, not on first use: imported first in a run with no
    # descriptor left, its shared library would fail to load (ImportError).
    import fcntl
except ImportError:  # not POSIX, where the process and fork drivers refuse to run
    fcntl = types.ModuleType("fcntl")

# Enough workers that I/O-bound tasks (the common case: queries, HTTP calls)
# all run at once even on a small machine: four one-second sleeps take one
# second on two cores.  The same default as ThreadPoolExecutor.
DEFAULT_MAX_WORKERS: int = min(32, (os.cpu_count() or 1) + 4)

# A warm worker costs memory (~20 MB); one unused this long exits by itself.
# Long enough to span the gaps between a bot's bursts of work.
DEFAULT_IDLE_TIMEOUT = 60.0

# How long a dying or killed child gets to be reaped before we stop waiting:
# bounded, so that a wedged process can never hang the caller.
_REAP_TIMEOUT = 5.0

# Without pidfd, children that die are noticed by polling this often.
_POLL_INTERVAL = 0.05

# A run starts with one child per core (or the warm workers there are), and
# uses the rest it may once no task has ended for _GROW_AFTER while others
# wait, unless the cores are all busy with tasks; then after _GROW_ANYWAY.
# See _Run.on_wake.
_GROW_AFTER = 0.003
# A fork run over within _QUICK_RUN, beyond what its forks cost, has the
# next, of no more tasks, start with one child, and more only after
# _SOLO_GRACE or two forks' cost (see _ForkRun).
_QUICK_RUN = 0.001
_SOLO_GRACE = 0.003
_GROW_ANYWAY = 0.5
_CPU_SPAN = 0.02  # the least time over which CPU use tells that cores are busy
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

_WORKER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")
if not os.path.exists(_WORKER_PATH) and os.path.exists(
        os.path.join(os.path.dirname(_WORKER_PATH), "_concurrency_worker.py")):
    # On a Dask worker, where the dask driver uploads both files under
    # private names (see DaskDriver).
    _WORKER_PATH = os.path.join(os.path.dirname(_WORKER_PATH), "_concurrency_worker.py")
_POSIX = os.name == "posix"
_HAVE_FORK = hasattr(os, "fork")
# CONCURRENCY_PORTABLE=1 turns the Linux-only fast paths (pidfd, lending with
# process_vm_readv) off, as on other POSIX systems: their fallbacks get
# tested here too.
_PORTABLE = os.environ.get("CONCURRENCY_PORTABLE") == "1"
_HAVE_PIDFD = hasattr(os, "pidfd_open") and sys.platform.startswith("linux") and not _PORTABLE

CONFIG_FILE = "concurrency.ini"
CONFIG_ENV = "CONCURRENCY_CONFIG"
DRIVER_ENV = "CONCURRENCY_DRIVER"
DASK_ADDRESS_ENV = "CONCURRENCY_DASK_ADDRESS"

# How long the dask driver tries to reach a scheduler before it gives up.
DEFAULT_DASK_CONNECT_TIMEOUT = 10.0
_CONFIG_SECTION = "concurrency"


# -- Errors -------------------------------------------------------------------

class ConcurrencyError(Exception):
    """Base class of the errors raised by this library."""


class ConfigError(ConcurrencyError, ValueError):
    """A bad value in concurrency.ini or in an environment variable."""


class TaskTimeout(ConcurrencyError, TimeoutError):
    """A task was still running when the run's timeout expired.

    Attributes: ``key`` of this task, ``unfinished`` (keys of every task that
    did not finish), ``timeout`` in seconds, ``origin`` (where the limit came
    from, or None).
    """

    key: Any
    unfinished: list
    timeout: float
    origin: str | None

    def __init__(self, key, unfinished, timeout, origin=None):
        self.key = key
        # One list for every task of a run (a run of 100,000 tasks that
        # times out would otherwise hold 100,000 copies of it).
        self.unfinished = unfinished if type(unfinished) is list else list(unfinished)
        # Where the limit came from: the timeout argument, the driver's, or
        # concurrency.ini's (see _Limit).
        self.origin = getattr(timeout, "origin", None) if origin is None else origin
        self.timeout = float(timeout)
        named = ", ".join(repr(k) for k in self.unfinished[:_KEYS_NAMED])
        if len(self.unfinished) > _KEYS_NAMED:
            named += " and %d more" % (len(self.unfinished) - _KEYS_NAMED)
        where = ""
        if self.origin:
            where = "; the limit is %s (timeout=math.inf means none)" % self.origin
        super().__init__(
            "task %r did not finish within %g s (unfinished tasks: %s); its process "
            "was killed%s" % (key, self.timeout, named, where))

    def __reduce__(self):
        return type(self), (self.key, self.unfinished, self.timeout, self.origin)


class _Limit(float):
    """A timeout, and where it came from, for TaskTimeout to say."""

    origin: str

    def __new__(cls, seconds, origin):
        limit = super().__new__(cls, seconds)
        limit.origin = origin
        return limit

    def __reduce__(self):
        return float, (float(self),)


# A TaskTimeout's message names this many unfinished tasks, then counts the rest.
_KEYS_NAMED = 20


class WorkerCrashed(ConcurrencyError):
    """A child process died before it sent the task's outcome.

    Attributes: ``key`` of the task, ``exitcode`` (negative for a signal, as
    in subprocess; None when something else reaped the process and its
    status is lost), ``signal`` (its name, e.g. ``"SIGKILL"``, or None).
    """

    key: Any
    exitcode: int | None
    signal: str | None

    def __init__(self, key, exitcode):
        self.key = key
        self.exitcode = exitcode
        self.signal = (_worker_module().signal_name(-exitcode)
                       if exitcode is not None and exitcode < 0 else None)
        if self.signal:
            how = "was killed by %s" % self.signal
        elif exitcode is None:
            how = ("ended (how is unknown: something else reaped it, such as SIGCHLD "
                   "set to SIG_IGN or a handler that waits for every child)")
        else:
            how = "exited with code %s" % exitcode
        super().__init__("task %r crashed: its process %s before returning a result"
                         % (key, how))

    def __reduce__(self):
        return type(self), (self.key, self.exitcode)


class SerializationError(ConcurrencyError):
    """A task, its result or its exception could not be serialized.

    Attributes: ``key`` of the task, ``what`` failed ("task", "result").
    The underlying error is the ``__cause__``.
    """

    key: Any
    what: str
    detail: str

    def __init__(self, key, what, detail):
        self.key = key
        self.what = what
        self.detail = detail
        super().__init__("task %r: %s" % (key, detail))

    def __reduce__(self):
        return type(self), (self.key, self.what, self.detail)


class RemoteError(ConcurrencyError):
    """A task's exception that could not be rebuilt as its own class.

    Attributes: ``key``, ``type_name`` (module-qualified), ``message``,
    ``traceback`` (the child's formatted traceback).
    """

    key: Any
    type_name: str
    message: str
    traceback: str

    def __init__(self, key, type_name, message, traceback):
        self.key = key
        self.type_name = type_name
        self.message = message
        self.traceback = traceback
        super().__init__("task %r raised %s: %s" % (key, type_name, message))

    def __reduce__(self):
        return type(self), (self.key, self.type_name, self.message, self.traceback)


class RemoteTraceback(ConcurrencyError):
    """The child's formatted traceback, attached as ``__cause__``."""

    traceback: str

    def __init__(self, traceback):
        self.traceback = traceback
        super().__init__(traceback)

    def __str__(self):
        return '\n"""\n%s"""' % self.traceback


# -- Facade -------------------------------------------------------------------

@overload
def run(tasks: Mapping[_K, _AsyncTask[_T]], *, timeout: float | None = None,
        return_exceptions: Literal[False] = False, progress: bool = False) -> dict[_K, _T]: ...
@overload
def run(tasks: Mapping[_K, _Task[_T]], *, timeout: float | None = None,
        return_exceptions: Literal[False] = False, progress: bool = False) -> dict[_K, _T]: ...
@overload
def run(tasks: _AsyncTask[_T], *, timeout: float | None = None,
        return_exceptions: Literal[False] = False, progress: bool = False) -> list[_T]: ...
@overload
def run(tasks: _Task[_T], *, timeout: float | None = None,
        return_exceptions: Literal[False] = False, progress: bool = False) -> list[_T]: ...
@overload
def run(tasks: Iterable[_AsyncTask[_T]], *, timeout: float | None = None,
        return_exceptions: Literal[False] = False, progress: bool = False) -> list[_T]: ...
@overload
def run(tasks: Iterable[_Task[_T]], *, timeout: float | None = None,
        return_exceptions: Literal[False] = False, progress: bool = False) -> list[_T]: ...
@overload
def run(tasks: Mapping[_K, _AsyncTask[_T]], *, timeout: float | None = None,
        return_exceptions: bool, progress: bool = False) -> dict[_K, _T | BaseException]: ...
@overload
def run(tasks: Mapping[_K, _Task[_T]], *, timeout: float | None = None, return_exceptions: bool,
        progress: bool = False) -> dict[_K, _T | BaseException]: ...
@overload
def run(tasks: _AsyncTask[_T], *, timeout: float | None = None, return_exceptions: bool,
        progress: bool = False) -> list[_T | BaseException]: ...
@overload
def run(tasks: _Task[_T], *, timeout: float | None = None, return_exceptions: bool,
        progress: bool = False) -> list[_T | BaseException]: ...
@overload
def run(tasks: Iterable[_AsyncTask[_T]], *, timeout: float | None = None, return_exceptions: bool,
        progress: bool = False) -> list[_T | BaseException]: ...
@overload
def run(tasks: Iterable[_Task[_T]], *, timeout: float | None = None, return_exceptions: bool,
        progress: bool = False) -> list[_T | BaseException]: ...
def run(tasks, *, timeout: float | None = None, return_exceptions: bool = False,
        progress: bool = False) -> Any:
    """Run ``tasks`` at once with the default driver and return their results.

    Args:
        tasks: a mapping of key -> callable (returns a dict with the same
            keys), an iterable of callables (returns a list in the same
            order), or one callable (returns a one-item list).  Each is called
            with no arguments; a coroutine it returns is awaited.
        timeout: seconds for the whole run; None means the driver's default
            (no limit unless concurrency.ini sets one), math.inf no limit.
        return_exceptions: put each failed task's exception in its slot
            instead of raising the first one.
        progress: show done/total (and failures), elapsed time and rate on
            stderr while it runs, if stderr is a terminal.

    Up to the driver's max_workers tasks run at once; the rest start as
    those end.

    Raises:
        TypeError, ValueError: bad input, before anything starts (a task
            that is not callable or needs arguments, a bad timeout).
        SerializationError: a task can't be sent to a child (process
            driver), before anything starts; or a result can't come back
            (that task only).
        The first failed task's exception, in task order, once every task
        has ended: its own class, with the child's traceback as its cause
        (RemoteError when it can't be rebuilt); WorkerCrashed when its
        process died (os._exit, a signal); TaskTimeout when ``timeout``
        expired first.
        ConcurrencyError: a driver that can't run here (process or fork off
            POSIX), ConfigError for a bad concurrency.ini.
        KeyboardInterrupt: Ctrl-C; the run's processes are killed first.
    """
    chosen = _registry.driver()
    if progress:
        batch = _Batch(tasks)
        _check_timeout(timeout)
        return _run_to_end(chosen, batch, timeout, return_exceptions, True)
    return chosen.run(tasks, timeout=timeout, return_exceptions=return_exceptions)


@overload
async def run_async(tasks: Mapping[_K, _AsyncTask[_T]], *, timeout: float | None = None,
                    return_exceptions: Literal[False] = False,
                    progress: bool = False) -> dict[_K, _T]: ...
@overload
async def run_async(tasks: Mapping[_K, _Task[_T]], *, timeout: float | None = None,
                    return_exceptions: Literal[False] = False,
                    progress: bool = False) -> dict[_K, _T]: ...
@overload
async def run_async(tasks: _AsyncTask[_T], *, timeout: float | None = None,
                    return_exceptions: Literal[False] = False,
                    progress: bool = False) -> list[_T]: ...
@overload
async def run_async(tasks: _Task[_T], *, timeout: float | None = None,
                    return_exceptions: Literal[False] = False,
                    progress: bool = False) -> list[_T]: ...
@overload
async def run_async(tasks: Iterable[_AsyncTask[_T]], *, timeout: float | None = None,
                    return_exceptions: Literal[False] = False,
                    progress: bool = False) -> list[_T]: ...
@overload
async def run_async(tasks: Iterable[_Task[_T]], *, timeout: float | None = None,
                    return_exceptions: Literal[False] = False,
                    progress: bool = False) -> list[_T]: ...
@overload
async def run_async(tasks: Mapping[_K, _AsyncTask[_T]], *, timeout: float | None = None,
                    return_exceptions: bool,
                    progress: bool = False) -> dict[_K, _T | BaseException]: ...
@overload
async def run_async(tasks: Mapping[_K, _Task[_T]], *, timeout: float | None = None,
                    return_exceptions: bool,
                    progress: bool = False) -> dict[_K, _T | BaseException]: ...
@overload
async def run_async(tasks: _AsyncTask[_T], *, timeout: float | None = None,
                    return_exceptions: bool,
                    progress: bool = False) -> list[_T | BaseException]: ...
@overload
async def run_async(tasks: _Task[_T], *, timeout: float | None = None, return_exceptions: bool,
                    progress: bool = False) -> list[_T | BaseException]: ...
@overload
async def run_async(tasks: Iterable[_AsyncTask[_T]], *, timeout: float | None = None,
                    return_exceptions: bool,
                    progress: bool = False) -> list[_T | BaseException]: ...
@overload
async def run_async(tasks: Iterable[_Task[_T]], *, timeout: float | None = None,
                    return_exceptions: bool,
                    progress: bool = False) -> list[_T | BaseException]: ...
async def run_async(tasks, *, timeout: float | None = None, return_exceptions: bool = False,
                    progress: bool = False) -> Any:
    """``run`` for asyncio, on the default driver: awaiting it never blocks the
    event loop.  Cancelling it stops the tasks still running (processes
    killed and reaped) and re-raises CancelledError."""
    return await _registry.driver().run_async(tasks, timeout=timeout,
                                              return_exceptions=return_exceptions,
                                              **_progress_option(progress))


def _progress_option(progress):
    # Passed only when asked for: a custom driver's as_completed or
    # run_async written before it took progress= keeps working.
    return {"progress": True} if progress else {}


@overload
def map(fn: Callable[[_X], Awaitable[_T]], iterable: Iterable[_X], *,
        chunksize: int | None = None, timeout: float | None = None,
        return_exceptions: Literal[False] = False, progress: bool = False) -> list[_T]: ...
@overload
def map(fn: Callable[[_X], _T], iterable: Iterable[_X], *,
        chunksize: int | None = None, timeout: float | None = None,
        return_exceptions: Literal[False] = False, progress: bool = False) -> list[_T]: ...
@overload
def map(fn: Callable[[_X], Awaitable[_T]], iterable: Iterable[_X], *,
        chunksize: int | None = None, timeout: float | None = None,
        return_exceptions: bool, progress: bool = False) -> list[_T | BaseException]: ...
@overload
def map(fn: Callable[[_X], _T], iterable: Iterable[_X], *,
        chunksize: int | None = None, timeout: float | None = None,
        return_exceptions: bool, progress: bool = False) -> list[_T | BaseException]: ...
def map(fn, iterable, *, chunksize: int | None = None, timeout: float | None = None,
        return_exceptions: bool = False, progress: bool = False) -> Any:
    """Call ``fn(item)`` for each item of ``iterable``, on the default driver,
    and return the results: a list in input order.

        totals = concurrency.map(lambda path: os.path.getsize(path), paths)

    Unlike run(), whose tasks each get their own copy of what they capture,
    ``fn`` travels once per worker, and the items in chunks: the items of a
    chunk -- and of the chunks one worker runs -- share ``fn`` and what it
    captures.  Chunks are sized from the time items take (``chunksize``
    fixes it).  The input is read as chunks are needed: an iterator's items
    are never all held at once.

    An item's exception is its result with ``return_exceptions=True``; else
    the first one in input order is raised once every item has ended, with
    a note naming the item's index.  A crash fails the items of the chunk
    its process was running (WorkerCrashed), no other.  ``timeout`` is for
    the whole map, as for run(): items not finished by then, and those not
    yet started, fail with TaskTimeout.  ``progress=True`` counts items.
    """
    return _registry.driver().map(fn, iterable, chunksize=chunksize, timeout=timeout,
                                  return_exceptions=return_exceptions, progress=progress)


@overload
def as_completed(tasks: Mapping[_K, _AsyncTask[_T]], *, timeout: float | None = None,
                 return_exceptions: Literal[False] = False,
                 progress: bool = False) -> _Pairs[_K, _T]: ...
@overload
def as_completed(tasks: Mapping[_K, _Task[_T]], *, timeout: float | None = None,
                 return_exceptions: Literal[False] = False,
                 progress: bool = False) -> _Pairs[_K, _T]: ...
@overload
def as_completed(tasks: _AsyncTask[_T], *, timeout: float | None = None,
                 return_exceptions: Literal[False] = False,
                 progress: bool = False) -> _Pairs[int, _T]: ...
@overload
def as_completed(tasks: _Task[_T], *, timeout: float | None = None,
                 return_exceptions: Literal[False] = False,
                 progress: bool = False) -> _Pairs[int, _T]: ...
@overload
def as_completed(tasks: Iterable[_AsyncTask[_T]], *, timeout: float | None = None,
                 return_exceptions: Literal[False] = False,
                 progress: bool = False) -> _Pairs[int, _T]: ...
@overload
def as_completed(tasks: Iterable[_Task[_T]], *, timeout: float | None = None,
                 return_exceptions: Literal[False] = False,
                 progress: bool = False) -> _Pairs[int, _T]: ...
@overload
def as_completed(tasks: Mapping[_K, _AsyncTask[_T]], *, timeout: float | None = None,
                 return_exceptions: bool,
                 progress: bool = False) -> _Pairs[_K, _T | BaseException]: ...
@overload
def as_completed(tasks: Mapping[_K, _Task[_T]], *, timeout: float | None = None,
                 return_exceptions: bool,
                 progress: bool = False) -> _Pairs[_K, _T | BaseException]: ...
@overload
def as_completed(tasks: _AsyncTask[_T], *, timeout: float | None = None, return_exceptions: bool,
                 progress: bool = False) -> _Pairs[int, _T | BaseException]: ...
@overload
def as_completed(tasks: _Task[_T], *, timeout: float | None = None, return_exceptions: bool,
                 progress: bool = False) -> _Pairs[int, _T | BaseException]: ...
@overload
def as_completed(tasks: Iterable[_AsyncTask[_T]], *, timeout: float | None = None,
                 return_exceptions: bool,
                 progress: bool = False) -> _Pairs[int, _T | BaseException]: ...
@overload
def as_completed(tasks: Iterable[_Task[_T]], *, timeout: float | None = None,
                 return_exceptions: bool,
                 progress: bool = False) -> _Pairs[int, _T | BaseException]: ...
def as_completed(tasks, *, timeout: float | None = None, return_exceptions: bool = False,
                 progress: bool = False) -> Any:
    """Yield ``(key, result)`` as tasks finish, on the default driver.

    ``for key, value in tqdm(concurrency.as_completed(tasks), total=len(tasks))``
    is a progress bar.  A failed task's exception is raised when its turn
    comes (yielded with ``return_exceptions=True``); leaving the loop early
    stops the tasks still running.
    """
    return _registry.driver().as_completed(tasks, timeout=timeout,
                                           return_exceptions=return_exceptions,
                                           **_progress_option(progress))


@overload
def as_completed_async(tasks: Mapping[_K, _AsyncTask[_T]], *, timeout: float | None = None,
                       return_exceptions: Literal[False] = False,
                       progress: bool = False) -> _AsyncPairs[_K, _T]: ...
@overload
def as_completed_async(tasks: Mapping[_K, _Task[_T]], *, timeout: float | None = None,
                       return_exceptions: Literal[False] = False,
                       progress: bool = False) -> _AsyncPairs[_K, _T]: ...
@overload
def as_completed_async(tasks: _AsyncTask[_T], *, timeout: float | None = None,
                       return_exceptions: Literal[False] = False,
                       progress: bool = False) -> _AsyncPairs[int, _T]: ...
@overload
def as_completed_async(tasks: _Task[_T], *, timeout: float | None = None,
                       return_exceptions: Literal[False] = False,
                       progress: bool = False) -> _AsyncPairs[int, _T]: ...
@overload
def as_completed_async(tasks: Iterable[_AsyncTask[_T]], *, timeout: float | None = None,
                       return_exceptions: Literal[False] = False,
                       progress: bool = False) -> _AsyncPairs[int, _T]: ...
@overload
def as_completed_async(tasks: Iterable[_Task[_T]], *, timeout: float | None = None,
                       return_exceptions: Literal[False] = False,
                       progress: bool = False) -> _AsyncPairs[int, _T]: ...
@overload
def as_completed_async(tasks: Mapping[_K, _AsyncTask[_T]], *, timeout: float | None = None,
                       return_exceptions: bool,
                       progress: bool = False) -> _AsyncPairs[_K, _T | BaseException]: ...
@overload
def as_completed_async(tasks: Mapping[_K, _Task[_T]], *, timeout: float | None = None,
                       return_exceptions: bool,
                       progress: bool = False) -> _AsyncPairs[_K, _T | BaseException]: ...
@overload
def as_completed_async(tasks: _AsyncTask[_T], *, timeout: float | None = None,
                       return_exceptions: bool,
                       progress: bool = False) -> _AsyncPairs[int, _T | BaseException]: ...
@overload
def as_completed_async(tasks: _Task[_T], *, timeout: float | None = None, return_exceptions: bool,
                       progress: bool = False) -> _AsyncPairs[int, _T | BaseException]: ...
@overload
def as_completed_async(tasks: Iterable[_AsyncTask[_T]], *, timeout: float | None = None,
                       return_exceptions: bool,
                       progress: bool = False) -> _AsyncPairs[int, _T | BaseException]: ...
@overload
def as_completed_async(tasks: Iterable[_Task[_T]], *, timeout: float | None = None,
                       return_exceptions: bool,
                       progress: bool = False) -> _AsyncPairs[int, _T | BaseException]: ...
def as_completed_async(tasks, *, timeout: float | None = None,
                       return_exceptions: bool = False, progress: bool = False) -> Any:
    """``async for key, result in concurrency.as_completed_async(tasks)``."""
    return _registry.driver().as_completed_async(tasks, timeout=timeout,
                                                 return_exceptions=return_exceptions,
                                                 **_progress_option(progress))


def defer(tasks: _Tasks, *, always: bool = False) -> None:
    """Run ``tasks`` in the background when the current work is done.

    Inside a ``deferring()`` scope the tasks start when the scope ends (and
    are dropped if it raises, unless ``always=True``); outside of one they
    start at once.  ``defer`` itself returns at once.

    On the process and fork drivers the tasks run detached, in a session of
    their own: they outlive this interpreter, and may print to its stdout
    and stderr after it has exited.  The fork driver's keep none of this
    process's descriptors but stdin, stdout and stderr.  Nobody waits for
    them: a failure, a crash or a timeout is written to stderr.  On sync
    they run in this process when the scope ends, and exceptions propagate.
    """
    _registry.driver().defer(tasks, always=always)


def driver(name: str | None = None) -> Driver:
    """Return the driver named ``name`` (the default one when None)."""
    return _registry.driver(name)


def extend(name: str, factory: Callable[[], Driver]) -> None:
    """Register a driver: ``factory()`` returns a Driver.  Replaces ``name``."""
    _registry.extend(name, factory)


def set_default_driver(name: str | None) -> None:
    """Make ``name`` the default driver (None restores the configured one)."""
    _registry.set_default(name)


def default_driver() -> str:
    """Name of the default driver: set_default_driver(), then $CONCURRENCY_DRIVER,
    then concurrency.ini, then "process"."""
    return _registry.default_name()


_scope: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "concurrency_defer_scope", default=None)


class _DeferScope:
    """One unit of work; ``defer()`` calls inside it start when it ends."""

    def __init__(self) -> None:
        self._queued: list | None = None
        self._token: contextvars.Token[list | None] | None = None

    def __enter__(self) -> _DeferScope:
        if self._token is not None:
            raise RuntimeError("this deferring() scope is already open; "
                               "call deferring() again for a new one")
        self._queued = []
        self._token = _scope.set(self._queued)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: types.TracebackType | None) -> Literal[False]:
        queued, self._queued = self._queued or [], None
        token, self._token = self._token, None
        assert token is not None, "__exit__ comes after __enter__"
        _scope.reset(token)
        if _failed(exc_type, exc):
            queued = [item for item in queued if item[1]]
        _start_deferred(queued)
        return False

    def __call__(self, func: _F) -> _F:
        return deferring(func)


def _failed(exc_type, exc):
    # sys.exit() / sys.exit(0) ends a command successfully: not a failure.
    if exc_type is None:
        return False
    return not (issubclass(exc_type, SystemExit) and exc.code in (None, 0))


@overload
def deferring(func: None = None) -> _DeferScope: ...
@overload
def deferring(func: _F) -> _F: ...
def deferring(func=None) -> Any:
    """Mark one unit of work -- a handler, a request, a command.

    As ``with concurrency.deferring():`` or as ``@concurrency.deferring`` on
    a plain or ``async def`` function: tasks deferred inside start when it
    ends; if it raises, they are dropped except those deferred with
    ``always=True``.
    """
    if func is None:
        return _DeferScope()
    if not callable(func):
        raise TypeError("deferring() takes a function to decorate or nothing, not %r"
                        % (func,))
    import inspect
    if inspect.iscoroutinefunction(func):
        @functools.wraps(func)
        async def async_wrapper(*args, **kwargs):
            with _DeferScope():
                return await func(*args, **kwargs)
        return async_wrapper

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with _DeferScope():
            return func(*args, **kwargs)
    return wrapper


def _schedule_deferred(start, always):
    """Queue ``start`` in the innermost deferring() scope, or call it now."""
    queued = _scope.get()
    if queued is None:
        start()
    else:
        queued.append((start, always))


def _start_deferred(queued):
    # Start every queued batch even if one fails to start; then raise the
    # first failure (the sync driver's task errors), so none goes unseen.
    first = None
    for start, _always in queued:
        try:
            start()
        except Exception as exc:
            if first is None:
                first = exc
    if first is not None:
        raise first


# -- Registry -----------------------------------------------------------------

class _Registry:
    """Driver factories by name, one cached instance each, and the default."""

    def __init__(self, factories):
        self._factories = dict(factories)
        self._instances = {}
        self._default = None
        # Reentrant, as the other locks here: a signal handler may call
        # driver() or run() while the main thread holds it.
        self._lock = threading.RLock()

    def names(self):
        return sorted(self._factories)

    def driver(self, name=None):
        if name is None:
            name = self.default_name()
        with self._lock:
            instance = self._instances.get(name)
            factory = self._factories.get(name)
        if instance is not None:
            return instance
        if factory is None:
            raise ValueError("unknown concurrency driver %r; known drivers: %s"
                             % (name, ", ".join(self.names())))
        # Called without the lock held: a factory may itself ask for a driver.
        instance = factory()
        if not isinstance(instance, Driver):
            raise TypeError("the factory of driver %r returned %r, not a "
                            "concurrency.Driver" % (name, instance))
        with self._lock:
            if self._factories.get(name) is factory:
                instance = self._instances.setdefault(name, instance)
        return instance

    def extend(self, name, factory):
        if not isinstance(name, str) or not name:
            raise TypeError("a driver name must be a non-empty str, not %r" % (name,))
        if not callable(factory):
            raise TypeError("the factory of driver %r must be callable, not %r"
                            % (name, factory))
        with self._lock:
            self._factories[name] = factory
            self._instances.pop(name, None)

    def set_default(self, name):
        if name is not None and name not in self._factories:
            raise ValueError("unknown concurrency driver %r; known drivers: %s"
                             % (name, ", ".join(self.names())))
        self._default = name

    def default_name(self):
        if self._default is not None:
            return self._default
        name = os.environ.get(DRIVER_ENV)
        if name:
            if name not in self._factories:
                raise ConfigError("environment variable %s=%r names an unknown driver; "
                                  "known drivers: %s" % (DRIVER_ENV, name, ", ".join(self.names())))
            return name
        config = _read_config()
        name = config.get("default")
        if name:
            if name not in self._factories:
                raise ConfigError("%s: default = %s names an unknown driver; known drivers: %s"
                                  % (config["path"], name, ", ".join(self.names())))
            return name
        return "process"


# -- Drivers ------------------------------------------------------------------

class Driver:
    """Base class of drivers.

    A custom driver implements ``run`` (and may implement ``defer``); the
    base class builds the rest on it: ``defer`` runs the tasks on a
    background thread and reports failures on stderr; ``as_completed``,
    ``run_async``, ``as_completed_async``, ``map`` and ``progress=True`` work
    too, with results coming in task order once ``run`` returns.  Built-in drivers
    override ``_completions`` to report each task as it ends.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        run = cls.__dict__.get("run")
        # A custom driver's run is given progress=True here, whether it names
        # progress or not (a type checker wants an override to take it).
        if run is not None and cls.__module__ != __name__:
            cls.run = _with_progress(run)

    @overload
    def run(self, tasks: Mapping[_K, _AsyncTask[_T]], *, timeout: float | None = None,
            return_exceptions: Literal[False] = False, progress: bool = False) -> dict[_K, _T]: ...
    @overload
    def run(self, tasks: Mapping[_K, _Task[_T]], *, timeout: float | None = None,
            return_exceptions: Literal[False] = False, progress: bool = False) -> dict[_K, _T]: ...
    @overload
    def run(self, tasks: _AsyncTask[_T], *, timeout: float | None = None,
            return_exceptions: Literal[False] = False, progress: bool = False) -> list[_T]: ...
    @overload
    def run(self, tasks: _Task[_T], *, timeout: float | None = None,
            return_exceptions: Literal[False] = False, progress: bool = False) -> list[_T]: ...
    @overload
    def run(self, tasks: Iterable[_AsyncTask[_T]], *, timeout: float | None = None,
            return_exceptions: Literal[False] = False, progress: bool = False) -> list[_T]: ...
    @overload
    def run(self, tasks: Iterable[_Task[_T]], *, timeout: float | None = None,
            return_exceptions: Literal[False] = False, progress: bool = False) -> list[_T]: ...
    @overload
    def run(self, tasks: Mapping[_K, _AsyncTask[_T]], *, timeout: float | None = None,
            return_exceptions: bool, progress: bool = False) -> dict[_K, _T | BaseException]: ...
    @overload
    def run(self, tasks: Mapping[_K, _Task[_T]], *, timeout: float | None = None,
            return_exceptions: bool, progress: bool = False) -> dict[_K, _T | BaseException]: ...
    @overload
    def run(self, tasks: _AsyncTask[_T], *, timeout: float | None = None, return_exceptions: bool,
            progress: bool = False) -> list[_T | BaseException]: ...
    @overload
    def run(self, tasks: _Task[_T], *, timeout: float | None = None, return_exceptions: bool,
            progress: bool = False) -> list[_T | BaseException]: ...
    @overload
    def run(self, tasks: Iterable[_AsyncTask[_T]], *, timeout: float | None = None,
            return_exceptions: bool, progress: bool = False) -> list[_T | BaseException]: ...
    @overload
    def run(self, tasks: Iterable[_Task[_T]], *, timeout: float | None = None,
            return_exceptions: bool, progress: bool = False) -> list[_T | BaseException]: ...
    def run(self, tasks, *, timeout=None, return_exceptions=False, progress=False) -> Any:
        """Run ``tasks`` -- a mapping of keys to callables, an iterable of
        callables or one callable -- and return their results: a dict with
        the same keys, else a list in task order.

        A custom driver implements this.  ``timeout`` (seconds or None) is
        for the whole run; with ``return_exceptions=True`` each failed task's
        exception is its result, else the first one in task order is raised
        once every task has ended.  ``progress=True`` is added for you."""
        raise NotImplementedError

    def defer(self, tasks: _Tasks, *, always: bool = False) -> None:
        """Start ``tasks`` in the background when the current deferring()
        scope ends (at once outside of one), their results unused; a failure
        is reported on stderr.  A custom driver may implement this; this one
        runs them with ``run`` on a thread the interpreter waits for at exit."""
        batch = _Batch(tasks)

        def start():
            # Not a daemon thread: the interpreter waits for it at exit, so
            # deferred work is never cut off silently.
            threading.Thread(target=self._run_deferred, args=(batch,),
                             name="concurrency-defer").start()

        _schedule_deferred(start, always)

    def _run_deferred(self, batch):
        outcomes = self.run(batch.shape(batch.calls), return_exceptions=True)
        values = outcomes.values() if isinstance(outcomes, dict) else outcomes
        for key, value in zip(batch.keys, values):
            if isinstance(value, BaseException):
                _report_deferred_failure(key, value)

    @overload
    def as_completed(self, tasks: Mapping[_K, _AsyncTask[_T]], *, timeout: float | None = None,
                     return_exceptions: Literal[False] = False,
                     progress: bool = False) -> _Pairs[_K, _T]: ...
    @overload
    def as_completed(self, tasks: Mapping[_K, _Task[_T]], *, timeout: float | None = None,
                     return_exceptions: Literal[False] = False,
                     progress: bool = False) -> _Pairs[_K, _T]: ...
    @overload
    def as_completed(self, tasks: _AsyncTask[_T], *, timeout: float | None = None,
                     return_exceptions: Literal[False] = False,
                     progress: bool = False) -> _Pairs[int, _T]: ...
    @overload
    def as_completed(self, tasks: _Task[_T], *, timeout: float | None = None,
                     return_exceptions: Literal[False] = False,
                     progress: bool = False) -> _Pairs[int, _T]: ...
    @overload
    def as_completed(self, tasks: Iterable[_AsyncTask[_T]], *, timeout: float | None = None,
                     return_exceptions: Literal[False] = False,
                     progress: bool = False) -> _Pairs[int, _T]: ...
    @overload
    def as_completed(self, tasks: Iterable[_Task[_T]], *, timeout: float | None = None,
                     return_exceptions: Literal[False] = False,
                     progress: bool = False) -> _Pairs[int, _T]: ...
    @overload
    def as_completed(self, tasks: Mapping[_K, _AsyncTask[_T]], *, timeout: float | None = None,
                     return_exceptions: bool,
                     progress: bool = False) -> _Pairs[_K, _T | BaseException]: ...
    @overload
    def as_completed(self, tasks: Mapping[_K, _Task[_T]], *, timeout: float | None = None,
                     return_exceptions: bool,
                     progress: bool = False) -> _Pairs[_K, _T | BaseException]: ...
    @overload
    def as_completed(self, tasks: _AsyncTask[_T], *, timeout: float | None = None,
                     return_exceptions: bool,
                     progress: bool = False) -> _Pairs[int, _T | BaseException]: ...
    @overload
    def as_completed(self, tasks: _Task[_T], *, timeout: float | None = None,
                     return_exceptions: bool,
                     progress: bool = False) -> _Pairs[int, _T | BaseException]: ...
    @overload
    def as_completed(self, tasks: Iterable[_AsyncTask[_T]], *, timeout: float | None = None,
                     return_exceptions: bool,
                     progress: bool = False) -> _Pairs[int, _T | BaseException]: ...
    @overload
    def as_completed(self, tasks: Iterable[_Task[_T]], *, timeout: float | None = None,
                     return_exceptions: bool,
                     progress: bool = False) -> _Pairs[int, _T | BaseException]: ...
    def as_completed(self, tasks, *, timeout: float | None = None,
                     return_exceptions: bool = False, progress: bool = False) -> Any:
        """Yield ``(key, result)`` pairs as tasks finish.

        A failed task's exception is raised when its turn comes (or yielded
        as its result with ``return_exceptions=True``).  Leaving the loop
        early -- ``break``, that exception, closing the generator -- stops
        the tasks still running: their processes are killed and reaped.
        ``progress=True`` shows the progress line, as for run().
        """
        batch = _Batch(tasks)
        _check_timeout(timeout)
        outcomes = _Outcomes(batch)
        return _pairs(self._tracked(batch, outcomes, timeout, None, progress), outcomes,
                      return_exceptions)

    @overload
    async def run_async(self, tasks: Mapping[_K, _AsyncTask[_T]], *, timeout: float | None = None,
                        return_exceptions: Literal[False] = False,
                        progress: bool = False) -> dict[_K, _T]: ...
    @overload
    async def run_async(self, tasks: Mapping[_K, _Task[_T]], *, timeout: float | None = None,
                        return_exceptions: Literal[False] = False,
                        progress: bool = False) -> dict[_K, _T]: ...
    @overload
    async def run_async(self, tasks: _AsyncTask[_T], *, timeout: float | None = None,
                        return_exceptions: Literal[False] = False,
                        progress: bool = False) -> list[_T]: ...
    @overload
    async def run_async(self, tasks: _Task[_T], *, timeout: float | None = None,
                        return_exceptions: Literal[False] = False,
                        progress: bool = False) -> list[_T]: ...
    @overload
    async def run_async(self, tasks: Iterable[_AsyncTask[_T]], *, timeout: float | None = None,
                        return_exceptions: Literal[False] = False,
                        progress: bool = False) -> list[_T]: ...
    @overload
    async def run_async(self, tasks: Iterable[_Task[_T]], *, timeout: float | None = None,
                        return_exceptions: Literal[False] = False,
                        progress: bool = False) -> list[_T]: ...
    @overload
    async def run_async(self, tasks: Mapping[_K, _AsyncTask[_T]], *, timeout: float | None = None,
                        return_exceptions: bool,
                        progress: bool = False) -> dict[_K, _T | BaseException]: ...
    @overload
    async def run_async(self, tasks: Mapping[_K, _Task[_T]], *, timeout: float | None = None,
                        return_exceptions: bool,
                        progress: bool = False) -> dict[_K, _T | BaseException]: ...
    @overload
    async def run_async(self, tasks: _AsyncTask[_T], *, timeout: float | None = None,
                        return_exceptions: bool,
                        progress: bool = False) -> list[_T | BaseException]: ...
    @overload
    async def run_async(self, tasks: _Task[_T], *, timeout: float | None = None,
                        return_exceptions: bool,
                        progress: bool = False) -> list[_T | BaseException]: ...
    @overload
    async def run_async(self, tasks: Iterable[_AsyncTask[_T]], *, timeout: float | None = None,
                        return_exceptions: bool,
                        progress: bool = False) -> list[_T | BaseException]: ...
    @overload
    async def run_async(self, tasks: Iterable[_Task[_T]], *, timeout: float | None = None,
                        return_exceptions: bool,
                        progress: bool = False) -> list[_T | BaseException]: ...
    async def run_async(self, tasks, *, timeout: float | None = None,
                        return_exceptions: bool = False, progress: bool = False) -> Any:
        """``run`` for asyncio: the event loop keeps running meanwhile.

        Cancelling the awaiting task stops the tasks still running (their
        processes killed and reaped) and re-raises CancelledError.
        """
        batch = _Batch(tasks)
        _check_timeout(timeout)
        outcomes = _Outcomes(batch)

        def work(stop):
            for _index in self._tracked(batch, outcomes, timeout, stop, progress):
                pass

        await _in_thread(work)
        return outcomes.finish(return_exceptions)

    @overload
    def as_completed_async(self, tasks: Mapping[_K, _AsyncTask[_T]], *,
                           timeout: float | None = None, return_exceptions: Literal[False] = False,
                           progress: bool = False) -> _AsyncPairs[_K, _T]: ...
    @overload
    def as_completed_async(self, tasks: Mapping[_K, _Task[_T]], *, timeout: float | None = None,
                           return_exceptions: Literal[False] = False,
                           progress: bool = False) -> _AsyncPairs[_K, _T]: ...
    @overload
    def as_completed_async(self, tasks: _AsyncTask[_T], *, timeout: float | None = None,
                           return_exceptions: Literal[False] = False,
                           progress: bool = False) -> _AsyncPairs[int, _T]: ...
    @overload
    def as_completed_async(self, tasks: _Task[_T], *, timeout: float | None = None,
                           return_exceptions: Literal[False] = False,
                           progress: bool = False) -> _AsyncPairs[int, _T]: ...
    @overload
    def as_completed_async(self, tasks: Iterable[_AsyncTask[_T]], *, timeout: float | None = None,
                           return_exceptions: Literal[False] = False,
                           progress: bool = False) -> _AsyncPairs[int, _T]: ...
    @overload
    def as_completed_async(self, tasks: Iterable[_Task[_T]], *, timeout: float | None = None,
                           return_exceptions: Literal[False] = False,
                           progress: bool = False) -> _AsyncPairs[int, _T]: ...
    @overload
    def as_completed_async(self, tasks: Mapping[_K, _AsyncTask[_T]], *,
                           timeout: float | None = None, return_exceptions: bool,
                           progress: bool = False) -> _AsyncPairs[_K, _T | BaseException]: ...
    @overload
    def as_completed_async(self, tasks: Mapping[_K, _Task[_T]], *, timeout: float | None = None,
                           return_exceptions: bool,
                           progress: bool = False) -> _AsyncPairs[_K, _T | BaseException]: ...
    @overload
    def as_completed_async(self, tasks: _AsyncTask[_T], *, timeout: float | None = None,
                           return_exceptions: bool,
                           progress: bool = False) -> _AsyncPairs[int, _T | BaseException]: ...
    @overload
    def as_completed_async(self, tasks: _Task[_T], *, timeout: float | None = None,
                           return_exceptions: bool,
                           progress: bool = False) -> _AsyncPairs[int, _T | BaseException]: ...
    @overload
    def as_completed_async(self, tasks: Iterable[_AsyncTask[_T]], *, timeout: float | None = None,
                           return_exceptions: bool,
                           progress: bool = False) -> _AsyncPairs[int, _T | BaseException]: ...
    @overload
    def as_completed_async(self, tasks: Iterable[_Task[_T]], *, timeout: float | None = None,
                           return_exceptions: bool,
                           progress: bool = False) -> _AsyncPairs[int, _T | BaseException]: ...
    def as_completed_async(self, tasks, *, timeout: float | None = None,
                           return_exceptions: bool = False, progress: bool = False) -> Any:
        """``as_completed`` for ``async for``; leaving the loop early stops the
        tasks still running (use ``contextlib.aclosing`` to wait for that)."""
        batch = _Batch(tasks)
        _check_timeout(timeout)
        outcomes = _Outcomes(batch)
        return _pairs_async(lambda stop: _pairs(
            self._tracked(batch, outcomes, timeout, stop, progress), outcomes,
            return_exceptions))

    def _tracked(self, batch, outcomes, timeout, stop, progress):
        """_completions, shown on the progress line if ``progress``."""
        completions = self._completions(batch, outcomes, timeout, stop)
        if progress:
            completions = _Progress(len(batch.calls)).track(completions, outcomes)
        return completions

    def _completions(self, batch, outcomes, timeout, stop):
        """Fill ``outcomes`` and yield each task's index as it finishes.

        ``stop`` (a _Stop or None) asks to end early.  This default makes one
        ``run`` call, then yields in task order.
        """
        results = self.run(batch.shape(batch.calls), timeout=timeout, return_exceptions=True)
        values = list(results.values()) if isinstance(results, dict) else list(results)
        for index, value in enumerate(values):
            if isinstance(value, BaseException):
                outcomes.fail(index, value)
            else:
                outcomes.succeed(index, value)
            yield index


    @overload
    def map(self, fn: Callable[[_X], Awaitable[_T]], iterable: Iterable[_X], *,
            chunksize: int | None = None, timeout: float | None = None,
            return_exceptions: Literal[False] = False, progress: bool = False) -> list[_T]: ...
    @overload
    def map(self, fn: Callable[[_X], _T], iterable: Iterable[_X], *,
            chunksize: int | None = None, timeout: float | None = None,
            return_exceptions: Literal[False] = False, progress: bool = False) -> list[_T]: ...
    @overload
    def map(self, fn: Callable[[_X], Awaitable[_T]], iterable: Iterable[_X], *,
            chunksize: int | None = None, timeout: float | None = None,
            return_exceptions: bool, progress: bool = False) -> list[_T | BaseException]: ...
    @overload
    def map(self, fn: Callable[[_X], _T], iterable: Iterable[_X], *,
            chunksize: int | None = None, timeout: float | None = None,
            return_exceptions: bool, progress: bool = False) -> list[_T | BaseException]: ...
    def map(self, fn, iterable, *, chunksize: int | None = None,
            timeout: float | None = None, return_exceptions: bool = False,
            progress: bool = False) -> Any:
        """``fn(item)`` for each item, a list in input order; see
        concurrency.map().  This default runs each chunk of items as a task
        with ``run`` (``_completions``), so a custom driver has it too."""
        the_map = _Map(self, fn, iterable, chunksize, timeout)
        return the_map.run(return_exceptions, progress)

    def _map_deadline(self, timeout):
        """(timeout, deadline) of a map: a custom driver's own default
        applies to each of its runs."""
        return timeout, (None if timeout is None else time.monotonic() + timeout)

    def _map_width(self):
        """How many chunks may run at once: a map cuts its input into four
        chunks per worker at least, so that none waits for a long last one."""
        return getattr(self, "max_workers", None) or _CORES

    def _map_function(self, fn):
        """(what each chunk calls, or None; the payload a run's context
        carries instead, or None)."""
        return fn, None


_CO_VARARGS = 0x04  # inspect.CO_VARARGS, without importing inspect


def _with_progress(run):
    """A custom driver's ``run`` that also takes ``progress=True``: the
    progress line then counts the tasks as ``run`` returns them."""
    @functools.wraps(run)
    def run_with_progress(self, tasks, *, progress=False, **options):
        if not progress:
            return run(self, tasks, **options)
        batch = _Batch(tasks)
        timeout = options.get("timeout")
        _check_timeout(timeout)
        return _run_to_end(self, batch, timeout, options.get("return_exceptions", False), True)
    return run_with_progress


class SyncDriver(Driver):
    """Runs tasks one after another in this process: for tests and debugging.

    Task exceptions propagate unchanged (the first one, after every task ran);
    ``timeout`` is accepted and ignored.  BaseExceptions such as
    KeyboardInterrupt and SystemExit propagate at once, as from a plain call.
    """

    def run(self, tasks, *, timeout=None, return_exceptions=False, progress=False) -> Any:
        batch = _Batch(tasks)
        _check_timeout(timeout)
        return _run_to_end(self, batch, timeout, return_exceptions, progress)

    def defer(self, tasks, *, always=False):
        batch = _Batch(tasks)
        _schedule_deferred(lambda: self.run(batch.shape(batch.calls)), always)

    def as_completed(self, tasks, *, timeout=None, return_exceptions=False, progress=False) -> Any:
        if progress:  # counted as each task ends, as on the other drivers
            return super().as_completed(tasks, timeout=timeout,
                                        return_exceptions=return_exceptions, progress=True)
        batch = _Batch(tasks)
        _check_timeout(timeout)
        return self._as_completed(batch, return_exceptions)

    def map(self, fn, iterable, *, chunksize=None, timeout=None, return_exceptions=False,
            progress=False) -> Any:
        """``fn(item)`` for each item, one after another; an item's exception
        is raised unchanged (the first one, after every item ran), with a
        note naming its index."""
        _check_map_arguments(fn, iterable, chunksize)
        _check_timeout(timeout)
        values = []
        first_failure = None
        shown = _Progress(_known_length(iterable), unit="items") if progress else None
        try:
            for index, item in enumerate(iterable):
                failed = False
                try:
                    value = _call(functools.partial(fn, item))
                except Exception as exc:
                    _add_note(exc, "raised by item %d of concurrency.map" % index)
                    if first_failure is None:
                        first_failure = exc
                    value, failed = exc, True
                values.append(value)
                if shown is not None:
                    shown.add(1, failed)
        finally:
            if shown is not None:
                shown.show(final=True)
        if first_failure is not None and not return_exceptions:
            raise first_failure
        return values

    def _as_completed(self, batch, return_exceptions):
        # Lazy: each task runs when the loop asks for it, and its exception
        # propagates unchanged.
        for key, fn in zip(batch.keys, batch.calls):
            try:
                value = _call(fn)
            except Exception as exc:
                if not return_exceptions:
                    raise
                value = exc
            yield key, value

    def _completions(self, batch, outcomes, timeout, stop):
        for index, fn in enumerate(batch.calls):
            if stop is not None and stop.is_set():
                raise _Stopped()
            try:
                outcomes.succeed(index, _call(fn))
            except Exception as exc:
                outcomes.fail(index, exc)
            yield index


class _ChildDriver(Driver):
    """What the process and fork drivers share: limits and the run loop."""

    max_workers: int
    timeout: float | None

    def __init__(self, max_workers: int | None = None, timeout: float | None = None):
        config = _read_config()
        workers = config.get("max_workers", DEFAULT_MAX_WORKERS) if max_workers is None \
            else max_workers
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ValueError("max_workers must be a positive int, not %r" % (workers,))
        self.max_workers = workers
        self.timeout = _check_timeout(config.get("timeout") if timeout is None else timeout)
        if self.timeout is not None:
            self.timeout = _Limit(self.timeout, "the driver's, from %s" % (
                "%s(timeout=%g)" % (type(self).__name__, self.timeout) if timeout is not None
                else "%s (timeout = %g)" % (_config_path(), self.timeout)))

    def run(self, tasks, *, timeout=None, return_exceptions=False, progress=False) -> Any:
        """Run ``tasks`` at once; see concurrency.run().  ``progress=True``
        shows done/total, elapsed time and rate on stderr if it is a terminal."""
        batch = _Batch(tasks)
        _check_timeout(timeout)
        return _run_to_end(self, batch, timeout, return_exceptions, progress)

    def _deadline(self, timeout):
        # None: the driver's timeout; math.inf: no limit, whatever that is.
        if timeout is None:
            timeout = self.timeout
        else:
            timeout = _check_timeout(timeout)
            if timeout is not None and not isinstance(timeout, _Limit):
                timeout = _Limit(timeout, "the timeout argument")
        return timeout, (None if timeout is None else time.monotonic() + timeout)

    _map_deadline = _deadline


class ProcessDriver(_ChildDriver):
    """Runs each task in a warm ``worker.py`` child started with sys.executable.

    Args:
        max_workers: most children alive at once; default min(32, cores + 4).
        timeout: default for run(); seconds; None means no limit.
        idle_timeout: seconds an unused warm worker lives.
    """

    idle_timeout: float

    def __init__(self, max_workers=None, timeout=None, idle_timeout=DEFAULT_IDLE_TIMEOUT):
        super().__init__(max_workers, timeout)
        if not _POSIX:
            raise ConcurrencyError("the process driver passes pipes to its workers, which "
                                   "needs a POSIX system; on %s use the sync driver"
                                   % sys.platform)
        if not sys.executable:
            raise ConcurrencyError("the process driver needs sys.executable to start "
                                   "workers, and this interpreter has none; use the "
                                   "fork or sync driver")
        if not os.path.isfile(_WORKER_PATH) and _worker_source() is None:
            raise ConcurrencyError("worker.py must sit next to concurrency.py; not found "
                                   "at %s" % _WORKER_PATH)
        self._pool = _WorkerPool(self.max_workers, idle_timeout)

    def _completions(self, batch, outcomes, timeout, stop):
        timeout, deadline = self._deadline(timeout)
        if not batch.calls:
            return
        # Start workers first: their Python and dill imports overlap ours.
        # The warm ones there are, or one per core; more once tasks prove
        # slow (see _Run).
        size = min(len(batch.calls), self.max_workers)
        if isinstance(outcomes, _MapWindow) and outcomes.quick():
            # Chunks cut for the cores: each worker is sent its share at once.
            size = min(size, _CORES)
        _reap_exited()  # fork children of an earlier run
        workers = self._pool.acquire(size, deadline, start=min(size, _CORES), stop=stop)
        try:
            payloads = _Payloads(batch.keys, batch.calls, outcomes=outcomes)
            if stop is not None and stop.is_set():
                raise _Stopped()  # cancelled meanwhile: send nothing
            yield from _ProcessRun(self._pool, workers, size, payloads, outcomes, timeout,
                                   deadline, stop).completions()
        finally:
            self._pool.release(workers)
            _reap_exited()  # and those that were still exiting as it started

    def _map_function(self, fn):
        # Once per worker, in the run's context (see worker.MapChunk); one
        # that can't be serialized fails the map before anything starts.
        return None, _TaskSerializer([fn]).dumps("map function", fn)

    def defer(self, tasks, *, always=False):
        batch = _Batch(tasks)
        # Serialized now: a task that can't be fails here, at the call site,
        # and captured values are taken as they are now.
        context = _current_context()
        serializer = _TaskSerializer()
        tasks = [(repr(key), serializer.dumps(key, fn)) for key, fn in zip(batch.keys, batch.calls)]
        # One detached process for the batch, running max_workers at once.
        payload = pickle.dumps((context, self.timeout, self.max_workers, tasks),
                               pickle.HIGHEST_PROTOCOL)
        _schedule_deferred(lambda: _spawn_detached(payload), always)


class ForkDriver(_ChildDriver):
    """Runs each task in an ``os.fork()`` child: tasks are inherited, not
    serialized, so a closure over a socket or a generator works too.

    Args:
        max_workers: most children alive at once; default min(32, cores + 4).
        timeout: default for run(); seconds; None means no limit.
    """

    def __init__(self, max_workers=None, timeout=None):
        if not _HAVE_FORK:
            raise ConcurrencyError("the fork driver needs os.fork(), which this platform "
                                   "(%s) does not have; use the %s driver"
                                   % (sys.platform, "process" if _POSIX else "sync"))
        super().__init__(max_workers, timeout)
        # Tasks of the last run, when it ended within _QUICK_RUN: a run of
        # no more starts with one child (see _ForkRun).
        self._quick_run = 0

    def _completions(self, batch, outcomes, timeout, stop):
        timeout, deadline = self._deadline(timeout)
        if not batch.calls:
            return
        if isinstance(outcomes, _MapWindow):
            # A map's chunks are cut to keep every core busy: one child only
            # when they take less than a fork or two would cost, by the time
            # per item measured so far.
            work = outcomes.estimated_seconds()
            solo = work is not None and work < 2 * _state.fork_seconds
            # Chunks cut for the cores: each child is sent its share at once.
            most = min(self.max_workers, _CORES) if outcomes.quick() else self.max_workers
            yield from _ForkRun(batch.calls, most, outcomes, timeout, deadline,
                                stop, solo).completions()
            return
        count = len(batch.calls)
        solo = count <= self._quick_run
        started = time.monotonic()
        self._quick_run = 0  # until this one proves quick too
        run = _ForkRun(batch.calls, self.max_workers, outcomes, timeout, deadline, stop, solo)
        yield from run.completions()
        # Quick: what its tasks took is less than another fork would cost
        # (ours, and the child's start, about as long), on this machine, at
        # this process's size -- not a fixed time: forks take from a tenth
        # of a millisecond to several.
        fork = 2 * _state.fork_seconds
        if time.monotonic() - started < (run.forks + 1) * fork + _QUICK_RUN:
            self._quick_run = count

    def defer(self, tasks, *, always=False):
        batch = _Batch(tasks)
        jobs = list(zip(batch.keys, batch.calls))
        _schedule_deferred(lambda: _fork_detached(jobs, self.timeout, self.max_workers), always)


class DaskDriver(_ChildDriver):
    """Runs each task on a Dask distributed cluster, with the contract of
    ``process``: tasks travel serialized the same way, and each runs in a
    child process of a Dask worker, so that a crash or a timeout ends that
    task alone.  Needs Dask's ``distributed`` (``pip install
    'concurrency[dask]'``), imported when the driver is first made.

    The cluster, in this order: ``client``; else ``address``, else the
    environment variable CONCURRENCY_DASK_ADDRESS, else ``dask_address`` in
    concurrency.ini; else the process's default Dask client; else a local
    one, started on first use and closed at exit (its scheduler and workers
    are threads of this process, the tasks its child processes).  The
    cluster's workers need dask, dill and the modules the tasks import by
    name, not this library: its two files are uploaded to them (a Dask
    worker plugin, present and future workers alike).

    Args:
        client: a ``distributed.Client`` to run on.
        address: a scheduler's address, such as ``tcp://scheduler:8786``.
        timeout: default for run(); seconds; None means no limit.
        max_workers: threads of the local cluster, when one is started.
        connect_timeout: seconds to reach the scheduler before giving up.
    """

    address: str | None
    connect_timeout: float

    def __init__(self, client=None, address=None, timeout=None, max_workers=None,
                 connect_timeout=DEFAULT_DASK_CONNECT_TIMEOUT):
        super().__init__(max_workers, timeout)
        if client is not None and address is not None:
            raise ValueError("give DaskDriver a client or an address, not both")
        if address is not None and (not isinstance(address, str) or not address):
            raise TypeError("address must be a scheduler address such as "
                            "'tcp://scheduler:8786', not %r" % (address,))
        _check_timeout(connect_timeout)
        if connect_timeout == math.inf:
            raise ValueError("connect_timeout must be finite: an unreachable scheduler "
                             "would hang the caller")
        _distributed()  # a clear error now when it is missing
        if client is not None and getattr(client, "asynchronous", False):
            raise TypeError("DaskDriver needs a synchronous distributed.Client; for "
                            "asyncio, use run_async() with one")
        # A Dask worker in this process (a local cluster) runs tasks with
        # this module, not with a second copy uploaded (see worker.dask_task).
        sys.modules.setdefault(_worker_module().DASK_RUNNER_NAME, sys.modules[__name__])
        self._client = client
        self.address = (address or os.environ.get(DASK_ADDRESS_ENV)
                        or _read_config().get("dask_address"))
        self.connect_timeout = connect_timeout

    def client(self):
        """The ``distributed.Client`` tasks go to, connected (or the local
        cluster started) on first use."""
        if self._client is not None:
            client = self._client
        elif self.address:
            client = _dask_client_at(self.address, self.connect_timeout)
        else:
            client = _default_dask_client() or _local_dask_client(self.max_workers)
        _upload_to_dask(client)
        return client

    def release_workers(self):
        """Let the warm child processes that tasks left on the cluster's
        workers go now, rather than once unused for a minute."""
        self.client().run(pickle.loads, _remote_call(_worker_module().dask_release))

    def _completions(self, batch, outcomes, timeout, stop):
        timeout, deadline = self._deadline(timeout)
        if not batch.calls:
            return
        payloads = _SharedPayloads(batch.keys, batch.calls, outcomes)
        client = self.client()
        if stop is not None and stop.is_set():
            raise _Stopped()  # cancelled meanwhile: send nothing
        yield from _DaskRun(client, payloads, outcomes, timeout, deadline, stop).completions()

    def defer(self, tasks, *, always=False):
        """Start ``tasks`` on the cluster when the current deferring() scope
        ends, their results unused; a failure is reported on the stderr of
        the Dask worker that ran it.  Without a cluster to go to, they run
        as ProcessDriver.defer runs them, detached: a local cluster would end
        with this process, and them with it."""
        batch = _Batch(tasks)
        # Serialized now: a task that can't be fails here, at the call site,
        # and captured values are taken as they are now.
        payloads = _dumps_tasks(batch.keys, batch.calls)
        keys = [repr(key) for key in batch.keys]

        def start():
            if self._client is None and not self.address and _default_dask_client() is None:
                payload = pickle.dumps((_current_context(), self.timeout, self.max_workers,
                                        list(zip(keys, payloads))), pickle.HIGHEST_PROTOCOL)
                _spawn_detached(payload)
            else:
                _defer_on_dask(self.client(), payloads, keys, self.timeout)

        _schedule_deferred(start, always)


# -- Input and outcomes -------------------------------------------------------

class _Batch:
    """The validated tasks of one call: keys, callables, and result shape."""

    def __init__(self, tasks):
        self.mapping = isinstance(tasks, collections.abc.Mapping)
        if self.mapping:
            self.keys = list(tasks)
            self.calls = [tasks[key] for key in self.keys]
        elif callable(tasks):
            self.keys, self.calls = [0], [tasks]
        elif tasks is None or isinstance(tasks, (str, bytes, bytearray)) \
                or not isinstance(tasks, collections.abc.Iterable):
            raise TypeError("tasks must be a callable, a mapping of keys to callables or "
                            "an iterable of callables, not %s" % _describe(tasks))
        else:
            self.calls = list(tasks)
            self.keys = list(range(len(self.calls)))
        for key, fn in zip(self.keys, self.calls):
            if not callable(fn):
                self._refuse_value(key, fn)
            missing = _missing_parameters(fn)
            if missing:
                name = getattr(getattr(fn, "func", fn), "__name__", "f")
                raise TypeError(
                    "task %r, %s, needs arguments it will not get: %s.  A task is called "
                    "with none: bind them with a lambda (lambda: %s(...)) or "
                    "functools.partial(%s, ...)" % (
                        key, _describe(fn), ", ".join(missing), name, name))

    def _refuse_value(self, key, value):
        """A task that is a value, not a callable: most often the result of
        calling the function instead of passing it."""
        coroutines = [fn for fn in self.calls if isinstance(fn, collections.abc.Coroutine)]
        for coroutine in coroutines:
            coroutine.close()  # never awaited, and no warning saying so
        if isinstance(value, collections.abc.Coroutine):
            name = getattr(value, "__qualname__", "f")
            raise TypeError("task %r is a coroutine object, not a coroutine function: did "
                            "you call it? pass the function itself (%s, not %s()) or a "
                            "lambda (lambda: %s(...))" % (key, name, name, name))
        if isinstance(value, (list, tuple, set, frozenset)) and value \
                and all(callable(fn) for fn in value):
            raise TypeError("task %r is a %s of callables, not a callable: pass the "
                            "callables themselves, one task each -- run([f, g]), not "
                            "run([[f, g]])" % (key, type(value).__name__))
        call = _call_written_for(key)
        if call is not None:
            raise TypeError("task %r is not callable: got %s.  Did you call it? %s ran "
                            "here, as the tasks were listed, and its result became the "
                            "task: pass lambda: %s so that it runs in the child"
                            % (key, _describe(value), call, call))
        raise TypeError("task %r is not callable: got %s.  Did you call it? Pass the "
                        "function itself, or a lambda that calls it -- lambda: "
                        "report(\"users\") -- so that it runs in the child"
                        % (key, _describe(value)))

    def shape(self, values):
        if self.mapping:
            return dict(zip(self.keys, values))
        return list(values)


class _Outcomes:
    """One slot per task: a value or an exception, filled as tasks end."""

    def __init__(self, batch) -> None:
        self.batch = batch
        self.count = len(batch.calls)
        self.values: list = [None] * len(batch.calls)
        self.failed = [False] * len(batch.calls)
        self.completed: collections.deque = collections.deque()  # indices not yet reported

    def succeed(self, index, value):
        self.values[index] = value
        self.completed.append(index)

    def fail(self, index, exc):
        self.values[index] = exc
        self.failed[index] = True
        self.completed.append(index)

    def key(self, index):
        return self.batch.keys[index]

    def note(self, key):
        return "raised by concurrency task %r in a child process" % (key,)

    def arrived(self, index, kind, body, lent=None):
        """A child's RESULT or ERROR frame for task ``index``."""
        _decode_outcome(self, index, kind, body, lent)

    def finish(self, return_exceptions):
        if not return_exceptions:
            for value, failed in zip(self.values, self.failed):
                if failed:
                    raise value
        return self.batch.shape(self.values)


def _run_to_end(driver, batch, timeout, return_exceptions, progress):
    outcomes = _Outcomes(batch)
    completions = driver._completions(batch, outcomes, timeout, None)
    if progress:
        completions = _Progress(len(batch.calls)).track(completions, outcomes)
    for _index in completions:
        pass
    return outcomes.finish(return_exceptions)


class _Map:
    """One map() call: its input cut into chunks (worker.MapChunk), run as
    the tasks of a run, and one slot per item that the chunks' outcomes
    fill.

    A sequence (list, tuple, range...) is one run: its length is known, and
    it is in memory already.  Any other iterable is read a window at a time
    -- up to _MAP_WINDOW items, cut into chunks -- each window a run, so
    that an endless or huge iterator never has all its items, nor their
    payloads, held at once.  Chunks are sized from the time per item the
    map's chunks took so far, or the last map of the same function on the
    same driver took (as joblib sizes its batches): about _CHUNK_SECONDS
    each, and at least four per worker, so that none waits for a long last
    one; ``chunksize`` fixes the size instead."""

    def __init__(self, driver, fn, iterable, chunksize, timeout) -> None:
        _check_map_arguments(fn, iterable, chunksize)
        _check_timeout(timeout)
        self.driver = driver
        self.chunksize = chunksize
        self.timeout, self.deadline = driver._map_deadline(timeout)
        self.width = max(1, driver._map_width())
        # What chunks call, or the payload that a run's context carries.
        self.function, self.map_function = driver._map_function(fn)
        self.timing_key = (id(driver), _timing_key(fn))
        self.per_item = _state.map_timing.get(self.timing_key)
        self.sequence: collections.abc.Sequence | None = None
        self.iterator: collections.abc.Iterator = iter(())
        if isinstance(iterable, collections.abc.Sequence):
            self.sequence = iterable
        else:
            self.iterator = iter(iterable)
        self.values: list = []
        self.failed = bytearray()
        self.progress = None

    # Slots, as _decode_outcome fills them: one per item.
    def key(self, index):
        return index

    def note(self, key):
        return "raised by item %r of concurrency.map in a child process" % (key,)

    def succeed(self, index, value):
        self.values[index] = value

    def fail(self, index, exc):
        self.values[index] = exc
        self.failed[index] = 1

    def chunk_size(self, count):
        """Items per chunk for the next ``count`` items: four chunks per
        worker at least -- per core, once the time per item is known, as a
        run takes one child per core until its tasks prove slow, and slow
        items get small chunks by their time anyway."""
        if self.chunksize is not None:
            return self.chunksize
        if self.per_item is None:
            return max(1, min(-(-count // (4 * self.width)), _FIRST_CHUNK))
        most = max(1, -(-count // (4 * min(self.width, _CORES))))
        return max(1, min(most, int(_CHUNK_SECONDS / max(self.per_item, 1e-9))))

    def windows(self):
        """(first item's index, its items) of each window of the input."""
        if self.sequence is not None:
            yield 0, self.sequence
            return
        start = 0
        window = _FIRST_WINDOW
        while True:
            items = []
            failure = None
            try:
                items.extend(itertools.islice(self.iterator, window))
            except Exception as exc:  # the input's own: after the items read before it
                failure = exc
            if items:
                yield start, items
            if failure is not None:
                raise failure
            start += len(items)
            if len(items) < window:
                return
            window = _MAP_WINDOW

    def run(self, return_exceptions, progress):
        if progress:
            self.progress = _Progress(_known_length(self.sequence), unit="items")
        try:
            for start, items in self.windows():
                self.values.extend(itertools.repeat(None, len(items)))
                self.failed.extend(bytes(len(items)))
                self._run_window(start, items)
        finally:
            if self.progress is not None:
                self.progress.show(final=True)
        if not return_exceptions:
            first = self.failed.find(1)
            if first >= 0:
                raise self.values[first]
        return self.values

    def _run_window(self, start, items):
        remaining = None
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:  # the map's time is up: these never start
                self._fail_all(start, len(items), TaskTimeout(
                    range(start, start + len(items)), [], self.timeout))
                return
        size = self.chunk_size(len(items))
        starts = list(range(0, len(items), size))
        chunks = [_worker_module().MapChunk(items[first:first + size], self.function)
                  for first in starts]
        window = _MapWindow(self, [start + first for first in starts], chunks)
        completions = self.driver._completions(window.batch, window, remaining, None)
        for index in completions:
            if self.progress is not None:
                self.progress.add(len(chunks[index].items), window.failures[index])

    def _fail_all(self, start, count, exc):
        self.values[start:start + count] = itertools.repeat(exc, count)
        self.failed[start:start + count] = b"\x01" * count
        if self.progress is not None:
            self.progress.add(count, count)

    def timed(self, count, seconds):
        """A chunk of ``count`` items took ``seconds``."""
        if count:
            self.per_item = seconds / count
            timing = _state.map_timing
            if len(timing) >= _TIMINGS_KEPT and self.timing_key not in timing:
                timing.clear()
            timing[self.timing_key] = self.per_item


class _MapWindow(_Outcomes):
    """The outcomes of one window of a map's chunks: each chunk's outcome
    fills the slots of its items."""

    def __init__(self, the_map, starts, chunks):
        batch = _Batch.__new__(_Batch)  # checked already: map's own chunks
        batch.mapping = False
        batch.calls = chunks
        batch.keys = [range(start, start + len(chunk.items))
                      for start, chunk in zip(starts, chunks)]
        super().__init__(batch)
        self.map = the_map
        self.starts = starts
        self.failures = [0] * len(chunks)  # failed items, by chunk
        self.skipped = {}  # chunk -> {position: SerializationError} (see item_failed)
        self.map_function = the_map.map_function  # see _ProcessRun

    def succeed(self, index, value):
        values, failures, seconds = value
        start = self.starts[index]
        the_map = self.map
        the_map.values[start:start + len(values)] = values
        worker = _worker_module()
        for position, body in failures:
            if body is None:  # SKIPPED: it failed here, before the chunk was sent
                the_map.fail(start + position, self.skipped[index][position])
            else:
                _decode_outcome(the_map, start + position, worker.ERROR, body)
        self.failures[index] = len(failures)
        the_map.timed(len(values), seconds)
        self.completed.append(index)

    def fail(self, index, exc):
        # The whole chunk: its process crashed, the time ran out, its
        # result could not be read.  Items that failed alone keep theirs.
        if isinstance(exc, TaskTimeout):  # the map's timeout, not what was left of it
            exc = TaskTimeout(exc.key, exc.unfinished, self.map.timeout)
        start = self.starts[index]
        the_map = self.map
        skipped = self.skipped.get(index, {})
        count = len(self.batch.calls[index].items)
        for item in range(start, start + count):
            if item - start not in skipped:
                the_map.fail(item, exc)
        self.failures[index] = count
        self.failed[index] = True
        self.completed.append(index)

    def quick(self):
        """Whether its chunks were cut by count, not by time: its items are
        known to take so little that more workers than cores would only
        compete for them."""
        per_item = self.map.per_item
        return (per_item is not None and self.map.chunksize is None
                and max(len(chunk.items) for chunk in self.batch.calls) * per_item
                < _CHUNK_SECONDS / 2)

    def estimated_seconds(self):
        """What its items will take in all, by the time per item measured so
        far, or None."""
        per_item = self.map.per_item
        if per_item is None:
            return None
        return per_item * sum(len(chunk.items) for chunk in self.batch.calls)

    def item_failed(self, index, position, exc):
        """Item ``position`` of chunk ``index`` can't be serialized: it fails
        alone, and the chunk goes without it (see _dumps_task)."""
        self.skipped.setdefault(index, {})[position] = exc
        self.map.fail(self.starts[index] + position, exc)


def _check_map_arguments(fn, iterable, chunksize):
    if not callable(fn):
        raise TypeError("map's function is not callable: got %s.  Did you call it? Pass "
                        "the function itself: concurrency.map(report, items)"
                        % _describe(fn))
    problem = _one_argument_problem(fn)
    if problem:
        name = getattr(getattr(fn, "func", fn), "__name__", "f")
        raise TypeError("map's function, %s, %s; it is called with one argument, "
                        "each item: bind the others with a lambda (lambda item: %s(item, "
                        "...)) or functools.partial" % (_describe(fn), problem, name))
    if iterable is None or not isinstance(iterable, collections.abc.Iterable):
        raise TypeError("map's items must be an iterable, not %s" % _describe(iterable))
    if chunksize is not None and (isinstance(chunksize, bool) or not isinstance(chunksize, int)
                                  or chunksize < 1):
        raise ValueError("chunksize must be a positive int or None, not %r" % (chunksize,))


def _one_argument_problem(fn):
    """Why ``fn`` can't be called with one positional argument, or None
    (also when its signature can't be read: then the call tells)."""
    function, bound = fn, 0
    if type(fn) is types.MethodType:
        function, bound = fn.__func__, 1
    if type(function) is types.FunctionType and not hasattr(function, "__signature__"):
        # From its code: inspect.signature() touches a few hundred objects,
        # each a page to copy in a process that has just forked.
        code = function.__code__
        names = code.co_varnames
        keyword_defaults = function.__kwdefaults__ or {}
        keyword_only = [name for name in names[code.co_argcount:
                                               code.co_argcount + code.co_kwonlyargcount]
                        if name not in keyword_defaults]
        positional = names[bound:code.co_argcount]
        required = positional[:max(0, len(positional) - len(function.__defaults__ or ()))]
        if len(required) > 1 or keyword_only:
            return "needs arguments it will not get: %s" % ", ".join(
                list(required[1:]) + keyword_only)
        if not positional and not code.co_flags & _CO_VARARGS:
            return "takes no arguments"
        return None
    import inspect
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(None)
    except TypeError:
        required = [name for name, parameter in signature.parameters.items()
                    if parameter.default is parameter.empty
                    and parameter.kind not in (parameter.VAR_POSITIONAL,
                                               parameter.VAR_KEYWORD)]
        if len(required) > 1:
            return "needs arguments it will not get: %s" % ", ".join(required[1:])
        if required:
            return "takes its one argument by keyword only (%s)" % required[0]
        return "takes no arguments"
    return None


def _known_length(iterable):
    return len(iterable) if isinstance(iterable, collections.abc.Sized) else None


def _timing_key(fn):
    """What identifies a map's function from one call to the next: a
    lambda made anew each time shares its code."""
    fn = getattr(fn, "func", fn)  # a functools.partial
    return getattr(fn, "__code__", None) or type(fn)


# A chunk of a map takes about this long, once the time per item is known;
# before that it holds at most _FIRST_CHUNK items.  An iterator is read
# _FIRST_WINDOW items first, then _MAP_WINDOW at a time.
_CHUNK_SECONDS = 0.05
_FIRST_CHUNK = 4096
_FIRST_WINDOW = 4096
_MAP_WINDOW = 65536
_TIMINGS_KEPT = 256


def _pairs(completions, outcomes, return_exceptions):
    """(key, value) pairs of tasks as they complete; closing it stops them."""
    try:
        for index in completions:
            value = outcomes.values[index]
            if outcomes.failed[index] and not return_exceptions:
                raise value
            yield outcomes.key(index), value
    finally:
        completions.close()


class _Stopped(BaseException):
    """Internal: a run was asked to stop (its awaiting task was cancelled)."""


class _Stop:
    """Asks a run on another thread to stop: a flag, and a pipe that wakes
    the run's select()."""

    def __init__(self):
        self._read, self._write = _pipe()
        self._set = False

    def fileno(self):
        return self._read

    def is_set(self):
        return self._set

    def set(self):
        if not self._set:
            self._set = True
            os.write(self._write, b"!")

    def close(self):
        os.close(self._read)
        os.close(self._write)


async def _in_thread(work):
    """Run ``work(stop)`` on a thread of its own without blocking the loop.

    If the awaiting task is cancelled, ask ``work`` to stop and wait until it
    has (the run's processes are reaped by then), then re-raise.
    """
    import asyncio
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    stop = _Stop()

    def settle(outcome):
        if not done.done():
            done.set_result(outcome)

    def target():
        try:
            outcome = (True, work(stop))
        except BaseException as exc:
            outcome = (False, exc)
        try:
            loop.call_soon_threadsafe(settle, outcome)
        except RuntimeError:  # the loop is closed: nobody is waiting
            pass

    threading.Thread(target=target, name="concurrency-async", daemon=True).start()
    try:
        try:
            ok, value = await asyncio.shield(done)
        except asyncio.CancelledError:
            stop.set()
            while not done.done():
                try:
                    await asyncio.shield(done)
                except asyncio.CancelledError:
                    pass
            raise
    finally:
        if done.done():
            stop.close()
    if ok:
        return value
    raise value


async def _pairs_async(make_pairs):
    """Feed the pairs of ``make_pairs(stop)``, run on a thread, to async for."""
    import asyncio
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue()
    end = object()

    def work(stop):
        pairs = make_pairs(stop)
        try:
            for pair in pairs:
                loop.call_soon_threadsafe(queue.put_nowait, (True, pair))
                if stop.is_set():
                    break
        finally:
            pairs.close()
        loop.call_soon_threadsafe(queue.put_nowait, (True, end))

    async def pump():
        try:
            await _in_thread(work)
        except BaseException as exc:
            queue.put_nowait((False, exc))

    worker = loop.create_task(pump())
    try:
        while True:
            ok, item = await queue.get()
            if not ok:
                raise item
            if item is end:
                return
            yield item
    finally:
        if not worker.done():
            worker.cancel()  # stops the run and waits until it has
            try:
                await worker
            except BaseException:
                pass


class _Progress:
    """A one-line progress indicator on stderr, only if it is a terminal."""

    def __init__(self, total, stream=None, unit="tasks"):
        self.unit = unit
        self.stream = sys.stderr if stream is None else stream
        try:
            self.enabled = self.stream.isatty()
        except Exception:
            self.enabled = False
        self.total = total
        self.done = 0
        self.failed = 0
        self.started = time.monotonic()
        self.shown = 0.0

    def track(self, completions, outcomes):
        self.show()
        try:
            for index in completions:
                self.add(1, outcomes.failed[index])
                yield index
        finally:
            completions.close()
            self.show(final=True)

    def add(self, done, failed):
        self.done += done
        self.failed += failed
        self.show()

    def show(self, final=False):
        if not self.enabled:
            return
        now = time.monotonic()
        if not final and self.done != self.total and now - self.shown < 0.1:
            return  # at most ten lines a second
        self.shown = now
        elapsed = now - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        failed = ", %d failed" % self.failed if self.failed else ""
        total = "?" if self.total is None else "%d" % self.total
        self.stream.write("\rconcurrency: %d/%s done%s, %.1f s, %.1f %s/s "
                          % (self.done, total, failed, elapsed, rate, self.unit))
        if final:
            self.stream.write("\n")
        self.stream.flush()


def _missing_parameters(fn):
    """Names of the parameters ``fn`` requires, where its signature can be
    read (a plain function or method: from its code, in well under a
    microsecond); an empty list when it can be called with none, or when
    its signature can't be read (a builtin): then the call tells."""
    function, bound = fn, 0
    if type(fn) is types.MethodType:
        function, bound = fn.__func__, 1
    if type(function) is types.FunctionType:
        code = function.__code__
        positional = code.co_argcount
        defaults = function.__defaults__
        if positional - (len(defaults) if defaults else 0) <= bound \
                and not code.co_kwonlyargcount:
            return []  # nearly every task: a lambda, a function of no arguments
        if not hasattr(function, "__signature__"):
            names = code.co_varnames
            keyword_defaults = function.__kwdefaults__ or {}
            return list(names[bound:max(bound, positional - len(defaults or ()))]) + [
                name for name in names[positional:positional + code.co_kwonlyargcount]
                if name not in keyword_defaults]
    import inspect
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    return [name for name, parameter in signature.parameters.items()
            if parameter.default is parameter.empty
            and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)]


def _call_written_for(key):
    """The source text of the call the caller wrote as task ``key`` --
    ``count("users")`` in ``run([count("users")])`` -- where its line can be
    read and parsed, else None.  Only on the way to an error."""
    import ast
    import linecache
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame = frame.f_back
    if frame is None:
        return None
    line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
    tree = None
    # The line alone, or what follows a colon on it (try: run(...)).
    for start in [0] + [at + 1 for at, char in enumerate(line) if char == ":"]:
        try:
            tree = ast.parse(line[start:].strip())
            break
        except SyntaxError:
            continue
    if tree is None:
        return None
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and node.args):
            continue
        name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
        if name not in ("run", "run_async", "as_completed", "as_completed_async", "defer"):
            continue
        tasks = node.args[0]
        found = None
        if isinstance(tasks, (ast.List, ast.Tuple)) and isinstance(key, int) \
                and 0 <= key < len(tasks.elts):
            found = tasks.elts[key]
        elif isinstance(tasks, ast.Dict):
            for written, value in zip(tasks.keys, tasks.values):
                if isinstance(written, ast.Constant) and written.value == key:
                    found = value
        if isinstance(found, ast.Call):
            return ast.unparse(found)
    return None


def _describe(value):
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return "%s (%s)" % (text, type(value).__name__)


def _check_timeout(timeout):
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError("timeout must be a number of seconds or None, not %s"
                        % _describe(timeout))
    if math.isnan(timeout) or timeout <= 0:
        raise ValueError("timeout must be a positive number of seconds or None, not %r"
                         % (timeout,))
    return None if timeout >= _FOREVER else timeout


# Timeouts this long (math.inf included) are no limit at all; waits are cut
# into spans of _LONGEST_WAIT, which every clock and poll() takes (epoll's
# limit is about 24.8 days).
_FOREVER = 100 * 365 * 86400.0
_LONGEST_WAIT = 86400.0


def _call(fn):
    value = fn()
    if isinstance(value, collections.abc.Coroutine):
        value = _worker_module().await_coroutine(value)
    return value


def _report_deferred_failure(key, exc):
    import traceback
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    _worker_module().report_deferred(repr(key), "failed:\n" + text)


# -- Serialization ------------------------------------------------------------

class _TaskSerializer:
    """Serializes the tasks of one run (or one deferred batch).

    worker.ValuePickler -- the C pickler, sending by value what the worker
    could not find by name -- serves nearly every task; dill, under the same
    rules, what it can't.  What neither can send fails here, before any task
    starts, with a SerializationError naming the global or attribute that
    pulled it in.

    Tasks that share code -- lambdas made in a loop, the common way to make
    many -- share the pickle of what is the same for all of them (the code,
    the globals it uses), made once: a template.  Each task's payload is that
    template, its STOP turned into a POP, followed by a pickle of the task
    made with the template's memo, so that what the task shares with the
    template (a sentinel default that is also a global) stays one object.
    The worker unpickles the whole payload for every task, so each task
    still has globals of its own.  A template over _TEMPLATE_MAX (a large
    captured global) would only add a copy to every payload: such functions
    are sent whole.
    """

    def __init__(self, calls=(), share=False) -> None:
        self.worker = _worker_module()
        self.buffer = io.BytesIO()
        self.pickler = self.worker.ValuePickler(self.buffer)
        # share: large buffers the tasks capture go once per worker (see
        # worker.SharedBuffers); named: the numbers the last task names.
        # Tasks are pickled naming them (b"s") from the first that captures one.
        self.shared: Any = self.worker.SharedBuffers() if share else None
        self.sharing = False
        self.named: frozenset = frozenset()
        self.pinned: set = set()  # shared buffers that templates name
        self.large_globals: dict = {}  # (code, id(globals)) -> whether they hold one
        functions = {id(fn): fn for fn in calls if type(fn) is types.FunctionType}
        codes = collections.Counter(fn.__code__ for fn in functions.values()
                                    if not self.worker.found_by_name(fn))
        self.shared_code = {code for code, count in codes.items() if count > 1}
        self.templates: dict = {}  # (code, id(globals)) -> (payload prefix, pickler), or None

    def dumps(self, key, fn):
        """The payload of task ``fn``: b"p" and a pickle, b"s" and one that
        names shared buffers (see worker.SharingValuePickler), or b"d" and
        dill's."""
        worker = self.worker
        if self.shared is not None and not self.sharing and self._captures_large_buffer(fn):
            self._start_sharing()
        if self.sharing:
            self.shared.named = set()  # type: ignore[union-attr]
        try:
            try:
                payload = self._dumps(fn)
                if (self.shared is not None and not self.sharing
                        and len(payload) >= 2 * worker.SHARE_MIN):
                    # A large buffer deeper down: this task and the rest
                    # name theirs from now on.
                    self._start_sharing()
                    self.shared.named = set()
                    payload = self._dumps(fn)
                self._named(fn)
                return payload
            except (worker.Unshippable, RecursionError):
                raise
            except Exception:  # what the C pickler refuses: dill may do
                self.buffer = io.BytesIO()  # the pickler may be left mid-way
                self.pickler = self._new_pickler(self.buffer)
                if self.sharing:
                    self.shared.named = set()  # type: ignore[union-attr]
            buffer = io.BytesIO()
            buffer.write(b"d")
            try:
                worker.dill_value_pickler_class()(buffer).dump(fn)
                self._named(None)
            except ImportError as exc:
                raise SerializationError(
                    key, "task", "needs dill to be serialized, and dill is not installed: "
                    "pip install dill") from exc
            return buffer.getvalue()
        except RecursionError as exc:
            raise SerializationError(key, "task", "cannot be serialized: it is nested too "
                                     "deeply (%s)" % exc) from exc
        except SerializationError:
            raise
        except Exception as exc:
            raise self._error(key, fn, exc) from exc

    def _captures_large_buffer(self, fn):
        """Whether a function's defaults, captured variables or globals hold
        a bytes or bytearray of SHARE_MIN or more: a look at the surface,
        cheap enough for every task (what lies deeper is found by its
        pickle's size); the globals looked at once per code in a run."""
        if type(fn) is not types.FunctionType:
            return False
        size = self.worker.SHARE_MIN
        for value in fn.__defaults__ or ():
            if type(value) in _BUFFER_TYPES and len(value) >= size:
                return True
        for cell in fn.__closure__ or ():
            try:
                value = cell.cell_contents
            except ValueError:
                continue
            if type(value) in _BUFFER_TYPES and len(value) >= size:
                return True
        key = (fn.__code__, id(fn.__globals__))
        found = self.large_globals.get(key)
        if found is None:
            namespace = fn.__globals__
            found = self.large_globals[key] = any(
                type(namespace.get(name)) in _BUFFER_TYPES and len(namespace[name]) >= size
                for name in self.worker.global_names(fn.__code__))
        return found

    def _new_pickler(self, buffer):
        if self.sharing:
            return self.worker.SharingValuePickler(buffer, self.shared)
        return self.worker.ValuePickler(buffer)

    def _start_sharing(self):
        self.sharing = True
        self.pickler = self._new_pickler(self.buffer)
        self.templates.clear()  # made without: made again as needed

    def _named(self, fn):
        """Note the shared buffers the task just pickled names: its own, and
        those of the template it follows."""
        if self.sharing:
            template = None if fn is None else self._template(fn)
            named = self.shared.named
            if template is not None:
                named |= template[2]
            self.named = frozenset(named)

    def _dumps(self, fn):
        buffer, pickler = self.buffer, self.pickler
        buffer.seek(0)
        buffer.truncate()
        buffer.write(b"s" if self.sharing else b"p")
        template = self._template(fn)
        if template is None:
            pickler.reset()
            pickler.dump(fn)
            return buffer.getvalue()
        prefix, template_pickler, _named = template
        pickler.memo = template_pickler.memo
        pickler.globals_ref = dict(template_pickler.globals_ref)
        pickler.filled = set(template_pickler.filled)
        buffer.write(prefix)
        pickler.dump(fn)
        return buffer.getvalue()

    def _template(self, fn):
        if type(fn) is not types.FunctionType or fn.__code__ not in self.shared_code:
            return None
        key = (fn.__code__, id(fn.__globals__))
        if key not in self.templates:
            buffer = io.BytesIO()
            pickler = self._new_pickler(buffer)
            named = set()
            if self.sharing:
                named, self.shared.named = self.shared.named, named
            base, submodules = pickler.prefill(fn)
            # What every task's pickle names goes in too, memoized once.
            pickler.dump((fn.__code__, base, submodules, self.worker.make_function))
            if self.sharing:
                named, self.shared.named = self.shared.named, named
            template = buffer.getvalue()
            if len(template) > _TEMPLATE_MAX:
                self.templates[key] = None
            else:
                # The template's STOP becomes POP: the task's pickle follows.
                self.templates[key] = (template[:-1] + pickle.POP, pickler, frozenset(named))
                # Every later task of that code names them: kept to the end.
                self.pinned |= named
        return self.templates[key]

    def _error(self, key, fn, exc):
        culprit = _culprit(fn, self.worker)
        where = "" if culprit is None else "%s is %s, which " % (culprit[0], _describe(culprit[1]))
        if isinstance(exc, self.worker.Unshippable):
            detail = "%s%s" % ("%s: " % culprit[0] if culprit else "", exc)
        else:
            detail = "%scannot be sent to another process (%s: %s)" % (
                where or "it ", type(exc).__name__, exc)
        return SerializationError(
            key, "task", "cannot be serialized: %s. Create such objects inside the task, "
            "or use the fork driver, which does not serialize tasks" % detail)


_BUFFER_TYPES = (bytes, bytearray)


# Larger templates are not worth sharing (see _TaskSerializer).
_TEMPLATE_MAX = 64 * 1024


def _dumps_tasks(keys, calls, outcomes=None):
    """Serialize the tasks of a run, see _TaskSerializer."""
    serializer = _TaskSerializer(calls)
    return [_dumps_task(serializer, index, keys[index], fn, outcomes)
            for index, fn in enumerate(calls)]


class _SharedPayloads(list):
    """The serialized tasks of a dask run, all made at once, naming the
    large buffers they capture (worker.SharedBuffers) instead of holding
    them: ``buffers`` (number -> the bytes or bytearray) and ``needs``
    (index -> the numbers its task names)."""

    def __init__(self, keys, calls, outcomes=None):
        serializer = _TaskSerializer(calls, share=True)
        self.needs = {}
        for index, fn in enumerate(calls):
            self.append(_dumps_task(serializer, index, keys[index], fn, outcomes))
            if serializer.named:
                self.needs[index] = serializer.named
        self.buffers = serializer.shared.buffers


def _dumps_task(serializer, index, key, fn, outcomes):
    """The payload of task ``index``.  A map's chunk (worker.MapChunk) with
    items that can't be serialized goes without them: each fails alone
    (``outcomes.item_failed``), as a task of a run would."""
    try:
        return serializer.dumps(key, fn)
    except SerializationError:
        worker = _worker_module()
        if type(fn) is not worker.MapChunk or outcomes is None:
            raise
        if fn.function is not None:
            serializer.dumps(key, worker.MapChunk([], fn.function))  # its function's error
        items = list(fn.items)
        for position, item in enumerate(items):
            try:
                serializer.dumps(key, worker.MapChunk([item]))
            except SerializationError as exc:
                exc = SerializationError(key.start + position, "task", "item %d of the map %s"
                                         % (key.start + position, exc.detail[len("cannot be "):]
                                            if exc.detail.startswith("cannot be ")
                                            else exc.detail))
                outcomes.item_failed(index, position, exc)
                items[position] = worker.SKIPPED
        fn.items = items
        return serializer.dumps(key, fn)


class _Payloads:
    """The serialized tasks of a process run, by index.

    A run of up to _EAGER_TASKS tasks is serialized whole before anything
    starts, so that a task that can't be fails the run there, naming it.  A
    larger one, its first _EAGER_TASKS so, then the rest as workers need
    them, each let go once its task has ended: the parent never holds the
    payloads of 100,000 tasks at once, and the first tasks run while the
    last are serialized.  One of those that can't be fails alone, as its
    turn comes.
    """

    def __init__(self, keys, calls, ready=None, outcomes=None) -> None:
        self.keys = keys
        self.calls = calls
        self.outcomes = outcomes  # for a map's chunks: see _dumps_task
        self.serializer: Any = None  # a _TaskSerializer, unless serialized elsewhere
        self.serialized = {}  # index -> payload, until its task has ended
        self.needs: dict = {}  # index -> the shared buffers it names (see buffers_for)
        self.users: dict = {}  # shared buffer number -> tasks serialized, not ended, naming it
        self.buffers = {}
        self.made = 0  # the tasks before this one are serialized, or failed
        self.failed: list = []  # (index, SerializationError) not yet reported
        if ready is not None:  # serialized elsewhere (a Dask worker's chunk)
            self.serialized = dict(enumerate(ready))
            self.made = len(ready)
            return
        self.serializer = _TaskSerializer(calls, share=True)
        if self.serializer.shared is not None:
            self.buffers = self.serializer.shared.buffers
        self.make(min(len(calls), _EAGER_TASKS), started=False)

    def __len__(self):
        return len(self.calls)

    def __getitem__(self, index):
        return self.serialized[index]

    def make(self, upto, started=True):
        while self.made < upto:
            index = self.made
            self.made += 1
            try:
                payload = _dumps_task(self.serializer, index, self.keys[index],
                                      self.calls[index], self.outcomes)
            except SerializationError as exc:
                if not started:
                    raise
                self.failed.append((index, exc))
                continue
            self.serialized[index] = payload
            if self.serializer.named:
                self.needs[index] = self.serializer.named
                for number in self.serializer.named:
                    self.users[number] = self.users.get(number, 0) + 1

    def ahead(self, pending, count, outcomes):
        """Have the first ``count`` pending tasks serialized; those that
        can't be leave ``pending``, failed."""
        while self.made < len(self.calls) and pending:
            self.make(max(itertools.islice(pending, count)) + 1)
            if not self.failed:
                return
            # Those that failed leave, and the window takes in the next.
            gone = {index for index, _exc in self.failed}
            kept = [index for index in pending if index not in gone]
            pending.clear()
            pending.extend(kept)
            for index, exc in self.failed:
                outcomes.fail(index, exc)
            del self.failed[:]

    def release(self, index):
        """Its task has ended: its payload is not needed again.  Returns the
        numbers of the shared buffers no task still to run names now."""
        if self.serializer is None:
            return ()
        self.serialized.pop(index, None)
        gone = []
        for number in self.needs.pop(index, ()):
            self.users[number] -= 1
            if not self.users[number]:
                del self.users[number]
                if number not in self.serializer.pinned:
                    self.serializer.shared.forget(number)
                    gone.append(number)
        return gone


# Runs of up to this many tasks are serialized whole before any starts.
_EAGER_TASKS = 10000


def _culprit(fn, worker, depth=4):
    """(path, object) of the innermost thing the task reaches that can't be
    serialized -- a global (``db``), a captured variable, an attribute path
    (``settings.conn``), an item (``pool[0]``) -- or None.  Only called once
    serializing has failed, so its cost is never paid by a working task."""

    def fails(value):
        try:
            worker.dumps_value(value)  # what a task's parts go through
            return False
        except Exception:
            return True

    def parts(value):
        if type(value) is types.FunctionType:
            code = value.__code__
            for name in worker.global_names(code):
                if name in value.__globals__:
                    yield name, value.__globals__[name]
            for name, cell in zip(code.co_freevars, value.__closure__ or ()):
                try:
                    yield name, cell.cell_contents
                except ValueError:
                    pass
            for index, default in enumerate(value.__defaults__ or ()):
                yield "%s.__defaults__[%d]" % (value.__qualname__, index), default
            for name, default in (value.__kwdefaults__ or {}).items():
                yield name, default
            return
        if isinstance(value, functools.partial):
            yield from parts(value.func)
            for index, arg in enumerate(value.args):
                yield "partial argument %d" % index, arg
            for name, arg in value.keywords.items():
                yield "partial argument %s" % name, arg
            return
        if isinstance(value, types.MethodType):
            yield "self", value.__self__
            return
        if isinstance(value, (list, tuple, set, frozenset)):
            for index, item in enumerate(value):
                yield "[%d]" % index, item
            return
        if isinstance(value, dict):
            for name, item in value.items():
                yield "[%r]" % (name,), item
            return
        attributes = getattr(value, "__dict__", None)
        if isinstance(attributes, dict):
            for name, item in attributes.items():
                yield "." + name, item

    def search(path, value, depth):
        for label, part in parts(value):
            if not fails(part):
                continue
            if path is None or type(value) is types.FunctionType:
                here = label
            else:
                here = path + label
            if depth and not isinstance(part, (types.ModuleType, type)):
                found = search(here, part, depth - 1)
                if found is not None:
                    return found
            return here, part
        return None

    try:
        return search(None, fn, depth)
    except Exception:
        return None


# -- Outcomes: what children send, decoded -----------------------------------

def _copy_lent(pid, body):
    """Copy the buffers lent in a b"l" body out of process ``pid``: bytes
    where the child had bytes (or any read-only buffer), bytearrays where it
    had writable ones, as pickle would have rebuilt them.  One copy, straight
    into the objects we return, with the GIL released; large ones by several
    threads, as most of the time goes to faulting in the fresh pages."""
    import ctypes
    reader = _memory_reader()
    _size, descriptors, _start = _worker_module().lent_layout(memoryview(body))
    copies, pieces, made = [], collections.deque(), {}
    for descriptor in descriptors:
        address, length, readonly = descriptor
        if descriptor in made:  # one buffer lent twice is one object
            copies.append(made[descriptor])
            continue
        if readonly:
            # bytes are immutable once shared; until then they may be filled
            # in place, as C code does.
            copy = reader.new_bytes(None, length)
            target = ctypes.cast(ctypes.c_char_p(copy), ctypes.c_void_p).value or 0
        else:
            copy = bytearray(length)
            target = ctypes.addressof(ctypes.c_char.from_buffer(copy)) if length else 0
        copies.append(copy)
        made[descriptor] = copy
        for offset in range(0, length, _COPY_PIECE):
            pieces.append((target + offset, address + offset,
                           min(_COPY_PIECE, length - offset)))
    failures = []

    def copy_pieces():
        while pieces and not failures:
            try:
                target, address, length = pieces.popleft()
            except IndexError:
                return
            while length:
                local = reader.iovec(target, length)
                remote = reader.iovec(address, length)
                n = reader.process_vm_readv(pid, ctypes.byref(local), 1,
                                            ctypes.byref(remote), 1, 0)
                if n <= 0:
                    code = ctypes.get_errno()
                    failures.append(OSError(code, "process_vm_readv: %s"
                                            % os.strerror(code)))
                    return
                target, address, length = target + n, address + n, length - n

    helpers = []
    try:
        # Signals held while they start: a handler raising inside start()
        # can leave a thread registered that never runs (Python 3.12); and
        # they take the mask, so that no signal is delivered to them.
        with _SignalsHeld():
            for _ in range(min(len(pieces), _COPY_THREADS) - 1):
                helpers.append(threading.Thread(target=copy_pieces, name="concurrency-copy"))
                helpers[-1].start()
        copy_pieces()
    finally:
        # Also when a signal handler raised here: no helper may go on
        # writing into buffers after we have left.
        pieces.clear()
        _join_all(helpers)
    if failures:
        raise failures[0]
    return copies


def _join_all(threads):
    """Join every thread, even when a signal handler raises meanwhile; then
    raise the first such exception."""
    raised = None
    for thread in threads:
        give_up = time.monotonic() + _REAP_TIMEOUT
        while True:
            try:
                thread.join()
                break
            except BaseException as exc:
                if isinstance(exc, RuntimeError) and "before it is started" in str(exc):
                    # Interrupted in start(): it may not have said it runs
                    # yet, or never started at all.
                    if time.monotonic() > give_up:
                        break
                    time.sleep(0.001)
                    continue
                raised = raised or exc
    if raised is not None:
        raise raised


# Lent buffers are copied in pieces of this size, by up to this many threads.
_COPY_PIECE = 8 << 20
_COPY_THREADS = min(4, _CORES)


def _memory_reader():
    if _state.memory_reader is None:
        import ctypes

        class iovec(ctypes.Structure):
            _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]

        libc = ctypes.CDLL(None, use_errno=True)
        reader = types.SimpleNamespace(iovec=iovec, process_vm_readv=libc.process_vm_readv)
        reader.process_vm_readv.argtypes = [
            ctypes.c_int, ctypes.POINTER(iovec), ctypes.c_ulong,
            ctypes.POINTER(iovec), ctypes.c_ulong, ctypes.c_ulong]
        reader.process_vm_readv.restype = ctypes.c_ssize_t
        reader.new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
        reader.new_bytes.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
        reader.new_bytes.restype = ctypes.py_object
        _state.memory_reader = reader
    return _state.memory_reader


def _decode_outcome(outcomes, index, kind, body, lent=None):
    """Fill slot ``index`` from a worker's RESULT or ERROR frame body."""
    key = outcomes.key(index)
    worker = _worker_module()
    if kind == worker.RESULT:
        try:
            value = worker.loads_value(body, lent)
        except Exception as exc:
            if worker.succeeds(worker.loads_value, body, lent):
                raise  # a signal handler's exception: the caller's, not the result's
            error = SerializationError(key, "result", "the result could not be unpickled "
                                       "in the parent: %s: %s" % (type(exc).__name__, exc))
            error.__cause__ = exc
            outcomes.fail(index, error)
        else:
            outcomes.succeed(index, value)
        return
    info = pickle.loads(body)
    raised = _rebuild_exception(key, info)
    remote = RemoteTraceback(info["traceback"])
    if info["kind"] == "task":
        raised.__cause__ = remote
        _add_note(raised, outcomes.note(key))
        outcomes.fail(index, raised)
        return
    if not isinstance(raised, RemoteError):
        raised.__cause__ = remote
    if info["kind"] == "result":
        detail = "the result could not be serialized in the child: %s: %s"
    else:
        detail = "the task could not be unserialized in the child: %s: %s"
    error = SerializationError(key, info["kind"] if info["kind"] == "result" else "task",
                               detail % (info["type"], info["message"]))
    error.__cause__ = raised
    outcomes.fail(index, error)


def _rebuild_exception(key, info):
    """The child's exception as its own class where possible, else RemoteError."""
    exc = _worker_module().rebuild_exception(info)
    if exc is None:
        return RemoteError(key, info["type"], info["message"], info["traceback"])
    return exc


def _add_note(exc, note):
    try:
        if hasattr(exc, "add_note"):
            exc.add_note(note)
        else:  # Python < 3.11 has no add_note(); keep the same attribute
            exc.__notes__ = list(getattr(exc, "__notes__", ())) + [note]
    except Exception:
        pass


# -- The task context ----------------------------------------------------------

def _current_context(logging_levels=None):
    """The caller's worker.TaskContext, which every task gets."""
    return _worker_module().current_context(_sys_path, logging_levels, _environ_now())


def _environ_now():
    """A copy of os.environ: the last one made while its raw bytes are the
    same (comparing them takes a microsecond, decoding each variable anew
    tens, and more right after a fork, each page touched a page copied).
    Not to be changed: runs share it."""
    raw = getattr(os.environ, "_data", None)
    cached = _state.environ
    if raw is not None and cached is not None and cached[0] == raw:
        return cached[1]
    environ = dict(os.environ)
    if raw is not None:
        _state.environ = (dict(raw), environ)
    return environ


def _sys_path(cwd):
    """sys.path as the child must see it.  With "" on it (a Python shell,
    python -c), a module imported before an os.chdir() came from the
    directory that was current then: that directory follows "", so that the
    child imports the module by name from where the caller got it."""
    path = list(sys.path)
    if "" not in path or cwd is None:
        return path
    key = (tuple(path), cwd, len(sys.modules))
    found = _state.imported_from_cwd.get(key)
    if found is None:
        searched = {os.path.abspath(entry or cwd) for entry in path if isinstance(entry, str)}
        found = []
        for name, module in list(sys.modules.items()):
            origin = getattr(module, "__file__", None)
            if "." in name or not isinstance(origin, str) or not os.path.isabs(origin):
                continue
            directory = os.path.dirname(origin)
            if getattr(module, "__path__", None) is not None:  # a package
                directory = os.path.dirname(directory)
            if directory not in searched and directory not in found:
                found.append(directory)
        _state.imported_from_cwd.clear()
        _state.imported_from_cwd[key] = found
    index = path.index("")
    return path[:index + 1] + found + path[index + 1:]


# -- Logging from tasks ---------------------------------------------------------
#
# On the process driver a task logs in another interpreter, where nothing
# is configured.  Runs send the levels of this process's loggers with the
# context; the worker lets through what they would and sends each record
# back (see worker._forward_logging), to be handled here by the logger of
# its name.  (fork children inherit the logging set-up itself.)

_LEVELS_MARK = object()  # in logging.root._cache while _state.logging_levels is current


def _logging_levels():
    """{logger name: level} of the loggers with a level of their own, "" for
    the root, None for logging.disable(); None when logging is not in use.
    Recomputed only after a level changed: setLevel(), disable() and the
    config functions all clear the loggers' caches, ours included."""
    logging = sys.modules.get("logging")
    if logging is None:
        return None
    root = logging.root
    cache = getattr(root, "_cache", None)
    if cache is not None and cache.get(_LEVELS_MARK) and _state.logging_levels is not None:
        return _state.logging_levels
    levels = {"": root.level, None: root.manager.disable}
    for name, logger in list(root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and logger.level:
            levels[name] = logger.level
    _state.logging_levels = levels
    if cache is not None:
        cache[_LEVELS_MARK] = True
    return levels


def _log_task_record(state, key):
    """Handle a record a task logged in a worker as if logged here."""
    import logging
    record = logging.makeLogRecord(state)
    record.concurrency_key = key
    logger = logging.getLogger(record.name) if record.name != "root" else logging.root
    if logger.isEnabledFor(record.levelno):
        try:
            logger.handle(record)
        except Exception:
            # A filter or handler of ours that raises: reported as logging
            # reports a handler's error, never the run's.  (The task logged
            # in another process: its log call returned long ago.)
            logging.Handler.handleError(None, record)  # type: ignore[arg-type]


# -- Starting workers ---------------------------------------------------------

# Runs worker.py by path under a private name.  Not `python worker.py`: a
# script is compiled anew at every start (~6 ms a worker), a module loaded
# this way has its bytecode cached.  sys.path[0] (the current directory for
# -c) goes first, so no file of the user's can shadow what the worker imports.
# The loader by hand: importlib.util costs a worker ~2 ms more to import.
_WORKER_NAME = "_concurrency_worker"
_BOOTSTRAP = ("import sys; sys.path[:1] = [] if sys.path[:1] == [''] else sys.path[:1]; "
              "from importlib.machinery import SourceFileLoader; "
              "l = SourceFileLoader(%r, sys.argv[1]); m = type(sys)(l.name); "
              "m.__file__, m.__loader__ = l.path, l; sys.modules[l.name] = m; "
              "l.exec_module(m); sys.exit(m.main(sys.argv[1:]))" % _WORKER_NAME)
# Where no bytecode may be cached (PYTHONDONTWRITEBYTECODE=1, as many
# container images set; or worker.py inside a zip), every worker would
# compile worker.py anew (~10 ms): it runs the code we compiled instead,
# marshalled, from sys.argv[1].  An interpreter of another version (a
# sys.executable that is not this Python) compiles the source after all.
_BOOTSTRAP_COMPILED = (
    "import sys, marshal; sys.path[:1] = [] if sys.path[:1] == [''] else sys.path[:1]; "
    "m = type(sys)(%r); m.__file__ = %r; sys.modules[m.__name__] = m; "
    "f = open(sys.argv[1], 'rb'); "
    "c = marshal.loads(f.read()) if sys.implementation.cache_tag == %r "
    "else compile(open(m.__file__, 'rb').read(), m.__file__, 'exec'); f.close(); "
    "exec(c, vars(m)); sys.exit(m.main(sys.argv[1:]))"
    % (_WORKER_NAME, _WORKER_PATH, sys.implementation.cache_tag))


def _worker_command(mode, *args):
    path, _fds, compiled = _worker_file()
    # The code opens with what the process is, for ps and top, which show
    # the first words of a command line: a string that is a no-op statement.
    code = "'concurrency worker.py %s, of process %d'; %s" % (
        mode, os.getpid(), _BOOTSTRAP_COMPILED if compiled else _BOOTSTRAP)
    return [sys.executable] + _interpreter_flags() + ["-c", code, path, mode] + list(args)


def _worker_fds():
    """Descriptors a worker's command needs passed (see _worker_file)."""
    return _worker_file()[1]


def _worker_source():
    """worker.py's source, where it is no file of its own (concurrency.py
    imported from a zip: a zipapp, a zipped vendor folder); None when it is
    a file, or missing."""
    if os.path.isfile(_WORKER_PATH):
        return None
    get_data = getattr(globals().get("__loader__"), "get_data", None)
    try:
        return get_data(_WORKER_PATH) if get_data is not None else None
    except OSError:
        return None


def _worker_file():
    """(path, descriptors to pass, compiled) a child can run worker.py
    from: the file beside us, where its bytecode is cached; else the code we
    compiled, marshalled into an anonymous file the child inherits (Linux;
    elsewhere a file of ours removed at exit): see _BOOTSTRAP_COMPILED."""
    if _state.worker_file is None:
        if os.path.isfile(_WORKER_PATH) and not sys.dont_write_bytecode:
            _state.worker_file = (_WORKER_PATH, (), False)
            return _state.worker_file
        data = marshal.dumps(_worker_code())
        if hasattr(os, "memfd_create"):
            fd = _above_std(os.memfd_create("worker.py", os.MFD_CLOEXEC))
            _write_all(fd, data)
            _state.worker_file = ("/proc/self/fd/%d" % fd, (fd,), True)
        else:
            import tempfile
            folder = tempfile.mkdtemp(prefix="concurrency-")
            path = os.path.join(folder, "worker.code")
            with open(path, "wb") as file:
                file.write(data)
            atexit.register(_remove_tree, folder)
            _state.worker_file = (path, (), True)
    return _state.worker_file


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _remove_tree(folder):
    import shutil
    shutil.rmtree(folder, ignore_errors=True)


def _interpreter_flags():
    """The caller's -I, -E, -s, -O, -B, -W and -X options: a worker runs
    tasks as isolated, as optimized and with the warnings the caller has."""
    if _state.interpreter_flags is None:
        import subprocess
        flags = subprocess._args_from_interpreter_flags  # type: ignore[attr-defined]
        _state.interpreter_flags = flags()
    return _state.interpreter_flags


# execve(2) refuses one variable over 128 KiB (MAX_ARG_STRLEN) and an
# environment near the argument space (ARG_MAX, 2 MiB here and there).
_EXEC_VARIABLE_MAX = 32 * 1024
_EXEC_ENVIRON_MAX = 1 << 20


def _worker_environ():
    """The environment to exec a worker with: the caller's, less what execve
    would refuse.  Tasks get all of it anyway: it travels in the context."""
    environ = os.environ
    total, large = 0, False
    for name, value in environ.items():
        size = len(name) + len(value) + 2
        total += size
        large = large or size > _EXEC_VARIABLE_MAX
    if not large and total <= _EXEC_ENVIRON_MAX:
        return None  # as it is
    trimmed = {name: value for name, value in environ.items()
               if len(name) + len(value) + 2 <= _EXEC_VARIABLE_MAX}
    if sum(len(name) + len(value) + 2 for name, value in trimmed.items()) > _EXEC_ENVIRON_MAX:
        # Still too much: what Python itself reads at start-up, no more.
        trimmed = {name: value for name, value in trimmed.items()
                   if name.startswith(("PYTHON", "LC_")) or name in ("PATH", "HOME", "LANG", "TMPDIR")}
    return trimmed


def _worker_module() -> types.ModuleType:
    """worker.py loaded by path under a private name, never as ``worker``:
    a user's own worker.py must not be picked up."""
    if _state.worker_module is None:
        running = sys.modules.get(_WORKER_NAME)
        if running is not None and getattr(running, "__file__", None) == _WORKER_PATH:
            # In a worker (a task using the library): the worker.py that runs,
            # whose functions pickles here and in our workers name.
            _state.worker_module = running
            return running
        module = types.ModuleType(_WORKER_NAME)
        module.__file__ = _WORKER_PATH
        exec(_worker_code(), vars(module))
        # Registered, as in workers, so that pickle finds its functions.
        # Two threads loading it at once (run_async() twice) both take the
        # one registered first: pickle must find the very functions we use.
        registered = sys.modules.setdefault(_WORKER_NAME, module)
        if registered is not module and getattr(registered, "__file__", None) == _WORKER_PATH:
            module = registered
        if _state.worker_module is None:
            _state.worker_module = module
    return _state.worker_module


def _worker_code():
    """worker.py's code object: its cached bytecode where there is some,
    else compiled, once."""
    if _state.worker_code is None:
        source = _worker_source()
        if source is not None:  # inside a zip
            code = compile(source, _WORKER_PATH, "exec")
        else:
            from importlib.machinery import SourceFileLoader
            code = SourceFileLoader(_WORKER_NAME, _WORKER_PATH).get_code(_WORKER_NAME)
        _state.worker_code = code
    return _state.worker_code


# -- Children and the run loop ------------------------------------------------

class _Child:
    """A child process with a result pipe we read frames from."""

    def __init__(self, pid, result_fd) -> None:
        self.pid = pid
        self.fd = result_fd
        os.set_blocking(result_fd, False)
        self.pidfd = None
        if _HAVE_PIDFD:
            with _state.fds_lock:
                try:
                    self.pidfd = _above_std(os.pidfd_open(pid))
                    _state.parent_fds.add(self.pidfd)
                except OSError:
                    pass
        self.reader = _worker_module().FrameReader(result_fd)
        self.ended = False  # reaped; exitcode None then: something else reaped it
        self.exitcode = None
        self.served = False  # it has sent a frame: it is up and running
        self.spoke = False  # a frame of it has arrived (a fork child is served at once)
        self.hurried = False  # its tasks were asked back while it had not spoken yet
        self.last_outcome = 0.0  # when its last task's outcome arrived
        self.task_started = 0.0  # when its current task began, as we know it
        self.claim_fd: int | None = None  # our read end of the pipe it takes claims from
        self.forked_at = 0  # a fork child: the classes made before it (worker._class_at)
        self.took_back = False  # claims were taken back since it was last idle
        self.busy = False  # it has tasks whose outcome has not arrived

    def take_back(self):
        """Take back the claims it has not taken yet (see _Run.take_back):
        the numbers they carry, in the order they were sent."""
        if self.claim_fd is None:
            return []
        try:
            data = os.read(self.claim_fd, 1 << 16)  # more than a pipe holds
        except BlockingIOError:
            return []
        # Not the claim that lets a past run's buffers go (see
        # _ProcessRun.finish): the RUN_OVER frame does, when next read.
        wire = _worker_module()
        return [number for (number,) in wire.CLAIM.iter_unpack(data)
                if number != wire.DROP_SHARED]

    @property
    def eof(self):
        """Whether its result pipe has ended."""
        return self.reader.eof

    def read_frames(self):
        """Read what the pipe holds now; return the complete frames."""
        frames = []
        reader = self.reader
        while not reader.eof:
            try:
                frames += reader.read()
            except BlockingIOError:
                break
        return frames

    def poll(self):
        """None while it runs; once it has ended, its exit code (negative:
        the signal that killed it), or "unknown" when something else reaped
        it -- SIGCHLD ignored, an application that waits for every child --
        and took its status with it."""
        if not self.ended:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = self.pid, None
            if not pid:
                return None
            self.ended = True
            if status is not None:
                self.exitcode = os.waitstatus_to_exitcode(status)
            self.on_reaped()
        return "unknown" if self.exitcode is None else self.exitcode

    def on_reaped(self):
        pass

    def wait_ended(self, timeout):
        """Wait until it has ended, at most ``timeout`` seconds (None: no
        limit); True if it has."""
        if self.pidfd is not None and self.poll() is None:
            exited = select.poll()  # not select(): the fd may exceed FD_SETSIZE
            exited.register(self.pidfd, select.POLLIN)
            exited.poll(None if timeout is None else timeout * 1000)
        end = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if end is not None and time.monotonic() > end:
                return False
            time.sleep(0.001)
        return True

    def kill(self):
        raise NotImplementedError

    def reply(self, code):
        """Tell the child its lent buffers were copied (FETCHED), or are to
        be sent (SEND_INLINE)."""
        raise NotImplementedError

    def wait(self):
        """Reap the child, killing it if it does not exit in time; then what
        its last task started, which must not outlive it.  (Safe after the
        reap: a pid stays reserved while its process group has members.)"""
        if not self.wait_ended(_REAP_TIMEOUT):
            self.kill()
            self.wait_ended(None)
        _kill_group(self.pid, only_group=True)
        return self.exitcode

    def close(self):
        # Forgotten before they are closed: a run from a signal handler that
        # closes it again meanwhile must not close a number reused since.
        fds = self.fd, self.pidfd, self.claim_fd
        self.fd = self.pidfd = self.claim_fd = None
        for fd in fds:
            if fd is not None:
                _close_parent_fd(fd)


# At most this many tasks, and bytes of them, are sent to a child at once
# (see _Run.take_batch).
_BATCH_TASKS = 128
_BATCH_BYTES = 256 * 1024
# A child with this many tasks left is sent more (see _Run.top_up), if they
# fit in its pipe with what it has not read yet: pipes hold 64 KiB at least.
# Tiny tasks end faster than a busy machine schedules us again: a child
# must hold many, or it idles (8 idled workers a seventh of a 10,000-task
# run).  What it holds can still be taken back (see take_back).
_TOP_UP_AT = 64
_TOP_UP_BYTES = 64 * 1024
# Tasks queued behind one running this long go to a free child instead
# (see _Run.take_back).
_TAKE_BACK_AFTER = 0.005


class _Run:
    """The select() loop of one run: start tasks, collect frames, notice dead
    children, enforce the deadline.  Subclasses say how a task starts."""

    def __init__(self, count, outcomes, timeout, deadline, stop) -> None:
        self.pending = collections.deque(range(count))
        self.free: list = []  # children with no task, the next to use last
        self.running: dict = {}  # child -> index of its current task
        self.queued: dict = {}   # child -> indices sent to it after the current one
        self.outcomes = outcomes
        self.timeout = timeout
        self.deadline = deadline
        self.progress = time.monotonic()  # when a task last ended
        self.cpu_sample = None  # (when, {pid: CPU seconds}) of the last look
        self.stop = stop
        self.selector: Any = None  # made as the run starts: see completions()
        self.wire = _worker_module()  # frame kinds and their decoding

    def start_tasks(self):
        """Start pending tasks on free capacity."""
        raise NotImplementedError

    def on_frame(self, child, index, kind, body, /):
        """Handle a frame; return True when the child has no task left."""
        wire = self.wire
        if kind == wire.LOG:  # a record a task logged
            number, state = wire.decode_record(body)
            index = self.task_numbered(child, number)
            _log_task_record(state, None if index is None else self.outcomes.key(index))
            return False
        self.progress = time.monotonic()
        child.served = child.spoke = True
        lent = None
        if kind == wire.RESULT and body[:1] == wire.LENT:
            try:
                lent = _copy_lent(child.pid, body)
            except OSError:
                if child.poll() is not None:
                    return False  # it died: the run notices on its pipes
                # Not allowed here (a hardened kernel, a seccomp filter,
                # whatever errno it answers): the buffers come through the
                # pipe, now and from now on.
                _state.lending = False
                child.reply(_worker_module().SEND_INLINE)
                return False
            except BaseException:
                # Anything else (a signal handler raising, Ctrl-C) is the
                # caller's: it propagates.  The child awaits a reply that
                # will not come, so it is never used again.
                child.kill()
                raise
            child.reply(_worker_module().FETCHED)
        self.outcomes.arrived(index, kind, body, lent)
        if self.next_queued(child):
            return True
        now = child.task_started = self.progress
        if (self.pending and len(self.queued[child]) <= _TOP_UP_AT
                and now - child.last_outcome < _GROW_AFTER):
            self.top_up(child)
        child.last_outcome = now
        return False

    def top_up(self, child, /):
        """Send more tasks to a child that has few left, and ends them fast:
        they are in its pipe before it runs out, so it never waits for us,
        and we never wake it up."""

    def task_numbered(self, child, number, /):
        """The index of the task the child numbers ``number``, or None when
        it is no task of this run's."""
        return number if 0 <= number < self.outcomes.count else None

    def take_batch(self, children, size_of, room=_BATCH_BYTES):
        """Pending indices for one child: one, or several when many wait, so
        that one write and one wake-up carry them all.  A share of what
        waits, shrinking as it does ("guided" scheduling): every child keeps
        work to the end, and none holds many tasks that another, idle, could
        run.  Only small ones, so that its pipe holds them without blocking."""
        pending = self.pending
        count = min(_BATCH_TASKS, max(1, len(pending) // children))
        indices = [pending.popleft()]
        size = size_of(indices[0])
        while len(indices) < count:
            more = size_of(pending[0])
            if size + more > room:
                break
            size += more
            indices.append(pending.popleft())
        return indices

    def next_queued(self, child):
        """Its current task is done: move it to the next one sent, if any.
        Returns True when there is none."""
        queued = self.queued.get(child)
        if queued:
            self.running[child] = queued.popleft()
            return False
        return True

    def requeue(self, child):
        """Tasks queued behind a dead child's current one never started."""
        self.pending.extendleft(reversed(self.queued.pop(child, ())))

    def on_finished(self, child):
        """The child has no task left: it is free."""
        if child.spoke:
            self.free.append(child)
        else:  # its tasks were taken back as it started: the ones up go first
            self.free.insert(0, child)

    # -- Tasks queued behind a slow one ---------------------------------------
    #
    # A child is sent several tasks at once, so that it never waits for us
    # between them; each takes its task's claim from a pipe only as it
    # starts it (see worker.py).  Once one of its tasks has run for
    # _TAKE_BACK_AFTER while another child is free, or could be had, and
    # no task is left to send, we read the claims it has not taken: those
    # tasks go back to pending and run elsewhere, never twice.  A child that
    # has not spoken yet may still be starting up (a fork child takes about
    # a millisecond to run its first line): its tasks go to a free child at
    # once, which has them done sooner -- two tiny tasks in two fresh fork
    # children end in one.

    def has_room(self) -> bool:
        """True while a task sent now could start at once, on a free child
        or on one the run may still add."""
        return False

    def claimed_indices(self, child, numbers, /):
        """Indices of the tasks whose claims were taken back from ``child``."""
        return numbers

    def take_back(self, after=_TAKE_BACK_AFTER):
        """Move tasks queued behind one that has run ``after`` seconds to
        pending, when they could start at once elsewhere.  Returns the
        seconds until the next look is due, or None."""
        if self.pending or not self.has_room():
            return None
        due = None
        now = time.monotonic()
        for child, queued in list(self.queued.items()):
            if child not in self.running:
                continue
            if not child.spoke and any(other.spoke for other in self.free):
                # Still starting up, maybe, while one that is up waits.
                if child.hurried:
                    continue  # asked once: what it kept, it had begun
                child.hurried = True
            elif not queued or not child.served:
                # Not from a child still starting up while none is free:
                # another would not start its tasks sooner.
                continue
            else:
                wait = child.task_started + after - now
                if wait > 0:
                    due = wait if due is None else min(due, wait)
                    continue
            taken = set(self.claimed_indices(child, child.take_back()))
            if not taken:
                continue
            child.took_back = True
            current = self.running[child]
            if current in taken:
                # It had not started even the task we took for its current
                # one (it was just between two): it is idle.
                self.pending.append(current)
                self.unwatch(child)
                self.on_finished(child)
            self.pending.extend(index for index in queued if index in taken)
            kept = [index for index in queued if index not in taken]
            queued.clear()
            queued.extend(kept)
        return due

    # -- More children once tasks prove slow ----------------------------------
    #
    # A run starts with one child per core.  Tasks that end in microseconds
    # are best served by those alone: more processes would only cost their
    # start and compete for the cores.  Tasks that take their time get the
    # rest, up to the run's size, once no task has ended for _GROW_AFTER --
    # unless the children keep every core busy computing, when more would
    # not finish sooner: then only after _GROW_ANYWAY, so that a task that
    # computes forever does not hold back the ones waiting behind it.

    def may_grow(self) -> bool:
        """True while the run could use more children than it does."""
        return False

    def grow(self):
        """Use more children, up to the run's size."""

    def wake_after(self):
        """Seconds until on_wake() is due though nothing happens, or None."""
        if not (self.pending and self.may_grow()):
            return None
        if self.cpu_sample is None:  # the first look, from which CPU use counts
            self._cores_busy(time.monotonic())
        due = self.progress + _GROW_AFTER - time.monotonic()
        return due if due > 0 else 3 * _GROW_AFTER  # the next look at the cores

    def on_wake(self):
        """Called at each turn of the loop while wake_after() gives a time."""
        now = time.monotonic()
        if now - self.progress < _GROW_AFTER or not (self.pending and self.may_grow()):
            return
        if now - self.progress < _GROW_ANYWAY and self._cores_busy(now):
            return
        self.grow()

    def _cores_busy(self, now):
        """Whether the running children keep the cores busy computing, from
        the CPU time they take between looks (Linux; elsewhere: no)."""
        sample = {}
        for child in self.running:
            if child.served:  # not one still starting up: its start is no task's
                seconds = _cpu_seconds(child.pid)
                if seconds is not None:
                    sample[child.pid] = seconds
        if not sample:
            return False
        if self.cpu_sample is None:
            self.cpu_sample = (now, sample)
            return True  # judged at the next look
        then, before = self.cpu_sample
        span = now - then
        cores = min(len(sample), _CORES) * span
        used = sum(seconds - before[pid] for pid, seconds in sample.items() if pid in before)
        if used < 0.25 * cores:
            return False  # waiting, not computing: clear at once
        if span < _CPU_SPAN:
            return True  # too soon to tell a busy core from a start-up
        self.cpu_sample = (now, sample)
        return used >= 0.75 * cores

    def on_died(self, child, index, /):
        """The child died before the outcome of task ``index`` arrived."""
        raise NotImplementedError

    def watch(self, child, index):
        self.running[child] = index
        child.busy = True
        child.task_started = time.monotonic()
        self.selector.register(child.fd, selectors.EVENT_READ, child)
        if child.pidfd is not None:
            self.selector.register(child.pidfd, selectors.EVENT_READ, child)

    def unwatch(self, child):
        del self.running[child]
        child.busy = False
        for fd in (child.fd, child.pidfd):
            if fd is not None:
                try:
                    self.selector.unregister(fd)
                except (KeyError, ValueError):
                    pass

    def completions(self):
        """Yield each task's index as its outcome arrives."""
        try:
            self.selector = selectors.DefaultSelector()
            if self.stop is not None:
                self.selector.register(self.stop.fileno(), selectors.EVENT_READ, None)
            self.begin()
            yield from self._loop()
        except BaseException:
            # Ctrl-C, a stop, the caller leaving as_completed() early, or an
            # internal error: no child of this run may outlive it, whatever
            # signal comes next.
            _uninterrupted(self._kill_running)
            raise
        finally:
            _uninterrupted(self._close)

    def _kill_running(self):
        for child in list(self.running):
            child.kill()
            child.wait()
            self.unwatch(child)
            self.on_killed(child)

    def _close(self):
        if self.selector is not None:
            self.selector.close()
            self.selector = None
        self.finish()

    def begin(self):
        """The run starts."""

    def finish(self):
        """The run is over: let go of its children."""

    def _loop(self):
        completed = self.outcomes.completed
        while True:
            while completed:
                yield completed.popleft()
            due = self.take_back()
            self.start_tasks()
            if not self.running:
                if self.pending:  # no capacity could be had before the deadline
                    self._expire()
                    yield from self._drain(completed)
                return
            wait = None if self.deadline is None else self.deadline - time.monotonic()
            if wait is not None and wait <= 0:
                self._expire()
                yield from self._drain(completed)
                return
            if not _HAVE_PIDFD:
                wait = _POLL_INTERVAL if wait is None else min(wait, _POLL_INTERVAL)
            wake = self.wake_after()
            if wake is not None:
                wait = wake if wait is None else min(wait, wake)
            if due is not None:
                wait = due if wait is None else min(wait, due)
            if wait is not None:
                wait = min(wait, _LONGEST_WAIT)
            events = self.selector.select(wait)
            ended = set()
            for key, _mask in events:
                child = key.data
                if child is None:
                    raise _Stopped()
                if child in self.running:
                    if key.fd == child.pidfd:
                        ended.add(child)
                    elif self._read(child):
                        ended.add(child)
            if not _HAVE_PIDFD:
                ended.update(child for child in self.running if child.poll() is not None)
            for child in ended:
                if child in self.running:
                    self._read(child)  # what it wrote before it died
                if child in self.running:
                    index = self.running[child]
                    self.unwatch(child)
                    child.wait()
                    self.on_died(child, index)
            if wake is not None:
                self.on_wake()

    @staticmethod
    def _drain(completed):
        while completed:
            yield completed.popleft()

    def _read(self, child):
        """Process the child's frames; True if it reached end-of-file."""
        for kind, body in child.read_frames():
            index = self.running[child]
            if self.on_frame(child, index, kind, body):
                self.unwatch(child)
                self.on_finished(child)
                return False
        return child.eof

    def unfinished(self):
        """Indices of the tasks without an outcome."""
        queued = [index for indices in self.queued.values() for index in indices]
        return list(self.running.values()) + queued + list(self.pending)

    def _expire(self):
        unfinished = sorted(self.unfinished())
        for child in list(self.running):
            child.kill()
            child.wait()
            self.unwatch(child)
            self.on_killed(child)
        self.pending.clear()
        keys = [self.outcomes.key(index) for index in unfinished]
        for index in unfinished:
            self.outcomes.fail(index, TaskTimeout(self.outcomes.key(index), keys, self.timeout))

    def on_killed(self, child, /):
        """The child was killed by this run (timeout or interrupt)."""


# -- Processes, pipes and signals (both drivers) ------------------------------

def _parent_pipe(keep):
    """os.pipe(), with our end (``keep``: "r" or "w") registered as such."""
    with _state.fds_lock:
        read_fd, write_fd = _pipe()
        _state.parent_fds.add(read_fd if keep == "r" else write_fd)
    return read_fd, write_fd


def _pipe():
    """os.pipe(), both ends above the std descriptors (see _above_std)."""
    read_fd, write_fd = os.pipe()
    try:
        read_fd = _above_std(read_fd)
    except BaseException:
        os.close(write_fd)
        raise
    try:
        write_fd = _above_std(write_fd)
    except BaseException:
        os.close(read_fd)
        raise
    return read_fd, write_fd


def _above_std(fd):
    """``fd``, moved above 0, 1 and 2 if it is one of them.  A caller run with
    stdout or stderr closed (prog >&- 2>&-) must not find our pipes there:
    its own writes to 2 would reach a worker's task stream, and a worker
    given fd 1 would print into its own pipe."""
    if fd > 2:
        return fd
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    finally:
        os.close(fd)


def _pipe_pair():
    """Two pipes for a child: (task read, task write, result read, result
    write), ours the task write and result read ends; none left open when
    the second can't be made (no descriptors left)."""
    task_r, task_w = _parent_pipe(keep="w")
    try:
        result_r, result_w = _parent_pipe(keep="r")
    except BaseException:
        _close_parent_fd(task_w)
        os.close(task_r)
        raise
    return task_r, task_w, result_r, result_w


def _claim_pipe():
    """The pipe a child takes its tasks' claims from: both ends ours, the
    read end non-blocking, so that we can take back what it has not read
    (see _Run.take_back)."""
    read_fd, write_fd = _parent_pipe(keep="w")
    with _state.fds_lock:
        _state.parent_fds.add(read_fd)
    os.set_blocking(read_fd, False)
    return read_fd, write_fd


def _close_parent_fd(fd):
    _state.parent_fds.discard(fd)
    try:
        os.close(fd)
    except OSError:
        pass


def _lifeline_read_fd():
    """The read end of this process's lifeline pipe, made on first use."""
    if _state.lifeline is None:
        _state.lifeline = _parent_pipe(keep="w")
    return _state.lifeline[0]


class _Reaper:
    """Reaps, within a moment, the warm workers that leave after
    idle_timeout and the children of a fork run that came alone (see
    _end_fork_children), so that none stays <defunct>.  Not a SIGCHLD
    handler, which is the application's: a thread, that runs while a pool
    has workers or fork children are to be reaped.  It waits for the moment
    an idle worker is due to retire, and for the end of file on a fork
    child's result pipe (portable, no pidfd needed).

    Python 3.12+ warns about os.fork() in a process with threads, and a
    fork child would get none of it: the thread is stopped before every
    os.fork() of this process (at-fork hook) and started again after."""

    def __init__(self) -> None:
        self.thread = None
        self.wake_fds: Any = None  # (read, write), ours, made on first use
        self.stopping = False
        self.paused = 0  # runs forking now: they start it again when done
        self.resume = False  # stopped for an os.fork(): start it again after
        self.dead: list = []  # ended threads (see _bury)
        self.closed = False  # the interpreter is exiting: _shutdown reaps

    def start(self):
        """Have the thread look again (new children to reap), starting it
        if it is not running."""
        with _state.exiting_lock:  # the thread decides to end under it too
            if self.paused or self.closed:
                return
            if self.thread is not None and self.thread.is_alive():
                self._wake()
                return
            if self.wake_fds is None:
                try:
                    self.wake_fds = _parent_pipe(keep="r")
                except OSError:
                    # No descriptor left: the next run reaps what it would
                    # have, or the exit does; a run that is over stays so.
                    return
                _state.parent_fds.add(self.wake_fds[1])
                os.set_blocking(self.wake_fds[0], False)
            self.stopping = False
            self._bury(self.thread)
            self.thread = threading.Thread(target=self._loop, name="concurrency-reaper",
                                           daemon=True)
            # Signals held: a handler raising mid-start would leave a thread
            # half registered; and the thread takes the mask, so that no
            # signal is ever delivered to it.
            with _SignalsHeld():
                self.thread.start()

    def stop(self):
        """Stop the thread and wait for it to end; True if it was running."""
        thread = self.thread
        if thread is None or thread is threading.current_thread():
            return False
        self.thread = None
        if not thread.is_alive():
            return False
        self.stopping = True
        self._wake()
        thread.join(_REAP_TIMEOUT)
        self._bury(thread)
        return True

    def _bury(self, thread):
        # A Thread object that dies runs a weakref callback of threading's;
        # a signal handler raising in there would be lost.  Dead ones are
        # let go by the next thread, where no handler runs.
        if thread is not None:
            self.dead.append(thread)

    def pause(self):
        """A fork run starts: no thread while it forks (see above)."""
        with _state.exiting_lock:
            self.paused += 1
        self.stop()

    def unpause(self):
        with _state.exiting_lock:
            self.paused -= 1

    def _wake(self):
        try:
            os.write(self.wake_fds[1], b"x")
        except (OSError, TypeError):
            pass  # full (it will look anyway), or closed in a fork child

    def _loop(self):
        del self.dead[:]
        # It only ever blocks in poll(), which its wake-up pipe interrupts:
        # stop() returns within a moment.
        exited = set()  # children whose result pipe is at its end
        while not self.stopping:
            with _state.exiting_lock:
                watched = {child.fd: child for child in _state.exiting
                           if child.fd is not None and child not in exited}
                # Children of a burst's runs: their pipes closed, looked at
                # in a moment (see _end_fork_children).
                unwatched = any(child.fd is None for child in _state.exiting)
                due = _idle_workers_due()
                if not watched and not exited and not unwatched and due is None:
                    # Nothing left to reap: started again when there is.
                    if self.thread is threading.current_thread():
                        self._bury(self.thread)
                        self.thread = None
                    return
            if exited or unwatched:  # ended, not yet reaped: a look again in a moment
                due = _POLL_INTERVAL if due is None else min(due, _POLL_INTERVAL)
            waiting = select.poll()
            waiting.register(self.wake_fds[0], select.POLLIN)
            for fd in watched:
                waiting.register(fd, select.POLLIN)
            timeout = None if due is None else max(0.0, min(due, _LONGEST_WAIT)) * 1000 + 1
            events = []
            try:
                events = waiting.poll(timeout)
                while os.read(self.wake_fds[0], 64):
                    pass
            except BlockingIOError:
                pass
            except OSError:
                return  # our descriptors were closed: the interpreter is ending
            with _state.exiting_lock:  # not reaped and closed by a run meanwhile
                for fd, _event in events:
                    child = watched.get(fd)
                    if child is not None and child.fd is not None:
                        child.read_frames()  # what it had left to say: no one listens
                        if child.eof:
                            exited.add(child)
                _reap_exited()
                exited &= set(_state.exiting)
            for pool in list(_state.pools):
                if pool._idle:
                    with pool._changed:
                        pool._drop_stale()


def _idle_workers_due():
    """Seconds until the first idle worker is due to retire (see
    _WorkerPool._drop_stale), or None when no pool has a worker that may.
    A pool whose workers are all busy: the idle_timeout of one released
    now, so that nobody has to wake the reaper when one is."""
    due = None
    now = time.monotonic()
    for pool in list(_state.pools):
        if not (pool._live and 0 < pool.idle_timeout < _FOREVER):
            continue
        stale_after = pool.idle_timeout * 0.9 + 0.001
        at = min([worker.idle_since + stale_after - now for worker in list(pool._idle)]
                 or [stale_after])
        due = at if due is None else min(due, at)
    return due


def _pause_reaper():
    """Before an os.fork() (see _Reaper)."""
    if _state.reaper.stop():
        _state.reaper.resume = True


def _resume_reaper():
    if _state.reaper.resume:
        _state.reaper.resume = False
        _state.reaper.start()


# Signals whose handlers may raise at any moment (Ctrl-C, alarms, a
# framework's soft time limit), as opposed to the faults of the code running.
_ASYNC_SIGNALS = frozenset(signal.valid_signals()) - {
    getattr(signal, name) for name in ("SIGKILL", "SIGSTOP", "SIGSEGV", "SIGBUS", "SIGFPE",
                                       "SIGILL", "SIGTRAP", "SIGABRT", "SIGSYS")
    if hasattr(signal, name)}
# The C function: signal.pthread_sigmask() turns every mask it returns into
# a set of enums, at 30 times the cost.
_sigmask: Any = getattr(getattr(signal, "_signal", signal), "pthread_sigmask", None)


class _SignalsHeld:
    """``with _SignalsHeld():`` blocks the asynchronous signals in this
    thread, for what a handler raising must not cut short half done; the
    ones that came meanwhile are delivered on leaving, and their handlers
    run (and may raise) then.

    A signal that another thread takes -- one of the program's, not
    blocking it -- still runs its Python handler in the main thread, at
    once: so in the main thread, while other threads run, the handlers are
    swapped for one that notes the signal, and the noted ones are raised
    again on leaving."""

    def __enter__(self):
        self.swapped = None
        if _sigmask is None:
            self.mask = None
            return self
        # The mask as it is, first: the call that blocks runs the handlers
        # of signals that came just before it, and one may raise; the mask
        # is put back then too.
        self.mask = _sigmask(signal.SIG_BLOCK, ())
        try:
            _sigmask(signal.SIG_BLOCK, _ASYNC_SIGNALS)
            if _other_threads_take_signals():
                self._note_handlers()
        except BaseException:
            self.restore(replay=False)
            raise
        return self

    def _note_handlers(self):
        self.swapped, self.came = {}, []
        for number in _ASYNC_SIGNAL_NUMBERS:
            handler = _getsignal(number)
            if callable(handler):
                self.swapped[number] = handler  # first: restore() puts it back
                # (signal.signal() runs the handlers of signals pending
                # before it swaps: one may raise here.)
                signal.signal(number, self._note)

    def _note(self, number, frame):
        self.came.append(number)

    def restore(self, replay=True):
        """Unblock, and put the handlers back; ``replay``: raise the signals
        they missed (not in a fork child: they were the parent's)."""
        if self.mask is not None:
            _sigmask(signal.SIG_SETMASK, self.mask)  # the blocked ones arrive: noted
        if not self.swapped:
            return
        swapped, self.swapped = self.swapped, None
        for number, handler in swapped.items():
            signal.signal(number, handler)
        if not replay:
            return
        raised = None
        for number in dict.fromkeys(self.came):
            try:
                signal.raise_signal(number)  # its handler runs now
            except BaseException as exc:
                raised = raised or exc
        if raised is not None:
            raise raised

    def __exit__(self, *exc_info):
        self.restore()


_ASYNC_SIGNAL_NUMBERS = tuple(sorted(int(number) for number in _ASYNC_SIGNALS))
# The C function: signal.getsignal() makes an enum of each answer, at 20
# times the cost.
_getsignal = getattr(getattr(signal, "_signal", signal), "getsignal")


def _other_threads_take_signals():
    """Whether this is the main thread, where Python handlers run, and
    another thread may take a signal: one of the program's (ours, the
    reaper and copy threads, hold them all)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    reaper = _state.reaper.thread
    ours = 2 if reaper is not None and reaper.is_alive() else 1
    return threading.active_count() > ours


def _flush_std_streams():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass  # None (pythonw), closed, or a reader that went away


def _uninterrupted(cleanup):
    """Run ``cleanup()`` to its end with the asynchronous signals held.  A
    handler raising as they are being held (a Ctrl-C that came just then)
    has its exception raised after the cleanup, not instead of it."""
    started = False
    interrupted = None
    while not started:
        try:
            with _SignalsHeld():
                started = True
                cleanup()
        except BaseException as exc:
            if started:
                raise
            interrupted = exc
    if interrupted is not None:
        raise interrupted


def _reap_exited(block=False):
    # A run from a signal handler may land in here while this thread is in
    # here too (the lock is reentrant): a child it reaped is gone from the
    # list when we come back to it.
    with _state.exiting_lock:
        for child in list(_state.exiting):
            if child not in _state.exiting:
                continue
            if block:
                child.wait()
            elif child.poll() is None:
                continue
            else:
                child.close()
            try:
                _state.exiting.remove(child)
            except ValueError:
                pass


def _write(fd, data):
    """os.write() to a child's pipe.  Where the application set SIGPIPE back
    to its default (CLI tools do, for `| head`), writing to a child that has
    just exited would end the whole process: the signal is held back for
    the write, which fails with BrokenPipeError instead."""
    if not _HAVE_SIGPIPE or signal.getsignal(signal.SIGPIPE) != signal.SIG_DFL:
        return os.write(fd, data)
    held = signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGPIPE,))
    try:
        return os.write(fd, data)
    finally:
        if signal.SIGPIPE not in held:
            while signal.sigtimedwait((signal.SIGPIPE,), 0) is not None:
                pass  # the one our write raised, taken before unblocking
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


_HAVE_SIGPIPE = hasattr(signal, "SIGPIPE") and hasattr(signal, "sigtimedwait")


def _cpu_seconds(pid):
    """CPU time process ``pid`` has taken, or None where /proc can't tell."""
    try:
        with open("/proc/%d/schedstat" % pid, "rb") as file:
            return int(file.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def _widen_pipe(fd):
    # Linux pipes hold 64 KiB: a large result would cost a thousand
    # write/read round trips per 64 MiB.  1 MiB is the unprivileged maximum.
    if sys.platform.startswith("linux"):
        try:
            fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
        except OSError:
            pass


def _own_group(pid):
    try:
        os.setpgid(pid, pid)
    except OSError:  # already exited, or already done by the other side
        pass


def _kill_group(pid, only_group=False):
    _worker_module().kill_group(pid, only_group)


# -- process driver internals -------------------------------------------------

class _Worker(_Child):
    """A warm ``worker.py serve`` child and its two pipes."""

    def __init__(self, idle_timeout, lend=True):
        task_r, task_w, result_r, result_w = _pipe_pair()
        import subprocess  # here: a script using only the fork driver starts faster
        claim_r = claim_w = None
        try:
            claim_r, claim_w = _claim_pipe()
            _widen_pipe(task_w)
            _widen_pipe(result_r)
            self.process = subprocess.Popen(
                _worker_command("serve", str(task_r), str(result_w), repr(idle_timeout),
                                str(_worker_module().LEND_MIN if lend and _state.lending else 0),
                                str(claim_r)),
                stdin=subprocess.DEVNULL,
                pass_fds=(task_r, result_w, claim_r) + _worker_fds(),
                close_fds=True,
                env=_worker_environ(),
                # A session (and process group) of its own: a kill takes the
                # processes its task started too, and a terminal's Ctrl-C
                # goes to us alone -- we decide what it means for a run.
                start_new_session=True)
        except BaseException:
            for fd in (task_w, result_r, claim_r, claim_w):
                if fd is not None:
                    _close_parent_fd(fd)
            raise
        finally:
            os.close(task_r)
            os.close(result_w)
        super().__init__(self.process.pid, result_r)
        self.task_fd = task_w
        self.claim_fd = claim_r
        self.claim_write_fd = claim_w
        self.claims_sent = 0  # task frames sent, each with the claim of its number
        self.context = None  # the context frame this worker has
        self.left_idle = False  # it said it leaves, unused for idle_timeout
        self.broken = False  # killed or dead: not to be reused
        self.idle_since = time.monotonic()
        _state.live_workers.add(self)

    def send_tasks(self, context, payloads, buffers=()):
        """Send task frames, and the context first if it has another, and
        the large buffers they name (see _ProcessRun.buffers_for), straight
        from their memory or as the anonymous file that holds them: in one
        write when small, as each write may cost a wake-up.  Returns the numbers of their claims.  The claims go first:
        a worker that takes one reads on until its frame, so a large frame
        never waits for a claim behind it."""
        numbers = range(self.claims_sent, self.claims_sent + len(payloads))
        code = _worker_module()
        parts = []
        header = code.FRAME_HEADER
        if self.context != context:
            parts += [header.pack(code.CONTEXT, len(context)), context]
        for number, buffer, file in buffers:
            if file is not None:
                fd, name = file
                body = code.SHARED_FILE.pack(number, fd, len(buffer)) + name.encode()
                parts += [header.pack(code.BUFFER_FILE, len(body)), body]
            else:
                parts += [header.pack(code.BUFFER, code.SHARED_HEADER.size + len(buffer)),
                          code.SHARED_HEADER.pack(number), buffer]
        task = code.TASK
        for payload in payloads:
            parts += [header.pack(task, len(payload)), payload]
        if sum(len(part) for part in parts) <= 2 * _BATCH_BYTES:
            parts = [b"".join(parts)]
        try:
            # At most _BATCH_TASKS claims: one write of less than PIPE_BUF,
            # never split, into a pipe that holds thousands.
            _write(self.claim_write_fd, b"".join(code.CLAIM.pack(number) for number in numbers))
            self.claims_sent += len(payloads)
            for part in parts:
                view = memoryview(part)
                while view:
                    view = view[_write(self.task_fd, view):]
        except BaseException:
            # Interrupted (Ctrl-C, a signal handler raising) or failed mid-frame:
            # it holds half a task and would wait for the rest forever.
            self.kill()
            raise
        self.context = context
        return numbers

    def reply(self, code):
        try:
            _write(self.task_fd, _worker_module().FRAME_HEADER.pack(code, 0))
        except OSError:
            pass  # it died: the run notices that on its pipes

    def on_reaped(self):
        # Reaped here, not by Popen (whose wait() takes a child something
        # else reaped for one that exited with 0).
        self.process.returncode = self.exitcode if self.exitcode is not None else -1

    def kill(self):
        self.broken = True
        _kill_group(self.pid)

    def retire(self):
        """Close our ends: the worker sees end-of-file and exits."""
        self.broken = True
        for fd in (self.task_fd, self.claim_write_fd):
            if fd is not None:
                _close_parent_fd(fd)
        self.task_fd = self.claim_write_fd = None
        self.close()
        _state.live_workers.discard(self)


class _WorkerPool:
    """Warm workers of one ProcessDriver; at most ``max_workers`` alive."""

    def __init__(self, max_workers, idle_timeout, lend=True):
        self.max_workers = max_workers
        self.idle_timeout = idle_timeout
        self.lend = lend  # whether its workers lend large results (see worker.py)
        self._idle = []  # most recently used last: it is the warmest
        self._live = 0
        self._held = {}  # thread ident -> workers it has checked out
        self._changed = threading.Condition()
        _state.pools.add(self)
        # A driver that is dropped must not leave its warm workers running.
        weakref.finalize(self, _retire_workers, self._idle)

    def acquire(self, wanted, deadline, start=None, stop=None):
        """Check out up to ``wanted`` workers: idle ones, and new ones until
        there are ``start`` (default: ``wanted``).  Waits for one if none is
        free, until ``deadline``; not at all if ``deadline`` has passed.
        Raises _Stopped once ``stop`` is set (a cancelled run_async)."""
        start = wanted if start is None else start
        me = threading.get_ident()
        with self._changed:
            while True:
                if stop is not None and stop.is_set():
                    raise _Stopped()
                self._drop_stale()
                take = self._idle[-wanted:] if wanted else []
                del self._idle[len(self._idle) - len(take):]
                spawn = min(start - len(take), self.max_workers - self._live)
                if take or spawn > 0:
                    break
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    return []
                if self._held.get(me):
                    # This thread holds workers already: its run is under
                    # this one (which a signal handler started, or the loop
                    # of an as_completed() it iterates), and can give none
                    # back before this one returns.  Workers of its own,
                    # beyond max_workers, retired again as they come back.
                    spawn = start - len(take)
                    break
                if wait is not None:
                    wait = min(wait, _LONGEST_WAIT)
                if stop is not None:  # looked at again every so often
                    wait = _POLL_INTERVAL if wait is None else min(wait, _POLL_INTERVAL)
                self._changed.wait(wait)
            self._live += max(spawn, 0)
        workers = list(take)
        self._hold(me, len(take))
        for _ in range(max(spawn, 0)):
            try:
                workers.append(_Worker(self.idle_timeout, self.lend))
            except BaseException as exc:
                with self._changed:
                    self._live -= spawn - (len(workers) - len(take))
                if workers and isinstance(exc, OSError):
                    # No descriptors or processes left for more: a run
                    # goes on with the workers it has.
                    return workers
                self.release(workers)
                raise
            self._hold(me, 1)
        return workers

    def _hold(self, thread, count):
        held = self._held.get(thread, 0) + count
        if held > 0:
            self._held[thread] = held
        else:
            self._held.pop(thread, None)

    def forget(self, worker):
        """A dead worker of a run that gets no replacement."""
        worker.retire()
        with self._changed:
            self._live -= 1
            self._hold(threading.get_ident(), -1)
            self._changed.notify_all()

    def replace(self, workers, worker):
        """Swap a dead worker of a run for a fresh one, in place."""
        fresh = _Worker(self.idle_timeout, self.lend)
        workers[workers.index(worker)] = fresh
        worker.retire()
        return fresh

    def release(self, workers):
        killed = []
        with self._changed:
            self._hold(threading.get_ident(), -len(workers))
            for worker in workers:
                if worker.busy:
                    # Its run was cut short before it could end the task
                    # (a signal handler raising at that moment): the outcome
                    # it will send belongs to no run.
                    worker.kill()
                if worker.broken or worker.task_fd is None or self._live > self.max_workers:
                    if worker.broken:  # killed (mid-frame, mid-task): reaped below
                        killed.append(worker)
                    worker.retire()
                    self._live -= 1
                else:
                    worker.idle_since = time.monotonic()
                    self._idle.append(worker)
            self._changed.notify_all()
        for worker in killed:
            # Reaped now, not left a zombie until something else starts a
            # process; bounded, as one stuck in the kernel may not die soon.
            if worker.wait_ended(_REAP_TIMEOUT):
                _kill_group(worker.pid, only_group=True)
        if self._idle and _state.reaper.thread is None:
            _state.reaper.start()  # to reap them once idle for idle_timeout

    def _drop_stale(self):
        # Workers that exited (idle timeout, killed from outside) or are
        # about to: reap them instead of sending them a task.
        keep = []
        now = time.monotonic()
        for worker in self._idle:
            if worker.poll() is not None or now - worker.idle_since > self.idle_timeout * 0.9:
                worker.retire()
                if worker.poll() is None:
                    worker.wait()
                self._live -= 1
            else:
                keep.append(worker)
        self._idle[:] = keep

    def forget_after_fork(self):
        # Only the forking thread survives in the child: the lock may be held
        # by a thread that no longer exists.
        self._changed = threading.Condition()
        self._held = {}
        # Kept referenced: a collected Popen of a process that is not ours
        # would warn that it is "still running".
        _state.not_ours.extend(self._idle)
        del self._idle[:]
        self._live = 0

    def shutdown(self):
        with self._changed:
            idle = self._idle[:]
            del self._idle[:]
            self._live -= len(idle)
        _retire_workers(idle)


def _retire_workers(workers):
    """Let idle workers go: they exit on end-of-file at once; reap them."""
    import subprocess
    for worker in workers:
        worker.retire()
    for worker in workers:
        try:
            worker.process.wait(1.0)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


class _ProcessRun(_Run):
    def __init__(self, pool, workers, size, payloads, outcomes, timeout, deadline, stop):
        super().__init__(len(payloads), outcomes, timeout, deadline, stop)
        self.pool = pool
        self.workers = workers  # all it checked out, to be released at the end
        self.size = size  # most workers it may use
        self.free = list(workers)
        self.payloads = payloads
        context = _current_context(_logging_levels())
        map_function = getattr(outcomes, "map_function", None)
        if map_function is not None:  # a map's: its chunks call it (worker.MapChunk)
            context = context._replace(map_function=map_function)
        self.context = pickle.dumps(context, pickle.HIGHEST_PROTOCOL)
        self.retried = set()
        self.claims = {}  # worker -> {claim number: index} of the tasks sent to it
        self.has_buffers = {}  # worker -> numbers of the shared buffers sent to it
        self.shared_files = {}  # number -> (descriptor, name) of its anonymous file

    def buffers_for(self, worker, indices):
        """The large buffers the tasks capture (worker.SharedBuffers) that a
        worker needs for these and does not have yet, as (number, buffer,
        its shared_file() or None): each goes to a worker once, ahead of the
        first task there that names it.  Noted as sent."""
        needs = self.payloads.needs
        if not needs:
            return ()
        has = self.has_buffers.setdefault(worker, set())
        wanted = set().union(*(needs.get(index, ()) for index in indices)) - has
        has |= wanted
        sent = []
        for number in sorted(wanted):
            # The file first: a Dask worker's run may only then put the
            # buffer's bytes in place of the caller's file (see _DaskWorkerRun).
            file = self.shared_file(number)
            sent.append((number, self.payloads.buffers[number], file))
        return sent

    def shared_file(self, number):
        """(descriptor, name) of the anonymous file holding shared buffer
        ``number``, written once for all the workers; None where that is not
        to be had (they get it through their pipe)."""
        if number not in self.shared_files and _state.sharing_by_file:
            name = "concurrency-shared-%s" % os.urandom(8).hex()
            try:
                # Registered as it is made, so that finish() closes it
                # whatever a signal handler raises from here on.
                with _SignalsHeld():
                    self.shared_files[number] = (
                        _above_std(os.memfd_create(name, os.MFD_CLOEXEC)), name)
                _write_all(self.shared_files[number][0], self.payloads.buffers[number])
            except BaseException as exc:
                if number in self.shared_files:
                    _uninterrupted(lambda: os.close(self.shared_files.pop(number)[0]))
                if isinstance(exc, OSError):  # no memory, no descriptor: the pipe will do
                    return None
                raise  # Ctrl-C, a signal handler's exception: the caller's
        return self.shared_files.get(number)

    def release(self, index):
        """Task ``index`` has ended: the shared buffers no task still to run
        names go, here (their files) and in the workers that have them."""
        gone = self.payloads.release(index)
        if not gone:
            return
        wire = self.wire
        for number in gone:
            with _SignalsHeld():  # not forgotten and left open
                file = self.shared_files.pop(number, None)
                if file is not None:
                    os.close(file[0])
            done = wire.FRAME_HEADER.pack(wire.BUFFER_DONE, wire.SHARED_HEADER.size) \
                + wire.SHARED_HEADER.pack(number)
            for worker, has in self.has_buffers.items():
                if number in has:
                    has.discard(number)
                    if not worker.broken and worker.task_fd is not None:
                        try:
                            _write(worker.task_fd, done)
                        except OSError:
                            pass  # it died: the run notices on its pipes

    def finish(self):
        for fd, _name in self.shared_files.values():
            os.close(fd)
        self.shared_files.clear()
        # The run's buffers leave the workers now, not with their next task.
        code = _worker_module()
        for worker in self.has_buffers:
            if not worker.broken and worker.task_fd is not None:
                try:
                    _write(worker.task_fd, code.FRAME_HEADER.pack(code.RUN_OVER, 0))
                    _write(worker.claim_write_fd, code.CLAIM.pack(code.DROP_SHARED))
                except OSError:
                    pass  # it died: nothing to let go of

    def start_tasks(self):
        if self.pending and self.free:
            self.payloads.ahead(self.pending, len(self.free) * _BATCH_TASKS, self.outcomes)
        while self.pending and self.free:
            worker = self.free.pop()
            indices = self.take_batch(self.size, lambda i: len(self.payloads[i]))
            self.queued[worker] = collections.deque(indices[1:])
            try:
                numbers = worker.send_tasks(self.context, [self.payloads[i] for i in indices],
                                            self.buffers_for(worker, indices))
            except OSError:  # the worker is gone (it may have just left idle)
                worker.wait()
                # What it said before it went: LEAVING, when its idle time
                # ran out after we checked it out (a slow serialization).
                for kind, _body in worker.read_frames():
                    if kind == self.wire.LEAVING:
                        worker.left_idle = True
                self.on_died(worker, indices[0])
                continue
            # Idle, it takes the first claim at once, and skips the frames
            # of any taken back from it before.
            worker.took_back = False
            self.claims[worker] = dict(zip(numbers, indices))
            self.watch(worker, indices[0])

    def has_room(self):
        return bool(self.free) or len(self.workers) < self.size

    def claimed_indices(self, worker, numbers):
        claims = self.claims[worker]
        return [claims.pop(number) for number in numbers]

    def task_numbered(self, worker, number):
        return self.claims.get(worker, {}).get(number)

    def on_frame(self, worker, index, kind, body):
        wire = self.wire
        if kind == wire.LEAVING:
            worker.left_idle = True
            return False
        if kind == wire.UP:  # started up: what it was sent waits for it alone
            worker.served = worker.spoke = True
            return False
        if kind == wire.RESULT or kind == wire.ERROR:
            self.release(index)
        if kind == wire.BUFFER_WANTED:  # it can't read our file: the buffer comes by pipe
            number = wire.SHARED_HEADER.unpack_from(body)[0]
            # One let go since (its file closed): no task it will run needs
            # it, and nothing says files can't be read here.
            buffer = self.payloads.buffers.get(number)
            if buffer is None:
                buffer = b""
            else:
                _state.sharing_by_file = False
            try:
                worker.send_tasks(self.context, [], [(number, buffer, None)])
            except OSError:
                pass  # it died: the run notices on its pipes
            return False
        return super().on_frame(worker, index, kind, body)

    def top_up(self, worker):
        if worker.took_back:
            return  # the frames of what it gave back may still fill its pipe
        self.payloads.ahead(self.pending, _BATCH_TASKS, self.outcomes)
        room = _TOP_UP_BYTES - sum(len(self.payloads[i]) for i in self.queued[worker])
        if not self.pending or len(self.payloads[self.pending[0]]) > room:
            return
        indices = self.take_batch(self.size, lambda i: len(self.payloads[i]), room)
        try:
            numbers = worker.send_tasks(self.context, [self.payloads[i] for i in indices],
                                        self.buffers_for(worker, indices))
        except OSError:  # it died: its pipes tell the run so
            self.pending.extendleft(reversed(indices))
            return
        self.claims[worker].update(zip(numbers, indices))
        self.queued[worker].extend(indices)

    def may_grow(self):
        return len(self.workers) < self.size

    def grow(self):
        try:
            more = self.pool.acquire(self.size - len(self.workers), deadline=0)
        except OSError:
            if not self.workers:
                raise
            more = []
        if len(more) < self.size - len(self.workers):
            self.size = len(self.workers) + len(more)  # what could be had
        self.workers.extend(more)
        self.free.extend(more)

    def on_died(self, worker, index):
        worker.broken = True
        self.requeue(worker)
        if worker.left_idle and index not in self.retried:
            # It left idle as we sent the task, which it never read.
            self.retried.add(index)
            self.pending.appendleft(index)
        else:
            self.outcomes.fail(index, WorkerCrashed(self.outcomes.key(index), worker.exitcode))
            self.release(index)
        if self.pending:
            try:
                self.free.append(self.pool.replace(self.workers, worker))
            except OSError:
                if len(self.workers) == 1:
                    raise  # no worker at all can be had
                self.workers.remove(worker)
                self.pool.forget(worker)
                self.size = len(self.workers)

    def on_killed(self, worker):
        self.queued.pop(worker, None)


# -- fork driver internals ----------------------------------------------------

class _ForkChild(_Child):
    """A child forked for one run: it runs tasks by index, one at a time."""

    def __init__(self, pid, result_fd, task_fd):
        super().__init__(pid, result_fd)
        self.task_fd = task_fd

    def kill(self):
        if not self.ended:
            _kill_group(self.pid)

    def reply(self, code):
        try:
            wire = _worker_module()
            _write(self.task_fd, wire.CLAIM.pack(wire.FORK_REPLIES[code]))
        except OSError:
            pass  # it died: the run notices that on its pipes

    def retire(self):
        """Close our end of its task pipe: it exits when it reads the end."""
        if self.task_fd is not None:
            _close_parent_fd(self.task_fd)
            self.task_fd = None

    def wait(self):
        # Killed, exited or about to: told to exit, then reaped like any child.
        self.retire()
        exitcode = super().wait()
        self.close()
        return exitcode


class _ForkRun(_Run):
    """Forks children as the run starts; each inherits every task and runs
    the ones whose index it is sent, so no task is serialized, and one fork
    serves many tasks.

    One child per core at first, more once tasks prove slow (see _Run), up
    to max_workers, never more than tasks.

    ``solo``: the driver's last run, of as many tasks or more, was over
    within what its forks cost and _QUICK_RUN -- a bot's or an app's tiny
    tasks, run after run.  Each fork costs the parent a tenth of a
    millisecond to several (_state.fork_seconds, measured), and the child
    about as much to start: one child given every task has two tiny ones
    done sooner than two children.  Unless they are done within _SOLO_GRACE
    or four forks' cost: then what it has not begun is taken back and the
    run goes on with one per core.
    """

    def __init__(self, calls, max_workers, outcomes, timeout, deadline, stop, solo=False):
        super().__init__(len(calls), outcomes, timeout, deadline, stop)
        _reap_exited()
        self.calls = calls
        self.size = min(max_workers, len(calls))
        self.limit = min(self.size, _CORES)  # children allowed for now
        self.solo_until = None  # while solo: when the run takes one child per core
        if solo and self.limit > 1:
            self.limit = 1
            # Counted again from its first word: a child's start can take
            # as long as the grace itself on a busy machine.
            self.solo_grace = max(_SOLO_GRACE, 4 * _state.fork_seconds)
            self.solo_until = time.monotonic() + 2 * self.solo_grace
        self.forks = 0  # children forked
        self.live = []
        self.context = _current_context()
        self.starting = True  # forks now inherit the state self.context holds
        self.worker = _worker_module()
        self.worker.preload_libc()
        self.lend_min = self.worker.LEND_MIN if _state.lending else 0
        # finish() ends the children; should a signal handler raise just
        # as it was due, the next run or the exit ends them.  (Not a
        # weakref.finalize: a handler raising in there would be lost.)
        _end_dropped_fork_runs()
        # Whether it keeps the reaper paused for its forks: see begin().
        self.paused = {"reaper": False}
        _state.fork_runs.append((weakref.ref(self), self.live, self.running, self.paused))

    def may_grow(self):
        return self.limit < self.size

    def take_back(self, after=_TAKE_BACK_AFTER):
        if self.solo_until is None:
            return super().take_back(after)
        wait = self.solo_until - time.monotonic()
        if wait > 0:
            return wait
        # Not done in time: what the child has not begun goes to more.
        self.solo_until = None
        self.limit = min(self.size, _CORES)
        return super().take_back(after=0)

    def top_up(self, child):
        claim = self.wire.CLAIM
        indices = self.take_batch(self.size, lambda index: claim.size)
        try:
            _write(child.task_fd, b"".join(claim.pack(index) for index in indices))
        except OSError:  # it died: its pipes tell the run so
            self.pending.extendleft(reversed(indices))
            return
        self.queued[child].extend(indices)

    def grow(self):
        self.limit = self.size

    def has_room(self):
        return bool(self.free) or len(self.live) < self.size

    def on_frame(self, child, index, kind, body):
        if self.solo_until is not None and not child.spoke:
            self.solo_until = time.monotonic() + self.solo_grace
        # Classes it names by address: only ours from before its fork.
        self.worker.RESOLVING_FORKED_AT[0] = child.forked_at
        try:
            return super().on_frame(child, index, kind, body)
        finally:
            self.worker.RESOLVING_FORKED_AT[0] = None

    def claimed_indices(self, child, numbers):
        # A reply to a lent result shares the pipe: put back what we took.
        replies = [number for number in numbers if number >= len(self.calls)]
        if replies:
            try:
                _write(child.task_fd, b"".join(self.wire.CLAIM.pack(number)
                                               for number in replies))
            except OSError:
                pass  # it died: the run notices that on its pipes
        return [number for number in numbers if number < len(self.calls)]

    def begin(self):
        # The reaper thread stopped once for all its forks, not at each (see
        # _Reaper); finish() lets it go on.  Both steps or neither.
        with _SignalsHeld():
            _state.reaper.pause()
            self.paused["reaper"] = True

    def start_tasks(self):
        try:
            self._start_tasks()
        finally:
            self.starting = False

    def _start_tasks(self):
        claim = self.wire.CLAIM
        while self.pending:
            if not self.free:
                if len(self.live) >= self.limit:
                    return
                try:
                    self.free.append(self._fork())
                except OSError:
                    if not self.live:
                        raise  # no child at all can be had
                    # No descriptors or processes left for more: the run
                    # goes on with the children it has.
                    self.limit = self.size = len(self.live)
                    return
            child = self.free.pop()
            indices = self.take_batch(self.limit if self.solo_until else self.size,
                                      lambda index: claim.size)
            try:
                _write(child.task_fd, b"".join(claim.pack(index) for index in indices))
            except OSError:  # it died while idle (killed from outside)
                self.pending.extendleft(reversed(indices))
                self._forget(child)
                continue
            self.queued[child] = collections.deque(indices[1:])
            self.watch(child, indices[0])

    def _fork(self):
        _flush_std_streams()  # or the child would print it again
        # No signal handler may raise from here until the child is ours to
        # end: not between two pipes, not inside os.fork()'s at-fork hooks
        # (logging's, whose locks would stay held), not before the child is
        # in self.live.  Its exception, a Ctrl-C, is raised as we leave, and
        # the run then ends the child like any other.
        with _SignalsHeld() as held:
            return self._fork_held(held)

    def _fork_held(self, held):
        task_r, task_w, result_r, result_w = _pipe_pair()
        try:
            # The task pipe carries the claims (see _Run.take_back): its
            # read end stays ours too.
            os.set_blocking(task_r, False)
            _widen_pipe(result_r)
            lifeline = _lifeline_read_fd()
            devnull = _devnull_fd()
            with _state.fds_lock:  # no pipe is half-registered while we fork
                forking = time.perf_counter()
                pid = os.fork()
                if pid:
                    _state.parent_fds.add(task_r)
                    # What a fork costs us here (see ForkDriver._completions):
                    # it grows with our memory, and differs machine to machine.
                    _state.fork_seconds += (time.perf_counter() - forking
                                            - _state.fork_seconds) / 4
                    self.forks += 1
        except BaseException:
            for fd in (task_w, result_r):
                _close_parent_fd(fd)
            for fd in (task_r, result_w):
                os.close(fd)
            raise
        if pid == 0:  # child: never returns into the caller's code
            code = 0
            try:
                # (_state.forget_after_fork closed every parent end we hold.)
                _in_fork_child(devnull)
                self.worker._protect_channel(task_r, result_w)
                self.worker.FORKED_BY_TASK[0] = False  # it runs tasks: no stray
                self.worker.die_with_parent(lifeline)
                self.worker.become_subreaper()
                self.worker.show_as_worker()
                held.restore(replay=False)
                self.worker.serve_forked(task_r, result_w, self.calls, self.context,
                                         self.starting, self.lend_min)
            except BaseException:
                code = 70
            finally:
                os._exit(code)
        _own_group(pid)
        os.close(result_w)
        child = _ForkChild(pid, result_r, task_w)
        child.claim_fd = task_r
        child.forked_at = self.worker.MADE[0]  # see worker._class_at
        child.served = True  # it runs the code we run: no start-up to wait for
        self.live.append(child)
        self.progress = time.monotonic()  # the clock starts once it runs
        return child

    def _forget(self, child):
        child.wait()
        self.live.remove(child)

    def on_died(self, child, index):
        self.live.remove(child)
        self.requeue(child)
        self.outcomes.fail(index, WorkerCrashed(self.outcomes.key(index), child.exitcode))

    def on_killed(self, child):
        self.live.remove(child)
        self.queued.pop(child, None)

    def finish(self):
        _end_fork_children(self.live, self.running, self.paused)
        _reap_exited()


def _end_dropped_fork_runs():
    for entry in list(_state.fork_runs):
        run, live, running, paused = entry
        if run() is None:
            try:
                _state.fork_runs.remove(entry)
            except ValueError:
                continue  # another thread's run took it
            _end_fork_children(live, running, paused)


def _end_fork_children(live, running, paused):
    """Let a run's children go.  Idle ones exit when their task pipe closes:
    they are reaped by the reaper, the next run or at exit (_reap_exited).
    Ones still running a task (a run abandoned by a signal handler raising
    as it ended) are killed."""
    # The reaper thread is started for them after a run that came alone; in
    # a quick succession of runs each reaps the last one's children as it
    # starts: a thread started and stopped again at every run would cost it
    # half a millisecond.  (What the last run of such a burst leaves is
    # reaped by the next run, by the reaper if it runs for warm workers, or
    # at exit.)
    now = time.monotonic()
    watched = now - _state.last_fork_finish >= _BURST_GAP
    for child in live:
        if child in running:
            child.kill()
        child.retire()
        # A watched child's result pipe stays open until it is reaped: its
        # end of file says it has exited (see _Reaper).  An unwatched one's
        # goes now: a burst that ends -- say the runs that failed while
        # descriptors ran short -- leaves no descriptor open for good.
        fds = [child.pidfd, child.claim_fd]
        child.pidfd = child.claim_fd = None
        if not watched:
            fds.append(child.fd)
            child.fd = None
        for fd in fds:
            if fd is not None:
                _close_parent_fd(fd)
    with _state.exiting_lock:
        _state.exiting.extend(live)
    del live[:]
    if paused["reaper"]:
        paused["reaper"] = False
        _state.reaper.unpause()
    if watched:
        _state.reaper.start()
    _state.last_fork_finish = now


# Fork runs that end within this of each other are a burst (see above).
_BURST_GAP = 0.05


def _in_fork_child(devnull):
    """Make a fresh fork child independent of the parent's state."""
    # Its own process group, so a kill takes what its task started too (the
    # parent does the same, whichever runs first), and a terminal's Ctrl-C
    # reaches the parent alone, which decides what it means for the run.
    _own_group(0)
    # Classes it sends back by value name the parent's by address.
    _worker_module().FORKED_FROM[0] = os.getppid()
    # As in process workers: a task reading stdin gets end-of-file, not the
    # terminal's input.
    if devnull is not None:
        os.dup2(devnull, 0)


def _devnull_fd():
    """A read-only /dev/null, opened once: fork children take it as stdin."""
    if _state.devnull is None:
        try:
            _state.devnull = _above_std(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            return None  # no descriptor left now: tried again next time
    return _state.devnull


# -- dask driver internals ----------------------------------------------------
#
# The caller serializes tasks as the process driver does and submits each,
# as bytes, to worker.dask_task() on the cluster, which hands it to a warm
# child of that Dask worker (_run_for_dask, this module uploaded there) and
# returns the child's outcome frame undecoded.  The caller decodes it as it
# decodes a process worker's: same classes, same errors.

def _distributed():
    """Dask's distributed package, or ConcurrencyError saying what to install."""
    try:
        import distributed
    except ImportError as exc:
        raise ConcurrencyError(
            "the dask driver needs Dask's distributed package, which is not installed "
            "here (%s); install it with: pip install 'concurrency[dask]' (from a checkout: "
            "pip install '.[dask]'; or: pip install dask distributed)" % exc) from None
    return distributed


def _dask_client_at(address, connect_timeout):
    with _state.dask_lock:
        client = _state.dask_clients.get(address)
        if client is not None and client.status in ("running", "connecting"):
            return client
        distributed = _distributed()
        _close_dask_at_exit()
    # Connected outside the lock (other callers are not held meanwhile), in
    # a thread of its own that we wait for no longer than connect_timeout:
    # Dask's own timeout does not cover a scheduler that accepts the
    # connection and never answers (a stopped process, a port that is not
    # Dask's), where Client() would wait for good.
    made, abandoned = [], []

    def connect():
        try:
            client = distributed.Client(address, timeout=connect_timeout,
                                        set_as_default=False)
        except BaseException as exc:
            made.append(exc)
            return
        made.append(client)
        if abandoned:  # answered after all, too late: nobody uses it
            _close_quietly(client)

    thread = threading.Thread(target=connect, name="concurrency-dask-connect", daemon=True)
    with _SignalsHeld():  # see _Reaper.start
        thread.start()
    thread.join(connect_timeout + _DASK_CONNECT_GRACE)
    if not made:
        abandoned.append(True)
        raise ConcurrencyError("the Dask scheduler at %s did not answer within %g s: it "
                               "accepts connections, but nothing there speaks Dask (a "
                               "stopped scheduler, or a port that is not Dask's)"
                               % (address, connect_timeout))
    client = made[0]
    if isinstance(client, BaseException):  # OSError, TimeoutError, a malformed address...
        raise ConcurrencyError("cannot reach the Dask scheduler at %s within %g s: %s: %s"
                               % (address, connect_timeout, type(client).__name__,
                                  client)) from client
    with _state.dask_lock:
        known = _state.dask_clients.get(address)
        if known is not None and known.status in ("running", "connecting"):
            _close_quietly(client)  # another thread connected meanwhile
            return known
        _state.dask_clients[address] = client
    return client


# What a connection to a Dask scheduler may take beyond connect_timeout
# before we stop waiting for it.
_DASK_CONNECT_GRACE = 1.0


def _close_quietly(client):
    try:
        client.close(timeout=_REAP_TIMEOUT)
    except Exception:
        pass


def _default_dask_client():
    try:
        from distributed import default_client
        return default_client()
    except ValueError:  # there is none
        return None


def _local_dask_client(threads):
    """A cluster in this process: Dask's scheduler and one worker as
    threads, loopback only, no dashboard.  Threads, not worker processes:
    those would be started by multiprocessing's "spawn", which runs the
    caller's script again in each, and a script without an ``if __name__ ==
    "__main__"`` guard would start clusters without end.  Each task still
    runs in a child process of its own (see _run_for_dask)."""
    with _state.dask_lock:
        if _state.dask_local is None:
            distributed = _distributed()
            _close_dask_at_exit()
            # Our own cluster's comings and goings are no news to the caller:
            # its INFO lines (45 for a short script) go, unless the caller
            # chose a level for Dask's logger (Dask's own default is INFO).
            import logging
            dask_logger = logging.getLogger("distributed")
            if dask_logger.level == logging.INFO:
                dask_logger.setLevel(logging.WARNING)
            # No dashboard; the scheduler's HTTP server (health checks) on a
            # free port of loopback, not on 8787, which may well be taken.
            cluster = distributed.LocalCluster(
                n_workers=1, threads_per_worker=threads, processes=False,
                dashboard_address=None,  # type: ignore[arg-type]
                scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})
            _state.dask_local = (cluster, distributed.Client(cluster, set_as_default=False))
        return _state.dask_local[1]


def _close_dask_at_exit():
    # Registered once distributed is imported, so it runs before
    # distributed's own exit handlers.
    if not _state.dask_exit_registered:
        _state.dask_exit_registered = True
        atexit.register(_close_dask)


def _close_dask():
    with _state.dask_lock:
        local = [_state.dask_local] if _state.dask_local is not None else []
        clients = list(_state.dask_clients.values()) + [client for _cluster, client in local]
        clusters = [cluster for cluster, _client in local]
        _state.dask_clients.clear()
        _state.dask_local = None
    for closable in clients + clusters:
        try:
            closable.close(timeout=_REAP_TIMEOUT)
        except Exception:
            pass


def _source_of(path):
    """A file's bytes; inside a zip, read through our loader."""
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError:
        get_data = getattr(globals().get("__loader__"), "get_data", None)
        if get_data is None:
            raise
        return get_data(path)


def _upload_to_dask(client):
    """Put worker.py and concurrency.py on every worker of the client's
    cluster, present and future, under the private names worker.dask_task
    imports them by: a Dask worker plugin, registered once per client (a
    second registration under the same name replaces the first)."""
    if client in _state.dask_uploaded:
        return
    _check_dask_pythons(client)
    worker = _worker_module()
    files = {worker.DASK_WORKER_FILE: _source_of(_WORKER_PATH),
             worker.DASK_RUNNER_NAME + ".py": _source_of(os.path.abspath(__file__))}
    import hashlib
    import tempfile
    from distributed.diagnostics.plugin import UploadFile
    digest = hashlib.sha256(b"\0".join(files.values())).hexdigest()[:16]
    register = getattr(client, "register_plugin", None) or client.register_worker_plugin
    with tempfile.TemporaryDirectory(prefix="concurrency-") as folder:
        for name, data in files.items():
            path = os.path.join(folder, name)
            with open(path, "wb") as file:
                file.write(data)
            try:
                # Not imported on upload: a worker imports them with its
                # first task, and one in this process uses ours.
                plugin = UploadFile(path, load=False)
            except TypeError:  # distributed < 2024.9 has no load=
                plugin = UploadFile(path)
            register(plugin, name="concurrency-%s-%s" % (name, digest))
    _state.dask_uploaded[client] = digest


def _check_dask_pythons(client):
    """Refuse a cluster whose workers run another Python than ours (by
    major.minor): tasks travel as this Python's code, which another one
    can't run (its interpreter crashes on it).  Asked once per client;
    workers that join later are checked by dask_task() itself."""
    import platform
    ours = platform.python_version()
    try:
        theirs = client.run(platform.python_version)
    except Exception:
        return  # no answer now: dask_task() checks each worker as it runs
    other = {address: version for address, version in theirs.items()
             if version.split(".")[:2] != ours.split(".")[:2]}
    if other:
        shown = ", ".join("%s runs Python %s" % item for item in sorted(other.items())[:3])
        more = " (and %d more)" % (len(other) - 3) if len(other) > 3 else ""
        raise ConcurrencyError(
            "the Dask cluster's workers run another Python than this process (Python %s): "
            "%s%s; tasks travel as this Python's code and can't run there: run the "
            "workers on Python %s" % (ours, shown, more, ".".join(ours.split(".")[:2])))


# The cluster's own limit on a task stops it this much after the caller's,
# for a caller gone before it could cancel it; the caller's comes first.
_DASK_TIMEOUT_GRACE = 1.0

# Workers on the caller's machine stop a chunk's tasks at the caller's own
# deadline, and send back what finished before it: a task that ended in time
# keeps its result, though a task of its chunk ran too long.  The caller
# waits this long past its deadline for those chunks.
_DASK_REPORT_GRACE = 0.5


def _remote_timeout(timeout):
    return None if timeout is None or timeout == math.inf else timeout + _DASK_TIMEOUT_GRACE


class _RemoteCall:
    """A call to a function of worker.py, pickled as the call itself: a Dask
    task ``pickle.loads(that)`` makes it as its worker unpickles it.  Dask's
    scheduler unpickles the tasks it is sent, and only our workers have
    worker.py (uploaded): the scheduler sees a builtin and bytes."""

    def __init__(self, function, args):
        self.function = function
        self.args = args

    def __reduce__(self):
        return self.function, self.args


def _remote_call(function, *args):
    return pickle.dumps(_RemoteCall(function, args), pickle.HIGHEST_PROTOCOL)


# Dask warns about a task graph over 10 MB ("Sending large graph"), which a
# large capture would make: what does not fit in this goes ahead of it to
# the workers (scattered), and the tasks name it.
_DASK_INLINE_BYTES = 4 << 20


def _dask_arguments(client, calls):
    """The calls as Dask task arguments: in the graph while they fit in
    _DASK_INLINE_BYTES, the rest scattered to the workers beforehand."""
    inline, large = 0, []
    for index, call in enumerate(calls):
        if inline + len(call) > _DASK_INLINE_BYTES:
            large.append(index)
        else:
            inline += len(call)
    if large:
        calls = list(calls)
        scattered = client.scatter([calls[index] for index in large], hash=False)
        for index, future in zip(large, scattered):
            calls[index] = future
    return calls


def _dask_keys(count):
    # Unique keys: the cluster may serve other runs and other callers.
    prefix = "concurrency-%s-" % os.urandom(8).hex()
    return [prefix + str(index) for index in range(count)]


# Dask spends about a millisecond on each of its tasks, so tasks go in
# chunks (one Dask task each) sized to take about _DASK_CHUNK_SECONDS by
# what the run's tasks took so far: one task per chunk until that is known,
# and never more than a share of what waits, shrinking as it does.  A run
# keeps _DASK_IN_FLIGHT chunks per thread of the cluster submitted, so that
# no thread waits for the next.
_DASK_CHUNK_SECONDS = 0.02
_DASK_CHUNK_BYTES = 1 << 20
_DASK_IN_FLIGHT = 2


class _DaskRun:
    """One run on a Dask cluster, waited for as _Run waits for children:
    each chunk's future wakes our select() through a pipe, as does
    ``stop``, until the deadline.  Whatever has not finished when it ends --
    a timeout, a stop, the caller leaving as_completed() early, Ctrl-C -- is
    cancelled: queued tasks never start, running ones have their child
    killed by their Dask worker (see _DaskWorkerRun)."""

    def __init__(self, client, payloads, outcomes, timeout, deadline, stop):
        self.client = client
        self.payloads = payloads
        self.outcomes = outcomes
        self.timeout = timeout
        self.deadline = deadline
        self.stop = stop
        self.pending = collections.deque(range(len(payloads)))
        self.chunks = {}  # future -> the indices of its tasks
        self.done = collections.deque()  # (future, (result, exception)) of chunks that ended
        self.timed = [0.0, 0]  # seconds the tasks took, tasks
        self.lock = threading.Lock()
        self.wake_fd = None  # the pipe's write end, None once the run is over
        # number -> the future of a large buffer the tasks capture, sent to
        # the cluster once for the run (see shared_call).
        self.scattered = {}
        # number -> (descriptor, name) of the anonymous file holding a large
        # buffer the tasks capture, for workers on this machine to read
        # (see client_file); whether to share them so is decided as the run
        # starts.
        self.client_files = {}
        self.by_file = False
        self.threads, self.direct, self.local = 1, False, False  # see _dask_cluster
        # Where the workers are on this machine: the deadline by our clock,
        # which they share (see _DASK_REPORT_GRACE); when the caller stops
        # waiting for chunks past it; tasks they stopped at it.
        self.until = None
        self.report_by = None
        self.late = []

    def completions(self):
        wake_read, self.wake_fd = _pipe()
        os.set_blocking(wake_read, False)
        os.set_blocking(self.wake_fd, False)
        selector = selectors.DefaultSelector()
        try:
            selector.register(wake_read, selectors.EVENT_READ, None)
            if self.stop is not None:
                selector.register(self.stop.fileno(), selectors.EVENT_READ, self.stop)
            self.threads, self.direct, self.local = _dask_cluster(self.client)
            self.by_file = (self.local and _state.sharing_by_file
                            and self.client not in _state.dask_files_unreachable)
            if self.local and self.deadline is not None:
                self.until = time.time() + (self.deadline - time.monotonic())
            self.submit()
            while self.chunks:
                if self.done:
                    ready = []
                    while self.done:
                        ready.append(self.done.popleft())
                    indices = self.settle(ready)
                    self.submit()
                    yield from indices
                    continue
                deadline = self.deadline if self.report_by is None else self.report_by
                wait = None
                if deadline is not None:
                    wait = deadline - time.monotonic()
                    if wait <= 0:
                        if self.report_by is None and self.until is not None:
                            self.report_by = deadline + _DASK_REPORT_GRACE
                            continue
                        yield from self.expire()
                        return
                for key, _mask in selector.select(None if wait is None
                                                  else min(wait, _LONGEST_WAIT)):
                    if key.data is not None:
                        raise _Stopped()
                try:
                    while os.read(wake_read, 4096):
                        pass
                except BlockingIOError:
                    pass
            if self.pending or self.late:  # stopped at the deadline
                yield from self.expire()
        finally:
            selector.close()
            with self.lock:  # no callback writes to it from now on
                os.close(self.wake_fd)
                self.wake_fd = None
            os.close(wake_read)
            if self.chunks:
                _uninterrupted(self.cancel)
            if self.scattered:
                self.forget_scattered()
            if self.client_files:
                # A chunk that still runs has its own descriptors by now,
                # and one that had not opened them yet fails unused.
                _uninterrupted(self.close_client_files)

    def close_client_files(self):
        while self.client_files:
            os.close(self.client_files.popitem()[1][0])

    def forget_scattered(self):
        """The run is over: the cluster lets its shared buffers go, and the
        workers close the files they wrote them into -- told now, on the
        client's event loop, not waited for."""
        keys = [future.key for future in self.scattered.values()]
        self.scattered.clear()
        call = _remote_call(_worker_module().dask_forget, keys)
        client = self.client

        async def forget():
            try:
                await client.run(pickle.loads, call, on_error="ignore", asynchronous=True)
            except Exception:
                pass  # the cluster is gone, and the files with it
        try:
            client.loop.add_callback(forget)
        except RuntimeError:
            pass  # the client is closed: each worker's next chunk closes them


    def submit(self):
        """Submit chunks of pending tasks while the cluster has room."""
        if self.report_by is not None:
            return  # past the deadline: none starts now
        chunks = []
        # Tasks that capture large buffers, their time not known yet: one
        # chunk per thread, as each chunk hands its buffers to a child anew
        # -- per core where the workers are all on this machine: they share
        # its cores, and more chunks at once than cores would only copy the
        # buffers into more children than can run.
        needs = self.payloads.needs
        per_thread = 0
        if not self.timed[1] and self.pending and self.pending[0] in needs:
            spread = min(self.threads, _CORES) if self.local else self.threads
            per_thread = -(-len(self.pending) // spread)
        while self.pending and len(self.chunks) + len(chunks) < _DASK_IN_FLIGHT * self.threads:
            count = per_thread or self.chunk_size()
            chunk = [self.pending.popleft()]
            size = len(self.payloads[chunk[0]])
            while (self.pending and len(chunk) < count
                   and size + len(self.payloads[self.pending[0]]) <= _DASK_CHUNK_BYTES):
                size += len(self.payloads[self.pending[0]])
                chunk.append(self.pending.popleft())
            chunks.append(chunk)
        if not chunks:
            return
        dask_task = _worker_module().dask_task
        plain, calls, sharing = [], [], []
        for chunk in chunks:
            call = None
            if any(index in needs for index in chunk):
                call = self.file_call(dask_task, chunk) if self.by_file else None
                if call is None:
                    sharing.append(chunk)
                    continue
            plain.append(chunk)
            calls.append(call or _remote_call(dask_task, *self.chunk_arguments(chunk)))
        submitted = []
        if plain:
            submitted += zip(self.client.map(pickle.loads, _dask_arguments(self.client, calls),
                                             key=_dask_keys(len(plain)), pure=False), plain)
        for chunk, key in zip(sharing, _dask_keys(len(sharing))):
            call, buffers = self.shared_call(dask_task, chunk)
            submitted.append((self.client.submit(pickle.loads, call, buffers=buffers, key=key,
                                                 pure=False), chunk))
        for future, chunk in submitted:
            self.chunks[future] = chunk
            self.fetch(future)

    def shared_call(self, dask_task, chunk):
        """The call of a chunk whose tasks name large buffers, and the
        futures of those buffers, its out-of-band pickle buffers: the Dask
        worker holds each buffer once, fetched from the cluster the first
        time one of its tasks needs it, and hands it to pickle.loads()."""
        numbers = self.buffers_named(chunk)
        missing = [number for number in numbers if number not in self.scattered]
        if missing:
            futures = self.client.scatter([self.payloads.buffers[n] for n in missing],
                                          hash=False, direct=self.direct)
            self.scattered.update(zip(missing, futures))
        out_of_band = []
        shared = [(number, self.scattered[number].key,
                   pickle.PickleBuffer(self.payloads.buffers[number])) for number in numbers]
        call = pickle.dumps(_RemoteCall(dask_task, self.chunk_arguments(chunk, shared=shared)),
                            protocol=5, buffer_callback=out_of_band.append)
        assert len(out_of_band) == len(numbers)
        return call, [self.scattered[number] for number in numbers]

    def file_call(self, dask_task, chunk):
        """The call of a chunk whose tasks name large buffers, for workers on
        this machine: they read those buffers from our anonymous files, each
        written once for the run (no copy through Dask, nor one held by a
        Dask worker); None if a file can't be had here."""
        files = []
        for number in self.buffers_named(chunk):
            file = self.client_file(number)
            if file is None:
                return None
            fd, name = file
            files.append((number, os.getpid(), fd, name, len(self.payloads.buffers[number])))
        return _remote_call(dask_task, *self.chunk_arguments(chunk, files=files))

    def buffers_named(self, chunk):
        """The numbers of the shared buffers the chunk's tasks name."""
        needs = self.payloads.needs
        return sorted(set().union(*(needs.get(index, ()) for index in chunk)))

    def chunk_arguments(self, chunk, shared=None, files=None):
        """worker.dask_task()'s arguments for a chunk: with ``shared`` or
        ``files``, the buffers its tasks name, and which each names."""
        needs = None
        if shared is not None or files is not None:
            needs = [sorted(self.payloads.needs.get(i, ())) for i in chunk]
        return ([self.payloads[i] for i in chunk], _remote_timeout(self.timeout), None,
                sys.implementation.cache_tag, needs, shared, files, self.until)

    def client_file(self, number):
        """(descriptor, name) of the anonymous file holding shared buffer
        ``number``, made and written once for the run; None where one
        can't be (no memory, no descriptor)."""
        file = self.client_files.get(number)
        if file is None:
            name = "concurrency-shared-%s" % os.urandom(8).hex()
            try:
                with _SignalsHeld():  # registered as it is made: closed at the run's end
                    file = self.client_files[number] = (
                        _above_std(os.memfd_create(name, os.MFD_CLOEXEC)), name)
                _write_all(file[0], self.payloads.buffers[number])
            except OSError:
                _uninterrupted(lambda: os.close(self.client_files.pop(number)[0])
                               if number in self.client_files else None)
                self.by_file = False
                return None
        return file

    def chunk_size(self):
        seconds, tasks = self.timed
        if not tasks:
            return 1
        share = len(self.pending) // (_DASK_IN_FLIGHT * self.threads)
        per_task = seconds / tasks
        return max(1, min(share, int(_DASK_CHUNK_SECONDS / per_task) if per_task else share))

    def fetch(self, future):
        """On the client's event loop: await the chunk and fetch its result
        at once (not after a hop to a callback thread and one to ours, each
        of which a run of few tasks would feel), then hand it to the run."""
        async def fetch():
            try:
                [result] = await self.client.gather([future], asynchronous=True,
                                                    direct=self.direct)
                outcome = (result, None)
            except BaseException as exc:  # its failure, to be the task's
                outcome = (None, exc)
            self.done.append((future, outcome))
            with self.lock:
                if self.wake_fd is not None:
                    try:
                        os.write(self.wake_fd, b"!")
                    except BlockingIOError:  # full: it is awake anyway
                        pass
        self.client.loop.add_callback(fetch)

    def settle(self, done):
        """Fill the outcomes of finished chunks; returns the indices filled."""
        filled = []
        for future, (result, exc) in done:
            chunk = self.chunks.pop(future)
            if exc is not None:
                for index in chunk:
                    self.outcomes.fail(index, _dask_failure(self.outcomes.key(index), exc))
            elif result[0] is None:
                # Its Dask worker could not read our files (another user,
                # another PID namespace): the chunk did not run, and goes
                # again, its buffers sent by Dask, as will this client's --
                # only this run's where it had no descriptor left.
                why, lasting = result[1]
                if lasting:
                    _state.dask_files_unreachable[self.client] = why
                self.by_file = False
                self.pending.extendleft(reversed(chunk))
                continue
            else:
                encoded, seconds = result
                self.timed[0] += seconds
                self.timed[1] += len(chunk)
                for index, outcome in zip(chunk, encoded):
                    if self.decode(index, outcome):
                        filled.append(index)
                continue
            filled += chunk
        return filled

    def decode(self, index, outcome):
        """Fill the task's outcome; False for one stopped at the deadline,
        left for expire() to fill, naming every task that did not finish."""
        key = self.outcomes.key(index)
        kind, body, *lent = outcome
        if kind != _worker_module().LOST:
            # A lent buffer arrives as Dask sent it; the result is rebuilt
            # around the object the task returned: bytes where the lent
            # buffer was read-only, else a bytearray.
            self.outcomes.arrived(index, kind, body, [
                buffer if type(buffer) in (bytes, bytearray)
                else bytes(buffer) if memoryview(buffer).readonly else bytearray(buffer)
                for buffer in lent[0]] if lent else None)
            exc = self.outcomes.values[index]
            if (self.outcomes.failed[index] and isinstance(exc, SerializationError)
                    and "No module named 'dill'" in str(exc)):
                _add_note(exc, "the Dask workers need dill to run this task: "
                               "pip install dill, where they run")
            return True
        what, detail = pickle.loads(body)
        if what == "crashed":
            self.outcomes.fail(index, WorkerCrashed(key, detail))
        elif what == "timeout":
            self.late.append(index)
            return False
        else:
            self.outcomes.fail(index, ConcurrencyError("task %r failed on its Dask worker: %s"
                                                       % (key, detail)))
        return True

    def expire(self):
        unfinished = sorted(list(self.pending) + self.late
                            + [index for chunk in self.chunks.values() for index in chunk])
        self.pending.clear()
        del self.late[:]
        keys = [self.outcomes.key(index) for index in unfinished]
        for index in unfinished:
            self.outcomes.fail(index, TaskTimeout(self.outcomes.key(index), keys, self.timeout))
        return unfinished

    def cancel(self):
        futures, self.chunks = list(self.chunks), {}
        try:
            self.client.cancel(futures)
        except Exception:
            pass  # the scheduler is gone: so are its tasks


def _dask_cluster(client):
    """(the cluster's thread count, whether results come straight from the
    workers, whether all the workers are on this machine), asked again
    every few seconds (it costs a round trip to the scheduler, which a short
    run would feel).

    Straight from the workers where the client says so (direct_to_workers),
    or, where it says nothing, when they are on this machine: a fetch
    through the scheduler is a hop more.  Dask's own default, through the
    scheduler, where they are elsewhere: a client outside the cluster's
    network may not reach them, and would wait for its connect timeout."""
    now = time.monotonic()
    known = _state.dask_clusters.get(client)
    if known is None or now - known[0] > 5.0:
        workers = client.nthreads()
        local = bool(workers) and all(_on_this_machine(address) for address in workers)
        direct = getattr(client, "direct_to_workers", None)
        if direct is None:
            direct = local
        known = (now, max(1, sum(workers.values())), direct, local)
        _state.dask_clusters[client] = known
    return known[1:]


def _on_this_machine(address):
    """Whether a Dask address (tcp://host:port, inproc://...) is this machine's."""
    scheme, _, rest = address.partition("://")
    if scheme == "inproc":
        return True
    host = rest.rsplit(":", 1)[0].strip("[]")
    return host in ("::1", "localhost") or host.startswith("127.")


def _dask_failure(key, exc):
    """What a task whose future failed on the cluster raises."""
    if type(exc).__name__ == "KilledWorker":
        error = WorkerCrashed(key, None)
        error.args = ("task %r crashed: the Dask worker running it died, and Dask gave up "
                      "on it (%s)" % (key, exc),)
    elif isinstance(exc, ModuleNotFoundError) and "_concurrency" in str(exc):
        error = ConcurrencyError("task %r could not start on its Dask worker, which does "
                                 "not have this library's files: %s" % (key, exc))
    else:
        error = ConcurrencyError("task %r failed on the Dask cluster: %s: %s"
                                 % (key, type(exc).__name__, exc))
    error.__cause__ = exc
    return error


def _defer_on_dask(client, payloads, keys, timeout):
    """Start deferred tasks on the cluster, whose workers report a task's
    failure on their stderr; what keeps one from running at all is reported
    here, while this process lives."""
    import distributed
    dask_task = _worker_module().dask_task
    calls = _dask_arguments(client, [
        _remote_call(dask_task, [payload], _remote_timeout(timeout), [key],
                     sys.implementation.cache_tag)
        for payload, key in zip(payloads, keys)])
    futures = client.map(pickle.loads, calls, key=_dask_keys(len(calls)), pure=False)
    distributed.fire_and_forget(futures)
    for key, future in zip(keys, futures):
        # Watched on the client's event loop, which ends quietly with us.
        # Not add_done_callback(): its callback thread is gone at exit,
        # and Dask would print a traceback for each.
        client.loop.add_callback(_watch_deferred_on_dask, client, key, future)


async def _watch_deferred_on_dask(client, key, future):
    try:
        await client.gather([future], errors="skip", asynchronous=True)
    except BaseException:
        return  # the client is closing: the cluster runs the task on
    _report_deferred_on_dask(key, future)


def _report_deferred_on_dask(key, future):
    if future.status in ("error", "cancelled", "lost"):
        try:
            cause = future.exception() if future.status == "error" else None
        except Exception as exc:
            cause = exc
        error = _dask_failure(key, cause or ConcurrencyError("cancelled on the cluster"))
        _worker_module().report_deferred(key, "failed: %s\n" % error)


# -- On a Dask worker ---

def _run_for_dask(payloads, timeout, needs=None, shared=None, files=None, until=None):
    """On a Dask worker: run a chunk of tasks one after another in a warm
    child, as the process driver does, and return their outcomes still
    encoded, with the seconds they took (see worker.dask_task).  ``shared``:
    (number, Dask key, buffer) of the large buffers the tasks name, or
    ``files`` where they are in the caller's anonymous files, and ``needs``
    which, by task: they go to the child as on the process driver.  None
    and (why, whether for good), running nothing, where those files can't
    be read here.  ``until``: the caller's deadline by our shared clock
    (time.time())."""
    opened = {}  # number -> (our descriptor, name, size) of a caller's file
    try:
        for number, pid, fd, name, size in files or ():
            opened[number] = (_above_std(_worker_module().open_process_file(pid, fd, name)),
                              name, size)
    except OSError as exc:
        for own, _name, _size in opened.values():
            os.close(own)
        # Not for good: no descriptor or memory left here for now.
        passing = exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM)
        return None, ("%s: %s" % (type(exc).__name__, exc), not passing)
    with _state.dask_lock:
        if _state.dask_pool is None:
            # Lending: a large result is copied out of the child once,
            # and sent on as it is (see _RelayedOutcomes).
            _state.dask_pool = _WorkerPool(_MAX_WORKERS_MAX, DEFAULT_IDLE_TIMEOUT)
    pool = _state.dask_pool
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
    if until is not None:
        deadline = min(deadline if deadline is not None else math.inf,
                       started + (until - time.time()))
    outcomes = _RelayedOutcomes(len(payloads))
    workers = []
    try:
        # One child: the Dask worker gave this chunk one of its threads.
        workers = pool.acquire(1, deadline)
        if _state.dask_files:
            _forget_dask_files()
        run = _DaskWorkerRun(pool, workers, payloads, outcomes, timeout, deadline,
                             _dask_task_dropped(), needs, shared, opened)
        opened = {}  # the run's now: it closes them as it ends
        for _index in run.completions():
            pass
    except _Stopped:
        pass  # dropped: nobody waits for these outcomes any more
    finally:
        pool.release(workers)
        for own, _name, _size in opened.values():
            os.close(own)
    return outcomes.encoded, time.monotonic() - started


def _release_dask_workers():
    with _state.dask_lock:
        pool = _state.dask_pool
    if pool is not None:
        pool.shutdown()
    _forget_dask_files(everything=True)


def _dask_file(key, buffer):
    """(descriptor, name) of the anonymous file holding the shared buffer
    Dask holds as ``key`` on this worker, written by the first chunk that
    needs it (the others wait for that), or None where one can't be made."""
    with _state.dask_lock:
        if key not in _state.dask_files:
            name = "concurrency-shared-%s" % os.urandom(8).hex()
            try:
                fd = _above_std(os.memfd_create(name, os.MFD_CLOEXEC))
            except OSError:
                return None  # no memory, no descriptor: the pipe will do
            try:
                _write_all(fd, buffer)
            except BaseException as exc:
                os.close(fd)
                if isinstance(exc, OSError):  # no room for it: the pipe will do
                    return None
                raise
            _state.dask_files[key] = (fd, name)
        return _state.dask_files[key]


def _forget_dask_files(everything=False, keys=()):
    """Close the files of the shared buffers this Dask worker no longer
    holds: told by the caller as its run ends (``keys``); as each chunk
    starts, those whose buffer Dask has let go (a caller that vanished
    could not tell); all when the warm children are let go."""
    held = ()
    if not everything and not keys:
        try:
            from distributed import get_worker
            held = get_worker().data
        except Exception:
            pass
    with _state.dask_lock:
        for key in list(_state.dask_files):
            if everything or (key in keys if keys else key not in held):
                os.close(_state.dask_files.pop(key)[0])


class _RelayedOutcomes:
    """The outcomes of a run on a Dask worker, kept as the child encoded
    them: the caller, who has the classes, decodes them.  Kept as bytes and
    bytearrays, never copied: Dask sends those as frames of their own, as
    they are (its "dask" serializer, for the items of these tuples and
    lists, as their first item is bytes).  Not as pickle buffers: through
    the scheduler Dask pickles with protocol 4."""

    def __init__(self, count) -> None:
        self.count = count
        self.completed: collections.deque = collections.deque()
        self.encoded: list = [(_worker_module().LOST, pickle.dumps(("error", "cancelled")))] * count

    def key(self, index):
        return None

    def arrived(self, index, kind, body, lent=None):
        self.encoded[index] = (kind, body) if lent is None else (kind, body, list(lent))
        self.completed.append(index)

    def fail(self, index, exc):
        if isinstance(exc, WorkerCrashed):
            what = ("crashed", exc.exitcode)
        elif isinstance(exc, TaskTimeout):
            what = ("timeout", exc.timeout)
        else:
            what = ("error", "%s: %s" % (type(exc).__name__, exc))
        self.encoded[index] = (_worker_module().LOST, pickle.dumps(what))
        self.completed.append(index)


class _DaskWorkerRun(_ProcessRun):
    """A chunk's run on a Dask worker.  Dask cannot stop a task that runs
    (it lets it finish, unused), but we can kill its child: every
    _DASK_WATCH_INTERVAL the run looks whether its Dask worker has dropped
    the task -- the caller timed out, was cancelled or left early -- and
    stops if so.  Dask offers no call when it drops one; and a thread that
    looked for every run would cost each Dask task more than this does."""

    def __init__(self, pool, workers, payloads, outcomes, timeout, deadline, dropped,
                 needs=None, shared=None, files=None):
        ready = _Payloads(None, payloads, ready=payloads)
        if shared or files:  # see _run_for_dask
            ready.buffers = {number: buffer for number, _key, buffer in shared or ()}
            ready.needs = {index: numbers for index, numbers in enumerate(needs or ()) if numbers}
        super().__init__(pool, workers, 1, ready, outcomes, timeout, deadline, None)
        self.dropped = dropped
        self.next_look = time.monotonic() + _DASK_WATCH_INTERVAL
        # number -> the Dask key of that shared buffer
        self.shared_keys = {number: key for number, key, _buffer in shared or ()}
        # number -> (descriptor, name) of the caller's file of that shared
        # buffer, opened here: the child reads it as ours; closed as the
        # run ends.
        self.caller_files = {}
        for number, (fd, name, size) in (files or {}).items():
            self.caller_files[number] = (fd, name)
            ready.buffers[number] = _FileContents(fd, size)

    def shared_file(self, number):
        """The file of a shared buffer is made once on this Dask worker for
        every chunk that names it, not once a chunk (see _dask_file); the
        caller's own, where it sent that (see _run_for_dask)."""
        if number in self.caller_files:
            if _state.sharing_by_file:
                return self.caller_files[number]
            self.buffer_by_pipe(number)
            return None
        key = self.shared_keys.get(number)
        if key is None or not _state.sharing_by_file:
            return super().shared_file(number)
        return _dask_file(key, self.payloads.buffers[number])

    def buffer_by_pipe(self, number):
        """A child here can't read files of ours: a buffer held in the
        caller's file is read here, to go through the pipe."""
        buffer = self.payloads.buffers.get(number)
        if type(buffer) is _FileContents:
            self.payloads.buffers[number] = buffer.read()

    def on_frame(self, worker, index, kind, body):
        if kind == self.wire.BUFFER_WANTED:
            self.buffer_by_pipe(self.wire.SHARED_HEADER.unpack_from(body)[0])
        return super().on_frame(worker, index, kind, body)

    def finish(self):
        super().finish()
        while self.caller_files:
            os.close(self.caller_files.popitem()[1][0])

    def wake_after(self):
        due = super().wake_after()
        look = max(0.0, self.next_look - time.monotonic())
        return look if due is None else min(due, look)

    def on_wake(self):
        super().on_wake()
        now = time.monotonic()
        if now >= self.next_look:
            self.next_look = now + _DASK_WATCH_INTERVAL
            if self.dropped():
                raise _Stopped()


class _FileContents:
    """A shared buffer still in the caller's file, opened as ``fd``: its
    size, and its bytes when a child can't read the file itself."""

    def __init__(self, fd, size):
        self.fd = fd
        self.size = size

    def __len__(self):
        return self.size

    def read(self):
        data = bytearray(self.size)
        view, got = memoryview(data), 0
        while got < self.size:
            count = os.preadv(self.fd, [view[got:]], got)
            if not count:
                raise OSError("the caller's file of a shared buffer ended early")
            got += count
        return data


def _dask_task_dropped():
    """A function telling whether the Dask task this thread runs has been
    dropped by its worker; one that always says no outside a Dask task, or
    with a distributed that has no such state (timeouts still hold)."""
    try:
        from distributed.worker import get_worker, thread_state  # type: ignore[attr-defined]
        worker, key = get_worker(), thread_state.key
        worker.state.tasks
    except Exception:
        return lambda: False

    def dropped():
        task = worker.state.tasks.get(key)
        return task is None or task.state in ("cancelled", "released", "forgotten")
    return dropped


_DASK_WATCH_INTERVAL = 0.1


# -- Deferred tasks in detached processes -------------------------------------


def _spawn_detached(payload):
    """Start ``worker.py defer`` in a session of its own: it outlives us.

    The payload (the environment is in it) goes through an anonymous file
    the child inherits: nothing is left on disk if we die, and neither keys
    nor anything else of the tasks shows on its command line.
    """
    _state.detached[:] = [process for process in _state.detached if process.poll() is None]
    import subprocess
    path = None
    if hasattr(os, "memfd_create"):
        fd = _above_std(os.memfd_create("concurrency-defer", os.MFD_CLOEXEC))
        source = "fd:%d" % fd
    else:  # a file of our own, removed by the child once read
        import tempfile
        fd, path = tempfile.mkstemp(prefix="concurrency-defer-", suffix=".pickle")
        source = path
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]
        process = subprocess.Popen(
            _worker_command("defer", source), env=_worker_environ(),
            stdin=subprocess.DEVNULL,
            pass_fds=((fd,) if path is None else ()) + _worker_fds(),
            close_fds=True, start_new_session=True)
    except BaseException:
        if path is not None:
            try:
                os.unlink(path)
            except OSError:
                pass
        raise
    finally:
        os.close(fd)
    _state.detached.append(process)


def _fork_detached(jobs, timeout, limit):
    """Run the tasks of ``jobs`` -- (key, callable) -- in a double-forked
    supervisor in a session of its own, which runs ``limit`` at once and
    reports a failure, crash or timeout on stderr."""
    worker = _worker_module()
    devnull = _devnull_fd()
    _flush_std_streams()
    # Signals held until the middle process is reaped (a Ctrl-C can't leave
    # it <defunct>) and, in the supervisor, until it is in a session of its
    # own, out of reach of the terminal's Ctrl-C.
    with _SignalsHeld() as held:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.setsid()
                if os.fork() == 0:
                    held.restore(replay=False)
                    _in_fork_child(devnull)
                    _let_go_of_descriptors()
                    # The supervisor waits for its children: SIGCHLD ignored
                    # by the application would take their status away.
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    code = worker.supervise(
                        [(repr(key), lambda fn=fn, key=key: worker.run_reporting(fn, repr(key)))
                         for key, fn in jobs], timeout, limit)
            except BaseException:
                code = 70
            finally:
                os._exit(code)
        os.waitpid(pid, 0)  # the middle process exits at once


def _let_go_of_descriptors():
    """In a detached fork child: hold none of the caller's descriptors but
    0, 1 and 2.  A deferred task started by a server's handler must not keep
    the client's socket open (the client would wait for the end of its
    response as long as the task runs), nor the listening socket, a lock
    file, a pipe.  Each is replaced by the write end of a pipe nobody
    reads, not closed: its number stays taken, so a stale socket or file
    object of the caller's can't close or write a file the task opens
    later, and any use of it fails (EPIPE, EBADF, ENOTSOCK), never silently."""
    read_fd, dead = os.pipe()
    os.close(read_fd)
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        try:
            fds = [int(name) for name in os.listdir("/dev/fd")]
        except OSError:
            fds = range(3, min(os.sysconf("SC_OPEN_MAX"), 1 << 16))
    for fd in fds:
        if fd > 2 and fd != dead:
            try:
                os.fstat(fd)  # open: not the listing's own, gone by now
                os.dup2(dead, fd, inheritable=False)
            except OSError:
                pass
    os.close(dead)


# -- Process-wide state ---------------------------------------------------------

class _ProcessState:
    """All this process holds for the library, in one place: its children
    and our pipe ends to them, the reaper, the fast paths still on, and the
    caches.  A fork child starts from forget_after_fork(): none of that is
    its own."""

    # None until first used (see __init__); said for type checkers.
    worker_module: Any
    worker_code: Any
    worker_file: Any
    interpreter_flags: Any
    memory_reader: Any
    devnull: Any
    lifeline: Any
    logging_levels: Any
    config: Any
    environ: Any
    dask_local: Any
    dask_pool: Any

    def __init__(self):
        # Linux's fast paths, off for good once one fails here: children
        # lend large result buffers for us to copy out of their memory
        # (process_vm_readv), and large buffers tasks share go to workers in
        # an anonymous file they read through /proc (see worker.py).
        self.lending = sys.platform.startswith("linux") and not _PORTABLE
        self.sharing_by_file = (sys.platform.startswith("linux")
                                and hasattr(os, "memfd_create") and not _PORTABLE)
        # Made on first use.
        self.worker_module = None  # worker.py, loaded by path (_worker_module)
        self.worker_code = None
        self.worker_file = None  # (path, descriptors to pass, compiled)
        self.interpreter_flags = None
        self.memory_reader = None  # process_vm_readv by ctypes
        self.devnull = None  # a read-only /dev/null, opened on first use
        self.lifeline = None  # (read end, write end) of the pipe fork children watch
        self.logging_levels = None  # see _logging_levels
        self.imported_from_cwd = {}  # (sys.path, cwd, module count) -> the directories
        self.config = None  # (signature of the file, its settings)
        # Children.
        self.pools = weakref.WeakSet()
        self.live_workers = weakref.WeakSet()
        self.not_ours = []  # the parent's workers, in a fork child
        self.fork_runs = []  # (weak ref to a _ForkRun, its live children, running ones, paused)
        self.last_fork_finish = 0.0
        self.map_timing = {}  # (id(driver), function's code) -> seconds per item
        self.fork_seconds = 0.001  # what the last os.fork() took us
        self.environ = None  # (os.environ's raw bytes, decoded): see _environ_now
        self.exiting = []  # fork children told to exit, not reaped yet
        self.exiting_lock = threading.RLock()
        self.reaper = _Reaper()
        self.detached = []  # Popen objects of detached deferred tasks, reaped when done
        # Our ends of the pipes to children (and their pidfds).  A fork child
        # -- of the fork driver, or of user code -- must not keep them open:
        # a worker or fork child whose task pipe is held open by another
        # process would never see its end, nor its parent die.  Registered
        # under fds_lock, which forks take.  Reentrant: a signal handler
        # running run() lands between our bytecodes, maybe while this thread
        # holds it around os.fork().
        self.parent_fds = set()
        self.fds_lock = threading.RLock()
        # The dask driver's.
        self.dask_lock = threading.RLock()
        self.dask_clients = {}  # address -> the Client we connected to it
        self.dask_local = None  # (cluster, client) of the local cluster, once started
        self.dask_uploaded = weakref.WeakKeyDictionary()  # client -> digest of the files it got
        # client -> (when, threads, direct, local): see _dask_cluster
        self.dask_clusters = weakref.WeakKeyDictionary()
        # client -> why its workers could not read our files (see _DaskRun.file_call)
        self.dask_files_unreachable = weakref.WeakKeyDictionary()
        self.dask_files = {}  # on a Dask worker: key of a shared buffer -> its file
        self.dask_exit_registered = False
        self.dask_pool = None  # on a Dask worker: the warm children of dask_task()

    def forget_after_fork(self):
        """In a fork child: close every parent end of ours; the workers are
        not the child's own either: a run in the child starts workers of
        its own.  It keeps the read end of our lifeline: a fork child
        watches it."""
        for fd in list(self.parent_fds):
            try:
                os.close(fd)
            except OSError:
                pass
        self.parent_fds.clear()
        self.fds_lock = threading.RLock()  # whoever held it is not in this process
        for worker in list(self.live_workers):
            worker.task_fd = worker.fd = worker.pidfd = None
            worker.claim_fd = worker.claim_write_fd = None
        self.live_workers.clear()
        for pool in list(self.pools):
            pool.forget_after_fork()
        del self.detached[:]
        # The reaper thread is not in this process, nor its pipe (closed above).
        self.reaper.thread = self.reaper.wake_fds = None
        self.reaper.resume = False
        self.reaper.paused = 0
        del self.fork_runs[:]  # the parent's runs, not this process's
        self.not_ours.extend(self.exiting)
        del self.exiting[:]
        self.exiting_lock = threading.RLock()
        # Its lifeline's write end was ours (closed above); the child makes
        # its own when it forks children.
        self.lifeline = None


_state = _ProcessState()


def _shutdown():
    _state.reaper.stop()
    for pool in list(_state.pools):
        pool.shutdown()
    _end_dropped_fork_runs()
    _reap_exited(block=True)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_pause_reaper, after_in_parent=_resume_reaper,
                        after_in_child=_state.forget_after_fork)


def _at_exit():
    _state.reaper.closed = True  # no thread can be started now (3.12+): we reap
    _shutdown()


atexit.register(_at_exit)


# -- Config -------------------------------------------------------------------

_CONFIG_TEMPLATE = """\
; Settings of the concurrency library.
; Read from concurrency.ini in the current directory, or from the file named
; by the CONCURRENCY_CONFIG environment variable.
[concurrency]

; The driver concurrency.run() and concurrency.defer() use:
;   process - each task in a warm child Python process (tasks serialized with
;             the standard pickler, by value what it can't find by name;
;             dill for the rare rest)
;   fork    - each task in an os.fork() child (POSIX only; nothing serialized)
;   sync    - one after another in the calling process (tests, debugging)
;   dask    - each task on a Dask cluster (needs: pip install distributed)
; The CONCURRENCY_DRIVER environment variable overrides it.
default = process

; Most child processes alive at once per driver; a whole number, 1 to 4096.
; Default: min(32, CPU cores + 4).
; max_workers = 8

; Seconds a run may take before its unfinished tasks are killed and fail with
; concurrency.TaskTimeout; a number, 0.001 at least, or none for no limit.
timeout = none

; The Dask scheduler the dask driver sends tasks to; without one, the
; default Dask client of the process, else a local cluster started on first
; use.  The CONCURRENCY_DASK_ADDRESS environment variable overrides it.
; dask_address = tcp://scheduler:8786
"""

# A config file is a few lines; one larger than this is not one.
_CONFIG_MAX_BYTES = 64 * 1024
# A timeout shorter than this fails every task (a process takes longer to
# start); more workers than this exhaust a machine's processes.
_TIMEOUT_MIN = 0.001
_MAX_WORKERS_MAX = 4096


def _config_path():
    """The config file the library reads: CONCURRENCY_CONFIG's, else the
    current directory's concurrency.ini."""
    return os.environ.get(CONFIG_ENV) or CONFIG_FILE


def _read_config() -> dict[str, Any]:
    """The validated settings of concurrency.ini, {} when there is none.

    The file is read from the current directory, so whoever controls that
    directory controls it: only a regular file of sane size is read (never
    a FIFO or a device), without following it into interpolation, and every
    bad file or value is a ConfigError naming the file and key.  The file
    decides where task code and captured data go (a dask_address) and so
    what is unpickled here: one that another user owns or may write is
    refused, as ssh's StrictModes refuses such an authorized_keys.
    """
    import stat as stat_module
    path = _config_path()
    try:
        stat = os.stat(path)
    except OSError:
        if os.environ.get(CONFIG_ENV):
            raise ConfigError("%s: no such config file (named by %s)"
                              % (path, CONFIG_ENV)) from None
        return {}
    # Owner and mode too: a chmod or chown changes neither mtime nor size.
    signature = (os.path.abspath(path), stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size,
                 stat.st_ino, stat.st_uid, stat.st_mode)
    cached = _state.config
    if cached is not None and cached[0] == signature:
        return cached[1]
    try:
        # O_NONBLOCK: a FIFO swapped in after the stat() can't block us.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ConfigError("%s: cannot be read: %s" % (path, exc.strerror)) from None
    try:
        opened = os.fstat(fd)
        if not stat_module.S_ISREG(opened.st_mode):
            raise ConfigError("%s: is not a regular file; a config file is" % path)
        _check_config_owner(path, opened)
        if opened.st_size > _CONFIG_MAX_BYTES:
            raise ConfigError("%s: is %d bytes; a config file is at most %d"
                              % (path, opened.st_size, _CONFIG_MAX_BYTES))
        data = os.read(fd, _CONFIG_MAX_BYTES + 1)
    finally:
        os.close(fd)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("%s: is not UTF-8 text (byte %d)" % (path, exc.start)) from None
    import configparser
    # No interpolation: a "%" in a value is just a character.
    parser = configparser.ConfigParser(inline_comment_prefixes=(";", "#"), interpolation=None)
    try:
        parser.read_string(text, source=path)
    except configparser.Error as exc:
        raise ConfigError("%s: cannot be parsed: %s" % (path, exc)) from None
    if not parser.has_section(_CONFIG_SECTION):
        raise ConfigError("%s: has no [%s] section" % (path, _CONFIG_SECTION))
    config: dict[str, Any] = {"path": path}
    for name, raw in parser.items(_CONFIG_SECTION):
        value = raw.strip()
        if name == "default":
            if value:
                config["default"] = value
        elif name == "max_workers":
            try:
                number = int(value)
                if not 1 <= number <= _MAX_WORKERS_MAX:
                    raise ValueError
            except ValueError:
                raise ConfigError("%s: max_workers = %s is not allowed; use a positive whole "
                                  "number up to %d, e.g. max_workers = 8"
                                  % (path, value, _MAX_WORKERS_MAX)) from None
            config["max_workers"] = number
        elif name == "timeout":
            if value.lower() in ("", "none"):
                continue
            try:
                seconds = float(value)
                if not _TIMEOUT_MIN <= seconds:
                    raise ValueError
            except ValueError:
                raise ConfigError("%s: timeout = %s is not allowed; use a positive number of "
                                  "seconds (%g at least), or none (or inf) for no limit"
                                  % (path, value, _TIMEOUT_MIN)) from None
            config["timeout"] = _check_timeout(seconds)
        elif name == "dask_address":
            if value.lower() in ("", "none"):
                continue
            if "://" not in value and ":" not in value:
                raise ConfigError("%s: dask_address = %s is not a scheduler address; use "
                                  "one such as tcp://scheduler:8786" % (path, value))
            config["dask_address"] = value
        else:
            raise ConfigError("%s: unknown key %r in [%s]; allowed keys: default, "
                              "max_workers, timeout, dask_address" % (path, name, _CONFIG_SECTION))
    _state.config = (signature, config)
    return config


def _check_config_owner(path, opened):
    """Refuse a config file that someone but the caller (or root) may have written.

    Checked on the opened file, so a file swapped in after the check is
    never the one read.
    """
    if not hasattr(os, "geteuid"):
        return
    uid = os.geteuid()
    if opened.st_uid not in (uid, 0):
        raise ConfigError(
            "%s: is owned by %s, not by you (uid %d) or root, so it was not read: it would "
            "decide where your tasks and their data go; if the file is yours, "
            "chown it to you, else run from another directory or name a file of "
            "yours in %s" % (path, _user_name(opened.st_uid), uid, CONFIG_ENV))
    if opened.st_mode & 0o022:
        raise ConfigError(
            "%s: is writable by %s (mode %o), so it was not read: it would decide "
            "where your tasks and their data go; make it writable by you alone "
            "(chmod go-w %s)"
            % (path, "group and others" if opened.st_mode & 0o022 == 0o022
               else "group" if opened.st_mode & 0o020 else "others",
               opened.st_mode & 0o7777, path))


def _user_name(uid):
    try:
        import pwd
        return "uid %d (%s)" % (uid, pwd.getpwuid(uid).pw_name)
    except (ImportError, KeyError):
        return "uid %d" % uid


def _publish_config(force=False):
    # Where the library will read it: CONCURRENCY_CONFIG, else ./concurrency.ini.
    path = _config_path()
    shown = os.path.abspath(path)
    if os.path.islink(path):
        # Followed, it would write wherever the link points (a dangling one
        # too), while we say we wrote this file.
        sys.stderr.write("%s is a symbolic link; remove it first, nothing was written\n"
                         % shown)
        return 1
    if os.path.lexists(path) and not force:
        sys.stderr.write("%s already exists; use --force to overwrite it\n" % shown)
        return 1
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= os.O_TRUNC if force else os.O_EXCL
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        sys.stderr.write("%s cannot be written: %s; nothing was written\n"
                         % (shown, exc.strerror))
        return 1
    with open(fd, "w", encoding="utf-8") as file:
        file.write(_CONFIG_TEMPLATE)
    print("wrote %s" % shown)
    return 0


# -- Command line: python -m concurrency --------------------------------------

_USAGE = """\
usage: python -m concurrency config:publish [concurrency] [--force]
       python -m concurrency demo
       python -m concurrency --version | --help

  config:publish  write concurrency.ini (default driver, max_workers, timeout,
                  dask_address) where the library reads it: the file
                  CONCURRENCY_CONFIG names, else the current directory;
                  --force overwrites an existing one
  demo            count two tables of a small SQLite database with every driver
                  (dask: the configured cluster, else a local one)
"""

# The demo's queries each take this long, so the speed-up shows.
_DEMO_QUERY_SECONDS = 0.5


def _demo_count(path, table):
    """Count ``table`` in the SQLite file ``path`` with a deliberately slow query."""
    import sqlite3
    connection = sqlite3.connect(path)
    try:
        connection.create_function("pause", 1, time.sleep)
        row = connection.execute("SELECT (SELECT count(*) FROM %s), pause(?)" % table,
                                 (_DEMO_QUERY_SECONDS,)).fetchone()
        return row[0]
    finally:
        connection.close()


def _demo():
    import sqlite3
    import tempfile
    directory = tempfile.mkdtemp(prefix="concurrency-demo-")
    path = os.path.join(directory, "shop.sqlite3")
    connection = sqlite3.connect(path)
    with connection:
        connection.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        connection.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, user_id INTEGER)")
        connection.executemany("INSERT INTO users (name) VALUES (?)",
                               [("user%d" % i,) for i in range(120)])
        connection.executemany("INSERT INTO orders (user_id) VALUES (?)",
                               [(i % 120,) for i in range(345)])
    connection.close()
    print("database: %s (each count takes %.1f s)" % (path, _DEMO_QUERY_SECONDS))
    drivers = ["sync", "process"] + (["fork"] if _HAVE_FORK else []) + ["dask"]
    for name in drivers:
        started = time.perf_counter()
        try:
            # dask: the configured cluster, else a local one (its start is
            # in the time); one on other machines can't read our file.
            user_count, order_count = driver(name).run([
                lambda: _demo_count(path, "users"),
                lambda: _demo_count(path, "orders"),
            ])
        except Exception as exc:
            if name != "dask":
                raise
            print("%-8s not run: %s" % (name, str(exc).split("; install it")[0]))
            continue
        elapsed = time.perf_counter() - started
        print("%-8s users=%d orders=%d  %.2f s" % (name, user_count, order_count, elapsed))
    os.unlink(path)
    os.rmdir(directory)
    return 0


def _main(argv):
    command, options = (argv[0], argv[1:]) if argv else (None, [])
    if command in ("-h", "--help", "help"):
        sys.stdout.write(_USAGE)
        return 0
    if command in ("-V", "--version"):
        print("concurrency %s" % __version__)
        return 0
    if command == "config:publish":
        # "concurrency": the name the seed's `config:publish concurrency` gives.
        unknown = [option for option in options if option not in ("concurrency", "--force")]
        if not unknown:
            return _publish_config(force="--force" in options)
        sys.stderr.write("config:publish: unknown argument %r\n" % unknown[0])
    elif command == "demo" and not options:
        return _demo()
    elif command is not None:
        sys.stderr.write("unknown command %r\n" % " ".join(argv))
    sys.stderr.write(_USAGE)
    return 2


_registry = _Registry({"process": ProcessDriver, "fork": ForkDriver, "sync": SyncDriver,
                       "dask": DaskDriver})


if __name__ == "__main__":
    # Run the command from the importable module, so the demo's tasks refer
    # to it by name instead of this __main__ copy: by the name it was run
    # as (python -m myapp._vendor.concurrency), or, run as a file, by its
    # own, from its folder (sys.path[0]).
    import importlib
    _module = importlib.import_module(__spec__.name if __spec__ is not None else "concurrency")
    sys.exit(_module._main(sys.argv[1:]))
