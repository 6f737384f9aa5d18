"""Quality of cross-tokenizer KD: SmolLM2-135M-Instruct teaching a student with a code tokenizer, on held-out code.

Four arms, the same data, steps, optimizer and schedule:

* ``sft``: the code-tokenizer student fine-tuned on the data (CE only).
* ``cross_kd``: the same student distilled from SmolLM2 across tokenizers (``cross_tokenizer="auto"``,
  P-KL forward KL at each aligned span + CE).
* ``cross_uld``: the same with GOLD's ULD baseline as the KD term.
* ``same_kd``: a student of the same architecture with SmolLM2's own tokenizer, distilled with the usual
  same-vocabulary loss (the gap a tokenizer change costs; its embeddings are larger: reported).

All are scored in bits per byte of held-out Python source (tokenizer-independent), with the teacher's own
bits per byte beside them. Python's standard library is the corpus: files sorted by name, every fourth
file held out.

Run: ``PYTHONPATH=src python benchmarks/quality_cross_tokenizer.py --steps 120 --out quality.json``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from distill import DistillConfig, Trainer
from distill.testing import smollm2_135m_instruct, tiny_llama


def code_files() -> tuple[list[str], list[str]]:
    """``(train texts, held-out texts)`` from the standard library's top-level modules."""
    folder = Path(os.path.dirname(json.__file__)).parent
    files = sorted(p for p in folder.glob("*.py") if p.stat().st_size > 4000)
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    return [t for i, t in enumerate(texts) if i % 4], [t for i, t in enumerate(texts) if not i % 4]


def chunks(texts: list[str], size: int, limit: int) -> list[str]:
    """Pieces of about ``size`` characters cut at line ends."""
    out: list[str] = []
    for text in texts:
        piece = ""
        for line in text.splitlines(keepends=True):
            piece += line
            if len(piece) >= size:
                out.append(piece)
                piece = ""
                if len(out) >= limit:
                    return out
    return out


def code_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the training code (digits split one by one, unlike SmolLM2's)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@torch.no_grad()
def bits_per_byte(model: torch.nn.Module, tokenizer: object, texts: list[str], max_length: int) -> float:
    """Held-out bits per UTF-8 byte: the model's summed CE over each text's tokens / (ln 2 * bytes)."""
    model.eval()
    nats, num_bytes = 0.0, 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_length]
        covered = tokenizer.decode(ids)
        input_ids = torch.tensor([ids])
        logits = model(input_ids=input_ids).logits[0, :-1].float()
        nats += float(torch.nn.functional.cross_entropy(logits, input_ids[0, 1:], reduction="sum"))
        num_bytes += len(covered.encode()) - len(tokenizer.decode(ids[:1]).encode())
    return nats / math.log(2) / num_bytes


def run_arm(name: str, student: torch.nn.Module, tokenizer: object, teacher: object, teacher_tokenizer: object,
            train: Dataset, args: argparse.Namespace, **loss: object) -> dict[str, float]:  # fmt: skip
    config = DistillConfig(
        output_dir=f"{args.workdir}/{name}", per_device_train_batch_size=args.batch, max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 20), logging_steps=10,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0, max_length=args.max_length,
        dataloader_num_workers=0, disable_tqdm=True, vocab_map_dir=f"{args.workdir}/maps", **loss,
    )  # fmt: skip
    trainer = Trainer(model=student, teacher=teacher, args=config, train_dataset=train, processing_class=tokenizer,
                      teacher_processing_class=teacher_tokenizer)  # fmt: skip
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    logs = [e for e in trainer.state.log_history if "kd_loss" in e]
    return {"train_seconds": seconds, "last_log": logs[-1] if logs else {}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--eval-texts", type=int, default=48)
    parser.add_argument("--chunk-chars", type=int, default=700)
    parser.add_argument("--arms", default="sft,cross_kd,cross_uld,same_kd")
    parser.add_argument("--workdir", default="/tmp/xtok_quality")
    parser.add_argument("--out", default="quality_cross_tokenizer.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report", default="quality_cross_tokenizer_report", help="folder for the report card")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train_texts, heldout_texts = code_files()
    train_rows = chunks(train_texts, args.chunk_chars, args.steps * args.batch)
    heldout = chunks(heldout_texts, args.chunk_chars, args.eval_texts)
    train = Dataset.from_list([{"text": t} for t in train_rows])
    teacher, teacher_tokenizer = smollm2_135m_instruct()
    student_tokenizer = code_tokenizer(train_texts, args.vocab)
    results: dict[str, object] = {"settings": vars(args), "train_rows": len(train_rows), "heldout_texts": len(heldout)}
    results["teacher_bpb"] = bits_per_byte(teacher, teacher_tokenizer, heldout, args.max_length)
    print("teacher bpb", results["teacher_bpb"], flush=True)
    body = dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=768, seed=1)
    kd = dict(loss="forward_kl", kd_weight=1.0, ce_weight=0.5)
    for arm in args.arms.split(","):
        if arm == "same_kd":
            tokenizer, student = teacher_tokenizer, tiny_llama(len(teacher_tokenizer), **body)
            arm_teacher, arm_teacher_tokenizer, loss = teacher, teacher_tokenizer, kd
        else:
            tokenizer, student = student_tokenizer, tiny_llama(len(student_tokenizer), **body)
            arm_teacher, arm_teacher_tokenizer = teacher, teacher_tokenizer
            loss = dict(kd, cross_tokenizer="auto", cross_tokenizer_loss="uld" if arm == "cross_uld" else "pkl")
            if arm == "sft":  # CE only; a tiny same-tokenizer stand-in teacher the loss ignores (kd_weight=0)
                arm_teacher = tiny_llama(len(student_tokenizer), hidden_size=32, num_layers=1, seed=5)
                arm_teacher_tokenizer, loss = student_tokenizer, dict(loss="forward_kl", kd_weight=0.0, ce_weight=1.0)
        result = run_arm(arm, student, tokenizer, arm_teacher, arm_teacher_tokenizer, train, args, **loss)
        result["bpb"] = bits_per_byte(student, tokenizer, heldout, args.max_length)
        result["params"] = sum(p.numel() for p in student.parameters())
        result["non_embedding_params"] = result["params"] - 2 * student.get_input_embeddings().weight.numel()
        results[arm] = result
        print(arm, json.dumps(result), flush=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    if "cross_kd" in results and "sft" in results:
        print(write_card(results, Path(args.report)), flush=True)


def write_card(results: dict[str, Any], folder: Path) -> str:
    """The report card: the cross-tokenizer KD student vs the same student fine-tuned, then every arm's row."""
    from distill.evaluation import ModelResult, write_report

    def entry(name: str, arm: str) -> ModelResult:
        return ModelResult.from_results(name, {"bits_per_byte": results[arm]["bpb"]}, log_history=None)

    teacher = ModelResult.from_results("teacher: SmolLM2-135M-Instruct", {"bits_per_byte": results["teacher_bpb"]})
    card = write_report(
        folder, teacher=teacher, student=entry("student (code tokenizer), cross-tokenizer KD", "cross_kd"),
        baseline=entry("the same student fine-tuned on the same data and budget", "sft"),
        primary_metric="bits_per_byte", title="Cross-tokenizer KD: SmolLM2-135M-Instruct -> a code-tokenizer student",
    )  # fmt: skip
    labels = {
        "sft": "code tokenizer, fine-tuned (CE only)",
        "cross_kd": "code tokenizer, cross-tokenizer KD (P-KL)",
        "cross_uld": "code tokenizer, cross-tokenizer KD (ULD)",
        "same_kd": "SmolLM2's tokenizer, same-vocabulary KD",
    }
    lines = [
        "## Every arm (same body, data, steps, optimizer and seed)",
        "",
        "| arm | parameters | non-embedding | held-out bits/byte | kept | train s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for arm, label in labels.items():
        if arm in results:
            r = results[arm]
            lines.append(
                f"| {label} | {r['params'] / 1e6:.1f}M | {r['non_embedding_params'] / 1e6:.1f}M | {r['bpb']:.3f} | "
                f"{2.0 ** (results['teacher_bpb'] - r['bpb']):.1%} | {r['train_seconds']:.0f} |"
            )
    if "same_kd" in results:
        gap = results["cross_kd"]["bpb"] - results["same_kd"]["bpb"]
        lines += ["", f"Gap of cross-tokenizer KD to the same-tokenizer student: {gap:+.3f} bits/byte."]
    table = "\n".join(lines)
    with (folder / "report.md").open("a", encoding="utf-8") as report:
        report.write("\n" + table + "\n")
    return card.headline + "\n\n" + table


if __name__ == "__main__":
    main()
