"""``kv_usage``: what a cache really holds, against what a ``DynamicCache`` would hold."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class KVUsage:
    """Memory report of one cache.

    Attributes:
        kept_tokens: per layer, per batch row, the tokens the layer keeps (max over KV heads).
        logical_tokens: the sequence length (padding columns included) a full cache would hold.
        bytes: bytes the cache has allocated: K/V buffers (including preallocated room) and what it keeps beside
            them (slot position tables; DeltaKV's latents, centers, father ids and positions).
        used_bytes: the same for live slots only.
        full_bytes: bytes a ``DynamicCache`` would hold for the same sequences.
        host_bytes: bytes the cache holds in host memory instead (DeltaKV's ``offload_latents``); not in ``bytes``.
    """

    kept_tokens: list[list[int]] = field(default_factory=list)
    logical_tokens: int = 0
    bytes: int = 0
    used_bytes: int = 0
    full_bytes: int = 0
    host_bytes: int = 0

    @property
    def ratio(self) -> float:
        """Allocated bytes over the full cache's bytes."""
        return self.bytes / self.full_bytes if self.full_bytes else 0.0

    def summary(self) -> str:
        per_layer = [max(row) if row else 0 for row in self.kept_tokens]
        return (f"kept tokens per layer (max over rows): {per_layer}\n"
                f"KV bytes: {self.bytes / 2**20:.2f} MiB allocated, {self.used_bytes / 2**20:.2f} MiB live, "
                f"vs {self.full_bytes / 2**20:.2f} MiB for a full cache of {self.logical_tokens} tokens "
                f"({100 * self.ratio:.1f}%)"
                + (f"; {self.host_bytes / 2**20:.2f} MiB in host memory" if self.host_bytes else ""))


def kv_usage(cache) -> KVUsage:
    """Report the memory of ``cache`` (a sparse-hf cache, or any HF ``DynamicCache`` for comparison)."""
    report = KVUsage()
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if keys is None or getattr(keys, "numel", lambda: 0)() == 0:
            report.kept_tokens.append([])
            continue
        B, Hkv, _, D = keys.shape
        Dv = layer.values.shape[-1]
        elem = keys.element_size()
        seen = layer.get_seq_length()
        report.logical_tokens = max(report.logical_tokens, seen)
        if hasattr(layer, "kept_per_row"):
            report.kept_tokens.append(layer.kept_per_row())
        elif hasattr(layer, "positions"):
            report.kept_tokens.append((layer.positions >= 0).sum(-1).amax(-1).tolist())
        else:
            report.kept_tokens.append([keys.shape[2]] * B)
        if hasattr(layer, "allocated_bytes"):
            report.bytes += layer.allocated_bytes()
            report.used_bytes += layer.used_bytes()
            report.host_bytes += getattr(layer, "host_bytes", lambda: 0)()
        else:
            nbytes = keys.numel() * elem + layer.values.numel() * layer.values.element_size()
            report.bytes += nbytes
            report.used_bytes += nbytes
        report.full_bytes += B * Hkv * seen * (D + Dv) * elem
    return report
