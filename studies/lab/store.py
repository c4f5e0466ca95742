"""Run directories, manifests, records, atomic writes and resume.

Layout (DESIGN.md, binding)::

    <results>/<study>/<preset>/runs/<run_id>/config.json    the run's full configuration
                                             env.json       versions, device, git commit, seed, host, time
                                             records.jsonl  one tidy row per measurement
                                             DONE           written last (JSON: time, records, diverged)
                                             FAILED         instead of DONE when the run raised (reason)
    <results>/<study>/<preset>/runs/.locks/<run_id>.lock     held while a process runs the run
    <results>/<study>/<preset>/sweep.json                   the config of the last sweep (for figures)
    <results>/<study>/<preset>/figures/                     PDF + PNG figures, claims.json

Every file is written atomically (temporary file in the same directory, fsync, ``os.replace``), and
``DONE`` only after the others, so a run directory is either finished or is redone from scratch: a
run killed at any point leaves no ``DONE`` and is wiped and rerun by the next sweep; a finished run is
skipped.

A process runs a run only while it holds the run's lock (``fcntl.flock`` on ``runs/.locks/<id>.lock``,
released by the kernel when the process dies, SIGKILL included), and it checks ``DONE`` again after
taking it: two sweeps on the same results directory, on one machine or on SLURM nodes sharing the
file system (Linux NFS clients map ``flock`` to NFS byte-range locks), split the runs between them and
never run one twice.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import IO, Any

#: Columns every row of records.jsonl carries, in this order (DESIGN.md).
RECORD_FIELDS = (
    "run_id",
    "study",
    "arch",
    "norm",
    "dataset",
    "seed",
    "step",
    "probe",
    "layer",
    "metric",
    "value",
)
#: Run-level fields copied from the config into every row.
RUN_FIELDS = ("run_id", "study", "arch", "norm", "dataset", "seed")

DONE = "DONE"
FAILED = "FAILED"
LOCKS = ".locks"
CONFIG = "config.json"
ENV = "env.json"
RECORDS = "records.jsonl"
SWEEP = "sweep.json"  # in <study>/<preset>/: the last sweep's config and planned run ids

#: The states of a run (``RunStore.state``), in the order ``whybn status`` lists them.
RUN_STATES = ("done", "diverged", "running", "failed", "interrupted", "pending")

#: Room a sweep needs on the results file system at least, whatever its size (config, env, records,
#: figures, and the temporary copies of atomic writes).
MIN_FREE_BYTES = 64 * 2**20

#: How long a claim keeps trying while only `whybn status` probes (shared locks) stand in its way.
_CLAIM_PATIENCE_S = 5.0


def _lock_exclusive(fd: int) -> bool:
    """Take ``fd``'s exclusive flock without waiting for another sweep: False when one holds it.

    `whybn status` (``RunStore.holder``) takes a shared lock for microseconds to look. An exclusive
    request that meets one fails too, so a failed request asks for a shared lock on ``fd``: granted,
    nobody holds the exclusive lock and only such probes were in the way, so it lets go and tries again
    (for up to ``_CLAIM_PATIENCE_S``); refused, another sweep runs the run. Four tries 50 ms apart could
    all meet a probe: under load a sweep then skipped a run nobody ran."""
    deadline = time.monotonic() + _CLAIM_PATIENCE_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # an exclusive holder: another sweep
        fcntl.flock(fd, fcntl.LOCK_UN)
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask: ``os.umask`` has no getter, so set it and put it back at once."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` (fsync + ``os.replace``).

    Readers see the old file or the whole new one, never a part; on error the temporary file is removed.
    The file gets the permissions ``open`` would give it (0666 less the umask), not ``mkstemp``'s
    owner-only 0600, so results on a shared file system are as readable as their figures.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as f:
        f.write(text)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialize {type(obj).__name__} to JSON")


def to_json(obj: Any, *, indent: int | None = 2) -> str:
    """JSON with NaN/inf kept as the ``NaN``/``Infinity`` literals Python's json reads back."""
    return json.dumps(obj, indent=indent, sort_keys=indent is not None, default=_json_default)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, to_json(obj) + "\n")


def write_records(path: Path, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write tidy rows as JSON lines atomically; returns the number of rows."""
    lines = [to_json(dict(row), indent=None) for row in rows]
    write_atomic(path, "".join(line + "\n" for line in lines))
    return len(lines)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Read records.jsonl; a corrupt or truncated line raises ValueError naming the file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: corrupt record ({err.msg}): {line[:80]!r}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: a record must be a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def config_hash(config: Mapping[str, Any], length: int = 8) -> str:
    """A short stable hash of a configuration (key order does not matter)."""
    blob = json.dumps(config, sort_keys=True, default=_json_default)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def make_run_id(config: Mapping[str, Any], keys: Iterable[str] = ("arch", "norm", "seed")) -> str:
    """A readable, unique run id: the main grid coordinates, then a hash of the whole config.

    >>> make_run_id({"arch": "mlp", "norm": "bn", "seed": 0, "lr": 0.1})  # doctest: +SKIP
    'mlp-bn-s0-3f2a9c1b'
    """
    parts = []
    for key in keys:
        if key in config:
            value = config[key]
            parts.append(f"s{value}" if key == "seed" else str(value))
    parts.append(config_hash(config))
    return "-".join(p.replace("/", "_").replace(" ", "") for p in parts)


#: The packages whose source :func:`source_digest` hashes (the code a result depends on).
SOURCE_PACKAGES = ("probes", "studies", "analysis")


@functools.cache
def source_digest(root: Path | None = None) -> dict[str, Any]:
    """A SHA-256 of the running code: every ``.py`` file of :data:`SOURCE_PACKAGES` under ``root`` (default:
    where this module was imported from), path and contents, in sorted order.

    It names the code where git cannot: outside a checkout, for an installed copy (a non-editable
    ``pip install .`` in a ``.venv`` inside the checkout is *ignored* by it, so the checkout's HEAD
    describes other code), and for a tree with uncommitted or untracked changes.
    """
    root = Path(root) if root is not None else Path(__file__).resolve().parents[2]
    digest, files = hashlib.sha256(), 0
    for package in SOURCE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
            files += 1
    return {"sha256": digest.hexdigest(), "files": files, "root": str(root)}


@functools.cache
def git_commit(cwd: Path | None = None) -> dict[str, Any]:
    """The git commit of the source tree (and whether it has uncommitted changes), or None outside git,
    and None too where the code in ``cwd`` is ignored by the repository around it (an installed copy in
    a ``.venv`` inside a checkout: the checkout's HEAD is not the code that ran).

    Read once per process, like :func:`source_digest`: a run names the commit of the code its process
    imported, not a commit made while a long sweep went on. ``dirty`` is about the code only: changes
    to the :data:`SOURCE_PACKAGES` (tracked or not) under the source root (``cwd``'s packages when it is
    given); results written into a tracked ``results/`` made every later run "dirty".
    """
    root = Path(cwd) if cwd is not None else Path(__file__).resolve().parents[2]
    cwd = Path(cwd) if cwd is not None else Path(__file__).resolve().parent
    try:
        ignored = subprocess.run(
            ["git", "check-ignore", "-q", str(cwd)], cwd=cwd, capture_output=True, timeout=10
        ).returncode
        if ignored == 0:
            return {"commit": None, "dirty": None}
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=all",
                "--",
                *(str(root / p) for p in SOURCE_PACKAGES),
            ],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(dirty)}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    """The processor's name (``model name`` in /proc/cpuinfo; ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def environment(*, seed: int | None = None, device: str = "cpu") -> dict[str, Any]:
    """What a result depends on beyond its config: versions, device, threads, the CPU (its vector
    kernels round float32 differently: the same code and seed gave other records on an AMD EPYC with
    AVX2 than on the Intel Xeon that made the committed ones), git commit, a digest of the source
    (:func:`source_digest`), seed."""
    import torch

    env: dict[str, Any] = {
        "seed": seed,
        "device": device,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
        "torch_threads": torch.get_num_threads(),
        "cpu": {"model": _cpu_model(), "capability": torch.backends.cpu.get_cpu_capability()},
        "versions": {
            name: _version(name)
            for name in (
                "whybn",
                "torch",
                "numpy",
                "scipy",
                "pandas",
                "matplotlib",
                "seaborn",
                "mnist1d",
                "scikit-learn",
            )
        },
        "git": git_commit(),
        "source": source_digest(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["cuda"] = {"device_name": torch.cuda.get_device_name(), "cuda_version": torch.version.cuda}
    return env


def _clean_value(value: Any) -> Any:
    if isinstance(value, bool):
        return float(value)
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, int):
        return float(value)
    return value


@dataclass(frozen=True)
class RunStore:
    """The results of one study at one preset: ``<root>/<study>/<preset>/``."""

    root: Path
    study: str
    preset: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def base(self) -> Path:
        return self.root / self.study / self.preset

    @property
    def runs_dir(self) -> Path:
        return self.base / "runs"

    @property
    def figures_dir(self) -> Path:
        return self.base / "figures"

    def run_dir(self, run_id: str) -> Path:
        if not run_id or "/" in run_id or run_id.startswith("."):
            raise ValueError(f"run_id must be a plain directory name, got {run_id!r}")
        return self.runs_dir / run_id

    def is_done(self, run_id: str) -> bool:
        return (self.run_dir(run_id) / DONE).is_file()

    def read_sweep(self) -> dict[str, Any] | None:
        """What the last sweep here saved (:data:`SWEEP`): ``{"config": ..., "runs": [run ids]}``, or None
        if no sweep ran here."""
        path = self.base / SWEEP
        return json.loads(path.read_text()) if path.is_file() else None

    def run_ids(self, *, done: bool | None = None) -> list[str]:
        """Run ids present on disk (all, only finished, or only unfinished)."""
        if not self.runs_dir.is_dir():
            return []
        ids = sorted(p.name for p in self.runs_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        if done is None:
            return ids
        return [i for i in ids if self.is_done(i) == done]

    def check_writable(self) -> None:
        """Fail before any training if results cannot be written here (read-only, missing permissions,
        a file in the way): the error names the directory and the reason."""
        try:
            self.runs_dir.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.runs_dir, prefix=".tmp-write-check-")
            try:
                os.write(fd, b"whybn")
                os.fsync(fd)
            finally:
                os.close(fd)
                os.unlink(probe)
        except OSError as err:
            raise OSError(
                err.errno, f"results directory {self.base} is not writable ({err.strerror or err})"
            ) from err

    def remove_stale_temp_files(self, older_than: float = 3600.0) -> list[Path]:
        """Delete the ``.tmp-*`` files that writes killed mid-way (SIGKILL, power loss) left in this
        study's directories, if older than ``older_than`` seconds: a live write finishes in well under
        that, so another sweep's file in flight is never touched. Returns the paths removed."""
        if not self.base.is_dir():
            return []
        cutoff = time.time() - older_than
        removed = []
        for path in self.base.rglob(".tmp-*"):
            try:
                if path.is_file() and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed.append(path)
            except FileNotFoundError:  # removed by another sweep meanwhile
                continue
        return removed

    def check_free_space(self, n_runs: int) -> None:
        """Fail before any training if the results file system cannot hold ``n_runs`` more runs.

        The estimate is twice the mean size of this study's finished runs (1 MiB when none has finished)
        per run, and never less than ``MIN_FREE_BYTES``.
        """
        sizes = [
            sum(f.stat().st_size for f in self.run_dir(run_id).iterdir() if f.is_file())
            for run_id in self.run_ids(done=True)[:50]
        ]
        per_run = max(sum(sizes) / len(sizes), 2**20) if sizes else 2**20
        need = max(MIN_FREE_BYTES, int(2 * per_run * n_runs))
        free = shutil.disk_usage(self.runs_dir if self.runs_dir.is_dir() else self.root).free
        if free < need:
            raise OSError(
                errno.ENOSPC,
                f"results directory {self.base} has {free / 2**20:.1f} MiB free; {n_runs} run(s) need about "
                f"{need / 2**20:.1f} MiB (free space or pass another --results directory)",
            )

    # ------------------------------------------------------------------------------------ locks

    def lock_path(self, run_id: str) -> Path:
        return self.runs_dir / LOCKS / f"{self.run_dir(run_id).name}.lock"

    @contextmanager
    def claim(self, run_id: str) -> Iterator[bool]:
        """Hold the run's lock for the block: yields ``True``, or ``False`` (without waiting) when another
        process holds it. The lock file records who holds it (host, pid, time)."""
        path = self.lock_path(run_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not _lock_exclusive(fd):
                yield False
                return
            holder = (
                f"{socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n"
            )
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder.encode(), 0)
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def holder(self, run_id: str) -> str | None:
        """Who runs ``run_id`` now (host, pid, since), or None when no process holds its lock."""
        path = self.lock_path(run_id)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # fails only while someone holds it exclusively
        except BlockingIOError:
            return os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    # ------------------------------------------------------------------------------------ states

    def fail(self, run_id: str, reason: str, details: str = "") -> None:
        """Mark a begun run as failed: ``FAILED`` holds the reason (and e.g. a traceback); no ``DONE``,
        so the next sweep retries it."""
        write_json(
            self.run_dir(run_id) / FAILED,
            {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "reason": reason, "details": details},
        )

    def failure(self, run_id: str) -> dict[str, Any] | None:
        """The ``FAILED`` record of an unfinished run, or None."""
        path = self.run_dir(run_id) / FAILED
        if self.is_done(run_id) or not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {"reason": "FAILED marker unreadable"}

    def summary(self, run_id: str) -> dict[str, Any]:
        """What ``DONE`` says about a finished run: ``records``, ``diverged``, ``probe_failures``.

        Runs finished before ``DONE`` carried this (a timestamp only) are summarized from their records.
        """
        path = self.run_dir(run_id) / DONE
        try:
            info = json.loads(path.read_text())
            if isinstance(info, dict) and "diverged" in info:
                return info
        except ValueError:
            pass
        return _summarize_rows(read_records(self.run_dir(run_id) / RECORDS))

    def state(self, run_id: str) -> str:
        """One of ``RUN_STATES``: finished (``done`` or ``diverged``), ``running`` (its lock is held),
        ``failed`` (raised; retried by the next sweep), ``interrupted`` (begun, then killed), ``pending``."""
        if self.is_done(run_id):
            return "diverged" if self.summary(run_id).get("diverged") else "done"
        if self.holder(run_id) is not None:
            return "running"
        if not self.run_dir(run_id).is_dir():
            return "pending"
        return "failed" if (self.run_dir(run_id) / FAILED).is_file() else "interrupted"

    def begin(self, run_id: str, config: Mapping[str, Any], env: Mapping[str, Any]) -> Path:
        """Start (or restart) a run: wipe any unfinished attempt, write config.json and env.json."""
        run_dir = self.run_dir(run_id)
        if self.is_done(run_id):
            raise FileExistsError(f"run {run_id} is already finished ({run_dir / DONE})")
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        write_json(run_dir / CONFIG, dict(config))
        write_json(run_dir / ENV, dict(env))
        return run_dir

    def finish(self, run_id: str, config: Mapping[str, Any], rows: Iterable[Mapping[str, Any]]) -> int:
        """Write records.jsonl (each row stamped with the run's fields), then DONE. Returns the row count."""
        run_dir = self.run_dir(run_id)
        if not (run_dir / CONFIG).is_file():
            raise FileNotFoundError(f"run {run_id} was not begun: no {run_dir / CONFIG}")
        stamp = {key: config.get(key) for key in RUN_FIELDS}
        stamp["run_id"] = run_id
        stamp["study"] = self.study

        def tidy(row: Mapping[str, Any]) -> dict[str, Any]:
            out = dict(stamp)
            out.update({"step": None, "layer": ""})
            out.update(row)
            out["value"] = _clean_value(out.get("value"))
            ordered = {k: out.pop(k) for k in RECORD_FIELDS if k in out}
            ordered.update(out)
            return ordered

        tidied = [tidy(r) for r in rows]
        n = write_records(run_dir / RECORDS, tidied)
        (run_dir / FAILED).unlink(missing_ok=True)
        write_json(run_dir / DONE, {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **_summarize_rows(tidied)})
        return n

    def load(self, run_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """A finished run's config and records."""
        run_dir = self.run_dir(run_id)
        if not self.is_done(run_id):
            raise FileNotFoundError(f"run {run_id} is not finished (no {run_dir / DONE})")
        config = json.loads((run_dir / CONFIG).read_text())
        return config, read_records(run_dir / RECORDS)


def _summarize_rows(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Counts ``whybn status`` shows: records, whether training diverged, probe failures."""
    n = diverged = failures = 0
    for row in rows:
        n += 1
        metric = row.get("metric")
        diverged |= metric == "diverged" and row.get("value") == 1.0
        failures += metric == "failed"
    return {"records": n, "diverged": bool(diverged), "probe_failures": failures}


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
