"""Registering TOAST with PEFT without modifying PEFT.

PEFT's public `register_peft_method` only accepts names that are already members of `peft.utils.PeftType`, a
`str`-enum, so `peft_toast.config` adds the member first (`upstream.add_peft_type`, unit-tested on every supported
Python). `register` then hands PEFT the config and tuner classes; it imports them when called, so that after a module
reload (notebook autoreload) it points PEFT at the new classes.
"""

from __future__ import annotations

from peft.utils import register_peft_method

from .config import TOAST_NAME, TOAST_PEFT_TYPE
from .upstream import add_peft_type

__all__ = ["TOAST_NAME", "TOAST_PEFT_TYPE", "add_peft_type", "register"]


def register() -> None:
    """Register TOAST with PEFT once; later calls (re-imports, reloads) are no-ops."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    from .config import ToastConfig  # at call time: the current classes, also after a reload
    from .model import ToastModel
    from .model_card import patch_peft_model

    patch_peft_model()  # the model card of a TOAST adapter (idempotent)
    if PEFT_TYPE_TO_TUNER_MAPPING.get(TOAST_PEFT_TYPE) is ToastModel:
        return
    if TOAST_PEFT_TYPE in PEFT_TYPE_TO_TUNER_MAPPING:
        # A reloaded module defines new classes: point PEFT at them instead of raising "already registered".
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        PEFT_TYPE_TO_TUNER_MAPPING[TOAST_PEFT_TYPE] = ToastModel
        PEFT_TYPE_TO_CONFIG_MAPPING[TOAST_PEFT_TYPE] = ToastConfig
        return
    register_peft_method(name=TOAST_NAME, config_cls=ToastConfig, model_cls=ToastModel, prefix="toast_")
