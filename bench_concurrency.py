"""Benchmark concurrency's drivers side by side with the process-pool peers.

    python bench_concurrency.py [--repeat N] [--systems a,b] [--scenarios x,y]

Every measurement runs in a fresh interpreter, one system at a time, the
systems taking turns round after round, and the table shows medians over
``--repeat`` rounds, then each of our numbers as a ratio
to the best peer measured in the same run.  Peers that are not importable are
skipped; install them with ``pip install .[bench]``.

Scenarios:
  first2    a fresh interpreter imports the library and runs 2 trivial lambdas
            (whole-process wall time, ms)
  first2-B  the same with PYTHONDONTWRITEBYTECODE=1, as many container images
            set it, and the library a copy vendored into the project, which
            nothing compiled before: compiled at every start (ms; the peers,
            installed by pip, come with their bytecode)
  warm2     a later 2-task run in the same process (ms)
  many1000  1000 tiny lambdas in one run (ms)
  many10k   10,000 of them in one run (ms; and the parent's peak RSS, MB)
  many100k  100,000 of them in one run (ms; and the parent's peak RSS, MB)
  map10k    map(lambda x: x * 2, range(10_000)) after a warm-up map (ms; the
            peers: ProcessPoolExecutor.map and loky's map with chunksize =
            n / (4 x cores), joblib's auto batching, pathos's and mpire's map)
  map100k   the same over range(100_000) (ms; and the parent's peak RSS, MB)
  capture64mb  2 tasks capturing the same 64 MB bytes object, returning its
            length (ms; and the parent's peak RSS, MB)
  cpu       2 x cores tasks of ~0.2 s pure-Python arithmetic: efficiency =
            sequential time / cores / wall (%; higher is better).  Each child
            alternates the system's runs with a bare fork per task (what the
            hardware allows; column "os.fork"), and the ratio is the system's
            efficiency over the bare fork's of the same child
  big64mb   2 tasks each returning 64 MB of bytes (ms)
  rss       peak RSS of the parent after big64mb, and RSS of an idle worker (MB)

Where Dask's distributed is installed, the dask driver is measured against
plain Dask -- client.submit() of the same lambdas, then client.gather() -- on
the same cluster: a scheduler and two workers (two threads each) on
127.0.0.1, started once for the whole benchmark, on warm2, many1000 and:
  capture   8 tasks capturing the same 16 MB bytes object, returning its
            length (ms); plain Dask as its users share an object: scattered
            once, then client.map() over its future
  big       2 tasks each returning 16 MB of bytes (ms)
"""

# Only what every child needs: first2 times a whole interpreter, and what the
# benchmark imports is counted for every system alike.
import os
import sys
import time

OURS = ["concurrency-process", "concurrency-fork"]
PEERS = ["ProcessPoolExecutor+dill", "loky", "joblib", "pathos", "mpire"]
DASK = ["concurrency-dask", "dask"]  # ours and plain Dask, on one cluster
DASK_SCENARIOS = ["warm2", "many1000", "capture", "big"]
DASK_ONLY = ["capture", "big"]
SHORT = {"concurrency-process": "process", "concurrency-fork": "fork",
         "ProcessPoolExecutor+dill": "PPE+dill", "concurrency-dask": "on dask",
         "dask": "dask"}
SCENARIOS = ["first2", "first2-B", "warm2", "many1000", "many10k", "many100k",
             "map10k", "map100k", "capture64mb", "cpu", "big64mb", "rss", "capture", "big"]
MANY = {"many1000": 1000, "many10k": 10000, "many100k": 100000}
MAPS = {"map10k": 10000, "map100k": 100000}
CORES = os.cpu_count() or 1
CPU_SECONDS = 0.2
CHILD_TIMEOUT = 180  # seconds for one measurement; every one takes far less


# -- The work -----------------------------------------------------------------

def spin(iterations):
    total = 0
    for i in range(iterations):
        total += i * i % 7
    return total


def _dill_call(payload):
    import dill
    return dill.loads(payload)()


def _call(fn):
    return fn()


def make_runner(system):
    """Return run(list of callables) -> list of results, for ``system``."""
    if system == "concurrency-process":
        import concurrency
        return concurrency.driver("process").run
    if system == "concurrency-fork":
        import concurrency
        return concurrency.driver("fork").run
    if system == "ProcessPoolExecutor+dill":
        import dill
        from concurrent.futures import ProcessPoolExecutor
        executor = ProcessPoolExecutor(max_workers=CORES)
        return lambda fns: [f.result() for f in [
            executor.submit(_dill_call, dill.dumps(fn, recurse=True)) for fn in fns]]
    if system == "loky":
        import loky
        executor = loky.get_reusable_executor(max_workers=CORES)
        return lambda fns: [f.result() for f in [executor.submit(fn) for fn in fns]]
    if system == "joblib":
        import joblib
        parallel = joblib.Parallel(n_jobs=CORES)
        return lambda fns: parallel(joblib.delayed(fn)() for fn in fns)
    if system == "pathos":
        from pathos.multiprocessing import ProcessPool
        pool = ProcessPool(nodes=CORES)
        return lambda fns: pool.map(_call, fns)
    if system == "mpire":
        from mpire import WorkerPool
        pool = WorkerPool(n_jobs=CORES, use_dill=True, keep_alive=True)
        return lambda fns: pool.map(_call, [(fn,) for fn in fns], progress_bar=False)
    if system == "concurrency-dask":
        import concurrency
        return concurrency.DaskDriver(address=os.environ["BENCH_DASK_ADDRESS"]).run
    if system == "dask":
        import distributed
        client = distributed.Client(os.environ["BENCH_DASK_ADDRESS"])
        return lambda fns: client.gather([client.submit(fn, pure=False) for fn in fns])
    if system == "os.fork":
        import concurrency  # noqa: F401 -- a process of the same size as fork's
        return _fork_run
    raise SystemExit("unknown system %r" % system)


def _double(x):
    return x * 2


def make_mapper(system, count):
    """Return map(fn, items) -> list of results, for ``system``, tuned as
    its users tune it for ``count`` items."""
    chunksize = max(1, count // (4 * CORES))
    if system == "concurrency-process":
        import concurrency
        return concurrency.driver("process").map
    if system == "concurrency-fork":
        import concurrency
        return concurrency.driver("fork").map
    if system == "ProcessPoolExecutor+dill":
        from concurrent.futures import ProcessPoolExecutor
        executor = ProcessPoolExecutor(max_workers=CORES)
        # It pickles fn by name: a module-level function, not the lambda.
        return lambda fn, items: list(executor.map(_double, items, chunksize=chunksize))
    if system == "loky":
        import loky
        executor = loky.get_reusable_executor(max_workers=CORES)
        return lambda fn, items: list(executor.map(fn, items, chunksize=chunksize))
    if system == "joblib":
        import joblib
        parallel = joblib.Parallel(n_jobs=CORES)
        return lambda fn, items: parallel(joblib.delayed(fn)(x) for x in items)
    if system == "pathos":
        from pathos.multiprocessing import ProcessPool
        pool = ProcessPool(nodes=CORES)
        return pool.map
    if system == "mpire":
        from mpire import WorkerPool
        pool = WorkerPool(n_jobs=CORES, use_dill=True, keep_alive=True)
        return lambda fn, items: pool.map(fn, items, progress_bar=False)
    raise SystemExit("no map for %r" % system)


def _fork_run(fns):
    """A bare fork and pipe per task, a byte back: what the hardware allows."""
    children = []
    for fn in fns:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            fn()
            os.write(write_end, b"x")
            os._exit(0)
        os.close(write_end)
        children.append((pid, read_end))
    for pid, read_end in children:
        os.read(read_end, 1)
        os.close(read_end)
        os.waitpid(pid, 0)
    return [None] * len(fns)


def importable(system):
    import subprocess
    module = {"ProcessPoolExecutor+dill": "dill", "loky": "loky", "joblib": "joblib",
              "pathos": "pathos", "mpire": "mpire", "concurrency-dask": "distributed",
              "dask": "distributed"}.get(system)
    if module is None:
        return True
    done = subprocess.run([sys.executable, "-c", "import " + module],
                          capture_output=True)
    return done.returncode == 0


# -- One measurement, in a fresh interpreter ----------------------------------

def child(system, scenario, iterations):
    if os.environ.get("BENCH_VENDORED"):
        sys.path.insert(0, os.environ["BENCH_VENDORED"])
    if scenario in ("first2", "first2-B"):
        run = make_runner(system)
        run([lambda: 1, lambda: 2])
        return {}
    import statistics
    if scenario in MAPS:
        count = MAPS[scenario]
        mapper = make_mapper(system, count)
        double = lambda x: x * 2  # noqa: E731 -- what users write
        assert mapper(double, range(100)) == list(range(0, 200, 2))  # warm up
        expected = list(range(0, 2 * count, 2))
        times = []
        for _ in range(3):
            started = time.perf_counter()
            results = mapper(double, range(count))
            times.append(time.perf_counter() - started)
            assert results == expected
            del results
        return {"value": statistics.median(times) * 1000, "rss": _peak_rss()}
    run = make_runner(system)
    run([lambda: 0, lambda: 0])  # warm up: workers started
    if scenario == "warm2":
        times = []
        for _ in range(30):
            started = time.perf_counter()
            results = run([lambda: 1, lambda: 2])
            assert system == "os.fork" or results == [1, 2]  # bare forks return nothing
            times.append(time.perf_counter() - started)
        return {"value": statistics.median(times) * 1000}
    if scenario in MANY:
        count = MANY[scenario]
        times = []
        for _ in range(3 if count <= 10000 else 1):
            tasks = [lambda i=i: i for i in range(count)]
            started = time.perf_counter()
            assert run(tasks) == list(range(count))
            times.append(time.perf_counter() - started)
            del tasks
        return {"value": statistics.median(times) * 1000, "rss": _peak_rss()}
    if scenario in DASK_ONLY:
        return _dask_scenario(system, scenario, run)
    if scenario == "capture64mb":
        data = b"x" * (64 << 20)
        times = []
        for _ in range(3):
            started = time.perf_counter()
            assert run([lambda: len(data), lambda: len(data)]) == [64 << 20] * 2
            times.append(time.perf_counter() - started)
        return {"value": statistics.median(times) * 1000, "rss": _peak_rss()}
    if scenario == "cpu":
        tasks = [lambda: spin(iterations) for _ in range(2 * CORES)]
        run(tasks[:CORES])  # warm up with the same work
        # This machine's speed drifts from second to second: each run is
        # paired with a bare fork run and a sequential task timed right after.
        ours, bare = [], []
        for _ in range(3):
            walls = []
            for runner in (run, _fork_run):
                started = time.perf_counter()
                runner(tasks)
                walls.append(time.perf_counter() - started)
            started = time.perf_counter()
            spin(iterations)
            one = time.perf_counter() - started
            ours.append(100.0 * one * len(tasks) / CORES / walls[0])
            bare.append(100.0 * one * len(tasks) / CORES / walls[1])
        return {"value": statistics.median(ours), "os.fork": statistics.median(bare),
                "ratio": statistics.median(o / b for o, b in zip(ours, bare))}
    if scenario in ("big64mb", "rss"):
        started = time.perf_counter()
        blobs = run([lambda: b"x" * (64 << 20), lambda: b"y" * (64 << 20)])
        wall = time.perf_counter() - started
        assert [len(b) for b in blobs] == [64 << 20] * 2
        del blobs
        if scenario == "big64mb":
            return {"value": wall * 1000}
        run([lambda: 0, lambda: 0])
        return {"value": _peak_rss(), "worker": _idle_worker_rss()}
    raise SystemExit("unknown scenario %r" % scenario)


def _dask_scenario(system, scenario, run):
    """capture and big, timed as the median of 5 after a warm-up."""
    import statistics
    size = 16 << 20
    if scenario == "capture":
        data = b"x" * size
        if system == "dask":
            import distributed
            client = distributed.Client(os.environ["BENCH_DASK_ADDRESS"])

            def once():
                shared = client.scatter(data)
                return client.gather(client.map(len, [shared] * 8, pure=False))
        else:
            def once():
                return run([lambda: len(data)] * 8)
        expected = [size] * 8
    else:
        def once():
            return [len(blob) for blob in run([lambda: b"x" * size, lambda: b"y" * size])]
        expected = [size] * 2
    assert once() == expected  # warm up
    times = []
    for _ in range(5):
        started = time.perf_counter()
        assert once() == expected
        times.append(time.perf_counter() - started)
    return {"value": statistics.median(times) * 1000}


def _peak_rss():
    """This process's peak RSS so far, MB.  From VmHWM where there is one:
    ru_maxrss keeps, across exec, the peak of the process that started us
    (a benchmark parent holding a Dask client put every system at its 60 MB)."""
    try:
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _idle_worker_rss():
    """Median RSS in MB of this process's children (the idle workers)."""
    import statistics
    sizes = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as file:
                stat = file.read()
            if int(stat[stat.rindex(")") + 2:].split()[1]) != os.getpid():
                continue
            with open("/proc/%s/status" % entry) as file:
                for line in file:
                    if line.startswith("VmRSS:"):
                        sizes.append(int(line.split()[1]) / 1024)
        except (OSError, ValueError):
            continue
    return statistics.median(sizes) if sizes else None


# -- The table ------------------------------------------------------------------

def measure(system, scenario, iterations):
    import json
    import subprocess
    argv = [sys.executable, os.path.abspath(__file__), "--child", system, scenario,
            str(iterations)]
    # As users run it: with bytecode caching on (pip compiled the peers).
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    vendored = None
    if scenario == "first2-B":
        import shutil
        import tempfile
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        vendored = env["BENCH_VENDORED"] = tempfile.mkdtemp(prefix="bench-vendored-")
        here = os.path.dirname(os.path.abspath(__file__))
        for name in ("concurrency.py", "worker.py"):
            shutil.copy(os.path.join(here, name), vendored)
    import tempfile
    # Output to files, not pipes: a peer's workers that outlive the child
    # (killed below) would hold a pipe open.  A session of its own: a
    # peer's pool that hangs goes with it.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        process = subprocess.Popen(argv, stdout=out, stderr=err, env=env,
                                   start_new_session=True)
        try:
            process.wait(timeout=CHILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            err.write("\ntimed out after %d s" % CHILD_TIMEOUT)
        finally:
            wall = (time.perf_counter() - started) * 1000
            try:
                os.killpg(process.pid, 9)
            except OSError:
                pass
            process.wait()
            if vendored is not None:
                shutil.rmtree(vendored, ignore_errors=True)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if process.returncode != 0 or not stdout.strip():
        if system in PEERS:  # the peer's own failure: shown as "-", said here
            sys.stderr.write("  %s %s failed: %s\n" % (system, scenario, stderr.strip()[-300:]))
            return None
        raise RuntimeError("%s %s failed:\n%s" % (system, scenario, stderr[-2000:]))
    result = json.loads(stdout.strip().splitlines()[-1])
    if scenario in ("first2", "first2-B"):
        result["value"] = wall
    return result


def calibrate():
    """Iterations of spin() that take CPU_SECONDS here."""
    iterations = 100000
    while True:
        started = time.perf_counter()
        spin(iterations)
        took = time.perf_counter() - started
        if took > 0.05:
            return int(iterations * CPU_SECONDS / took)
        iterations *= 2


def start_dask_cluster():
    """A scheduler and two workers on 127.0.0.1; returns (address, stop)."""
    import json
    import signal
    import subprocess
    import tempfile
    folder = tempfile.mkdtemp(prefix="bench-dask-")
    scheduler_file = os.path.join(folder, "scheduler.json")
    log = open(os.path.join(folder, "cluster.log"), "ab")
    common = dict(stdout=log, stderr=log, cwd=folder, start_new_session=True)
    processes = [subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
         "--port", "0", "--no-dashboard", "--scheduler-file", scheduler_file], **common)]
    processes += [subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file",
         scheduler_file, "--host", "127.0.0.1", "--nthreads", "2", "--no-dashboard",
         "--local-directory", os.path.join(folder, name)], **common) for name in ("w1", "w2")]

    def stop():
        for process in processes:
            os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            process.wait(30)
        log.close()
        import shutil
        shutil.rmtree(folder, ignore_errors=True)

    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(scheduler_file):
            if time.monotonic() > deadline:
                raise RuntimeError("the Dask scheduler did not start")
            time.sleep(0.1)
        with open(scheduler_file) as file:
            address = json.load(file)["address"]
        import distributed
        with distributed.Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
    except BaseException:
        stop()
        raise
    return address, stop


def main(argv):
    repeat, systems, scenarios = 5, OURS + PEERS + DASK, SCENARIOS
    args = list(argv)
    while args:
        flag = args.pop(0)
        if flag == "--repeat":
            repeat = int(args.pop(0))
        elif flag == "--systems":
            systems = args.pop(0).split(",")
        elif flag == "--scenarios":
            scenarios = args.pop(0).split(",")
        else:
            raise SystemExit(__doc__)
    systems = [s for s in systems if importable(s) or print("skipped (not importable):", s)]
    stop_dask = None
    if any(s in DASK for s in systems) and any(s in DASK_SCENARIOS for s in scenarios):
        os.environ["BENCH_DASK_ADDRESS"], stop_dask = start_dask_cluster()
    try:
        run_all(repeat, systems, scenarios)
    finally:
        if stop_dask is not None:
            stop_dask()


def run_all(repeat, systems, scenarios):
    import statistics
    iterations = calibrate()
    print("machine: %d cores, Python %s, %s; medians of %d runs, each in a fresh "
          "interpreter" % (CORES, sys.version.split()[0], sys.platform, repeat))
    rows, bare, cpu_ratios = {}, [], {}
    for scenario in scenarios:
        measured = [s for s in systems if (s in DASK) == (scenario in DASK_ONLY)
                    or (s in DASK and scenario in DASK_SCENARIOS)]
        if scenario == "warm2" and "concurrency-fork" in measured:
            measured.append("os.fork")  # two bare forks, what fork's warm2 is held to
        for system in measured:
            measure(system, scenario, iterations)  # untimed: fills bytecode caches
        # Round after round, every system once a round: a noisy spell of
        # this shared machine hits them all alike.
        rounds = [{system: measure(system, scenario, iterations) for system in measured}
                  for _ in range(repeat)]
        for system in measured:
            results = [round_[system] for round_ in rounds]
            if None in results:  # a peer that failed or hung: no figure
                rows.setdefault(scenario, {})[system] = None
                continue
            value = statistics.median(r["value"] for r in results)
            rows.setdefault(scenario, {})[system] = value
            if scenario == "cpu":
                bare.extend(r["os.fork"] for r in results)
                rows["cpu"]["os.fork"] = statistics.median(bare)
                cpu_ratios[system] = statistics.median(r["ratio"] for r in results)
            if results[0].get("rss") is not None:
                rows.setdefault(scenario + " rss", {})[system] = statistics.median(
                    r["rss"] for r in results)
            if scenario == "rss":
                workers = [r["worker"] for r in results if r.get("worker") is not None]
                rows.setdefault("idle worker rss", {})[system] = (
                    statistics.median(workers) if workers else None)
            rss = rows.get(scenario + " rss", {}).get(system)
            sys.stderr.write("  %s %s: %.1f%s\n" % (scenario, system, value,
                                                   "" if rss is None else ", %.1f MB" % rss))
    print_table(rows, systems, cpu_ratios)


def print_table(rows, systems, cpu_ratios):
    units = {"first2": "ms", "first2-B": "ms", "warm2": "ms", "many1000": "ms",
             "many10k": "ms", "many100k": "ms", "capture64mb": "ms", "cpu": "% eff",
             "big64mb": "ms",
             "rss": "MB peak", "idle worker rss": "MB", "many10k rss": "MB peak",
             "many1000 rss": "MB peak", "many100k rss": "MB peak", "capture64mb rss": "MB peak",
             "map10k": "ms", "map100k": "ms", "map10k rss": "MB peak", "map100k rss": "MB peak",
             "capture": "ms", "big": "ms"}
    names = [s for s in systems] + ["os.fork"]
    shown = [n for n in names if any(n in row for row in rows.values())]
    width = 9
    print("%-24s" % "scenario" + "".join("%*s" % (width, SHORT.get(n, n)[:width - 1])
                                         for n in shown) + "   ours / best peer")
    for scenario, row in rows.items():
        cells = "".join("%*s" % (width, "-" if row.get(n) is None else "%.1f" % row[n])
                        for n in shown)
        higher_better = scenario == "cpu"
        peers = [row[n] for n in PEERS if row.get(n) is not None]
        ratios = []
        if scenario == "cpu":  # against the bare fork runs beside them
            ratios = ["%s %.2f" % (ours.split("-")[1], cpu_ratios[ours])
                      for ours in OURS if ours in cpu_ratios]
        elif peers:
            best = max(peers) if higher_better else min(peers)
            for ours in OURS:
                if row.get(ours) is not None and best:
                    ratios.append("%s %.2f" % (ours.split("-")[1], row[ours] / best))
        if scenario == "warm2" and row.get("concurrency-fork") and row.get("os.fork"):
            ratios.append("fork / bare forks %.2f" % (row["concurrency-fork"] / row["os.fork"]))
        if row.get("concurrency-dask") is not None and row.get("dask"):
            ratios.append("on dask / dask %.2f" % (row["concurrency-dask"] / row["dask"]))
        print("%-24s" % ("%s (%s)" % (scenario, units.get(scenario, ""))) + cells
              + "   " + ", ".join(ratios))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        outcome = child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        import json
        print(json.dumps(outcome or {}), flush=True)
        if sys.argv[3] not in ("first2", "first2-B"):
            # Measured: what the system does at exit is no part of it (mpire's
            # kept-alive pool can hang multiprocessing's exit handler).
            os._exit(0)
    else:
        main(sys.argv[1:])
