"""A/B of the DeltaKV trainer's reconstruction target (``--mse_target layer`` vs ``raw_pass``) on the demo model.

Trains one compressor per target with the same seed, data, PCA start and step budget, then measures each on
held-out text with :meth:`DeltaKVTrainingModel.measure` (teacher-forced: every token after the sinks of every
compressed layer reconstructed, the "training-style proxy" of ``docs/deltakv_quality.md``). Prints one JSON line
per measurement; ``--out`` also writes them to a file.

Example (the run recorded in ``docs/deltakv_quality.md``)::

    OMP_NUM_THREADS=1 python benchmarks/mse_target_ab.py --data-dir ~/.cache/sparse_hf/data/austen \\
        --block-size 256 --steps 150 --eval-blocks 8 --eval-block-size 1024 --out /tmp/mse_ab.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def held_out_blocks(path: str, tokenizer, block_size: int, count: int):
    """``[count, block_size]`` ids of the held-out text (the first ``count`` packed blocks)."""
    import torch

    from sparse_hf.trainer.data import build_train_dataset

    packed = build_train_dataset(path, tokenizer, block_size, max_blocks=count)
    return torch.tensor(packed["input_ids"], dtype=torch.long)


def train_and_measure(target: str, args, model_and_tokenizer, eval_blocks) -> list[dict]:
    """Train one compressor with ``--mse_target target``; return the held-out measurements (at the PCA start,
    if ``args.measure_init``, and after training)."""
    from sparse_hf.trainer.cli import build_trainer

    out_dir = tempfile.mkdtemp(prefix=f"mse_ab_{target}_")
    argv = ["--model", "demo", "--dataset", os.path.join(args.data_dir, "train.jsonl"), "--output_dir", out_dir,
            "--kv_compressed_size", str(args.latent), "--block_size", str(args.block_size),
            "--cluster_ratio", "0.1", "--neighbor_count", "4", "--num_sink", "16", "--init", "pca",
            "--init_blocks", str(args.init_blocks), "--learning_rate", str(args.lr), "--lr_scheduler_type", "cosine",
            "--warmup_steps", str(max(1, args.steps // 20)), "--max_steps", str(args.steps),
            "--per_device_train_batch_size", str(args.batch), "--logging_steps", str(max(1, args.steps // 6)),
            "--save_strategy", "no", "--report_to", "none", "--seed", str(args.seed), "--mse_target", target,
            "--use_cpu", "true"]
    trainer = build_trainer(argv, model_and_tokenizer)
    model = trainer.model
    rows = []
    common = {"mse_target": target, "seed": args.seed, "block_size": args.block_size, "batch": args.batch,
              "latent": args.latent, "lr": args.lr}
    if args.measure_init:
        rows.append({**common, "steps": 0, **model.measure(eval_blocks)})
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    rows.append({**common, "steps": trainer.state.global_step, "train_s": round(train_s, 1),
                 "final_train_log": [h for h in trainer.state.log_history if "ce_loss" in h][-1:],
                 **model.measure(eval_blocks)})
    model.release()
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.path.expanduser("~/.cache/sparse_hf/data/austen"),
                   help="folder with train.jsonl and heldout.jsonl (examples/prepare_corpus.py)")
    p.add_argument("--targets", default="layer,raw_pass")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--latent", type=int, default=96)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--init-blocks", type=int, default=32)
    p.add_argument("--eval-blocks", type=int, default=8)
    p.add_argument("--eval-block-size", type=int, default=1024)
    p.add_argument("--measure-init", action="store_true", help="also measure the PCA start (before training)")
    p.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = p.parse_args(argv)

    import torch

    from sparse_hf.models import load_model

    torch.manual_seed(args.seed)
    for i, target in enumerate(args.targets.split(",")):
        model_and_tokenizer = load_model("demo")   # fresh base per run: the trainer patches its attention
        blocks = held_out_blocks(os.path.join(args.data_dir, "heldout.jsonl"), model_and_tokenizer[1],
                                 args.eval_block_size, args.eval_blocks)
        args.measure_init = args.measure_init and i == 0
        for row in train_and_measure(target, args, model_and_tokenizer, blocks):
            line = json.dumps(row)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()
