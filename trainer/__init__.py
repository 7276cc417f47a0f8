"""DeltaKV compressor training on the Hugging Face Trainer (installed as ``sparse_hf.trainer``).

- :class:`ReconstructedKV` (``recon_forward``): run a Llama/Qwen2/Qwen3 LM on DeltaKV-reconstructed K/V.
- :class:`DeltaKVTrainingModel`, :class:`CompressorTrainer` (``trainer``): the loss and the Trainer.
- :func:`build_train_dataset`, :class:`PackedCollator` (``data``): packed training blocks.
- :func:`main` / :func:`run` (``cli``): ``sparse-hf train-compressor``.
"""

from sparse_hf.trainer.cli import build_trainer, main, run
from sparse_hf.trainer.data import PackedCollator, build_train_dataset, load_documents, pack_documents
from sparse_hf.trainer.recon_forward import ReconstructedKV
from sparse_hf.trainer.trainer import CompressorTrainer, DeltaKVTrainingModel

__all__ = [
    "CompressorTrainer",
    "DeltaKVTrainingModel",
    "PackedCollator",
    "ReconstructedKV",
    "build_train_dataset",
    "build_trainer",
    "load_documents",
    "main",
    "pack_documents",
    "run",
]
