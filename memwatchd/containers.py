"""Containers by name: the cgroup of every running Docker (or Podman) container whose name
matches a `container = "glob"` watch.

Imported by targets.py only when such a watch is configured, so the daemon's import path
stays lean. Resolution reads the runtime's own files, never its socket or its CLI:

- Which containers run comes from the cgroup tree itself: a running container *is* a
  cgroup, `docker-<id>.scope` (systemd cgroup driver) or `docker/<id>` (cgroupfs driver),
  `libpod-<id>.scope` / `libpod_parent/libpod-<id>` for Podman. One directory listing per
  place, no runtime involved: a hung dockerd cannot stall the loop.
- The name of an id comes from the runtime's metadata: Docker's
  /var/lib/docker/containers/<id>/config.v2.json ("Name": "/sim-a"), Podman's
  /var/lib/containers/storage/overlay-containers/containers.json ("names"). Both are
  root-only files on local disk, read with a size bound, parsed again only when their
  mtime or size changed (a rename changes them), at most MAX_CONTAINERS per rescan.

Why not the API on /run/docker.sock: it needs an HTTP client over a unix socket in a helper
thread (dockerd answers slowly exactly when the host is short of memory), and it tells us
nothing the two file reads above don't. The price: the on-disk layout is Docker's, not a
documented interface; it has been the same since Docker 1.11 (2016), and a file that does
not parse is said once and that container is not matched (nothing is killed on a guess).

Container names are chosen by whoever may run containers (the docker group): they only
ever reach logs, records and metrics through report.escape, and never a shell.
"""
import fnmatch
import json
import os
import re

DOCKER_ROOT = "/var/lib/docker"
PODMAN_ROOT = "/var/lib/containers/storage"
RUN_ROOT = "/run"
PROC_ROOT = "/proc"
METADATA_MAX = 1 << 20     # bytes: a config.v2.json is a few KiB; refuse a runaway file
MAX_CONTAINERS = 1024      # ids looked at per rescan, all places together

_ID = re.compile(r"[0-9a-f]{64}")
# (runtime, directory below the cgroup root, prefix, suffix) of a container's cgroup
PLACES = (
    ("docker", "system.slice", "docker-", ".scope"),     # systemd cgroup driver (the default)
    ("docker", "docker", "", ""),                          # cgroupfs driver
    ("podman", "machine.slice", "libpod-", ".scope"),     # rootful podman, systemd manager
    ("podman", "libpod_parent", "libpod-", ""),           # rootful podman, cgroupfs manager
)


class Container:
    """A running container: its runtime, id, name and cgroup path below the cgroup root."""

    __slots__ = ("runtime", "id", "name", "cgroup")

    def __init__(self, runtime: str, cid: str, name: str, cgroup: str) -> None:
        self.runtime, self.id, self.name, self.cgroup = runtime, cid, name, cgroup

    def __repr__(self) -> str:
        return f"Container({self.runtime}, {self.id[:12]}, {self.name!r}, {self.cgroup})"


def read_bounded(path: str, limit: int = METADATA_MAX) -> bytes:
    """A file's bytes, OSError(EFBIG) if longer than limit; a symlink is refused (ELOOP)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise OSError(27, f"longer than {limit} bytes")
    return data


class ContainerIndex:
    """Running containers by name, re-read on each rescan (bounded work, cached parses)."""

    def __init__(self, cgroup_root: str, docker_root: str = "",
                 podman_root: str = "", run_root: str = "", proc: str = "") -> None:
        self.cgroup_root = cgroup_root
        self.docker_root = docker_root or DOCKER_ROOT
        self.podman_root = podman_root or PODMAN_ROOT
        self.run_root = run_root or RUN_ROOT
        self.proc = proc or PROC_ROOT
        self._names = {}          # docker id -> ((mtime_ns, size), name or None)
        self._podman = ((0, -1), {})   # ((mtime_ns, size) of containers.json, {id: name})
        self.problems = []        # for the caller to say (once)

    # -------------------------------------------------------------- status

    def runtime_problem(self) -> str:
        """Why no container can match here ("" when a runtime is installed and running)."""
        docker = os.path.isdir(os.path.join(self.docker_root, "containers"))
        podman = os.path.isdir(os.path.join(self.podman_root, "overlay-containers"))
        if not docker and not podman:
            return (f"no container runtime here (neither Docker's {self.docker_root} nor "
                    f"Podman's {self.podman_root}); it matches nothing until one is installed")
        if docker and not podman and not self._dockerd_running():
            return (f"Docker is installed but dockerd is not running "
                    f"({self.run_root}/docker.pid names no dockerd); no container runs")
        return ""

    def _dockerd_running(self) -> bool:
        try:
            pid = int(read_bounded(os.path.join(self.run_root, "docker.pid"), 32))
            comm = read_bounded(f"{self.proc}/{pid}/comm", 64).strip()
        except (OSError, ValueError):
            return False
        return comm == b"dockerd"

    # ---------------------------------------------------------- resolution

    def running(self) -> list:
        """Every running container found in the cgroup tree whose name is known."""
        out, seen, looked = [], set(), 0
        for runtime, parent, prefix, suffix in PLACES:
            try:
                entries = os.listdir(os.path.join(self.cgroup_root, parent))
            except OSError:
                continue
            for entry in entries:
                if not (entry.startswith(prefix) and entry.endswith(suffix)):
                    continue
                cid = entry[len(prefix):len(entry) - len(suffix)]
                if not _ID.fullmatch(cid):
                    continue
                looked += 1
                if looked > MAX_CONTAINERS:
                    self.problems.append(f"more than {MAX_CONTAINERS} containers; the rest "
                                         f"are not matched")
                    return out
                name = self._docker_name(cid) if runtime == "docker" else self._podman_name(cid)
                if name is not None:
                    seen.add(cid)
                    out.append(Container(runtime, cid, name, f"/{parent}/{entry}"))
        for cid in [c for c in self._names if c not in seen]:   # removed containers
            del self._names[cid]
        return out

    def matching(self, pattern: str) -> list:
        """Running containers whose name matches the shell-style glob, by cgroup path."""
        return [c for c in self.running() if fnmatch.fnmatchcase(c.name, pattern)]

    def _docker_name(self, cid: str):
        path = os.path.join(self.docker_root, "containers", cid, "config.v2.json")
        try:
            st = os.stat(path)
        except OSError:
            return None          # created this instant, or not Docker's: next rescan
        mark = (st.st_mtime_ns, st.st_size)
        cached = self._names.get(cid)
        if cached is not None and cached[0] == mark:
            return cached[1]
        name = None
        try:
            data = json.loads(read_bounded(path))
            raw = data.get("Name") if isinstance(data, dict) else None
            if isinstance(raw, str) and raw.strip("/"):
                name = raw.lstrip("/")
            else:
                self.problems.append(f"{path} names no container")
        except OSError as e:
            self.problems.append(f"cannot read {path}: {e.strerror or e}")
        except ValueError as e:
            self.problems.append(f"{path} is not JSON ({e})")
        self._names[cid] = (mark, name)
        return name

    def _podman_name(self, cid: str):
        path = os.path.join(self.podman_root, "overlay-containers", "containers.json")
        try:
            st = os.stat(path)
        except OSError:
            return None
        mark = (st.st_mtime_ns, st.st_size)
        if self._podman[0] != mark:
            names = {}
            try:
                for entry in json.loads(read_bounded(path, 16 * METADATA_MAX)):
                    given = entry.get("names") if isinstance(entry, dict) else None
                    if isinstance(given, list) and given and isinstance(given[0], str):
                        names[str(entry.get("id"))] = given[0]
            except (OSError, ValueError, TypeError, AttributeError) as e:
                self.problems.append(f"cannot read {path}: {e}")
            self._podman = (mark, names)
        return self._podman[1].get(cid)
