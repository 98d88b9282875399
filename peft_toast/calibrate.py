"""The command line `python -m peft_toast.calibrate --model ... --data ... --output DIR`: calibrates the down-maps of
a TOAST adapter in closed form (`peft_toast.calibration`) and writes an ordinary TOAST adapter folder, from which
`load_initialisation` (`peft_toast.loading`) starts a new task.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Optional

from .calibration import (
    DEFAULT_RIDGE,
    PRODUCT_CHUNK,
    BlockStatistics,
    CalibrationResult,
    calibrate_feedback,
    collect_block_statistics,
    least_squares_map,
    reconstruction_error,
    reduced_rank_map,
)
from .cli import (
    AUTOCAST_DTYPES,
    OFFLINE_DATA,
    OFFLINE_MODELS,
    add_data_arguments,
    cli_parser,
    examples_from_args,
    load_examples,
    load_model_and_processor,
    make_batches,
    model_and_processor_from_args,
    resolve_model_path,
    toast_config_from_args,
)
from .io import atomic_save_pretrained
from .loading import load_initialisation

# Besides `main`, the names that lived here before the split by job: kept for old imports.
__all__ = [
    "AUTOCAST_DTYPES",
    "DEFAULT_RIDGE",
    "OFFLINE_DATA",
    "OFFLINE_MODELS",
    "PRODUCT_CHUNK",
    "BlockStatistics",
    "CalibrationResult",
    "add_data_arguments",
    "calibrate_feedback",
    "cli_parser",
    "collect_block_statistics",
    "examples_from_args",
    "least_squares_map",
    "load_examples",
    "load_initialisation",
    "load_model_and_processor",
    "main",
    "make_batches",
    "model_and_processor_from_args",
    "reconstruction_error",
    "reduced_rank_map",
    "resolve_model_path",
    "toast_config_from_args",
]


def main(argv: Optional[Sequence[str]] = None) -> CalibrationResult:
    parser = cli_parser(
        "calibrate",
        "Calibrate the down-maps of a TOAST adapter in closed form (one pass of the frozen model over calibration "
        "data) and save it as an ordinary TOAST adapter folder.",
    )
    parser.add_argument(
        "--ridge",
        type=float,
        default=DEFAULT_RIDGE,
        help=f"Relative ridge lambda / (trace(G) / d) (default {DEFAULT_RIDGE}).",
    )
    parser.add_argument(
        "--autocast",
        choices=sorted(AUTOCAST_DTYPES),
        default=None,
        help="Run the statistics pass under torch.autocast in this dtype (bf16: ~2x faster on a GPU or a CPU with "
        "bfloat16 units). Default: the model's own dtype.",
    )
    args = parser.parse_args(argv)
    from peft import get_peft_model

    base_model, processor = model_and_processor_from_args(args)
    peft_model = get_peft_model(base_model, toast_config_from_args(args))
    batches = make_batches(examples_from_args(args), processor, batch_size=args.batch_size, max_length=args.max_length)
    autocast_dtype = AUTOCAST_DTYPES[args.autocast] if args.autocast else None
    result = calibrate_feedback(peft_model, batches, ridge=args.ridge, autocast_dtype=autocast_dtype)
    atomic_save_pretrained(peft_model, args.output)
    print(
        f"Calibrated {len(peft_model.base_model.toast_layers(peft_model.active_adapter))} down-maps on "
        f"{result.num_tokens} tokens in {result.seconds:.1f} s: variational loss {result.loss_before:.4g} -> "
        f"{result.loss_after:.4g}. Adapter saved to {os.path.abspath(args.output)}."
    )
    return result


if __name__ == "__main__":
    main()
