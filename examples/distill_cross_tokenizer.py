"""Distil a teacher whose tokenizer differs from the student's (cross-tokenizer KD; docs/cross_tokenizer.md).

Each side renders the prompt with its own chat template; the completions' bytes are aligned into spans,
and the KD term compares both models at each span's first token after mapping the vocabularies onto
each other (the map is built once, cached, and audited before training: watch the log).

python examples/distill_cross_tokenizer.py --dataset train.jsonl     # Qwen2.5-1.5B -> SmolLM2-135M
python examples/distill_cross_tokenizer.py --tiny                     # offline, seconds, CPU
"""

from __future__ import annotations

from common import load_inputs, parse_args, tiny_overrides

from distill import DistillConfig, Trainer


def main() -> None:
    args = parse_args(__doc__, teacher="Qwen/Qwen2.5-1.5B-Instruct", student="HuggingFaceTB/SmolLM2-135M-Instruct")
    teacher, student, tokenizer, dataset = load_inputs(args)
    teacher_tokenizer = None  # loaded from --teacher when it is a path
    if args.tiny:  # a teacher with its own (differently trained) tokenizer
        from distill.testing import arithmetic_rows, tiny_llama, train_tiny_tokenizer

        teacher_tokenizer = train_tiny_tokenizer(400, texts=[str(row) for row in arithmetic_rows(300, seed=9)])
        teacher = tiny_llama(len(teacher_tokenizer), num_layers=4, seed=3)
    config = DistillConfig(
        output_dir=args.output_dir,
        cross_tokenizer="auto",  # align when the tokenizers differ ('off' refuses, as before)
        cross_tokenizer_loss="pkl",  # projected divergence; 'uld' or 'gold' for the ULD-family baselines
        loss="forward_kl",
        ce_weight=0.5,  # tokens inside a multi-token span learn from the data's labels
        learning_rate=2e-5 if not args.tiny else 3e-3,
        per_device_train_batch_size=4,
        bf16=not args.tiny,
        teacher_dtype="bfloat16" if not args.tiny else "auto",
        max_length=1024,
        logging_steps=1,
        save_steps=200,
        report_to=[],
        **tiny_overrides(args),
    )
    trainer = Trainer(model=student, teacher=teacher, args=config, train_dataset=dataset, processing_class=tokenizer,
                      teacher_processing_class=teacher_tokenizer)  # fmt: skip
    trainer.train()
    trainer.save_model(args.output_dir)


if __name__ == "__main__":
    main()
