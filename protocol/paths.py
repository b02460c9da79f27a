"""Where agents listen, and how their files are made safely. Shared by the agent (to bind), the
launcher (its log file) and the viewer (to find and list).

The default directory is private like tmux's or ssh-agent's: created ``mkdir(0700)``, then checked
with ``lstat``/``fstat`` (a real directory, not a symlink, owned by us, mode 0700). A directory that
fails the check (another user made ``/tmp/llmtop-<uid>`` first, or put a symlink there) is refused
with a one-line message and a fresh ``mkdtemp`` directory is used instead, so the script still runs.
Every file in it is created with ``O_EXCL|O_NOFOLLOW`` relative to the directory's descriptor.
See SECURITY.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import re
import socket
import stat
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_fallbacks: dict[str, Path] = {}  # unsafe default dir -> this process's private replacement


class UnsafeDirectory(OSError):
    """A socket directory that another user could control: refused."""

    def __str__(self) -> str:  # one line, without the "[Errno N]" prefix
        return str(self.strerror)


def socket_dir() -> Path:
    """``$XDG_RUNTIME_DIR/llmtop``, else ``/tmp/llmtop-<uid>`` (not checked: see ``private_socket_dir``)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "llmtop"
    return Path(f"/tmp/llmtop-{os.getuid()}")


def _fallback_prefix() -> str:
    return f"llmtop-{os.getuid()}-"


def check_private(fd: int, path: Path) -> None:
    """Raise ``UnsafeDirectory`` unless the open directory ``fd`` is ours, mode 0700."""
    st = os.fstat(fd)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirectory(errno.ENOTDIR, f"{path} is not a directory")
    if st.st_uid != os.getuid():
        raise UnsafeDirectory(errno.EPERM, f"{path} belongs to uid {st.st_uid}, not to uid {os.getuid()}")
    if stat.S_IMODE(st.st_mode) != 0o700:
        raise UnsafeDirectory(errno.EPERM, f"{path} has mode {stat.S_IMODE(st.st_mode):o}, not 700")


def open_private_dir(path: Path, create: bool = True) -> int:
    """A descriptor on ``path``, a private directory (created 0700 if missing). Raises
    ``UnsafeDirectory`` (one-line message) when it is a symlink, not ours or not 0700."""
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeDirectory(errno.ELOOP, f"{path} is a symlink")
    try:
        fd = os.open(path, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC)
    except OSError as exc:
        raise UnsafeDirectory(exc.errno or errno.EPERM, f"{path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) != 0o700:
            os.fchmod(fd, 0o700)  # ours (an older llmtop's, a umask): fixed through the checked fd, never a path
        check_private(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def private_socket_dir() -> Path:
    """The checked default socket directory, or a fresh private one (with a one-line warning on
    stderr, once per process) when the default is unsafe or cannot be made."""
    wanted = socket_dir()
    try:
        fd = open_private_dir(wanted)
    except OSError as exc:
        fallback = _fallbacks.get(str(wanted))
        if fallback is not None and fallback.is_dir():
            return fallback
        inherited = _inherited_fallback()
        if inherited is not None:  # the launcher already warned and chose one: share it
            _fallbacks[str(wanted)] = inherited
            return inherited
        reason = str(exc) if isinstance(exc, UnsafeDirectory) else f"{wanted}: {exc.strerror or exc}"
        fallback = Path(tempfile.mkdtemp(prefix=_fallback_prefix()))  # 0700, a name nobody can guess
        _fallbacks[str(wanted)] = fallback
        print(f"llmtop: refusing unsafe socket directory ({reason}); using {fallback}", file=sys.stderr)
        return fallback
    os.close(fd)
    return wanted


def is_default_dir(directory: Path) -> bool:
    """The default socket directory, or one of the private fallbacks made for it."""
    if directory == socket_dir():
        return True
    return directory.parent == Path(tempfile.gettempdir()) and directory.name.startswith(_fallback_prefix())


def _inherited_fallback() -> Path | None:
    """The private fallback directory ``llmtop attach`` chose for us (through ``$LLMTOP_SOCKET``)."""
    chosen = os.environ.get("LLMTOP_SOCKET")
    if not chosen:
        return None
    parent = Path(chosen).parent
    if parent == socket_dir() or not is_default_dir(parent):
        return None
    try:
        os.close(open_private_dir(parent, create=False))
    except OSError:
        return None
    return parent


def socket_path_for(pid: int) -> Path:
    """The socket an agent in process ``pid`` listens on, unless ``$LLMTOP_SOCKET`` chose another."""
    return private_socket_dir() / f"{pid}.sock"


def info_path(sock: Path) -> Path:
    """A small JSON file beside each socket so ``llmtop ls`` can describe an agent without connecting."""
    return sock.with_suffix(".json")


# --- files inside a private directory ----------------------------------------------------------------


@contextlib.contextmanager
def dir_fd(directory: Path) -> Iterator[int]:
    fd = os.open(directory, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def create_exclusive(directory: Path, name: str, replace_stale: bool = True) -> int:
    """Open ``directory/name`` for writing, created here and now (``O_EXCL|O_NOFOLLOW`` relative to
    the directory's descriptor): never an existing file or a symlink's target. ``replace_stale``:
    an existing entry of that name is unlinked first (unlink never follows a symlink)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
    with dir_fd(directory) as dfd:
        try:
            return os.open(name, flags, 0o600, dir_fd=dfd)
        except FileExistsError:
            if not replace_stale:
                raise
            os.unlink(name, dir_fd=dfd)
            return os.open(name, flags, 0o600, dir_fd=dfd)


def write_json_atomic(path: Path, data: object) -> Path:
    """Write ``data`` to ``path`` through a ``mkstemp`` file renamed into place (rename replaces a
    symlink, never writes through it)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


# --- live or stale -----------------------------------------------------------------------------------


def socket_is_live(path: Path, timeout: float = 0.5) -> bool:
    """True if something accepts connections on the Unix socket ``path``; False for a file nobody
    listens on (left by a killed process), a missing path, or not a socket."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
    except OSError:
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(timeout)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_alive = pid_alive  # the old private name


def clean_stale(directory: Path) -> list[str]:
    """Remove ``.sock``/``.json`` pairs that dead processes left in ``directory`` (a private one).
    Returns the names removed. An info file names its pid; a socket without one is probed."""
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    with contextlib.ExitStack() as stack:
        try:
            dfd = stack.enter_context(dir_fd(directory))
        except OSError:
            return removed
        for name in names:
            if not name.endswith(".json") or name.startswith("."):
                continue
            try:
                fd = os.open(name, os.O_RDONLY | _NOFOLLOW | _CLOEXEC, dir_fd=dfd)
                with os.fdopen(fd) as f:
                    pid = int(json.load(f)["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if pid_alive(pid):
                continue
            for stale in (name, name[: -len(".json")] + ".sock"):
                with contextlib.suppress(OSError):
                    os.unlink(stale, dir_fd=dfd)
                    removed.append(stale)
        for name in names:
            if not name.endswith(".sock") or name in removed:
                continue
            if (name[: -len(".sock")] + ".json") in names and name[: -len(".sock")] + ".json" not in removed:
                continue  # described by a live agent's info file
            m = re.match(r"^(?:attach-)?(\d+)\.sock$", name)
            if m and pid_alive(int(m.group(1))) and socket_is_live(directory / name):
                continue
            if not m and socket_is_live(directory / name):
                continue
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dfd)
                removed.append(name)
    return removed


# --- listing -----------------------------------------------------------------------------------------


@dataclass
class AgentInfo:
    """One agent's info file. The rank fields are empty/None for a single process and in info files
    written by an older llmtop; ``attach`` is the pid of the ``llmtop attach`` that started the
    process tree (``LLMTOP_ATTACH``), None outside one."""

    pid: int
    socket: str
    argv: list[str]
    started: float
    job: str = ""
    launcher: str = ""
    rank: int | None = None
    local_rank: int | None = None
    world_size: int | None = None
    node_rank: int | None = None
    restart: int | None = None
    host: str = ""
    attach: int | None = None

    @property
    def script(self) -> str:
        return " ".join(self.argv) if self.argv else "?"

    @property
    def distributed(self) -> bool:
        """One rank of a job of several (grouped under its job by ``llmtop ls``)."""
        return self.rank is not None and (self.world_size or 0) > 1

    @classmethod
    def from_json(cls, data: dict) -> AgentInfo:
        """From an info file's JSON; raises ValueError/KeyError/TypeError on a malformed one. Fields
        an older agent did not write keep their defaults; a field of the wrong type is dropped."""
        info = cls(int(data["pid"]), str(data["socket"]), [str(a) for a in data["argv"]], float(data["started"]))
        for name in ("job", "launcher", "host"):
            value = data.get(name)
            if isinstance(value, str):
                setattr(info, name, value)
        for name in ("rank", "local_rank", "world_size", "node_rank", "restart", "attach"):
            value = data.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                setattr(info, name, value)
        return info

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class UnreadableDirectory(OSError):
    """The socket directory exists but cannot be listed (one-line message)."""

    def __str__(self) -> str:
        return str(self.strerror)


def search_dirs() -> list[Path]:
    """Where this user's agents can be: the default socket directory and the private fallbacks made
    when it was unsafe, each only if it passes the ownership check (a directory another user
    controls could hold their socket under our agent's name)."""
    tmp = Path(tempfile.gettempdir())
    try:
        extra = sorted(p for p in tmp.iterdir() if p.name.startswith(_fallback_prefix()))
    except OSError:
        extra = []
    dirs: list[Path] = []
    for p in [socket_dir(), *extra]:
        try:
            fd = open_private_dir(p, create=False)
        except OSError:
            continue  # missing, or someone else's look-alike: never trust it
        os.close(fd)
        dirs.append(p)
    return dirs


def list_agents(directory: Path | None = None, strict: bool = False) -> list[AgentInfo]:
    """Live agents whose info files are in ``directory`` (default: every search dir); stale files
    of dead processes are ignored. ``strict``: an unreadable directory raises ``UnreadableDirectory``."""
    found: list[AgentInfo] = []
    for d in [directory] if directory is not None else search_dirs():
        try:
            metas = sorted(n for n in os.listdir(d) if n.endswith(".json") and not n.startswith("."))
        except FileNotFoundError:
            continue
        except OSError as exc:
            if strict:
                raise UnreadableDirectory(exc.errno or errno.EACCES,
                                          f"cannot read {d}: {exc.strerror or exc}") from None
            continue
        for name in metas:
            try:
                info = AgentInfo.from_json(json.loads((d / name).read_text()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
            if pid_alive(info.pid) and os.path.exists(info.socket):
                found.append(info)
    return found


class UnreachableTarget(ValueError):
    """The target's directory cannot be read (permissions): ``llmtop watch`` exits 2 on it."""


def resolve_target(target: str) -> Path:
    """``PID`` or a socket path → the socket path. Raises ValueError with a one-line message
    (``UnreachableTarget`` when a directory on the way cannot be read)."""
    if target.isdigit():
        pid = int(target)
        try:
            agents = list_agents(strict=True)
        except UnreadableDirectory as exc:
            raise UnreachableTarget(str(exc)) from None
        for info in agents:
            if info.pid == pid:
                return Path(info.socket)
        for d in search_dirs():
            if (d / f"{pid}.sock").exists():
                return d / f"{pid}.sock"
        raise ValueError(f"no llmtop agent found for pid {pid} (try `llmtop ls`)")
    path = Path(target)
    try:
        st = os.stat(path)
    except PermissionError:
        raise UnreachableTarget(f"cannot reach {target}: permission denied (its directory is not readable)") from None
    except OSError:
        raise ValueError(f"no such socket: {target}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ValueError(f"not a socket: {target}")
    return path
