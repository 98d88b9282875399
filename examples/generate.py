"""Generate text with a causal LM and, optionally, a TOAST adapter; print the response and the decoding speed.

The prompt goes through the tokenizer's chat template (or the plain instruction format of `train_causal_lm.py` when the
tokenizer has none), exactly as `train_causal_lm.py` formats its training prompts, so an adapter trained there is
prompted the way it learned. Decoding with a TOAST adapter keeps two KV caches (pass 1 and pass 2) and is exact: the
tokens equal those of decoding without a cache (`--no-cache`, much slower), see docs/generation.md.

Offline default: SmolLM2-135M-Instruct (from `peft_toast.assets`).

    python examples/generate.py --prompt "What is the capital of France?"
    python examples/generate.py --adapter outputs/causal-lm-toast --prompt "Tweet: what a lovely day ..."
    python examples/generate.py --model meta-llama/Llama-3.2-1B-Instruct --adapter my-toast-adapter --do-sample
"""

from __future__ import annotations

import argparse
import time

import torch
from example_utils import add_causal_lm_argument, causal_lm_path, instruction_prompt
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer, set_seed

import peft_toast  # noqa: F401  (registers TOAST with PEFT, so that PeftModel.from_pretrained loads TOAST adapters)
from peft_toast.cli import script_parser

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    add_causal_lm_argument(parser)
    parser.add_argument(
        "--adapter", default=None, help="Folder (or Hub id) of a TOAST adapter saved with save_pretrained (optional)."
    )
    parser.add_argument("--prompt", default="What is the capital of France?", help="The user's message.")
    parser.add_argument(
        "--no-chat-template", action="store_true", help="Use the prompt as raw text, without any template."
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--do-sample", action="store_true", help="Sample instead of greedy decoding.")
    parser.add_argument("--temperature", type=float, default=0.7, help="Sampling temperature (with --do-sample).")
    parser.add_argument("--top-p", type=float, default=0.9, help="Nucleus sampling mass (with --do-sample).")
    parser.add_argument("--no-cache", action="store_true", help="Recompute the whole sequence at every step.")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="Weights' dtype (default fp32).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def load(args: argparse.Namespace):
    """The tokenizer and the model (with the adapter, if one is given), in eval mode on `args.device`."""
    path = causal_lm_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[args.dtype])
    if args.adapter is not None:
        model = PeftModel.from_pretrained(model, args.adapter)
    return tokenizer, model.to(args.device).eval()


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    set_seed(args.seed)
    tokenizer, model = load(args)
    text = args.prompt if args.no_chat_template else instruction_prompt(tokenizer, args.prompt)
    # A chat template already holds every special token; raw text gets the tokenizer's own (e.g. BOS).
    special_tokens = args.no_chat_template or not tokenizer.chat_template
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=special_tokens).to(args.device)
    sampling = {"temperature": args.temperature, "top_p": args.top_p} if args.do_sample else {}

    print(f"model: {args.model or 'SmolLM2-135M-Instruct (offline)'}; adapter: {args.adapter or 'none'}")
    print(f"prompt ({inputs.input_ids.shape[1]} tokens): {args.prompt}\n")
    start = time.perf_counter()
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            use_cache=not args.no_cache,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
            do_sample=args.do_sample,
            **sampling,
        )
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    new_tokens = output.shape[1] - inputs.input_ids.shape[1]
    print(f"\n{new_tokens} new tokens in {seconds:.2f} s: {new_tokens / seconds:.1f} tokens/s (prefill included)")


if __name__ == "__main__":
    main()
