"""Build the Dockerfile's images without a daemon or a registry: buildah, a debootstrap stand-in base.

- The pinned `python:3.11-slim-bookworm` cannot be pulled here; `debootstrap --variant=minbase` of
  Debian bookworm with python3 (3.11), pip and venv, imported into buildah, stands in for it (the
  Dockerfile takes its bases as build args). It is cached under build/imagetest/ of this clone, keyed by
  the debootstrap command and the host's CA bundle, so one suite run pays for it once and a fresh clone
  always makes its own.
- The stand-in differs from the official image in three ways, each made equal here: Debian marks its
  python "externally managed" (PEP 668; the official image's /usr/local python is not), names it only
  python3 (python-is-python3 adds `python`), and trusts Debian's CAs only (the host's bundle is copied
  in, so pip reaches PyPI through the same TLS interception the host's pip does).
- Storage: native overlay where the kernel lets buildah use it (it does on these machines), else vfs,
  which copies every layer in full (a 1.4 GB image costs several GB and minutes of copying: keep the
  build context small, .dockerignore starts from `*`).
- `buildah run --isolation chroot` runs a command in a container of an image on the host network;
  `podman run` does not work here (crun's setrlimit is refused in this sandbox).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tests.support.paths import REPO

WORK = REPO / "build" / "imagetest"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBOOTSTRAP = ["debootstrap", "--variant=minbase",
               "--include=python3,python3-venv,python3-pip,python-is-python3", "bookworm"]
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
STANDIN = "localhost/largemodel-standin/python:3.11-slim-bookworm"
# What pip inside the CPU runtime build fetches from the loopback index (TORCH_CPU_INDEX).
TORCH_CPU = "torch==2.13.0+cpu"


def log(message: str) -> None:
    """One progress line on the real stderr (pytest -s shows it; the durations are in the test report)."""
    print(f"[imagebuild {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _run(cmd: Sequence[str], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[:6])} ... exited {done.returncode}:\n"
                             f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def standin_tarball() -> Path:
    """A tar of the bookworm + Python 3.11 root filesystem; built once per clone (about 2.5 minutes)."""
    key = hashlib.sha256(json.dumps([DEBOOTSTRAP, DEBIAN_MIRROR]).encode() + HOST_CA_BUNDLE.read_bytes())
    tarball = WORK / f"standin-bookworm-py311-{key.hexdigest()[:12]}.tar"
    with _locked(WORK / "standin.lock"):
        if tarball.exists():
            return tarball
        rootfs = WORK / "standin-rootfs"
        shutil.rmtree(rootfs, ignore_errors=True)
        log(f"debootstrap {DEBOOTSTRAP[-1]} into {rootfs}")
        _run([*DEBOOTSTRAP, str(rootfs), DEBIAN_MIRROR], timeout=900)
        for leftover in [*(rootfs / "var/cache/apt/archives").glob("*.deb"), *(rootfs / "var/lib/apt/lists").glob("*_*")]:
            leftover.unlink()
        for marker in (rootfs / "usr/lib").glob("python3*/EXTERNALLY-MANAGED"):
            marker.unlink()
        shutil.copyfile(HOST_CA_BUNDLE, rootfs / "etc/ssl/certs/ca-certificates.crt")
        partial = tarball.with_suffix(".partial")
        _run(["tar", "-C", str(rootfs), "-cf", str(partial), "."], timeout=300)
        partial.rename(tarball)
        shutil.rmtree(rootfs)
    return tarball


class Buildah:
    """buildah with its own storage under build/imagetest/ (removed by close())."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.driver = ""
        self.base: list[str] = []

    def use(self, driver: str) -> None:
        self.driver = driver
        self.base = ["buildah", "--root", str(self.home / driver / "storage"),
                     "--runroot", str(self.home / driver / "run"), "--storage-driver", driver]

    def __call__(self, *args: str, timeout: float = 120, **kwargs: Any) -> str:
        return _run([*self.base, *args], timeout=timeout, **kwargs).stdout.strip()

    def import_rootfs(self, tarball: Path, name: str) -> None:
        """`docker import`, in buildah: a scratch container with the tar added, committed as `name`."""
        ctr = self("from", "scratch")
        try:
            self("add", ctr, str(tarball), "/", timeout=300)
            self("config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                 "--env", "LANG=C.UTF-8", "--cmd", '["python3"]', ctr)
            self("commit", "--quiet", ctr, name, timeout=300)
        finally:
            self("rm", ctr)

    def build(self, tag: str, target: str, build_args: dict[str, str], log_path: Path, timeout: float) -> float:
        """`buildah build --target target` of the repository's Dockerfile; seconds it took."""
        cmd = [*self.base, "build", "--isolation", "chroot", "--pull=false", "--format", "docker",
               "--target", target, "--tag", tag]
        for key, value in build_args.items():
            cmd += ["--build-arg", f"{key}={value}"]
        began = time.monotonic()
        with log_path.open("w") as out:
            done = subprocess.run([*cmd, str(REPO)], stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False)
        if done.returncode != 0:
            raise AssertionError(f"building {target} failed ({log_path}):\n{log_path.read_text()[-5000:]}")
        return time.monotonic() - began

    def inspect(self, image: str) -> dict[str, Any]:
        return dict(json.loads(self("inspect", "--type", "image", image)))

    def size_mb(self, image: str) -> float:
        """The image's unpacked size, as `buildah images` reports it (MB = 10^6 bytes)."""
        size = json.loads(self("images", "--json", image))[0]["size"]  # "231 MB", "1.42 GB"
        number, unit = size.split()
        return float(number) * {"kB": 1e-3, "MB": 1.0, "GB": 1e3}[unit]

    def run_argv(self, ctr: str, cmd: Sequence[str], *, user: str | None = None, env: dict[str, str] | None = None,
                 volumes: Sequence[str] = (), tmpfs: Sequence[str] = ()) -> list[str]:
        argv = [*self.base, "run", "--isolation", "chroot"]
        if user:
            argv += ["--user", user]
        for key, value in (env or {}).items():
            argv += ["--env", f"{key}={value}"]
        for volume in volumes:
            argv += ["--volume", volume]
        for path in tmpfs:
            argv += ["--mount", f"type=tmpfs,destination={path}"]
        return [*argv, ctr, "--", *cmd]

    def run(self, ctr: str, cmd: Sequence[str], timeout: float = 120, check: bool = True,
            **kwargs: Any) -> subprocess.CompletedProcess[str]:
        argv = self.run_argv(ctr, cmd, **kwargs)
        if check:
            return _run(argv, timeout=timeout)
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)

    def close(self) -> None:
        if self.base:
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                self("rm", "--all", timeout=300)
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                self("rmi", "--all", "--force", timeout=600)
        for driver in ("overlay", "vfs"):
            path = self.home / driver
            if path.exists():
                subprocess.run(["umount", "-R", "-l", str(path / "storage")], capture_output=True, check=False)
                shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.home.rmdir()


def open_buildah(home: Path, tarball: Path) -> Buildah:
    """Buildah with the stand-in base imported: overlay storage if a container of it runs, else vfs."""
    buildah = Buildah(home)
    for driver in ("overlay", "vfs"):
        buildah.use(driver)
        try:
            buildah.import_rootfs(tarball, STANDIN)
            ctr = buildah("from", "--pull=false", STANDIN)
            buildah.run(ctr, ["python", "-c", "import sys; assert sys.version_info[:2] == (3, 11)"], timeout=60)
            buildah("rm", ctr)
            log(f"buildah storage driver {driver}")
            return buildah
        except AssertionError as err:
            log(f"buildah storage driver {driver} unusable: {str(err)[-300:]}")
            buildah.close()
    raise AssertionError("buildah can use neither overlay nor vfs storage here")


@contextlib.contextmanager
def readonly_container(buildah: Buildah, image: str, mountpoints: Sequence[str]) -> Iterator[str]:
    """A container of `image` whose root filesystem is mounted read-only, like readOnlyRootFilesystem.

    buildah run has no --read-only: the container's root is bind-mounted read-only onto itself, after a
    first `buildah run` (as root, inside the container, so that absolute symlinks such as /var/run ->
    /run resolve in the container and never on the host) has made the mount points buildah and the
    volumes need.
    """
    ctr = buildah("from", "--pull=false", image)
    mounted = ""
    try:
        buildah.run(ctr, ["mkdir", "-p", *mountpoints], user="0:0")
        mounted = buildah("mount", ctr)
        # ... and the one it bind-mounts at every run, made here (on the host, so never through a link).
        run_dir = Path(mounted) / "run"
        assert run_dir.is_dir() and not run_dir.is_symlink(), f"{image}: /run is not a directory"
        (run_dir / ".containerenv").touch()
        _run(["mount", "--bind", mounted, mounted], timeout=30)
        _run(["mount", "-o", "remount,bind,ro", mounted], timeout=30)
        yield ctr
    finally:
        if mounted:
            subprocess.run(["umount", mounted], capture_output=True, check=False)
            with contextlib.suppress(AssertionError):
                buildah("umount", ctr)
        buildah("rm", ctr)


@contextlib.contextmanager
def running(argv: list[str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A background `buildah run`; its whole process group is stopped (TERM, then KILL) at the end."""
    with log_path.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc
        finally:
            for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
                if proc.poll() is not None:
                    break
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(wait)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        pass


@contextlib.contextmanager
def torch_cpu_index(folder: Path) -> Iterator[str]:
    """A PEP 503 index on 127.0.0.1 holding torch 2.13.0+cpu and its requirements, as PyTorch's CPU index does.

    The files come from the host's own pip (`pip download`, with its find-links and indexes: the same
    wheel scripts/setup.sh installs); the build reaches the server because chroot isolation shares the
    host network.
    """
    files = folder / "files"
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(files), TORCH_CPU], timeout=600)
    simple = folder / "simple"
    for wheel in files.iterdir():
        project = simple / re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
        project.mkdir(parents=True, exist_ok=True)
        (project / wheel.name).symlink_to(wheel)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_QuietHandler, directory=str(simple)))
    thread = threading.Thread(target=server.serve_forever, name="torch-cpu-index", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
