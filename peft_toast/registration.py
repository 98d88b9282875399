"""Registering TOAST with PEFT without modifying PEFT.

PEFT's public `register_peft_method` only accepts names that are already members of `peft.utils.PeftType`, a
`str`-enum. A plugin therefore adds its member at runtime first. That touches enum internals, so it is kept to one small,
idempotent function that is unit-tested on every supported Python.
"""

from __future__ import annotations

import sys

from peft.utils import PeftType, register_peft_method

TOAST_NAME = "toast"


def add_peft_type(name: str) -> PeftType:
    """Return `PeftType[name]`, adding `name` as a new member of the enum if it is missing (idempotent)."""
    if name in PeftType.__members__:
        return PeftType[name]
    if sys.version_info >= (3, 13):
        # Python 3.13 added a supported way to extend an enum after its creation.
        member = str.__new__(PeftType, name)
        member._name_, member._value_ = name, name
        PeftType._add_member_(name, member)
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_, member._value_ = name, name
    member.__objclass__ = PeftType
    # Order matters: the enum metaclass refuses to set an attribute that is already a member name.
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


TOAST_PEFT_TYPE = add_peft_type(TOAST_NAME.upper())


def register() -> None:
    """Register TOAST with PEFT once; later calls (re-imports, reloads) are no-ops."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    from .config import ToastConfig
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
