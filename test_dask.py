"""Tests of the dask driver on a real Dask cluster: a scheduler and two
workers started as ``dask scheduler`` / ``dask worker`` processes on
127.0.0.1, free ports, the way a user's cluster runs; and the local cluster
it starts when none is named.  Skipped where ``distributed`` is not
installed (``pip install '.[dask]'``).

The cluster's workers see the checkout on PYTHONPATH as a user's project
code, but never import the library: it reaches them uploaded.
"""

import asyncio
import hashlib
import json
import os
import pickle
import platform
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
import warnings
from unittest import mock

import concurrency
from test_concurrency import (
    FIDELITY_CASES, FIDELITY_CHECK, LONG_TIMEOUT, REPO, SHORT_TIMEOUT, CleanTestCase, DriverTests,
    ScriptTestCase, pid_alive, raise_value_error, read_file, wait_until,
    write_file)

try:
    import distributed
except ImportError:
    distributed = None

NEEDS_DISTRIBUTED = unittest.skipIf(distributed is None,
                                    "distributed is not installed: pip install '.[dask]'")

# Starting a scheduler and workers takes seconds on a busy machine.
CLUSTER_START_TIMEOUT = 60.0


class Cluster:
    """A scheduler and two workers (2 threads each), in process groups of
    their own, stopped and reaped at the end; workers' stderr kept."""

    def __init__(self, worker_options=(), worker_prefix=()):
        self.folder = tempfile.mkdtemp(prefix="concurrency-dask-")
        self.scheduler_file = os.path.join(self.folder, "scheduler.json")
        self.worker_log = os.path.join(self.folder, "workers.log")
        self.processes = []
        env = dict(os.environ, PYTHONPATH=REPO)
        env.pop("CONCURRENCY_DASK_ADDRESS", None)
        try:
            self.start([sys.executable, "-m", "distributed.cli.dask_scheduler",
                        "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                        "--scheduler-file", self.scheduler_file], env)
            wait_until(lambda: os.path.exists(self.scheduler_file), CLUSTER_START_TIMEOUT,
                       "the scheduler to start")
            for name in ("w1", "w2"):
                self.start([*worker_prefix, sys.executable, "-m", "distributed.cli.dask_worker",
                            "--scheduler-file", self.scheduler_file, "--host", "127.0.0.1",
                            "--nthreads", "2", "--no-dashboard", "--name", name,
                            "--local-directory", os.path.join(self.folder, name),
                            *worker_options], env)
            self.client = distributed.Client(scheduler_file=self.scheduler_file,
                                             timeout=CLUSTER_START_TIMEOUT,
                                             set_as_default=False)
            self.client.wait_for_workers(2, timeout=CLUSTER_START_TIMEOUT)
            self.address = self.client.scheduler.address
        except BaseException:
            self.stop()
            raise

    def start(self, argv, env):
        with open(self.worker_log, "ab") as log:
            self.processes.append(subprocess.Popen(
                argv, cwd=self.folder, env=env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, start_new_session=True))

    def worker_pids(self):
        return set(self.client.run(os.getpid).values())

    def stop(self):
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
        for process in self.processes:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for process in self.processes:
            try:
                process.wait(SHORT_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


CLUSTER = []


def setUpModule():
    if distributed is not None:
        CLUSTER.append(Cluster())


def tearDownModule():
    concurrency._close_dask()  # first: a client whose scheduler is gone would try again
    while CLUSTER:
        CLUSTER.pop().stop()


def write_pid(folder, name):
    """Called by a task: say which process runs it."""
    path = os.path.join(folder, name)
    write_file(path + ".tmp", str(os.getpid()))
    os.rename(path + ".tmp", path)


def shared_files_open(client):
    """The descriptors on anonymous files of shared buffers open here
    ("caller") and in each worker of ``client``'s cluster."""
    def shared_files():  # made here, so sent by value: no worker imports this module
        found = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                if "concurrency-shared-" in os.readlink("/proc/self/fd/" + fd):
                    found.append(fd)
            except OSError:
                pass  # closed meanwhile (listdir's own descriptor)
        return found
    return dict(client.run(shared_files), caller=shared_files())


def pids_of(folder):
    return [int(read_file(os.path.join(folder, name))) for name in os.listdir(folder)
            if not name.endswith(".tmp")]


_PYTHON_VERSION = platform.python_version


def python_version_of_workers():
    """platform.python_version() as if the local cluster's workers (threads
    of this process) ran another Python."""
    if threading.current_thread() is threading.main_thread():
        return _PYTHON_VERSION()
    return "3.2.1"


def free_port():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        return listener.getsockname()[1]


class ClusterTestCase(CleanTestCase):
    """Runs against the module's cluster, named by CONCURRENCY_DASK_ADDRESS
    (as a user's environment would); a test may leave no task's process
    behind on the cluster's workers either."""

    def setUp(self):
        self.cluster = CLUSTER[0]
        patcher = mock.patch.dict(os.environ, {"CONCURRENCY_DASK_ADDRESS": self.cluster.address})
        patcher.start()
        self.addCleanup(patcher.stop)
        super().setUp()
        concurrency.extend("dask", concurrency.DaskDriver)

    def assert_no_process_left(self):
        # Warm children of the workers are let go (as after a minute unused);
        # then nothing but the cluster itself may be left.
        concurrency.driver("dask").release_workers()
        super().assert_no_process_left()


@NEEDS_DISTRIBUTED
class DaskDriverTest(DriverTests, ClusterTestCase):
    driver = "dask"

    def test_tasks_run_in_children_of_the_cluster_workers_which_never_import_the_library(self):
        parents = set(self.d.run([lambda: os.getppid()] * 8))
        self.assertTrue(parents <= self.cluster.worker_pids(), parents)

        def modules():
            return ("concurrency" in sys.modules, "worker" in sys.modules,
                    getattr(sys.modules.get("_concurrency_on_dask"), "__file__", None))
        for imported, worker_imported, runner_file in self.cluster.client.run(modules).values():
            self.assertFalse(imported)
            self.assertFalse(worker_imported)
            if runner_file is not None:  # a worker that got a task
                self.assertTrue(runner_file.startswith(self.cluster.folder), runner_file)

    def test_a_task_that_crashes_its_process_fails_alone_and_is_not_run_again(self):
        starts = self.path("starts")
        workers = self.cluster.worker_pids()

        def crash():
            with open(starts, "a") as file:
                file.write("started\n")
            os._exit(7)

        def killed():
            os.kill(os.getpid(), signal.SIGKILL)

        result = self.d.run({"crash": crash, "fine": lambda: "fine", "killed": killed},
                            return_exceptions=True)
        self.assertIsInstance(result["crash"], concurrency.WorkerCrashed)
        self.assertEqual(result["crash"].exitcode, 7)
        self.assertEqual(result["crash"].key, "crash")
        self.assertIsInstance(result["killed"], concurrency.WorkerCrashed)
        self.assertEqual(result["killed"].signal, "SIGKILL")
        self.assertEqual(result["fine"], "fine")
        self.assertEqual(read_file(starts), "started\n")  # once: never re-run
        self.assertEqual(self.cluster.worker_pids(), workers)  # no Dask worker died
        self.assertEqual(self.d.run([lambda: 1, lambda: 2]), [1, 2])

    def test_a_task_process_killed_from_outside_fails_with_worker_crashed(self):
        pid_file = self.path("pid")

        def slow():
            write_file(pid_file + ".tmp", str(os.getpid()))
            os.rename(pid_file + ".tmp", pid_file)
            time.sleep(60)

        def killer():
            wait_until(lambda: os.path.exists(pid_file), LONG_TIMEOUT, "the task to start")
            os.kill(int(read_file(pid_file)), signal.SIGKILL)

        thread = threading.Thread(target=killer)
        thread.start()
        try:
            started = time.monotonic()
            result = self.d.run({"slow": slow, "other": lambda: 3}, return_exceptions=True)
        finally:
            thread.join(LONG_TIMEOUT)
        self.assertLess(time.monotonic() - started, 30)
        self.assertIsInstance(result["slow"], concurrency.WorkerCrashed)
        self.assertEqual(result["slow"].signal, "SIGKILL")
        self.assertEqual(result["other"], 3)

    def test_timeout_names_the_unfinished_tasks_and_stops_them_on_the_cluster(self):
        folder = self.subdir("pids")

        def spin():
            write_pid(folder, "spin")
            while True:
                pass

        def sleeper():
            write_pid(folder, "sleeper")
            time.sleep(60)

        started = time.monotonic()
        with self.assertRaises(concurrency.TaskTimeout) as caught:
            self.d.run({"spin": spin, "quick": lambda: 1, "sleeper": sleeper}, timeout=3)
        self.assertLess(time.monotonic() - started, 3 + 5)
        self.assertEqual(caught.exception.key, "spin")
        self.assertEqual(caught.exception.unfinished, ["spin", "sleeper"])
        pids = pids_of(folder)
        self.assertEqual(len(pids), 2)
        wait_until(lambda: not any(pid_alive(pid) for pid in pids), SHORT_TIMEOUT,
                   "the timed-out tasks' processes to be killed")

    def test_tasks_that_finished_keep_their_results_though_one_of_their_chunk_timed_out(self):
        # Tasks capturing a large buffer go in as many chunks as the
        # cluster has threads, at most: the spinner shares a chunk with
        # tasks that end at once.
        blob = os.urandom(2 << 20)
        folder = self.subdir("pids")

        def spin():
            write_pid(folder, "spin")
            while blob:
                pass

        tasks = {"t%d" % n: (lambda n=n: blob[n]) for n in range(64)}
        tasks["spin"] = spin
        started = time.monotonic()
        outcome = self.d.run(tasks, timeout=2, return_exceptions=True)
        self.assertLess(time.monotonic() - started, 2 + 3)
        self.assertEqual({key: value for key, value in outcome.items() if key != "spin"},
                         {"t%d" % n: blob[n] for n in range(64)})
        self.assertIsInstance(outcome["spin"], concurrency.TaskTimeout)
        self.assertEqual(outcome["spin"].unfinished, ["spin"])
        [pid] = pids_of(folder)
        wait_until(lambda: not pid_alive(pid), SHORT_TIMEOUT, "the spinning task to be killed")

    def test_queued_tasks_never_start_once_a_run_times_out(self):
        folder = self.subdir("started")
        threads = sum(self.cluster.client.nthreads().values())
        tasks = {"t%d" % n: (lambda n=n: write_pid(folder, "t%d" % n) or time.sleep(60))
                 for n in range(2 * threads)}
        with self.assertRaises(concurrency.TaskTimeout):
            self.d.run(tasks, timeout=3)
        pids = pids_of(folder)
        self.assertEqual(len(pids), threads)
        wait_until(lambda: not any(pid_alive(pid) for pid in pids), SHORT_TIMEOUT,
                   "the running tasks' processes to be killed")
        # Their threads are free now: a queued task would have started at once.
        self.assertEqual(self.d.run([lambda: "after"] * threads), ["after"] * threads)
        self.assertEqual(len(os.listdir(folder)), threads)

    def test_leaving_as_completed_early_stops_the_tasks_still_running(self):
        folder = self.subdir("pids")

        def sleeper():
            write_pid(folder, "sleeper")
            time.sleep(60)

        pairs = self.d.as_completed({"quick": lambda: 1, "sleeper": sleeper})
        self.assertEqual(next(pairs), ("quick", 1))
        wait_until(lambda: os.listdir(folder), LONG_TIMEOUT, "the sleeper to start")
        pairs.close()
        [pid] = pids_of(folder)
        wait_until(lambda: not pid_alive(pid), SHORT_TIMEOUT, "the sleeper to be killed")

    def test_a_cancelled_run_async_stops_its_tasks(self):
        folder = self.subdir("pids")

        def sleeper():
            write_pid(folder, "sleeper")
            time.sleep(60)

        async def main():
            task = asyncio.ensure_future(self.d.run_async([sleeper]))
            end = time.monotonic() + LONG_TIMEOUT
            while not os.listdir(folder):
                self.assertFalse(task.done() and task.result())
                self.assertLess(time.monotonic(), end, "the task did not start")
                await asyncio.sleep(0.01)
            task.cancel()
            with self.assertRaises(asyncio.CancelledError):
                await asyncio.wait_for(task, LONG_TIMEOUT)

        asyncio.run(main())
        [pid] = pids_of(folder)
        wait_until(lambda: not pid_alive(pid), SHORT_TIMEOUT, "the task to be killed")

    def test_ctrl_c_in_the_caller_stops_its_tasks_on_the_cluster(self):
        folder = self.subdir("pids")
        script = os.path.join(self.tmp, "main.py")
        write_file(script, textwrap.dedent("""\
            import os, sys, time
            import concurrency
            folder = sys.argv[1]

            def sleeper(name):
                path = os.path.join(folder, name)
                open(path + ".tmp", "w").write(str(os.getpid()))
                os.rename(path + ".tmp", path)
                time.sleep(60)

            try:
                concurrency.driver("dask").run([lambda: sleeper("a"), lambda: sleeper("b")])
            except KeyboardInterrupt:
                print("interrupted", flush=True)
            """))
        env = dict(os.environ, PYTHONPATH=REPO, CONCURRENCY_DRIVER="dask")
        process = subprocess.Popen([sys.executable, script, folder], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: len(pids_of(folder)) == 2, LONG_TIMEOUT, "both tasks to start")
            process.send_signal(signal.SIGINT)
            out, err = process.communicate(timeout=LONG_TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        self.assertEqual(out, "interrupted\n", err)
        pids = pids_of(folder)
        wait_until(lambda: not any(pid_alive(pid) for pid in pids), SHORT_TIMEOUT,
                   "the tasks' processes to be killed")

    def test_a_task_that_cannot_travel_fails_before_anything_starts(self):
        marker = self.path("ran")
        sock = socket.socket()
        self.addCleanup(sock.close)
        with self.assertRaises(concurrency.SerializationError) as caught:
            self.d.run({"first": lambda: write_file(marker, "x"), "bad": lambda: sock})
        self.assertEqual(caught.exception.key, "bad")
        self.assertFalse(os.path.exists(marker))

    def test_print_goes_to_the_worker_and_never_into_a_result(self):
        def noisy():
            print("noise on stdout", flush=True)
            os.write(1, b"raw noise\n")
            return "clean"
        self.assertEqual(self.d.run([noisy] * 4), ["clean"] * 4)

    def test_many_tiny_tasks_keep_order_and_every_result(self):
        result = self.d.run([lambda n=n: n * n for n in range(3000)])
        self.assertEqual(result, [n * n for n in range(3000)])
        keys = ["k%d" % n for n in range(500)]
        pairs = list(self.d.as_completed({key: (lambda key=key: key.upper()) for key in keys}))
        self.assertEqual(sorted(pairs), sorted((key, key.upper()) for key in keys))

    def test_a_large_capture_travels_and_dask_warns_of_no_large_graph(self):
        blob = os.urandom(6 << 20)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = self.d.run([lambda: hashlib.sha256(blob).hexdigest(),
                                 lambda: len(blob), lambda: blob[:3]])
        self.assertEqual(result, [hashlib.sha256(blob).hexdigest(), len(blob), blob[:3]])
        self.assertEqual([str(w.message) for w in caught if "large" in str(w.message).lower()],
                         [])

    def capture_run(self, client):
        """A run of tasks capturing a 16 MB bytes and a 2 MB bytearray,
        checked for its results and the identity rules of the process
        driver; returns the sizes of the buffers of ours Dask was handed
        (by scatter, submit or map) and the bytes the workers fetched from
        each other."""
        blob = os.urandom(16 << 20)
        mutable = bytearray(2 << 20)
        twice = (mutable, mutable, blob, blob)  # one object reached twice stays one

        def touch(i):
            seen = mutable[0]
            mutable[0] = i + 1
            return seen

        handed = []  # the size of each buffer of ours that Dask is handed

        def sizes(values):
            for value in values:
                if isinstance(value, (bytes, bytearray)):
                    handed.append(len(value))
                elif isinstance(value, (list, tuple)):
                    sizes(value)

        scatter, submit, map_ = client.scatter, client.submit, client.map

        def spy(real):
            def call(*args, **kwargs):
                sizes(args)
                sizes(kwargs.values())
                return real(*args, **kwargs)
            return call

        def received(dask_worker):
            return sum(entry["total"] for entry in dask_worker.transfer_incoming_log)

        before = client.run(received)
        with mock.patch.object(client, "scatter", spy(scatter)), \
                mock.patch.object(client, "submit", spy(submit)), \
                mock.patch.object(client, "map", spy(map_)):
            results = self.d.run([lambda i=i: (len(blob), blob[i], touch(i),
                                               twice[0] is twice[1], twice[2] is twice[3])
                                  for i in range(16)])
        after = client.run(received)
        self.assertEqual(results, [(len(blob), blob[i], 0, True, True) for i in range(16)])
        self.assertEqual(mutable[0], 0)  # the caller's bytearray: untouched
        return handed, sum(after[worker] - before.get(worker, 0) for worker in after)

    @unittest.skipUnless(concurrency._state.sharing_by_file, "needs memfd_create and /proc")
    def test_a_large_capture_is_read_from_the_caller_s_file_by_workers_on_this_machine(self):
        client = self.d.client()
        handed, moved = self.capture_run(client)
        # Nothing large handed to Dask, nor moved between workers: their
        # children read the caller's file, written once for the run.
        self.assertEqual([size for size in handed if size >= 1 << 20], [], handed)
        self.assertLess(moved, 1 << 20)
        # The files, the caller's and the workers' descriptors on them, go
        # as the run ends.
        self.assertEqual(shared_files_open(client),
                         dict.fromkeys(client.nthreads(), []) | {"caller": []})
        self.assertEqual(set(client.run(lambda: sys.modules["_concurrency_on_dask"]
                                        ._state.sharing_by_file).values()), {True})

    @unittest.skipUnless(concurrency._state.sharing_by_file, "needs memfd_create and /proc")
    def test_a_capture_in_the_caller_s_file_goes_by_pipe_to_children_that_cannot_read_files(self):
        client = self.d.client()

        def by_file(on):
            import importlib
            importlib.import_module("_concurrency_on_dask")._state.sharing_by_file = on

        blob = os.urandom(3 << 20)
        client.run(by_file, False)
        try:
            result = self.d.run([lambda i=i: (blob[i], len(blob)) for i in range(4)])
        finally:
            client.run(by_file, True)
        self.assertEqual(result, [(blob[i], len(blob)) for i in range(4)])
        self.assertEqual(shared_files_open(client),
                         dict.fromkeys(client.nthreads(), []) | {"caller": []})

    @unittest.skipUnless(concurrency._state.sharing_by_file, "needs memfd_create and /proc")
    def test_an_object_s_data_that_pickles_out_of_band_is_shared_as_bytes_are(self):
        class Frame:  # as a NumPy array pickles: its data as a pickle buffer
            def __init__(self, data):
                self.data = data

            def __reduce_ex__(self, protocol):
                return Frame, (pickle.PickleBuffer(self.data),)

        frame = Frame(bytearray(os.urandom(8 << 20)))
        original = bytes(frame.data)
        client = self.d.client()
        handed = []
        map_ = client.map

        def spy(*args, **kwargs):
            # Each call's size; a call too large for the graph goes
            # scattered ahead, as a future.
            handed.extend(len(call) if isinstance(call, bytes) else type(call).__name__
                          for call in args[1])
            return map_(*args, **kwargs)

        def touch(i):
            frame.data[i] = 0  # the task's own copy
            return type(frame.data).__name__, frame.data[i], frame.data[i + 1]

        with mock.patch.object(client, "map", spy):
            result = self.d.run([lambda i=i: touch(i) for i in range(12)])
        self.assertEqual(result, [("bytearray", 0, frame.data[i + 1]) for i in range(12)])
        self.assertEqual(frame.data, original)  # the caller's: untouched
        self.assertTrue(handed)
        self.assertTrue(all(type(size) is int for size in handed), handed)
        self.assertLess(sum(handed), 1 << 20, handed)  # read from the caller's file

    def test_a_large_capture_goes_to_workers_elsewhere_once_and_to_each_worker_once(self):
        client = self.d.client()
        # Workers taken for another machine's (as by their address): the
        # buffers go by Dask, scattered once.
        concurrency._state.dask_clusters.pop(client, None)
        self.addCleanup(concurrency._state.dask_clusters.pop, client, None)
        with mock.patch.object(concurrency, "_on_this_machine", return_value=False):
            handed, moved = self.capture_run(client)
        # Sent by the caller: each buffer once, and calls that are small.
        self.assertEqual(sorted(size for size in handed if size >= 1 << 20),
                         [2 << 20, 16 << 20], handed)
        self.assertLess(sum(handed), (18 << 20) + (1 << 20), handed)
        # Between the workers: at most one copy more for each of them.
        self.assertLessEqual(moved, (18 << 20) * (len(client.nthreads()) - 1) + (1 << 20))
        # The file a worker writes a buffer into, once for its chunks, goes
        # once the run is over: the caller tells the workers so.
        def files_left(dask_worker):
            runner = sys.modules.get("_concurrency_on_dask")
            return sorted(runner._state.dask_files) if runner is not None else []

        wait_until(lambda: client.run(files_left) == dict.fromkeys(client.nthreads(), []),
                   SHORT_TIMEOUT, "the workers to close the files of the run's buffers")

    def test_a_result_larger_than_a_dask_frame_comes_back_whole(self):
        import dask.utils
        shard = dask.utils.parse_bytes(dask.config.get("distributed.comm.shard"))
        size = shard + (3 << 20)

        def large():
            data = os.urandom(size)
            return hashlib.sha256(data).hexdigest(), data

        [(digest, data)] = self.d.run([large])
        self.assertEqual(len(data), size)
        self.assertEqual(hashlib.sha256(data).hexdigest(), digest)

    def test_a_closure_over_a_class_made_in_the_caller_comes_back_as_that_class(self):
        Model = type("Model", (), {"label": lambda self: "model %d" % self.n})
        instance = Model()
        instance.n = 4

        def bump():
            instance.n += 1
            return instance

        [value] = self.d.run([bump])
        self.assertIs(type(value), Model)
        self.assertEqual(value.label(), "model 5")
        self.assertEqual(instance.n, 4)  # the caller's copy is untouched

    def test_defer_runs_on_the_cluster_and_a_failure_is_reported_there(self):
        marker = self.path("deferred")
        self.d.defer({"writes": lambda: write_file(marker, "done"),
                      "fails": lambda: raise_value_error("deferred failure 41")})
        # Its content, not the file's existence: the task's write_file()
        # makes the file first and writes it after.
        wait_until(lambda: os.path.exists(marker) and read_file(marker) == "done",
                   LONG_TIMEOUT, "the deferred task to run")
        wait_until(lambda: "deferred failure 41" in read_file(self.cluster.worker_log),
                   LONG_TIMEOUT, "the failure to be reported in the workers' log")
        log = read_file(self.cluster.worker_log)
        self.assertIn("concurrency: deferred task 'fails' failed:", log)
        self.assertIn("ValueError: deferred failure 41", log)
        # Both Dask tasks over, so that no warm child is started after the
        # workers' children are let go at the end of the test.
        wait_until(lambda: not any(self.cluster.client.processing().values()),
                   LONG_TIMEOUT, "the deferred Dask tasks to end")

    def test_the_given_client_then_the_default_client_are_used(self):
        client = distributed.Client(self.cluster.address, set_as_default=False)
        self.addCleanup(client.close)
        self.assertIs(concurrency.DaskDriver(client=client).client(), client)
        with mock.patch.dict(os.environ):
            del os.environ["CONCURRENCY_DASK_ADDRESS"]
            default = distributed.Client(self.cluster.address, set_as_default=True)
            try:
                driver = concurrency.DaskDriver()
                self.assertIs(driver.client(), default)
                self.assertEqual(driver.run([lambda: "via default"]), ["via default"])
            finally:
                default.close()

    def test_an_unreachable_scheduler_is_an_error_naming_it_within_the_connect_timeout(self):
        address = "tcp://127.0.0.1:%d" % free_port()
        driver = concurrency.DaskDriver(address=address, connect_timeout=1)
        started = time.monotonic()
        with self.assertRaisesRegex(concurrency.ConcurrencyError,
                                    "cannot reach the Dask scheduler at %s within 1 s"
                                    % address):
            driver.run([lambda: 1])
        self.assertLess(time.monotonic() - started, 10)

    def check_no_answer(self, address, connect_timeout, listener=None):
        """A run against ``address`` is a ConcurrencyError within its
        connect timeout and a small margin, and holds no other caller
        (the dask driver's lock) while it waits."""
        driver = concurrency.DaskDriver(address=address, connect_timeout=connect_timeout)
        outcome = []

        def run():
            try:
                outcome.append(driver.run([lambda: 1], timeout=5))
            except Exception as exc:
                outcome.append(exc)

        started = time.monotonic()
        caller = threading.Thread(target=run, daemon=True)
        caller.start()
        if listener is not None:  # it is connecting once its connection arrives
            self.assertTrue(select.select([listener], [], [], SHORT_TIMEOUT)[0])
            self.assertTrue(concurrency._state.dask_lock.acquire(timeout=1),
                            "the dask driver's lock is held while it connects")
            concurrency._state.dask_lock.release()
        caller.join(connect_timeout + concurrency._DASK_CONNECT_GRACE + SHORT_TIMEOUT)
        self.assertFalse(caller.is_alive(), "run() still waits for the scheduler")
        self.assertLess(time.monotonic() - started,
                        connect_timeout + concurrency._DASK_CONNECT_GRACE + 5)
        [error] = outcome
        self.assertIsInstance(error, concurrency.ConcurrencyError)
        self.assertIn("the Dask scheduler at %s did not answer within %g s"
                      % (address, connect_timeout), str(error))

    def test_a_port_that_accepts_and_never_answers_is_an_error_within_the_connect_timeout(self):
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        self.check_no_answer("tcp://127.0.0.1:%d" % listener.getsockname()[1], 2,
                             listener=listener)

    def test_a_stopped_scheduler_is_an_error_within_the_connect_timeout(self):
        folder = tempfile.mkdtemp(prefix="concurrency-dask-")
        self.addCleanup(shutil.rmtree, folder, ignore_errors=True)
        scheduler_file = os.path.join(folder, "scheduler.json")
        scheduler = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
             "--port", "0", "--no-dashboard", "--scheduler-file", scheduler_file],
            cwd=folder, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)

        def end():
            os.killpg(scheduler.pid, signal.SIGKILL)
            scheduler.wait()
        self.addCleanup(end)
        def scheduler_address():  # once the file is written whole
            try:
                return json.loads(read_file(scheduler_file))["address"]
            except (OSError, ValueError, KeyError):
                return None
        wait_until(lambda: scheduler_address() is not None, CLUSTER_START_TIMEOUT,
                   "the scheduler to start")
        address = scheduler_address()
        # Up and answering, then stopped, as a suspended or swapped-out one.
        with distributed.Client(address, timeout=CLUSTER_START_TIMEOUT,
                                set_as_default=False):
            pass
        os.killpg(scheduler.pid, signal.SIGSTOP)
        self.check_no_answer(address, 2)

    def test_workers_on_another_python_are_refused_before_any_task_is_sent(self):
        real = platform.python_version
        ran = []
        cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                           dashboard_address=None,
                                           scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})
        self.addCleanup(cluster.close)
        client = distributed.Client(cluster, set_as_default=False)
        self.addCleanup(client.close)
        driver = concurrency.DaskDriver(client=client)
        with mock.patch.object(platform, "python_version", python_version_of_workers):
            with self.assertRaises(concurrency.ConcurrencyError) as caught:
                driver.run([lambda: ran.append(1)])
        message = str(caught.exception)
        self.assertIn("run the workers on Python %s" % real().rsplit(".", 1)[0], message)
        self.assertIn("runs Python 3.2.1", message)
        self.assertIn("(Python %s)" % real(), message)
        self.assertEqual(ran, [])

    def test_a_worker_on_another_python_runs_none_of_the_caller_s_tasks(self):
        # One that joined after the check: dask_task() refuses the chunk.
        worker = concurrency._worker_module()
        payloads = concurrency._dumps_tasks([0, 1], [lambda: 1, lambda: 2])
        outcomes, _seconds = worker.dask_task(payloads, None, None, "cpython-32")
        self.assertEqual([kind for kind, _body in outcomes], [worker.LOST] * 2)
        what, detail = pickle.loads(outcomes[0][1])
        self.assertEqual(what, "error")
        self.assertIn("runs %s, this process's tasks need cpython-32"
                      % sys.implementation.cache_tag, detail)

    def test_bad_arguments_are_refused(self):
        with self.assertRaisesRegex(ValueError, "a client or an address, not both"):
            concurrency.DaskDriver(client=object(), address="tcp://x:1")
        with self.assertRaisesRegex(TypeError, "address must be a scheduler address"):
            concurrency.DaskDriver(address=8786)
        with self.assertRaisesRegex(ValueError, "connect_timeout must be finite"):
            concurrency.DaskDriver(connect_timeout=float("inf"))
        with self.assertRaisesRegex(TypeError, "needs a synchronous distributed.Client"):
            concurrency.DaskDriver(client=mock.Mock(asynchronous=True))


class OwnClusterTestCase(ClusterTestCase):
    """Runs against a cluster of the class's own, from start_cluster()."""

    @classmethod
    def start_cluster(cls):
        raise NotImplementedError

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.own = cls.start_cluster()

        def stop():
            concurrency._close_dask()  # first: its client would try the scheduler again
            cls.own.stop()
        cls.addClassCleanup(stop)

    def setUp(self):
        super().setUp()
        self.cluster = self.own
        patcher = mock.patch.dict(os.environ, {"CONCURRENCY_DASK_ADDRESS": self.own.address})
        patcher.start()
        self.addCleanup(patcher.stop)


@NEEDS_DISTRIBUTED
class LostWorkerTest(OwnClusterTestCase):
    """On a cluster of its own, whose scheduler gives up on a task the first
    time the worker running it is lost (allowed-failures = 0; by default
    Dask runs it again elsewhere, up to three times), and whose workers no
    nanny starts again."""

    @classmethod
    def start_cluster(cls):
        with mock.patch.dict(os.environ, {"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}):
            return Cluster(worker_options=["--no-nanny"])

    def test_a_worker_lost_mid_run_fails_only_its_own_tasks(self):
        folder = self.subdir("started")
        go = os.path.join(self.tmp, "go")

        def task(i):
            path = os.path.join(folder, str(i))
            write_file(path + ".tmp", str(os.getppid()))  # its Dask worker
            os.rename(path + ".tmp", path)
            deadline = time.monotonic() + LONG_TIMEOUT
            while not os.path.exists(go) and time.monotonic() < deadline:
                time.sleep(0.01)
            return i

        results = []
        runner = threading.Thread(target=lambda: results.append(concurrency.driver("dask").run(
            [lambda i=i: task(i) for i in range(4)], return_exceptions=True)))
        runner.start()
        try:
            # Renamed into place, not just made: a task's ".tmp" file is
            # not yet its pid.
            wait_until(lambda: len(pids_of(folder)) >= 4, LONG_TIMEOUT, "all tasks to start")
            workers = {int(name): int(read_file(os.path.join(folder, name)))
                       for name in os.listdir(folder) if not name.endswith(".tmp")}
            lost = workers[0]
            os.kill(lost, signal.SIGKILL)
            wait_until(lambda: not pid_alive(lost), SHORT_TIMEOUT, "the worker to die")
        finally:
            write_file(go, "")
            runner.join(LONG_TIMEOUT)
        self.assertFalse(runner.is_alive())
        [outcome] = results
        for i, value in enumerate(outcome):
            if workers[i] == lost:
                self.assertIsInstance(value, concurrency.WorkerCrashed, i)
            else:
                self.assertEqual(value, i)
        self.assertIn(lost, workers.values())
        self.assertNotEqual(set(workers.values()), {lost})  # the other worker ran some


@unittest.skipUnless(concurrency._state.sharing_by_file, "needs memfd_create and /proc")
class CallerFilesOnAWorkerTest(CleanTestCase):
    """What a Dask worker makes of the caller's files it is told of, run
    here as a worker runs it."""

    def caller_file(self):
        name = "concurrency-shared-%s" % os.urandom(8).hex()
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        self.addCleanup(os.close, fd)
        os.write(fd, b"x" * 100)
        return fd, name

    def test_a_file_that_is_not_the_one_named_is_out_of_reach_for_good(self):
        fd, name = self.caller_file()
        outcomes, (why, lasting) = concurrency._run_for_dask(
            [b"never run"], None, [[0]], None, [(0, os.getpid(), fd, name + "0", 100)])
        self.assertIsNone(outcomes)
        self.assertIn("has no file", why)
        self.assertTrue(lasting)

    def test_no_descriptor_left_keeps_the_caller_s_files_in_use_for_later_runs(self):
        import resource
        fd, name = self.caller_file()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        held = []
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
        try:
            while True:
                try:
                    held.append(os.open(os.devnull, os.O_RDONLY))
                except OSError:
                    break
            outcomes, (why, lasting) = concurrency._run_for_dask(
                [b"never run"], None, [[0]], None, [(0, os.getpid(), fd, name, 100)])
        finally:
            for own in held:
                os.close(own)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        self.assertIsNone(outcomes)
        self.assertIn("Too many open files", why)
        self.assertFalse(lasting)


def own_pid_namespace():
    """The command that runs a program in a PID namespace of its own, with
    its own /proc (as a container sharing the host's network would), or
    None where this machine won't."""
    for prefix in (["unshare", "--pid", "--fork", "--mount-proc"],
                   ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc"]):
        try:
            if subprocess.run(prefix + [sys.executable, "-c", "pass"], timeout=SHORT_TIMEOUT,
                              capture_output=True).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            pass
    return None


@NEEDS_DISTRIBUTED
class WorkersInTheirOwnNamespaceTest(OwnClusterTestCase):
    """On a cluster of its own whose workers run in a PID namespace of their
    own: on this machine by their address, and yet the caller's processes,
    and so its files, are out of their sight."""

    @classmethod
    def start_cluster(cls):
        prefix = own_pid_namespace()
        if prefix is None or not concurrency._state.sharing_by_file:
            raise unittest.SkipTest("needs unshare --pid, memfd_create and /proc")
        return Cluster(worker_prefix=prefix)

    def test_a_large_capture_goes_by_dask_when_the_workers_cannot_read_the_caller_s_files(self):
        d = concurrency.driver("dask")
        client = d.client()
        blob = os.urandom(4 << 20)
        handed = []
        scatter = client.scatter

        def spy(data, *args, **kwargs):
            handed.extend(len(item) for item in data)
            return scatter(data, *args, **kwargs)

        file_call = concurrency._DaskRun.file_call
        with mock.patch.object(client, "scatter", spy), \
                mock.patch.object(concurrency._DaskRun, "file_call", autospec=True,
                                  side_effect=file_call) as tried:
            first = d.run([lambda i=i: (blob[i], len(blob)) for i in range(6)])
            self.assertTrue(tried.called)  # they were asked to read our file first
            tried.reset_mock()
            second = d.run([lambda i=i: blob[-i] for i in range(6)])
        self.assertEqual(first, [(blob[i], len(blob)) for i in range(6)])
        self.assertEqual(second, [blob[-i] for i in range(6)])
        # The first run's chunks came back unrun, and went again by Dask;
        # the second went by Dask from the start.
        self.assertIn(client, concurrency._state.dask_files_unreachable)
        self.assertFalse(tried.called)
        self.assertEqual(handed, [len(blob), len(blob)])
        self.assertEqual(shared_files_open(client),
                         dict.fromkeys(client.nthreads(), []) | {"caller": []})


@NEEDS_DISTRIBUTED
class DaskScriptTest(ScriptTestCase):
    """Scripts as users write them, run in a fresh interpreter."""

    SCRIPT = """\
        import os, sys
        import concurrency

        class Row:
            def __init__(self, table, count):
                self.table, self.count = table, count

        TABLES = {"users": 120, "orders": 345}

        def count(table):
            return Row(table, TABLES[table])

        rows = concurrency.run({t: (lambda t=t: count(t)) for t in TABLES})
        print(sorted((type(row).__name__, row.table, row.count) for row in rows.values()))
        try:
            concurrency.run([lambda: 1 / 0])
        except ZeroDivisionError as exc:
            print("raised", type(exc).__name__)
        marker = sys.argv[1]
        concurrency.defer([lambda: open(marker, "w").write("deferred")])
        """

    def check(self, done, marker):
        self.assertSucceeded(done)
        self.assertNotIn("Traceback", done.stderr)
        self.assertEqual(done.stdout.splitlines(),
                         ["[('Row', 'orders', 345), ('Row', 'users', 120)]",
                          "raised ZeroDivisionError"])
        wait_until(lambda: os.path.exists(marker) and read_file(marker) == "deferred",
                   LONG_TIMEOUT, "the deferred task to run")

    def test_the_environment_names_the_driver_and_the_cluster(self):
        marker = self.path("marker")
        done = self.run_script(self.SCRIPT, argv_extra=[marker],
                               env={"CONCURRENCY_DRIVER": "dask",
                                    "CONCURRENCY_DASK_ADDRESS": CLUSTER[0].address})
        self.check(done, marker)
        concurrency.DaskDriver(address=CLUSTER[0].address).release_workers()

    def test_the_config_file_names_the_driver_and_the_cluster(self):
        marker = self.path("marker")
        argv, env, cwd = self.script(self.SCRIPT)
        write_file(os.path.join(cwd, "concurrency.ini"),
                   "[concurrency]\ndefault = dask\ndask_address = %s\n" % CLUSTER[0].address)
        done = subprocess.run(argv + [marker], env=env, cwd=cwd, capture_output=True,
                              text=True, timeout=LONG_TIMEOUT)
        self.assert_marked_processes_gone()
        self.check(done, marker)
        concurrency.DaskDriver(address=CLUSTER[0].address).release_workers()

    def test_with_no_cluster_named_a_local_one_runs_it_and_goes_at_exit(self):
        # No __main__ guard, as scripts are written: a local cluster that
        # started worker processes with multiprocessing would run it again.
        # Its deferred task runs detached, as on process: the local cluster
        # ends with the script.
        marker = self.path("marker")
        done = self.run_script(self.SCRIPT, argv_extra=[marker],
                               env={"CONCURRENCY_DRIVER": "dask"})
        self.check(done, marker)
        self.assertNotIn("Traceback", done.stderr)


    def test_the_local_cluster_keeps_quiet_in_the_caller_s_logs_unless_asked(self):
        source = """\
            import logging, sys
            logging.basicConfig(level=logging.INFO)
            if sys.argv[1] == "asked":
                import distributed
                logging.getLogger("distributed").setLevel(logging.DEBUG)
            import concurrency
            logging.getLogger("shop").info("mine")
            print(concurrency.driver("dask").run([lambda: 1]))
            """
        quiet = self.run_script(source, argv_extra=["quiet"])
        self.assertSucceeded(quiet)
        self.assertEqual(quiet.stdout, "[1]\n")
        self.assertIn("INFO:shop:mine", quiet.stderr)  # the caller's INFO still shows
        self.assertNotIn("distributed.", quiet.stderr)
        asked = self.run_script(source, argv_extra=["asked"])
        self.assertSucceeded(asked)
        self.assertIn("distributed.", asked.stderr)


@NEEDS_DISTRIBUTED
class DaskFidelityTest(ScriptTestCase):
    """The process driver's fidelity cases, through the dask driver."""

    def check_cases(self, layout, env):
        if layout == "main":
            source = FIDELITY_CASES + "\ncases = sys.modules[__name__]\n" + FIDELITY_CHECK
            argv, env, cwd = self.script(source, env=env)
        else:
            argv, env, cwd = self.script("import cases\n" + FIDELITY_CHECK, env=env)
            write_file(os.path.join(cwd, "cases.py"), FIDELITY_CASES)
        done = subprocess.run(argv + ["dask"], env=env, cwd=cwd, capture_output=True,
                              text=True, timeout=LONG_TIMEOUT)
        self.assert_marked_processes_gone()
        self.assertSucceeded(done)
        return json.loads(done.stdout.splitlines()[-1])

    def test_cases_from_a_main_script_on_a_cluster(self):
        report = self.check_cases("main", {"CONCURRENCY_DASK_ADDRESS": CLUSTER[0].address})
        concurrency.DaskDriver(address=CLUSTER[0].address).release_workers()
        self.assertGreaterEqual(report["cases"], 48)
        self.assertEqual(report["broken"], [])
        # All but one: a task sees its Dask worker's argv and recursion
        # limit, not the caller's (as README says).
        self.assertEqual(sorted({name for name, _how, _got, _expected in report["mismatches"]}),
                         ["context_argv_and_recursion_limit"])
        for _name, _how, got, _expected in report["mismatches"]:
            self.assertIn("--scheduler-file", str(got))

    def test_cases_from_an_importable_module_on_the_local_cluster(self):
        report = self.check_cases("module", {})
        self.assertGreaterEqual(report["cases"], 48)
        self.assertEqual(report["broken"], [])
        self.assertEqual(report["mismatches"], [])


class DaskMissingTest(ScriptTestCase):
    def test_without_distributed_the_error_says_what_to_install(self):
        done = self.run_script("""\
            import sys
            sys.modules["distributed"] = None  # as where it is not installed
            import concurrency
            print(concurrency.driver("process").run([lambda: "process works"]))
            try:
                concurrency.driver("dask")
            except concurrency.ConcurrencyError as exc:
                print(exc)
            """)
        self.assertSucceeded(done)
        lines = done.stdout.splitlines()
        self.assertEqual(lines[0], "['process works']")
        self.assertIn("the dask driver needs Dask's distributed package", lines[1])
        self.assertIn("pip install 'concurrency[dask]'", lines[1])


if __name__ == "__main__":
    unittest.main()
