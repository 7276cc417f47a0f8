"""``sparse-hf train-compressor``: train a DeltaKV compressor for a causal LM with the HF Trainer.

Every ``transformers.TrainingArguments`` flag works (``--max_steps``, ``--save_steps``, ``--bf16``,
``--resume_from_checkpoint``, ``--report_to`` ...); multi-GPU runs go through ``torchrun`` / ``accelerate launch``
as for any Trainer script. The output directory ends up holding only the compressor (config.json,
model.safetensors, README.md model card), loadable with ``DeltaKVCompressor.from_pretrained``.

Example::

    sparse-hf train-compressor --model demo --dataset docs.jsonl --output_dir out --kv_compressed_size 256 \\
        --down_type mlp_swiglu --down_intermediate_size 3072 --up_type linear --no_bias --max_steps 20000
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

from transformers import HfArgumentParser, TrainingArguments, set_seed

from sparse_hf.trainer.pca_init import BALANCES, INITS

logger = logging.getLogger(__name__)

#: What ``--model demo`` loads (through ``sparse_hf.models.load_model``), as named in the model card.
DEMO_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass
class CompressorArguments:
    """What to train on, and the compressor's shape and clustering."""

    model: str = field(metadata={"help": "base model: a local path, a Hub id, or 'demo' (SmolLM2-135M-Instruct)"})
    dataset: str = field(metadata={"help": "local .txt/.jsonl/.parquet/.csv file or directory, or a Hub dataset "
                                           "name ('name' or 'name:config')"})
    kv_compressed_size: int = field(default=256, metadata={"help": "latent width per token"})
    down_type: str = field(default="linear", metadata={"help": "linear | mlp_gelu | mlp_swiglu"})
    up_type: str = field(default="linear", metadata={"help": "linear | mlp_gelu | mlp_swiglu"})
    intermediate_size: int | None = field(default=None, metadata={"help": "hidden width of MLP projections"})
    down_intermediate_size: int | None = field(default=None, metadata={"help": "hidden width of the down MLP"})
    up_intermediate_size: int | None = field(default=None, metadata={"help": "hidden width of the up MLP"})
    bias: bool = field(default=True, metadata={"help": "bias in the projections (--no_bias to drop it)"})
    compressed_layers: str | None = field(default=None, metadata={"help": "e.g. '4,5,6'; default: every layer"})
    block_size: int = field(default=2048, metadata={"help": "tokens per packed training block"})
    cluster_ratio: float = field(default=0.1, metadata={"help": "one center every int(1/ratio) tokens"})
    neighbor_count: int = field(default=4, metadata={"help": "fathers per token (their mean is the reference)"})
    num_sink: int = field(default=16, metadata={"help": "leading raw tokens per block (also centers)"})
    cluster_metric: str = field(default="l2", metadata={"help": "l2 | dot | cosine"})
    mse_weight: float = field(default=1.0, metadata={"help": "weight of the summed per-layer reconstruction MSE"})
    mse_target: str = field(default="raw_pass", metadata={
        "help": "raw_pass (the reference: MSE against a separate uncompressed pass; ~1.3x the step cost; default, "
                "measured better in docs/deltakv_quality.md) | layer (against the same pass, one forward)"})
    text_field: str = field(default="text", metadata={"help": "column holding the documents"})
    split: str = field(default="train", metadata={"help": "dataset split, slicing allowed: 'train[:20%%]'"})
    max_blocks: int | None = field(default=None, metadata={"help": "use at most this many packed blocks"})
    eval_blocks: int = field(default=0, metadata={"help": "held-out blocks for the model card's quality numbers"})
    model_dtype: str = field(default="auto", metadata={"help": "base model dtype: auto (float32) | bfloat16 | float32 ..."})
    init: str = field(default="random", metadata={"help": "random | pca (linear projections: start from the PCA of "
                                                           "the residuals x - ref, see sparse_hf.trainer.pca_init)"})
    init_blocks: int = field(default=32, metadata={"help": "training blocks the PCA init reads"})
    pca_balance: str = field(default="none", metadata={
        "help": "none | kv: the PCA init's error weighs the K and V halves of concat(K, V) equally (their mean "
                "variances made equal) instead of by raw variance, see sparse_hf.trainer.pca_init"})


@dataclass
class CompressorTrainingArguments(TrainingArguments):
    """TrainingArguments with the reference recipe's defaults (lr 2e-4, batch 1, bf16 off unless asked)."""

    output_dir: str | None = field(default=None, metadata={"help": "where the compressor and checkpoints go"})
    learning_rate: float = field(default=2e-4, metadata={"help": "AdamW learning rate"})
    per_device_train_batch_size: int = field(default=1, metadata={"help": "blocks per device per step"})
    logging_steps: float = field(default=10, metadata={"help": "log every N steps"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "keep the packed columns"})

    def __post_init__(self):
        if not self.output_dir:
            raise ValueError("--output_dir is required: the compressor and its checkpoints are written there")
        super().__post_init__()


PROG = "sparse-hf train-compressor"
MSE_TARGETS = ("layer", "raw_pass")
DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".csv")


def check_compressor_args(args: CompressorArguments) -> None:
    """Every check of the arguments that needs no model or data loaded; raises ``ValueError`` naming the flag."""
    from sparse_hf.cli import check_model_arg
    from sparse_hf.deltakv.clustering import METRICS
    from sparse_hf.deltakv.compressor import PROJECTION_TYPES

    check_model_arg(args.model)
    for flag, value, choices in (("--init", args.init, INITS), ("--cluster_metric", args.cluster_metric, METRICS),
                                 ("--down_type", args.down_type, PROJECTION_TYPES),
                                 ("--up_type", args.up_type, PROJECTION_TYPES),
                                 ("--mse_target", args.mse_target, MSE_TARGETS),
                                 ("--pca_balance", args.pca_balance, BALANCES)):
        if value not in choices:
            raise ValueError(f"{flag} {value!r}: expected one of {', '.join(choices)}")
    for flag, value in (("--kv_compressed_size", args.kv_compressed_size), ("--block_size", args.block_size),
                        ("--neighbor_count", args.neighbor_count), ("--init_blocks", args.init_blocks)):
        if value < 1:
            raise ValueError(f"{flag} {value}: expected an integer >= 1")
    if args.num_sink < 0 or args.eval_blocks < 0:
        raise ValueError("--num_sink and --eval_blocks must be >= 0")
    if not 0.0 < args.cluster_ratio <= 1.0:
        raise ValueError(f"--cluster_ratio {args.cluster_ratio}: expected a ratio in (0, 1]")
    if args.compressed_layers:
        try:
            [int(i) for i in args.compressed_layers.split(",")]
        except ValueError:
            raise ValueError(f"--compressed_layers {args.compressed_layers!r}: expected integers like '4,5,6'") from None
    data = Path(args.dataset).expanduser()
    if not data.exists() and (args.dataset.lower().endswith(DATA_SUFFIXES) or args.dataset.startswith((".", "/", "~"))):
        raise ValueError(f"--dataset {args.dataset}: no such file or folder (pass a local .txt/.jsonl/.parquet/.csv "
                         "file or folder, or a Hub dataset name)")


def _one_line_error(message) -> None:
    """Print ``sparse-hf train-compressor: error: ...`` as one line and exit with status 2."""
    print(f"{PROG}: error: {' '.join(str(message).split())} (see `{PROG} --help`)", file=sys.stderr)
    raise SystemExit(2)


def parse_args(argv: list[str] | None = None) -> tuple[CompressorArguments, CompressorTrainingArguments]:
    """Parse and check the arguments, before anything is loaded. Malformed flags exit (status 2, one line); a bad
    value raises ``ValueError`` naming the flag (:func:`main` prints it as one line with status 2)."""
    parser = HfArgumentParser((CompressorArguments, CompressorTrainingArguments), prog=PROG,
                              description="Train a DeltaKV KV-cache compressor for a causal LM.")
    parser.error = _one_line_error
    args, training_args = parser.parse_args_into_dataclasses(args=argv)   # TrainingArguments checks: ValueError
    check_compressor_args(args)
    return args, training_args


def _load_base(name: str, dtype: str) -> tuple[Any, Any]:
    """``sparse_hf.models.load_model`` (a path, a Hub id, or 'demo'); ``auto`` keeps its float32 default."""
    import torch

    from sparse_hf.models import load_model

    return load_model(name, dtype=None if dtype == "auto" else getattr(torch, dtype))


def build_trainer(argv: list[str] | None = None, model_and_tokenizer: tuple[Any, Any] | None = None) -> Any:
    """Parse ``argv`` and set everything up: base model, fresh compressor, packed data, trainer (not trained yet).

    ``model_and_tokenizer`` skips loading ``--model`` (tests, notebooks). The held-out blocks, if any, are kept
    as ``trainer.held_out`` (``[num_blocks, block_size]`` ids).
    """
    import torch

    from sparse_hf.deltakv.compressor import DeltaKVCompressor
    from sparse_hf.trainer.data import PackedCollator, build_train_dataset
    from sparse_hf.trainer.trainer import CompressorTrainer, DeltaKVTrainingModel

    args, training_args = parse_args(argv)
    base, tokenizer = model_and_tokenizer or _load_base(args.model, args.model_dtype)
    set_seed(training_args.seed)  # the compressor's initial weights follow --seed
    layers = [int(i) for i in args.compressed_layers.split(",")] if args.compressed_layers else None
    compressor = DeltaKVCompressor.for_model(
        base.config, kv_compressed_size=args.kv_compressed_size, down_type=args.down_type, up_type=args.up_type,
        intermediate_size=args.intermediate_size, down_intermediate_size=args.down_intermediate_size,
        up_intermediate_size=args.up_intermediate_size, bias=args.bias, compressed_layers=layers,
        base_model=DEMO_MODEL if args.model == "demo" else args.model)
    model = DeltaKVTrainingModel(base, compressor, num_sink=args.num_sink, cluster_ratio=args.cluster_ratio,
                                 neighbor_count=args.neighbor_count, metric=args.cluster_metric,
                                 mse_weight=args.mse_weight, mse_target=args.mse_target)

    with training_args.main_process_first(desc="tokenize and pack"):
        blocks = build_train_dataset(args.dataset, tokenizer, args.block_size, split=args.split,
                                     text_field=args.text_field, max_blocks=args.max_blocks, shuffle_seed=42)
    if args.eval_blocks >= len(blocks):
        raise ValueError(f"--eval_blocks {args.eval_blocks} leaves no training data ({len(blocks)} blocks)")
    train_set = blocks.select(range(args.eval_blocks, len(blocks))) if args.eval_blocks else blocks
    logger.info("training on %d blocks of %d tokens; %d held out", len(train_set), args.block_size, args.eval_blocks)

    init = args.init
    if args.init == "pca":
        if training_args.resume_from_checkpoint:
            logger.info("--init pca skipped: the weights come from %s", training_args.resume_from_checkpoint)
        else:
            from sparse_hf.trainer.pca_init import pca_initialize

            count = min(args.init_blocks, len(train_set))
            balanced = ", K and V halves at equal variance" if args.pca_balance == "kv" else ""
            init = f"PCA of x - ref per layer{balanced} ({count} blocks of {args.block_size} tokens)"
            model.to(training_args.device)
            pca_initialize(model, torch.tensor(train_set.select(range(count))["input_ids"], dtype=torch.long),
                           batch_size=max(1, training_args.per_device_train_batch_size), progress=True,
                           balance=args.pca_balance)
    trainer = CompressorTrainer(model=model, args=training_args, train_dataset=train_set,
                                data_collator=PackedCollator(), training_data=args.dataset,
                                block_size=args.block_size, init=init)
    trainer.held_out = (torch.tensor(blocks.select(range(args.eval_blocks))["input_ids"], dtype=torch.long)
                        if args.eval_blocks else None)
    return trainer


def run(argv: list[str] | None = None, model_and_tokenizer: tuple[Any, Any] | None = None) -> Any:
    """Build, train (resuming if ``--resume_from_checkpoint``), measure the held-out blocks, save; return the trainer."""
    trainer = build_trainer(argv, model_and_tokenizer)
    trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    if trainer.stopper.received:   # SIGTERM/SIGINT: save what was learned now; the held-out check would delay it
        logger.warning("training stopped by %s after step %d of %d; saving the compressor without the held-out check",
                       trainer.stopper.received, trainer.state.global_step, trainer.state.max_steps)
    elif trainer.held_out is not None:
        model = trainer.accelerator.unwrap_model(trainer.model)
        trainer.quality = model.measure(trainer.held_out, batch_size=trainer.args.per_device_eval_batch_size)
        logger.info("held-out quality: %s", trainer.quality)
    trainer.save_model(trainer.args.output_dir)  # the compressor + README.md model card
    return trainer


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``sparse-hf train-compressor ...`` forwards its remaining arguments here)."""
    try:
        parse_args(argv)
    except ValueError as exc:
        _one_line_error(exc)
    try:
        run(argv)
    except BaseException:
        _close_process_group(wait_for_ranks=False)   # a failed rank must not wait for the others at a barrier
        raise
    _close_process_group(wait_for_ranks=True)
    return 0


def _close_process_group(wait_for_ranks: bool) -> None:
    """Under torchrun, tear the process group down before the interpreter exits (after a barrier on success).

    Leaving a gloo group to interpreter shutdown let one rank abort ("terminate called without an active exception",
    SIGABRT) while the other still used it; CI saw it once in the two-process training test.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait_for_ranks:
            dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
