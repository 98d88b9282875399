"""`ToastModel`: TOAST as a PEFT tuner — injection, the two-pass forward hooks and the adapter lifecycle."""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from . import passes
from .architectures import (
    ResolvedArchitecture,
    blocks_config,
    dims_mismatch,
    fused_value_index,
    model_dims,
    resolve_architecture,
)
from .config import ToastConfig
from .layer import (
    SELECTION_MODULE,
    ToastLayer,
    ToastSelection,
    adapter_factory,
    check_torchao_weights,
    upgrade_selection_keys,
    value_input_features,
)
from .passes import FEATURES_ARGUMENT, steered_call
from .state import CallState, checkpoint_with_signals, current_state, pop_state, push_state
from .upstream import keep_4bit_weights_differentiable, wrap_block_checkpointing

# Heads of transformers' classification models: trained and saved by default, as PEFT's SEQ_CLS task type does.
CLASSIFICATION_HEAD_NAMES = ("classifier", "score")
__all__ = ["FEATURES_ARGUMENT", "ToastModel"]
logger = logging.getLogger(__name__)


class ToastModel(BaseTuner):
    """
    TOAST (Transfer Learning via Attention Steering; Shi, Gai, Darrell, Wang, arXiv 2305.15542) for any transformers
    model.

    Every forward call runs the frozen model twice. Pass 1 (no gradients) produces the top-layer tokens; a learned
    prompt gates them (token selection), an optional matrix mixes channels (channel selection), and a linear feedback
    path sends the selection down, producing one signal `t_l` per block. Pass 2 adds `W_v t_l` to block `l`'s values and
    produces the output, loss included. Only the top-down module (and the task head) train.

    Example:

        ```py
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> from peft import get_peft_model
        >>> from peft_toast import ToastConfig
        >>> base = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        ...     intermediate_size=37, image_size=16, patch_size=4, num_labels=3))
        >>> model = get_peft_model(base, ToastConfig())
        >>> model.print_trainable_parameters()  # doctest: +ELLIPSIS
        trainable params: ...
        ```

    TOAST cannot be merged into the base weights (the signal depends on the input); `merge_and_unload` raises, and
    `unload` returns the untouched base model.
    """

    prefix: str = "toast_"
    tuner_layer_cls = ToastLayer
    target_module_mapping: dict = {}
    # The prompts and channel selections, which all wrapped layers of an adapter share, live in the model tree
    # (`ToastSelection`), and the passes' hooks on the model keep the tuner alive: `inject_adapter_in_model` (which
    # transformers' `add_adapter` / `load_adapter` use) can carry TOAST.
    uses_shared_state = False

    # ------------------------------------------------------------------------------------------------ injection

    def _pre_injection_hook(self, model: nn.Module, config: ToastConfig, adapter_name: str) -> None:
        if "_toast_hook_handles" not in self.__dict__:
            self._toast_hook_handles: list = []
            self._toast_wrapped_layers: list[ToastLayer] = []
            self._toast_architecture: Optional[ResolvedArchitecture] = None
            self._toast_targets: dict[str, tuple[int, bool]] = {}
            # transformers' `add_adapter` / `load_adapter` make a new tuner for every adapter they add to a model
            # (`inject_adapter_in_model`); the newest one runs the passes for all of them (they share the model's
            # `peft_config` and `toast`), so the previous one's hooks go.
            previous = _steering_tuner(model)
            if previous is not None and previous is not self:
                previous._remove_toast_hooks()

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name: str, state_dict: dict) -> dict:
        # Adapter files of peft-toast 0.1 keep the prompt and channel selection on the tuner (`base_model.toast_prompt`).
        state_dict = upgrade_selection_keys(state_dict)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    def _check_new_adapter_config(self, config: ToastConfig) -> None:
        super()._check_new_adapter_config(config)
        if not isinstance(config, ToastConfig):
            raise TypeError(f"ToastModel needs a ToastConfig, got {type(config).__name__}.")

    def _prepare_adapter_config(self, peft_config: ToastConfig, model_config: dict) -> ToastConfig:
        architecture = resolve_architecture(self.model, peft_config.target_modules)
        self._toast_architecture = architecture
        peft_config.resolve_automatic(causal=architecture.causal)
        keep_4bit_weights_differentiable(self.model)
        if architecture.architecture.note:
            logger.info("TOAST on %s: %s", type(self.model).__name__, architecture.architecture.note)
        num_blocks = len(architecture.blocks)
        selected = _normalise_layers(peft_config.layers_to_transform, num_blocks)
        # The feedback chain runs from the top block down to the lowest block that receives a signal, so every block
        # in that range gets a down-map; only the selected ones get a readout.
        self._toast_targets = {
            architecture.value_names[index]: (index, index in selected) for index in range(min(selected), num_blocks)
        }
        if peft_config.modules_to_save is None:
            peft_config.modules_to_save = _default_head(self.model)
        dims = model_dims(self.model, architecture)
        mismatch = dims_mismatch(peft_config.base_model_dims or {}, dims)
        if mismatch:
            warnings.warn(
                f"This TOAST adapter was made for a different base model ({'; '.join(mismatch)}): even where its "
                f"tensors fit, it will not do what it was trained to do. Load it onto the model it was made for, or "
                f"load it with `peft_toast.load_toast_adapter`, which refuses such a load.",
                stacklevel=2,
            )
        peft_config.base_model_dims = dims
        if architecture.root is not self.model and peft_config.variational_loss_weight:
            raise ValueError(
                f"`variational_loss_weight={peft_config.variational_loss_weight}` cannot be used on an encoder-decoder "
                f"model: TOAST steers its encoder, whose output carries no loss to add the variational loss to. Set it "
                f"to 0 here, or pre-tune on the encoder alone (`get_peft_model(model.get_encoder(), config)`)."
            )
        return peft_config

    def _check_target_module_exists(self, peft_config: ToastConfig, key: str) -> bool:
        return key in self._toast_targets

    def _create_and_replace(
        self,
        peft_config: ToastConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        block_index, with_readout = self._toast_targets[current_key]
        if isinstance(target, ToastLayer):
            target.update_layer(adapter_name, peft_config, with_readout)
        else:
            layout = self._toast_architecture.architecture.fused_qkv
            value_index = None
            if layout:
                base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
                if not base.weight.dtype.is_floating_point:
                    raise ValueError(
                        f"`{current_key}` is a fused query/key/value projection with quantized weights "
                        f"({type(base).__name__}, {base.weight.dtype}): TOAST adds `W_v t` with the value rows of the "
                        f"weight, which a packed 4-/8-bit weight does not expose. Keep these projections in full "
                        f"precision, e.g. `BitsAndBytesConfig(..., llm_int8_skip_modules=['{target_name}'])`."
                    )
                out_features = base.weight.shape[0 if isinstance(base, nn.Linear) else 1]
                value_index = fused_value_index(
                    blocks_config(getattr(self.model, "config", None)), layout, out_features
                )
            new_module = ToastLayer(target, block_index, value_index=value_index)
            # The adapter tensors after PEFT's `_replace_module`, which moves them onto the base weight's device: for
            # a layer that accelerate offloaded that is the meta device, where `adapter_factory` does not put them.
            self._replace_module(parent, target_name, new_module, target)
            new_module.update_layer(adapter_name, peft_config, with_readout)
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)
        if SELECTION_MODULE not in self.model._modules:
            # Added here, during the injection, not before it: PEFT takes a model that already holds a tuner layer
            # for one that has an adapter, whose base weights' trainability it then restores instead of freezing.
            self.model.add_module(SELECTION_MODULE, ToastSelection())
        if adapter_name not in self.toast_prompt:
            self._create_selection(adapter_name, peft_config, target)

    def _create_selection(self, adapter_name: str, config: ToastConfig, target: nn.Module) -> None:
        """The adapter's prompt (token selection) and, unless it is the identity, its channel selection."""
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        self.selection.update_layer(adapter_name, config, value_input_features(base), adapter_factory(base))

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        check_torchao_weights(model, self.peft_config[adapter_name].inference_mode)
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        # `add_adapter` injects without `_post_injection_hook`: the hooks and the list of wrapped layers must include
        # the value projections this adapter wrapped (an adapter that steers lower blocks than the first one).
        if self._toast_hook_handles:
            self._register_toast_hooks()

    def _post_injection_hook(self, model: nn.Module, config: ToastConfig, adapter_name: str) -> None:
        self._register_toast_hooks()
        # The same `inference_mode` that `inject_adapter` just applied to the wrapped layers (frozen after
        # `from_pretrained(..., is_trainable=False)`).
        self._sync_selection_trainability(config.inference_mode)

    def _register_toast_hooks(self) -> None:
        self._remove_toast_hooks()
        architecture = self._toast_architecture
        handles = self._toast_hook_handles
        # `prepend` so that our state is in place before any other hook runs; `always_call` so that a call that raises
        # still removes its signals.
        root = architecture.root  # the model, or the encoder of an encoder-decoder model
        handles.append(root.register_forward_pre_hook(self._toast_pre_forward, with_kwargs=True, prepend=True))
        handles.append(root.register_forward_hook(self._toast_post_forward, with_kwargs=True, always_call=True))
        handles.append(architecture.feature_module.register_forward_hook(passes.capture_feature))
        handles.append(architecture.blocks[0].register_forward_pre_hook(passes.check_given_feature, with_kwargs=True))
        for index, block in enumerate(architecture.blocks):
            handles.append(block.register_forward_hook(passes.block_recorder(index), with_kwargs=True))
            passes.install_shared_block_forward(block, index)
        # Looked up once here rather than on every call: all ToastLayers of the model, from the top block down.
        layers = [module for module in self.model.modules() if isinstance(module, ToastLayer)]
        self._toast_wrapped_layers = sorted(layers, key=lambda layer: -layer.block_index)
        signature = inspect.signature(self.model.forward).parameters
        self._toast_cache_argument = "cache" if "cache" in signature else "past_key_values"

    def _remove_toast_hooks(self) -> None:
        for handle in self._toast_hook_handles:
            handle.remove()
        self._toast_hook_handles.clear()
        if self._toast_architecture is not None:
            for block in self._toast_architecture.blocks:
                passes.remove_shared_block_forward(block)

    # ------------------------------------------------------------------------ the two passes (`peft_toast.passes`)

    @property
    def architecture(self) -> ResolvedArchitecture:
        """Where TOAST sits in the wrapped model: its blocks, value projections, feature module, causal or not."""
        return self._toast_architecture

    def extra_repr(self) -> str:
        """The architecture's note, when it has one (e.g. a vision-language model's unsteered vision encoder)."""
        architecture = getattr(self, "_toast_architecture", None)
        if architecture is None or not architecture.architecture.note:
            return ""
        return f"steered blocks: {architecture.block_names[0]}..{architecture.block_names[-1]}; " + (
            architecture.architecture.note
        )

    @property
    def cache_argument(self) -> str:
        """The name of the wrapped model's KV-cache argument (`past_key_values`, or `cache` in some models)."""
        return self._toast_cache_argument

    @property
    def selection(self) -> ToastSelection:
        """The model's prompts and channel selections (`model.toast`)."""
        return self.model._modules[SELECTION_MODULE]

    @property
    def toast_prompt(self) -> nn.ParameterDict:
        """The token-selection prompt of each adapter, `(d,)`."""
        return self.selection.toast_prompt

    @property
    def toast_channel(self) -> nn.ModuleDict:
        """The channel selection of each adapter whose `channel_selection` is not the identity."""
        return self.selection.toast_channel

    @property
    def unset_prompts(self) -> set[str]:
        """Adapters whose `prompt_init="data"` prompt waits for its first batch."""
        return self.selection.unset_prompts

    def toast_layers(self, adapter_name: str) -> list[ToastLayer]:
        """The wrapped value projections of `adapter_name`, from the top block down."""
        return [layer for layer in self._toast_wrapped_layers if adapter_name in layer.toast_down]

    def active_toast_adapter(self) -> Optional[str]:
        """The adapter that steers a call now, or None (adapters disabled, or none left)."""
        # Read from the wrapped layers (the top block's holds every adapter), which transformers' `set_adapter` and
        # `disable_adapters` switch without this tuner.
        layers = self._toast_wrapped_layers
        if not layers or layers[0].disable_adapters:
            return None
        active = layers[0].active_adapters
        if not active or active[0] not in self.toast_prompt:
            return None
        return active[0]

    def _toast_pre_forward(self, module: nn.Module, args: tuple, kwargs: dict):
        """Entry point of every call of the wrapped model: make the call's state current (first, so that the
        always-called post hook can always end it) and run `passes.steered_call` up to pass 2."""
        state = push_state(CallState(owner=self))
        state.call = steered_call(self, state, module, args, kwargs)
        return next(state.call)

    def _toast_post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        """Exit point of every call (also of one that raised, with `output=None`): end the state, finish the call."""
        state = current_state()
        if state is None or state.owner is not self:
            return None
        pop_state()
        call, state.call = state.call, None
        if output is None or call is None:  # the call raised; nothing else to do
            if call is not None:
                call.close()
            return None
        try:
            return call.send(output)
        finally:
            call.close()

    def run_pass1(
        self, module: nn.Module, args: tuple, kwargs: dict, state: Optional[CallState] = None
    ) -> torch.Tensor:
        """Run the frozen model without signals up to the feature and return it, `(B, N, d)` (and keep what pass 2 of
        the call `state` takes from pass 1)."""
        return passes.run_pass1(self, module, args, kwargs, state=state)

    def top_down_signals(self, adapter_name: str, features: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """Token selection, channel selection and the feedback chain for one call: `({ToastLayer: t_l}, gates)`."""
        return passes.top_down_signals(self, adapter_name, features)

    def variational_loss(self, adapter_name: str, block_io: list) -> torch.Tensor:
        """`sum_l MSE(A_l h_l_out, h_l_in)` over the blocks that have a down-map (only the down-maps get gradient)."""
        return passes.variational_loss(self, adapter_name, block_io)

    def _pass1_only_arguments(self, kwargs: dict) -> dict:
        """The model's forward arguments that pass 1 takes: no labels or outputs; for an encoder-decoder model, only
        those of its encoder (no `decoder_input_ids`, ...)."""
        kwargs = {key: value for key, value in kwargs.items() if key not in passes.PASS2_ONLY_ARGUMENTS}
        root = self._toast_architecture.root
        if root is not self.model:
            accepted = inspect.signature(root.forward).parameters
            kwargs = {key: value for key, value in kwargs.items() if key in accepted}
        return kwargs

    @torch.no_grad()
    def initialise_prompt(self, *args, adapter_name: Optional[str] = None, **kwargs) -> torch.Tensor:
        """Set the prompt of `adapter_name` (default: the active adapter) to the mean direction of the real pass-1
        tokens of these inputs (the model's forward arguments; labels are ignored), as `prompt_init="data"` does with
        the first batch it sees. Call it before training with a fixed sample of the training data to make the start
        independent of the batch size, of gradient accumulation and of the number of processes (under
        `torch.distributed` every process must call it). Returns the new prompt."""
        adapter_name = adapter_name or self.active_toast_adapter()
        if adapter_name not in self.toast_prompt:
            raise ValueError(
                f"There is no TOAST adapter {adapter_name!r} to initialise (adapters: {sorted(self.toast_prompt)}); "
                f"pass `adapter_name=` or call it outside `disable_adapter()`."
            )
        kwargs = self._pass1_only_arguments(kwargs)
        features = self.run_pass1(self._toast_architecture.root, args, kwargs)  # (B, N, d)
        if not passes.set_prompt_from_data(self, adapter_name, features, kwargs.get("attention_mask"), force=True):
            raise ValueError(
                "These inputs have no real token with a nonzero pass-1 feature, so they give the prompt no direction. "
                "Pass real training examples (with their attention mask)."
            )
        return self.toast_prompt[adapter_name]

    @torch.no_grad()
    def initialise_readouts(self, *args, adapter_name: Optional[str] = None, **kwargs) -> int:
        """Point the low-rank readouts of `adapter_name` (default: the active adapter) at the signal they receive on
        these inputs (the model's forward arguments; labels are ignored): each readout `C_l = u v` (or TOAST-Lite's
        `delta_u delta_v`) gets as its input factor `v` (r, d) the top r right singular vectors of the fed-back tokens
        that reach it, in place of random rows of the same norms. `u` stays zero, so the model still starts exactly at
        the frozen one; what changes is which directions of the signal the readouts can read: a random `v` passes
        about r / d of a direction, and a readout's gradient is close to rank 1. Call it once on a fixed sample of the
        training data before training (under `torch.distributed` every process must call it; the directions are
        those of all processes' tokens). Sets a `prompt_init="data"` prompt that is still unset from the same inputs.
        Returns the number of readouts set."""
        adapter_name = adapter_name or self.active_toast_adapter()
        if adapter_name not in self.toast_prompt:
            raise ValueError(
                f"There is no TOAST adapter {adapter_name!r} to initialise (adapters: {sorted(self.toast_prompt)}); "
                f"pass `adapter_name=` or call it outside `disable_adapter()`."
            )
        config = self.peft_config[adapter_name]
        if config.feedback_rank is None and config.lite_rank is None:
            raise ValueError(
                "`initialise_readouts` sets the input factor of low-rank readouts, and this adapter's readouts are "
                "full rank (they read every direction already). Use `ToastConfig(feedback_rank=r)` or `lite_rank=r`."
            )
        trained = [
            layer.block_index
            for layer in self.toast_layers(adapter_name)
            if adapter_name in layer.toast_readout
            and getattr(layer.toast_readout[adapter_name], "u" if config.feedback_rank else "delta_u").any()
        ]
        if trained:
            raise ValueError(
                f"The readouts of adapter {adapter_name!r} are not at their start (blocks {trained[:3]} have a "
                "nonzero output factor: trained or loaded), so new input directions would change what they do. "
                "Call `initialise_readouts` on a new adapter, before training."
            )
        kwargs = self._pass1_only_arguments(kwargs)
        features = self.run_pass1(self._toast_architecture.root, args, kwargs)  # (B, N, d)
        passes.set_prompt_from_data(self, adapter_name, features, kwargs.get("attention_mask"))
        return passes.set_readouts_from_data(self, adapter_name, features, kwargs.get("attention_mask"))

    @torch.no_grad()
    def toast_selection(self, *args, **kwargs) -> torch.Tensor:
        """The token-selection gates `(B, N)` that the active adapter computes for these inputs: pass 1 and the
        selection only, no pass 2 (for inspection, e.g. `peft_toast.visualize`). Takes the model's forward arguments."""
        adapter_name = self.active_toast_adapter()
        if adapter_name is None:
            raise ValueError(
                "There is no active TOAST adapter (adapters are disabled, or none is loaded), so there are no gates. "
                "Call `toast_selection` outside `disable_adapter()`, after `set_adapter(name)`."
            )
        kwargs = self._pass1_only_arguments(kwargs)
        features = self.run_pass1(self._toast_architecture.root, args, kwargs)  # (B, N, d)
        passes.set_prompt_from_data(self, adapter_name, features, kwargs.get("attention_mask"))
        return self.top_down_signals(adapter_name, features)[1]  # (B, N)

    def wrap_gradient_checkpointing(self) -> None:
        """Make the blocks' gradient checkpointing recompute with the signals of the call that ran them."""
        wrap_block_checkpointing(self._toast_architecture.blocks, checkpoint_with_signals)

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                "TOAST does not support mixed-adapter batches (`adapter_names=`): its signal comes from a whole "
                "forward pass of one adapter. Run one call per adapter, switching with `model.set_adapter(name)`."
            )
        yield

    # ---------------------------------------------------------------------------------------- adapter lifecycle

    def _sync_selection_trainability(self, inference_mode: bool = False) -> None:
        """Make the prompts and channel selections (`model.toast`) follow the active adapter, like the wrapped layers."""
        enabled = self.active_toast_adapter() is not None or not self.toast_prompt
        for name, prompt in self.toast_prompt.items():
            config = self.peft_config.get(name)
            trains = name in self.active_adapters and not inference_mode and enabled
            prompt.requires_grad_(bool(trains and config is not None and config.train_prompt))
        for name, channel in self.toast_channel.items():
            channel.requires_grad_(name in self.active_adapters and not inference_mode and enabled)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        self._sync_selection_trainability(self.peft_config[self.active_adapters[0]].inference_mode)

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) != 1:
            raise ValueError(f"TOAST runs exactly one adapter at a time, got {names}. Pass a single adapter name.")
        unknown = [name for name in names if name not in self.peft_config]
        if unknown:
            raise ValueError(f"Adapter {unknown[0]!r} does not exist; available: {sorted(self.peft_config)}.")
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._sync_selection_trainability(inference_mode)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        self._sync_selection_trainability()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in self.toast_prompt:  # PEFT's `delete_adapter` visits only layers of the tuner's class
            self.selection.delete_adapter(adapter_name)
        self._sync_selection_trainability()

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        if not autocast_adapter_dtype:
            return
        low_precision = (torch.float16, torch.bfloat16)
        if adapter_name in self.toast_prompt and self.toast_prompt[adapter_name].dtype in low_precision:
            prompt = self.toast_prompt[adapter_name]
            self.toast_prompt[adapter_name] = nn.Parameter(prompt.data.float(), requires_grad=prompt.requires_grad)
        if adapter_name in self.toast_channel:
            self.toast_channel[adapter_name].float()
        # Buffers (TOAST-Lite's frozen maps) are not covered by PEFT's upcast.
        for layer in self.model.modules():
            if isinstance(layer, ToastLayer):
                for container in (layer.toast_down, layer.toast_readout):
                    if adapter_name in container:
                        for name, buffer in container[adapter_name].named_buffers():
                            if buffer.dtype in low_precision:
                                container[adapter_name].register_buffer(name, buffer.float())

    def _check_merge_allowed(self):
        raise NotImplementedError(
            "TOAST cannot be merged into the base weights: its top-down signal depends on the input through a first "
            "pass of the model, so it is not a static weight change. Keep the PeftModel for inference, or use "
            "`unload()` to get the plain base model back."
        )

    def _unload_and_optionally_merge(
        self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False, adapter_names=None
    ):
        if merge:
            self._check_merge_allowed()  # raise before anything is touched
        self._remove_toast_hooks()
        model = super()._unload_and_optionally_merge(
            merge=False, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        if SELECTION_MODULE in model._modules:
            del model._modules[SELECTION_MODULE]
        return model


def _steering_tuner(model: nn.Module) -> Optional[ToastModel]:
    """The `ToastModel` whose hooks run the passes of `model` (on the model, or on its encoder), if any."""
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            owner = getattr(hook, "__self__", None)
            if isinstance(owner, ToastModel):
                return owner
    return None


def _normalise_layers(layers: Optional[list[int]], num_blocks: int) -> set[int]:
    if layers is None:
        return set(range(num_blocks))
    out_of_range = [index for index in layers if not -num_blocks <= index < num_blocks]
    if out_of_range:
        raise ValueError(
            f"`layers_to_transform` lists blocks {out_of_range} but this model has {num_blocks} blocks (valid indices: "
            f"0..{num_blocks - 1}, or -{num_blocks}..-1 from the top)."
        )
    selected = {index % num_blocks for index in layers}
    if len(selected) != len(layers):
        raise ValueError(
            f"`layers_to_transform={layers}` names the same block twice (e.g. as i and i - {num_blocks}). List each "
            f"block once."
        )
    return selected


def _default_head(model: nn.Module) -> list[str]:
    """The task head of a transformers classification model, or nothing for other models."""
    if not type(model).__name__.endswith(
        ("ForImageClassification", "ForSequenceClassification", "ForTokenClassification")
    ):
        return []
    return [name for name in CLASSIFICATION_HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)]
