"""Seeing TOAST refocus attention: the last block's attention of one query token, frozen vs TOAST, and the token gates.

TOAST never touches queries or keys; its top-down signal changes the values, hence the residual stream that later
blocks see, hence their attention. This module measures that change where it is easiest to read, in the last block,
from the token that the head reads (CLS for a ViT; the last real token for a causal LM):

- `compare_attention(model, inputs)`: that token's attention to every token, averaged over heads, for the frozen model
  (adapters disabled) and the TOAST model, plus TOAST's token-selection gates, all `(B, N)`;
- `image_attention_maps(model, pixel_values)`: the same for a vision transformer as `(B, rows, cols)` patch grids, the
  attention maps renormalised over the patches so that each sums to 1;
- `attention_entropy`, `object_mask` and `attention_mass`: numbers for the change (how spread the attention is, and how
  much of it falls on the object);
- `plot_image_attention` and `plot_text_attention`: the figures (PNG, matplotlib).

Attention weights only exist with eager attention (SDPA and flash attention do not return them); the functions switch
the base model to eager attention for their calls and back afterwards. `examples/visualize_attention.py` is the program
that uses all of this on a real model.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel

from .model import ToastModel

__all__ = [
    "AttentionComparison",
    "ImageAttentionMaps",
    "attention_entropy",
    "attention_mass",
    "compare_attention",
    "eager_attention",
    "image_attention_maps",
    "last_block_attention",
    "object_mask",
    "plot_image_attention",
    "plot_text_attention",
]


@dataclass
class AttentionComparison:
    """The last block's attention of one query token per row, averaged over heads, and the token gates.

    Attributes:
        frozen: `(B, N)` attention of the query token to each token with the adapter disabled (each row sums to 1 over
            the tokens it may attend to).
        toast: `(B, N)` the same with the TOAST adapter.
        gates: `(B, N)` token-selection gates in [0, 1] (the cosine of each pass-1 token with the task prompt).
        query_index: `(B,)` the position of the query token in each row.
    """

    frozen: torch.Tensor
    toast: torch.Tensor
    gates: torch.Tensor
    query_index: torch.Tensor


@dataclass
class ImageAttentionMaps:
    """A ViT's CLS attention and token gates as patch grids.

    Attributes:
        frozen: `(B, rows, cols)` CLS attention of the frozen model over the patches, renormalised to sum to 1 (the
            attention to the CLS token itself and to other prefix tokens is left out).
        toast: `(B, rows, cols)` the same with the TOAST adapter.
        gates: `(B, rows, cols)` token-selection gates of the patches, in [0, 1].
    """

    frozen: torch.Tensor
    toast: torch.Tensor
    gates: torch.Tensor


def _toast_model(model: PeftModel) -> ToastModel:
    tuner = getattr(model, "base_model", None)
    if not isinstance(model, PeftModel) or not isinstance(tuner, ToastModel):
        raise ValueError(
            f"Expected a PeftModel with a TOAST adapter (from `get_peft_model(model, ToastConfig())` or "
            f"`PeftModel.from_pretrained`), got {type(model).__name__}."
        )
    return tuner


@contextlib.contextmanager
def eager_attention(model: PeftModel):
    """Run the base model with eager attention inside the block (the only implementation that returns attention
    weights); the previous implementation is restored afterwards."""
    base = model.get_base_model()
    previous = base.config._attn_implementation
    if previous == "eager":
        yield
        return
    base.set_attn_implementation("eager")
    try:
        yield
    finally:
        base.set_attn_implementation(previous)


@torch.no_grad()
def last_block_attention(model: PeftModel, inputs: dict, query_index: Union[int, torch.Tensor] = 0) -> torch.Tensor:
    """The last block's attention of the token at `query_index` (an int, or one position per row) to every token,
    averaged over heads, `(B, N)`, with the adapters as they are now (enabled, or disabled by `disable_adapter()`)."""
    with eager_attention(model):
        attentions = model(**inputs, output_attentions=True).attentions
    if not attentions:
        raise ValueError(
            f"{type(model.get_base_model()).__name__} returned no attention weights with `output_attentions=True`, so "
            f"its attention cannot be shown."
        )
    last = attentions[-1].float().mean(dim=1)  # (B, heads, N, N) -> (B, N, N)
    rows = torch.arange(last.shape[0], device=last.device)
    query = torch.as_tensor(query_index, device=last.device).expand(last.shape[0])  # (B,)
    return last[rows, query]  # (B, N)


def _query_positions(model: PeftModel, inputs: dict) -> torch.Tensor:
    """The token the head reads, per row: the last real token of a causal LM, the first token (CLS) otherwise."""
    tuner = _toast_model(model)
    main = next(inputs[name] for name in ("input_ids", "inputs_embeds", "pixel_values") if name in inputs)
    batch = main.shape[0]
    if not tuner.architecture.causal:
        return torch.zeros(batch, dtype=torch.long)
    mask = inputs.get("attention_mask")
    if mask is None:
        return torch.full((batch,), main.shape[1] - 1, dtype=torch.long)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # (B, N)
    return torch.where(mask.bool(), positions, -1).amax(dim=1).cpu()  # last unmasked position, left or right padding


def compare_attention(
    model: PeftModel, inputs: dict, query_index: Optional[Union[int, torch.Tensor]] = None
) -> AttentionComparison:
    """The last block's attention of the query token for the frozen and the TOAST model, and the token gates.

    Args:
        model: a `PeftModel` with an active TOAST adapter.
        inputs: the model's keyword inputs (`pixel_values`, or `input_ids` and `attention_mask`).
        query_index: the query token's position (an int, or `(B,)`); by default the token the head reads: the first
            (CLS) for encoders, the last real token for causal LMs.
    """
    tuner = _toast_model(model)
    query = _query_positions(model, inputs) if query_index is None else torch.as_tensor(query_index)
    with model.disable_adapter():
        frozen = last_block_attention(model, inputs, query)
    toast = last_block_attention(model, inputs, query)
    gates = tuner.toast_selection(**inputs).float()  # (B, N)
    query = query.expand(frozen.shape[0])
    return AttentionComparison(frozen=frozen.cpu(), toast=toast.cpu(), gates=gates.cpu(), query_index=query.cpu())


def image_attention_maps(model: PeftModel, pixel_values: torch.Tensor) -> ImageAttentionMaps:
    """CLS attention (frozen and TOAST) and token gates of a vision transformer as `(B, rows, cols)` patch grids.

    The tokens after the prefix (CLS, and any register or distillation tokens) are the patches in row-major order, as
    in ViT, DeiT and DINOv2.
    """
    patch = model.get_base_model().config.patch_size
    rows, cols = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
    comparison = compare_attention(model, {"pixel_values": pixel_values}, query_index=0)
    prefix = comparison.frozen.shape[1] - rows * cols
    if prefix < 0:
        raise ValueError(
            f"The model returned {comparison.frozen.shape[1]} tokens, fewer than the {rows} x {cols} patches of "
            f"{tuple(pixel_values.shape[-2:])} images with patch size {patch}."
        )

    def grid(values: torch.Tensor, normalise: bool) -> torch.Tensor:
        patches = values[:, prefix:]  # (B, rows * cols)
        if normalise:
            patches = patches / patches.sum(dim=1, keepdim=True)
        return patches.reshape(-1, rows, cols)

    return ImageAttentionMaps(
        frozen=grid(comparison.frozen, True), toast=grid(comparison.toast, True), gates=grid(comparison.gates, False)
    )


def attention_entropy(attention: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of attention distributions `(B, ...)` (each summing to 1 over the trailing dimensions), `(B,)`.
    0 when all attention is on one token, `log(n)` when it is spread evenly over `n`."""
    p = attention.flatten(1)
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim=1)


def object_mask(images: torch.Tensor, grid: tuple[int, int], threshold: float = 0.2) -> torch.Tensor:
    """The patches that show the object of images on a dark background (Fashion-MNIST, MNIST), `(B, rows, cols)` bool.

    Args:
        images: `(B, H, W)` greyscale images scaled to [0, 1], covering the same area as the model's input.
        grid: `(rows, cols)` of the patch grid.
        threshold: a patch belongs to the object when its mean pixel value is above this.
    """
    means = F.adaptive_avg_pool2d(images.float().unsqueeze(1), grid).squeeze(1)  # (B, rows, cols)
    return means > threshold


def attention_mass(attention: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The share of each attention map `(B, rows, cols)` that falls on the masked patches, `(B,)`."""
    return (attention * mask.to(attention.dtype)).flatten(1).sum(dim=1)


def plot_image_attention(
    images: Union[np.ndarray, torch.Tensor],
    maps: ImageAttentionMaps,
    path: Union[str, os.PathLike, BinaryIO],
    masks: Optional[torch.Tensor] = None,
    labels: Optional[Sequence[str]] = None,
) -> None:
    """Save a figure with one row per image: the image, the frozen model's CLS attention, TOAST's CLS attention and the
    token gates, each overlaid on the image. Titles give the attention entropy and, with `masks`, the mass on the
    object.

    Args:
        images: `(B, H, W)` greyscale or `(B, H, W, 3)` images in [0, 1].
        maps: from `image_attention_maps`, for the same B images.
        path: where to write the PNG (a file name or a binary file).
        masks: `(B, rows, cols)` object patches (`object_mask`), outlined in the figure.
        labels: a caption per row (e.g. the class name).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = np.asarray(images, dtype=np.float32)
    entropy = {name: attention_entropy(getattr(maps, name)) for name in ("frozen", "toast")}
    mass = (
        {name: attention_mass(getattr(maps, name), masks) for name in ("frozen", "toast")}
        if masks is not None
        else None
    )
    num_rows = images.shape[0]
    figure, axes = plt.subplots(num_rows, 4, figsize=(10, 2.6 * num_rows + 0.4), squeeze=False)
    for row in range(num_rows):
        height, width = images[row].shape[:2]
        extent = (0, width, height, 0)
        panels = [
            ("image" if labels is None else labels[row], None, None),
            ("frozen model", maps.frozen[row], "frozen"),
            ("TOAST", maps.toast[row], "toast"),
            ("token gates", maps.gates[row], None),
        ]
        for ax, (title, heatmap, name) in zip(axes[row], panels):
            ax.imshow(images[row], cmap="gray", extent=extent, vmin=0, vmax=1)
            if heatmap is not None:
                is_gate = name is None
                ax.imshow(
                    heatmap.numpy(),
                    cmap="viridis" if is_gate else "inferno",
                    alpha=0.65,
                    extent=extent,
                    interpolation="nearest",
                    vmin=0,
                    vmax=1 if is_gate else float(heatmap.max()),
                )
                if masks is not None:  # outline the object's patches along their edges
                    fine = np.kron(masks[row].float().numpy(), np.ones((16, 16)))  # each patch as 16 x 16 cells
                    xs = (np.arange(fine.shape[1]) + 0.5) * width / fine.shape[1]
                    ys = (np.arange(fine.shape[0]) + 0.5) * height / fine.shape[0]
                    ax.contour(xs, ys, fine, levels=[0.5], colors="cyan", linewidths=0.8)
            if name is not None:
                title += f"\nentropy {entropy[name][row]:.2f}"
                if mass is not None:
                    title += f", on object {mass[name][row]:.0%}"
            elif heatmap is not None:
                title += f"\nmean {float(heatmap.mean()):.2f}"
            ax.set_title(title, fontsize=9)
            ax.set_axis_off()
    figure.suptitle("Last block, CLS attention (mean over heads): frozen vs TOAST", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=110)
    plt.close(figure)


def plot_text_attention(
    tokens: Sequence[str], comparison: AttentionComparison, path: Union[str, os.PathLike, BinaryIO], row: int = 0
) -> None:
    """Save a figure of one text: each token's gate (top), the query token's attention to each token in the last block,
    frozen vs TOAST (middle; the title gives the entropy of both), and the change TOAST makes to it (bottom).

    Args:
        tokens: the tokens of row `row`, as strings (`tokenizer.convert_ids_to_tokens`); only the first
            `len(tokens)` positions are drawn, so leave out right padding.
        comparison: from `compare_attention`.
        path: where to write the PNG (a file name or a binary file).
        row: the row of `comparison` that `tokens` belong to.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(tokens)
    labels = [token.replace("Ġ", "_").replace("▁", "_") for token in tokens]  # BPE / SentencePiece word starts
    frozen, toast, gates = comparison.frozen[row, :n], comparison.toast[row, :n], comparison.gates[row, :n]
    change = (toast - frozen).numpy()
    x = np.arange(n)
    figure, (top, middle, bottom) = plt.subplots(3, 1, figsize=(max(6.0, 0.42 * n + 1.5), 7.0), sharex=True)
    top.bar(x, gates.numpy(), color="tab:green")
    top.set_ylim(0, 1)
    top.set_ylabel("token gate")
    top.set_title("Token selection: cosine of each pass-1 token with the task prompt, clipped to [0, 1]", fontsize=9)
    width = 0.4
    middle.bar(x - width / 2, frozen.numpy(), width, label="frozen model", color="tab:gray")
    middle.bar(x + width / 2, toast.numpy(), width, label="TOAST", color="tab:orange")
    middle.set_ylabel("attention")
    query = int(comparison.query_index[row])
    entropy = attention_entropy(torch.stack([frozen, toast]))
    middle.set_title(
        f"Last block: attention of token {query} ({labels[query] if query < n else '?'}), mean over heads\n"
        f"entropy {entropy[0]:.2f} nats (frozen) -> {entropy[1]:.2f} nats (TOAST)",
        fontsize=9,
    )
    middle.legend(fontsize=8)
    bottom.bar(x, change, color=np.where(change >= 0, "tab:orange", "tab:blue"))
    bottom.axhline(0, color="black", linewidth=0.6)
    bottom.set_ylabel("TOAST - frozen")
    bottom.set_title("Change of the attention to each token", fontsize=9)
    bottom.set_xticks(x, labels, rotation=60, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=110)
    plt.close(figure)
