"""`ToastModel`: TOAST as a PEFT tuner — injection, the two-pass forward hooks and the adapter lifecycle."""

from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn
from transformers.cache_utils import Cache

from .architectures import ResolvedArchitecture, dims_mismatch, model_dims, resolve_architecture
from .config import ToastConfig
from .generation import CACHE_ARGUMENT_NAMES, attach_to_output, prepare_pass1_cache, refuse_toast_filled_cache
from .layer import ToastLayer, value_input_features
from .state import CallState, Pass1Done, checkpoint_with_signals, current_state, pop_state, push_state, use_state
from .topdown import FeedbackMap, feedback_chain, rms_normalise, token_selection, unit_token_sum

# Heads of transformers' classification models: trained and saved by default, as PEFT's SEQ_CLS task type does.
CLASSIFICATION_HEAD_NAMES = ("classifier", "score")
# Keyword arguments that pass 1 does not need (it stops at the feature, before any head or loss).
_PASS2_ONLY_ARGUMENTS = ("labels", "output_attentions", "output_hidden_states")
# The main input of transformers models, in the order they are looked for; the first two are token sequences.
_INPUT_NAMES = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features")
_TOKEN_INPUT_NAMES = ("input_ids", "inputs_embeds")
# Keyword argument of a TOAST forward call that hands over a precomputed pass-1 feature, `(B, N, d)`, so that pass 1 is
# skipped (`peft_toast.feature_cache`). It is removed before the wrapped model's forward sees it.
FEATURES_ARGUMENT = "toast_features"


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
    # The prompt and channel selection are shared by all wrapped layers: `inject_adapter_in_model` cannot carry them.
    uses_shared_state = True

    # ------------------------------------------------------------------------------------------------ injection

    def _pre_injection_hook(self, model: nn.Module, config: ToastConfig, adapter_name: str) -> None:
        if "toast_prompt" not in self._modules and "toast_prompt" not in self._parameters:
            self.toast_prompt = nn.ParameterDict()
            self.toast_channel = nn.ModuleDict()
            self._toast_hook_handles: list = []
            self._toast_wrapped_layers: list[ToastLayer] = []
            self._toast_architecture: Optional[ResolvedArchitecture] = None
            self._toast_targets: dict[str, tuple[int, bool]] = {}
            # Adapters whose prompt waits for its first batch (`prompt_init="data"`): a Python-side flag, so that the
            # prompt is read (one device sync) only until it is set.
            self._toast_unset_prompts: set[str] = set()

    def _check_new_adapter_config(self, config: ToastConfig) -> None:
        super()._check_new_adapter_config(config)
        if not isinstance(config, ToastConfig):
            raise TypeError(f"ToastModel needs a ToastConfig, got {type(config).__name__}.")

    def _prepare_adapter_config(self, peft_config: ToastConfig, model_config: dict) -> ToastConfig:
        architecture = resolve_architecture(self.model, peft_config.target_modules)
        self._toast_architecture = architecture
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
            new_module = ToastLayer(target, block_index, fused_qkv=self._toast_architecture.architecture.fused_qkv)
            new_module.update_layer(adapter_name, peft_config, with_readout)
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)
            self._replace_module(parent, target_name, new_module, target)
        if adapter_name not in self.toast_prompt:
            self._create_selection(adapter_name, peft_config, target)

    def _create_selection(self, adapter_name: str, config: ToastConfig, target: nn.Module) -> None:
        """The adapter's prompt (token selection) and, unless it is the identity, its channel selection."""
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        dim = value_input_features(base)
        weight = base.weight
        factory = {"device": weight.device, "dtype": weight.dtype if weight.dtype.is_floating_point else None}
        if config.prompt_init == "data":  # zeros = "not set yet": the first steered batch sets it
            prompt = torch.zeros(dim, **factory)
            self._toast_unset_prompts.add(adapter_name)
        else:
            prompt = torch.empty(dim, **factory)
            if not prompt.is_meta:
                nn.init.normal_(prompt)
        self.toast_prompt[adapter_name] = nn.Parameter(prompt)
        if config.channel_selection != "identity":
            rank = config.channel_rank if config.channel_selection == "low_rank" else None
            self.toast_channel[adapter_name] = FeedbackMap(dim, init="identity", rank=rank, **factory)

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
        handles.append(self.model.register_forward_pre_hook(self._toast_pre_forward, with_kwargs=True, prepend=True))
        handles.append(self.model.register_forward_hook(self._toast_post_forward, with_kwargs=True, always_call=True))
        handles.append(architecture.feature_module.register_forward_hook(_capture_feature))
        handles.append(architecture.blocks[0].register_forward_pre_hook(_check_given_feature, with_kwargs=True))
        for index, block in enumerate(architecture.blocks):
            handles.append(block.register_forward_hook(_make_block_recorder(index), with_kwargs=True))
        # Looked up once here rather than on every call: all ToastLayers of the model, from the top block down.
        layers = [module for module in self.model.modules() if isinstance(module, ToastLayer)]
        self._toast_wrapped_layers = sorted(layers, key=lambda layer: -layer.block_index)
        signature = inspect.signature(self.model.forward).parameters
        self._toast_cache_argument = "cache" if "cache" in signature else "past_key_values"

    def _remove_toast_hooks(self) -> None:
        for handle in self._toast_hook_handles:
            handle.remove()
        self._toast_hook_handles.clear()

    # --------------------------------------------------------------------------------------- the two passes

    def _toast_layers(self, adapter_name: str) -> list[ToastLayer]:
        """The wrapped value projections of `adapter_name`, from the top block down."""
        return [layer for layer in self._toast_wrapped_layers if adapter_name in layer.toast_down]

    def _active_toast_adapter(self) -> Optional[str]:
        """The adapter that steers this call, or None (adapters disabled, or none left)."""
        active = self.active_adapters
        if not active or active[0] not in self.toast_prompt:
            return None
        layers = self._toast_wrapped_layers
        if not layers or layers[0].disable_adapters:
            return None
        return active[0]

    def _toast_pre_forward(self, module: nn.Module, args: tuple, kwargs: dict):
        state = push_state(CallState(owner=self))  # first, so the always-called post hook can always pop it
        # Popped in place: the wrapped model never sees it, adapters enabled or not.
        given_features = kwargs.pop(FEATURES_ARGUMENT, None)
        adapter_name = self._active_toast_adapter()
        if adapter_name is None:
            if self._toast_architecture.causal:
                refuse_toast_filled_cache(kwargs)
            return None if given_features is None else (args, kwargs)
        _check_inputs(self.toast_prompt[adapter_name], args, kwargs)
        self._wrap_gradient_checkpointing()
        architecture = self._toast_architecture
        pass1_kwargs = {key: value for key, value in kwargs.items() if key not in _PASS2_ONLY_ARGUMENTS}
        if architecture.causal and given_features is None:
            cache_name, state.pass1_cache = prepare_pass1_cache(
                self.model, kwargs, self._toast_cache_argument, adapter_name
            )
            for name in ("cache", "past_key_values"):
                pass1_kwargs.pop(name, None)
            if state.pass1_cache is not None:
                pass1_kwargs[cache_name] = state.pass1_cache
                pass1_kwargs["use_cache"] = True
        if given_features is None:
            features = self.run_pass1(module, args, pass1_kwargs)
        else:  # precomputed (peft_toast.feature_cache): pass 2's first block checks it against its inputs
            features = state.feature = self._given_features(module, kwargs, given_features, adapter_name)
        _check_feature(features, kwargs.get("attention_mask"))
        self._set_prompt_from_data(adapter_name, features, kwargs.get("attention_mask"))
        state.signals, state.gates = self.top_down_signals(adapter_name, features)
        if self.training and self.peft_config[adapter_name].variational_loss_weight > 0:
            state.block_io = []
        return None if given_features is None else (args, kwargs)

    def _given_features(self, module: nn.Module, kwargs: dict, features, adapter_name: str) -> torch.Tensor:
        """Check a precomputed pass-1 feature (`toast_features=`) and refuse it where it cannot equal what pass 1
        would compute; turns the KV cache of a decoder off (a cache returned now would lack its pass-1 twin)."""
        dim = self.toast_prompt[adapter_name].shape[0]
        if not isinstance(features, torch.Tensor) or features.ndim != 3 or features.shape[-1] != dim:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(
                f"`{FEATURES_ARGUMENT}` must be the pass-1 feature of shape (batch, tokens, {dim}), got {shape}. "
                f"Compute it with `peft_toast.feature_cache.precompute_features`."
            )
        if self._toast_architecture.causal:
            cache = next((kwargs[name] for name in ("cache", "past_key_values") if kwargs.get(name) is not None), None)
            if cache is not None or kwargs.get("use_cache"):
                raise ValueError(
                    f"`{FEATURES_ARGUMENT}` covers exactly the tokens of one teacher-forced call, but this call decodes "
                    f"with a KV cache (`generate` or `use_cache=True`), which must run pass 1 on every new token. Drop "
                    f"`{FEATURES_ARGUMENT}` to generate."
                )
            kwargs["use_cache"] = False
        if module.training:
            stochastic = stochastic_modules(self._toast_architecture.backbone)
            if stochastic:
                raise ValueError(
                    f"`{FEATURES_ARGUMENT}` was given in training mode, but pass 1 is random or batch-dependent in "
                    f"training mode here (dropout, stochastic depth or batch norm in {', '.join(stochastic[:3])}), so "
                    f"a cached feature is not what pass 1 would compute. Set those probabilities to 0 (e.g. "
                    f"`hidden_dropout_prob=0.0`, `attention_probs_dropout_prob=0.0`) or train without the feature cache."
                )
        return features

    def run_pass1(self, module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        """Run the frozen model without signals up to the feature and return it, `(B, N, d)`."""
        pass1 = CallState(owner=self, pass1=True)
        with torch.no_grad(), use_state(pass1):
            try:
                # `forward`, not `__call__`: this call must not trigger our own hooks again.
                module.forward(*args, **kwargs)
            except Pass1Done:
                pass
        if pass1.feature is None:
            raise RuntimeError(
                "TOAST's pass 1 finished without reaching the feature module "
                f"({type(self._toast_architecture.feature_module).__name__}); check the architecture declaration."
            )
        return pass1.feature

    @torch.no_grad()
    def initialise_prompt(self, *args, adapter_name: Optional[str] = None, **kwargs) -> torch.Tensor:
        """Set the prompt of `adapter_name` (default: the active adapter) to the mean direction of the real pass-1
        tokens of these inputs (the model's forward arguments; labels are ignored), as `prompt_init="data"` does with
        the first batch it sees. Call it before training with a fixed sample of the training data to make the start
        independent of the batch size, of gradient accumulation and of the number of processes (under
        `torch.distributed` every process must call it). Returns the new prompt."""
        adapter_name = adapter_name or self._active_toast_adapter()
        if adapter_name not in self.toast_prompt:
            raise ValueError(
                f"There is no TOAST adapter {adapter_name!r} to initialise (adapters: {sorted(self.toast_prompt)}); "
                f"pass `adapter_name=` or call it outside `disable_adapter()`."
            )
        kwargs = {key: value for key, value in kwargs.items() if key not in _PASS2_ONLY_ARGUMENTS}
        features = self.run_pass1(self.model, args, kwargs)  # (B, N, d)
        if not self._set_prompt_from_data(adapter_name, features, kwargs.get("attention_mask"), force=True):
            raise ValueError(
                "These inputs have no real token with a nonzero pass-1 feature, so they give the prompt no direction. "
                "Pass real training examples (with their attention mask)."
            )
        return self.toast_prompt[adapter_name]

    @torch.no_grad()
    def _set_prompt_from_data(
        self, adapter_name: str, features: torch.Tensor, attention_mask: Optional[torch.Tensor], force: bool = False
    ) -> bool:
        """`prompt_init="data"`: set a prompt that is still zero to the mean direction of this call's real pass-1 tokens
        (summed over all processes), scaled to norm `sqrt(d)` like the reference's standard-normal prompt. A prompt
        that is not zero (loaded, copied or trained) is kept unless `force`. Returns whether the prompt was set."""
        if adapter_name not in self._toast_unset_prompts and not force:
            return False
        prompt = self.toast_prompt[adapter_name]
        if prompt.is_meta or features.is_meta:
            return False
        if prompt.any() and not force:  # loaded or set by hand since it was created
            self._toast_unset_prompts.discard(adapter_name)
            return False
        direction = unit_token_sum(features, attention_mask, eps=self.peft_config[adapter_name].cosine_eps)  # (d,)
        direction = direction.to(prompt.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every process must start from the same prompt: the sum over all their batches, as one process would see.
            torch.distributed.all_reduce(direction)
        norm = direction.norm()
        if not norm > 0:  # no real token with a direction (all zero): try again on the next batch
            return False
        prompt.copy_((direction * (prompt.numel() ** 0.5 / norm)).to(prompt.dtype))
        self._toast_unset_prompts.discard(adapter_name)
        return True

    def top_down_signals(self, adapter_name: str, features: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """Token selection, channel selection and the feedback chain for one call.

        Returns `({ToastLayer: t_l of shape (B, N, d)}, gates of shape (B, N))`.
        """
        prompt = self.toast_prompt[adapter_name]
        config = self.peft_config[adapter_name]
        features = features.to(device=prompt.device, dtype=prompt.dtype)  # (B, N, d)
        if config.feature_norm == "rms":  # scale-free feedback; the cosine gates do not change
            features = rms_normalise(features, eps=config.cosine_eps)
        gates, selected = token_selection(features, prompt, eps=config.cosine_eps)  # (B, N), (B, N, d)
        if adapter_name in self.toast_channel:
            selected = self.toast_channel[adapter_name](selected)
        layers = self._toast_layers(adapter_name)
        down_maps = [layer.toast_down[adapter_name] for layer in layers]
        readouts = [
            layer.toast_readout[adapter_name] if adapter_name in layer.toast_readout else None for layer in layers
        ]
        signals = feedback_chain(selected, down_maps, readouts)
        return {layer: signal for layer, signal in zip(layers, signals) if signal is not None}, gates

    @torch.no_grad()
    def toast_selection(self, *args, **kwargs) -> torch.Tensor:
        """The token-selection gates `(B, N)` that the active adapter computes for these inputs: pass 1 and the
        selection only, no pass 2 (for inspection, e.g. `peft_toast.visualize`). Takes the model's forward arguments."""
        adapter_name = self._active_toast_adapter()
        if adapter_name is None:
            raise ValueError(
                "There is no active TOAST adapter (adapters are disabled, or none is loaded), so there are no gates. "
                "Call `toast_selection` outside `disable_adapter()`, after `set_adapter(name)`."
            )
        kwargs = {key: value for key, value in kwargs.items() if key not in _PASS2_ONLY_ARGUMENTS}
        features = self.run_pass1(self.model, args, kwargs)  # (B, N, d)
        self._set_prompt_from_data(adapter_name, features, kwargs.get("attention_mask"))
        return self.top_down_signals(adapter_name, features)[1]  # (B, N)

    def _toast_post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        state = current_state()
        if state is None or state.owner is not self:
            return None
        pop_state()
        if output is None:  # the call raised; nothing else to do
            return None
        attach_to_output(output, state.pass1_cache)
        if state.block_io:
            weight = self.peft_config[self.active_adapters[0]].variational_loss_weight
            loss = self.variational_loss(self.active_adapters[0], state.block_io)
            output["toast_variational_loss"] = loss.detach()
            if getattr(output, "loss", None) is not None:
                output["loss"] = output.loss + weight * loss.to(output.loss.dtype)
            else:  # no task loss (a backbone, or no labels): pre-tuning then trains on the variational loss alone
                output["loss"] = weight * loss
        return output

    def variational_loss(self, adapter_name: str, block_io: list) -> torch.Tensor:
        """`sum_l MSE(A_l h_l_out, h_l_in)` over the blocks that have a down-map; inputs and outputs are detached, so
        only the down-maps receive its gradient."""
        layers = {layer.block_index: layer for layer in self._toast_layers(adapter_name)}
        terms = [
            torch.nn.functional.mse_loss(layers[index].toast_down[adapter_name](h_out.to(h_in.dtype)), h_in)
            for index, h_in, h_out in block_io
            if index in layers
        ]
        return torch.stack(terms).sum()

    def _wrap_gradient_checkpointing(self) -> None:
        for block in self._toast_architecture.blocks:
            fn = getattr(block, "_gradient_checkpointing_func", None)
            if fn is not None and getattr(block, "gradient_checkpointing", False):
                block._gradient_checkpointing_func = checkpoint_with_signals(fn)

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
        """Make the tuner-level prompt and channel selection follow the active adapter, like the wrapped layers."""
        enabled = self._active_toast_adapter() is not None or not self.toast_prompt
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

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for name in names & set(self.toast_prompt):
            self.toast_prompt[name].requires_grad_(requires_grad and self.peft_config[name].train_prompt)
        for name in names & set(self.toast_channel):
            self.toast_channel[name].requires_grad_(requires_grad)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        self._sync_selection_trainability()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for container in (self.toast_prompt, self.toast_channel):
            if adapter_name in container:
                del container[adapter_name]
        self._toast_unset_prompts.discard(adapter_name)
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
        return super()._unload_and_optionally_merge(
            merge=False, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )


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


def _check_inputs(prompt: torch.Tensor, args: tuple, kwargs: dict) -> None:
    """Shape checks of one call's inputs (no data is read), so that bad input fails with a message that says what to do
    instead of a reshape error deep inside the model or, worse, an attention mask that is silently broadcast."""
    name = next((n for n in _INPUT_NAMES if isinstance(kwargs.get(n), torch.Tensor)), None)
    inputs = kwargs[name] if name else (args[0] if args and isinstance(args[0], torch.Tensor) else None)
    if inputs is None:
        return
    if prompt.is_meta and not inputs.is_meta:
        raise ValueError(
            "The TOAST adapter's weights are still on the meta device: it was created with `low_cpu_mem_usage=True` "
            "and its weights were never loaded. Load them with `model.load_adapter(path, adapter_name)` or "
            "`PeftModel.from_pretrained`, or create the adapter without `low_cpu_mem_usage=True`."
        )
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        raise ValueError(
            f"TOAST got an empty batch (`{name or 'inputs'}` of shape {tuple(inputs.shape)}). Skip empty batches before "
            f"calling the model."
        )
    if not (name in _TOKEN_INPUT_NAMES or (name is None and not inputs.is_floating_point())):
        return
    batch, length = inputs.shape[:2]
    if length == 0:
        raise ValueError(
            f"TOAST got sequences of length 0 (`{name or 'input_ids'}` of shape {tuple(inputs.shape)}). Every sequence "
            f"needs at least one token; to generate from nothing, start from the BOS token."
        )
    mask = kwargs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return
    cache = next((kwargs[n] for n in CACHE_ARGUMENT_NAMES if kwargs.get(n) is not None), None)
    cached = cache is not None and (not isinstance(cache, Cache) or cache.get_seq_length() > 0)
    # Without a cache the mask covers exactly the inputs; with one it also covers the cached tokens.
    if mask.shape[0] != batch or mask.shape[1] < length or (not cached and mask.shape[1] != length):
        raise ValueError(
            f"`attention_mask` has shape {tuple(mask.shape)} but the inputs have batch size {batch} and {length} tokens"
            f"{' (plus cached tokens)' if cached else ''}. Pass the mask that the tokenizer returned with these inputs: "
            f"one row per sequence, one entry per token (cached tokens included)."
        )


def _check_feature(features: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> None:
    """Refuse a pass-1 feature `(B, N, d)` that is NaN or infinite at a real (unmasked) token. This is the one check per
    call that reads data, and it reads a tensor that pass 1 computed anyway; stopping here keeps NaN out of the
    signals, the loss, the gradients and finally the saved adapter."""
    if features.is_meta:
        return
    bad = ~torch.isfinite(features).all(dim=-1)  # (B, N)
    mask = attention_mask
    if (
        isinstance(mask, torch.Tensor)
        and mask.dim() == 2
        and mask.shape[0] == bad.shape[0]
        and mask.shape[1] >= bad.shape[1]
    ):
        bad &= mask[:, -bad.shape[1] :].to(device=bad.device, dtype=torch.bool)  # padding may be anything
    if bad.any():
        rows = sorted(set(bad.nonzero()[:, 0].tolist()))
        raise ValueError(
            f"TOAST's pass 1 produced NaN or inf at real (unpadded) tokens of batch rows {rows[:10]}: the inputs contain "
            f"NaN/inf, or the frozen model overflows in {features.dtype}. Check the inputs (`torch.isfinite(x).all()`) "
            f"or run the base model in float32 or bfloat16. The call stopped before any signal, loss or gradient was "
            f"computed."
        )


def _capture_feature(module: nn.Module, args: tuple, output: Any) -> None:
    """Forward hook on the feature module: in pass 1, hand the feature over and stop the pass."""
    state = current_state()
    if state is not None and state.pass1:
        state.feature = output[0] if isinstance(output, tuple) else output
        raise Pass1Done


def _check_given_feature(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook on the first block: a precomputed pass-1 feature must have this call's `(B, N, d)`."""
    state = current_state()
    if state is None or state.pass1 or state.feature is None:
        return
    hidden = args[0] if args else kwargs["hidden_states"]  # (B, N, d)
    if tuple(hidden.shape) != tuple(state.feature.shape):
        raise ValueError(
            f"`{FEATURES_ARGUMENT}` has shape {tuple(state.feature.shape)}, but this call's tokens have shape "
            f"{tuple(hidden.shape)} (batch, tokens, hidden size): the cached feature does not belong to these inputs. "
            f"Pass the feature precomputed for exactly this batch, in the same order."
        )


def stochastic_modules(backbone: nn.Module) -> list[str]:
    """Names of the modules that make a forward of `backbone` random or batch-dependent in its current mode: dropout
    (a module, or a `*drop*` probability attribute, as transformers' attention classes keep it), stochastic depth and
    batch norm in training mode."""
    found = []
    for name, module in backbone.named_modules():
        if not module.training:
            continue
        stochastic = isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0
        stochastic = stochastic or isinstance(module, nn.modules.batchnorm._BatchNorm)
        stochastic = stochastic or any(
            "drop" in key and isinstance(value, float) and value > 0 for key, value in vars(module).items()
        )
        if stochastic:
            found.append(name or type(backbone).__name__)
    return found


def _make_block_recorder(index: int):
    def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        state = current_state()
        if state is None or state.block_io is None or state.pass1:
            return
        hidden_in, hidden_out = block_input_output(args, kwargs, output)
        state.block_io.append((index, hidden_in.detach(), hidden_out.detach()))

    return record


def block_input_output(args: tuple, kwargs: dict, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Block `l`'s residual-stream input and output `(h_l_in, h_l_out)`, each `(B, N, d)`, from a forward hook's view
    (the variational loss and `peft_toast.calibrate` read the same tensors)."""
    hidden_in = args[0] if args else kwargs["hidden_states"]
    hidden_out = output[0] if isinstance(output, tuple) else output
    return hidden_in, hidden_out
