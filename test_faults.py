"""Fault injection: crashes, signals, hostile exceptions and results,
unserializable tasks, runaway tasks, noisy output, stray child processes,
a killed or interrupted parent, threads, huge payloads and load.

Each case runs on a warm driver that has already served tasks, asserts the
exact outcome, then checks that the same driver still serves a normal run.
The long soak runs only with CONCURRENCY_SOAK=1 (.ci/run does).
"""

import ctypes
import io
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import unittest

import concurrency
from test_concurrency import (HAVE_PROC, LONG_TIMEOUT, SHORT_TIMEOUT, CleanTestCase,
                              ScriptTestCase, TwoArgError, descendants, marked_processes,
                              pid_alive, raise_two_arg_error, read_file, wait_until, write_file)

SOAK = os.environ.get("CONCURRENCY_SOAK") == "1"
MB = 1 << 20
LEFT_RUNNING = []


def interrupt_once_in(*functions):
    """Lines for a script's body, placed at a line's indentation in a test's
    source (as the others there, before dedent): Ctrl-C,
    once, while the main thread runs one of ``functions`` (named as in
    their code), caught there by a SIGALRM every millisecond."""
    return textwrap.indent(textwrap.dedent("""\
        fired = []
        def handler(signum, frame):
            while frame is not None and not fired:
                if frame.f_code.co_name in %r:
                    fired.append(True)
                    raise KeyboardInterrupt
                frame = frame.f_back
        signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
        """ % (functions,)), " " * 12).lstrip(" ")  # the first line follows the script's


class Stop(BaseException):
    """A BaseException subclass of the user's own."""


class UnpicklableError(Exception):
    def __init__(self, message):
        super().__init__(message)
        self.rows = (n for n in range(3))  # a generator: no pickler takes it


class ReduceRaisesError(Exception):
    def __reduce__(self):
        raise RuntimeError("__reduce__ refuses")


def _explode(*args):
    raise RuntimeError("unpickling refuses")


class UnpickleRaisesError(Exception):
    def __reduce__(self):
        return _explode, self.args


class ArgsRaiseError(Exception):
    @property
    def args(self):
        raise RuntimeError("args refuses")

    @property
    def __dict__(self):
        raise RuntimeError("__dict__ refuses")

    def __reduce__(self):
        raise RuntimeError("__reduce__ refuses")


class ReduceRaisesValue:
    def __reduce__(self):
        raise RuntimeError("this value refuses to be pickled")


def _fail_in(pid):
    if os.getpid() == pid:
        raise RuntimeError("this value refuses to be unpickled here")
    return "unpickled elsewhere"


class UnpicklesOnlyInChild:
    def __init__(self, parent):
        self.parent = parent

    def __reduce__(self):
        return _fail_in, (self.parent,)


def rss_bytes():
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def open_fds():
    return len(os.listdir("/proc/self/fd"))


class FaultTests:
    """Faults every child-process driver must survive; one TestCase each."""

    driver = None

    def setUp(self):
        super().setUp()
        self.d = concurrency.driver(self.driver)
        self.assertEqual(self.d.run([lambda: "warm", lambda: "up"]), ["warm", "up"])

    def assertStillServes(self):
        self.assertEqual(self.d.run({"a": lambda: 1, "b": lambda: 2}), {"a": 1, "b": 2})

    # -- crashes ------------------------------------------------------------

    def test_os_exit_fails_only_its_task(self):
        result = self.d.run({"ok": lambda: "kept", "exit": lambda: os._exit(99),
                             "ok2": lambda: "kept too"}, return_exceptions=True)
        self.assertEqual((result["ok"], result["ok2"]), ("kept", "kept too"))
        crash = result["exit"]
        self.assertIsInstance(crash, concurrency.WorkerCrashed)
        self.assertEqual((crash.key, crash.exitcode, crash.signal), ("exit", 99, None))
        self.assertIn("'exit'", str(crash))
        self.assertIn("99", str(crash))
        self.assertStillServes()

    def test_signals_name_the_signal(self):
        faults = {
            "SIGKILL": lambda: os.kill(os.getpid(), signal.SIGKILL),
            "SIGTERM": lambda: os.kill(os.getpid(), signal.SIGTERM),
            "SIGSEGV": lambda: ctypes.string_at(0),
        }
        for name, fault in faults.items():
            with self.subTest(signal=name):
                result = self.d.run({"fault": fault, "ok": lambda: "kept"},
                                    return_exceptions=True)
                self.assertEqual(result["ok"], "kept")
                self.assertIsInstance(result["fault"], concurrency.WorkerCrashed)
                self.assertEqual((result["fault"].key, result["fault"].signal), ("fault", name))
                self.assertIn(name, str(result["fault"]))
                self.assertStillServes()

    def test_crash_amid_many_tasks_on_one_worker_fails_only_its_task(self):
        # One worker and a long queue: tasks travel to it several at a time.
        one = type(self.d)(max_workers=1)
        tasks = [lambda i=i: i for i in range(12)]
        tasks[5] = lambda: os._exit(5)
        result = one.run(tasks, return_exceptions=True)
        self.assertIsInstance(result[5], concurrency.WorkerCrashed)
        self.assertEqual(result[:5] + result[6:], [0, 1, 2, 3, 4] + list(range(6, 12)))
        self.assertEqual(one.run([lambda: "after"]), ["after"])

    def test_timeout_amid_many_tasks_on_one_worker_names_them_all(self):
        one = type(self.d)(max_workers=1)
        tasks = [lambda: 0, lambda: time.sleep(600)] + [lambda i=i: i for i in range(2, 12)]
        result = one.run(tasks, timeout=1.0, return_exceptions=True)
        self.assertEqual(result[0], 0)
        for value in result[1:]:
            self.assertIsInstance(value, concurrency.TaskTimeout)
            self.assertEqual(value.unfinished, list(range(1, 12)))

    def test_quick_tasks_queued_behind_a_slow_one_run_on_a_free_child(self):
        # Several tasks travel to a child at once; the ones behind a task
        # that never ends move to the children that are free.
        tasks = [lambda: time.sleep(600)] + [lambda i=i: i for i in range(1, 100)]
        started = time.monotonic()
        result = self.d.run(tasks, timeout=2.0, return_exceptions=True)
        self.assertLess(time.monotonic() - started, 2.0 + SHORT_TIMEOUT)
        self.assertIsInstance(result[0], concurrency.TaskTimeout)
        self.assertEqual(result[0].unfinished, [0])
        self.assertEqual(result[1:], list(range(1, 100)))
        self.assertStillServes()

    def test_tasks_that_move_between_children_run_exactly_once(self):
        # Every seventh task is slow enough for the ones queued behind it to
        # move elsewhere, over and over, racing the child that would take
        # them: each task still runs once, its outcome in its own slot.
        log = self.path("ran")

        def task(i):
            with open(log, "a") as file:
                file.write("%d\n" % i)
            if i % 7 == 0:
                time.sleep(0.02)
            return i * i

        for round_ in range(3):
            with self.subTest(round=round_):
                write_file(log, "")
                result = self.d.run([lambda i=i: task(i) for i in range(300)])
                self.assertEqual(result, [i * i for i in range(300)])
                ran = sorted(int(line) for line in read_file(log).split())
                self.assertEqual(ran, list(range(300)))
        self.assertStillServes()

    # -- exceptions ---------------------------------------------------------

    def test_base_exceptions_are_task_failures_of_the_same_class(self):
        for cls in (SystemExit, KeyboardInterrupt, GeneratorExit, Stop):
            with self.subTest(cls=cls.__name__):
                def task(cls=cls):
                    raise cls("stop here")
                result = self.d.run({"raise": task, "ok": lambda: "kept"},
                                    return_exceptions=True)
                self.assertIs(type(result["raise"]), cls)
                self.assertEqual(result["ok"], "kept")
        with self.assertRaises(SystemExit):
            self.d.run([lambda: sys.exit(3)])
        self.assertStillServes()

    def test_exception_with_multi_argument_init(self):
        with self.assertRaises(TwoArgError) as caught:
            self.d.run([lambda: 1, raise_two_arg_error])
        self.assertEqual(caught.exception.code, 42)
        self.assertStillServes()

    def test_exception_that_fails_to_pickle_becomes_remote_error(self):
        def task():
            raise UnpicklableError("rows went missing")
        with self.assertRaises(concurrency.RemoteError) as caught:
            self.d.run({"t": task})
        error = caught.exception
        self.assertEqual(error.type_name, "test_faults.UnpicklableError")
        self.assertEqual(error.message, "rows went missing")
        self.assertIn("raise UnpicklableError", error.traceback)
        self.assertIn("test_faults.UnpicklableError: rows went missing", str(error))
        self.assertStillServes()

    def test_exception_whose_reduce_raises_keeps_its_class(self):
        def task():
            raise ReduceRaisesError("reduce me")
        with self.assertRaises(ReduceRaisesError) as caught:
            self.d.run([task])
        self.assertEqual(str(caught.exception), "reduce me")
        self.assertStillServes()

    def test_exception_whose_unpickling_raises_keeps_its_class(self):
        def task():
            raise UnpickleRaisesError("unpickle me")
        with self.assertRaises(UnpickleRaisesError) as caught:
            self.d.run([task])
        self.assertEqual(str(caught.exception), "unpickle me")
        self.assertStillServes()

    def test_exception_whose_args_and_dict_raise_becomes_remote_error(self):
        def task():
            raise ArgsRaiseError("no way to copy me")
        with self.assertRaises(concurrency.RemoteError) as caught:
            self.d.run({"t": task})
        self.assertEqual(caught.exception.type_name, "test_faults.ArgsRaiseError")
        self.assertEqual(caught.exception.message, "no way to copy me")
        self.assertStillServes()

    # -- results ------------------------------------------------------------

    def test_results_that_cannot_travel_fail_only_their_task(self):
        parent = os.getpid()
        result = self.d.run({
            "generator": lambda: (n for n in range(3)),
            "reduce raises": lambda: ReduceRaisesValue(),
            "unpickling raises": lambda: UnpicklesOnlyInChild(parent),
            "ok": lambda: "kept",
        }, return_exceptions=True)
        self.assertEqual(result.pop("ok"), "kept")
        for key, error in result.items():
            with self.subTest(key=key):
                self.assertIsInstance(error, concurrency.SerializationError)
                self.assertEqual((error.key, error.what), (key, "result"))
                self.assertIn(repr(key), str(error))
                self.assertIsNotNone(error.__cause__)
        self.assertIn("refuses to be unpickled here", str(result["unpickling raises"]))
        self.assertIn("generator", str(result["generator"]))
        self.assertStillServes()

    # -- runaway tasks ------------------------------------------------------

    def check_runaway(self, runaway):
        pid_file = self.path("pid")

        def task():
            write_file(pid_file, str(os.getpid()))
            runaway()

        started = time.monotonic()
        result = self.d.run({"runaway": task, "ok": lambda: "kept"}, timeout=1.0,
                            return_exceptions=True)
        self.assertLess(time.monotonic() - started, 1.0 + 1.0)
        self.assertIsInstance(result["runaway"], concurrency.TaskTimeout)
        self.assertIsInstance(result["runaway"], TimeoutError)
        self.assertEqual(result["runaway"].unfinished, ["runaway"])
        self.assertIn("'runaway'", str(result["runaway"]))
        self.assertEqual(result["ok"], "kept")
        self.assertFalse(pid_alive(int(read_file(pid_file))))
        self.assertStillServes()

    def test_large_results_keep_shared_and_cyclic_references(self):
        def shared():
            buffer = bytearray(b"x" * (2 * MB))
            return [buffer, buffer]

        def cyclic():
            items = [b"y" * (2 * MB)]
            items.append(items)
            return items

        def deeper():
            data = b"z" * (2 * MB)
            return [data, {"again": data}]

        def dict_of_itself():
            table = {"big": bytearray(2 * MB)}
            table["me"] = table
            return table

        first, loop, nested, table = self.d.run([shared, cyclic, deeper, dict_of_itself])
        self.assertIs(first[0], first[1])
        self.assertEqual(len(first[0]), 2 * MB)
        self.assertIs(loop[1], loop)
        self.assertIs(nested[0], nested[1]["again"])
        self.assertIs(table["me"], table)
        self.assertStillServes()

    @unittest.skipUnless(concurrency._state.lending, "lending is Linux's, and on")
    def test_a_signal_handler_raising_while_large_results_are_copied_propagates(self):
        class Alarm(Exception):
            pass

        raised = []

        def handler(signum, frame):
            # Raise once, while the parent copies lent buffers out of a child.
            while frame is not None and not raised:
                if frame.f_code is concurrency._copy_lent.__code__:
                    raised.append(True)
                    raise Alarm()
                frame = frame.f_back

        previous = signal.signal(signal.SIGALRM, handler)
        self.addCleanup(signal.signal, signal.SIGALRM, previous)
        self.addCleanup(signal.setitimer, signal.ITIMER_REAL, 0)
        big = [lambda: b"a" * (96 * MB), lambda: bytearray(b"b" * (96 * MB))]
        signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
        with self.assertRaises(Alarm):
            for _ in range(20):
                self.d.run(big, timeout=LONG_TIMEOUT)
        signal.setitimer(signal.ITIMER_REAL, 0)
        self.assertTrue(concurrency._state.lending, "lending was switched off")
        self.assertEqual([thread.name for thread in threading.enumerate()
                          if thread.name == "concurrency-copy"], [])
        first, second = self.d.run(big, timeout=LONG_TIMEOUT)
        self.assertTrue(first == b"a" * (96 * MB) and second == b"b" * (96 * MB))
        self.assertStillServes()

    def test_busy_loop_times_out(self):
        def spin():
            while True:
                pass
        self.check_runaway(spin)

    def test_long_sleep_times_out(self):
        self.check_runaway(lambda: time.sleep(1e9))

    def test_blocked_read_times_out(self):
        def block():
            read_end, _write_end = os.pipe()
            os.read(read_end, 1)  # nobody will ever write
        self.check_runaway(block)

    def test_reading_stdin_gets_end_of_file_instead_of_blocking(self):
        # Tasks get /dev/null as stdin (as multiprocessing's children do):
        # input() fails at once rather than waiting on the terminal.
        result = self.d.run([lambda: sys.stdin.read(), input], return_exceptions=True)
        self.assertEqual(result[0], "")
        self.assertIsInstance(result[1], EOFError)
        self.assertStillServes()

    # -- output -------------------------------------------------------------

    def test_closing_stdout_and_stderr_does_not_break_results(self):
        def close_std():
            os.close(1)
            os.close(2)
            sys.stdout = None  # and the stream: print() then does nothing
            return "closed"
        # More tasks than children: several run in one, one after another.
        self.assertEqual(self.d.run([close_std] * 6), ["closed"] * 6)
        self.assertEqual(self.d.run([lambda: sys.stdout is not None and os.fstat(1)
                                     and (print("", end=""), "printed")[1]] * 6),
                         ["printed"] * 6)
        # The next tasks, maybe on the same warm worker, print fine.
        self.assertEqual(self.d.run([lambda: print("", end="") or "printed"]), ["printed"])
        self.assertStillServes()

    def test_a_task_that_closes_or_replaces_the_std_streams_breaks_no_later_task(self):
        single = type(self.d)(max_workers=1)

        def close_streams():
            sys.stdout.close()
            sys.stderr.close()
            sys.stdin.close()
            return "closed"

        def replace_streams():
            sys.stdout = io.StringIO()
            sys.stderr = io.StringIO()
            return "replaced"

        def close_replaced():
            sys.stdout = io.StringIO()
            sys.__stdout__.close()
            return "closed behind a replacement"

        def prints():
            print("", end="", flush=True)
            sys.stderr.write("")
            sys.stderr.flush()
            return (sys.stdout.fileno(), sys.stderr.fileno(), sys.stdin.fileno(),
                    sys.stdout.closed, sys.stderr.closed)

        fine = (1, 2, 0, False, False)
        for spoiler in (close_streams, replace_streams, close_replaced):
            with self.subTest(spoiler=spoiler.__name__):
                # In one run, one after the other on its one child; then in
                # the next run, on the same warm worker where there is one.
                result = single.run([spoiler, prints, spoiler, prints])
                self.assertEqual(result[1::2], [fine, fine])
                self.assertEqual(single.run([prints]), [fine])

    # -- processes a task starts --------------------------------------------

    def check_no_leftover(self, starter):
        [pid] = self.d.run([starter])
        self.assertIsInstance(pid, int)
        wait_until(lambda: not pid_alive(pid), SHORT_TIMEOUT, "the task's child to end")
        self.assertStillServes()

    def test_a_forked_process_that_returns_never_speaks_for_the_run(self):
        def fork_and_return(n):
            if os.fork() == 0:
                return "stray"  # returns into our code, as if it were the task
            time.sleep(0.5)  # the task goes on: the stray outlives its return
            return n

        def fork_and_raise(n):
            if os.fork() == 0:
                raise ValueError("raised in the forked process")
            time.sleep(0.5)
            return n

        tasks = [lambda: fork_and_return(0), lambda: fork_and_raise(1)]
        tasks += [lambda i=i: i for i in range(2, 40)]
        self.assertEqual(self.d.run(tasks, timeout=LONG_TIMEOUT), list(range(40)))
        self.assertStillServes()

    def test_a_task_s_child_forks_again_and_keeps_its_own_files(self):
        def fork_twice():
            # The child opens files (taking the lowest free numbers), then
            # forks: the grandchild must find them open.
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:
                status = 1
                try:
                    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(8)]
                    grandchild = os.fork()
                    if grandchild == 0:
                        try:
                            for fd in held:
                                os.fstat(fd)
                            os.write(write_end, b"ok")
                        finally:
                            os._exit(0)
                    os.waitpid(grandchild, 0)
                    status = 0
                finally:
                    os._exit(status)
            os.close(write_end)
            os.waitpid(pid, 0)
            with os.fdopen(read_end, "rb") as file:
                return file.read()
        self.assertEqual(self.d.run([fork_twice]), [b"ok"])
        self.assertStillServes()

    def test_forked_child_left_running_is_ended_with_the_task(self):
        def start():
            pid = os.fork()
            if pid == 0:
                time.sleep(600)
                os._exit(0)
            return pid
        self.check_no_leftover(start)

    def test_subprocess_left_running_is_ended_with_the_task(self):
        def start():
            child = subprocess.Popen(["sleep", "600"])
            LEFT_RUNNING.append(child)  # no "still running" warning when collected
            return child.pid
        self.check_no_leftover(start)

    @unittest.skipUnless(sys.platform.startswith("linux"), "orphans come back only on Linux")
    def test_daemonized_grandchild_is_ended_with_the_task(self):
        def start():
            read_end, write_end = os.pipe()
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    os.write(write_end, str(os.getpid()).encode())
                    time.sleep(600)
                os._exit(0)
            return int(os.read(read_end, 32))
        self.check_no_leftover(start)

    def test_children_of_a_timed_out_task_are_ended_too(self):
        pid_file = self.path("grandchild")

        def task():
            child = subprocess.Popen(["sleep", "600"])
            write_file(pid_file, str(child.pid))
            time.sleep(600)

        result = self.d.run([task], timeout=1.0, return_exceptions=True)
        self.assertIsInstance(result[0], concurrency.TaskTimeout)
        grandchild = int(read_file(pid_file))
        wait_until(lambda: not pid_alive(grandchild), SHORT_TIMEOUT, "the grandchild to end")
        self.assertStillServes()

    def test_nested_run_works_and_leaves_no_process(self):
        def outer():
            return concurrency.driver("process").run([os.getpid, os.getpid])
        [inner_pids] = self.d.run([outer])
        for pid in inner_pids:
            wait_until(lambda: not pid_alive(pid), SHORT_TIMEOUT, "nested workers to end")
        self.assertStillServes()

    # -- threads --------------------------------------------------------------

    def test_ten_threads_times_twenty_runs(self):
        failures = []

        def client(n):
            try:
                for i in range(20):
                    got = self.d.run({"n": lambda: n, "i": lambda: i * i})
                    if got != {"n": n, "i": i * i}:
                        failures.append((n, i, got))
            except Exception as exc:  # reported by the assertion below
                failures.append((n, exc))

        threads = [threading.Thread(target=client, args=(n,)) for n in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(LONG_TIMEOUT)
            self.assertFalse(thread.is_alive(), "a run deadlocked")
        self.assertEqual(failures, [])
        self.assertStillServes()

    # -- load -----------------------------------------------------------------

    def test_five_thousand_tiny_tasks(self):
        limited = type(self.d)(max_workers=3)
        limited.run([lambda: 0] * 3)
        fds, rss = open_fds(), rss_bytes()
        result = limited.run([lambda i=i: (i, os.getpid()) for i in range(5000)])
        self.assertEqual([i for i, _pid in result], list(range(5000)))
        if self.driver == "process":  # fork: a new child per task
            self.assertLessEqual(len({pid for _i, pid in result}), 3)
        del result
        self.assertLessEqual(open_fds(), fds + 2)
        self.assertLess(rss_bytes(), rss + 32 * MB)

    @unittest.skipUnless(SOAK, "the soak runs with CONCURRENCY_SOAK=1")
    def test_soak_ten_thousand_sequential_runs(self):
        for _ in range(100):
            self.d.run([lambda: 1, lambda: 2])
        fds, rss = open_fds(), rss_bytes()
        for i in range(10000):
            self.assertEqual(self.d.run([lambda: i, lambda: -i]), [i, -i])
            if i % 100 == 0:
                self.assertLessEqual(len(descendants()), self.d.max_workers)
        self.assertLessEqual(open_fds(), fds + 2)
        self.assertLess(rss_bytes(), rss + 32 * MB)


class ProcessFaultTest(FaultTests, CleanTestCase):
    driver = "process"

    def test_unserializable_tasks_fail_before_any_task_starts(self):
        marker = self.path("started")
        gen = (n for n in range(3))
        sock = socket.socket()
        self.addCleanup(sock.close)
        connection = sqlite3.connect(":memory:")
        self.addCleanup(connection.close)
        nested = []
        for _ in range(100000):
            nested = [nested]
        faults = {
            "generator": lambda: next(gen),
            "socket": lambda: sock.fileno(),
            "connection": lambda: connection.execute("SELECT 1").fetchone(),
            "deep": lambda: len(nested),
        }
        for key, task in faults.items():
            with self.subTest(key=key):
                with self.assertRaises(concurrency.SerializationError) as caught:
                    self.d.run({"first": lambda: write_file(marker, "x"), key: task})
                self.assertEqual((caught.exception.key, caught.exception.what), (key, "task"))
                self.assertIn(repr(key), str(caught.exception))
                self.assertIsNotNone(caught.exception.__cause__)
                self.assertFalse(os.path.exists(marker))
        self.assertStillServes()


@unittest.skipUnless(hasattr(os, "fork"), "needs os.fork")
class ForkFaultTest(FaultTests, CleanTestCase):
    driver = "fork"

    def test_tasks_over_unserializable_objects_run(self):
        gen = (n for n in range(3))
        sock = socket.socket()
        self.addCleanup(sock.close)
        connection = sqlite3.connect(":memory:")
        self.addCleanup(connection.close)
        lock = threading.Lock()
        self.assertEqual(self.d.run([lambda: next(gen), lambda: sock.fileno() > 0,
                                     lambda: connection.execute("SELECT 7").fetchone(),
                                     lambda: lock.locked()]),
                         [0, True, (7,), False])


class SyncFaultTest(CleanTestCase):
    """The faults that apply to the in-process driver."""

    def setUp(self):
        super().setUp()
        self.d = concurrency.driver("sync")

    def test_base_exceptions_propagate_as_themselves(self):
        for cls in (SystemExit, KeyboardInterrupt, GeneratorExit, Stop):
            with self.subTest(cls=cls.__name__):
                def task(cls=cls):
                    raise cls("stop here")
                with self.assertRaises(cls):
                    self.d.run([task])

    def test_hostile_exceptions_propagate_unchanged(self):
        for exc in (UnpicklableError("x"), ReduceRaisesError("y"), UnpickleRaisesError("z")):
            with self.subTest(exc=type(exc).__name__):
                def task(exc=exc):
                    raise exc
                with self.assertRaises(type(exc)) as caught:
                    self.d.run([task])
                self.assertIs(caught.exception, exc)

    def test_unserializable_tasks_and_results_are_fine(self):
        gen = (n for n in range(3))
        self.assertEqual(self.d.run([lambda: next(gen)]), [0])
        [value] = self.d.run([lambda: ReduceRaisesValue()])
        self.assertIsInstance(value, ReduceRaisesValue)


# -- Faults seen from a user's script -----------------------------------------

@unittest.skipUnless(HAVE_PROC and hasattr(os, "fork"), "needs /proc and os.fork")
class WorkerPlumbingTest(CleanTestCase):

    def test_a_worker_whose_pipe_was_closed_leaves_without_a_word(self):
        # As when the parent retires an idle worker the moment it leaves by
        # itself: its "leaving" frame meets a closed pipe.
        task_r, task_w = os.pipe()
        result_r, result_w = os.pipe()
        claim_r, claim_w = os.pipe()
        os.set_blocking(claim_r, False)
        worker = subprocess.Popen(
            concurrency._worker_command("serve", str(task_r), str(result_w), "0.05", "0",
                                        str(claim_r)),
            pass_fds=(task_r, result_w, claim_r) + concurrency._worker_fds(),
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
        os.close(task_r)
        os.close(result_w)
        os.close(claim_r)
        os.close(result_r)  # before it has said anything
        try:
            _out, err = worker.communicate(timeout=LONG_TIMEOUT)
        finally:
            os.close(task_w)
            os.close(claim_w)
        self.assertEqual(err, b"")
        self.assertEqual(worker.returncode, 0)


class ScriptFaultTest(ScriptTestCase):

    def test_megabytes_of_output_and_fake_frames_leave_results_intact(self):
        for driver in ("process", "fork"):
            with self.subTest(driver=driver):
                done = self.run_script("""\
                    import os, sys
                    import concurrency
                    def noisy(n):
                        sys.stdout.write("o" * (4 << 20))
                        sys.stdout.flush()
                        os.write(2, b"e" * (2 << 20))
                        # What a result frame looks like on our pipes.
                        os.write(1, b"R" + (5).to_bytes(8, "big") + b"phish")
                        return n
                    result = concurrency.driver(sys.argv[1]).run([lambda: noisy(1),
                                                                  lambda: noisy(2)])
                    print()
                    print(result)
                    """.replace("sys.argv[1]", repr(driver)))
                self.assertSucceeded(done)
                self.assertEqual(done.stdout.splitlines()[-1], "[1, 2]")
                self.assertEqual(done.stdout.count("o"), 2 * (4 << 20))
                self.assertEqual(done.stdout.count("phish"), 2)
                self.assertEqual(done.stderr.count("e"), 2 * (2 << 20))

    def test_parent_killed_mid_run_leaves_no_worker(self):
        for driver in ("process", "fork"):
            with self.subTest(driver=driver):
                argv, env, cwd = self.script("""\
                    import os, subprocess, sys, time
                    import concurrency
                    def task(n):
                        subprocess.Popen(["sleep", "600"])  # a grandchild, too
                        open("started-%d" % n, "w").close()
                        time.sleep(600)
                    concurrency.driver(sys.argv[1]).run([lambda: task(1), lambda: task(2)])
                    """)
                script = subprocess.Popen(argv + [driver], env=env, cwd=cwd)
                self.addCleanup(script.wait, SHORT_TIMEOUT)
                self.addCleanup(script.kill)
                wait_until(lambda: all(os.path.exists(os.path.join(cwd, "started-%d" % n))
                                       for n in (1, 2)), LONG_TIMEOUT, "the tasks to start")
                self.assertGreaterEqual(len(marked_processes(self.mark)), 5)
                script.kill()
                script.wait(SHORT_TIMEOUT)
                self.assert_marked_processes_gone(within=10)

    def test_ctrl_c_mid_run(self):
        for driver in ("process", "fork"):
            with self.subTest(driver=driver):
                argv, env, cwd = self.script("""\
                    import os, sys, time
                    import concurrency
                    def task(n):
                        open("started-%d" % n, "w").close()
                        time.sleep(600)
                    try:
                        concurrency.driver(sys.argv[1]).run([lambda: task(1), lambda: task(2)])
                    except KeyboardInterrupt:
                        print("interrupted", flush=True)
                    """)
                # A terminal's Ctrl-C: SIGINT to the whole foreground process group.
                script = subprocess.Popen(argv + [driver], env=env, cwd=cwd,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, start_new_session=True)
                self.addCleanup(script.wait, SHORT_TIMEOUT)
                self.addCleanup(script.kill)
                wait_until(lambda: all(os.path.exists(os.path.join(cwd, "started-%d" % n))
                                       for n in (1, 2)), LONG_TIMEOUT, "the tasks to start")
                started = time.monotonic()
                os.killpg(script.pid, signal.SIGINT)
                out, err = script.communicate(timeout=SHORT_TIMEOUT)
                self.assertLess(time.monotonic() - started, 2.0)
                self.assertEqual(script.returncode, 0, err)
                self.assertEqual(out.strip(), "interrupted")
                self.assertEqual(err, "")
                self.assert_marked_processes_gone()

    HUGE_SCRIPT = """\
        import json, os, sys
        import concurrency

        def rss():
            with open("/proc/self/statm") as file:
                return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

        d = concurrency.driver(sys.argv[1])
        d.run([lambda: 0])
        case = sys.argv[2]
        base = rss()
        if case == "capture":
            blob = b"c" * (100 << 20)
            [size] = d.run([lambda: len(blob) + blob.count(b"c")])
            ok = size == 2 * len(blob)
            payload = len(blob)
        elif case == "result":
            [blob] = d.run([lambda: b"r" * (256 << 20)])
            ok = len(blob) == 256 << 20 and blob.count(b"r") == len(blob)
            payload = len(blob)
        else:
            [rows] = d.run([lambda: [(i, str(i)) for i in range(1000000)]])
            ok = len(rows) == 1000000 and rows[-1] == (999999, "999999")
            payload = rss() - base  # what the result takes in memory
        # VmHWM, not ru_maxrss: that one keeps the peak of the process we
        # were forked from before exec (the test runner's).
        with open("/proc/self/status") as file:
            peak = [int(line.split()[1]) * 1024 for line in file if line.startswith("VmHWM:")][0]
        print(json.dumps({"ok": ok, "growth": peak - base, "payload": payload}))
        """

    def test_crash_is_never_reported_as_a_clean_exit_when_children_are_reaped_elsewhere(self):
        for setup in ("signal.signal(signal.SIGCHLD, signal.SIG_IGN)",
                      "signal.signal(signal.SIGCHLD, reap_every_child)"):
            for driver in ("process", "fork"):
                with self.subTest(setup=setup, driver=driver):
                    done = self.run_script("""\
                        import json, os, signal, sys
                        import concurrency
                        def reap_every_child(signum, frame):
                            try:
                                while os.waitpid(-1, os.WNOHANG)[0]:
                                    pass
                            except ChildProcessError:
                                pass
                        %s
                        d = concurrency.driver(sys.argv[1])
                        report = []
                        for crash in (lambda: os.kill(os.getpid(), signal.SIGKILL),
                                      lambda: os._exit(0)):
                            out = d.run({"crash": crash, "fine": lambda: 7},
                                        return_exceptions=True)
                            report.append([type(out["crash"]).__name__,
                                           getattr(out["crash"], "exitcode", "-"),
                                           str(out["crash"]), out["fine"]])
                        print(json.dumps(report))
                        """ % setup, argv_extra=[driver])
                    self.assertSucceeded(done)
                    for name, exitcode, message, fine in json.loads(done.stdout.splitlines()[-1]):
                        self.assertEqual((name, fine), ("WorkerCrashed", 7))
                        if exitcode is None:
                            self.assertIn("how is unknown", message)
                        else:
                            self.assertIn(exitcode, (-signal.SIGKILL, 0))
                    # The kill can't pass for a clean exit.
                    self.assertNotEqual(json.loads(done.stdout.splitlines()[-1])[0][1], 0)

    def test_classes_of_a_script_run_under_cprofile_or_exec_come_back_as_themselves(self):
        source = """\
            import json, sys
            import concurrency

            class Row:
                def __init__(self, n):
                    self.n = n

            class Failed(Exception):
                pass

            def throw(error):
                raise error

            def local():
                class LocalError(Exception):
                    pass
                try:
                    concurrency.driver(sys.argv[1]).run([lambda: throw(LocalError("x"))])
                except LocalError:
                    return "caught"
                except Exception as exc:
                    return "missed %r" % exc

            d = concurrency.driver(sys.argv[1])
            out = {}
            [row] = d.run([lambda: Row(3)])
            out["row"] = [type(row) is Row, row.n]
            try:
                d.run([lambda: throw(Failed("f"))])
            except Failed:
                out["failed"] = "caught"
            except Exception as exc:
                out["failed"] = repr(exc)
            out["local"] = local()
            print(json.dumps(out))
            """
        for how in ("cProfile", "exec"):
            for driver in ("process", "fork"):
                with self.subTest(how=how, driver=driver):
                    argv, env, cwd = self.script(source)
                    if how == "cProfile":
                        argv = [sys.executable, "-m", "cProfile", "-o", os.devnull] + argv[1:]
                    else:  # a namespace of its own named __main__, as runners make
                        argv = [sys.executable, "-c", "import sys; sys.argv = sys.argv[1:]; "
                                "exec(compile(open(sys.argv[0]).read(), sys.argv[0], 'exec'), "
                                "{'__name__': '__main__'})"] + argv[1:]
                    done = subprocess.run(argv + [driver], env=env, cwd=cwd, capture_output=True,
                                          text=True, timeout=LONG_TIMEOUT)
                    self.assert_marked_processes_gone()
                    self.assertSucceeded(done)
                    self.assertEqual(json.loads(done.stdout.splitlines()[-1]),
                                     {"row": [True, 3], "failed": "caught", "local": "caught"})

    def test_local_module_found_after_an_interactive_session_changes_directory(self):
        argv, env, cwd = self.script("")
        write_file(os.path.join(cwd, "shop.py"), "def count():\n    return 42\n")
        other = self.subdir("elsewhere")
        code = textwrap.dedent("""\
            import json, os, sys
            import concurrency
            import shop  # found through "" on sys.path, as in a python shell
            os.chdir(%r)
            print(json.dumps([concurrency.driver(name).run([lambda: shop.count()])[0]
                              for name in ("process", "fork")]))
            """ % other)
        done = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd,
                              capture_output=True, text=True, timeout=LONG_TIMEOUT)
        self.assert_marked_processes_gone()
        self.assertSucceeded(done)
        self.assertEqual(json.loads(done.stdout.splitlines()[-1]), [42, 42])

    def test_an_environment_variable_too_large_to_exec_still_reaches_tasks(self):
        out = self.subdir("out")
        done = self.run_script("""\
            import json, os
            import concurrency
            os.environ["HUGE"] = "x" * (200 * 1024)  # over execve's 128 KiB a variable
            def sizes():
                return len(os.environ["HUGE"]), os.environ.get("PATH") == %r
            concurrency.driver("process").defer(
                [lambda: open(os.path.join(%r, "deferred"), "w").write(str(sizes()[0]))])
            print(json.dumps(concurrency.driver("process").run([sizes, sizes])))
            """ % (os.environ.get("PATH"), out))
        self.assertSucceeded(done)
        self.assertEqual(json.loads(done.stdout.splitlines()[-1]), [[204800, True]] * 2)
        wait_until(lambda: os.path.exists(os.path.join(out, "deferred")), LONG_TIMEOUT,
                   "the deferred task")
        wait_until(lambda: read_file(os.path.join(out, "deferred")) == "204800",
                   SHORT_TIMEOUT, "the deferred task's output")

    def test_a_caller_with_stdout_and_stderr_closed(self):
        out = self.path("report.json")
        argv, env, cwd = self.script("""\
            import json, os, sys
            import concurrency
            def noisy(n):
                print("printed by task", n)
                try:
                    os.write(2, b"raw write to stderr\\n")
                except OSError:
                    pass
                return n
            report = {}
            for name in ("process", "fork"):
                first = concurrency.driver(name).run([lambda: noisy(1), lambda: noisy(2)])
                try:
                    os.write(2, b"the caller writes to fd 2\\n")  # closed: EBADF here
                except OSError:
                    pass
                report[name] = [first, concurrency.driver(name).run([lambda: noisy(3)])]
            with open(sys.argv[1], "w") as file:
                json.dump(report, file)
            """)
        done = subprocess.run(["sh", "-c", 'exec "$@" >&- 2>&-', "sh"] + argv + [out],
                              env=env, cwd=cwd, timeout=LONG_TIMEOUT)
        self.assert_marked_processes_gone()
        self.assertEqual(done.returncode, 0)
        self.assertEqual(json.loads(read_file(out)),
                         {"process": [[1, 2], [3]], "fork": [[1, 2], [3]]})

    def test_workers_run_with_the_caller_s_interpreter_flags(self):
        argv, env, cwd = self.script("""\
            import json, os, sys
            sys.path.insert(0, %r)  # -I ignores PYTHONPATH and the script's folder
            import concurrency
            def flags():
                return [sys.flags.isolated, sys.flags.optimize, "sitecustomize" in sys.modules,
                        [str(option) for option in sys.warnoptions]]
            print(json.dumps([flags()] + concurrency.driver("process").run([flags])))
            """ % os.path.dirname(os.path.abspath(concurrency.__file__)))
        site = self.subdir("site")
        write_file(os.path.join(site, "sitecustomize.py"), "print('sitecustomize ran')\n")
        env = dict(env, PYTHONPATH=site)
        done = subprocess.run([sys.executable, "-I", "-O", "-W", "error::UserWarning"] + argv[1:],
                              env=env, cwd=cwd, capture_output=True, text=True,
                              timeout=LONG_TIMEOUT)
        self.assert_marked_processes_gone()
        self.assertSucceeded(done)
        parent, task = json.loads(done.stdout.splitlines()[-1])
        self.assertEqual(parent[:2] + parent[3:], [1, 1, ["error::UserWarning"]])
        self.assertEqual(task, parent)
        self.assertNotIn("sitecustomize ran", done.stdout)

    def test_a_worker_whose_idle_time_runs_out_as_it_is_handed_a_task_fails_nothing(self):
        # Checked out while idle (not yet near its idle_timeout), it leaves
        # while a capture takes long to pickle: the task runs on another.
        for sigpipe in ("ignored", "default"):
            with self.subTest(sigpipe=sigpipe):
                done = self.run_script("""\
                    import json, signal, sys, time
                    import concurrency
                    if sys.argv[1] == "default":
                        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
                    class SlowToPickle:
                        def __reduce__(self):
                            time.sleep(0.6)
                            return (str, ("captured",))
                    slow = SlowToPickle()
                    d = concurrency.ProcessDriver(max_workers=1, idle_timeout=0.3)
                    d.run([lambda: 0])
                    time.sleep(0.2)  # idle, and taken: 0.27 s is its limit for that
                    print(json.dumps(d.run([lambda: slow, lambda: 2])))
                    """, argv_extra=[sigpipe])
                self.assertSucceeded(done)
                self.assertEqual(json.loads(done.stdout.splitlines()[-1]), ["captured", 2])

    def test_sigpipe_at_its_default_never_kills_the_caller(self):
        # As CLI tools set it (for `| head`): a write to a child that just
        # exited -- crashed, or left idle -- must not end the caller.
        done = self.run_script("""\
            import json, os, signal, time
            import concurrency
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
            crashed = []
            for name in ("fork", "process"):
                for _ in range(3):
                    out = concurrency.driver(name).run(
                        [(lambda i=i: os._exit(3) if i % 7 == 3 else i) for i in range(300)],
                        return_exceptions=True)
                    crashed.append(sum(isinstance(value, concurrency.WorkerCrashed)
                                       for value in out))
            quick = concurrency.ProcessDriver(idle_timeout=0.02)
            for k in range(30):  # runs as idle workers leave
                assert quick.run([lambda: 1, lambda: 2]) == [1, 2]
                time.sleep(0.018 + (k % 5) * 0.001)
            print(json.dumps(crashed))
            """)
        self.assertSucceeded(done)
        self.assertEqual(json.loads(done.stdout.splitlines()[-1]), [43] * 6)

    def test_out_of_descriptors_a_run_finishes_on_the_children_it_has_and_leaks_none(self):
        for driver in ("process", "fork"):
            with self.subTest(driver=driver):
                done = self.run_script("""\
                    import json, os, resource, sys, time
                    import concurrency
                    name = sys.argv[1]
                    d = concurrency.driver("fork") if name == "fork" else \\
                        concurrency.ProcessDriver(max_workers=4)
                    d.run([lambda: 0])  # what the library opens once, opened
                    concurrency._shutdown()
                    def fds():
                        return len(os.listdir("/proc/self/fd"))
                    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                    report = []
                    for margin in (4, 8):  # room for no child, then for one or two
                        before = fds()
                        resource.setrlimit(resource.RLIMIT_NOFILE, (before + margin, hard))
                        try:
                            out = d.run([lambda i=i: (time.sleep(0.2), i)[1] for i in range(6)])
                        except OSError as exc:
                            out = "OSError %d" % exc.errno
                        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                        concurrency._shutdown()
                        report.append([out, fds() - before])
                    print(json.dumps(report))
                    """, argv_extra=[driver])
                self.assertSucceeded(done)
                no_room, some_room = json.loads(done.stdout.splitlines()[-1])
                # With no room for one child: the error, and nothing leaked.
                self.assertEqual(no_room[1], 0)
                if no_room[0] != list(range(6)):
                    self.assertEqual(no_room[0], "OSError 24")
                # With room for a child or two: every result, nothing leaked.
                self.assertEqual(some_room, [list(range(6)), 0])

    def test_a_first_fork_run_short_of_descriptors_fails_cleanly_and_costs_nothing_later(self):
        # Descriptors run out at every step of the process's first fork
        # runs: each fails with EMFILE or runs; once there is room again, a
        # task's stdin is /dev/null as ever, never the caller's own stdin.
        done = self.run_script("""\
            import json, os, resource
            read_end, write_end = os.pipe()
            os.dup2(read_end, 0)  # the caller's stdin: a pipe, as in a pipeline
            import concurrency
            d = concurrency.driver("fork")
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            report = []
            for margin in range(12):
                held = {int(fd) for fd in os.listdir("/proc/self/fd")}
                limit, free = 0, 0
                while free < margin or limit in held:  # exactly margin free below it
                    free += limit not in held
                    limit += 1
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
                try:
                    out = d.run([lambda: os.readlink("/proc/self/fd/0")])[0]
                except OSError as exc:
                    out = "OSError %d" % exc.errno
                finally:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                report.append(out)
            stdin = os.readlink("/proc/self/fd/0")
            after = d.run([lambda: os.readlink("/proc/self/fd/0")])[0]
            print(json.dumps([report, after, stdin]))
            """)
        self.assertSucceeded(done)
        report, after, stdin = json.loads(done.stdout.splitlines()[-1])
        self.assertTrue(all(out in ("OSError 24", "/dev/null", stdin) for out in report), report)
        self.assertIn("/dev/null", report)
        self.assertEqual(after, "/dev/null")

    def test_back_to_back_fork_runs_short_of_descriptors_leave_the_descriptors_held_before(self):
        # A burst of fork runs, each with one to six descriptors free: most
        # fail with EMFILE, some run.  Once there is room again -- and with
        # no run after them to reap what the last one left -- the process
        # holds the very descriptors it held before.
        done = self.run_script("""\
            import json, os, resource
            import concurrency
            d = concurrency.driver("fork")
            d.run([lambda: 0, lambda: 1])  # what the library opens once, opened
            concurrency._shutdown()
            def held():
                fds = {}
                for fd in os.listdir("/proc/self/fd"):
                    try:
                        fds[fd] = os.readlink("/proc/self/fd/" + fd)
                    except FileNotFoundError:
                        pass  # listdir's own
                return fds
            before = held()
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            outcomes = set()
            for free_wanted in (1, 2, 1, 3, 1, 4, 1, 5, 6, 1) * 5:
                taken = held()
                limit, free = 0, 0
                while free < free_wanted or str(limit) in taken:
                    free += str(limit) not in taken
                    limit += 1
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
                try:
                    outcomes.add(repr(d.run([lambda: 0, lambda: 1])))
                except OSError as exc:
                    outcomes.add("OSError %d" % exc.errno)
                finally:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            after = held()
            print(json.dumps([sorted(outcomes), before, after]))
            """)
        self.assertSucceeded(done)
        outcomes, before, after = json.loads(done.stdout.splitlines()[-1])
        self.assertEqual(set(outcomes) - {"OSError 24", "[0, 1]"}, set())
        self.assertEqual(after, before)

    def test_interrupts_at_random_moments_of_fork_runs_lose_nothing_and_leave_nothing(self):
        # A Ctrl-C (here: an alarm whose handler raises KeyboardInterrupt)
        # at any moment of a fork run -- between two pipes, inside
        # os.fork()'s at-fork hooks (logging's), as the run ends -- reaches
        # the caller, and leaves no child, no descriptor, no lock held.
        done = self.run_script("""\
            import gc, json, logging, os, random, signal, threading, time
            import concurrency
            logging.basicConfig()  # its handlers' locks are taken around every fork
            raised = [0]
            def interrupt(signum, frame):
                raised[0] += 1
                raise KeyboardInterrupt
            signal.signal(signal.SIGALRM, interrupt)
            d = concurrency.ForkDriver(max_workers=4)
            d.run([lambda: 0] * 4)
            def fds():
                return len(os.listdir("/proc/self/fd"))
            concurrency._reap_exited(block=True)  # the result pipes it keeps till then
            before = fds()
            started = time.monotonic()
            for _ in range(20):
                d.run([lambda: 0] * 4)
            span = (time.monotonic() - started) / 20
            caught = 0
            for _ in range(300):
                try:
                    try:
                        signal.setitimer(signal.ITIMER_REAL, random.uniform(1e-5, span))
                        d.run([lambda: 0] * 4)
                    finally:
                        signal.setitimer(signal.ITIMER_REAL, 0)
                except KeyboardInterrupt:  # from the run, or just after it
                    caught += 1
            lost = raised[0] - caught  # raised by the handler, never seen here
            d.run([lambda: 0] * 4)
            concurrency._reap_exited(block=True)
            gc.collect()
            grown = fds() - before
            from test_concurrency import own_children
            children = own_children()
            later = []  # a fork from another thread: no lock left held
            thread = threading.Thread(target=lambda: later.append(d.run([lambda: 2])),
                                      daemon=True)
            thread.start()
            thread.join(30)
            print(json.dumps({"caught": caught, "lost": lost, "fd_growth": grown,
                              "children": children, "later": later}))
            """)
        self.assertSucceeded(done)
        self.assertNotIn("Exception ignored", done.stderr)
        report = json.loads(done.stdout.splitlines()[-1])
        self.assertGreater(report["caught"], 0)
        self.assertEqual((report["lost"], report["fd_growth"], report["children"], report["later"]),
                         (0, 0, [], [[2]]), report)

    def test_ctrl_c_from_another_thread_amid_back_to_back_fork_runs_leaks_nothing(self):
        # A Ctrl-C that another thread of the program takes (it does not
        # block it) runs its handler in the main thread even while the run
        # holds signals there: e.g. between making a pipe and noting it.
        done = self.run_script("""\
            import json, os, random, signal, threading, time
            import concurrency
            d = concurrency.driver("fork")
            d.run([lambda: 0] * 2)
            concurrency._reap_exited(block=True)
            def fds():
                return sorted(os.listdir("/proc/self/fd"))
            before = fds()
            started = time.monotonic()
            for _ in range(50):
                d.run([lambda: 0] * 2)  # quick runs: the next starts with one child
            span = (time.monotonic() - started) / 50
            caught = 0
            for _ in range(200):
                ctrl_c = threading.Timer(random.uniform(1e-5, span),
                                         lambda: os.kill(os.getpid(), signal.SIGINT))
                try:
                    try:
                        ctrl_c.start()
                        d.run([lambda: 0] * 2)
                    finally:
                        ctrl_c.cancel()
                        ctrl_c.join()
                except KeyboardInterrupt:
                    caught += 1
            d.run([lambda: 0] * 2)
            concurrency._reap_exited(block=True)
            from test_concurrency import own_children
            print(json.dumps([caught, len(fds()) - len(before), own_children()]))
            """)
        self.assertSucceeded(done)
        caught, grown, children = json.loads(done.stdout.splitlines()[-1])
        self.assertGreater(caught, 0)
        self.assertEqual((grown, children), (0, []))

    def test_interrupted_while_sending_a_large_task_the_worker_is_not_reused(self):
        done = self.run_script("""\
            import json, os, signal, sys
            import concurrency
            d = concurrency.ProcessDriver(max_workers=1)
            d.run([lambda: 0])  # a warm worker
            blob = "x" * (256 << 20)  # a str: in the task's own frame (bytes would be shared)
            """ + interrupt_once_in("send_tasks") + """\
            try:
                d.run([lambda: len(blob)])
                interrupted = False
            except KeyboardInterrupt:
                interrupted = True
            signal.setitimer(signal.ITIMER_REAL, 0)
            # The worker killed mid-frame is reaped as the run ends, not
            # left a zombie until something else starts a process.
            zombies = []
            for pid in os.listdir("/proc"):
                try:
                    with open("/proc/%s/stat" % pid) as stat:
                        fields = stat.read().rsplit(")", 1)[1].split()
                except (OSError, IndexError):
                    continue
                if int(fields[1]) == os.getpid() and fields[0] == "Z":
                    zombies.append(int(pid))
            print(json.dumps([interrupted, zombies, d.run([lambda: 5], timeout=30)]))
            """, timeout=120)
        self.assertSucceeded(done)
        self.assertEqual(json.loads(done.stdout.splitlines()[-1]), [True, [], [5]])

    def test_interrupted_while_writing_a_shared_buffer_nothing_leaks(self):
        done = self.run_script("""\
            import json, os, signal
            import concurrency
            d = concurrency.ProcessDriver(max_workers=2)
            d.run([lambda: 0, lambda: 0])  # what the library opens once, opened
            d._pool.shutdown()
            concurrency._reap_exited(block=True)
            blob = b"x" * (256 << 20)  # captured by both tasks: written to a shared file
            fds = len(os.listdir("/proc/self/fd"))
            # Mid-write: of the shared file, or where there is none
            # (CONCURRENCY_PORTABLE=1), of its frame to a worker.
            """ + interrupt_once_in("shared_file", "send_tasks") + """\
            try:
                d.run([lambda: len(blob), lambda: len(blob)])
                interrupted = False
            except KeyboardInterrupt:
                interrupted = True
            signal.setitimer(signal.ITIMER_REAL, 0)
            after = d.run([lambda: len(blob), lambda: 5], timeout=60)
            d._pool.shutdown()
            concurrency._reap_exited(block=True)
            print(json.dumps([interrupted, after, len(os.listdir("/proc/self/fd")) <= fds]))
            """, timeout=120)
        self.assertSucceeded(done)
        self.assertEqual(json.loads(done.stdout.splitlines()[-1]), [True, [256 << 20, 5], True])

    def test_run_from_a_signal_handler_while_a_fork_run_forks(self):
        # The handler lands while the main thread is inside os.fork() (raised
        # from an at-fork hook): whatever the run holds there, it must not
        # deadlock a run the handler starts.
        done = self.run_script("""\
            import json, os, signal
            import concurrency
            armed, nested = [True], []
            def handler(signum, frame):
                nested.append(concurrency.driver("fork").run([lambda: 41])[0])
            signal.signal(signal.SIGUSR1, handler)
            def after_fork_in_parent():
                if armed:
                    armed.clear()
                    signal.raise_signal(signal.SIGUSR1)
            os.register_at_fork(after_in_parent=after_fork_in_parent)
            outer = concurrency.driver("fork").run([lambda: 1, lambda: 2])
            print(json.dumps([outer, nested]))
            """, timeout=60)
        self.assertSucceeded(done)
        self.assertEqual(json.loads(done.stdout.splitlines()[-1]), [[1, 2], [41]])

    def test_a_process_run_under_a_run_of_the_same_thread_that_holds_every_worker(self):
        # From a signal handler, and from the loop of an as_completed(): the
        # run under it can give no worker back before it returns.
        done = self.run_script("""\
            import json, signal, threading, time
            import concurrency
            d = concurrency.ProcessDriver(max_workers=2)
            nested = []
            def handler(signum, frame):
                nested.append(d.run([lambda: 41, lambda: 42], timeout=30))
            signal.signal(signal.SIGALRM, handler)
            signal.setitimer(signal.ITIMER_REAL, 0.5)
            outer = d.run([lambda: (time.sleep(1.5), 1)[1], lambda: (time.sleep(1.5), 2)[1]])
            looped = []
            for key, value in d.as_completed([lambda: 3, lambda: (time.sleep(1), 4)[1]]):
                looped.append([key, value, d.run([lambda: 5], timeout=30)])
            print(json.dumps([outer, nested, sorted(looped)]))
            """, timeout=60)
        self.assertSucceeded(done)
        self.assertEqual(json.loads(done.stdout.splitlines()[-1]),
                         [[1, 2], [[41, 42]], [[0, 3, [5]], [1, 4, [5]]]])

    def test_fork_runs_from_a_signal_handler_amid_back_to_back_fork_runs(self):
        # An alarm every 2 ms runs a fork run from its handler, landing at
        # any moment of the runs under it: as one reaps the children of the
        # last, as it forks, as it ends.
        done = self.run_script("""\
            import json, signal
            import concurrency
            nested, busy = [], []
            def handler(signum, frame):
                if busy:
                    return  # one nested run at a time: the alarm keeps coming
                busy.append(1)
                try:
                    nested.append(concurrency.driver("fork").run([lambda: 41])[0])
                finally:
                    busy.clear()
            signal.signal(signal.SIGALRM, handler)
            signal.setitimer(signal.ITIMER_REAL, 0.002, 0.002)
            try:
                outer = [concurrency.driver("fork").run([lambda: 1, lambda: 2])
                         for _ in range(500)]
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            print(json.dumps([outer == [[1, 2]] * 500, len(nested), sorted(set(nested))]))
            """, timeout=LONG_TIMEOUT)
        self.assertSucceeded(done)
        same, count, values = json.loads(done.stdout.splitlines()[-1])
        self.assertTrue(same)
        self.assertGreater(count, 0)
        self.assertEqual(values, [41])

    def test_shared_buffers_go_once_no_task_still_to_run_names_them(self):
        # 200 tasks of 12,000 (serialized as workers need them) each capture
        # 2 MB of their own: neither the caller's files of them nor the
        # workers' copies may pile up until the run ends.
        done = self.run_script("""\
            import json, os, sys
            import concurrency
            MB = 1 << 20
            def probe(i, data=None):
                worker = sys.modules["_concurrency_worker"]
                parent, files = os.getppid(), 0
                for fd in os.listdir("/proc/%d/fd" % parent):
                    try:
                        link = os.readlink("/proc/%d/fd/%s" % (parent, fd))
                    except OSError:
                        continue
                    files += "concurrency-shared" in link
                return (i if data is None else len(data)), len(worker._shared), files
            def task(i):
                if i % 60 == 0:
                    data = bytes([i % 256]) * (2 * MB)
                    return lambda: probe(i, data)
                return lambda: probe(i)
            shared = b"s" * (2 * MB)  # and one all tasks of one code share: kept
            def uses_shared(i):
                return len(shared) + i
            tasks = [task(i) for i in range(12000)]
            tasks += [lambda i=i: uses_shared(i) for i in range(100)]
            out = concurrency.ProcessDriver(max_workers=2).run(tasks, timeout=600)
            right = all(value[0] == (2 * MB if i % 60 == 0 else i)
                        for i, value in enumerate(out[:12000]))
            right = right and out[12000:] == [2 * MB + i for i in range(100)]
            print(json.dumps([right, max(v[1] for v in out[:12000]),
                              max(v[2] for v in out[:12000])]))
            """, timeout=LONG_TIMEOUT)
        self.assertSucceeded(done)
        right, worker_most, files_most = json.loads(done.stdout.splitlines()[-1])
        self.assertTrue(right)
        # What a worker's queued and running tasks need, not all 200.
        self.assertLessEqual(worker_most, 20)
        self.assertLessEqual(files_most, 40)

    def test_huge_payloads_intact_within_three_times_their_size(self):
        for driver in ("process", "fork"):
            for case in ("capture", "result", "objects"):
                with self.subTest(driver=driver, case=case):
                    argv, env, cwd = self.script(self.HUGE_SCRIPT)
                    done = subprocess.run(argv + [driver, case], env=env, cwd=cwd,
                                          capture_output=True, text=True,
                                          timeout=LONG_TIMEOUT)
                    self.assert_marked_processes_gone()
                    self.assertSucceeded(done)
                    report = json.loads(done.stdout.splitlines()[-1])
                    self.assertTrue(report["ok"])
                    self.assertLessEqual(report["growth"], 3 * report["payload"], report)

    DEFER_FAULTS = """\
        import os, sys, time
        import concurrency
        concurrency.set_default_driver(sys.argv[1])
        def crash():
            open("crash-started", "w").close()
            os._exit(9)
        concurrency.defer({"crash": crash})
        concurrency.extend("short", lambda: type(concurrency.driver())(timeout=0.5))
        concurrency.driver("short").defer({"hang": lambda: time.sleep(600)})
        with concurrency.deferring():
            concurrency.defer({"at exit": lambda: open("at-exit", "w").close()})
            sys.exit(0)  # a clean exit is not a failure: the task still starts
        """

    def test_deferred_crash_and_timeout_are_reported_and_exit_loses_nothing(self):
        for driver in ("process", "fork"):
            with self.subTest(driver=driver):
                argv, env, cwd = self.script(self.DEFER_FAULTS)
                script = subprocess.Popen(argv + [driver], env=env, cwd=cwd,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True)
                self.addCleanup(script.kill)
                # The pipes close when the last deferred process has ended.
                out, err = script.communicate(timeout=LONG_TIMEOUT)
                self.assertEqual(script.returncode, 0, err)
                self.assert_marked_processes_gone()
                self.assertIn("concurrency: deferred task 'crash' crashed: its process "
                              "exited with code 9", err)
                self.assertIn("concurrency: deferred task 'hang' did not finish within "
                              "0.5 s; it was killed", err)
                self.assertTrue(os.path.exists(os.path.join(cwd, "crash-started")))
                self.assertTrue(os.path.exists(os.path.join(cwd, "at-exit")))

    def test_a_deferred_fork_task_holds_none_of_the_caller_s_sockets(self):
        # A server's handler defers work and closes the client's connection:
        # the client sees the end at once, not when the task ends, and the
        # port can be bound again.  The task still prints; a socket it
        # captured fails on use instead of reaching the client.
        done = self.run_script("""\
            import errno, json, os, socket, time
            import concurrency
            client, server_side = socket.socketpair()
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            port = listener.getsockname()[1]
            def task():
                try:
                    server_side.send(b"from the deferred task")
                    outcome = "sent"
                except OSError as exc:
                    outcome = errno.errorcode.get(exc.errno, str(exc.errno))
                with open("outcome", "w") as file:
                    file.write(outcome)
                print("the deferred task printed", flush=True)
                deadline = time.monotonic() + 60
                while not os.path.exists("release") and time.monotonic() < deadline:
                    time.sleep(0.01)
            concurrency.driver("fork").defer([task])
            deadline = time.monotonic() + 30
            while not os.path.exists("outcome") and time.monotonic() < deadline:
                time.sleep(0.01)
            server_side.close()
            listener.close()
            client.settimeout(10)
            try:
                received = client.recv(100).decode()
            except socket.timeout:
                received = "timed out"
            again = socket.socket()
            try:
                again.bind(("127.0.0.1", port))
                rebound = True
            except OSError:
                rebound = False
            with open("outcome") as file:
                outcome = file.read()
            open("release", "w").close()
            print(json.dumps({"received": received, "rebound": rebound, "outcome": outcome}))
            """)
        self.assertSucceeded(done)
        self.assert_marked_processes_gone()
        self.assertIn("the deferred task printed", done.stdout)
        report = json.loads(done.stdout.splitlines()[-1])
        self.assertEqual((report["received"], report["rebound"]), ("", True), report)
        self.assertNotEqual(report["outcome"], "sent")


if __name__ == "__main__":
    unittest.main()
