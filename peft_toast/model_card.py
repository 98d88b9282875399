"""The model card of a TOAST adapter: the README.md that `save_pretrained` and `push_to_hub` write next to it.

A TOAST adapter is useless to someone who does not know that it needs `import peft_toast`, which base model it steers
and how it was set up, so its card says exactly that: that it is a TOAST adapter, the base model, the TOAST settings,
the parameter counts and the code that loads it.

How it gets there. PEFT writes README.md in `PeftModel.create_or_update_model_card(output_dir)`, a method of the
`PeftModel`; the TOAST tuner never sees the `PeftModel` that wraps it, so PEFT offers no per-model hook. Instead,
`patch_peft_model()` (run once when `peft_toast` is imported; the patch is `upstream.extend_peft_model_card`) wraps two
`PeftModel` methods, and each wrapper first calls PEFT's own method unchanged and does nothing else unless the model
holds a TOAST adapter:

- `create_or_update_model_card` (called by `save_pretrained`): adds the TOAST section to the card PEFT just wrote;
- `_upload_modified_files` (called by `push_to_hub` right before the upload): transformers' `push_to_hub` overwrites
  the README.md that `save_pretrained` wrote with the repository's existing card (or a blank template), so the wrapper
  writes PEFT's and TOAST's content into that card again, this time with the repository id in the loading code.

The TOAST section sits between two HTML comments, so saving again replaces it instead of appending a second copy, and
whatever else the card holds (text written by hand on the Hub, PEFT's framework versions) is kept.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Optional

import transformers
from huggingface_hub import ModelCard, ModelCardData
from peft import PeftConfig, PeftModel
from peft.utils import get_peft_model_state_dict

from .config import ToastConfig
from .upstream import extend_peft_model_card

CARD_TAGS = ("toast", "peft-toast")
SECTION_START = "<!-- peft-toast:start -->"
SECTION_END = "<!-- peft-toast:end -->"
# What the loading code says where the adapter's own location is not known (`save_pretrained` to a local folder).
ADAPTER_PLACEHOLDER = "path/to/this/adapter"
_SECTION = re.compile(re.escape(SECTION_START) + r".*?" + re.escape(SECTION_END), flags=re.DOTALL)
_PEFT_FIELDS = {field.name for field in dataclasses.fields(PeftConfig)}


def toast_adapter_names(model: PeftModel) -> list[str]:
    """The names of the TOAST adapters of `model`, in the order they were added."""
    return [name for name, config in model.peft_config.items() if isinstance(config, ToastConfig)]


def adapter_parameter_counts(model: PeftModel, adapter_name: str) -> dict[str, int]:
    """The sizes of one TOAST adapter, counted on the tensors that `save_pretrained` writes.

    Returns `{"stored": ..., "trainable": ..., "head": ...}`: the elements saved for the adapter; those that train under
    its config (whatever mode the model is in now, so a card written after loading for inference still says how the
    adapter was trained); and those of `modules_to_save` (the task head), which are included in both.
    """
    config = model.peft_config[adapter_name]
    state_dict = get_peft_model_state_dict(model, adapter_name=adapter_name)

    def trains(key: str) -> bool:
        if "toast_down" in key or "toast_readout" in key:
            if config.lite_rank is not None and key.endswith(".weight"):
                return False  # TOAST-Lite's frozen full-rank map; only its low-rank delta trains
            return config.train_down if "toast_down" in key else config.train_readout
        if "toast_prompt" in key:
            return config.train_prompt
        return True  # channel selection and the task head

    return {
        "stored": sum(tensor.numel() for tensor in state_dict.values()),
        "trainable": sum(tensor.numel() for key, tensor in state_dict.items() if trains(key)),
        "head": sum(tensor.numel() for key, tensor in state_dict.items() if "toast_" not in key),
    }


def base_model_id(model: PeftModel, adapter_name: str) -> str:
    """The Hub id or path the base model was loaded from, or `""` for a model built from a config."""
    config = model.peft_config[adapter_name]
    return config.base_model_name_or_path or getattr(model.get_base_model(), "name_or_path", "") or ""


def loading_code(model: PeftModel, adapter_id: Optional[str] = None) -> str:
    """Python code that loads `model`'s TOAST adapters onto their base model, `import peft_toast` included."""
    names = toast_adapter_names(model)
    base = model.get_base_model()
    cls = type(base)
    if getattr(transformers, cls.__name__, None) is cls:
        import_line = f"from transformers import {cls.__name__}"
    else:
        import_line = f"from {cls.__module__} import {cls.__name__}"
    base_id = base_model_id(model, names[0]) or "<the base model>"
    base_kwargs = ""
    if cls.__name__.endswith("Classification") and getattr(base.config, "num_labels", None):
        base_kwargs = f", num_labels={base.config.num_labels}"  # the adapter holds a head of this size
    adapter = adapter_id or ADAPTER_PLACEHOLDER
    first, others = names[0], names[1:]
    first_kwargs = "" if first == "default" else f', subfolder="{first}", adapter_name="{first}"'
    lines = [
        "import peft_toast  # registers TOAST with PEFT; without it loading fails with KeyError: 'TOAST'",
        "from peft import PeftModel",
        import_line,
        "",
        f'base = {cls.__name__}.from_pretrained("{base_id}"{base_kwargs})',
        f'model = PeftModel.from_pretrained(base, "{adapter}"{first_kwargs})',
    ]
    lines += [f'model.load_adapter("{adapter}", adapter_name="{name}", subfolder="{name}")' for name in others]
    return "\n".join(lines)


def card_section(model: PeftModel, adapter_id: Optional[str] = None) -> str:
    """The TOAST section of the model card (Markdown, between `SECTION_START` and `SECTION_END`)."""
    from . import __version__

    names = toast_adapter_names(model)
    base_id = base_model_id(model, names[0])
    base_cls = type(model.get_base_model()).__name__
    if base_id:
        base_line = f"`{base_id}` (`{base_cls}`)"
        if os.path.isabs(base_id):
            base_line += "; a local folder, so name the same model's Hub id here when you share the adapter"
    else:
        base_line = f"a `{base_cls}` built from its config (no Hub id or folder is recorded; fill it in)"
    lines = [
        SECTION_START,
        "## TOAST adapter",
        "",
        "This is a [TOAST](https://arxiv.org/abs/2305.15542) (Transfer Learning via Attention Steering) adapter for "
        f"[PEFT](https://github.com/huggingface/peft), made with `peft-toast` {__version__}. It steers a frozen base "
        "model: every forward call runs the model once, gates the top-layer tokens with a learned task prompt, sends "
        "the selection back down a linear feedback path and runs the model a second time with that feedback added to "
        "the values of every attention block. It cannot be merged into the base weights, and inference costs about "
        "two forward passes.",
        "",
        f"- **Base model:** {base_line}",
        *(
            f"- **Pre-tuned on** (adapter `{name}`): {model.peft_config[name].pretuned_on}"
            for name in names
            if model.peft_config[name].pretuned_on
        ),
        "",
        "### Load it",
        "",
        "```python",
        loading_code(model, adapter_id),
        "```",
        "",
        "`peft_toast.load_toast_adapter(base, ...)` loads it the same way after checking that the adapter fits the base "
        "model.",
    ]
    for name in names:
        config = model.peft_config[name]
        counts = adapter_parameter_counts(model, name)
        head = (
            f", of which {counts['head']:,} in the task head ({', '.join(config.modules_to_save)})"
            if counts["head"]
            else ""
        )
        lines += [
            "",
            "### Settings" if len(names) == 1 else f"### Adapter `{name}` ({_location(name)})",
            "",
            f"- **Parameters:** {counts['trainable']:,} trainable, {counts['stored']:,} stored{head}.",
            f"- **Task type:** `{config.task_type}`",
            "",
            "| setting | value | meaning |",
            "|---|---|---|",
        ]
        for field in dataclasses.fields(ToastConfig):
            if field.name in _PEFT_FIELDS:
                continue
            meaning = field.metadata.get("help", "").replace("|", "\\|")
            lines.append(f"| `{field.name}` | `{getattr(config, field.name)!r}` | {meaning} |")
    lines.append(SECTION_END)
    return "\n".join(lines)


def _location(adapter_name: str) -> str:
    """Where `save_pretrained` puts an adapter's files: the "default" adapter at the top, the others in subfolders."""
    return "at the top level" if adapter_name == "default" else f"in the subfolder `{adapter_name}`"


def update_model_card(model: PeftModel, output_dir: str, adapter_id: Optional[str] = None) -> None:
    """Add (or replace) the TOAST section and tags in `output_dir/README.md`, creating the card if there is none."""
    path = os.path.join(output_dir, "README.md")
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard.from_template(ModelCardData())
    card.data.tags = sorted(set(card.data.tags or []) | set(CARD_TAGS))
    section = card_section(model, adapter_id)
    text = card.text
    if _SECTION.search(text):
        text = _SECTION.sub(lambda _: section, text, count=1)
    else:
        # Right under the card's title, where a reader looks first; at the top if the card has no title.
        title = re.search(r"^# .*$", text, flags=re.MULTILINE)
        at = title.end() if title else 0
        text = f"{text[:at]}\n\n{section}\n\n{text[at:].lstrip(chr(10))}" if title else f"{section}\n\n{text}"
    card.text = text
    card.save(path)


def patch_peft_model() -> None:
    """Make `PeftModel.save_pretrained` and `PeftModel.push_to_hub` write the TOAST card (idempotent; PEFT's behaviour
    for every other method is unchanged). The patch itself is `upstream.extend_peft_model_card`."""
    extend_peft_model_card(toast_adapter_names, update_model_card)
