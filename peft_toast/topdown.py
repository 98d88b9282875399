"""The TOAST top-down path in plain torch: token selection, channel selection and the linear feedback maps.

Nothing here knows about PEFT or transformers. `ToastModel` owns one prompt (and optionally one channel-selection
module) per adapter, and every wrapped value projection owns its block's down-map `A_l` and readout `C_l`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# Standard deviation of the reference implementation's linear-layer initialisation (truncated normal).
REFERENCE_INIT_STD = 0.02


def token_selection(
    features: torch.Tensor, prompt: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate every token by its cosine similarity with the task prompt, clipped to [0, 1].

    Args:
        features: `(B, N, d)` pass-1 output tokens.
        prompt: `(d,)` task prompt.
        eps: lower bound of each norm, so that zero tokens (padding) get a gate of 0 instead of NaN.

    Returns:
        `(gates, selected)` with `gates` of shape `(B, N)` and `selected = gates[..., None] * features`, `(B, N, d)`.
    """
    dot = features @ prompt  # (B, N)
    norms = features.norm(dim=-1).clamp_min(eps) * prompt.norm().clamp_min(eps)  # (B, N)
    gates = (dot / norms).clamp(0.0, 1.0)  # (B, N)
    return gates, gates.unsqueeze(-1) * features  # (B, N), (B, N, d)


def rms_normalise(features: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each token divided by its root mean square over channels (no gain), `(B, N, d) -> (B, N, d)`; zero tokens stay
    zero. The cosine gates of `token_selection` do not change (a positive per-token scale cancels)."""
    # In float32: a decoder's pre-norm feature (values in the hundreds) squared overflows float16.
    rms = features.float().pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(eps)  # (B, N, 1)
    return (features.float() / rms).to(features.dtype)


def unit_token_sum(features: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, eps: float = 1e-6):
    """The sum of the unit vectors of the real tokens, `(B, N, d) -> (d,)`, in float32.

    A prompt `p` along this sum `u` opens the path for this batch: the sum of the tokens' cosines with `p` is
    `sum_n <x_n / |x_n|, u> / |u| = |u| > 0`, so at least one real token has a positive gate (unless `u = 0`).
    `attention_mask` (`(B, N)`, 1 = real token) leaves padding out; for a decoder with a KV cache it may be longer than
    `N` and its last `N` columns are used.
    """
    units = features.float() / features.float().norm(dim=-1, keepdim=True).clamp_min(eps)  # (B, N, d)
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[0] == features.shape[0]:
        mask = attention_mask[:, -features.shape[1] :].to(device=units.device, dtype=units.dtype)  # (B, N)
        units = units * mask.unsqueeze(-1)
    return units.sum(dim=(0, 1))  # (d,)


class FeedbackMap(nn.Module):
    """One linear, bias-free, per-token `d -> d` map of the feedback path: a down-map `A_l`, a readout `C_l` or the
    channel selection `P`.

    Three parametrisations, chosen by `ToastConfig`:

    - full rank (`rank=None`, `lite_rank=None`): `W` is a trainable `weight` (d, d).
    - low rank (`rank=r`): `W = base + u @ v` with `u` (d, r), `v` (r, d); `base` is the identity for maps that start as
      the identity (down-maps, channel selection) and zero for readouts. `u` starts at zero when the map must start
      exactly at its base, so that gradients still reach it.
    - lite (`lite_rank=r`): a frozen full-rank `weight` buffer (its initial value, or a calibrated / pre-tuned one) plus
      a trainable delta `delta_u @ delta_v` with `delta_u` starting at zero.
    """

    def __init__(
        self,
        dim: int,
        *,
        init: str,
        rank: Optional[int] = None,
        lite_rank: Optional[int] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if init not in ("identity", "zero", "reference"):
            raise ValueError(f"Unknown feedback-map initialisation {init!r}.")
        self.dim = dim
        self.rank = rank
        self.lite_rank = lite_rank
        self.identity_base = rank is not None and init == "identity"
        factory = {"device": device, "dtype": dtype}
        if rank is None:
            weight = torch.empty(dim, dim, **factory)
            if lite_rank is None:
                self.weight = nn.Parameter(weight)
            else:
                self.register_buffer("weight", weight)
                self.delta_u = nn.Parameter(torch.empty(dim, lite_rank, **factory))
                self.delta_v = nn.Parameter(torch.empty(lite_rank, dim, **factory))
        else:
            self.u = nn.Parameter(torch.empty(dim, rank, **factory))
            self.v = nn.Parameter(torch.empty(rank, dim, **factory))
        self.init = init
        if not any(t.is_meta for t in self.parameters()):
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        init = self.init
        if self.rank is None:
            if init == "identity":
                self.weight.copy_(torch.eye(self.dim))
            elif init == "zero":
                self.weight.zero_()
            else:
                nn.init.trunc_normal_(self.weight, std=REFERENCE_INIT_STD)
            if self.lite_rank is not None:
                self.delta_u.zero_()
                nn.init.trunc_normal_(self.delta_v, std=REFERENCE_INIT_STD)
        else:
            nn.init.trunc_normal_(self.v, std=REFERENCE_INIT_STD)
            if init == "reference":
                nn.init.trunc_normal_(self.u, std=REFERENCE_INIT_STD)
            else:  # start exactly at the base (identity or zero)
                self.u.zero_()

    def effective_weight(self) -> torch.Tensor:
        """The `(d, d)` matrix `W` of the map `z -> z W^T` (for inspection, tests and calibration)."""
        if self.rank is None:
            weight = self.weight
            if self.lite_rank is not None:
                weight = weight + self.delta_u @ self.delta_v
            return weight
        weight = self.u @ self.v
        if self.identity_base:
            weight = weight + torch.eye(self.dim, device=weight.device, dtype=weight.dtype)
        return weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, N, d) -> (B, N, d)
        if self.rank is None:
            out = F.linear(z, self.weight)
            if self.lite_rank is not None:
                out = out + (z @ self.delta_v.T) @ self.delta_u.T
            return out
        out = (z @ self.v.T) @ self.u.T  # (B, N, r) -> (B, N, d): never materialises the d x d matrix
        return out + z if self.identity_base else out

    def extra_repr(self) -> str:
        kind = "full" if self.rank is None else f"rank={self.rank}"
        lite = f", lite_rank={self.lite_rank}" if self.lite_rank is not None else ""
        return f"dim={self.dim}, {kind}{lite}, init={self.init}"


def feedback_chain(
    selected: torch.Tensor,
    down_maps: list[nn.Module],
    readouts: list[Optional[nn.Module]],
) -> list[Optional[torch.Tensor]]:
    """Send the selected top-layer tokens down the feedback path.

    `down_maps[i]` and `readouts[i]` belong to the i-th wrapped block counted from the *top*. With `z_L = selected`:
    `z_{l-1} = A_l z_l` and `t_l = C_l z_{l-1}`, i.e. `t_l = C_l A_l A_{l+1} ... A_L x_hat`. A block without readout only
    relays the signal downwards.

    Returns the top-down signals `t_l` (`(B, N, d)`, or None without readout), in the same top-down order.
    """
    z = selected  # (B, N, d)
    signals = []
    for down, readout in zip(down_maps, readouts):
        z = down(_to_module(z, down))
        signals.append(readout(_to_module(z, readout)) if readout is not None else None)
    return signals


def _to_module(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Move `x` to the device and dtype of `module`'s weights (blocks can live on different devices)."""
    ref = next(module.parameters(), None)
    if ref is None:
        ref = next(module.buffers())
    return x.to(device=ref.device, dtype=ref.dtype)
