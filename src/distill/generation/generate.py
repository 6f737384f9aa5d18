"""Teacher-generated datasets for sequence-level KD: N completions per prompt, in resumable parquet shards.

Layout of ``out_dir`` (see ``docs/generation.md``), a :class:`distill.shards.ShardFolder`:

- ``run.json``: the settings; a restart with other settings is refused.
- ``shard-00000.parquet`` + ``shard-00000.json`` (row count, sha256, filter counts), one pair per
  ``prompts_per_shard`` prompts; a shard is complete exactly when its json exists.
- ``manifest.json``: teacher, settings, counts, filter pass counts, every shard with its sha256.

A restart regenerates only the unfinished shards; sampling is seeded per (prompt, completion), and
batches never cross a shard, so the output is byte-identical to an uninterrupted run's, whatever the
number of processes: under ``accelerate launch`` / ``torchrun`` each rank generates its share of the
shards (a server teacher: each rank sends its shards' requests) and rank 0 writes the manifest. Only
this layout's own temporary files are removed, and a folder holding anything else is refused before any
work (:func:`check_generation_folder`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import torch

from distill.checks import InputError, check_float, check_int
from distill.generation.sampling import sample_batch, sequence_seed
from distill.models import eos_token_ids
from distill.shards import Ranks, ShardFolder, file_sha256, progress_bar
from distill.teachers.server import ServerTeacher

__all__ = ["RowFilter", "check_generation_folder", "generate_dataset", "load_generated", "read_manifest"]

FORMAT = "distill.generation/1"


class RowFilter(Protocol):
    """A check a generated row must pass to be kept; ``name`` is recorded in the manifest."""

    name: str

    def __call__(self, row: dict[str, Any]) -> bool: ...


def _filter_name(filter: Callable[[dict[str, Any]], bool]) -> str:
    return getattr(filter, "name", None) or getattr(filter, "__name__", None) or type(filter).__name__


def _parquet_bytes(rows: list[dict[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue().to_pybytes()


def _prompt_of(row: Mapping[str, Any] | str) -> tuple[str, Any]:
    """``(layout, prompt)``: ``("text", str)``, ``("chat_prompt", messages)`` or ``("messages", messages)``."""
    if isinstance(row, str):
        return "text", row
    if isinstance(row, Mapping) and "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, (list, tuple)) or not all(
            isinstance(m, Mapping) and "role" in m for m in messages
        ):
            raise InputError(
                f"A prompt row's 'messages' must be a list of {{'role', 'content'}} dicts; got {messages!r:.80}."
            )
        messages = list(messages)
        # The conversation before its last assistant turn is the prompt (a reference answer is replaced).
        last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        return "messages", messages[:last_assistant] if last_assistant is not None else messages
    if isinstance(row, Mapping) and "prompt" in row:
        prompt = row["prompt"]
        if not isinstance(prompt, (str, list, tuple)):
            raise InputError(f"A prompt must be a string or a list of chat messages; got a {type(prompt).__name__}.")
        return ("text" if isinstance(prompt, str) else "chat_prompt"), prompt
    if not isinstance(row, Mapping):
        raise InputError(f"A prompt row must be a string or a mapping; got {type(row).__name__}.")
    raise InputError(f"A prompt row needs a 'prompt' or a 'messages' column; got columns {sorted(row)}.")


def _encode(tokenizer: Any, layout: str, prompt: Any) -> list[int]:
    if layout == "text":
        return list(tokenizer(prompt)["input_ids"])
    text = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _output_row(layout: str, prompt: Any, completion: str) -> dict[str, Any]:
    if layout == "text":
        return {"prompt": prompt, "completion": completion}
    reply = {"role": "assistant", "content": completion}
    if layout == "chat_prompt":
        return {"prompt": list(prompt), "completion": [reply]}
    return {"messages": [*prompt, reply]}


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the first occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def _sample_jobs(
    teacher: torch.nn.Module | ServerTeacher,
    encoded: list[list[int]],
    jobs: list[tuple[int, int]],
    first_index: int,
    settings: dict[str, Any],
    eos_ids: list[int],
    pad: int,
    done: Callable[[int], object],
) -> list[list[int]]:
    """The new token ids of every (prompt offset, completion index) job, in order, each with its own seed.

    ``done(n)`` is called as ``n`` more completions are finished (after each batch; a server's all at once).
    """
    seeds = [sequence_seed(settings["seed"], first_index + p, c) for p, c in jobs]
    sampling = {key: settings[key] for key in ("max_new_tokens", "temperature", "top_p", "top_k")}
    if isinstance(teacher, ServerTeacher):  # the server batches concurrent requests itself
        prompts = [encoded[p] for p, _ in jobs]
        sampled = teacher.sample(prompts, seeds, stop=settings["stop"], stop_token_ids=eos_ids, **sampling)
        done(len(sampled))
        return sampled
    outputs: list[list[int]] = []
    for start in range(0, len(jobs), settings["batch_size"]):
        batch = jobs[start : start + settings["batch_size"]]
        generators = [torch.Generator().manual_seed(seed) for seed in seeds[start : start + len(batch)]]
        outputs += sample_batch(
            teacher, [encoded[p] for p, _ in batch], generators, eos_token_ids=eos_ids, pad_token_id=pad, **sampling
        )
        done(len(batch))
    return outputs


def _generate_shard(
    teacher: torch.nn.Module | ServerTeacher,
    tokenizer: Any,
    rows: list[Any],
    first_index: int,
    settings: dict[str, Any],
    filter: Callable[[dict[str, Any]], bool] | None,
    filter_workers: int,
    done: Callable[[int], object],
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Generate, cut, drop empties and filter one shard's rows. Returns (kept rows, counts)."""
    n = settings["num_completions"]
    prompts = [_prompt_of(row) for row in rows]
    encoded = [_encode(tokenizer, layout, prompt) for layout, prompt in prompts]
    jobs = [(p, c) for p in range(len(rows)) for c in range(n)]  # (prompt offset, completion index)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = eos_token_ids(tokenizer, teacher)
    texts = []
    for tokens in _sample_jobs(teacher, encoded, jobs, first_index, settings, eos_ids, pad, done):
        tokens = [t for t in tokens if t not in eos_ids]
        texts.append(cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), settings["stop"]))

    candidates = []
    for (p, c), text in zip(jobs, texts, strict=True):
        if settings["drop_empty"] and not text.strip():
            continue
        layout, prompt = prompts[p]
        row = {**_output_row(layout, prompt, text), "prompt_index": first_index + p, "completion_index": c}
        source = rows[p] if isinstance(rows[p], Mapping) else {"prompt": rows[p]}
        candidates.append((row, {**source, **row, "completion": text}))
    counts = {"generated": len(jobs), "empty": len(jobs) - len(candidates), "checked": 0, "passed": 0}
    if filter is None:
        return [row for row, _ in candidates], counts
    with ThreadPoolExecutor(max_workers=max(1, filter_workers)) as pool:
        verdicts = list(pool.map(lambda pair: bool(filter(pair[1])), candidates))
    kept = [row for (row, _), ok in zip(candidates, verdicts, strict=True) if ok]
    counts.update(checked=len(candidates), passed=len(kept))
    return kept, counts


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (UnicodeDecodeError, ValueError) as error:
        raise InputError(
            f"{path} is not valid JSON ({error}): restore it, or generate into an empty folder."
        ) from None


def _generation_folder(out_dir: str | os.PathLike[str], name: str = "out_dir") -> ShardFolder:
    return ShardFolder(out_dir, what="`distill generate` output", settings_file="run.json", name=name)


def _read_run(folder: Path) -> dict[str, Any]:
    run = _read_json(folder / "run.json")
    if not isinstance(run, dict) or run.get("format") != FORMAT:
        raise InputError(
            f"{folder / 'run.json'} is not the run.json of a `distill generate` run; give an empty or new folder."
        )
    return run


def check_generation_folder(out_dir: str | os.PathLike[str], name: str = "out_dir") -> dict[str, Any] | None:
    """Check, before any work, that ``out_dir`` can hold a generation run: writable, and empty or a run already.

    Args:
        out_dir: the output folder (created if missing).
        name: the argument's name, for messages (``"--out"`` on the command line).

    Returns:
        The ``run.json`` of the run already there (to resume), or ``None``.

    Raises:
        InputError: the folder cannot be written, holds other files (listed; nothing is deleted), or its
            ``run.json`` is not a generation run's.
    """
    return _generation_folder(out_dir, name).check(_read_run)


def _check_arguments(**numbers: Any) -> None:
    """Refuse, before anything is loaded or written, counts below 1 and sampling settings out of range."""
    for name in ("num_completions", "max_new_tokens", "batch_size", "prompts_per_shard", "filter_workers"):
        check_int(numbers[name], name)
    check_int(numbers["top_k"], "top_k", minimum=0)
    check_int(numbers["seed"], "seed", minimum=None)
    check_float(numbers["temperature"], "temperature (0: greedy)", minimum=0)
    check_float(numbers["top_p"], "top_p", minimum=0, maximum=1, exclusive_minimum=True)


def _settings_hash(rows: Sequence[Any]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(_prompt_of(row), sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n")
    return digest.hexdigest()


def generate_dataset(
    teacher: torch.nn.Module | ServerTeacher,
    tokenizer: Any,
    prompts: Iterable[Mapping[str, Any] | str],
    out_dir: str | os.PathLike[str],
    *,
    num_completions: int = 1,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    batch_size: int = 8,
    prompts_per_shard: int = 256,
    stop: Sequence[str] = (),
    drop_empty: bool = True,
    filter: Callable[[dict[str, Any]], bool] | None = None,
    filter_workers: int = 1,
    teacher_name: str | None = None,
    progress: bool = True,
    distributed: bool | None = None,
) -> Path:
    """Sample ``num_completions`` teacher completions per prompt into a resumable parquet dataset.

    Args:
        teacher: A causal LM, on the device it should run on (put in eval mode during the call), or
            a :class:`~distill.teachers.ServerTeacher` (a vLLM server samples; one request per
            completion with its own seed). A server that fails mid-run raises
            :class:`~distill.teachers.server.ServerError` after its retries; finished shards stay and
            the same call resumes after them.
        tokenizer: Its tokenizer (a chat template for chat rows).
        prompts: Rows with ``prompt`` (a string, or a list of chat messages) or ``messages`` (the
            conversation before the last assistant turn is the prompt), or plain strings. Other
            columns are passed to ``filter`` but not written.
        out_dir: Output folder; an unfinished run there with the same settings is resumed.
        num_completions: Completions per prompt.
        max_new_tokens: Most tokens per completion.
        temperature: Sampling temperature (0: greedy).
        top_p: Nucleus sampling mass (1: off).
        top_k: Keep the k most likely tokens (0: off).
        seed: Sampling seed; completion ``c`` of prompt ``i`` draws from a generator seeded from
            ``(seed, i, c)``, so it does not depend on batching.
        batch_size: Sequences per forward pass (an in-process model; a server batches by itself).
        prompts_per_shard: Prompts per parquet shard (the unit of resumption).
        stop: Strings that end a completion (cut before the first one, e.g. ``"\\ndef "`` for code).
        drop_empty: Drop completions that are empty or whitespace (the trainer refuses them).
        filter: Keeps a row when it returns True; gets the source row updated with ``completion``
            (text), ``prompt_index`` and ``completion_index``. Its ``name`` and counts go in the manifest.
        filter_workers: Threads running ``filter`` (a sandboxed check spends its time in a subprocess).
        teacher_name: Recorded in the manifest; default ``teacher.config.name_or_path`` (a server: its
            served model name).
        progress: Show a tqdm bar of completions (rate and ETA; a resumed run starts at its finished shards;
            rank 0's shards only when several processes generate).
        distributed: ``None`` (default): when launched by ``accelerate launch`` / ``torchrun`` (or with
            ``torch.distributed`` initialized), every rank generates its share of the shards with its own
            ``teacher`` (put each rank's model on its device, e.g. ``PartialState().device``; a server
            teacher: each rank sends its shards' requests) and rank 0 writes the manifest; the output is
            byte-identical to a one-process run. ``False``: this process generates alone.

    Returns:
        ``out_dir`` as a ``Path``; read it with :func:`load_generated`.

    Raises:
        distill.shards.RankFailedError: another rank failed (every rank raises; the finished shards stay).
    """
    _check_arguments(
        num_completions=num_completions, max_new_tokens=max_new_tokens, batch_size=batch_size,
        prompts_per_shard=prompts_per_shard, filter_workers=filter_workers, top_k=top_k, seed=seed,
        temperature=temperature, top_p=top_p,
    )  # fmt: skip
    rows = list(prompts)
    if not rows:
        raise InputError("No prompts to generate from.")
    ranks = Ranks.join(distributed)
    folder = _generation_folder(out_dir)
    previous = ranks.on_main(lambda: folder.check(_read_run))
    server = isinstance(teacher, ServerTeacher)
    if server:
        teacher.use_tokenizer(tokenizer)  # before any prompt is sent: its ids would mean other tokens
    settings = {
        "num_completions": num_completions, "max_new_tokens": max_new_tokens, "temperature": temperature,
        "top_p": top_p, "top_k": top_k, "seed": seed, "batch_size": batch_size, "prompts_per_shard": prompts_per_shard,
        "stop": list(stop), "drop_empty": drop_empty, "backend": "vllm-server" if server else "transformers",
    }  # fmt: skip
    run = _run_record(teacher, teacher_name, settings, filter, rows)
    if previous is not None and previous != run:
        changed = sorted(k for k in run if previous.get(k) != run[k])
        raise InputError(f"{folder.path} holds a run with other settings ({', '.join(changed)}); use another out_dir.")
    starts = range(0, len(rows), prompts_per_shard)
    mine = folder.begin(ranks, len(starts), run if previous is None else None)

    def completions(shard: int) -> int:
        return len(rows[starts[shard] : starts[shard] + prompts_per_shard]) * num_completions

    was_training = not server and teacher.training
    if not server:
        teacher.eval()
    mine_total = sum(completions(shard) for shard in mine)
    bar = progress_bar(ranks, len(rows) * num_completions, mine_total, "Generating", progress, unit="completion")
    failure = None
    try:
        with bar:
            for shard in mine:
                first = starts[shard]
                part = rows[first : first + prompts_per_shard]
                kept, counts = _generate_shard(
                    teacher, tokenizer, part, first, settings, filter, filter_workers, bar.update
                )
                record = {"first_prompt": first, "num_prompts": len(part), "rows": len(kept), **counts}
                folder.write_shard(shard, _parquet_bytes(kept) if kept else None, record)
    except Exception as error:  # the other ranks learn of it, and every rank stops here
        failure = error
    finally:
        if not server:
            teacher.train(was_training)
    ranks.agree(failure)
    folder.finish(ranks, len(starts), lambda shards: _manifest(run, shards, filter))
    return folder.path


def _run_record(
    teacher: Any, teacher_name: str | None, settings: dict[str, Any], filter: Any, rows: Sequence[Any]
) -> dict[str, Any]:
    """The ``run.json`` of a run: what its output depends on (teacher name, settings, filter, the prompts' hash)."""
    name = teacher_name or (teacher.model if isinstance(teacher, ServerTeacher) else None)
    name = name or getattr(getattr(teacher, "config", None), "name_or_path", None) or type(teacher).__name__
    return {
        "format": FORMAT,
        "teacher": name,
        "settings": settings,
        "filter": _filter_name(filter) if filter is not None else None,
        "num_prompts": len(rows),
        "prompts_sha256": _settings_hash(rows),
    }


def _manifest(run: dict[str, Any], shards: list[dict[str, Any]], filter: Any) -> dict[str, Any]:
    """The ``manifest.json`` of a finished run: its settings, totals, filter counts and shard records."""
    totals = {key: sum(s[key] for s in shards) for key in ("generated", "empty", "rows")}
    return {
        **run,
        "num_generated": totals["generated"],
        "num_empty_dropped": totals["empty"],
        "num_rows": totals["rows"],
        "filter": None
        if filter is None
        else {
            "name": run["filter"],
            "checked": sum(s["checked"] for s in shards),
            "passed": sum(s["passed"] for s in shards),
            # A sandboxed filter says how its code ran (distill.sandbox: "strict" or "weak" isolation).
            **({"sandbox": filter.sandbox_record} if hasattr(filter, "sandbox_record") else {}),
        },
        "shards": shards,
        "data_files": [s["file"] for s in shards if s["file"]],
    }


def read_manifest(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``manifest.json`` of a finished generation run."""
    return json.loads((Path(out_dir) / "manifest.json").read_text(encoding="utf-8"))


def load_generated(out_dir: str | os.PathLike[str], verify: bool = True, **load_kwargs: Any):
    """Load a finished run as a ``datasets.Dataset`` (``load_dataset("parquet", ...)``, split ``train``).

    Args:
        out_dir: The folder :func:`generate_dataset` wrote.
        verify: Check every shard's sha256 against the manifest first.
        **load_kwargs: Passed to ``datasets.load_dataset`` (e.g. ``cache_dir``).
    """
    import datasets

    out = Path(out_dir)
    manifest = read_manifest(out)
    for shard in manifest["shards"]:
        if verify and shard["file"]:
            if file_sha256(out / shard["file"]) != shard["sha256"]:
                raise ValueError(f"{out / shard['file']} does not match its sha256 in the manifest.")
    files = [str(out / f) for f in manifest["data_files"]]
    if not files:
        raise ValueError(f"{out} holds no rows (every completion was empty or filtered out).")
    return datasets.load_dataset("parquet", data_files=files, split="train", **load_kwargs)
