"""Closed-form calibration of the top-down path's down-maps.

The variational loss of pre-tuning, `sum_l MSE(A_l h_l_out, h_l_in)`, is linear least squares in each down-map `A_l`
(`h_l_in` and `h_l_out` are block `l`'s residual-stream input and output, detached). Instead of learning `A_l` by SGD
over an epoch of generic data, `calibrate_feedback` solves it: one streaming pass of the frozen model over a
calibration set accumulates, per block, the `d x d` sums `G = sum h_out h_out^T` and `C = sum h_in h_out^T` in float64
(each batch's products computed in float32; memory does not grow with the number of samples; `autocast_dtype` runs
the pass itself in bfloat16), then

    A_l = (C + lambda I)(G + lambda I)^{-1}                 (full rank, and TOAST-Lite's frozen map)

which minimises `sum ||A h_out - h_in||^2 + lambda ||A - I||_F^2`: the ridge pulls directions the data does not
determine towards the identity (the default down-map) rather than towards zero. For low-rank feedback
`A_l = I + U V`, the best rank-`r` correction in the same data-weighted norm is a reduced-rank regression of the
residual `h_in - h_out` on `h_out` (whiten by the Cholesky factor of `G + lambda I`, truncate the SVD). The statistics
come from the frozen model (adapters disabled), which is exactly pass 2 while the readouts are zero, as they are at
the start (`readout_init="zero"`).

`python -m peft_toast.calibrate` (`peft_toast/calibrate.py`) does this from the command line and writes an ordinary
TOAST adapter folder; `load_initialisation` (`peft_toast/loading.py`) starts a new task from such a folder (or a
pre-tuned one) with a new head and, optionally, a fresh prompt or readouts.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .passes import block_input_output
from .topdown import FeedbackMap

# Relative ridge: lambda = DEFAULT_RIDGE * trace(G) / d, i.e. relative to the mean energy of one channel of h_out.
DEFAULT_RIDGE = 1e-3
# Tokens per float32 product in `BlockStatistics.add` (each chunk's sums are then accumulated in float64).
PRODUCT_CHUNK = 4096

__all__ = [
    "DEFAULT_RIDGE",
    "PRODUCT_CHUNK",
    "BlockStatistics",
    "CalibrationResult",
    "calibrate_feedback",
    "collect_block_statistics",
    "least_squares_map",
    "reconstruction_error",
    "reduced_rank_map",
]


# ------------------------------------------------------------------------------------------------------ statistics


@dataclass
class BlockStatistics:
    """Sufficient statistics of one block's variational loss over a set of tokens, in float64.

    `gram = sum h_out h_out^T` and `cross = sum h_in h_out^T` (both `(d, d)`), `target_energy = sum ||h_in||^2` and
    the number of tokens. Any linear map's loss on these tokens follows exactly (`reconstruction_error`).
    """

    gram: torch.Tensor
    cross: torch.Tensor
    target_energy: torch.Tensor
    num_tokens: int = 0

    @classmethod
    def zeros(cls, dim: int, device=None) -> BlockStatistics:
        factory = {"dtype": torch.float64, "device": device}
        return cls(torch.zeros(dim, dim, **factory), torch.zeros(dim, dim, **factory), torch.zeros((), **factory))

    def add(
        self,
        hidden_in: torch.Tensor,
        hidden_out: torch.Tensor,
        *,
        product_dtype: Optional[torch.dtype] = None,
        chunk_size: int = PRODUCT_CHUNK,
    ) -> None:
        """Accumulate tokens: `hidden_in`, `hidden_out` of shape `(n, d)`.

        The products are computed in `product_dtype`: by default float64 for float64 inputs and float32 for any other,
        `chunk_size` tokens at a time, each chunk's product then added to the float64 sums. Float32 products are twice
        as fast as float64 ones on a CPU, and the rounding of a sum of at most `chunk_size` terms (relative
        ~1e-7 * sqrt(chunk_size)) stays far below the ridge that regularises the solve.
        """
        if product_dtype is None:
            product_dtype = torch.float64 if hidden_in.dtype == torch.float64 else torch.float32
        if product_dtype == torch.float64:
            chunk_size = hidden_in.shape[0]
        # Under `torch.autocast` (an autocast calibration pass) the products would silently run in bfloat16, whose
        # rounding makes the Gram matrix indefinite: always multiply in `product_dtype`.
        with torch.autocast(hidden_in.device.type, enabled=False):
            for start in range(0, hidden_in.shape[0], max(chunk_size, 1)):
                x = hidden_out[start : start + chunk_size].to(product_dtype)  # (n, d)
                y = hidden_in[start : start + chunk_size].to(product_dtype)  # (n, d)
                self.gram += (x.T @ x).to(self.gram)
                self.cross += (y.T @ x).to(self.gram)
                self.target_energy += y.to(self.gram).pow(2).sum()
        self.num_tokens += hidden_in.shape[0]

    def reconstruction_error(self, weight: torch.Tensor) -> float:
        """`MSE(W h_out, h_in)` over the accumulated tokens (mean over tokens and channels), for a `(d, d)` map `W`."""
        weight = weight.to(self.gram)
        squared = self.target_energy - 2 * (weight * self.cross).sum() + (weight @ self.gram * weight).sum()
        return (squared / (self.num_tokens * self.gram.shape[0])).item()


class _StatisticsCollected(Exception):
    """Raised after the top calibrated block: the rest of the model (final norm, head, loss) is not needed."""


def collect_block_statistics(
    peft_model: nn.Module,
    batches: Iterable[dict[str, Any]],
    *,
    adapter_name: Optional[str] = None,
    progress: bool = True,
    autocast_dtype: Optional[torch.dtype] = None,
    product_dtype: Optional[torch.dtype] = None,
) -> dict[int, BlockStatistics]:
    """One streaming pass of the frozen model over `batches`, accumulating `BlockStatistics` for every block that has a
    down-map in `adapter_name` (default: the active adapter).

    `batches` yields model inputs (a `DataLoader` of dicts, for instance). Tokens whose `attention_mask` is 0 (padding)
    are skipped. The model runs in eval mode with its adapters disabled, and stops after the top block.

    `autocast_dtype` (e.g. `torch.bfloat16`) runs the pass under `torch.autocast`: on a GPU, or a CPU with bfloat16
    matrix units (AVX512-BF16, AMX), about twice as fast as float32. The statistics still accumulate in float64; the
    hidden states carry bfloat16 rounding (measured effect on the calibrated loss: docs/initialisation.md).
    `product_dtype` is that of the per-batch products (`BlockStatistics.add`; default float32 for a float32 model).

    Returns `{block index: BlockStatistics}`.
    """
    tuner = peft_model.base_model
    adapter_name = adapter_name or tuner.active_adapters[0]
    layers = tuner.toast_layers(adapter_name)
    if not layers:
        raise ValueError(f"Adapter {adapter_name!r} has no feedback maps; is it a TOAST adapter of this model?")
    blocks = tuner.architecture.blocks
    top = max(layer.block_index for layer in layers)
    # Each block's statistics live on its own device (a model split over several GPUs keeps them apart).
    statistics = {
        layer.block_index: BlockStatistics.zeros(layer.in_features, device=layer.get_base_layer().weight.device)
        for layer in layers
    }
    token_mask: list[Optional[torch.Tensor]] = [None]  # (B * N,) bool mask of the current batch

    def record(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            hidden_in, hidden_out = block_input_output(args, kwargs, output)  # (B, N, d) each
            dim = hidden_in.shape[-1]
            hidden_in, hidden_out = hidden_in.reshape(-1, dim), hidden_out.reshape(-1, dim)  # (B * N, d)
            mask = token_mask[0]
            if mask is not None:
                if mask.shape[0] != hidden_in.shape[0]:
                    raise ValueError(
                        f"The attention mask covers {mask.shape[0]} tokens but block {index} sees "
                        f"{hidden_in.shape[0]}; calibration needs one mask entry per token of the residual stream."
                    )
                mask = mask.to(hidden_in.device)
                hidden_in, hidden_out = hidden_in[mask], hidden_out[mask]
            statistics[index].add(hidden_in, hidden_out, product_dtype=product_dtype)
            if index == top:
                raise _StatisticsCollected

        return hook

    handles = [blocks[index].register_forward_hook(record(index), with_kwargs=True) for index in statistics]
    device = next(peft_model.parameters()).device
    precision = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    )
    was_training = peft_model.training
    peft_model.eval()
    try:
        with peft_model.disable_adapter(), torch.no_grad(), precision:
            for batch in tqdm(batches, desc="calibration statistics", unit="batch", disable=not progress):
                batch = {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
                mask = batch.get("attention_mask")
                token_mask[0] = None if mask is None else mask.reshape(-1).bool()
                try:
                    peft_model(**batch)
                except _StatisticsCollected:
                    pass
    finally:
        for handle in handles:
            handle.remove()
        peft_model.train(was_training)
    if next(iter(statistics.values())).num_tokens == 0:
        raise ValueError("The calibration batches contained no tokens (empty data, or every attention mask is 0).")
    return statistics


# ------------------------------------------------------------------------------------------------------- solvers


def _regularised_gram(statistics: BlockStatistics, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The Cholesky factor `L` of `G + lambda I` (`L L^T = G + lambda I`) and `lambda = ridge * trace(G) / d`."""
    gram = statistics.gram
    dim = gram.shape[0]
    strength = ridge * gram.diagonal().mean()
    regularised = gram + strength * torch.eye(dim, dtype=gram.dtype, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(regularised)
    if info.item() != 0:
        raise ValueError(
            f"The calibration Gram matrix is singular (ridge={ridge}); too few tokens for hidden size {dim}, or "
            f"degenerate hidden states. Use more calibration samples or a larger `ridge` (e.g. {DEFAULT_RIDGE})."
        )
    return factor, strength


def least_squares_map(statistics: BlockStatistics, ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
    """The `(d, d)` map `A = (C + lambda I)(G + lambda I)^{-1}` minimising
    `sum ||A h_out - h_in||^2 + lambda ||A - I||^2` (float64; `lambda = ridge * trace(G) / d`)."""
    factor, strength = _regularised_gram(statistics, ridge)
    eye = torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)
    # (G + lambda I) is symmetric: A^T = (G + lambda I)^{-1} (C + lambda I)^T.
    return torch.cholesky_solve((statistics.cross + strength * eye).T, factor).T


def reduced_rank_map(
    statistics: BlockStatistics, rank: int, ridge: float = DEFAULT_RIDGE, identity_base: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-`rank` correction `U V` of the map `A = B + U V` (`B = I` if `identity_base`, else 0), minimising
    `sum ||A h_out - h_in||^2 + lambda ||U V||^2`.

    With `D* = (C - B G)(G + lambda I)^{-1}` the unconstrained optimum, the objective is `const + ||(D - D*) L||^2`
    where `G + lambda I = L L^T`; so `D = [D* L]_r L^{-1}` with `[.]_r` the rank-`r` truncated SVD (Eckart-Young).
    Each rank-1 term is split so that its two factors have equal norms. Returns `U` `(d, r)` and `V` `(r, d)` in
    float64.
    """
    factor, _ = _regularised_gram(statistics, ridge)
    # sum (h_in - B h_out) h_out^T = C - B G
    residual_cross = statistics.cross - statistics.gram if identity_base else statistics.cross
    # D* L = (C - B G) L^{-T}: solve L X = (C - B G)^T for X = L^{-1} (C - B G)^T.
    whitened = torch.linalg.solve_triangular(factor, residual_cross.T, upper=False).T  # (d, d)
    left, singular, right = torch.linalg.svd(whitened)
    u = left[:, :rank] * singular[:rank]  # (d, r): P_r S_r
    v = torch.linalg.solve_triangular(factor.T, right[:rank].T, upper=True).T  # (r, d): Q_r^T L^{-1}
    # Balance each rank-1 term so that u and v have equal norms: the same map, but gradient steps on either factor
    # then move it alike (the raw split grows u with the number of calibration tokens and shrinks v).
    balance = (v.norm(dim=1) / u.norm(dim=0).clamp_min(torch.finfo(u.dtype).tiny)).sqrt()  # (r,)
    return u * balance, v / balance.clamp_min(torch.finfo(u.dtype).tiny)[:, None]


@torch.no_grad()
def _write_solution(feedback_map: FeedbackMap, statistics: BlockStatistics, ridge: float) -> None:
    if feedback_map.rank is None:
        # Full rank, or TOAST-Lite's frozen map (its delta then starts at zero again, so the map equals the solution).
        feedback_map.weight.copy_(least_squares_map(statistics, ridge))
        if feedback_map.lite_rank is not None:
            feedback_map.delta_u.zero_()
        return
    u, v = reduced_rank_map(statistics, feedback_map.rank, ridge, identity_base=feedback_map.identity_base)
    feedback_map.u.copy_(u)
    feedback_map.v.copy_(v)


# --------------------------------------------------------------------------------------------------- calibration


@dataclass
class CalibrationResult:
    """What `calibrate_feedback` did: the variational loss `sum_l MSE(A_l h_l_out, h_l_in)` over the calibration tokens
    before and after, the number of tokens (per block) and the wall time in seconds."""

    loss_before: float
    loss_after: float
    num_tokens: int
    seconds: float


def _down_maps(peft_model: nn.Module, adapter_name: str) -> dict[int, FeedbackMap]:
    return {
        layer.block_index: layer.toast_down[adapter_name] for layer in peft_model.base_model.toast_layers(adapter_name)
    }


def _statistics_for(
    peft_model: nn.Module,
    batches: Optional[Iterable[dict[str, Any]]],
    statistics: Optional[dict[int, BlockStatistics]],
    adapter_name: str,
    progress: bool,
    autocast_dtype: Optional[torch.dtype] = None,
) -> dict[int, BlockStatistics]:
    """`statistics` as given (checked against the adapter's blocks), or collected from `batches`."""
    if (batches is None) == (statistics is None):
        raise ValueError("Pass either `batches` (calibration data) or `statistics` (from `collect_block_statistics`).")
    if statistics is not None and autocast_dtype is not None:
        raise ValueError(
            "`autocast_dtype` applies to the statistics pass, but `statistics` were given: pass "
            "`autocast_dtype` to `collect_block_statistics` instead."
        )
    if statistics is None:
        return collect_block_statistics(
            peft_model, batches, adapter_name=adapter_name, progress=progress, autocast_dtype=autocast_dtype
        )
    missing = sorted(set(_down_maps(peft_model, adapter_name)) - set(statistics))
    if missing:
        raise ValueError(
            f"The statistics cover blocks {sorted(statistics)} but adapter {adapter_name!r} has down-maps in blocks "
            f"{missing} too; collect them with `collect_block_statistics` on a model with the same blocks."
        )
    return statistics


def _total_error(down_maps: dict[int, FeedbackMap], statistics: dict[int, BlockStatistics]) -> float:
    with torch.no_grad():
        return sum(
            statistics[i].reconstruction_error(down_map.effective_weight()) for i, down_map in down_maps.items()
        )


def calibrate_feedback(
    peft_model: nn.Module,
    batches: Optional[Iterable[dict[str, Any]]] = None,
    *,
    statistics: Optional[dict[int, BlockStatistics]] = None,
    ridge: float = DEFAULT_RIDGE,
    adapter_name: Optional[str] = None,
    progress: bool = True,
    autocast_dtype: Optional[torch.dtype] = None,
) -> CalibrationResult:
    """Set every down-map `A_l` of `adapter_name` (default: the active adapter) to the minimiser of the variational loss
    over the tokens of `batches`, in one streaming pass of the frozen model.

    Full-rank maps get the ridge solution `least_squares_map`; low-rank maps (`feedback_rank=r`) their best rank-`r`
    correction `reduced_rank_map`; TOAST-Lite maps (`lite_rank=r`) get the full-rank solution in their frozen weight
    and a zero delta. Readouts, prompt and head are left as they are (zero readouts by default: the adapted model
    still starts exactly at the frozen model).

    Args:
        peft_model: a `PeftModel` with a TOAST adapter.
        batches: an iterable of model-input dicts, e.g. a `DataLoader`; `attention_mask` marks the real tokens.
        statistics: instead of `batches`, statistics from `collect_block_statistics` (they depend only on the frozen
            model and the data, so one pass can calibrate several adapters: full-rank, low-rank, lite).
        ridge: relative ridge `lambda / (trace(G) / d)`; it pulls undetermined directions towards the identity.
        adapter_name: the adapter to calibrate; default the active one.
        progress: show a progress bar.
        autocast_dtype: run the statistics pass under `torch.autocast` with this dtype (`torch.bfloat16`: about twice
            as fast on a GPU or a CPU with bfloat16 units; see `collect_block_statistics`).
    """
    start = time.perf_counter()
    adapter_name = adapter_name or peft_model.base_model.active_adapters[0]
    statistics = _statistics_for(peft_model, batches, statistics, adapter_name, progress, autocast_dtype)
    down_maps = _down_maps(peft_model, adapter_name)
    loss_before = _total_error(down_maps, statistics)
    for index, down_map in down_maps.items():
        _write_solution(down_map, statistics[index], ridge)
    return CalibrationResult(
        loss_before=loss_before,
        loss_after=_total_error(down_maps, statistics),
        num_tokens=next(iter(statistics.values())).num_tokens,
        seconds=time.perf_counter() - start,
    )


def reconstruction_error(
    peft_model: nn.Module,
    batches: Optional[Iterable[dict[str, Any]]] = None,
    *,
    statistics: Optional[dict[int, BlockStatistics]] = None,
    adapter_name: Optional[str] = None,
    progress: bool = False,
) -> float:
    """The variational loss `sum_l MSE(A_l h_l_out, h_l_in)` of the current down-maps over the real tokens of `batches`
    (hidden states of the frozen model), computed exactly from streamed statistics (or from given `statistics`)."""
    adapter_name = adapter_name or peft_model.base_model.active_adapters[0]
    statistics = _statistics_for(peft_model, batches, statistics, adapter_name, progress)
    return _total_error(_down_maps(peft_model, adapter_name), statistics)
