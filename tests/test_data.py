"""Data readers and their errors, in the library and through `edgeft train`.

Every bad input must end in one DataError (exit 2 on the command line) whose message starts
with the file, names the line where there is one, and says what is wrong.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny import write_csv

from edgeft.cli import main
from edgeft.data import check_labels, label_names, load_dataset, stratified_split
from edgeft.errors import DataError, EdgeftError


def write(path: Path, content: str | bytes, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        with open(path, "w", encoding=encoding, newline="") as f:
            f.write(content)
    return path


def jsonl(path: Path, rows) -> Path:
    return write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def png(path: Path, colour=(200, 40, 40), size=(8, 8)) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def garbage_png(path: Path) -> Path:
    return write(path, b"this is not a png at all \x00\x01\x02" * 4)


def data_error(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------- reading good files


def test_csv_quoted_commas_escaped_quotes_and_bom(tmp_path):
    p = write(
        tmp_path / "train.csv",
        "text,label\n"
        '"pump leaks, again",pump\n'
        '"he said ""stop"", then left",motor\n'
        "plain row,belt\n",
        encoding="utf-8-sig",
    )
    assert p.read_bytes().startswith(b"\xef\xbb\xbf")
    ds = load_dataset(p)
    assert ds.kind == "text"
    assert ds.source == str(p)
    assert ds.items == ["pump leaks, again", 'he said "stop", then left', "plain row"]
    assert ds.labels == ["pump", "motor", "belt"]
    assert ds.lines == [2, 3, 4]  # the header is line 1; the BOM is not part of its first name


def test_csv_crlf_blank_lines_and_label_whitespace(tmp_path):
    p = write(tmp_path / "train.csv", "text,label\r\nfirst,a \r\n\r\nsecond, b\r\n")
    ds = load_dataset(p)
    assert ds.items == ["first", "second"]
    assert ds.labels == ["a", "b"]
    assert ds.lines == [2, 4]  # the blank line 3 is skipped but still counted


def test_csv_quoted_newline_keeps_text_and_later_line_numbers(tmp_path):
    p = write(tmp_path / "train.csv", 'text,label\n"two\nlines",a\nafter,b\n')
    ds = load_dataset(p)
    assert ds.items == ["two\nlines", "after"]
    assert ds.lines[1] == 4


def test_jsonl_integer_labels_bom_and_blank_lines(tmp_path):
    rows = [{"text": "pump leak", "label": 0}, {"text": "motor fuse", "label": 1}]
    body = "".join(json.dumps(r) + "\n" for r in rows[:1]) + "\n" + json.dumps(rows[1]) + "\n"
    p = write(tmp_path / "train.jsonl", body, encoding="utf-8-sig")
    ds = load_dataset(p)
    assert ds.kind == "text"
    assert ds.items == ["pump leak", "motor fuse"]
    assert ds.labels == ["0", "1"]  # integers become their names, so label maps are strings
    assert ds.lines == [1, 3]


def test_jsonl_whole_float_label_is_an_integer_name(tmp_path):
    p = jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 2.0}, {"text": "b", "label": "x"}])
    assert load_dataset(p).labels == ["2", "x"]


def test_jsonl_unicode_text(tmp_path):
    p = jsonl(tmp_path / "t.jsonl", [{"text": "Pumpe läuft heiß 🔥", "label": "pumpe"}])
    assert load_dataset(p).items == ["Pumpe läuft heiß 🔥"]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_renamed_text_and_label_columns(tmp_path, fmt):
    rows = [
        {"id": 1, "sentence": "belt slipped", "team": "belt"},
        {"id": 2, "sentence": "fuse blown", "team": "motor"},
    ]
    if fmt == "csv":
        p = write_csv(
            tmp_path / "t.csv",
            [(r["id"], r["sentence"], r["team"]) for r in rows],
            header=("id", "sentence", "team"),
        )
    else:
        p = jsonl(tmp_path / "t.jsonl", rows)
    ds = load_dataset(p, text_column="sentence", label_column="team")
    assert ds.kind == "text"
    assert ds.items == ["belt slipped", "fuse blown"]
    assert ds.labels == ["belt", "motor"]


def test_unlabelled_data_when_labels_are_not_required(tmp_path):
    p = write(tmp_path / "predict.csv", "text\nhello\nworld\n")
    ds = load_dataset(p, require_labels=False)
    assert ds.items == ["hello", "world"]
    assert ds.labels == [None, None]


def test_image_folder(tmp_path):
    root = tmp_path / "images"
    png(root / "crack" / "b.png")
    png(root / "crack" / "a.jpg")
    png(root / "crack" / "nested" / "c.png")  # images in sub-folders belong to the class
    png(root / "clean" / "x.PNG")
    write(root / "clean" / "notes.txt", "not an image, ignored")
    png(root / ".thumbs" / "t.png")  # a hidden folder is not a class
    ds = load_dataset(root)
    assert ds.kind == "image"
    assert ds.source == str(root)
    assert ds.labels == ["clean", "crack", "crack", "crack"]
    assert [Path(p).relative_to(root).as_posix() for p in ds.items] == [
        "clean/x.PNG",
        "crack/a.jpg",
        "crack/b.png",
        "crack/nested/c.png",
    ]
    assert label_names(ds) == ["clean", "crack"]


def test_image_folder_fixture(image_data):
    ds = load_dataset(image_data)
    assert ds.kind == "image"
    assert ds.counts() == {"clean": 10, "crack": 10, "stain": 10}
    assert all(Path(p).is_file() for p in ds.items)


@pytest.mark.parametrize("column", ["path", "image", "file"])
def test_image_csv_relative_paths_from_the_csv_folder(tmp_path, monkeypatch, column):
    data = tmp_path / "data"
    png(data / "imgs" / "a.png")
    png(data / "imgs" / "b.png", colour=(0, 0, 255))
    absolute = png(tmp_path / "elsewhere" / "c.png")
    p = write(
        data / "labels.csv",
        f"{column},label\nimgs/a.png,crack\nimgs/b.png,clean\n{absolute},clean\n",
    )
    monkeypatch.chdir(tmp_path)  # relative paths must not depend on the working directory
    ds = load_dataset(p)
    assert ds.kind == "image"
    assert [Path(x).resolve() for x in ds.items] == [
        (data / "imgs" / "a.png").resolve(),
        (data / "imgs" / "b.png").resolve(),
        absolute.resolve(),
    ]
    assert ds.labels == ["crack", "clean", "clean"]
    assert ds.lines == [2, 3, 4]


def test_label_names_sorted_and_check_labels_accepts_known(tmp_path):
    train = load_dataset(write(tmp_path / "t.csv", "text,label\na,pump\nb,belt\nc,motor\nd,belt\n"))
    assert label_names(train) == ["belt", "motor", "pump"]
    val = load_dataset(write(tmp_path / "v.csv", "text,label\nx,motor\ny,pump\n"))
    check_labels(val, label_names(train))  # no error
    unlabelled = load_dataset(write(tmp_path / "u.csv", "text\nx\n"), require_labels=False)
    check_labels(unlabelled, label_names(train))  # missing labels are not unknown labels


# ---------------------------------------------------------------- stratified split


@pytest.fixture
def uneven(tmp_path):
    # 10 pump, 7 motor, 3 belt, 1 lone: every text unique so items identify rows
    rows = [(f"row {i} {y}", y) for i, y in enumerate(["pump"] * 10 + ["motor"] * 7 + ["belt"] * 3)]
    rows.append(("row lone", "lone"))
    return load_dataset(write_csv(tmp_path / "t.csv", rows))


def test_split_is_seeded(uneven):
    a_train, a_val = stratified_split(uneven, 0.2, seed=7)
    b_train, b_val = stratified_split(uneven, 0.2, seed=7)
    assert (a_train.items, a_val.items) == (b_train.items, b_val.items)
    c_train, c_val = stratified_split(uneven, 0.2, seed=8)
    assert c_val.items != a_val.items  # the seed matters


def test_split_is_stratified_without_overlap(uneven):
    train, val = stratified_split(uneven, 0.2, seed=42)
    assert not set(train.items) & set(val.items)
    assert sorted(train.items + val.items) == sorted(uneven.items)
    # round(n * 0.2) per class, at least one where a class has two rows, never the whole class
    assert val.counts() == {"belt": 1, "motor": 1, "pump": 2}
    assert train.counts() == {"belt": 2, "lone": 1, "motor": 6, "pump": 8}
    for name in ("belt", "motor", "pump"):
        assert name in train.labels and name in val.labels
    # rows keep their labels and their line numbers
    pairs = dict(zip(uneven.items, zip(uneven.labels, uneven.lines, strict=True), strict=True))
    for part in (train, val):
        for x, y, n in zip(part.items, part.labels, part.lines, strict=True):
            assert pairs[x] == (y, n)
    assert val.source == f"{uneven.source} (held out)"
    assert train.source == uneven.source


def test_split_of_the_fixture_keeps_every_class_on_both_sides(text_data):
    ds = load_dataset(text_data["train"])
    train, val = stratified_split(ds, 0.25, seed=1)
    assert set(train.labels) == set(val.labels) == {"pump", "motor", "belt"}
    assert val.counts() == {"belt": 4, "motor": 4, "pump": 4}


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5])
def test_split_fraction_out_of_range(uneven, fraction):
    msg = data_error(stratified_split, uneven, fraction, 0)
    assert "between 0 and 1" in msg and str(fraction) in msg


def test_split_too_few_rows(tmp_path):
    ds = load_dataset(write(tmp_path / "t.csv", "text,label\na,x\nb,y\n"))
    msg = data_error(stratified_split, ds, 0.2, 0)
    assert msg.startswith(f"{ds.source}: ")
    assert "too few rows" in msg and "--val" in msg


# ---------------------------------------------------------------- bad input: one clear DataError


def _bad(tmp_path, name, content, encoding="utf-8"):
    return write(tmp_path / name, content, encoding)


# (id, file name, content, load_dataset kwargs, parts the message must contain after "{path}: ")
# fmt: off
BAD_FILES = [
    ("missing-text-column-near-name", "t.csv", "txt,label\nhello,a\n", {},
     ["no text column 'text'", "(columns: txt, label)", 'Did you mean "txt"?', "--text-column"]),
    ("missing-renamed-text-column", "t.csv", "text,label\nhello,a\n", {"text_column": "sentence"},
     ["no text column 'sentence'", "(columns: text, label)", "--text-column"]),
    ("missing-text-column-jsonl", "t.jsonl", '{"txt": "hello", "label": "a"}\n', {},
     ["no text column 'text'", 'Did you mean "txt"?']),
    ("missing-label-column", "t.csv", "text,labels\nhello,a\n", {},
     ["no label column 'label'", "(columns: text, labels)", 'Did you mean "labels"?', "--label-column"]),
    ("missing-label-column-jsonl", "t.jsonl", '{"text": "hello", "class": "a"}\n', {},
     ["no label column 'label'", "--label-column"]),
    ("empty-text", "t.csv", "text,label\nfine,a\n   ,b\n", {},
     ["line 3: empty text in column 'text'"]),
    ("empty-text-jsonl", "t.jsonl", '{"text": "ok", "label": "a"}\n{"text": "", "label": "b"}\n', {},
     ["line 2: empty text in column 'text'"]),
    ("invisible-text", "t.csv", "text,label\nfine,a\n\u200b\u200b,b\n", {},
     ["line 3: empty text in column 'text'"]),
    ("unicode-space-text-jsonl", "t.jsonl", '{"text": "ok", "label": "a"}\n{"text": "\\u3000\\t\\ufeff", "label": "b"}\n',
     {}, ["line 2: empty text in column 'text'"]),
    ("control-char-text-jsonl", "t.jsonl", '{"text": "ok", "label": "a"}\n{"text": "\\u0000 \\u0007", "label": "b"}\n',
     {}, ["line 2: empty text in column 'text'"]),
    ("invisible-label", "t.csv", "text,label\nfine,a\nno label here,\u2060\n", {},
     ["line 3: empty label in column 'label'"]),
    ("null-text-jsonl", "t.jsonl", '{"text": "ok", "label": "a"}\n{"text": null, "label": "b"}\n', {},
     ["line 2: empty text in column 'text'"]),
    ("text-not-a-string-jsonl", "t.jsonl", '{"text": 12, "label": "a"}\n', {},
     ["line 1: column 'text' must be a string, got 12"]),
    ("empty-label", "t.csv", "text,label\nfine,a\nno label here,\n", {},
     ["line 3: empty label in column 'label'"]),
    ("empty-label-renamed", "t.csv", "text,team\nfine,a\nno team,  \n", {"label_column": "team"},
     ["line 3: empty label in column 'team'"]),
    ("null-label-jsonl", "t.jsonl", '{"text": "a", "label": "x"}\n\n{"text": "b", "label": null}\n', {},
     ["line 3: empty label in column 'label'"]),
    ("label-not-scalar-jsonl", "t.jsonl", '{"text": "a", "label": ["x", "y"]}\n', {},
     ["line 1: label must be a string or an integer, got ['x', 'y']"]),
    ("fractional-label-jsonl", "t.jsonl", '{"text": "a", "label": 1.5}\n', {},
     ["line 1: label must be a string or an integer, got 1.5"]),
    ("empty-file", "t.csv", "", {},
     ["the file is empty", "Expected a header row and data rows"]),
    ("whitespace-only-file", "t.csv", "\n  \n", {}, ["the file is empty"]),
    ("empty-jsonl", "t.jsonl", "", {}, ["the file is empty"]),
    ("bom-only-file", "t.csv", "\ufeff", {}, ["the file is empty"]),
    ("header-only", "t.csv", "text,label\n", {}, ["no data rows after the header"]),
    ("blank-lines-after-header", "t.csv", "text,label\n\n\n", {}, ["no data rows after the header"]),
    ("not-utf8-latin1", "t.csv", "text,label\nok,a\ncafé crème,b\n".encode("latin-1"), {},
     ["line 3: not UTF-8 text (byte 0xe9 at offset 19)", "Save the file as UTF-8"]),
    ("not-utf8-jsonl", "t.jsonl", '{"text": "Müller", "label": "a"}\n'.encode("latin-1"), {},
     ["line 1: not UTF-8 text (byte 0xfc", "Save the file as UTF-8"]),
    ("bad-json-line", "t.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", label: "y"}\n', {},
     ["line 2: not valid JSON (Expecting property name enclosed in double quotes)"]),
    ("truncated-json-line", "t.jsonl", '{"text": "a", "label": "x"}\n\n{"text": "b", "label": "y"\n', {},
     ["line 3: not valid JSON"]),
    ("json-line-not-an-object", "t.jsonl", '{"text": "a", "label": "x"}\n["b", "y"]\n', {},
     ["line 2: expected a JSON object per line, got list"]),
    ("too-many-fields", "t.csv", "text,label\nfine,a\npump leaks, again,b\n", {},
     ["line 3: 3 fields, the header has 2", "Quote fields that contain commas"]),
    ("too-many-fields-after-quoted-newline", "t.csv", 'text,label\n"two\nlines",a\nx,y,z,b\n', {},
     ["line 4: 4 fields, the header has 2"]),
    ("field-over-csv-limit", "t.csv", 'text,label\nok,a\nfine,b\n"' + "x" * 140_000 + '",c\n', {},
     ["bad CSV (field larger than field limit"]),
    ("unknown-format", "t.txt", "text,label\nhello,a\n", {},
     ["unknown data format '.txt'", "Expected .csv, .jsonl or an image folder"]),
]
# fmt: on


@pytest.mark.parametrize(
    "name, content, kwargs, parts", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES]
)
def test_bad_file(tmp_path, name, content, kwargs, parts):
    p = _bad(tmp_path, name, content)
    msg = data_error(load_dataset, p, **kwargs)
    assert msg.startswith(f"{p}: "), msg
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"
    assert "\n" not in msg


def test_data_error_is_a_value_error_and_exits_2():
    assert issubclass(DataError, ValueError) and issubclass(DataError, EdgeftError)
    assert DataError("x").exit_code == 2


def test_bad_csv_error_names_the_line_of_the_bad_record(tmp_path):
    p = _bad(tmp_path, "t.csv", 'text,label\nok,a\nfine,b\n"' + "x" * 140_000 + '",c\n')
    msg = data_error(load_dataset, p)
    assert msg.startswith(f"{p}: line 4: bad CSV"), msg


def test_missing_path(tmp_path):
    p = tmp_path / "nope" / "train.csv"
    msg = data_error(load_dataset, p)
    assert msg == f"{p}: no such file or folder."


def test_single_label(tmp_path):
    ds = load_dataset(_bad(tmp_path, "t.csv", "text,label\na,pump\nb,pump\nc,pump\n"))
    msg = data_error(label_names, ds)
    assert msg.startswith(f"{ds.source}: ")
    assert "only one label ('pump') in 3 rows" in msg
    assert "at least two" in msg


def test_unknown_label_in_validation_file(tmp_path):
    train = load_dataset(_bad(tmp_path, "train.csv", "text,label\na,pump\nb,belt\nc,motor\n"))
    val = load_dataset(_bad(tmp_path, "val.csv", "text,label\nx,pump\n\ny,bellt\n"))
    msg = data_error(check_labels, val, label_names(train))
    assert msg.startswith(f"{tmp_path / 'val.csv'}: line 4: unknown label 'bellt'"), msg
    assert "the training labels are belt, motor, pump" in msg
    assert 'Did you mean "belt"?' in msg


def test_unknown_label_in_held_out_part_keeps_its_line(tmp_path):
    ds = load_dataset(_bad(tmp_path, "t.csv", "text,label\na,x\nb,x\nc,y\nd,y\n"))
    _, val = stratified_split(ds, 0.5, seed=0)
    msg = data_error(check_labels, val, ["z1", "z2"])
    assert msg.startswith(f"{ds.source} (held out): line {val.lines[0]}: unknown label"), msg


def test_unreadable_image_in_folder(tmp_path):
    root = tmp_path / "images"
    png(root / "crack" / "ok.png")
    bad = garbage_png(root / "clean" / "broken.png")
    msg = data_error(load_dataset, root)
    assert msg.startswith(f"{root}: unreadable image {bad} ("), msg
    assert "UnidentifiedImageError" in msg


def test_unreadable_image_in_csv(tmp_path):
    png(tmp_path / "imgs" / "ok.png")
    garbage_png(tmp_path / "imgs" / "broken.png")
    p = write(tmp_path / "labels.csv", "path,label\nimgs/ok.png,a\nimgs/broken.png,b\n")
    msg = data_error(load_dataset, p)
    assert msg.startswith(f"{p}: line 3: unreadable image {tmp_path / 'imgs' / 'broken.png'} ("), (
        msg
    )


def test_missing_image_in_csv(tmp_path):
    png(tmp_path / "imgs" / "ok.png")
    p = write(tmp_path / "labels.csv", "image,label\nimgs/ok.png,a\nimgs/gone.png,b\n")
    msg = data_error(load_dataset, p)
    assert msg == f"{p}: line 3: image {tmp_path / 'imgs' / 'gone.png'} does not exist."


def test_empty_image_path_in_csv(tmp_path):
    png(tmp_path / "ok.png")
    p = write(tmp_path / "labels.csv", "path,label\nok.png,a\n,b\n")
    msg = data_error(load_dataset, p)
    assert msg == f"{p}: line 3: empty image path in column 'path'."


def test_image_folder_without_class_folders(tmp_path):
    root = tmp_path / "images"
    png(root / "loose.png")
    msg = data_error(load_dataset, root)
    assert msg.startswith(f"{root}: no class sub-folders."), msg
    assert "one folder per class" in msg


def test_image_folder_with_empty_class_folders(tmp_path):
    root = tmp_path / "images"
    (root / "crack").mkdir(parents=True)
    write(root / "clean" / "readme.txt", "no images here")
    msg = data_error(load_dataset, root)
    assert msg.startswith(f"{root}: no images (jpg, png, bmp, webp)"), msg


# ---------------------------------------------------------------- edge cases of the formats


def test_jsonl_text_with_unicode_line_separator(tmp_path):
    p = jsonl(
        tmp_path / "t.jsonl",
        [{"text": "first\u2028second", "label": "a"}, {"text": "x\x85y", "label": "b"}],
    )
    ds = load_dataset(p)
    assert ds.items == ["first\u2028second", "x\x85y"]


def test_csv_text_with_unicode_line_separator(tmp_path):
    p = write(tmp_path / "t.csv", "text,label\nfirst\u2028second,a\nplain,b\n")
    ds = load_dataset(p)
    assert ds.items == ["first\u2028second", "plain"]
    assert ds.lines == [2, 3]


def test_tsv_is_tab_separated(tmp_path):
    p = write(tmp_path / "t.tsv", "text\tlabel\npump leaks, again\tpump\nfuse\tmotor\n")
    ds = load_dataset(p)
    assert ds.items == ["pump leaks, again", "fuse"]
    assert ds.labels == ["pump", "motor"]


def test_blank_line_before_header(tmp_path):
    p = write(tmp_path / "t.csv", "\ntext,label\nhello,a\nbye,b\n")
    msg = ""
    try:
        ds = load_dataset(p)
    except DataError as e:
        msg = str(e)
    assert "the file is empty" not in msg
    if not msg:
        assert ds.items == ["hello", "bye"]


@pytest.mark.parametrize("column", ["img", "path"])
def test_image_csv_with_named_path_column(tmp_path, column):
    png(tmp_path / "imgs" / "a.png")
    png(tmp_path / "imgs" / "b.png")
    p = write(tmp_path / "labels.csv", f"{column},label\nimgs/a.png,x\nimgs/b.png,y\n")
    assert load_dataset(p, text_column=column).kind == "image"


# ---------------------------------------------------------------- the command line


@pytest.fixture
def run_train(tmp_path, monkeypatch):
    """`edgeft [group options] train ARGS`, ARGS as one shell-like string."""
    monkeypatch.chdir(tmp_path)  # a model alias must not be found as a folder by accident

    def invoke(args: str, group: str = ""):
        return CliRunner().invoke(main, [*shlex.split(group), "train", *shlex.split(args)])

    return invoke


def assert_one_error_line(result, *parts: str | Path) -> str:
    """Exit 2, exactly one line `error: ...` on stderr, nothing on stdout, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert result.output.splitlines() == lines  # nothing else interleaved
    line = lines[0]
    assert line.startswith("error: "), line
    for part in parts:
        assert str(part) in line, f"{part!r} not in {line!r}"
    return line


def test_cli_missing_text_column(run_train, tiny_bert, tmp_path):
    data = write(tmp_path / "train.csv", "txt,label\npump leak,pump\nfuse,motor\n")
    out = tmp_path / "run"
    r = run_train(f"--model {tiny_bert} --data {data} --output {out} --epochs 1")
    line = assert_one_error_line(r, f"error: {data}: no text column 'text'", 'Did you mean "txt"?')
    assert line.endswith("Name it with --text-column.")
    assert not out.exists()


def test_cli_empty_text(run_train, tiny_bert, tmp_path):
    data = jsonl(
        tmp_path / "train.jsonl",
        [{"text": "pump leak", "label": "pump"}, {"text": " \u200b\u00a0", "label": "motor"}],
    )
    out = tmp_path / "run"
    r = run_train(f"--model {tiny_bert} --data {data} --output {out} --epochs 1")
    assert_one_error_line(r, f"error: {data}: line 2: empty text in column 'text'.")
    assert not out.exists()


def test_cli_unknown_validation_label(run_train, tiny_bert, text_data, tmp_path):
    val = write(tmp_path / "val.csv", "text,label\npump leak,pump\nbelt slip,bellt\n")
    out = tmp_path / "run"
    r = run_train(
        f"--model {tiny_bert} --data {text_data['train']} --val {val} --output {out} --epochs 1"
    )
    assert_one_error_line(r, f"error: {val}: line 3: unknown label 'bellt'", 'Did you mean "belt"?')
    assert not out.exists()


def test_cli_not_utf8(run_train, tiny_bert, tmp_path):
    data = write(tmp_path / "train.csv", "text,label\nok,a\ncafé,b\n".encode("latin-1"))
    out = tmp_path / "run"
    r = run_train(f"--model {tiny_bert} --data {data} --output {out} --epochs 1")
    assert_one_error_line(r, f"error: {data}: line 3: not UTF-8 text", "Save the file as UTF-8.")
    assert not out.exists()


def test_cli_renamed_label_column_reaches_the_reader(run_train, tiny_bert, text_data, tmp_path):
    out = tmp_path / "run"
    train = text_data["train"]
    r = run_train(
        f"--model {tiny_bert} --data {train} --label-column team --output {out} --epochs 1"
    )
    assert_one_error_line(r, f"error: {train}: no label column 'team'", "--label-column")
    assert not out.exists()


def test_cli_unreadable_image(run_train, tiny_vit, tmp_path):
    root = tmp_path / "images"
    for i in range(3):
        png(root / "crack" / f"{i}.png")
        png(root / "clean" / f"{i}.png", colour=(0, 200, 0))
    bad = garbage_png(root / "clean" / "9.png")
    out = tmp_path / "run"
    r = run_train(f"--model {tiny_vit} --data {root} --output {out} --epochs 1")
    assert_one_error_line(r, f"error: {root}: unreadable image {bad} (")
    assert not out.exists()


def test_cli_text_data_with_image_model(run_train, tiny_vit, text_data, tmp_path):
    out = tmp_path / "run"
    train = text_data["train"]
    r = run_train(f"--model {tiny_vit} --data {train} --output {out} --epochs 1")
    assert_one_error_line(r, f"error: {train}: text data, but {tiny_vit} is a", "image model")
    assert not out.exists()


def test_cli_image_validation_for_text_training(
    run_train, tiny_bert, text_data, image_data, tmp_path
):
    out = tmp_path / "run"
    r = run_train(
        f"--model {tiny_bert} --data {text_data['train']} --val {image_data} --output {out}"
    )
    assert_one_error_line(r, f"error: {image_data}: image data, but the training data is text.")
    assert not out.exists()


def test_cli_unknown_model_alias(run_train, text_data, tmp_path):
    out = tmp_path / "run"
    r = run_train(f"--model minilmm --data {text_data['train']} --output {out} --epochs 1")
    assert_one_error_line(
        r, "error: minilmm: not a local model directory nor a known alias", 'Did you mean "minilm"?'
    )
    assert not out.exists()


def test_cli_output_exists_and_not_empty(run_train, tiny_bert, text_data, tmp_path):
    out = tmp_path / "run"
    keep = write(out / "notes.txt", "someone else's run")
    r = run_train(f"--model {tiny_bert} --data {text_data['train']} --output {out} --epochs 1")
    assert_one_error_line(r, f"error: {out}: already exists and is not empty.", "--resume")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert keep.read_text() == "someone else's run"


def test_cli_debug_keeps_the_exception(run_train, tiny_bert, tmp_path):
    data = write(tmp_path / "train.csv", "txt,label\na,b\n")
    r = run_train(f"--model {tiny_bert} --data {data} --output {tmp_path / 'run'}", group="--debug")
    assert isinstance(r.exception, DataError)
    assert r.exit_code == 1  # an uncaught exception: the traceback is shown, as asked


def test_cli_good_run(run_train, tiny_bert, text_data, tmp_path):
    out = tmp_path / "run"
    r = run_train(
        f"--model {tiny_bert} --data {text_data['train']} --val {text_data['val']} "
        f"--method head --epochs 3 --no-progress --output {out}"
    )
    assert r.exit_code == 0, (r.output, r.exception)
    assert "Traceback" not in r.output
    lines = r.stdout.splitlines()
    assert len(lines) == 1, r.stdout
    assert lines[0].startswith("train  ok  ")
    assert "  head  best epoch " in lines[0]
    assert lines[0].endswith(f"-> {out}")
    assert json.loads((out / "labels.json").read_text()) == {"labels": ["belt", "motor", "pump"]}
    assert (out / "metrics.json").is_file()


def test_cli_good_run_jsonl_renamed_columns_held_out_split(run_train, tiny_bert, tmp_path):
    words = {
        "pump": "pump leak seal valve",
        "motor": "motor fuse relay phase",
        "belt": "belt roller pulley idler",
    }
    rows = [
        {"sentence": f"{w} {i}", "team": y}
        for y, ws in words.items()
        for i, w in enumerate(ws.split() * 2)
    ]
    data = jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "run"
    r = run_train(
        f"--model {tiny_bert} --data {data} --text-column sentence --label-column team "
        f"--epochs 2 --no-progress --output {out}",
        group="-q",
    )
    assert r.exit_code == 0, (r.output, r.exception)
    assert r.stdout.startswith("train  ok  ") and r.stdout.count("\n") == 1
    assert json.loads((out / "labels.json").read_text()) == {"labels": ["belt", "motor", "pump"]}


# ---------------------------------------------------------------- inputs the fuzzing found (tests/test_fuzz.py)


@pytest.mark.parametrize("line", ['{"text": "a", "label": ' + "9" * 5000 + "}", "[" * 100_000],
                         ids=["integer-of-5000-digits", "nested-100000-deep"])
def test_jsonl_beyond_json_limits_is_one_data_error(tmp_path, line):
    f = write(tmp_path / "d.jsonl", line + "\n")
    msg = data_error(load_dataset, f)
    assert msg.startswith(f"{f}: line 1: JSON beyond what edgeft reads") and "\n" not in msg, msg


def test_image_path_too_long_for_the_file_system(tmp_path):
    f = write(tmp_path / "d.csv", "path,label\n" + "a" * 300 + ".png,x\n")
    msg = data_error(load_dataset, f)
    assert msg.startswith(f"{f}: line 2: unusable image path") and "\n" not in msg, msg


def test_cli_jsonl_integer_of_5000_digits(run_train, tmp_path):
    f = write(tmp_path / "d.jsonl", '{"text": "a", "label": ' + "9" * 5000 + "}\n")
    r = run_train(f"--model m --data {f} --output {tmp_path / 'run'}")
    assert_one_error_line(r, f"error: {f}: line 1: JSON beyond what edgeft reads")
    assert not (tmp_path / "run").exists()
