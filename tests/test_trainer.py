"""Training with `transformers.Trainer`: the example scripts end to end on tiny random models and tiny datasets.

Checkpoints hold only the adapter and the Trainer's state, a resumed run ends at exactly the adapter of an
uninterrupted one, and the causal-LM loss covers the responses only. Slow: a run killed with SIGKILL and resumed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import transformers
from conftest import IMAGE, LAYERS, VOCAB, make_llama, make_vit, randomize_adapter
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import example_utils  # noqa: E402
import train_causal_lm  # noqa: E402
import train_image_classifier  # noqa: E402

ADAPTER_FILES = {"README.md", "adapter_config.json", "adapter_model.safetensors"}
TRAINER_STATE_FILES = {"optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state.pth", "training_args.bin"}
LABEL_WORDS = ["negative", "positive"]


# ------------------------------------------------------------------------------------------- tiny model folders


# Tiny models are far faster on one thread, and the test machine is shared (conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def _class_label_dataset(column: str, values: list, labels: np.ndarray, names: list[str]) -> datasets.Dataset:
    feature = datasets.Image() if column == "image" else datasets.Value("string")
    features = datasets.Features({column: feature, "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({column: values, "label": labels.tolist()}, features=features)


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory) -> str:
    """A random tiny ViT classifier and its image processor, saved like a Hub checkpoint."""
    folder = tmp_path_factory.mktemp("tiny-vit")
    torch.manual_seed(0)
    make_vit().save_pretrained(folder)
    transformers.ViTImageProcessorPil(size={"height": IMAGE, "width": IMAGE}).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_image_dataset_dir(tmp_path_factory) -> str:
    """16 train and 8 test random greyscale images in 3 classes, saved with `save_to_disk`."""
    folder = tmp_path_factory.mktemp("tiny-images")
    rng = np.random.default_rng(0)
    splits = {
        name: _class_label_dataset(
            "image", list(rng.integers(0, 256, (size, 20, 20), dtype=np.uint8)), rng.integers(0, 3, size), list("abc")
        )
        for name, size in (("train", 16), ("test", 8))
    }
    datasets.DatasetDict(splits).save_to_disk(folder)
    return str(folder)


def make_word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over the tiny LLaMA's vocabulary: `[BOS]`=0, `[EOS]`=1 (also padding), the
    two label words, then `w0`, `w1`, ... (no chat template, so the plain instruction format is used)."""
    words = ["[BOS]", "[EOS]", "[UNK]", *LABEL_WORDS] + [f"w{i}" for i in range(VOCAB - 5)]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="[BOS]", eos_token="[EOS]", pad_token="[EOS]", unk_token="[UNK]"
    )


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    make_llama().save_pretrained(folder)
    make_word_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_text_dataset_dir(tmp_path_factory) -> str:
    """16 train and 8 test texts of 3-11 random words with binary labels, saved with `save_to_disk`."""
    folder = tmp_path_factory.mktemp("tiny-texts")
    rng = np.random.default_rng(0)

    def texts(size: int) -> list[str]:
        return [" ".join(f"w{i}" for i in rng.integers(0, 90, rng.integers(3, 12))) for _ in range(size)]

    splits = {
        name: _class_label_dataset("text", texts(size), rng.integers(0, 2, size), LABEL_WORDS)
        for name, size in (("train", 16), ("test", 8))
    }
    datasets.DatasetDict(splits).save_to_disk(folder)
    return str(folder)


def assert_same_adapter(expected_dir, actual_dir, atol: float = 0.0) -> float:
    """Same tensor names and shapes in both adapters, values within `atol`; returns the largest difference."""
    expected = load_file(os.path.join(expected_dir, "adapter_model.safetensors"))
    actual = load_file(os.path.join(actual_dir, "adapter_model.safetensors"))
    assert sorted(actual) == sorted(expected)
    worst = 0.0
    for key, tensor in expected.items():
        assert actual[key].shape == tensor.shape, key
        worst = max(worst, (actual[key] - tensor).abs().max().item())
    assert worst <= atol, f"adapters differ by up to {worst}"
    return worst


def image_args(model_dir: str, dataset_dir: str, **overrides) -> list[str]:
    """Command-line arguments of `train_image_classifier.py`: 6 steps of batch 4, a checkpoint every 2 steps."""
    options = {
        "model": model_dir,
        "dataset": dataset_dir,
        "max_steps": 6,
        "batch_size": 4,
        "save_steps": 2,
        "logging_steps": 1,
        "eval_size": 8,
        **overrides,
    }
    return [f"--{key.replace('_', '-')}={value}" for key, value in options.items()]


def text_args(model_dir: str, dataset_dir: str, **overrides) -> list[str]:
    """Command-line arguments of `train_causal_lm.py`: 6 steps of batch 4, a checkpoint every 2 steps, and a learning
    rate at which the tiny model's adapter moves far beyond the tests' tolerances."""
    options = {
        "model": model_dir,
        "dataset": dataset_dir,
        "max_steps": 6,
        "learning_rate": 1e-3,
        "batch_size": 4,
        "save_steps": 2,
        "logging_steps": 1,
        "max_length": 32,
        **overrides,
    }
    return [f"--{key.replace('_', '-')}={value}" for key, value in options.items()]


# --------------------------------------------------------------------------------------------- image classifier


def test_image_classifier_checkpoints_hold_only_the_adapter_and_trainer_state(
    tmp_path, tiny_vit_dir, tiny_image_dataset_dir
):
    train_image_classifier.main(image_args(tiny_vit_dir, tiny_image_dataset_dir, output_dir=tmp_path, max_steps=4))

    assert sorted(os.listdir(tmp_path)) == ["adapter", "checkpoint-2", "checkpoint-4"]
    assert set(os.listdir(tmp_path / "checkpoint-2")) == ADAPTER_FILES | TRAINER_STATE_FILES
    assert set(os.listdir(tmp_path / "adapter")) == ADAPTER_FILES
    weights = load_file(tmp_path / "checkpoint-4" / "adapter_model.safetensors")
    prefix = "base_model.model.vit.layers"
    expected = {
        "base_model.model.toast.toast_prompt",
        "base_model.model.classifier.weight",
        "base_model.model.classifier.bias",
    }
    for block in range(LAYERS):
        expected |= {f"{prefix}.{block}.attention.v_proj.{name}.weight" for name in ("toast_down", "toast_readout")}
    assert set(weights) == expected  # no frozen base weight
    # The readouts start at zero: non-zero values show that the top-down path itself was trained.
    assert weights[f"{prefix}.0.attention.v_proj.toast_readout.weight"].abs().max() > 0
    final = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(final[key], weights[key]) for key in expected)


def test_image_classifier_resume_ends_at_the_uninterrupted_adapter(tmp_path, tiny_vit_dir, tiny_image_dataset_dir):
    # 16 examples in batches of 4: step 2 is mid-epoch, and the run crosses into a second, reshuffled epoch.
    full = train_image_classifier.main(image_args(tiny_vit_dir, tiny_image_dataset_dir, output_dir=tmp_path / "full"))
    resumed = train_image_classifier.main(
        image_args(
            tiny_vit_dir,
            tiny_image_dataset_dir,
            output_dir=tmp_path / "resumed",
            resume_from_checkpoint=tmp_path / "full" / "checkpoint-2",
        )
    )
    assert_same_adapter(tmp_path / "full" / "adapter", tmp_path / "resumed" / "adapter", atol=1e-6)
    assert resumed["eval_accuracy"] == full["eval_accuracy"]


# -------------------------------------------------------------------------------------------------- causal LM


def test_instruction_labels_mask_exactly_the_prompt():
    tokenizer = make_word_tokenizer()
    prompt = example_utils.instruction_prompt(tokenizer, "w1 w2 w3")
    assert prompt == "### Instruction:\nw1 w2 w3\n\n### Response:\n"
    prompt_ids = tokenizer(prompt)["input_ids"]
    example = example_utils.encode_instruction(tokenizer, prompt, "positive", max_length=64)
    positive, eos = tokenizer.convert_tokens_to_ids(["positive", "[EOS]"])
    assert example["input_ids"] == prompt_ids + [positive, eos]
    assert example["labels"] == [-100] * len(prompt_ids) + [positive, eos]
    assert example["attention_mask"] == [1] * (len(prompt_ids) + 2)

    # Too long: the prompt loses its beginning, the response is whole.
    short = example_utils.encode_instruction(tokenizer, prompt, "positive", max_length=5)
    assert short["input_ids"] == prompt_ids[-3:] + [positive, eos]
    assert short["labels"] == [-100] * 3 + [positive, eos]
    with pytest.raises(ValueError, match="Raise --max-length"):
        example_utils.encode_instruction(tokenizer, prompt, "positive w1", max_length=3)


def test_loss_covers_the_responses_only():
    """The model's loss on a padded batch from the example's collator equals a hand-computed cross-entropy over the
    response tokens alone."""
    from peft import get_peft_model

    from peft_toast import ToastConfig

    tokenizer = make_word_tokenizer()
    examples = [
        example_utils.encode_instruction(
            tokenizer, example_utils.instruction_prompt(tokenizer, text), response, max_length=32
        )
        for text, response in (("w1 w2 w3 w4 w5", "negative"), ("w6", "positive w7"))
    ]
    batch = transformers.DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)(examples)
    model = get_peft_model(make_llama(), ToastConfig(task_type="CAUSAL_LM"))
    randomize_adapter(model)
    output = model(**batch)

    logits = output.logits[:, :-1]  # position t predicts token t + 1
    targets = batch["input_ids"][:, 1:]
    lengths = [len(example["input_ids"]) for example in examples]
    response_lengths = [2, 3]  # one/two words + EOS
    terms = []
    for row, (length, response_length) in enumerate(zip(lengths, response_lengths)):
        positions = torch.arange(length - 1 - response_length, length - 1)
        terms.append(
            torch.nn.functional.cross_entropy(logits[row, positions], targets[row, positions], reduction="none")
        )
    expected = torch.cat(terms).mean()
    torch.testing.assert_close(output.loss, expected, rtol=1e-5, atol=1e-6)
    assert (batch["labels"] != -100).sum().item() == sum(response_lengths)


def test_causal_lm_resume_from_latest_skips_a_half_written_checkpoint(tmp_path, tiny_llama_dir, tiny_text_dataset_dir):
    full = tmp_path / "full"
    train_causal_lm.main(text_args(tiny_llama_dir, tiny_text_dataset_dir, output_dir=full))
    # The Trainer also saves the collator's tokenizer: small, and what a user needs to run the adapter.
    tokenizer_files = {"tokenizer.json", "tokenizer_config.json"}
    assert set(os.listdir(full / "checkpoint-4")) == ADAPTER_FILES | TRAINER_STATE_FILES | tokenizer_files
    saved = load_file(full / "adapter" / "adapter_model.safetensors")
    assert all("toast_" in key for key in saved)  # a causal LM has no head to train: the adapter alone

    # A run killed while writing its second checkpoint: the first is complete, the second lacks its trainer state.
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copytree(full / "checkpoint-2", crashed / "checkpoint-2")
    shutil.copytree(
        full / "checkpoint-4", crashed / "checkpoint-4", ignore=shutil.ignore_patterns("trainer_state.json")
    )
    assert example_utils.last_checkpoint(str(crashed), example_utils.TRAINER_CHECKPOINT_MARKER) == str(
        crashed / "checkpoint-2"
    )

    train_causal_lm.main(
        text_args(tiny_llama_dir, tiny_text_dataset_dir, output_dir=crashed, resume_from_checkpoint="latest")
    )
    assert_same_adapter(full / "adapter", crashed / "adapter", atol=1e-6)


def test_causal_lm_gradient_checkpointing_gives_the_same_adapter(
    tmp_path, monkeypatch, tiny_llama_dir, tiny_text_dataset_dir
):
    options = {"max_steps": 3, "save_steps": 100}
    train_causal_lm.main(text_args(tiny_llama_dir, tiny_text_dataset_dir, output_dir=tmp_path / "plain", **options))
    recomputed_blocks = []
    checkpoint = transformers.modeling_utils.checkpoint
    monkeypatch.setattr(
        transformers.modeling_utils,
        "checkpoint",
        lambda *args, **kwargs: recomputed_blocks.append(kwargs) or checkpoint(*args, **kwargs),
    )
    train_causal_lm.main(
        text_args(tiny_llama_dir, tiny_text_dataset_dir, output_dir=tmp_path / "checkpointed", **options)
        + ["--gradient-checkpointing"]
    )
    assert recomputed_blocks and all(kwargs["use_reentrant"] is False for kwargs in recomputed_blocks)
    assert_same_adapter(tmp_path / "plain" / "adapter", tmp_path / "checkpointed" / "adapter", atol=1e-6)


@pytest.fixture(scope="session")
def tiny_llama_4bit_dir(tmp_path_factory) -> str:
    """The tiny LLaMA with every input width a multiple of 64, as bitsandbytes' CPU 4-bit dequantisation needs (0.50.2
    fails on the 32-wide one)."""
    folder = tmp_path_factory.mktemp("tiny-llama-4bit")
    torch.manual_seed(0)
    make_llama(hidden_size=64, intermediate_size=128).save_pretrained(folder)
    make_word_tokenizer().save_pretrained(folder)
    return str(folder)


def test_causal_lm_on_a_4bit_base_trains_and_saves_only_the_adapter(
    tmp_path, tiny_llama_4bit_dir, tiny_text_dataset_dir
):
    """QLoRA-style (`--load-in-4bit`): an NF4 base with double quantisation; the adapter trains, stays fp32, and the
    saved file holds it alone and reloads onto a fresh 4-bit base with the same outputs."""
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    options = {"max_steps": 2, "save_steps": 100, "output_dir": tmp_path}
    train_causal_lm.main(text_args(tiny_llama_4bit_dir, tiny_text_dataset_dir, **options) + ["--load-in-4bit"])
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved and all("toast_" in key and tensor.dtype == torch.float32 for key, tensor in saved.items())
    assert any(tensor.abs().max() > 0 for key, tensor in saved.items() if "toast_readout" in key)  # it trained
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_4bit_dir, quantization_config=quantization)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    for key, tensor in loaded.state_dict().items():
        if "toast_" in key:
            saved_key = key.replace(".default", "")
            assert torch.equal(tensor, saved[saved_key]), key
    input_ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        steered = loaded(input_ids=input_ids).logits
        with loaded.disable_adapter():
            plain = loaded(input_ids=input_ids).logits
    assert not torch.allclose(steered, plain)


def test_last_checkpoint(tmp_path):
    assert example_utils.last_checkpoint(str(tmp_path / "missing"), "state.json") is None
    for name, marker in (
        ("checkpoint-5", "x"),
        ("checkpoint-40", "x"),
        ("checkpoint-300", ""),
        ("tmp-checkpoint-900", "x"),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.json").write_text(marker)
    (tmp_path / "checkpoint-1000").mkdir()
    # 300's marker is empty (killed mid-write), 900 is not a checkpoint name, 1000 has no marker.
    assert example_utils.last_checkpoint(str(tmp_path), "state.json") == str(tmp_path / "checkpoint-40")
    assert example_utils.resolve_resume("latest", str(tmp_path), "state.json") == str(tmp_path / "checkpoint-40")
    assert example_utils.resolve_resume(None, str(tmp_path), "state.json") is None
    assert example_utils.checkpoint_step(str(tmp_path / "checkpoint-40") + "/") == 40
    with pytest.raises(ValueError, match="checkpoint-<step>"):
        example_utils.checkpoint_step(str(tmp_path / "adapter"))


# ------------------------------------------------------------------------------------ killed and resumed (slow)


def run_killed_then_resumed(script: str, arguments: list[str], output_dir: Path, marker: str, timeout: float = 150):
    """Run `script` until its first complete checkpoint appears, SIGKILL it, then rerun it with
    `--resume-from-checkpoint latest` to the end. Returns the step the resumed run started from."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, str(EXAMPLES / script), *arguments, f"--output-dir={output_dir}"]
    log = output_dir.with_name(output_dir.name + ".log")
    with open(log, "wb") as log_file:  # a file, not a pipe: a full pipe would stall the run
        process = subprocess.Popen(command, env=environment, stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        try:
            while example_utils.last_checkpoint(str(output_dir), marker) is None:
                assert process.poll() is None, f"the run ended before its first checkpoint: {log.read_text()[-2000:]}"
                assert time.monotonic() < deadline, "no checkpoint appeared in time"
                time.sleep(0.05)
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (output_dir / "adapter").exists(), "the run finished before it was killed; give it more steps"
    resumed_from = example_utils.last_checkpoint(str(output_dir), marker)

    result = subprocess.run(
        [*command, "--resume-from-checkpoint=latest"], env=environment, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resuming from {resumed_from}." in result.stdout
    print(f"{script}: killed with SIGKILL, resumed from {os.path.basename(resumed_from)}")
    return example_utils.checkpoint_step(resumed_from)


@pytest.mark.slow
def test_trainer_run_killed_and_resumed_ends_at_the_uninterrupted_adapter(
    tmp_path, tiny_vit_dir, tiny_image_dataset_dir
):
    arguments = image_args(tiny_vit_dir, tiny_image_dataset_dir, max_steps=200, save_steps=10, logging_steps=50)
    train_image_classifier.main([*arguments, f"--output-dir={tmp_path / 'uninterrupted'}"])
    step = run_killed_then_resumed(
        "train_image_classifier.py", arguments, tmp_path / "killed", example_utils.TRAINER_CHECKPOINT_MARKER
    )
    assert 10 <= step < 200
    assert_same_adapter(tmp_path / "uninterrupted" / "adapter", tmp_path / "killed" / "adapter", atol=1e-6)
