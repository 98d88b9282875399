"""The pass-1 feature cache: multi-epoch TOAST training at the cost of one forward and backward pass per step.

Pass 1 runs the frozen backbone with no top-down input, so for a given example its output — the feature that token
selection consumes — is the same in every epoch, as long as nothing random happens in pass 1 (no random augmentation,
no dropout) and the backbone stays frozen. [`precompute_features`] computes it once per example with the model's own
pass 1 (`ToastModel.run_pass1`) and stores it next to the inputs in a `datasets.Dataset` (Arrow on disk, memory-mapped);
a TOAST forward call that receives it as `toast_features=` skips pass 1. [`ToastFeatureCollator`] turns such a dataset
into batches for `transformers.Trainer` or an Accelerate loop:

    ```py
    >>> from peft_toast.feature_cache import ToastFeatureCollator, precompute_features
    >>> cached = precompute_features(model, train_dataset, cache_dir="feature-cache")  # doctest: +SKIP
    >>> trainer = Trainer(model, TrainingArguments("out", remove_unused_columns=False), train_dataset=cached,
    ...                   data_collator=ToastFeatureCollator(model))  # doctest: +SKIP
    ```

A stale cache must never silently train the wrong thing, so every row carries two checks:

- `toast_feature_key`: a fingerprint of everything pass 1 depends on besides the data — the backbone's weights and
  buffers (hashed in full), its configuration, the feature source (which module, encoder or decoder) — plus the storage
  dtype and the input columns. The collator refuses rows made by another base model.
- `toast_input_hash`: a hash of the row's model inputs exactly as they were fed to pass 1. The collator hashes the
  inputs it is about to hand the model and refuses any row whose inputs changed since: a changed dataset or
  preprocessing, a transform (`set_transform`/`with_transform`) or an augmenting data collator.

The model itself refuses a cached feature in training mode when pass 1 would be random (dropout or stochastic depth in
the backbone), on a decoder call that uses a KV cache (generation), and when its shape does not match the inputs.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from torch import nn
from transformers import default_data_collator

from .model import ToastModel
from .passes import FEATURES_ARGUMENT, HIDDEN_ARGUMENT, HIDDEN_BLOCK_ARGUMENT, lowest_steered_block
from .state import CallState

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = [
    "FEATURES_COLUMN",
    "INPUT_HASH_COLUMN",
    "KEY_COLUMN",
    "ToastFeatureCollator",
    "feature_cache_key",
    "precompute_features",
]

FEATURES_COLUMN = FEATURES_ARGUMENT  # the column is handed to the model under its own name
KEY_COLUMN = "toast_feature_key"
INPUT_HASH_COLUMN = "toast_input_hash"
CACHE_COLUMNS = (FEATURES_COLUMN, KEY_COLUMN, INPUT_HASH_COLUMN)
# Optional: the pass-1 hidden state entering the lowest steered block, and that block's index (see `precompute_features`).
HIDDEN_COLUMN = HIDDEN_ARGUMENT
HIDDEN_BLOCK_COLUMN = HIDDEN_BLOCK_ARGUMENT
HIDDEN_COLUMNS = (HIDDEN_COLUMN, HIDDEN_BLOCK_COLUMN)
LABEL_COLUMNS = ("label", "label_ids", "labels")
# Bump when what a cache row means changes, so that older caches are refused.
_FORMAT = "peft_toast.feature_cache/1"
# Arrow has no bfloat16: bfloat16 features are stored as their int16 bit pattern and viewed back in the collator.
_STORAGE = {
    "float32": (torch.float32, "float32"),
    "float16": (torch.float16, "float16"),
    "bfloat16": (torch.bfloat16, "int16"),
}
_FIXED_SHAPE = (
    "The feature cache needs model inputs of one fixed shape (images of one size, text padded to one length with "
    "`padding='max_length'`): the cached features of a batch are stacked, not padded."
)
# Configuration entries that do not change pass 1 in eval mode: the head, runtime switches, the checkpoint's origin.
# Dropout probabilities matter only in training mode, where the model refuses cached features if any is non-zero.
_CONFIG_KEYS_IGNORED = {
    "_name_or_path",
    "architectures",
    "id2label",
    "label2id",
    "num_labels",
    "problem_type",
    "finetuning_task",
    "transformers_version",
    "use_cache",
    "return_dict",
    "output_attentions",
    "output_hidden_states",
    "dtype",
    "torch_dtype",
}


# ------------------------------------------------------------------------------------------------------------ the key


def feature_cache_key(model: nn.Module, dtype: str = "float32", input_columns: Sequence[str] = ()) -> str:
    """The fingerprint that every cached row carries: `format|base model|storage dtype|input columns`.

    The base-model part hashes, in full, every weight and buffer of the backbone (adapter tensors excluded), its class,
    its configuration (minus the entries listed in `_CONFIG_KEYS_IGNORED`) and where the feature is taken (the feature
    module, encoder or decoder). Hashing every byte costs one read of the backbone's weights (0.4 s for DINOv2-S's
    100 MB on a busy 2-core CPU) and, unlike sampling a few tensors, also catches a base model whose weights changed
    only in part (a merged adapter, a fine-tuned layer).
    """
    _check_storage_dtype(dtype)
    tuner = _toast_tuner(model)
    return "|".join((_FORMAT, _base_model_hash(tuner), dtype, ",".join(input_columns)))


def _base_model_hash(tuner: ToastModel) -> str:
    architecture = tuner.architecture
    backbone = architecture.backbone
    trainable = [name for name, param in _backbone_tensors(backbone, parameters_only=True) if param.requires_grad]
    if trainable:
        raise ValueError(
            f"The backbone has trainable weights ({', '.join(trainable[:3])}): pass 1 changes as they train, so its "
            f"features cannot be cached. Freeze them (only the TOAST adapter and the task head may train) or train "
            f"without the feature cache."
        )
    module_names = {module: name for name, module in backbone.named_modules()}
    config = getattr(tuner.model, "config", None)
    config = config.to_dict() if config is not None else {}
    description = {
        "backbone": f"{type(backbone).__module__}.{type(backbone).__qualname__}",
        "feature_module": module_names[architecture.feature_module],
        "causal": architecture.causal,
        "config": {
            key: value for key, value in config.items() if key not in _CONFIG_KEYS_IGNORED and "drop" not in key
        },
    }
    digest = hashlib.blake2b(json.dumps(description, sort_keys=True, default=str).encode(), digest_size=16)
    for name, tensor in _backbone_tensors(backbone):
        if tensor.is_meta:
            raise ValueError(
                f"The backbone weight `{name}` is on the meta device; load the base model's weights first."
            )
        _update_with_tensor(digest, name, tensor.detach())
    return digest.hexdigest()


def _backbone_tensors(backbone: nn.Module, parameters_only: bool = False):
    """`(name, tensor)` of the backbone's own weights (and buffers), adapter tensors excluded; names do not depend on
    which value projections PEFT wrapped (`v_proj.base_layer.weight` is named `v_proj.weight`)."""
    named = (
        [backbone.named_parameters()] if parameters_only else [backbone.named_parameters(), backbone.named_buffers()]
    )
    for items in named:
        for name, tensor in items:
            parts = name.split(".")
            if any(part.startswith(ToastModel.prefix) for part in parts):
                continue
            yield ".".join(part for part in parts if part != "base_layer"), tensor


def _update_with_tensor(digest, name: str, tensor: torch.Tensor) -> None:
    digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
    data = tensor.to("cpu").contiguous().reshape(-1)
    digest.update(data.view(torch.uint8).numpy() if data.numel() else b"")


def _input_hash(batch: dict, index: int, input_columns: Sequence[str]) -> str:
    """Hash of row `index` of the collated inputs, in a canonical form (float32 floats, int64 integers), so that the
    same data hashes the same whether it was read as lists, numpy arrays or tensors."""
    digest = hashlib.blake2b(digest_size=16)
    for name in input_columns:
        row = batch[name][index]
        if row.is_floating_point():
            row = row.float()
        elif row.dtype != torch.bool:
            row = row.long()
        _update_with_tensor(digest, name, row)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------------- precompute


def precompute_features(
    model: nn.Module,
    dataset: Dataset,
    *,
    input_columns: Optional[Sequence[str]] = None,
    batch_size: int = 32,
    dtype: str = "float32",
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    data_collator: Optional[Callable[[list[dict]], dict]] = None,
    store_hidden: Optional[bool] = None,
    verbose: bool = True,
) -> Dataset:
    """
    Compute the TOAST pass-1 feature of every example of `dataset` once and store it with the dataset.

    Returns `dataset` with three more columns — `toast_features` (`(N, d)` per example), `toast_feature_key` and
    `toast_input_hash` (see the module docstring) — in torch format, memory-mapped from an Arrow file in `cache_dir`.
    The file is named after the base model, the dataset's fingerprint, the input columns and `dtype`: calling this again
    with the same arguments loads it instead of recomputing, and any change computes a new one. Like every `Dataset.map`
    result, the file holds the dataset's own columns too. Its size is printed before the computation starts (features:
    `rows × N × d × bytes per value`), and the computation is refused if the disk lacks room.

    Train on the result with [`ToastFeatureCollator`] (Trainer: `TrainingArguments(remove_unused_columns=False)`).

    Args:
        model (`PeftModel` or `ToastModel`):
            The model with its TOAST adapter. Pass 1 does not depend on the adapter, but the key does depend on the
            backbone, which must be frozen.
        dataset (`datasets.Dataset`):
            Preprocessed examples of a fixed shape (images, or text padded to a fixed length): the features of a batch
            are stacked, not padded. Preprocess with `dataset.map` (stored and fingerprinted), not with a transform
            (`set_transform`/`with_transform`), which is refused: it may be random, and its output is not fingerprinted.
        input_columns (`list[str]`, *optional*):
            The columns pass 1 reads. Defaults to the dataset's columns that the model's `forward` accepts, labels
            excluded (e.g. `["pixel_values"]` or `["input_ids", "attention_mask"]`).
        batch_size (`int`, *optional*, defaults to 32):
            Batch size of the precomputation.
        dtype (`str`, *optional*, defaults to `"float32"`):
            Storage precision: `"float32"` (cached training equals uncached training exactly), `"float16"` or
            `"bfloat16"` (half the disk; the features are rounded, see `docs/feature_cache.md` for the tolerance).
        cache_dir (`str`, *optional*):
            Folder of the Arrow file. Defaults to the folder of the dataset's own cache files, or to
            `<HF_DATASETS_CACHE>/peft_toast_features` for an in-memory dataset.
        data_collator (`Callable`, *optional*):
            How rows become model inputs; `transformers.default_data_collator` by default. Use the same one in
            [`ToastFeatureCollator`].
        store_hidden (`bool`, *optional*):
            Also store the pass-1 hidden state entering the adapter's lowest steered block (`toast_hidden`, `(N, d)`,
            and `toast_hidden_block`), so that a cached training step starts pass 2 there and runs only the steered
            blocks (`ToastConfig.share_lower_blocks`). `None` (default): store it when the active adapter steers only
            upper blocks and shares the others. It doubles the size of the cache.
        verbose (`bool`, *optional*, defaults to `True`):
            Print the size estimate (the progress bar is `datasets`').
    """
    import datasets

    _check_storage_dtype(dtype)
    if dataset.format["type"] == "custom":
        raise ValueError(
            "This dataset has a transform (`set_transform`/`with_transform`), which is applied on the fly, may be random "
            "(augmentation) and is not part of the dataset's fingerprint, so its features cannot be cached. Apply "
            "deterministic preprocessing with `dataset.map(...)` instead, and drop random augmentation."
        )
    if len(dataset) == 0:
        raise ValueError("The dataset is empty; there is nothing to precompute.")
    tuner = _toast_tuner(model)
    hf_model = tuner.model
    dataset = dataset.remove_columns(
        [name for name in (*CACHE_COLUMNS, *HIDDEN_COLUMNS) if name in dataset.column_names]
    )
    input_columns = list(input_columns) if input_columns is not None else _default_input_columns(hf_model, dataset)
    missing = [name for name in input_columns if name not in dataset.column_names]
    if missing or not input_columns:
        raise ValueError(
            f"`input_columns` must name columns of the dataset that the model reads, got {input_columns} (the dataset "
            f"has {dataset.column_names}). Preprocess the dataset into model inputs (e.g. `pixel_values`, `input_ids`) "
            f"first, or pass `input_columns`."
        )
    key = feature_cache_key(model, dtype, input_columns)
    collate = data_collator or default_data_collator
    torch_dtype, arrow_dtype = _STORAGE[dtype]
    extra_kwargs = {"use_cache": False} if tuner.architecture.causal else {}
    device = next(hf_model.parameters()).device
    hidden_block = _hidden_block(tuner, store_hidden)

    feature_shapes = []  # (N, d) of the first example: every example must have it, as the Arrow column is fixed-shape

    def compute(batch: dict) -> dict:
        num_rows = len(batch[input_columns[0]])
        try:
            inputs = collate([{name: batch[name][i] for name in input_columns} for i in range(num_rows)])
        except (RuntimeError, ValueError) as error:
            raise ValueError(f"{_FIXED_SHAPE} Collating a batch failed: {error}") from error
        hashes = [_input_hash(inputs, i, input_columns) for i in range(num_rows)]
        model_inputs = {
            name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in inputs.items()
        }
        shared = CallState(owner=tuner, shared_blocks=hidden_block or 0)
        features = tuner.run_pass1(hf_model, (), {**model_inputs, **extra_kwargs}, state=shared)  # (B, N, d)
        feature_shapes.append(tuple(features.shape[1:]))
        if feature_shapes[-1] != feature_shapes[0]:
            raise ValueError(f"{_FIXED_SHAPE} Features of shape {feature_shapes[0]} and {feature_shapes[-1]} occur.")
        row = {
            FEATURES_COLUMN: _stored(features, torch_dtype),
            KEY_COLUMN: [key] * num_rows,
            INPUT_HASH_COLUMN: hashes,
        }
        if hidden_block:
            hidden = shared.shared_output[0] if isinstance(shared.shared_output, tuple) else shared.shared_output
            row[HIDDEN_COLUMN] = _stored(hidden, torch_dtype)
            row[HIDDEN_BLOCK_COLUMN] = [hidden_block] * num_rows
        return row

    if cache_dir is None:
        if dataset.cache_files:
            cache_dir = os.path.dirname(dataset.cache_files[0]["filename"])
        else:
            cache_dir = os.path.join(datasets.config.HF_DATASETS_CACHE, "peft_toast_features")
    os.makedirs(cache_dir, exist_ok=True)
    file_key = hashlib.blake2b(f"{key}|{dataset._fingerprint}|{hidden_block}".encode(), digest_size=16).hexdigest()
    cache_file = os.path.join(cache_dir, f"toast-features-{file_key}.arrow")

    modes = {module: module.training for module in hf_model.modules()}
    hf_model.eval()  # pass 1 as the model computes it when nothing random is active (training refuses otherwise)
    try:
        formatted = dataset.with_format("torch", columns=input_columns, output_all_columns=True)
        probe = compute(formatted[:1])[FEATURES_COLUMN]  # (1, N, d)
        num_tokens, dim = probe.shape[1:]
        if not os.path.exists(cache_file):
            size = len(dataset) * num_tokens * dim * torch_dtype.itemsize * (2 if hidden_block else 1)
            # The Arrow file also holds the dataset's own columns (the inputs), as every `Dataset.map` result does.
            own_columns = dataset.data.nbytes * len(dataset) / max(dataset.data.num_rows, 1)
            free = shutil.disk_usage(cache_dir).free
            if verbose:
                print(
                    f"TOAST feature cache: {len(dataset):,} examples x {num_tokens} tokens x {dim} channels x "
                    f"{torch_dtype.itemsize} B ({dtype}){' x 2 (with the hidden state)' if hidden_block else ''} = "
                    f"{_human(size)} of features, plus {_human(own_columns)} for "
                    f"the dataset's own columns, in {cache_file} ({_human(free)} free)"
                )
            if size + own_columns > free:
                raise OSError(
                    f"The feature cache needs {_human(size + own_columns)} but {cache_dir} has {_human(free)} free. "
                    f"Pass another `cache_dir`, store `dtype='bfloat16'` (half the features' size) or cache a subset of "
                    f"the dataset."
                )
        features = datasets.Features(
            {
                **dataset.features,
                FEATURES_COLUMN: datasets.Array2D((num_tokens, dim), arrow_dtype),
                KEY_COLUMN: datasets.Value("string"),
                INPUT_HASH_COLUMN: datasets.Value("string"),
                **(
                    {
                        HIDDEN_COLUMN: datasets.Array2D((num_tokens, dim), arrow_dtype),
                        HIDDEN_BLOCK_COLUMN: datasets.Value("int32"),
                    }
                    if hidden_block
                    else {}
                ),
            }
        )
        cached = formatted.map(
            compute,
            batched=True,
            batch_size=batch_size,
            features=features,
            cache_file_name=cache_file,
            load_from_cache_file=True,
            new_fingerprint=file_key,
            desc="TOAST pass-1 features",
        )
    finally:
        for module, training in modes.items():
            module.training = training
    labels = [name for name in LABEL_COLUMNS if name in cached.column_names]
    hidden_columns = list(HIDDEN_COLUMNS) if hidden_block else []
    return cached.with_format(
        "torch", columns=[*input_columns, *labels, *CACHE_COLUMNS, *hidden_columns], output_all_columns=True
    )


# --------------------------------------------------------------------------------------------------------- training


class ToastFeatureCollator:
    """
    Data collator for a dataset made by [`precompute_features`]: collates the model inputs with `data_collator`, checks
    every row against the model and its inputs, and adds the cached features as `toast_features` `(B, N, d)`, so that
    the model skips pass 1.

    Refuses (with a `ValueError` that says what to do) rows cached with another base model, rows whose inputs differ
    from those the features were computed from (changed data, a transform, augmentation), and datasets that lack the
    cache columns (Trainer drops columns the model's `forward` does not name unless `remove_unused_columns=False`; this
    collator drops them instead, keeping what the model accepts and the labels).

    Works with `transformers.Trainer` (`data_collator=`) and any `torch.utils.data.DataLoader` (`collate_fn=`), e.g.
    in an Accelerate loop.

    Args:
        model (`PeftModel` or `ToastModel`):
            The model that will train on the batches; its backbone must be the one the features were computed with.
        data_collator (`Callable`, *optional*):
            How rows become model inputs (stacking, fixed-length padding); `transformers.default_data_collator` by
            default. It must be deterministic.
    """

    def __init__(self, model: nn.Module, data_collator: Optional[Callable[[list[dict]], dict]] = None):
        tuner = _toast_tuner(model)
        self.base_model_hash = _base_model_hash(tuner)
        self.data_collator = data_collator or default_data_collator
        self.model_arguments = set(inspect.signature(tuner.model.forward).parameters) | set(LABEL_COLUMNS)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        missing = [name for name in CACHE_COLUMNS if name not in rows[0]]
        if missing:
            raise ValueError(
                f"The batch lacks the feature-cache columns {missing}. Train on the dataset returned by "
                f"`precompute_features`; with `transformers.Trainer`, set `TrainingArguments(remove_unused_columns="
                f"False)`, since Trainer otherwise drops the columns that the model's `forward` does not name."
            )
        keys = {row[KEY_COLUMN] for row in rows}
        if len(keys) != 1:
            raise ValueError(
                "This batch mixes rows cached with different settings (base model, dtype or input columns); "
                "precompute the whole dataset with one model and one `dtype`."
            )
        key_format, base_model_hash, dtype, columns = keys.pop().split("|")
        if key_format != _FORMAT or base_model_hash != self.base_model_hash:
            raise ValueError(
                "These features were cached with a different base model (weights, configuration or feature source) "
                "or an older peft_toast, so they are not what pass 1 of this model computes. Recompute them with "
                "`precompute_features(model, dataset)` for this model."
            )
        input_columns = columns.split(",")
        features = _loaded([row[FEATURES_COLUMN] for row in rows], dtype)  # (B, N, d)
        inputs = [
            {name: value for name, value in row.items() if name in self.model_arguments and name not in CACHE_COLUMNS}
            for row in rows
        ]
        batch = self.data_collator(inputs)
        for index, row in enumerate(rows):
            if _input_hash(batch, index, input_columns) != row[INPUT_HASH_COLUMN]:
                raise ValueError(
                    f"The inputs ({', '.join(input_columns)}) of row {index} of this batch differ from those its cached "
                    f"features were computed from: the dataset or its preprocessing changed after caching, or a "
                    f"transform or augmenting collator alters the inputs. Cached features are only valid for "
                    f"deterministic inputs; recompute them with `precompute_features`, or train without the cache "
                    f"when using random augmentation."
                )
        batch[FEATURES_ARGUMENT] = features
        if HIDDEN_COLUMN in rows[0]:
            blocks = {int(row[HIDDEN_BLOCK_COLUMN]) for row in rows}
            if len(blocks) != 1:
                raise ValueError("This batch mixes rows cached for different steered blocks; precompute them at once.")
            batch[HIDDEN_ARGUMENT] = _loaded([row[HIDDEN_COLUMN] for row in rows], dtype)  # (B, N, d)
            batch[HIDDEN_BLOCK_ARGUMENT] = blocks.pop()
        return batch


# ---------------------------------------------------------------------------------------------------------- helpers


def _hidden_block(tuner: ToastModel, store_hidden: Optional[bool]) -> Optional[int]:
    """The block whose pass-1 input the cache stores (the active adapter's lowest steered block), or None."""
    adapter_name = tuner.active_toast_adapter()
    if store_hidden is False or adapter_name is None:
        if store_hidden:
            raise ValueError("`store_hidden=True` needs an active TOAST adapter (not inside `disable_adapter()`).")
        return None
    block = lowest_steered_block(tuner, adapter_name)
    if block == 0 or not tuner.peft_config[adapter_name].share_lower_blocks:
        if store_hidden:
            raise ValueError(
                "`store_hidden=True`, but the active adapter steers block 0 (or has `share_lower_blocks=False`), so "
                "pass 2 starts at the bottom and there is no hidden state to store. Steer only upper blocks "
                "(`layers_to_transform`) or leave `store_hidden` unset."
            )
        return None
    return block


def _stored(tensor: torch.Tensor, torch_dtype: torch.dtype):
    """A `(B, N, d)` tensor as the numpy array an Arrow column of the storage dtype holds."""
    stored = tensor.to(torch_dtype).cpu()
    return (stored.view(torch.int16) if torch_dtype == torch.bfloat16 else stored).numpy()


def _loaded(values: list, dtype: str) -> torch.Tensor:
    """Stack the stored rows of one column back into a tensor of the storage dtype."""
    stacked = torch.stack([torch.as_tensor(value) for value in values])
    torch_dtype, _ = _STORAGE[dtype]
    return stacked.to(torch.int16).view(torch_dtype) if dtype == "bfloat16" else stacked.to(torch_dtype)


def _toast_tuner(model: nn.Module) -> ToastModel:
    tuner = model if isinstance(model, ToastModel) else getattr(model, "base_model", None)
    if not isinstance(tuner, ToastModel):
        raise TypeError(
            f"The feature cache needs a model with a TOAST adapter (`get_peft_model(model, ToastConfig())`), got "
            f"{type(model).__name__}."
        )
    if tuner.architecture.root is not tuner.model:
        raise ValueError(
            f"The feature cache does not support encoder-decoder models ({type(tuner.model).__name__}): their forward "
            f"call cannot take `toast_features`, and TOAST steers their encoder, which the model calls inside. Train "
            f"without the cache, or cache the encoder alone (`get_peft_model(encoder, ToastConfig())`)."
        )
    return tuner


def _default_input_columns(hf_model: nn.Module, dataset: Dataset) -> list[str]:
    accepted = inspect.signature(hf_model.forward).parameters
    return [name for name in dataset.column_names if name in accepted and name not in LABEL_COLUMNS]


def _check_storage_dtype(dtype: str) -> None:
    if dtype not in _STORAGE:
        raise ValueError(f"`dtype` must be one of {', '.join(map(repr, _STORAGE))}, got {dtype!r}.")


def _human(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000:
            return f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    return f"{num_bytes:.1f} TB"
