"""SliceGPT-style rotation of the residual stream (Ashkboos et al. 2024, arXiv 2401.15024), one rotation for all layers.

Channel selection keeps D' of the D residual channels as they are. A rotation first turns the
residual stream onto its principal directions, so the D' kept coordinates carry most of its
energy. With one orthogonal Q [D, D] shared by every layer the model stays a plain Llama / Qwen:

1. `fold_norms`: each RMSNorm weight moves into the linear layers that read its output
   (input_layernorm -> q/k/v, post_attention_layernorm -> gate/up, final norm -> lm_head), so
   every norm is a bare x / rms(x), which commutes with a rotation; a tied lm_head is untied first
   (the final norm folds into it, not into the embedding).
2. `principal_rotation`: Q = the eigenvectors, by descending eigenvalue, of the covariance of the
   residual stream where the norms read it (collected by `ImportanceHooks(covariance=True)`).
3. `rotate`: E <- E Q, every reader W <- W Q (q/k/v/gate/up/lm_head), every writer W <- Q^T W
   (o_proj, down_proj and o_proj's bias). With nothing removed the logits are unchanged.
4. The pruner then keeps the first D' coordinates, and each norm's weight becomes one scalar
   (`norm_scales`): an RMSNorm over the D' kept coordinates divides by their rms, not by the full
   stream's, and the scalar brings the normalised values back to the full model's scale.

Keys and values keep their heads and head size (only their input is rotated and sliced), so a
decoder cut this way still reads its full model's KV cache.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from .model import Fusable, Transformer

NormScale = str  # "plain" | "calibrated"


def norms(model: Transformer) -> list[nn.Module]:
    """The 2L + 1 RMSNorms in the order the stream meets them: per layer input, post-attention; then the final one."""
    return [n for layer in model.model.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)] + [
        model.model.norm]


def readers(model: Transformer) -> list[list[nn.Linear]]:
    """Per norm of `norms(model)`: the linear layers that read its output."""
    out = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        out += [[attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]]
    return out + [[model.lm_head]]


def writers(model: Transformer) -> list[nn.Linear]:
    """The linear layers that add to the residual stream."""
    return [m for layer in model.model.layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)]


class _Unfused:
    """Drop the fused q/k/v and gate/up buffers while parameters are replaced; rebuild them after."""

    def __init__(self, model: Transformer):
        self.fused = [m for m in model.modules() if isinstance(m, Fusable) and m.is_fused]

    def __enter__(self):
        for module in self.fused:
            module.fused_weight = module.fused_bias = None

    def __exit__(self, *exc):
        for module in self.fused:
            module.fuse()


def _set(param: nn.Parameter, value: Tensor) -> None:
    """Replace a parameter's values (computed in float64) in its own dtype, as a tensor of its own."""
    param.data = value.to(param.dtype).contiguous()


def untie(model: Transformer) -> bool:
    """Give lm_head a weight of its own where it shares the embedding's; whether it did."""
    if not model.args.tie_word_embeddings:
        return False
    embed = model.model.embed_tokens.weight
    model.lm_head.weight = nn.Parameter(embed.detach().clone(), requires_grad=embed.requires_grad)
    model.args = replace(model.args, tie_word_embeddings=False)
    return True


@torch.no_grad()
def fold_norms(model: Transformer) -> None:
    """Move every RMSNorm's weight into the layers reading it (untying lm_head first); the norms' weights become 1."""
    untie(model)
    with _Unfused(model):
        for norm, linears in zip(norms(model), readers(model)):
            w = norm.weight.double()
            for linear in linears:  # weight [out, in]: scale the input columns
                _set(linear.weight, linear.weight.double() * w)
            _set(norm.weight, torch.ones_like(w))


@torch.no_grad()
def rotate(model: Transformer, Q: Tensor) -> None:
    """Rotate the residual stream by the orthogonal Q [D, D]: new coordinates = old ones @ Q.

    The norms must be folded (weights all equal), or the model computes something else.
    """
    if any(not torch.all(n.weight == n.weight[0]) for n in norms(model)):
        raise ValueError("fold the norms before rotating: an RMSNorm with a per-channel weight does not commute "
                         "with a rotation")
    Q = Q.to(device=model.model.embed_tokens.weight.device, dtype=torch.float64)
    untie(model)  # E Q for the embedding and W Q for lm_head are one product only while they are tied
    with _Unfused(model):
        embed = model.model.embed_tokens.weight
        _set(embed, embed.double() @ Q)  # [V, D]
        for linears in readers(model):
            for linear in linears:
                _set(linear.weight, linear.weight.double() @ Q)  # [out, D]
        for linear in writers(model):
            _set(linear.weight, Q.T @ linear.weight.double())  # [D, in]
            if linear.bias is not None:
                _set(linear.bias, Q.T @ linear.bias.double())


def principal_rotation(covariance: Tensor) -> tuple[Tensor, Tensor]:
    """(Q [D, D] float64 with the eigenvectors as columns, eigenvalues [D]), by descending eigenvalue."""
    values, vectors = torch.linalg.eigh(covariance.double().cpu())
    order = values.argsort(descending=True)
    return vectors[:, order], values[order]


def kept_energy(covariances: Tensor, Q: Tensor, kept: int) -> Tensor:
    """Per covariance [N, D, D] (or one [D, D]): the fraction of its trace on the first `kept` columns of Q."""
    covariances = covariances.double().cpu()
    Qk = Q[:, :kept].to(covariances)
    inside = torch.einsum("dk,...de,ek->...", Qk, covariances, Qk)
    return inside / covariances.diagonal(dim1=-2, dim2=-1).sum(-1)


def norm_scales(how: NormScale, full: int, kept: int, energy: Tensor | None = None) -> Tensor:
    """The scalar weight of each norm after slicing D = `full` coordinates to D' = `kept`.

    A norm over the kept coordinates divides by rms'(x_k) = sqrt(f |x|^2 / D') instead of
    rms(x) = sqrt(|x|^2 / D), f being the kept share of the stream's energy; multiplying by
    sqrt(f D / D') gives the full model's normalised values back. plain: f = 1 (all energy kept).
    calibrated: f per norm, from its covariance of normalised inputs (the average share per token).
    """
    if how == "plain":
        return torch.full((1,), (full / kept) ** 0.5, dtype=torch.float64)
    return (energy.double() * full / kept).sqrt()
