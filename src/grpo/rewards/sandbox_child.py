"""The child side of grpo.rewards.sandbox: run as `python -I -S -B -c <this file's text>`, never imported.

It reads its settings from stdin, sets the resource limits, installs the audit hook, runs the model's code and
each test, and reports on a dedicated pipe. See grpo/rewards/sandbox.py for the layers around it.
"""
import _posixsubprocess
import _signal
import _stat
import os
import posix
import resource
import signal
import sys


def _sandbox_main():
    import builtins
    import json

    del globals()["_sandbox_main"]
    config = json.loads(sys.stdin.buffer.read())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for name, (soft, hard) in config["rlimits"].items():
        which = getattr(resource, name)
        current_hard = resource.getrlimit(which)[1]
        if current_hard != resource.RLIM_INFINITY:
            hard = min(hard, current_hard)
        resource.setrlimit(which, (min(soft, hard), hard))
    builtins.exit = builtins.quit = sys.exit  # site.py's helpers; -S leaves them out

    def clean(text, str=str, type=type):
        if type(text) is not str:
            return "?"
        return "".join([c if c.isalnum() or c in "._-" else "_" for c in text[:80]]) or "?"

    def report(kind, detail, write=posix.write, fd=config["result_fd"], prefix="\n" + config["nonce"] + " ",
               base_exception=BaseException):
        try:
            write(fd, (prefix + kind + " " + detail + "\n").encode())
        except base_exception:
            pass

    def on_cpu_limit(signum, frame, report=report, exit=os._exit):  # SIGXCPU: the soft RLIMIT_CPU
        report("limit", "cpu")
        exit(128 + signum)

    signal.signal(signal.SIGXCPU, on_cpu_limit)  # also delivered to PID 1, which ignores unhandled signals
    if config["audit_hook"]:
        _neuter_unaudited()
        sys.addaudithook(_make_hook(config, report, clean))
    del config["nonce"]

    def execute(source, filename, namespace, exec=exec, compile=compile, system_exit=SystemExit,
                memory_error=MemoryError, base_exception=BaseException, type=type, stderr=sys.stderr):
        try:
            exec(compile(source, filename, "exec"), namespace)
        except system_exit as e:
            return "-" if e.code is None or e.code == 0 else "SystemExit"
        except memory_error:
            namespace.clear()
            return "MemoryError"
        except base_exception as e:
            try:
                import traceback
                traceback.print_exception(e, file=stderr)
            except base_exception:
                pass
            return clean(type(e).__name__)
        return "-"

    def run(code, tests, enumerate=enumerate, streams=(sys.stdout, sys.stderr), base_exception=BaseException):
        namespace = {"__name__": "__sandbox__", "__builtins__": builtins}
        error = execute(code, "<solution>", namespace)
        outcomes = []
        if error == "-":
            for i, test in enumerate(tests):
                outcome = execute(test, f"<test {i}>", namespace)
                outcomes.append("1" if outcome == "-" else "M" if outcome == "MemoryError" else "0")
        for stream in streams:  # flush first: the session may be killed before the interpreter's exit flushes
            try:
                stream.flush()
            except base_exception:
                pass
        report("final", error + " " + ("".join(outcomes) or "-"))

    run(config.pop("code"), config.pop("tests"))


def _neuter_unaudited():
    """Functions that act without raising an audit event; replaced by stubs whose event the hook refuses."""
    audit = sys.audit

    def stub(name):
        def refused(*args, **kwargs):
            audit("sandbox.blocked", name)
            raise PermissionError("sandbox: " + name + " is not allowed")
        return refused

    for module, names in ((_posixsubprocess, ("fork_exec",)), (posix, ("mkfifo", "mknod", "pidfd_open")),
                          (os, ("mkfifo", "mknod", "pidfd_open")), (_signal, ("pidfd_send_signal",)),
                          (signal, ("pidfd_send_signal",))):
        for name in names:
            if hasattr(module, name):
                setattr(module, name, stub(module.__name__ + "." + name))


def _make_hook(config, report, clean):
    workdir = config["workdir"]
    stdlib = os.path.dirname(os.__file__)
    roots = [workdir, stdlib, os.path.dirname(_posixsubprocess.__file__), "/usr/share/zoneinfo"]
    roots += config["readable_paths"]
    read_roots = tuple({p for r in roots for p in (os.path.abspath(r), os.path.realpath(r))})
    library_roots = tuple(r for r in read_roots if r != workdir)  # no extension modules written by model code
    deny_roots = tuple(os.path.join(stdlib, d) for d in ("site-packages", "dist-packages")
                       if os.path.join(stdlib, d) not in read_roots)
    readable = frozenset(["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random", os.path.realpath(sys.executable)])
    deny_events = frozenset([
        "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.startfile",
        "subprocess.Popen", "pty.spawn",  # processes
        "os.kill", "os.killpg", "signal.pthread_kill",  # signals
        "os.link", "os.symlink",  # a link would let a path inside the working directory point outside it
        "resource.setrlimit", "resource.prlimit",  # the limits
        "sys.settrace", "sys.setprofile", "sys._current_frames", "gc.get_objects", "gc.get_referrers",
        "gc.get_referents",  # reaching the prelude's state
        "sqlite3.enable_load_extension", "sqlite3.load_extension", "fcntl.ioctl", "webbrowser.open",
        "ensurepip.bootstrap", "sandbox.blocked",
    ])
    deny_prefixes = ("socket.", "ctypes.", "syslog.", "urllib.")
    deny_imports = frozenset(["_ctypes", "ctypes", "_posixsubprocess", "_signal", "signal", "posix", "os", "_imp",
                              "resource", "_xxsubinterpreters", "_testcapi", "_testinternalcapi", "_gdbm", "_dbm"])
    # event -> (index of a path argument, index of its dir_fd argument or None), per CPython 3.10-3.13
    path_events = {
        "os.chmod": ((0, 2),), "os.chown": ((0, 3),), "os.chflags": ((0, None),), "os.mkdir": ((0, 2),),
        "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.rename": ((0, 2), (1, 3)), "os.truncate": ((0, None),),
        "os.utime": ((0, 3),), "os.setxattr": ((0, None),), "os.removexattr": ((0, None),),
        "shutil.rmtree": ((0, 1),),
    }
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def normalize(path, base, str=str, type=type):
        if type(path) is bytes:
            path = path.decode("utf-8", "surrogateescape")
        if type(path) is not str:
            return None
        if not path.startswith("/"):
            path = base + "/" + path
        parts = []
        for part in path.split("/"):
            if part == "..":
                if parts:
                    parts.pop()
            elif part and part != ".":
                parts.append(part)
        return "/" + "/".join(parts)

    def resolve(path, dir_fd, getcwd=posix.getcwd, readlink=posix.readlink, fspath=os.fspath, int=int,
                type=type):
        """The absolute, normalized path an operation would touch; None if it cannot be known."""
        if type(path) is int:
            return normalize(readlink(f"/proc/self/fd/{path}"), "/")
        if type(path) not in (str, bytes):
            path = fspath(path)
        base = getcwd() if dir_fd is None or dir_fd == -1 else readlink(f"/proc/self/fd/{dir_fd}")
        return normalize(path, normalize(base, "/"))

    def within(path, roots):
        for root in roots:
            if path == root or path.startswith(root + "/"):
                return True
        return False

    def check_write(path):
        return None if path is not None and (path == "/dev/null" or within(path, (workdir,))) else "write outside"

    def check_read(path, stat=posix.stat, is_dir=_stat.S_ISDIR, exception=Exception):
        if path is None:
            return "unknown path"
        if within(path, (workdir,)) or path in readable:
            return None
        if within(path, deny_roots) or not within(path, read_roots):
            return "read outside"
        try:
            directory = is_dir(stat(path).st_mode)
        except exception:
            return None
        return "directory outside" if directory else None  # a directory fd would serve as dir_fd for writes

    def check(event, args, type=type, int=int, len=len):
        if event in deny_events or event.startswith(deny_prefixes):
            return "refused"
        if event == "import":  # (name, filename of an extension module being loaded, ...)
            if args[0].rpartition(".")[2] in deny_imports:
                return "refused"
            if args[1] is None:
                return None
            library = resolve(args[1], None)
            return None if library is not None and within(library, library_roots) else "native code"
        if event == "open":
            path, flags = args[0], args[2]
            if type(path) is int:
                return None  # wrapping a descriptor it already has grants no new access
            target = resolve(path, None)
            return check_write(target) if flags & write_flags else check_read(target)
        if event == "sqlite3.connect":
            database = args[0]
            if database in (":memory:", "", b":memory:", b""):
                return None
            return check_write(resolve(database, None))
        for path_index, fd_index in path_events.get(event, ()):
            dir_fd = args[fd_index] if fd_index is not None and fd_index < len(args) else None
            verdict = check_write(resolve(args[path_index], dir_fd))
            if verdict:
                return verdict
        return None

    def hook(event, args, exception=BaseException, permission_error=PermissionError):
        try:
            verdict = check(event, args)
        except exception:
            verdict = "unverifiable"  # fail closed
        if verdict:
            report("blocked", clean(event) + ":" + clean(verdict))
            raise permission_error("sandbox: " + event + " is not allowed (" + verdict + ")")

    return hook


if __name__ == "__main__":  # `python -c` runs it as __main__; importing it does nothing
    _sandbox_main()
