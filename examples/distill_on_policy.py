"""On-policy distillation (GKD, Agarwal et al. 2024, https://arxiv.org/abs/2306.13649).

With ``lmbda=1`` every step the student samples completions for the dataset's prompts and the
teacher scores them token by token: the student learns from its own mistakes instead of only
from teacher-forced text. Reverse KL (``beta=1``) is mode-seeking, the usual choice on-policy.

    python examples/distill_on_policy.py --dataset prompts.jsonl
    python examples/distill_on_policy.py --tiny
"""

from __future__ import annotations

from common import load_inputs, parse_args, tiny_overrides

from distill import DistillConfig, Trainer


def main() -> None:
    args = parse_args(__doc__, teacher="Qwen/Qwen2.5-1.5B-Instruct", student="Qwen/Qwen2.5-0.5B-Instruct")
    teacher, student, tokenizer, dataset = load_inputs(args)
    config = DistillConfig(
        output_dir=args.output_dir,
        loss="jsd",
        beta=1.0,
        lmbda=1.0,  # fraction of steps on student samples; 0.5 mixes with the dataset's completions
        max_new_tokens=256 if not args.tiny else 16,
        generation_temperature=1.0,
        learning_rate=5e-6 if not args.tiny else 3e-3,
        per_device_train_batch_size=4,
        bf16=not args.tiny,
        logging_steps=1,
        report_to=[],
        **tiny_overrides(args),
    )
    trainer = Trainer(model=student, teacher=teacher, args=config, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(args.output_dir)


if __name__ == "__main__":
    main()
