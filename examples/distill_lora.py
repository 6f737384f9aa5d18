"""Distil into LoRA adapters on a frozen student (the base weights never change), with gradient checkpointing.

python examples/distill_lora.py --dataset train.jsonl
python examples/distill_lora.py --tiny
"""

from __future__ import annotations

from common import load_inputs, parse_args, tiny_overrides
from peft import LoraConfig

from distill import DistillConfig, Trainer


def main() -> None:
    args = parse_args(__doc__, teacher="Qwen/Qwen2.5-7B-Instruct", student="Qwen/Qwen2.5-1.5B-Instruct")
    teacher, student, tokenizer, dataset = load_inputs(args)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    config = DistillConfig(
        output_dir=args.output_dir,
        loss="forward_kl",
        temperature=1.0,
        learning_rate=1e-4 if not args.tiny else 1e-2,
        per_device_train_batch_size=4,
        gradient_checkpointing=True,
        bf16=not args.tiny,
        teacher_dtype="bfloat16" if not args.tiny else "auto",
        logging_steps=1,
        report_to=[],
        **tiny_overrides(args),
    )
    trainer = Trainer(
        model=student,
        teacher=teacher,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora,
    )
    trainer.train()
    trainer.save_model(args.output_dir)  # saves the adapters only


if __name__ == "__main__":
    main()
