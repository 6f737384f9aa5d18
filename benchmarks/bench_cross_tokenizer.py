"""Cross-tokenizer distillation speed and memory: ours vs. TRL's GOLDTrainer, same models, data and steps.

Teacher: a random Llama with SmolLM2's tokenizer (49,152 tokens). Student: a random Llama with a 32,768-token
byte-level BPE trained on Python code (digits split). Both vocabularies are >= 32k, the case where GOLD's
materialised ``[tokens x vocab]`` probabilities (and their sorts) dominate. Random weights cost the same FLOPs
as trained ones. Rows: chat messages (a fixed user prompt, a ``--chars``-character code completion).

Each arm runs in its own process (peak RSS is per process): ``ours`` (``distill.Trainer`` with
``cross_tokenizer="auto"``) and ``gold`` (``trl.experimental.gold.GOLDTrainer`` with ``use_uld_loss`` and
``use_extended_uld``, off-policy ``lmbda=0``), each with the ULD-family loss it is known for (``--loss``).
Tokens/s counts the student's non-padding tokens of the timed steps (the first step is a warm-up).

Run (TRL lives in its own venv; see docs/cross_tokenizer.md):
``PYTHONPATH=src .venv-bench/bin/python benchmarks/bench_cross_tokenizer.py --steps 6``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from harness import StepClock, add_common_args, emit, markdown_table, peak_rss_mib, run_in_child

RESULT_PREFIX = "RESULT "
PROMPT = "Write the next part of this Python module."


def _rows(count: int, chars: int) -> list[dict[str, object]]:
    folder = Path(os.path.dirname(json.__file__)).parent
    rows: list[dict[str, object]] = []
    for path in sorted(folder.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        for start in range(0, len(text) - chars, chars):
            completion = text[start : start + chars]
            rows.append(
                {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": completion}]}
            )
            if len(rows) >= count:
                return rows
    return rows


def _tokenizers(workdir: Path) -> tuple[str, str]:
    """Folders of the student's code tokenizer (32k) and the teacher's (SmolLM2's), both with chat templates."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from distill.testing import CHATML_TEMPLATE, SMOLLM2_DIR

    student_dir, teacher_dir = workdir / "student_tokenizer", workdir / "teacher_tokenizer"
    if not student_dir.exists():
        folder = Path(os.path.dirname(json.__file__)).parent
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(folder.glob("*.py"))]
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
        tokenizer.decoder = decoders.ByteLevel()
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
        trainer = trainers.BpeTrainer(
            vocab_size=32768, special_tokens=specials, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )  # fmt: skip
        tokenizer.train_from_iterator(texts, trainer=trainer)
        wrapped = PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<pad>",
            additional_special_tokens=["<|im_start|>"],
        )  # fmt: skip
        wrapped.chat_template = CHATML_TEMPLATE
        wrapped.save_pretrained(student_dir)
    if not teacher_dir.exists():
        AutoTokenizer.from_pretrained(SMOLLM2_DIR).save_pretrained(teacher_dir)
    return str(student_dir), str(teacher_dir)


def _models(student_tokenizer: object, teacher_tokenizer: object, args: argparse.Namespace) -> tuple[object, object]:
    from distill.testing import tiny_llama

    shape = dict(hidden_size=args.hidden, num_layers=args.layers, num_heads=4, num_kv_heads=2,
                 intermediate_size=2 * args.hidden)  # fmt: skip
    teacher = tiny_llama(len(teacher_tokenizer), seed=1, **shape)
    student = tiny_llama(len(student_tokenizer), seed=2, **shape)
    return student, teacher


def run_arm(args: argparse.Namespace) -> dict[str, object]:
    import datasets
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    student_dir, teacher_dir = _tokenizers(workdir)
    student_tokenizer, teacher_tokenizer = (
        AutoTokenizer.from_pretrained(student_dir),
        AutoTokenizer.from_pretrained(teacher_dir),
    )
    student, teacher = _models(student_tokenizer, teacher_tokenizer, args)
    rows = datasets.Dataset.from_list(_rows(args.steps * args.batch, args.chars))
    common = dict(output_dir=str(workdir / args.impl), per_device_train_batch_size=args.batch, max_steps=args.steps,
                  learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                  dataloader_num_workers=0, disable_tqdm=True)  # fmt: skip
    timer = StepClock()
    if args.impl == "gold":
        from trl.experimental.gold import GOLDConfig, GOLDTrainer

        config = GOLDConfig(**common, max_length=args.max_length, lmbda=0.0, beta=0.0, temperature=1.0,
                            use_uld_loss=True, use_extended_uld=True, uld_use_hybrid_loss=args.loss == "gold",
                            teacher_tokenizer_name_or_path=teacher_dir, uld_crossentropy_weight=0.0,
                            uld_distillation_weight=1.0)  # fmt: skip
        trainer = GOLDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=rows,
                              processing_class=student_tokenizer, callbacks=[timer.callback])  # fmt: skip
    else:
        from distill import DistillConfig, Trainer

        config = DistillConfig(**common, max_length=args.max_length, cross_tokenizer="auto", loss="forward_kl",
                               cross_tokenizer_loss=args.loss, vocab_map_dir=str(workdir / "maps"))  # fmt: skip
        trainer = Trainer(model=student, teacher=teacher, args=config, train_dataset=rows,
                          processing_class=student_tokenizer, teacher_processing_class=teacher_tokenizer,
                          callbacks=[timer.callback])  # fmt: skip
    texts = [student_tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    tokens_per_row = sum(min(len(ids), args.max_length) for ids in student_tokenizer(texts)["input_ids"]) / len(rows)
    rss_before = peak_rss_mib()
    trainer.train()
    timed = timer.times[1:]
    return {
        "impl": args.impl,
        "loss": args.loss,
        "tokens_per_second": tokens_per_row * args.batch * len(timed) / sum(timed),
        "seconds_per_step": sum(timed) / len(timed),
        "peak_rss_mib": peak_rss_mib(),
        "rss_before_train_mib": rss_before,
        "student_vocab": len(student_tokenizer),
        "teacher_vocab": len(teacher_tokenizer),
        "tokens_per_row": tokens_per_row,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--impl", choices=["ours", "gold", "both"], default="both")
    parser.add_argument("--loss", choices=["uld", "gold", "pkl"], default="uld")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--chars", type=int, default=2400, help="characters of code per completion")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    add_common_args(parser, "threads", threads=2)
    parser.add_argument("--workdir", default="/tmp/xtok_bench")
    args = parser.parse_args()
    if args.impl != "both":
        emit(run_arm(args), RESULT_PREFIX)
        return
    results = []
    arms = [("ours", args.loss), ("gold", args.loss)] + ([("ours", "pkl")] if args.loss != "pkl" else [])
    for impl, loss in arms:
        command = [sys.executable, __file__, "--impl", impl, "--loss", loss] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("impl", "loss")
        ]
        result, out = run_in_child(command, RESULT_PREFIX, stderr=subprocess.PIPE)
        if result is None:
            print(out.stdout[-3000:], out.stderr[-5000:])
            raise SystemExit(f"arm {impl}/{loss} failed")
        results.append(result)
        print(results[-1], flush=True)
    header = ["impl", "loss", "tokens/s", "s/step", "peak RSS MiB", "RSS before train MiB"]
    rows = [[r["impl"], r["loss"], f"{r['tokens_per_second']:.0f}", f"{r['seconds_per_step']:.2f}",
             f"{r['peak_rss_mib']:.0f}", f"{r['rss_before_train_mib']:.0f}"] for r in results]  # fmt: skip
    print("\n" + "\n".join(markdown_table(header, rows, align="llrrrr")))


if __name__ == "__main__":
    main()
