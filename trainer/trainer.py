"""Training a DeltaKV compressor with the Hugging Face ``Trainer``.

:class:`DeltaKVTrainingModel` wraps a frozen causal LM and a trainable :class:`DeltaKVCompressor`. Its loss is the
reference's ``cluster_e2e_big`` objective::

    loss = CE(logits of the pass with every compressed layer's K/V reconstructed, labels) + mse_weight * sum_l MSE_l

where ``MSE_l`` compares layer ``l``'s reconstruction with the raw x of the same pass (``mse_target="layer"``, one
pass) or of a separate no-grad raw pass (``"raw_pass"``, as the reference does; twice the forward cost).

:class:`CompressorTrainer` is a ``transformers.Trainer`` whose checkpoints hold only the compressor
(``config.json``, ``model.safetensors``, ``README.md``, loadable with ``DeltaKVCompressor.from_pretrained``) and
that resumes from them; logs add ``ce_loss`` and ``recon_mse``.
"""

from __future__ import annotations

import math
import os
import signal
import threading
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from sparse_hf.deltakv.compressor import DeltaKVCompressor
from sparse_hf.trainer.recon_forward import ReconstructedKV

MSE_TARGETS = ("layer", "raw_pass")


class DeltaKVTrainingModel(nn.Module):
    """Frozen ``base`` LM + trainable ``compressor``; ``forward(input_ids, labels)`` returns the DeltaKV loss.

    Args:
        base: a Llama / Qwen2 / Qwen3 ``*ForCausalLM``; all its parameters are frozen here.
        compressor: shaped for ``base`` (checked); all its parameters are set trainable.
        num_sink, cluster_ratio, neighbor_count, metric: the clustering of :class:`ReconstructedKV`.
        mse_weight: weight of the summed per-layer MSE (1.0 in the reference).
        mse_target: ``"layer"`` or ``"raw_pass"`` (see the module docstring). ``sparse-hf train-compressor``
            defaults to ``"raw_pass"``, which trained the better compressor in ``docs/deltakv_quality.md``
            ("Reconstruction target"); this class keeps ``"layer"``, the one-pass target that :meth:`measure`'s
            "reconstruction MSE" and the PCA initialization's optimum refer to.
    """

    def __init__(self, base: nn.Module, compressor: DeltaKVCompressor, *, num_sink: int = 16,
                 cluster_ratio: float = 0.1, neighbor_count: int = 4, metric: str = "l2", mse_weight: float = 1.0,
                 mse_target: str = "layer"):
        super().__init__()
        if mse_target not in MSE_TARGETS:
            raise ValueError(f"mse_target={mse_target!r}: expected one of {', '.join(MSE_TARGETS)}")
        self.base, self.compressor = base, compressor
        self.base.requires_grad_(False)
        self.compressor.requires_grad_(True)
        self.mse_weight, self.mse_target = mse_weight, mse_target
        # Installed for the model's whole life: gradient checkpointing re-runs the attention during backward,
        # after forward() has returned, and must see the same reconstructing forward. ``release()`` undoes it.
        self.patch = ReconstructedKV(base, compressor, num_sink=num_sink, cluster_ratio=cluster_ratio,
                                     neighbor_count=neighbor_count, metric=metric).install()

    @property
    def knobs(self) -> dict[str, Any]:
        """The clustering this model trains with (held by :attr:`patch`)."""
        p = self.patch
        return {"num_sink": p.num_sink, "cluster_ratio": p.cluster_ratio, "neighbor_count": p.neighbor_count,
                "metric": p.metric}

    def release(self) -> nn.Module:
        """Put the base model's own attention back and return it (the training model is unusable afterwards)."""
        self.patch.remove()
        return self.base

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """input_ids/labels ``[B, N]`` (unpadded packed blocks) -> ``{"loss", "ce_loss", "recon_mse"}``."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("DeltaKV compressor training expects unpadded packed blocks (attention_mask all ones)")
        self.patch.layer_mse.clear()
        self.patch.targets.clear()
        if self.mse_target == "raw_pass":
            self.patch.mode = "record"
            with torch.no_grad():
                self.base(input_ids=input_ids, use_cache=False, logits_to_keep=1)
        self.patch.mode = "reconstruct"
        out = self.base(input_ids=input_ids, labels=labels if labels is not None else input_ids, use_cache=False)
        mse = self.patch.total_mse()
        # the raw targets stay until the next forward clears them: gradient checkpointing re-runs the attention
        # (and so the MSE) during backward, after this returns, and must compare against the same targets
        return {"loss": out.loss + self.mse_weight * mse, "ce_loss": out.loss.detach(), "recon_mse": mse.detach()}

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """Checkpoint the base model's layers (non-reentrant by default: the frozen inputs carry no grad)."""
        ckpt_kwargs = activation_checkpointing_kwargs or {"use_reentrant": False}
        if hasattr(self.base, "activation_checkpointing_enable"):  # transformers >= 5.24
            self.base.activation_checkpointing_enable(ckpt_kwargs, **kwargs)
        else:
            self.base.gradient_checkpointing_enable(ckpt_kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """The pre-5.24 name of :meth:`activation_checkpointing_enable` (the 5.17 Trainer calls this one)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    @torch.no_grad()
    def measure(self, blocks: torch.Tensor, batch_size: int = 1) -> dict[str, float]:
        """Held-out quality for the model card: perplexity with full and with reconstructed KV, and the MSE.

        blocks: ``[num_blocks, N]`` token ids of unpadded blocks not used for training.
        """
        was_training = self.training
        self.eval()
        device = self.compressor.device
        raw_ce, rec_ce, mse = [], [], []
        for batch in blocks.split(batch_size):
            batch = batch.to(device)
            self.patch.mode = "off"
            raw_ce.append(float(self.base(input_ids=batch, labels=batch, use_cache=False).loss))
            out = self(batch)
            rec_ce.append(float(out["ce_loss"]))
            mse.append(float(out["recon_mse"]) / max(1, len(self.patch.layer_mse)))
        self.train(was_training)
        return {"reconstruction MSE (held-out)": sum(mse) / len(mse),
                "perplexity (full KV)": math.exp(sum(raw_ce) / len(raw_ce)),
                "perplexity (DeltaKV)": math.exp(sum(rec_ce) / len(rec_ce)),
                "measured on": f"{len(blocks)} held-out blocks of {blocks.shape[1]} tokens, every token after the "
                               f"{self.knobs['num_sink']} sinks reconstructed"}

    def floating_point_ops(self, inputs: dict[str, Any], exclude_embeddings: bool = True) -> int:
        """FLOPs estimate for the Trainer's logs: the base model's (the compressor is tiny next to it)."""
        fn = getattr(self.base, "floating_point_ops", None)
        return fn(inputs, exclude_embeddings=exclude_embeddings) if fn is not None else 0


def _training_model(model: nn.Module) -> DeltaKVTrainingModel:
    inner = getattr(model, "module", model)  # DDP / accelerate wrappers
    if not isinstance(inner, DeltaKVTrainingModel):
        raise TypeError(f"CompressorTrainer trains a DeltaKVTrainingModel, got {type(inner).__name__}")
    return inner


class StopOnSignal(TrainerCallback):
    """SIGTERM (``timeout``, a scheduler) or SIGINT (Ctrl-C) ends training after the current step instead of killing
    it, so that the caller saves the compressor learned so far (its record says where it stopped). A second signal
    stops at once. Under DDP the ranks agree on stopping at each step (one tiny all-reduce), so none waits alone."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.received is not None:                     # the second one: stop now
            self._restore()
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} received twice")
        self.received = signal.Signals(signum).name

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():   # handlers can only be set there
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.received is not None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([float(stop)], device=args.device if args.device.type == "cuda" else "cpu")
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
            if stop and self.received is None:
                self.received = "another rank's signal"
        if stop:
            control.should_training_stop = True


class CompressorTrainer(Trainer):
    """``Trainer`` for :class:`DeltaKVTrainingModel`: saves and resumes the compressor only.

    Extra args: ``training_data`` (a name for the model card), ``quality`` (measured numbers for the card),
    ``block_size`` and ``init`` (how the weights started; both recorded in the card).
    """

    def __init__(self, *args, training_data: str | None = None, quality: dict | None = None,
                 block_size: int | None = None, init: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        _training_model(self.model)
        if self.args.n_gpu > 1:  # nn.DataParallel replicas would call the patched forward of the original modules
            raise ValueError("CompressorTrainer does not support nn.DataParallel (several GPUs in one process); "
                             "launch with `torchrun --nproc_per_node N` or `accelerate launch` (DDP) instead")
        self.training_data, self.quality, self.block_size, self.init = training_data, quality, block_size, init
        self._sums = {"ce_loss": 0.0, "recon_mse": 0.0}
        self._count = 0
        self.stopper = StopOnSignal()
        self.add_callback(self.stopper)

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:   # always, also when training raises: never leave SIGTERM/SIGINT to a flag-only handler
            self.stopper._restore()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        if model.training:
            for key in self._sums:
                self._sums[key] += float(outputs[key])
            self._count += 1
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._count:
            for key, total in self._sums.items():
                logs[key] = round(total / self._count, 6)
                self._sums[key] = 0.0
            self._count = 0
        super().log(logs, *args, **kwargs)

    def training_record(self) -> dict[str, Any]:
        """The knobs that shaped this compressor, for its config and model card."""
        model = _training_model(self.model)
        return {**model.knobs, "mse_target": model.mse_target, "block_size": self.block_size, "init": self.init,
                "steps": self.state.global_step, "learning_rate": self.args.learning_rate,
                "per_device_train_batch_size": self.args.per_device_train_batch_size,
                "stopped": (f"{self.stopper.received} after step {self.state.global_step} of {self.state.max_steps}"
                            if self.stopper.received else None)}

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        compressor = _training_model(self.accelerator.unwrap_model(self.model)).compressor
        if state_dict is not None:  # FSDP / DeepSpeed hand over the gathered full state dict
            prefix = "compressor."
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        record = {k: v for k, v in self.training_record().items() if v is not None}
        compressor.save_pretrained(output_dir, state_dict=state_dict, training=record,
                                   training_data=self.training_data, quality=self.quality)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        from safetensors.torch import load_file

        path = os.path.join(resume_from_checkpoint, "model.safetensors")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{resume_from_checkpoint} has no model.safetensors; not a compressor checkpoint")
        target = _training_model(self.accelerator.unwrap_model(model if model is not None else self.model))
        target.compressor.load_state_dict(load_file(path), strict=True)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)
