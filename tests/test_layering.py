"""The core (``sparse_hf/config.py``, ``sparse_hf/methods/``, DeltaKV's math in ``sparse_hf/deltakv/`` and
``kernels/``) imports nothing from Transformers and nothing from the HF glue (``sparse_hf/hf``), directly or
through another module it imports, so the engine can use it without them."""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: Where each package lives (``sparse_hf.kernels`` is installed from ``kernels/``).
PACKAGE_DIRS = {"sparse_hf.kernels": ROOT / "kernels", "sparse_hf.trainer": ROOT / "trainer",
                "sparse_hf": ROOT / "sparse_hf"}
#: DeltaKV modules outside the core: the Hub-facing compressor, its model card and the reference checkpoint format.
DELTAKV_HUB = {"compressor.py", "model_card.py", "reference_format.py"}
FORBIDDEN = ("transformers", "sparse_hf.hf")


def core_files() -> list[pathlib.Path]:
    files = [ROOT / "sparse_hf" / "config.py", *sorted((ROOT / "sparse_hf" / "methods").glob("*.py")),
             *sorted((ROOT / "kernels").glob("*.py"))]
    files += [p for p in sorted((ROOT / "sparse_hf" / "deltakv").glob("*.py")) if p.name not in DELTAKV_HUB]
    return files


def module_name(path: pathlib.Path) -> str:
    for package, folder in PACKAGE_DIRS.items():
        if folder in path.parents:
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    raise ValueError(path)


def module_path(name: str) -> pathlib.Path | None:
    """The file of an in-repo module (``None`` for third-party ones)."""
    for package, folder in PACKAGE_DIRS.items():
        if name == package or name.startswith(package + "."):
            rel = name[len(package):].lstrip(".").split(".") if name != package else []
            base = folder.joinpath(*rel) if rel else folder
            for candidate in (base.with_suffix(".py"), base / "__init__.py"):
                if candidate.is_file():
                    return candidate
            return None
    return None


def imports_of(path: pathlib.Path) -> set[str]:
    """Absolute names of every module ``path`` imports (anywhere in the file; relative imports resolved;
    ``from pkg import sub`` also names ``pkg.sub``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names if module_path(f"{target}.{alias.name}"))
    return found


def forbidden_chains(path: pathlib.Path, forbidden=FORBIDDEN) -> list[str]:
    """Import chains from ``path`` to a ``forbidden`` module, following in-repo modules."""
    chains, seen, todo = [], set(), [(path, [module_name(path)])]
    while todo:
        current, chain = todo.pop()
        for target in sorted(imports_of(current)):
            if any(target == f or target.startswith(f + ".") for f in forbidden):
                chains.append(" -> ".join(chain + [target]))
            elif (nxt := module_path(target)) is not None and nxt not in seen:
                seen.add(nxt)
                todo.append((nxt, chain + [target]))
    return chains


def test_the_core_list_is_what_we_think():
    names = {module_name(p) for p in core_files()}
    assert {"sparse_hf.config", "sparse_hf.methods.deltakv", "sparse_hf.deltakv.state", "sparse_hf.deltakv.rope",
            "sparse_hf.deltakv.projections", "sparse_hf.kernels.sparse_decode"} <= names
    assert "sparse_hf.deltakv.compressor" not in names


@pytest.mark.parametrize("path", core_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_module_imports_neither_transformers_nor_the_hf_glue(path):
    assert forbidden_chains(path) == []


@pytest.mark.parametrize("path", sorted((ROOT / "trainer").glob("*.py")), ids=lambda p: p.name)
def test_the_trainer_uses_the_core_not_the_hf_glue(path):
    # direct imports only: the CLI's argument check reuses the package CLI's model check (sparse_hf.cli), whose
    # subcommands reach the HF path; the trainer's own code takes DeltaKV's math from the core
    assert not [m for m in imports_of(path) if m == "sparse_hf.hf" or m.startswith("sparse_hf.hf.")]


def test_the_checker_catches_an_indirect_import():
    # the Hub wrapper imports transformers; the HF cache is glue: both must be flagged
    assert forbidden_chains(ROOT / "sparse_hf" / "deltakv" / "compressor.py")
    assert any("sparse_hf.hf" in c for c in forbidden_chains(ROOT / "sparse_hf" / "hf" / "__init__.py"))


# Import every core module with the top-level ``sparse_hf/__init__`` (which installs the HF glue) left out: the
# package is stubbed with its search path only, so what loads is exactly what the core modules import.
_PROBE = r"""
import importlib, importlib.util, sys, types
root, names = sys.argv[1], sys.argv[2:]
top = types.ModuleType("sparse_hf")
top.__path__ = [root + "/sparse_hf"]
sys.modules["sparse_hf"] = top
spec = importlib.util.spec_from_file_location("sparse_hf.kernels", root + "/kernels/__init__.py",
                                              submodule_search_locations=[root + "/kernels"])
kernels = importlib.util.module_from_spec(spec)
sys.modules["sparse_hf.kernels"] = kernels
spec.loader.exec_module(kernels)
for name in names:
    importlib.import_module(name)
bad = sorted(m for m in sys.modules if m.split(".")[0] == "transformers" or m.startswith("sparse_hf.hf"))
print("LOADED:", bad[:10])
sys.exit(1 if bad else 0)
"""


def test_importing_the_core_loads_no_transformers():
    names = [module_name(p) for p in core_files()]
    run = subprocess.run([sys.executable, "-c", _PROBE, str(ROOT), *names], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
