"""Instruction-tune a causal LM with TOAST and `transformers.Trainer`, with the loss on the responses only.

Each labelled text becomes an instruction ("...is the sentiment positive or negative?") and a one-word response; the
prompt tokens get label -100, so only the response (and its end-of-turn token) is learned. The script reports the
accuracy of the first response token (the logits of the label words after the prompt) before and after training.

Offline defaults: SmolLM2-135M-Instruct (a LlamaForCausalLM, from `peft_toast.assets`) on labelled tweet sentiment.

    python examples/train_causal_lm.py --max-steps 20 --train-size 160
    python examples/train_causal_lm.py --load-in-4bit --feedback-rank 8   # QLoRA-style: a 4-bit NF4 base (bitsandbytes)
    python examples/train_causal_lm.py --model meta-llama/Llama-3.2-1B-Instruct --dataset imdb \
        --gradient-checkpointing --max-steps 500
"""

from __future__ import annotations

import argparse

import torch
from example_utils import (
    TRAINER_CHECKPOINT_MARKER,
    add_causal_lm_argument,
    add_seed_and_resume_arguments,
    causal_lm_path,
    encode_instruction,
    evaluation_split,
    instruction_prompt,
    load_dataset_splits,
    resolve_resume,
    save_adapter,
    subset,
    training_arguments,
)
from peft import get_peft_model
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Trainer,
    set_seed,
)

from peft_toast import ToastConfig
from peft_toast.cli import script_parser

INSTRUCTION = "Tweet: {text}\n\nIs the sentiment of this tweet {choices}? Answer with one word."


def parse_args(argv=None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    add_causal_lm_argument(parser)
    parser.add_argument(
        "--dataset",
        default=None,
        help="Hub dataset name or a save_to_disk folder with train and test/validation splits, a text column and a ClassLabel column (default: offline tweets).",
    )
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--train-size", type=int, default=160, help="Training examples (a random subset).")
    parser.add_argument("--eval-size", type=int, default=100, help="Evaluation examples (a random subset).")
    parser.add_argument("--max-length", type=int, default=128, help="Tokens per example, prompt and response.")
    parser.add_argument("--output-dir", default="outputs/causal-lm-toast")
    parser.add_argument("--max-steps", type=int, default=20, help="Optimizer steps.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=1e-5,
        help="Much lower than for vision. With the decoder default (`feature_norm='rms'`, frozen down-maps) the best "
        "rates on SmolLM2 tweet classification were 3e-6 and 3e-5 (docs/training.md); with `feature_norm='none'` "
        "1e-4 made the loss spike. Sweep it on your validation split.",
    )
    parser.add_argument("--save-steps", type=int, default=10, help="Write a checkpoint every this many steps.")
    parser.add_argument("--logging-steps", type=int, default=5)
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="Recompute activations in the backward pass (non-reentrant) to save memory.",
    )
    parser.add_argument(
        "--load-in-4bit",
        action="store_true",
        help="QLoRA-style: load the base in 4-bit NF4 with double quantisation (bitsandbytes) and prepare it with "
        "`peft.prepare_model_for_kbit_training`; the adapter stays in fp32.",
    )
    parser.add_argument(
        "--feedback-rank",
        type=int,
        default=None,
        help="Low-rank feedback maps (`ToastConfig.feedback_rank`): LoRA-sized adapters, for large models.",
    )
    add_seed_and_resume_arguments(parser)
    return parser.parse_args(argv)


def load_base_model(args: argparse.Namespace):
    """The causal LM to adapt: as saved, or (`--load-in-4bit`) quantized to 4-bit NF4 the way QLoRA loads it."""
    if not args.load_in_4bit:
        return AutoModelForCausalLM.from_pretrained(args.model)
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=quantization)
    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},  # TOAST's signals need non-reentrant recomputation
    )


def load_text_splits(args: argparse.Namespace):
    """Train and evaluation splits with a text column and a `ClassLabel` column."""
    if args.dataset is None:
        from peft_toast.assets import load_tweet_sentiment

        splits = load_tweet_sentiment(binary=True, seed=args.seed)
    else:
        splits = load_dataset_splits(args.dataset)
    train = subset(splits["train"], args.train_size, args.seed)
    evaluation = subset(evaluation_split(splits), args.eval_size, args.seed)
    for column in (args.text_column, args.label_column):
        if column not in train.column_names:
            raise ValueError(
                f"The dataset has columns {train.column_names} but no {column!r}; name its text and label columns with --text-column and --label-column."
            )
    return train, evaluation


@torch.no_grad()
def first_token_accuracy(
    model, tokenizer, prompts: list[str], labels: list[int], label_words: list[str], batch_size: int
) -> float:
    """How often the label word's first token has the highest logit, among the label words, right after the prompt."""
    word_ids = [tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in label_words]
    if len(set(word_ids)) != len(word_ids):
        raise ValueError(f"The label words {label_words} share their first token; pick words that do not.")
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in tqdm(range(0, len(prompts), batch_size), desc="first-token accuracy", leave=False):
        encoded = [
            tokenizer(prompt, add_special_tokens=not tokenizer.chat_template)["input_ids"]
            for prompt in prompts[start : start + batch_size]
        ]
        lengths = torch.tensor([len(ids) for ids in encoded])
        # Right padding: every prompt starts at position 0, so its logits do not depend on the padding.
        batch = tokenizer.pad({"input_ids": encoded}, padding=True, padding_side="right", return_tensors="pt").to(
            device
        )
        logits = model(**batch).logits  # (B, T, vocab)
        last = logits[torch.arange(len(encoded)), lengths - 1][:, word_ids]  # (B, num_labels)
        correct += (last.argmax(-1).cpu() == torch.tensor(labels[start : start + batch_size])).sum().item()
    return correct / len(prompts)


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.model = causal_lm_path(args.model)
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    train, evaluation = load_text_splits(args)
    label_words = train.features[args.label_column].names
    choices = " or ".join(label_words)

    def prompt_of(text: str) -> str:
        return instruction_prompt(tokenizer, INSTRUCTION.format(text=text, choices=choices))

    train = train.map(
        lambda example: encode_instruction(
            tokenizer, prompt_of(example[args.text_column]), label_words[example[args.label_column]], args.max_length
        ),
        remove_columns=train.column_names,
        desc="instruction format",
    )
    eval_prompts = [prompt_of(text) for text in evaluation[args.text_column]]
    eval_labels = evaluation[args.label_column]

    model = get_peft_model(load_base_model(args), ToastConfig(task_type="CAUSAL_LM", feedback_rank=args.feedback_rank))
    model.print_trainable_parameters()
    before = first_token_accuracy(model, tokenizer, eval_prompts, eval_labels, label_words, args.batch_size)

    training_args = training_arguments(
        args,
        activation_checkpointing=args.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},  # TOAST's signals need non-reentrant recomputation
    )
    # Pads input ids with the pad token and labels with -100, so padding is never learned.
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=training_args, train_dataset=train, data_collator=collator)
    resume = resolve_resume(args.resume_from_checkpoint, args.output_dir, TRAINER_CHECKPOINT_MARKER)
    trainer.train(resume_from_checkpoint=resume)

    after = first_token_accuracy(model, tokenizer, eval_prompts, eval_labels, label_words, args.batch_size)
    adapter_dir = save_adapter(model, args.output_dir)
    print(
        f"first-token accuracy on {len(eval_prompts)} held-out examples: {before:.4f} before, {after:.4f} after "
        f"training; adapter saved to {adapter_dir}"
    )
    return {"accuracy_before": before, "accuracy_after": after}


if __name__ == "__main__":
    main()
