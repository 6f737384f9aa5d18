"""Distil a teacher into a fully fine-tuned student (off-policy, generalized JSD, fused loss).

accelerate launch examples/distill_full.py --dataset train.jsonl       # Qwen2.5-1.5B -> 0.5B
python examples/distill_full.py --tiny                                 # offline, seconds, CPU
"""

from __future__ import annotations

from common import load_inputs, parse_args, tiny_overrides

from distill import DistillConfig, Trainer


def main() -> None:
    args = parse_args(__doc__, teacher="Qwen/Qwen2.5-1.5B-Instruct", student="Qwen/Qwen2.5-0.5B-Instruct")
    teacher, student, tokenizer, dataset = load_inputs(args)
    config = DistillConfig(
        output_dir=args.output_dir,
        loss="jsd",  # generalized JSD; beta=0 is forward KL(teacher||student), beta=1 reverse KL
        beta=0.5,
        ce_weight=0.0,  # add the data's hard labels with e.g. 0.1
        learning_rate=2e-5 if not args.tiny else 3e-3,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=4 if not args.tiny else 1,
        bf16=not args.tiny,
        teacher_dtype="bfloat16" if not args.tiny else "auto",
        max_length=1024,
        logging_steps=1,
        save_steps=200,
        report_to=[],
        **tiny_overrides(args),
    )
    trainer = Trainer(model=student, teacher=teacher, args=config, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(args.output_dir)


if __name__ == "__main__":
    main()
