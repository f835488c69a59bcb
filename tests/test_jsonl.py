"""The shared JSON Lines reader: blank lines skipped, values with their line, bad JSON named by line."""
import pytest

from tagi_jax.jsonl import iter_jsonl


def test_values_come_with_file_and_line_and_bad_json_names_its_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n[2]\n{oops\n', encoding="utf-8")
    rows = iter_jsonl(str(path))
    assert next(rows) == (f"{path}:1", {"a": 1})
    assert next(rows) == (f"{path}:3", [2])
    with pytest.raises(ValueError, match=r"x\.jsonl:4: invalid JSON: "):
        next(rows)
