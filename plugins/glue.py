"""``glue``: zero-shot accuracy on GLUE-style classification and multiple-choice sets, scored by
comparing the log-likelihoods of the answer options (no generation, so nothing to parse).

The known sets are those of AlphaEdit's general-capability suite (SST-2, MRPC, CoLA, RTE, NLI,
sentiment, MMLU, MuTual-style dialogue), read from local JSON files. Any other JSON file of
records ``{"prompt": ..., "choices": [...], "answer": index}`` is read as a generic set.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import Field

from kedit.api import EvalResult, Evaluator, InputError, Options, hookimpl

LETTERS = "ABCDEFGHIJ"
Item = tuple[str, list[str], int]  # prompt, option continuations, index of the right one


# One fixed template per set. The short, completion-style forms were chosen on the unedited
# SmolLM2-135M (a 100-example sample of SST-2: "Sentiment:" 0.77, a question-style prompt 0.48);
# multiple choice is scored as a cloze over the option texts, since a model this small does not
# map answers to letters (letters: 0.18 on dialogue, 0.27 on MMLU).


def _sentiment(r: dict[str, Any]) -> Item:
    return f"Review: {r['sentence'].strip()}\nSentiment:", ["negative", "positive"], int(str(r["label"]) == "1")


def _true_false(text: Callable[[dict[str, Any]], str], true_label: Any) -> Callable[[dict[str, Any]], Item]:
    return lambda r: (f"{text(r)} True or False?\nAnswer:", ["False", "True"], int(r["label"] == true_label))


def _mmlu(r: dict[str, Any]) -> Item:
    return f"Question: {r['question'].strip()}\nAnswer:", [str(c) for c in r["choices"]], int(r["answer"])


def _dialogue(r: dict[str, Any]) -> Item:
    return r["article"].strip() + "\n", [str(o).strip() for o in r["options"]], LETTERS.index(str(r["answers"]).strip())


def _entails(r: dict[str, Any]) -> str:
    return f"{r['sentence1'].strip()}\nQuestion: {r['sentence2'].strip()}"


@dataclass(frozen=True)
class Task:
    file: str
    fmt: Callable[[dict[str, Any]], Item]


TASKS: dict[str, Task] = {
    "sst2": Task("sst2.json", _sentiment),
    "sentiment": Task("sentiment_analysis.json", _sentiment),
    "cola": Task("cola.json", _true_false(
        lambda r: f"\"{r['sentence'].strip()}\" This sentence is grammatically correct.", 1)),
    "mrpc": Task("mrpc.json", lambda r: (f"Sentence 1: {r['sentence1'].strip()}\nSentence 2: {r['sentence2'].strip()}"
                                         "\nSame meaning:", ["no", "yes"], int(r["label"] == 1))),
    # GLUE RTE: 0 = entailment.
    "rte": Task("rte.json", _true_false(_entails, 0)),
    "nli": Task("nli.json", _true_false(_entails, "entailment")),
    "mmlu": Task("mmlu.json", _mmlu),
    "dialogue": Task("dialogue.json", _dialogue),
}


def _generic(r: dict[str, Any]) -> Item:
    return str(r["prompt"]), [str(c) for c in r["choices"]], int(r["answer"])


def discover(data: str, tasks: list[str] | None) -> dict[str, tuple[Path, Callable[[dict[str, Any]], Item]]]:
    """Task name -> (file, formatter): the known files in a folder, or one file."""
    path = Path(data)
    if not path.exists():
        raise InputError(f"glue: data {data}: no such file or folder")
    found: dict[str, tuple[Path, Callable[[dict[str, Any]], Item]]] = {}
    if path.is_dir():
        for name, task in TASKS.items():
            if (path / task.file).is_file():
                found[name] = (path / task.file, task.fmt)
    else:
        known = {t.file: (n, t) for n, t in TASKS.items()}
        name, task = known.get(path.name, (path.stem, Task(path.name, _generic)))
        found[name] = (path, task.fmt)
    if tasks:
        unknown = [t for t in tasks if t not in found]
        if unknown:
            raise InputError(f"glue: task(s) {', '.join(unknown)} not found in {data}; found: {', '.join(found) or 'none'}")
        found = {t: found[t] for t in tasks}
    if not found:
        raise InputError(f"glue: no known set in {data} (expected files such as "
                         f"{', '.join(t.file for t in TASKS.values())})")
    return found


def load_items(path: Path, fmt: Callable[[dict[str, Any]], Item], sample: int | None, seed: int, task: str) -> list[Item]:
    from kedit.textio import read_json

    records = read_json(path)
    if not isinstance(records, list) or not records:
        raise InputError(f"glue: {path}: expected a non-empty JSON list of records")
    from kedit.evaluate import sample_indices

    items = []
    for i in sample_indices(len(records), sample, seed, task):
        try:
            prompt, options, answer = fmt(records[i])
        except (KeyError, ValueError, TypeError, IndexError) as exc:
            raise InputError(f"glue: {path}: record {i + 1}: {type(exc).__name__}: {exc}") from None
        if not 0 <= answer < len(options):
            raise InputError(f"glue: {path}: record {i + 1}: answer {answer} out of range")
        items.append((prompt, options, answer))
    return items


def macro_f1(gold: list[int], pred: list[int], k: int) -> float:
    scores = []
    for c in range(k):
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        fp = sum(g != c and p == c for g, p in zip(gold, pred))
        fn = sum(g == c and p != c for g, p in zip(gold, pred))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / k


class GlueOptions(Options):
    data: str = Field(..., description="folder with the sets (sst2.json, mrpc.json, ...) or one JSON file")
    tasks: list[str] | None = Field(None, description=f"sets to run (default: all found); known: {', '.join(TASKS)}")
    sample: int | None = Field(100, ge=1, description="examples per set, drawn with the evaluation seed (null: all)")


class Glue(Evaluator):
    """Zero-shot accuracy and macro-F1 on GLUE-style sets by answer-option log-likelihood."""

    name = "glue"
    protocol = ("glue-loglik-v1: zero-shot, one fixed template per set, prediction = option with the highest "
                "summed log-likelihood of ' option' after the prompt; sample drawn per set with the seed")
    Options = GlueOptions
    primary = "data"
    uses_specs = False
    data_kind = "folder"
    task_metric = "acc"
    headline = ("mean.acc",)

    def evaluate(self, model, tokenizer, specs, options, context) -> EvalResult:
        from kedit.scoring import TeacherForced

        scorer = context.scorer if context.scorer is not None else TeacherForced(model, tokenizer)
        metrics: dict[str, float] = {}
        samples: dict[str, list[float]] = {}
        info: dict[str, Any] = {}
        sets = discover(options.data, options.tasks)
        accs = []
        for task, (path, fmt) in sets.items():
            items = load_items(path, fmt, options.sample, context.seed, task)
            scores = iter(scorer.score([(p, o) for p, opts, _ in items for o in opts]))
            gold, pred = [], []
            for _, opts, answer in items:
                ll = [next(scores).total for _ in opts]
                gold.append(answer)
                pred.append(max(range(len(opts)), key=ll.__getitem__))
            k = max(len(o) for _, o, _ in items)
            correct = [float(g == p) for g, p in zip(gold, pred)]
            metrics[f"{task}.acc"] = sum(correct) / len(correct)
            metrics[f"{task}.f1"] = macro_f1(gold, pred, k)
            samples[f"{task}.acc"] = correct
            accs.append(metrics[f"{task}.acc"])
            info[task] = {"n": len(items), "chance": 1 / k,
                          "majority": max(gold.count(c) for c in set(gold)) / len(gold),
                          "most_predicted_share": max(pred.count(c) for c in set(pred)) / len(pred),
                          "file": str(path)}
        metrics["mean.acc"] = sum(accs) / len(accs)
        if len({len(v) for v in samples.values()}) == 1:  # equal sets: the mean over sets is the mean over items
            samples["mean.acc"] = [x for v in list(samples.values()) for x in v]
        return EvalResult(metrics, samples, info)


@hookimpl
def register_evaluators(register):
    register(Glue)
