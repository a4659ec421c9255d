"""Evaluation results from elsewhere: lm-evaluation-harness result files and model-card model-index blocks."""
import re

from django.db import transaction
from django.utils import timezone
from huggingface_hub.repocard_data import model_index_to_eval_results

from gatehouse.audit.services import audit_record
from gatehouse.core.errors import InvalidInput
from gatehouse.registry.models import Benchmark, EvaluationResult, EvaluatorKind, ModelVersion
from gatehouse.registry.selectors import organization_for_writer


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-")[:100] or "unknown"


def parse_lm_eval(payload: dict) -> tuple[list[dict], str]:
    """Rows from an lm-evaluation-harness results file (0.4 "metric,filter" keys, or 0.3 plain keys)."""
    results = payload.get("results") if isinstance(payload, dict) else None
    if not isinstance(results, dict) or not results:
        raise InvalidInput("Not an lm-evaluation-harness results file: it has no 'results' object.")
    samples = payload.get("n-samples") or {}
    version = str(payload.get("lm_eval_version") or payload.get("git_hash") or "")[:32]
    rows = []
    for task, metrics in results.items():
        if not isinstance(metrics, dict):
            continue
        for name, value in metrics.items():
            metric, _, filter_name = name.partition(",")
            if metric.endswith("_stderr") or metric == "alias" or isinstance(value, bool) \
                    or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filter_name}" if filter_name else f"{metric}_stderr")
            label = metric if filter_name in ("", "none") else f"{metric} ({filter_name})"
            task_samples = samples.get(task) or {}
            rows.append({"task": task, "name": metrics.get("alias", task).strip(" -") or task, "metric": label[:64],
                         "value": float(value), "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                         "samples": task_samples.get("effective") if isinstance(task_samples, dict) else None})
    if not rows:
        raise InvalidInput("The lm-evaluation-harness file has no numeric metrics.")
    return rows, version


def parse_model_index(model_index) -> list[dict]:
    try:
        _, results = model_index_to_eval_results(model_index)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InvalidInput(f"model-index is malformed ({exc!r}); see the Hub's model-index format.") from None
    rows = []
    for result in results:
        if not isinstance(result.metric_value, (int, float)) or isinstance(result.metric_value, bool):
            raise InvalidInput(f"model-index value for {result.dataset_type}/{result.metric_type} must be a number.")
        rows.append({"task": result.dataset_type or result.dataset_name or "unknown",
                     "name": result.dataset_name or result.dataset_type, "metric": (result.metric_type or "score")[:64],
                     "value": float(result.metric_value), "stderr": None, "samples": None,
                     "split": (result.dataset_split or "")[:64], "source_name": result.source_name,
                     "source_url": result.source_url or "", "task_type": result.task_type or ""})
    return rows


def evaluation_rows_record(*, version: ModelVersion, rows: list[dict], source: str, harness: str = "",
                           harness_version: str = "", evaluator: str = "", evaluator_kind: str = EvaluatorKind.INTERNAL,
                           evidence_url: str = "") -> list[EvaluationResult]:
    """Upsert rows: importing the same file again updates its values instead of duplicating them."""
    saved = []
    for row in rows:
        benchmark, _ = Benchmark.objects.get_or_create(
            key=_key(row["task"]), defaults={"name": (row.get("name") or row["task"])[:200],
                                             "task_type": row.get("task_type", "")[:100]})
        result, _ = EvaluationResult.objects.update_or_create(
            version=version, benchmark=benchmark, metric=row["metric"],
            evaluator=(row.get("source_name") or evaluator or "model card")[:200],
            defaults={"value": row["value"], "stderr": row.get("stderr"), "samples": row.get("samples"),
                      "dataset_split": row.get("split", ""), "harness": harness[:100],
                      "harness_version": harness_version, "evaluator_kind": evaluator_kind,
                      "evidence_url": row.get("source_url") or evidence_url, "source": source,
                      "evaluated_at": timezone.now()})
        saved.append(result)
    return saved


def evaluations_import(*, version: ModelVersion, actor, format: str, data, evaluator: str = "",
                       evaluator_kind: str = EvaluatorKind.INTERNAL, evidence_url: str = "") -> list[EvaluationResult]:
    organization_for_writer(user=actor, organization=version.model.organization)
    if evaluator_kind not in EvaluatorKind.values:
        raise InvalidInput(f"evaluator_kind must be one of {', '.join(EvaluatorKind.values)}.")
    if format == "lm-eval":
        rows, harness_version = parse_lm_eval(data)
        kwargs = {"source": EvaluationResult.Source.LM_EVAL, "harness": "lm-evaluation-harness",
                  "harness_version": harness_version}
    elif format == "model-index":
        rows = parse_model_index(data.get("model-index", data) if isinstance(data, dict) else data)
        kwargs = {"source": EvaluationResult.Source.MODEL_INDEX}
    else:
        raise InvalidInput("format must be lm-eval or model-index.")
    with transaction.atomic():
        saved = evaluation_rows_record(version=version, rows=rows, evaluator=evaluator, evaluator_kind=evaluator_kind,
                                       evidence_url=evidence_url, **kwargs)
        audit_record(actor=actor, action="evaluation.import", target=version,
                     data={"format": format, "results": len(saved), "evaluator": evaluator})
    return saved
