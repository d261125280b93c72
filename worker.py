"""Child entrypoint of `concurrency`: run tasks serialized by the parent.

The parent starts it by path -- loaded under the private name
``_concurrency_worker`` so that its bytecode is cached (``python worker.py
MODE ...`` works too) -- never as ``import worker``.  It imports only the
standard library, and dill only for a payload or result that needs it; never
``concurrency``, so it works wherever the two files are copied.
``concurrency.py`` loads it the same way to reuse the outcome encoding below
in ``fork`` children, and ValuePickler (see "Pickling by value") for tasks.

Modes:

``serve TASK_FD RESULT_FD IDLE_TIMEOUT LEND_MIN CLAIM_FD``
    A warm worker of the ``process`` driver.  Frames arrive on TASK_FD and
    leave on RESULT_FD; stdout and stderr stay the parent's, so a task's
    ``print()`` shows up there and can never corrupt a result.  A task runs
    only once its claim is taken from CLAIM_FD (see below).  A thread
    watches TASK_FD hang up: the parent is gone (exited or was killed), and
    the worker exits at once, even mid-task, so no worker outlives its
    parent.  Unused for IDLE_TIMEOUT seconds, it exits too.  Buffers of at
    least LEND_MIN bytes in a result are lent (see below); 0 turns that off.

``defer fd:N`` or ``defer PAYLOAD_PATH``
    Detached deferred tasks: read the batch's payload from descriptor N (an
    anonymous file) or PAYLOAD_PATH (removed once read), run each task in a
    forked child, a bounded number at once, and report a failure, a crash
    or a timeout on stderr, since nobody waits for them.  Keys and the
    environment travel in the payload, never on the command line.

On a Dask worker (the ``dask`` driver uploads this file there as
``_concurrency_worker.py``), dask_task() is what each Dask task calls: it
runs a chunk of serialized tasks in a warm ``serve`` child of that Dask
worker, through concurrency.py (uploaded beside it), and returns their
outcome frames for the caller to decode.

Frames are one kind byte, an 8-byte big-endian length, then the body (see
"The wire" below, where each kind is named):

    parent -> worker   CONTEXT (C): a pickled TaskContext (cwd, environ,
                       sys.path, argv, recursion limit, logging levels)
                       TASK (T): a serialized callable, see loads_task()
                       BUFFER (B): a large buffer the run's tasks share:
                       its number (8 bytes), then its bytes; BUFFER_FILE
                       (M): the same in a file of the parent's: number,
                       descriptor, size (8 bytes each), then the file's
                       name; RUN_OVER (D, empty): the run is over, its
                       buffers go (with a claim of DROP_SHARED, read at
                       once); BUFFER_DONE (G): no task still to run names
                       that buffer number any more.  See SharedBuffers.
                       FETCHED (F) / SEND_INLINE (S): reply to a lent result
    worker -> parent   RESULT (R): encode_result()
                       ERROR (E): encode_error()
                       LEAVING (Q, empty): leaving after IDLE_TIMEOUT unused
                       UP (U, empty): ready to take claims, sent once
                       BUFFER_WANTED (N): a BUFFER_FILE frame's file could
                       not be read: the buffer's number; the parent sends a
                       BUFFER frame
                       LOG (L): a record a task logged, see encode_record()

Several TASK frames may wait in the pipe; they are run in order, and each
gets its RESULT or ERROR.  Each TASK frame comes with a claim: its number
among the TASK frames this worker was sent (from 0), 8 bytes big-endian, on
CLAIM_FD, a non-blocking pipe the parent can read too.  The worker takes
one claim before each task and runs the task of that number, skipping the
frames of lower numbers: the parent took their claims back, to run them
on another worker while this one was busy.  Whoever reads a claim owns
the task (a pipe read of 8 bytes is atomic), so a task never runs twice
nor waits behind a slow one while another worker is idle.

Large results are lent, not sent: a result's big buffers (bytes, bytearray,
arrays that pickle with protocol 5) stay where the task left them, the RESULT
body says where, and the parent copies them straight out of this process's
memory (Linux process_vm_readv): one copy instead of the four a pipe costs
(pickle, write, read, unpickle).  The worker keeps them and waits, its next
task unread, until the parent replies FETCHED, or SEND_INLINE when it could
not read them: then they follow through the pipe after all.
"""

import collections
import collections.abc
import os
import pickle
import select
import struct
import sys
import threading
import time
import types

TYPE_CHECKING = False  # typing.TYPE_CHECKING's meaning, without its import
if TYPE_CHECKING:
    import weakref


# -- The wire: frames between the parent and its children ---------------------
#
# Everything that crosses a pipe between concurrency.py and a child is a
# frame: one kind byte, an 8-byte big-endian body length, then the body
# (the table in this module's docstring says what each kind carries).
# FrameReader cuts frames out of a pipe, at both ends; write_frame() puts
# one in, whole or not at all.  Claims and fork task indices are CLAIM-sized
# numbers on pipes of their own.

FRAME_HEADER = struct.Struct(">cQ")
CLAIM = struct.Struct(">Q")  # a task's claim on CLAIM_FD (see serve), a fork index

# Kinds of frame.  Parent -> worker:
CONTEXT = b"C"
TASK = b"T"
BUFFER = b"B"
BUFFER_FILE = b"M"
BUFFER_DONE = b"G"
RUN_OVER = b"D"
FETCHED = b"F"      # the parent's replies to a lent result
SEND_INLINE = b"S"
# Worker (or fork child) -> parent:
RESULT = b"R"
ERROR = b"E"
LEAVING = b"Q"
UP = b"U"
BUFFER_WANTED = b"N"
LOG = b"L"
# Never on a pipe: a dask_task() outcome for a task whose child crashed or
# timed out.
LOST = b"X"

# The parent's replies to a fork child travel on its pipe of task indices,
# as indices no task has.
FORK_REPLIES = {FETCHED: (1 << 64) - 1, SEND_INLINE: (1 << 64) - 2}

# Frames up to this size are cut out of what was read at once; a larger
# body is read straight into a buffer of its own.
_READ_AHEAD = 1 << 18


class FrameReader:
    """Cuts the frames out of what a pipe delivers, at either end: the
    parent's non-blocking result pipes, a worker's blocking task pipe.  What
    the pipe holds is read at once -- a run sends tiny tasks many to a
    write -- and cut from the read buffer once per read."""

    def __init__(self, fd):
        self.fd = fd
        self.eof = False
        self._pending = bytearray()
        self._large = None  # (kind, body, bytes filled) of a large frame

    def read(self):
        """Read once: the frames that completed, in order ([] while none
        has, and at the end of the pipe, when ``eof`` is set).  Raises
        BlockingIOError on a non-blocking pipe with nothing to read."""
        frames = []
        if self._large is not None:
            kind, body, filled = self._large
            n = os.readv(self.fd, [memoryview(body)[filled:]])
            if n == 0:
                self.eof = True
            elif filled + n == len(body):
                frames.append((kind, body))
                self._large = None
            else:
                self._large = (kind, body, filled + n)
            return frames
        chunk = os.read(self.fd, _READ_AHEAD)
        if not chunk:
            self.eof = True
            return frames
        pending = self._pending
        pending += chunk
        header = FRAME_HEADER.size
        end = len(pending)
        start = 0  # of the first frame not taken
        with memoryview(pending) as view:
            while end - start >= header:
                kind, size = FRAME_HEADER.unpack_from(pending, start)
                if end - start - header >= size:
                    frames.append((kind, bytes(view[start + header:start + header + size])))
                    start += header + size
                elif size > _READ_AHEAD:
                    body = bytearray(size)
                    have = end - start - header
                    body[:have] = view[start + header:]
                    start = end
                    self._large = (kind, body, have)
                    break
                else:
                    break
        del pending[:start]
        return frames


def write_frame(fd, kind, parts=()):
    """Write one frame, its body made of ``parts``, whole or not at all.

    A task's signal handler may raise at any moment (an alarm around a step
    that logs): raised between two writes of one frame, it would leave half
    a frame in the pipe, and the parent would read what follows as a header.
    A frame the pipe takes in one write (PIPE_BUF) is written whole or, the
    handler raising while the write waits, not at all.  A larger one is
    written by a thread of its own -- handlers run in the main thread only
    -- and the handler's exception is raised once the frame is whole.
    """
    size = sum(len(part) for part in parts)
    header = FRAME_HEADER.pack(kind, size)
    if size + FRAME_HEADER.size <= _ATOMIC_WRITE:
        data = header + b"".join(parts)
        written = os.write(fd, data)
        if written != len(data):  # not a pipe, or not blocking: finish it
            _write_all(fd, [memoryview(data)[written:]])
        return
    if size < 65536:
        parts = [header + b"".join(parts)]
    else:  # no copy of a large body just to prepend a header
        parts = [header] + list(parts)
    if threading.current_thread() is not threading.main_thread():
        _write_all(fd, parts)
        return
    _write_uninterrupted(fd, parts)


# A write of at most this many bytes to a pipe is never split.
_ATOMIC_WRITE = getattr(select, "PIPE_BUF", 512)


def _write_all(fd, parts):
    for part in parts:
        view = memoryview(part)
        while view:
            view = view[os.write(fd, view):]


def _write_uninterrupted(fd, parts):
    """_write_all() in a thread no signal handler runs in; an exception a
    handler raises meanwhile is raised once every byte is written."""
    import _thread
    done = _thread.allocate_lock()
    done.acquire()
    failed, finished = [], []

    def write():
        try:
            _write_all(fd, parts)
        except BaseException as exc:
            failed.append(exc)
        finally:
            finished.append(True)  # before the release: see below
            done.release()

    raised = None
    try:
        _thread.start_new_thread(write, ())
    except RuntimeError as exc:
        if "start new thread" in str(exc):
            raise  # not started: nothing written
        raised = exc
    except BaseException as exc:  # a handler's, raised once it had started
        raised = exc
    # A handler may raise as acquire() returns, the lock taken: so the
    # flag, not the lock, says when the frame is written.
    while not finished:
        try:
            done.acquire()
        except BaseException as exc:  # a signal handler's: after the frame
            raised = raised or exc
    if failed:
        raise failed[0]
    if raised is not None:
        raise raised


# Outcome bodies start with one of these to say how the rest was pickled:
# the C pickle is much faster than dill, so dill only serves what pickle can't.
PICKLED = b"p"
DILLED = b"d"
LENT = b"l"     # pickle protocol 5, its out-of-band buffers left in place
INLINE = b"i"   # the same, the buffers following the pickle

# A lent body after its flag: the count of buffers, the pickle's size, one
# descriptor per buffer, the pickle (and, inline, the buffers themselves).
LENT_HEADER = struct.Struct(">QQ")
LENT_BUFFER = struct.Struct(">QQ?")  # address, size, read-only
LEND_MIN = 1 << 20  # smaller buffers go through the pipe: it is fast enough


# Kinds of error reported in an b"E" frame; the parent maps them to its errors.
TASK_FAILED = "task"              # the task raised
TASK_UNLOADABLE = "task-load"     # the payload could not be unserialized here
RESULT_UNSERIALIZABLE = "result"  # the task's return value could not be pickled


# -- Outcome encoding (shared with the fork driver) ---------------------------

def dumps_value(value):
    """Pickle ``value`` with the C pickle, by value what pickle would look
    up by name and not find (ValuePickler), or with dill when neither can.

    Returns the parts of the body: the flag, then the pickle, kept apart so
    a large pickle is never copied just to prepend one byte.
    """
    try:
        return [PICKLED, pickle.dumps(value, pickle.HIGHEST_PROTOCOL)]
    except Exception:
        pass  # a class or function pickle can't find by name, or a lock...
    import io
    buffer = io.BytesIO()
    try:
        ValuePickler(buffer).dump(value)
        return [PICKLED, buffer.getvalue()]
    except Unshippable:
        raise
    except Exception:
        pass
    buffer = io.BytesIO()
    dill_value_pickler_class()(buffer).dump(value)
    return [DILLED, buffer.getvalue()]


def encode_result(value, lend_min=0):
    """Return the outcome ``(kind, parts, lent)`` for a task's return value.

    ``lent`` is None, or the views of the buffers the body lends, to be kept
    until the parent has copied them; see deliver().
    """
    try:
        if type(value) in _PLAIN_VALUES:  # nothing to lend nor to send by value
            return RESULT, [PICKLED, pickle.dumps(value, pickle.HIGHEST_PROTOCOL)], None
        if lend_min:
            lending = dumps_lending(value, lend_min)
            if lending is not None:
                return lending
        return RESULT, dumps_value(value), None
    except BaseException as exc:
        if type(value) is ChunkOutcome:  # one item's value fails that item alone
            return encode_result(value.isolated(), lend_min)
        return ERROR, [encode_error(exc, RESULT_UNSERIALIZABLE)], None


# Results of these types pickle as they are, and fast: most tiny tasks'.
_PLAIN_VALUES = frozenset([int, float, bool, type(None), str, complex])


def dumps_lending(value, lend_min):
    """Pickle ``value`` lending its buffers of ``lend_min`` bytes or more:
    the outcome for encode_result(), or None when it has none to lend."""
    lent = []

    def lend(buffer):
        try:
            view = buffer.raw()
        except BufferError:  # not contiguous: pickle copies it in-band
            return True
        if view.nbytes < lend_min:
            return True
        address = _address_of(view)
        if address is None:
            return True
        lent.append((address, view))
        return False  # out of band: only its descriptor goes in the body

    exposed, replaced = _expose_buffers(value, lend_min)
    try:
        if not replaced:
            data = pickle.dumps(exposed, 5, buffer_callback=lend)
        else:
            import io
            buffer = io.BytesIO()
            pickler = pickle.Pickler(buffer, 5, buffer_callback=lend)
            pickler.dump(exposed)
            # A replaced object reached another way too (a buffer also
            # deeper down, a list that contains itself) would come back as
            # two objects: pickle alone keeps it one.
            memo = pickler.memo.copy()
            if any(id(obj) in memo for obj in replaced):
                return None
            data = buffer.getvalue()
    except Exception:
        return None  # dumps_value() says what is wrong, or uses dill
    if not lent:
        return RESULT, [PICKLED, data], None
    descriptors = b"".join(LENT_BUFFER.pack(address, view.nbytes, view.readonly)
                           for address, view in lent)
    header = LENT_HEADER.pack(len(lent), len(data)) + descriptors
    return RESULT, [LENT, header, data], [view for _address, view in lent]


def _expose_buffers(value, lend_min):
    """Wrap large bytes and bytearrays in PickleBuffers, which pickle hands to
    its buffer_callback.  It never does that for bytes itself.  Only the top
    level and the items of a small list, tuple or dict are looked at: deeper
    search would need a hook called for every object, slowing every result.

    Returns what to pickle and the objects it replaced (wrapped buffers, a
    copied container), which the pickle must not meet again elsewhere."""
    wrapped = {}
    replaced = []

    def wrap(item):
        if (type(item) is bytes or type(item) is bytearray) and len(item) >= lend_min:
            if id(item) not in wrapped:  # the same object twice stays one
                wrapped[id(item)] = pickle.PickleBuffer(item)
                replaced.append(item)
            return wrapped[id(item)]
        return item

    kind = type(value)
    if kind is bytes or kind is bytearray:
        return wrap(value), replaced
    if (kind is list or kind is tuple) and len(value) <= 64:
        items = [wrap(item) for item in value]
        if not wrapped:
            return value, replaced
        return kind(items), replaced + [value]
    if kind is dict and len(value) <= 64:
        items = {key: wrap(item) for key, item in value.items()}
        if not wrapped:
            return value, replaced
        return items, replaced + [value]
    return value, replaced


def _address_of(view):
    """Where the buffer lies in our memory, or None when we can't tell."""
    import ctypes
    if not view.readonly:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    if type(view.obj) is bytes and view.nbytes == len(view.obj):
        # A c_char_p made from bytes points at the bytes' own storage.
        return ctypes.cast(ctypes.c_char_p(view.obj), ctypes.c_void_p).value
    return None


def deliver(outcome, write, await_reply):
    """Send an outcome with ``write(kind, parts)``.  A lent result's buffers
    are kept until ``await_reply()`` returns the parent's reply; on
    SEND_INLINE they follow through the pipe."""
    kind, parts, lent = outcome
    write(kind, parts)
    if lent is not None and await_reply() == SEND_INLINE:
        write(kind, [INLINE] + parts[1:] + lent)


def loads_value(body, lent=None):
    """The value of an outcome body (see dumps_value and dumps_lending);
    ``lent`` holds the buffers of a LENT body, copied out of the child."""
    view = memoryview(body)
    flag = view[:1]
    if flag == PICKLED:
        return pickle.loads(view[1:])
    if flag == LENT or flag == INLINE:
        size, descriptors, start = lent_layout(view)
        data = view[start:start + size]
        if flag == INLINE:
            lent, offset, made = [], start + size, {}
            for descriptor in descriptors:
                _address, length, readonly = descriptor
                if descriptor not in made:  # one buffer lent twice is one object
                    part = view[offset:offset + length]
                    made[descriptor] = bytes(part) if readonly else bytearray(part)
                lent.append(made[descriptor])
                offset += length
        return pickle.loads(data, buffers=lent)
    import dill  # type: ignore
    return dill.loads(bytes(view[1:]))


def lent_layout(view):
    """(pickle size, buffer descriptors, where the pickle starts) of a lent body."""
    count, size = LENT_HEADER.unpack_from(view, 1)
    offset = 1 + LENT_HEADER.size
    descriptors = []
    for _ in range(count):
        descriptors.append(LENT_BUFFER.unpack_from(view, offset))
        offset += LENT_BUFFER.size
    return size, descriptors, offset


def encode_error(exc, kind=TASK_FAILED, skip_frames=0):
    """Return the body of an error frame for ``exc``.

    The exception travels three ways at once, so the parent can rebuild the
    best one it can: pickled whole; as (class, args, __dict__) for classes
    whose ``__init__`` does not accept ``*args`` (unpickling calls it); and as
    plain text -- type name, message, formatted traceback -- that always works.
    """
    tb = exc.__traceback__
    for _ in range(skip_frames):
        if tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
    cls = type(exc)
    info = {
        "kind": kind,
        "type": "%s.%s" % (getattr(cls, "__module__", "?"), getattr(cls, "__qualname__", "?")),
        "message": _safe_str(exc),
        "traceback": _safe_format(cls, exc, tb),
        "exc": _try_dumps(lambda: exc),
        "parts": _try_dumps(lambda: (cls, exc.args, dict(getattr(exc, "__dict__", {})))),
    }
    return pickle.dumps(info, pickle.HIGHEST_PROTOCOL)


def rebuild_exception(info):
    """The exception of an error body (see encode_error) as its own class,
    or None when only its text could travel."""
    if info["exc"] is not None:
        try:
            exc = loads_value(info["exc"])
            if isinstance(exc, BaseException):
                return exc
        except Exception:
            if succeeds(loads_value, info["exc"]):
                raise  # a signal handler's exception: the caller's
    if info["parts"] is not None:
        # Unpickling an exception calls cls(*args), which fails for an
        # __init__ taking other arguments: rebuild it without calling it.
        try:
            cls, args, state = loads_value(info["parts"])
            exc = BaseException.__new__(cls)
            exc.args = args
            if state:
                exc.__dict__.update(state)
            return exc
        except Exception:
            if succeeds(loads_value, info["parts"]):
                raise  # a signal handler's exception: the caller's
    return None


def succeeds(function, *args):
    """Whether ``function(*args)`` succeeds on a second try.  Unpickling that
    failed once, and works now, was cut short by a signal handler that
    raised (an alarm, a framework's soft time limit): that exception is the
    caller's to get, never to be mistaken for a value that can't travel."""
    try:
        function(*args)
    except Exception:
        return False
    return True


def _try_dumps(make):
    """The pickle of what ``make()`` returns, or None: an exception whose
    args, __dict__ or pickling raises still travels as text."""
    try:
        return b"".join(dumps_value(make()))
    except BaseException:
        return None


def _safe_str(exc):
    try:
        return str(exc)
    except BaseException:
        return "<str() of the exception failed>"


def _safe_format(cls, exc, tb):
    try:
        import traceback  # only on errors: it costs a worker ~8 ms to import
        return "".join(traceback.format_exception(cls, exc, tb))
    except BaseException:
        return "%s: %s\n" % (cls.__qualname__, _safe_str(exc))


def call(fn):
    """Call a task; a coroutine it returns is run to completion."""
    value = fn()
    if type(value) not in _PLAIN_VALUES and isinstance(value, collections.abc.Coroutine):
        value = await_coroutine(value)
    return value


def await_coroutine(coroutine):
    import asyncio
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    # Called from inside a running loop (the sync driver in an async handler):
    # asyncio.run refuses to nest, so the coroutine gets a loop of its own.
    outcome = []

    def run_in_thread():
        try:
            outcome.append((True, asyncio.run(coroutine)))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=run_in_thread, name="concurrency-await")
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if ok:
        return value
    raise value


def run_task(fn, lend_min=0):
    """Call ``fn`` and return its outcome ``(kind, parts, lent)``, see
    encode_result().

    Processes the task started and left running are ended first: a task owns
    its children, and none may outlive it.
    """
    try:
        value = call(fn)
    except BaseException as exc:
        _leave_if_stray(exc)
        # Skip this frame: the user's traceback starts in their own code.
        return ERROR, [encode_error(exc, TASK_FAILED, skip_frames=1)], None
    finally:
        _leave_if_stray()
        flush_std_streams()
        end_task_children()
    return encode_result(value, lend_min)


# -- Map chunks: one function over many items ----------------------------------
#
# concurrency.map() cuts its input into chunks, each a task of its own: a
# MapChunk, which calls the map's function on each of its items and returns
# a ChunkOutcome -- the values, and each failed item's position and error
# frame body -- so that an item's exception fills its own slot and the
# chunk's other items keep theirs.  The function is the chunk's own (fork:
# inherited; dask: sent with each chunk), or, in a worker, the one the run's
# context carries (sent once per worker: TaskContext.map_function).

RUNNING_CONTEXT: list = [None]  # in a worker: the context of the task running
_map_function = [None, None]  # (payload, function): the last one loaded here


class _Skipped:
    """Stands for an item that could not be serialized: it failed in the
    parent already, and is not called."""

    def __reduce__(self):
        return "SKIPPED"


SKIPPED = _Skipped()


class ChunkOutcome(tuple):
    """(values, failures, seconds) of a chunk: ``failures`` lists (position,
    error frame body, or None for a SKIPPED item); ``seconds`` the time its
    items took, from which the parent sizes the chunks to come."""

    __slots__ = ()

    def __reduce__(self):
        return tuple, (tuple(self),)

    def isolated(self):
        """The same, with each value that can't be pickled turned into a
        failure of its own: the other items keep their values."""
        values, failures, seconds = self
        values = list(values)
        failures = list(failures)
        failed = {position for position, _body in failures}
        for position, value in enumerate(values):
            if position in failed:
                continue
            try:
                dumps_value(value)
            except BaseException as exc:
                values[position] = None
                failures.append((position, encode_error(exc, RESULT_UNSERIALIZABLE)))
        return ChunkOutcome((values, failures, seconds))


class MapChunk:
    """A chunk of a map's items, as a task: calls the function on each."""

    __slots__ = ("items", "function")

    def __init__(self, items, function=None):
        self.items = items
        self.function = function

    def __reduce__(self):
        return MapChunk, (self.items, self.function)

    def __call__(self):
        function = self.function
        if function is None:  # a worker's: the run's context carries it
            payload = RUNNING_CONTEXT[0].map_function
            if _map_function[0] is not payload:
                _map_function[:] = [None, None]
                _map_function[:] = [payload, loads_task(payload)]
            function = _map_function[1]
        return map_items(function, self.items)


def map_items(function, items):
    """Call ``function`` on each item: a ChunkOutcome."""
    values = []
    failures = []
    append = values.append
    started = time.perf_counter()
    for position, item in enumerate(items):
        if item is SKIPPED:
            append(None)
            failures.append((position, None))
            continue
        try:
            value = function(item)
            if type(value) not in _PLAIN_VALUES and isinstance(value, collections.abc.Coroutine):
                value = await_coroutine(value)
        except BaseException as exc:
            _leave_if_stray(exc)  # a process the item forked: not the next item's
            # The user's traceback starts in their own code.
            append(None)
            failures.append((position, encode_error(exc, TASK_FAILED, skip_frames=1)))
            continue
        if FORKED_BY_TASK[0]:
            _leave_if_stray()
        append(value)
    return ChunkOutcome((values, failures, time.perf_counter() - started))


# True in any process forked from this one (an at-fork hook sets it; the
# fork driver clears it in the children it forks to run tasks): a process
# the task forked, not the one that runs tasks.  No system call per task.
FORKED_BY_TASK = [False]


def _forked():
    FORKED_BY_TASK[0] = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


def _leave_if_stray(exc=None):
    """A process the task forked that returned (or raised) into our code
    instead of calling os._exit(): it must never speak on the run's pipes
    nor take tasks meant for its parent.  It ends here, as a script's
    process ends at its last line."""
    if not FORKED_BY_TASK[0]:
        return
    code = 0
    if exc is not None and not (isinstance(exc, SystemExit) and not exc.code):
        code = exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else 1
        if not isinstance(exc, SystemExit):
            try:
                sys.stderr.write(_safe_format(type(exc), exc, exc.__traceback__))
            except BaseException:
                pass
    flush_std_streams()
    os._exit(code)


def flush_std_streams():
    # Output the task printed must reach the terminal before its result does.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass


# -- Pickling by value --------------------------------------------------------
#
# pickle finds functions and classes by name.  In another process the
# caller's __main__ is not there (a worker runs no script), and a lambda, a
# local class or one made with type() has no name to be found by at all.
# ValuePickler sends those by value -- their code, globals, closure, class
# dictionary -- and rebuilds them here with the make_* functions below;
# everything else goes as pickle sends it.  The same pickler serves both
# directions: tasks to a worker (concurrency.py) and values and exceptions
# back (dumps_value).
#
# Rules it keeps, so that a task sees what it would have seen in the caller:
# - Everything one pickle reaches keeps its identity: an object reached twice
#   is one object, and functions of one module share one globals dict, as
#   they share the module's in the caller.
# - A class sent by value carries a random tracker id.  A process that gets
#   a class by an id it already knows uses the class it has (see make_class),
#   so a value of a class the caller sent comes back as the caller's very
#   class, and two classes that merely share a name never mix.
# - What can't be rebuilt faithfully is refused (Unshippable) rather than
#   rebuilt wrong: a file open for writing (dill would truncate it), a closed
#   file.  Locks come back new and unlocked: a copy of a held lock could
#   never be released in the child.

class Unshippable(pickle.PicklingError):
    """An object that can't be rebuilt faithfully in another process; the
    message says what it is and what to do instead."""


_OWN_GLOBALS = globals()  # this module's functions pickle by name, always
_GLOBAL_OPS: dict = {}      # opcode -> shift of its argument into co_names
_global_names_cache: dict = {}

# Made on first use, by _trackers(): typed as made, for type checkers.
# class or TypeVar -> its tracker id (weak keys)
_tracker_ids: "weakref.WeakKeyDictionary" = None  # type: ignore[assignment]
# tracker id -> class or TypeVar (weak values)
_tracked: "weakref.WeakValueDictionary" = None  # type: ignore[assignment]
# classes made by make_class, their state not set yet
_fresh_classes: "weakref.WeakSet" = None  # type: ignore[assignment]
# class made here -> its number (see MADE below)
_made_at: "weakref.WeakKeyDictionary" = None  # type: ignore[assignment]
ADOPT_INTO_MAIN = [False]  # a worker puts the caller's top-level classes in __main__
FORKED_FROM = [None]  # in a fork driver's child: the parent's pid


def _trackers():
    global _tracker_ids, _tracked, _fresh_classes, _made_at
    if _tracked is None:
        import weakref
        _tracker_ids = weakref.WeakKeyDictionary()
        _tracked = weakref.WeakValueDictionary()
        _fresh_classes = weakref.WeakSet()
        _made_at = weakref.WeakKeyDictionary()
    return _tracker_ids, _tracked


def tracker_id(obj):
    """The id under which ``obj`` (a class or TypeVar) travels by value."""
    ids, tracked = _trackers()
    try:
        found = ids.get(obj)
        if found is None:
            if FORKED_FROM[0] is not None:
                # A fork child shares the parent's addresses for what existed
                # before the fork: the parent finds its own class by this id.
                found = "fork:%d:%d" % (FORKED_FROM[0], id(obj))
            else:
                found = os.urandom(12).hex()
            ids[obj] = found
            tracked[found] = obj
        return found
    except TypeError:  # unhashable (a metaclass with __eq__): untracked
        return None


def forget_tracked_classes():
    """A worker's next task gets classes of its own, not an earlier task's
    (which it may have changed); what it returns still goes back by id."""
    if _tracked is not None:
        _tracked.clear()


def _track(tracker, obj):
    """The object already known under ``tracker``, else ``obj``, now known."""
    if tracker is None:
        return obj
    _ids, tracked = _trackers()
    found = tracked.get(tracker)
    if found is None and tracker.startswith("fork:%d:" % os.getpid()):
        found = _class_at(int(tracker.rsplit(":", 1)[1]), obj)
    if found is not None:
        return found
    tracked[tracker] = obj
    try:
        _tracker_ids[obj] = tracker
    except TypeError:
        pass
    return obj


def _class_at(address, like):
    """Our class (or TypeVar) at ``address`` that a fork child sent back,
    if it is still there and has the same names; else None."""
    import gc
    forked_at = RESOLVING_FORKED_AT[0]
    for candidate in gc.get_objects():
        if id(candidate) == address:
            if forked_at is not None and _made_at is not None \
                    and _made_at.get(candidate, 0) > forked_at:
                return None  # made after the fork: not what the child meant
            if (type(candidate) is type(like)
                    and getattr(candidate, "__qualname__", None) == getattr(like, "__qualname__", None)
                    and getattr(candidate, "__module__", None) == getattr(like, "__module__", None)):
                return candidate
            return None
    return None


def found_by_name(obj, name=None):
    """Whether pickle's lookup by module and qualified name finds ``obj``
    itself: a module the other side can import, never __main__."""
    module_name = getattr(obj, "__module__", None)
    if not module_name or module_name == "__main__":
        return False
    module = sys.modules.get(module_name)
    if module is None:
        return False
    found = module
    for part in (name or getattr(obj, "__qualname__", "") or "").split("."):
        found = getattr(found, part, None)
        if found is None:
            return False
    return found is obj


def global_names(code):
    """Names that ``code`` (and code nested in it) reads, writes or deletes
    as globals: only those travel with a function."""
    names = _global_names_cache.get(code)
    if names is not None:
        return names
    if not _GLOBAL_OPS:
        import opcode
        for op_name, shift in (("LOAD_GLOBAL", 1 if sys.version_info >= (3, 11) else 0),
                               ("STORE_GLOBAL", 0), ("DELETE_GLOBAL", 0),
                               ("LOAD_FROM_DICT_OR_GLOBALS", 0)):
            if op_name in opcode.opmap:
                _GLOBAL_OPS[opcode.opmap[op_name]] = shift
        _GLOBAL_OPS[-1] = opcode.opmap["EXTENDED_ARG"]
    extended_arg = _GLOBAL_OPS[-1]
    found = {}
    raw, co_names, extended = code.co_code, code.co_names, 0
    for i in range(0, len(raw), 2):
        op, arg = raw[i], raw[i + 1] | extended
        if op == extended_arg:
            extended = arg << 8
            continue
        extended = 0
        shift = _GLOBAL_OPS.get(op)
        if shift is not None:
            found[co_names[arg >> shift]] = None
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            found.update(dict.fromkeys(global_names(const)))
    names = tuple(found)
    if len(_global_names_cache) > 4096:
        _global_names_cache.clear()
    _global_names_cache[code] = names
    return names


_plain_states: dict = {}


def _plain_function_state(code, name, module):
    """The state (as reduce_function tells it) of a function that
    FunctionType(code, globals, name) makes, with nothing set on it since."""
    key = (code, name, module)
    state = _plain_states.get(key)
    if state is None:
        closure = tuple(types.CellType() for _ in code.co_freevars) or None
        made = types.FunctionType(code, {"__name__": module}, name, None, closure)
        state = (made.__qualname__, made.__module__, made.__doc__, None, None, None, None)
        if len(_plain_states) > 4096:
            _plain_states.clear()
        _plain_states[key] = state
    return state


def _submodules(code, values):
    """Imported submodules a function reaches as attributes of a package it
    uses (``xml.etree.ElementTree``): they must be imported on the other
    side too, or the attribute is missing there."""
    found = []
    names = None
    for value in values:
        if type(value) is types.ModuleType and getattr(value, "__package__", None):
            if names is None:
                names, todo = set(), [code]
                while todo:  # the attribute names of code nested at any depth too
                    nested = todo.pop()
                    names.update(nested.co_names)
                    todo.extend(const for const in nested.co_consts
                                if isinstance(const, types.CodeType))
            prefix = value.__name__ + "."
            for name in list(sys.modules):
                if isinstance(name, str) and name.startswith(prefix) \
                        and not set(name[len(prefix):].split(".")) - names:
                    found.append(sys.modules[name])
    return found


# Types pickle handles itself, and reducer_override leaves to it.
_PICKLED_AS_IS = frozenset([tuple, list, dict, set, frozenset, bytearray, complex])


class _ByValue:
    """reducer_override for ValuePickler and its dill counterpart."""

    def init_by_value(self):
        # id(a module's globals) -> (the dict sent in their place, the globals)
        self.globals_ref = {}
        # (id(globals), code) whose used globals that dict holds already
        self.filled = set()

    def reset(self):
        """Before the next dump(): a new object graph of its own."""
        self.clear_memo()  # type: ignore[attr-defined]  # a mixin of pickle.Pickler
        self.globals_ref.clear()
        self.filled.clear()

    def reducer_override(self, obj):
        kind = type(obj)
        if kind is types.FunctionType:
            return self.reduce_function(obj)
        if kind in _PICKLED_AS_IS:  # asked for every one: the common case first
            return NotImplemented
        if isinstance(obj, type):
            return _reduce_class(obj)
        reducer = _reducers().get(kind)
        if reducer is not None:
            return reducer(obj)
        # Subclasses without a reduction of their own (abc.abstractproperty,
        # abstractclassmethod): pickle can't send those either.
        if isinstance(obj, (classmethod, staticmethod)) and "__reduce__" not in vars(kind):
            return _reduce_wrapped_method(obj)
        if isinstance(obj, property) and "__reduce__" not in vars(kind):
            return _reduce_property(obj)
        return NotImplemented

    def base_globals(self, fn):
        """The one dict that stands for ``fn``'s module globals in this pickle."""
        entry = self.globals_ref.get(id(fn.__globals__))
        if entry is None:
            namespace = fn.__globals__
            # What relative imports and __name__ need, and no more.
            base = {name: namespace[name] for name in
                    ("__name__", "__package__", "__path__", "__file__") if name in namespace}
            entry = self.globals_ref[id(fn.__globals__)] = (base, namespace)
        return entry[0]

    def prefill(self, fn):
        """Put the globals ``fn`` uses into its module's dict before it is
        pickled (a template shared by tasks of one code, see concurrency)."""
        base = self.base_globals(fn)
        namespace = fn.__globals__
        base.update((name, namespace[name]) for name in global_names(fn.__code__)
                    if name in namespace)
        self.filled.add((id(namespace), fn.__code__))
        return base, _submodules(fn.__code__, list(base.values()))

    def reduce_function(self, fn):
        if fn.__globals__ is _OWN_GLOBALS or found_by_name(fn):
            return NotImplemented
        if fn.__code__ is _singledispatch_code() and hasattr(fn, "registry"):
            return _reduce_singledispatch(fn)
        code = fn.__code__
        base = self.base_globals(fn)
        namespace = fn.__globals__
        if (id(namespace), code) in self.filled:
            used = submodules = None
        else:
            used = {name: namespace[name] for name in global_names(code) if name in namespace}
            values = list(used.values())
            if fn.__closure__:
                for cell in fn.__closure__:
                    try:
                        values.append(cell.cell_contents)
                    except ValueError:
                        pass
            submodules = _submodules(code, values) or None
        state = (fn.__dict__ or None, fn.__qualname__, fn.__module__, fn.__doc__,
                 fn.__annotations__ or None, fn.__kwdefaults__, used, submodules)
        if state[1:] == _plain_function_state(code, fn.__name__, base.get("__name__")) \
                and not state[0]:
            state = None  # what make_function gives: no setstate to run
        return (make_function, (code, base, fn.__name__, fn.__defaults__, fn.__closure__),
                state, None, None, function_setstate)


class ValuePickler(_ByValue, pickle.Pickler):
    """The C pickler, sending by value what can't be found by name."""

    def __init__(self, file, protocol=pickle.HIGHEST_PROTOCOL, **kwargs):
        super().__init__(file, protocol, **kwargs)
        self.init_by_value()


def dill_value_pickler_class():
    """dill's pickler with the same rules on top: for objects that neither
    pickle nor ValuePickler can send.  Needs dill."""
    if "dill" not in _loaders:
        import dill  # type: ignore

        class DillValuePickler(_ByValue, dill.Pickler):
            def __init__(self, file, protocol=pickle.HIGHEST_PROTOCOL):
                dill.Pickler.__init__(self, file, protocol, recurse=True)
                self.init_by_value()

        _loaders["dill"] = DillValuePickler
    return _loaders["dill"]


_loaders: dict = {}


# Large buffers a run's tasks capture travel once per worker per run, not
# once per task: pickled, a task names each by its number (shared_buffer),
# and the parent sends it ahead of the first task of that worker that names
# it.  On Linux, in a b"M" frame: the parent wrote it once, for every
# worker, into an anonymous file, which the worker reads through /proc (one
# copy each, and all at once).  Elsewhere, or where that is not allowed, in
# a b"B" frame: its bytes through the pipe, written straight from the object.
SHARE_MIN = 1 << 20
SHARED_HEADER = struct.Struct(">Q")  # a b"B" frame's body: number, then the bytes
SHARED_FILE = struct.Struct(">QQQ")  # a b"M" frame's: number, fd, size; then its name
# The claim the parent sends after a run's b"D" frame: the worker, idle,
# reads up to that frame and lets the run's buffers go at once.
DROP_SHARED = (1 << 64) - 3


class SharedBuffers:
    """The parent's side: the large buffers of one run's tasks, numbered,
    and which tasks name which."""

    def __init__(self):
        self.buffers = {}  # number -> the bytes, bytearray or flat memoryview
        self.owners = {}  # number -> the object it is the data of (kept alive: its id is its key)
        self.numbers = {}  # id(owner) -> number
        self.named = set()  # numbers named by the pickle being made
        self.made = 0  # numbers given: never one twice in a run

    def number(self, owner, data=None):
        """The number of ``owner``'s data: the object itself, a bytes or
        bytearray, or ``data``, a flat view of what owner exports."""
        number = self.numbers.get(id(owner))
        if number is None:
            number = self.numbers[id(owner)] = self.made
            self.made += 1
            self.buffers[number] = owner if data is None else data
            self.owners[number] = owner
        self.named.add(number)
        return number

    def forget(self, number):
        """No task still to run names it: a task serialized later that
        captures the same object names it anew, by another number."""
        self.buffers.pop(number, None)
        owner = self.owners.pop(number, None)
        if owner is not None:
            self.numbers.pop(id(owner), None)


class SharingValuePickler(ValuePickler):
    """ValuePickler that names the large buffers it meets by their number in
    ``shared`` (a SharedBuffers) instead of pickling them: bytes, bytearrays
    and the pickle buffers of an object's data (a NumPy array's).  A
    persistent ID, not a reduction: the C pickler writes bytes without
    asking reducer_override; it asks persistent_id first, for every object,
    which is why only runs that capture large buffers use this one."""

    def __init__(self, file, shared):
        super().__init__(file)
        self.shared = shared

    def persistent_id(self, obj):
        kind = type(obj)
        if (kind is bytes or kind is bytearray) and len(obj) >= SHARE_MIN:
            return self.shared.number(obj), kind is bytearray
        if kind is pickle.PickleBuffer:
            # Its data comes back as pickle makes it in-band: bytes where the
            # buffer is read-only, else a bytearray -- the task's own, as for
            # a bytearray.  Numbered by the object it is the data of: the
            # same array reached by many tasks is one buffer.
            try:
                data = obj.raw()
            except BufferError:  # not contiguous: pickled as it is
                return None
            if data.nbytes >= SHARE_MIN:
                return self.shared.number(memoryview(obj).obj, data), not data.readonly
        return None


class _SharingUnpickler(pickle.Unpickler):
    """Unpickles what SharingValuePickler made.  A bytearray a task reaches
    twice is one object of its own (pickle does not memoize persistent
    IDs: each reference asks again)."""

    def __init__(self, file):
        super().__init__(file)
        self.copies = {}  # number -> this task's bytearray

    def persistent_load(self, pid):
        number, mutable = pid
        if not mutable:
            return shared_buffer(number, False)
        copy = self.copies.get(number)
        if copy is None:
            copy = self.copies[number] = shared_buffer(number, True)
        return copy


_shared: dict = {}  # in a worker: number -> the bytes of a b"B" frame of this run


def open_process_file(pid, fd, name):
    """A descriptor of our own on the anonymous file ``name`` (a memfd's)
    that process ``pid`` has open as ``fd``; OSError where it can't be had
    (not ours to read, not there, or by now another file under that
    number).  Looked at by name before it is opened -- opening whatever
    file that number is now could have effects -- and after, as the
    number may have changed hands in between."""
    link = "/memfd:%s (deleted)" % name
    path = "/proc/%d/fd/%d" % (pid, fd)
    if os.readlink(path) != link:
        raise FileNotFoundError("process %d has no file %s open as %d" % (pid, name, fd))
    own = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        if os.readlink("/proc/self/fd/%d" % own) != link:
            raise FileNotFoundError("process %d has no file %s open as %d" % (pid, name, fd))
    except BaseException:
        os.close(own)
        raise
    return own


def _read_parent_file(fd, size, name):
    """The bytes of the parent's anonymous file ``fd`` (a b"M" frame), or
    None if it can't be read.  Only the file of that very name: by the time
    a frame of tasks taken back from us is read, its descriptor may be
    closed, and its number another file's."""
    try:
        own = open_process_file(os.getppid(), fd, name.decode())
    except (OSError, UnicodeDecodeError):
        return None
    try:
        parts, got = [], 0
        while got < size:
            part = os.pread(own, size - got, got)
            if not part:
                return None
            parts.append(part)
            got += len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)
    except OSError:
        return None
    finally:
        os.close(own)


def shared_buffer(number, mutable):
    """A large buffer a task captured (see SharedBuffers): the one bytes
    object for every task of the run here, or, mutable, a bytearray of the
    task's own."""
    data = _shared[number]
    if mutable:
        return bytearray(data)
    if type(data) is not bytes:
        data = _shared[number] = bytes(data)
    return data


# Rebuilding on the receiving side.

def make_function(code, namespace, name, defaults, closure):
    if "__builtins__" not in namespace:
        namespace["__builtins__"] = __builtins__
    return types.FunctionType(code, namespace, name, defaults, closure)


def function_setstate(fn, state):
    attributes, qualname, module, doc, annotations, kwdefaults, used, _submodules = state
    if used:
        fn.__globals__.update(used)
    fn.__qualname__ = qualname
    fn.__module__ = module
    fn.__doc__ = doc
    if annotations:
        fn.__annotations__ = annotations
    if kwdefaults:
        fn.__kwdefaults__ = kwdefaults
    if attributes:
        fn.__dict__.update(attributes)


def make_cell():
    return types.CellType()


def make_class(metaclass, name, bases, namespace, tracker, adopt):
    """A new class with what it needs to exist (its state follows, see
    class_setstate), or the class already known by ``tracker``."""
    made = types.new_class(name, bases, {"metaclass": metaclass},
                           lambda body: body.update(namespace))
    return _adopted(_track(tracker, _mark_fresh(made)), adopt)


def make_enum(metaclass, name, bases, qualname, module, members, tracker, adopt):
    body = metaclass.__prepare__(name, bases)
    for member, value in members.items():
        body[member] = value
    made = metaclass.__new__(metaclass, name, bases, body)
    made.__module__, made.__qualname__ = module, qualname
    return _adopted(_track(tracker, _mark_fresh(made)), adopt)


def _mark_fresh(cls):
    _trackers()
    _fresh_classes.add(cls)
    MADE[0] += 1
    _made_at[cls] = MADE[0]
    return cls


# Classes made here from what another process sent (make_class, make_enum),
# numbered in order: a fork child names a class by address, and one made
# here after that child was forked may sit at an address the child's own
# new class had there (see _class_at).
MADE = [0]
# While a fork child's outcome is unpickled: MADE[0] when it was forked.
RESOLVING_FORKED_AT = [None]


def _adopted(cls, adopt):
    # The caller's own top-level class of __main__: a task that pickles its
    # instances by name (multiprocessing, a cache) finds it here too.
    if adopt and ADOPT_INTO_MAIN[0]:
        setattr(sys.modules["__main__"], cls.__qualname__, cls)
    return cls


def class_setstate(cls, state):
    """Fill a class made by make_class; a class that was already known
    keeps its own state."""
    if cls not in _fresh_classes:
        return cls
    _fresh_classes.discard(cls)
    attributes, members = state
    registry = attributes.pop("_abc_impl", None)
    for name, value in attributes.items():
        setattr(cls, name, value)
    if registry is not None:
        for subclass in registry:
            cls.register(subclass)
    for member, extra in (members or {}).items():
        vars(cls[member]).update(extra)
    return cls


def make_typevar(name, bound, constraints, covariant, contravariant, tracker):
    import typing
    options = dict(bound=bound, covariant=covariant, contravariant=contravariant)
    made = typing.TypeVar(name, *constraints, **options)  # type: ignore  # made at run time
    return _track(tracker, made)


def make_module(name, namespace):
    module = types.ModuleType(name)
    module.__dict__.update(namespace)
    module.__dict__["__builtins__"] = __builtins__
    return module


def make_dict_view(kind, items, ordered):
    """A keys, values or items view of a new dict with just these items."""
    if ordered:
        import collections
        data = collections.OrderedDict(items)
    else:
        data = dict(items)
    return getattr(data, kind)()


def reopen_file(name, mode, position, encoding, errors):
    """A file open for reading, open again at the same position."""
    if "b" in mode:
        file = open(name, mode)
    else:
        file = open(name, mode, encoding=encoding, errors=errors)
    file.seek(position)
    return file


def make_lru_cache(fn, maxsize, typed):
    import functools
    return functools.lru_cache(maxsize=maxsize, typed=typed)(fn)


def make_singledispatch(default, registry):
    import functools
    dispatcher = functools.singledispatch(default)
    for cls, implementation in registry:
        dispatcher.register(cls, implementation)
    return dispatcher


def dataclass_sentinel(name):
    import dataclasses
    return getattr(dataclasses, name)


# Reducing on the sending side.

_BUILTIN_TYPES = {value: name for name, value in vars(types).items()
                  if type(value) is type and not name.startswith("_")}


def _reduce_class(cls):
    if cls in _BUILTIN_TYPES:
        return getattr, (types, _BUILTIN_TYPES[cls])
    if found_by_name(cls) or cls.__module__ == "builtins":
        return NotImplemented
    # All of its own dict, even what equals a base's (x = 1 in both): left
    # out, it would follow the base's value after a change.
    namespace = dict(vars(cls))
    for name in ("__weakref__", "__dict__"):
        namespace.pop(name, None)
    slots = namespace.get("__slots__")
    made_with = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
    if slots is not None:
        made_with["__slots__"] = slots
        for slot in ([slots] if isinstance(slots, str) else slots):
            namespace.pop(slot, None)
            if slot.startswith("__") and not slot.endswith("__"):
                namespace.pop("_%s%s" % (cls.__name__.lstrip("_"), slot), None)
    if "_abc_impl" in namespace:
        import abc
        registry = abc._get_dump(cls)[0]  # type: ignore[attr-defined]
        namespace["_abc_impl"] = [ref() for ref in registry if ref() is not None]
    namespace.pop("__annotate_func__", None)  # 3.14: made anew from the rest
    main = sys.modules.get("__main__")
    adopt = (cls.__module__ == "__main__" and cls.__qualname__.isidentifier()
             and getattr(main, cls.__qualname__, None) is cls)
    bases = vars(cls).get("__orig_bases__", cls.__bases__)
    if any(not isinstance(base, type) and getattr(base, "__name__", "") == "NamedTuple"
           for base in bases):
        bases = cls.__bases__  # typing.NamedTuple: the class it made is the thing to copy
    enum = sys.modules.get("enum")
    if enum is not None and issubclass(cls, enum.Enum):
        members = {name: member._value_ for name, member in cls.__members__.items()}
        extras = {}
        for name, member in cls.__members__.items():
            extra = {key: value for key, value in vars(member).items()
                     if not (key.startswith("_") and key.endswith("_"))}
            if extra and member.name == name:
                extras[name] = extra
        for name in ("_generate_next_value_", "_member_names_", "_member_map_",
                     "_member_type_", "_value2member_map_", "__qualname__", "__module__"):
            namespace.pop(name, None)
        for name in members:
            namespace.pop(name, None)
        return (make_enum, (type(cls), cls.__name__, cls.__bases__, cls.__qualname__,
                            cls.__module__, members, tracker_id(cls), adopt),
                (namespace, extras), None, None, class_setstate)
    namespace.pop("__qualname__", None)
    namespace.pop("__module__", None)
    return (make_class, (type(cls), cls.__name__, bases, made_with, tracker_id(cls), adopt),
            (namespace, None), None, None, class_setstate)


def _reduce_code(code):
    # marshal's format is the interpreter's own: the other side runs the same.
    import marshal
    return load_code, (marshal.dumps(code),)


_codes: dict = {}  # marshalled code -> the code object made of it


def load_code(data):
    """The code object ``data`` marshals, made once per process: code is
    immutable, and the tasks of a loop share theirs (so do a loop's
    functions in the caller); making it again was a fifth of what
    unpickling such a task costs."""
    code = _codes.get(data)
    if code is None:
        import marshal
        code = marshal.loads(data)
        if len(_codes) >= 1024:
            _codes.clear()
        _codes[data] = code
    return code


def _reduce_cell(cell):
    # Filled once memoized (pickle sets the state after), so a function
    # that reaches itself through its closure works; a cell shared by two
    # closures stays one cell.
    try:
        return make_cell, (), (None, {"cell_contents": cell.cell_contents})
    except ValueError:  # an empty cell: a name not bound yet
        return make_cell, ()


def _reduce_module(module):
    name = module.__name__
    if name != "__main__" and sys.modules.get(name) is module:
        import importlib
        return importlib.import_module, (name,)
    namespace = dict(vars(module))
    namespace.pop("__builtins__", None)
    return make_module, (name, namespace)


def _reduce_typevar(typevar):
    if found_by_name(typevar, typevar.__name__):
        return NotImplemented
    return make_typevar, (typevar.__name__, typevar.__bound__, typevar.__constraints__,
                          typevar.__covariant__, typevar.__contravariant__,
                          tracker_id(typevar))


def _reduce_lock(lock):
    import threading
    return threading.Lock, ()


def _reduce_rlock(lock):
    import threading
    return threading.RLock, ()


def _reduce_condition(condition):
    import threading
    return threading.Condition, (condition._lock,)


def _reduce_file(file):
    for name in ("stdin", "stdout", "stderr", "__stdin__", "__stdout__", "__stderr__"):
        if getattr(sys, name, None) is file:
            return getattr, (sys, name)
    name, mode = getattr(file, "name", None), getattr(file, "mode", "")
    what = "the open file %r (mode %r)" % (name, mode)
    if getattr(file, "closed", False):
        raise Unshippable("%s is closed" % what)
    if not isinstance(name, str) or not os.path.isfile(name) or not isinstance(mode, str) \
            or set(mode) & set("wax+") or "r" not in mode:
        raise Unshippable(
            "%s can't be reopened faithfully in another process (it would be truncated, "
            "or writes would interleave)" % what)
    try:
        position = file.tell()
    except (OSError, ValueError) as exc:
        raise Unshippable("%s has no position to reopen it at: %s" % (what, exc))
    return reopen_file, (name, mode, position, getattr(file, "encoding", None),
                         getattr(file, "errors", None))


def _reduce_lru_cache(fn):
    if found_by_name(fn):
        return NotImplemented
    parameters = fn.cache_parameters()
    return make_lru_cache, (fn.__wrapped__, parameters["maxsize"], parameters["typed"])


def _reduce_singledispatch(fn):
    registry = [(cls, implementation) for cls, implementation in fn.registry.items()
                if cls is not object]
    return make_singledispatch, (fn.registry[object], registry)


def _reduce_method(method):
    return types.MethodType, (method.__func__, method.__self__)


def _reduce_property(prop):
    return type(prop), (prop.fget, prop.fset, prop.fdel, prop.__doc__)


def _reduce_wrapped_method(method):
    # classmethod and staticmethod; what else is in their __dict__ follows.
    return type(method), (method.__func__,), vars(method) or None


def _reduce_mappingproxy(proxy):
    return types.MappingProxyType, (dict(proxy),)


def _reduce_descriptor(descriptor):
    # As found in the class's __dict__: getattr(type, "__abstractmethods__")
    # raises, and getattr(dict, "fromkeys") is the bound builtin instead of
    # the classmethod descriptor.
    return class_attribute, (descriptor.__objclass__, descriptor.__name__)


def class_attribute(cls, name):
    return vars(cls)[name]


def _dict_view_reducer(kind, ordered):
    # Only what the view shows travels, never the rest of its dict.
    def reduce(view):
        if kind == "keys":
            items = [(key, None) for key in view]
        elif kind == "values":
            items = list(enumerate(view))
        else:
            items = list(view)
        return make_dict_view, (kind, items, ordered)
    return reduce


def _reduce_memoryview(view):
    return memoryview, (view.tobytes(),)


def _reduce_weakset(weakset):
    import weakref
    return weakref.WeakSet, (list(weakset),)


def _reduce_dataclass_sentinel(sentinel):
    # Compared by identity (dataclasses.fields(), "default is MISSING").
    name = "MISSING" if type(sentinel).__name__ == "_MISSING_TYPE" else sentinel.name
    return dataclass_sentinel, (name,)


_singledispatch: list = []
_reducer_table: list = [{}]  # swapped whole: threads pickling meanwhile see one or the other
# Types of modules imported only when in use: (module, type name, reducer).
_REDUCERS_OF_MODULES = [
    ("functools", "_lru_cache_wrapper", _reduce_lru_cache),
    ("threading", "Condition", _reduce_condition),
    ("threading", "RLock", _reduce_rlock),  # a class where it is pure Python
    ("typing", "TypeVar", _reduce_typevar),
    ("weakref", "WeakSet", _reduce_weakset),
    ("dataclasses", "_FIELD_BASE", _reduce_dataclass_sentinel),
    ("dataclasses", "_MISSING_TYPE", _reduce_dataclass_sentinel),
]


def _singledispatch_code():
    if not _singledispatch:
        import functools
        _singledispatch.append(
            functools.singledispatch(lambda value: value).__code__)  # type: ignore[attr-defined]
    return _singledispatch[0]


def _reducers():
    """Reducers by type, for the modules imported so far (a type of a module
    nobody imported has no instances to reduce)."""
    modules = len(sys.modules)
    if _reducer_table[0].get(None) == modules:
        return _reducer_table[0]
    import _thread
    import io
    table = {
        types.CodeType: _reduce_code,
        types.CellType: _reduce_cell,
        types.ModuleType: _reduce_module,
        types.MethodType: _reduce_method,
        types.MappingProxyType: _reduce_mappingproxy,
        types.GetSetDescriptorType: _reduce_descriptor,
        types.MemberDescriptorType: _reduce_descriptor,
        types.ClassMethodDescriptorType: _reduce_descriptor,
        property: _reduce_property,
        classmethod: _reduce_wrapped_method,
        staticmethod: _reduce_wrapped_method,
        memoryview: _reduce_memoryview,
        _thread.LockType: _reduce_lock,
        _thread.RLock: _reduce_rlock,
        io.TextIOWrapper: _reduce_file,
        io.BufferedReader: _reduce_file,
        io.BufferedWriter: _reduce_file,
        io.BufferedRandom: _reduce_file,
        io.FileIO: _reduce_file,
    }
    for kind in ("keys", "values", "items"):
        table[type(getattr({}, kind)())] = _dict_view_reducer(kind, False)
    collections = sys.modules.get("collections")
    if collections is not None:
        for kind in ("keys", "values", "items"):
            table[type(getattr(collections.OrderedDict(), kind)())] = \
                _dict_view_reducer(kind, True)
    for module_name, type_name, reducer in _REDUCERS_OF_MODULES:
        found = getattr(sys.modules.get(module_name), type_name, None)
        if isinstance(found, type):
            table[found] = reducer
    table[None] = modules
    _reducer_table[0] = table
    return table


def loads_task(body):
    """Unserialize a task payload: b"p" and a pickle (see ValuePickler), b"s"
    and one naming shared buffers (see SharingValuePickler), or b"d" and
    dill's, for what only dill could send."""
    view = memoryview(body)
    if view[:1] == b"p":
        return pickle.loads(view[1:])
    if view[:1] == b"s":
        import io
        return _SharingUnpickler(io.BytesIO(view[1:])).load()
    import dill  # type: ignore
    return dill.loads(bytes(view[1:]))


# -- serve: a warm worker of the process driver -------------------------------


class _Channel:
    """Frame reader and writer on the two pipes given by the parent."""

    def __init__(self, task_fd, result_fd, claim_fd):
        self.task_fd = task_fd
        self.result_fd = result_fd
        self.claim_fd = claim_fd
        self.early = []  # frames read while waiting for a reply, in order
        self.reader = FrameReader(task_fd)
        self.frames = collections.deque()  # read, not yet taken
        self.received = 0  # b"T" frames read: the next one's claim number
        self.context = None  # the last b"C" frame's, unpickled
        self.writing = threading.Lock()
        self.running = None  # the claim number of the task running

    def read_frame(self):
        if self.early:
            return self.early.pop(0)
        return self._read_frame()

    def claim(self):
        """The number of the next task to run, or None when the parent took
        it back first (claim() may be tried again)."""
        try:
            claim = os.read(self.claim_fd, CLAIM.size)
        except BlockingIOError:
            return None
        if not claim:
            os._exit(0)  # the parent retired us
        return CLAIM.unpack(claim)[0]

    def task(self, number):
        """The body of task ``number``, the context frames before it applied
        to self.context; frames of tasks taken back are skipped.  With
        ``number`` DROP_SHARED: None, once the run's b"D" frame is read."""
        while True:
            frame = self.read_frame()
            if frame is None:
                os._exit(0)
            kind, body = frame
            if kind == CONTEXT:
                self.context = pickle.loads(body)
            elif number == DROP_SHARED and (kind == BUFFER or kind == BUFFER_FILE):
                # Of tasks taken back from us, in a run that is over: no
                # task here needs them, and the parent no longer answers a
                # b"N" for them.
                continue
            elif kind == BUFFER:
                _shared[SHARED_HEADER.unpack_from(body)[0]] = \
                    memoryview(body)[SHARED_HEADER.size:]
            elif kind == BUFFER_FILE:
                shared, fd, size = SHARED_FILE.unpack_from(body)
                data = _read_parent_file(fd, size, bytes(body[SHARED_FILE.size:]))
                if data is None:  # not allowed here: ask for a b"B" frame
                    self.write_frame(BUFFER_WANTED, [SHARED_HEADER.pack(shared)])
                    data = self._await_buffer(shared)
                _shared[shared] = data
            elif kind == BUFFER_DONE:  # no task left to run here names it
                _shared.pop(SHARED_HEADER.unpack_from(body)[0], None)
            elif kind == RUN_OVER:  # its buffers go
                _shared.clear()
                if number == DROP_SHARED:
                    return None
            elif kind == TASK:
                self.received += 1
                if self.received - 1 == number:
                    return body

    def _await_buffer(self, number):
        """The bytes of the b"B" frame the parent sends for a b"N" of ours;
        the frames before it are kept for read_frame(), in order."""
        while True:
            frame = self._read_frame()
            if frame is None:
                os._exit(0)
            kind, body = frame
            if kind == BUFFER and SHARED_HEADER.unpack_from(body)[0] == number:
                return memoryview(body)[SHARED_HEADER.size:]
            self.early.append(frame)

    def await_reply(self):
        """The parent's reply to a lent result; the tasks it sent before
        that are kept for read_frame()."""
        while True:
            frame = self._read_frame()
            if frame is None:
                os._exit(0)
            if frame[0] in (FETCHED, SEND_INLINE):
                return frame[0]
            self.early.append(frame)

    def _read_frame(self):
        """The next frame from the task pipe; None at its end."""
        frames = self.frames
        while not frames:
            if self.reader.eof:
                return None
            frames.extend(self.reader.read())
        return frames.popleft()

    def write_frame(self, kind, parts=()):
        # Log records may be sent from any thread a task starts.
        with self.writing:
            write_frame(self.result_fd, kind, parts)


class TaskContext(collections.namedtuple(
        "TaskContext", "cwd environ path argv recursion_limit logging_levels map_function",
        defaults=(None,))):
    """What every task of a run gets of the caller's process: its cwd (None
    when it has none), environment, sys.path, sys.argv, recursion limit and,
    for a worker, the levels of its loggers (see forward_records).  In a
    map's run, ``map_function``: the payload of the function every chunk
    calls (see MapChunk), so that it travels once per worker, not per chunk."""


def current_context(path=None, logging_levels=None, environ=None):
    """This process's TaskContext; ``path``: the sys.path tasks are to get,
    given the cwd (as concurrency's _sys_path makes it); ``environ``: a
    copy of os.environ made already."""
    try:
        cwd = os.getcwd()
    except OSError:
        cwd = None
    return TaskContext(cwd, dict(os.environ) if environ is None else environ,
                       list(sys.path) if path is None else path(cwd),
                       list(sys.argv), sys.getrecursionlimit(), logging_levels)


_applied_environ: dict = {}  # id(context environ) -> os.environ's raw data after applying it


def _apply_context(context, channel=None):
    """Give the next task the caller's cwd, environment, sys.path, sys.argv
    and recursion limit, and, sent on ``channel``, its logging levels."""
    cwd, environ, path, argv, recursion_limit, levels = context[:6]
    if levels is not None and channel is not None:
        _forward_logging(levels, channel)
    if cwd is not None:
        try:
            # getcwd() costs half a chdir(), and most tasks change nothing.
            if os.getcwd() != cwd:
                os.chdir(cwd)
        except OSError:  # our directory was removed, or the caller's
            try:
                os.chdir(cwd)
            except OSError:
                pass
    # Comparing os.environ with a dict decodes every variable (~25 us a
    # task); its raw bytes compare in well under a microsecond.
    raw = getattr(os.environ, "_data", None)
    applied = _applied_environ.get(id(environ))
    if raw is None or applied is None or applied[0] is not environ or raw != applied[1]:
        if os.environ != environ:
            os.environ.clear()
            os.environ.update(environ)
        _applied_environ.clear()
        if raw is not None:
            _applied_environ[id(environ)] = (environ, dict(raw))
    sys.path[:] = path
    if sys.argv != argv:
        sys.argv[:] = argv
    if sys.getrecursionlimit() != recursion_limit:
        sys.setrecursionlimit(recursion_limit)


# -- Logging: a task's records go to the parent's logging --------------------
#
# A task logs in a child: in a worker nothing is configured, and in a fork
# child what is configured writes from another process (an in-memory
# handler, a test's assertLogs, never see it).  So a child hands every
# record its loggers let through to the parent instead of to handlers: a
# b"L" frame on the result pipe -- the number of the task running, and the
# record's attributes, its message and exception text already formatted --
# and the parent hands it to its own logger of that name, levels, filters,
# handlers and formats included, as if the task had logged there.  A worker
# gets the parent's levels with each run's context (see concurrency's
# _logging_levels); a fork child has them already.

_forwarding: list = []  # the levels applied, once records are forwarded


def forward_records(write, running):
    """Send this process's log records with ``write(kind, parts)`` (thread
    safe); ``running()`` is the number of the task running.

    Processes the task forks inherit this, but not the result pipe (see
    _protect_channel): what they log goes to stderr as text, as logging's
    last resort would write it, never half into the pipe of the run."""
    import logging
    formatter = logging.Formatter()

    def handle(logger, record):
        if FORKED_BY_TASK[0]:
            return _log_as_text(record, formatter)
        try:
            message = record.getMessage()
        except Exception:  # arguments that don't fit the format
            return logging.Handler.handleError(None, record)  # type: ignore[arg-type]
        # Anything raised from here on is a signal handler's: the task's.
        body = encode_record(running(), record, message, formatter)
        try:
            write(LOG, [body])
        except OSError:  # our pipe is gone: so is the parent, or its run
            logging.Handler.handleError(None, record)  # type: ignore[arg-type]

    logging.Logger.handle = handle  # type: ignore[method-assign]  # in this child only
    _forwarding[:] = [None]


# Record attributes of these types travel as they are; the rest (an
# ``extra`` of the task's) each on its own, as text where they can't.
_PLAIN_RECORD_VALUES = frozenset([str, int, float, bool, type(None)])


def encode_record(number, record, message, formatter):
    """The body of a b"L" frame: the number of the task that logged, the
    record's plain attributes (its ``message`` formatted, its exception as
    text) and the others, each pickled alone with its text beside it."""
    state = dict(record.__dict__)
    state["msg"] = message
    del state["args"]
    if record.exc_info:
        state["exc_text"] = formatter.formatException(record.exc_info)
    state["exc_info"] = None
    others = {}
    for name, value in list(state.items()):
        if type(value) not in _PLAIN_RECORD_VALUES:
            del state[name]
            try:
                text = repr(value)
            except Exception:
                text = "<%s object>" % type(value).__name__
            others[name] = (_try_dumps(lambda: value), text)
    return pickle.dumps((number, state, others), pickle.HIGHEST_PROTOCOL)


def decode_record(body):
    """(task number, record attributes) of a b"L" frame: an attribute that
    can't be rebuilt here comes as its text."""
    number, state, others = pickle.loads(body)
    state["args"] = ()
    for name, (pickled, text) in others.items():
        value = text
        if pickled is not None:
            try:
                value = loads_value(pickled)
            except Exception:
                pass
        state[name] = value
    return number, state


def _log_as_text(record, formatter):
    try:
        text = "%s:%s:%s" % (record.levelname, record.name, record.getMessage())
        if record.exc_info:
            text += "\n" + formatter.formatException(record.exc_info)
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except Exception:
        import logging
        logging.Handler.handleError(None, record)  # type: ignore[arg-type]


def _forward_logging(levels, channel):
    """In a worker: forward records, with the parent's levels."""
    import logging
    if not _forwarding:
        forward_records(channel.write_frame, lambda: channel.running)
    if _forwarding[0] == levels:
        return
    before = _forwarding[0] or {}
    for name in before:
        if name not in levels and name != "":
            logging.getLogger(name).setLevel(logging.NOTSET)
    for name, level in levels.items():
        if isinstance(name, str):
            (logging.root if name == "" else logging.getLogger(name)).setLevel(level)
    logging.disable(levels.get(None, logging.NOTSET))
    _forwarding[0] = levels


def _fresh_task_state(std_streams):
    """What one task may change in this process that the next must not see:
    its own __main__, no class of an earlier task's, the std streams."""
    sys.modules["__main__"] = types.ModuleType("__main__")
    forget_tracked_classes()
    return usable_std_streams(std_streams)


def usable_std_streams(std_streams):
    """Give the next task the std streams ``std_streams``, reopened on their
    descriptors where an earlier task closed them; returns what it got."""
    try:
        stale = std_streams[0].closed or std_streams[1].closed or std_streams[2].closed
    except AttributeError:  # None: the process started without that descriptor
        stale = any(getattr(stream, "closed", False) for stream in std_streams)
    if stale:
        std_streams = tuple(_reopened(stream, fd, mode) for stream, fd, mode
                            in zip(std_streams, (0, 1, 2), ("r", "w", "w")))
        for name, stream in zip(("__stdin__", "__stdout__", "__stderr__"), std_streams):
            setattr(sys, name, stream)
    sys.stdin, sys.stdout, sys.stderr = std_streams
    return std_streams


def _reopened(stream, fd, mode):
    if not getattr(stream, "closed", False):
        return stream
    try:
        return open(fd, mode, encoding=stream.encoding, errors=stream.errors,
                    buffering=1 if stream.line_buffering else -1, closefd=False)
    except (OSError, ValueError, AttributeError):
        return stream  # its descriptor is gone too: nothing to write to


def serve(task_fd, result_fd, idle_timeout, lend_min, claim_fd):
    import select
    channel = _Channel(task_fd, result_fd, claim_fd)
    _watch_parent(task_fd)
    waiting = select.poll()  # not select(): our fd number may exceed FD_SETSIZE
    waiting.register(claim_fd, select.POLLIN)
    wait_ms = idle_timeout * 1000 if idle_timeout > 0 else None
    std_streams = (sys.stdin, sys.stdout, sys.stderr)
    channel.write_frame(UP)
    while True:
        number = channel.claim()
        if number is None:
            if not waiting.poll(wait_ms):
                # Unused for IDLE_TIMEOUT: give the memory back.  Say so
                # first: a task the parent sent meanwhile was never
                # claimed, and runs elsewhere.
                channel.write_frame(LEAVING)
                os._exit(0)
            continue
        if number == DROP_SHARED:
            channel.task(number)
            continue
        body = channel.task(number)
        channel.running = number
        std_streams = _fresh_task_state(std_streams)
        if channel.context is not None:
            _apply_context(channel.context, channel)
            RUNNING_CONTEXT[0] = channel.context
        try:
            fn = loads_task(body)
        except BaseException as exc:
            outcome = (ERROR, [encode_error(exc, TASK_UNLOADABLE)], None)
        else:
            outcome = run_task(fn, lend_min)
            del fn
        del body
        _restore_std_fds()
        sys.stdin, sys.stdout, sys.stderr = std_streams
        deliver(outcome, channel.write_frame, channel.await_reply)
        del outcome


def serve_forked(task_fd, result_fd, calls, context, in_context, lend_min):
    """The loop of a child the fork driver forked for a run: run the task of
    each index read from TASK_FD -- ``calls[index]``, inherited, nothing
    serialized -- until the pipe's end; outcomes go to RESULT_FD.  Indices
    may wait in the pipe: the parent can take them back (see serve), so
    they are read one at a time.  ``in_context``: this process still has
    the cwd, environment and sys.path of the call (it was forked as the run
    started), which each later task gets back (``context``)."""
    import select
    replies = {number: code for code, number in FORK_REPLIES.items()}
    waiting = select.poll()
    waiting.register(task_fd, select.POLLIN)

    def read_index():
        while True:
            try:
                data = os.read(task_fd, CLAIM.size)
            except BlockingIOError:
                waiting.poll()
                continue
            if not data:
                os._exit(0)  # the run is over
            return CLAIM.unpack(data)[0]

    early = collections.deque()  # task indices read while awaiting a reply

    def await_reply():
        while True:
            index = read_index()
            if index in replies:
                return replies[index]
            early.append(index)

    # Log records may come from any thread, once they are forwarded (only
    # where logging is in use: else nothing is configured to inherit).
    writing = threading.Lock() if "logging" in sys.modules else None

    def write(kind, parts):
        if writing is None:
            return write_frame(result_fd, kind, parts)
        with writing:
            write_frame(result_fd, kind, parts)

    running = [None]
    if writing is not None:
        forward_records(write, lambda: running[0])
    raw = getattr(os.environ, "_data", None)
    if in_context and raw is not None:
        # Forked as the run started: our environment is the context's.  Said
        # so now, it is compared raw after each task, never decoded.
        _applied_environ.clear()
        _applied_environ[id(context.environ)] = (context.environ, dict(raw))
    # What a task may have closed or replaced for the next one here: the
    # std streams and their descriptors, as in serve.
    std_streams = (sys.stdin, sys.stdout, sys.stderr)
    _save_std_fds()
    while True:
        index = early.popleft() if early else read_index()
        running[0] = index
        # Each task starts from the caller's cwd, environment and sys.path
        # as at the call, whatever the last one changed.  (Not checked
        # needlessly: the first touch of each page costs a fresh fork.)
        if not in_context:
            _apply_context(context)
            _restore_std_fds()
            std_streams = usable_std_streams(std_streams)
        in_context = False
        outcome = run_task(calls[index], lend_min)
        deliver(outcome, write, await_reply)
        del outcome


def _watch_parent(task_fd):
    """Leave at once, even mid-task, when the parent is gone.

    The parent holds the only write end of TASK_FD: when it exits or is
    killed, the pipe hangs up.  A thread polls for just that (no data is
    consumed: the main thread reads the frames), so no worker outlives its
    parent as an orphan, and neither does what its task started.
    """
    import select

    def watch():
        hangup = select.poll()
        hangup.register(task_fd, 0)  # POLLHUP and POLLERR are always reported
        while True:
            for _fd, event in hangup.poll():
                if event & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    end_task_children()
                    os._exit(0)

    threading.Thread(target=watch, name="concurrency-parent-watch", daemon=True).start()


_SAVED_STD_FDS: dict = {}


def _save_std_fds():
    for fd in (1, 2):
        try:
            _SAVED_STD_FDS[fd] = os.dup(fd)
        except OSError:
            pass


def _restore_std_fds():
    # A task may close or redirect fd 1/2; the next task must find them as the
    # parent gave them.
    for fd, saved in _SAVED_STD_FDS.items():
        try:
            os.dup2(saved, fd)
        except OSError:
            pass


def _protect_channel(*fds):
    # Children a task starts must not hold our pipes: a grandchild holding the
    # result pipe would hide this worker's death from the parent.
    for fd in fds:
        os.set_inheritable(fd, False)
    if hasattr(os, "register_at_fork"):
        open_fds = list(fds)

        def close_in_child():
            # Once, in the task's child: in its own forks these numbers may
            # be files of its own by then.
            for fd in open_fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            del open_fds[:]
        os.register_at_fork(after_in_child=close_in_child)


# -- Processes a task starts --------------------------------------------------

_PR_SET_CHILD_SUBREAPER = 36
_libc: list = []


def preload_libc():
    """Load libc for prctl() now: fork children then get it for free."""
    if not _libc and sys.platform.startswith("linux"):
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl  # looked up (dlsym) and cached here, not in every child
            _libc.append(libc)
        except Exception:
            _libc.append(None)
    return _libc[0] if _libc else None


def _prctl(option, value):
    """Linux prctl(2), best effort: False where it is not to be had."""
    libc = preload_libc()
    try:
        return libc is not None and libc.prctl(option, value, 0, 0, 0) == 0
    except Exception:
        return False


_PR_SET_NAME = 15


def show_as_worker():
    """Show as "concurrency" in top, ps -e and pstree (Linux: the command
    name, 15 bytes at most) instead of as one more "python3"."""
    return _prctl(_PR_SET_NAME, b"concurrency")


def become_subreaper():
    """Have orphans of a task's processes handed to us (Linux), so that
    end_task_children() finds a daemonized grandchild too."""
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def die_with_parent(lifeline_fd):
    """End this fork child, and what its task started, when the parent dies.

    Only the parent holds the write end of the lifeline pipe, and never
    writes: end-of-file means it is gone.
    """
    def watch():
        try:
            while os.read(lifeline_fd, 1):
                pass
        except OSError:
            pass
        end_task_children()
        os._exit(1)

    # Not threading.Thread: its start() waits until the thread has run, a
    # scheduling round trip on the way to the first task.
    import _thread
    _thread.start_new_thread(watch, ())


def _children():
    pids = set()
    try:
        threads = os.listdir("/proc/self/task")
    except OSError:
        return pids
    for tid in threads:
        try:
            with open("/proc/self/task/%s/children" % tid) as file:
                pids.update(int(pid) for pid in file.read().split())
        except (OSError, ValueError):
            pass
    return pids


def end_task_children():
    """Kill and reap every process a task started and left behind (Linux)."""
    import signal
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return  # no child at all, the common case: one system call
    for _ in range(100):  # each round takes the orphans of the last one
        children = _children()
        if not children:
            return
        for pid in children:
            for kill in (os.killpg, os.kill):  # its group first: all it started
                try:
                    kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        for pid in children:
            try:
                os.waitpid(pid, 0)
            except OSError:
                pass


# -- defer: detached deferred tasks -------------------------------------------

def run_reporting(fn, key):
    """Run a deferred task; nobody waits for it, so a failure goes to stderr."""
    try:
        call(fn)
    except BaseException as exc:
        report_deferred(key, "failed:\n" + _safe_format(type(exc), exc, exc.__traceback__))
        return 1
    finally:
        flush_std_streams()
    return 0


def report_deferred(key, what):
    """Report on stderr what became of a deferred task, which nobody waits
    for: ``key`` as text (its repr), ``what`` ends with a newline."""
    try:
        sys.stderr.write("concurrency: deferred task %s %s" % (key, what))
        sys.stderr.flush()
    except BaseException:
        pass


def _report_timeout(key, timeout):
    report_deferred(key, "did not finish within %g s; it was killed\n" % timeout)


def _report_crash(key, code):
    if code is not None and code < 0:
        report_deferred(key, "crashed: its process was killed by %s\n" % signal_name(-code))
    else:
        report_deferred(key, "crashed: its process exited with code %s\n" % code)


def supervise(jobs, timeout, limit):
    """Run each job -- ``(key, run)`` -- in a forked child, at most ``limit``
    at once, and report a crash or timeout on stderr, since nobody waits for
    them.  Returns the exit code to leave with: 0 when every job succeeded.
    A job's processes go with it."""
    pending = list(reversed(jobs))
    running = {}  # pid -> (key, deadline or None)
    failed = False
    while pending or running:
        while pending and len(running) < limit:
            key, run = pending.pop()
            pid = os.fork()
            if pid == 0:
                code = 70
                try:
                    os.setpgid(0, 0)
                    code = run()
                finally:
                    flush_std_streams()
                    os._exit(code)
            try:
                os.setpgid(pid, pid)
            except OSError:
                pass
            running[pid] = (key, None if timeout is None else time.monotonic() + timeout)
        now = time.monotonic()
        for pid, (key, deadline) in list(running.items()):
            if deadline is not None and now >= deadline:
                kill_group(pid, only_group=True)
                os.waitpid(pid, 0)
                del running[pid]
                failed = True
                _report_timeout(key, timeout)
        deadlines = [deadline for _key, deadline in running.values() if deadline is not None]
        try:
            if deadlines or pending:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if not pid:
                    left = min(deadlines) - time.monotonic() if deadlines else 0.05
                    time.sleep(min(max(left, 0.001), 0.05))
                    continue
            else:
                pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if pid not in running:
            continue
        key, _deadline = running.pop(pid)
        kill_group(pid, only_group=True)
        code = os.waitstatus_to_exitcode(status)
        if code not in (0, 1):  # 1: failed, and run() reported it
            _report_crash(key, code)
        failed = failed or code != 0
    return 1 if failed else 0


def kill_group(pid, only_group=False):
    """SIGKILL the process group led by ``pid``, and ``pid`` itself unless
    ``only_group``."""
    import signal
    for kill in (os.killpg,) if only_group else (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except OSError:
            pass


def signal_name(number):
    import signal
    try:
        return signal.Signals(number).name
    except ValueError:
        return "signal %d" % number


def run_deferred(source):
    """Run a deferred batch: its payload -- (context, timeout, limit, [(key,
    task payload)]) -- comes from an inherited descriptor (``fd:N``, an
    anonymous file: nothing on disk) or from a file that is removed once
    read."""
    if source.startswith("fd:"):
        with os.fdopen(int(source[3:]), "rb") as payload:
            payload.seek(0)
            body = payload.read()
    else:
        try:
            with open(source, "rb") as payload:
                body = payload.read()
        finally:
            try:
                os.unlink(source)
            except OSError:
                pass
    context, timeout, limit, tasks = pickle.loads(body)
    del body
    _apply_context(context)
    jobs = []
    for key, task in tasks:
        try:
            fn = loads_task(task)
        except BaseException as exc:
            report_deferred(key, "could not be unserialized:\n"
                    + _safe_format(type(exc), exc, exc.__traceback__))
            continue
        jobs.append((key, lambda fn=fn, key=key: run_reporting(fn, key)))
    if not hasattr(os, "fork"):
        return max([job() for _key, job in jobs] or [0])
    return supervise(jobs, timeout, limit)


# -- dask: tasks of the dask driver on a Dask worker ---------------------------

# The names the dask driver uploads this file and concurrency.py under to
# every worker of a Dask cluster (see concurrency.DaskDriver), so that the
# cluster needs dask and dill, not this library.
DASK_WORKER_FILE = "_concurrency_worker.py"
DASK_RUNNER_NAME = "_concurrency_on_dask"


def dask_task(payloads, timeout, report_as=None, python=None, needs=None, shared=None,
              files=None, until=None):
    """A task of the ``dask`` driver, called by a Dask worker: a chunk of
    the caller's tasks.

    Runs the ``payloads`` (serialized tasks, see loads_task()) one after
    another in a warm child of this Dask worker, as the process driver runs
    them: a crash or a timeout ends that child and that task, never the
    Dask worker nor the chunk's other tasks.  Returns (outcomes, seconds
    the tasks took): each outcome still encoded -- (b"R" or b"E", body) as
    the child sent it, or (b"X", pickled (what, detail)) when the child
    crashed or timed out -- for the caller, who has the classes, to decode.
    ``report_as``: the keys of deferred tasks, whose failures nobody waits
    for; they go to stderr.  ``python``: the caller's
    sys.implementation.cache_tag; on another Python (a worker that joined
    the cluster later) no task is unpickled: this one would crash on the
    caller's code.  ``shared``: (number, Dask key, buffer) of the large
    buffers the tasks capture, sent ahead once and handed in by Dask;
    ``files``: (number, pid, descriptor, name, size) of those the caller,
    on this machine, holds in anonymous files for us to read instead;
    ``needs``: the numbers each task names.  Where those files can't be
    read, no task runs, and the outcomes are None (with why): the caller
    sends the chunk again, its buffers by Dask.  ``until``: the caller's
    deadline by the clock of this machine, which it shares: what is still
    running then is stopped, and what finished goes back."""
    if python is not None and python != sys.implementation.cache_tag:
        detail = ("its Dask worker runs %s, this process's tasks need %s: run the "
                  "workers on the caller's Python" % (sys.implementation.cache_tag, python))
        outcomes = [(LOST, pickle.dumps(("error", detail)))] * len(payloads)
        seconds = 0.0
    else:
        import importlib
        runner = importlib.import_module(DASK_RUNNER_NAME)
        outcomes, seconds = runner._run_for_dask(payloads, timeout, needs, shared, files, until)
        if outcomes is None:
            return None, seconds
    for key, outcome in zip(report_as or (), outcomes):
        report_outcome(key, outcome)
    return outcomes, seconds


def dask_release():
    """On a Dask worker: let the warm children of dask_task() go now."""
    runner = sys.modules.get(DASK_RUNNER_NAME)
    if runner is not None:
        runner._release_dask_workers()


def dask_forget(keys):
    """On a Dask worker: a run is over; close the files of its shared
    buffers (Dask's ``keys``) written here."""
    runner = sys.modules.get(DASK_RUNNER_NAME)
    if runner is not None:
        runner._forget_dask_files(keys=keys)


def report_outcome(key, outcome):
    kind, body = outcome[:2]
    if kind == ERROR:
        info = pickle.loads(body)
        if info["kind"] == TASK_FAILED:
            report_deferred(key, "failed:\n" + info["traceback"])
        else:
            report_deferred(key, "could not be %s:\n%s" % (
                "serialized" if info["kind"] == RESULT_UNSERIALIZABLE else "unserialized",
                info["traceback"]))
    elif kind == LOST:
        what, detail = pickle.loads(body)
        if what == "timeout":
            _report_timeout(key, detail)
        elif what == "crashed":
            _report_crash(key, detail)
        else:
            report_deferred(key, "failed: %s\n" % (detail,))


def _ignore_sigint():
    # A Ctrl-C in the terminal reaches the whole process group, workers
    # included.  The parent decides what it means (it stops its run and reaps
    # the workers); a worker must not die with a KeyboardInterrupt traceback.
    # A no-op handler rather than SIG_IGN, which programs a task starts would
    # inherit.
    import signal
    signal.signal(signal.SIGINT, lambda signum, frame: None)


def main(argv):
    mode = argv[1] if len(argv) > 1 else ""
    # SIG_IGN survives exec: a caller ignoring SIGCHLD would have our
    # children reaped behind our back, their exit status lost.
    import signal
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    # Pickles name this module's functions (make_function...) by this name
    # (python worker.py runs it as __main__, which is replaced below).
    sys.modules.setdefault("_concurrency_worker", sys.modules[__name__])
    ADOPT_INTO_MAIN[0] = True
    if mode == "serve":
        _ignore_sigint()
    # User code runs in a __main__ of its own: classes adopted from the
    # parent's __main__ land there and can't clobber this module's names.
    sys.modules["__main__"] = types.ModuleType("__main__")
    if mode == "serve":
        task_fd, result_fd, idle_timeout = int(argv[2]), int(argv[3]), float(argv[4])
        lend_min, claim_fd = int(argv[5]), int(argv[6])
        _protect_channel(task_fd, result_fd, claim_fd)
        become_subreaper()
        show_as_worker()
        _save_std_fds()
        try:
            serve(task_fd, result_fd, idle_timeout, lend_min, claim_fd)
        except OSError:
            # Our pipes failed: the parent closed them (it retired us as we
            # left, or it is gone).  It notices on its own; the user's
            # terminal is no place for our plumbing.
            os._exit(0)
    elif mode == "defer":
        return run_deferred(argv[2])
    sys.stderr.write("worker.py is started by the concurrency library, not by hand.\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
