"""Shared fixtures: tiny random transformers models built from configs (no Hub access, no downloads)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import peft_toast  # noqa: E402,F401  (registers TOAST with PEFT)

# Tiny models are dominated by thread start-up and synchronisation: on a 2-core machine two intra-op threads made the
# suite 3-10x slower than one. Real-model tests can raise it with the `torch_threads` fixture.
torch.set_num_threads(int(os.environ.get("PEFT_TOAST_TEST_THREADS", "1")))

HIDDEN = 32
VOCAB = 99
IMAGE = 16
PATCH = 4
NUM_LABELS = 3
# 4 blocks: enough to tell the bottom block from the top one and to select a subset.
LAYERS = 4

_ENCODER = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=37)


def make_vit(num_labels: int = NUM_LABELS, with_head: bool = True, **overrides):
    config = transformers.ViTConfig(
        image_size=IMAGE, patch_size=PATCH, num_labels=num_labels, **{**_ENCODER, **overrides}
    )
    cls = transformers.ViTForImageClassification if with_head else transformers.ViTModel
    return cls(config).eval()


def make_dinov2(**overrides):
    config = transformers.Dinov2Config(image_size=IMAGE, patch_size=PATCH, **{**_ENCODER, **overrides})
    return transformers.Dinov2Model(config).eval()


def make_bert(with_head: bool = True, **overrides):
    config = transformers.BertConfig(vocab_size=VOCAB, num_labels=2, **{**_ENCODER, **overrides})
    cls = transformers.BertForSequenceClassification if with_head else transformers.BertModel
    return cls(config).eval()


def make_gpt2(**overrides):
    config = transformers.GPT2Config(
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=4,
        vocab_size=VOCAB,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **overrides,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def _decoder_config(cls, **overrides):
    defaults = dict(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=37,
        vocab_size=VOCAB,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return cls(**{**defaults, **overrides})


def make_llama(**overrides):
    return transformers.LlamaForCausalLM(_decoder_config(transformers.LlamaConfig, **overrides)).eval()


def make_mistral(**overrides):
    return transformers.MistralForCausalLM(_decoder_config(transformers.MistralConfig, **overrides)).eval()


MODEL_FACTORIES = {
    "vit": make_vit,
    "dinov2": make_dinov2,
    "bert": make_bert,
    "gpt2": make_gpt2,
    "llama": make_llama,
    "mistral": make_mistral,
}


def make_inputs(kind: str, batch: int = 2, seq: int = 6, seed: int = 0) -> dict:
    """Model inputs for a factory in MODEL_FACTORIES."""
    generator = torch.Generator().manual_seed(seed)
    if kind in ("vit", "dinov2"):
        return {"pixel_values": torch.randn(batch, 3, IMAGE, IMAGE, generator=generator)}
    input_ids = torch.randint(2, VOCAB, (batch, seq), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def free_port() -> int:
    """A TCP port on localhost that is free now, for a process group's rendezvous (multi-process tests)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def randomize_adapter(model, std: float = 0.3, seed: int = 0) -> None:
    """Give every TOAST tensor (and head) random values, so that the adapter visibly changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "toast_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * std)
        for name, buffer in model.named_buffers():
            if "toast_" in name and buffer.is_floating_point():
                buffer.add_(torch.randn(buffer.shape, generator=generator) * std)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a whole module, whatever PEFT_TOAST_TEST_THREADS says, restored for the other modules: tiny
    models gain nothing from intra-op threads, and on a loaded machine their hand-offs cost 30x the matmuls. A module
    opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def torch_threads():
    """Use every core for the duration of a (slow, real-model) test."""
    previous = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def vit():
    return make_vit()


@pytest.fixture
def llama():
    return make_llama()
