"""The rect-tasks evaluator: the paper's prompts, its scoring rules, and the whole evaluator driven by
stand-in models whose answers are known (an oracle scores 1 on every task, a mute model 0)."""
from __future__ import annotations

import json

import pytest
import torch

from kedit.testing import tiny_tokenizer
from kedit_plugins.rect_tasks import (
    TASKS,
    RectTasks,
    RectTasksOptions,
    continuations,
    load_items,
    ner_entities,
    ner_sentence,
    rouge_mean,
    span_match,
)


def test_prompts_are_the_papers():
    item = TASKS["reasoning"].read({"question": "2+2?", "answer": "Add them: 2+2=<<2+2=4>>4\n#### 4"})
    assert item.prompts == ["Q: 2+2? A:Let's think step by step. Add them: 2+2=<<2+2=4>>4\n Therefore, "
                            "the answer (arabic numerals) is:"] and item.gold == "4"
    item = TASKS["nli"].read({"sentence1": "A cat sat.", "sentence2": "An animal sat", "label": "entailment"})
    assert item.prompts == ["A cat sat. entails the An animal sat. True or False? answer:"] and item.gold == "true"
    item = TASKS["dialogue"].read({"article": "m : hi .", "options": ["a", "b", "c", "d"], "answers": "C"})
    assert item.prompts == ["Q: m : hi . Which choice is correct? Answer Chioces: (A)a(B)b(C)c(D)d A: Among A "
                            "through D, the answer is"]
    item = TASKS["summarization"].read({"dialogue": "A: hi\nB: yo", "summary": "They greet."})
    assert item.prompts == ["A: hi\nB: yo\nTL;DR:"]
    item = TASKS["ner"].read({"tokens": ["Anna", "met", "Bob", "in", "New", "York", "."],
                              "ner_tags": ["B-PER", "O", "B-PER", "O", "B-LOC", "I-LOC", "O"]})
    assert item.prompts[1] == ("Please identify Location Entity from the given text. Text: Anna met Bob in New York. "
                               "Entity:")
    assert len(item.prompts) == 4


def test_ner_rules():
    assert ner_sentence(["Hello", ",", "world", "."]) == "Hello, world."
    # from B- to the next O: I- continues, and a B- right after an entity is swallowed (the paper's rule)
    assert ner_entities(["New", "York", "Times", "Bob", "runs"], ["B-ORG", "I-ORG", "I-ORG", "B-PER", "O"]) == \
        [("ORG", "New York Times Bob")]
    assert ner_entities(["Rome", "and", "Paris"], ["B-LOC", "O", "B-LOC"]) == [("LOC", "Rome"), ("LOC", "Paris")]


def test_open_qa_span_match_normalises_like_squad():
    assert span_match(" It was The Beatles, in 1962.", ["beatles"])
    assert span_match("answer: May 18 , 2018!", ["May 18, 2018"])
    assert not span_match("Beatlemania", ["Beatles"])  # whole words only
    assert not span_match("", ["x"])


def test_rouge_mean():
    assert rouge_mean("", "anything") == 0.0
    assert rouge_mean("the cat sat", "the cat sat") == pytest.approx(1.0)
    # ROUGE-1 F 2/3, ROUGE-2 F 0.4, ROUGE-L F 2/3 for this pair (rouge-score's own figures)
    assert rouge_mean("the cat sat on the mat", "a cat sat on a mat") == pytest.approx((2 / 3 + 0.4 + 2 / 3) / 3)


def _data(tmp_path):
    rect, glue = tmp_path / "rect", tmp_path / "glue"
    rect.mkdir()
    glue.mkdir()

    def jsonl(name, rows):
        (rect / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    jsonl("gsm8k.jsonl", [{"question": f"What is {i}+1?", "answer": f"It is {i}+1={i + 1}.\n#### {i + 1}"} for i in range(3)])
    jsonl("boolq.jsonl", [{"question": f"is it {i}", "passage": "p", "answer": i % 2 == 0, "title": "t"} for i in range(3)])
    jsonl("nq_open.jsonl", [{"question": "who?", "answers": ["Anna Bell"], "passage": "Anna Bell did."}])
    jsonl("samsum.jsonl", [{"id": "1", "dialogue": "A: lunch?\nB: yes", "summary": "They will have lunch."}])
    jsonl("conll2003.jsonl", [{"tokens": ["Anna", "visited", "Rome", "."], "ner_tags": ["B-PER", "O", "B-LOC", "O"]},
                              {"tokens": ["IBM", "won"], "ner_tags": ["B-ORG", "O"]}])
    (glue / "nli.json").write_text(json.dumps([{"sentence1": f"a{i}", "sentence2": "b", "label": lab}
                                               for i, lab in enumerate(("entailment", "not_entailment"))]))
    (glue / "sentiment_analysis.json").write_text(json.dumps([{"sentence": "good", "label": "1"},
                                                              {"sentence": "bad", "label": "0"}]))
    (glue / "dialogue.json").write_text(json.dumps([{"article": "x", "options": ["p", "q", "r", "s"], "answers": "B",
                                                     "id": "1"}]))
    return rect


class StandIn(torch.nn.Module):
    """Answers each prompt with ``answer(prompt)``. The tiny tokenizer splits words a real one keeps
    whole (" true" is one SmolLM2 token), so whole answers come back whatever the budget."""

    def __init__(self, tok, answer):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.answer = tok, answer

    def generate(self, input_ids, attention_mask, **_):
        rows = []
        for row, mask in zip(input_ids, attention_mask):
            text = self.answer(self.tok.decode(row[mask.bool()]))
            new = self.tok(text, add_special_tokens=False)["input_ids"] if text else []
            rows.append(torch.cat([row, torch.tensor(new, dtype=row.dtype)]))
        width = max(len(r) for r in rows)
        eos = self.tok.eos_token_id
        return torch.stack([torch.cat([r, torch.full((width - len(r),), eos, dtype=r.dtype)]) for r in rows])


def _oracle(rect):
    """The right answer for every prompt of the fixture data."""
    answers = {}
    for name, task in TASKS.items():
        path = (rect if task.folder == "rect" else rect.parent / "glue") / task.file
        for item in load_items(name, path, None, 0):
            for k, p in enumerate(item.prompts):
                if name == "ner":
                    tag = list(("PER", "LOC", "ORG", "MISC"))[k]
                    answers[p] = " " + ", ".join(e for t, e in item.gold if t == tag)
                elif name == "open_qa":
                    answers[p] = " " + item.gold[0]
                else:
                    answers[p] = " " + str(item.gold)
    return lambda prompt: answers[prompt]


def test_the_evaluator_scores_an_oracle_1_and_a_mute_model_0(tmp_path):
    from kedit.api import EvalContext

    rect = _data(tmp_path)
    tok = tiny_tokenizer()
    ev = RectTasks()
    options = RectTasksOptions(data=str(rect), sample=None)
    good = ev.evaluate(StandIn(tok, _oracle(rect)), tok, [], options, EvalContext())
    for name in TASKS:
        assert good.metrics[f"{name}.score"] == pytest.approx(1.0), name
    assert good.metrics["mean.score"] == pytest.approx(1.0)
    assert good.metrics["nli.answered"] == 1.0 and good.samples["reasoning.score"] == [1.0, 1.0, 1.0]
    # the trivial baselines: the rationale's last number is the answer; the echoed sentence holds its entities
    assert good.info["reasoning"]["trivial"] == 1.0 and good.info["ner"]["trivial"] == 1.0
    assert good.info["open_qa"]["em_with_prompt"] == 1.0  # the passage alone holds the answer
    mute = ev.evaluate(StandIn(tok, lambda p: ""), tok, [], options, EvalContext())
    for name in TASKS:
        assert mute.metrics[f"{name}.score"] == 0.0, name
    assert mute.metrics["nli.answered"] == 0.0
    assert mute.info["open_qa"]["em_with_prompt"] == 1.0  # what the paper's script would have counted


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_left_padded_batches_generate_what_each_prompt_does_alone(kind):
    from kedit.testing import tiny_model

    tok, model = tiny_tokenizer(), tiny_model(kind)
    prompts = ["the cat sat on", "a", "some longer prompt with many more words in it", "mat", "on the mat the"]
    alone = [continuations(model, tok, [p], 6) for p in prompts]
    together = continuations(model, tok, prompts, 6, batch_size=3)
    assert together == [a[0] for a in alone]
    lengths = sorted(len(tok(p)["input_ids"]) for p in prompts)
    assert lengths[0] != lengths[2] and lengths[3] != lengths[4]  # both batches really are padded
    assert all(together)  # something was generated


def test_sampling_is_seeded_and_errors_name_the_file(tmp_path):
    rect = _data(tmp_path)
    a = load_items("reasoning", rect / "gsm8k.jsonl", 2, seed=1)
    assert [i.gold for i in a] == [i.gold for i in load_items("reasoning", rect / "gsm8k.jsonl", 2, seed=1)]
    (rect / "boolq.jsonl").write_text('{"question": "q"}\n')
    from kedit.errors import InputError

    with pytest.raises(InputError, match=r"boolq.jsonl: record 1: KeyError"):
        load_items("closed_qa", rect / "boolq.jsonl", None, 0)
    with pytest.raises(InputError, match="unknown task"):
        RectTasks().evaluate(None, None, [], RectTasksOptions(data=str(rect), tasks=["chess"]), None)
