import pytest

from pipeline.data_io import read_labelled_csv
from pipeline.errors import InputError


def test_reads_named_columns(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('utterance,intent\n"hello, there",greet\nbye,leave\n')
    assert read_labelled_csv(path, "utterance", "intent") == (["hello, there", "bye"], ["greet", "leave"])


@pytest.mark.parametrize("content, message", [
    (b"text,category\nhi,greet\n", "missing column\\(s\\) label"),
    (b"text,label\nh\xe9llo,greet\n", "not valid UTF-8 \\(line 2"),
    (b"text,label\n,greet\n", "empty text"),
    (b"text,label\nhi,\n", "empty label"),
    (b"text,label\n", "no rows"),
    (b"", "missing column"),
])
def test_bad_csv_gets_a_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        read_labelled_csv(path)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_labelled_csv(tmp_path / "nope.csv")
