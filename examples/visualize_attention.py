"""Show how a TOAST adapter refocuses attention, as figures and numbers.

For the token the head reads (CLS of a ViT, the last token of a causal LM), the last block's attention averaged over
heads is measured with the adapter disabled (the frozen model) and enabled, together with TOAST's token-selection gates.

Images (default): the DINOv2-small ViT (112 px, offline assets) on Fashion-MNIST test images. The figure overlays both
attention maps and the gates on each image; the numbers are the attention entropy and the share of attention on the
object (the patches whose mean pixel value is above --object-threshold: Fashion-MNIST has a black background).

Text (--text): SmolLM2-135M (offline assets) as a sentiment classifier of tweets. The figure shows each token's gate,
the last token's attention to each token, frozen vs TOAST, and the change.

Both work from a saved adapter folder (--adapter); without one, a quick adapter is trained first (a few dozen steps on a
small subset) and saved in --output-dir/adapter.

    python examples/visualize_attention.py
    python examples/visualize_attention.py --adapter outputs/image-classifier-toast/adapter
    python examples/visualize_attention.py --text --train-steps 30
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import numpy as np
import torch
from example_utils import (
    causal_lm_path,
    image_classification_splits,
    image_model_path,
    load_image_classifier,
    save_adapter,
)
from peft import PeftModel, get_peft_model
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    AutoImageProcessor,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    set_seed,
)

from peft_toast import ToastConfig
from peft_toast.cli import expected_load_report, script_parser
from peft_toast.io import atomic_file
from peft_toast.visualize import (
    ImageAttentionMaps,
    attention_entropy,
    attention_mass,
    compare_attention,
    image_attention_maps,
    object_mask,
    plot_image_attention,
    plot_text_attention,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--text", action="store_true", help="Text (tweet sentiment) instead of images.")
    parser.add_argument(
        "--model",
        default=None,
        help="Hub id or local folder of the base model (default: offline "
        "DINOv2-small as a ViT at 112 px; with --text, offline SmolLM2-135M).",
    )
    parser.add_argument(
        "--adapter",
        default=None,
        help="A saved TOAST adapter folder for --model. Without it, a quick "
        "adapter is trained and saved in --output-dir/adapter.",
    )
    parser.add_argument("--output-dir", default="outputs/visualize-attention")
    parser.add_argument("--eval-size", type=int, default=64, help="Test examples the numbers are averaged over.")
    parser.add_argument("--num-figure", type=int, default=4, help="Images in the figure (text: the figure shows one).")
    parser.add_argument(
        "--object-threshold",
        type=float,
        default=0.2,
        help="A patch shows the object when its mean pixel value (in [0, 1]) is above this.",
    )
    parser.add_argument("--train-steps", type=int, default=40, help="Steps of the quick adapter.")
    parser.add_argument("--train-size", type=int, default=640, help="Training examples of the quick adapter.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="Of the quick adapter (default: 1e-3 for images; 3e-5 for text, where SmolLM2's decoder default "
        "(feature_norm='rms', frozen down-maps) had its best rates, 3e-6 to 3e-5, docs/training.md).",
    )
    parser.add_argument("--max-length", type=int, default=48, help="Text: tokens per tweet.")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def quick_train(model: PeftModel, dataset, collate, args: argparse.Namespace) -> None:
    """A few optimizer steps on the trainable (TOAST and head) parameters."""
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, collate_fn=collate, drop_last=True)
    rate = args.learning_rate if args.learning_rate is not None else (3e-5 if args.text else 1e-3)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=rate)
    model.train()
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    progress = tqdm(itertools.islice(batches, args.train_steps), total=args.train_steps, desc="training the adapter")
    for batch in progress:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        progress.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


def batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ---------------------------------------------------------------------------------------------------------- images


def run_images(args: argparse.Namespace) -> dict:
    from peft_toast.assets import load_fashion_mnist

    args.model = image_model_path(args.model)
    image_processor = AutoImageProcessor.from_pretrained(args.model)
    train, _, label_names = image_classification_splits(None, image_processor, args.train_size, 1, args.seed)
    if args.adapter is None:
        model = get_peft_model(load_image_classifier(args.model, label_names), ToastConfig())
        quick_train(model, train, None, args)
        args.adapter = save_quick_adapter(model, args.output_dir)
    model = PeftModel.from_pretrained(load_image_classifier(args.model, label_names), args.adapter).eval()

    test = load_fashion_mnist("test", limit=args.eval_size, seed=args.seed)
    images = np.stack([np.asarray(image, dtype=np.float32) / 255 for image in test["image"]])  # (B, 28, 28)
    chunks = []
    for chunk in tqdm(list(batches(test["image"], args.batch_size)), desc="attention maps"):
        pixel_values = image_processor([image.convert("RGB") for image in chunk], return_tensors="pt")["pixel_values"]
        chunks.append(image_attention_maps(model, pixel_values))  # each map (B, rows, cols)
    maps = ImageAttentionMaps(
        *(torch.cat([getattr(c, name) for c in chunks]) for name in ("frozen", "toast", "gates"))
    )
    masks = object_mask(torch.from_numpy(images), tuple(maps.frozen.shape[1:]), args.object_threshold)

    entropy = {name: attention_entropy(getattr(maps, name)) for name in ("frozen", "toast")}
    mass = {name: attention_mass(getattr(maps, name), masks) for name in ("frozen", "toast")}
    results = {
        "model": args.model,
        "adapter": args.adapter,
        "images": len(images),
        "patches": int(maps.frozen[0].numel()),
        "object_share_of_patches": float(masks.float().mean()),
        "entropy_frozen": float(entropy["frozen"].mean()),
        "entropy_toast": float(entropy["toast"].mean()),
        "mass_on_object_frozen": float(mass["frozen"].mean()),
        "mass_on_object_toast": float(mass["toast"].mean()),
        "share_of_images_more_on_object": float((mass["toast"] > mass["frozen"]).float().mean()),
        "mean_gate_object": float(maps.gates[masks].mean()),
        "mean_gate_background": float(maps.gates[~masks].mean()),
    }
    figure = os.path.join(args.output_dir, "attention_vit.png")
    k = args.num_figure
    with atomic_file(figure, "wb") as f:
        plot_image_attention(
            images[:k],
            ImageAttentionMaps(maps.frozen[:k], maps.toast[:k], maps.gates[:k]),
            f,
            masks=masks[:k],
            labels=[label_names[label] for label in test["label"][:k]],
        )
    print(
        f"CLS attention in the last block over {len(images)} Fashion-MNIST test images "
        f"({results['patches']} patches each; {results['object_share_of_patches']:.0%} of them on the object):"
    )
    print(f"  entropy (nats)        frozen {results['entropy_frozen']:.3f}   TOAST {results['entropy_toast']:.3f}")
    print(
        f"  attention on object   frozen {results['mass_on_object_frozen']:.1%}   TOAST "
        f"{results['mass_on_object_toast']:.1%}   (more on the object in "
        f"{results['share_of_images_more_on_object']:.0%} of the images)"
    )
    print(
        f"  mean token gate       object {results['mean_gate_object']:.3f}   background "
        f"{results['mean_gate_background']:.3f}"
    )
    return finish(results, figure, args.output_dir, "attention_vit.json")


# ------------------------------------------------------------------------------------------------------------ text


def run_text(args: argparse.Namespace) -> dict:
    from peft_toast.assets import load_tweet_sentiment

    args.model = causal_lm_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    splits = load_tweet_sentiment(limit=max(args.train_size, args.eval_size), seed=args.seed)
    label_names = splits["train"].features["label"].names

    def load_base():
        with expected_load_report():  # the new head's "newly initialized" rows
            base = AutoModelForSequenceClassification.from_pretrained(
                args.model,
                num_labels=len(label_names),
                id2label=dict(enumerate(label_names)),
                label2id={name: i for i, name in enumerate(label_names)},
            )
        base.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last token before the padding
        return base

    def encode(batch: dict) -> dict:
        return tokenizer(batch["text"], truncation=True, max_length=args.max_length)

    if args.adapter is None:
        train = splits["train"].select(range(min(args.train_size, len(splits["train"]))))
        train = train.map(encode, batched=True, remove_columns=["text"]).rename_column("label", "labels")
        model = get_peft_model(load_base(), ToastConfig(task_type="SEQ_CLS"))
        quick_train(model, train, DataCollatorWithPadding(tokenizer), args)
        args.adapter = save_quick_adapter(model, args.output_dir)
    model = PeftModel.from_pretrained(load_base(), args.adapter).eval()

    texts = splits["test"]["text"][: args.eval_size]
    entropy_frozen, entropy_toast, comparisons = [], [], []
    for chunk in tqdm(list(batches(texts, args.batch_size)), desc="attention"):
        inputs = tokenizer(chunk, truncation=True, max_length=args.max_length, padding=True, return_tensors="pt")
        comparison = compare_attention(model, dict(inputs))
        entropy_frozen.append(attention_entropy(comparison.frozen))
        entropy_toast.append(attention_entropy(comparison.toast))
        comparisons.append((inputs, comparison))
    inputs, comparison = comparisons[0]
    length = int(inputs["attention_mask"][0].sum())
    tokens = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0][:length])
    figure = os.path.join(args.output_dir, "attention_text.png")
    with atomic_file(figure, "wb") as f:
        plot_text_attention(tokens, comparison, f)
    change = (comparison.toast[0, :length] - comparison.frozen[0, :length]).abs().sum() / 2
    results = {
        "model": args.model,
        "adapter": args.adapter,
        "texts": len(texts),
        "entropy_frozen": float(torch.cat(entropy_frozen).mean()),
        "entropy_toast": float(torch.cat(entropy_toast).mean()),
        "figure_text": texts[0],
        "figure_attention_moved": float(change),
    }
    print(f"Last token's attention in the last block over {len(texts)} test tweets:")
    print(f"  entropy (nats)   frozen {results['entropy_frozen']:.3f}   TOAST {results['entropy_toast']:.3f}")
    print(f"  in the figure's tweet TOAST moves {results['figure_attention_moved']:.1%} of the attention")
    return finish(results, figure, args.output_dir, "attention_text.json")


# ---------------------------------------------------------------------------------------------------------- common


def save_quick_adapter(model: PeftModel, output_dir: str) -> str:
    adapter_dir = save_adapter(model, output_dir)  # with the model card (README.md)
    print(f"adapter saved to {adapter_dir}")
    return adapter_dir


def finish(results: dict, figure: str, output_dir: str, name: str) -> dict:
    path = os.path.join(output_dir, name)
    with atomic_file(path) as f:
        json.dump(results, f, indent=2)
    print(f"figure: {figure}\nnumbers: {path}")
    return results


def main(argv=None) -> dict:
    args = parse_args(argv)
    set_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    return run_text(args) if args.text else run_images(args)


if __name__ == "__main__":
    main()
