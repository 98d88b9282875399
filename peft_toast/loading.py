"""Loading a TOAST adapter safely: the folder, the config and the tensors are checked against the base model *before*
PEFT touches the model.

`PeftModel.from_pretrained` trusts what it reads. Without `import peft_toast` it fails with a bare `KeyError: 'TOAST'`;
a truncated weights file surfaces as a deserialisation error; an adapter made for a model with more blocks loads with a
warning about missing keys, and one made for a model with other attention heads loads silently. `load_toast_adapter`
checks each of these first and says what is wrong and what to do::

    from peft_toast import load_toast_adapter

    model = load_toast_adapter(base_model, "path/to/adapter")  # or a Hub repository id

Adapter weights are read from safetensors, or from a legacy `adapter_model.bin` with `torch.load(weights_only=True)`,
which refuses to run code hidden in a pickle. No string from `adapter_config.json` is evaluated or imported.

`load_initialisation(new_base_model, folder)` starts a new task from a calibrated (`peft_toast.calibration`) or
pre-tuned (`peft_toast.pretuning`) adapter folder: its feedback maps are matched block by block, so the folder may come
from another model class of the same backbone; the new task gets a new head and, optionally, a fresh prompt or
readouts.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
from peft import PeftModel, get_peft_model
from peft.utils import PeftType, get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors import SafetensorError, safe_open
from torch import nn

from .architectures import dims_mismatch, model_dims, resolve_architecture
from .config import TOAST_PEFT_TYPE, ToastConfig
from .layer import CHANNEL_PREFIX, PROMPT_KEY, ToastLayer, upgrade_selection_keys
from .registration import register
from .topdown import FeedbackMap


def load_toast_adapter(
    model: nn.Module,
    model_id: Union[str, os.PathLike],
    adapter_name: str = "default",
    is_trainable: bool = False,
    *,
    subfolder: Optional[str] = None,
    revision: Optional[str] = None,
    token: Optional[str] = None,
    cache_dir: Optional[str] = None,
    **kwargs,
) -> PeftModel:
    """`PeftModel.from_pretrained(model, model_id, ...)` for TOAST adapters, with every check of `check_adapter` first.

    Args:
        model: the base model (not a `PeftModel`), with its weights loaded.
        model_id: a local adapter directory or a Hub repository id.
        adapter_name, is_trainable, **kwargs: as in `PeftModel.from_pretrained`.
        subfolder, revision, token, cache_dir: where to find the adapter on the Hub (or in a subfolder).

    Raises:
        FileNotFoundError: no adapter at `model_id` (missing directory, config or weights).
        ValueError: the adapter is not TOAST, is damaged, or does not fit `model`; the message says what to do.
    """
    register()  # idempotent; restores the registration if something removed TOAST from PEFT's mappings
    folder = resolve_adapter_dir(model_id, subfolder=subfolder, revision=revision, token=token, cache_dir=cache_dir)
    config = check_adapter(folder, model)
    return PeftModel.from_pretrained(
        model, str(folder), adapter_name=adapter_name, is_trainable=is_trainable, config=config, **kwargs
    )


def resolve_adapter_dir(
    model_id: Union[str, os.PathLike],
    *,
    subfolder: Optional[str] = None,
    revision: Optional[str] = None,
    token: Optional[str] = None,
    cache_dir: Optional[str] = None,
) -> Path:
    """The local directory of an adapter: `model_id` itself, or a download of its adapter files from the Hub."""
    path = Path(model_id)
    if path.is_file():
        raise ValueError(
            f"{str(model_id)!r} is a file; pass the directory that holds {CONFIG_NAME} and {SAFETENSORS_WEIGHTS_NAME}."
        )
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        prefix = f"{subfolder}/" if subfolder else ""
        try:
            path = Path(
                snapshot_download(
                    str(model_id),
                    revision=revision,
                    token=token,
                    cache_dir=cache_dir,
                    allow_patterns=[prefix + name for name in (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)],
                )
            )
        except Exception as error:  # invalid id, offline, missing repository: all mean "no adapter here"
            raise FileNotFoundError(
                f"There is no adapter directory at {str(model_id)!r}, and it could not be fetched from the Hugging Face "
                f"Hub ({type(error).__name__}: {error}). Pass the directory that holds {CONFIG_NAME}, or a Hub "
                f"repository id (online, or already in the local cache)."
            ) from error
    folder = path / subfolder if subfolder else path
    if not folder.is_dir():
        raise FileNotFoundError(f"The adapter directory {str(folder)!r} does not exist; check `subfolder`.")
    return folder


def check_adapter(folder: Union[str, os.PathLike], model: Optional[nn.Module] = None) -> ToastConfig:
    """Check a local TOAST adapter directory, and that it fits `model` when given; return its validated config.

    Checks, in order: `adapter_config.json` exists, is JSON and says `"peft_type": "TOAST"`; every setting is valid
    (`ToastConfig`); a weights file exists, is complete and readable without executing code, and holds only finite
    numbers; and, with `model`: the model's weights are loaded (not on the meta device), it has the dimensions the
    adapter was made for, and the saved tensors have exactly the names and shapes that the adapter needs on it.
    """
    folder = Path(folder)
    config = read_adapter_config(folder)
    shapes = upgrade_selection_keys(read_adapter_weights(folder))
    if model is not None:
        _check_fits(config, shapes, model, folder)
    return config


def read_adapter_config(folder: Path) -> ToastConfig:
    """Read and validate `folder/adapter_config.json` as a TOAST config."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} has no {CONFIG_NAME}: it is not an adapter directory, or a save into it was interrupted. "
            f"Pass the directory that `save_pretrained` wrote, or save the adapter again."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{str(path)!r} is not valid JSON ({error}); the file is damaged or was only partly written. Save the "
            f"adapter again or download it again."
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object of settings, got {type(data).__name__}.")
    peft_type = data.get("peft_type")
    if peft_type is None:
        raise ValueError(
            f"{str(path)!r} has no `peft_type`, so it is not a PEFT adapter config. A TOAST adapter's config says "
            f'"peft_type": "{TOAST_PEFT_TYPE.value}"; save the adapter again with `save_pretrained`.'
        )
    if peft_type != TOAST_PEFT_TYPE.value:
        if isinstance(peft_type, str) and peft_type in PeftType.__members__:
            raise ValueError(
                f"{str(path)!r} is a {peft_type} adapter, not a TOAST adapter. Load it with "
                f"`PeftModel.from_pretrained(base_model, path)`."
            )
        raise ValueError(
            f"{str(path)!r} has the unknown `peft_type` {peft_type!r}. A TOAST adapter's config says "
            f'"peft_type": "{TOAST_PEFT_TYPE.value}"; an adapter of another PEFT method needs that method\'s package '
            f"imported and `PeftModel.from_pretrained`."
        )
    # Validation (ValueError naming the field) happens in ToastConfig; unknown fields are dropped with PEFT's warning.
    return ToastConfig.from_pretrained(str(folder))


def read_adapter_weights(folder: Path) -> dict[str, tuple[int, ...]]:
    """Check the adapter weights in `folder` without executing anything; return `{key: shape}`."""
    safetensors_path, pickle_path = folder / SAFETENSORS_WEIGHTS_NAME, folder / WEIGHTS_NAME
    if safetensors_path.is_file():
        # safetensors' own parser refuses a file cut short anywhere, padded at the end, or whose header does not
        # describe its bytes exactly (overlapping or inconsistent offsets) before any tensor is read.
        try:
            with safe_open(str(safetensors_path), framework="pt") as file:
                state_dict = {key: file.get_tensor(key) for key in file.keys()}
        except SafetensorError as error:
            raise ValueError(
                f"{str(safetensors_path)!r} is damaged or incomplete: its header is not readable or does not describe "
                f"its bytes ({error}). Save or download the adapter again; a file cut short like this one is what an "
                f"interrupted write leaves."
            ) from None
        _check_finite(state_dict, safetensors_path)
        return {key: tuple(tensor.shape) for key, tensor in state_dict.items()}
    if pickle_path.is_file():
        try:
            state_dict = torch.load(pickle_path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise ValueError(
                f"{str(pickle_path)!r} holds more than tensors, and `torch.load(weights_only=True)` refused to unpickle "
                f"it ({str(error).splitlines()[0]}). It may run code when loaded; do not load it with "
                f"`weights_only=False`. Ask its author for an {SAFETENSORS_WEIGHTS_NAME} version."
            ) from None
        except (RuntimeError, EOFError, OSError) as error:
            raise ValueError(
                f"{str(pickle_path)!r} is damaged or incomplete ({error}); save or download the adapter again."
            ) from None
        if not isinstance(state_dict, dict) or not all(isinstance(t, torch.Tensor) for t in state_dict.values()):
            raise ValueError(f"{str(pickle_path)!r} must hold a dict of tensors; save the adapter again.")
        _check_finite(state_dict, pickle_path)
        return {key: tuple(tensor.shape) for key, tensor in state_dict.items()}
    raise FileNotFoundError(
        f"{str(folder)!r} has an adapter config but no weights ({SAFETENSORS_WEIGHTS_NAME} or {WEIGHTS_NAME}): the save "
        f"was interrupted or the download is incomplete. Save or download the adapter again."
    )


def _check_finite(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    bad = [
        key for key, tensor in state_dict.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]
    if bad:
        raise ValueError(
            f"{str(path)!r} holds NaN or infinite values in {len(bad)} tensor(s) ({', '.join(bad[:3])}): the adapter "
            f"was saved from a diverged training run or the file is corrupt. Use an earlier checkpoint, or retrain "
            f"with a lower learning rate."
        )


def _check_fits(config: ToastConfig, shapes: dict[str, tuple[int, ...]], model: nn.Module, folder: Path) -> None:
    """Raise unless the adapter (config + saved shapes) fits `model`."""
    if isinstance(model, PeftModel):
        raise ValueError(
            "Pass the base model, not a PeftModel: `load_toast_adapter(base_model, path)`. To add a second adapter to a "
            "PeftModel, use `peft_model.load_adapter(path, adapter_name=...)`."
        )
    if getattr(model, "hf_device_map", None) is None and any(p.is_meta for p in model.parameters()):
        raise ValueError(
            "The base model's weights are on the meta device (it was created under `torch.device('meta')` or "
            "`init_empty_weights`), so the adapter would be loaded into tensors without data. Load the base model's "
            "weights first (e.g. `AutoModel.from_pretrained(...)`), then the adapter."
        )
    made_for = config.base_model_name_or_path or "the model named by `base_model_name_or_path` in adapter_config.json"
    if config.base_model_dims:
        mismatch = dims_mismatch(
            config.base_model_dims, model_dims(model, resolve_architecture(model, config.target_modules))
        )
        if mismatch:
            raise ValueError(
                f"The adapter in {str(folder)!r} was made for a different base model: {'; '.join(mismatch)}. Load it "
                f"onto the model it was made for ({made_for})."
            )
    expected = _expected_shapes(model, config)
    problems = []
    prompt = PROMPT_KEY
    if prompt in shapes and prompt in expected and shapes[prompt] != expected[prompt]:
        # Every other tensor differs as a consequence; name the cause once.
        problems.append(f"hidden size {shapes[prompt][0]} in the adapter vs {expected[prompt][0]} in the base model")
    else:
        for key in sorted(set(expected) & set(shapes)):
            if expected[key] != shapes[key]:
                problems.append(
                    f"`{key}` has shape {shapes[key]} in the adapter but {expected[key]} on the base model"
                )
                if (
                    "toast_" not in key
                    and shapes[key][:1] != expected[key][:1]
                    and hasattr(getattr(model, "config", None), "num_labels")
                ):
                    problems[-1] += (
                        f" (the task head was trained for {shapes[key][0]} labels: create the base model with "
                        f"`num_labels={shapes[key][0]}`)"
                    )
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing:
        problems.append(
            f"{len(missing)} tensor(s) the base model needs are missing from the adapter ({', '.join(missing[:3])})"
        )
    if unexpected:
        problems.append(
            f"{len(unexpected)} tensor(s) in the adapter have no place on the base model ({', '.join(unexpected[:3])})"
        )
    if problems:
        raise ValueError(
            f"The adapter in {str(folder)!r} does not fit this base model: {'; '.join(problems)}. It was made for a model "
            f"with another hidden size, number of blocks or head, or with other TOAST settings; load it onto the model "
            f"it was made for ({made_for})."
        )


def _expected_shapes(model: nn.Module, config: ToastConfig) -> dict[str, tuple[int, ...]]:
    """`{key: shape}` of the adapter that `config` creates on `model`, as `save_pretrained` would name it.

    Built on a copy of `model` whose tensors live on the meta device, so it costs no memory and leaves `model` alone, and
    uses the tuner itself, so every TOAST setting is covered without restating how it lays out its tensors.
    """
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad) for p in model.parameters()}
    memo.update({id(b): torch.empty_like(b, device="meta") for b in model.buffers()})
    skeleton = copy.deepcopy(model, memo)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_skeleton = get_peft_model(skeleton, copy.deepcopy(config))
    return {key: tuple(t.shape) for key, t in get_peft_model_state_dict(peft_skeleton).items()}


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
        **config_overrides: `ToastConfig` fields to change, e.g. `train_down=False` to freeze the calibrated down-maps
            of an encoder, `lite_rank=4` to turn saved full-rank maps into TOAST-Lite's frozen maps,
            `layers_to_transform`. The saved `variational_loss_weight` of a pre-tuned adapter is reset to 0, and
            `train_down` to `None` (decided for the transfer: frozen on a decoder LM, trained otherwise), unless given
            here. The saved `feature_norm` is kept: the saved maps were made for it.

    Returns:
        A `PeftModel` whose TOAST adapter trains.
    """
    saved_config = ToastConfig.from_pretrained(adapter_dir)
    # A new task is transfer: no variational loss unless asked for (pre-tuning used it), and whether the down-maps
    # train is decided again for it (`train_down=None`: frozen on a decoder LM, as the reference's LLaMA transfer).
    overrides = {
        "inference_mode": False,
        "auto_mapping": None,
        "base_model_name_or_path": None,
        "variational_loss_weight": 0.0,
        "train_down": None,
    }
    if new_head:
        overrides["modules_to_save"] = None
    config = dataclasses.replace(saved_config, **{**overrides, **config_overrides})
    model = get_peft_model(base_model, config, adapter_name=adapter_name)
    saved = upgrade_selection_keys(load_peft_weights(adapter_dir, device="cpu"))
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
    if not fresh_prompt and PROMPT_KEY in saved:
        with torch.no_grad():
            tuner.toast_prompt[adapter_name].copy_(saved[PROMPT_KEY])
    prefix = CHANNEL_PREFIX
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
