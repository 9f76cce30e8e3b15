"""A pre-imported phase starter for pipelines: one process imports torch, transformers, TRL, accelerate and peft
once (~7 s of CPU each time otherwise), then forks one child per phase, which runs ``python -m rlhf_exp <phase
args>`` as a fresh command would. Each phase keeps its own process (its run folder, its exit status, its
signals, its failure isolation: a phase that crashes takes nothing else down); only the import is shared.

The pipeline talks to this server through a pipe of JSON lines: it sends ``{"argv": [...], "env": {...}}``,
the server answers ``{"pid": N}`` once the child runs and ``{"exit": status}`` when it has ended (the wait status
as ``os.waitstatus_to_exitcode`` gives it). :class:`PhaseProcess` wraps that as the subset of ``subprocess.Popen``
the pipeline uses (pid, poll, wait, send_signal). The child starts its own session and gets SIGTERM if the
server dies; the server gets SIGTERM if the pipeline dies and passes it to the running phase, which saves a
checkpoint and stops (as with separate processes).

Forking is only safe while the server has one thread: after its imports it checks, and when another thread
exists (a library started one) it says so and the pipeline starts phases as separate processes instead. Known
exception: jemalloc's background thread (pyarrow's), which jemalloc itself stops and restarts around fork().
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time

PRELOAD = ("torch", "transformers", "trl", "accelerate", "peft")
READY = "ready"


def stop_with_parent() -> None:
    """In a process about to run (a phase, or this server): the kernel sends it SIGTERM when its parent dies (Linux
    PR_SET_PDEATHSIG), so a pipeline killed with SIGKILL leaves nothing running on; a phase checkpoints."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except OSError:
        pass


# native threads known to survive a fork: jemalloc (pyarrow's, imported through datasets) stops and restarts its
# background purging thread around fork() with its own pthread_atfork handlers
FORK_SAFE_THREADS = ("jemalloc_bg_thd",)


def _other_threads() -> list[str]:
    """Threads besides this one that a fork could leave in a bad state: Python threads, and native ones not known
    to handle fork."""
    names = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    try:
        tasks = [t for t in os.listdir("/proc/self/task") if int(t) != threading.get_native_id()]
        for task in tasks:
            with open(f"/proc/self/task/{task}/comm") as f:
                name = f.read().strip()
            if name not in FORK_SAFE_THREADS and name not in names:
                names.append(name)
    except OSError:
        pass
    return names


def _child(request: dict) -> None:
    """In the forked child: become ``python -m rlhf_exp <argv>`` and never return."""
    code = 1
    try:
        os.setsid()
        stop_with_parent()
        for sig in (signal.SIGTERM, signal.SIGUSR2, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a fresh interpreter
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request.get("cwd") or os.getcwd())
        import runpy

        import rlhf_exp

        main = os.path.join(os.path.dirname(rlhf_exp.__file__), "__main__.py")
        sys.argv = [main, *request["argv"]]
        try:
            runpy.run_module("rlhf_exp", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # as an uncaught exception ends a process: the traceback, status 1
            import traceback

            traceback.print_exc()
            code = 1
        import atexit

        atexit._run_exitfuncs()  # what the interpreter runs at exit (W&B, logging, ...)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def serve(control_in: int, control_out: int, warm: str = "[]") -> None:
    """The server: import, build the embedded task's examples the phases will use (``warm``: their
    ``data.loading.synthetic_key``s as JSON; each forked phase finds them built), report readiness (or why not),
    then one phase at a time until the pipe closes. It sits
    in a session of its own and ignores SIGINT (a terminal's Ctrl-C reaches the pipeline, which passes a stop on to
    the running phase); it dies with the pipeline (PR_SET_PDEATHSIG), passing SIGTERM on first."""
    stop_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    started = time.process_time()
    from rlhf_exp.runners import RUNNERS, import_libraries

    for name in PRELOAD:
        __import__(name)
    for phase in RUNNERS:  # what each phase's runner imports first (its trainer's module too)
        import_libraries(phase)
    from rlhf_exp.data.loading import warm_synthetic

    warm_synthetic(json.loads(warm))

    out = os.fdopen(control_out, "w", buffering=1)
    threads = _other_threads()
    if threads:
        out.write(json.dumps({"refused": f"threads {', '.join(threads)} run after importing {', '.join(PRELOAD)}: "
                                          "forking is not safe"}) + "\n")
        return
    out.write(json.dumps({READY: round(time.process_time() - started, 2)}) + "\n")
    running: list[int] = []

    def stop(signum, frame) -> None:  # the pipeline died (PR_SET_PDEATHSIG) or was told to stop
        for pid in running:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for pid in list(running):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    with os.fdopen(control_in, "r") as requests:
        for line in requests:
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                _child(request)
            running.append(pid)
            out.write(json.dumps({"pid": pid}) + "\n")
            while True:
                try:
                    _, status = os.waitpid(pid, 0)
                    break
                except InterruptedError:
                    continue
            running.remove(pid)
            out.write(json.dumps({"exit": os.waitstatus_to_exitcode(status)}) + "\n")


class PhaseServer:
    """The pipeline's side: starts the server process (its imports run while nothing else waits on it) and starts
    phases through it. ``available`` is False when the server refused (threads) or died; the pipeline then starts
    phases as separate processes."""

    def __init__(self, env: dict | None = None, warm: list | None = None):
        to_server_r, self._to_server = os.pipe()
        self._from_server, from_server_w = os.pipe()
        # one OpenMP/MKL thread while importing: a library that runs a parallel region at import would otherwise
        # start worker threads, and a fork leaves them behind. Each phase sets its own count (rlhf_exp.launch.threads
        # calls torch.set_num_threads), with its own environment.
        server_env = {**(env if env is not None else os.environ), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", "import sys; from rlhf_exp.launch.preload import serve; "
                                      f"serve({to_server_r}, {from_server_w}, sys.argv[1])", json.dumps(warm or [])],
                                     pass_fds=(to_server_r, from_server_w), env=server_env, start_new_session=True)
        os.close(to_server_r)
        os.close(from_server_w)
        self._reader = os.fdopen(self._from_server, "r")
        self._writer = os.fdopen(self._to_server, "w", buffering=1)
        self.available: bool | None = None  # known at the first start
        self.why_not: str | None = None

    def _read(self) -> dict | None:
        line = self._reader.readline()
        return json.loads(line) if line else None

    def ready(self) -> bool:
        if self.available is None:
            answer = self._read()
            self.available = bool(answer) and READY in answer
            if not self.available:
                self.why_not = (answer or {}).get("refused", "the server ended before it was ready")
                self.close()
        return self.available

    def start(self, argv: list[str], env: dict | None = None) -> PhaseProcess:
        self._writer.write(json.dumps({"argv": argv, "env": dict(env if env is not None else os.environ),
                                       "cwd": os.getcwd()}) + "\n")
        answer = self._read()
        if not answer or "pid" not in answer:
            raise RuntimeError("the phase server ended without starting the phase")
        return PhaseProcess(self, answer["pid"])

    def close(self) -> None:
        for stream in (self._writer, self._reader):
            try:
                stream.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class PhaseProcess:
    """A phase started by the server: what the pipeline uses of ``subprocess.Popen``."""

    def __init__(self, server: PhaseServer, pid: int):
        self.server, self.pid = server, pid
        self.returncode: int | None = None
        self._reading = False  # wait() is blocked reading the exit line (a signal handler may call poll meanwhile)

    def poll(self) -> int | None:
        if self.returncode is None and not self._reading and select.select([self.server._reader], [], [], 0)[0]:
            self._collect()
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            self._collect()
        return self.returncode

    def _collect(self) -> None:
        self._reading = True
        try:
            answer = self.server._read()
        finally:
            self._reading = False
        if self.returncode is None:
            self.returncode = answer["exit"] if answer and "exit" in answer else 1

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass
