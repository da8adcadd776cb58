"""Sequence classification on a real small pretrained encoder (all-MiniLM-L6-v2, offline from PyPI)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import yaml
from conftest import REPO, write_jsonl
from safetensors.torch import load_file

from train.core.errors import UserError
from train.evaluation.cls_metrics import multilabel_metrics, tune_thresholds
from train.methods.classification import (
    ClassificationRecipe,
    export_onnx,
    load_classification_recipe,
    predict_labels,
    resolve_encoder,
    run_classification,
)

pytestmark = pytest.mark.e2e

RECIPE = REPO / "recipes" / "classify" / "minilm_keywords.yaml"
LABELS = ["cardiac", "respiratory", "endocrine", "digestive"]


def _recipe(tmp, **changes) -> ClassificationRecipe:
    data = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    data["output_dir"] = str(tmp)
    data["model"]["max_length"] = 32
    data["training"].update(num_train_epochs=2, logging_steps=50)
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        data[section][key] = value
    path = tmp.parent / f"{tmp.name}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return load_classification_recipe(path)


def test_multilabel_metrics_by_hand():
    labels = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    probs = np.array([[0.9, 0.2, 0.6], [0.1, 0.4, 0.2], [0.8, 0.7, 0.3], [0.3, 0.1, 0.45]])
    m = multilabel_metrics(probs, labels, 0.5)
    # predictions at 0.5: [1,0,1] [0,0,0] [1,1,0] [0,0,0]: TP 4, FP 0, FN 2
    assert m["f1_micro"] == pytest.approx(2 * 4 / (2 * 4 + 0 + 2))
    assert m["subset_accuracy"] == pytest.approx(0.5)  # rows 1 and 3 exactly right
    assert m["hamming_loss"] == pytest.approx(2 / 12)
    # samples Jaccard: 1, 0 (nothing predicted), 1, 0 -> 0.5; samples F1 the same here
    assert m["jaccard_samples"] == pytest.approx(0.5) and m["f1_samples"] == pytest.approx(0.5)
    assert m["f1_per_label"] == pytest.approx([1.0, 2 / 3, 2 / 3])  # label 1: P 1, R 1/2; label 2: P 1, R 1/2
    assert m["roc_auc_per_label"][0] == 1.0  # positives 0.9, 0.8 above negatives 0.1, 0.3
    # label 2 scores 0.45 for a positive: a threshold of 0.45 (or lower) catches it
    thresholds = tune_thresholds(probs, labels)
    assert thresholds[2] <= 0.45 and multilabel_metrics(probs, labels, thresholds)["f1_micro"] > m["f1_micro"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """MiniLM, last 2 of 6 layers and the head trained, BCE positive weights, 2 epochs."""
    out = tmp_path_factory.mktemp("cls") / "run"
    recipe = _recipe(out, model__train_last_n_layers=2)
    return recipe, run_classification(recipe)


def test_finetuned_beats_untrained_and_reports_every_metric(trained, tmp_path):
    from transformers import AutoTokenizer

    from train.methods.classification import build_model

    recipe, report = trained
    m = report["metrics"]
    for key in (
        "f1_micro",
        "f1_macro",
        "f1_samples",
        "jaccard_samples",
        "roc_auc_micro",
        "subset_accuracy",
        "hamming_loss",
    ):
        assert key in m
    assert report["labels"] == LABELS and len(m["roc_auc_per_label"]) == 4
    untrained_dir = tmp_path / "untrained"
    build_model(recipe, LABELS).save_pretrained(untrained_dir)
    AutoTokenizer.from_pretrained(resolve_encoder("minilm")).save_pretrained(untrained_dir)
    rows = [json.loads(line) for line in open(REPO / recipe.data.train, encoding="utf-8")][:80]
    rows = [r for r in rows if r["text"]]
    truth = np.array([[int(t in r["labels"]) for t in LABELS] for r in rows])

    def f1(model_dir):
        preds = predict_labels(model_dir, [r["text"] for r in rows])
        got = np.array([[int(t in p["labels"]) for t in LABELS] for p in preds])
        return multilabel_metrics(got.astype(float), truth)["f1_micro"]

    trained_f1, untrained_f1 = f1(report["model_dir"]), f1(untrained_dir)
    assert trained_f1 > untrained_f1 + 0.2 and trained_f1 > 0.8, (trained_f1, untrained_f1)
    out = REPO / recipe.output_dir
    assert (out / "per_label_f1.png").stat().st_size > 0 and "threshold" in (out / "per_label.txt").read_text()


def test_frozen_layers_do_not_change(trained):
    recipe, report = trained
    before = load_file(f"{resolve_encoder('minilm')}/model.safetensors")
    after = load_file(f"{report['model_dir']}/model.safetensors")
    frozen = [
        k
        for k in before
        if k.startswith(("embeddings.", "encoder.layer.0.", "encoder.layer.3.")) and f"bert.{k}" in after
    ]  # buffers such as position_ids are not saved
    trainable = [k for k in before if k.startswith("encoder.layer.5.")]
    assert frozen and trainable
    assert all((before[k] == after[f"bert.{k}"]).all() for k in frozen)
    assert any((before[k] != after[f"bert.{k}"]).any() for k in trainable)


def test_thresholds_are_saved_and_applied(trained, tmp_path):
    import shutil

    _, report = trained
    model = tmp_path / "model"
    shutil.copytree(report["model_dir"], model)
    saved = json.loads((model / "thresholds.json").read_text())
    assert set(saved) == set(LABELS) and all(0 < t < 1 for t in saved.values())
    saved["endocrine"] = 0.0  # every text now clears endocrine's threshold
    (model / "thresholds.json").write_text(json.dumps(saved))
    preds = predict_labels(model, ["He mentions palpitations.", "Seen today for diarrhea."])
    assert all("endocrine" in p["labels"] for p in preds)
    assert "cardiac" in preds[0]["labels"] and "digestive" in preds[1]["labels"]


def test_bad_rows_are_counted_and_written_aside(trained):
    recipe, _ = trained
    rejects = [json.loads(line) for line in open(REPO / recipe.output_dir / "rejects.jsonl", encoding="utf-8")]
    assert sorted(r["reason"] for r in rejects) == ["missing_text", "unknown_label"]


def test_onnx_export_matches_pytorch(trained, tmp_path):
    _, report = trained
    result = export_onnx(report["model_dir"], tmp_path / "cls.onnx")
    assert result["max_abs_diff_vs_torch"] < 1e-4 and result["argmax_equal"] and result["bytes"] > 1_000_000


def test_single_label_with_lora(tmp_path):
    rows = [json.loads(line) for line in open(REPO / "data_prep/samples/keyword_tags_sample.jsonl", encoding="utf-8")]
    single = [{"text": r["text"], "label": r["labels"][0]} for r in rows if r["text"] and len(r["labels"]) == 1]
    data = write_jsonl(tmp_path / "single.jsonl", single)
    recipe = _recipe(
        tmp_path / "single",
        model__problem_type="single_label",
        model__lora=True,
        data__train=str(data),
        data__label_field="label",
        training__pos_weight=False,
        training__learning_rate=2e-3,
        training__num_train_epochs=8,
    )
    report = run_classification(recipe)
    assert report["metrics"]["accuracy"] > 0.5  # 4 classes: chance is 0.25
    assert not list((tmp_path / "single" / "model").glob("adapter_*"))  # LoRA merged into a plain classifier
    assert not (tmp_path / "single" / "model" / "thresholds.json").exists()
    (pred,) = predict_labels(report["model_dir"], ["Main complaint: heartburn."])
    assert len(pred["labels"]) == 1


def test_recipe_mistakes_are_named(tmp_path):
    data = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    bad = copy.deepcopy(data)
    bad["model"]["problem"] = "multi_label"
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(UserError, match="unknown key 'model.problem'; did you mean 'problem_type'"):
        load_classification_recipe(tmp_path / "a.yaml")
    both = copy.deepcopy(data)
    both["model"].update(lora=True, train_last_n_layers=2)
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(both))
    with pytest.raises(UserError, match="choose one"):
        load_classification_recipe(tmp_path / "b.yaml")


def test_positive_class_weights_scale_the_loss_of_positives():
    import torch

    from train.methods.classification import _trainer_class

    class Model(torch.nn.Module):  # a fixed-logit stand-in: only the loss arithmetic is under test
        def forward(self, **inputs):
            return type("Out", (), {"logits": torch.zeros(2, 2)})()

    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    pos_weight = torch.tensor([1.0, 3.0])
    trainer = _trainer_class(pos_weight).__new__(_trainer_class(pos_weight))
    loss = trainer.compute_loss(Model(), {"labels": labels.clone()})
    # logits 0: each positive costs w*ln2, each negative ln2: (1 + 1) + (1 + 3) over 4 cells
    assert float(loss) == pytest.approx(6 * np.log(2) / 4)  # unweighted would be ln2
    from transformers import Trainer

    assert _trainer_class(None) is Trainer
