"""Small shared helpers: seeding, device choice, atomic writes, progress bars, JSON."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import sys
import tempfile
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .errors import BadExpertError
from .jsonable import to_jsonable  # noqa: F401 - the one JSON policy, re-exported


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch, and return a CPU generator seeded with ``seed``.

    Library code never draws from the global RNGs for its own choices: it takes a generator
    derived from the one seed (see :func:`derive_generator`). Seeding the globals as well covers
    weight initialisation of freshly built models and third-party code.
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def derive_generator(seed: int, purpose: str) -> torch.Generator:
    """A CPU generator for one purpose ("split", "poison", ...), derived from ``seed``.

    Different purposes get independent streams, so adding a random choice in one place does not
    shift the numbers drawn in another.
    """
    h = 1469598103934665603
    for ch in f"{seed}:{purpose}".encode():
        h = ((h ^ ch) * 1099511628211) % (2**64)
    return torch.Generator().manual_seed(h % (2**63))


@contextlib.contextmanager
def seeded_rng(seed: int, purpose: str) -> Iterator[None]:
    """Run a block (building a network: its initial weights) with torch's global CPU generator
    seeded from ``seed`` and ``purpose`` (:func:`derive_generator`), leaving the caller's random
    state as it was: the same seed gives the same weights whatever ran before."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_generator(seed, purpose).initial_seed())
        yield


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` or ``"auto"`` picks the GPU when one is present, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise BadExpertError(f"invalid device '{device}'; use 'auto', 'cpu' or 'cuda[:N]'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadExpertError(f"device '{device}' asked for but no CUDA GPU is available; use --device cpu")
    return dev


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(*models: torch.nn.Module) -> Iterator[None]:
    """Put models in eval mode for the block and restore the previous mode of every submodule
    after (restoring only the top module's would switch an eval-mode model wrapped in a
    train-mode one to train mode)."""
    modes = [(sub, sub.training) for m in models for sub in m.modules()]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for sub, was in modes:
            sub.training = was


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: never half-written.

    A failure to write (disk full, read-only or virtual file system, permissions) is one
    :class:`BadExpertError`; the temporary file and any parent directory made for it are removed."""
    path = Path(path)
    created: list[Path] = []
    tmp = None
    try:
        created = _make_parents(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; results are meant to be shared
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        _remove_dirs(created)
        if isinstance(exc, OSError):
            raise write_error(path, exc) from exc
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


_BUILDING: ContextVar[str | None] = ContextVar("badexpert_building", default=None)


def _lock_file(path: Path) -> Path:
    """Where the lock of cache entry ``path`` lives: ``.locks/<name>.lock`` beside it."""
    return path.parent / ".locks" / f"{path.name}.lock"


@contextlib.contextmanager
def build_lock(path: str | Path | None, *, log=None, what: str = "it") -> Iterator[None]:
    """Hold an exclusive lock while building what will be saved at ``path`` (a cache entry), so that
    processes sharing a cache (``grid --jobs``, ``--shard``) build it once: a second process waits,
    then finds it cached. Check for the cached file *inside* the block.

    The lock is ``.locks/<name>.lock`` beside ``path`` (left in place: removing it would race with a
    waiter). ``None``, a directory that does not exist yet, a platform without ``fcntl`` or a
    directory where no lock can be taken (read only, a file system that refuses locks): the block
    runs unlocked."""
    fd = None
    if path is not None:
        try:
            import fcntl

            path = Path(path)
            if not path.parent.is_dir():  # nothing shares a cache that does not exist yet
                raise FileNotFoundError(path.parent)
            lock = _lock_file(path)
            lock.parent.mkdir(exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if log is not None:
                    log(f"waiting for another process building {what} ({path.name})")
                fcntl.flock(fd, fcntl.LOCK_EX)
        except (ImportError, OSError):
            if fd is not None:
                os.close(fd)
            fd = None
    token = _BUILDING.set(None if path is None else Path(path).name)
    try:
        yield
    finally:
        _BUILDING.reset(token)
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the lock


@contextlib.contextmanager
def claim(path: str | Path) -> Iterator[bool]:
    """Try to take the exclusive lock of ``path`` (a cache entry, as :func:`build_lock` does) without
    waiting: the block gets ``True`` when this process holds it, ``False`` when another process
    does (the work is theirs). Released when the block ends or the process dies, so a killed
    process leaves no stale claim. Where locks cannot be taken (no ``fcntl``, a file system that
    refuses them) every process gets ``True``: the work may be done twice, never left undone."""
    fd = None
    try:
        import fcntl

        lock = _lock_file(Path(path))
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        yield False
        return
    except (ImportError, OSError):
        if fd is not None:
            os.close(fd)
        fd = None
    try:
        yield True
    finally:
        if fd is not None:
            os.close(fd)


def building() -> str | None:
    """The cache entry the innermost :func:`build_lock` block is building (its file name: the cache
    moves with it), or ``None`` outside one: what an interrupted training's checkpoint is kept for,
    so that two cache entries whose trainings start alike (online poisoning of the same clean data,
    the same initial weights) never resume from each other's state."""
    return _BUILDING.get()


def being_built(path: str | Path) -> bool:
    """Whether another process holds the :func:`build_lock` of ``path`` now (it is building what
    will be saved there). Creates nothing; ``False`` wherever locks cannot be checked."""
    path = Path(path)
    try:
        import fcntl

        fd = os.open(_lock_file(path), os.O_RDONLY)
    except (ImportError, OSError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


# --- output locations: checked before any work, written atomically ------------------------------
def _nearest_existing(p: Path) -> Path:
    """``p`` or its nearest ancestor that exists (``os.path.exists``: a name that cannot be
    looked up, too long or unreadable, counts as missing, so the walk never raises)."""
    p = p.absolute()
    while not os.path.exists(p) and p != p.parent:
        p = p.parent
    return p


def _reason(exc: OSError) -> str:
    """A short, lower-case reason for an OSError met while writing."""
    reasons = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on the device",
               errno.EDQUOT: "disk quota exceeded", errno.ENAMETOOLONG: "file name too long",
               errno.ENOENT: "the file system does not allow new files there",
               errno.ENOTDIR: "a part of the path is a file, not a directory", errno.EXDEV: "another file system"}
    return reasons.get(exc.errno, (exc.strerror or type(exc).__name__).lower())


def write_error(target: str | Path, exc: OSError, note: str = "nothing was written") -> BadExpertError:
    """The one-line error for an OSError met while writing ``target``."""
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return BadExpertError(f"cannot write '{target}' ({_reason(exc)}); {note}; "
                          f"{'free space or ' if full else ''}choose another location")


def _make_parents(directory: Path) -> list[Path]:
    """Create ``directory`` and its missing ancestors; return the ones created, outermost first."""
    missing = []
    p = directory.absolute()
    while not os.path.exists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    created: list[Path] = []
    try:
        for d in reversed(missing):
            d.mkdir(exist_ok=True)
            created.append(d)
    except BaseException:
        _remove_dirs(created)
        raise
    return created


def _remove_dirs(created: list[Path]) -> None:
    """Remove the directories :func:`_make_parents` created (innermost first) where still empty."""
    for d in reversed(created):
        with contextlib.suppress(OSError):
            d.rmdir()


def _check_creatable(target: Path) -> None:
    """``target`` can be created: its name is valid, and its nearest existing ancestor is a
    directory in which a file can really be made (a probe file, removed at once: permission bits
    say nothing for root, and /proc or /sys refuse new files whatever they say)."""
    target = Path(target)
    if "\0" in str(target):
        raise BadExpertError(f"the output path {str(target)!r} holds a NUL character; choose another location")
    anc = _nearest_existing(target.parent)
    if not os.path.isdir(anc):
        raise BadExpertError(f"cannot create '{target}': '{anc}' is a file, not a directory; choose another location")
    try:
        name_max = os.pathconf(anc, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    for part in target.absolute().relative_to(anc).parts:
        if len(os.fsencode(part)) > name_max:
            raise BadExpertError(f"cannot create '{target}': the name '{part[:40]}...' is longer than {name_max} "
                                 "bytes; choose a shorter one")
    if len(os.fsencode(str(target.absolute()))) >= 4096:
        raise BadExpertError(f"cannot create '{str(target)[:60]}...': the path is longer than 4096 bytes; choose a "
                             "shorter one")
    try:
        fd, probe = tempfile.mkstemp(dir=anc, prefix=".badexpert-probe.", suffix=".tmp")
    except OSError as exc:
        raise BadExpertError(f"cannot write to '{anc}' ({_reason(exc)}); choose another location") from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(path: str | Path, *, suffix: str | None = None, overwrite: bool = False,
                      option: str = "--out") -> Path:
    """Check, before any work starts, that a single output file can be written at ``path``.

    An existing directory at ``path`` is an error; an existing file needs ``overwrite``.
    ``option`` names the command-line option in messages.
    """
    p = Path(path)
    if suffix and p.suffix.lower() != suffix:
        raise BadExpertError(f"{option} must name a {suffix} file, got '{p}'")
    if os.path.isdir(p):
        raise BadExpertError(f"'{p}' is a directory; {option} must name a file")
    if os.path.exists(p) and not os.path.isfile(p):
        raise BadExpertError(f"'{p}' is not a regular file (a device, pipe or socket); {option} must name a file")
    if os.path.exists(p) and not overwrite:
        raise BadExpertError(f"'{p}' already exists; pass --overwrite to replace it, or choose another {option}")
    _check_creatable(p)
    return p


def check_output_dir(path: str | Path, *, owned: frozenset[str], overwrite: bool = False) -> Path:
    """Check, before any work starts, that a run directory can be written at ``path``.

    ``owned``: the file names a run writes. An existing non-empty directory needs ``overwrite``
    and may hold only such files (nothing of the user's is ever deleted).
    """
    p = Path(path)
    if os.path.exists(p) and not os.path.isdir(p):
        raise BadExpertError(f"'{p}' is a file; --out must name a directory")
    if os.path.isdir(p):
        try:
            entries = sorted(p.iterdir())
        except OSError as exc:
            raise BadExpertError(f"cannot read the directory '{p}' ({_reason(exc)}); choose another --out") from None
        foreign = [e.name for e in entries if e.name not in owned or not e.is_file()]
        if foreign:
            raise BadExpertError(
                f"'{p}' holds files that are not badexpert run outputs ({', '.join(foreign[:4])}); "
                "choose another --out (nothing was deleted)"
            )
        if entries and not overwrite:
            raise BadExpertError(
                f"'{p}' already holds a run ({', '.join(e.name for e in entries[:4])}); pass --overwrite to replace it, "
                "or choose another --out"
            )
    _check_creatable(p / "x")
    return p


@contextlib.contextmanager
def atomic_directory(path: str | Path, *, owned: frozenset[str], overwrite: bool = False) -> Iterator[Path]:
    """Build a run directory in a temporary sibling and rename it into place at the end.

    Yields the temporary directory to write into. If the block raises (or is interrupted), the
    temporary directory is removed and ``path`` is untouched: the result is the complete run or
    nothing. With ``overwrite``, an earlier run at ``path`` (only files in ``owned``) is replaced
    as a whole, so none of its files survive beside the new ones.
    """
    import shutil

    p = check_output_dir(path, owned=owned, overwrite=overwrite)
    try:
        tmp = Path(tempfile.mkdtemp(dir=_nearest_existing(p.parent), prefix=f".{p.name}.", suffix=".tmp"))
    except OSError as exc:
        raise write_error(p, exc) from exc
    created: list[Path] = []
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        check_output_dir(p, owned=owned, overwrite=overwrite)  # still safe to replace?
        created = _make_parents(p.parent)
        if p.exists():
            old = tmp.with_name(tmp.name + ".old")
            os.rename(p, old)
            try:
                os.rename(tmp, p)
            except BaseException:
                os.rename(old, p)  # put the earlier run back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, p)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_dirs(created)
        if isinstance(exc, OSError):  # everything in the block writes into the run: a write failure
            raise write_error(p, exc) from exc
        raise


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


def progress(iterable=None, *, total: int | None = None, desc: str = "", enabled: bool | None = None):
    """A tqdm progress bar, shown only when stderr is a terminal (quiet in CI and logs)."""
    from tqdm.auto import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty() and not os.environ.get("BADEXPERT_QUIET")
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def read_json_file(path: str | Path, what: str, *, max_bytes: int = 1024**2) -> Any:
    """The JSON value in a small text file (a config); one-line errors naming ``what`` for a
    missing, huge, non-UTF-8 or malformed file, absurd nesting or numbers beyond Python's limit."""
    p = Path(path)
    if not p.is_file():
        raise BadExpertError(f"{what} '{p}' does not exist")
    if p.stat().st_size > max_bytes:
        raise BadExpertError(f"{what} '{p}' is larger than {max_bytes // 1024**2} MiB; a config holds a few fields")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BadExpertError(f"{what} '{p}' is not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    except UnicodeDecodeError as exc:
        raise BadExpertError(f"{what} '{p}' is not UTF-8 text; write it as a JSON object") from exc
    except (ValueError, RecursionError) as exc:  # numbers beyond Python's digit limit, absurd nesting
        raise BadExpertError(f"{what} '{p}' cannot be read ({str(exc)[:80]})") from exc
