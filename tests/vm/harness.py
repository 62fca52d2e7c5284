"""Nested-VM test harness: boot a Debian 12 guest with systemd and cgroup v2.

Why a VM: the host (a container) has no systemd as PID 1 and no usable cgroup v2
memory controller, and memwatchd must be tested against the real thing.

Flow:
    image = ensure_image()                       # built once, cached
    wheels = build_wheels(project_dir, out_dir)  # on the host, with network
    result = run_guest(script, wheels_dir=out_dir)
    assert result.exit_code == 0, result.describe()

The guest image is built by build-image.sh (debootstrap + kernel + a venv at
GUEST_VENV) and cached under ~/.cache/memwatchd/vm/<recipe hash>/. Each run
boots it with qemu (snapshot=on, so the cached image is never modified) and
shares one host folder over 9p. A unit baked into the image (guest/vm-runner)
mounts it after multi-user.target, installs the wheels offline, runs the script
as root and writes back:

    share/script.sh       the script (written by the host)
    share/wheels/*.whl    wheels to install (host), pip output in share/pip.log
    share/rootfs/...      extra_files with absolute guest paths (host), copied to /
    share/stdout, share/stderr, share/exit_code   (guest)
    share/runner_status   "ok" or what went wrong before/around the script (guest)
    share/journal.txt     `journalctl -b` of the run (guest)

The script sees $VM_SHARE (the share mount point) and may write its own result
files (e.g. JSON) there; read them back with GuestResult.read_json().

Standard library only: this module must not import memwatchd.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build-image.sh"
REPO_DIR = HERE.parent.parent
INSTALL_DEPS_SCRIPT = HERE / "install-deps.sh"
GUEST_VENV = "/opt/memwatchd-venv"
SHARE_TAG = "vmshare"
GUEST_SHARE = "/mnt/vmshare"
# Names in the share that belong to the harness protocol (see module docstring).
RESERVED_SHARE_NAMES = frozenset({
    "script.sh", "wheels", "rootfs", "stdout", "stderr", "exit_code", "exit_code.tmp",
    "runner_status", "pip.log", "journal.txt",
})
KERNEL_CMDLINE = (
    "console=ttyS0 root=/dev/vda rw panic=-1 systemd.unified_cgroup_hierarchy=1 "
    "memwatchd.vmrunner=1"
)
# After the guest reports its exit code it should power off in seconds; if it
# does not, the host stops waiting and kills qemu.
POWEROFF_GRACE_S = 30.0

log = logging.getLogger("memwatchd.tests.vm")

FileContent = Union[str, bytes, os.PathLike]


class HarnessUnavailable(RuntimeError):
    """The host cannot run the VM tier (missing tools, not root, ...)."""


class ImageBuildError(RuntimeError):
    """build-image.sh failed; the message carries the tail of its log."""


class WheelBuildError(RuntimeError):
    """`pip wheel` failed on the host; the message carries the tail of its output."""


# ---------------------------------------------------------------------------
# Host checks


def cache_root() -> Path:
    """Where images are cached; MEMWATCHD_VM_CACHE overrides (e.g. for CI caches)."""
    return Path(os.environ.get("MEMWATCHD_VM_CACHE", "~/.cache/memwatchd/vm")).expanduser()


def missing_tools(build: bool = True) -> List[str]:
    """Host programs the tier needs that are not on PATH (build=False: boot only)."""
    tools = ["qemu-system-x86_64"]
    if build:
        tools += ["debootstrap", "mkfs.ext4", "chroot"]
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [t for t in tools if shutil.which(t, path=search) is None]


def install_deps() -> subprocess.CompletedProcess:
    """Run install-deps.sh (apt-get installs qemu/debootstrap/e2fsprogs if missing)."""
    return subprocess.run(["sh", str(INSTALL_DEPS_SCRIPT)], capture_output=True, text=True)


def kvm_usable() -> bool:
    """KVM only with a real vmx/svm backend: a /dev/kvm from another backend (e.g. the
    nested "PVM" device on these hosts) crawls and then fails with a stock kernel."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    return any(Path("/sys/module", m).exists() for m in ("kvm_intel", "kvm_amd"))


def accel_args() -> List[str]:
    """qemu accelerator flags; MEMWATCHD_VM_ACCEL=kvm|tcg|auto (default auto)."""
    mode = os.environ.get("MEMWATCHD_VM_ACCEL", "auto").strip().lower()
    if mode not in ("auto", "kvm", "tcg"):
        raise ValueError("MEMWATCHD_VM_ACCEL must be kvm, tcg or auto, not %r" % mode)
    if mode == "auto":
        mode = "kvm" if kvm_usable() else "tcg"
    if mode == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg,thread=multi", "-cpu", "max"]


def debian_mirror() -> str:
    """The Debian mirror the host's apt uses (MEMWATCHD_VM_MIRROR overrides).

    Read from /etc/apt/sources.list.d/*.sources (deb822) or sources.list, so the
    harness follows whatever mirror/proxy the machine is configured for.
    """
    if os.environ.get("MEMWATCHD_VM_MIRROR"):
        return os.environ["MEMWATCHD_VM_MIRROR"]
    sources = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for path in sources:
        for stanza in re.split(r"\n\s*\n", path.read_text(errors="replace")):
            fields = dict(
                (k.strip().lower(), v.strip())
                for k, v in (line.split(":", 1) for line in stanza.splitlines()
                             if ":" in line and not line.lstrip().startswith("#")))
            suites = fields.get("suites", "").split()
            if "bookworm" in suites and "deb" in fields.get("types", "deb").split():
                return fields["uris"].split()[0]
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and "bookworm" in parts:
                return next(p for p in parts[1:] if "://" in p)
    raise HarnessUnavailable(
        "no bookworm mirror found in the host's apt sources; set MEMWATCHD_VM_MIRROR")


# ---------------------------------------------------------------------------
# Image


def recipe_files() -> List[Path]:
    """Everything that determines the image content; their hash is the cache key."""
    guest = sorted(p for p in (HERE / "guest").rglob("*") if p.is_file())
    return [BUILD_SCRIPT, HERE / "extract_vmlinux.py", HERE / "guest-packages.txt"] + guest


DEFAULT_SUITE = "bookworm"
# The releases the VM tier boots: Debian 12 for every scenario, Debian 13 for the package.
SUITES = ("bookworm", "trixie")


def recipe_hash(suite: str = DEFAULT_SUITE) -> str:
    """Short sha256 over the recipe files' names and contents (and the suite, if not bookworm)."""
    h = hashlib.sha256()
    if suite != DEFAULT_SUITE:
        h.update(b"suite=" + suite.encode() + b"\0")
    for path in recipe_files():
        h.update(str(path.relative_to(HERE)).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Image:
    """A complete cached guest image (never modified after the build's rename)."""

    dir: Path
    rootfs: Path
    kernel: Path       # uncompressed PVH vmlinux if the build extracted one, else vmlinuz
    initrd: Path
    info: Dict[str, str]

    @property
    def python_version(self) -> str:
        return self.info.get("python_version", "")


def _load_image(path: Path) -> Optional[Image]:
    """The image at path if it is complete, else None.

    info.json is written last inside the temp build dir, before the rename, so
    a directory under its final name without it was not made by ensure_image().
    """
    try:
        info = json.loads((path / "info.json").read_text())
    except (OSError, ValueError):
        return None
    kernel = path / "vmlinux"
    if not kernel.exists():
        kernel = path / "vmlinuz"
    files = [path / "rootfs.ext4", path / "initrd.img", kernel]
    if not all(f.exists() for f in files):
        return None
    return Image(dir=path, rootfs=files[0], kernel=kernel, initrd=files[1], info=info)


@contextlib.contextmanager
def _locked(lock_path: Path):
    """Exclusive fcntl lock: one image build at a time across processes.

    Released by closing, not LOCK_UN: a build child that inherited the fd (and
    outlived us) must keep holding it.
    """
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield lock_file.fileno()


def ensure_image(root: Optional[Path] = None, suite: str = DEFAULT_SUITE) -> Image:
    """Return the cached image for the current recipe, building it if needed.

    The build runs in <root>/<hash>.tmp-XXXX and is renamed to <root>/<hash> only
    on success, so an interrupted build never looks valid; leftovers of such
    builds are removed by the next build (under the lock, so none is running).
    """
    if suite not in SUITES:
        raise ValueError("suite %r: one of %s" % (suite, ", ".join(SUITES)))
    root = Path(root) if root else cache_root()
    digest = recipe_hash(suite)
    final = root / digest
    image = _load_image(final)
    if image:
        return image

    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / (digest + ".lock")) as lock_fd:
        image = _load_image(final)  # another process may have built it meanwhile
        if image:
            return image
        _check_can_build()
        for stale in root.glob(digest + ".tmp-*"):
            _remove_build_dir(stale)
        if final.exists():
            _remove_build_dir(final)
        tmp = Path(tempfile.mkdtemp(prefix=digest + ".tmp-", dir=root))
        mirror = debian_mirror()
        log.info("building %s guest image %s from %s (about 1-2 minutes)", suite, digest, mirror)
        started = time.monotonic()
        build_log = tmp / "build.log"
        try:
            proc = _run_build(tmp, mirror, build_log, lock_fd, suite)
        except BaseException:
            _remove_build_dir(tmp)
            raise
        if proc.returncode != 0:
            tail = build_log.read_text(errors="replace")[-4000:]
            raise ImageBuildError("build-image.sh failed (rc %d), log %s:\n%s"
                                  % (proc.returncode, build_log, tail))
        info = _read_key_values(tmp / "build-info.txt")
        info.update(recipe_hash=digest, mirror=mirror,
                    build_seconds="%.1f" % (time.monotonic() - started),
                    built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
        os.rename(tmp, final)
        log.info("guest image %s built in %s s", digest, info["build_seconds"])
    image = _load_image(final)
    assert image is not None, "image incomplete right after build: %s" % final
    return image


def _run_build(out_dir: Path, mirror: str, build_log: Path, lock_fd: int,
               suite: str = DEFAULT_SUITE):
    """Run build-image.sh in its own session; on any interruption kill that
    session (all of it is ours) so no debootstrap outlives the build.

    The lock fd is passed down: should this Python process die without
    cleaning up, the orphaned build keeps the lock until it exits, so no other
    build deletes its directory under it.
    """
    with open(build_log, "w") as out:
        proc = subprocess.Popen(["sh", str(BUILD_SCRIPT), str(out_dir), mirror, suite],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, pass_fds=(lock_fd,))
        try:
            proc.wait()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the group we created for it
                proc.wait()
    return proc


def _mounts_under(path: Path) -> List[str]:
    """Mount points at or below path, deepest first (from /proc/self/mountinfo)."""
    prefix = os.path.realpath(path).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mount_point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)),
                                 line.split()[4])
            if (mount_point.rstrip("/") + "/").startswith(prefix):
                found.append(mount_point)
    return sorted(found, key=len, reverse=True)


def _remove_build_dir(path: Path) -> None:
    """Delete a (possibly half-built) image dir, never through a mount.

    A killed debootstrap leaves /proc, /sys (or, in LXC, a bind of the host's
    /dev) mounted in its target; rmtree into those would damage the host.
    """
    for mount_point in _mounts_under(path):
        subprocess.run(["umount", "-l", mount_point], check=False)
    left = _mounts_under(path)
    if left:
        raise ImageBuildError("refusing to delete %s, still mounted: %s" % (path, left))
    shutil.rmtree(path)


def prune_images(root: Optional[Path] = None) -> List[Path]:
    """Delete cached images of other recipes (each is ~0.5 GB). Not automatic:
    another checkout may still use its own. Skips builds in progress (lock held)."""
    root = Path(root) if root else cache_root()
    current = {recipe_hash(suite) for suite in SUITES}
    removed = []
    for lock_path in sorted(root.glob("*.lock")):
        digest = lock_path.name[:-len(".lock")]
        if digest in current:
            continue
        with open(lock_path, "a") as lock_file:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            for path in [root / digest, *root.glob(digest + ".tmp-*")]:
                if path.exists():
                    _remove_build_dir(path)
                    removed.append(path)
            lock_path.unlink()
    return removed


def _check_can_build() -> None:
    missing = missing_tools(build=True)
    if missing:
        raise HarnessUnavailable("cannot build the guest image, missing: %s (run %s)"
                                 % (", ".join(missing), INSTALL_DEPS_SCRIPT))
    if os.geteuid() != 0:
        raise HarnessUnavailable("building the guest image needs root (debootstrap, chroot)")


def _read_key_values(path: Path) -> Dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {k.strip(): v.strip() for k, v in pairs}


# ---------------------------------------------------------------------------
# Wheels


def build_wheels(project_dir: Union[str, Path], out_dir: Union[str, Path],
                 python: Optional[str] = None, timeout: float = 900) -> List[Path]:
    """Build wheels for project_dir and all its dependencies into out_dir.

    Runs on the host (the guest has no network) on a copy of project_dir, so
    uncommitted edits are included. `pip wheel` also turns
    sdist-only dependencies into wheels. The guest runs CPython 3.11, so a
    project with a compiled extension must be built with a 3.11 interpreter
    (python, default: the one running this code).
    """
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="memwatchd-wheel-src-") as tmp:
        # Build from a clean copy: setuptools reuses ./build, so building in the
        # working tree can ship stale modules, and it would litter others' checkout.
        src = Path(tmp) / "src"
        _copy_source_tree(Path(project_dir), src)
        cmd = [python or sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check",
               "--wheel-dir", str(out_dir), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise WheelBuildError("pip wheel %s failed (rc %d):\n%s" % (
            project_dir, proc.returncode, (proc.stdout + proc.stderr)[-4000:]))
    return sorted(out_dir.glob("*.whl"))


def build_deb(suite: str, out_dir: Union[str, Path]) -> Path:
    """memwatchd_<version>_<arch>.deb for a Debian suite, built from a clean clone of
    this checkout's HEAD: on the host for bookworm (debian/build-in-clean-clone.sh), in
    a cached debootstrap chroot for the others (build-deb-in-chroot.sh). Root and apt."""
    out_dir = Path(out_dir)
    if suite == DEFAULT_SUITE:
        cmd = [str(REPO_DIR / "debian" / "build-in-clean-clone.sh"), str(out_dir)]
    else:
        cmd = [str(HERE / "build-deb-in-chroot.sh"), suite, str(out_dir), debian_mirror(),
               str(cache_root() / ("chroot-" + suite))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise HarnessUnavailable("building the %s .deb failed (rc %d):\n%s"
                                 % (suite, proc.returncode, (proc.stdout + proc.stderr)[-4000:]))
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()
    return next(out_dir.glob("memwatchd_*_%s.deb" % arch))


def _copy_source_tree(project_dir: Path, dest: Path) -> None:
    """Copy what git would see (tracked + untracked, minus .gitignore'd build
    products such as generated C); without git, copy all but usual build dirs."""
    proc = None
    if shutil.which("git"):
        proc = subprocess.run(["git", "-C", str(project_dir), "ls-files", "-z", "--cached",
                               "--others", "--exclude-standard"],
                              capture_output=True, stdin=subprocess.DEVNULL)
    if proc is None or proc.returncode != 0:
        shutil.copytree(project_dir, dest, symlinks=True, ignore=shutil.ignore_patterns(
            ".git", "build", "dist", "*.egg-info", "__pycache__", ".venv", "*.so"))
        return
    for rel in sorted(set(proc.stdout.decode().split("\0")) - {""}):
        src = project_dir / rel
        if src.is_file():  # deleted-but-tracked files are skipped
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target, follow_symlinks=False)


def make_test_wheel(out_dir: Union[str, Path], name: str = "vmsmoke_probe",
                    version: str = "0.1", source: str = "VALUE = 42\n") -> Path:
    """Write a one-module pure-Python wheel (no build tools, no network).

    For harness tests that must not depend on the project's own wheel building.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dist_info = "%s-%s.dist-info" % (name, version)
    files = {
        name + ".py": source,
        dist_info + "/METADATA": "Metadata-Version: 2.1\nName: %s\nVersion: %s\n" % (name, version),
        dist_info + "/WHEEL": ("Wheel-Version: 1.0\nGenerator: memwatchd-vm-harness\n"
                               "Root-Is-Purelib: true\nTag: py3-none-any\n"),
    }
    record = "".join("%s,,\n" % path for path in files) + dist_info + "/RECORD,,\n"
    files[dist_info + "/RECORD"] = record
    wheel = out_dir / ("%s-%s-py3-none-any.whl" % (name, version))
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return wheel


def check_wheels_compatible(wheels: Sequence[Path], python_version: str) -> None:
    """Fail early (not deep in the guest's pip log) on CPython-specific wheels
    built for another Python than the guest's, e.g. cp312 for a 3.11 guest."""
    want = "cp" + python_version.replace(".", "")
    for wheel in wheels:
        parts = wheel.name[:-len(".whl")].split("-")
        if len(parts) < 5:
            continue
        py_tags, abi_tags = parts[-3].split("."), parts[-2].split(".")
        if any(t.startswith("cp") for t in py_tags) and not {"abi3", "none"} & set(abi_tags) \
                and want not in py_tags:
            raise WheelBuildError("%s does not fit the guest's Python %s; build it with a "
                                  "python%s interpreter" % (wheel.name, python_version,
                                                           python_version))


# ---------------------------------------------------------------------------
# Running a guest


@dataclass
class GuestResult:
    """What one guest run produced. exit_code is None if the script never finished."""

    exit_code: Optional[int]
    stdout: str
    stderr: str
    console_log: str
    share_dir: Path
    duration: float
    timed_out: bool = False
    runner_status: str = ""
    qemu_returncode: Optional[int] = None
    cmd: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def read_text(self, name: str, default: Optional[str] = None) -> str:
        """A file the guest wrote to the share ($VM_SHARE/name)."""
        path = self.share_dir / name
        if not path.exists() and default is not None:
            return default
        return path.read_text(errors="replace")

    def read_json(self, name: str):
        return json.loads(self.read_text(name))

    @property
    def pip_log(self) -> str:
        return self.read_text("pip.log", default="")

    @property
    def journal(self) -> str:
        return self.read_text("journal.txt", default="")

    def describe(self, tail: int = 3000) -> str:
        """A compact failure report for assertion messages."""
        parts = ["exit_code=%s timed_out=%s runner_status=%r duration=%.1fs share=%s" % (
            self.exit_code, self.timed_out, self.runner_status, self.duration, self.share_dir)]
        for title, text in (("stdout", self.stdout), ("stderr", self.stderr),
                            ("pip.log", self.pip_log), ("console", self.console_log)):
            if text.strip():
                parts.append("--- %s (tail) ---\n%s" % (title, text[-tail:]))
        return "\n".join(parts)


def _qemu_path(path: Path) -> str:
    """qemu option values use ',' as separator; a literal comma is written ',,'."""
    return str(path).replace(",", ",,")


def _share_path(share: Path, key: str) -> Path:
    """Map an extra_files key to a host path in the share (absolute keys -> rootfs/)."""
    rel = key.lstrip("/")
    parts = Path(rel).parts
    if not parts or ".." in parts:
        raise ValueError("bad extra_files path: %r" % key)
    if key.startswith("/"):
        return share / "rootfs" / rel
    if parts[0] in RESERVED_SHARE_NAMES:
        raise ValueError("extra_files path %r clashes with the harness's %r" % (key, parts[0]))
    return share / rel


def _write_extra_file(dest: Path, content: FileContent) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        dest.write_bytes(content)
    elif isinstance(content, str):
        dest.write_text(content)
    else:  # a host file: copied with its mode, so executables stay executable
        shutil.copy2(os.fspath(content), dest)


def qemu_command(image: Image, share: Path, console_log: Path, mem_mb: int, cpus: int,
                 kernel_args: Sequence[str] = (), drives: Sequence[str] = ()) -> List[str]:
    """The qemu command line: no network, no display, serial console to a file; each of
    ``drives`` (a -drive option string) after the root disk: /dev/vdb, /dev/vdc, ..."""
    return [
        "qemu-system-x86_64",
        "-name", "memwatchd-vm",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        *accel_args(),
        "-smp", str(cpus), "-m", str(mem_mb),
        "-serial", "file:" + _qemu_path(console_log),
        "-kernel", str(image.kernel), "-initrd", str(image.initrd),
        "-append", " ".join([KERNEL_CMDLINE, *kernel_args]),
        # snapshot=on: guest writes go to a throw-away overlay; the cache stays pristine.
        "-drive", "file=%s,if=virtio,format=raw,snapshot=on" % _qemu_path(image.rootfs),
        "-virtfs", "local,path=%s,mount_tag=%s,security_model=none,id=%s"
                   % (_qemu_path(share), SHARE_TAG, SHARE_TAG),
        "-device", "virtio-rng-pci",  # entropy early in boot
        *[arg for drive in drives for arg in ("-drive", drive)],
    ]


def run_guest(script: str, wheels_dir: Optional[Union[str, Path]] = None,
              extra_files: Optional[Mapping[str, FileContent]] = None,
              mem_mb: int = 1024, timeout: float = 300, cpus: int = 2,
              image: Optional[Image] = None, run_dir: Optional[Union[str, Path]] = None,
              kernel_args: Sequence[str] = (), drives: Sequence[str] = ()) -> GuestResult:
    """Boot the guest, run `script` as root after multi-user.target, power off.

    script: file content with a shebang (e.g. "#!/bin/bash\\n..."); runs with
        cwd=$VM_SHARE and the guest venv's bin first on PATH.
    wheels_dir: every *.whl in it is pip-installed into the venv first
        (--no-index --find-links, so dependencies must be there too).
    extra_files: {path: str | bytes | host path}. Absolute paths are placed at
        that path in the guest before the wheels are installed (e.g. a config
        or a unit file); relative ones land in $VM_SHARE.
    timeout: seconds for the whole run, boot included; then qemu is killed by
        PID and the result has timed_out=True.
    run_dir: host folder for this run (default: a new temp dir, left in place
        for inspection); holds share/, console.log and qemu.log.
    drives: more disks, as qemu -drive option strings (the guest's /dev/vdb, ...).
    """
    image = image or ensure_image()
    if missing_tools(build=False):
        raise HarnessUnavailable("qemu-system-x86_64 not found (run %s)" % INSTALL_DEPS_SCRIPT)
    run_dir = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix="memwatchd-vm-"))
    share = run_dir / "share"
    share.mkdir(parents=True, exist_ok=True)
    script_path = share / "script.sh"
    script_path.write_text(script)
    script_path.chmod(0o755)
    if wheels_dir is not None:
        wheels = sorted(Path(wheels_dir).glob("*.whl"))
        if not wheels:
            raise ValueError("no *.whl in %s" % wheels_dir)
        check_wheels_compatible(wheels, image.python_version)
        (share / "wheels").mkdir(exist_ok=True)
        for wheel in wheels:
            shutil.copy2(wheel, share / "wheels" / wheel.name)
    for key, content in (extra_files or {}).items():
        _write_extra_file(_share_path(share, key), content)

    console_log = run_dir / "console.log"
    cmd = qemu_command(image, share, console_log, mem_mb, cpus, kernel_args, drives)
    exit_file = share / "exit_code"
    started = time.monotonic()
    timed_out = False
    with open(run_dir / "qemu.log", "w") as qemu_out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=qemu_out,
                                stderr=subprocess.STDOUT)
        try:
            timed_out = _wait_for_guest(proc, exit_file, started + timeout)
        finally:
            if proc.poll() is None:  # timeout, no poweroff, or we were interrupted
                proc.kill()          # our own child, by PID
                proc.wait()
    duration = time.monotonic() - started

    exit_code = None
    if exit_file.exists():
        with contextlib.suppress(ValueError):
            exit_code = int(exit_file.read_text().strip())

    def text(path: Path) -> str:
        return path.read_text(errors="replace") if path.exists() else ""

    return GuestResult(
        exit_code=exit_code, stdout=text(share / "stdout"), stderr=text(share / "stderr"),
        console_log=text(console_log), share_dir=share, duration=duration,
        timed_out=timed_out, runner_status=text(share / "runner_status").strip(),
        qemu_returncode=proc.returncode, cmd=cmd)


def _wait_for_guest(proc: subprocess.Popen, exit_file: Path, deadline: float) -> bool:
    """Wait for qemu to exit; True if the deadline passed first.

    Once the guest has written its exit code it gets POWEROFF_GRACE_S to power
    off; a hang in shutdown is not a test failure, the caller kills qemu.
    """
    done_at = None
    while proc.poll() is None:
        now = time.monotonic()
        if done_at is None and exit_file.exists():
            done_at = now
        if done_at is not None and now - done_at > POWEROFF_GRACE_S:
            log.warning("guest reported a result but did not power off; killing qemu")
            return False
        if now >= deadline:
            return done_at is None
        time.sleep(0.2)
    return False


# ---------------------------------------------------------------------------
# CLI for working on scenarios by hand


def main(argv: Optional[Sequence[str]] = None) -> int:
    """python3 tests/vm/harness.py build | prune | run SCRIPT [--wheels DIR] [--project DIR]"""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build (or find) the cached guest image")
    sub.add_parser("prune", help="delete cached images of other recipes")
    run = sub.add_parser("run", help="boot the guest and run a script in it")
    run.add_argument("script", type=Path)
    run.add_argument("--wheels", type=Path, help="folder of wheels to install")
    run.add_argument("--project", type=Path, help="build wheels from this project first")
    run.add_argument("--mem-mb", type=int, default=1024)
    run.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cmd == "prune":
        for path in prune_images():
            print("removed", path)
        return 0

    started = time.monotonic()
    image = ensure_image()
    print("image: %s (%.1f s)" % (image.dir, time.monotonic() - started))
    if args.cmd == "build":
        return 0
    wheels = args.wheels
    if args.project:
        wheels = Path(tempfile.mkdtemp(prefix="memwatchd-wheels-"))
        build_wheels(args.project, wheels)
    result = run_guest(args.script.read_text(), wheels_dir=wheels, mem_mb=args.mem_mb,
                       timeout=args.timeout, image=image)
    print(result.describe())
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
