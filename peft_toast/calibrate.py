"""Initialising the top-down path: closed-form calibration of the down-maps, and starting a new task from a calibrated or
pre-tuned adapter.

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

`python -m peft_toast.calibrate --model ... --data ... --output DIR` does this from the command line and writes an
ordinary TOAST adapter folder; `load_initialisation` starts a new task from such a folder (or a pre-tuned one) with a
new head and, optionally, a fresh prompt or readouts.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import ToastConfig
from .io import atomic_save_pretrained
from .layer import ToastLayer
from .passes import block_input_output
from .topdown import FeedbackMap

# Relative ridge: lambda = DEFAULT_RIDGE * trace(G) / d, i.e. relative to the mean energy of one channel of h_out.
DEFAULT_RIDGE = 1e-3
# Tokens per float32 product in `BlockStatistics.add` (each chunk's sums are then accumulated in float64).
PRODUCT_CHUNK = 4096

__all__ = [
    "BlockStatistics",
    "CalibrationResult",
    "calibrate_feedback",
    "collect_block_statistics",
    "least_squares_map",
    "load_initialisation",
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


# ------------------------------------------------------------------------------------ starting a new task from one


def load_initialisation(
    base_model: nn.Module,
    adapter_dir: str,
    *,
    adapter_name: str = "default",
    new_head: bool = True,
    fresh_prompt: bool = False,
    fresh_readout: bool = False,
    **config_overrides,
):
    """Start a new task from a calibrated or pre-tuned TOAST adapter folder: one call, a trainable `PeftModel`.

    The feedback maps (and, unless refreshed, the prompt, readouts and channel selection) are loaded block by block, so
    the folder may come from another model class of the same backbone (an adapter calibrated on `ViTModel` starts a
    `ViTForImageClassification`, one from `LlamaForCausalLM` a `LlamaForSequenceClassification`).

    Args:
        base_model: the transformers model of the new task (e.g. with a classification head of any size).
        adapter_dir: a folder written by `save_pretrained` or `python -m peft_toast.calibrate`.
        adapter_name: name of the new adapter.
        new_head: keep the base model's own (freshly initialised) head and train it (`modules_to_save` defaults to the
            task head again). `False` loads the saved head, which then must have the same shape.
        fresh_prompt: start from a newly initialised prompt instead of the saved one.
        fresh_readout: start from newly initialised readouts (`readout_init`, zero by default: the new task then starts
            exactly at the frozen model's function) instead of the saved ones.
        **config_overrides: `ToastConfig` fields to change, e.g. `train_down=False` to freeze the calibrated down-maps,
            `lite_rank=4` to turn saved full-rank maps into TOAST-Lite's frozen maps, `layers_to_transform`. The
            saved `variational_loss_weight` of a pre-tuned adapter is reset to 0 unless given here.

    Returns:
        A `PeftModel` whose TOAST adapter trains.
    """
    from peft import get_peft_model
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    saved_config = ToastConfig.from_pretrained(adapter_dir)
    # A new task is transfer: no variational loss unless asked for (pre-tuning used it).
    overrides = {
        "inference_mode": False,
        "auto_mapping": None,
        "base_model_name_or_path": None,
        "variational_loss_weight": 0.0,
    }
    if new_head:
        overrides["modules_to_save"] = None
    config = dataclasses.replace(saved_config, **{**overrides, **config_overrides})
    model = get_peft_model(base_model, config, adapter_name=adapter_name)
    saved = load_peft_weights(adapter_dir, device="cpu")
    tuner = model.base_model

    saved_maps = _saved_maps_by_block(saved, tuner)
    kept_init = []
    for layer in tuner.toast_layers(adapter_name):
        for kind in ("toast_down",) if fresh_readout else ToastLayer.adapter_layer_names:
            if adapter_name not in getattr(layer, kind):
                continue
            where = f"{kind} of block {layer.block_index}"
            if (layer.block_index, kind) not in saved_maps:
                kept_init.append(where)
                continue
            init = saved_config.down_init if kind == "toast_down" else saved_config.readout_init
            ranks = {"rank": saved_config.feedback_rank, "lite_rank": saved_config.lite_rank}
            source = _saved_map(saved_maps[layer.block_index, kind], layer.in_features, init, **ranks)
            _copy_map(getattr(layer, kind)[adapter_name], source, where=where)
    if kept_init:
        warnings.warn(
            f"{adapter_dir} has no saved values for {', '.join(kept_init)}; these keep their initialisation.",
            stacklevel=2,
        )

    dim = tuner.toast_prompt[adapter_name].shape[0]
    if not fresh_prompt and "base_model.toast_prompt" in saved:
        with torch.no_grad():
            tuner.toast_prompt[adapter_name].copy_(saved["base_model.toast_prompt"])
    prefix = "base_model.toast_channel."
    channel = {key[len(prefix) :]: tensor for key, tensor in saved.items() if key.startswith(prefix)}
    if channel and adapter_name in tuner.toast_channel:
        rank = saved_config.channel_rank if saved_config.channel_selection == "low_rank" else None
        source = _saved_map(channel, dim, "identity", rank=rank, lite_rank=None)
        _copy_map(tuner.toast_channel[adapter_name], source, where="channel selection")
    if not new_head:
        head = {key: tensor for key, tensor in saved.items() if "toast_" not in key}
        set_peft_model_state_dict(model, head, adapter_name=adapter_name)
    return model


def _saved_maps_by_block(saved: dict[str, torch.Tensor], tuner) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """The saved feedback-map tensors of each block of `tuner`'s model, `{(block, kind): {"weight": ...}}`.

    A saved key such as `base_model.model.vit.layers.3.attention.v_proj.toast_down.weight` belongs to block 3 of any
    model whose value projection is `layers.3.attention.v_proj` relative to its backbone, whatever wraps the backbone.
    """
    architecture = tuner.architecture
    backbone_name = next(name for name, module in tuner.model.named_modules() if module is architecture.backbone)
    blocks = {}
    for index, value_name in enumerate(architecture.value_names):
        relative = value_name[len(backbone_name) + 1 :] if backbone_name else value_name  # "layers.3.attention.v_proj"
        blocks[relative] = index
    maps: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in saved.items():
        for kind in ToastLayer.adapter_layer_names:
            if f".{kind}." not in key:
                continue
            path, parameter = key.split(f".{kind}.")
            matches = [
                index for relative, index in blocks.items() if path == relative or path.endswith("." + relative)
            ]
            if len(matches) == 1:
                maps.setdefault((matches[0], kind), {})[parameter] = tensor
    return maps


def _saved_map(
    tensors: dict[str, torch.Tensor], dim: int, init: str, *, rank: Optional[int], lite_rank: Optional[int]
) -> FeedbackMap:
    """Rebuild a saved `FeedbackMap` (with the parametrisation of the saved config) from its tensors."""
    feedback_map = FeedbackMap(dim, init=init, rank=rank, lite_rank=lite_rank, device="meta")
    feedback_map.load_state_dict(tensors, strict=True, assign=True)
    return feedback_map


@torch.no_grad()
def _copy_map(target: FeedbackMap, source: FeedbackMap, where: str) -> None:
    """Copy `source` into `target`: exactly when the parametrisations agree; into the full-rank (or TOAST-Lite frozen)
    weight of `target` otherwise."""
    if (target.rank, target.lite_rank, target.identity_base) == (source.rank, source.lite_rank, source.identity_base):
        target.load_state_dict(source.state_dict())  # copies in place: parameters stay parameters
        return
    if target.rank is None:  # full rank, or TOAST-Lite whose deltas keep their initialisation (delta_u = 0)
        target.weight.copy_(source.effective_weight())
        return
    raise ValueError(
        f"Cannot start the rank-{target.rank} {where} from a saved map of another parametrisation "
        f"(rank={source.rank}, lite_rank={source.lite_rank}): the best rank-{target.rank} map depends on the data. "
        f"Calibrate with `feedback_rank={target.rank}` (`python -m peft_toast.calibrate --feedback-rank "
        f"{target.rank}`) instead."
    )


# ------------------------------------------------------------------------------------------- command-line interface

# Offline models of `peft_toast.assets`, accepted by `--model` besides folders and Hub ids.
OFFLINE_MODELS = {"dinov2-small": "dinov2_small_vit_path", "smollm2-135m": "smollm2_path", "minilm": "minilm_path"}
# Offline datasets of `peft_toast.assets`, accepted by `--data` besides text files and Hub dataset names.
OFFLINE_DATA = ("fashion-mnist", "tweets")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_model_path(model: str) -> str:
    """A folder or Hub id for `model`, which may name an offline model of `peft_toast.assets` (`OFFLINE_MODELS`)."""
    if model in OFFLINE_MODELS and not os.path.isdir(model):
        from . import assets

        return getattr(assets, OFFLINE_MODELS[model])()
    return model


def load_model_and_processor(model: str, dtype: torch.dtype = torch.float32):
    """The base model to calibrate and its preprocessor (image processor or tokenizer).

    A checkpoint whose `architectures` names a causal LM loads with `AutoModelForCausalLM` (its saved adapter then
    loads onto the same class); any other with `AutoModel` (the backbone: `load_initialisation` starts any head model
    of that backbone from it). Vision models are recognised by an `image_size` in their config.
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model)
    config = AutoConfig.from_pretrained(path)
    causal = any(name.endswith("ForCausalLM") for name in config.architectures or ())
    model_class = AutoModelForCausalLM if causal else AutoModel
    base_model = model_class.from_pretrained(path, dtype=dtype).eval()
    if hasattr(config, "image_size"):
        processor = AutoImageProcessor.from_pretrained(path)
    else:
        processor = AutoTokenizer.from_pretrained(path)
        if processor.pad_token is None:
            processor.pad_token = processor.eos_token
    return base_model, processor


def load_examples(
    data: str, num_samples: int, *, seed: int = 0, split: str = "train", column: Optional[str] = None
) -> list:
    """`num_samples` raw examples (PIL images or strings) of `data`: an offline dataset (`OFFLINE_DATA`), a text file
    (one example per non-empty line) or a dataset name for `datasets.load_dataset`."""
    if data == "fashion-mnist":
        from .assets import load_fashion_mnist

        return list(load_fashion_mnist(split, limit=num_samples, seed=seed)["image"])
    if data == "tweets":
        from .assets import load_tweet_sentiment

        return list(load_tweet_sentiment(limit=num_samples, seed=seed)[split]["text"])
    if os.path.isfile(data):
        with open(data, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()][:num_samples]
    from datasets import load_dataset

    dataset = load_dataset(data, split=split)
    if column is None:
        column = next((name for name in ("text", "image", "img") if name in dataset.column_names), None)
        if column is None:
            raise ValueError(
                f"Dataset {data!r} has no `text` or `image` column (columns: {dataset.column_names}); name the column "
                f"with `--column`."
            )
    return list(dataset.shuffle(seed=seed).select(range(min(num_samples, len(dataset))))[column])


def make_batches(
    examples: Sequence, processor, *, batch_size: int, max_length: int = 128, with_labels: bool = False
) -> torch.utils.data.DataLoader:
    """A `DataLoader` that preprocesses `examples` batch by batch (nothing is stored in advance).

    Images become `pixel_values`; texts `input_ids` and `attention_mask` (padded, truncated to `max_length`), plus
    `labels` (the input ids, -100 on padding) for language-model pre-tuning when `with_labels`.
    """
    from transformers import PreTrainedTokenizerBase

    def collate(chunk: list) -> dict[str, torch.Tensor]:
        if not isinstance(processor, PreTrainedTokenizerBase):
            return {
                "pixel_values": processor(images=[image.convert("RGB") for image in chunk], return_tensors="pt")[
                    "pixel_values"
                ]
            }
        batch = processor(list(chunk), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if with_labels:
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch

    return torch.utils.data.DataLoader(list(examples), batch_size=batch_size, collate_fn=collate)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by `python -m peft_toast.calibrate` and `python -m peft_toast.pretune`."""
    parser.add_argument(
        "--model",
        required=True,
        help=f"Model folder or Hub id, or an offline model: {', '.join(OFFLINE_MODELS)}.",
    )
    parser.add_argument(
        "--data",
        required=True,
        help=f"{' or '.join(OFFLINE_DATA)} (offline), a text file (one example per line) or a `datasets` dataset name.",
    )
    parser.add_argument("--num-samples", type=int, default=1000, help="Number of examples (default 1000).")
    parser.add_argument("--split", default="train", help="Dataset split (default train).")
    parser.add_argument("--column", default=None, help="Column of a `datasets` dataset (default: text or image).")
    parser.add_argument("--batch-size", type=int, default=16, help="Batch size (default 16).")
    parser.add_argument("--max-length", type=int, default=128, help="Token limit per text (default 128).")
    parser.add_argument(
        "--seed", type=int, default=0, help="Seed of the example subset and of the adapter (default 0)."
    )
    parser.add_argument("--output", required=True, help="Folder for the TOAST adapter (replaced if it exists).")
    parser.add_argument("--feedback-rank", type=int, default=None, help="Low-rank feedback A = I + U V of this rank.")
    parser.add_argument(
        "--lite-rank", type=int, default=None, help="TOAST-Lite: frozen full maps + deltas of this rank."
    )
    parser.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=None,
        help="Blocks that receive a signal (layers_to_transform; negative = from the top). Default: all.",
    )


def cli_parser(command: str, description: str) -> argparse.ArgumentParser:
    """The parser of `python -m peft_toast.<command>` (`calibrate` or `pretune`), with the arguments that they share
    (`add_data_arguments`)."""
    parser = argparse.ArgumentParser(prog=f"python -m peft_toast.{command}", description=description)
    add_data_arguments(parser)
    return parser


def toast_config_from_args(args: argparse.Namespace, **fields) -> ToastConfig:
    """The `ToastConfig` that the arguments of `add_data_arguments` describe, plus `fields`."""
    return ToastConfig(
        feedback_rank=args.feedback_rank, lite_rank=args.lite_rank, layers_to_transform=args.layers, **fields
    )


def model_and_processor_from_args(args: argparse.Namespace) -> tuple[nn.Module, Any]:
    """`--model` and its processor, with torch seeded by `--seed` first (the adapter's initial values)."""
    torch.manual_seed(args.seed)
    return load_model_and_processor(args.model)


def examples_from_args(args: argparse.Namespace) -> list:
    """The examples that `--data`, `--num-samples`, `--seed`, `--split` and `--column` select (`load_examples`)."""
    return load_examples(args.data, args.num_samples, seed=args.seed, split=args.split, column=args.column)


def main(argv: Optional[Sequence[str]] = None) -> CalibrationResult:
    parser = cli_parser(
        "calibrate",
        "Calibrate the down-maps of a TOAST adapter in closed form (one pass of the frozen model over calibration "
        "data) and save it as an ordinary TOAST adapter folder.",
    )
    parser.add_argument(
        "--ridge",
        type=float,
        default=DEFAULT_RIDGE,
        help=f"Relative ridge lambda / (trace(G) / d) (default {DEFAULT_RIDGE}).",
    )
    parser.add_argument(
        "--autocast",
        choices=sorted(AUTOCAST_DTYPES),
        default=None,
        help="Run the statistics pass under torch.autocast in this dtype (bf16: ~2x faster on a GPU or a CPU with "
        "bfloat16 units). Default: the model's own dtype.",
    )
    args = parser.parse_args(argv)
    from peft import get_peft_model

    base_model, processor = model_and_processor_from_args(args)
    peft_model = get_peft_model(base_model, toast_config_from_args(args))
    batches = make_batches(examples_from_args(args), processor, batch_size=args.batch_size, max_length=args.max_length)
    autocast_dtype = AUTOCAST_DTYPES[args.autocast] if args.autocast else None
    result = calibrate_feedback(peft_model, batches, ridge=args.ridge, autocast_dtype=autocast_dtype)
    atomic_save_pretrained(peft_model, args.output)
    print(
        f"Calibrated {len(peft_model.base_model.toast_layers(peft_model.active_adapter))} down-maps on "
        f"{result.num_tokens} tokens in {result.seconds:.1f} s: variational loss {result.loss_before:.4g} -> "
        f"{result.loss_after:.4g}. Adapter saved to {os.path.abspath(args.output)}."
    )
    return result


if __name__ == "__main__":
    main()
