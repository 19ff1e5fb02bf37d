"""docs/configuration.md is generated from the config dataclasses and must match them."""

from __future__ import annotations

import dataclasses

from pipeline import configdoc
from pipeline.config import RunConfig
from training.trainer import TrainConfig


def test_the_committed_reference_is_what_the_code_generates():
    assert configdoc.DOC.read_text() == configdoc.render(), "run: python -m pipeline.configdoc"


def test_every_field_of_every_section_has_its_row_with_type_default_and_comment():
    text = configdoc.render()
    for root in (RunConfig, TrainConfig):
        for _, cls in configdoc.sections(root):
            for f in dataclasses.fields(cls):
                assert f"| `{f.name}` |" in text, f"{cls.__name__}.{f.name}"
    assert '| `out` | `str` | `"out"` | local directory or s3://bucket/prefix |' in text
    assert "| `max_retries` | `int` | `2` | per shard, for exceptions and for dead workers/nodes |" in text
    assert "| `executor` | `'ray' \\| 'inline'` | `\"ray\"` |" in text  # a | inside a cell is escaped
    assert "| `rows_per_partition` | `int` | `1000000` | memory per reduce task (*not identity*) |" in text
    assert "## dedup (run)" in text and "## loader (train)" in text


def test_check_fails_on_a_stale_page_and_passes_on_a_fresh_one(tmp_path, capsys):
    page = tmp_path / "configuration.md"
    page.write_text(configdoc.render().replace("local directory", "a folder"))
    assert configdoc.main(["--check", "--out", str(page)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert configdoc.main(["--out", str(page)]) == 0
    assert configdoc.main(["--check", "--out", str(page)]) == 0
