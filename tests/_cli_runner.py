"""Run ``python -m funcam ARGS`` in a child process, without paying for a fresh interpreter each time.

A fresh ``python -m funcam`` spends about 3 s importing torch (and 2 s more importing timm) before it looks at
its arguments; the command line's tests run dozens of commands that fail within milliseconds after that.
So one server process (started once per test session) imports what every command imports first, and forks
a child per command. The child is a separate process, as a user's command is: it gets its own working folder,
environment, stdin (``/dev/null``), stdout and stderr (files), runs ``funcam/__main__.py`` through ``runpy``
exactly as ``python -m funcam`` does, and exits with the code the interpreter would give: the ``sys.exit``
code, or 1 with the traceback printed for an uncaught exception. Nothing a command does can reach the
server or the next command. The server never runs a torch operation, so no thread pool exists when it forks.

``FSIZE`` in a request sets ``RLIMIT_FSIZE`` in the child (writes past it fail with EFBIG, as on a full disk).

Protocol: one JSON request per line on the server's stdin ``{"args", "cwd", "env", "stdout", "stderr",
"fsize", "timeout"}``, one JSON answer per line on its stdout ``{"rc", "timed_out"}``.
"""
from __future__ import annotations

import json
import os
import sys


def _child(req: dict) -> int:
    import resource
    import runpy
    import signal
    import traceback

    os.chdir(req["cwd"])
    os.environ.update(req["env"])
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        new = os.open(path, flags, 0o644)
        os.dup2(new, fd)
        os.close(new)
    if req.get("fsize") is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
    sys.argv = [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "funcam", "__main__.py"),
                *req["args"]]
    code = 0
    try:
        runpy.run_module("funcam", run_name="__main__", alter_sys=True)
    except SystemExit as e:  # as the interpreter turns it into an exit status
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - an uncaught exception: traceback and status 1, as python does
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def serve() -> None:
    import timm  # noqa: F401 - timm (and huggingface_hub: the server's HF_HOME holds for every child)
    import tqdm  # noqa: F401

    import funcam._src.cli.dataset  # noqa: F401
    import funcam._src.cli.explain  # noqa: F401
    import funcam.cli  # noqa: F401 - torch and the command line, imported once for every child

    answers = sys.stdout
    for line in sys.stdin:
        req = json.loads(line)
        answers.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(req)
            finally:
                os._exit(code)
        answers.write(json.dumps(_wait(pid, req.get("timeout", 300))) + "\n")
        answers.flush()


def _wait(pid: int, timeout: float) -> dict:
    """The child's exit code; a child still running after ``timeout`` s (a hang) is killed and reported."""
    import signal
    import time

    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return {"rc": os.waitstatus_to_exitcode(status), "timed_out": False}
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return {"rc": -signal.SIGKILL, "timed_out": True}
        time.sleep(0.005)


class Completed:
    """What a command did: ``returncode``, ``stdout``, ``stderr`` (text), like ``subprocess.CompletedProcess``."""

    def __init__(self, args, returncode: int, stdout: str, stderr: str):
        self.args, self.returncode, self.stdout, self.stderr = args, returncode, stdout, stderr

    def __repr__(self) -> str:
        return (f"Completed({self.args!r}, rc={self.returncode}, stdout={self.stdout[-500:]!r}, "
                f"stderr={self.stderr[-2000:]!r})")


class Runner:
    """The client: ``runner("explain", "x.png", cwd=tmp) -> Completed``. One server for the whole session."""

    def __init__(self, env: dict, *, hf_home: str | None = None):
        import subprocess
        import tempfile
        import threading

        self._hf_home = hf_home  # removed with the server
        self._dir = tempfile.mkdtemp(prefix="funcam-cli-")
        self._lock = threading.Lock()
        self._proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, env=env, text=True, cwd=self._dir)

    def __call__(self, *args, cwd, env: dict | None = None, fsize: int | None = None,
                 timeout: float = 300) -> Completed:
        """Run ``funcam ARGS`` in ``cwd`` with ``env`` added; a command that runs past ``timeout`` s is killed
        (``returncode`` -9, ``timed_out`` True)."""
        args = [os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in args]
        out, err = os.path.join(self._dir, "stdout"), os.path.join(self._dir, "stderr")
        req = {"args": args, "cwd": str(cwd), "env": env or {}, "stdout": out, "stderr": err, "fsize": fsize,
               "timeout": timeout}
        with self._lock:
            self._proc.stdin.write(json.dumps(req) + "\n")
            self._proc.stdin.flush()
            answer = self._proc.stdout.readline()
            if not answer:
                raise RuntimeError("the funcam test server died")
            with open(out, encoding="utf-8", errors="surrogateescape") as f_out, \
                    open(err, encoding="utf-8", errors="surrogateescape") as f_err:
                done = json.loads(answer)
                result = Completed(args, done["rc"], f_out.read(), f_err.read())
                result.timed_out = done["timed_out"]
                return result

    def close(self) -> None:
        import shutil

        if self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.wait(timeout=60)
        self._proc.stdout.close()
        shutil.rmtree(self._dir, ignore_errors=True)
        if self._hf_home:
            shutil.rmtree(self._hf_home, ignore_errors=True)


_RUNNER: Runner | None = None


def runner() -> Runner:
    """The session's server (started on first use, stopped when the test process exits)."""
    global _RUNNER
    if _RUNNER is None:
        import atexit

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        import tempfile

        # an empty Hugging Face cache: "--pretrained" tests see what a machine that never downloaded sees
        hf_home = tempfile.mkdtemp(prefix="funcam-hf-")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="error", PYTHONDONTWRITEBYTECODE="1",
                   HF_HOME=hf_home, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        _RUNNER = Runner(env, hf_home=hf_home)
        atexit.register(_RUNNER.close)
    return _RUNNER


if __name__ == "__main__":
    serve()
