"""Does the intermediate-layer (hidden-state) loss help? Held-out KD after the same steps, off vs on.

Tiny arithmetic chat task (``distill.testing.arithmetic_rows``), a teacher taught on it (4 layers,
hidden 128; ``tests/trainer_helpers.taught_pair``), two student starts:

* ``random``: a fresh 2-layer, hidden-64 Llama (widths differ: learned projections, evenly spaced map);
* ``layers0,3``: teacher layers 0 and 3 copied, with a pruning record (exact map 0->0, 1->3, identity).

Each is trained ``--steps`` AdamW steps (lr 3e-3, batch 4, 64 rows) with ``hidden_loss_weight`` 0 or 1
(cosine / mse), per seed, then evaluated on 64 held-out rows: KD (generalized JSD, beta 0.5), CE on the
labels, top-1 agreement with the teacher. Prints a Markdown table (mean ± std over seeds).

    PYTHONPATH=src python benchmarks/bench_hidden_loss.py --seeds 3
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from harness import markdown_row, markdown_table, time_once  # noqa: E402
from trainer_helpers import arithmetic_dataset, config, pruned_student, taught_pair  # noqa: E402

from distill import Trainer  # noqa: E402
from distill.testing import train_tiny_tokenizer  # noqa: E402

SETTINGS = ("off", "cosine", "mse")


def _student(init: str, teacher: torch.nn.Module, random_student: torch.nn.Module) -> torch.nn.Module:
    if init == "random":
        return copy.deepcopy(random_student)
    student = pruned_student(teacher, (0, 3))
    student.config.distill_pruning = {
        "teacher_num_hidden_layers": 4, "teacher_hidden_size": 128, "layers": [0, 3], "hidden_channels": None,
    }  # fmt: skip
    return student


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=48)
    cli = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = train_tiny_tokenizer()
    teacher, random_student = taught_pair(tokenizer)
    held_out = arithmetic_dataset(64, seed=99)
    results: dict[tuple[str, str], list[tuple[float, ...]]] = {}
    with tempfile.TemporaryDirectory() as out:
        for init in ("random", "layers0,3"):
            for setting in SETTINGS:
                for seed in range(cli.seeds):
                    hidden = {} if setting == "off" else dict(hidden_loss_weight=1.0, hidden_loss=setting)
                    args = config(
                        out, max_steps=cli.steps, learning_rate=3e-3, seed=seed, data_seed=seed,
                        logging_steps=cli.steps, per_device_eval_batch_size=16, **hidden,
                    )  # fmt: skip
                    trainer = Trainer(
                        model=_student(init, teacher, random_student), teacher=teacher, args=args,
                        train_dataset=arithmetic_dataset(64, seed=seed), eval_dataset=held_out,
                        processing_class=tokenizer,
                    )  # fmt: skip
                    seconds = time_once(trainer.train)
                    ev = trainer.evaluate()
                    row = (ev["eval_kd_loss"], ev["eval_ce_loss"], ev["eval_top1_agreement"], seconds)
                    results.setdefault((init, setting), []).append(row)
    header = ["start", "hidden loss", "held-out KD (JSD)", "held-out CE", "top-1 agreement", "train s"]
    print("\n".join(markdown_table(header, [], align="llllll")))
    for (init, setting), rows in results.items():

        def cell(i: int, rows: list[tuple[float, ...]] = rows) -> str:
            values = [r[i] for r in rows]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.3f} ± {spread:.3f}"

        seconds = statistics.mean(r[3] for r in rows)
        print(markdown_row([init, setting, cell(0), cell(1), cell(2), f"{seconds:.1f}"]))


if __name__ == "__main__":
    main()
