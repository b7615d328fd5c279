"""One CALM connection as a pure module: f_proj (augment -> anchor width) and f_cross (cross-attention).

Legend: b batch, t anchor (query) positions, s augment (key) positions, h heads, d head dim,
D_A augment width, D_B anchor width.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """The norm a connection applies to its inputs: the kind the base model's own blocks use."""
    if kind == "rms":
        return nn.RMSNorm(dim, eps=eps)
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"Unknown norm kind {kind!r}; expected 'rms', 'layer' or 'none'")


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate pairs of channels of ``x`` by angles proportional to ``positions`` (RoPE).

    Args:
        x: (b, h, n, d) with d even.
        positions: (b, n) integer positions.
    Returns:
        (b, h, n, d), same dtype as ``x``.
    """
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))  # (d/2,)
    angles = positions.to(torch.float32)[:, None, :, None] * inv_freq  # (b, 1, n, d/2)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]  # (b, h, n, d/2) each
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (b, h, n, d/2, 2)
    return rotated.flatten(-2).to(x.dtype)


class CrossAttention(nn.Module):
    """f_proj then multi-head attention with anchor queries and projected augment keys/values.

    Computes ``delta = f_cross(f_proj(H_A), H_B)`` (paper §3.1); the caller adds ``delta`` to the
    anchor's residual stream. The output projection starts at zero, so ``delta`` is 0 at init.

    Args:
        augment_dim: D_A, width of the augment's hidden states.
        anchor_dim: D_B, width of the anchor's hidden states.
        num_heads: attention heads; D_B must be divisible by it.
        augment_norm, anchor_norm: "rms", "layer" or "none": pre-norm of each input, the kind that
            model's own blocks use (hidden states in the residual stream are not normalised).
        augment_eps, anchor_eps: epsilon of those norms.
        rotary: add rotary position information between query and key positions.
        proj_bias: bias in f_proj.
        null_attention: every query may also attend to one learned key per head whose value is zero, so a
            connection can add (close to) nothing where the augment has nothing to add (beyond the paper).
        null_score: the null key's initial score offset in every head (learned): above 0, a query reads the null
            unless an augment key scores clearly higher, so a connection starts out adding nothing anywhere.
    """

    def __init__(
        self,
        augment_dim: int,
        anchor_dim: int,
        num_heads: int,
        augment_norm: str = "rms",
        anchor_norm: str = "rms",
        augment_eps: float = 1e-6,
        anchor_eps: float = 1e-6,
        rotary: bool = False,
        proj_bias: bool = True,
        null_attention: bool = False,
        null_score: float = 0.0,
    ) -> None:
        super().__init__()
        if anchor_dim % num_heads != 0:
            raise ValueError(f"The anchor width {anchor_dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = anchor_dim // num_heads
        if rotary and self.head_dim % 2:
            raise ValueError(f"rotary needs an even head dimension, got {self.head_dim}")
        self.rotary = rotary
        self.augment_norm = make_norm(augment_norm, augment_dim, augment_eps)
        self.proj = nn.Linear(augment_dim, anchor_dim, bias=proj_bias)  # f_proj: D_A -> D_B
        self.anchor_norm = make_norm(anchor_norm, anchor_dim, anchor_eps)
        self.query = nn.Linear(anchor_dim, anchor_dim, bias=False)  # W^Q, all heads
        self.key = nn.Linear(anchor_dim, anchor_dim, bias=False)  # W^K
        self.value = nn.Linear(anchor_dim, anchor_dim, bias=False)  # W^V
        self.out = nn.Linear(anchor_dim, anchor_dim, bias=False)  # W^O, zero at init
        nn.init.zeros_(self.out.weight)
        # the null key of each head (its value is zero); zero at init: its score starts at 0 for every query
        self.null_key = nn.Parameter(torch.zeros(num_heads, self.head_dim)) if null_attention else None
        self.null_bias = nn.Parameter(torch.full((num_heads,), float(null_score))) if null_attention else None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (b, h, n, d)

    def project(
        self, augment_hidden: torch.Tensor, positions: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values from augment hidden states.

        Args:
            augment_hidden: (b, s, D_A) output of the connected augment block.
            positions: (b, s) positions of those tokens; needed when ``rotary``.
        Returns:
            keys and values, each (b, h, s, d), in this module's dtype.
        """
        x = augment_hidden.to(self.proj.weight.dtype)  # (b, s, D_A)
        if torch.is_grad_enabled() and self._folding_is_cheaper(x.shape[0] * x.shape[1]):
            k, v = self._folded_key_value(x)
        else:
            x = self.proj(self.augment_norm(x))  # (b, s, D_B)
            k, v = self.key(x), self.value(x)
        k, v = self._heads(k), self._heads(v)  # (b, h, s, d)
        if self.rotary:
            k = apply_rotary(k, _require(positions, "key positions"))
        return k, v

    def _folding_is_cheaper(self, tokens: int) -> bool:
        """Whether W^K f_proj and W^V f_proj as two (D_B, D_A) products cost fewer multiply-adds for ``tokens``
        augment tokens than f_proj then W^K and W^V: tokens (2 D_B - D_A) > 2 D_B D_A (the products themselves
        cost 2 D_B^2 D_A once). True for training batches, false for a token at a time in generation."""
        d_b, d_a = self.proj.out_features, self.proj.in_features
        return tokens * (2 * d_b - d_a) > 2 * d_b * d_a

    def _folded_key_value(self, augment_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of augment states (b, s, D_A) through one folded affine map each.

        With the norm written as ``g * n(x) + c`` (``n`` the norm without its own weight ``g`` and bias ``c``):
        W^{K,V} (W^P (g * n(x) + c) + b) = (W^{K,V} W^P diag(g)) n(x) + W^{K,V} (W^P c + b). The same function and
        gradients as the unfolded path (up to rounding), with fewer FLOPs; autograd keeps only n(x) (b, s, D_A),
        not the augment states, the weighted norm output and the (b, s, D_B) f_proj output."""
        norm, weight, bias = self.augment_norm, self.proj.weight, self.proj.bias  # (D_B, D_A), (D_B,)
        if isinstance(norm, nn.RMSNorm):
            x = F.rms_norm(augment_hidden, norm.normalized_shape, None, norm.eps)
        elif isinstance(norm, nn.LayerNorm):
            x = F.layer_norm(augment_hidden, norm.normalized_shape, None, None, norm.eps)
        else:  # no norm
            x = augment_hidden
        if getattr(norm, "weight", None) is not None:
            weight = weight * norm.weight  # W^P diag(g)
        if getattr(norm, "bias", None) is not None:
            bias = self.proj.weight @ norm.bias if bias is None else self.proj.weight @ norm.bias + bias

        def folded(w: torch.Tensor) -> torch.Tensor:  # two products, not one split: keys and values stay contiguous
            return F.linear(x, w @ weight, None if bias is None else w @ bias)  # (b, s, D_B)

        return folded(self.key.weight), folded(self.value.weight)

    def _query(self, anchor_hidden: torch.Tensor) -> torch.Tensor:
        """W^Q of the normalised anchor states, (b, t, D_B). With a gradient to compute, the normalised states are
        recomputed in the backward pass instead of kept: the anchor states themselves are kept either way (the
        norm's backward needs them), so this saves a (b, t, D_B) tensor per connection for one D_B x D_B matmul."""
        if torch.is_grad_enabled() and (anchor_hidden.requires_grad or self.query.weight.requires_grad):
            return torch.utils.checkpoint.checkpoint(self._plain_query, anchor_hidden, use_reentrant=False)
        return self._plain_query(anchor_hidden)

    def _plain_query(self, anchor_hidden: torch.Tensor) -> torch.Tensor:
        return self.query(self.anchor_norm(anchor_hidden))

    def forward(
        self,
        anchor_hidden: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        positions: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The residual update for the anchor.

        Args:
            anchor_hidden: (b, t, D_B) output of the connected anchor block.
            keys, values: (b, h, s, d) from :meth:`project`.
            mask: (b, 1, t, s) bool, True where query t may read key s. None means causal with t == s.
            positions: (b, t) query positions; needed when ``rotary``.
        Returns:
            (b, t, D_B) delta, to be added to ``anchor_hidden``.
        """
        b, t, dim = anchor_hidden.shape
        q = self._heads(self._query(anchor_hidden))  # (b, h, t, d)
        if self.rotary:
            q = apply_rotary(q, _require(positions, "query positions"))
        if mask is None and keys.shape[2] != t:
            raise ValueError(f"A causal cross-attention needs as many keys as queries, got {keys.shape[2]} and {t}")
        if self.null_key is not None:  # every query reads the null too: no query is left with nothing to read
            keys, values, scores = self._with_null(keys, values, mask, t)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=scores)  # (b, h, t, d)
        elif mask is None:
            y = F.scaled_dot_product_attention(q, keys, values, is_causal=True)  # (b, h, t, d)
        else:
            # A query that may read no key at all (padding) gets a zero update instead of NaN.
            empty = ~mask.any(dim=-1, keepdim=True)  # (b, 1, t, 1)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask | empty)
            y = y.masked_fill(empty, 0.0)
        y = y.transpose(1, 2).reshape(b, t, dim)  # (b, t, D_B)
        return self.out(y)


    def _with_null(
        self, keys: torch.Tensor, values: torch.Tensor, mask: Optional[torch.Tensor], t: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys and values (b, h, 1 + s, d) with the null key (value zero) in front, and the additive mask
        (b or 1, h, t, 1 + s): 0 where a query may read a key, -inf elsewhere (``mask`` None: causal with t == s), and
        on the null's column its learned offset plus the log of the number of keys the query may read, so the null
        stands against the average key, not their sum: a query far into a long text does not read the augment more
        because it has more keys to read."""
        b, h, s, d = keys.shape
        null = self.null_key.to(keys.dtype)[None, :, None, :].expand(b, h, 1, d)  # (b, h, 1, d)
        keys = torch.cat([null, keys], dim=2)
        values = torch.cat([values.new_zeros(b, h, 1, d), values], dim=2)
        if mask is None:
            mask = torch.ones(t, s, dtype=torch.bool, device=keys.device).tril()[None, None]  # (1, 1, t, s)
        scores = torch.zeros(mask.shape, dtype=keys.dtype, device=keys.device).masked_fill(~mask, float("-inf"))
        readable = mask.sum(dim=-1, keepdim=True).clamp(min=1).to(keys.dtype).log()  # (b or 1, 1, t, 1)
        offset = self.null_bias.to(keys.dtype)[None, :, None, None] + readable  # (b or 1, h, t, 1)
        return keys, values, torch.cat([offset, scores.expand(-1, h, -1, -1)], dim=-1)


def _require(x: Optional[torch.Tensor], what: str) -> torch.Tensor:
    if x is None:
        raise ValueError(f"rotary cross-attention needs {what}")
    return x
