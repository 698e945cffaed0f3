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


def test_a_utf8_bom_before_the_header_is_read(tmp_path):
    p = _write(tmp_path, ["index", "image", "question", "answer"], [["0", _b64_png(), "q", "no"]])
    p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes())  # as Excel and Notepad save UTF-8
    assert read_benchmark(p, "yesno")[0]["index"] == "0"


def test_non_utf8_text_names_the_file_and_line(tmp_path):
    p = tmp_path / "latin1.tsv"
    p.write_bytes(
        b"index\timage\tquestion\tanswer\n0\tx\tq\tyes\n1\tx\tcaf\xe9?\tno\n"  # latin-1 e-acute
    )
    with pytest.raises(BenchmarkError) as e:
        read_benchmark(p, "yesno")
    assert str(p) in str(e.value) and "not UTF-8" in str(e.value) and "line 3" in str(e.value)


def test_a_multi_image_row_is_refused_by_file_and_row(tmp_path):
    """VLMEvalKit stores a multi-image question as a JSON list of base64 images; it used to be
    read silently as its first image."""
    import json

    cell = json.dumps([_b64_png((255, 0, 0)), _b64_png((0, 0, 255))])
    p = _write(
        tmp_path,
        ["index", "image", "question", "answer"],
        [["0", _b64_png(), "q", "yes"], ["1", cell, "q", "no"]],
    )
    with pytest.raises(BenchmarkError) as e:
        read_benchmark(p, "yesno")
    msg = str(e.value)
    assert str(p) in msg and "row 2 (line 3)" in msg and "2 images" in msg, msg
    paths = _write(
        tmp_path,
        ["index", "image_path", "question", "answer"],
        [["0", json.dumps(["a.png", "b.png"]), "q", "yes"]],
        "paths.tsv",
    )
    with pytest.raises(BenchmarkError, match=r"paths\.tsv: row 1 \(line 2\).*2 images"):
        read_benchmark(paths, "yesno")


def test_image_path_is_confined_to_regular_files_in_the_benchmark_folder(tmp_path):
    import os
    import threading

    bench = tmp_path / "bench"
    (bench / "imgs").mkdir(parents=True)
    Image.new("RGB", (5, 4)).save(bench / "imgs" / "in.png")
    Image.new("RGB", (5, 4)).save(tmp_path / "outside.png")
    os.symlink(tmp_path / "outside.png", bench / "link_out.png")
    os.symlink(bench / "imgs" / "in.png", bench / "link_in.png")
    (bench / "imgs" / "sub").mkdir()
    os.mkfifo(bench / "fifo.png")
    ok = [("0", "imgs/in.png"), ("1", "link_in.png"), ("2", "imgs/sub/../in.png")]
    for index, path in ok:
        assert load_image({"index": index, "image_path": path}, bench).size == (5, 4)
    refused = [
        ("../outside.png", "outside the benchmark's folder"),
        (str(tmp_path / "outside.png"), "outside the benchmark's folder"),
        ("link_out.png", "outside the benchmark's folder"),
        ("imgs/sub", "not a regular file"),
        ("fifo.png", "not a regular file"),  # reading it used to wait forever
        ("/dev/zero", "outside the benchmark's folder"),  # reading it used to fill memory
        ("missing.png", "not found"),
    ]
    for path, why in refused:
        got: list = []

        def read(path=path, got=got):
            try:
                load_image({"index": "7", "image_path": path}, bench, benchmark=bench / "b.tsv")
            except BenchmarkError as exc:
                got.append(str(exc))

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(timeout=10)
        if t.is_alive():  # unblock the reader of the FIFO before failing
            os.close(os.open(bench / "fifo.png", os.O_WRONLY | os.O_NONBLOCK))
        assert got, f"{path}: read without an error"
        assert why in got[0] and "index '7'" in got[0] and str(bench / "b.tsv") in got[0], got


def test_reading_a_benchmark_needs_little_more_memory_than_the_file(tmp_path):
    """A few-MB TSV of base64 images: peak Python memory while reading it (tracemalloc) stays
    under 4x the file's size. It was 9x here (6x without the emoji): the bytes, the whole text
    (4 bytes a character once one needs it), a StringIO copy of it, and the rows."""
    import os
    import tracemalloc

    rng = __import__("numpy").random.default_rng(0)
    rows = []
    for i in range(120):
        buf = io.BytesIO()
        pixels = rng.integers(0, 256, (80, 100, 3), dtype="uint8")
        Image.fromarray(pixels).save(buf, format="PNG")
        img = base64.b64encode(buf.getvalue()).decode()
        question = f"Question {i}? \U0001f642" if i == 0 else f"Question {i}?"  # one emoji
        rows.append([str(i), img, question, "a", "b", "ABC"[i % 2]])
    p = _write(tmp_path, ["index", "image", "question", "A", "B", "answer"], rows)
    size = os.path.getsize(p)
    assert size > 2_000_000
    tracemalloc.start()
    try:
        got = read_benchmark(p, "mcq")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(got) == 120
    assert peak < 4 * size, f"peak {peak / size:.1f}x the file's {size} bytes"
