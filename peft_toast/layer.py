"""The value-projection wrapper: where the top-down signal enters a block.

Block `l`'s value projection becomes `V = W_v (u + t_l) + b_v = base(u) + W_v t_l`: the signal goes through the *frozen*
value weights, the bias is added once, and queries and keys are untouched. The wrapper also owns the block's feedback
maps (`toast_down` = `A_l`, `toast_readout` = `C_l`), one per adapter, so PEFT's generic machinery (devices, dtypes,
`requires_grad`, adapter switching and deletion) handles them like any adapter weights. The prompts and channel
selections, which all wrapped layers of an adapter share, live in one more such layer, `ToastSelection`, attached to
the root of the base model.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .state import current_signal
from .topdown import FeedbackMap


def adapter_factory(base: nn.Module) -> dict:
    """`device` and `dtype` for new adapter tensors next to the frozen layer `base`: its weight's, except for a layer
    whose weight accelerate offloaded (CPU or disk, `device_map` with offloading: the weight sits on the meta device
    and the layer's hook brings it to its execution device for each forward), where the adapter lives on that
    execution device. A weight on the meta device without such a hook (a model built empty, to be loaded later) keeps
    the adapter on meta too."""
    weight = base.weight
    device = weight.device
    hook = getattr(base, "_hf_hook", None)
    if weight.is_meta and getattr(hook, "offload", False) and getattr(hook, "execution_device", None) is not None:
        device = torch.device(hook.execution_device)
    return {"device": device, "dtype": weight.dtype if weight.dtype.is_floating_point else None}


class ToastLayer(nn.Module, BaseTunerLayer):
    adapter_layer_names = ("toast_down", "toast_readout")

    def __init__(self, base_layer: nn.Module, block_index: int, value_index: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.block_index = block_index
        # A fused query/key/value projection: the positions of the values in its output (`fused_value_index`); not
        # saved with the adapter (it follows from the model config).
        self.register_buffer("value_index", value_index, persistent=False)
        # Where the positions are one run (all layouts but per-head and grouped): `(start, length)`, so that `W_v` is a
        # view of the fused weight rather than a copy gathered on every forward.
        self._value_span: Optional[tuple[int, int]] = None
        if (
            value_index is not None
            and value_index.numel()
            and bool(
                (value_index == torch.arange(int(value_index[0]), int(value_index[0]) + value_index.numel())).all()
            )
        ):
            self._value_span = (int(value_index[0]), value_index.numel())
        self.toast_down = nn.ModuleDict()
        self.toast_readout = nn.ModuleDict()
        self.frozen_peft_weight_names: dict[str, tuple[str, ...]] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.in_features = value_input_features(base_layer)
        weight = getattr(self.get_base_layer(), "weight", None)
        if value_index is not None and is_torchao_tensor(weight) and not weight.is_meta:
            try:  # a fused projection's value rows come from the dequantised weight on every steered forward
                weight.dequantize()
            except Exception as error:
                raise ValueError(
                    f"This fused query/key/value projection holds a torchao weight ({type(weight).__name__}) that "
                    f"cannot be dequantised ({type(error).__name__}: {error}); TOAST needs the value rows of its "
                    f"weight. Keep the projection in full precision (`TorchAoConfig(..., "
                    f"modules_to_not_convert=[...])`) or quantize it with a weight-only config such as "
                    f"`Int8WeightOnlyConfig()`."
                ) from error

    def update_layer(self, adapter_name: str, config, with_readout: bool) -> None:
        """Create block `l`'s down-map (and readout, if this block receives a signal) for `adapter_name`."""
        factory = adapter_factory(self.get_base_layer())
        ranks = {"rank": config.feedback_rank, "lite_rank": config.lite_rank}
        self.toast_down[adapter_name] = FeedbackMap(self.in_features, init=config.down_init, **ranks, **factory)
        if with_readout:
            self.toast_readout[adapter_name] = FeedbackMap(
                self.in_features, init=config.readout_init, **ranks, **factory
            )
        frozen = tuple(
            name
            # `train_down=None` is decided by the model when it creates the adapter; a layer updated on its own trains.
            for name, trains in (
                ("toast_down", config.train_down is not False),
                ("toast_readout", config.train_readout),
            )
            if not trains
        )
        if frozen:
            self.frozen_peft_weight_names[adapter_name] = frozen
        self.set_adapter(self.active_adapters)

    @property
    def fused_qkv(self) -> bool:
        return self.value_index is not None

    def _value_weight(self) -> torch.Tensor:
        """The `(out, d)` weight `W_v` that maps a hidden state to values (the value rows of a fused projection); a
        torchao-quantized weight dequantised, so that the product never reads its packed data."""
        base = self.get_base_layer()
        weight = base.weight.dequantize() if is_torchao_tensor(base.weight) else base.weight
        # transformers' Conv1D (GPT-2) stores its weight transposed, (d, out).
        weight = weight if isinstance(base, nn.Linear) else weight.T
        if self.value_index is None:
            return weight
        if self._value_span is not None:
            return weight.narrow(0, *self._value_span)
        return weight[self.value_index.to(weight.device)]

    def value_delta(self, signal: torch.Tensor) -> torch.Tensor:
        """`W_v t` for a top-down signal `t` of shape `(..., d)`; no bias."""
        weight = self._value_weight()
        return F.linear(signal.to(device=weight.device, dtype=weight.dtype), weight)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        signal: Optional[torch.Tensor] = None if self.disable_adapters else current_signal(self)
        if signal is None:
            return self.base_layer(x, *args, **kwargs)  # (B, N, out)
        if signal.shape[:-1] != x.shape[:-1]:  # never broadcast: a transposed or padded layout would corrupt silently
            raise ValueError(
                f"The value projection of block {self.block_index} reads hidden states of shape {tuple(x.shape)}, but "
                f"the top-down signal for it has shape {tuple(signal.shape)} (batch, tokens, hidden) from the pass-1 "
                f"tokens: this model lays out or pads its tokens differently inside its attention (e.g. sequence-first, "
                f"as Longformer), which TOAST cannot steer. Use a model with batch-first attention."
            )
        if not self.fused_qkv:
            # V = W_v (u + t) + b_v in one product: the projection only carries values, so the signal can enter its
            # input (one matmul instead of two, and the bias is added once).
            return self.base_layer(x + signal.to(device=x.device, dtype=x.dtype), *args, **kwargs)
        # One fused query/key/value projection: only its values may change.
        result = self.base_layer(x, *args, **kwargs)  # (B, N, out)
        delta = self.value_delta(signal).to(result.dtype)  # (B, N, out_v)
        return result.index_add(-1, self.value_index.to(result.device), delta)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise NotImplementedError(_NO_MERGE)

    def unmerge(self) -> None:
        raise NotImplementedError(_NO_MERGE)

    def __repr__(self) -> str:
        return "toast." + super().__repr__()


# Where the prompts and channel selections live: a child of the base model's root, so that the whole adapter is in
# the model tree (and transformers' `add_adapter` / `load_adapter`, which keep no tuner, can carry it). Its name must
# not itself start with the method prefix `toast_`: PEFT inserts the adapter name after the last `toast_*` part of a
# key and transformers after the first, so a saved key has exactly one such part.
SELECTION_MODULE = "toast"
# The saved keys of the prompt and of the channel selection's tensors.
PROMPT_KEY = f"base_model.model.{SELECTION_MODULE}.toast_prompt"
CHANNEL_PREFIX = f"base_model.model.{SELECTION_MODULE}.toast_channel."
# Adapter files written before the selection moved into the model tree keep it on the tuner.
_LEGACY_SELECTION_KEYS = ("toast_prompt", "toast_channel")


class ToastSelection(nn.Module, BaseTunerLayer):
    """The token selection (`toast_prompt`, one `(d,)` prompt per adapter) and channel selection (`toast_channel`, a
    `FeedbackMap` per adapter unless it is the identity) that every wrapped layer of an adapter shares.

    It is a `BaseTunerLayer`, so PEFT's and transformers' adapter switches (`set_adapter`, `enable_adapters`,
    `delete_adapter`, dtype casts) treat it like the wrapped layers; it is never called. `unset_prompts` names the
    adapters whose `prompt_init="data"` prompt waits for its first batch (a Python-side flag, so that the prompt is read,
    one device sync, only until it is set).
    """

    adapter_layer_names = ("toast_prompt", "toast_channel")

    def __init__(self) -> None:
        super().__init__()
        self.toast_prompt = nn.ParameterDict()
        self.toast_channel = nn.ModuleDict()
        self.frozen_peft_weight_names: dict[str, tuple[str, ...]] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.unset_prompts: set[str] = set()

    def update_layer(self, adapter_name: str, config, dim: int, factory: dict) -> None:
        """Create the prompt (and the channel selection, unless it is the identity) of `adapter_name`."""
        if config.prompt_init == "data":  # zeros = "not set yet": the first steered batch sets it
            prompt = torch.zeros(dim, **factory)
            self.unset_prompts.add(adapter_name)
        else:
            prompt = torch.empty(dim, **factory)
            if not prompt.is_meta:
                nn.init.normal_(prompt)
        self.toast_prompt[adapter_name] = nn.Parameter(prompt)
        if config.channel_selection != "identity":
            rank = config.channel_rank if config.channel_selection == "low_rank" else None
            self.toast_channel[adapter_name] = FeedbackMap(dim, init="identity", rank=rank, **factory)
        if not config.train_prompt:
            self.frozen_peft_weight_names[adapter_name] = ("toast_prompt",)
        self.set_adapter(self.active_adapters)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.unset_prompts.discard(adapter_name)

    # `BaseTunerLayer` reads these from the wrapped base layer, which this layer does not have.
    @property
    def weight(self):
        raise AttributeError("`toast` wraps no base layer, so it has no weight.")

    @property
    def bias(self):
        raise AttributeError("`toast` wraps no base layer, so it has no bias.")

    def forward(self, *args, **kwargs):
        raise RuntimeError("`toast` holds the TOAST prompts and channel selections; it is not called.")

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise NotImplementedError(_NO_MERGE)

    def unmerge(self) -> None:
        raise NotImplementedError(_NO_MERGE)


def upgrade_selection_keys(state_dict: dict, prefix: str = "base_model.") -> dict:
    """`state_dict` with the keys of adapter files written before the prompts moved into the model tree
    (`base_model.toast_prompt`, `base_model.toast_channel.*`) renamed to where they live now
    (`base_model.model.toast.toast_prompt`, ...); other keys unchanged. Works on a dict of anything."""
    upgraded = {}
    for key, value in state_dict.items():
        name = key[len(prefix) :] if key.startswith(prefix) else None
        if name is not None and name.split(".", 1)[0] in _LEGACY_SELECTION_KEYS:
            key = f"{prefix}model.{SELECTION_MODULE}.{name}"
        upgraded[key] = value
    return upgraded


def value_input_features(base_layer: nn.Module) -> int:
    """The hidden size `d` that a value projection reads: `in_features` of a linear layer (also of a quantized one,
    whose packed weight has another shape, e.g. bitsandbytes' 4-bit `(d * out / 2, 1)`); transformers' Conv1D stores
    its weight as `(d, out)`."""
    if isinstance(base_layer, nn.Linear):
        return base_layer.in_features
    return base_layer.weight.shape[0]


def is_torchao_tensor(weight) -> bool:
    """Whether `weight` is one of torchao's quantized tensor subclasses (`Int8Tensor`, `IntxUnpackedToInt8Tensor`,
    `Float8Tensor`, ...); torchao is not imported for it (a model cannot hold its tensors unless it was)."""
    if "torchao" not in sys.modules:
        return False
    from torchao.utils import TorchAOBaseTensor

    return isinstance(weight, TorchAOBaseTensor)


def check_torchao_weights(model: nn.Module, inference_mode: bool) -> None:
    """Refuse, when the adapter is created, the torchao-quantized linear layers TOAST cannot run or train through.

    Each one multiplies one row of ones, which tells apart what its tensor subclass does rather than what its class
    name suggests: a weight whose product does not run on its device (a layout without kernels there), and,
    unless the adapter is only used for inference, one that quantizes its input too (dynamic activation quantization,
    e.g. `Int8DynamicActivationInt8WeightConfig`): no gradient reaches the input of such a layer, so the signal, which
    enters the value projections' inputs and whose gradient flows back through every block above, could not train.
    Weight-only configs (`Int8WeightOnlyConfig`, `IntxWeightOnlyConfig`, `Float8WeightOnlyConfig`) pass."""
    if "torchao" not in sys.modules:
        return
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.Linear) or not is_torchao_tensor(weight) or weight.is_meta:
            continue
        probe = torch.ones(1, module.in_features, dtype=weight.dtype, device=weight.device, requires_grad=True)
        try:
            with torch.enable_grad():
                output = F.linear(probe, weight)
        except Exception as error:
            raise ValueError(
                f"`{name}` holds a torchao weight ({type(weight).__name__}) whose product does not run on "
                f"{weight.device} ({type(error).__name__}: {error}). Quantize with a config that runs there (on CPU: "
                f"`Int8WeightOnlyConfig()`, or `IntxWeightOnlyConfig(weight_dtype=torch.int4, "
                f"granularity=PerGroup(32))` for 4 bits), or keep this layer in full precision "
                f"(`TorchAoConfig(..., modules_to_not_convert=['{name.rsplit('.', 1)[-1]}'])`)."
            ) from error
        if inference_mode or torch.is_inference_mode_enabled():
            continue
        if not output.requires_grad or torch.autograd.grad(output.sum(), probe, allow_unused=True)[0] is None:
            raise ValueError(
                f"`{name}` holds a torchao weight ({type(weight).__name__}) that quantizes its input too (dynamic "
                f"activation quantization): no gradient passes through the layer, so TOAST, whose signal enters the "
                f"value projections' inputs and learns from the gradient that flows back through every block above, "
                f"cannot train. Quantize the weights only (`Int8WeightOnlyConfig()`, `IntxWeightOnlyConfig(...)`, "
                f"`Float8WeightOnlyConfig()`), or use this base for inference only (`PeftModel.from_pretrained(base, "
                f"path)`, or `ToastConfig(inference_mode=True)`)."
            )


_NO_MERGE = (
    "TOAST cannot be merged into the base weights: the top-down signal depends on the input through a first pass of "
    "the model, so it is not a static weight change. Use `unload()` to get the plain base model back."
)
