"""A study directory: one Optuna RDB study in SQLite plus the run's resolved settings.

Layout of DIR: ``study.db`` (every optimizer's evaluations, so ``optuna-dashboard sqlite:///DIR/study.db``,
resume and plots work the same for all), ``config.yaml`` (the space and run settings),
``pareto.json``, ``report.md`` and ``pareto.png``.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

import hwnas
from hwnas.errors import HwnasError
from hwnas.pruning.apply import uses_default_spectral_weight
from hwnas.pruning.token_methods import EARLIER_SPECTRAL_WEIGHT, SPECTRAL_WEIGHT
from hwnas.search.objectives import RELATIVE, Budget, Objective, parse_budget, parse_objectives
from hwnas.search.pareto import Record
from hwnas.spaces import Space, space_from_dict

STUDY_NAME = "hwnas"
optuna.logging.set_verbosity(logging.WARNING)


@dataclass
class RunSettings:
    """Everything that defines a run besides the space; saved to config.yaml so --resume needs nothing else."""

    objectives: str = "accuracy,latency"
    budget: str = ""
    optimizer: str = "nsga2"
    trials: int = 32
    population: int = 0  # 0: chosen from the trial count
    seed: int = 0
    device: str = "cpu"
    workers: int = 1
    ray_address: str | None = None
    trial_timeout: float = 900.0  # seconds per evaluation before its worker is replaced; 0: no limit
    retries: int = 2  # attempts after a lost worker (crash, hang, out of memory)
    hwprofile: dict | None = None  # the hardware profile latency/energy are predicted on (hwprofiles.profile)
    extra: dict = field(default_factory=dict)

    def parsed_objectives(self) -> list[Objective]:
        return parse_objectives(self.objectives)

    def parsed_budget(self) -> Budget:
        return parse_budget(self.budget)

    def metrics_read(self) -> list[str]:
        """The metrics the objectives and the budget read (a relative limit or objective reads its metric, an
        accuracy drop reads accuracy)."""
        limits = ["accuracy" if m == "accuracy_drop" else m for m in self.parsed_budget().limits]
        return [m.removesuffix(RELATIVE) for m in [o.metric for o in self.parsed_objectives()] + limits]

    def measures_energy(self) -> bool:
        """Whether the study measures energy: for ``energy_mj``, and, where no hardware profile prices it, for
        the cost model's ``energy_mj_predicted``, which is fitted on measurements."""
        measured = ("energy_mj",) if self.hwprofile else ("energy_mj", "energy_mj_predicted")
        return any(metric in measured for metric in self.metrics_read())

    def target(self, profile) -> bool:
        """Predict latency and energy on ``profile`` (a ``HardwareProfile``). Where it is not this machine,
        the latency and energy objectives and limits become their predicted forms. Returns whether it is."""
        from hwnas.hwprofiles.profile import is_this_machine
        from hwnas.search.objectives import as_predicted

        self.hwprofile = profile.as_dict()
        here = is_this_machine(profile, self.device)
        if not here:
            self.objectives, self.budget = as_predicted(self.objectives), as_predicted(self.budget)
        return here

    def fault_policy(self):
        """The evaluator pool's timeout and retries (``hwnas.evaluators.pool.FaultPolicy``)."""
        from hwnas.evaluators.pool import FaultPolicy

        return FaultPolicy(timeout_s=self.trial_timeout or None, retries=self.retries)

    def population_size(self) -> int:
        return self.population or max(4, min(20, self.trials // 3))


class StudyDir:
    """Creates or reopens the study directory and turns its trials into records."""

    def __init__(self, path: Path, space: Space, settings: RunSettings):
        self.path = path
        self.space = space
        self.settings = settings
        self.objectives = settings.parsed_objectives()
        self.budget = settings.parsed_budget()

    # ---- creation and resume ------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, space: Space, settings: RunSettings) -> "StudyDir":
        path = Path(path)
        if (path / "study.db").exists():
            raise HwnasError(f"{path} already holds a study; continue it with --resume {path} or choose another --out")
        path.mkdir(parents=True, exist_ok=True)
        study = cls(path, space, settings)
        study.save_settings()
        return study

    @classmethod
    def open(cls, path: str | Path) -> "StudyDir":
        path = Path(path)
        config_file = path / "config.yaml"
        if not (path / "study.db").exists() or not config_file.exists():
            raise HwnasError(f"{path} is not a study directory (no study.db/config.yaml)")
        try:
            saved = yaml.safe_load(config_file.read_text())
            settings = RunSettings(**saved["run"])
            space = space_from_dict(saved["space"], origin=str(config_file))
        except (yaml.YAMLError, KeyError, TypeError) as exc:
            raise HwnasError(f"{config_file} is damaged: {exc}") from None
        _check_same_token_scoring(path, saved.get("hwnas_version"), space)
        return cls(path, space, settings)

    @classmethod
    def reuse_or_create(cls, path: str | Path, space: Space, settings: RunSettings) -> "StudyDir":
        """The study at ``path``, to continue to ``settings.trials``, or a new one there.

        A study already at ``path`` must search the same space on the same hardware profile.
        """
        path = Path(path)
        if not (path / "study.db").exists():
            return cls.create(path, space, settings)
        study_dir = cls.open(path)
        if study_dir.space.source != space.source or study_dir.settings.hwprofile != settings.hwprofile:
            raise HwnasError(f"{path} holds a study of another space or hardware profile; choose another --out")
        study_dir.settings.trials = settings.trials
        study_dir.save_settings()
        return study_dir

    def save_settings(self) -> None:
        (self.path / "config.yaml").write_text(yaml.safe_dump(
            {"space": self.space.source, "run": asdict(self.settings), "hwnas_version": hwnas.__version__},
            sort_keys=False))

    @property
    def storage_url(self) -> str:
        return f"sqlite:///{(self.path / 'study.db').resolve()}"

    def load(self, sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
        study = optuna.create_study(
            storage=self.storage_url, study_name=STUDY_NAME, sampler=sampler, load_if_exists=True,
            directions=[o.optuna_direction for o in self.objectives])
        if study.metric_names is None:
            with warnings.catch_warnings():  # experimental in Optuna, used by optuna-dashboard
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names([o.metric for o in self.objectives])
        return study

    # ---- reading results ----------------------------------------------------------------------
    def records(self, study: optuna.Study) -> list[Record]:
        return [record_of(t) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]

    def baseline(self, study: optuna.Study) -> dict | None:
        return study.user_attrs.get("baseline")


def _check_same_token_scoring(path: Path, version: str | None, space: Space) -> None:
    """Fail unless this hwnas scores the study's tokens as the hwnas that searched it.

    ``version`` is the one its config.yaml records; None for a study of hwnas 0.2.0 or earlier, which did not.
    """
    then = EARLIER_SPECTRAL_WEIGHT.get(version or "0.2.0", SPECTRAL_WEIGHT)
    if then != SPECTRAL_WEIGHT and uses_default_spectral_weight(space):
        raise HwnasError(f"{path} was searched by hwnas {version or '0.2.0 or earlier'}, whose UCC token method scored "
                         f"with spectral weight {then} (now {SPECTRAL_WEIGHT}), so its trials would not be reproduced: "
                         "resume or export it with that version, or search again")


def record_of(trial: FrozenTrial) -> Record:
    attrs = trial.user_attrs
    return Record(trial.number, attrs["config"], attrs["metrics"], bool(attrs["feasible"]), attrs["config_hash"])


def read_pareto(path: str | Path) -> dict:
    """The ``pareto.json`` of a study directory, with a clear error when it is missing or damaged."""
    file = Path(path) / "pareto.json"
    if not file.exists():
        raise HwnasError(f"{path} has no pareto.json (is it a study directory from `search run`?)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise HwnasError(f"{file} is damaged: {exc}") from None
