"""A sandboxed code-execution reward: run model-written Python against test cases, one child process each.

Model code is untrusted: an RL policy finds whatever raises its reward, and a buggy one writes infinite loops,
fork bombs and `rm -rf`. So the child gets several independent layers, any one of which may be missing or
bypassed (see docs/sandbox.md for what each guarantees and what it does not):

- kernel resource limits set before any model code runs (CPU, address space, processes, files, file size, core);
- a wall clock in the trainer that kills the child's whole session (`start_new_session=True`);
- an empty temporary working directory, deleted afterwards, and a scrubbed environment (no trainer secrets);
- `python -I -S -B` (isolated: no user site, no PYTHON* variables, no site-packages, no .pyc writes) and a
  prelude whose audit hook (`sys.addaudithook`; hooks cannot be removed) refuses process creation, signals,
  sockets, ctypes, limit changes, and file access outside the working directory and the standard library;
- where the kernel allows it without privileges, new user, network and PID namespaces (`unshare`): no network
  interface but a down loopback, and the trainer's processes are invisible, so they cannot be signalled.

Any blocked operation, crash, timeout or exceeded limit scores 0. The reward never raises because of model code.
"""

from __future__ import annotations

import ast
import functools
import itertools
import json
import logging
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from grpo.rewards.builtin import completion_text

logger = logging.getLogger(__name__)

SandboxReason = Literal[
    "ok",  # the code ran and every test passed
    "failed_tests",  # the code ran; some tests failed (the score is the fraction that passed)
    "syntax_error",  # the code does not compile
    "error",  # the code raised (or called sys.exit with a non-zero status) before the tests ran
    "timeout",  # the wall-clock limit ran out; the child's session was killed
    "cpu_time",  # the child used up RLIMIT_CPU
    "memory",  # a MemoryError under RLIMIT_AS
    "blocked",  # the audit hook refused an operation (the detail names it)
    "crashed",  # the child died without a (well-formed) result
    "sandbox_error",  # the sandbox itself could not start the child
]


@dataclass(frozen=True)
class SandboxLimits:
    """Limits for one sandboxed run. The defaults suit short test-case programs; raise them for heavier tasks."""

    wall_time_s: float = 10.0  # the trainer kills the child's session after this long
    cpu_time_s: int = 5  # RLIMIT_CPU: SIGXCPU (reported, exit) after this much CPU time, SIGKILL 1 s later
    memory_bytes: int = 1 << 30  # RLIMIT_AS: the address space, so MemoryError rather than the OOM killer
    max_processes: int = 64  # RLIMIT_NPROC, as processes/threads beyond what the uid runs now; not set for root
    max_open_files: int = 64  # RLIMIT_NOFILE
    max_file_bytes: int = 16 << 20  # RLIMIT_FSIZE: every file the child writes, its stdout and stderr included
    output_tail_chars: int = 2000  # how much of stdout/stderr SandboxResult keeps (the end)
    namespaces: bool = True  # use user/net/pid namespaces when the kernel allows them (see detect_isolation)
    audit_hook: bool = True  # False only to test the kernel layers on their own; never for training
    readable_paths: tuple[str, ...] = ()  # extra files/directories the child may read (the stdlib always)
    python: str = sys.executable  # the interpreter that runs the child

    def __post_init__(self) -> None:
        if not self.wall_time_s > 0:
            raise ValueError(f"SandboxLimits.wall_time_s must be positive, got {self.wall_time_s!r}")
        for name in ("cpu_time_s", "memory_bytes", "max_processes", "max_open_files", "max_file_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"SandboxLimits.{name} is a kernel resource limit: a positive integer, got {value!r}")


@dataclass(frozen=True)
class SandboxResult:
    """What happened to one sandboxed run. `score` is what the reward uses."""

    passed: bool  # ran cleanly and every test passed
    reason: SandboxReason
    detail: str = ""  # the exception name, the blocked event, ...
    tests_passed: int = 0
    tests_total: int = 0
    stdout: str = ""  # the last output_tail_chars characters
    stderr: str = ""
    exit_code: int | None = None  # of the direct child (unshare when namespaces are used)
    cpu_time_s: float = 0.0
    wall_time_s: float = 0.0
    pid: int | None = None  # the child's pid, which is also its session and process-group id

    @property
    def score(self) -> float:
        """The fraction of tests passed when the code ran cleanly, else 0."""
        if self.reason not in ("ok", "failed_tests"):
            return 0.0
        return self.tests_passed / self.tests_total if self.tests_total else 1.0


@dataclass(frozen=True)
class Isolation:
    """What the kernel lets an unprivileged sandbox add on this machine (probed once per interpreter)."""

    root: bool  # the trainer runs as root: RLIMIT_NPROC is ignored and file permissions protect nothing
    namespaces: tuple[str, ...]  # a subset of ("user", "net", "pid"); empty when unshare does not work
    prefix: tuple[str, ...]  # the unshare command line that creates them


# --- the child's prelude -----------------------------------------------------------------------------------------
# Runs inside `python -I -S -B -c`. It reads its configuration from stdin (then points fd 0 at /dev/null so model
# code cannot re-read the nonce), sets the resource limits, installs the audit hook, runs the solution and each
# test in try/except, and reports on a pipe (`result_fd`) as lines "<nonce> blocked <event>" (written the moment
# an operation is refused, so catching the PermissionError does not hide it) and "<nonce> final <error> <tests>".
# Everything used after model code starts is bound as a local or a default argument, so model code cannot change
# it by patching modules or builtins.
_PRELUDE = (Path(__file__).with_name("sandbox_child.py")).read_text(encoding="utf-8")

_PROBE = r'''
import errno, os, socket, sys
s = socket.socket()
isolated_net = s.connect_ex(("127.0.0.1", 9)) == errno.ENETUNREACH
sys.exit(0 if isolated_net and (os.getpid() == 1) == (sys.argv[1] == "pid") else 1)
'''

_NAMESPACE_CANDIDATES: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("user", "net", "pid"), ("--user", "--net", "--pid", "--fork", "--kill-child")),
    (("net", "pid"), ("--net", "--pid", "--fork", "--kill-child")),  # root where user namespaces are off
    (("user", "net"), ("--user", "--net")),
    (("net",), ("--net",)),
)

_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = frozenset(["python", "py", "python3", "py3"])
_MAX_REPORT_BYTES = 1 << 20
_ISOLATION_LOCK = threading.Lock()


# --- public API --------------------------------------------------------------------------------------------------


def detect_isolation(python: str = sys.executable) -> Isolation:
    """Which namespaces `unshare` can create here without privileges, checked by running a probe in them.

    Probed once per interpreter and cached: containers often forbid user namespaces (Docker's default seccomp
    profile does), so this has to be found out at run time, and the sandbox falls back to fewer layers.
    """
    with _ISOLATION_LOCK:  # the first reward call asks from every worker thread at once: probe only once
        return _detect_isolation(python)


def run_sandboxed(code: str, limits: SandboxLimits | None = None, tests: Sequence[str] = ()) -> SandboxResult:
    """Run untrusted Python `code`, then each test (e.g. an assert statement), in a fresh sandboxed process.

    Never raises because of what the code does: every outcome is a SandboxResult.
    """
    limits = limits or SandboxLimits()
    tests = [str(t) for t in tests]
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="grpo-sandbox-"))
    try:
        return _run_in(workdir, code, tests, limits)
    except OSError as e:
        logger.warning("sandbox: could not run the child: %s", e)
        return SandboxResult(False, "sandbox_error", detail=f"{type(e).__name__}: {e}", tests_total=len(tests))
    finally:
        _remove_tree(workdir)


def extract_code(text: str) -> str:
    """The program in a completion: the last ```python block, else the last fenced block, else the whole text."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    python = [body for lang, body in blocks if lang in _PYTHON_TAGS]
    if python:
        return python[-1]
    return blocks[-1][1] if blocks else text


def make_code_execution_reward(
    limits: SandboxLimits | None = None, max_workers: int | None = None, name: str = "code_execution_reward"
) -> Callable[..., list[float | None]]:
    """A reward function scoring each completion's code by the fraction of its row's `test_cases` that pass.

    `test_cases` is a dataset column: per row a list of test strings (each typically one assert), or one string
    (split into its assert statements when it is only asserts, else one all-or-nothing test), or None/empty for
    rows the reward does not apply to (they score None). Completions run in parallel, at most `max_workers`
    (default min(8, cpu count)) children at a time. `name` is the function's __name__, i.e. its metric name.
    """
    workers = max_workers if max_workers is not None else min(8, os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"make_code_execution_reward: max_workers must be at least 1, got {max_workers!r}")
    limits = limits or SandboxLimits()

    def reward(completions: list[Any], test_cases: list[Any] | None = None, **kwargs: Any) -> list[float | None]:
        if test_cases is None:
            raise ValueError(f"{name}: the dataset needs a `test_cases` column (per row a list of assert "
                             "statements, or a string of them) for the reward to score code against.")
        if len(test_cases) != len(completions):
            raise ValueError(f"{name}: got {len(test_cases)} test_cases for {len(completions)} completions.")
        pool_size = min(workers, max(1, len(completions)))
        with ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix=name) as pool:
            return list(pool.map(_score_completion, completions, test_cases, itertools.repeat(limits)))

    reward.__name__ = reward.__qualname__ = name
    return reward


code_execution_reward = make_code_execution_reward()


# --- scoring -----------------------------------------------------------------------------------------------------


def _score_completion(completion: Any, tests: Any, limits: SandboxLimits) -> float | None:
    """One completion's reward: None without tests, else the sandboxed fraction passed; 0.0 on any failure."""
    try:
        test_list = _as_test_list(tests)
        if test_list is None:
            return None
        return run_sandboxed(extract_code(completion_text(completion)), limits, tests=test_list).score
    except Exception as e:  # a reward must not take the trainer down because of one odd completion
        logger.warning("code_execution_reward: scoring a completion failed (%s: %s); it scores 0",
                       type(e).__name__, e)
        return 0.0


def _as_test_list(tests: Any) -> list[str] | None:
    if tests is None:
        return None
    if isinstance(tests, str):
        return _split_asserts(tests) if tests.strip() else None
    test_list = [str(t) for t in tests]
    return test_list or None


def _split_asserts(text: str) -> list[str]:
    """A string that is only assert statements is one test per assert; anything else is one test."""
    try:
        body = ast.parse(text).body
    except SyntaxError:
        return [text]
    if body and all(isinstance(node, ast.Assert) for node in body):
        return [ast.get_source_segment(text, node) or "" for node in body]
    return [text]


# --- running one child -------------------------------------------------------------------------------------------


def _run_in(workdir: str, code: str, tests: list[str], limits: SandboxLimits) -> SandboxResult:
    nonce = secrets.token_hex(16)
    isolation = detect_isolation(limits.python) if limits.namespaces else Isolation(os.geteuid() == 0, (), ())
    argv = [*isolation.prefix, limits.python, "-I", "-S", "-B", "-c", _PRELUDE]
    with tempfile.TemporaryFile() as config, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        read_fd, write_fd = os.pipe()
        try:
            config.write(json.dumps({
                "code": code, "tests": tests, "nonce": nonce, "result_fd": write_fd, "workdir": workdir,
                "audit_hook": limits.audit_hook, "rlimits": _rlimits(limits),
                "readable_paths": [os.path.abspath(p) for p in limits.readable_paths],
            }).encode())
            config.seek(0)
            started = time.monotonic()
            try:
                proc = subprocess.Popen(argv, stdin=config, stdout=out, stderr=err, cwd=workdir,
                                        env=_child_env(workdir), start_new_session=True, pass_fds=(write_fd,))
            finally:
                os.close(write_fd)
            try:
                timed_out, report = _supervise(proc.pid, read_fd, limits.wall_time_s)
            finally:
                _kill_session(proc.pid)  # not reaped yet, so its pid (the group id) cannot have been reused
                status, usage = _reap(proc)
        finally:
            os.close(read_fd)
        cpu = usage.ru_utime + usage.ru_stime if usage is not None else 0.0
        return _result(
            nonce, report, tests, limits, timed_out=timed_out, cpu=cpu, exit_code=status,
            wall_time_s=time.monotonic() - started, pid=proc.pid,
            stdout=_tail(out, limits.output_tail_chars), stderr=_tail(err, limits.output_tail_chars),
        )


def _rlimits(limits: SandboxLimits) -> dict[str, tuple[int, int]]:
    rlimits = {
        "RLIMIT_CPU": (limits.cpu_time_s, limits.cpu_time_s + 1),  # SIGXCPU, then SIGKILL for code stuck in C
        "RLIMIT_AS": (limits.memory_bytes, limits.memory_bytes),
        "RLIMIT_NOFILE": (limits.max_open_files, limits.max_open_files),
        "RLIMIT_FSIZE": (limits.max_file_bytes, limits.max_file_bytes),
        "RLIMIT_CORE": (0, 0),
    }
    if os.geteuid() != 0:  # root ignores RLIMIT_NPROC
        nproc = _uid_task_count() + limits.max_processes
        rlimits["RLIMIT_NPROC"] = (nproc, nproc)
    return rlimits


def _uid_task_count() -> int:
    """Processes and threads of this real uid, system-wide: what RLIMIT_NPROC counts, so the limit is set relative
    to it (an absolute limit would be below the count on a busy machine, and the child could not even start a
    thread)."""
    uid, count = str(os.getuid()), 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(os.path.join(entry.path, "status")) as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if fields.get("Uid", "").split()[:1] == [uid]:
            count += int(fields.get("Threads", "1"))
    return count


def _child_env(workdir: str) -> dict[str, str]:
    """A fresh environment: nothing of the trainer's (tokens, keys, proxies) reaches model code."""
    return {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


def _supervise(pid: int, read_fd: int, wall_time_s: float) -> tuple[bool, bytes]:
    """Collect the result pipe until the child exits or the wall clock runs out. Returns (timed_out, data).

    Waits with a pidfd (or WNOWAIT polling), never reaping, so the caller can still kill the process group.
    """
    deadline = time.monotonic() + wall_time_s
    pidfd = _pidfd_open(pid)
    poller = select.poll()
    poller.register(read_fd, select.POLLIN)
    if pidfd is not None:
        poller.register(pidfd, select.POLLIN)
    chunks: list[bytes] = []
    size = 0
    try:
        while True:
            remaining_ms = (deadline - time.monotonic()) * 1000
            if remaining_ms <= 0:
                return True, b"".join(chunks)
            events = poller.poll(remaining_ms if pidfd is not None else min(remaining_ms, 10))
            exited = pidfd is None and _has_exited(pid)
            for fd, _ in events:
                if fd == pidfd:
                    exited = True
                    continue
                chunk = os.read(read_fd, 65536)
                if not chunk:
                    poller.unregister(read_fd)
                elif size < _MAX_REPORT_BYTES:
                    chunks.append(chunk)
                    size += len(chunk)
            if exited:
                return False, b"".join(chunks) + _drain(read_fd, _MAX_REPORT_BYTES - size)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _pidfd_open(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # Linux < 5.3, or not Linux
        return None


def _has_exited(pid: int) -> bool:
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _drain(fd: int, limit: int) -> bytes:
    """What is left in the pipe, without blocking on a writer that escaped the sandbox."""
    os.set_blocking(fd, False)
    chunks = []
    while limit > 0:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk[:limit])
        limit -= len(chunk)
    return b"".join(chunks)


def _kill_session(pid: int) -> None:
    """SIGKILL the child's process group (it leads its own session); with a PID namespace this ends it all."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _reap(proc: subprocess.Popen) -> tuple[int | None, Any]:
    """Wait for the killed child; its rusage covers the grandchildren it waited for (the interpreter under
    unshare), which is how a SIGKILL at the hard RLIMIT_CPU is recognised."""
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except ChildProcessError:
        proc.wait()
        return proc.returncode, None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage


def _result(nonce: str, report: bytes, tests: list[str], limits: SandboxLimits, *, timed_out: bool, cpu: float,
            **common: Any) -> SandboxResult:
    """Classify a finished run, from the most to the least telling evidence."""
    blocked, cpu_limit, final = _parse_report(report, nonce, len(tests))
    total = len(tests)
    if blocked is not None:
        return SandboxResult(False, "blocked", detail=blocked, tests_total=total, cpu_time_s=cpu, **common)
    if timed_out:
        return SandboxResult(False, "timeout", detail=f"wall time > {limits.wall_time_s} s", tests_total=total,
                             cpu_time_s=cpu, **common)
    # The SIGXCPU handler reports the soft limit; code stuck in C meets the hard one (SIGKILL, one second later),
    # seen in the rusage. (rusage runs a few % below the clock RLIMIT_CPU uses, hence not `>= cpu_time_s + 1`.)
    if cpu_limit or (final is None and cpu >= limits.cpu_time_s):
        return SandboxResult(False, "cpu_time", detail=f"cpu time > {limits.cpu_time_s} s", tests_total=total,
                             cpu_time_s=cpu, **common)
    if final is None:
        memory = "MemoryError" in common["stderr"]
        return SandboxResult(False, "memory" if memory else "crashed", detail="no result from the child",
                             tests_total=total, cpu_time_s=cpu, **common)
    error, outcomes = final
    passed = outcomes.count("1")
    if error == "MemoryError" or "M" in outcomes:
        reason, detail = "memory", "MemoryError"
    elif error in ("SyntaxError", "IndentationError", "TabError"):
        reason, detail = "syntax_error", error
    elif error != "-":
        reason, detail = "error", error
    else:
        reason, detail = ("ok", "") if passed == total else ("failed_tests", f"{total - passed} of {total} failed")
    if reason not in ("ok", "failed_tests"):
        passed = 0
    return SandboxResult(reason == "ok", reason, detail=detail, tests_passed=passed, tests_total=total,
                         cpu_time_s=cpu, **common)


def _parse_report(report: bytes, nonce: str, n_tests: int) -> tuple[str | None, bool, tuple[str, str] | None]:
    """(first blocked event, CPU limit hit, (error, outcomes)) from the nonce-tagged lines; one final line only."""
    blocked, cpu_limit, finals = None, False, []
    for line in report.split(b"\n"):
        fields = line.decode("utf-8", "replace").split(" ")
        if len(fields) < 3 or fields[0] != nonce:
            continue
        if fields[1] == "blocked" and blocked is None:
            blocked = fields[2]
        elif fields[1] == "limit":
            cpu_limit = True
        elif fields[1] == "final" and len(fields) == 4:
            outcomes = "" if fields[3] == "-" else fields[3]
            if len(outcomes) in (0, n_tests) and set(outcomes) <= {"0", "1", "M"}:
                finals.append((fields[2], outcomes))
    return blocked, cpu_limit, finals[0] if len(finals) == 1 else None


def _tail(file: Any, chars: int) -> str:
    file.seek(0, os.SEEK_END)
    size = file.tell()
    file.seek(max(0, size - 4 * chars))
    return file.read().decode("utf-8", "replace")[-chars:]


def _remove_tree(path: str) -> None:
    """Delete the working directory even if model code removed its own permissions from parts of it."""
    try:
        os.chmod(path, 0o700)
        for root, dirs, _ in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o700)
    except OSError:
        pass
    shutil.rmtree(path, ignore_errors=True)


# --- isolation probe ---------------------------------------------------------------------------------------------


@functools.cache
def _detect_isolation(python: str) -> Isolation:
    root = os.geteuid() == 0
    unshare = shutil.which("unshare")
    if unshare is None or not sys.platform.startswith("linux"):
        return Isolation(root, (), ())
    for namespaces, flags in _NAMESPACE_CANDIDATES:
        prefix = (unshare, *flags)
        argv = [*prefix, python, "-I", "-S", "-c", _PROBE, "pid" if "pid" in namespaces else "-"]
        try:
            probe = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin"}, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            logger.info("sandbox: using %s namespaces (%s)", "+".join(namespaces), " ".join(prefix))
            return Isolation(root, namespaces, prefix)
    logger.warning("sandbox: unshare cannot create namespaces here; running without network/PID isolation "
                   "(the audit hook and resource limits still apply).")
    return Isolation(root, (), ())
