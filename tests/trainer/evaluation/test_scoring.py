"""Each metric against values computed by hand on small fixtures."""

import pytest

from trainer.evaluation.scoring import grade, score


def _mc(index, answer, prediction, category=None, question="q"):
    row = {"index": str(index), "question": question, "A": "cat", "B": "dog", "answer": answer}
    row["prediction"] = prediction
    if category:
        row["category"] = category
    return row


def test_mcq_accuracy_and_per_category():
    rows = [
        _mc(1, "A", "A", "animals"),
        _mc(2, "B", "A", "animals"),
        _mc(3, "B", "dog", "animals"),
        _mc(4, "A", "(B)", "colour"),
        _mc(5, "A", "no idea", "colour"),
    ]
    s = score("mcq", rows)
    assert s["accuracy"] == pytest.approx(2 / 5)
    assert s["per_category"] == {"animals": pytest.approx(2 / 3), "colour": 0.0}
    assert grade("mcq", rows[2]) == ("B", True)
    assert grade("mcq", rows[4]) == (None, False)


def test_mmvp_pairs_are_consecutive_rows():
    rows = [
        _mc(1, "A", "A", question="p1"),
        _mc(2, "B", "B", question="p1"),  # pair 1: both right
        _mc(3, "A", "A", question="p2"),
        _mc(4, "B", "A", question="p2"),  # pair 2: one right
        _mc(5, "A", "B", question="p3"),
        _mc(6, "B", "A", question="p3"),  # pair 3: none
    ]
    s = score("mmvp", rows)
    assert s == {"accuracy": pytest.approx(3 / 6), "pair_accuracy": pytest.approx(1 / 3)}
    with pytest.raises(ValueError, match="pairs"):
        score("mmvp", rows[:5])


def _yn(index, answer, prediction, **extra):
    return {"index": str(index), "answer": answer, "prediction": prediction, **extra}


def test_yesno_accuracy():
    rows = [_yn(1, "Yes", "yes"), _yn(2, "No", "Yes."), _yn(3, "No", "no"), _yn(4, "No", "hm")]
    assert score("yesno", rows) == {"accuracy": 0.5}


def test_pope_precision_recall_f1_yes_ratio():
    answers = ["Yes"] * 4 + ["No"] * 4
    preds = ["yes", "Yes, there is", "no", "unclear", "yes", "no", "No.", "no"]
    rows = [_yn(i, a, p) for i, (a, p) in enumerate(zip(answers, preds, strict=True))]
    s = score("pope", rows)
    # tp=2 fp=1 fn=2 (the unreadable reply counts as a 'no' prediction), 5 of 8 right
    assert s["accuracy"] == pytest.approx(5 / 8)
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(1 / 2)
    assert s["f1"] == pytest.approx(4 / 7)
    assert s["yes_ratio"] == pytest.approx(3 / 8)
    assert set(s) == {"accuracy", "precision", "recall", "f1", "yes_ratio"}


def test_pope_no_yes_predictions_gives_zero_precision_not_an_error():
    rows = [_yn(1, "Yes", "no"), _yn(2, "No", "no")]
    s = score("pope", rows)
    assert (s["precision"], s["recall"], s["f1"], s["yes_ratio"]) == (0.0, 0.0, 0.0, 0.0)


def test_hallusionbench_groups_by_category_set_figure_and_question():
    def h(cat, set_id, fig, q, ok):
        return _yn(
            f"{cat}{set_id}{fig}{q}",
            "Yes",
            "yes" if ok else "no",
            **{"l2-category": cat, "set_id": set_id, "figure_id": fig, "question_id": q},
        )

    rows = [
        h("VD", "0", "0", "0", True),
        h("VD", "0", "0", "1", True),  # figure (VD,0,0): all right
        h("VD", "0", "1", "0", True),
        h("VD", "0", "1", "1", False),  # figure (VD,0,1): not
        h("VD", "0", "2", "0", True),  # figure (VD,0,2): all right
        h("VS", "0", "0", "0", False),  # same ids, other category: its own groups
    ]
    s = score("hallusionbench", rows)
    assert s["aAcc"] == pytest.approx(4 / 6)
    assert s["fAcc"] == pytest.approx(2 / 4)  # figures: T, F, T, F
    assert s["qAcc"] == pytest.approx(1 / 3)  # questions (VD,0,0) T, (VD,0,1) F, (VS,0,0) F
    assert set(s) == {"aAcc", "fAcc", "qAcc"}


def test_all_values_are_fractions():
    rows = [_mc(1, "A", "A", "x"), _mc(2, "B", "B", "x")]
    s = score("mcq", rows)
    assert s["accuracy"] == 1.0 and s["per_category"] == {"x": 1.0}


def test_unknown_kind_and_empty_rows():
    with pytest.raises(ValueError, match="unknown benchmark kind"):
        score("vqa", [_yn(1, "Yes", "yes")])
    with pytest.raises(ValueError, match="no rows"):
        score("mcq", [])


def test_non_utf8_predictions_name_the_file_and_line(tmp_path):
    from trainer.evaluation.benchmarks import BenchmarkError
    from trainer.evaluation.scoring import read_predictions

    p = tmp_path / "preds.jsonl"
    p.write_bytes(b'{"index": "0", "prediction": "A"}\n{"index": "1", "prediction": "caf\xe9"}\n')
    with pytest.raises(BenchmarkError) as e:
        read_predictions(p)
    assert str(p) in str(e.value) and "line 2" in str(e.value) and "UTF-8" in str(e.value)


def test_predictions_may_hold_unicode_line_separators_inside_strings(tmp_path):
    import json

    from trainer.evaluation.scoring import read_predictions

    p = tmp_path / "preds.jsonl"
    rows = [{"index": "0", "prediction": "A\u2028B"}, {"index": "1", "prediction": "C\u2029"}]
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    assert read_predictions(p) == {"0": "A\u2028B", "1": "C\u2029"}
