"""The offline top-k cache: encodings, build and read, resume after SIGKILL, damage, and training from it."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from trainer_helpers import arithmetic_dataset, config, logged

from distill import Trainer
from distill.cache import (
    CacheCorruptError,
    CacheMismatchError,
    CacheMissError,
    Encoding,
    build_cache,
    bytes_per_token,
)
from distill.data import DistillCollator, prepare_dataset
from distill.formats.encoding import GRID_MAX_NATS
from distill.teachers import CachedTeacher, TopKTeacher
from distill.testing import tiny_teacher_student, train_tiny_tokenizer
from distill.trainer.batching import next_token_labels

SCRIPT = Path(__file__).parent / "scripts" / "build_cache_tiny.py"
MAX_LENGTH = 64


def _random_targets(rng: np.random.Generator, n: int, k: int, vocab: int, scale: float):
    """``n`` tokens of a random teacher: top-k ids, log-probs (float32, exact) and float64 tail."""
    logits = torch.from_numpy(rng.standard_normal((n, vocab)) * scale)
    logprobs, ids = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
    tail = (-torch.expm1(torch.logsumexp(logprobs.double(), dim=-1))).clamp(0.0, 1.0)
    return ids.numpy(), logprobs.numpy(), tail.numpy()


# ---- encodings ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [512, 49_152, 151_936])
@pytest.mark.parametrize("k", [1, 8, 33])
def test_encodings_round_trip(vocab: int, k: int) -> None:
    rng = np.random.default_rng(vocab + k)
    for scale in (0.3, 3.0, 12.0):  # nearly uniform, peaked, one-hot-like
        ids, logprobs, tail = _random_targets(rng, 40, k, vocab, scale)
        logprobs[0, (k + 1) // 2 :] = -np.inf  # fewer than k real entries (a server that returned fewer)
        tail[0] = np.clip(-np.expm1(np.logaddexp.reduce(logprobs[0].astype(np.float64))), 0.0, 1.0)
        shuffled = rng.permutation(k)  # any input order: stored highest first
        for name in ("compact", "fp16"):
            encoding = Encoding(name, k, vocab)
            encoded = encoding.encode(ids[:, shuffled], logprobs[:, shuffled], tail)
            assert len(encoded.ids) + len(encoded.logprobs) + len(encoded.mass) == 40 * encoding.bytes_per_token
            got_ids, got_logprobs, got_tail = encoding.decode(encoded)
            finite = np.isfinite(logprobs)
            np.testing.assert_array_equal(got_ids[finite], ids[finite])  # exact ids, in descending order
            np.testing.assert_array_equal(np.sort(got_ids[0]), np.sort(ids[0]))  # zero-mass ones in any order
            if name == "compact":  # entries more than GRID_MAX_NATS below the top-1 are stored as zero mass
                with np.errstate(invalid="ignore"):
                    finite &= logprobs[:, :1] - logprobs <= GRID_MAX_NATS
            np.testing.assert_array_equal(np.isfinite(got_logprobs), finite)
            error = np.abs(got_logprobs[finite] - logprobs[finite])
            if name == "fp16":
                # Half an fp16 ulp: 2^-11 relative (plus the subnormal floor).
                assert np.all(error <= np.abs(logprobs[finite]) * 2.0**-11 + 1e-7)
                np.testing.assert_allclose(got_tail, tail, rtol=1e-6, atol=1e-12)
            else:
                # Half a grid step at gap d to the top-1 (sqrt(24 d) / 254 + 24 / 254^2 / 4), plus the
                # renormalisation shift and the fp16 log-mass; stated in docs/offline.md.
                gap = (logprobs[:, :1] - logprobs)[finite]
                assert gap.max() <= GRID_MAX_NATS
                bound = np.sqrt(GRID_MAX_NATS * gap) / 254 + GRID_MAX_NATS / 254**2 + 0.03
                assert np.all(error <= bound), float((error - bound).max())
                probs = np.exp(logprobs.astype(np.float64))
                weighted = (probs[finite] * error).sum() / probs[finite].sum()
                assert weighted < 0.01
                np.testing.assert_allclose(got_tail, tail, rtol=2e-3, atol=1e-7)
                total = np.exp(got_logprobs.astype(np.float64)).sum(axis=1) + got_tail
                np.testing.assert_allclose(total, 1.0, atol=1e-3)  # renormalised: never above 1


def test_bytes_per_token_formulas() -> None:
    for k in (32, 64, 128):
        assert bytes_per_token("fp16", k, 151_936) == 6 * k + 4
        assert bytes_per_token("compact", k, 65_536) == 2 * k + k + 2  # 16-bit ids
        assert bytes_per_token("compact", k, 151_936) == math.ceil(18 * k / 8) + k + 2  # 18-bit ids
    assert bytes_per_token("compact", 32, 65_536) == 98  # the budget: <= 100 bytes per token
    with pytest.raises(ValueError, match="Unknown cache encoding"):
        Encoding("int4", 8, 512)


# ---- build and read -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def taught(tokenizer):
    from trainer_helpers import taught_pair

    torch.manual_seed(0)
    return taught_pair(tokenizer)


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tokenizer, taught):
    """``{encoding: cache folder}`` built from the taught teacher over the training rows (k = 16)."""
    teacher, _ = taught
    folders = {}
    for name in ("fp16", "compact"):
        folder = tmp_path_factory.mktemp(f"cache_{name}")
        build_cache(
            teacher, arithmetic_dataset(), folder, tokenizer=tokenizer, top_k=16, encoding=name,
            max_length=MAX_LENGTH, rows_per_shard=10, progress=False,
        )  # fmt: skip
        folders[name] = folder
    return folders


def _batch(tokenizer, rows):
    return DistillCollator(tokenizer.pad_token_id)([rows[i] for i in range(len(rows))])


@pytest.mark.parametrize("name", ["fp16", "compact"])
def test_cached_targets_equal_live_topk(caches, tokenizer, taught, name: str) -> None:
    teacher, _ = taught
    cached = CachedTeacher(caches[name], tokenizer=tokenizer)
    manifest = cached.manifest
    assert manifest["complete"] and manifest["config"]["k"] == 16 and manifest["config"]["encoding"]["name"] == name
    assert manifest["totals"]["encoded_bytes_per_token"] == Encoding(name, 16, len(tokenizer)).bytes_per_token
    rows, report = prepare_dataset(arithmetic_dataset(), tokenizer, max_length=MAX_LENGTH)
    assert len(cached.reader) == report.num_rows and manifest["totals"]["tokens"] == report.num_loss_tokens
    batch = _batch(tokenizer, rows.select([5, 0, 17, 31]))  # any order, padded to this batch's length
    got = cached.targets(batch["input_ids"], batch["attention_mask"])
    loss = next_token_labels(batch["labels"]) != -100
    # Bit-identical to the live teacher's top-k passed through the same encoding.
    same = TopKTeacher(teacher, 16, encoding=name).targets(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(got.topk_ids[loss], same.topk_ids[loss])
    torch.testing.assert_close(got.topk_logprobs[loss], same.topk_logprobs[loss], atol=1e-6, rtol=0)
    torch.testing.assert_close(got.tail_mass[loss], same.tail_mass[loss], atol=1e-6, rtol=0)
    # And close to the exact float32 top-k (error of the encoding).
    exact = TopKTeacher(teacher, 16).targets(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(got.topk_ids[loss], exact.topk_ids[loss])
    tolerance = {"fp16": 5e-3, "compact": 0.1}[name]
    assert (got.topk_logprobs[loss] - exact.topk_logprobs[loss]).abs().max() < tolerance
    cached.check_dataset(rows)


def test_corrupt_or_truncated_shard_is_named(caches, tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    shutil.copytree(caches["compact"], folder)
    shard = folder / "shard-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the data pages
    shard.write_bytes(bytes(data))
    cached = CachedTeacher(folder)  # the index reads only the key column; the damage is elsewhere
    with pytest.raises(CacheCorruptError, match="shard-00001.parquet.*sha256"):
        cached.verify()
    rows, _ = prepare_dataset(arithmetic_dataset(), train_tiny_tokenizer(), max_length=MAX_LENGTH)
    batch = _batch(train_tiny_tokenizer(), rows.select([12]))  # row 12 lives in shard 1
    with pytest.raises(CacheCorruptError, match="shard-00001.parquet"):
        CachedTeacher(folder).targets(batch["input_ids"], batch["attention_mask"])
    shard.write_bytes(bytes(data[: len(data) // 3]))  # truncated: the footer is gone
    with pytest.raises(CacheCorruptError, match="shard-00001.parquet"):
        CachedTeacher(folder)


def test_tokenizer_mismatch_missing_row_and_packing_are_refused(caches, tokenizer) -> None:
    other = train_tiny_tokenizer(vocab_size=400)
    with pytest.raises(CacheMismatchError, match="another tokenizer"):
        CachedTeacher(caches["fp16"], tokenizer=other)
    cached = CachedTeacher(caches["fp16"], tokenizer=tokenizer)
    from datasets import Dataset

    unseen = [
        {"messages": [{"role": "user", "content": "What is 12 plus 30?"}, {"role": "assistant", "content": "42"}]}
    ]
    rows, _ = prepare_dataset(Dataset.from_list(unseen), tokenizer, max_length=MAX_LENGTH)
    batch = _batch(tokenizer, rows)
    with pytest.raises(CacheMissError, match="max_length=64"):
        cached.targets(batch["input_ids"], batch["attention_mask"])
    with pytest.raises(ValueError, match="packed"):
        cached.targets(batch["input_ids"], None)
    all_tokens, _ = prepare_dataset(arithmetic_dataset(), tokenizer, max_length=MAX_LENGTH, completion_only_loss=False)
    with pytest.raises(CacheMismatchError, match="completion_only_loss"):
        cached.check_dataset(all_tokens)


def test_rebuilding_with_other_settings_is_refused(caches, tokenizer, taught, tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    shutil.copytree(caches["fp16"], folder)
    with pytest.raises(CacheMismatchError, match="differing: encoding, k"):
        build_cache(taught[0], arithmetic_dataset(), folder, tokenizer=tokenizer, top_k=8, max_length=MAX_LENGTH,
                    rows_per_shard=10, progress=False)  # fmt: skip


# ---- resume ---------------------------------------------------------------------------------------------


def _load_script():
    spec = importlib.util.spec_from_file_location("build_cache_tiny", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_byte_identical(tmp_path: Path, seed: int) -> None:
    script = _load_script()
    reference = script.build(str(tmp_path / "reference"))
    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    rng = random.Random(seed)
    alive_at_kill = 0
    for _ in range(3):
        process = subprocess.Popen(
            [sys.executable, str(SCRIPT), str(out), "--delay", "0.02"], stdout=subprocess.PIPE, env=env, text=True
        )
        assert process.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.8))
        alive_at_kill += process.poll() is None
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stdout.close()
        if (out / "manifest.json").exists():  # whatever was written so far lists only whole shards
            for shard in json.loads((out / "manifest.json").read_text())["shards"]:
                assert (out / shard["file"]).stat().st_size == shard["bytes"]
        for record in out.glob("shard-*.json"):  # so does every shard's record (the unfinished manifest lists none)
            shard = json.loads(record.read_text())
            assert (out / shard["file"]).stat().st_size == shard["bytes"]
        for shard in out.glob("shard-*.parquet"):  # listed or not yet, every shard under its final name is whole
            assert len(_keys(shard)) == script.ROWS_PER_SHARD
    assert alive_at_kill >= 1, "every kill came after the build had finished: nothing was tested"
    finished = subprocess.run([sys.executable, str(SCRIPT), str(out)], env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert _files(out) == _files(tmp_path / "reference")  # shards and manifest byte-identical, no temp files
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == reference
    keys = [key for shard in sorted(out.glob("shard-*.parquet")) for key in _keys(shard)]
    assert len(keys) == script.ROWS == manifest["totals"]["rows"]
    assert sorted(set(keys)) == sorted(set(_keys_of_rows()))


def _keys(shard: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(shard, columns=["key"])["key"].to_pylist()


def _keys_of_rows() -> list[str]:
    from datasets import Dataset

    from distill.cache import row_key
    from distill.testing import arithmetic_rows

    script = _load_script()
    rows, _ = prepare_dataset(
        Dataset.from_list(arithmetic_rows(script.ROWS, seed=3)), train_tiny_tokenizer(), max_length=64
    )
    return [row_key(ids) for ids in rows["input_ids"]]


# ---- training from the cache ----------------------------------------------------------------------------


def _train(tmp_path: Path, tokenizer, student, teacher, name: str) -> list[float]:
    trainer = Trainer(
        model=student, teacher=teacher, args=config(tmp_path / name, max_steps=8), train_dataset=arithmetic_dataset(),
        processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    return logged(trainer, "loss")


def test_trainer_trains_from_the_cache_like_the_live_topk_teacher(
    caches, tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainer_helpers import taught_pair
    from transformers import LlamaForCausalLM

    teacher, student = taught_pair(tokenizer)
    other_forwards = []  # forwards of any Llama but the student being trained: i.e. of a teacher
    original_forward = LlamaForCausalLM.forward

    def counting_forward(self, *args, **kwargs):
        if self is not student:
            other_forwards.append(self)
        return original_forward(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "forward", counting_forward)
    cached = _train(tmp_path, tokenizer, student, CachedTeacher(caches["fp16"], tokenizer=tokenizer), "cached")
    assert not other_forwards, "a teacher model ran while training from the cache"
    assert cached[-1] < cached[0]
    _, student = taught_pair(tokenizer)
    live = _train(tmp_path, tokenizer, student, TopKTeacher(teacher, 16, encoding="fp16"), "live")
    assert other_forwards  # the counter does see a live teacher
    np.testing.assert_allclose(cached, live, atol=1e-5, rtol=0)


def test_trainer_from_the_compact_cache_is_close_to_exact_topk(caches, tokenizer, tmp_path: Path) -> None:
    from trainer_helpers import taught_pair

    teacher, student = taught_pair(tokenizer)
    cached = _train(tmp_path, tokenizer, student, CachedTeacher(caches["compact"], tokenizer=tokenizer), "cached")
    _, student = taught_pair(tokenizer)
    exact = _train(tmp_path, tokenizer, student, TopKTeacher(teacher, 16), "exact")
    # The 8-bit grid moved the logged JSD by at most 0.83% over these 8 steps (docs/offline.md).
    np.testing.assert_allclose(cached, exact, rtol=0.015, atol=2e-4)


def test_sampled_cache_is_deterministic_unbiased_targets_and_trains_forward_kl_only(
    tokenizer, taught, tmp_path: Path
) -> None:
    teacher, _ = taught

    def build(folder: str, batch_tokens: int) -> Path:
        build_cache(
            teacher, arithmetic_dataset(), tmp_path / folder, tokenizer=tokenizer, top_k=8, targets="sampled",
            seed=5, max_length=MAX_LENGTH, rows_per_shard=10, batch_tokens=batch_tokens, progress=False,
        )  # fmt: skip
        return tmp_path / folder

    first, second = build("a", 16384), build("b", 200)  # other batching: the same draws per row
    for shard in sorted(first.glob("shard-*.parquet")):
        assert shard.read_bytes() == (second / shard.name).read_bytes()
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["config"]["targets"] == "sampled" and manifest["config"]["seed"] == 5
    cached = CachedTeacher(first, tokenizer=tokenizer)
    assert cached.sampled

    rows, _ = prepare_dataset(arithmetic_dataset(), tokenizer, max_length=MAX_LENGTH)
    batch = _batch(tokenizer, rows)
    targets = cached.targets(batch["input_ids"], batch["attention_mask"])
    assert targets.estimate and not bool(targets.tail_mass.any())
    # Every weight is at least the teacher's probability of its token (max(p, threshold)); heavy tokens exact.
    probs = torch.softmax(teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
    loss_positions = next_token_labels(batch["labels"]) != -100
    true = probs.gather(-1, targets.topk_ids)[loss_positions]
    weights = targets.topk_logprobs[loss_positions].exp()
    assert bool((weights >= true * 0.9 - 1e-6).all())  # 0.9: the 8-bit grid

    with pytest.raises(ValueError, match="forward KL"):  # refused before any training
        Trainer(model=taught_student(tokenizer), teacher=cached, args=config(tmp_path / "jsd", loss="jsd"),
                train_dataset=arithmetic_dataset(), processing_class=tokenizer)  # fmt: skip
    trainer = Trainer(
        model=taught_student(tokenizer), teacher=cached, args=config(tmp_path / "fkl", loss="forward_kl", max_steps=8),
        train_dataset=arithmetic_dataset(), processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    losses = logged(trainer, "loss")
    assert all(math.isfinite(value) for value in losses) and losses[-1] < losses[0]


def taught_student(tokenizer):
    from trainer_helpers import taught_pair

    return taught_pair(tokenizer)[1]


# ---- command line ---------------------------------------------------------------------------------------


def test_cli_builds_a_cache(tmp_path: Path, tokenizer) -> None:
    from distill.cache import cli
    from distill.testing import tiny_teacher_student

    teacher, _ = tiny_teacher_student(vocab_size=len(tokenizer))
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    arithmetic_dataset(8).to_json(tmp_path / "rows.jsonl")
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(
        ["cache", "--teacher", str(tmp_path / "teacher"), "--dataset", str(tmp_path / "rows.jsonl"), "--out",
         str(tmp_path / "cache"), "--top-k", "4", "--max-length", "64", "--no-progress", "--dtype", "fp32"]
    )  # fmt: skip
    assert args.func(args) == 0
    cached = CachedTeacher(tmp_path / "cache", tokenizer=tokenizer)
    cached.verify()
    assert cached.manifest["config"]["teacher"]["name"] == str(tmp_path / "teacher")
    assert len(cached.reader) == 8
    from datasets import load_dataset  # the shards are plain parquet

    shards = load_dataset("parquet", data_files=str(tmp_path / "cache" / "shard-*.parquet"), cache_dir=str(tmp_path))
    assert shards["train"].column_names == ["key", "index", "num_tokens", "spans", "ids", "logprobs", "mass"]
    assert shards["train"].num_rows == 8


def test_trainer_refuses_a_cache_built_for_other_loss_positions(caches, tokenizer, tmp_path: Path) -> None:
    """Built with completion_only_loss=True, trained with False: the prompt positions have no targets."""
    from distill.cache import CacheMismatchError

    _, student = tiny_teacher_student(vocab_size=len(tokenizer))
    with pytest.raises(CacheMismatchError, match="completion_only_loss"):
        Trainer(
            model=student,
            teacher=CachedTeacher(caches["fp16"], tokenizer=tokenizer),
            args=config(tmp_path / "out", max_length=MAX_LENGTH, completion_only_loss=False),
            train_dataset=arithmetic_dataset(),
            processing_class=tokenizer,
        )
    assert not (tmp_path / "out").exists()
