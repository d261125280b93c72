"""Child entrypoint of `concurrency`: run tasks serialized by the parent.

The parent starts it by path -- loaded under the private name
``_concurrency_worker`` so that its bytecode is cached (``python worker.py
MODE ...`` works too) -- never as ``import worker``.  It imports only the
standard library, and dill only for a payload or result that needs it; never
``concurrency``, so it works wherever the two files are copied.
``concurrency.py`` loads it the same way to reuse the outcome encoding below
in ``fork`` children.

Modes:

``serve TASK_FD RESULT_FD IDLE_TIMEOUT [LEND_MIN]``
    A warm worker of the ``process`` driver.  Frames arrive on TASK_FD and
    leave on RESULT_FD; stdout and stderr stay the parent's, so a task's
    ``print()`` shows up there and can never corrupt a result.  A thread
    watches TASK_FD hang up: the parent is gone (exited or was killed), and
    the worker exits at once, even mid-task, so no worker outlives its
    parent.  Unused for IDLE_TIMEOUT seconds, it exits too.  Buffers of at
    least LEND_MIN bytes in a result are lent (see below); 0 turns that off.

``defer PAYLOAD_PATH KEY TIMEOUT``
    A detached deferred task: read the task payload from PAYLOAD_PATH (the
    file is removed once read), run it in a forked child and report a
    failure, a crash or a timeout on stderr, since nobody waits for it.

Frames are one kind byte, an 8-byte big-endian length, then the body:

    parent -> worker   b"C" context: pickled (cwd, environ, sys.path)
                       b"T" task: a serialized callable, see loads_task()
                       b"F" / b"S" reply to a lent result (empty body)
    worker -> parent   b"R" result: encode_result()
                       b"E" error: encode_error()
                       b"Q" leaving after IDLE_TIMEOUT unused (empty body)

Several b"T" frames may wait in the pipe; they are run in order, and each
gets its b"R" or b"E".

Large results are lent, not sent: a result's big buffers (bytes, bytearray,
arrays that pickle with protocol 5) stay where the task left them, the b"R"
body says where, and the parent copies them straight out of this process's
memory (Linux process_vm_readv): one copy instead of the four a pipe costs
(pickle, write, read, unpickle).  The worker keeps them and waits, its next
task unread, until the parent replies b"F" (fetched), or b"S" when it could
not read them: then they follow through the pipe after all.
"""

import collections.abc
import os
import pickle
import struct
import sys
import threading
import time
import types

FRAME_HEADER = struct.Struct(">cQ")

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

# The parent's replies to a lent result.
FETCHED = b"F"
SEND_INLINE = b"S"

# Kinds of error reported in an b"E" frame; the parent maps them to its errors.
TASK_FAILED = "task"              # the task raised
TASK_UNLOADABLE = "task-load"     # the payload could not be unserialized here
RESULT_UNSERIALIZABLE = "result"  # the task's return value could not be pickled


# -- Outcome encoding (shared with the fork driver) ---------------------------

def dumps_value(value):
    """Pickle ``value`` with the C pickle, or dill when pickle can't.

    Returns the parts of the body: the flag, then the pickle, kept apart so
    a large pickle is never copied just to prepend one byte.
    """
    try:
        return [PICKLED, pickle.dumps(value, pickle.HIGHEST_PROTOCOL)]
    except Exception:
        pass
    import io
    buffer = io.BytesIO()
    _result_pickler_class()(buffer, pickle.HIGHEST_PROTOCOL, recurse=True).dump(value)
    return [DILLED, buffer.getvalue()]


def encode_result(value, lend_min=0):
    """Return the outcome ``(kind, parts, lent)`` for a task's return value.

    ``lent`` is None, or the views of the buffers the body lends, to be kept
    until the parent has copied them; see deliver().
    """
    try:
        if lend_min:
            lending = dumps_lending(value, lend_min)
            if lending is not None:
                return lending
        return b"R", dumps_value(value), None
    except BaseException as exc:
        return b"E", [encode_error(exc, RESULT_UNSERIALIZABLE)], None


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

    try:
        data = pickle.dumps(_expose_buffers(value, lend_min), 5, buffer_callback=lend)
    except Exception:
        return None  # dumps_value() says what is wrong, or uses dill
    if not lent:
        return b"R", [PICKLED, data], None
    descriptors = b"".join(LENT_BUFFER.pack(address, view.nbytes, view.readonly)
                           for address, view in lent)
    header = LENT_HEADER.pack(len(lent), len(data)) + descriptors
    return b"R", [LENT, header, data], [view for _address, view in lent]


def _expose_buffers(value, lend_min):
    """Wrap large bytes and bytearrays in PickleBuffers, which pickle hands to
    its buffer_callback.  It never does that for bytes itself.  Only the top
    level and the items of a small list, tuple or dict are looked at: deeper
    search would need a hook called for every object, slowing every result."""
    wrapped = {}

    def wrap(item):
        if (type(item) is bytes or type(item) is bytearray) and len(item) >= lend_min:
            if id(item) not in wrapped:  # the same object twice stays one
                wrapped[id(item)] = pickle.PickleBuffer(item)
            return wrapped[id(item)]
        return item

    kind = type(value)
    if kind is bytes or kind is bytearray:
        return wrap(value)
    if (kind is list or kind is tuple) and len(value) <= 64:
        items = [wrap(item) for item in value]
        return kind(items) if wrapped else value
    if kind is dict and len(value) <= 64:
        items = {key: wrap(item) for key, item in value.items()}
        return items if wrapped else value
    return value


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
        "type": "%s.%s" % (cls.__module__, cls.__qualname__),
        "message": _safe_str(exc),
        "traceback": _safe_format(cls, exc, tb),
        "exc": _try_dumps(exc),
        "parts": _try_dumps((cls, exc.args, dict(getattr(exc, "__dict__", {})))),
    }
    return pickle.dumps(info, pickle.HIGHEST_PROTOCOL)


def _try_dumps(obj):
    try:
        return b"".join(dumps_value(obj))
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
    if isinstance(value, collections.abc.Coroutine):
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
        # Skip this frame: the user's traceback starts in their own code.
        return b"E", [encode_error(exc, TASK_FAILED, skip_frames=1)], None
    finally:
        flush_std_streams()
        end_task_children()
    return encode_result(value, lend_min)


def flush_std_streams():
    # Output the task printed must reach the terminal before its result does.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass


# -- Classes from the parent's __main__ ---------------------------------------
#
# dill sends classes defined in the parent's __main__ by value; here they get
# rebuilt as new class objects.  Put top-level ones into this process's
# __main__ (a private module, see serve()) and pickle them by reference on the
# way back, so the parent resolves them to its own class: a returned instance
# is an instance of the caller's class, and an exception keeps its class.

_ADOPTED = {}  # id(class) -> class
_loaders = {}


def _adopt(cls):
    qualname = getattr(cls, "__qualname__", "")
    if getattr(cls, "__module__", None) == "__main__" and qualname.isidentifier():
        setattr(sys.modules["__main__"], qualname, cls)
        _ADOPTED[id(cls)] = cls
    return cls


def loads_task(body):
    """Unserialize a task payload: b"p" and a plain pickle, or b"d" and
    dill's, whose classes of __main__ are adopted."""
    view = memoryview(body)
    if view[:1] == b"p":
        return pickle.loads(view[1:])
    import io
    return _task_unpickler_class()(io.BytesIO(view[1:])).load()


def function_from_template(template, defaults, closure):
    """Make a task function from the template its run's tasks share (see
    concurrency._FastTaskPickler): unpickled anew for each, so that each
    task has globals of its own."""
    code, namespace, name = pickle.loads(template)
    return types.FunctionType(code, namespace, name, defaults, closure)


def _task_unpickler_class():
    if "task" not in _loaders:
        import dill
        from dill import _dill

        def create_type(typeobj, *args):
            return _adopt(_dill._create_type(typeobj, *args))

        class TaskUnpickler(dill.Unpickler):
            def find_class(self, module, name):
                found = super().find_class(module, name)
                return create_type if found is _dill._create_type else found

        _loaders["task"] = TaskUnpickler
    return _loaders["task"]


def _result_pickler_class():
    if "result" not in _loaders:
        import dill
        from dill import _dill

        def save_type(pickler, cls):
            if _ADOPTED.get(id(cls)) is cls:
                pickle._Pickler.save_global(pickler, cls)
            else:
                _dill.save_type(pickler, cls)

        class ResultPickler(dill.Pickler):
            dispatch = type(dill.Pickler.dispatch)(dill.Pickler.dispatch)

        ResultPickler.dispatch[type] = save_type
        _loaders["result"] = ResultPickler
    return _loaders["result"]


# -- serve: a warm worker of the process driver -------------------------------

class _Channel:
    """Frame reader and writer on the two pipes given by the parent."""

    def __init__(self, task_fd, result_fd):
        self.task_fd = task_fd
        self.result_fd = result_fd
        self.early = []  # frames read while waiting for a reply, in order

    def read_exactly(self, size):
        buffer = bytearray(size)
        view = memoryview(buffer)
        got = 0
        while got < size:
            n = os.readv(self.task_fd, [view[got:]])
            if n == 0:
                return None
            got += n
        return buffer

    def read_frame(self):
        if self.early:
            return self.early.pop(0)
        return self._read_frame()

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
        header = self.read_exactly(FRAME_HEADER.size)
        if header is None:
            return None
        kind, size = FRAME_HEADER.unpack(header)
        body = self.read_exactly(size) if size else b""
        if body is None:
            return None
        return kind, body

    def write_frame(self, kind, parts=()):
        write_frame(self.result_fd, kind, parts)


def write_frame(fd, kind, parts=()):
    """Write one frame, its body made of ``parts``, blocking until written."""
    size = sum(len(part) for part in parts)
    header = FRAME_HEADER.pack(kind, size)
    if size < 65536:
        parts = [header + b"".join(parts)]
    else:  # no copy of a large body just to prepend a header
        parts = [header] + list(parts)
    for part in parts:
        view = memoryview(part)
        while view:
            view = view[os.write(fd, view):]


_applied_environ = {}  # id(context environ) -> os.environ's raw data after applying it


def _apply_context(context):
    """Give the next task the caller's cwd, environment and sys.path."""
    cwd, environ, path = context
    if cwd is not None:
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


def serve(task_fd, result_fd, idle_timeout, lend_min=0):
    import select
    channel = _Channel(task_fd, result_fd)
    _watch_parent(task_fd)
    waiting = select.poll()  # not select(): our fd number may exceed FD_SETSIZE
    waiting.register(task_fd, select.POLLIN)
    context = None
    while True:
        if idle_timeout > 0 and not channel.early and not waiting.poll(idle_timeout * 1000):
            # Unused for IDLE_TIMEOUT: give the memory back.  Say so first: a
            # task the parent sent meanwhile was never read, and runs elsewhere.
            channel.write_frame(b"Q")
            os._exit(0)
        frame = channel.read_frame()
        if frame is None:
            os._exit(0)
        kind, body = frame
        if kind == b"C":
            context = pickle.loads(body)
        elif kind == b"T":
            if context is not None:
                _apply_context(context)
            try:
                fn = loads_task(body)
            except BaseException as exc:
                outcome = (b"E", [encode_error(exc, TASK_UNLOADABLE)], None)
            else:
                outcome = run_task(fn, lend_min)
                del fn
            _restore_std_fds()
            deliver(outcome, channel.write_frame, channel.await_reply)
            del outcome
        del frame, body


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


_SAVED_STD_FDS = {}


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
        def close_in_child():
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
        os.register_at_fork(after_in_child=close_in_child)


# -- Processes a task starts --------------------------------------------------

_PR_SET_CHILD_SUBREAPER = 36
_libc = []


def preload_libc():
    """Load libc for prctl() now: fork children then get it for free."""
    if not _libc and sys.platform.startswith("linux"):
        try:
            import ctypes
            _libc.append(ctypes.CDLL(None, use_errno=True))
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
        _report(key, "failed:\n" + _safe_format(type(exc), exc, exc.__traceback__))
        return 1
    finally:
        flush_std_streams()
    return 0


def _report(key, what):
    try:
        sys.stderr.write("concurrency: deferred task %s %s" % (key, what))
        sys.stderr.flush()
    except BaseException:
        pass


def supervise(run, key, timeout):
    """Run ``run()`` in a forked child and report a crash or timeout on stderr.

    Returns the exit code to leave with.  The child's processes go with it.
    """
    import signal
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
    status = _wait(pid, timeout)
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    if status is None:
        os.waitpid(pid, 0)
        _report(key, "did not finish within %g s; it was killed\n" % timeout)
        return 1
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        _report(key, "crashed: its process was killed by %s\n" % _signal_name(-code))
    elif code not in (0, 1):  # 1: failed, and run() reported it
        _report(key, "crashed: its process exited with code %d\n" % code)
    return 0 if code == 0 else 1


def _wait(pid, timeout):
    """waitpid() with a timeout in seconds (None: no limit); None on timeout."""
    if timeout is None:
        return os.waitpid(pid, 0)[1]
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        time.sleep(min(left, 0.05))


def _signal_name(number):
    import signal
    try:
        return signal.Signals(number).name
    except ValueError:
        return "signal %d" % number


def run_deferred(payload_path, key, timeout):
    try:
        with open(payload_path, "rb") as payload:
            body = payload.read()
    finally:
        try:
            os.unlink(payload_path)
        except OSError:
            pass
    context, task = pickle.loads(body)
    _apply_context(context)
    try:
        fn = loads_task(task)
    except BaseException as exc:
        _report(key, "could not be unserialized:\n"
                + _safe_format(type(exc), exc, exc.__traceback__))
        return 1
    if not hasattr(os, "fork"):
        return run_reporting(fn, key)
    return supervise(lambda: run_reporting(fn, key), key, timeout)


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
    # Tasks name function_from_template by this name (python worker.py runs
    # it as __main__, which is replaced below).
    sys.modules.setdefault("_concurrency_worker", sys.modules[__name__])
    if mode == "serve":
        _ignore_sigint()
    # User code runs in a __main__ of its own: classes adopted from the
    # parent's __main__ land there and can't clobber this module's names.
    sys.modules["__main__"] = types.ModuleType("__main__")
    if mode == "serve":
        task_fd, result_fd, idle_timeout = int(argv[2]), int(argv[3]), float(argv[4])
        lend_min = int(argv[5]) if len(argv) > 5 else 0
        _protect_channel(task_fd, result_fd)
        become_subreaper()
        _save_std_fds()
        serve(task_fd, result_fd, idle_timeout, lend_min)
    elif mode == "defer":
        timeout = None if argv[4] == "None" else float(argv[4])
        return run_deferred(argv[2], argv[3], timeout)
    sys.stderr.write("worker.py is started by the concurrency library, not by hand.\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
