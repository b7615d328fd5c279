"""io/safe_files.py: small files read with bounds on size, depth and YAML aliases; every failure names the file."""

import pytest

from lmcompose.io.safe_files import file_digest, parse_json, parse_yaml, read_json, read_text

BOMB = ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
        "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nlr: [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n")


@pytest.mark.parametrize("text,message", [
    (BOMB, r"c\.yaml, line 2: not valid YAML \(aliases \(\*name\) are not allowed\)"),
    ("lr: " + "[" * 100_000 + "]" * 100_000, r"c\.yaml: the YAML is nested too deeply|c\.yaml.*not valid YAML"),
    ("lr: " + "[" * 100 + "]" * 100, "nested more than 64 levels deep"),
    ("lr: [1, 2", r"c\.yaml, line \d+: not valid YAML"),
])
def test_yaml_without_aliases_or_depth(text, message):
    with pytest.raises(ValueError, match=message):
        parse_yaml(text, "c.yaml")
    assert parse_yaml("lr: 0.1\nx: [1, 2]\n", "c.yaml") == {"lr": 0.1, "x": [1, 2]}


def test_json_bounds_and_file_bounds(tmp_path):
    for text, message in (("[" * 100_000 + "]" * 100_000, "the JSON is nested too deeply"), ('{"a": 1' + "0" * 5000 + "}", "not usable JSON"),
                          ('{"a": ', "not valid JSON")):
        with pytest.raises(ValueError, match=rf"f\.json: {message}"):
            parse_json(text, "f.json")
    big = tmp_path / "big.json"
    big.write_text(" " * 2_000_000 + "{}")
    with pytest.raises(ValueError, match=r"big\.json: the config has 2,000,002 bytes, more than the 1,048,576"):
        read_json(big, "config")
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ValueError, match=r"bad\.json: the file is not UTF-8 text"):
        read_text(bad)
    assert len(file_digest(bad)) == 64 and file_digest(bad) != file_digest(big)
