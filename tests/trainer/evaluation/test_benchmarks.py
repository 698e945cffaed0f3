"""The VLMEvalKit TSV reader: good files read back, bad files are one line naming file and row."""

import base64
import io

import pytest
from PIL import Image

from trainer.evaluation.benchmarks import BenchmarkError, build_prompt, load_image, read_benchmark


def _b64_png(colour=(255, 0, 0), size=(8, 6)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _write(tmp_path, header, rows, name="bench.tsv"):
    p = tmp_path / name
    lines = ["\t".join(header)] + ["\t".join(r) for r in rows]
    p.write_text("\n".join(lines) + "\n")
    return p


def test_mcq_rows_read_back_with_image_reuse(tmp_path):
    img = _b64_png()
    p = _write(
        tmp_path,
        ["index", "image", "question", "hint", "A", "B", "C", "answer", "category"],
        [
            ["0", img, "What?", "look", "cat", "dog", "", "b", "animals"],
            ["1", "0", "And?", "", "x", "y", "z", "C", "colour"],
        ],
    )
    rows = read_benchmark(p, "mcq")
    assert [r["answer"] for r in rows] == ["B", "C"]
    assert "C" not in rows[0] and "hint" not in rows[1]  # empty cells are left out
    assert rows[1]["image"] == img  # a short image value naming a row reuses its image
    assert load_image(rows[1], tmp_path).size == (8, 6)
    prompt = build_prompt("mcq", rows[0])
    assert prompt == (
        "Hint: look\nWhat?\nA. cat\nB. dog\n"
        "Answer with the option's letter from the given choices directly."
    )
    pope = build_prompt("pope", {"question": "Is there a cat? Please answer yes or no."})
    assert pope == "Is there a cat?\nAnswer the question using a single word or phrase."


def test_image_path_relative_to_the_tsv(tmp_path):
    Image.new("RGB", (5, 4)).save(tmp_path / "a.png")
    p = _write(
        tmp_path, ["index", "image_path", "question", "answer"], [["7", "a.png", "q", "yes"]]
    )
    rows = read_benchmark(p, "yesno")
    assert rows[0]["answer"] == "Yes"
    assert load_image(rows[0], tmp_path).size == (5, 4)


def test_hallusionbench_ids_from_columns_or_index(tmp_path):
    p = _write(
        tmp_path,
        ["index", "image", "question", "answer", "l2-category"],
        [["VD_figure_x_3_1_2", _b64_png(), "q", "No", "VD"]],
    )
    row = read_benchmark(p, "hallusionbench")[0]
    assert (row["set_id"], row["figure_id"], row["question_id"]) == ("3", "1", "2")
    bad = _write(
        tmp_path, ["index", "image", "question", "answer"], [["12", "x", "q", "No"]], "b.tsv"
    )
    with pytest.raises(BenchmarkError, match=r"b\.tsv: row 1 .*'set_id'"):
        read_benchmark(bad, "hallusionbench")


@pytest.mark.parametrize(
    ("header", "rows", "kind", "message"),
    [
        (["index", "image", "answer"], [["0", "x", "A"]], "mcq", "missing column 'question'"),
        (["index", "question", "answer"], [["0", "q", "Yes"]], "yesno", "'image' or 'image_path'"),
        (["index", "image", "question", "answer"], [["0", "x", "q", "A"]], "mcq", "'A' and 'B'"),
        (
            ["index", "image", "question", "A", "B", "answer"],
            [["0", "x", "q", "a", "b", "A"], ["1", "x", "q", "a", "b", "E"]],
            "mcq",
            r"row 2 \(line 3\): 'answer' 'E' is not one of the options A, B",
        ),
        (
            ["index", "image", "question", "answer"],
            [["0", "x", "q", "maybe"]],
            "pope",
            r"row 1 \(line 2\): 'answer' 'maybe' is not Yes or No",
        ),
        (
            ["index", "image", "question", "answer"],
            [["0", "x", "q"]],
            "yesno",
            "row 1 .*3 fields, header has 4",
        ),
        (
            ["index", "image", "question", "answer"],
            [["0", "x", "q", "Yes"], ["0", "x", "q", "No"]],
            "yesno",
            "row 2 .*index '0' repeats row 1",
        ),
        (
            ["index", "image", "question", "A", "B", "answer"],
            [["0", "x", "q1", "a", "b", "A"], ["1", "x", "q2", "a", "b", "B"]],
            "mmvp",
            "rows 1 and 2 .*different questions",
        ),
        (["index", "image", "question", "answer"], [], "yesno", "no questions"),
        (["index", "image", "question", "answer"], [["0", "x", "q", "Yes"]], "vqa", "unknown kind"),
    ],
)
def test_bad_files_are_one_line_naming_file_and_place(tmp_path, header, rows, kind, message):
    p = _write(tmp_path, header, rows)
    with pytest.raises(BenchmarkError, match=message) as e:
        read_benchmark(p, kind)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_missing_file_and_bad_image(tmp_path):
    with pytest.raises(BenchmarkError, match="not found"):
        read_benchmark(tmp_path / "nope.tsv", "mcq")
    row = {"index": "3", "image": base64.b64encode(b"not an image").decode()}
    with pytest.raises(BenchmarkError, match="index '3' base64 image: not a readable image"):
        load_image(row, tmp_path)
