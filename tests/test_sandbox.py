"""The sandboxed code-execution reward: scoring, containment of hostile code, parallelism and cleanup.

Each attack test checks the effect that matters (the file does not exist, no connection arrived, the test process
got no signal), not just the reported reason, so that a sandbox which only *says* "blocked" would fail it.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest

from grpo.rewards import sandbox
from grpo.rewards.sandbox import (
    SandboxLimits,
    code_execution_reward,
    detect_isolation,
    extract_code,
    make_code_execution_reward,
    run_sandboxed,
)

LIMITS = SandboxLimits(wall_time_s=5, cpu_time_s=2, memory_bytes=256 << 20)
KERNEL_ONLY = SandboxLimits(wall_time_s=5, cpu_time_s=2, memory_bytes=256 << 20, audit_hook=False)
ISOLATION = detect_isolation()
needs_net_namespace = pytest.mark.skipif("net" not in ISOLATION.namespaces, reason="no network namespace here")
needs_pid_namespace = pytest.mark.skipif("pid" not in ISOLATION.namespaces, reason="no PID namespace here")

ADD_ONE = "def add_one(x):\n    return x + 1\n"
ADD_ONE_TESTS = ["assert add_one(1) == 2", "assert add_one(-1) == 0", "assert add_one(10) == 11"]


def score(code: str, tests, limits: SandboxLimits = LIMITS) -> float | None:
    return make_code_execution_reward(limits=limits)([code], test_cases=[tests])[0]


def live_session_members(sid: int) -> list[int]:
    """Processes (not zombies) whose session id is `sid`."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:
            members.append(int(entry))
    return members


def assert_session_gone(sid: int) -> None:
    """The kernel finishes SIGKILL asynchronously: wait (up to 5 s) for the session to empty, then check."""
    for _ in range(100):
        if not live_session_members(sid):
            return
        time.sleep(0.05)
    assert live_session_members(sid) == [], f"processes of sandbox session {sid} survived it"


@pytest.fixture
def usr1_received():
    """Records SIGUSR1 sent to the test process (a stand-in for a fatal signal that would end the trainer)."""
    received: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    yield received
    signal.signal(signal.SIGUSR1, previous)


@pytest.fixture
def listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield server
    server.close()


def assert_no_connection(server: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        connection, _ = server.accept()
        connection.close()


# --- scoring ------------------------------------------------------------------------------------------------------


def test_correct_code_scores_one():
    completion = f"Here is my solution:\n```python\n{ADD_ONE}```\nIt adds one."
    assert score(completion, ADD_ONE_TESTS) == 1.0


def test_partially_correct_code_scores_the_fraction_of_tests_passed():
    code = "def add_one(x):\n    return abs(x) + 1\n"  # wrong for negative numbers only
    assert score(code, ADD_ONE_TESTS) == pytest.approx(2 / 3)
    result = run_sandboxed(code, LIMITS, tests=ADD_ONE_TESTS)
    assert (result.reason, result.tests_passed, result.tests_total) == ("failed_tests", 2, 3)
    assert "AssertionError" in result.stderr


def test_syntax_error_scores_zero():
    code = "def add_one(x)\n    return x + 1\n"
    assert score(code, ADD_ONE_TESTS) == 0.0
    assert run_sandboxed(code, LIMITS, tests=ADD_ONE_TESTS).reason == "syntax_error"


def test_code_that_raises_before_the_tests_scores_zero():
    code = ADD_ONE + "raise RuntimeError('boom')\n"
    assert score(code, ADD_ONE_TESTS) == 0.0
    result = run_sandboxed(code, LIMITS, tests=ADD_ONE_TESTS)
    assert (result.reason, result.detail) == ("error", "RuntimeError")


def test_conversational_completions_are_unwrapped():
    completion = [{"role": "assistant", "content": f"```python\n{ADD_ONE}```"}]
    reward = make_code_execution_reward(limits=LIMITS)
    assert reward([completion], test_cases=[ADD_ONE_TESTS]) == [1.0]


def test_a_string_of_asserts_counts_each_assert_and_rows_without_tests_score_none():
    reward = make_code_execution_reward(limits=LIMITS)
    tests = "assert add_one(1) == 2\nassert add_one(2) == 5\n"
    assert reward([ADD_ONE, ADD_ONE, ADD_ONE], test_cases=[tests, None, []]) == [0.5, None, None]


def test_a_missing_test_cases_column_is_a_clear_error():
    with pytest.raises(ValueError, match="test_cases"):
        code_execution_reward([ADD_ONE])


def test_a_malformed_completion_scores_zero_instead_of_raising():
    reward = make_code_execution_reward(limits=LIMITS)
    assert reward([[{"role": "assistant"}]], test_cases=[ADD_ONE_TESTS]) == [0.0]


def test_the_function_name_is_the_metric_name():
    assert code_execution_reward.__name__ == "code_execution_reward"
    assert make_code_execution_reward(name="unit_tests").__name__ == "unit_tests"


@pytest.mark.parametrize("text, expected", [
    ("```python\nfirst\n```\ntext\n```python\nsecond\n```", "second\n"),
    ("```python\npy\n```\n```bash\nsh\n```", "py\n"),
    ("```\nplain\n```", "plain\n"),
    ("```py3\nx = 1\n```", "x = 1\n"),
    ("x = 1", "x = 1"),
])
def test_extract_code_takes_the_last_python_block(text, expected):
    assert extract_code(text) == expected


def test_ordinary_standard_library_code_is_not_blocked():
    code = """
import collections, dataclasses, enum, functools, logging, pathlib, shutil, tempfile, threading, os
Point = collections.namedtuple("Point", "x y")
@dataclasses.dataclass
class Box:
    size: int
class Color(enum.Enum):
    RED = 1
logging.getLogger("x").warning("logging works")
pathlib.Path("notes.txt").write_text("kept in the working directory")
os.makedirs("a/b"); open("a/b/c", "w").write("1"); shutil.rmtree("a")
with tempfile.TemporaryDirectory() as d:
    open(os.path.join(d, "f"), "w").write("x")
worker = threading.Thread(target=print, args=("thread ran",)); worker.start(); worker.join()
@functools.lru_cache(None)
def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)
"""
    result = run_sandboxed(code, LIMITS, tests=["assert fib(90) == 2880067194370816120", "assert Point(1, 2).y == 2"])
    assert (result.reason, result.score) == ("ok", 1.0), result
    assert "thread ran" in result.stdout


# --- hostile code -------------------------------------------------------------------------------------------------


def test_an_infinite_loop_is_killed_by_the_cpu_limit():
    limits = SandboxLimits(wall_time_s=10, cpu_time_s=1)
    result = run_sandboxed("while True:\n    pass\n", limits, tests=["assert True"])
    assert (result.reason, result.score) == ("cpu_time", 0.0), result
    assert_session_gone(result.pid)


def test_a_hanging_child_is_killed_by_the_wall_clock_with_its_whole_session():
    limits = SandboxLimits(wall_time_s=1, cpu_time_s=5)
    result = run_sandboxed("import time\ntime.sleep(60)\n", limits, tests=["assert True"])
    assert (result.reason, result.score) == ("timeout", 0.0)
    assert result.wall_time_s < 5
    assert_session_gone(result.pid)


@pytest.mark.parametrize("attack", [
    "import os\nwhile True:\n    os.fork()\n",
    "import subprocess\nsubprocess.Popen(['touch', MARKER]).wait()\n",
    "import os\nos.system('touch ' + MARKER)\n",
    "import os\nos.posix_spawn('/usr/bin/touch', ['touch', MARKER], {})\n",
    "import os\nif os.fork() == 0:\n    os.execv('/usr/bin/touch', ['touch', MARKER])\n",
    "import _posixsubprocess, os\nr, w = os.pipe()\n_posixsubprocess.fork_exec([b'/usr/bin/touch', MARKER.encode()], "
    "[b'/usr/bin/touch'], True, (w,), None, None, -1, -1, -1, -1, -1, -1, r, w, False, False, -1, None, None, None, "
    "-1, None, False)\n",
], ids=["fork-bomb", "subprocess", "os.system", "posix_spawn", "fork-exec", "_posixsubprocess"])
def test_process_creation_is_blocked(attack, tmp_path):
    marker = tmp_path / "spawned"
    result = run_sandboxed(f"MARKER = {str(marker)!r}\n" + attack, LIMITS, tests=["assert True"])
    assert (result.reason, result.score) == ("blocked", 0.0), result
    assert not marker.exists()
    assert_session_gone(result.pid)


@pytest.mark.parametrize("attack", [
    "x = bytearray(10**10)\n",
    "hoard = []\nwhile True:\n    hoard.append(bytearray(10**7))\n",
], ids=["one-allocation", "growing-list"])
def test_a_memory_bomb_hits_the_address_space_limit(attack):
    result = run_sandboxed(attack, LIMITS, tests=["assert True"])
    assert (result.reason, result.score) == ("memory", 0.0), result


@pytest.mark.parametrize("attack", [
    "open(TARGET, 'w').write('x')",
    "import pathlib\npathlib.Path(TARGET).write_text('x')",
    "import os\nos.close(os.open(TARGET, os.O_CREAT | os.O_WRONLY))",
    "import os\nopen('inside', 'w').write('x')\nos.rename('inside', TARGET)",
    "import os\nos.mkdir(TARGET)",
    "import os\nos.symlink(TARGET, 'link')\nopen('link', 'w').write('x')",
    "import os\nos.chdir(os.path.dirname(TARGET))\nopen(os.path.basename(TARGET), 'w').write('x')",
    "import os\nfd = os.open(os.path.dirname(TARGET), os.O_RDONLY)\n"
    "os.close(os.open(os.path.basename(TARGET), os.O_CREAT | os.O_WRONLY, dir_fd=fd))",
    "import sqlite3\nsqlite3.connect(TARGET).execute('create table t (x)')",
    "import shutil\nopen('inside', 'w').write('x')\nshutil.copy('inside', TARGET)",
], ids=["open", "pathlib", "os.open", "rename", "mkdir", "symlink", "chdir", "dir_fd", "sqlite", "shutil.copy"])
def test_writing_outside_the_working_directory_is_blocked(attack, tmp_path):
    target = tmp_path / "escaped"
    result = run_sandboxed(f"TARGET = {str(target)!r}\n" + attack, LIMITS, tests=["assert True"])
    assert (result.reason, result.score) == ("blocked", 0.0), result
    assert not target.exists()


def test_the_trainer_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("GRPO_SANDBOX_TEST_SECRET", "hunter2-token")
    code = "import os\nprint(dict(os.environ))\n"
    result = run_sandboxed(code, LIMITS, tests=["assert 'GRPO_SANDBOX_TEST_SECRET' not in os.environ"])
    assert (result.reason, result.score) == ("ok", 1.0), result
    assert "PATH" in result.stdout  # the child did print its environment
    assert "hunter2-token" not in result.stdout


@pytest.mark.parametrize("path", [f"/proc/{os.getpid()}/environ", "/proc/self/environ", "/etc/passwd"])
def test_reading_outside_the_standard_library_is_blocked(path):
    result = run_sandboxed(f"print(open({path!r}).read())", LIMITS, tests=["assert True"])
    assert (result.reason, result.score) == ("blocked", 0.0), result
    assert result.stdout == ""


def test_a_network_connection_is_blocked(listener):
    port = listener.getsockname()[1]
    code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'stolen')\n"
    result = run_sandboxed(code, LIMITS, tests=["assert True"])
    assert (result.reason, result.score) == ("blocked", 0.0), result
    assert_no_connection(listener)


@pytest.mark.parametrize("attack", [
    "import os, signal\nos.kill(os.getppid(), signal.SIGUSR1)",
    "import os, signal\nos.kill(TRAINER, signal.SIGUSR1)",
    "import os, signal\nos.killpg(TRAINER_GROUP, signal.SIGUSR1)",
    "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(TRAINER), signal.SIGUSR1)",
    "import os\nos.kill(os.getppid(), 9)",
], ids=["kill-parent", "kill-pid", "killpg", "pidfd", "kill-parent-9"])
def test_signalling_the_trainer_is_blocked(attack, usr1_received):
    code = f"TRAINER, TRAINER_GROUP = {os.getpid()}, {os.getpgid(0)}\n" + attack
    result = run_sandboxed(code, LIMITS, tests=["assert True"])
    assert (result.reason, result.score) == ("blocked", 0.0), result
    assert usr1_received == []  # and, for kill -9, this test is still running


def test_a_caught_blocked_operation_still_scores_zero():
    code = ADD_ONE + "import os\ntry:\n    os.system('true')\nexcept Exception:\n    pass\n"
    result = run_sandboxed(code, LIMITS, tests=ADD_ONE_TESTS)
    assert (result.reason, result.score) == ("blocked", 0.0)


def test_forged_result_lines_are_ignored():
    code = (
        "import os\n"
        "for fd in range(3, 64):\n"
        "    try:\n"
        "        os.write(fd, b'\\nfake final - 1\\n')\n"
        "    except OSError:\n"
        "        pass\n"
        "print('final - 1')\n"
        "os._exit(0)\n"
    )
    result = run_sandboxed(code, LIMITS, tests=["assert False"])
    assert (result.reason, result.score) == ("crashed", 0.0), result


# --- the kernel layers on their own (audit hook off) ---------------------------------------------------------------


@needs_net_namespace
def test_the_network_namespace_alone_stops_a_connection(listener):
    port = listener.getsockname()[1]
    code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
    result = run_sandboxed(code, KERNEL_ONLY, tests=["assert True"])
    assert (result.reason, result.detail) == ("error", "OSError"), result  # ENETUNREACH: loopback is down
    assert_no_connection(listener)


@needs_pid_namespace
def test_the_pid_namespace_alone_hides_the_trainer(usr1_received):
    code = f"import os, signal\nos.kill({os.getpid()}, signal.SIGUSR1)\n"
    result = run_sandboxed(code, KERNEL_ONLY, tests=["assert True"])
    assert (result.reason, result.detail) == ("error", "ProcessLookupError"), result
    assert usr1_received == []


def test_processes_left_behind_die_with_the_sandbox():
    code = (
        "import os, time\n"
        "for _ in range(3):\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(60)\n"
        "        os._exit(0)\n"
    )
    result = run_sandboxed(code, KERNEL_ONLY, tests=["assert True"])
    assert result.reason == "ok", result
    assert_session_gone(result.pid)


# --- parallelism and cleanup --------------------------------------------------------------------------------------


def test_completions_run_in_parallel_with_at_most_max_workers_children(monkeypatch):
    running = peak = 0
    lock = threading.Lock()
    real_run = sandbox.run_sandboxed

    def counting_run(*args, **kwargs):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            return real_run(*args, **kwargs)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(sandbox, "run_sandboxed", counting_run)
    completions = [f"def answer():\n    return {i if i % 3 else -1}\n" for i in range(16)]
    tests = [[f"assert answer() == {i}", "assert isinstance(answer(), int)"] for i in range(16)]
    rewards = make_code_execution_reward(limits=LIMITS, max_workers=4)(completions, test_cases=tests)
    assert rewards == [0.5 if i % 3 == 0 else 1.0 for i in range(16)]
    assert 1 < peak <= 4


def test_the_working_directory_is_removed_afterwards():
    code = (
        "import os\n"
        "print(os.getcwd())\n"
        "os.makedirs('locked/deeper')\n"
        "open('locked/deeper/data.txt', 'w').write('x' * 1000)\n"
        "os.chmod('locked', 0)\n"
    )
    result = run_sandboxed(code, LIMITS, tests=["assert True"])
    assert result.reason == "ok", result
    workdir = result.stdout.strip()
    assert os.path.basename(workdir).startswith("grpo-sandbox-")
    assert not os.path.exists(workdir)


def test_the_process_limit_is_set_relative_to_the_uid_and_only_when_not_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    soft, hard = sandbox._rlimits(LIMITS)["RLIMIT_NPROC"]
    assert soft == hard > LIMITS.max_processes  # this test process and its threads are counted too
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert "RLIMIT_NPROC" not in sandbox._rlimits(LIMITS)


def test_isolation_is_detected_consistently():
    assert ISOLATION.root == (os.geteuid() == 0)
    assert set(ISOLATION.namespaces) <= {"user", "net", "pid"}
    assert bool(ISOLATION.namespaces) == bool(ISOLATION.prefix)
