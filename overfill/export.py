"""`overfill export`: an OverFill pair as a directory another engine serves.

`--format vllm` writes one HF-style directory that vLLM loads as `OverFillForCausalLM` (the
plugin in `overfill/vllm_plugin.py`, found through the `vllm.general_plugins` entry point):

    config.json         the full model's config, architectures ["OverFillForCausalLM"], and
                        "overfill": {"decoder": {hidden_size, intermediate_size, num_hidden_layers, ...},
                                     "layer_map": [...] (a depth-pruned decoder's), "full": ref}
    model.safetensors   the full model's tensors under `full.`, the decoder's under `decoder.`
    tokenizer files, generation_config.json, chat template: the full model's

    vllm serve DIR      # or: python -m vllm.entrypoints.openai.api_server --model DIR
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .errors import OverfillError
from .files import check_not_an_input, check_output_dir, staged_dir, write_errors_as_one_line

DECODER_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "tie_word_embeddings")
"""What the decoder's config may change from the full model's; the rest must be equal (the shared cache)."""


def vllm_config(full_config: dict, decoder_config: dict, full_ref: str, layer_map: list[int] | None = None) -> dict:
    """The exported config.json: the full model's, plus what makes the decoder (errors where a vLLM
    `OverFillForCausalLM` cannot serve the pair)."""
    from .model import ModelArgs
    from .two_stage import check_compatible

    full, decoder = ModelArgs.from_hf(full_config), ModelArgs.from_hf(decoder_config)
    problems = check_compatible(full, decoder, layer_map)
    if layer_map is not None and any(b <= a for a, b in zip(layer_map, layer_map[1:])):
        problems.append(f"layer_map {layer_map} is not increasing (the vLLM pair runs both sides' layers in one "
                        f"sweep over the cache's layers)")
    for name in ("num_attention_heads", "model_type", "rms_norm_eps", "qkv_bias", "o_bias"):
        if getattr(full, name) != getattr(decoder, name):
            problems.append(f"{name}: full {getattr(full, name)!r} vs decoder {getattr(decoder, name)!r}"
                            + (" (the vLLM pair shares one attention per layer)" if name == "num_attention_heads"
                               else ""))
    if full.model_type not in ("llama", "mistral"):
        problems.append(f"model_type {full.model_type!r}: the vLLM export supports llama and mistral")
    for config in (full_config, decoder_config):
        if config.get("hidden_act", "silu") != "silu":
            problems.append(f"hidden_act {config['hidden_act']!r}: only silu is supported")
    if problems:
        raise OverfillError("this pair cannot be exported for vLLM: " + "; ".join(problems))
    config = dict(full_config)
    config["architectures"] = ["OverFillForCausalLM"]
    config["head_dim"] = full.head_dim
    config["overfill"] = {"decoder": {key: getattr(decoder, key) for key in DECODER_KEYS},
                          "full": full_ref, "format": 1}
    if layer_map is not None and layer_map != list(range(full.num_hidden_layers)):
        config["overfill"]["layer_map"] = list(layer_map)
    return config


def check_tensor_parallel(config: dict, tp: int) -> None:
    if tp < 1:
        raise OverfillError(f"--tensor-parallel-size must be >= 1, got {tp}")
    widths = {"num_attention_heads": config["num_attention_heads"], "vocab_size": config["vocab_size"],
              "full intermediate_size": config["intermediate_size"],
              "decoder intermediate_size": config["overfill"]["decoder"]["intermediate_size"],
              "full hidden_size": config["hidden_size"], "decoder hidden_size": config["overfill"]["decoder"]["hidden_size"]}
    kv = config["num_key_value_heads"]
    bad = [f"{name} {value}" for name, value in widths.items() if value % tp]
    if kv % tp and tp % kv:
        bad.append(f"num_key_value_heads {kv} (neither divides the other)")
    if bad:
        raise OverfillError(f"tensor parallel size {tp} does not divide: {', '.join(bad)}")


def export_vllm(decoder_dir: str, out: str, full: str | None = None, tp: int = 1, no_refresh: bool = False) -> Path:
    """The pair as one directory vLLM serves: checked, then written beside `out` and renamed into place,
    so a failed write (a full disk) leaves nothing behind."""
    from .hub import resolve
    from .model import read_config
    from .two_stage import CONFIG_NAME, check_full_weights, full_reference, layer_map_of, read_config_file

    decoder_path = Path(decoder_dir)
    if not (decoder_path / CONFIG_NAME).is_file():
        raise OverfillError(f"'{decoder_dir}' is not an OverFill directory (no {CONFIG_NAME}); train one with "
                            f"`overfill train --mode overfill`")
    pair = read_config_file(decoder_path / CONFIG_NAME)
    if pair.refresh_every and not no_refresh:
        raise OverfillError(f"'{decoder_dir}' asks for a refresh every {pair.refresh_every} tokens, which the vLLM "
                            f"pair does not do (vLLM schedules no re-prefill of generated tokens); export with "
                            f"--no-refresh to serve it without")
    full_ref = full or full_reference(pair.full, decoder_path)
    full_path = resolve(full_ref)
    config = vllm_config(read_config(full_path), read_config(decoder_path), _provenance(full_path, full_ref),
                         layer_map_of(decoder_path))
    check_tensor_parallel(config, tp)
    out_path = check_output_dir(out)
    check_not_an_input(out_path, {"--full": full_path, "DECODER": decoder_path})
    if out_path.is_dir() and any(out_path.iterdir()):
        raise OverfillError(f"--out '{out}' is not empty")
    check_full_weights(full_path, pair, decoder_path)
    with write_errors_as_one_line(out_path), staged_dir(out_path) as tmp:
        _write_pair(full_path, decoder_path, config, tmp)
    return out_path


def _provenance(full_path: Path, ref: str) -> str:
    """The full model's name in the exported config: where it was read from (a built-in name or hub id as is)."""
    from .hub import BUILTIN_MODELS

    return ref if ref in BUILTIN_MODELS or not Path(ref).expanduser().exists() else str(full_path.resolve())


def _write_pair(full_path: Path, decoder_path: Path, config: dict, out: Path) -> None:
    from safetensors.torch import save_file

    from .model import load_state_dict

    tensors = {f"full.{k}": v for k, v in load_state_dict(full_path).items()}
    tensors |= {f"decoder.{k}": v for k, v in load_state_dict(decoder_path).items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    for name in sorted(p.name for p in full_path.iterdir()):
        if name.endswith((".json", ".jinja", ".model", ".txt")) and name != "config.json" and \
                not name.startswith("model.safetensors"):
            shutil.copy2(full_path / name, out / name)
    (out / "config.json").write_text(json.dumps(config, indent=2))
