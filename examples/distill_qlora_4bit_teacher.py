"""QLoRA student and a 4-bit teacher on one GPU: the smallest memory footprint for a large teacher.

The teacher is given as a path, so the trainer loads it in 4-bit nf4 (``teacher_quantization``);
the student is loaded in 4-bit here and trained through LoRA adapters.

    python examples/distill_qlora_4bit_teacher.py --dataset train.jsonl   # 14B teacher -> 1.5B student
    python examples/distill_qlora_4bit_teacher.py --tiny
"""

from __future__ import annotations

import tempfile

from common import load_inputs, parse_args, tiny_overrides
from peft import LoraConfig

from distill import DistillConfig, Trainer
from distill.models import load_causal_lm


def main() -> None:
    args = parse_args(__doc__, teacher="Qwen/Qwen2.5-14B-Instruct", student="Qwen/Qwen2.5-1.5B-Instruct")
    teacher, student, tokenizer, dataset = load_inputs(args)
    if args.tiny:  # the tiny models exist only in memory: save them so they load quantized like real ones
        folder = tempfile.mkdtemp()
        teacher.save_pretrained(f"{folder}/teacher")
        student.save_pretrained(f"{folder}/student")
        teacher, student = f"{folder}/teacher", f"{folder}/student"
    student = load_causal_lm(student, quantization="4bit", dtype="float32" if args.tiny else "bfloat16")
    config = DistillConfig(
        output_dir=args.output_dir,
        loss="jsd",
        beta=0.5,
        teacher_quantization="4bit",
        teacher_dtype="float32" if args.tiny else "bfloat16",  # the 4-bit layers' compute dtype
        learning_rate=2e-4 if not args.tiny else 1e-2,
        per_device_train_batch_size=4,
        gradient_checkpointing=True,
        bf16=not args.tiny,
        logging_steps=1,
        report_to=[],
        **tiny_overrides(args),
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    trainer = Trainer(
        model=student,
        teacher=teacher,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        teacher_processing_class=tokenizer,
        peft_config=lora,
    )
    trainer.train()
    trainer.save_model(args.output_dir)


if __name__ == "__main__":
    main()
