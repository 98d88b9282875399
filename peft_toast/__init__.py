"""peft-toast: TOAST (Transfer Learning via Attention Steering) as a Hugging Face PEFT method.

Importing this package registers the method with PEFT, so that `get_peft_model(model, ToastConfig())` and
`PeftModel.from_pretrained(base, "a-toast-adapter")` work.
"""

from .architectures import ToastArchitecture, register_architecture
from .calibration import calibrate_feedback
from .config import ToastConfig
from .io import atomic_save_pretrained
from .layer import ToastLayer, ToastSelection
from .loading import check_adapter, load_initialisation, load_toast_adapter
from .model import ToastModel
from .optim import create_toast_optimizer, toast_parameter_groups
from .pretuning import pretune_top_down
from .registration import register

register()

__all__ = [
    "ToastArchitecture",
    "ToastConfig",
    "ToastLayer",
    "ToastModel",
    "ToastSelection",
    "atomic_save_pretrained",
    "calibrate_feedback",
    "check_adapter",
    "create_toast_optimizer",
    "load_initialisation",
    "load_toast_adapter",
    "pretune_top_down",
    "register_architecture",
    "toast_parameter_groups",
]

__version__ = "0.3.0"
