"""Config parsing and validation; bad CLI input exits 2 with a one-line error naming the field."""

import pytest

from conftest import ROOT, run_cli, small_overrides
from es_mpi.config import Config, ConfigError
from es_mpi.config_load import describe_fields, load_config


def test_defaults_are_valid_and_documented():
    cfg = Config()
    assert cfg.es.population == 30 and cfg.runtime.threads == 1
    rows = describe_fields()
    assert {"es.sigma", "model.path", "task.name", "seed"} <= {r[0] for r in rows}
    assert all(doc for _, _, doc in rows)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("es:\n  sigma: 0.01\n  population: 8\nseed: 3\n")
    cfg = load_config(path, ["es.sigma=0.002", "es.alpha=1", "task.name=arithmetic"])
    assert (cfg.es.sigma, cfg.es.population, cfg.seed) == (0.002, 8, 3)
    assert cfg.es.alpha == 1.0 and isinstance(cfg.es.alpha, float)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("es.sigmaa=0.1", "es.sigmaa"),
        ("es.population=many", "es.population"),
        ("es.population=2.5", "es.population"),
        ("es.antithetic=1", "es.antithetic"),
        ("es.sigma=-1", "es.sigma"),
        ("es.shaping=rank", "es.shaping"),
        ("es.alpha_schedule=step", "es.alpha_schedule"),
        ("es.shaping=top_pairs", "es.top_pairs"),
        ("es.alpha_final=1.5", "es.alpha_final"),
        ("es.alpha_schedule=cosine", "es.alpha_decay_iterations"),
        ("es.sigma_schedule=exp", "es.sigma_schedule"),
        ("es.sigma_final=-0.1", "es.sigma_final"),
        ("es.sigma_schedule=linear", "es.sigma_decay_iterations"),
        ("runtime.threads=0", "runtime.threads"),
        ("model=3", "model"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        load_config(None, [override])


def test_antithetic_needs_even_population():
    with pytest.raises(ConfigError, match="es.population"):
        load_config(None, ["es.antithetic=true", "es.population=5"])


def _assert_usage_error(result, field):
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and field in lines[0], result.stderr


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        (["--set", "es.bogus=1"], "es.bogus"),
        (["--set", "es.population=abc"], "es.population"),
        (["--set", "model.path=/nonexistent/model"], "model.path"),
    ],
)
def test_cli_bad_input_exits_2(tiny_model_dir, tmp_path, extra, field):
    args = ["train", "--run-dir", str(tmp_path / "run")]
    for item in small_overrides(tiny_model_dir):
        args += ["--set", item]
    result = run_cli(args + extra)
    _assert_usage_error(result, field)
    assert not (tmp_path / "run").exists()


def test_cli_existing_run_dir_is_not_overwritten(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "precious.txt").write_text("keep me")
    args = ["train", "--run-dir", str(run_dir)]
    for item in small_overrides(tiny_model_dir):
        args += ["--set", item]
    _assert_usage_error(run_cli(args), "--run-dir")
    assert (run_dir / "precious.txt").read_text() == "keep me"


def test_string_fields_keep_text_yaml_would_read_as_a_mapping():
    cfg = load_config(None, ["task.countdown.template={numbers}", "task.name=countdown"])
    assert cfg.task.countdown.template == "{numbers}"


@pytest.mark.parametrize(
    "path", sorted((ROOT / "configs" / "paper").glob("*.yaml")), ids=lambda p: p.name
)
def test_paper_configs_load_and_say_which_model_they_are_for(path):
    """They name the model they were made for (a download, not shipped here)."""
    cfg = load_config(path)
    text = path.read_text()
    assert "Made for" in text and "--set model.path=DIR" in text
    assert not (ROOT / cfg.model.path).exists()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_name_existing_models(path):
    cfg = load_config(path)
    assert (ROOT / cfg.model.path / "config.json").is_file()


def test_a_config_extends_another_section_by_section(tmp_path):
    (tmp_path / "base.yaml").write_text("seed: 3\nes:\n  population: 12\n  sigma: 0.5\n")
    (tmp_path / "top.yaml").write_text("extends: base.yaml\nes:\n  sigma: 0.25\n")
    cfg = load_config(tmp_path / "top.yaml", ["es.alpha=0.125"])
    assert (cfg.seed, cfg.es.population, cfg.es.sigma, cfg.es.alpha) == (3, 12, 0.25, 0.125)
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "loop.yaml")


def test_exponent_floats_without_a_dot_are_floats():
    """YAML 1.1 reads 1e-4 as a string; a float field takes it as the number."""
    from es_mpi.config_load import load_config

    cfg = load_config(None, ["grpo.learning_rate=1e-4", "es.sigma=2E-3"])
    assert cfg.grpo.learning_rate == 1e-4 and cfg.es.sigma == 2e-3
    with pytest.raises(ConfigError, match="expected float"):
        load_config(None, ["es.sigma=1e"])
