"""Tests of concurrency: one behaviour mixin run against every driver, then
driver-specific cases, scripts run as __main__ in a fresh interpreter (the
way users meet the library), defer, the registry, config and the CLI.

Every wait is bounded, and every test checks that it left no process behind.
"""

import asyncio
import contextlib
import functools
import gc
import importlib.util
import io
import json
import math
import os
import pickle
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unittest
from unittest import mock
import uuid
import warnings

import concurrency

REPO = os.path.dirname(os.path.abspath(__file__))
SHORT_TIMEOUT = 10.0   # for things that take well under a second
OTHER_UID = 54321      # a user that is not the one running the tests
LONG_TIMEOUT = 120.0   # for a whole script run in a fresh interpreter
HAVE_PROC = os.path.isdir("/proc/self")
MARK_ENV = "CONCURRENCY_TEST_MARK"


# -- Helpers ------------------------------------------------------------------

def wait_until(predicate, timeout=SHORT_TIMEOUT, what="condition"):
    """Poll ``predicate`` until true; fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("timed out after %g s waiting for %s" % (timeout, what))
        time.sleep(0.01)


def _proc_table():
    """{pid: (ppid, state)} of every process, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as file:
                stat = file.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        table[int(entry)] = (int(fields[1]), fields[0])
    return table


def descendants(pid=None):
    """Pids of every living descendant of ``pid`` (this process by default)."""
    pid = os.getpid() if pid is None else pid
    table = _proc_table()
    children = {}
    for child, (parent, _state) in table.items():
        children.setdefault(parent, []).append(child)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.add(child)
            todo.append(child)
    return found


def marked_processes(mark):
    """Pids of processes whose environment carries ``mark``."""
    needle = ("%s=%s" % (MARK_ENV, mark)).encode()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open("/proc/%s/environ" % entry, "rb") as file:
                if needle in file.read().split(b"\0"):
                    found.add(int(entry))
        except OSError:
            continue
    return found


def pid_alive(pid):
    if HAVE_PROC:
        try:
            with open("/proc/%d/stat" % pid) as file:
                stat = file.read()
        except OSError:
            return False
        return stat[stat.rindex(")") + 2] != "Z"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def write_file(path, text):
    with open(path, "w") as file:
        file.write(text)


def read_file(path):
    with open(path) as file:
        return file.read()


def rendezvous(directory, name, count, timeout=SHORT_TIMEOUT):
    """Announce ``name`` in ``directory`` and wait until ``count`` tasks have:
    a run of tasks one after another can never get past this."""
    write_file(os.path.join(directory, name), "")
    end = time.monotonic() + timeout
    while len(os.listdir(directory)) < count:
        if time.monotonic() > end:
            raise TimeoutError("only %d of %d tasks met" % (len(os.listdir(directory)), count))
        time.sleep(0.005)
    return name


SEEN = []  # tasks append to their own copy


class TwoArgError(Exception):
    def __init__(self, code, detail):
        super().__init__("code %s: %s" % (code, detail))
        self.code = code
        self.detail = detail


def raise_two_arg_error():
    raise TwoArgError(42, "no such table")


def raise_value_error(message="bad value"):
    raise ValueError(message)


async def async_double(value):
    await asyncio.sleep(0)
    return value * 2


class Terminal(io.StringIO):
    """A stderr that says it is a terminal: the progress line shows."""

    def isatty(self):
        return True


class CleanTestCase(unittest.TestCase):
    """Fails a test that leaves a process behind; gives it a temp dir."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="concurrency-test-")
        self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)
        self.before = descendants() if HAVE_PROC else set()
        self.addCleanup(self.assert_no_process_left)
        concurrency._registry = concurrency._Registry(
            {"process": concurrency.ProcessDriver, "fork": concurrency.ForkDriver,
             "sync": concurrency.SyncDriver})

    def assert_no_process_left(self):
        concurrency._shutdown()
        if HAVE_PROC:
            wait_until(lambda: not (descendants() - self.before), SHORT_TIMEOUT,
                       "the test's child processes to end")

    def path(self, *parts):
        return os.path.join(self.tmp, *parts)

    def subdir(self, name):
        path = self.path(name)
        os.mkdir(path)
        return path


# -- Behaviour of every driver ------------------------------------------------

class DriverTests:
    """Behaviour every driver shares; one TestCase per driver below."""

    driver = None
    in_child = True  # tasks run in another process

    def setUp(self):
        super().setUp()
        self.d = concurrency.driver(self.driver)

    def test_list_returns_results_in_task_order(self):
        self.assertEqual(self.d.run([lambda: 1, lambda: "two", lambda: [3]]), [1, "two", [3]])

    def test_mapping_returns_dict_with_same_keys_in_order(self):
        result = self.d.run({"users": lambda: 10, "orders": lambda: 20, 3: lambda: None})
        self.assertIsInstance(result, dict)
        self.assertEqual(list(result.items()), [("users", 10), ("orders", 20), (3, None)])

    def test_tuple_and_generator_inputs_return_lists(self):
        self.assertEqual(self.d.run((lambda: 1, lambda: 2)), [1, 2])
        self.assertEqual(self.d.run(lambda n=n: n * n for n in range(4)), [0, 1, 4, 9])

    def test_single_callable_returns_one_item_list(self):
        self.assertEqual(self.d.run(lambda: "only"), ["only"])

    def test_empty_input(self):
        self.assertEqual(self.d.run([]), [])
        self.assertEqual(self.d.run({}), {})

    def test_closure_captures_state(self):
        factor = 7
        data = {"rows": [1, 2, 3]}
        self.assertEqual(self.d.run([lambda: sum(data["rows"]) * factor]), [42])

    def test_non_callable_rejected_before_anything_runs(self):
        marker = self.path("ran")
        with self.assertRaisesRegex(TypeError, r"task 1 is not callable.*None"):
            self.d.run([lambda: write_file(marker, "x"), None])
        with self.assertRaisesRegex(TypeError, r"task 'orders' is not callable.*'SELECT'"):
            self.d.run({"users": lambda: write_file(marker, "x"), "orders": "SELECT"})
        self.assertFalse(os.path.exists(marker))

    def test_a_called_function_is_caught_with_a_hint(self):
        calls = []

        def report(table):
            calls.append(table)

        async def fetch(table):
            calls.append(table)

        with self.assertRaisesRegex(TypeError, r"task 0 is not callable: got None.*"
                                               r"Did you call it\? report\('users'\) ran "
                                               r"here.*pass lambda: report\('users'\)"):
            self.d.run([report("users"), report("orders")])
        with self.assertRaisesRegex(TypeError, r"task 'b' is not callable: got None.*"
                                               r"pass lambda: report\('b'\)"):
            self.d.run({"a": lambda: 1, "b": report("b")})
        tasks = [report("built before")]  # where the call can't be seen: the example
        with self.assertRaisesRegex(TypeError, r"task 0 is not callable: got None.*"
                                               r"Did you call it\? Pass the function itself"):
            self.d.run(tasks)
        with self.assertRaisesRegex(TypeError, r"task 0 is a list of callables, not a "
                                               r"callable: pass the callables themselves"):
            self.d.run([[report, report]])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with self.assertRaisesRegex(TypeError, r"task 'a' is a coroutine object.*did you "
                                                   r"call it\? pass the function itself "
                                                   r"\(.*fetch, not .*fetch\(\)\)"):
                self.d.run({"a": fetch("users"), "b": fetch("orders")})
            gc.collect()
        self.assertEqual([str(w.message) for w in caught if "never awaited" in str(w.message)],
                         [])
        # The calls above; never in a child.
        self.assertEqual(calls, ["users", "orders", "b", "built before"])

    def test_a_function_that_needs_arguments_is_refused_before_anything_runs(self):
        marker = self.path("ran")

        def count(table, *, limit, verbose=False):
            return table

        class Table:
            def rows(self, where):
                return where

        cases = {
            "count": (count, "table, limit"),
            "method": (Table().rows, "where"),
            "partial": (functools.partial(count, "users"), "limit"),
        }
        for key, (task, missing) in cases.items():
            with self.subTest(key=key):
                with self.assertRaisesRegex(TypeError, r"task %r, .* needs arguments it will "
                                                       r"not get: %s\.  A task is called with "
                                                       r"none" % (key, missing)):
                    self.d.run({"first": lambda: write_file(marker, "x"), key: task})
        self.assertFalse(os.path.exists(marker))
        # Bound, or with defaults, or with a signature that can't be read: they run.
        self.assertEqual(self.d.run([functools.partial(count, "users", limit=1),
                                     lambda table="t": table, dict]),
                         ["users", "t", {}])

    def test_tasks_must_be_callables_not_none_or_str(self):
        for bad in (None, "lambda: 1", b"x", 5):
            with self.subTest(bad=bad):
                with self.assertRaisesRegex(TypeError, "tasks must be a callable"):
                    self.d.run(bad)

    def test_timeout_must_be_positive_number_or_none(self):
        for bad in (0, -1, float("nan")):
            with self.subTest(bad=bad):
                with self.assertRaisesRegex(ValueError, "timeout must be a positive number"):
                    self.d.run([lambda: 1], timeout=bad)
        for bad in ("1", True, [1]):
            with self.subTest(bad=bad):
                with self.assertRaisesRegex(TypeError, "timeout must be a number"):
                    self.d.run([lambda: 1], timeout=bad)

    def test_any_long_timeout_is_accepted_and_inf_is_no_limit(self):
        for timeout in (2200000, 1e300, float("inf")):
            with self.subTest(timeout=timeout):
                self.assertEqual(self.d.run([lambda: 1, lambda: 2], timeout=timeout), [1, 2])
        if self.driver == "sync":
            return  # no timeouts
        short = type(self.d)(timeout=0.5)
        self.assertEqual(short.run([lambda: time.sleep(0.8) or "slow"], timeout=float("inf")),
                         ["slow"])

    def test_coroutine_result_is_awaited(self):
        self.assertEqual(self.d.run([lambda: async_double(21)]), [42])

    def test_async_def_task_is_awaited(self):
        async def fetch():
            await asyncio.sleep(0.01)
            return "fetched"
        self.assertEqual(self.d.run({"a": fetch}), {"a": "fetched"})

    def test_exception_class_and_message_preserved(self):
        with self.assertRaises(ValueError) as caught:
            self.d.run([lambda: 1, lambda: raise_value_error("broken row 7")])
        self.assertEqual(str(caught.exception), "broken row 7")

    def test_first_failed_task_in_task_order_is_raised_after_all_finished(self):
        done = self.path("slow-done")

        def slow_failure():
            time.sleep(0.3)
            write_file(done, "x")
            raise ValueError("first in task order")

        with self.assertRaisesRegex(ValueError, "first in task order"):
            self.d.run([lambda: 1, slow_failure, lambda: {}["fails fast"]])
        # It waited for the slow sibling instead of killing it.
        self.assertTrue(os.path.exists(done))

    def test_return_exceptions_fills_every_slot(self):
        result = self.d.run({"ok": lambda: 5, "bad": lambda: raise_value_error("nope"),
                             "value": lambda: ValueError("returned, not raised")},
                            return_exceptions=True)
        self.assertEqual(result["ok"], 5)
        self.assertIsInstance(result["bad"], ValueError)
        self.assertEqual(str(result["bad"]), "nope")
        self.assertIsInstance(result["value"], ValueError)

    def test_returned_exception_is_a_value_not_a_failure(self):
        [value] = self.d.run([lambda: KeyError("just data")])
        self.assertIsInstance(value, KeyError)

    def test_exception_with_two_argument_init_keeps_class_and_data(self):
        with self.assertRaises(TwoArgError) as caught:
            self.d.run([raise_two_arg_error])
        self.assertEqual((caught.exception.code, caught.exception.detail), (42, "no such table"))

    def test_driver_is_cached_per_name(self):
        self.assertIs(concurrency.driver(self.driver), self.d)

    # -- asyncio and results as they complete --------------------------------

    def test_run_async_keeps_the_event_loop_running(self):
        async def main():
            ticks = []
            stop = asyncio.Event()

            async def ticker():
                while not stop.is_set():
                    ticks.append(time.monotonic())
                    await asyncio.sleep(0.01)

            ticking = asyncio.ensure_future(ticker())
            result = await self.d.run_async({"a": lambda: time.sleep(1) or "slept",
                                             "b": lambda: "quick"})
            stop.set()
            await ticking
            return result, ticks

        result, ticks = asyncio.run(main())
        self.assertEqual(result, {"a": "slept", "b": "quick"})
        self.assertGreater(len(ticks), 40)  # a blocked loop would tick once
        self.assertLess(max(b - a for a, b in zip(ticks, ticks[1:])), 0.5)

    def test_run_async_shapes_and_errors_match_run(self):
        async def main():
            listed = await self.d.run_async([lambda: 1, lambda: async_double(2)])
            with self.assertRaisesRegex(ValueError, "async failure"):
                await self.d.run_async([lambda: 1, lambda: raise_value_error("async failure")])
            slots = await self.d.run_async({"bad": lambda: raise_value_error("x")},
                                           return_exceptions=True)
            return listed, slots

        listed, slots = asyncio.run(main())
        self.assertEqual(listed, [1, 4])
        self.assertIsInstance(slots["bad"], ValueError)
        with self.assertRaises(TypeError):
            asyncio.run(self.d.run_async([None]))

    def test_as_completed_raises_a_failure_at_its_turn(self):
        gen = self.d.as_completed([lambda: raise_value_error("turn")])
        with self.assertRaisesRegex(ValueError, "turn"):
            next(gen)
        pairs = list(self.d.as_completed([lambda: raise_value_error("kept")],
                                         return_exceptions=True))
        self.assertEqual(pairs[0][0], 0)
        self.assertIsInstance(pairs[0][1], ValueError)

    def test_as_completed_async_yields_every_pair(self):
        async def main():
            pairs = []
            async for key, value in self.d.as_completed_async({"a": lambda: 1,
                                                                "b": lambda: 2}):
                pairs.append((key, value))
            return sorted(pairs)

        self.assertEqual(asyncio.run(main()), [("a", 1), ("b", 2)])

    def test_progress_on_as_completed_and_run_async_too(self):
        async def gather_pairs():
            return sorted([pair async for pair in self.d.as_completed_async(
                [lambda: 3, lambda: 4], progress=True)])

        for name, call, expected in (
                ("as_completed", lambda: sorted(self.d.as_completed(
                    [lambda: 1, lambda: 2], progress=True)), [(0, 1), (1, 2)]),
                ("run_async", lambda: asyncio.run(self.d.run_async(
                    [lambda: 1, lambda: 2], progress=True)), [1, 2]),
                ("as_completed_async", lambda: asyncio.run(gather_pairs()),
                 [(0, 3), (1, 4)])):
            with self.subTest(name):
                stream = Terminal()
                with contextlib.redirect_stderr(stream):
                    self.assertEqual(call(), expected)
                last = stream.getvalue().rstrip("\n").split("\r")[-1]
                self.assertRegex(last, r"^concurrency: 2/2 done, [0-9.]+ s, ")

    def test_progress_is_silent_when_stderr_is_not_a_terminal(self):
        stream = tempfile.TemporaryFile("w+")
        self.addCleanup(stream.close)
        with contextlib.redirect_stderr(stream):
            self.assertEqual(self.d.run([lambda: 1, lambda: 2], progress=True), [1, 2])
        stream.seek(0)
        self.assertEqual(stream.read(), "")


    # -- map ------------------------------------------------------------------

    def test_map_returns_results_in_input_order(self):
        self.assertEqual(self.d.map(lambda x: x * x, range(3000)), [x * x for x in range(3000)])
        self.assertEqual(self.d.map(str.upper, ("a", "b")), ["A", "B"])
        self.assertEqual(self.d.map(len, "xyz"), [1, 1, 1])
        self.assertEqual(self.d.map(abs, []), [])
        for chunksize in (1, 7, 5000):
            self.assertEqual(self.d.map(lambda x: -x, [3, 1, 2], chunksize=chunksize), [-3, -1, -2])

    def test_map_reads_an_iterator_as_chunks_are_needed(self):
        # A generator that fails after the first window: the items before
        # it ran (a file each), the generator's exception reaches the caller.
        marks = self.subdir("marks")

        def items():
            for i in range(concurrency._FIRST_WINDOW + 10):
                yield i
            raise LookupError("the input ran dry")

        last = concurrency._FIRST_WINDOW + 9  # read in the window the exception cut short
        with self.assertRaisesRegex(LookupError, "the input ran dry"):
            self.d.map(lambda i: i in (7, last) and write_file(os.path.join(marks, str(i)), "ran"),
                       items())
        self.assertEqual(sorted(os.listdir(marks)), sorted(["7", str(last)]))
        total = 3 * concurrency._FIRST_WINDOW + 5
        self.assertEqual(self.d.map(lambda x: x + 1, (i for i in range(total))),
                         list(range(1, total + 1)))

    def test_map_an_item_s_exception_fills_its_slot_or_is_raised_first(self):
        values = self.d.map(lambda x: 10 // x, [5, 0, 2, 0], return_exceptions=True)
        self.assertEqual(values[0], 2)
        self.assertIsInstance(values[1], ZeroDivisionError)
        self.assertEqual(values[2], 5)
        self.assertIsInstance(values[3], ZeroDivisionError)
        with self.assertRaises(KeyError) as caught:
            self.d.map(lambda x: {}[x] if x in (3, 6) else x, range(10), chunksize=2)
        self.assertEqual(caught.exception.args, (3,))  # the first in input order
        self.assertIn("item 3 of concurrency.map", " ".join(caught.exception.__notes__))

    def test_map_bad_input_is_refused_before_anything_runs(self):
        marker = self.path("ran")

        def report(item):
            write_file(marker, "x")

        with self.assertRaisesRegex(TypeError, r"not callable: got None.*Did you call it"):
            self.d.map(report(1) if False else None, [1])
        with self.assertRaisesRegex(TypeError, r"needs arguments it will not get: b"):
            self.d.map(lambda a, b: write_file(marker, "x"), [1])
        with self.assertRaisesRegex(TypeError, r"takes no arguments"):
            self.d.map(lambda: write_file(marker, "x"), [1])
        with self.assertRaisesRegex(TypeError, r"must be an iterable, not None"):
            self.d.map(report, None)
        with self.assertRaisesRegex(ValueError, r"chunksize must be a positive int"):
            self.d.map(report, [1], chunksize=0)
        with self.assertRaisesRegex(ValueError, r"timeout must be a positive"):
            self.d.map(report, [1], timeout=-1)
        self.assertFalse(os.path.exists(marker))
        # What takes one argument: defaults, *args, a bound method, a builtin.
        self.assertEqual(self.d.map(lambda x, y=2: x * y, [1]), [2])
        self.assertEqual(self.d.map(lambda *xs: len(xs), [1]), [1])
        self.assertEqual(self.d.map("ab".count, ["a"]), [1])

    def test_map_an_item_or_result_that_can_t_travel_fails_alone(self):
        # A generator object: no pickler sends one.
        values = self.d.map(lambda x: 1, [0, (n for n in "ab"), 2], return_exceptions=True)
        self.assertEqual(values[0], 1)
        self.assertEqual(values[2], 1)
        if self.driver in ("process", "dask"):  # items travel serialized
            self.assertIsInstance(values[1], concurrency.SerializationError)
            self.assertIn("item 1", str(values[1]))
        else:
            self.assertEqual(values[1], 1)
        values = self.d.map(lambda x: (n for n in "ab") if x == 1 else x, range(4),
                            return_exceptions=True)
        self.assertEqual([values[0], values[2], values[3]], [0, 2, 3])
        if self.in_child:
            self.assertIsInstance(values[1], concurrency.SerializationError)

    def test_map_progress_counts_items(self):
        stream = Terminal()
        with contextlib.redirect_stderr(stream):
            values = self.d.map(lambda x: 1 // x, range(50), chunksize=10, progress=True,
                                return_exceptions=True)
        self.assertIsInstance(values[0], ZeroDivisionError)
        last = stream.getvalue().rstrip("\n").split("\r")[-1]
        self.assertRegex(last, r"^concurrency: 50/50 done, 1 failed, [0-9.]+ s, [0-9.]+ items/s")


class ChildDriverTests(DriverTests):
    """Behaviour of drivers that run each task in a child process."""

    def test_map_a_crash_fails_the_items_of_its_chunk_alone(self):
        values = self.d.map(lambda x: os._exit(3) if x == 53 else x * 2, range(200),
                            chunksize=10, return_exceptions=True)
        for x in range(200):
            if 50 <= x < 60:
                self.assertIsInstance(values[x], concurrency.WorkerCrashed)
                self.assertEqual(values[x].exitcode, 3)
            else:
                self.assertEqual(values[x], x * 2)

    def test_map_timeout_ends_the_items_still_running(self):
        started = time.monotonic()
        values = self.d.map(lambda x: time.sleep(60) if x == 5 else x, range(20),
                            chunksize=1, timeout=1.5, return_exceptions=True)
        self.assertLess(time.monotonic() - started, 1.5 + 3)
        self.assertIsInstance(values[5], concurrency.TaskTimeout)
        self.assertEqual(values[5].timeout, 1.5)
        self.assertEqual([v for i, v in enumerate(values) if i != 5],
                         [i for i in range(20) if i != 5])
        with self.assertRaises(concurrency.TaskTimeout):
            self.d.map(lambda x: [None for _ in iter(int, 1)], range(4), timeout=0.5)

    def test_map_time_runs_out_for_items_an_iterator_has_not_given_yet(self):
        # The first window's item 0 outlives the timeout; the next window's
        # items never start, and each still gets its slot.
        total = concurrency._FIRST_WINDOW + 5
        started = time.monotonic()
        values = self.d.map(lambda x: time.sleep(60) if x == 0 else x, iter(range(total)),
                            timeout=1, return_exceptions=True)
        self.assertLess(time.monotonic() - started, 1 + 3)
        self.assertEqual(len(values), total)
        self.assertIsInstance(values[0], concurrency.TaskTimeout)
        for value in values[concurrency._FIRST_WINDOW:]:
            self.assertIsInstance(value, concurrency.TaskTimeout)
            self.assertEqual(value.timeout, 1)

    def test_map_interrupted_leaves_no_process_nor_descriptor(self):
        self.d.map(lambda x: x, range(4))  # what the library opens once, opened
        concurrency._shutdown()
        before = set(os.listdir("/proc/self/fd")) if HAVE_PROC else set()

        def interrupt(signum, frame):
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGALRM, interrupt)
        self.addCleanup(signal.signal, signal.SIGALRM, previous)
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        try:
            with self.assertRaises(KeyboardInterrupt):
                self.d.map(lambda x: time.sleep(0.05), range(400), chunksize=2)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        concurrency._shutdown()
        if HAVE_PROC:
            self.assertEqual(set(os.listdir("/proc/self/fd")) - before, set())

    def test_map_shares_the_function_across_the_items_a_worker_runs(self):
        # What run() never does: fn travels once per worker, so the items
        # there see one copy of what it captures.
        seen = []
        counts = self.d.map(lambda x: (seen.append(x), len(seen))[1], range(200), chunksize=5)
        self.assertGreater(max(counts), 5)
        self.assertEqual(seen, [])  # the caller's copy is untouched

    def test_a_captured_held_lock_is_new_when_sent_and_held_when_inherited(self):
        lock = threading.Lock()
        lock.acquire()
        self.addCleanup(lock.release)
        [acquired] = self.d.run([lambda: lock.acquire(timeout=0.5)])
        # As README's failure table says: process sends a new, unlocked one;
        # fork inherits it as it is.
        self.assertEqual(acquired, self.driver != "fork")

    def test_tasks_run_at_once(self):
        meet = self.subdir("meet")
        names = self.d.run([lambda i=i: rendezvous(meet, "t%d" % i, 4) for i in range(4)])
        self.assertEqual(names, ["t0", "t1", "t2", "t3"])

    def test_four_one_second_sleeps_take_about_one_second(self):
        self.d.run([lambda: 0])  # warm up
        started = time.monotonic()
        self.d.run([lambda: time.sleep(1)] * 4)
        self.assertLess(time.monotonic() - started, 1.9)

    def test_runs_in_another_process(self):
        [pid] = self.d.run([os.getpid])
        self.assertNotEqual(pid, os.getpid())

    def test_exception_carries_child_traceback_and_names_task(self):
        with self.assertRaises(ValueError) as caught:
            self.d.run({"users": lambda: 1, "orders": lambda: raise_value_error("no orders")})
        exc = caught.exception
        self.assertIsInstance(exc.__cause__, concurrency.RemoteTraceback)
        self.assertIn("raise_value_error", exc.__cause__.traceback)
        self.assertIn("no orders", str(exc.__cause__))
        self.assertIn("'orders'", " ".join(exc.__notes__))

    def test_exception_that_cannot_travel_becomes_remote_error(self):
        def task():
            raise ValueError((n for n in range(3)))  # a generator can't be pickled
        with self.assertRaises(concurrency.RemoteError) as caught:
            self.d.run({"gen": task})
        self.assertEqual(caught.exception.type_name, "builtins.ValueError")
        self.assertEqual(caught.exception.key, "gen")
        self.assertIn("generator object", caught.exception.message)
        self.assertIn("raise ValueError", caught.exception.traceback)

    def test_timeout_raises_naming_every_unfinished_task(self):
        with self.assertRaises(concurrency.TaskTimeout) as caught:
            self.d.run({"a": lambda: time.sleep(60), "b": lambda: 1,
                        "c": lambda: time.sleep(60)}, timeout=0.5)
        self.assertEqual(caught.exception.key, "a")
        self.assertEqual(caught.exception.unfinished, ["a", "c"])
        self.assertIn("'a', 'c'", str(caught.exception))

    def test_lambda_result_travels_with_dill(self):
        [fn] = self.d.run([lambda: (lambda x: x + 1)])
        self.assertEqual(fn(1), 2)

    def test_print_never_corrupts_results(self):
        def noisy():
            print("x" * 100000)
            os.write(1, b"\x00\x00R\x00\x00\x00\x00\x00\x00\x00\x05hello")
            sys.stderr.write("to stderr\n")
            return "clean"
        with open(os.devnull, "w") as devnull, contextlib.ExitStack() as stack:
            saved = os.dup(1), os.dup(2)
            stack.callback(os.close, saved[0])
            stack.callback(os.close, saved[1])
            os.dup2(devnull.fileno(), 1)
            os.dup2(devnull.fileno(), 2)
            stack.callback(os.dup2, saved[0], 1)
            stack.callback(os.dup2, saved[1], 2)
            self.assertEqual(self.d.run([noisy, noisy]), ["clean", "clean"])

    def test_tasks_see_callers_current_cwd_environment_and_sys_path(self):
        def context():
            return os.getcwd(), os.environ.get("CONCURRENCY_TEST_VAR"), sys.path[-1]

        first, second = self.subdir("first"), self.subdir("second")
        old_cwd = os.getcwd()
        self.addCleanup(os.chdir, old_cwd)
        self.addCleanup(os.environ.pop, "CONCURRENCY_TEST_VAR", None)
        self.addCleanup(sys.path.remove, "/extra/path")
        os.chdir(first)
        os.environ["CONCURRENCY_TEST_VAR"] = "one"
        sys.path.append("/extra/path")
        self.assertEqual(self.d.run([context]),
                         [(os.path.realpath(first), "one", "/extra/path")])
        os.chdir(second)
        os.environ["CONCURRENCY_TEST_VAR"] = "two"
        self.assertEqual(self.d.run([context, context]),
                         [(os.path.realpath(second), "two", "/extra/path")] * 2)

    def test_a_task_changing_cwd_or_environment_does_not_leak_into_the_next(self):
        def change():
            os.chdir("/")
            os.environ["CONCURRENCY_TEST_LEAK"] = "from a task"
            os.environ.pop("PATH", None)

        self.d.run([change] * 3)
        seen = self.d.run([lambda: (os.getcwd(), os.environ.get("CONCURRENCY_TEST_LEAK"),
                                    os.environ.get("PATH"))] * 3)
        self.assertEqual(seen, [(os.getcwd(), None, os.environ.get("PATH"))] * 3)

    def test_as_completed_yields_in_completion_order(self):
        release = self.path("release")

        def waits_for_release():
            wait_until(lambda: os.path.exists(release), SHORT_TIMEOUT, "release")
            return "second"

        seen = []
        for key, value in self.d.as_completed({"slow": waits_for_release,
                                               "fast": lambda: "first"}):
            seen.append((key, value))
            write_file(release, "")
        self.assertEqual(seen, [("fast", "first"), ("slow", "second")])

    def start_sleepers(self, count):
        """Tasks that record their pid, then sleep for ten minutes."""
        directory = self.tmp

        def sleeper(n):
            # Whole or not at all: the test reads it while the task runs.
            path = os.path.join(directory, "pid-%d" % n)
            write_file(path + ".tmp", str(os.getpid()))
            os.replace(path + ".tmp", path)
            time.sleep(600)
        return [lambda n=n: sleeper(n) for n in range(count)]

    def sleeper_pids(self, count):
        wait_until(lambda: all(os.path.exists(self.path("pid-%d" % n)) for n in range(count)),
                   SHORT_TIMEOUT, "the tasks to start")
        return [int(read_file(self.path("pid-%d" % n))) for n in range(count)]

    def test_cancelling_run_async_kills_and_reaps_the_tasks(self):
        async def main():
            run = asyncio.ensure_future(self.d.run_async(self.start_sleepers(2)))
            while not all(os.path.exists(self.path("pid-%d" % n)) for n in range(2)):
                await asyncio.sleep(0.01)
            pids = self.sleeper_pids(2)
            run.cancel()
            with self.assertRaises(asyncio.CancelledError):
                await run
            return pids

        pids = asyncio.run(asyncio.wait_for(main(), LONG_TIMEOUT))
        self.assertEqual([pid_alive(pid) for pid in pids], [False, False])
        self.assertEqual(self.d.run([lambda: "after"]), ["after"])

    def test_wait_for_expiring_stops_run_async(self):
        async def main():
            with self.assertRaises(asyncio.TimeoutError):
                await asyncio.wait_for(self.d.run_async(self.start_sleepers(1)), 1.0)

        asyncio.run(main())
        [pid] = self.sleeper_pids(1)
        self.assertFalse(pid_alive(pid))

    def test_breaking_out_of_as_completed_stops_the_rest(self):
        tasks = self.start_sleepers(2) + [lambda: "quick"]
        for key, value in self.d.as_completed(tasks):
            self.assertEqual((key, value), (2, "quick"))
            pids = self.sleeper_pids(2)
            break
        self.assertEqual([pid_alive(pid) for pid in pids], [False, False])

    def test_failure_raised_from_as_completed_stops_the_rest(self):
        pid_file = self.path("pid-0")

        def fail_once_the_sleeper_runs():
            wait_until(lambda: os.path.exists(pid_file), SHORT_TIMEOUT, "the sleeper")
            raise ValueError("stop all")

        tasks = self.start_sleepers(1) + [fail_once_the_sleeper_runs]
        with self.assertRaisesRegex(ValueError, "stop all"):
            for _pair in self.d.as_completed(tasks):
                pass
        [pid] = self.sleeper_pids(1)
        self.assertFalse(pid_alive(pid))

    def test_leaving_as_completed_async_early_stops_the_rest(self):
        tasks = self.start_sleepers(2) + [lambda: "quick"]

        async def main():
            pairs = self.d.as_completed_async(tasks)
            try:
                async for pair in pairs:
                    self.assertEqual(pair, (2, "quick"))
                    return self.sleeper_pids(2)
            finally:
                await pairs.aclose()

        pids = asyncio.run(main())
        self.assertEqual([pid_alive(pid) for pid in pids], [False, False])

    def test_no_more_children_than_max_workers(self):
        limited = type(self.d)(max_workers=2)
        meet = self.subdir("meet")
        # Three tasks can't all meet when only two run at once.
        result = limited.run([lambda i=i: rendezvous(meet, str(i), 3, timeout=1.0)
                              for i in range(3)], return_exceptions=True)
        self.assertTrue(any(isinstance(r, TimeoutError) for r in result), result)
        self.assertEqual(limited.run([lambda: 1] * 5), [1] * 5)


    def test_more_children_than_cores_once_tasks_are_slow(self):
        # One child per core first; tasks that wait on each other (as on I/O)
        # get the rest, up to max_workers, or they could never all meet.
        count = concurrency._CORES + 2
        wide = type(self.d)(max_workers=count)
        meet = self.subdir("meet")
        pids = wide.run([lambda i=i: (rendezvous(meet, str(i), count), os.getpid())[1]
                         for i in range(count)])
        self.assertEqual(len(set(pids)), count)

    def test_a_task_computing_forever_does_not_hold_back_the_rest(self):
        # Tasks keeping every core busy hold the run to one child per core,
        # but not for long: the task waiting behind them still gets its own.
        count = concurrency._CORES
        wide = type(self.d)(max_workers=count + 1)
        self.assertEqual(wide.run([lambda: 0] * count), [0] * count)  # warm ones

        def compute_forever():
            while True:
                pass

        results = wide.run([compute_forever] * count + [lambda: "done"], timeout=2.5,
                           return_exceptions=True)
        self.assertEqual(results[-1], "done")
        self.assertEqual([type(r) for r in results[:-1]], [concurrency.TaskTimeout] * count)

    def test_tasks_that_meet_still_run_at_once_after_quick_runs(self):
        # Quick runs in a row have the fork driver start the next with one
        # child, which must hand what it has not begun to more in a moment.
        for _ in range(3):
            self.assertEqual(self.d.run([lambda: 1, lambda: 2]), [1, 2])
        meet = self.subdir("meet")
        self.assertEqual(self.d.run([lambda: rendezvous(meet, "a", 2, timeout=5.0),
                                     lambda: rendezvous(meet, "b", 2, timeout=5.0)],
                                    timeout=LONG_TIMEOUT), ["a", "b"])

    def test_runs_in_a_row_run_every_task_exactly_once(self):
        # Tasks that a child still starting up has not begun go to one that
        # is up; whoever takes a task's claim runs it, and no one else.
        log = self.path("log")

        def note(run, key):
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            try:
                os.write(fd, b"%d-%d\n" % (run, key))
            finally:
                os.close(fd)
            return key

        sizes = [7 if run % 5 == 0 else 2 for run in range(60)]
        for run, size in enumerate(sizes):
            self.assertEqual(self.d.run([lambda r=run, k=k: note(r, k) for k in range(size)]),
                             list(range(size)))
        ran = read_file(log).split()
        self.assertEqual(sorted(ran), sorted("%d-%d" % (run, key) for run, size in enumerate(sizes)
                                             for key in range(size)))

    def test_large_results_arrive_whole_with_their_types(self):
        mib = 1 << 20

        def blobs():
            shared = b"s" * (2 * mib)
            return {"bytes": b"b" * (3 * mib), "bytearray": bytearray(b"a" * (2 * mib)),
                    "pair": (shared, shared), "deep": [[b"d" * (2 * mib)]],
                    "small": b"tiny", "empty": bytearray()}

        [top, got] = self.d.run([lambda: bytes(range(256)) * (8 * 4096), blobs])
        self.assertEqual(top, bytes(range(256)) * (8 * 4096))
        self.assertIs(type(top), bytes)
        expected = blobs()
        self.assertEqual(got, expected)
        self.assertEqual({k: type(v) for k, v in got.items()},
                         {k: type(v) for k, v in expected.items()})
        self.assertIs(got["pair"][0], got["pair"][1])  # one object, as sent
        got["bytearray"][0] = ord("z")  # still writable
        # Copied out of the child's memory, where that is to be had.
        if sys.platform.startswith("linux") and not concurrency._PORTABLE:
            self.assertTrue(concurrency._state.lending)
            self.assertTrue(concurrency._state.memory_reader)

    def test_large_results_with_tasks_queued_behind_them(self):
        # Two children, many tasks: tasks wait in each child's pipe while it
        # waits for us to copy a result out of its memory.
        two = type(self.d)(max_workers=2)
        size = (1 << 20) + 17
        results = two.run([lambda i=i: bytes([i]) * size for i in range(30)])
        self.assertEqual([(len(r), r[:1], r[-1:]) for r in results],
                         [(size, bytes([i]), bytes([i])) for i in range(30)])
        self.assertEqual(two.run([lambda: 1, lambda: 2]), [1, 2])


class SyncDriverTest(DriverTests, CleanTestCase):
    driver = "sync"
    in_child = False

    def test_runs_in_this_process_in_order(self):
        order = []
        self.assertEqual(self.d.run([lambda: order.append(1) or os.getpid(),
                                     lambda: order.append(2) or os.getpid()]),
                         [os.getpid()] * 2)
        self.assertEqual(order, [1, 2])

    def test_exception_propagates_unchanged(self):
        error = ValueError("the very same")
        later = []

        def fail():
            raise error

        with self.assertRaises(ValueError) as caught:
            self.d.run([fail, lambda: later.append("ran")])
        self.assertIs(caught.exception, error)
        self.assertEqual(later, ["ran"])

    def test_timeout_is_accepted_and_ignored(self):
        self.assertEqual(self.d.run([lambda: 1], timeout=0.001), [1])

    def test_as_completed_is_in_task_order_and_lazy(self):
        calls = []
        pairs = self.d.as_completed([lambda: calls.append(0) or "a",
                                     lambda: calls.append(1) or "b"])
        self.assertEqual(next(pairs), (0, "a"))
        self.assertEqual(calls, [0])
        self.assertEqual(list(pairs), [(1, "b")])

    def test_coroutine_inside_running_event_loop(self):
        async def handler():
            return self.d.run([lambda: async_double(2)])
        self.assertEqual(asyncio.run(handler()), [4])


class ProcessDriverTest(ChildDriverTests, CleanTestCase):
    driver = "process"

    def test_a_shared_buffer_a_worker_cannot_read_from_our_file_comes_through_its_pipe(self):
        blob = os.urandom(3 << 20)
        if not concurrency._state.sharing_by_file:
            self.skipTest("shared buffers go through the pipe here anyway")
        self.addCleanup(setattr, concurrency._state, "sharing_by_file", True)
        # A file of another name where the worker looks: it must not be
        # read (a descriptor the worker was told of may be another file by
        # the time it looks); the worker asks for the bytes instead.
        decoy = os.memfd_create("not-ours", os.MFD_CLOEXEC)
        self.addCleanup(os.close, decoy)
        os.write(decoy, b"\0" * len(blob))
        with mock.patch.object(concurrency._ProcessRun, "shared_file",
                               lambda run, number: (decoy, "concurrency-shared-decoy")):
            result = self.d.run([lambda: blob[:5] + blob[-5:], lambda: len(blob)])
        self.assertEqual(result, [blob[:5] + blob[-5:], len(blob)])
        self.assertFalse(concurrency._state.sharing_by_file)  # through the pipe from now on
        self.assertEqual(self.d.run([lambda: blob[7]]), [blob[7]])

    @unittest.skipUnless(hasattr(os, "memfd_create"), "needs memfd_create")
    def test_a_worker_that_got_a_buffer_only_for_tasks_taken_back_never_asks_for_it(self):
        # A worker still starting up has its tasks taken back (to run on
        # one that is up) with the buffer they name still in its pipe.  Once
        # the run is over it must not ask for that buffer: nobody answers,
        # and its wait would swallow the next run's frames.
        blob = os.urandom(3 << 20)
        serializer = concurrency._TaskSerializer(share=True)
        payload = serializer.dumps(0, lambda: len(blob))
        self.assertEqual(payload[:1], b"s")
        decoy = os.memfd_create("not-ours", os.MFD_CLOEXEC)  # unreadable for it, by name
        self.addCleanup(os.close, decoy)
        context = pickle.dumps(concurrency._current_context(), pickle.HIGHEST_PROTOCOL)
        worker = concurrency._Worker(LONG_TIMEOUT)
        self.addCleanup(worker.close)
        self.addCleanup(worker.wait)
        self.addCleanup(worker.kill)
        [first] = worker.send_tasks(context, [payload],
                                    [(0, blob, (decoy, "concurrency-shared-decoy"))])
        self.assertEqual(worker.take_back(), [first])  # it is not even up yet
        # The run ends as _ProcessRun.finish ends it; the next names its
        # own buffer 0, sent through the pipe.
        wire = concurrency._worker_module()
        concurrency._write(worker.task_fd, wire.FRAME_HEADER.pack(b"D", 0))
        concurrency._write(worker.claim_write_fd, wire.CLAIM.pack(wire.DROP_SHARED))
        worker.send_tasks(context, [payload], [(0, blob, None)])
        frames = []
        end = time.monotonic() + LONG_TIMEOUT
        while not any(kind in (b"R", b"E") for kind, _body in frames):
            self.assertLess(time.monotonic(), end, "no outcome from the worker")
            select.select([worker.fd], [], [], 1.0)
            frames += worker.read_frames()
            self.assertFalse(worker.eof, frames)
        self.assertEqual([kind for kind, _body in frames], [b"U", b"R"])
        self.assertEqual(concurrency._worker_module().loads_value(frames[-1][1]), len(blob))

    def test_a_large_run_is_serialized_as_it_goes_and_holds_few_payloads(self):
        eager = concurrency._EAGER_TASKS
        sock = socket.socket()
        self.addCleanup(sock.close)
        marker = self.path("ran")
        # Up to _EAGER_TASKS tasks: all serialized before any starts.
        tasks = [lambda i=i: i for i in range(eager - 1)] + [lambda: sock]
        tasks[0] = lambda: write_file(marker, "x")
        with self.assertRaises(concurrency.SerializationError) as caught:
            self.d.run(tasks)
        self.assertEqual(caught.exception.key, eager - 1)
        self.assertFalse(os.path.exists(marker))
        # Beyond: the rest as workers need them; one that can't fails alone.
        held = []
        release = concurrency._Payloads.release

        def watch(payloads, index):
            held.append(len(payloads.serialized))
            release(payloads, index)

        tasks = [lambda i=i: i for i in range(eager + 2000)]
        tasks[eager + 1000] = lambda: sock
        with mock.patch.object(concurrency._Payloads, "release", watch):
            result = self.d.run(tasks, return_exceptions=True)
        bad = result.pop(eager + 1000)
        self.assertIsInstance(bad, concurrency.SerializationError)
        self.assertEqual(bad.key, eager + 1000)
        self.assertEqual(result, [i for i in range(eager + 2000) if i != eager + 1000])
        self.assertLess(min(held[-1000:]), 100)  # at the end, a few in flight

    @unittest.skipUnless(HAVE_PROC, "needs /proc")
    def test_workers_that_leave_idle_are_reaped_within_a_moment(self):
        quick = concurrency.ProcessDriver(idle_timeout=0.3)
        pids = set(quick.run([os.getpid, os.getpid]))
        self.assertTrue(pids <= {pid for pid, _state in own_children()})
        # No later run: they leave, and are reaped, by themselves.
        wait_until(lambda: not pids & {pid for pid, _state in own_children()}, SHORT_TIMEOUT,
                   "the idle workers to be reaped")
        self.assertEqual(quick.run([lambda: "again"]), ["again"])

    @unittest.skipUnless(HAVE_PROC and sys.platform.startswith("linux"), "needs Linux /proc")
    def test_workers_are_recognisable_in_ps_and_top(self):
        [pid] = self.d.run([os.getpid])
        with open("/proc/%d/cmdline" % pid, "rb") as file:
            argv = file.read().decode().split("\0")
        self.assertEqual(argv[0], sys.executable)
        code = argv[argv.index("-c") + 1]
        self.assertTrue(code.startswith("'concurrency worker.py serve, of process %d'; "
                                        % os.getpid()), code)
        with open("/proc/%d/comm" % pid) as file:
            self.assertEqual(file.read().strip(), "concurrency")

    def test_cancelling_run_async_while_it_waits_for_a_worker(self):
        # Every worker busy with another run: the wait itself is cancellable,
        # and the cancelled tasks never start, not even once a worker frees.
        one = concurrency.ProcessDriver(max_workers=1)
        release, marker = self.path("release"), self.path("ran")

        def busy():
            wait_until(lambda: os.path.exists(release), LONG_TIMEOUT, "the release")
            return "busy done"

        results = []
        other = threading.Thread(target=lambda: results.append(one.run([busy])))
        other.start()
        self.addCleanup(other.join, LONG_TIMEOUT)
        self.addCleanup(write_file, release, "")
        wait_until(lambda: one._pool._live == 1 and not one._pool._idle, SHORT_TIMEOUT,
                   "the busy run to take the worker")

        async def main():
            started = time.monotonic()
            with self.assertRaises(asyncio.TimeoutError):
                await asyncio.wait_for(one.run_async([lambda: write_file(marker, "")]), 0.5)
            return time.monotonic() - started

        self.assertLess(asyncio.run(main()), 2.0)
        write_file(release, "")
        other.join(LONG_TIMEOUT)
        self.assertEqual(results, [["busy done"]])
        self.assertEqual(one.run([lambda: 7]), [7])
        self.assertFalse(os.path.exists(marker), "a cancelled task ran")

    def test_warm_workers_are_reused_across_runs(self):
        first = set(self.d.run([os.getpid, os.getpid]))
        second = set(self.d.run([os.getpid, os.getpid]))
        self.assertTrue(first & second, (first, second))

    def test_functions_of_every_kind_travel(self):
        import functools

        def recursive(n):  # refers to itself through a closure cell
            return 1 if n <= 1 else n * recursive(n - 1)

        def keyword_only(*, x=5):
            return x

        def tagged():
            return tagged.tag

        tagged.tag = "attribute"
        base = 10

        def outer():
            def inner(y):
                return base + y
            return inner(1)

        tasks = {"recursive": lambda: recursive(5), "keyword_only": keyword_only,
                 "tagged": tagged, "nested": outer, "partial": functools.partial(pow, 2, 10),
                 "module": lambda: os.path.basename("/a/b"), "builtin": lambda: abs(-3)}
        expected = {key: fn() for key, fn in tasks.items()}
        self.assertEqual(self.d.run(tasks), expected)

    def test_tasks_sharing_code_each_get_their_own_globals(self):
        # Lambdas made in a loop share their code, and travel as one template;
        # still, each task unpickles globals of its own, as sent.
        two = concurrency.ProcessDriver(max_workers=2)
        results = two.run([lambda i=i: (SEEN.append(i), list(SEEN))[1] for i in range(40)])
        self.assertEqual(results, [[i] for i in range(40)])
        self.assertEqual(SEEN, [])

    def test_a_task_replacing_std_streams_does_not_silence_the_next(self):
        one = concurrency.ProcessDriver(max_workers=1)

        def silence():
            sys.stdout = sys.stderr = open(os.devnull, "w")
            return os.getpid()

        def streams():
            return os.getpid(), sys.stdout is sys.__stdout__, sys.stderr is sys.__stderr__

        first, (second, stdout_back, stderr_back) = one.run([silence, streams])
        self.assertEqual(first, second, "both tasks ran in one worker")
        self.assertTrue(stdout_back and stderr_back)

    def test_each_task_starts_with_a_clean_main_module(self):
        one = concurrency.ProcessDriver(max_workers=1)

        def leave_something():
            sys.modules["__main__"].leftover = "from an earlier task"
            return os.getpid()

        def look():
            return os.getpid(), hasattr(sys.modules["__main__"], "leftover")

        first, (second, seen) = one.run([leave_something, look])
        self.assertEqual(first, second, "both tasks ran in one worker")
        self.assertFalse(seen)
        [(third, seen_later)] = one.run([look])
        self.assertEqual(third, first)
        self.assertFalse(seen_later)

    def test_nested_run_inside_a_task(self):
        def outer():
            return sum(concurrency.driver("process").run([lambda: 1, lambda: 2]))
        self.assertEqual(self.d.run([outer]), [3])

    def test_idle_worker_exits_by_itself(self):
        quick = concurrency.ProcessDriver(idle_timeout=0.2)
        [pid] = quick.run([os.getpid])
        wait_until(lambda: not pid_alive(pid), SHORT_TIMEOUT, "the idle worker to exit")
        # The driver notices and starts a fresh one.
        [again] = quick.run([os.getpid])
        self.assertNotEqual(again, pid)

    def test_threads_share_one_driver(self):
        results, errors = [], []

        def hammer(n):
            try:
                for i in range(5):
                    results.append(self.d.run([lambda: n, lambda: i]) == [n, i])
            except Exception as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=hammer, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(LONG_TIMEOUT)
        self.assertEqual(errors, [])
        self.assertEqual(results, [True] * 20)
        self.assertLessEqual(self.d._pool._live, self.d.max_workers)


def own_children():
    """(pid, state) of this process's children, zombies included (Linux)."""
    children = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/stat" % pid) as file:
                fields = file.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():
            children.append((int(pid), fields[0]))
    return children


@unittest.skipUnless(hasattr(os, "fork"), "needs os.fork")
class ForkDriverTest(ChildDriverTests, CleanTestCase):
    driver = "fork"

    def test_a_class_made_here_after_a_fork_is_never_taken_for_the_child_s(self):
        # A fork child names a class it did not make by its address, which
        # the parent looks up.  A class the parent made afterwards from a
        # child's data may sit at an address the child's own new class had
        # there, with the same name: two type("Model") classes of one
        # result came back as one.  Here, deterministically, the lookup of
        # such an address is refused.
        worker = concurrency._worker_module()
        forked_at = worker.MADE[0]
        made = worker.make_class(type, "Model", (), {"__module__": "__main__"}, None, False)
        like = type("Model", (), {"__module__": "__main__"})
        self.assertIs(worker._class_at(id(made), like), made)  # found when nothing says when
        worker.RESOLVING_FORKED_AT[0] = forked_at
        try:
            self.assertIsNone(worker._class_at(id(made), like))
        finally:
            worker.RESOLVING_FORKED_AT[0] = None
        worker.RESOLVING_FORKED_AT[0] = worker.MADE[0]  # forked after it was made
        try:
            self.assertIs(worker._class_at(id(made), like), made)
        finally:
            worker.RESOLVING_FORKED_AT[0] = None

    @unittest.skipUnless(HAVE_PROC, "needs /proc")
    def test_children_of_a_run_that_comes_alone_are_reaped_within_a_moment(self):
        time.sleep(concurrency._BURST_GAP)  # no run just before: it comes alone
        pids = set(self.d.run([os.getpid, os.getpid]))
        # No later run, no signal handler: they are reaped all the same.
        wait_until(lambda: not pids & {pid for pid, _state in own_children()}, SHORT_TIMEOUT,
                   "the run's children to be reaped")

    @unittest.skipUnless(HAVE_PROC, "needs /proc")
    def test_finished_children_are_reaped_by_the_next_run_of_any_driver(self):
        for later in ("fork", "process"):
            with self.subTest(later=later):
                pids = set(self.d.run([os.getpid, os.getpid]))
                wait_until(lambda: all(state == "Z" for pid, state in own_children()
                                       if pid in pids), SHORT_TIMEOUT, "the children to exit")
                concurrency.driver(later).run([lambda: 1])
                # No zombie of theirs left (a live child under one of their
                # pids is a new process that got the pid again).
                self.assertEqual(pids & {pid for pid, state in own_children() if state == "Z"},
                                 set())

    @unittest.skipUnless(HAVE_PROC, "needs /proc")
    def test_a_pool_s_reaper_reaps_them_too_and_no_fork_sees_its_thread(self):
        process = concurrency.ProcessDriver()
        process.run([lambda: 1])  # warm workers, and the reaper that watches them
        pids = set(self.d.run([os.getpid, os.getpid]))
        process.run([lambda: 2])  # it is back once the fork run is over
        wait_until(lambda: not pids & {pid for pid, _state in own_children()}, SHORT_TIMEOUT,
                   "the fork children to be reaped")
        # Neither our forks nor the caller's ever see a thread of ours.
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            self.assertEqual(self.d.run([lambda: 1]), [1])
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
        self.assertEqual(process.run([lambda: 3]), [3])

    def test_after_a_quick_run_the_next_forks_one_child_until_tasks_prove_slow(self):
        for name in ("_QUICK_RUN", "_SOLO_GRACE"):
            self.addCleanup(setattr, concurrency, name, getattr(concurrency, name))
        concurrency._QUICK_RUN = 1.0  # quick, however busy this machine is
        concurrency._SOLO_GRACE = LONG_TIMEOUT  # and never handed over
        self.d.run([lambda: 1, lambda: 2])
        first, second = self.d.run([os.getpid, os.getpid])
        self.assertEqual(first, second)
        # A run of more tasks than the quick one forks one per core.
        meet = self.subdir("meet")
        self.assertEqual(self.d.run([lambda i=i: rendezvous(meet, str(i), 3, timeout=5.0)
                                     for i in range(3)], timeout=LONG_TIMEOUT), ["0", "1", "2"])
        # So does one after a slow run: two tasks that meet can.
        self.d.run([lambda: time.sleep(1.2)])  # slower than _QUICK_RUN
        meet = self.subdir("meet-again")
        self.assertEqual(self.d.run([lambda: rendezvous(meet, "a", 2, timeout=5.0),
                                     lambda: rendezvous(meet, "b", 2, timeout=5.0)],
                                    timeout=LONG_TIMEOUT), ["a", "b"])

    def test_where_forks_are_slow_a_run_is_quick_by_what_its_forks_cost(self):
        # Forks that take 50 ms (a process of many gigabytes): a run of two
        # 20 ms tasks is quick beside them, and the next forks one child.
        self.addCleanup(setattr, concurrency._state, "fork_seconds",
                        concurrency._state.fork_seconds)
        concurrency._state.fork_seconds = 0.05
        self.d.run([lambda: time.sleep(0.02), lambda: time.sleep(0.02)])
        first, second = self.d.run([lambda: (time.sleep(0.02), os.getpid())[1]] * 2)
        self.assertEqual(first, second)
        # Where they are quick, the same run is not: two children.
        concurrency._state.fork_seconds = 0.0001
        self.d.run([lambda: time.sleep(0.02), lambda: time.sleep(0.02)])
        first, second = self.d.run([lambda: (time.sleep(0.02), os.getpid())[1]] * 2)
        self.assertNotEqual(first, second)

    def test_after_a_quick_run_a_crash_or_a_task_computing_forever_holds_back_no_other(self):
        # One child given both tasks: the one behind a crash runs in a new
        # child, the one behind an endless task in another within a moment.
        self.addCleanup(setattr, concurrency, "_QUICK_RUN", concurrency._QUICK_RUN)
        concurrency._QUICK_RUN = 1.0  # quick, however busy this machine is

        def compute_forever():
            while True:
                pass

        for first, expected in ((lambda: os._exit(3), concurrency.WorkerCrashed),
                                (compute_forever, concurrency.TaskTimeout)):
            self.d.run([lambda: 1, lambda: 2])
            failed, second = self.d.run([first, lambda: "second"], timeout=3.0,
                                        return_exceptions=True)
            self.assertIsInstance(failed, expected)
            self.assertEqual(second, "second")

    @unittest.skipUnless(HAVE_PROC and sys.platform.startswith("linux"), "needs Linux /proc")
    def test_children_are_recognisable_in_top(self):
        [comm] = self.d.run([lambda: read_file("/proc/self/comm").strip()])
        self.assertEqual(comm, "concurrency")

    def test_process_run_inside_a_fork_task_starts_its_own_workers(self):
        process = concurrency.driver("process")
        parent_workers = set(process.run([os.getpid, os.getpid]))

        def nested():
            return set(concurrency.driver("process").run([os.getpid, os.getpid]))

        [child_workers] = self.d.run([nested])
        self.assertTrue(child_workers)
        self.assertFalse(child_workers & parent_workers)
        # The parent's warm workers were left alone and still serve.
        self.assertTrue(set(process.run([os.getpid, os.getpid])) & parent_workers)

    def test_unavailable_without_os_fork(self):
        self.addCleanup(setattr, concurrency, "_HAVE_FORK", concurrency._HAVE_FORK)
        concurrency._HAVE_FORK = False
        with self.assertRaisesRegex(concurrency.ConcurrencyError,
                                    "needs os.fork.*use the process driver"):
            concurrency.ForkDriver()

    def test_off_posix_errors_point_to_the_sync_driver(self):
        # As on Windows: neither child driver works there, and neither error
        # may send the user to the other.
        for name in ("_HAVE_FORK", "_POSIX"):
            self.addCleanup(setattr, concurrency, name, getattr(concurrency, name))
            setattr(concurrency, name, False)
        for driver in (concurrency.ForkDriver, concurrency.ProcessDriver):
            with self.subTest(driver=driver.__name__):
                with self.assertRaisesRegex(concurrency.ConcurrencyError,
                                            "use the sync driver") as caught:
                    driver()
                self.assertNotIn("process driver;", str(caught.exception))
        self.assertEqual(concurrency.SyncDriver().run([lambda: 1]), [1])


# -- Scripts run as __main__, as users run them -------------------------------

class ScriptTestCase(CleanTestCase):
    """Runs a user's script in a fresh interpreter, with the library from the
    checkout, vendored into the script's project, or installed."""

    def script(self, source, *, layout="checkout", env=None, name="main.py"):
        """Write the script; return (argv, env, cwd) to run it with."""
        project = self.subdir("project-%s" % uuid.uuid4().hex[:8])
        import_line = "import concurrency"
        child_env = dict(os.environ)
        child_env.pop("PYTHONPATH", None)
        child_env.pop("CONCURRENCY_DRIVER", None)
        if layout == "checkout":
            child_env["PYTHONPATH"] = REPO
        elif layout == "vendored":
            vendor = os.path.join(project, "myapp", "_vendor")
            os.makedirs(vendor)
            for init in ("myapp", os.path.join("myapp", "_vendor")):
                write_file(os.path.join(project, init, "__init__.py"), "")
            for module in ("concurrency.py", "worker.py"):
                shutil.copy(os.path.join(REPO, module), vendor)
            import_line = "from myapp._vendor import concurrency"
            # A worker.py of the user's own must never be picked up.
            write_file(os.path.join(project, "worker.py"),
                       "raise SystemExit('the user\\'s worker.py was imported')\n")
        elif layout == "installed":
            probe = subprocess.run([sys.executable, "-c", "import concurrency; "
                                    "print(concurrency.__file__)"], cwd=project,
                                   env=child_env, capture_output=True, text=True,
                                   timeout=LONG_TIMEOUT)
            if probe.returncode != 0 or probe.stdout.startswith(REPO + os.sep):
                self.skipTest("concurrency is not installed (pip install .)")
        self.mark = uuid.uuid4().hex
        child_env[MARK_ENV] = self.mark
        child_env.update(env or {})
        source = textwrap.dedent(source).replace("import concurrency", import_line, 1)
        write_file(os.path.join(project, name), source)
        return [sys.executable, name], child_env, project

    def run_script(self, source, **kwargs):
        timeout = kwargs.pop("timeout", LONG_TIMEOUT)
        argv_extra = kwargs.pop("argv_extra", [])
        argv, env, cwd = self.script(source, **kwargs)
        done = subprocess.run(argv + argv_extra, env=env, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)
        self.assert_marked_processes_gone()
        return done

    def assert_marked_processes_gone(self, within=SHORT_TIMEOUT):
        if HAVE_PROC:
            wait_until(lambda: not marked_processes(self.mark), within,
                       "the script's processes to end")

    def assertSucceeded(self, done):
        self.assertEqual(done.returncode, 0, "stdout:\n%s\nstderr:\n%s"
                         % (done.stdout, done.stderr))


MAIN_SCRIPT = """\
import json, os, sys
import concurrency

print("script body ran", flush=True)   # must appear once: never re-imported

TABLES = {"users": 120, "orders": 345}

class Row:
    def __init__(self, table, count):
        self.table, self.count = table, count

class LookupFailed(Exception):
    def __init__(self, table, reason):
        super().__init__("%s: %s" % (table, reason))
        self.table = table

def count(table):
    return Row(table, TABLES[table])

def fail(table):
    raise LookupFailed(table, "gone")

prefix = "n="
results = concurrency.driver(sys.argv[1]).run({
    "users": lambda: count("users"),
    "orders": lambda: count("orders"),
    "label": lambda: prefix + str(len(TABLES)),
})
try:
    concurrency.driver(sys.argv[1]).run([lambda: fail("users")])
except LookupFailed as exc:
    failed = [type(exc) is LookupFailed, exc.table]
print(json.dumps({
    "users": results["users"].count,
    "orders": results["orders"].count,
    "same_class": all(type(results[k]) is Row for k in ("users", "orders")),
    "label": results["label"],
    "failed": failed,
    "module": concurrency.__file__,
}))
"""


class ScriptTest(ScriptTestCase):

    def check_main_script(self, layout, driver):
        argv, env, cwd = self.script(MAIN_SCRIPT, layout=layout)
        done = subprocess.run(argv + [driver], env=env, cwd=cwd, capture_output=True,
                              text=True, timeout=LONG_TIMEOUT)
        self.assert_marked_processes_gone()
        self.assertSucceeded(done)
        lines = done.stdout.splitlines()
        self.assertEqual(lines.count("script body ran"), 1, done.stdout)
        report = json.loads(lines[-1])
        self.assertEqual(report["users"], 120)
        self.assertEqual(report["orders"], 345)
        self.assertTrue(report["same_class"])
        self.assertEqual(report["label"], "n=2")
        self.assertEqual(report["failed"], [True, "users"])
        return report

    def test_map_of_a_function_from_main_on_every_driver(self):
        # A script's own function, a global it reads, a class of its own as
        # the result; its body never runs again in a worker.
        done = self.run_script("""\
            import json, sys
            import concurrency

            print("script body ran", flush=True)
            FACTOR = 3

            class Scaled:
                def __init__(self, value):
                    self.value = value

            def scale(x):
                if x == 13:
                    raise ValueError("unlucky %d" % x)
                return Scaled(x * FACTOR)

            report = {}
            for name in ("process", "fork", "sync"):
                values = concurrency.driver(name).map(scale, range(100), return_exceptions=True)
                report[name] = [sum(v.value for v in values if isinstance(v, Scaled)),
                                all(type(v) is Scaled for i, v in enumerate(values) if i != 13),
                                repr(values[13])]
                words = concurrency.driver(name).map(str.upper, (w for w in ["a", "b"]))
                report[name].append(words)
            print(json.dumps(report))
            """, layout="vendored")
        self.assertSucceeded(done)
        lines = done.stdout.splitlines()
        self.assertEqual(lines.count("script body ran"), 1, done.stdout)
        report = json.loads(lines[-1])
        expected = [3 * (sum(range(100)) - 13), True, "ValueError('unlucky 13')", ["A", "B"]]
        self.assertEqual(report, {"process": expected, "fork": expected, "sync": expected})

    def test_main_script_from_checkout(self):
        for driver in ("process", "fork", "sync"):
            with self.subTest(driver=driver):
                report = self.check_main_script("checkout", driver)
                self.assertEqual(report["module"], os.path.join(REPO, "concurrency.py"))

    def test_main_script_with_vendored_copy(self):
        for driver in ("process", "fork"):
            with self.subTest(driver=driver):
                report = self.check_main_script("vendored", driver)
                self.assertIn(os.path.join("myapp", "_vendor", "concurrency.py"),
                              report["module"])

    def test_main_script_with_installed_package(self):
        report = self.check_main_script("installed", "process")
        # Not under the checkout (a path test: a venv beside the checkout
        # may share its name's first letters).
        self.assertNotEqual(os.path.commonpath([REPO, report["module"]]), REPO,
                            report["module"])

    def test_a_large_buffer_many_tasks_capture_is_sent_once_not_once_a_task(self):
        done = self.run_script("""\
            import json, os, resource
            import concurrency

            blob = os.urandom(16 << 20)
            mutable = bytearray(4 << 20)

            class Holder:
                pass

            holder = Holder()
            holder.data = blob  # deeper than a global: found by its pickle's size
            twice = (mutable, mutable, blob, blob)  # one object reached twice stays one

            def touch(i):
                mutable[0] = i
                return mutable[0]

            def peak_mb():
                return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

            concurrency.run([lambda: 0, lambda: 0])  # workers up
            before = peak_mb()
            results = concurrency.run([lambda i=i: (i, len(blob), blob[i], touch(i))
                                       for i in range(24)])
            deeper = concurrency.run([lambda i=i: holder.data[i] for i in range(24)])
            identity = concurrency.run([lambda: (twice[0] is twice[1], twice[2] is twice[3])] * 4)
            print(json.dumps({
                "identity": identity,
                "results": results == [[i, len(blob), blob[i], i] for i in range(24)]
                           or results == [(i, len(blob), blob[i], i) for i in range(24)],
                "deeper": deeper == [blob[i] for i in range(24)],
                "caller's bytearray untouched": mutable[0] == 0,
                "grown_mb": peak_mb() - before}))
            """)
        self.assertSucceeded(done)
        report = json.loads(done.stdout.splitlines()[-1])
        self.assertTrue(report["results"])
        self.assertTrue(report["deeper"])
        self.assertEqual(report["identity"], [[True, True]] * 4)
        self.assertTrue(report["caller's bytearray untouched"])
        # Once a task, the payloads alone would take 24 x 16 MB.
        self.assertLess(report["grown_mb"], 120, report)

    def test_an_object_s_data_that_pickles_out_of_band_is_sent_once_as_bytes_are(self):
        # A NumPy array pickles its data as a pickle buffer; Frame does the
        # same without NumPy.
        done = self.run_script("""\
            import json, pickle, resource
            import concurrency

            class Frame:
                def __init__(self, data):
                    self.data = data

                def __reduce_ex__(self, protocol):
                    return Frame, (pickle.PickleBuffer(self.data),)

            frame = Frame(bytearray(range(256)) * (64 << 10))  # 16 MB, writable
            fixed = Frame(bytes(range(256)) * (16 << 10))  # 4 MB, read-only

            def touch(i):
                frame.data[i] = 0  # the task's own copy
                return (len(frame.data), type(frame.data).__name__, frame.data[i],
                        frame.data[i + 1], type(fixed.data).__name__, fixed.data[i])

            def peak_mb():
                return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

            concurrency.run([lambda: 0, lambda: 0])  # workers up
            before = peak_mb()
            results = concurrency.run([lambda i=i: touch(i) for i in range(24)])
            report = {
                "results": [list(r) for r in results] == [
                    [16 << 20, "bytearray", 0, (i + 1) % 256, "bytes", i] for i in range(24)],
                "caller's untouched": frame.data[:24] == bytearray(range(24)),
                "grown_mb": peak_mb() - before}
            try:
                import numpy
            except ImportError:
                numpy = None
            if numpy is not None:
                array = numpy.arange(2 << 20, dtype=numpy.float64)  # 16 MB
                total = float(array.sum())

                def zero(i):
                    array[i] = 0.0
                    return float(array.sum()), bool(array.flags.writeable)

                report["numpy"] = concurrency.run([lambda i=i: zero(i) for i in range(24)]) == [
                    (total - i, True) for i in range(24)] and bool(array[5] == 5.0)
                report["numpy_grown_mb"] = peak_mb() - before
            print(json.dumps(report))
            """)
        self.assertSucceeded(done)
        report = json.loads(done.stdout.splitlines()[-1])
        self.assertTrue(report["results"])
        self.assertTrue(report["caller's untouched"])
        # Once a task, the payloads alone would take 24 x 16 MB.
        self.assertLess(report["grown_mb"], 120, report)
        if "numpy" in report:
            self.assertTrue(report["numpy"])
            self.assertLess(report["numpy_grown_mb"], 160, report)

    def test_where_no_bytecode_is_cached_workers_run_the_code_the_caller_compiled(self):
        # worker.py is edited once the caller has loaded it: a worker that
        # compiles the file itself sees the edit, one that runs the
        # caller's compiled code does not.
        source = """\
            import os, sys
            import concurrency
            assert concurrency.run([lambda: 1]) == [1]
            path = os.path.join(os.path.dirname(concurrency.__file__), "worker.py")
            with open(path, "a") as file:
                file.write("\\nEDITED = True\\n")
            fresh = concurrency.ProcessDriver()  # a pool of its own: new workers
            print(fresh.run([lambda: getattr(sys.modules["_concurrency_worker"],
                                             "EDITED", False)])[0])
            """
        for forbidden, expected in (("1", "False"), (None, "True")):
            with self.subTest(PYTHONDONTWRITEBYTECODE=forbidden):
                argv, env, cwd = self.script(source, layout="vendored")
                env.pop("PYTHONDONTWRITEBYTECODE", None)
                if forbidden:
                    env["PYTHONDONTWRITEBYTECODE"] = forbidden
                done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True,
                                      timeout=LONG_TIMEOUT)
                self.assert_marked_processes_gone()
                self.assertSucceeded(done)
                self.assertEqual(done.stdout.split(), [expected])

    def test_vendored_inside_a_zipapp(self):
        argv, env, cwd = self.script("")
        app = self.subdir("app")
        for module in ("concurrency.py", "worker.py"):
            shutil.copy(os.path.join(REPO, module), app)
        write_file(os.path.join(app, "__main__.py"), textwrap.dedent("""\
            import json, os
            import concurrency
            def nested():
                return concurrency.driver("process").run([lambda: 3])[0]
            out = {name: concurrency.driver(name).run([lambda: 1, lambda: 2, nested])
                   for name in ("process", "fork")}
            concurrency.driver("process").defer([lambda: open("deferred", "w").close()])
            print(json.dumps(out))
            """))
        import zipapp
        zipapp.create_archive(app, os.path.join(cwd, "app.pyz"))
        env.pop("PYTHONPATH", None)
        done = subprocess.run([sys.executable, "app.pyz"], env=env, cwd=cwd,
                              capture_output=True, text=True, timeout=LONG_TIMEOUT)
        self.assertSucceeded(done)
        self.assertEqual(json.loads(done.stdout.splitlines()[-1]),
                         {"process": [1, 2, 3], "fork": [1, 2, 3]})
        wait_until(lambda: os.path.exists(os.path.join(cwd, "deferred")), LONG_TIMEOUT,
                   "the deferred task")
        self.assert_marked_processes_gone()

    def test_user_modules_travel_by_reference(self):
        argv, env, cwd = self.script("""\
            import concurrency
            import shopdb
            print(concurrency.run([lambda: shopdb.count("users"),
                                   lambda: shopdb.count("orders")]))
            """)
        # A module next to the script holding an open connection: copied by
        # value (dill's default for it) the task could not be serialized.
        write_file(os.path.join(cwd, "shopdb.py"), textwrap.dedent("""\
            import sqlite3
            connection = sqlite3.connect(":memory:")
            connection.execute("CREATE TABLE users (id)")
            connection.execute("CREATE TABLE orders (id)")
            connection.executemany("INSERT INTO users VALUES (?)", [(1,), (2,)])
            connection.executemany("INSERT INTO orders VALUES (?)", [(1,), (2,), (3,)])
            def count(table):
                return connection.execute("SELECT count(*) FROM " + table).fetchone()[0]
            """))
        done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True,
                              timeout=LONG_TIMEOUT)
        self.assert_marked_processes_gone()
        self.assertSucceeded(done)
        self.assertEqual(done.stdout.strip(), "[2, 3]")

    def test_print_in_task_reaches_parent_stdout_and_stderr(self):
        done = self.run_script("""\
            import os, sys
            import concurrency
            def noisy(n):
                # One write each: two tasks share the pipe and may interleave
                # between writes (PYTHONUNBUFFERED splits a print in two).
                sys.stdout.write("printed by task %d\\n" % n)
                sys.stderr.write("stderr of task %d\\n" % n)
                os.write(1, b"raw write %d\\n" % n)
                return n
            print(concurrency.run([lambda: noisy(1), lambda: noisy(2)]))
            """)
        self.assertSucceeded(done)
        for n in (1, 2):
            self.assertIn("printed by task %d" % n, done.stdout)
            self.assertIn("raw write %d" % n, done.stdout)
            self.assertIn("stderr of task %d" % n, done.stderr)
        self.assertEqual(done.stdout.splitlines()[-1], "[1, 2]")

    @unittest.skipUnless(sys.platform.startswith("linux") and os.uname().machine
                         in ("x86_64", "aarch64"), "a seccomp filter for Linux x86_64/aarch64")
    def test_large_results_still_arrive_where_reading_child_memory_is_denied(self):
        # As under a container's seccomp profile: process_vm_readv fails with
        # EPERM, and results come through the pipe instead.
        source = """\
            import ctypes, errno, json, os, sys
            import concurrency

            NUMBER = {"x86_64": 310, "aarch64": 270}[os.uname().machine]
            DENY = getattr(errno, os.environ["DENY_ERRNO"])
            libc = ctypes.CDLL(None, use_errno=True)

            class Rule(ctypes.Structure):
                _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte),
                            ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

            class Program(ctypes.Structure):
                _fields_ = [("len", ctypes.c_ushort), ("rules", ctypes.POINTER(Rule))]

            rules = (Rule * 4)(Rule(0x20, 0, 0, 0),            # load the syscall number
                               Rule(0x15, 0, 1, NUMBER),       # process_vm_readv?
                               Rule(0x06, 0, 0, 0x50000 | DENY),
                               Rule(0x06, 0, 0, 0x7FFF0000))   # allow the rest
            assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
            assert libc.prctl(22, 2, ctypes.byref(Program(4, rules)), 0, 0) == 0
            denied = libc.syscall(NUMBER, os.getpid(), None, 0, None, 0, 0) == -1
            denied = denied and ctypes.get_errno() == DENY

            results = []
            for name in sys.argv[1:]:
                for _ in range(2):  # the second time on warm workers, if any
                    out = concurrency.driver(name).run([
                        lambda: b"x" * (3 << 20),
                        lambda: (bytearray(b"y" * (2 << 20)), 5),
                    ])
                    results.append([len(out[0]), out[0] == b"x" * (3 << 20),
                                    type(out[1][0]).__name__, len(out[1][0]), out[1][1]])
            print(json.dumps({"denied": denied, "results": results,
                              "lending": concurrency._state.lending}))
            """
        expected = [3 << 20, True, "bytearray", 2 << 20, 5]
        # EPERM as a hardened kernel answers; ESRCH, as some filters do, must
        # not pass for a dead child (that would wait forever).
        for deny, drivers in (("EPERM", ["process", "fork"]), ("EPERM", ["fork", "process"]),
                              ("ESRCH", ["process", "fork"])):
            with self.subTest(deny=deny, first=drivers[0]):
                argv, env, cwd = self.script(source, env={"DENY_ERRNO": deny})
                done = subprocess.run(argv + drivers, env=env, cwd=cwd, capture_output=True,
                                      text=True, timeout=LONG_TIMEOUT)
                self.assert_marked_processes_gone()
                self.assertSucceeded(done)
                report = json.loads(done.stdout.splitlines()[-1])
                self.assertTrue(report["denied"], "the filter did not deny the call")
                self.assertEqual(report["results"], [expected] * 4)
                self.assertFalse(report["lending"])

    def test_script_ends_as_soon_as_its_work_is_done(self):
        started = time.monotonic()
        done = self.run_script("""\
            import concurrency
            print(concurrency.run([lambda: 1, lambda: 2]))
            """)
        self.assertSucceeded(done)
        # Far below the workers' idle timeout: nothing waited for them.
        self.assertLess(time.monotonic() - started, concurrency.DEFAULT_IDLE_TIMEOUT / 4)

    def test_demo_command(self):
        argv, env, cwd = self.script("")
        done = subprocess.run([sys.executable, "-m", "concurrency", "demo"], env=env,
                              cwd=cwd, capture_output=True, text=True, timeout=LONG_TIMEOUT)
        self.assert_marked_processes_gone()
        self.assertSucceeded(done)
        lines = [line for line in done.stdout.splitlines() if "users=" in line]
        dask = importlib.util.find_spec("distributed") is not None
        self.assertEqual(len(lines), 2 + hasattr(os, "fork") + dask, done.stdout)
        self.assertEqual([line.split()[0] for line in lines],
                         ["sync", "process"] + ["fork"] * hasattr(os, "fork")
                         + ["dask"] * dask)
        if not dask:
            self.assertIn("dask     not run: the dask driver needs", done.stdout)
        # Without distributed: said so, and the rest ran.
        done = subprocess.run([sys.executable, "-c", "import sys; sys.modules['distributed'] "
                               "= None; import concurrency; sys.exit(concurrency._main"
                               "(['demo']))"], env=env, cwd=cwd, capture_output=True,
                              text=True, timeout=LONG_TIMEOUT)
        self.assert_marked_processes_gone()
        self.assertSucceeded(done)
        self.assertIn("\ndask     not run: the dask driver needs Dask's distributed",
                      done.stdout)
        self.assertIn("\nprocess  users=120 orders=345", done.stdout)
        for line in lines:
            self.assertIn("users=120 orders=345", line)


# -- Fidelity: what a task captures arrives as it was -------------------------

# Cases after dill's and cloudpickle's own test suites and everyday code.
# Each make_<name>() returns a task; the task returns plain values that must
# be the same in a child as when it is called in the caller.
FIDELITY_CASES = r'''"""Fidelity cases: each make_<name>() returns a task; the task returns plain
values that must be the same in a child as when called here."""
import abc
import collections
import dataclasses
import enum
import functools
import inspect
import logging
import os
import pickle
import sys
import threading
import types
import typing
import xml.etree.ElementTree

CASES = {}


def case(fn):
    CASES[fn.__name__[len("make_"):]] = fn
    return fn


# -- functions: what they carry besides their code

def deco(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)
    return wrapper


@deco
def greet(name: str, times: int = 1) -> str:
    """Say hello."""
    return "hello " + name * times


@case
def make_wraps_keeps_doc_and_annotations():
    return lambda: (greet.__doc__, str(inspect.signature(greet)),
                    sorted(typing.get_type_hints(greet)), greet.__name__,
                    greet.__qualname__, greet("a", 2))


@case
def make_wrapper_logs_under_its_own_module():
    @functools.wraps(os.path.join)
    def wrapper():
        return logging.getLogger(__name__).name, __name__
    return wrapper


@case
def make_function_attributes_and_kwdefaults():
    def tagged(*, scale=3):
        return tagged.tag * scale
    tagged.tag = 2
    return lambda: (tagged(), tagged.__kwdefaults__, tagged.__qualname__)


COUNTER = 0


def bump():
    global COUNTER
    COUNTER += 1


def read_counter():
    return COUNTER


@case
def make_functions_share_globals():
    def task():
        start = read_counter()
        bump()
        bump()
        return read_counter() - start
    return task


def define_setting():
    global LATE_SETTING
    LATE_SETTING = 41


def use_setting():
    return LATE_SETTING + 1


@case
def make_global_defined_by_a_helper():
    return lambda: (define_setting(), use_setting())[1]


_MISSING = object()
SHARED_LIST = []


@case
def make_sentinel_default_keeps_identity():
    return lambda value=_MISSING, items=SHARED_LIST: (value is _MISSING, items is SHARED_LIST)


@case
def make_closures_share_a_cell():
    count = 0

    def inc():
        nonlocal count
        count += 1

    def get():
        return count
    return lambda: (inc(), inc(), get())[2]


@case
def make_recursive_closure():
    def fact(n):
        return 1 if n <= 1 else n * fact(n - 1)
    return lambda: fact(6)


@case
def make_partial_of_lambda():
    return functools.partial(lambda a, b: a * 10 + b, 4, b=2)


def countdown(n):
    while n:
        yield n
        n -= 1


@case
def make_generator_function():
    return lambda: list(countdown(3))


@functools.lru_cache(maxsize=8)
def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)


@functools.cache
def square(n):
    return n * n


@case
def make_lru_cache_functions():
    return lambda: (fib(30), fib.cache_parameters(), square(7))


@functools.singledispatch
def describe(value):
    return "thing"


@describe.register
def _describe_int(value: int):
    return "int"


@describe.register(str)
def _describe_str(value):
    return "str"


@case
def make_singledispatch_function():
    return lambda: (describe(1), describe("a"), describe(1.5))


import xml.etree.ElementTree  # noqa: E402  (a submodule reached as an attribute)


@case
def make_submodule_as_attribute():
    return lambda: xml.etree.ElementTree.fromstring("<a>x</a>").text


plugins = types.ModuleType("plugins")
plugins.VALUE = 7
exec("def double():\n    return VALUE * 2\n", plugins.__dict__)


@case
def make_module_made_at_run_time():
    return lambda: (plugins.double(), plugins.__name__)


@case
def make_context_argv_and_recursion_limit():
    return lambda: (sys.argv[1:], sys.getrecursionlimit())


# -- classes

class Color(enum.Enum):
    RED = 1
    GREEN = 2
    CRIMSON = 1  # an alias

    def shout(self):
        return self.name.upper() + "!"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Perm(enum.Flag):
    R = 4
    W = 2
    X = 1


class Planet(enum.Enum):
    EARTH = (5.97e24, 6.37e6)

    def __init__(self, mass, radius):
        self.mass = mass
        self.radius = radius


@case
def make_enums():
    red = Color.RED
    return lambda: (red is Color.RED, Color(2).name, [c.name for c in Color],
                    Color.CRIMSON is Color.RED, Color.RED.shout(), Level.HIGH + 1,
                    (Perm.R | Perm.W).value, Perm.R in (Perm.R | Perm.X),
                    Planet.EARTH.radius, isinstance(red, Color))


class Registry(type):
    names = []

    def __new__(mcs, name, bases, namespace):
        cls = super().__new__(mcs, name, bases, namespace)
        mcs.names.append(name)
        return cls


class Plugin(metaclass=Registry):
    kind = "plugin"


@case
def make_class_with_a_metaclass():
    return lambda: (type(Plugin).__name__, Plugin.kind, Plugin().kind)


class Config:
    def __init__(self, name):
        self.name = name


Config.default = Config("default")


@case
def make_class_referring_to_itself():
    return lambda: (Config.default.name, isinstance(Config.default, Config))


T = typing.TypeVar("T")


class Box(typing.Generic[T]):
    def __init__(self, value: T):
        self.value = value


@case
def make_typevar_and_generic():
    return lambda: (Box[int](3).value, Box.__parameters__ == (T,), T.__name__)


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int = 0


Pair = dataclasses.make_dataclass("Pair", ["a", "b"])


@case
def make_dataclasses():
    return lambda: (Point(1, 2), Pair(1, 2), [f.name for f in dataclasses.fields(Point)],
                    dataclasses.asdict(Point(3)),
                    dataclasses.fields(Point)[1].default is not dataclasses.MISSING)


if sys.version_info >= (3, 10):
    @dataclasses.dataclass(slots=True)
    class Slotted:
        a: int

    @case
    def make_slots_dataclass():
        return lambda: (Slotted(5), hasattr(Slotted(5), "__dict__"))


class Handler:
    def __init__(self):
        self.callback = self.handle
        self.n = 5

    def handle(self):
        return self.n


@case
def make_bound_method_in_instance_dict():
    handler = Handler()
    return lambda: (handler.callback(), handler.callback.__self__ is handler)


class Base:
    def __init__(self):
        self.made = "base"


class Child(Base):
    __slots__ = ()

    def __init__(self):
        super().__init__()
        self.made += "+child"

    @property
    def label(self):
        return self.made.upper()

    @classmethod
    def create(cls):
        return cls()

    @staticmethod
    def helper():
        return "static"


@case
def make_super_property_classmethod_staticmethod():
    return lambda: (Child.create().made, Child().label, Child.helper())


class Shape(abc.ABC):
    @abc.abstractmethod
    def area(self):
        pass


class Square(Shape):
    def area(self):
        return 4


Shape.register(int)


@case
def make_abstract_class_with_registered_subclass():
    return lambda: (Square().area(), isinstance(3, Shape), inspect.isabstract(Shape))


class Outer:
    class Inner:
        value = "inner"


@case
def make_nested_class():
    return lambda: (Outer.Inner.__qualname__, Outer.Inner.value)


Coordinates = collections.namedtuple("Coordinates", "lat lon")


class Version(typing.NamedTuple):
    major: int
    minor: int = 0


@case
def make_named_tuples():
    return lambda: (Coordinates(1, 2).lon, Version(3)._asdict(), type(Version(1)).__name__)


class Lazy:
    @functools.cached_property
    def value(self):
        return 42


@case
def make_cached_property():
    return lambda: Lazy().value


@case
def make_local_class():
    class Local:
        def __init__(self, v):
            self.v = v

        def __eq__(self, other):
            return type(other) is type(self) and other.v == self.v
        __hash__ = None
    return lambda: (Local(1) == Local(1), Local.__qualname__.split(".")[-1])


# -- objects that hang or lose data with a naive copy

LOCK = threading.RLock()
CONDITION = threading.Condition()
PLAIN_LOCK = threading.Lock()
STREAM_HANDLER = logging.StreamHandler(sys.stderr)


class Holder:
    def __init__(self):
        self.handler = logging.StreamHandler(sys.stderr)
        self.lock = threading.RLock()


HOLDER = Holder()


@case
def make_locks_come_back_usable():
    def use():
        got = [LOCK.acquire(timeout=5), CONDITION.acquire(timeout=5),
               HOLDER.lock.acquire(timeout=5)]
        for lock in (LOCK, CONDITION, HOLDER.lock):
            lock.release()
        STREAM_HANDLER.acquire()
        STREAM_HANDLER.release()
        return got, STREAM_HANDLER.stream is sys.stderr, HOLDER.handler.level
    return use


@case
def make_queue_captured():
    import queue
    box = queue.Queue()
    box.put("item")
    return lambda: (box.get(timeout=5), box.empty())


@case
def make_mapping_proxy_and_views():
    data = {"a": 1, "b": 2}
    proxy = types.MappingProxyType(data)
    keys = data.keys()
    return lambda: (dict(proxy), sorted(keys))


# -- more, after cloudpickle's and dill's own test suites

@case
def make_dict_views():
    data = collections.OrderedDict([("a", 1), ("b", 2)])
    plain = {"x": 1}
    return lambda: (list(data.keys()), list(data.values()), list(data.items()),
                    list(plain.items()), list(plain.values()))


@case
def make_memoryview_and_bytes():
    view = memoryview(b"abcdef")
    return lambda: (view.tobytes(), len(view))


@case
def make_closure_none_and_empty_cell():
    def plain():
        return None

    if False:
        later = None

    def reads_later():
        return later

    def probe():
        try:
            reads_later()
        except NameError as exc:
            return plain.__closure__ is None, type(exc).__name__
    return probe


class Node:
    pass


Node.parent_class = Node


def node_depth():
    return Node.parent_class is Node


@case
def make_cycle_in_class_dict_and_globals():
    return node_depth


@case
def make_method_and_getset_descriptors():
    upper, fromhex, fromkeys, real = str.upper, float.fromhex, dict.__dict__["fromkeys"], float.real
    return lambda: (upper("a"), fromhex("0x1p1"), fromkeys.__get__(None, dict)("ab"),
                    real.__get__(2.5))


@case
def make_logger_by_name():
    log = logging.getLogger("fidelity.app")
    return lambda: (log.name, log is logging.getLogger("fidelity.app"))


@case
def make_weakset_keeps_identity():
    import weakref

    class Item:
        pass
    item = Item()
    items = weakref.WeakSet([item])
    return lambda: (len(items), item in items)


class WithSlots:
    __slots__ = ("a", "__private")

    def __init__(self):
        self.a = 1
        self.__private = 2

    def total(self):
        return self.a + self.__private


@case
def make_instance_with_slots():
    instance = WithSlots()
    return lambda: (instance.total(), hasattr(instance, "__dict__"), WithSlots.__slots__)


@case
def make_positional_and_keyword_only():
    def f(a, /, b, *, c=3):
        return a + b + c
    return lambda: (f(1, 2), f(1, b=2, c=4), str(inspect.signature(f)))


class Tagged:
    def __init_subclass__(cls, tag=None, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.tag = tag


class Sub(Tagged, tag="sub"):
    pass


@case
def make_init_subclass_keyword():
    return lambda: Sub.tag


class Annotated:
    limit: typing.ClassVar[int] = 3
    mode: typing.Literal["a", "b"] = "a"
    name: str


@case
def make_class_annotations():
    return lambda: (sorted(Annotated.__annotations__), Annotated.limit, Annotated.mode)


@dataclasses.dataclass
class WithInitVar:
    scale: dataclasses.InitVar[int]
    total: int = 0
    unit: typing.ClassVar[str] = "m"

    def __post_init__(self, scale):
        self.total *= scale


@case
def make_dataclass_with_initvar_and_classvar():
    return lambda: (WithInitVar(2, 5).total, [f.name for f in dataclasses.fields(WithInitVar)],
                    WithInitVar.unit)


class Key:
    def __init__(self, name):
        self.name = name

    def __eq__(self, other):
        return isinstance(other, Key) and other.name == self.name

    def __hash__(self):
        return hash(self.name)


@case
def make_set_and_dict_of_instances():
    keys = {Key("a"), Key("b")}
    table = {Key("a"): 1}
    return lambda: (Key("a") in keys, table[Key("a")], len(keys))


@case
def make_exception_class_of_main():
    class Failed(Exception):
        def __init__(self, code):
            super().__init__("failed with %d" % code)
            self.code = code

    def task():
        try:
            raise Failed(3)
        except Failed as exc:
            return exc.code, str(exc)
    return task


@case
def make_coroutine_function():
    async def compute():
        return 6 * 7
    return compute


@case
def make_class_made_with_type():
    Made = type("Made", (object,), {"value": 9, "get": lambda self: self.value})
    return lambda: (Made().get(), Made.__name__)


@case
def make_nested_lambdas():
    outer = lambda x: lambda y: x + y  # noqa: E731
    return lambda: outer(1)(2)


class Parent:
    x = 1


class Kid(Parent):
    x = 1  # its own, though equal to the parent's


@case
def make_class_attribute_equal_to_the_base_one():
    def task():
        Parent.x = 2
        return Kid.x, "x" in vars(Kid)
    return task


@case
def make_views_and_descriptors_captured():
    data = {"a": 1, "b": 2}
    keys, values, items = data.keys(), data.values(), data.items()
    abstract = type.__dict__["__abstractmethods__"]

    class Shape(abc.ABC):
        @abc.abstractclassmethod
        def make(cls):
            pass

        @abc.abstractproperty
        def size(self):
            pass
    return lambda: (sorted(keys), sorted(values), sorted(items),
                    type(abstract).__name__, sorted(Shape.__abstractmethods__))


@case
def make_module_made_at_run_time_keeps_builtins():
    made = types.ModuleType("made")
    exec("def total(items):\n    return sum(items) + len(items)\n", made.__dict__)
    return lambda: made.total([1, 2])


@case
def make_global_function_used_by_a_class_method():
    class UsesHelper:
        def run(self):
            return read_counter() - read_counter(), greet("b")
    return lambda: UsesHelper().run()
'''

# Runs every case alone, two sharing code (made twice: one template), and all
# in one run, on the driver named in argv, then compares with in-process calls.
FIDELITY_CHECK = r'''import json, sys
import concurrency

# Tasks must see the caller's limit, and locks held while a run starts must
# not come back held.
sys.setrecursionlimit(1234)
driver = concurrency.driver(sys.argv[1])


def outcome(value):
    if isinstance(value, BaseException):
        return "%s: %s" % (type(value).__name__, value)
    return repr(value)


def run(tasks):
    try:
        return [outcome(value) for value in
                driver.run(tasks, timeout=SHORT_TIMEOUT, return_exceptions=True)]
    except Exception as exc:
        return [outcome(exc)] * len(tasks)


SHORT_TIMEOUT = 30
names = list(cases.CASES)
with cases.LOCK, cases.CONDITION, cases.HOLDER.lock:
    got = {"alone": {}, "two sharing code": {}}
    for name in names:
        got["alone"][name] = run([cases.CASES[name]()])[0]
        first, second = run([cases.CASES[name](), cases.CASES[name]()])
        got["two sharing code"][name] = first if first == second else (first, second)
    got["all in one run"] = dict(zip(names, run([cases.CASES[name]() for name in names])))
# Called here last: some cases change this process's state as they run.
expected = {name: outcome(concurrency.driver("sync").run([cases.CASES[name]()], return_exceptions=True)[0])
            for name in names}
broken = [name for name in names if isinstance(
    concurrency.driver("sync").run([cases.CASES[name]()], return_exceptions=True)[0],
    BaseException)]
mismatches = [[name, how, got[how][name], expected[name]]
              for how in got for name in names if got[how][name] != expected[name]]
print(json.dumps({"cases": len(names), "broken": broken, "mismatches": mismatches}))
'''

IDENTITY_SCRIPT = """\
import enum, json, sys
import concurrency

class Model:
    x = 0

class Color(enum.Enum):
    RED = 1

class Boom(Exception):
    pass

def make_local():
    class Model:
        x = 3
    return Model

def two_models():
    return type("Model", (), {"x": 1}), type("Model", (), {"x": 2})

def fact_closure():
    def fact(n):
        return 1 if n <= 1 else n * fact(n - 1)
    return fact

def local_error():
    class Boom(Exception):
        pass
    raise Boom("local")

d = concurrency.driver(sys.argv[1])
out = {}
a, b = d.run([two_models])[0]
out["two_models"] = [a is not b, a.x, b.x, a is not Model, b is not Model]
local = make_local()
[instance] = d.run([lambda: local()])
out["local_class_named_like_a_top_level_one"] = [type(instance) is local, instance.x]
[made] = d.run([lambda: make_local()()])
out["local_class_made_in_the_task"] = [type(made) is not Model, made.x]
[instances] = d.run([lambda: [Model(), local()]])
out["caller_classes_in_one_result"] = [type(instances[0]) is Model, type(instances[1]) is local]
out["enum_member"] = d.run([lambda: Color.RED])[0] is Color.RED
out["closure_referring_to_itself"] = d.run([fact_closure])[0](5)
try:
    d.run([local_error])
except Boom:
    out["local_exception"] = "caught as the top-level Boom"
except Exception as exc:
    out["local_exception"] = [type(exc).__name__, str(exc)]
print(json.dumps(out))
"""


class TaskLoggingTest(ScriptTestCase):
    """A task's logging goes through the caller's logging set-up, on every
    driver alike."""

    SCRIPT = """\
        import json, logging, sys
        import concurrency
        logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                            format="%(levelname)s|%(name)s|%(message)s")
        logging.getLogger("quiet").setLevel(logging.ERROR)
        audit = logging.getLogger("audit")
        audit.propagate = False
        collected = []
        class Collect(logging.Handler):
            def emit(self, record):
                collected.append([record.getMessage(), getattr(record, "concurrency_key", "-")])
        audit.addHandler(Collect())
        log = logging.getLogger("app.tasks")
        def task(n):
            log.info("task %d starts", n)
            log.debug("hidden %d", n)
            logging.getLogger("quiet").warning("not shown")
            logging.getLogger("quiet").error("quiet error %d", n)
            audit.warning("audited %d", n)
            try:
                {}["missing"]
            except KeyError:
                log.exception("task %d failed", n)
            return n
        result = concurrency.driver(sys.argv[1]).run({"first": lambda: task(1)})
        print("RESULT", json.dumps([result, collected]))
        """

    def test_task_logging_goes_through_the_caller_s_set_up_on_every_driver(self):
        outputs = {}
        for driver in ("sync", "fork", "process"):
            with self.subTest(driver=driver):
                done = self.run_script(self.SCRIPT, argv_extra=[driver])
                self.assertSucceeded(done)
                lines = done.stdout.splitlines()
                result, collected = json.loads(lines[-1].split(" ", 1)[1])
                self.assertEqual(result, {"first": 1})
                self.assertEqual([message for message, _key in collected], ["audited 1"])
                # The task's key, for formatters, where it ran in a child.
                self.assertEqual(collected[0][1], "-" if driver == "sync" else "first")
                outputs[driver] = [re.sub(r"project-[0-9a-f]+", "project", line)
                                   for line in lines[:-1]]
        expected = ["INFO|app.tasks|task 1 starts", "ERROR|quiet|quiet error 1",
                    "ERROR|app.tasks|task 1 failed", "Traceback (most recent call last):"]
        self.assertEqual(outputs["sync"][:4], expected)
        self.assertEqual(outputs["sync"][-1], "KeyError: 'missing'")
        self.assertEqual(outputs["process"], outputs["sync"])
        self.assertEqual(outputs["fork"], outputs["sync"])

    def test_a_task_logs_as_before_when_the_caller_does_not_use_logging(self):
        done = self.run_script("""\
            import sys
            import concurrency
            def task():
                import logging
                logging.getLogger("x").warning("bare warning")
                logging.getLogger("x").info("no info")
                return "logging" in sys.modules
            print(concurrency.run([task]), "logging" in sys.modules)
            """)
        self.assertSucceeded(done)
        self.assertEqual(done.stdout.strip(), "[True] False")
        self.assertEqual(done.stderr.strip(), "bare warning")


class HostileLoggingTest(ScriptTestCase):
    """What a caller's logging set-up, or a task's own signal handlers and
    forks, do to relayed records: never a run's results."""

    def run_on_child_drivers(self, source, drivers=("fork", "process")):
        for driver in drivers:
            with self.subTest(driver=driver):
                done = self.run_script(source, argv_extra=[driver])
                self.assertSucceeded(done)
                yield driver, done

    def test_a_filter_or_handler_that_raises_fails_no_run(self):
        source = """\
            import json, logging, sys
            import concurrency
            logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                                format="%(levelname)s|%(message)s")
            class Picky(logging.Filter):
                def filter(self, record):
                    if "boom" in record.msg:
                        raise RuntimeError("the filter broke")
                    return len(record.args) >= 0   # reads the args
            class Fragile(logging.Handler):
                def emit(self, record):
                    if "crash" in record.getMessage():
                        raise RuntimeError("the handler broke")
            log = logging.getLogger("app")
            log.addFilter(Picky())
            log.addHandler(Fragile())
            def noisy(n):
                log.info("boom %d", n)
                log.info("crash %d", n)
                log.info("fine %d", n)
                return n
            result = concurrency.driver(sys.argv[1]).run(
                [lambda: noisy(1), lambda: 2, lambda: noisy(3)], return_exceptions=True)
            print("RESULT", json.dumps([repr(value) for value in result]))
            """
        # (On sync, logging raises the filter's error into the task itself.)
        for driver, done in self.run_on_child_drivers(source):
            last = done.stdout.splitlines()[-1]
            self.assertEqual(json.loads(last.split(" ", 1)[1]), ["1", "2", "3"], done.stderr)
            self.assertIn("INFO|fine 1", done.stdout)
            self.assertIn("INFO|fine 3", done.stdout)
            # Reported as logging reports its own handlers' errors.
            self.assertIn("RuntimeError: the filter broke", done.stderr)
            self.assertIn("RuntimeError: the handler broke", done.stderr)

    def test_a_record_whose_values_cannot_be_rebuilt_arrives_with_them_as_text(self):
        source = """\
            import json, logging, sys
            import concurrency
            seen = []
            class Keep(logging.Handler):
                def emit(self, record):
                    seen.append([record.getMessage(), type(record.error).__name__,
                                 str(record.error), record.status])
            log = logging.getLogger("app")
            log.setLevel(logging.INFO)
            log.addHandler(Keep())
            class ApiError(Exception):
                def __init__(self, status, body):
                    super().__init__("%d: %s" % (status, body))
                    self.status = status
            def call_upstream():
                try:
                    raise ApiError(503, "down")
                except ApiError as e:
                    log.warning("upstream failed", extra={"error": e, "status": e.status})
                return "handled"
            result = concurrency.driver(sys.argv[1]).run([call_upstream, lambda: 2])
            print("RESULT", json.dumps([result, seen]))
            """
        for driver, done in self.run_on_child_drivers(source):
            result, seen = json.loads(done.stdout.splitlines()[-1].split(" ", 1)[1])
            self.assertEqual(result, ["handled", 2])
            self.assertEqual(len(seen), 1, seen)
            message, kind, text, status = seen[0]
            self.assertEqual((message, status), ("upstream failed", 503))
            if kind != "ApiError":  # not rebuilt: as text
                self.assertEqual(kind, "str")
                self.assertIn("ApiError", text)
            self.assertIn("503: down", text)

    def test_a_task_s_signal_handler_raising_mid_record_leaves_no_half_frame(self):
        source = """\
            import json, logging, signal, sys
            import concurrency
            sizes = []
            class Keep(logging.Handler):
                def emit(self, record):
                    sizes.append(len(record.getMessage()))
            log = logging.getLogger("app")
            log.setLevel(logging.INFO)
            log.addHandler(Keep())
            class TimeLimit(Exception):
                pass
            def step_with_time_limit():
                armed = [False]
                def on_alarm(signum, frame):
                    if armed[0]:  # once per record, and only around it
                        armed[0] = False
                        raise TimeLimit()
                signal.signal(signal.SIGALRM, on_alarm)
                limited = 0
                signal.setitimer(signal.ITIMER_REAL, 0.002, 0.002)
                for n in range(100):
                    try:
                        armed[0] = True
                        log.warning("%d %s", n, "x" * 300000)
                        armed[0] = False
                    except TimeLimit:
                        limited += 1
                signal.setitimer(signal.ITIMER_REAL, 0)
                return limited
            result = concurrency.driver(sys.argv[1]).run(
                [step_with_time_limit, lambda: "sibling"], timeout=60)
            print("RESULT", json.dumps([result, sorted(set(sizes)), len(sizes)]))
            """
        for driver, done in self.run_on_child_drivers(source):
            result, sizes, count = json.loads(done.stdout.splitlines()[-1].split(" ", 1)[1])
            limited, sibling = result
            self.assertEqual(sibling, "sibling")
            # The alarm cut some records short, and they never arrived, or
            # arrived whole; the rest arrived whole (but for one it cut
            # short as it was formatted: logging reports that one instead).
            self.assertGreater(limited, 0)
            self.assertTrue(set(sizes) <= {300002, 300003}, sizes)
            reported = done.stderr.count("--- Logging error ---")
            self.assertGreaterEqual(count, 100 - limited - reported)

    def test_records_of_processes_a_task_forks_never_reach_the_result_pipe(self):
        source = """\
            import json, logging, os, sys
            import concurrency
            logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                                format="%(levelname)s|%(message)s")
            log = logging.getLogger("app")
            def with_helpers():
                pids = []
                for helper in range(3):
                    pid = os.fork()
                    if pid == 0:
                        try:
                            for n in range(5):
                                log.warning("helper %d record %d %s", helper, n, "y" * 30000)
                        finally:
                            os._exit(0)
                    pids.append(pid)
                for n in range(5):
                    log.warning("task record %d %s", n, "z" * 30000)
                for pid in pids:
                    os.waitpid(pid, 0)
                return "helped"
            result = concurrency.driver(sys.argv[1]).run([with_helpers, lambda: 2])
            print("RESULT", json.dumps(result))
            """
        for driver, done in self.run_on_child_drivers(source):
            self.assertEqual(json.loads(done.stdout.splitlines()[-1].split(" ", 1)[1]),
                             ["helped", 2])
            both = done.stdout + done.stderr
            for unwanted in ("Logging error", "Bad file descriptor"):
                self.assertFalse(unwanted in done.stderr,
                                 "%r on stderr: %s" % (unwanted, done.stderr[:2000]))
            for n in range(5):
                self.assertTrue("task record %d " % n in done.stdout, "task record %d" % n)
                for helper in range(3):
                    self.assertTrue("helper %d record %d " % (helper, n) in both,
                                    "helper %d record %d" % (helper, n))


class FidelityTest(ScriptTestCase):
    """Tasks from a script's __main__ (as users write them) and from an
    importable module ship faithfully, or fail before the run starts."""

    def check_cases(self, layout, driver):
        if layout == "main":
            source = FIDELITY_CASES + "\ncases = sys.modules[__name__]\n" + FIDELITY_CHECK
            argv, env, cwd = self.script(source)
        else:
            argv, env, cwd = self.script("import cases\n" + FIDELITY_CHECK)
            write_file(os.path.join(cwd, "cases.py"), FIDELITY_CASES)
        done = subprocess.run(argv + [driver], env=env, cwd=cwd, capture_output=True,
                              text=True, timeout=LONG_TIMEOUT)
        self.assert_marked_processes_gone()
        self.assertSucceeded(done)
        report = json.loads(done.stdout.splitlines()[-1])
        self.assertGreaterEqual(report["cases"], 48)
        self.assertEqual(report["broken"], [], "cases that fail even in-process")
        self.assertEqual(report["mismatches"], [])

    def test_cases_from_a_main_script(self):
        for driver in ("process", "fork"):
            with self.subTest(driver=driver):
                self.check_cases("main", driver)

    def test_cases_from_an_importable_module(self):
        for driver in ("process", "fork"):
            with self.subTest(driver=driver):
                self.check_cases("module", driver)

    def test_results_come_back_as_the_very_class(self):
        for driver in ("process", "fork"):
            with self.subTest(driver=driver):
                argv, env, cwd = self.script(IDENTITY_SCRIPT)
                done = subprocess.run(argv + [driver], env=env, cwd=cwd,
                                      capture_output=True, text=True, timeout=LONG_TIMEOUT)
                self.assert_marked_processes_gone()
                self.assertSucceeded(done)
                self.assertEqual(json.loads(done.stdout.splitlines()[-1]), {
                    "two_models": [True, 1, 2, True, True],
                    "local_class_named_like_a_top_level_one": [True, 3],
                    "local_class_made_in_the_task": [True, 3],
                    "caller_classes_in_one_result": [True, True],
                    "enum_member": True,
                    "closure_referring_to_itself": 120,
                    "local_exception": ["Boom", "local"],
                })

    def test_open_files_are_refused_or_reopened_where_they_were(self):
        done = self.run_script("""\
            import json, os, sys
            import concurrency
            path = os.path.join(os.getcwd(), "log.txt")
            with open(path, "w") as file:
                file.write("one\\ntwo\\nthree\\n")
            report = {}
            for mode in ("a", "w", "r+"):
                # "w" on a file of its own: opening it truncates.
                log = open(path if mode != "w" else path + ".new", mode)
                try:
                    concurrency.run([lambda: log.write("lost")])
                    report[mode] = "ran"
                except concurrency.SerializationError as exc:
                    report[mode] = str(exc)
                log.close()
            report["intact"] = open(path).read()
            reader = open(path)
            reader.readline()
            binary = open(path, "rb")
            binary.read(4)
            report["read"] = concurrency.run([lambda: reader.readline(),
                                              lambda: binary.read(3).decode()])
            report["parent_unmoved"] = [reader.readline(), binary.read(3).decode()]
            print(json.dumps(report))
            """)
        self.assertSucceeded(done)
        report = json.loads(done.stdout.splitlines()[-1])
        for mode in ("a", "w", "r+"):
            self.assertIn("task 0: cannot be serialized: log: the open file", report[mode])
            self.assertIn("(mode %r)" % mode, report[mode])
        self.assertEqual(report["intact"], "one\ntwo\nthree\n")
        self.assertEqual(report["read"], ["two\n", "two"])
        self.assertEqual(report["parent_unmoved"], ["two\n", "two"])

    def test_closure_made_in_a_package_keeps_its_relative_imports(self):
        argv, env, cwd = self.script("""\
            import json, sys
            import concurrency
            import shop
            task = shop.make_task(2)
            print(json.dumps([concurrency.driver(sys.argv[1]).run([task])[0], task()]))
            """)
        os.mkdir(os.path.join(cwd, "shop"))
        # Made in the package's __init__: __name__ alone ("shop") doesn't tell
        # the package a relative import starts from; __package__ does.
        write_file(os.path.join(cwd, "shop", "__init__.py"), textwrap.dedent("""\
            def make_task(n):
                def task():
                    from .helpers import RATE
                    return n * RATE, __name__
                return task
            """))
        write_file(os.path.join(cwd, "shop", "helpers.py"), "RATE = 3\n")
        for driver in ("process", "fork"):
            with self.subTest(driver=driver):
                done = subprocess.run(argv + [driver], env=env, cwd=cwd, capture_output=True,
                                      text=True, timeout=LONG_TIMEOUT)
                self.assert_marked_processes_gone()
                self.assertSucceeded(done)
                got, expected = json.loads(done.stdout.splitlines()[-1])
                self.assertEqual(expected, [6, "shop"])
                self.assertEqual(got, expected)

    def test_without_dill_plain_tasks_run_and_the_rest_say_install_dill(self):
        done = self.run_script("""\
            import sys, weakref
            sys.modules["dill"] = None  # as where dill is not installed
            import concurrency
            class Item:
                pass
            item = Item()
            ref = weakref.ref(item)  # only dill sends a weak reference
            print(concurrency.run([lambda: 1 + 1, lambda: Item.__name__]))
            try:
                concurrency.run([lambda: ref])
            except concurrency.SerializationError as exc:
                print(exc)
            """)
        self.assertSucceeded(done)
        lines = done.stdout.splitlines()
        self.assertEqual(lines[0], "[2, 'Item']")
        self.assertIn("task 0: needs dill to be serialized, and dill is not installed: "
                      "pip install dill", lines[1])
        self.assertNotIn("fork driver", lines[1])

    def test_error_names_what_cannot_ship_before_anything_runs(self):
        done = self.run_script("""\
            import json, os, sqlite3, types
            import concurrency
            db = sqlite3.connect(":memory:")
            settings = types.SimpleNamespace(name="shop", conn=db)
            def captured():
                conn = db
                return lambda: conn
            marker = os.path.join(os.getcwd(), "ran")
            messages = []
            for task in (lambda: db.execute("select 1"), lambda: settings.name,
                         captured()):
                try:
                    concurrency.run([lambda: open(marker, "w").close(), task])
                except concurrency.SerializationError as exc:
                    messages.append(str(exc))
            print(json.dumps([messages, os.path.exists(marker)]))
            """)
        self.assertSucceeded(done)
        messages, ran = json.loads(done.stdout.splitlines()[-1])
        self.assertFalse(ran, "a task ran although its sibling could not be serialized")
        self.assertEqual(len(messages), 3, messages)
        for message, culprit in zip(messages, ("db is ", "settings.conn is ", "conn is ")):
            self.assertIn("task 1: cannot be serialized: " + culprit, message)
            self.assertIn("sqlite3.Connection", message)
            self.assertIn("Create such objects inside the task, or use the fork driver",
                          message)


# -- defer and deferring ------------------------------------------------------

class SyncDeferTest(CleanTestCase):
    """defer's scope rules, deterministic with the sync driver."""

    def setUp(self):
        super().setUp()
        concurrency.set_default_driver("sync")
        self.log = []

    def record(self, item):
        return lambda: self.log.append(item)

    def test_without_scope_runs_at_once(self):
        concurrency.defer([self.record("a"), self.record("b")])
        self.assertEqual(self.log, ["a", "b"])

    def test_scope_runs_deferred_tasks_when_it_ends(self):
        with concurrency.deferring():
            concurrency.defer([self.record("deferred")])
            self.log.append("response sent")
        self.assertEqual(self.log, ["response sent", "deferred"])

    def test_scope_that_raises_drops_tasks_except_always(self):
        with self.assertRaises(RuntimeError):
            with concurrency.deferring():
                concurrency.defer([self.record("dropped")])
                concurrency.defer([self.record("always")], always=True)
                raise RuntimeError("handler failed")
        self.assertEqual(self.log, ["always"])

    def test_innermost_scope_decides(self):
        with concurrency.deferring():
            with concurrency.deferring():
                concurrency.defer([self.record("inner")])
            self.log.append("between")
            concurrency.defer([self.record("outer")])
            self.log.append("end of outer")
        self.assertEqual(self.log, ["inner", "between", "end of outer", "outer"])

    def test_decorator_on_plain_and_async_functions(self):
        @concurrency.deferring
        def handler():
            concurrency.defer([self.record("after handler")])
            self.log.append("handler")
            return "response"

        @concurrency.deferring
        async def async_handler():
            concurrency.defer([self.record("after async handler")])
            await asyncio.sleep(0)
            self.log.append("async handler")
            return "async response"

        self.assertEqual(handler(), "response")
        self.assertEqual(asyncio.run(async_handler()), "async response")
        self.assertEqual(self.log, ["handler", "after handler", "async handler",
                                    "after async handler"])

    def test_scopes_are_per_asyncio_task(self):
        async def handler(name, gate, other_gate):
            with concurrency.deferring():
                concurrency.defer([self.record(name)])
                gate.set()
                await other_gate.wait()
                self.log.append("end " + name)

        async def main():
            a, b = asyncio.Event(), asyncio.Event()
            await asyncio.gather(handler("a", a, b), handler("b", b, a))

        asyncio.run(main())
        self.assertEqual(sorted(self.log), ["a", "b", "end a", "end b"])
        self.assertLess(self.log.index("end a"), self.log.index("a"))
        self.assertLess(self.log.index("end b"), self.log.index("b"))

    def test_scopes_are_per_thread(self):
        entered, checked = threading.Event(), threading.Event()

        def other_thread():
            entered.wait(SHORT_TIMEOUT)
            concurrency.defer([self.record("other thread, no scope")])
            checked.set()

        thread = threading.Thread(target=other_thread)
        thread.start()
        with concurrency.deferring():
            concurrency.defer([self.record("scoped")])
            entered.set()
            self.assertTrue(checked.wait(SHORT_TIMEOUT))
            self.assertEqual(self.log, ["other thread, no scope"])
        thread.join(SHORT_TIMEOUT)
        self.assertEqual(self.log, ["other thread, no scope", "scoped"])

    def test_sync_defer_exceptions_propagate(self):
        with self.assertRaisesRegex(ValueError, "deferred failure"):
            with concurrency.deferring():
                concurrency.defer([lambda: raise_value_error("deferred failure")])

    def test_bad_input_rejected_at_call_site(self):
        with concurrency.deferring():
            with self.assertRaisesRegex(TypeError, "task 0 is not callable"):
                concurrency.defer([None])


@unittest.skipUnless(HAVE_PROC and hasattr(os, "fork"), "needs /proc and os.fork")
class DetachedDeferTest(ScriptTestCase):
    """defer with the process and fork drivers, in scripts that exit at once."""

    DEFER_SCRIPT = """\
        import os, sys, time
        import concurrency
        concurrency.set_default_driver(sys.argv[1])
        out = os.path.abspath("out")
        def write(name, text):
            with open(os.path.join(out, name), "w") as file:
                file.write(text)
        value = "captured at defer time"
        @concurrency.deferring
        def handler():
            global value
            concurrency.defer({"late": lambda: (time.sleep(0.5), write("late", value))})
            concurrency.defer([lambda: 1 / 0])
            value = "changed before the scope ended"
            print("response sent", flush=True)
        handler()
        try:
            with concurrency.deferring():
                concurrency.defer([lambda: write("dropped", "x")])
                concurrency.defer([lambda: write("always", "x")], always=True)
                raise RuntimeError("handler failed")
        except RuntimeError:
            pass
        print("script done", flush=True)
        """

    def test_deferred_tasks_outlive_the_script_and_report_failures(self):
        for driver in ("process", "fork"):
            with self.subTest(driver=driver):
                argv, env, cwd = self.script(self.DEFER_SCRIPT)
                out = os.path.join(cwd, "out")
                os.mkdir(out)
                started = time.monotonic()
                script = subprocess.Popen(argv + [driver], env=env, cwd=cwd,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True)
                self.addCleanup(script.kill)
                # The script ends before its deferred tasks do; its output pipes
                # stay open until they end too, since they inherit them.
                script.wait(LONG_TIMEOUT)
                self.assertLess(time.monotonic() - started, LONG_TIMEOUT)
                self.assertTrue(marked_processes(self.mark) or os.path.exists(
                    os.path.join(out, "late")))
                stdout, stderr = script.communicate(timeout=LONG_TIMEOUT)
                self.assert_marked_processes_gone()
                self.assertEqual(stdout.splitlines(), ["response sent", "script done"])
                # process serializes at defer(); fork forks when the scope ends.
                self.assertEqual(read_file(os.path.join(out, "late")),
                                 "captured at defer time" if driver == "process"
                                 else "changed before the scope ended")
                self.assertEqual(sorted(os.listdir(out)), ["always", "late"])
                self.assertIn("deferred task 0 failed", stderr)
                self.assertIn("ZeroDivisionError", stderr)

    def test_deferred_task_capturing_held_locks_and_a_handler_finishes(self):
        # A copy of a lock held while the task was serialized would be held
        # forever in the child: the deferred task would never end.
        argv, env, cwd = self.script("""\
            import logging, os, sys, threading
            import concurrency
            lock, condition = threading.RLock(), threading.Condition()
            handler = logging.StreamHandler(sys.stderr)
            out = os.path.abspath("done")
            def task():
                with lock, condition, handler.lock:
                    handler.handle(logging.makeLogRecord({"msg": "logged by the task"}))
                    open(out, "w").close()
            with lock, condition, handler.lock:
                concurrency.driver("process").defer([task])
            """)
        done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True,
                              timeout=LONG_TIMEOUT)
        self.assertSucceeded(done)
        wait_until(lambda: os.path.exists(os.path.join(cwd, "done")), LONG_TIMEOUT,
                   "the deferred task to finish")
        self.assert_marked_processes_gone()

    def test_many_deferred_tasks_return_at_once_and_run_a_bounded_number_at_a_time(self):
        for driver in ("process", "fork"):
            with self.subTest(driver=driver):
                argv, env, cwd = self.script("""\
                    import json, os, sys, time
                    import concurrency
                    out = os.path.abspath("out")
                    os.mkdir(out)
                    def task(i):
                        started = time.monotonic()
                        time.sleep(0.05)
                        with open(os.path.join(out, "%d.tmp" % i), "w") as file:
                            json.dump([started, time.monotonic()], file)
                        os.rename(os.path.join(out, "%d.tmp" % i),
                                  os.path.join(out, "%d.json" % i))
                    d = concurrency.extend("four", lambda: getattr(concurrency,
                        {"process": "ProcessDriver", "fork": "ForkDriver"}[sys.argv[1]])(
                        max_workers=4))
                    started = time.monotonic()
                    concurrency.driver("four").defer([lambda i=i: task(i) for i in range(60)])
                    print(json.dumps(time.monotonic() - started))
                    """)
                done = subprocess.run(argv + [driver], env=env, cwd=cwd, capture_output=True,
                                      text=True, timeout=LONG_TIMEOUT)
                self.assertSucceeded(done)
                self.assertLess(json.loads(done.stdout.splitlines()[-1]), 1.0)
                out = os.path.join(cwd, "out")
                wait_until(lambda: len([name for name in os.listdir(out)
                                        if name.endswith(".json")]) == 60,
                           LONG_TIMEOUT, "the 60 deferred tasks")
                spans = [json.loads(read_file(os.path.join(out, "%d.json" % i)))
                         for i in range(60)]
                most = max(sum(1 for start, end in spans if start <= moment < end)
                           for moment, _end in spans)
                self.assertLessEqual(most, 4)
                self.assert_marked_processes_gone()

    def test_deferred_tasks_leave_nothing_on_disk_and_show_nothing_in_ps(self):
        private_tmp = self.subdir("tmp")
        argv, env, cwd = self.script("""\
            import os, time
            import concurrency
            os.environ["SECRET_TOKEN"] = "hunter2"
            concurrency.driver("process").defer(
                {"key-for-nobody-else": lambda: open("started", "w").close() or time.sleep(3)})
            """, env={"TMPDIR": private_tmp})
        # Not capture_output: the deferred task inherits the pipes, and
        # reading them to their end would wait for it to finish.
        done = subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=LONG_TIMEOUT)
        self.assertEqual(done.returncode, 0)
        wait_until(lambda: os.path.exists(os.path.join(cwd, "started")), LONG_TIMEOUT,
                   "the deferred task to start")
        self.assertEqual(os.listdir(private_tmp), [])
        self.assertTrue(marked_processes(self.mark), "the deferred task runs")
        for entry in os.listdir("/proc"):
            try:
                with open("/proc/%s/cmdline" % entry, "rb") as file:
                    command = file.read()
            except OSError:
                continue
            self.assertNotIn(b"key-for-nobody-else", command)
        self.assert_marked_processes_gone(within=LONG_TIMEOUT)

    def test_process_driver_rejects_unserializable_task_at_call_site(self):
        concurrency.set_default_driver("process")
        gen = (n for n in range(2))
        with self.assertRaises(concurrency.SerializationError):
            concurrency.defer([lambda: next(gen)])


# -- Registry and configuration -----------------------------------------------

class RegistryTest(CleanTestCase):

    def setUp(self):
        super().setUp()
        for name in ("CONCURRENCY_DRIVER", "CONCURRENCY_CONFIG"):
            if name in os.environ:
                self.addCleanup(os.environ.__setitem__, name, os.environ.pop(name))
        old_cwd = os.getcwd()
        self.addCleanup(os.chdir, old_cwd)
        os.chdir(self.tmp)

    def setenv(self, name, value):
        os.environ[name] = value
        self.addCleanup(os.environ.pop, name, None)

    def test_default_is_process(self):
        self.assertEqual(concurrency.default_driver(), "process")
        self.assertIsInstance(concurrency.driver(), concurrency.ProcessDriver)

    def test_unknown_driver_lists_known_names(self):
        with self.assertRaisesRegex(ValueError, "unknown concurrency driver 'threads'; "
                                                "known drivers: fork, process, sync"):
            concurrency.driver("threads")

    def test_extend_registers_and_replaces(self):
        class Recording(concurrency.Driver):
            def __init__(self):
                self.calls = []

            def run(self, tasks, *, timeout=None, return_exceptions=False):
                self.calls.append(tasks)
                return ["recorded"]

        concurrency.extend("recording", Recording)
        concurrency.set_default_driver("recording")
        self.assertEqual(concurrency.run([lambda: 1]), ["recorded"])
        self.assertIs(concurrency.driver("recording"), concurrency.driver())
        concurrency.extend("recording", concurrency.SyncDriver)
        self.assertEqual(concurrency.run([lambda: 1]), [1])

    def test_custom_driver_gets_async_as_completed_and_progress(self):
        class Minimal(concurrency.Driver):
            def run(self, tasks, *, timeout=None, return_exceptions=False):
                return concurrency.SyncDriver().run(tasks, return_exceptions=return_exceptions)

        concurrency.extend("minimal", Minimal)
        concurrency.set_default_driver("minimal")
        self.assertEqual(list(concurrency.as_completed({"a": lambda: 1, "b": lambda: 2})),
                         [("a", 1), ("b", 2)])
        self.assertEqual(asyncio.run(concurrency.run_async([lambda: 3])), [3])

        async def collect():
            return [pair async for pair in concurrency.as_completed_async([lambda: 4])]

        self.assertEqual(asyncio.run(collect()), [(0, 4)])
        self.assertEqual(concurrency.run([lambda: 5], progress=True), [5])
        with self.assertRaisesRegex(ValueError, "custom"):
            concurrency.run([lambda: raise_value_error("custom")], progress=True)
        # On the driver itself too, though its run() has no such parameter.
        minimal = concurrency.driver("minimal")
        self.assertEqual(minimal.run({"a": lambda: 6}, progress=True), {"a": 6})
        self.assertEqual(minimal.run({"a": lambda: 7}, progress=False), {"a": 7})
        with self.assertRaisesRegex(ValueError, "custom"):
            minimal.run([lambda: raise_value_error("custom")], progress=True)

    def test_custom_driver_that_names_progress_still_gets_the_progress_line(self):
        # As pyright wants an override of Driver.run written: taking every
        # argument the base's signature has.
        class Typed(concurrency.Driver):
            def run(self, tasks, *, timeout=None, return_exceptions=False, progress=False):
                self.progress_seen = progress
                return concurrency.SyncDriver().run(tasks, return_exceptions=return_exceptions)

        typed = Typed()
        stream = Terminal()
        with contextlib.redirect_stderr(stream):
            self.assertEqual(typed.run([lambda: 1, lambda: 2], progress=True), [1, 2])
        self.assertFalse(typed.progress_seen)
        last = stream.getvalue().rstrip("\n").split("\r")[-1]
        self.assertRegex(last, r"^concurrency: 2/2 done, [0-9.]+ s, ")

    def test_custom_driver_gets_map_built_on_run(self):
        class Recording(concurrency.Driver):
            def __init__(self):
                self.runs = 0

            def run(self, tasks, *, timeout=None, return_exceptions=False):
                self.runs += 1
                return concurrency.SyncDriver().run(tasks, return_exceptions=return_exceptions)

        recording = Recording()
        values = recording.map(lambda x: 10 // x, range(-3, 500), return_exceptions=True)
        self.assertEqual(values[:3], [10 // -3, 10 // -2, 10 // -1])
        self.assertIsInstance(values[3], ZeroDivisionError)
        self.assertEqual(values[4:], [10 // x for x in range(1, 500)])
        self.assertEqual(recording.runs, 1)  # a sequence: one run of its chunks
        with self.assertRaises(ZeroDivisionError):
            recording.map(lambda x: 10 // x, iter(range(-3, 500)))

    def test_the_progress_line_counts_failures(self):
        stream = Terminal()
        with contextlib.redirect_stderr(stream):
            result = concurrency.driver("sync").run(
                [lambda: 1, lambda: raise_value_error("x"), lambda: 3,
                 lambda: raise_value_error("y")], progress=True, return_exceptions=True)
        self.assertIsInstance(result[1], ValueError)
        last = stream.getvalue().rstrip("\n").split("\r")[-1]
        self.assertRegex(last, r"^concurrency: 4/4 done, 2 failed, [0-9.]+ s, ")

    def test_custom_driver_gets_a_working_defer(self):
        class Threads(concurrency.Driver):
            def run(self, tasks, *, timeout=None, return_exceptions=False):
                return concurrency.SyncDriver().run(tasks, return_exceptions=return_exceptions)

        concurrency.extend("threads", Threads)
        done = threading.Event()
        concurrency.driver("threads").defer([done.set])
        self.assertTrue(done.wait(SHORT_TIMEOUT))
        for thread in threading.enumerate():
            if thread.name == "concurrency-defer":
                thread.join(SHORT_TIMEOUT)

    def test_factory_must_return_a_driver(self):
        concurrency.extend("broken", lambda: object())
        with self.assertRaisesRegex(TypeError, "not a concurrency.Driver"):
            concurrency.driver("broken")

    def test_default_resolution_order(self):
        write_file("concurrency.ini", "[concurrency]\ndefault = fork\n")
        self.assertEqual(concurrency.default_driver(), "fork")
        self.setenv("CONCURRENCY_DRIVER", "sync")
        self.assertEqual(concurrency.default_driver(), "sync")
        concurrency.set_default_driver("process")
        self.assertEqual(concurrency.default_driver(), "process")
        concurrency.set_default_driver(None)
        self.assertEqual(concurrency.default_driver(), "sync")

    def test_unknown_driver_in_environment(self):
        self.setenv("CONCURRENCY_DRIVER", "green")
        with self.assertRaisesRegex(concurrency.ConfigError,
                                    "CONCURRENCY_DRIVER='green'.*known drivers: fork, process"):
            concurrency.run([lambda: 1])

    def test_config_file_values(self):
        write_file("concurrency.ini", "[concurrency]\ndefault = sync\nmax_workers = 3\n"
                                      "timeout = 2.5\n")
        self.assertEqual(concurrency.default_driver(), "sync")
        process = concurrency.driver("process")
        self.assertEqual((process.max_workers, process.timeout), (3, 2.5))
        for value in ("inf", "2200000", "none"):
            write_file("concurrency.ini", "[concurrency]\ntimeout = %s\n" % value)
            expected = 2200000 if value == "2200000" else None
            fresh = concurrency.ProcessDriver()
            self.assertEqual(fresh.timeout, expected)
            self.assertEqual(fresh.run([lambda: 1]), [1])

    def test_a_task_timeout_says_where_its_limit_came_from(self):
        path = self.path("limits.ini")
        write_file(path, "[concurrency]\ntimeout = 0.5\n")
        self.setenv("CONCURRENCY_CONFIG", path)
        slow = [lambda: time.sleep(30)]
        for make, timeout, origin in (
                (concurrency.ProcessDriver, None, r"concurrency.ini's|%s \(timeout = 0.5\)"
                 % re.escape(path)),
                (concurrency.ProcessDriver, 0.3, r"the timeout argument"),
                (lambda: concurrency.ForkDriver(timeout=0.4), None,
                 r"ForkDriver\(timeout=0.4\)")):
            with self.subTest(origin=origin):
                with self.assertRaisesRegex(concurrency.TaskTimeout,
                                            r"the limit is .*(%s).*timeout=math.inf means "
                                            r"none" % origin):
                    make().run(slow, timeout=timeout)
        # None: the driver's limit still; math.inf: none at all.
        self.assertEqual(concurrency.ProcessDriver().run([lambda: time.sleep(0.7) or 1],
                                                         timeout=math.inf), [1])

    def test_config_path_from_environment(self):
        path = self.path("elsewhere.ini")
        write_file(path, "[concurrency]\ndefault = sync\n")
        self.setenv("CONCURRENCY_CONFIG", path)
        self.assertEqual(concurrency.default_driver(), "sync")
        self.setenv("CONCURRENCY_CONFIG", self.path("missing.ini"))
        with self.assertRaisesRegex(concurrency.ConfigError,
                                    "missing.ini: no such config") as caught:
            concurrency.default_driver()
        # The ConfigError alone: no "During handling of the above exception".
        self.assertIsNone(caught.exception.__context__ if not
                          caught.exception.__suppress_context__ else None)

    def test_bad_config_values_name_file_key_and_allowed_values(self):
        cases = [
            ("default = threads", r"concurrency.ini: default = threads names an unknown "
                                  r"driver; known drivers: fork, process, sync"),
            ("max_workers = many", r"concurrency.ini: max_workers = many .*positive whole"),
            ("max_workers = 0", r"concurrency.ini: max_workers = 0 .*positive whole"),
            ("timeout = -1", r"concurrency.ini: timeout = -1 .*positive number of seconds"),
            ("workers = 3", r"unknown key 'workers'.*allowed keys: default, max_workers, "
                            r"timeout, dask_address"),
            ("dask_address = scheduler", r"dask_address = scheduler is not a scheduler "
                                         r"address; use one such as tcp://scheduler:8786"),
        ]
        for line, message in cases:
            with self.subTest(line=line):
                write_file("concurrency.ini", "[concurrency]\n%s\n" % line)
                concurrency._state.config = None
                with self.assertRaisesRegex(concurrency.ConfigError, message):
                    concurrency.default_driver()
                    concurrency.ProcessDriver()

    def test_hostile_config_files_give_a_prompt_config_error(self):
        def case(make, message):
            os.path.lexists("concurrency.ini") and os.remove("concurrency.ini")
            make()
            concurrency._state.config = None
            started = time.monotonic()
            with self.assertRaisesRegex(concurrency.ConfigError, message):
                concurrency.default_driver()
            self.assertLess(time.monotonic() - started, SHORT_TIMEOUT)

        def write_bytes(data):
            with open("concurrency.ini", "wb") as file:
                file.write(data)

        case(lambda: os.mkfifo("concurrency.ini"), "concurrency.ini: is not a regular file")
        case(lambda: os.symlink("/dev/zero", "concurrency.ini"),
             "concurrency.ini: is not a regular file")
        case(lambda: write_bytes(b"[concurrency]\n; " + b"x" * (1 << 20) + b"\n"),
             r"concurrency.ini: is \d+ bytes; a config file is at most")
        case(lambda: write_bytes(b"[concurrency]\ndefault = \xff\xfe\n"),
             "concurrency.ini: is not UTF-8 text")
        case(lambda: write_bytes(b"[concurrency]\ndefault = %(x)s\n"),
             r"concurrency.ini: default = %\(x\)s names an unknown driver")
        case(lambda: write_bytes(b"[concurrency]\ntimeout = 1e-300\n"),
             "concurrency.ini: timeout = 1e-300 is not allowed")
        case(lambda: write_bytes(b"[concurrency]\ndefault = sync\ndefault = fork\n"),
             "concurrency.ini: cannot be parsed")

    def test_a_config_file_others_may_write_is_refused(self):
        write_file("concurrency.ini", "[concurrency]\ndefault = sync\n")
        for mode, who in ((0o664, "group"), (0o646, "others"), (0o666, "group and others")):
            with self.subTest(mode=oct(mode)):
                os.chmod("concurrency.ini", mode)
                with self.assertRaisesRegex(concurrency.ConfigError,
                                            r"concurrency.ini: is writable by %s \(mode %o\), so "
                                            r"it was not read.*chmod go-w concurrency.ini"
                                            % (who, mode)):
                    concurrency.default_driver()
                with self.assertRaises(concurrency.ConfigError):
                    concurrency.run([lambda: 1])
        # A chmod changes neither mtime nor size: the verdict must not be cached.
        os.chmod("concurrency.ini", 0o644)
        self.assertEqual(concurrency.default_driver(), "sync")
        os.chmod("concurrency.ini", 0o666)
        with self.assertRaises(concurrency.ConfigError):
            concurrency.default_driver()
        os.chmod("concurrency.ini", 0o600)
        elsewhere = self.path("elsewhere.ini")
        write_file(elsewhere, "[concurrency]\ndefault = fork\n")
        os.chmod(elsewhere, 0o646)
        self.setenv("CONCURRENCY_CONFIG", elsewhere)
        with self.assertRaisesRegex(concurrency.ConfigError, "elsewhere.ini: is writable by others"):
            concurrency.default_driver()

    @unittest.skipUnless(hasattr(os, "geteuid") and os.geteuid() == 0,
                         "giving a file to another user needs root")
    def test_a_config_file_of_another_user_is_refused(self):
        write_file("concurrency.ini", "[concurrency]\ndefault = sync\n")
        os.chown("concurrency.ini", OTHER_UID, OTHER_UID)
        with self.assertRaisesRegex(concurrency.ConfigError,
                                    r"concurrency.ini: is owned by uid %d, not by you \(uid 0"
                                    r".*chown it to you.*CONCURRENCY_CONFIG" % OTHER_UID):
            concurrency.default_driver()
        with self.assertRaises(concurrency.ConfigError):
            concurrency.ProcessDriver()
        os.chown("concurrency.ini", 0, 0)
        self.assertEqual(concurrency.default_driver(), "sync")

    def test_config_publish_never_follows_a_symlink(self):
        target = self.path("elsewhere.ini")
        os.symlink(target, "concurrency.ini")  # dangling
        for extra in ([], ["--force"]):
            done = subprocess.run([sys.executable, "-m", "concurrency", "config:publish"] + extra,
                                  cwd=self.tmp, env=dict(os.environ, PYTHONPATH=REPO),
                                  capture_output=True, text=True, timeout=LONG_TIMEOUT)
            self.assertNotEqual(done.returncode, 0)
            self.assertIn("is a symbolic link", done.stderr)
            self.assertFalse(os.path.exists(target))

    def test_the_published_config_says_how_tasks_travel_as_readme_does(self):
        # The standard pickler first, dill for the rest (README: What travels).
        template = concurrency._CONFIG_TEMPLATE
        process = template[template.index(";   process"):template.index(";   fork")]
        self.assertIn("standard pickler", process)
        self.assertNotRegex(process, r"serialized with dill\b")
        with open(os.path.join(REPO, "README.rst"), encoding="utf-8") as file:
            self.assertIn("the standard pickler", file.read())

    def test_config_publish_command(self):
        env = dict(os.environ, PYTHONPATH=REPO)
        command = [sys.executable, "-m", "concurrency", "config:publish"]
        first = subprocess.run(command, cwd=self.tmp, env=env, capture_output=True,
                               text=True, timeout=LONG_TIMEOUT)
        self.assertEqual(first.returncode, 0, first.stderr)
        text = read_file("concurrency.ini")
        self.assertIn("default = process", text)
        self.assertIn("max_workers", text)
        self.assertIn("timeout", text)
        self.assertIn("\n; dask_address = tcp://scheduler:8786\n", text)  # commented out
        self.assertEqual(concurrency._read_config().get("default"), "process")
        self.assertNotIn("dask_address", concurrency._read_config())
        write_file("concurrency.ini", "[concurrency]\ndefault = sync\n")
        second = subprocess.run(command, cwd=self.tmp, env=env, capture_output=True,
                                text=True, timeout=LONG_TIMEOUT)
        self.assertNotEqual(second.returncode, 0)
        self.assertIn("already exists", second.stderr)
        self.assertIn("--force", second.stderr)
        self.assertIn("default = sync", read_file("concurrency.ini"))
        forced = subprocess.run(command + ["--force"], cwd=self.tmp, env=env,
                                capture_output=True, text=True, timeout=LONG_TIMEOUT)
        self.assertEqual(forced.returncode, 0, forced.stderr)
        self.assertIn("default = process", read_file("concurrency.ini"))

    def cli(self, *args, env=None):
        return subprocess.run([sys.executable, "-m", "concurrency"] + list(args), cwd=self.tmp,
                              env=dict(os.environ, PYTHONPATH=REPO, **(env or {})),
                              capture_output=True, text=True, timeout=LONG_TIMEOUT)

    def test_unknown_command_prints_usage(self):
        done = self.cli("publish")
        self.assertEqual(done.returncode, 2)
        self.assertTrue(done.stderr.startswith("unknown command 'publish'\n"), done.stderr)
        self.assertIn("usage: python -m concurrency", done.stderr)
        done = self.cli("config:publish", "--forse")
        self.assertEqual(done.returncode, 2)
        self.assertIn("unknown argument '--forse'", done.stderr)
        self.assertFalse(os.path.exists("concurrency.ini"))

    def test_help_and_version_go_to_stdout(self):
        for option in ("--help", "-h", "help"):
            with self.subTest(option=option):
                done = self.cli(option)
                self.assertEqual((done.returncode, done.stderr), (0, ""))
                self.assertIn("usage: python -m concurrency", done.stdout)
        done = self.cli("--version")
        self.assertEqual((done.returncode, done.stdout), (0, "concurrency %s\n"
                                                          % concurrency.__version__))

    def test_config_publish_with_the_seed_s_name_and_where_the_library_reads(self):
        done = self.cli("config:publish", "concurrency")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("default = process", read_file("concurrency.ini"))
        elsewhere = self.path("conf", "app.ini")
        os.makedirs(os.path.dirname(elsewhere))
        os.remove("concurrency.ini")
        done = self.cli("config:publish", env={"CONCURRENCY_CONFIG": elsewhere})
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout, "wrote %s\n" % elsewhere)
        self.assertFalse(os.path.exists("concurrency.ini"))
        self.assertIn("default = process", read_file(elsewhere))
        self.setenv("CONCURRENCY_CONFIG", elsewhere)
        self.assertEqual(concurrency._read_config().get("default"), "process")


class VendoredCommandTest(ScriptTestCase):

    def test_a_vendored_copy_s_commands_run_by_its_own_name(self):
        argv, env, cwd = self.script("import concurrency\n", layout="vendored")
        env.pop("PYTHONPATH", None)
        done = subprocess.run([sys.executable, "-m", "myapp._vendor.concurrency", "--version"],
                              cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=LONG_TIMEOUT)
        self.assertEqual((done.returncode, done.stdout, done.stderr),
                         (0, "concurrency %s\n" % concurrency.__version__, ""))
        done = subprocess.run([sys.executable, "-m", "myapp._vendor.concurrency",
                               "config:publish"], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=LONG_TIMEOUT)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertTrue(os.path.isfile(os.path.join(cwd, "concurrency.ini")))


class PlantedConfigTest(ScriptTestCase):
    """A concurrency.ini another user left in a shared directory such as /tmp."""

    @unittest.skipUnless(hasattr(os, "geteuid") and os.geteuid() == 0,
                         "planting a file as another user needs root")
    def test_a_planted_config_never_sends_tasks_to_its_address(self):
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        shared = self.subdir("shared-tmp")
        os.chmod(shared, 0o1777)
        planted = os.path.join(shared, "concurrency.ini")
        write_file(planted, "[concurrency]\ndefault = dask\ndask_address = tcp://127.0.0.1:%d\n"
                   % listener.getsockname()[1])
        os.chown(planted, OTHER_UID, OTHER_UID)
        argv, env, project = self.script("""\
            import concurrency
            try:
                print(concurrency.run([lambda: 6 * 7]))
            except concurrency.ConfigError as exc:
                print("ConfigError:", exc)
            """)
        for named in (False, True):
            with self.subTest(named_by_environment=named):
                child_env = dict(env, CONCURRENCY_CONFIG=planted) if named else env
                child = subprocess.Popen([argv[0], os.path.join(project, argv[1])], cwd=shared,
                                         env=child_env, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True)
                try:
                    # The planted address must never see a connection.
                    deadline = time.monotonic() + LONG_TIMEOUT
                    while child.poll() is None and time.monotonic() < deadline:
                        readable, _, _ = select.select([listener], [], [], 0.05)
                        self.assertFalse(readable, "the run connected to the planted address")
                    stdout, stderr = child.communicate(timeout=SHORT_TIMEOUT)
                finally:
                    if child.poll() is None:
                        child.kill()
                        child.communicate()
                self.assertFalse(select.select([listener], [], [], 0)[0])
                self.assertEqual(child.returncode, 0, stderr)
                self.assertRegex(stdout, r"^ConfigError: .*concurrency.ini: is owned by uid %d"
                                 % OTHER_UID)
                self.assert_marked_processes_gone()


class ReadmeTest(ScriptTestCase):
    """README.rst renders cleanly (as a package index renders it) and its
    examples run as written."""

    @staticmethod
    def render_problems(text):
        """What docutils warns about in ``text``, as it would on a package
        index: an error there rejects the long description."""
        import docutils.core
        import docutils.utils
        stream = io.StringIO()
        try:
            docutils.core.publish_doctree(text, settings_overrides={
                "warning_stream": stream, "report_level": 2, "halt_level": 5,
                # Structure only: whether Pygments is installed is no matter.
                "syntax_highlight": "none"})
        except docutils.utils.SystemMessage as exc:  # pragma: no cover
            return str(exc)
        return stream.getvalue()

    def setUp(self):
        super().setUp()
        try:
            import docutils  # noqa: F401
        except ImportError:
            self.skipTest("docutils is not installed (pip install .[test])")

    def test_readme_renders_without_a_warning(self):
        with open(os.path.join(REPO, "README.rst"), encoding="utf-8") as file:
            self.assertEqual(self.render_problems(file.read()), "")

    def test_the_render_check_catches_what_an_index_rejects(self):
        self.assertIn("Title underline too short",
                      self.render_problems("A title\n=====\n\nText.\n"))

    def test_readme_examples_run_as_written(self):
        # Each block that imports concurrency starts a script; the blocks
        # after it that don't continue it, as a reader runs them.
        with open(os.path.join(REPO, "README.rst"), encoding="utf-8") as file:
            text = file.read()
        scripts = []
        for block in re.findall(r"\.\. code-block:: python\n\n((?:    .*\n|\n)+)", text):
            code = textwrap.dedent(block)
            if "import concurrency" in code:
                scripts.append(code)
            elif scripts:
                scripts[-1] += "\n" + code
        self.assertGreaterEqual(len(scripts), 5)
        for number, source in enumerate(scripts):
            with self.subTest(script=number, first_line=source.splitlines()[0]):
                if '"dask"' in source and importlib.util.find_spec("distributed") is None:
                    continue  # the dask driver's example: needs distributed
                done = self.run_script(source)
                self.assertSucceeded(done)
                self.assert_marked_processes_gone(within=LONG_TIMEOUT)
        self.assertIn("120 345", self.run_script(scripts[0]).stdout)


class DocstringTest(unittest.TestCase):
    """help() tells a user what they need, before a maintainer's internals."""

    def test_module_help_opens_with_use_then_internals(self):
        doc = concurrency.__doc__
        internals = doc.index("Internals")
        for topic in ("run(tasks", "defer(tasks", "Drivers", "Configuration", "Errors",
                      "TaskTimeout", "WorkerCrashed", "SerializationError"):
            with self.subTest(topic=topic):
                self.assertLess(doc.index(topic), internals)
        self.assertGreater(doc.index("Data flow"), internals)

    def test_run_lists_every_error_it_can_raise(self):
        for name in ("TypeError", "ValueError", "SerializationError", "WorkerCrashed",
                     "TaskTimeout", "RemoteError", "KeyboardInterrupt"):
            with self.subTest(error=name):
                self.assertIn(name, concurrency.run.__doc__)

    def test_defer_says_its_tasks_are_detached_and_outlive_the_interpreter(self):
        doc = " ".join(concurrency.defer.__doc__.split())
        self.assertIn("detached", doc)
        self.assertIn("outlive this interpreter", doc)
        self.assertIn("after it has exited", doc)

    def test_driver_methods_are_documented_for_custom_drivers(self):
        self.assertIn("A custom driver implements this", concurrency.Driver.run.__doc__)
        self.assertIn("A custom driver may implement this", concurrency.Driver.defer.__doc__)


_wheel = []


def built_wheel(test):
    """The wheel pip builds from this checkout (made once per test run), or
    the test skipped where pip is missing."""
    if not _wheel:
        out = tempfile.mkdtemp(prefix="concurrency-wheel-")
        done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                               "-w", out, REPO], capture_output=True, text=True,
                              timeout=LONG_TIMEOUT)
        for leftover in ("build", "concurrency.egg-info"):
            shutil.rmtree(os.path.join(REPO, leftover), ignore_errors=True)
        if done.returncode != 0 and "No module named pip" in done.stderr:
            shutil.rmtree(out, ignore_errors=True)
            test.skipTest("pip is not installed")
        test.assertEqual(done.returncode, 0, done.stderr)
        [wheel] = os.listdir(out)
        _wheel.append(os.path.join(out, wheel))
        unittest.addModuleCleanup(shutil.rmtree, out, ignore_errors=True)
    return _wheel[0]


class PackagingTest(unittest.TestCase):

    def test_pyproject_declares_the_setuptools_backend(self):
        # Without it pip on Python 3.9/3.10 falls back to a legacy
        # "setup.py install" and says so.
        with open(os.path.join(REPO, "pyproject.toml"), encoding="utf-8") as file:
            text = file.read()
        self.assertRegex(text, r'(?m)^\[build-system\]$')
        self.assertRegex(text, r'(?m)^build-backend = "setuptools\.build_meta"$')
        self.assertRegex(text, r'(?m)^requires = \["setuptools>=61"\]$')


    def test_an_installed_copy_takes_no_module_named_worker(self):
        # The wheel pip installs: concurrency.py and the child entrypoint
        # under its private name, beside it -- and from the sdist as well.
        import zipfile
        with zipfile.ZipFile(built_wheel(self)) as archive:
            names = archive.namelist()
        modules = sorted(name for name in names if "/" not in name)
        self.assertEqual(modules, ["_concurrency_worker.py", "concurrency.py"])
        # Its types, for mypy, as a stub-only package (PEP 561).
        self.assertIn("concurrency-stubs/__init__.pyi", names)
        with open(os.path.join(REPO, "MANIFEST.in"), encoding="utf-8") as file:
            self.assertIn("include worker.py", file.read())


# What a user writes, as an editor's type checker should read it: each
# reveal_type() with the type it must show ("# -> "), each "# error" line a
# mistake it must flag -- and nothing else flagged, in it or in the library.
TYPED_USE = """\
import asyncio
{import_line}


def count(table: str) -> int:
    return len(table)


async def fetch(url: str) -> bytes:
    return url.encode()


reveal_type(concurrency.run([lambda: count("users"), lambda: count("orders")]))  # -> list[int]
reveal_type(concurrency.run({{"users": lambda: count("users")}}))  # -> dict[str, int]
reveal_type(concurrency.run(lambda: count("users")))  # -> list[int]
reveal_type(concurrency.run([lambda: fetch("a"), lambda: fetch("b")]))  # -> list[bytes]
reveal_type(concurrency.run({{"a": lambda: fetch("a")}}))  # -> dict[str, bytes]
reveal_type(concurrency.run([lambda: count("a")], return_exceptions=True))  # -> list[int | BaseException]
reveal_type(concurrency.driver("fork").run({{1: lambda: 2.5}}, timeout=3))  # -> dict[int, float]
reveal_type(concurrency.map(count, ["users", "orders"]))  # -> list[int]
reveal_type(concurrency.map(fetch, ["a"], return_exceptions=True))  # -> list[bytes | BaseException]
for key, value in concurrency.as_completed({{"users": lambda: count("users")}}):
    reveal_type(key)  # -> str
    reveal_type(value + 1)  # -> int
for index, result in concurrency.as_completed([lambda: count("a")], return_exceptions=True):
    reveal_type(index)  # -> int
    reveal_type(result)  # -> int | BaseException


async def main() -> None:
    reveal_type(await concurrency.run_async({{"a": lambda: fetch("a")}}))  # -> dict[str, bytes]
    async for name, size in concurrency.as_completed_async([lambda: count("a")]):
        reveal_type(size)  # -> int

with concurrency.deferring():
    concurrency.defer(lambda: count("users"))


@concurrency.deferring
def handle(update: str) -> int:
    return 1


reveal_type(handle)  # -> (update: str) -> int
reveal_type(concurrency.driver())  # -> Driver
try:
    concurrency.run([lambda: count("a")], timeout=1.5)
except concurrency.TaskTimeout as exc:
    reveal_type(exc.timeout)  # -> float
except concurrency.WorkerCrashed as exc:
    reveal_type(exc.exitcode)  # -> int | None

concurrency.run([count("users")])  # error
concurrency.run([count])  # error
concurrency.run({{"users": count("users")}})  # error
concurrency.run([lambda: 1], timeout="30")  # error
concurrency.map(count, [1, 2])  # error
"""


class TypingTest(unittest.TestCase):
    """mypy and pyright, at their defaults, on user code and on the library:
    an installed copy (the wheel, its stub) and a vendored one (the two
    files).  .ci/run sets CONCURRENCY_TYPECHECK=1 where it installs mypy,
    which turns a missing mypy from a skip into a failure."""

    @classmethod
    def setUpClass(cls):
        cls.folder = tempfile.mkdtemp(prefix="concurrency-types-")
        cls.addClassCleanup(shutil.rmtree, cls.folder, ignore_errors=True)

    def mypy(self):
        if importlib.util.find_spec("mypy") is None:
            if os.environ.get("CONCURRENCY_TYPECHECK") == "1":
                self.fail("mypy is not installed, and CONCURRENCY_TYPECHECK=1 asks for it")
            self.skipTest("mypy is not installed (pip install mypy)")
        return [sys.executable, "-m", "mypy", "--cache-dir", os.path.join(self.folder, "cache")]

    def pyright(self):
        found = os.environ.get("PYRIGHT") or shutil.which("pyright")
        if not found:
            self.skipTest("pyright is not installed (npm install pyright; "
                          "PYRIGHT=node_modules/.bin/pyright)")
        return [found, "--outputjson", "--pythonpath", sys.executable]

    def installed(self):
        """A folder holding the wheel's files, as site-packages would."""
        site = os.path.join(self.folder, "site")
        if not os.path.isdir(site):
            import zipfile
            with zipfile.ZipFile(built_wheel(self)) as archive:
                archive.extractall(site)
        return site

    def user_code(self, where, import_line):
        path = os.path.join(where, "typed_use.py")
        with open(path, "w", encoding="utf-8") as file:
            file.write(TYPED_USE.format(import_line=import_line))
        expected = {}
        for number, line in enumerate(TYPED_USE.splitlines(), 1):
            if "  # -> " in line:
                expected[number] = ("type", line.split("  # -> ")[1])
            elif line.endswith("  # error"):
                expected[number] = ("error", None)
        return path, expected

    def check(self, command, where, site, path, expected, read):
        env = dict(os.environ, PYTHONPATH=site or "")
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        done = subprocess.run(command, cwd=where, env=env, capture_output=True, text=True,
                              timeout=LONG_TIMEOUT)
        found = {}
        stray = []
        for file, line, severity, message in read(done.stdout):
            if os.path.realpath(os.path.join(where, file)) != os.path.realpath(path):
                if severity == "error":
                    stray.append("%s:%s: %s" % (file, line, message))
                continue
            if severity == "error":
                found[line] = ("error", None)
            else:
                revealed = re.search(r'(?:Revealed type is|Type of ".*" is) "(.*)"$', message)
                if revealed:
                    found[line] = ("type", _plain_type(revealed.group(1)))
        self.assertEqual(stray, [], "errors inside the library:\n" + done.stdout + done.stderr)
        self.assertEqual(found, expected, done.stdout + done.stderr)

    def read_mypy(self, output):
        for line in output.splitlines():
            match = re.match(r"^(.+?):(\d+): (error|note): (.*)$", line)
            if match:
                yield match.group(1), int(match.group(2)), match.group(3), match.group(4)

    def read_pyright(self, output):
        for diagnostic in json.loads(output)["generalDiagnostics"]:
            yield (diagnostic["file"], diagnostic["range"]["start"]["line"] + 1,
                   diagnostic["severity"], diagnostic["message"].split("\n")[0])

    def vendored(self):
        """A project with the two files copied into myapp/_vendor/."""
        where = os.path.join(self.folder, "project")
        vendor = os.path.join(where, "myapp", "_vendor")
        if not os.path.isdir(vendor):
            os.makedirs(vendor)
            for name in ("myapp/__init__.py", "myapp/_vendor/__init__.py"):
                open(os.path.join(where, name), "w").close()
            for name in ("concurrency.py", "worker.py"):
                shutil.copy(os.path.join(REPO, name), vendor)
        return where

    def test_mypy_on_an_installed_copy(self):
        command = self.mypy()
        where = tempfile.mkdtemp(dir=self.folder)
        path, expected = self.user_code(where, "import concurrency")
        self.check(command + [path], where, self.installed(), path, expected, self.read_mypy)

    def test_pyright_on_an_installed_copy(self):
        command = self.pyright()
        where = tempfile.mkdtemp(dir=self.folder)
        path, expected = self.user_code(where, "import concurrency")
        self.check(command + [path], where, self.installed(), path, expected,
                   self.read_pyright)

    def test_mypy_on_a_vendored_copy_and_the_library(self):
        command = self.mypy()
        where = self.vendored()
        path, expected = self.user_code(os.path.join(where, "myapp"),
                                        "from myapp._vendor import concurrency")
        self.check(command + ["myapp"], where, None, path, expected, self.read_mypy)

    def test_pyright_on_a_vendored_copy_and_the_library(self):
        command = self.pyright()
        where = self.vendored()
        path, expected = self.user_code(os.path.join(where, "myapp"),
                                        "from myapp._vendor import concurrency")
        self.check(command + ["myapp"], where, None, path, expected, self.read_pyright)

    def test_the_installed_stub_matches_the_module(self):
        # mypy's stubtest: every public name's stub against the module as
        # it runs (parameters, defaults, kinds).
        command = self.mypy()
        command[2:] = ["mypy.stubtest", "concurrency", "--mypy-config-file", os.devnull]
        env = dict(os.environ, PYTHONPATH=self.installed())
        done = subprocess.run(command, cwd=self.folder, env=env, capture_output=True,
                              text=True, timeout=LONG_TIMEOUT)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn("Success", done.stdout)


def _plain_type(text):
    """A revealed type as both checkers spell it: no module prefixes, no
    mypy "def " before a callable."""
    text = re.sub(r"\b(?:builtins|typing|myapp\._vendor\.concurrency|concurrency)\.", "", text)
    return text[4:] if text.startswith("def ") else text


class ImportTest(unittest.TestCase):

    def python(self, code):
        done = subprocess.run([sys.executable, "-c", "import sys, concurrency; " + code],
                              env=dict(os.environ, PYTHONPATH=REPO), capture_output=True,
                              text=True, timeout=LONG_TIMEOUT)
        return done.stdout.strip() + done.stderr

    def test_import_does_not_load_dill(self):
        self.assertEqual(self.python("concurrency.driver('sync').run([lambda: 1]); "
                                     "print('dill' in sys.modules)"), "False")

    def test_plain_lambdas_need_no_dill_on_either_side(self):
        self.assertEqual(self.python("print(concurrency.run([lambda: 'dill' in sys.modules]), "
                                     "'dill' in sys.modules)"), "[False] False")

    @unittest.skipUnless(hasattr(os, "fork"), "needs os.fork")
    def test_fork_driver_scripts_do_not_load_subprocess(self):
        self.assertEqual(self.python("print(concurrency.driver('fork').run([lambda: 1]), "
                                     "'subprocess' in sys.modules)"), "[1] False")

    def test_public_names(self):
        for name in concurrency.__all__:
            self.assertTrue(hasattr(concurrency, name), name)
        self.assertTrue(issubclass(concurrency.TaskTimeout, concurrency.ConcurrencyError))


if __name__ == "__main__":
    unittest.main()
