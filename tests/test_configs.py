"""Every shipped config validates; broken configs fail with the dotted key, exit 2, nothing written."""

import subprocess
import sys
from pathlib import Path

import pytest

from rankwise.config.loader import available_runs, load_job
from rankwise.errors import ConfigError

REF_PROPOSED = "proposed-DeBERTaV3-base-86-M--GLUE-MNLI"
REF_COMPARATIVE = "comparative-1-DeBERTaV3-base-86-M--GLUE-MNLI"


@pytest.mark.parametrize("run_id", available_runs())
def test_every_shipped_run_config_validates(run_id):
    job = load_job([f"run={run_id}"])
    assert job.run.run_id == run_id
    assert job.run.algorithm


def test_experiment_configs_are_generated_and_cover_both_experiments():
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "scripts" / "make_experiment_configs.py"), "--check"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    runs = set(available_runs())
    algorithms = {}
    for task in ("MNLI", "SST-2", "RTE"):
        for role, algo in (("proposed", "iw_lora"), ("comparative-1", "lora"), ("comparative-2", "adalora"),
                           ("baseline", "full_ft"), ("ablation-uniform-l2", "iw_lora")):
            run_id = f"{role}-DeBERTaV3-base-86-M--GLUE-{task}"
            assert run_id in runs
            algorithms[run_id] = load_job([f"run={run_id}"]).run.algorithm == algo
    for task in ("CoLA", "SST-2", "MRPC", "QQP", "STS-B", "MNLI", "QNLI", "RTE", "ListOps"):
        for role, algo in (("proposed", "tabs"), ("comparative-1", "lora"), ("comparative-2", "bhsp"),
                           ("comparative-3", "cbsp"), ("ablation-no-projection", "tabs"),
                           ("ablation-shared-gates", "tabs")):
            run_id = f"tabs-{role}-DeBERTaV3-base-86-M--{task}"
            algorithms[run_id] = run_id in runs and load_job([f"run={run_id}"]).run.algorithm == algo
    assert all(algorithms.values()), [k for k, ok in algorithms.items() if not ok]
    no_proj = load_job(["run=tabs-ablation-no-projection-DeBERTaV3-base-86-M--RTE"]).run.model.adapter
    shared = load_job(["run=tabs-ablation-shared-gates-DeBERTaV3-base-86-M--RTE"]).run.model.adapter
    assert not no_proj.projection and shared.gate_granularity == "sequence"
    twins = [r for r in runs if r.startswith("cpu-")]
    assert len(twins) == 5 * 3 + 6 * 3
    assert all(load_job([f"run={r}"]).run.model.name == "minilm" for r in twins)
    for task in ("MNLI", "SST-2", "RTE"):  # the control differs from IW-LoRA in its coefficients only
        control = load_job([f"run=ablation-uniform-l2-DeBERTaV3-base-86-M--GLUE-{task}"]).run
        iw = load_job([f"run=proposed-DeBERTaV3-base-86-M--GLUE-{task}"]).run
        assert control.model.importance_weighted_regularisation.coefficients == "uniform"
        assert iw.model.importance_weighted_regularisation.coefficients == "importance"
        assert control.model.importance_weighted_regularisation.reg_alpha == \
            iw.model.importance_weighted_regularisation.reg_alpha
        assert control.training == iw.training and control.optuna == iw.optuna
    for task in ("SST-2", "MRPC", "CoLA"):
        assert f"cpu-ablation-uniform-l2-MiniLM-L6--GLUE-{task}" in twins
        control = load_job([f"run=cpu-ablation-uniform-l2-MiniLM-L6--GLUE-{task}"]).run.optuna.search_space
        iw = load_job([f"run=cpu-proposed-MiniLM-L6--GLUE-{task}"]).run.optuna.search_space
        # the twins' departure: α two decades above the seed's 1e-3, the same for IW-LoRA and its control
        assert control["iw_reg_alpha"] == iw["iw_reg_alpha"] and iw["iw_reg_alpha"].high == 0.1
    stress = {role: load_job([f"run=tabs-{role}-DeBERTaV3-base-86-M--ListOps-length-stress"]).run
              for role in ("proposed", "comparative-3")}
    assert stress["proposed"].algorithm == "tabs" and stress["comparative-3"].algorithm == "cbsp"
    assert stress["proposed"].model.adapter.budget_tokens == 8 * 512
    for run in stress.values():
        assert run.dataset.listops.max_length == 2000 and run.dataset.max_seq_length >= 2000


OWN_KNOBS = {  # what each arm searches besides the learning rate and the batch size
    "lora": set(), "full_ft": set(), "adalora": {"model.adapter.orth_reg_weight"},
    "iw_lora": {"iw_reg_alpha"},  # as the reference config: normalise and penalty_on at the seed's values
    # (the CPU twins' IW-LoRA also searches normalise: a stated departure)
    "tabs": {"model.adapter.penalty_weight", "model.adapter.budget_control", "model.adapter.gate_learning_rate",
             "model.adapter.controller_init_bias"},
    "bhsp": {"model.adapter.penalty_weight", "model.adapter.budget_control", "model.adapter.gate_learning_rate",
             "model.adapter.init_log_alpha"},
}
OWN_KNOBS["cbsp"] = OWN_KNOBS["tabs"]


def test_every_arm_of_an_experiment_is_searched_alike_over_its_own_knobs():
    """The same number of trials for every arm of an experiment at each scale, over learning
    rate, batch size and the arm's own knobs, scored on the held-out selection slice; gated
    arms choose their evaluation rule there too."""
    trials = {}
    for run_id in available_runs():
        if "DeBERTaV3-base-86-M--" not in run_id and "MiniLM-L6--" not in run_id:
            continue  # the single-run demo configs
        run = load_job([f"run={run_id}"]).run
        experiment = "2" if "tabs-" in run_id else "1"
        scale = "cpu" if run_id.startswith("cpu-") else "full"
        trials.setdefault((experiment, scale), set()).add(run.optuna.n_trials)
        assert run.optuna.selection_split == 0.1, run_id
        space = set(run.optuna.search_space)
        own = OWN_KNOBS[run.algorithm]
        iw = run.model.importance_weighted_regularisation
        if scale == "cpu" and iw.enabled and iw.coefficients == "importance":
            own = own | {"model.importance_weighted_regularisation.normalise"}  # a stated twin departure
        assert space == {"learning_rate", "batch_size"} | own, run_id
        if run.algorithm in ("tabs", "cbsp", "bhsp"):
            assert run.model.adapter.eval_gates == "select", run_id
    assert trials == {("1", "cpu"): {4}, ("1", "full"): {30}, ("2", "cpu"): {4}, ("2", "full"): {30}}


def _value_at(run, path: str):
    node = run
    for part in path.split("."):
        node = getattr(node, part)
    return node


@pytest.mark.parametrize("run_id", available_runs())
def test_every_shipped_config_lies_inside_its_own_search_space(run_id):
    """A config's own learning rate, batch size, regulariser strength... is a point of its
    search space, so the search can find (at least) the configuration it ships with."""
    from rankwise.config.search_aliases import resolve_search_key

    job = load_job([f"run={run_id}"])
    for name, entry in job.run.optuna.search_space.items():
        value = _value_at(job.run, resolve_search_key(name, job.run_dict))
        where = f"{run_id}: optuna.search_space.{name} does not contain the config's own {value!r}"
        if entry.type == "categorical":
            assert value in entry.choices, where
        else:
            assert entry.low <= value <= entry.high, where
            if entry.step is not None:
                assert abs((value - entry.low) / entry.step - round((value - entry.low) / entry.step)) < 1e-9, where


def test_adalora_schedules_are_fractions_of_the_real_step_count():
    for run_id in available_runs():
        run = load_job([f"run={run_id}"]).run
        if run.algorithm == "adalora":
            adapter = run.model.adapter
            assert isinstance(adapter.tinit, float) and isinstance(adapter.tfinal, float), run_id
            assert 0 <= adapter.tinit and adapter.tinit + adapter.tfinal < 1, run_id


def test_reference_configs_ship_unchanged():
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "reference-configs"
    if not shared.is_dir():
        pytest.skip(f"reference configs not found at {shared}")
    from importlib import resources

    for name in (REF_PROPOSED, REF_COMPARATIVE):
        shipped = (resources.files("rankwise") / "configs" / "runs" / f"{name}.yaml").read_bytes()
        assert shipped == (shared / f"{name}.yaml").read_bytes(), name
        assert load_job([f"run={name}"]).run.run_id == name  # still accepted as is


def test_reference_configs_resolve_algorithms_and_strings():
    proposed = load_job([f"run={REF_PROPOSED}"]).run
    comparative = load_job([f"run={REF_COMPARATIVE}"]).run
    assert proposed.algorithm == "iw_lora" and comparative.algorithm == "lora"
    # PyYAML reads '1e-4' as a string: the schema accepts it as a float
    assert proposed.model.importance_weighted_regularisation.reg_alpha == pytest.approx(1e-4)
    assert proposed.optuna.search_space["learning_rate"].low == pytest.approx(1e-5)
    assert proposed.dataset.splits.validation == "validation_matched"


def test_overrides_reach_the_run_and_job():
    job = load_job([f"run={REF_COMPARATIVE}", "mode=trial", "model.name=minilm",
                    "training.seeds=[1,2,3]", "model.adapter.rank=4"])
    assert job.command.mode == "trial"
    assert job.run.model.name == "minilm"
    assert job.run.training.seed_list() == [1, 2, 3]
    assert job.run.model.adapter.rank == 4


def test_run_from_path(tmp_path):
    src = load_job([f"run={REF_COMPARATIVE}"]).run_dict
    import yaml

    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({**src, "run_id": "mine"}))
    assert load_job([f"run={path}"]).run.run_id == "mine"


BROKEN = [
    (["training.lerning_rate=1e-4"], "training.lerning_rate", "did you mean 'learning_rate'"),
    (["training.learning_rate=-1"], "training.learning_rate", "> 0"),
    (["training.learning_rate=abc"], "training.learning_rate", "number"),
    (["training.batch_size=0"], "training.batch_size", ">= 1"),
    (["training.epochs=1.5"], "training.epochs", "integer"),
    (["training.fp16=maybe"], "training.fp16", "true/false"),
    (["training.lr_scheduler=cosin"], "training.lr_scheduler", "did you mean 'cosine'"),
    (["training.warmup_ratio=1.5"], "training.warmup_ratio", "[0, 1)"),
    (["model.adapter.rank=0"], "model.adapter.rank", ">= 1"),
    (["model.adapter.type=lorra"], "model.adapter.type", "did you mean 'lora'"),
    (["model.adapter.dropout=1.0"], "model.adapter.dropout", "[0, 1)"),
    (["model.adapter.ranks=8"], "model.adapter.ranks", "did you mean 'rank'"),
    (["model.importance_weighted_regularisation.beta=-1"], "model.importance_weighted_regularisation.beta", ">= 0"),
    (["model.importance_weighted_regularisation.enabled=true", "model.adapter=null"],
     "model.importance_weighted_regularisation.enabled", "lora"),
    (["dataset.subset=mnlii"], "dataset.subset", "did you mean 'mnli'"),
    (["dataset.name=imdb"], "dataset.name", "choose from"),
    (["dataset.max_train_samples=0"], "dataset.max_train_samples", ">= 1"),
    (["optuna.metric_name=validation_mcc"], "optuna.metric_name", "not produced"),
    (["optuna.direction=up"], "optuna.direction", "choose from"),
    (["optuna.n_trials=-3"], "optuna.n_trials", ">= 0"),
    (["optuna.search_space.learning_rate.low=1e-2"], "optuna.search_space.learning_rate.low", "> high"),
    (["optuna.search_space.learning_rate.type=gaussian"], "optuna.search_space.learning_rate.type", "choose from"),
    (["method=winner"], "method", "role label"),
    (["mdoe=trial"], "mdoe", "did you mean 'mode'"),
    (["mode=fast"], "mode", "choose from"),
    (["training.seeds=[1,1]"], "training.seeds", "distinct"),
    # keys that were accepted and never applied: refused with the reason
    (["model.dropout_override=0.2"], "model.dropout_override", "never applied"),
    (["training.num_workers=4"], "training.num_workers", "never applied"),
    # one home for target modules: model.target_modules
    (["model.adapter.target_modules=[query]"], "model.adapter.target_modules", "model.target_modules"),
]


@pytest.mark.parametrize("overrides,key,fragment", BROKEN, ids=[b[1] + ":" + b[0][0] for b in BROKEN])
def test_broken_configs_name_the_key(overrides, key, fragment):
    with pytest.raises(ConfigError) as info:
        load_job([f"run={REF_PROPOSED}", *overrides])
    assert info.value.key == key
    assert fragment in str(info.value)


def test_broken_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run_id: x\nmethod: proposed\nmodel: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job([f"run={path}"])


def test_unknown_run_id():
    with pytest.raises(ConfigError, match="did you mean"):
        load_job(["run=proposed-DeBERTaV3-base-86-M--GLUE-MNLl"])


def test_cli_exits_2_with_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "rankwise.main", f"run={REF_PROPOSED}", f"results_dir={out}",
         "training.lerning_rate=1e-4"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines == [lines[-1]] and "training.lerning_rate" in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
