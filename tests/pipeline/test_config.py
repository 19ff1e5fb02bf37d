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


def test_overrides_are_read_as_the_type_of_the_field_they_set_not_as_yaml():
    config = apply_overrides(
        RunConfig(),
        [
            "out=2024",  # YAML would make these an int, a bool, a float and a date
            "name=on",
            "ingest.url_column=1e-3",
            "crawl.user_agent=2024-01-01",
            "runtime.progress=off",
            "crawl.timeout_s=1e-3",  # PyYAML reads 1e-3 as a string; a float field reads a float
            "runtime.num_cpus=4",
            "ingest.inputs=urls.parquet",  # one bare item for a list field
            "crawl.allowed_formats=[jpeg, png]",
            "crawl.hosts={web: 127.0.0.1}",
            "dedup.semantic_checkpoint=null",
            "runtime.executor=inline",
        ],
    )
    assert (config.out, config.name, config.ingest.url_column) == ("2024", "on", "1e-3")
    assert config.crawl.user_agent == "2024-01-01"
    assert config.runtime.progress is False and config.crawl.timeout_s == 0.001 and config.runtime.num_cpus == 4
    assert config.ingest.inputs == ("urls.parquet",) and config.crawl.allowed_formats == ("jpeg", "png")
    assert config.crawl.hosts == {"web": "127.0.0.1"} and config.dedup.semantic_checkpoint is None
    assert config.runtime.executor == "inline"
    for override, message in [
        ("runtime.progress=maybe", "runtime.progress: expected true or false, got 'maybe'"),
        ("runtime.num_cpus=four", "runtime.num_cpus: expected an integer, got 'four'"),
        ("runtime.executor=spark", "runtime.executor: 'spark' is not one of 'ray', 'inline'"),
        ("out.x=1", "unknown config section 'out' in 'out.x' (out is a str)"),
    ]:
        with pytest.raises(ConfigError) as e:
            apply_overrides(RunConfig(), [override])
        assert str(e.value) == message


def test_typed_pairs_are_checked_against_the_field():
    config = apply_overrides(RunConfig(), [("out", "2024"), ("runtime.max_retries", 5)])
    assert config.out == "2024" and config.runtime.max_retries == 5
    with pytest.raises(ConfigError, match=r"^out: expected a string, got 2024$"):
        apply_overrides(RunConfig(), [("out", 2024)])
