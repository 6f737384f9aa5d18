"""Reading a top-k cache: the manifest, checksummed shards, and a row-key index.

A cache is a folder with ``manifest.json`` and parquet shards (format: ``docs/offline.md``). Rows
are found by their *key*, a hash of their token ids, so the trainer can look up any batch row
whatever order or padding it comes in. Shards are opened lazily and each is checked against its
sha256 the first time it is opened; :meth:`CacheReader.verify` checks them all.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pyarrow.parquet as pq

from distill.checks import InputError
from distill.formats.encoding import EncodedTokens, Encoding
from distill.shards import file_sha256

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "CacheCorruptError",
    "CacheError",
    "CacheMismatchError",
    "CacheMissError",
    "CacheReader",
    "config_checksums",
    "file_sha256",
    "loss_spans",
    "row_key",
    "spans_to_positions",
    "tokenizer_fingerprint",
]

FORMAT = "distill-topk-cache"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
IGNORE_INDEX = -100
# Row groups this small make a random row cheap to read (one group, not the whole shard).
_OPEN_GROUPS = 16


class CacheError(InputError):
    """A top-k cache cannot be used as asked."""


class CacheCorruptError(CacheError):
    """A shard's bytes differ from the checksum in the manifest (truncated, edited, or damaged)."""


class CacheMismatchError(CacheError):
    """The cache was built for another tokenizer / dataset / settings than the caller's."""


class CacheMissError(CacheError):
    """A row asked for is not in the cache."""


def row_key(input_ids: Any) -> str:
    """The cache key of a row: blake2b-128 (hex) of its token ids as int32 little-endian bytes.

    Args:
        input_ids: ``[seq]`` the row's ids, without padding (list, numpy array or CPU tensor).
    """
    data = np.asarray(input_ids, dtype="<i4").tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def loss_spans(labels: Any) -> list[int]:
    """Positions whose next token carries loss, as flattened half-open spans ``[s0, e0, s1, e1, ...]``.

    Position ``i`` predicts token ``i + 1``, so it is cached when ``labels[i + 1] != -100``
    (:func:`distill.trainer.batching.next_token_labels` for unpacked rows).

    Args:
        labels: ``[seq]`` unshifted labels of one row.
    """
    used = np.asarray(labels)[1:] != IGNORE_INDEX
    edges = np.flatnonzero(np.diff(np.concatenate([[False], used, [False]]).astype(np.int8)))
    return edges.astype(np.int64).tolist()


def spans_to_positions(spans: list[int] | np.ndarray) -> np.ndarray:
    """``[n]`` int64 positions of flattened half-open spans (inverse of :func:`loss_spans`)."""
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    if len(spans) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(start, end) for start, end in spans])


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 (hex) of what decides a tokenizer's ids: its vocabulary, special tokens and chat template."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0])),
        "special_tokens": {
            name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "pad_token", "unk_token")
        },
        "additional_special_tokens": sorted(str(token) for token in tokenizer.all_special_tokens),
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def config_checksums(config: dict[str, Any]) -> dict[str, str]:
    """``{dotted field: sha256 (first 16 hex) of its JSON}`` for every leaf of a manifest's ``config``.

    Stored beside the config by the writer, so a reader names exactly which field was edited by hand.
    """
    return {
        key: hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]
        for key, value in sorted(_flatten(config).items())
    }


def read_manifest(folder: Path | str) -> dict[str, Any] | None:
    """The parsed ``manifest.json`` of ``folder``, or ``None`` if there is none.

    Raises:
        CacheCorruptError: the file is not JSON, or not a JSON object (the message names the file).
        CacheError: it is the manifest of another format or version.
    """
    path = Path(folder) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_bytes())
    except (UnicodeDecodeError, ValueError) as error:
        raise CacheCorruptError(
            f"{path} is not valid JSON ({error}): the cache's manifest was damaged or edited. Rebuild the cache "
            "into an empty folder (or restore the file)."
        ) from None
    if not isinstance(manifest, dict):
        raise CacheCorruptError(f"{path} holds a JSON {type(manifest).__name__}, not a cache manifest (an object).")
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise CacheError(
            f"{path} is not a {FORMAT} manifest of version {FORMAT_VERSION} "
            f"(format={manifest.get('format')!r}, version={manifest.get('version')!r})."
        )
    return manifest


class CacheReader:
    """Look up the cached top-k targets of rows by key.

    Args:
        path: the cache folder (with ``manifest.json``).

    Raises:
        CacheError: no manifest, or the build has not finished (resume it with the same command).
        CacheCorruptError: a shard cannot be read or fails its checksum (named in the message).
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        manifest = read_manifest(self.path)
        if manifest is None:
            raise CacheError(f"No {MANIFEST_NAME} in {self.path}: not a top-k cache (build one with `distill cache`).")
        if not manifest.get("complete"):
            raise CacheError(
                f"The cache in {self.path} is incomplete ({len(list(self.path.glob('shard-*.json')))} of "
                f"{manifest['num_shards']} shards written): run the same `distill cache` / build_cache call again "
                "to finish it."
            )
        self.manifest = manifest
        config = manifest["config"]
        self.sampled = config.get("targets", "top_k") == "sampled"
        self.encoding = self._encoding_of(config)
        self.row_group_rows = int(config["row_group_rows"])
        self._verified: set[int] = set()
        self._groups: OrderedDict[tuple[int, int], dict[str, list[Any]]] = OrderedDict()
        self._spans: dict[tuple[int, int], list[Any]] = {}
        self.index: dict[str, tuple[int, int]] = {}
        for shard_number, shard in enumerate(manifest["shards"]):
            keys = self._read(shard_number, columns=["key"])["key"].to_pylist()
            if len(keys) != shard["rows"]:
                self._raise_corrupt(shard_number, f"it holds {len(keys)} rows, the manifest says {shard['rows']}")
            for row, key in enumerate(keys):
                self.index.setdefault(key, (shard_number, row))
        self._check_first_row()

    def _manifest_problem(self, problem: str) -> NoReturn:
        raise CacheCorruptError(
            f"{self.path / MANIFEST_NAME}: {problem}. The manifest no longer describes its shards (edited by hand?): "
            "restore it or rebuild the cache."
        )

    def _encoding_of(self, config: dict[str, Any]) -> Encoding:
        """The encoding the manifest describes, after checking its fields against their checksums and each other."""
        checksums = self.manifest.get("config_checksums")
        if isinstance(checksums, dict):  # written since checksums exist; older caches get the checks below only
            found = config_checksums(config)
            edited = sorted(key for key in checksums.keys() | found.keys() if checksums.get(key) != found.get(key))
            if edited:
                self._manifest_problem(f"field(s) {', '.join('config.' + key for key in edited)} differ from the "
                                       "values the cache was built with (their checksums do not match)")  # fmt: skip
        try:
            name, k, vocab_rows = config["encoding"]["name"], config["k"], config["teacher"]["vocab_rows"]
        except (KeyError, TypeError) as error:
            self._manifest_problem(f"config lacks {error}")
        for field, value in (("config.k", k), ("config.teacher.vocab_rows", vocab_rows)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                self._manifest_problem(f"{field} must be a positive whole number; got {value!r}")
        if config["encoding"].get("k", k) != k:
            self._manifest_problem(f"config.k={k} but config.encoding.k={config['encoding'].get('k')}")
        try:
            encoding = Encoding(name, k, vocab_rows, sampled=self.sampled)
        except ValueError as error:
            self._manifest_problem(str(error))
        recorded_bits = config["encoding"].get("id_bits", encoding.id_bits)
        if recorded_bits != encoding.id_bits:
            self._manifest_problem(
                f"config.teacher.vocab_rows={vocab_rows} means {encoding.id_bits}-bit ids but the shards were "
                f"written with {recorded_bits}-bit ids (config.encoding.id_bits)"
            )
        return encoding

    def _check_first_row(self) -> None:
        """Decode the first cached row: a manifest whose ``k`` or id width disagrees with the shards fails here."""
        for shard_number, shard in enumerate(self.manifest["shards"]):
            if not shard["rows"]:
                continue
            columns = self._group(shard_number, 0)
            positions = spans_to_positions(columns["spans"][0])
            encoded = EncodedTokens(columns["ids"][0], columns["logprobs"][0], columns["mass"][0])
            try:
                self.encoding.decode(encoded)
                whole = len(encoded.mass) == len(positions) * self.encoding.mass_bytes_per_token
            except ValueError:
                whole = False
            if not whole:
                self._manifest_problem(
                    f"row 0 of {shard['file']} does not decode with config.k={self.encoding.k} and "
                    f"config.teacher.vocab_rows={self.encoding.vocab_rows} ({len(positions)} positions, "
                    f"{len(encoded.ids)} id bytes)"
                )
            return

    def __len__(self) -> int:
        return sum(shard["rows"] for shard in self.manifest["shards"])

    def _shard_path(self, shard_number: int) -> Path:
        return self.path / self.manifest["shards"][shard_number]["file"]

    def _raise_corrupt(self, shard_number: int, problem: str) -> NoReturn:
        raise CacheCorruptError(
            f"Shard {self._shard_path(shard_number)} is corrupt: {problem}. It was not used. Rebuild it: delete the "
            f"file, remove its entry (and those after it) from {MANIFEST_NAME}, and rerun `distill cache`."
        )

    def verify_shard(self, shard_number: int) -> None:
        """Check one shard's size and sha256 against the manifest (once per reader)."""
        if shard_number in self._verified:
            return
        shard, path = self.manifest["shards"][shard_number], self._shard_path(shard_number)
        if not path.exists():
            self._raise_corrupt(shard_number, "the file is missing")
        size = path.stat().st_size
        if size != shard["bytes"]:
            self._raise_corrupt(shard_number, f"it has {size:,} bytes, the manifest says {shard['bytes']:,}")
        digest = file_sha256(path)
        if digest != shard["sha256"]:
            self._raise_corrupt(shard_number, f"its sha256 is {digest}, the manifest says {shard['sha256']}")
        self._verified.add(shard_number)

    def verify(self) -> None:
        """Check every shard against its checksum; raises :class:`CacheCorruptError` naming the first bad one."""
        for shard_number in range(len(self.manifest["shards"])):
            self.verify_shard(shard_number)

    def _read(self, shard_number: int, columns: list[str], row_group: int | None = None) -> Any:
        """Read columns of a shard (or of one row group); damage surfaces as :class:`CacheCorruptError`."""
        try:
            file = pq.ParquetFile(self._shard_path(shard_number), memory_map=True)
            return file.read(columns=columns) if row_group is None else file.read_row_group(row_group, columns=columns)
        except (OSError, ValueError) as error:
            self.verify_shard(shard_number)  # raises with the checksum when the bytes changed
            self._raise_corrupt(shard_number, f"pyarrow cannot read it ({error})")

    def _group(self, shard_number: int, group: int) -> dict[str, list[Any]]:
        """One row group's columns as Python lists (a few recent groups are kept)."""
        cached = self._groups.get((shard_number, group))
        if cached is not None:
            self._groups.move_to_end((shard_number, group))
            return cached
        self.verify_shard(shard_number)
        table = self._read(shard_number, ["spans", "ids", "logprobs", "mass"], row_group=group)
        columns = {name: table[name].to_pylist() for name in table.column_names}
        self._groups[(shard_number, group)] = columns
        if len(self._groups) > _OPEN_GROUPS:
            self._groups.popitem(last=False)
        return columns

    def _find(self, key: str) -> tuple[int, int]:
        """``(shard number, row in the shard)`` of the row with ``key``; :class:`CacheMissError` if absent."""
        found = self.index.get(key)
        if found is None:
            config = self.manifest["config"]
            raise CacheMissError(
                f"A batch row (key {key}) is not in the cache {self.path}. The rows were tokenized differently from "
                "the cache's: compare the manifest's config.dataset (num_rows, rows_sha256), config.max_length="
                f"{config['max_length']}, config.completion_only_loss={config['completion_only_loss']} and "
                "config.tokenizer.fingerprint with the trainer's dataset, DistillConfig and tokenizer."
            )
        return found

    def positions(self, key: str) -> np.ndarray:
        """``[n]`` int64 the cached positions of the row with ``key``, reading only its spans (nothing decoded).

        Raises:
            CacheMissError: no row with this key.
        """
        shard_number, row = self._find(key)
        group = row // self.row_group_rows
        spans = self._spans.get((shard_number, group))
        if spans is None:
            self.verify_shard(shard_number)
            spans = self._read(shard_number, ["spans"], row_group=group)["spans"].to_pylist()
            self._spans = {(shard_number, group): spans}  # rows are checked in order: one group at a time
        return spans_to_positions(spans[row % self.row_group_rows])

    def lookup(self, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The cached targets of the row with ``key``.

        Returns:
            ``(positions [n] int64, topk_ids [n, k] int64, topk_logprobs [n, k] float32, tail_mass [n] float32)``:
            position ``positions[j]`` of the row predicts token ``positions[j] + 1`` with those targets.

        Raises:
            CacheMissError: no row with this key (the message says which manifest fields to compare).
        """
        shard_number, row = self._find(key)
        columns = self._group(shard_number, row // self.row_group_rows)
        offset = row % self.row_group_rows
        encoded = EncodedTokens(columns["ids"][offset], columns["logprobs"][offset], columns["mass"][offset])
        ids, logprobs, tail = self.encoding.decode(encoded)
        return spans_to_positions(columns["spans"][offset]), ids, logprobs, tail
