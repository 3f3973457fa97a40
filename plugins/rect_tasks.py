"""``rect-tasks``: the RECT paper's eight downstream tasks, with its prompts, greedy generation
budgets and scoring (Gu et al. 2024, code ``JasonForJoy/Model-Editing-Hurt``; the data README
in ``shared/data/rect/`` describes each script).

Every task generates greedily and scores the *continuation* only. Where the paper's scripts
measure something other than their name says, the metric is named for what it measures and the
difference is recorded in ``info``:

- ``reasoning`` (GSM8K): the prompt carries the gold rationale, so this is answer *copying*:
  correct when the gold number is a substring of 5 generated tokens. Trivial baseline: the last
  number in the rationale.
- ``nli`` (RTE train, RECT's file), ``closed_qa`` (BoolQ), ``sentiment`` (SST-2): one token, which
  must be the label word; ``.score`` counts any other output as wrong (the paper's "total
  accuracy"), ``.answered`` is the share of outputs that were a label word.
- ``open_qa`` (NQ-open with a generated passage): exact match of any contiguous word span of the
  normalised continuation with a normalised gold answer. The paper's script searched the decoded
  string *with* the prompt (passage included); that figure is ``info.open_qa.em_with_prompt``.
- ``dialogue`` (MuTual): one token, the option letter.
- ``summarization`` (SAMSum): mean of the ROUGE-1/2/L F-scores of 25 tokens (``rouge-score``,
  Google's implementation, no stemming; the paper used the ``rouge`` package, whose tokenisation
  differs slightly). Trivial baseline: the dialogue's first 25 words.
- ``ner`` (CoNLL-2003): per entity type, the share of gold entities found as substrings of 10
  generated tokens (recall, not the F1 the paper's README names), averaged over four types.
  Trivial baseline: the sentence's first 10 words, echoed.
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import Field

from kedit.api import EvalResult, Evaluator, InputError, Options, hookimpl

TYPES = {"PER": "Person", "LOC": "Location", "ORG": "Organization", "MISC": "Miscellaneous"}


@dataclass
class Item:
    prompts: list[str]
    gold: Any
    extra: dict[str, Any]


@dataclass(frozen=True)
class Task:
    folder: str  # "rect" or "glue"
    file: str
    tokens: int  # generation budget
    read: Callable[[dict[str, Any]], Item]
    score: Callable[[list[str], Item], dict[str, float]]
    metric: str  # what .score measures
    chance: float | None  # the chance level where there is one


# --- prompts (verbatim from the paper's scripts, typos included) ---

def _reasoning(r: dict[str, Any]) -> Item:
    hint, _, gold = str(r["answer"]).partition("#### ")
    prompt = f"Q: {r['question']} A:Let's think step by step. {hint} Therefore, the answer (arabic numerals) is:"
    return Item([prompt], gold.strip(), {"hint": hint})


def _nli(r: dict[str, Any]) -> Item:
    return Item([f"{r['sentence1']} entails the {r['sentence2']}. True or False? answer:"],
                "true" if r["label"] == "entailment" else "false", {})


def _boolq(r: dict[str, Any]) -> Item:
    prompt = ("Please answer the given question based on the passage. The answer should be exact 'yes' or 'no'. "
              f"passage: {r['passage']} question: {r['question']}. answer:")
    return Item([prompt], "yes" if r["answer"] else "no", {})


def _sst2(r: dict[str, Any]) -> Item:
    prompt = ("For each snippet of text,label the sentiment of the text as positive or negative.The answer should "
              f"be exact 'positive' or 'negative'. text: {r['sentence']} answer:")
    return Item([prompt], "positive" if str(r["label"]) == "1" else "negative", {})


def _nq(r: dict[str, Any]) -> Item:
    prompt = (f"Refer to the passage below and answer the following question. Passage: {r['passage']} "
              f"Question: {r['question']}")
    return Item([prompt], [str(a) for a in r["answers"]], {"prompt": prompt})


def _mutual(r: dict[str, Any]) -> Item:
    o = r["options"]
    prompt = (f"Q: {r['article']} Which choice is correct? Answer Chioces: (A){o[0]}(B){o[1]}(C){o[2]}(D){o[3]} "
              "A: Among A through D, the answer is")
    return Item([prompt], str(r["answers"]).strip(), {})


def _samsum(r: dict[str, Any]) -> Item:
    return Item([f"{r['dialogue']}\nTL;DR:"], str(r["summary"]), {"dialogue": str(r["dialogue"])})


def ner_sentence(tokens: list[str]) -> str:
    """Tokens joined by spaces, with "," and "." attached to the previous token (the paper's rule)."""
    out = ""
    for t in tokens:
        out += t if t in (",", ".") and out else (" " + t if out else t)
    return out


def ner_entities(tokens: list[str], tags: list[str]) -> list[tuple[str, str]]:
    """(type, text) of each gold entity: from a ``B-`` tag to the next ``O`` (the paper's rule, so
    adjacent entities with no ``O`` between them merge)."""
    out, i = [], 0
    while i < len(tags):
        if tags[i].startswith("B-"):
            j = i + 1
            while j < len(tags) and tags[j] != "O":
                j += 1
            out.append((tags[i][2:], ner_sentence(tokens[i:j])))
            i = j
        else:
            i += 1
    return out


def _conll(r: dict[str, Any]) -> Item:
    tokens, tags = [str(t) for t in r["tokens"]], [str(t) for t in r["ner_tags"]]
    if len(tokens) != len(tags):
        raise ValueError(f"{len(tokens)} tokens but {len(tags)} tags")
    sentence = ner_sentence(tokens)
    prompts = [f"Please identify {name} Entity from the given text. Text: {sentence} Entity:" for name in TYPES.values()]
    return Item(prompts, ner_entities(tokens, tags), {"sentence": sentence})


# --- scoring ---

def _label(out: str) -> str:
    return out.strip().lower()


def _exact_label(labels: tuple[str, str]) -> Callable[[list[str], Item], dict[str, float]]:
    def score(outs: list[str], item: Item) -> dict[str, float]:
        said = _label(outs[0])
        return {"score": float(said == item.gold), "answered": float(said in labels)}
    return score


def _reasoning_score(outs: list[str], item: Item) -> dict[str, float]:
    numbers = re.findall(r"-?\d[\d,]*\.?\d*", item.extra["hint"].replace("$", ""))
    last = numbers[-1].rstrip(".,") if numbers else ""
    return {"score": float(item.gold in outs[0]), "trivial": float(last.replace(",", "") == item.gold.replace(",", ""))}


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def span_match(prediction: str, answers: list[str]) -> bool:
    """Whether any contiguous word span of the normalised prediction equals a normalised answer."""
    words = normalize_answer(prediction).split()
    golds = {normalize_answer(a) for a in answers} - {""}
    for g in golds:
        n = len(g.split())
        if any(" ".join(words[i:i + n]) == g for i in range(len(words) - n + 1)):
            return True
    return False


def _nq_score(outs: list[str], item: Item) -> dict[str, float]:
    return {"score": float(span_match(outs[0], item.gold)),
            "with_prompt": float(span_match(item.extra["prompt"] + outs[0], item.gold))}


def _mutual_score(outs: list[str], item: Item) -> dict[str, float]:
    said = outs[0].strip().strip("().:").upper()
    return {"score": float(said == item.gold), "answered": float(said in ("A", "B", "C", "D"))}


_ROUGE: list[Any] = []


def rouge_mean(prediction: str, reference: str) -> float:
    """Mean of the ROUGE-1, ROUGE-2 and ROUGE-L F-scores; 0 for an empty prediction."""
    if not prediction.strip():
        return 0.0
    if not _ROUGE:
        try:
            from rouge_score import rouge_scorer
        except ImportError:
            raise InputError("rect-tasks: summarization needs the rouge-score package "
                             "(pip install 'kedit[rect]' or pip install rouge-score)") from None
        _ROUGE.append(rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False))
    s = _ROUGE[0].score(reference, prediction)
    return (s["rouge1"].fmeasure + s["rouge2"].fmeasure + s["rougeL"].fmeasure) / 3


def _samsum_score(outs: list[str], item: Item) -> dict[str, float]:
    lead = " ".join(item.extra["dialogue"].split()[:25])
    return {"score": rouge_mean(outs[0], item.gold), "trivial": rouge_mean(lead, item.gold)}


def _ner_score(outs: list[str], item: Item) -> dict[str, float]:
    """Per type: found and gold entity counts (summed over the sample, then divided)."""
    out: dict[str, float] = {}
    echo = " ".join(item.extra["sentence"].split()[:10])
    for (tag, _), text in zip(TYPES.items(), outs):
        gold = [e for t, e in item.gold if t == tag]
        out[f"{tag}.gold"] = len(gold)
        out[f"{tag}.found"] = sum(e in text for e in gold)
        out[f"{tag}.trivial"] = sum(e in echo for e in gold)
    return out


TASKS: dict[str, Task] = {
    "reasoning": Task("rect", "gsm8k.jsonl", 5, _reasoning, _reasoning_score,
                      "answer copying: gold number in 5 tokens after the gold rationale", None),
    "nli": Task("glue", "nli.json", 1, _nli, _exact_label(("true", "false")), "accuracy (other outputs wrong)", 0.5),
    "open_qa": Task("rect", "nq_open.jsonl", 20, _nq, _nq_score, "exact match of a word span of the continuation", None),
    "closed_qa": Task("rect", "boolq.jsonl", 1, _boolq, _exact_label(("yes", "no")),
                      "accuracy (other outputs wrong)", 0.5),
    "dialogue": Task("glue", "dialogue.json", 1, _mutual, _mutual_score, "accuracy of the option letter", 0.25),
    "summarization": Task("rect", "samsum.jsonl", 25, _samsum, _samsum_score, "mean ROUGE-1/2/L F", None),
    "ner": Task("rect", "conll2003.jsonl", 10, _conll, _ner_score, "entity recall, mean over 4 types", None),
    "sentiment": Task("glue", "sentiment_analysis.json", 1, _sst2, _exact_label(("positive", "negative")),
                      "accuracy (other outputs wrong)", 0.5),
}


def read_records(path: Path) -> list[dict[str, Any]]:
    from kedit.textio import read_json, read_text

    if path.suffix == ".jsonl":
        import json

        out = []
        for n, line in enumerate(read_text(path).splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise InputError(f"rect-tasks: {path}: line {n}: not JSON ({exc.msg})") from None
        return out
    records = read_json(path)
    if not isinstance(records, list):
        raise InputError(f"rect-tasks: {path}: expected a JSON list of records")
    return records


def load_items(task: str, path: Path, sample: int | None, seed: int) -> list[Item]:
    records = read_records(path)
    if not records:
        raise InputError(f"rect-tasks: {path}: no records")
    from kedit.evaluate import sample_indices

    items = []
    for i in sample_indices(len(records), sample, seed, task):
        try:
            items.append(TASKS[task].read(records[i]))
        except (KeyError, ValueError, TypeError, IndexError) as exc:
            raise InputError(f"rect-tasks: {path}: record {i + 1}: {type(exc).__name__}: {exc}") from None
    return items


def continuations(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, progress=None,
                  batch_size: int = 16) -> list[str]:
    """Greedy continuations (decoded, without the prompt).

    Prompts are sorted by token length and batched with left padding: generation appends at the
    right, so the pad must sit on the left, and the attention mask gives every row its own
    positions (``generate`` derives them from it). One prompt alone gets the same tokens up to
    float rounding (tested); batching is what makes the eight tasks affordable on a CPU, where a
    batch-of-one decode step costs nearly as much as a batch of sixteen."""
    import torch

    device = next(model.parameters()).device
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = [""] * len(prompts)
    with torch.no_grad():
        for batch in (progress(batches, desc="generating", unit="batch") if progress else batches):
            width = max(len(ids[i]) for i in batch)
            x = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                x[row, width - len(ids[i]):] = torch.tensor(ids[i])
                mask[row, width - len(ids[i]):] = 1
            y = model.generate(input_ids=x.to(device), attention_mask=mask.to(device), do_sample=False,
                               max_new_tokens=max_new_tokens, pad_token_id=pad)
            for i, row in zip(batch, y):
                out[i] = tokenizer.decode(row[width:], skip_special_tokens=True)
    return out


class RectTasksOptions(Options):
    data: str = Field(..., description="folder with the RECT sets (gsm8k.jsonl, boolq.jsonl, nq_open.jsonl, "
                                       "samsum.jsonl, conll2003.jsonl)")
    glue: str | None = Field(None, description="folder with nli.json, sentiment_analysis.json and dialogue.json "
                                               "(default: DATA/../glue)")
    tasks: list[str] | None = Field(None, description=f"tasks to run (default: all eight): {', '.join(TASKS)}")
    sample: int | None = Field(100, ge=1, description="examples per task, drawn with the evaluation seed (null: all)")
    batch_size: int = Field(16, ge=1, description="prompts generated together (left-padded, sorted by length)")


class RectTasks(Evaluator):
    """The RECT paper's eight downstream tasks by greedy generation, scored as its scripts do."""

    name = "rect-tasks"
    protocol = ("rect-tasks-v1: the RECT paper's prompts and greedy token budgets; continuation-only scoring "
                "(open_qa's with-prompt figure in info); ROUGE by rouge-score without stemming; "
                "sample drawn per task with the seed")
    Options = RectTasksOptions
    primary = "data"
    uses_specs = False
    data_kind = "folder"
    task_metric = "score"
    headline = ("mean.score",)

    def evaluate(self, model, tokenizer, specs, options, context) -> EvalResult:
        root = Path(options.data)
        glue = Path(options.glue) if options.glue else root.parent / "glue"
        chosen = options.tasks or list(TASKS)
        unknown = [t for t in chosen if t not in TASKS]
        if unknown:
            raise InputError(f"rect-tasks: unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
        metrics: dict[str, float] = {}
        samples: dict[str, list[float]] = {}
        info: dict[str, Any] = {}
        for name in chosen:
            task = TASKS[name]
            path = (root if task.folder == "rect" else glue) / task.file
            if not path.is_file():
                raise InputError(f"rect-tasks: {name}: {path}: no such file "
                                 f"(--data is the RECT folder; -o glue FOLDER for the GLUE-style sets)")
            items = load_items(name, path, options.sample, context.seed)
            prompts = [p for it in items for p in it.prompts]
            outs = iter(continuations(model, tokenizer, prompts, task.tokens, context.progress, options.batch_size))
            per = [task.score([next(outs) for _ in it.prompts], it) for it in items]
            info[name] = {"n": len(items), "file": str(path), "tokens": task.tokens, "measures": task.metric,
                          "chance": task.chance}
            if name == "ner":
                recall, trivial = {}, {}  # over the types the sample has entities of
                for tag in TYPES:
                    gold = sum(p[f"{tag}.gold"] for p in per)
                    info[name][f"{tag}.entities"] = gold
                    if gold:
                        recall[tag] = sum(p[f"{tag}.found"] for p in per) / gold
                        trivial[tag] = sum(p[f"{tag}.trivial"] for p in per) / gold
                        metrics[f"ner.{tag.lower()}"] = recall[tag]
                if not recall:
                    raise InputError(f"rect-tasks: ner: {path}: the sample holds no entities")
                metrics["ner.score"] = sum(recall.values()) / len(recall)
                info[name]["trivial"] = sum(trivial.values()) / len(trivial)
                continue
            for key in per[0]:
                vals = [p[key] for p in per]
                if key in ("trivial", "with_prompt"):
                    info[name]["trivial" if key == "trivial" else "em_with_prompt"] = sum(vals) / len(vals)
                    continue
                metrics[f"{name}.{key}"] = sum(vals) / len(vals)
                samples[f"{name}.{key}"] = vals
        metrics["mean.score"] = sum(metrics[f"{t}.score"] for t in chosen) / len(chosen)
        return EvalResult(metrics, samples, info)


@hookimpl
def register_evaluators(register):
    register(RectTasks)
