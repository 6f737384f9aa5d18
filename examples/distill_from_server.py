"""Distil from a teacher served by vLLM on other GPUs: live (targets prefetched) or through an offline cache.

On the teacher's machine:
    vllm serve Qwen/Qwen2.5-72B-Instruct --served-model-name teacher --tensor-parallel-size 4 --max-logprobs 64

Here, live (each batch's top-k asked for while the previous one trains):
    python examples/distill_from_server.py --server http://gpu-box:8000 --student Qwen/Qwen2.5-1.5B-Instruct \\
        --dataset train.jsonl
Or cache the teacher once (resumable: rerun after an interruption), then train from the cache:
    python examples/distill_from_server.py --server http://gpu-box:8000 --student Qwen/Qwen2.5-1.5B-Instruct \\
        --dataset train.jsonl --cache teacher-cache/
"""

from __future__ import annotations

import argparse

from datasets import load_dataset
from transformers import AutoTokenizer

from distill import DistillConfig, Trainer
from distill.cache import build_cache
from distill.teachers import CachedTeacher, ServerTeacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", required=True, help="URL of the vLLM server")
    parser.add_argument("--served-model", default="teacher", help="its --served-model-name")
    parser.add_argument("--student", required=True, help="student model: hub name or local folder")
    parser.add_argument("--dataset", required=True, help="a .jsonl file or hub dataset (messages / prompt+completion)")
    parser.add_argument("--cache", help="build (or resume) a cache from the server here, then train from it")
    parser.add_argument("--top-k", type=int, default=20, help="at most the server's --max-logprobs")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--output-dir", default="out")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU (a smoke test)")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.student)
    if args.dataset.endswith((".jsonl", ".json")):
        dataset = load_dataset("json", data_files=args.dataset, split="train")
    else:
        dataset = load_dataset(args.dataset, split="train")
    # Refuses a server whose model does not share the student's tokenizer, before any work.
    teacher = ServerTeacher(args.server, args.served_model, top_k=args.top_k, tokenizer=tokenizer, max_concurrency=16)
    if args.cache:
        build_cache(teacher, dataset, args.cache, tokenizer=tokenizer, top_k=args.top_k, max_length=args.max_length)
        teacher = CachedTeacher(args.cache, tokenizer=tokenizer)  # the server can be stopped from here on
    config = DistillConfig(
        output_dir=args.output_dir,
        loss="forward_kl",
        sparse_tail="bucket",
        max_length=args.max_length,
        max_steps=args.max_steps,
        learning_rate=2e-5,
        per_device_train_batch_size=4,
        bf16=not args.cpu,
        use_cpu=args.cpu,
        teacher_prefetch=2,  # live: ask for the next 2 batches' targets while this one trains
        logging_steps=1,
        report_to=[],
    )
    trainer = Trainer(
        model=args.student, teacher=teacher, args=config, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    trainer.save_model(args.output_dir)


if __name__ == "__main__":
    main()
