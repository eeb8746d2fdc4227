"""OverFill inside vLLM: `OverFillForCausalLM`, a full model and its pruned decoder on ONE paged KV cache.

Loaded by vLLM through the `vllm.general_plugins` entry point (`register`), in every vLLM process;
the directory it serves is written by `overfill export --format vllm` (see `overfill/export.py`).

Per layer there is one vLLM `Attention`, so one paged cache, shared by both sides. Each token
belongs to one side: the full model's if its position is below its request's prompt length,
the decoder's otherwise. Each side embeds its own tokens and, per layer, computes q/k/v with its
own projections (the head count and size are the same on both sides); those are scattered back
into batch order, attention runs once over the cache, and each side applies its own `o_proj`,
norms and MLP to its own rows. So the decoder reads the prompt's K/V that the full model wrote,
as in OverFill, whatever vLLM's scheduler does: chunked prefill, a 1-token final chunk, a
1-token prompt, preemption and recompute all route by the same per-token rule. (Routing by
`query_len == 1` would not: a 1-token prompt is then decoded by the wrong model.)

The two sides have different hidden widths, so `forward` returns rows of width D_full + 1: the
decoder's rows are zero-padded and the last column flags the side; `compute_logits`, which gets
the rows vLLM samples from, applies each side's final LM head to its own rows.

A batch whose tokens are all on one side (at steady state, pure decode: all the decoder's) skips the
gathers and runs that side's pass; a batch that mixes the sides runs `mixed_pass`, whose gathers and
scatters go by index tensors the runner computes on the host, so it has no data-dependent shapes.
vLLM compiles all three (`support_torch_compile`, as for its Llama). A depth-pruned decoder's layer j
reads and writes the cache of the pair's layer `layer_map[j]`.

Prefix caching is turned off: vLLM also caches blocks of generated tokens, and a later chat turn
would then reuse decoder-written K/V as if the full model had prefilled it.
"""
from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable

import torch
from torch import nn

log = logging.getLogger(__name__)

ARCHITECTURE = "OverFillForCausalLM"
CONFIG_KEY = "overfill"
"""The exported config.json's sub-dictionary: the decoder's widths (see export.py)."""
TESTED_VLLM = (0, 32)
"""The vLLM release series the plugin was tested with (pyproject's `vllm` extra pins the same): its
routing hook patches `GPUModelRunner._model_forward`, which is no public interface."""


# ---------------------------------------------------------------------------- per-token routing

class _Route:
    """Which of the batch's tokens the full model computes, set by the model runner before each forward."""

    full_rows: torch.Tensor | None = None  # [N] bool, None: all tokens to the full model (vLLM's dummy runs)
    only: str | None = None  # "full" or "decoder" when every token goes to that side, known on the host
    full_index: torch.Tensor | None = None  # [N_full] long: the full model's rows, in batch order (mixed batches)
    decoder_index: torch.Tensor | None = None  # [N_decoder] long: the decoder's rows
    order: torch.Tensor | None = None  # [N] long: batch row t is row order[t] of cat(full rows, decoder rows)

    def set(self, full_rows: torch.Tensor | None, device: torch.device | None = None) -> None:
        """full_rows [N] bool, on the host (so that `only` and the indices cost no device sync), kept on `device`."""
        self.full_rows = self.only = self.full_index = self.decoder_index = self.order = None
        if full_rows is None:
            return
        n_full = int(full_rows.sum())
        self.only = "full" if n_full == full_rows.shape[0] else "decoder" if n_full == 0 else None
        self.full_rows = full_rows.to(device)
        if self.only is None:
            indices = split_rows(full_rows)
            self.full_index, self.decoder_index, self.order = (i.to(device) for i in indices)


def split_rows(full_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """full_rows [N] bool -> (full_index [N_f], decoder_index [N_d], order [N]), with
    `cat([x[full_index], x[decoder_index]])[order] == x`: what a mixed batch gathers and scatters by."""
    full_index, decoder_index = full_rows.nonzero().squeeze(1), (~full_rows).nonzero().squeeze(1)
    order = torch.empty(full_rows.shape[0], dtype=torch.long)
    order[torch.cat([full_index, decoder_index])] = torch.arange(full_rows.shape[0])
    return full_index, decoder_index, order


ROUTE = _Route()


def prompt_token_mask(positions: torch.Tensor, query_start_loc: torch.Tensor, prompt_lens: torch.Tensor) -> torch.Tensor:
    """[N] bool, on the host: token t is a prompt token of its request, i.e. its position is below that request's prompt length.

    positions [N] (N may include padding after the scheduled tokens), query_start_loc [R + 1] (the
    requests' token ranges in batch order), prompt_lens [R]. Padding rows count as prompt tokens.
    """
    counts = (query_start_loc[1:] - query_start_loc[:-1]).to(torch.long)  # [R]
    per_token = torch.repeat_interleave(prompt_lens.to(torch.long), counts)  # [n_scheduled]
    mask = torch.ones(positions.shape[0], dtype=torch.bool)
    n = per_token.shape[0]
    mask[:n] = positions[:n].cpu() < per_token
    return mask


_hook_problem: str | None = "the plugin's register() has not run (is overfill installed beside vLLM?)"
"""Why the routing hook is not in place in vLLM's V1 model runner; None once it is."""


def _patch_model_runner() -> None:
    """Set `ROUTE` from the runner's batch state before each model call (`_model_forward` is vLLM's
    documented override point; `input_batch.num_prompt_tokens` holds the prompt lengths in batch order).
    Where that is impossible, `_hook_problem` says why, and loading the pair fails with it."""
    global _hook_problem
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        original = GPUModelRunner._model_forward
    except (ImportError, AttributeError) as e:  # not an error for vLLM's other models: only the pair needs it
        _hook_problem = f"vLLM's V1 model runner has no _model_forward to route through ({e})"
        return
    _hook_problem = None
    if getattr(original, "_overfill", False):
        return

    def _model_forward(self, input_ids=None, positions=None, *args, **kwargs):
        if getattr(self.model, "overfill", False) and positions is not None:
            num_reqs = self.input_batch.num_reqs
            ROUTE.set(prompt_token_mask(positions, self.query_start_loc.cpu[: num_reqs + 1],
                                        torch.from_numpy(self.input_batch.num_prompt_tokens[:num_reqs].copy())),
                      positions.device)
        try:
            return original(self, input_ids, positions, *args, **kwargs)
        finally:
            ROUTE.set(None)

    _model_forward._overfill = True
    GPUModelRunner._model_forward = _model_forward


def _no_prefix_caching() -> None:
    from vllm.model_executor.models import config as model_configs

    class OverFillConfig(model_configs.VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            cache = vllm_config.cache_config
            if cache.enable_prefix_caching:
                cache.enable_prefix_caching = False
                log.warning("OverFill: prefix caching turned off (vLLM would reuse K/V that the decoder wrote "
                            "for generated tokens as if the full model had prefilled them)")

    model_configs.MODELS_CONFIG_MAP[ARCHITECTURE] = OverFillConfig


def register() -> None:
    """The `vllm.general_plugins` entry point: runs in every vLLM process."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "overfill.vllm_plugin:OverFillForCausalLM")
    _no_prefix_caching()
    _patch_model_runner()


def routing_problem(vllm_config, version: str, hook_problem: str | None) -> str | None:
    """Why this vLLM cannot route each token to its model (None: it can). Without the routing every
    token would go to the full model and the output would not be OverFill's, silently: loading the
    pair fails instead."""
    series = tuple(int(n) for n in re.findall(r"\d+", version)[:2])
    if series != TESTED_VLLM:
        tested = ".".join(map(str, TESTED_VLLM))
        return (f"vLLM {version} is not the {tested} series the plugin was tested with (its routing hook patches "
                f"vLLM internals): install vllm=={tested}.*")
    if hook_problem is not None:
        return hook_problem
    if getattr(vllm_config, "use_v2_model_runner", False):
        return ("vLLM runs its V2 model runner, into which the routing is not wired yet (every token would go to "
                "the full model): set VLLM_USE_V2_MODEL_RUNNER=0 for the V1 runner")
    compilation = vllm_config.compilation_config
    graphs = getattr(compilation, "cudagraph_mode", None)
    if graphs is not None and getattr(graphs, "name", str(graphs)) != "NONE" and compilation.cudagraph_capture_sizes:
        return ("CUDA graphs replay a batch's passes as they were captured, not as each step routes its tokens: "
                "serve with --enforce-eager (LLM(..., enforce_eager=True))")
    return None


def check_routed(routed: bool, in_dummy_run: bool) -> None:
    """A scheduled batch reached the model without its routing: fail, rather than give every token
    to the full model. (vLLM's warm-up and profiling passes have none, and need none.)"""
    if not routed and not in_dummy_run:
        raise RuntimeError("OverFill: a batch reached the model without the per-token routing (vLLM's model "
                           "runner did not call the patched _model_forward); refusing to run it all on the full model")


# ---------------------------------------------------------------------------- the model

def side_config(config, side: str):
    """The HF config of one side: the full model's, or the decoder's (its widths from config.overfill)."""
    import copy

    if side == "full":
        return config
    decoder = copy.deepcopy(config)
    for key, value in getattr(config, CONFIG_KEY)["decoder"].items():
        setattr(decoder, key, value)
    return decoder


def layer_map(config) -> list[int] | None:
    """The pair's layer whose cache each decoder layer reads and writes (None: layer j reads layer j)."""
    return getattr(config, CONFIG_KEY).get("layer_map")


class Projections(nn.Module):
    """One side's attention projections and rotary embedding; the attention itself is shared."""

    def __init__(self, config, prefix: str, quant_config=None):
        from vllm.distributed import get_tensor_model_parallel_world_size
        from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
        from vllm.model_executor.layers.rotary_embedding import get_rope

        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_size, self.kv_size = heads // tp * head_dim, max(1, kv_heads // tp) * head_dim
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, heads, kv_heads, bias=bias,
                                          quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(heads * head_dim, config.hidden_size, bias=bias, quant_config=quant_config,
                                        prefix=f"{prefix}.o_proj")
        self.rotary_emb = get_rope(head_dim, max_position=getattr(config, "max_position_embeddings", 8192),
                                   rope_parameters=getattr(config, "rope_parameters", None), is_neox_style=True)

    def qkv(self, positions: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qkv, _ = self.qkv_proj(x)  # [n, (H + 2 H_kv) D / tp]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        return q, k, v


class Side(nn.Module):
    """One model of the pair, HF parameter names below `full.` / `decoder.` (vLLM's packed q/k/v, gate/up).

    Its forward (`pass_over`) is the plain Llama pass of a batch whose tokens are all its own, over the
    pair's shared attention layers (held, not owned: they belong to the pair, as does the one cache).
    Its layer j reads and writes the cache of the pair's layer `attn_layers[j]` (the layer_map of a
    depth-pruned decoder; layer j itself otherwise), in increasing order.
    """

    def __init__(self, *, vllm_config, config, prefix: str, shared_attn: nn.ModuleList,
                 attn_layers: list[int] | None = None):
        from vllm.model_executor.layers.layernorm import RMSNorm
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
        from vllm.model_executor.models.llama import LlamaMLP

        super().__init__()
        quant = vllm_config.quant_config
        self.config = config
        self.attn_layers = list(range(config.num_hidden_layers)) if attn_layers is None else list(attn_layers)
        object.__setattr__(self, "shared_attn", shared_attn)  # not a submodule: registered once, by the pair
        self.model = nn.Module()
        self.model.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, quant_config=quant)
        self.model.layers = nn.ModuleList()
        for i in range(config.num_hidden_layers):
            layer = nn.Module()
            where = f"{prefix}.model.layers.{i}"
            layer.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            layer.self_attn = Projections(config, f"{where}.self_attn", quant)
            layer.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            layer.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, config.hidden_act, quant,
                                 bias=bool(getattr(config, "mlp_bias", False)), prefix=f"{where}.mlp")
            self.model.layers.append(layer)
        self.model.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=quant,
                                      prefix=f"{prefix}.lm_head")
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.layer_at = {a: j for j, a in enumerate(self.attn_layers)}  # the pair's layer -> this side's

    def qkv(self, j: int, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None):
        """Layer j up to attention: (q, k, v, residual) of n tokens, x [n, D_side] the previous layer's output."""
        layer = self.model.layers[j]
        if residual is None:
            residual, h = x, layer.input_layernorm(x)
        else:
            h, residual = layer.input_layernorm(x, residual)
        return *layer.self_attn.qkv(positions, h), residual

    def after_attention(self, j: int, attn_out: torch.Tensor, residual: torch.Tensor):
        """Layer j from the attention's output [n, H D] on: (x, residual), each [n, D_side]."""
        layer = self.model.layers[j]
        o, _ = layer.self_attn.o_proj(attn_out)
        h, residual = layer.post_attention_layernorm(o, residual)
        return layer.mlp(h), residual

    def final(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.model.norm(x, residual)[0]

    def pass_over(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states [N, D_side] of N tokens that all belong to this side."""
        x, residual = self.model.embed_tokens(input_ids), None  # [N, D_side]
        for j, a in enumerate(self.attn_layers):
            q, k, v, residual = self.qkv(j, positions, x, residual)
            x, residual = self.after_attention(j, self.shared_attn[a](q, k, v), residual)
        return self.final(x, residual)


def mixed_pass(full: Side, decoder: Side, shared_attn, input_ids: torch.Tensor, positions: torch.Tensor,
               full_index: torch.Tensor, decoder_index: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Hidden rows [N, D_full + 1] of a batch whose tokens are on both sides (`split_rows`'s indices).

    Per layer of the pair, each side computes q/k/v of its own tokens; they go back in batch order
    (`order`), attention runs once over the cache, and each side takes its own rows of its output.
    A layer that a depth-pruned decoder skips gets zeros for the decoder's rows: their K/V are
    written there but never read (a later step's full-model tokens are prompt tokens, at earlier
    positions). No data-dependent shapes, so vLLM compiles it like a side's pass.
    """
    sides, index = (full, decoder), (full_index, decoder_index)
    x = [side.model.embed_tokens(input_ids[i]) for side, i in zip(sides, index)]  # [N_side, D_side]
    where = [positions[i] for i in index]
    residual = [None, None]
    for a, attn in enumerate(shared_attn):
        qkv = []
        for s, side in enumerate(sides):
            j = side.layer_at.get(a)
            if j is not None:
                *qkv_s, residual[s] = side.qkv(j, where[s], x[s], residual[s])
                qkv.append(qkv_s)
            else:
                qkv.append(None)
        if qkv[1] is None:  # only the full model has this layer
            qkv[1] = [t.new_zeros(index[1].shape[0], t.shape[1]) for t in qkv[0]]
        q, k, v = (torch.cat(parts)[order] for parts in zip(*qkv))  # [N, H D], [N, H_kv D] each
        out = attn(q, k, v)  # [N, H D], over the one paged cache
        for s, side in enumerate(sides):
            j = side.layer_at.get(a)
            if j is not None:
                x[s], residual[s] = side.after_attention(j, out[index[s]], residual[s])
    rows = [side.final(x_s, r_s) for side, x_s, r_s in zip(sides, x, residual)]  # [N_side, D_side]
    width = full.config.hidden_size
    flagged = (with_flag(rows[0], width, True), with_flag(rows[1], width, False))
    return torch.cat(flagged)[order]  # [N, D_full + 1]


def with_flag(final: torch.Tensor, width: int, full: bool) -> torch.Tensor:
    """Rows [N, D_side] of one side as the pair's rows [N, D_full + 1] (zero-padded; last column: the side)."""
    rows = nn.functional.pad(final, (0, width - final.shape[1] + 1))
    if full:
        rows[:, -1] = 1
    return rows


def _in_dummy_run() -> bool:
    """vLLM's profiling and warm-up passes are the forward calls without attention metadata."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    return is_forward_context_available() and get_forward_context().attn_metadata is None


@functools.cache
def _compiled_passes() -> tuple[type, type, type]:
    """The two sides and the mixed pass as vLLM-compiled classes (vLLM's `support_torch_compile`, as
    its Llama uses): every batch runs a compiled graph. Each is a class of its own, with its own
    `forward`, because vLLM keys its compile cache on the forward's name."""
    from vllm.compilation.decorators import support_torch_compile

    dims = {"input_ids": 0, "positions": 0}

    @support_torch_compile(dynamic_arg_dims=dims)
    class FullSide(Side):
        def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return self.pass_over(input_ids, positions)

    @support_torch_compile(dynamic_arg_dims=dims)
    class DecoderSide(Side):
        def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return self.pass_over(input_ids, positions)

    @support_torch_compile(dynamic_arg_dims=dims | {"full_index": 0, "decoder_index": 0, "order": 0})
    class MixedPass(nn.Module):
        """`mixed_pass` over the pair's sides, held, not owned (their weights load under `full.`/`decoder.`)."""

        def __init__(self, *, vllm_config, prefix: str = "", sides: tuple[Side, Side], shared_attn: nn.ModuleList):
            super().__init__()
            object.__setattr__(self, "sides", sides)
            object.__setattr__(self, "shared_attn", shared_attn)

        def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, full_index: torch.Tensor,
                    decoder_index: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
            return mixed_pass(*self.sides, self.shared_attn, input_ids, positions, full_index, decoder_index, order)

    return FullSide, DecoderSide, MixedPass


def warm_up_split(n: int) -> torch.Tensor | None:
    """full_rows [n] bool for the mixed pass's first (compiling) call: both sides and the batch of
    three different sizes, none below 2, so that none is specialised or taken for another (vLLM
    drops the guards; torch gives equal sizes one symbol). None where n is too small for that."""
    n_full = n - n // 3
    if n < 7 or len({n, n_full, n - n_full}) < 3:
        return None
    return torch.arange(n) < n_full


class OverFillForCausalLM(nn.Module):
    """vLLM model class of an exported OverFill directory (see the module docstring)."""

    overfill = True  # what the patched model runner looks for
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config, prefix: str = ""):
        from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
        from vllm.model_executor.layers.attention import Attention
        from vllm.model_executor.layers.logits_processor import LogitsProcessor

        super().__init__()
        import vllm

        problem = routing_problem(vllm_config, vllm.__version__, _hook_problem)
        if problem is not None:
            raise RuntimeError(f"OverFill cannot serve this pair here: {problem}")
        if get_pp_group().world_size > 1:
            raise ValueError("OverFillForCausalLM does not support pipeline parallelism")
        from vllm.compilation.backends import set_model_tag

        config = vllm_config.model_config.hf_config
        self.config = config
        tp = get_tensor_model_parallel_world_size()
        heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.attn = nn.ModuleList(
            Attention(heads // tp, head_dim, head_dim ** -0.5, num_kv_heads=max(1, kv_heads // tp),
                      cache_config=vllm_config.cache_config, quant_config=vllm_config.quant_config,
                      prefix=f"model.layers.{i}.self_attn.attn")  # vLLM Llama's layer names: KV connectors key on them
            for i in range(config.num_hidden_layers))
        full_class, decoder_class, mixed_class = _compiled_passes()
        with set_model_tag("overfill_full"):
            self.full = full_class(vllm_config=vllm_config, config=side_config(config, "full"), prefix="full",
                                   shared_attn=self.attn)
        with set_model_tag("overfill_decoder"):
            self.decoder = decoder_class(vllm_config=vllm_config, config=side_config(config, "decoder"),
                                         prefix="decoder", shared_attn=self.attn, attn_layers=layer_map(config))
        with set_model_tag("overfill_mixed"):
            self.mixed = mixed_class(vllm_config=vllm_config, sides=(self.full, self.decoder), shared_attn=self.attn)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.full_width = config.hidden_size

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.full.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if input_ids is None:
            raise ValueError("OverFillForCausalLM takes token ids, not embeddings")
        N = input_ids.shape[0]
        routed = ROUTE.full_rows is not None and ROUTE.full_rows.shape[0] == N
        if not routed:
            check_routed(routed, _in_dummy_run())
            self._compile_in_dummy_run(input_ids, positions)
        only = ROUTE.only if routed else "full"
        if only is not None:  # every token on one side (pure decode batches, at steady state): no gathers
            side = self.full if only == "full" else self.decoder
            return with_flag(side(input_ids, positions), self.full_width, only == "full")  # [N, D_full + 1]
        return self.mixed(input_ids, positions, ROUTE.full_index, ROUTE.decoder_index, ROUTE.order)

    def _compile_in_dummy_run(self, input_ids: torch.Tensor, positions: torch.Tensor) -> None:
        """vLLM's profiling / warm-up pass runs every token through the full model, as plain vLLM does;
        the decoder's pass and the mixed one run here too, so that vLLM compiles them at the warm-up's
        many-token shape. First compiled at a 1-token batch, a graph would be specialised to one row
        (vLLM drops the guards) and break on the next larger batch."""
        self.decoder(input_ids, positions)
        split = warm_up_split(input_ids.shape[0])
        if split is not None:
            self.mixed(input_ids, positions, *(i.to(input_ids.device) for i in split_rows(split)))

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Logits of the rows vLLM samples from: each row by its own side's LM head."""
        full_rows = hidden_states[:, -1] > 0.5
        logits = None
        for side, rows in ((self.full, full_rows), (self.decoder, ~full_rows)):
            index = rows.nonzero().squeeze(1)
            if index.numel() == 0:
                continue
            part = self.logits_processor(side.lm_head, hidden_states[index, :side.config.hidden_size])
            if logits is None:
                logits = part.new_empty(hidden_states.shape[0], part.shape[1])
            logits[index] = part
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        from vllm.model_executor.models.llama import LlamaModel
        from vllm.model_executor.models.utils import AutoWeightsLoader

        skip = [f"{s}.lm_head." for s, side in (("full", self.full), ("decoder", self.decoder))
                if side.config.tie_word_embeddings]
        return AutoWeightsLoader(self, ignore_unexpected_prefixes=skip).load_weights(weights, mapper=LlamaModel.hf_to_vllm_mapper)
