"""peft-toast: TOAST (Transfer Learning via Attention Steering) as a Hugging Face PEFT method.

Importing this package registers the method with PEFT, so that `get_peft_model(model, ToastConfig())` and
`PeftModel.from_pretrained(base, "a-toast-adapter")` work.
"""

from .architectures import ToastArchitecture, register_architecture
from .config import ToastConfig
from .io import atomic_save_pretrained
from .layer import ToastLayer
from .loading import check_adapter, load_toast_adapter
from .model import ToastModel
from .registration import register

register()

__all__ = [
    "ToastArchitecture",
    "ToastConfig",
    "ToastLayer",
    "ToastModel",
    "atomic_save_pretrained",
    "check_adapter",
    "load_toast_adapter",
    "register_architecture",
]

__version__ = "0.1.0"
