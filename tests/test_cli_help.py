"""The front door: ``--help`` / ``-h`` on every command, one line for an unknown flag,
``rankwise run --list`` and ``rankwise run ... --cfg job``. In-process through ``rankwise.cli``
(the console command's entry point); nothing here trains."""

import pytest
import yaml

from rankwise import cli
from rankwise.config.loader import load_job

COMMANDS = [["run"], ["evaluate"], ["grid"], ["bench"], ["bench", "overhead"], ["bench", "inference"],
            ["bench", "train"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_command_answers_help(command, flag, capsys):
    assert cli.main([*command, flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: rankwise {' '.join(command)} ")
    for part in ("\narguments:\n", "\nexamples:\n  rankwise ", "\nmore: "):
        assert part in out
    examples = out.split("\nexamples:\n")[1].split("\n\n")[0].splitlines()
    assert len(examples) >= 1 and all(e.startswith(f"  rankwise {command[0]}") for e in examples)


def test_help_lists_the_defaults(capsys):
    cli.main(["run", "--help"])
    out = capsys.readouterr().out
    assert "mode=trial|full" in out and "(default full)" in out and "results_dir=VALUE" in out
    cli.main(["bench", "train", "--help"])
    assert "steps=VALUE" in capsys.readouterr().out


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_an_unknown_flag_gets_one_line_and_exit_2(command, capsys):
    assert cli.main([*command, "--verbose"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "'--verbose'" in err and f"rankwise {' '.join(command)} --help" in err


def test_a_close_flag_gets_a_did_you_mean(capsys):
    assert cli.main(["run", "--lst"]) == 2
    assert "did you mean '--list'" in capsys.readouterr().err


def test_top_level_help_points_to_each_commands_help(capsys):
    assert cli.main(["--help"]) == 0
    assert "'rankwise <command> --help'" in capsys.readouterr().out


def test_run_list_shows_the_packaged_configs(capsys):
    assert cli.main(["run", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "id", "algorithm", "task", "model", "role", "source"]
    row = next(line.split() for line in lines if line.startswith("cpu-tabs-proposed-MiniLM-L6--SST-2 "))
    assert row == ["cpu-tabs-proposed-MiniLM-L6--SST-2", "tabs", "glue/sst2", "minilm", "proposed",
                   "packaged"]
    assert any(line.startswith("minilm-sst2-lora ") for line in lines)


def test_run_list_filters_and_reads_runs_dir(tmp_path, capsys):
    (tmp_path / "mine.yaml").write_text("run_id: mine\nmethod: baseline\nmodel: {name: tiny-bert}\n")
    (tmp_path / "broken.yaml").write_text("run_id: broken\nmethod: baseline\ntraining: {epochz: 1}\n")
    assert cli.main(["run", "--list", "tabs"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:-1]
    assert rows and all("tabs" in row for row in rows)
    assert cli.main(["run", "--list=mine", f"runs_dir={tmp_path}"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[1].split() == ["mine", "full_ft", "glue/rte", "tiny-bert", "baseline", str(tmp_path / "mine.yaml")]
    assert cli.main(["run", "--list", "broken", f"runs_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "invalid" in out and "training.epochz" in out


def test_cfg_job_prints_the_resolved_config_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "run=minilm-sst2-lora", "mode=trial", "training.batch_size=8", "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # no results folder, nothing else
    cfg = yaml.safe_load(out)
    assert cfg["run_id"] == "minilm-sst2-lora"
    assert cfg["training"]["batch_size"] == 8  # the override
    assert cfg["training"]["epochs"] == 1 and cfg["optuna"]["n_trials"] == 0  # mode=trial resolved
    assert cfg["dataset"]["max_train_samples"] == 4000  # the run file
    assert cfg["training"]["adam_beta2"] == 0.999  # a schema default
    # the output is a run file: run from it, it gives the same run
    (tmp_path / "resolved.yaml").write_text(out)
    again = load_job([f"run={tmp_path / 'resolved.yaml'}", "mode=trial"])
    assert again.run == load_job(["run=minilm-sst2-lora", "mode=trial", "training.batch_size=8"]).run


def test_cfg_job_on_a_bad_config_prints_the_runs_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "run=minilm-sst2-lora", "training.epochz=1", "--cfg=job"]) == 2
    cfg_err = capsys.readouterr().err.strip()
    assert cli.main(["run", "run=minilm-sst2-lora", "training.epochz=1"]) == 2
    run_err = capsys.readouterr().err.strip().splitlines()[-1]
    assert cfg_err == run_err and cfg_err.startswith("error: config error at 'training.epochz'")
    assert cli.main(["run", "run=minilm-sst2-lora", "--cfg", "hydra"]) == 2
    assert "--cfg" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_where_to_read_more_exists(command, capsys):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cli.main([*command, "--help"])
    more = " ".join(capsys.readouterr().out.split("\nmore: ")[1].split())
    paths = [p.split("#")[0] for p in more.replace(",", " ").split() if p.startswith("docs/")]
    assert paths and all((root / p).is_file() for p in paths), more
