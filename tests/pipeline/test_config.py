import dataclasses

import pytest

from pipeline.config import RunConfig, RuntimeConfig, apply_overrides, dump_config, load_config
from pipeline.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_without_a_file():
    assert load_config(None) == RunConfig()


def test_yaml_file_nested_sections_and_lists(tmp_path):
    path = write(
        tmp_path,
        "name: laion-slice\nout: s3://b/p\nstages: [ingest, crawl]\nruntime:\n  max_retries: 5\n  executor: inline\n",
    )
    config = load_config(path)
    assert config == RunConfig(
        name="laion-slice",
        out="s3://b/p",
        stages=("ingest", "crawl"),
        runtime=RuntimeConfig(max_retries=5, executor="inline"),
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.name = "x"


def test_unknown_key_is_an_error_naming_the_key(tmp_path):
    path = write(tmp_path, "runtime:\n  max_retrys: 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: unknown config key 'runtime.max_retrys' (known here: ")
    assert "max_retries" in str(e.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ("runtime:\n  max_retries: two\n", "runtime.max_retries: expected an integer, got 'two'"),
        ("runtime:\n  max_retries: true\n", "runtime.max_retries: expected an integer, got True"),
        ("runtime:\n  executor: spark\n", "runtime.executor: 'spark' is not one of 'ray', 'inline'"),
        ("runtime:\n  progress: 1\n", "runtime.progress: expected true or false, got 1"),
        ("stages: crawl\n", "stages: expected a list, got str"),
        ("runtime: 3\n", "runtime: expected a mapping, got int"),
        ("- a\n- b\n", "expected a mapping at the top level, got list"),
        ("name: [unclosed\n", "invalid YAML at line 2"),
    ],
)
def test_bad_values_are_one_line_errors(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: {message}"
    assert "\n" not in str(e.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.yaml: cannot read config \(No such file or directory\)$"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_parse_yaml_values_and_are_checked():
    config = apply_overrides(
        RunConfig(), ["runtime.max_retries=7", "out=s3://bucket/x", "stages=[crawl]", "runtime.address=null"]
    )
    assert config.runtime.max_retries == 7 and config.out == "s3://bucket/x" and config.stages == ("crawl",)
    assert config.runtime.address is None
    with pytest.raises(ConfigError, match="unknown config key 'runtime.colour'"):
        apply_overrides(RunConfig(), ["runtime.colour=red"])
    with pytest.raises(ConfigError, match="not of the form section.key=value"):
        apply_overrides(RunConfig(), ["runtime.max_retries"])
    with pytest.raises(ConfigError, match="unknown config section 'nothing'"):
        apply_overrides(RunConfig(), ["nothing.at.all=1"])


def test_dump_then_load_gives_the_same_config(tmp_path):
    config = RunConfig(name="x", stages=("crawl", "dedup"), runtime=RuntimeConfig(num_cpus=3))
    assert load_config(write(tmp_path, dump_config(config))) == config
