"""The two-stage model: a FULL model that prefills and a DECODER that reads its KV cache."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from torch import Tensor

from .errors import OverfillError
from .files import read_json_object
from .model import (ModelArgs, Transformer, causal_mask, load_model, positions_from_padding, save_model,
                    weights_fingerprint)

CONFIG_NAME = "overfill.json"


@dataclass
class TwoStageConfig:
    """What an OverFill directory records beside its decoder weights."""

    full: str
    """Reference of the full model: a built-in name, a hub id, or a directory, absolute or relative to
    the OverFill directory (older directories: as typed, relative to their run's working directory)."""
    layer_map: list[int] | None = None
    """Full-model layer whose KV each decoder layer reads; None means layer i reads layer i."""
    refresh_every: int = 0
    """Default refresh interval for generation (0: never)."""
    extra: dict = field(default_factory=dict)
    """Provenance: how the decoder was made (pruning, training settings)."""
    full_weights_sha256: str | None = None
    """`weights_fingerprint` of the full model it was trained with: a pair whose full model has other
    weights is refused. None in directories written before it was recorded, and in memory."""


def check_compatible(full: ModelArgs, decoder: ModelArgs, layer_map: list[int] | None = None) -> list[str]:
    """Every reason why `decoder` cannot read `full`'s KV cache (empty when it can)."""
    problems = []
    for name in ("num_key_value_heads", "head_dim", "vocab_size", "rope_parameters"):
        a, b = getattr(full, name), getattr(decoder, name)
        if a != b:
            problems.append(f"{name}: full {a} vs decoder {b}")
    if layer_map is None:
        if full.num_hidden_layers != decoder.num_hidden_layers:
            problems.append(f"num_hidden_layers: full {full.num_hidden_layers} vs decoder "
                            f"{decoder.num_hidden_layers} (give a layer_map for a depth-pruned decoder)")
    else:
        if len(layer_map) != decoder.num_hidden_layers:
            problems.append(f"layer_map has {len(layer_map)} entries for {decoder.num_hidden_layers} decoder layers")
        bad = [j for j in layer_map if not 0 <= j < full.num_hidden_layers]
        if bad:
            problems.append(f"layer_map names layers {bad} outside the full model's 0..{full.num_hidden_layers - 1}")
    if decoder.num_attention_heads % decoder.num_key_value_heads:
        problems.append(f"decoder has {decoder.num_attention_heads} query heads, not a multiple of "
                        f"{decoder.num_key_value_heads} KV heads")
    return problems


def read_config_file(path: Path) -> TwoStageConfig:
    """An overfill.json, checked: known keys only, and values of the right kinds."""
    values = read_json_object(path, known={f.name for f in fields(TwoStageConfig)})
    if not isinstance(values.get("full"), str) or not values["full"].strip():
        raise OverfillError(f"{path}: 'full' must name the full model, got {values.get('full')!r}")
    refresh = values.get("refresh_every", 0)
    if not isinstance(refresh, int) or isinstance(refresh, bool) or refresh < 0:
        raise OverfillError(f"{path}: 'refresh_every' must be an integer >= 0, got {refresh!r}")
    layer_map = values.get("layer_map")
    if layer_map is not None and not (isinstance(layer_map, list) and all(
            isinstance(i, int) and not isinstance(i, bool) for i in layer_map)):
        raise OverfillError(f"{path}: 'layer_map' must be a list of layer indices or null, got {layer_map!r}")
    if not isinstance(values.get("extra", {}), dict):
        raise OverfillError(f"{path}: 'extra' must be an object")
    if not isinstance(values.get("full_weights_sha256", ""), (str, type(None))):
        raise OverfillError(f"{path}: 'full_weights_sha256' must be a string or null")
    return TwoStageConfig(**values)


def full_reference(recorded: str, decoder_dir: Path) -> str:
    """The full model an overfill.json records, as a reference that resolves the same from any
    working directory: a relative path is read relative to the OverFill directory. Where that
    names nothing, the reference is used as it is: a hub id, or (in a directory written before
    references were recorded so) a path relative to the working directory."""
    from .hub import BUILTIN_MODELS

    if recorded in BUILTIN_MODELS or Path(recorded).expanduser().is_absolute():
        return recorded
    beside = decoder_dir / recorded
    return str(beside) if beside.exists() else recorded


def reference_to_record(ref: str, decoder_dir: Path) -> str:
    """How overfill.json in `decoder_dir` names the full model `ref`: built-in names and hub ids as
    they are, a directory by its path relative to `decoder_dir` (absolute where it was given so)."""
    from .hub import BUILTIN_MODELS

    path = Path(ref).expanduser()
    if ref in BUILTIN_MODELS or not path.exists():
        return ref
    if path.is_absolute():
        return str(path)
    return os.path.relpath(path.resolve(), decoder_dir.resolve())


def check_full_weights(full_dir: Path, saved: TwoStageConfig, decoder_dir: Path) -> None:
    """Refuse a full model whose weights are not those the decoder in `decoder_dir` was trained with."""
    if saved.full_weights_sha256 is None:  # written before the fingerprint was recorded
        return
    found = weights_fingerprint(full_dir)
    if found != saved.full_weights_sha256:
        raise OverfillError(f"'{full_dir}' is not the full model the decoder in '{decoder_dir}' was trained with: "
                            f"its weights' SHA-256 is {found[:16]}..., {CONFIG_NAME} records "
                            f"{saved.full_weights_sha256[:16]}... (recorded as '{saved.full}'); give that model (a "
                            f"copy of it re-saved with other bytes: remove full_weights_sha256 from {CONFIG_NAME})")


def _tokenizer_fingerprint(path: Path) -> str | None:
    file = path / "tokenizer.json"
    return hashlib.sha1(file.read_bytes()).hexdigest() if file.is_file() else None


def layer_map_of(decoder_dir: Path) -> list[int] | None:
    """The layer_map a decoder directory records (overfill.json, else prune_record.json), if any."""
    for name, key in ((CONFIG_NAME, "layer_map"), ("prune_record.json", "layer_map")):
        file = decoder_dir / name
        if file.is_file():
            value = read_json_object(file).get(key)
            if value is not None:
                return list(value)
    return None


def _generation_eos_ids(model_dir: Path) -> set[int]:
    """End-of-sequence ids from generation_config.json (Llama 3 instruct has several)."""
    file = model_dir / "generation_config.json"
    if not file.is_file():
        return set()
    eos = read_json_object(file).get("eos_token_id")
    return set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())


class TwoStageModel:
    """`full` prefills the prompt and yields the first token; `decoder` generates the rest.

    With no decoder the full model decodes alone (the same object plays both parts).
    """

    def __init__(self, full: Transformer, decoder: Transformer | None, tokenizer,
                 config: TwoStageConfig | None = None, eos_token_ids: set[int] | None = None,
                 full_dir: Path | None = None):
        self.full = full
        self.full_dir = full_dir
        """The directory the full model was loaded from, if any: its weights' fingerprint is saved."""
        self.decoder = decoder if decoder is not None else full
        self.config = config or TwoStageConfig(full="<in memory>")
        problems = check_compatible(full.args, self.decoder.args, self.config.layer_map)
        if problems:
            raise OverfillError("the decoder cannot read the full model's KV cache: " + "; ".join(problems))
        self.tokenizer = tokenizer
        self.eos_token_ids = {i for i in (eos_token_ids or set()) | {tokenizer.eos_token_id} if i is not None}

    @property
    def layer_map(self) -> list[int] | None:
        return self.config.layer_map

    @property
    def is_two_stage(self) -> bool:
        return self.decoder is not self.full

    @property
    def device(self) -> torch.device:
        return self.full.model.embed_tokens.weight.device

    @property
    def context_window(self) -> int:
        return min(self.full.args.max_position_embeddings, self.decoder.args.max_position_embeddings)

    @classmethod
    def from_refs(cls, full: str, decoder: str | None = None, dtype: torch.dtype | None = None,
                  device: str | torch.device | None = None, layer_map: list[int] | None = None) -> "TwoStageModel":
        """Load a pair from model references; `decoder` may be a plain HF dir or an OverFill dir, whose
        recorded full-model fingerprint the full model must match."""
        from .hub import load_tokenizer, resolve

        full_dir = resolve(full)
        config = TwoStageConfig(full=str(full), layer_map=layer_map)
        decoder_dir = resolve(decoder) if decoder is not None else None
        if decoder_dir is not None and (decoder_dir / CONFIG_NAME).is_file():
            saved = read_config_file(decoder_dir / CONFIG_NAME)
            check_full_weights(full_dir, saved, decoder_dir)
            config.refresh_every, config.full_weights_sha256 = saved.refresh_every, saved.full_weights_sha256
        full_model = load_model(full_dir, dtype=dtype, device=device)
        decoder_model = None
        if decoder_dir is not None:
            decoder_model = load_model(decoder_dir, dtype=dtype, device=device)
            config.layer_map = layer_map if layer_map is not None else layer_map_of(decoder_dir)
            a, b = _tokenizer_fingerprint(full_dir), _tokenizer_fingerprint(decoder_dir)
            if a and b and a != b:
                raise OverfillError(f"the decoder's tokenizer ({decoder_dir}) differs from the full model's ({full_dir})")
        return cls(full_model, decoder_model, load_tokenizer(full_dir), config, _generation_eos_ids(full_dir), full_dir)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, full: str | None = None, **kwargs) -> "TwoStageModel":
        """Load an OverFill directory; `full` overrides the recorded full-model reference."""
        path = Path(path)
        file = path / CONFIG_NAME
        if not file.is_file():
            raise OverfillError(f"'{path}' is not an OverFill model directory: it has no {CONFIG_NAME}")
        saved = read_config_file(file)
        saved.full = full or full_reference(saved.full, path)
        model = cls.from_refs(saved.full, str(path), layer_map=saved.layer_map, **kwargs)
        model.config = saved
        return model

    def full_weights_sha256(self) -> str | None:
        """The full model's weights fingerprint: recorded, else computed from its directory (once)."""
        if self.config.full_weights_sha256 is None and self.full_dir is not None:
            self.config.full_weights_sha256 = weights_fingerprint(self.full_dir)
        return self.config.full_weights_sha256

    def save_pretrained(self, path: str | os.PathLike, decoder_config_from: str | os.PathLike) -> None:
        """Decoder as a plain HF directory (config/tokenizer copied from `decoder_config_from`) + overfill.json,
        which names the full model so that it resolves from anywhere, with its weights' fingerprint."""
        if not self.is_two_stage:
            raise OverfillError("nothing to save: this model has no separate decoder")
        path = Path(path)
        save_model(self.decoder, path, config_from=decoder_config_from)
        record = replace(self.config, full=reference_to_record(self.config.full, path),
                         full_weights_sha256=self.full_weights_sha256())
        (path / CONFIG_NAME).write_text(json.dumps(asdict(record), indent=2))


def split_logits(full: Transformer, decoder: Transformer, tokens: Tensor, attention_mask: Tensor,
                 prompt_mask: Tensor, layer_map: list[int] | None = None) -> tuple[Tensor, Tensor]:
    """Teacher-forced two-stage logits, as generation would compute them.

    tokens, attention_mask, prompt_mask: `[B, T]`; prompt_mask marks the tokens the full
    model prefills. Returns `(logits [B, T, V], full_hidden [B, T, D_full])`: logits at
    prompt positions come from the frozen full model (the last one predicts the first
    response token), the rest from the decoder, whose attention reads the full model's
    keys and values at prompt positions. Gradients flow into the decoder only.
    """
    B, T = tokens.shape
    positions = positions_from_padding(attention_mask)  # [B, T]
    slots = torch.arange(T, device=tokens.device)
    mask = causal_mask(attention_mask.bool(), slots)  # [B, 1, T, T]
    with torch.no_grad():
        full_cache = full.new_kv_cache(B, T)
        full_hidden = full.hidden(tokens, positions, mask, full_cache, slots)  # [B, T, D_full]
    source = full_cache.select_layers(layer_map)
    logits = decoder(tokens, positions, mask, shared_kv=(source, prompt_mask[:, None, :, None]))  # [B, T, V]
    with torch.no_grad():
        prompt_logits = full.lm_head(full_hidden[prompt_mask]).to(logits.dtype)  # [N_prompt, V]
    return logits.masked_scatter(prompt_mask[..., None], prompt_logits), full_hidden


# ---------------------------------------------------------------------------- sizes

def describe(args: ModelArgs) -> dict:
    """The sizes `overfill info` shows."""
    return {
        "type": args.model_type, "parameters": args.num_params(), "bytes_bf16": 2 * args.num_params(),
        "layers": args.num_hidden_layers, "hidden": args.hidden_size, "intermediate": args.intermediate_size,
        "query_heads": args.num_attention_heads, "kv_heads": args.num_key_value_heads, "head_dim": args.head_dim,
        "vocab": args.vocab_size,
        "kv_bytes_per_token_bf16": 2 * 2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim,
    }
