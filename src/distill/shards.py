"""Resumable sharded output folders: the one writer under the top-k cache and generated datasets.

A folder holds a fixed set of names, so anything else in it is refused before any work:

- the settings file (a cache's unfinished ``manifest.json``, a generation run's ``run.json``), written
  first: a restart with other settings is refused by the job before it loads a model;
- one pair per shard: ``shard-00000.parquet`` (the data, absent when a shard kept no rows) and
  ``shard-00000.json`` (its record: sha256, bytes, counts), the record written after the data, so a shard
  is complete exactly when its record exists and the data matches its sha256;
- ``manifest.json``, written last, from the records in shard order.

Every file is written under a temporary name (``NAME.distill-partial``), fsynced, renamed over its final
name (atomic on POSIX) and the folder fsynced: after SIGKILL or a power cut each file is absent or whole.
A shard's bytes depend only on its rows and the settings, never on the process, the order or the number of
interruptions, so a resumed build is byte-identical to an uninterrupted one. Only this layout's own
temporary files are ever removed.

Across processes (:class:`Ranks`: every rank of an ``accelerate launch`` / ``torchrun`` job, on one node or
many, sharing the folder): rank 0 checks the folder, cleans up and lists the shards still missing; each
rank computes every ``world``-th of them; rank 0 writes the manifest once every rank has finished. A
restart with any number of processes resumes from the records on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import re
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from distill.checks import InputError, check_writable_folder

__all__ = [
    "TEMP_SUFFIX",
    "RankFailedError",
    "Ranks",
    "ShardFolder",
    "file_sha256",
    "json_bytes",
    "progress_bar",
    "rank_device",
    "write_atomically",
]

T = TypeVar("T")
_log = logging.getLogger(__name__)
TEMP_SUFFIX = ".distill-partial"
MANIFEST_NAME = "manifest.json"
# Ranks that finish their shards wait for the slowest one in a collective: far longer than torch's default
# 30 minutes, since one shard of a large teacher can take that long.
WAIT_FOR_RANKS = timedelta(days=1)


def file_sha256(path: Path | str) -> str:
    """sha256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def json_bytes(record: Any) -> bytes:
    """The bytes a record is stored as: sorted keys, so equal records give equal files."""
    return (json.dumps(record, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes | Callable[[Path], object]) -> None:
    """Write ``path`` so that it is either absent or whole, even after SIGKILL or a power cut.

    Args:
        path: the final name.
        data: the bytes, or a function that writes the file at the temporary path it is given
            (e.g. ``lambda temp: pq.write_table(table, temp)``).
    """
    temp = path.with_name(path.name + TEMP_SUFFIX)
    if callable(data):
        data(temp)
    else:
        temp.write_bytes(data)
    with open(temp, "rb+") as file:
        os.fsync(file.fileno())
    os.replace(temp, path)
    _fsync_dir(path.parent)


class RankFailedError(RuntimeError):
    """Another rank of a multi-process build failed; its shards finished so far stay on disk."""


class Ranks:
    """The processes that build one folder together: one, or every rank of a ``torch.distributed`` job.

    Args:
        rank: this process's rank.
        world: the number of processes.
        group: a gloo process group over all of them (``None`` for one process).
    """

    def __init__(self, rank: int = 0, world: int = 1, group: Any = None) -> None:
        self.rank, self.world, self.group = rank, world, group

    @classmethod
    def join(cls, distributed: bool | None = None) -> Ranks:
        """The ranks of the job this process belongs to.

        Args:
            distributed: ``None``: every rank when launched by ``accelerate launch`` / ``torchrun``
                (``WORLD_SIZE`` > 1) or when ``torch.distributed`` is initialized; ``True``: the same;
                ``False``: this process alone (e.g. a build called on one rank of a training job).
        """
        if distributed is False:
            return cls()
        import torch.distributed as dist

        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if not dist.is_available() or not (launched or dist.is_initialized()):
            return cls()
        if not dist.is_initialized():
            from accelerate import PartialState

            PartialState()  # the process group as the launcher describes it (nccl on GPUs, gloo on CPUs)
        if dist.get_world_size() == 1:
            return cls()
        return cls(dist.get_rank(), dist.get_world_size(), _gloo_group())

    @property
    def main(self) -> bool:
        """Whether this is rank 0 (the one that checks the folder and writes the manifest)."""
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world}"

    def on_main(self, work: Callable[[], T]) -> T:
        """Run ``work`` on rank 0 only; every rank returns its result, or raises its error."""
        if self.world == 1:
            return work()
        import torch.distributed as dist

        outcome: list[Any] = [None]
        failure: Exception | None = None
        if self.main:
            try:
                outcome = [(True, work())]
            except Exception as error:
                failure = error
                outcome = [(False, _picklable(error))]
        dist.broadcast_object_list(outcome, src=0, group=self.group)
        succeeded, value = outcome[0]
        if not succeeded:
            raise failure or value  # rank 0 raises its own error, with its traceback
        return value

    def agree(self, error: BaseException | None) -> None:
        """Every rank says whether its share succeeded; if any failed, every rank raises (naming the ranks).

        The failing rank raises its own error; the others raise :class:`RankFailedError`.
        """
        if self.world == 1:
            if error is not None:
                raise error
            return
        import torch.distributed as dist

        reports: list[Any] = [None] * self.world
        mine = None if error is None else f"{type(error).__name__}: {error}"
        dist.all_gather_object(reports, mine, group=self.group)
        failed = [(rank, report) for rank, report in enumerate(reports) if report is not None]
        if not failed:
            return
        message = (
            "; ".join(f"rank {rank} of {self.world} failed: {report}" for rank, report in failed)
            + ". The shards finished so far stay; run the same command again to resume."
        )
        # Every rank logs before any rank exits: a launcher stops the others as soon as one process ends.
        _log.error("%s: stopping. %s", self.describe(), message)
        dist.barrier(group=self.group)
        if error is not None:
            raise error
        raise RankFailedError(message)

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. to fill a ``datasets`` cache), then the others."""
        import torch.distributed as dist

        if self.world > 1 and not self.main:
            dist.barrier(group=self.group)
        yield
        if self.world > 1 and self.main:
            dist.barrier(group=self.group)


def progress_bar(ranks: Ranks, total: int, mine: int, desc: str, enabled: bool = True, **options: Any) -> Any:
    """A tqdm bar of this run's work (only rank 0 shows one), so its rate and ETA are this run's.

    Args:
        ranks: the processes sharing the build.
        total: the whole job's work (tokens, completions).
        mine: the part this rank computes now. Alone, the bar spans ``total`` and starts at what earlier
            runs finished; among several ranks it spans rank 0's own share.
        desc: the bar's label (the rank is added when there are several).
        enabled: show it at all.
        **options: passed to ``tqdm`` (``unit``, ``unit_scale``).
    """
    from tqdm.auto import tqdm

    alone = ranks.world == 1
    return tqdm(
        total=total if alone else mine,
        initial=total - mine if alone else 0,
        desc=desc if alone else f"{desc} ({ranks.describe()}, its shards)",
        disable=not enabled or not ranks.main,
        **options,
    )


_groups: dict[Any, Any] = {}


def _gloo_group() -> Any:
    """A gloo group over every rank, made once per default process group (``new_group`` is collective).

    Objects travel over a group of our own: no GPU copies, and a timeout that outlasts a long shard.
    """
    import torch.distributed as dist

    default = dist.group.WORLD
    if default not in _groups:
        _groups[default] = dist.new_group(backend="gloo", timeout=WAIT_FOR_RANKS)
    return _groups[default]


def rank_device() -> Any:
    """This rank's device (``cuda:LOCAL_RANK`` or the CPU, as accelerate picks it) in a job launched with
    several processes; ``None`` in a single process (the caller's default stands)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState().device


def _picklable(error: Exception) -> Exception:
    """``error``, or a RuntimeError with its message when it cannot travel to the other ranks."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


class ShardFolder:
    """One resumable sharded output folder (layout: this module's docstring).

    Args:
        folder: the folder (created if missing).
        what: the kind of output, for messages (e.g. ``"top-k cache"``).
        settings_file: the name of the file written first (``"manifest.json"`` or ``"run.json"``).
        name: the argument's name, for messages (``"--out"`` on the command line).
    """

    def __init__(self, folder: str | os.PathLike, *, what: str, settings_file: str, name: str = "out_dir") -> None:
        self.path, self.what, self.settings_file, self.name = Path(folder), what, settings_file, name
        final = (
            "|".join(re.escape(n) for n in sorted({settings_file, MANIFEST_NAME})) + r"|shard-\d{5}\.(parquet|json)"
        )
        self._final = re.compile(f"({final})")
        # Our temporary files: this version's suffix, and the names earlier versions used (".tmp" suffix or
        # ".NAME.tmp"), removed when a build resumes.
        self._temp = re.compile(rf"({final})({re.escape(TEMP_SUFFIX)}|\.tmp)|\.({final})\.tmp")

    def shard_name(self, shard: int, suffix: str) -> str:
        return f"shard-{shard:05d}{suffix}"

    def check(self, read_settings: Callable[[Path], Any]) -> Any:
        """Check, before any work, that the folder is writable and empty or of this kind; read its settings.

        Args:
            read_settings: ``folder -> record``, the parsed settings file (called only when it exists);
                raises when the file is not of this kind.

        Returns:
            The settings record already there (a build to resume or a finished one), or ``None``.

        Raises:
            InputError: the folder cannot be written, or holds other files (listed; nothing is deleted).
        """
        folder = check_writable_folder(self.path, self.name)
        previous = read_settings(folder) if (folder / self.settings_file).exists() else None
        foreign = sorted(
            entry.name + ("/" if entry.is_dir() else "")
            for entry in folder.iterdir()
            if not entry.name.startswith(".distill-write-test-")  # another rank's check_writable_folder probe
            and (
                entry.is_dir()
                or not (self._final.fullmatch(entry.name) or self._temp.fullmatch(entry.name))
                # The settings file is written before anything else: without it only temporary files can be ours.
                or (previous is None and not self._temp.fullmatch(entry.name))
            )
        )
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise InputError(
                f"{self.name} {os.fspath(self.path)!r} is not empty and is not a {self.what}: it holds {shown}. "
                f"Nothing was written or deleted. Give an empty or new folder, or the folder of a {self.what} "
                "to resume."
            )
        return previous

    def clear_temps(self) -> None:
        """Remove this layout's temporary files (left by a build killed mid-write); nothing else."""
        for entry in self.path.iterdir():
            if self._temp.fullmatch(entry.name):
                entry.unlink(missing_ok=True)

    def done(self, shard: int, check_sha256: bool = True) -> dict[str, Any] | None:
        """The record of a finished shard whose data still matches its size (and sha256), else ``None``."""
        try:
            record = json.loads((self.path / self.shard_name(shard, ".json")).read_bytes())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict):
            return None
        if record.get("file") is None:  # a shard that kept no rows
            return record
        data = self.path / record["file"]
        if not data.exists() or data.stat().st_size != record.get("bytes"):
            return None
        if check_sha256 and file_sha256(data) != record["sha256"]:
            return None
        return record

    def begin(self, ranks: Ranks, num_shards: int, settings: dict[str, Any] | None) -> list[int]:
        """Prepare the folder on rank 0 and return the missing shards this rank computes, in order.

        Args:
            ranks: the processes sharing the build.
            num_shards: the shards of the finished output.
            settings: the settings record to write first (``None``: keep the one there). The job has
                compared it with the previous one already (on rank 0, before loading a model).
        """

        def prepare() -> list[int]:
            self.clear_temps()
            if settings is not None:
                write_atomically(self.path / self.settings_file, json_bytes(settings))
            return [shard for shard in range(num_shards) if self.done(shard) is None]

        missing = ranks.on_main(prepare)
        visible = (self.path / self.settings_file).exists()
        ranks.agree(None if visible else InputError(
            f"{self.path} does not hold the {self.settings_file} rank 0 wrote ({ranks.describe()}): every process "
            "must see the same folder (a filesystem shared by all nodes)."
        ))  # fmt: skip
        return missing[ranks.rank :: ranks.world]

    def write_shard(self, shard: int, data: bytes | Callable[[Path], object] | None, record: dict[str, Any]) -> dict:
        """Write a shard's data (``None``: no rows, no data file) and then its record; return the record.

        ``record`` gains ``file``, ``bytes`` and ``sha256`` (all ``None`` without data).
        """
        record = {**record, "file": None, "bytes": None, "sha256": None}
        if data is not None:
            path = self.path / self.shard_name(shard, ".parquet")
            write_atomically(path, data)
            record.update(file=path.name, bytes=path.stat().st_size, sha256=file_sha256(path))
        write_atomically(self.path / self.shard_name(shard, ".json"), json_bytes(record))
        return record

    def finish(self, ranks: Ranks, num_shards: int, manifest: Callable[[list[dict[str, Any]]], dict]) -> dict:
        """Once every rank is done, rank 0 writes ``manifest(records)``; every rank returns the manifest.

        Raises:
            InputError: a shard's record is missing or its data does not match (a rank wrote elsewhere).
        """

        def write() -> dict[str, Any]:
            # Sizes only: begin() hashed the shards found done, write_shard() the ones written since.
            records = [self.done(shard, check_sha256=False) for shard in range(num_shards)]
            missing = [self.shard_name(shard, ".json") for shard, record in enumerate(records) if record is None]
            if missing:
                raise InputError(
                    f"{self.path}: every rank finished but {', '.join(missing[:5])} is missing or does not match its "
                    "data. Every process must see the same folder; run the same command again to redo those shards."
                )
            result = manifest(records)
            write_atomically(self.path / MANIFEST_NAME, json_bytes(result))
            return result

        return ranks.on_main(write)
