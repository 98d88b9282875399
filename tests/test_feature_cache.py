"""Tests of `peft_toast.feature_cache` and of the `toast_features=` argument of a TOAST forward call.

The reference everywhere is the uncached path: the same model, called without `toast_features`, runs pass 1 itself.
"""

import contextlib
import copy

import datasets
import pytest
import torch
from conftest import NUM_LABELS, VOCAB, make_bert, make_gpt2, make_inputs, make_llama, make_vit, randomize_adapter
from peft import get_peft_model
from transformers import Trainer, TrainingArguments, default_data_collator

from peft_toast import ToastConfig
from peft_toast.feature_cache import (
    FEATURES_COLUMN,
    INPUT_HASH_COLUMN,
    ToastFeatureCollator,
    feature_cache_key,
    precompute_features,
)

ROWS = 8
SEQ = 6
# BERT and GPT-2 train with dropout by default, which makes pass 1 random: the cache refuses it (tested below).
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


pytestmark = pytest.mark.usefixtures("one_thread")


def toast(base, task_type=None, seed=0):
    model = get_peft_model(base, ToastConfig(task_type=task_type))
    randomize_adapter(model, seed=seed)
    return model


def image_dataset(rows=ROWS, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(rows, 3, 16, 16, generator=generator)
    return datasets.Dataset.from_dict({"pixel_values": pixels.numpy(), "label": [i % NUM_LABELS for i in range(rows)]})


def text_dataset(rows=ROWS, seed=0, labels="sequence"):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, VOCAB, (rows, SEQ), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[::2, -2:] = 0  # right padding on every other row: a fixed length, as the cache requires
    columns = {"input_ids": input_ids.tolist(), "attention_mask": attention_mask.tolist()}
    if labels == "sequence":
        columns["label"] = [i % 2 for i in range(rows)]
    else:  # teacher-forced language modelling
        columns["labels"] = input_ids.masked_fill(attention_mask == 0, -100).tolist()
    return datasets.Dataset.from_dict(columns)


def batches(model, cached, batch_size=4):
    collator = ToastFeatureCollator(model)
    return [
        collator([cached[i] for i in range(start, start + batch_size)]) for start in range(0, len(cached), batch_size)
    ]


def loss_and_grads(model, batch):
    model.zero_grad()
    output = model(**batch)
    output.loss.backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.requires_grad}
    return output, grads


@contextlib.contextmanager
def pass1_forbidden(model):
    """Fail if the model runs pass 1 itself: proves that a call with `toast_features` uses them."""

    def refuse(*args, **kwargs):
        raise AssertionError("pass 1 ran although its feature was given")

    tuner = model.base_model
    tuner.run_pass1 = refuse
    try:
        yield
    finally:
        del tuner.run_pass1


def uncached(batch):
    return {name: value for name, value in batch.items() if name != FEATURES_COLUMN}


# ------------------------------------------------------------------------------------- equality with the uncached path


@pytest.mark.parametrize(
    "kind, make, task_type",
    [
        ("vit", make_vit, None),  # PeftModel.forward: kwargs go straight to the transformers model
        ("bert", lambda: make_bert(**NO_DROPOUT), "SEQ_CLS"),  # PeftModelForSequenceClassification.forward
        ("llama", make_llama, "CAUSAL_LM"),  # teacher-forced decoder, PeftModelForCausalLM.forward
        ("gpt2", lambda: make_gpt2(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0), "CAUSAL_LM"),  # fused qkv
    ],
)
def test_cached_training_step_equals_uncached_exactly_in_fp32(kind, make, task_type, tmp_path):
    model = toast(make(), task_type).train()
    dataset = image_dataset() if kind == "vit" else text_dataset(labels="sequence" if kind == "bert" else "lm")
    cached = precompute_features(model, dataset, cache_dir=tmp_path, batch_size=4, verbose=False)
    assert model.training  # precompute restored the mode it found
    for batch in batches(model, cached):
        assert batch[FEATURES_COLUMN].dtype == torch.float32
        reference, reference_grads = loss_and_grads(model, uncached(batch))
        with pass1_forbidden(model):
            output, grads = loss_and_grads(model, batch)
        torch.testing.assert_close(output.logits, reference.logits, rtol=0, atol=0)
        torch.testing.assert_close(output.loss, reference.loss, rtol=0, atol=0)
        assert grads.keys() == reference_grads.keys() and any("toast_readout" in name for name in grads)
        for name in grads:
            torch.testing.assert_close(grads[name], reference_grads[name], rtol=0, atol=0, msg=name)


# Storage rounding: fp16 keeps 11 significant bits, bf16 8; the logits of these tiny random models (|logit| <~ 3)
# move by at most these amounts, measured ≈ 3e-5 (fp16) and ≈ 3e-4 (bf16).
@pytest.mark.parametrize("dtype, atol", [("float16", 5e-4), ("bfloat16", 5e-3)])
def test_half_precision_storage_is_close_to_uncached(dtype, atol, tmp_path):
    model = toast(make_vit()).train()
    cached = precompute_features(model, image_dataset(), cache_dir=tmp_path, dtype=dtype, verbose=False)
    for batch in batches(model, cached):
        assert batch[FEATURES_COLUMN].dtype == getattr(torch, dtype)
        reference, reference_grads = loss_and_grads(model, uncached(batch))
        output, grads = loss_and_grads(model, batch)
        assert not torch.equal(output.logits, reference.logits)  # the rounding is real ...
        torch.testing.assert_close(output.logits, reference.logits, rtol=0, atol=atol)  # ... and small
        for name in grads:
            torch.testing.assert_close(grads[name], reference_grads[name], rtol=1e-2, atol=atol * 10, msg=name)


def test_features_are_what_selection_consumes(tmp_path):
    """The stored feature is the final layer norm's output of ViT, i.e. `last_hidden_state` of the frozen backbone."""
    model = toast(make_vit())
    dataset = image_dataset()
    cached = precompute_features(model, dataset, cache_dir=tmp_path, verbose=False)
    with model.disable_adapter(), torch.no_grad():
        pixel_values = dataset.with_format("torch")[:]["pixel_values"]
        expected = model.get_base_model().vit(pixel_values=pixel_values).last_hidden_state  # (8, 17, 32)
    torch.testing.assert_close(cached[:][FEATURES_COLUMN], expected, rtol=0, atol=0)


def test_trainer_reaches_the_same_adapter_with_and_without_the_cache(tmp_path):
    dataset = image_dataset(rows=12)
    start = toast(make_vit())
    models = {"uncached": copy.deepcopy(start), "cached": copy.deepcopy(start)}
    train_sets = {
        "uncached": dataset.with_format("torch"),
        "cached": precompute_features(models["cached"], dataset, cache_dir=tmp_path / "cache", verbose=False),
    }
    collators = {"uncached": default_data_collator, "cached": ToastFeatureCollator(models["cached"])}
    for name, model in models.items():
        args = TrainingArguments(
            output_dir=str(tmp_path / name),
            max_steps=4,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            remove_unused_columns=False,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            use_cpu=True,
            seed=0,
            disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=train_sets[name], data_collator=collators[name])
        with pass1_forbidden(model) if name == "cached" else contextlib.nullcontext():
            trainer.train()
    trained = {name: dict(model.named_parameters()) for name, model in models.items()}
    changed = [
        n
        for n, p in trained["cached"].items()
        if p.requires_grad and not torch.equal(p, dict(start.named_parameters())[n])
    ]
    assert any("toast_readout" in n for n in changed) and any("classifier" in n for n in changed)
    for name, param in trained["cached"].items():
        torch.testing.assert_close(param, trained["uncached"][name], rtol=0, atol=1e-6, msg=name)


def test_trainer_that_drops_the_cache_columns_is_told_what_to_do(tmp_path):
    model = toast(make_vit())
    cached = precompute_features(model, image_dataset(), cache_dir=tmp_path, verbose=False)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=1, report_to=[], use_cpu=True, disable_tqdm=True
    )
    trainer = Trainer(model=model, args=args, train_dataset=cached, data_collator=ToastFeatureCollator(model))
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        trainer.train()


def test_accelerate_loop_trains_on_the_cache(tmp_path):
    from accelerate import Accelerator

    model = toast(make_vit())
    cached = precompute_features(model, image_dataset(), cache_dir=tmp_path, verbose=False)
    reference = copy.deepcopy(model)
    accelerator = Accelerator(cpu=True)
    loader = torch.utils.data.DataLoader(cached, batch_size=4, collate_fn=ToastFeatureCollator(model))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    reference_optimizer = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.1)
    model.train(), reference.train()
    for batch in loader:
        with pass1_forbidden(accelerator.unwrap_model(model)):
            accelerator.backward(model(**batch).loss)
        optimizer.step(), optimizer.zero_grad()
        reference(**uncached(batch)).loss.backward()
        reference_optimizer.step(), reference_optimizer.zero_grad()
    for name, param in accelerator.unwrap_model(model).named_parameters():
        torch.testing.assert_close(param, dict(reference.named_parameters())[name], rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------------------------------------- the on-disk cache


def test_cache_file_is_reused_for_the_same_data_and_model_and_renewed_otherwise(tmp_path, capsys):
    model = toast(make_vit())
    dataset = image_dataset()
    first = precompute_features(model, dataset, cache_dir=tmp_path)
    assert "8 examples x 17 tokens x 32 channels x 4 B (float32) = 17.4 KB" in capsys.readouterr().out
    again = precompute_features(model, dataset, cache_dir=tmp_path)
    assert "TOAST feature cache" not in capsys.readouterr().out  # loaded, not recomputed
    assert again.cache_files == first.cache_files
    changed = dataset.with_format("torch").map(lambda row: {"pixel_values": row["pixel_values"] * 2})
    other_data = precompute_features(model, changed, cache_dir=tmp_path, verbose=False)
    other_model = precompute_features(toast(make_vit(layer_norm_eps=1e-5)), dataset, cache_dir=tmp_path, verbose=False)
    files = {tuple(d.cache_files[0].values()) for d in (first, other_data, other_model)}
    assert len(files) == 3
    assert not torch.equal(other_data[:][FEATURES_COLUMN], first[:][FEATURES_COLUMN])


def test_key_ignores_the_adapter_and_the_head_but_not_the_backbone():
    base = make_vit()
    head_model = copy.deepcopy(base)
    torch.nn.init.normal_(head_model.classifier.weight)
    changed = copy.deepcopy(base)
    with torch.no_grad():
        changed.vit.layers[1].mlp.fc1.weight[0, 0] += 1e-3  # one weight of the backbone
    same = copy.deepcopy(base)
    key = feature_cache_key(toast(base, seed=0))
    assert feature_cache_key(toast(same, seed=1)) == key
    assert feature_cache_key(toast(head_model)) == key
    assert feature_cache_key(toast(changed)) != key


# ---------------------------------------------------------------------------------------------------- stale caches


def test_refuses_features_of_another_base_model(tmp_path):
    model = toast(make_vit())
    cached = precompute_features(model, image_dataset(), cache_dir=tmp_path, verbose=False)
    other = toast(make_vit())  # same architecture, other random weights
    with pytest.raises(ValueError, match="different base model"):
        ToastFeatureCollator(other)([cached[i] for i in range(4)])


def test_refuses_changed_dataset_content(tmp_path):
    model = toast(make_vit())
    cached = precompute_features(model, image_dataset(), cache_dir=tmp_path, verbose=False)
    edited = cached.map(lambda row, i: {"pixel_values": row["pixel_values"] + (i == 2)}, with_indices=True)
    with pytest.raises(ValueError, match="row 2 of this batch differ"):
        ToastFeatureCollator(model)([edited[i] for i in range(4)])


def test_refuses_a_transform(tmp_path):
    model = toast(make_vit())
    dataset = image_dataset()
    with pytest.raises(ValueError, match="transform"):
        precompute_features(model, dataset.with_transform(lambda batch: batch), cache_dir=tmp_path)
    cached = precompute_features(model, dataset, cache_dir=tmp_path, verbose=False)

    def flip(batch):  # augmentation applied on the fly
        batch["pixel_values"] = [torch.tensor(x).flip(-1) for x in batch["pixel_values"]]
        return batch

    augmented = cached.with_transform(flip)
    with pytest.raises(ValueError, match="transform or augmenting collator"):
        ToastFeatureCollator(model)([augmented[i] for i in range(4)])


def test_refuses_dropout_in_the_backbone_during_training(tmp_path):
    model = toast(make_vit(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1))
    cached = precompute_features(model, image_dataset(), cache_dir=tmp_path, verbose=False)
    (batch,) = batches(model, cached, batch_size=ROWS)
    model.eval()
    with torch.no_grad():  # in eval mode, nothing is random: allowed and exact
        torch.testing.assert_close(model(**batch).logits, model(**uncached(batch)).logits, rtol=0, atol=0)
    model.train()
    with pytest.raises(ValueError, match="random or batch-dependent"):
        model(**batch)


@pytest.mark.parametrize("option", ["attention_dropout", "drop_path_rate"])
def test_refuses_attribute_dropout_and_stochastic_depth(option):
    """Attention dropout of transformers' attention classes is a float attribute, not an `nn.Dropout`."""
    from conftest import make_dinov2

    model = (
        toast(make_llama(attention_dropout=0.1))
        if option == "attention_dropout"
        else toast(make_dinov2(drop_path_rate=0.1))
    )
    inputs = make_inputs("llama" if option == "attention_dropout" else "dinov2")
    with torch.no_grad():
        features = model.base_model.run_pass1(model.get_base_model(), (), dict(inputs))
    model.train()
    with pytest.raises(ValueError, match="random or batch-dependent"):
        model(**inputs, toast_features=features)


def test_refuses_a_trainable_backbone(tmp_path):
    model = toast(make_vit())
    model.get_base_model().vit.layers[0].mlp.fc1.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="trainable weights"):
        precompute_features(model, image_dataset(), cache_dir=tmp_path)


# -------------------------------------------------------------------------------------- the forward-call contract


def test_refuses_features_of_the_wrong_shape():
    model = toast(make_vit())
    inputs = make_inputs("vit", batch=2)
    with torch.no_grad():
        features = model.base_model.run_pass1(model.get_base_model(), (), dict(inputs))  # (2, 17, 32)
    for wrong in (features[:1], features[:, :5], features[:, :1]):
        with pytest.raises(ValueError, match="does not belong to these inputs"):
            model(**inputs, toast_features=wrong)
    with pytest.raises(ValueError, match=r"shape \(batch, tokens, 32\)"):
        model(**inputs, toast_features=features[..., :8])


def test_disabled_adapter_ignores_the_features():
    model = toast(make_vit())
    inputs = make_inputs("vit")
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(
            model(**inputs, toast_features=torch.zeros(2, 17, 32)).logits, model(**inputs).logits
        )


def test_decoder_refuses_cached_features_for_generation():
    model = toast(make_llama(), "CAUSAL_LM").eval()
    inputs = make_inputs("llama")
    with torch.no_grad():
        features = model.base_model.run_pass1(model.get_base_model(), (), dict(inputs))
        with pytest.raises(ValueError, match="toast_features"):  # transformers refuses it before any forward
            model.generate(**inputs, toast_features=features, max_new_tokens=2, do_sample=False)
        with pytest.raises(ValueError, match="Drop `toast_features` to generate"):
            model(**inputs, toast_features=features, use_cache=True)
        output = model(**inputs, toast_features=features)  # teacher-forced evaluation: no cache is made
    assert output.cache is None
    torch.testing.assert_close(output.logits, model(**inputs, use_cache=False).logits, rtol=0, atol=0)


def test_refuses_inputs_of_varying_shape(tmp_path):
    model = toast(make_bert(**NO_DROPOUT))
    ragged = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7], [5, 6], [8, 9, 10, 11]], "label": [0, 1, 0]})
    with pytest.raises(ValueError, match="one fixed shape"):
        precompute_features(model, ragged, cache_dir=tmp_path, batch_size=2, verbose=False)
    with pytest.raises(
        ValueError, match="one fixed shape"
    ):  # each batch stacks, but the shapes differ between batches
        precompute_features(model, ragged, cache_dir=tmp_path, batch_size=1, verbose=False)


def test_collator_keeps_only_what_the_model_takes(tmp_path):
    model = toast(make_vit())
    dataset = image_dataset().add_column("caption", [f"image {i}" for i in range(ROWS)])
    cached = precompute_features(model, dataset, cache_dir=tmp_path, verbose=False)
    batch = ToastFeatureCollator(model)([cached[i] for i in range(4)])
    assert set(batch) == {"pixel_values", "labels", FEATURES_COLUMN}
    assert INPUT_HASH_COLUMN in cached.column_names and "caption" in cached.column_names


@pytest.mark.slow
def test_benchmark_tiny_run_writes_consistent_results(tmp_path):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import feature_cache as benchmark

    output = tmp_path / "feature_cache.json"
    benchmark.main(["--tiny", "--threads", "1", "--train-size", "64", "--output", str(output)])
    results = json.loads(output.read_text())
    configs = results["configs"]
    assert list(configs) == ["toast", "toast-cached", "toast-r8-cached", "lora"]
    d, blocks, head = 32, 2, 32 * 10 + 10  # the tiny ViT of benchmarks/_models.py, 10 classes
    assert configs["toast"]["trainable_parameters"] == blocks * 2 * d * d + d + head  # A_l, C_l, prompt, head
    assert configs["toast-r8-cached"]["trainable_parameters"] == blocks * 2 * 2 * d * 8 + d + head
    # Skipping pass 1 removes exactly its forward: the cached step has fewer FLOPs than the uncached one.
    assert configs["toast-cached"]["gflops_per_step"] < configs["toast"]["gflops_per_step"]
    assert all(len(config["step_seconds"]) == results["repeats"] == 5 for config in configs.values())
    cache = results["cache"]
    assert (cache["tokens"], cache["channels"]) == (17, d)  # 28 px images, 7 px patches: 16 + CLS
    assert cache["bytes_per_example"] > 17 * d * 4  # the features, plus the dataset's own columns
    assert results["break_even_epochs"] > 0
