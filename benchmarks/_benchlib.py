"""Helpers shared by the benchmarks: idle target processes (started and ended by PID),
a C pread floor, the private PID namespace, CPU time of a process, the machine's name.

``build(workdir)`` compiles a tiny C program with cc; ``Sleepers(exe, n)`` starts it:
it forks n children that sleep until killed (each caps itself at 64 MiB of address
space and ``seconds`` of life), rewrites each child's argv[1] from "parent" to
"child_" so a cmdline regex (CHILD_REGEX) matches the children and not the parent,
and on SIGTERM SIGKILLs its own unreaped children (their PIDs cannot have been
reused) and exits. Also: pinning the benchmark to a private PID namespace.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

NAME = "mwd-bench-sleepers"
CHILD_REGEX = NAME + " child_"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SLEEPERS_C = r"""
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

/* sleepers parent N SECONDS */
int main(int argc, char **argv) {
    if (argc != 4 || strcmp(argv[1], "parent")) return 2;
    int n = atoi(argv[2]);
    unsigned secs = (unsigned)atoi(argv[3]);
    pid_t *kids = calloc(n > 0 ? n : 1, sizeof *kids);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGALRM);
    sigprocmask(SIG_BLOCK, &set, NULL);
    struct rlimit as = { 64 << 20, 64 << 20 };
    for (int i = 0; i < n; i++) {
        pid_t pid = fork();
        if (pid < 0) { perror("fork"); n = i; break; }
        if (pid == 0) {
            memcpy(argv[1], "child_", 6);   /* shows in /proc/PID/cmdline */
            setrlimit(RLIMIT_AS, &as);
            sigprocmask(SIG_UNBLOCK, &set, NULL);
            alarm(secs);                    /* dies by SIGALRM at the latest */
            for (;;) pause();
        }
        kids[i] = pid;
    }
    printf("ready %d\n", n);
    fflush(stdout);
    alarm(secs + 5);
    int sig;
    sigwait(&set, &sig);
    for (int i = 0; i < n; i++) kill(kids[i], SIGKILL);  /* our unreaped children only */
    for (int i = 0; i < n; i++) waitpid(kids[i], NULL, 0);
    return 0;
}
"""


FLOOR_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
/* floor CLOCK ROUNDS PID... : the time of one pass of pread over kept-open
 * /proc/PID/statm fds, median of ROUNDS passes, in ns: what any reader pays.
 * CLOCK is "wall" (CLOCK_MONOTONIC) or "cpu" (CLOCK_PROCESS_CPUTIME_ID). */
static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b; return (x > y) - (x < y);
}
int main(int argc, char **argv) {
    clockid_t clock = strcmp(argv[1], "cpu") == 0 ? CLOCK_PROCESS_CPUTIME_ID : CLOCK_MONOTONIC;
    int rounds = atoi(argv[2]), n = argc - 3;
    int *fds = malloc(sizeof(int) * n);
    double *per = malloc(sizeof(double) * rounds);
    char path[64], buf[512];
    for (int i = 0; i < n; i++) {
        snprintf(path, sizeof path, "/proc/%s/statm", argv[i + 3]);
        if ((fds[i] = open(path, O_RDONLY | O_CLOEXEC)) < 0) { perror(path); return 1; }
    }
    for (int r = 0; r < rounds; r++) {
        struct timespec a, b;
        clock_gettime(clock, &a);
        for (int i = 0; i < n; i++)
            if (pread(fds[i], buf, sizeof buf, 0) <= 0) { perror("pread"); return 1; }
        clock_gettime(clock, &b);
        per[r] = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
    }
    qsort(per, rounds, sizeof(double), cmp);
    printf("%.0f\n", per[rounds / 2]);
    return 0;
}
"""


def compile_c(workdir: str, name: str, source: str) -> str:
    """Build one C program of the benchmarks with cc -O2; return the executable's path."""
    src = os.path.join(workdir, name + ".c")
    exe = os.path.join(workdir, name)
    with open(src, "w") as f:
        f.write(source)
    subprocess.run(["cc", "-O2", "-o", exe, src], check=True)
    return exe


def build_floor(workdir: str) -> str:
    return compile_c(workdir, "pread-floor", FLOOR_C)


def pread_floor_ns(floor_exe: str, clock: str, rounds: int, pids) -> float:
    """Median ns of one pread pass over the statm of pids ("wall" or "cpu" clock)."""
    out = subprocess.run([floor_exe, clock, str(rounds)] + [str(p) for p in pids],
                         check=True, capture_output=True, text=True).stdout
    return float(out)


def build(workdir: str) -> str:
    return compile_c(workdir, NAME, SLEEPERS_C)


class Sleepers:
    """n idle child processes of one parent; ``stop()`` ends them all (by PID)."""

    def __init__(self, exe: str, n: int, seconds: int = 600):
        self.proc = subprocess.Popen([exe, "parent", str(n), str(seconds)],
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().split()
        if line[:1] != ["ready"] or int(line[1]) != n:
            self.stop()
            raise RuntimeError(f"could only start {line} of {n} sleepers")
        self.n = n

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)


def machine() -> str:
    """nproc, CPU model, kernel and load: what a figure came from."""
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), "?")
    except OSError:
        pass
    load = os.getloadavg()[0]
    return (f"{os.cpu_count()} CPUs ({model}), Linux {os.uname().release}, "
            f"load average {load:.2f}, Python {sys.version.split()[0]}")


def can_unshare() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                          capture_output=True).returncode == 0


def in_private_namespace(script: str, argv: list) -> int:
    """Re-run ``script`` with ``argv`` as PID 1 of a fresh PID namespace (with its own
    /proc); when it ends, the kernel kills whatever it left behind."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    cmd = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
           sys.executable, os.path.abspath(script)] + list(argv)
    return subprocess.run(cmd, env=env, cwd=ROOT).returncode


def inner_or_namespace(script: str, args, inner) -> int:
    """main() of a benchmark that runs wholly in a private PID namespace: inner(args)
    in the copy re-run there (--inner), else re-run this script there."""
    if args.inner:
        return inner(args)
    if not can_unshare():
        print(f"{os.path.basename(script)} needs root and unshare(1) (a private PID namespace)",
              file=sys.stderr)
        return 2
    return in_private_namespace(script, sys.argv[1:] + ["--inner"])


def stop(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """End a process we started (SIGTERM by its PID, through Popen; SIGKILL after
    timeout) and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def memwatchd_command() -> list:
    """How systemd would start it: the console script next to this Python, else -m."""
    script = os.path.join(os.path.dirname(sys.executable), "memwatchd")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-m", "memwatchd"]


def cpu_ns(pid: int) -> int:
    """CPU time of a process so far, in ns (all its threads, from schedstat)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError):
            pass
    return total


def cpu_ticks_ns(pid: int) -> int:
    """utime + stime from /proc/PID/stat, in ns (10 ms resolution at HZ=100)."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rfind(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) * 10**9 // os.sysconf("SC_CLK_TCK")


def pid_watch_config(path: str, daemon_section: str, pids) -> str:
    """Write a config (mode 0600): daemon_section, then one `pid` watch (limit 1G, action
    term) per pid, named job-0, job-1, ...; return its path."""
    lines = [daemon_section]
    for i, pid in enumerate(pids):
        lines.append(f'[[watch]]\nname = "job-{i}"\npid = {pid}\nlimit = "1G"\n')
    with open(path, "w") as f:
        f.write("\n".join(lines))
    os.chmod(path, 0o600)
    return path


def notify_socket(path: str, env: dict):
    """A bound, non-blocking datagram socket standing in for systemd's notify socket;
    env gets NOTIFY_SOCKET and WATCHDOG_USEC (10 s, as the unit's WatchdogSec=10s)."""
    import socket
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    env.update(NOTIFY_SOCKET=path, WATCHDOG_USEC="10000000")
    return sock
