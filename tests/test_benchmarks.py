"""Smoke and correctness tests of the benchmark programs in `benchmarks/`, on tiny random models (`--tiny`).

Each benchmark's `--quick --tiny` path runs end to end and writes the JSON its docs are made from; the pieces whose
mistakes would silently skew the numbers are checked exactly: trainable-parameter counts, the cached-feature linear
probe, the head learning rate, the interleaved timing rounds and the peak-memory measurement.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from peft import get_peft_model

from peft_toast import ToastConfig

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import _data  # noqa: E402
import _models  # noqa: E402
import _results  # noqa: E402
import _timing  # noqa: E402
import _training  # noqa: E402
import calibration_speed  # noqa: E402
import common  # noqa: E402
import compile as compile_benchmark  # noqa: E402
import cost  # noqa: E402
import memory_at_scale  # noqa: E402
import prompt_init  # noqa: E402
import quality  # noqa: E402
import readout_gradients  # noqa: E402
import scaling  # noqa: E402
import top_blocks  # noqa: E402
import transfer  # noqa: E402

# The tiny models of `_models`: hidden size 32, 2 blocks, LoRA/TOAST rank 8.
D, L, R = 32, 2, 8


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quality_tiny_quick_writes_complete_results(tmp_path):
    output = tmp_path / "quality.json"
    quality.main(["--tiny", "--quick", "--output", str(output), "--threads", "1"])
    results = json.loads(output.read_text())

    assert set(results["tasks"]) == {"vision", "text"}
    for name, task in results["tasks"].items():
        assert set(task["methods"]) == set(_models.METHODS)
        head = D * task_labels(name) + (task_labels(name) if name == "vision" else 0)  # LLaMA's `score` has no bias
        maps = 2 if name == "vision" else 1  # the decoder's default freezes the down-maps A_l (`train_down=None`)
        expected = {
            "toast": L * maps * D * D + D + head,  # A_l (vision), C_l (d x d) per block, the prompt, the head
            "toast-r8": L * maps * 2 * D * R + D + head,  # A_l = I + U V (vision) and C_l = U' V' (rank 8)
            # LoRA A (r x d) and B (d_out x r) on q (d_out = d) and v (d_out = d, or 16 with LLaMA's 2 key-value heads)
            "lora": L * (2 * D * R + R * D + R * (D if name == "vision" else 16)) + head,
            "linear": head,
        }
        for method, record in task["methods"].items():
            if method in expected:
                assert record["trainable_parameters"] == expected[method], (name, method)
            assert len(record["runs"]) == 2  # --quick: seeds 0 and 1 at the (single) learning rate
            assert [run["seed"] for run in record["runs"]] == [0, 1]
            assert record["runs"][0] is not None and record["runs"][0]["lr"] == record["best_lr"]
            assert [run["lr"] for run in record["sweep"]] == [quality.learning_rates(method, name)[1]]
            assert 0.0 <= record["sweep"][0]["val_accuracy"] <= 1.0
            for run in record["runs"]:
                assert 0.0 <= run["test_accuracy"] <= 1.0
                assert math.isfinite(run["first_loss"]) and math.isfinite(run["final_loss"])
            accuracies = [run["test_accuracy"] for run in record["runs"]]
            assert record["test_accuracy_mean"] == pytest.approx(sum(accuracies) / 2)
        # the linear probe's best learning rate is every other method's head learning rate
        assert task["head_lr"] == task["methods"]["linear"]["best_lr"]
        assert all(
            run["head_lr"] == task["head_lr"] for m in ("toast", "lora", "full") for run in task["methods"][m]["runs"]
        )
        assert task["methods"]["full"]["trainable_parameters"] > task["methods"]["toast"]["trainable_parameters"]


def task_labels(name: str) -> int:
    return 4 if name == "vision" else 2


@pytest.mark.parametrize("name", ["vision", "text"])
def test_linear_probe_on_cached_features_equals_the_frozen_models_head(name):
    """Training the cached-feature probe is training the head of the frozen model: same logits for the same head."""
    sizes = {"train": 6, "val": 5, "test": 5}
    task = _data.vision_task(sizes=sizes, tiny=True) if name == "vision" else _data.text_task(sizes=sizes, tiny=True)
    model = task.new_model().eval()
    split = task.splits["val"]
    probe = _training.LinearProbe(_models.model_head(model))
    with torch.no_grad():
        batch = split.batch(range(len(split)))
        expected = model(**{key: value for key, value in batch.items() if key != "labels"}).logits
        torch.testing.assert_close(probe(_data.head_inputs(model, split)).logits, expected)
    if name == "text":  # texts of different lengths: the padded ones must use their last real token
        assert len({len(ids) for ids in split.input_ids}) > 1
    cached = task.probe_splits()
    assert cached is task.probe_splits()  # computed once
    assert {key: len(value) for key, value in cached.items()} == sizes
    assert all(torch.equal(cached[key].labels, task.splits[key].labels) for key in sizes)


def test_head_parameters_get_the_head_learning_rate():
    model = _models.apply_method(_models.load_image_classifier(None, 4, image_size=28, tiny=True), "lora")
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    heads = [name for name in names if _training.is_head_parameter(name)]
    assert heads and all("classifier" in name for name in heads)
    assert all("lora_" in name for name in names if name not in heads)

    optimizers = []
    original = torch.optim.AdamW

    def recording_adamw(*args, **kwargs):
        optimizers.append(original(*args, **kwargs))
        return optimizers[-1]

    task = _data.vision_task(sizes={"train": 8, "val": 4, "test": 4}, tiny=True)
    torch.optim.AdamW = recording_adamw
    try:
        _training.train(model, task.splits["train"], steps=1, batch_size=4, lr=1e-3, head_lr=5e-2, seed=0)
    finally:
        torch.optim.AdamW = original
    (optimizer,) = optimizers
    head_ids = {id(p) for name, p in model.named_parameters() if name in heads}
    for group in optimizer.param_groups:
        in_head = {id(p) in head_ids for p in group["params"]}
        assert len(in_head) == 1
        assert group["initial_lr"] == (5e-2 if in_head.pop() else 1e-3)


def test_batch_order_is_seeded_and_covers_each_epoch():
    first, again = _training.batch_order(10, 5, 4, seed=3), _training.batch_order(10, 5, 4, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert [len(batch) for batch in first] == [4] * 5
    flat = torch.cat(first)
    assert sorted(flat[:10].tolist()) == list(range(10))  # the first epoch is a permutation
    assert not all(torch.equal(a, b) for a, b in zip(first, _training.batch_order(10, 5, 4, seed=4)))


def test_interleaved_timings_run_every_workload_each_round():
    calls = []
    timings = _timing.interleaved_timings(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=2
    )
    assert calls == ["a", "b"] * 5
    assert {name: len(times) for name, times in timings.items()} == {"a": 3, "b": 3}
    assert _timing.median([3.0, 1.0, 2.0]) == 2.0 and _timing.median([4.0, 1.0, 2.0, 3.0]) == 2.5


def test_peak_rss_reset_sees_a_transient_allocation():
    """The CPU memory measurement: after the reset, the high-water mark includes a freed 256 MiB allocation."""
    before = _timing._rss_kib("VmRSS")
    _timing._reset_peak_rss()
    assert _timing._rss_kib("VmHWM") <= before + 4 * 1024
    block = torch.ones(64 * 2**20)  # 256 MiB, touched
    del block
    added_mib = (_timing._rss_kib("VmHWM") - before) / 1024
    assert 240 <= added_mib <= 300


def test_cost_tiny_quick_reports_times_and_ratios(tmp_path):
    output = tmp_path / "cost.json"
    cost.main(["--tiny", "--quick", "--no-memory", "--output", str(output), "--threads", "1"])
    results = json.loads(output.read_text())
    assert set(results["families"]) == {"vision", "text"}
    for name, family in results["families"].items():
        kinds = family["kinds"]
        assert set(kinds) == ({"train", "forward", "generate"} if name == "text" else {"train", "forward"})
        assert set(kinds["train"]["median_seconds"]) == set(cost.TRAIN_METHODS)
        assert set(kinds["forward"]["median_seconds"]) == set(cost.INFERENCE_METHODS)
        for entry in kinds.values():
            for method, times in entry["seconds"].items():
                assert len(times) == results["settings"]["repeats"]
                assert entry["median_seconds"][method] == _timing.median(times)
        ratios = family["ratios"]
        assert ratios["train_time_vs_lora"] == pytest.approx(
            kinds["train"]["median_seconds"]["toast"] / kinds["train"]["median_seconds"]["lora"]
        )
        assert all(_finite_positive(value) for value in ratios.values())
        assert family["trainable_parameters"]["toast"] > family["trainable_parameters"]["lora"]
    generate = results["families"]["text"]["kinds"]["generate"]
    assert generate["tokens_per_second"]["base"] == pytest.approx(
        generate["shape"]["new_tokens"] / generate["median_seconds"]["base"]
    )
    assert "train_memory_vs_lora" not in results["families"]["text"]["ratios"]


def test_compile_tiny_times_compiled_and_eager_steps_without_compiling_while_timed(tmp_path):
    output = tmp_path / "compile.json"
    args = ["--tiny", "--backend", "eager", "--repeats", "2", "--output", str(output), "--threads", "1"]
    try:
        compile_benchmark.main(args)  # backend "eager": dynamo's frames and guards, no code generation (seconds)
    finally:
        torch._dynamo.reset()
    results = json.loads(output.read_text())
    entry = results["families"]["vision"]
    names = {"toast", "toast-compiled", "lora", "lora-compiled"}
    assert set(entry["median_seconds"]) == set(entry["first_calls_seconds"]) == names
    for name, times in entry["seconds"].items():
        assert len(times) == 2 and entry["median_seconds"][name] == _timing.median(times)
    median = entry["median_seconds"]
    assert entry["ratios"]["toast_compiled_vs_eager"] == pytest.approx(median["toast-compiled"] / median["toast"])
    assert entry["ratios"]["toast_vs_lora_compiled"] == pytest.approx(
        median["toast-compiled"] / median["lora-compiled"]
    )
    # The first call compiles, the second at most a few frames, the timed rounds nothing.
    toast = entry["dynamo"]["toast-compiled"]
    assert toast["frames_compiled_per_call"][0] > 0 and toast["frames_compiled_per_call"][1] <= 3
    assert entry["compiles_while_timed"] == 0
    assert all(difference < 1e-5 for difference in entry["loss_difference"].values())
    assert "| vision (batch 4, px 28) | toast |" in compile_benchmark.table(results)


def test_top_blocks_tiny_reports_every_k_with_cached_and_uncached_steps(tmp_path):
    output = tmp_path / "top_blocks.json"
    top_blocks.main(["--tiny", "--output", str(output), "--threads", "1", "--repeats", "1"])
    results = json.loads(output.read_text())
    for family in ("vision", "text"):
        entry = results["families"][family]
        assert entry["ks"] == [1, 2] and entry["num_blocks"] == 2
        train = entry["kinds"]["train"]["median_seconds"]
        assert set(train) == {"lora", "toast-top1", "toast-top1-cached", "toast-top2"}
        assert set(entry["kinds"]["forward"]["median_seconds"]) == {"base", "toast-top1", "toast-top2"}
        ratios = entry["ratios"]["top1"]
        assert ratios["cached_train_vs_lora"] == pytest.approx(train["toast-top1-cached"] / train["lora"])
        assert entry["ratios"]["top2"]["cached_train_vs_lora"] is None  # every block steered: nothing to cache
        assert entry["trainable_parameters"]["toast-top2"] > entry["trainable_parameters"]["toast-top1"]
    text = results["families"]["text"]
    assert set(text["kinds"]["generate"]["median_seconds"]) == {"base", "toast-top1", "toast-top2"}
    assert "generate" not in results["families"]["vision"]["kinds"]
    # KV memory: the pass-1 cache shares the layers below the steered ones, (L + k) / L of the frozen model's cache.
    assert text["ratios"]["top1"]["kv_memory_vs_base"] == 1.5 and text["ratios"]["top2"]["kv_memory_vs_base"] == 2.0
    assert "| 1 / 2 |" in top_blocks.table(results)


def test_memory_at_scale_tiny_counts_every_method_on_meta_models(tmp_path):
    output = tmp_path / "memory.json"
    args = ["--tiny", "--threads", "1", "--output", str(output), "--random-model-dir", str(tmp_path)]
    args += ["--measure", "--measure-methods", "toast-top4"]  # (and LoRA, the reference; each in a fresh process)
    results = memory_at_scale.main(args)
    assert json.loads(output.read_text())["models"].keys() == {"tiny LLaMA", "tiny ViT"}
    llama = results["models"]["tiny LLaMA"]["methods"]
    assert set(llama) == set(memory_at_scale.METHODS)
    # LoRA r8 on q (32 -> 32) and v (32 -> 16, two KV heads of 8) of 4 blocks: 4 * 8 * (64 + 48) parameters.
    assert llama["lora"]["trainable_parameters"] == 4 * 8 * (64 + 48)
    for row in llama.values():
        assert row["adamw_state_bytes"] == 2 * row["gradient_bytes"] > 0
        assert 0 < row["activation_bytes"] < row["activation_bytes_with_attention_probabilities"]
    # Steering only the top block: backpropagation stops there, so far fewer saved activations than every block.
    assert llama["toast-top"]["activation_bytes"] < llama["toast"]["activation_bytes"] / 2
    assert "| tiny ViT" in memory_at_scale.table(results)
    measured = results["measured"]["methods"]
    assert set(measured) == {"lora", "toast-top4"} and measured["lora"]["peak_vs_lora"] == 1.0
    assert all(row["peak_mib"] > row["added_mib"] > 0 for row in measured.values())


def test_scaling_tiny_quick_measures_every_point(tmp_path):
    output = tmp_path / "scaling.json"
    scaling.main(["--tiny", "--quick", "--no-memory", "--output", str(output), "--threads", "1"])
    results = json.loads(output.read_text())
    assert list(results["sweeps"]) == list(scaling.SWEEPS["tiny"])
    for name, sweep in results["sweeps"].items():
        assert [point["value"] for point in sweep["points"]] == list(scaling.SWEEPS["tiny"][name][1])
        for point in sweep["points"]:
            for method in scaling.METHODS:
                assert _finite_positive(point[method]["median_seconds"])
                assert len(point[method]["seconds"]) == results["settings"]["repeats"]
    assert "|" in scaling.table(results)


@pytest.mark.slow
def test_cost_measures_peak_memory_in_fresh_processes(tmp_path):
    output = tmp_path / "cost.json"
    command = [sys.executable, str(BENCHMARKS / "cost.py"), "--tiny", "--quick", "--families", "text"]
    subprocess.run([*command, "--output", str(output), "--threads", "1"], check=True, capture_output=True, timeout=900)
    family = json.loads(output.read_text())["families"]["text"]
    memory = family["train_memory_mib"]
    assert set(memory) == set(cost.TRAIN_METHODS)
    for record in memory.values():
        assert record["model_mib"] > 0 and record["added_mib"] >= 0
        assert record["peak_mib"] == pytest.approx(record["model_mib"] + record["added_mib"])
    assert family["ratios"]["train_memory_vs_lora"] == pytest.approx(
        memory["toast"]["peak_mib"] / memory["lora"]["peak_mib"]
    )


def test_calibration_speed_tiny_times_every_setting(tmp_path):
    output = tmp_path / "calibration_speed.json"
    calibration_speed.main(["--tiny", "--output", str(output), "--threads", "1"])
    results = json.loads(output.read_text())
    assert set(results["tasks"]) == {"vision", "text"}
    for task in results["tasks"].values():
        assert set(task["median"]) == set(calibration_speed.SETTINGS)
        for runs in task["runs"].values():
            assert len(runs) == results["repeats"] == 1
            for run in runs:
                assert run["seconds"] == pytest.approx(run["pass_seconds"] + run["solve_seconds"])
                assert run["tokens"] == task["calibration_tokens"]
                # Calibration lowers the held-out loss of the identity maps, whatever the setting.
                assert 0 < run["held_out_loss"] < task["held_out_identity_loss"]
    markdown = calibration_speed.report_markdown(results)
    assert markdown.count("\n| ") == 1 + 2 * len(calibration_speed.SETTINGS)  # header + one row per task and setting


@pytest.mark.parametrize("task", ["vision", "text"])
def test_prompt_init_tiny_opens_the_gates(task, tmp_path):
    output = tmp_path / "prompt_init.json"
    arguments = ["--tiny", "--task", task, "--steps", "2", "--seeds", "0", "--threads", "1", "--output", str(output)]
    prompt_init.main(arguments)
    runs = prompt_init.main(arguments)  # appends to the same file
    assert [run["variant"] for run in runs] == ["default", "mean"] * 2
    default, mean = runs[:2]
    for run in runs:
        assert 0.0 <= run["val"] <= 1.0 and 0.0 <= run["test"] <= 1.0 and math.isfinite(run["final_loss"])
    # The mean feature has a positive cosine with most tokens: its gates are wider open than a random prompt's.
    assert mean["gate_mean"] > default["gate_mean"]
    assert mean["gate_zero_fraction"] < default["gate_zero_fraction"]


def test_quality_rerun_of_one_method_merges_into_an_earlier_run(tmp_path):
    first, rerun = tmp_path / "first.json", tmp_path / "rerun.json"
    quality.main(["--tiny", "--quick", "--tasks", "text", "--methods", "linear", "toast", "--output", str(first)])
    arguments = ["--tiny", "--quick", "--tasks", "text", "--methods", "toast", "--head-lr", "0.05"]
    quality.main([*arguments, "--output", str(rerun), "--threads", "1"])
    runs = json.loads(rerun.read_text())["tasks"]["text"]["methods"]["toast"]["runs"]
    assert [run["head_lr"] for run in runs] == [0.05, 0.05]  # the given head rate, not TOAST's own
    assert [run["lr"] for run in runs] == [quality.learning_rates("toast", "text")[1]] * 2 == [3e-5] * 2
    merged = quality.merge_results([first, rerun])["tasks"]["text"]
    assert set(merged["methods"]) == {"linear", "toast"}
    assert merged["methods"]["toast"]["runs"] == runs  # the rerun replaced the first run's TOAST record
    assert merged["methods"]["linear"] == json.loads(first.read_text())["tasks"]["text"]["methods"]["linear"]


def test_docs_sections_are_replaced_between_their_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("intro\n<!-- BEGIN table -->\nold\n<!-- END table -->\noutro\n")
    _results.update_docs_section("table", "| new |", path=page)
    assert page.read_text() == "intro\n<!-- BEGIN table -->\n| new |\n<!-- END table -->\noutro\n"
    with pytest.raises(ValueError, match="BEGIN other"):
        _results.update_docs_section("other", "x", path=page)


# ------------------------------------------------------------------------------------------------------- transfer


def test_transfer_tiny_writes_complete_results_and_src_methods_start_from_the_source(tmp_path):
    output = tmp_path / "transfer.json"
    methods = ["lora", "lora-src", "toast", "toast-src", "toast-rms", "toast-top3-src"]
    args = ["--tiny", "--threads", "1", "--tasks", "fmnist", "tweets", "--source-classes", "0", "1", "--pooled-probes"]
    transfer.main([*args, "--methods", *methods, "--output", str(output)])
    results = json.loads(output.read_text())
    image, text = results["tasks"]["vision-23"], results["tasks"]["tweets"]
    assert set(image["pooled_probes"]) == {"mean", "gate", "attention"} and "pooled_probes" not in text  # no boxes
    assert set(image["budgets"]["4"]) == {"linear", *methods}
    assert set(text["budgets"]["4"]) == {"linear", "lora", "toast", "toast-rms"}  # no source stage for text
    assert set(image["source_stage"]) >= {"lora-src", "toast-src", "toast-top3-src"}
    assert [run["lr"] for run in image["source_stage"]["toast-top3-src sweep"]] == [1e-3, 3e-3]
    for task, kind in ((image, "image"), (text, "text")):
        for method, record in task["budgets"]["4"].items():
            assert [run["seed"] for run in record["runs"]] == [0, 1], method
            if method != "linear":
                grid = transfer.learning_rates(method, SimpleNamespace(kind=kind))
                assert [run["lr"] for run in record["sweep"]] == list(grid)
                assert record["best_lr"] == max(record["sweep"], key=lambda run: run["val_accuracy"])["lr"]
            assert all(0.0 <= run["test_accuracy"] <= 1.0 for run in record["runs"])


def test_transfer_src_method_starts_from_the_source_adapter_and_the_probe_head():
    args = transfer.parse_args(["--tiny"])
    task = transfer.image_task("fmnist", args)
    source = get_toast_source(task)
    head = {"weight": torch.randn(task.num_labels, 32), "bias": torch.randn(task.num_labels)}
    model = transfer.new_model(task, "toast-src", seed=3, head=head, source={"toast-src": source})
    tensors = transfer.adapter_tensors(model)
    assert tensors.keys() == source.keys()
    for name, tensor in source.items():
        torch.testing.assert_close(tensors[name], tensor)
    torch.testing.assert_close(
        _models.model_head(model.base_model.model).modules_to_save["default"].weight, head["weight"]
    )


def test_transfer_train_size_keeps_the_first_images_of_the_same_split():
    full = transfer.image_task("fmnist", transfer.parse_args(["--tiny"]))
    few = transfer.image_task("fmnist", transfer.parse_args(["--tiny", "--train-size", "20"]))
    assert len(few.splits["train"]) == 20 and few.name.endswith("-train20")
    torch.testing.assert_close(few.splits["train"].pixel_values, full.splits["train"].pixel_values[:20])
    torch.testing.assert_close(few.splits["train"].labels, full.splits["train"].labels[:20])
    torch.testing.assert_close(few.splits["test"].pixel_values, full.splits["test"].pixel_values)


def test_transfer_pooled_probe_pools_the_patch_tokens_as_each_pooling_says():
    torch.manual_seed(0)
    tokens, target = torch.randn(3, 6, 4), torch.rand(3, 6)  # CLS + 5 patches
    patches, prompt = tokens[:, 1:], torch.randn(4)
    expected = {
        "mean": patches.mean(1),
        "target": (patches * target[:, 1:, None]).sum(1) / target[:, 1:].sum(1, keepdim=True),
    }
    gate = (patches @ prompt / (patches.norm(dim=-1) * prompt.norm())).clamp(0, 1)
    expected["gate"] = (patches * gate[..., None]).sum(1) / gate.sum(1, keepdim=True)
    expected["attention"] = (patches * torch.softmax(patches @ prompt / 2.0, dim=1)[..., None]).sum(1)
    for pooling, pooled in expected.items():
        probe = transfer.PooledProbe(4, 4, pooling, prompt)
        with torch.no_grad():
            probe.linear.weight.copy_(torch.cat([torch.zeros(4, 4), torch.eye(4)], dim=1))  # read the pooled half
            probe.linear.bias.zero_()
            torch.testing.assert_close(probe(tokens, target), pooled, msg=pooling)


def test_transfer_head_rate_methods_train_the_head_at_ten_times_the_rate(monkeypatch):
    seen = {}

    def fake_train(model, split, *, lr, head_lr=None, **kwargs):
        seen["rates"] = (lr, head_lr)
        return [0.0]

    monkeypatch.setattr(transfer._training, "train", fake_train)
    task = transfer.image_task("fmnist", transfer.parse_args(["--tiny"]))
    transfer.cache_pass1_features(task)
    for method, expected in (("lora-h10", (1e-3, 1e-2)), ("toast-readout-h10", (1e-3, 1e-2)), ("toast", (1e-3, None))):
        _, record = transfer.train_and_score(task, method, 1e-3, 0, 1, 4, None, [])
        assert seen["rates"][0] == expected[0] and seen["rates"][1] == pytest.approx(expected[1])
        assert record.get("head_lr") == pytest.approx(expected[1])


@pytest.mark.parametrize("method, plain", [("toast-readout-sgd-dp", "toast-readout-sgd"), ("lora-sgd-dp", "lora-sgd")])
def test_transfer_stochastic_depth_drops_whole_branches_in_training_only(method, plain):
    task = transfer.image_task("fmnist", transfer.parse_args(["--tiny"]))
    transfer.cache_pass1_features(task, [method])
    model, reference = transfer.new_model(task, method, 0, None), transfer.new_model(task, plain, 0, None)
    depths = [module for module in model.modules() if isinstance(module, transfer.StochasticDepth)]
    assert len(depths) == model.config.num_hidden_layers and all(d.drop_prob == 0.1 for d in depths)
    view = transfer.cached_view(task, "val", method).batch(range(8))
    view.pop("labels")
    model.eval()
    reference.eval()
    with torch.no_grad():  # the identity in eval mode: exactly the model without it
        assert torch.equal(model(**view).logits, reference(**view).logits)
    # training sees pixels (pass 1 is random now); the pass-1 cache stays for scoring
    train = transfer.cached_view(task, "train", method).batch(range(8))
    assert "toast_features" not in train and ("toast_features" in view) == method.startswith("toast")
    depths[0].drop_prob = 0.5  # a branch dropped for some examples of the batch and not for others
    keep = depths[0].train()(torch.ones(64, 3, 2))
    assert set(keep.unique().tolist()) == {0.0, 2.0} and torch.equal(keep, keep[:, :1, :1].expand_as(keep))
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        first, second = model(**train).logits, model(**train).logits
    assert not torch.equal(first, second)
    with pytest.raises(SystemExit, match="no stochastic-depth slot"):
        transfer.add_stochastic_depth(torch.nn.Sequential(torch.nn.Linear(2, 2)), 0.1)


@pytest.mark.parametrize("method", ["toast-fast", "toast-readout-sgd-p1"])
def test_transfer_unit_prompt_methods_start_from_the_data_direction_at_norm_one(method):
    task = transfer.image_task("fmnist", transfer.parse_args(["--tiny"]))
    transfer.cache_pass1_features(task, [method])
    model = transfer.new_model(task, method, 0, None)
    prompt = model.base_model.toast_prompt["default"].detach()
    data = transfer.new_model(task, "toast", 0, None)
    direction = data.initialise_prompt(pixel_values=task.splits["train"].pixel_values[:64]).detach()
    assert prompt.norm().item() == pytest.approx(1.0, rel=1e-6)
    torch.testing.assert_close(prompt, direction / direction.norm())


def test_transfer_weight_decay_methods_decay_every_tensor_by_1e_2(monkeypatch):
    seen = {}
    real_sgd = torch.optim.SGD

    def spy(groups, **kwargs):
        seen.update(kwargs)
        return real_sgd(groups, **kwargs)

    monkeypatch.setattr(torch.optim, "SGD", spy)
    task = transfer.image_task("fmnist", transfer.parse_args(["--tiny"]))
    transfer.cache_pass1_features(task)
    for method, decay in (("lora-sgd-wd", 1e-2), ("toast-readout-sgd-wd", 1e-2), ("lora-sgd", 1e-4)):
        _, record = transfer.train_and_score(task, method, 1e-3, 0, 1, 4, None, [])
        assert seen == {"momentum": 0.9, "weight_decay": decay}, method
        assert record["optimizer"] == ("sgd-wd1e-2" if decay == 1e-2 else "sgd")


def test_transfer_warm_up_methods_warm_up_for_thirty_percent_of_the_steps(monkeypatch):
    seen = {}

    def fake_train(model, split, *, warmup_fraction, **kwargs):
        seen["warmup_fraction"] = warmup_fraction
        return [0.0]

    monkeypatch.setattr(transfer._training, "train", fake_train)
    task = transfer.text_task(transfer.parse_args(["--tiny"]))
    for method, expected in (("lora-w30", 0.3), ("toast-rms-readout-w30", 0.3), ("lora", 0.1)):
        _, record = transfer.train_and_score(task, method, 1e-3, 0, 1, 4, None, [])
        assert seen["warmup_fraction"] == expected
        assert record.get("warmup_fraction") == (expected if method.endswith("-w30") else None)
    # The schedule itself: 30 % of 10 steps is 3 warm-up steps, the peak at the third.
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = transfer._training.warmup_cosine(optimizer, 10, 0.3)
    factors = []
    for _ in range(4):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert factors == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])


@pytest.mark.parametrize(
    "kind, method, random_method",
    [
        ("text", "toast-rms-readout-r8-pca", "toast-rms-readout-r8"),
        ("image", "toast-readout-r8-pca", "toast-readout-r8"),
    ],
)
def test_transfer_pca_readouts_read_the_top_directions_of_their_signal_and_start_at_the_frozen_model(
    kind, method, random_method
):
    from peft_toast.topdown import FeedbackMap

    args = transfer.parse_args(["--tiny"])
    task = transfer.text_task(args) if kind == "text" else transfer.image_task("fmnist", args)
    transfer.cache_pass1_features(task, [method])
    pca = transfer.new_model(task, method, 0, None)
    plain = transfer.new_model(task, random_method, 0, None)
    # The signal each readout receives, recomputed here from the same 64 training examples (padding left out).
    batch = transfer.cached_view(task, "train", method).batch(range(min(64, len(task.splits["train"]))))
    batch.pop("labels")
    mask = batch.get("attention_mask")
    received = {}
    readouts = {n: m for n, m in pca.named_modules() if isinstance(m, FeedbackMap) and "toast_readout" in n}

    def keep(name, tokens):
        received[name] = tokens[mask.bool()] if mask is not None else tokens.flatten(0, -2)

    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: keep(n, a[0])) for n, m in readouts.items()]
    with torch.no_grad():
        pca.eval()(**batch)
    for hook in hooks:
        hook.remove()
    assert len(readouts) == len(received) > 0
    plain_v = {n: p for n, p in plain.named_parameters() if n.endswith("toast_readout.default.v")}
    for name, module in readouts.items():
        top = torch.linalg.svd(received[name].double(), full_matrices=False).Vh[:8]
        v = module.v.detach().double()
        # Same row norms as the random factor it replaced; rows = the top singular directions up to sign.
        assert torch.allclose(v.norm(dim=1), plain_v[name + ".v"].detach().double().norm(dim=1), atol=1e-6)
        assert torch.allclose(
            (v / v.norm(dim=1, keepdim=True) * top).sum(1).abs(), torch.ones(8, dtype=v.dtype), atol=1e-4
        )
        assert not torch.allclose(v, plain_v[name + ".v"].detach().double())
        assert not module.u.any()
    view = transfer.cached_view(task, "val", method).batch(range(8))
    view.pop("labels")
    with torch.no_grad():
        assert torch.equal(pca.eval()(**view).logits, plain.eval()(**view).logits)


def test_transfer_lora_eva_starts_from_orthonormal_data_directions_at_the_frozen_model():
    task = transfer.text_task(transfer.parse_args(["--tiny"]))
    eva = transfer.new_model(task, "lora-eva", 0, None)
    plain = transfer.new_model(task, "lora", 0, None)
    a = {n: p.detach() for n, p in eva.named_parameters() if "lora_A" in n}
    assert len(a) == 2 * eva.config.num_hidden_layers and all(t.shape[0] == 8 for t in a.values())
    for name, weight in a.items():  # EVA's A: orthonormal rows (singular vectors), unlike the random init
        assert torch.allclose(weight @ weight.T, torch.eye(8), atol=1e-4), name
    assert not any(p.any() for n, p in eva.named_parameters() if "lora_B" in n)
    assert sum(p.numel() for p in eva.parameters() if p.requires_grad) == sum(
        p.numel() for p in plain.parameters() if p.requires_grad
    )
    view = transfer.cached_view(task, "val", "lora").batch(range(8))
    with torch.no_grad():
        assert torch.equal(eva.eval()(**view).logits, plain.eval()(**view).logits)


@pytest.mark.parametrize("rank", [8, 32])
def test_transfer_low_rank_decoder_recipe_trains_only_its_readouts_the_prompt_and_the_head(rank):
    task = transfer.text_task(transfer.parse_args(["--tiny"]))
    model = transfer.new_model(task, f"toast-rms-readout-r{rank}", 0, None)
    config = model.config
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    head = {name: size for name, size in trainable.items() if ".modules_to_save." in name}
    blocks, width = config.num_hidden_layers, config.hidden_size
    assert sum(head.values()) == config.num_labels * width  # the head's trained copy (no bias)
    # Readouts C_l = U'_l V'_l of the rank in every block and the prompt; the down-maps stay frozen.
    readouts = [name for name in trainable if ".toast_readout." in name]
    assert len(readouts) == 2 * blocks
    assert sum(trainable.values()) - sum(head.values()) == blocks * 2 * rank * width + width
    assert not any("toast_down" in name for name in trainable)
    assert model.peft_config["default"].feature_norm == "rms"


def test_transfer_methods_keep_their_measured_settings_under_the_decoder_defaults():
    """On a decoder, `ToastConfig()` now means `feature_norm="rms"`, `train_down=False`; the benchmark's methods keep
    the settings their results were measured with, and `toast-rms-readout` is the library's decoder default."""
    task = transfer.text_task(transfer.parse_args(["--tiny"]))
    settings = {
        method: transfer.new_model(task, method, 0, None).peft_config["default"]
        for method in ("toast", "toast-rms", "toast-readout", "toast-rms-readout")
    }
    assert {method: (c.feature_norm, c.train_down) for method, c in settings.items()} == {
        "toast": ("none", True),
        "toast-rms": ("rms", True),
        "toast-readout": ("none", False),
        "toast-rms-readout": ("rms", False),
    }
    default = get_peft_model(task.new_model(), ToastConfig()).peft_config["default"]
    assert (default.feature_norm, default.train_down) == ("rms", False)


def test_transfer_lora_all_r32_adapts_every_linear_projection_of_every_block_at_rank_32():
    task = transfer.text_task(transfer.parse_args(["--tiny"]))
    base = task.new_model()
    model = transfer.new_model(task, "lora-all-r32", 0, None)
    # Independently: every nn.Linear inside the blocks of the base model, each with A (32 x in) and B (out x 32).
    linears = {name: m for name, m in base.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name}
    assert {name.rsplit(".", 1)[-1] for name in linears} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }  # fmt: skip
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    lora = {name: size for name, size in trainable.items() if ".lora_" in name}
    head = {name: size for name, size in trainable.items() if ".modules_to_save." in name}
    assert set(trainable) == set(lora) | set(head)
    assert sum(head.values()) == task.num_labels * base.config.hidden_size
    assert sum(lora.values()) == sum(32 * (m.in_features + m.out_features) for m in linears.values())
    adapted = {name.split(".lora_")[0].removeprefix("base_model.model.") for name in lora}
    assert adapted == set(linears)
    assert model.peft_config["default"].lora_alpha == 64


def test_apply_method_names_every_method_it_builds_when_the_method_is_unknown():
    with pytest.raises(ValueError, match="'lora-rank-32'") as error:
        _models.apply_method(torch.nn.Linear(2, 2), "lora-rank-32")
    assert all(method in str(error.value) for method in (*_models.METHODS, *_models.LORA_VARIANTS))
    with pytest.raises(ValueError, match="Tweet sentiment has 2 .* or 3 classes"):
        _data.text_task(sizes={"train": 4}, tiny=True, num_labels=4)


def test_transfer_three_class_tweets_run_end_to_end_with_a_three_way_head(tmp_path):
    args = transfer.parse_args(["--tiny", "--tasks", "tweets3"])
    task = transfer.text_task(args, "tweets3")
    assert task.name == "tweets3" and task.num_labels == 3
    split = task.splits["train"]
    assert set(split.labels.tolist()) == {0, 1, 2}
    for label, ids in zip(split.labels.tolist(), split.input_ids):
        assert (3 in ids) == (label == 1) and (2 in ids) == (label == 2)  # each class its own marker token
    assert transfer.new_model(task, "toast-rms-readout", 0, None).config.num_labels == 3
    output = tmp_path / "tweets3.json"
    transfer.main(["--tiny", "--threads", "1", "--tasks", "tweets3", "--methods", "lora", "--output", str(output)])
    record = json.loads(output.read_text())["tasks"]["tweets3"]["budgets"]["4"]
    assert set(record) == {"linear", "lora"}
    assert [run["lr"] for run in record["lora"]["sweep"]] == list(transfer.LEARNING_RATES["lora"])


def test_transfer_bbc_headlines_run_end_to_end_with_a_five_way_head(tmp_path):
    args = transfer.parse_args(["--tiny", "--tasks", "bbc"])
    task = transfer.text_task(args, "bbc")
    assert task.name == "bbc" and task.num_labels == 5
    split = task.splits["train"]
    assert set(split.labels.tolist()) == set(range(5))
    markers = {1: 4, 2: 3, 3: 2, 4: 1}  # class c > 0 carries token 5 - c; class 0 none; token 0 pads
    for label, ids in zip(split.labels.tolist(), split.input_ids):
        assert {token for token in ids if token < 5} == ({markers[label]} if label else set())
    output = tmp_path / "bbc.json"
    transfer.main(
        ["--tiny", "--threads", "1", "--tasks", "bbc", "--methods", "toast-rms-readout", "--output", str(output)]
    )
    record = json.loads(output.read_text())["tasks"]["bbc"]["budgets"]["4"]
    assert set(record) == {"linear", "toast-rms-readout"}
    with pytest.raises(ValueError, match="BBC news headlines have 5 topics"):
        _data.text_task(sizes={"train": 4}, tiny=True, num_labels=3, corpus="bbc")
    with pytest.raises(ValueError, match="Unknown text corpus 'reviews'"):
        _data.text_task(sizes={"train": 4}, tiny=True, num_labels=2, corpus="reviews")


def test_transfer_query_steering_diagnostic_adds_the_signal_to_the_queries_only_when_steering():
    task = transfer.image_task("fmnist", transfer.parse_args(["--tiny"]))
    steered = transfer.new_model(task, "toast-readout-qv", 0, None)
    plain = transfer.new_model(task, "toast-readout", 0, None)
    state = {k: torch.randn_like(v) * 0.3 if "toast_readout" in k else v for k, v in plain.state_dict().items()}
    plain.load_state_dict(state)
    steered.load_state_dict(
        {k: state[k.replace(".query.", ".", 1) if k not in state else k] for k in steered.state_dict()}
    )
    assert sum(isinstance(m, transfer.SteeredQuery) for m in steered.modules()) == plain.config.num_hidden_layers
    batch = task.splits["train"].batch(range(4))
    batch.pop("labels")
    with torch.no_grad():
        assert not torch.allclose(steered(**batch).logits, plain(**batch).logits, atol=1e-5)
        with steered.disable_adapter(), plain.disable_adapter():
            torch.testing.assert_close(steered(**batch).logits, plain(**batch).logits, rtol=0, atol=0)
    trainable = {n for n, p in steered.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in plain.named_parameters() if p.requires_grad}


def test_transfer_top_block_methods_start_pass2_from_the_cached_hidden_state_exactly(monkeypatch):
    args = transfer.parse_args(["--tiny"])
    task = transfer.image_task("fmnist", args)
    assert transfer.hidden_block("toast-top3-src", 12) == 9 and transfer.hidden_block("toast-top3-src", 3) is None
    # The tiny ViT has 2 blocks: "top 3" steers them all, so steer the top one here.
    monkeypatch.setitem(transfer.TOAST_CONFIGS, "toast-top3", {"layers_to_transform": [-1]})
    transfer.cache_pass1_features(task, ["toast", "toast-top3"])
    depth = task.depth
    assert transfer.hidden_block("toast", depth) is None
    assert transfer.hidden_block("toast-top3", depth) == depth - 1
    model = transfer.new_model(task, "toast-top3", seed=0, head=None).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "toast_" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    view = transfer.cached_view(task, "val", "toast-top3")
    batch = view.batch(range(4))
    assert batch["toast_hidden_block"] == depth - 1 and batch["toast_hidden"].shape == batch["toast_features"].shape
    calls = []
    blocks = model.base_model.architecture.blocks
    with torch.no_grad():
        from_pixels = model(pixel_values=batch["pixel_values"]).logits  # (the blocks' output kind is learned here)
        # (a shared block is still called, but returns pass 1's output without running its layers)
        handle = blocks[0].attention.register_forward_hook(lambda *_: calls.append(1))
        from_hidden = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        assert not calls  # pass 2 started at the top block: block 0's layers never ran
        model(pixel_values=batch["pixel_values"])
    handle.remove()
    assert calls  # without the cache pass 1 runs block 0
    torch.testing.assert_close(from_hidden, from_pixels, rtol=0, atol=1e-6)
    with torch.no_grad(), model.disable_adapter():
        frozen = model(pixel_values=batch["pixel_values"]).logits
    assert not torch.allclose(from_pixels, frozen, atol=1e-4)  # the adapter does steer


def get_toast_source(task) -> dict:
    """Adapter tensors of a TOAST model of `task` with every tensor made distinctive."""
    model = transfer.new_model(task, "toast", seed=0, head=None)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "toast_" in name:
                parameter.add_(torch.randn_like(parameter))
    return transfer.adapter_tensors(model)


def test_cluttered_canvas_places_the_garment_in_its_box_and_coverage_adds_up():
    rng = np.random.default_rng(0)
    garment = np.full((28, 28), 200, dtype=np.uint8)
    digits = [np.zeros((28, 28), dtype=np.uint8)] * 4  # dark distractors: only the garment is bright
    canvas, (x0, y0, x1, y1) = transfer.cluttered_canvas(garment, digits, rng)
    assert canvas.shape == (transfer.CANVAS, transfer.CANVAS)
    assert transfer.OBJECT_SIZES[0] <= x1 - x0 == y1 - y0 <= transfer.OBJECT_SIZES[1]
    bright = np.argwhere(canvas > 0)
    assert (
        bright[:, 0].min() >= y0 and bright[:, 0].max() < y1 and bright[:, 1].min() >= x0 and bright[:, 1].max() < x1
    )
    coverage = transfer.patch_coverage((x0, y0, x1, y1), transfer.CANVAS, 8)
    patch_area = (transfer.CANVAS / 8) ** 2
    assert coverage.sum().item() * patch_area == pytest.approx((x1 - x0) * (y1 - y0))
    assert coverage.max() <= 1 and coverage.min() >= 0
    assert transfer.patch_coverage((0, 0, 14, 14), transfer.CANVAS, 8).tolist() == [1.0] + [0.0] * 63


def test_augmented_views_move_the_target_box_with_the_garment():
    rng = np.random.default_rng(0)
    canvas = np.zeros((transfer.CANVAS, transfer.CANVAS), dtype=np.uint8)
    box = (80, 20, 110, 50)  # x0, y0, x1, y1: near the right edge, so some shifts cut it
    canvas[20:50, 80:110] = np.arange(30, dtype=np.uint8)[None, :] + 100  # brightness grows to the right
    flips, cut = set(), False
    for _ in range(20):
        view, (x0, y0, x1, y1) = transfer.augmented_view(canvas, box, rng)
        bright = np.argwhere(view > 0)
        assert (bright[:, 1].min(), bright[:, 0].min(), bright[:, 1].max() + 1, bright[:, 0].max() + 1) == (
            x0, y0, x1, y1,
        )  # fmt: skip
        row = view[y0, x0:x1].astype(int)
        flips.add(bool(row[0] > row[-1]))  # brightness falling to the right: flipped
        limit = int(transfer.CANVAS * transfer.SHIFT_FRACTION)
        assert abs((y1 + y0) - 70) <= 2 * limit
        cut |= x1 - x0 < 30
    assert flips == {True, False} and cut


def test_initial_gate_shares_weight_the_gates_by_target_coverage():
    task = transfer.image_task("fmnist", transfer.parse_args(["--tiny"]))
    test = task.splits["test"]
    model = transfer.get_peft_model(task.new_model(), transfer.ToastConfig()).eval()
    first = _training.batch_order(len(task.splits["train"]), 1, 8, seed=0)[0]
    model.initialise_prompt(pixel_values=task.splits["train"].pixel_values[first])
    with torch.no_grad():
        gates = model.base_model.toast_selection(pixel_values=test.pixel_values)  # (N, T)
    test.target = torch.zeros_like(gates)
    test.target[:, 1:5] = 1.0  # the "target" covers patches 0-3 fully
    shares = transfer.initial_gate_shares(task, batch_size=8)

    assert set(shares) == {"data", "random"}
    expected = (gates[:, 1:5].sum(-1) / gates.sum(-1)).mean().item()
    assert shares["data"]["gate_mass_on_target"] == pytest.approx(expected, rel=1e-5)
    assert shares["data"]["mean_gate"] == pytest.approx(gates.mean().item(), rel=1e-5)
    assert 0 <= shares["random"]["share_of_zero_gates"] <= 1


def test_transfer_merge_joins_methods_of_the_same_task_and_budget(tmp_path):
    def results(methods: dict) -> dict:
        return {"tasks": {"clutter-4": {"probe_lr": 0.03, "budgets": {"200": methods}}}}

    first, second = tmp_path / "a.json", tmp_path / "b.json"

    def record(n: int) -> dict:  # a finished record, told apart by its mean
        return {"runs": [], "test_accuracy_mean": n}

    first.write_text(json.dumps(results({"linear": record(1), "lora": record(2), "toast": record(3)})))
    second.write_text(json.dumps(results({"linear": record(9), "toast-fast": record(4), "toast": record(5)})))
    merged = transfer.merge_results([first, second])["tasks"]["clutter-4"]["budgets"]["200"]
    assert merged == {"linear": record(1), "lora": record(2), "toast": record(5), "toast-fast": record(4)}
    third = tmp_path / "c.json"  # a budget that only a later file has: its probe comes with it
    third.write_text(
        json.dumps({"tasks": {"clutter-4": {"budgets": {"400": {"linear": record(7), "lora": record(8)}}}}})
    )
    merged = transfer.merge_results([first, third])["tasks"]["clutter-4"]["budgets"]
    assert merged["400"] == {"linear": record(7), "lora": record(8)} and merged["200"]["linear"] == record(1)


def test_clutter_curves_follow_k_and_keep_only_methods_measured_at_every_k():
    def task(k: int, lora: float, attention: float) -> dict:
        def record(mean, lr, shares=None):
            return {"test_accuracy_mean": mean, "test_accuracy_std": 0.01, "best_lr": lr, "runs": [shares or {}]}

        methods = {"linear": record(0.4, 0.03), "lora": record(lora, 1e-3, {"attention_on_target": attention})}
        if k == 0:
            methods["toast-r8"] = record(0.9, 1e-3)  # only at k = 0: left out of the curves
        methods["toast-oracle"] = record(0.5, 1e-3)  # a diagnostic: never a curve
        return {"frozen_attention_on_target": 0.2, "target_patch_share": 0.1, "budgets": {"200": methods}}

    results = {"tasks": {"clutter-4": task(4, 0.6, 0.5), "clutter-0": task(0, 0.8, 0.7), "clutter-4-01234": {}}}
    curves = transfer.clutter_curves(results)
    assert curves["k"] == [0, 4] and list(curves["methods"]) == ["linear", "lora"]
    assert curves["methods"]["lora"]["mean"] == pytest.approx([80.0, 60.0])
    assert curves["methods"]["lora"]["attention"] == [0.7, 0.5]
    table = transfer.clutter_table(curves)
    assert "| LoRA r=8 (q, v) | **80.0 ± 1.0** (lr 0.001) | **60.0 ± 1.0** (lr 0.001) |" in table
    assert "| CLS attention on target: LoRA r=8 (q, v) | 70% | 50% |" in table


def test_prompt_directions_point_at_the_target_and_away_from_the_common_tokens():
    features = torch.zeros(2, 5, 3)  # CLS + 4 patches per image; the target (patch 1) along e0, the rest along e1
    features[:, :, 1] = 2.0
    features[:, 1] = torch.tensor([3.0, 0.0, 0.0])
    target = torch.zeros(2, 5)
    target[:, 1] = 1.0
    direction = transfer.target_direction(features, target)
    torch.testing.assert_close(direction, torch.tensor([1.0, -1.0, 0.0]))
    contrast = transfer.contrast_direction(features)  # no labels: the rare token direction minus the mean one
    assert contrast[0] > 0 > contrast[1] and contrast[2] == 0


def test_transfer_merge_keeps_the_finished_seeds_of_a_stopped_run(tmp_path):
    stopped = {
        "runs": [{"seed": 0, "test_accuracy": 0.6}, {"seed": 1, "test_accuracy": 0.7}, {"seed": 2}],
        "sweep": [],
    }
    unscored = {"runs": [], "sweep": [{"lr": 1e-3, "val_accuracy": 0.5}]}
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"tasks": {"clutter-4": {"budgets": {"400": {"lora": stopped, "toast": unscored}}}}}))
    merged = transfer.merge_results([path])["tasks"]["clutter-4"]["budgets"]["400"]
    assert list(merged) == ["lora"] and [run["seed"] for run in merged["lora"]["runs"]] == [0, 1]
    assert merged["lora"]["test_accuracy_mean"] == pytest.approx(0.65)
    assert merged["lora"]["test_accuracy_std"] == pytest.approx(0.0707, abs=1e-4)


def test_transfer_assemble_extends_a_sweep_past_its_edge_and_rechooses_on_validation(tmp_path):
    def run(seed, lr, val=None, test=None):
        return {"seed": seed, "lr": lr, **({"val_accuracy": val} if val is not None else {}),
                **({"test_accuracy": test} if test is not None else {})}  # fmt: skip

    def results_file(name, method_record):
        path = tmp_path / name
        budgets = {"400": {"toast-top3": {"label": "x", **method_record}}}
        path.write_text(json.dumps({"command": name, "tasks": {"fmnist": {"budgets": budgets}}}))
        return path

    first = results_file(  # sweep 3e-4 / 1e-3: best 1e-3 (an edge), seeds 1 and 2 there
        "first.json",
        {"sweep": [run(0, 3e-4, 0.80), run(0, 1e-3, 0.85)],
         "runs": [run(0, 1e-3, 0.85, 0.78), run(1, 1e-3, test=0.79), run(2, 1e-3, test=0.80)]},
    )  # fmt: skip
    edge = results_file("edge.json", {"sweep": [run(0, 3e-3, 0.86)], "runs": [run(0, 3e-3, 0.86, 0.70)]})
    seeds = results_file(
        "seeds.json", {"sweep": [run(1, 3e-3, 0.90)], "runs": [run(1, 3e-3, 0.90, 0.72), run(2, 3e-3, test=0.74)]}
    )
    output = tmp_path / "assembled.json"
    transfer.main(["--from-json", str(first), str(edge), str(seeds), "--assemble", str(output)])
    record = json.loads(output.read_text())["tasks"]["fmnist"]["budgets"]["400"]["toast-top3"]
    assert [r["lr"] for r in record["sweep"]] == [3e-4, 1e-3, 3e-3]  # seed 1's "sweep" is not a seed-0 sweep point
    assert record["best_lr"] == 3e-3
    assert [(r["seed"], r["test_accuracy"]) for r in record["runs"]] == [(0, 0.70), (1, 0.72), (2, 0.74)]
    assert record["test_accuracy_mean"] == pytest.approx(0.72)


def _mean_val_run(seed, lr, val, test):
    return {"seed": seed, "lr": lr, "val_accuracy": val, "test_accuracy": test}


def test_transfer_mean_val_chooses_the_rate_of_the_best_mean_validation_over_complete_seeds():
    # seed 0 prefers 3e-1 (0.90), the mean prefers 1e-1 (0.85 vs 0.80); 1.0 has the best mean but only seed 0
    sweep = [
        _mean_val_run(0, 1e-1, 0.84, 0.82), _mean_val_run(1, 1e-1, 0.85, 0.83), _mean_val_run(2, 1e-1, 0.86, 0.84),
        _mean_val_run(0, 3e-1, 0.90, 0.70), _mean_val_run(1, 3e-1, 0.75, 0.72), _mean_val_run(2, 3e-1, 0.75, 0.74),
        _mean_val_run(0, 1.0, 0.95, 0.10),
        _mean_val_run(0, 3e-2, 0.86, 0.50), _mean_val_run(1, 3e-2, 0.84, 0.50), _mean_val_run(2, 3e-2, 0.85, 0.50),
    ]  # fmt: skip
    record = {"sweep": sweep}
    transfer.choose_on_mean_validation(record)
    assert record["best_lr"] == 3e-2  # tied with 1e-1 at 0.85: the lower rate wins, as in a single run
    assert record["val_accuracy_means"] == pytest.approx({"0.03": 0.85, "0.1": 0.85, "0.3": 0.80, "1": 0.95})
    record["sweep"][-1]["val_accuracy"] = 0.83  # now 1e-1 alone is best
    transfer.choose_on_mean_validation(record)
    assert record["best_lr"] == 1e-1
    assert [(run["seed"], run["test_accuracy"]) for run in record["runs"]] == [(0, 0.82), (1, 0.83), (2, 0.84)]
    assert record["test_accuracy_mean"] == pytest.approx(0.83)
    assert record["test_accuracy_std"] == pytest.approx(0.01)


def test_transfer_assemble_rechooses_mean_val_files_on_the_mean_over_seeds_and_refuses_mixed_choices(tmp_path):
    def results_file(name, record):
        path = tmp_path / name
        budgets = {"1200": {"lora-sgd": {"label": "x", "selection": "mean-val", "runs": [], **record}}}
        path.write_text(json.dumps({"command": name, "tasks": {"fmnist-val1000": {"budgets": budgets}}}))
        return path

    low = results_file("low.json", {"sweep": [_mean_val_run(s, 1e-2, v, 0.6) for s, v in enumerate((0.9, 0.7, 0.7))]})
    high = results_file("high.json", {"sweep": [_mean_val_run(s, 3e-2, 0.8, 0.7 + s / 100) for s in range(3)]})
    output = tmp_path / "assembled.json"
    transfer.main(["--from-json", str(low), str(high), "--assemble", str(output)])
    record = json.loads(output.read_text())["tasks"]["fmnist-val1000"]["budgets"]["1200"]["lora-sgd"]
    assert [(run["seed"], run["lr"]) for run in record["sweep"]] == [(s, lr) for lr in (1e-2, 3e-2) for s in range(3)]
    assert record["best_lr"] == 3e-2 and [run["test_accuracy"] for run in record["runs"]] == [0.70, 0.71, 0.72]
    seed0 = tmp_path / "seed0.json"
    data = json.loads(low.read_text())
    del data["tasks"]["fmnist-val1000"]["budgets"]["1200"]["lora-sgd"]["selection"]
    seed0.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="different ways"):
        transfer.main(["--from-json", str(high), str(seed0), "--assemble", str(tmp_path / "mixed.json")])


def test_transfer_assemble_task_suffix_keeps_another_machines_runs_in_tables_of_their_own(tmp_path):
    def results_file(name, method, test):
        path = tmp_path / name
        record = {"label": method, "selection": "mean-val", "runs": [],
                  "sweep": [_mean_val_run(s, 1e-1, 0.8, test) for s in range(3)]}  # fmt: skip
        task = {"description": "Fashion-MNIST", "budgets": {"400": {method: record}}}
        path.write_text(json.dumps({"command": name, "tasks": {"fmnist-val1000": task}}))
        return path

    intel, amd = results_file("intel.json", "lora-sgd", 0.80), results_file("amd.json", "lora-sgd", 0.70)
    output = tmp_path / "amd-assembled.json"
    transfer.main(["--from-json", str(amd), "--assemble", str(output), "--task-suffix", "amd"])
    assembled = json.loads(output.read_text())["tasks"]
    assert list(assembled) == ["fmnist-val1000-amd"]
    assert assembled["fmnist-val1000-amd"]["description"] == "Fashion-MNIST (amd)"
    transfer.main(["--from-json", str(intel), "--assemble", str(tmp_path / "intel-assembled.json")])
    merged = transfer.merge_results([tmp_path / "intel-assembled.json", output])["tasks"]  # the docs' merge: two tasks
    assert merged["fmnist-val1000"]["budgets"]["400"]["lora-sgd"]["test_accuracy_mean"] == pytest.approx(0.80)
    assert merged["fmnist-val1000-amd"]["budgets"]["400"]["lora-sgd"]["test_accuracy_mean"] == pytest.approx(0.70)
    with pytest.raises(SystemExit, match="use it with --assemble"):
        transfer.main(["--from-json", str(amd), "--task-suffix", "amd"])


def test_transfer_rank_curves_take_the_recorded_or_known_backbone_and_plot(tmp_path, monkeypatch):
    def record(params, test):
        return {"label": "x", "runs": [{"seed": 0, "lr": 0.1, "test_accuracy": test, "trainable_parameters": params}],
                "test_accuracy_mean": test, "test_accuracy_std": 0.0}  # fmt: skip

    budget = {"toast-readout-r8-pca-sgd": record(77962, 0.81), "toast-readout-sgd": record(1773706, 0.83),
              "lora-sgd": record(151306, 0.84), "linear": record(3850, 0.79), "lora": record(151306, 0.9)}  # fmt: skip
    results = {"tasks": {
        "known": {"model": "DINOv2-S (ViT-S/14, offline) at 56 px", "budgets": {"400": budget}},
        "recorded": {"model": "tiny", "backbone_parameters": 1000, "budgets": {"400": budget}},
        "one-point": {"model": "tiny", "budgets": {"400": {"toast-readout-sgd": record(10, 0.5)}}},
    }}  # fmt: skip
    curves = {curve["task"]: curve for curve in transfer.rank_curves(results)}
    assert set(curves) == {"known", "recorded"}  # a single point is no curve
    assert curves["known"]["backbone_parameters"] == 21_545_856 and curves["recorded"]["backbone_parameters"] == 1000
    assert curves["known"]["points"]["toast-readout-sgd"] == (1773706, pytest.approx(83.0), 0.0)
    assert set(curves["known"]["points"]) == {"toast-readout-r8-pca-sgd", "toast-readout-sgd", "lora-sgd", "linear"}
    monkeypatch.setattr(_results, "IMAGES", tmp_path)
    transfer.plot_rank_curves(list(curves.values()))
    assert (tmp_path / "transfer-rank.png").stat().st_size > 0


def test_transfer_records_the_backbone_parameters_without_the_head(tmp_path):
    output = tmp_path / "transfer.json"
    transfer.main(["--tiny", "--threads", "1", "--tasks", "fmnist", "--methods", "lora", "--output", str(output)])
    (task,) = json.loads(output.read_text())["tasks"].values()
    model = transfer.image_task("fmnist", transfer.parse_args(["--tiny"])).new_model()
    assert task["backbone_parameters"] == sum(p.numel() for p in model.parameters()) - sum(
        p.numel() for p in model.classifier.parameters()
    )


@pytest.mark.slow
def test_dinov2_backbone_parameters_match_the_count_the_rank_plot_knows():
    from peft_toast.assets import dinov2_small_vit_path

    model = _models.load_image_classifier(dinov2_small_vit_path(), 10, image_size=56)
    assert transfer.backbone_parameters(model) == transfer.KNOWN_BACKBONE_PARAMETERS["DINOv2-S (ViT-S/14, offline)"]


def test_transfer_mean_val_runs_every_seed_at_every_rate_on_the_larger_validation_split(tmp_path):
    output = tmp_path / "transfer.json"
    args = ["--tiny", "--threads", "1", "--tasks", "fmnist", "--methods", "lora", "--select", "mean-val"]
    transfer.main([*args, "--val-size", "24", "--output", str(output)])
    task = json.loads(output.read_text())["tasks"]["vision-val24"]
    assert task["sizes"]["val"] == 24
    record = task["budgets"]["4"]["lora"]
    grid = transfer.learning_rates("lora", SimpleNamespace(kind="image"))
    assert [(run["seed"], run["lr"]) for run in record["sweep"]] == [(s, lr) for lr in grid for s in (0, 1)]
    means = {lr: np.mean([r["val_accuracy"] for r in record["sweep"] if r["lr"] == lr]) for lr in grid}
    assert record["best_lr"] == max(grid, key=lambda lr: (means[lr], -lr))
    assert [run["lr"] for run in record["runs"]] == [record["best_lr"]] * 2
    with pytest.raises(SystemExit, match="at least"):
        transfer.image_task("fmnist", transfer.parse_args(["--tiny", "--val-size", "8"]))


def test_transfer_extra_validation_images_are_new_and_class_balanced():
    from peft_toast.assets import load_fashion_mnist

    drawn = load_fashion_mnist("train", limit=1200)
    extra = transfer.extra_images(drawn, 800, None)
    seen = {np.asarray(image).tobytes() for image in drawn["image"]}
    assert len(extra) == 800 and not any(np.asarray(image).tobytes() in seen for image in extra["image"])
    assert np.bincount(extra["label"]).tolist() == [80] * 10
    target = transfer._garments(drawn, [5, 6, 7, 8, 9])
    extra = transfer.extra_images(target, 300, [5, 6, 7, 8, 9])
    assert np.bincount(extra["label"]).tolist() == [60] * 5 and extra.features == target.features


def test_transfer_extra_test_images_come_from_the_test_split_and_are_new():
    from peft_toast.assets import load_fashion_mnist

    drawn = load_fashion_mnist("test", limit=500)
    extra = transfer.extra_images(drawn, 1000, None, split="test")
    seen = {np.asarray(image).tobytes() for image in drawn["image"]}
    test_split = {np.asarray(image).tobytes() for image in load_fashion_mnist("test")["image"]}
    pixels = [np.asarray(image).tobytes() for image in extra["image"]]
    assert len(set(pixels)) == 1000 and not seen & set(pixels) and set(pixels) <= test_split
    assert np.bincount(extra["label"]).tolist() == [100] * 10


def test_transfer_test_size_keeps_every_other_split_and_the_first_test_examples():
    default = transfer.image_task("fmnist", transfer.parse_args(["--tiny"]))
    larger = transfer.image_task("fmnist", transfer.parse_args(["--tiny", "--test-size", "40"]))
    assert larger.name.endswith("-test40") and len(larger.splits["test"]) == 40
    for name in ("train", "val"):
        assert torch.equal(default.splits[name].pixel_values, larger.splits[name].pixel_values)
    first = len(default.splits["test"])
    assert torch.equal(default.splits["test"].pixel_values, larger.splits["test"].pixel_values[:first])
    with pytest.raises(SystemExit, match="--test-size must be at least"):
        transfer.image_task("fmnist", transfer.parse_args(["--tiny", "--test-size", "8"]))
    with pytest.raises(SystemExit, match="--test-size is for the image tasks"):
        transfer.main(["--tiny", "--tasks", "tweets", "--test-size", "40", "--output", "unused.json"])


@pytest.mark.parametrize("task_name, method", [("bbc", "toast-rms-readout"), ("clutter", "toast-readout")])
def test_readout_gradients_reports_every_steered_block_against_an_independent_svd(tmp_path, task_name, method):
    output = tmp_path / "gradients.json"
    result = readout_gradients.main(
        ["--tiny", "--task", task_name, "--batches", "2", "--threads", "1", "--output", str(output)]
    )
    assert json.loads(output.read_text())["batches"] == result["batches"]
    assert len(result["batches"]) == 2
    assert result["method"] == method
    # Recompute the first batch's gradient here, from the same start, and compare block by block.
    args = transfer.parse_args(["--tiny", "--tasks", task_name])
    task = transfer.text_task(args, task_name) if task_name == "bbc" else transfer.image_task(task_name, args, 4)
    transfer.cache_pass1_features(task, [method])
    head = transfer.probe_head(task, result["probe_lr"], 0)[0]
    model = transfer.new_model(task, method, 0, head)
    split = transfer.cached_view(task, "train", method)
    indices = next(iter(_training.batch_order(len(split), 1, 16, 0)))
    model.train()
    model(**split.batch(indices)).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if ".toast_readout." in n}
    blocks = result["batches"][0]["blocks"]
    assert len(blocks) == len(grads) == model.config.num_hidden_layers
    for name, grad in grads.items():
        block = blocks[re.search(r"\.(?:layers|layer)\.(\d+)\.", name).group(1)]
        singular = torch.linalg.svdvals(grad.double())
        assert block["frobenius"] == pytest.approx(singular.pow(2).sum().sqrt().item(), rel=1e-6)
        assert block["spectral"] == pytest.approx(singular[0].item(), rel=1e-6)
        assert block["spectral"] <= block["frobenius"] + 1e-12


def test_quality_lr_grid_replaces_one_methods_sweep_and_rejects_a_malformed_item(tmp_path):
    output = tmp_path / "quality.json"
    arguments = ["--tiny", "--tasks", "text", "--methods", "toast", "lora", "--head-lr", "0.03", "--threads", "1"]
    results = quality.main([*arguments, "--lr-grid", "toast:1e-4,3e-4", "--output", str(output)])
    methods = results["tasks"]["text"]["methods"]
    assert [run["lr"] for run in methods["toast"]["sweep"]] == [1e-4, 3e-4]
    assert [run["lr"] for run in methods["lora"]["sweep"]] == list(quality.LEARNING_RATES["lora"])
    assert json.loads(output.read_text())["protocol"]["lr_grid"] == ["toast:1e-4,3e-4"]
    for item in ("toast", "toast:fast", ":1e-3"):
        with pytest.raises(SystemExit, match="expected METHOD:LR"):
            common.lr_grid_overrides([item])


def test_sgd_training_is_the_references_sgd_against_an_independent_computation():
    """`optimizer="sgd"`: momentum 0.9 and weight decay 1e-4 on every trained tensor, under the same warm-up + cosine
    schedule and clipping at 1 as AdamW; replayed here by hand on a linear probe."""
    torch.manual_seed(0)
    features, labels = torch.randn(12, 5) * 3, torch.randint(0, 3, (12,))
    split = _data.Split(labels=labels, features=features)
    head = torch.nn.Linear(5, 3)
    start = {name: p.detach().clone() for name, p in head.named_parameters()}
    lr, steps, batch_size = 0.05, 3, 4
    losses = _training.train(
        _training.LinearProbe(head), split, steps=steps, batch_size=batch_size, lr=lr, seed=7, optimizer="sgd"
    )

    params = {name: value.clone().requires_grad_() for name, value in start.items()}
    momentum = {name: torch.zeros_like(value) for name, value in start.items()}
    expected_losses = []
    for step, indices in enumerate(_training.batch_order(len(split), steps, batch_size, seed=7)):
        logits = features[indices] @ params["weight"].T + params["bias"]
        loss = torch.nn.functional.cross_entropy(logits, labels[indices])
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
        scale = min(1.0, 1.0 / (norm.item() + 1e-6))
        factor = [1.0, 1.0, 0.5][step]  # one warm-up step (10 % of 3, at least 1), then cosine over the other two
        with torch.no_grad():
            for name, p in params.items():
                momentum[name] = 0.9 * momentum[name] + grads[name] * scale + 1e-4 * p
                p -= lr * factor * momentum[name]
        expected_losses.append(loss.item())
    assert losses == pytest.approx(expected_losses, rel=1e-5)
    for name, p in head.named_parameters():
        torch.testing.assert_close(p.detach(), params[name].detach(), rtol=0, atol=1e-7)
        assert not torch.equal(p.detach(), start[name])  # it trained
    with pytest.raises(ValueError, match="optimizer='adam'.*adamw"):
        _training.train(_training.LinearProbe(head), split, steps=1, batch_size=4, lr=lr, seed=0, optimizer="adam")


def test_transfer_sgd_methods_train_with_sgd_and_say_so(monkeypatch):
    seen = {}

    def fake_train(model, split, *, optimizer="adamw", **kwargs):
        seen["optimizer"] = optimizer
        return [0.0]

    monkeypatch.setattr(transfer._training, "train", fake_train)
    task = transfer.image_task("fmnist", transfer.parse_args(["--tiny"]))
    transfer.cache_pass1_features(task)
    for method, expected in (
        ("toast-sgd", "sgd"),
        ("toast-readout-sgd", "sgd"),
        ("lora-sgd", "sgd"),
        ("toast-readout-r8-pca-sgd", "sgd"),
        ("lora", "adamw"),
    ):
        model, record = transfer.train_and_score(task, method, 1e-3, 0, 1, 4, None, [])
        assert seen["optimizer"] == expected
        assert record.get("optimizer") == (expected if method.endswith("-sgd") else None)
    assert not any(
        p.requires_grad for name, p in model.named_parameters() if "lora_" not in name and "classifier" not in name
    )


def test_transfer_method_spec_rejects_both_adapters_and_its_views_follow_the_table():
    with pytest.raises(ValueError, match="TOAST configuration or a LoRA adapter, not both"):
        transfer.Method("both", (1e-3,), toast={}, lora="lora")
    spec = transfer.METHOD_SPECS["toast-readout-r20-pca-sgd"]
    assert transfer.TOAST_CONFIGS["toast-readout-r20-pca-sgd"] == {"train_down": False, "feedback_rank": 20}
    assert transfer.OPTIMIZER_OF["toast-readout-r20-pca-sgd"] == "sgd" and spec.rates == (3e-2, 1e-1, 3e-1)
    assert "toast-readout-r20-pca-sgd" in transfer.PCA_READOUTS and "lora-sgd" not in transfer.PCA_READOUTS
    assert transfer.LORA_ADAPTERS["lora-sgd-wd"] == "lora" and transfer.OPTIMIZER_OF["lora-sgd-wd"] == "sgd-wd1e-2"
    assert "linear" not in transfer.TOAST_CONFIGS and "linear" not in transfer.LORA_ADAPTERS


def test_transfer_every_method_has_a_label_and_a_grid_and_trains_only_its_adapter_and_head():
    task = transfer.image_task("fmnist", transfer.parse_args(["--tiny"]))
    transfer.cache_pass1_features(task)
    for method in transfer.METHODS:
        assert method in transfer.LABELS, method
        if method == "linear":
            continue
        assert transfer.learning_rates(method, task), method
        if method in transfer.SOURCE_OF or method in ("toast-oracle", "lora-eva"):
            continue  # a source stage / the target boxes / text inputs (PEFT's EVA reads `input_ids`)
        model = transfer.new_model(task, method, 0, None)
        trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        adapter = "lora_" if method in transfer.LORA_ADAPTERS else "toast_"
        assert any(adapter in name for name in trainable), method
        assert all(adapter in name or "classifier" in name for name in trainable), (method, trainable)
        assert any("classifier" in name for name in trainable), method
