"""`ToastConfig`: every setting of a TOAST adapter, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft import PeftConfig

from .upstream import add_peft_type

TOAST_NAME = "toast"
TOAST_PEFT_TYPE = add_peft_type(TOAST_NAME.upper())  # PeftType.TOAST

CHANNEL_SELECTION_CHOICES = ("identity", "full", "low_rank")
DOWN_INIT_CHOICES = ("identity", "reference")
READOUT_INIT_CHOICES = ("zero", "reference")
PROMPT_INIT_CHOICES = ("data", "random")
FEATURE_NORM_CHOICES = ("auto", "none", "rms")


@dataclass
class ToastConfig(PeftConfig):
    """
    Configuration of a TOAST adapter (Transfer Learning via Attention Steering, Shi et al., arXiv 2305.15542).

    TOAST runs the frozen model once, gates the top-layer tokens by their cosine similarity with a learned task
    prompt, sends the selection back down through a linear feedback path (one down-map `A_l` and one readout `C_l`
    per block) and runs the model a second time with the readout `t_l` added to the input of block `l`'s value
    projection: `V = W_v (u + t_l) + b_v`.

    The defaults are chosen so that `ToastConfig()` works on every supported architecture and training starts *exactly*
    at the frozen model's function (zero readout, like LoRA's `B = 0`), with a feedback path that is already meaningful
    (identity down-maps: a pre-norm residual block is close to the identity, so its approximate inverse is too).

    Args:
        target_modules (`str` or `list[str]`, *optional*):
            Name(s) or a regex of the value projections. `None` (default) finds the value projection of every block
            from the architecture registry (`peft_toast.architectures`), so it rarely needs setting; set it only for an
            architecture the registry does not know. It must match exactly one module per block.
        layers_to_transform (`int` or `list[int]`, *optional*):
            Indices of the blocks (0 = bottom) whose values receive a top-down signal. Negative indices count from the
            top (`-1` = top block). `None` (default) means every block, as in the reference implementation.
        feedback_rank (`int`, *optional*):
            `None` (default): full-rank `d x d` down-maps and readouts, as in the reference. An integer `r` factors
            them: `A_l = I + U_l V_l` and `C_l = U'_l V'_l` with rank `r`, for `4 r d` instead of `2 d^2` parameters
            per block. `model.initialise_readouts(**sample)` starts each `V'_l` at the top `r` directions of the
            signal its readout receives instead of at random (docs/initialisation.md).
        lite_rank (`int`, *optional*):
            TOAST-Lite: keep full-rank down-maps and readouts frozen (identity/zero, or calibrated/pre-tuned values) and
            train rank-`lite_rank` deltas on them. Mutually exclusive with `feedback_rank`.
        train_down (`bool`, *optional*):
            Whether the down-maps `A_l` (or their deltas) train. `None` (default) decides when the adapter is created:
            `False` on a decoder LM (causal attention) unless `variational_loss_weight > 0` (pre-tuning), `True`
            otherwise -- as the reference, which trains them for vision and freezes them for LLaMA's transfer, and as
            measured here (docs/benchmarks.md: with `feature_norm="rms"`, frozen down-maps were ahead of LoRA r=8 and
            the probe on three SmolLM2 tasks, two tweet tasks and BBC headline topics). The value decided is stored in
            the config, so a saved adapter records it.
        train_readout (`bool`):
            Whether the readouts `C_l` (or their deltas) train.
        train_prompt (`bool`):
            Whether the token-selection prompt trains.
        channel_selection (`str`):
            `"identity"` (default; the reference's full TOAST keeps `P = I` frozen and stores nothing), `"full"` (a
            trainable `d x d` matrix initialised to the identity, as in TOAST-Lite) or `"low_rank"`
            (`P = I + U V` with rank `channel_rank`, starting at the identity).
        channel_rank (`int`):
            Rank of `"low_rank"` channel selection.
        down_init (`str`):
            `"identity"` (default) or `"reference"` (truncated normal, std 0.02, as the reference initialises linear
            layers; a chain of such maps shrinks the signal, which is why the reference needs pre-tuning).
            `peft_toast.calibration` (`calibrate_feedback`) replaces either with a closed-form solution.
        readout_init (`str`):
            `"zero"` (default: the adapted model starts exactly at the frozen model) or `"reference"` (truncated
            normal, std 0.02).
        prompt_init (`str`):
            `"data"` (default): the prompt starts as zeros, meaning "not set yet", and the first forward call that the
            adapter steers sets it to the mean direction of that call's pass-1 tokens (the sum of their unit vectors,
            real tokens only, summed over all processes under `torch.distributed`), scaled to norm `sqrt(d)`. The sum of
            that batch's gates is then positive, so the path is open from step 0: with the reference's random prompt,
            every gate `clamp(cos, 0, 1)` of a batch can be 0, and then the prompt, the down-maps and the readouts get
            exactly zero gradient forever. A prompt that was saved or loaded is never replaced. `"random"`: standard
            normal, as the reference (the path may start closed).
        feature_norm (`str`):
            How the pass-1 tokens are scaled before they are fed back. `"none"` (as the reference) feeds the feature as
            it is. `"rms"` divides each token by its root mean square (no gain), so the fed-back signal is scale-free: a
            decoder's pre-norm feature (token norms ~1,000 on SmolLM2, vs ~1-10 at the value inputs) then enters at the
            scale of a ViT's normalised feature. The gates are unchanged (the cosine ignores each token's scale).
            `"auto"` (default) decides when the adapter is created: `"rms"` on a decoder LM (causal attention, whose
            feature is the last block's output before the final norm), `"none"` on every other model (whose feature
            is already normalised). The value decided is stored in the config; adapter files written before `"auto"`
            existed (no `feature_norm` or `train_down` field) load with `"none"` and `True`, as they were trained.
        share_lower_blocks (`bool`):
            `True` (default): pass 2 starts at the lowest steered block. The blocks below it receive no signal, so their
            pass-2 outputs equal pass 1's; pass 2 takes the hidden state entering the lowest steered block from pass 1
            instead of recomputing them. With `layers_to_transform` = the top `k` of `L` blocks, a forward costs
            `1 + k / L` passes instead of 2, and backpropagation runs through `k` blocks. Exact wherever the passes are
            deterministic (eval, no dropout); in training with dropout, pass 2 reuses pass 1's dropout sample below the
            steered blocks. Pass 2 still runs every block when the call asks for all attentions or hidden states.
            With a KV cache (generation), the two passes share the bottom blocks' cache layers: `L + k` layers
            instead of `2L`. `False`: pass 2 recomputes every block, as the reference does (with its own dropout
            sample), and keeps a cache of every block. Steering block 0 (the default) shares nothing.
        variational_loss_weight (`float`):
            Weight of the feedback-reconstruction loss `sum_l MSE(A_l h_l_out, h_l_in)` added to the task loss in
            training, for pre-tuning (0.1 for vision and 0.01 for LLaMA in the reference). `0` (default) for transfer.
        feedback_dropout (`float`):
            Dropout probability on the selected top-layer tokens before they are sent down the feedback path, in
            training only (the analogue of LoRA's `lora_dropout`, which drops the adapter's input); `0` (default) as
            the reference. Eval and generation never drop, so outputs stay exact.
        cosine_eps (`float`):
            Guards the cosine token gate against zero-norm tokens (padding, zero vectors) so it never yields NaN.
        modules_to_save (`list[str]`, *optional*):
            Modules trained and saved in full besides the adapter. `None` (default) picks the task head of a
            classification model (`classifier` / `score`), as PEFT's `SEQ_CLS` task type does; pass `[]` to keep the
            head frozen (without `task_type="SEQ_CLS"`, whose PEFT model always trains the head: the two are refused
            together).
        pretuned_on (`str`, *optional*):
            What the top-down path was pre-tuned on (data, objective, steps), recorded by `peft_toast.pretune` and kept
            by `load_initialisation`, so that a shared adapter's model card says where its prompt and feedback maps
            come from. `None` for an adapter trained from its initialisation.
        base_model_dims (`dict`, *optional*):
            Filled in when the adapter is created: model type, hidden size, number of blocks and attention heads of the
            base model. Loading onto a model that differs warns (`PeftModel.from_pretrained`) or raises
            (`peft_toast.load_toast_adapter`), because the adapter's tensors can fit a different model of the same
            hidden size without fitting its function. Not meant to be set by hand.
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Value projections to steer (names or a regex). None finds them from the architecture registry; "
            "must match exactly one module per block."
        },
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None,
        metadata={"help": "Blocks (0 = bottom, negative from the top) that receive a top-down signal; None = all."},
    )
    feedback_rank: Optional[int] = field(
        default=None,
        metadata={"help": "None = full-rank feedback maps; r = low-rank A_l = I + U V and C_l = U' V' of rank r."},
    )
    lite_rank: Optional[int] = field(
        default=None,
        metadata={"help": "TOAST-Lite: frozen full-rank feedback maps plus trainable deltas of this rank."},
    )
    train_down: Optional[bool] = field(
        default=None,
        metadata={
            "help": "Whether the down-maps A_l (or their deltas) train; None = False on a decoder LM in transfer "
            "(variational_loss_weight 0), True otherwise."
        },
    )
    train_readout: bool = field(default=True, metadata={"help": "Whether the readouts C_l (or their deltas) train."})
    train_prompt: bool = field(default=True, metadata={"help": "Whether the token-selection prompt trains."})
    channel_selection: str = field(
        default="identity",
        metadata={"help": "Channel selection P: 'identity' (frozen, stores nothing), 'full' or 'low_rank'."},
    )
    channel_rank: int = field(default=4, metadata={"help": "Rank of 'low_rank' channel selection."})
    down_init: str = field(
        default="identity", metadata={"help": "Initialisation of the down-maps A_l: 'identity' or 'reference'."}
    )
    readout_init: str = field(
        default="zero", metadata={"help": "Initialisation of the readouts C_l: 'zero' (exact start) or 'reference'."}
    )
    prompt_init: str = field(
        default="data",
        metadata={
            "help": "Initialisation of the prompt: 'data' (the mean direction of the first batch's pass-1 tokens: the "
            "path starts open) or 'random' (standard normal, as the reference)."
        },
    )
    feature_norm: str = field(
        default="auto",
        metadata={
            "help": "Scaling of the fed-back pass-1 tokens: 'none' (as the reference), 'rms' (scale-free) or 'auto' "
            "('rms' on a decoder LM, 'none' otherwise)."
        },
    )
    share_lower_blocks: bool = field(
        default=True,
        metadata={
            "help": "Pass 2 starts at the lowest steered block, taking the hidden state below it from pass 1 (exact "
            "in eval); False recomputes every block, as the reference."
        },
    )
    variational_loss_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the feedback-reconstruction loss added in training (pre-tuning); 0 = off."},
    )
    feedback_dropout: float = field(
        default=0.0,
        metadata={"help": "Dropout on the selected tokens sent down the feedback path, in training only; 0 = off."},
    )
    cosine_eps: float = field(default=1e-6, metadata={"help": "Epsilon of the cosine token gate (NaN guard)."})
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Modules trained and saved besides the adapter. None = the head of a classification model; "
            "[] = none."
        },
    )
    pretuned_on: Optional[str] = field(
        default=None,
        metadata={"help": "What the top-down path was pre-tuned on (recorded by peft_toast.pretune); None = not."},
    )
    base_model_dims: Optional[dict] = field(
        default=None,
        metadata={"help": "Recorded on creation: the base model's type, hidden size, blocks and heads (load check)."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = TOAST_PEFT_TYPE
        self._validate()

    def _validate(self) -> None:
        if self.target_modules is not None and not isinstance(self.target_modules, (str, list, set, tuple)):
            raise ValueError(
                f"`target_modules` must be None, a string (name or regex) or a list of names, got "
                f"{type(self.target_modules).__name__}. Leave it None to find the value projections automatically."
            )
        if isinstance(self.target_modules, (list, set, tuple)):
            if not self.target_modules or not all(isinstance(name, str) and name for name in self.target_modules):
                raise ValueError(
                    "`target_modules` must be a non-empty list of module names; leave it None to find the value "
                    "projections automatically."
                )
            self.target_modules = sorted(set(self.target_modules))
        layers = self.layers_to_transform
        if isinstance(layers, int) and not isinstance(layers, bool):
            self.layers_to_transform = layers = [layers]
        if layers is not None:
            if isinstance(layers, (tuple, set)):
                self.layers_to_transform = layers = sorted(layers)
            if not isinstance(layers, list) or not layers or not all(_is_int(i) for i in layers):
                raise ValueError(
                    f"`layers_to_transform` must be None (all blocks), an int or a non-empty list of block indices, "
                    f"got {layers!r}."
                )
            if len(set(layers)) != len(layers):
                raise ValueError(f"`layers_to_transform` lists a block twice: {layers!r}. List each block once.")
        for name in ("feedback_rank", "lite_rank"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"`{name}` must be None or a positive integer, got {value!r}.")
        if self.feedback_rank is not None and self.lite_rank is not None:
            raise ValueError(
                "`feedback_rank` and `lite_rank` are mutually exclusive: low-rank feedback factors the maps, "
                "TOAST-Lite keeps them full-rank and frozen with low-rank deltas. Set only one of them."
            )
        if self.train_down is not None and not isinstance(self.train_down, bool):
            raise ValueError(
                f"`train_down` must be True, False or None (decided by the model: False on a decoder LM in transfer), "
                f"got {self.train_down!r}."
            )
        for name in ("train_readout", "train_prompt", "share_lower_blocks"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")
        _check_choice("channel_selection", self.channel_selection, CHANNEL_SELECTION_CHOICES)
        _check_choice("down_init", self.down_init, DOWN_INIT_CHOICES)
        _check_choice("readout_init", self.readout_init, READOUT_INIT_CHOICES)
        _check_choice("prompt_init", self.prompt_init, PROMPT_INIT_CHOICES)
        _check_choice("feature_norm", self.feature_norm, FEATURE_NORM_CHOICES)
        if not _is_int(self.channel_rank) or self.channel_rank < 1:
            raise ValueError(f"`channel_rank` must be a positive integer, got {self.channel_rank!r}.")
        if (
            not isinstance(self.variational_loss_weight, (int, float))
            or isinstance(self.variational_loss_weight, bool)
            or not self.variational_loss_weight >= 0
            or self.variational_loss_weight == float("inf")
        ):
            raise ValueError(
                f"`variational_loss_weight` must be a finite number >= 0 (0 disables it), got "
                f"{self.variational_loss_weight!r}."
            )
        if (
            not isinstance(self.feedback_dropout, (int, float))
            or isinstance(self.feedback_dropout, bool)
            or not 0 <= self.feedback_dropout < 1
        ):
            raise ValueError(
                f"`feedback_dropout` must be a probability in [0, 1), such as 0.1 (0 disables it), got "
                f"{self.feedback_dropout!r}."
            )
        if (
            not isinstance(self.cosine_eps, (int, float))
            or isinstance(self.cosine_eps, bool)
            or not 0 < self.cosine_eps < float("inf")
        ):
            raise ValueError(f"`cosine_eps` must be a finite positive number such as 1e-6, got {self.cosine_eps!r}.")
        if self.modules_to_save is not None and (
            not isinstance(self.modules_to_save, (list, tuple))
            or not all(isinstance(name, str) and name for name in self.modules_to_save)
        ):
            raise ValueError(
                f"`modules_to_save` must be None (the task head of a classification model), [] or a list of module "
                f"names, got {self.modules_to_save!r}."
            )
        if self.modules_to_save is not None and len(self.modules_to_save) == 0 and str(self.task_type) == "SEQ_CLS":
            raise ValueError(
                "`modules_to_save=[]` asks for a frozen head, but `task_type='SEQ_CLS'` makes PEFT train and save the "
                "classification head (`classifier` / `score`) whatever `modules_to_save` says. Drop `task_type` to keep "
                "the head frozen, or drop `modules_to_save=[]` to train it."
            )
        if self.pretuned_on is not None and not isinstance(self.pretuned_on, str):
            raise ValueError(
                f"`pretuned_on` must be None or a description such as 'fashion-mnist classes 0-4, 500 steps', got "
                f"{self.pretuned_on!r}."
            )
        if self.base_model_dims is not None and (
            not isinstance(self.base_model_dims, dict)
            or not all(
                isinstance(key, str) and isinstance(value, (int, str)) and not isinstance(value, bool)
                for key, value in self.base_model_dims.items()
            )
        ):
            raise ValueError(
                f"`base_model_dims` must be None or a dict of sizes such as {{'hidden_size': 768, 'num_blocks': 12}}, "
                f"got {self.base_model_dims!r}. It is recorded automatically; remove it from adapter_config.json "
                f"rather than editing it."
            )

    @classmethod
    def check_kwargs(cls, **kwargs):
        # A config read from a file (`from_pretrained`): files written before `feature_norm="auto"` and
        # `train_down=None` existed lack these fields, and their adapters were trained with the old defaults.
        kwargs = super().check_kwargs(**kwargs)
        for name, value in LEGACY_DEFAULTS.items():
            kwargs.setdefault(name, value)
        return kwargs

    def resolve_automatic(self, causal: bool) -> None:
        """Replace the automatic settings (`feature_norm="auto"`, `train_down=None`) in place by what they mean for a
        model whose attention is causal (`causal=True`: a decoder LM) or not. Called when the adapter is created, so
        the saved config records the values the adapter was trained with."""
        if self.feature_norm == "auto":
            self.feature_norm = "rms" if causal else "none"
        if self.train_down is None:
            self.train_down = not causal or self.variational_loss_weight > 0


# The values that `ToastConfig` fields added with an automatic default had before: what a file without them means.
LEGACY_DEFAULTS = {"feature_norm": "none", "train_down": True}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}, got {value!r}.")
