"""``python -m rlhf_exp``: compose -> check -> dispatch to the runner of ``phase.name``.

Only Hydra, OmegaConf and our config package are imported here; torch, transformers and TRL are
imported by the runner, after the config has been checked. ``--help``, ``--cfg`` and ``dry_run=true``
therefore stay fast and never load a model.

Before handing the command line to Hydra we compose it once ourselves (the preflight): Hydra's own
errors for a misspelled key suggest ``+key=...``, which would add the typo silently; ours name the key,
the valid ones and the fix, in one or two lines, and exit with status 2.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rlhf_exp.config import paths as config_paths
from rlhf_exp.config.errors import CONF_DIR, ConfigError, config_groups, group_options, translate
from rlhf_exp.config.schema import register_configs
from rlhf_exp.config.validate import validate
from rlhf_exp.launch.signals import GUARD, Interrupted
from rlhf_exp.tracking.folder import RunLock, check_before_launch, check_unlocked, check_writable, resumable  # noqa: F401

register_configs()

EXIT_CONFIG_ERROR = 2


def fail(message: str) -> None:
    from rlhf_exp.tracking.secrets import scrub

    print(f"rlhf_exp: error: {scrub(message)}", file=sys.stderr)
    sys.exit(EXIT_CONFIG_ERROR)


def _override_variants(overrides: list[str], multirun: bool) -> list[list[str]]:
    """Override lists to compose. Under -m each swept value is checked once (others at their first)."""
    if not multirun:
        return [overrides]
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices: list[list[str]] = []
    for override in parsed:
        if override.value_type is not None and override.value_type.name == "GLOB_CHOICE_SWEEP":
            continue  # glob(...) needs Hydra's config loader to expand; Hydra checks what it yields
        if override.is_sweep_override():
            key = override.get_key_element()
            if override.value_type.name == "INTERVAL_SWEEP":  # Optuna's interval(a, b): check both ends
                ends = (override.value().start, override.value().end)
                choices.append([f"{key}={int(x) if x == int(x) else x}" for x in ends])
                continue
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line])
    if not choices:
        return [[]]
    variants = [[c[0] for c in choices]]
    for i, c in enumerate(choices):
        for value in c[1:]:
            variants.append([v[0] if j != i else value for j, v in enumerate(choices)])
    return variants


def _phase_choice(overrides: list[str]) -> str | None:
    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if key == "phase":
            return value
    return None


def compose(overrides: list[str], config_dir: Path = CONF_DIR) -> DictConfig:
    """Compose ``conf/config.yaml`` with overrides, raising ConfigError with a readable message. The user's
    config folders (RLHF_EXP_CONFIG_DIR) are searched after ours, as in Hydra's own job."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rlhf_exp.pipeline import as_additions

    overrides = as_additions(overrides)  # pipeline.<phase>.<key>=v: checked by the phase's schema later
    if not any(o.startswith("hydra.searchpath=") for o in overrides):
        overrides += config_paths.searchpath_overrides()
    try:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3", job_name="rlhf_exp"):
            return hydra_compose(config_name="config", overrides=overrides)
    except Exception as exc:  # Hydra/OmegaConf raise many types; all become one readable line
        from hydra.errors import OverrideParseException

        if isinstance(exc, OverrideParseException):
            raise ConfigError(str(exc).splitlines()[0] + " (check the override's syntax)") from exc
        raise ConfigError(translate(exc, _phase_choice(overrides) or "sft")) from exc
    finally:
        GlobalHydra.instance().clear()


def preflight(overrides: list[str], multirun: bool, check_rules: bool) -> list[DictConfig]:
    """Compose (and check) every variant of the command line before Hydra starts a job."""
    try:
        variants = list(itertools.islice(_override_variants(overrides, multirun), 64))
    except Exception as exc:  # the override parser's and sweep iterators' own errors
        raise ConfigError(str(exc).splitlines()[0]) from exc
    cfgs = []
    for variant in variants:
        cfg = compose(variant)
        if check_rules:
            validate(cfg)
        cfgs.append(cfg)
    return cfgs


def plan(cfgs: list[DictConfig], dry_run: bool = False, parents: bool = True, sweep: list[str] | None = None) -> list[str]:
    """Every check a launch makes before Hydra makes a folder, the same for ``dry_run=true`` (a dry run
    refuses what the real command refuses, with the same message and status): the phase has a runner,
    something can start the processes the hardware asks for (nodes, GPUs, DeepSpeed, SLURM), a ``sweep``
    (the -m command line) gives every job the launcher and resources it asks for, the parent runs exist.
    Every problem is reported together. ``dry_run`` imports no torch (the runner is looked up, not
    imported; GPUs are counted from the driver, see check_accelerator).

    A parent taken by default is resolved here, once, and pinned into the command (so jobs of one sweep
    share it); returns those pinning overrides."""
    from rlhf_exp.launch.distributed import (
        check_accelerator,
        check_multiprocess_launch,
        check_sharding,
        check_slurm_available,
    )
    from rlhf_exp.tracking.lineage import PARENTS, resolve_parents

    problems: list[str] = []

    def check(fn, *args):
        try:
            return fn(*args)
        except ConfigError as exc:
            if str(exc) not in problems:
                problems.append(str(exc))
            return None

    if sweep is not None:
        check(_check_sweep, sweep, cfgs[0])
    pinned: dict[str, set[str]] = {}
    checked: set[str] = set()
    for i, cfg in enumerate(cfgs):
        # the same hardware, launcher and phase give the same answer: asked once (nvidia-smi, sinfo)
        key = OmegaConf.to_yaml({"h": cfg.hardware, "l": cfg.launcher.name, "p": cfg.phase.name})
        if key not in checked:
            checked.add(key)
            check(_check_runner, str(cfg.phase.name), not dry_run)
            check(check_multiprocess_launch, cfg)
            check(check_accelerator, cfg, not dry_run)
            check(check_sharding, cfg)
            if cfg.launcher.name == "slurm" and "slurm" not in checked:
                checked.add("slurm")
                check(check_slurm_available, cfg)
        if not parents:
            continue
        defaults = [key for _, key in PARENTS[cfg.phase.name] if not cfg.phase.get(key)]
        for parent, (_, key) in zip(check(resolve_parents, cfg, i == 0) or [], PARENTS[cfg.phase.name]):
            if key in defaults:
                pinned.setdefault(key, set()).add(parent["path"])
    if problems:
        raise ConfigError("\n".join(problems))
    same_phase = len({cfg.phase.name for cfg in cfgs}) == 1
    return [f"phase.{key}='{next(iter(paths))}'" for key, paths in pinned.items()
            if same_phase and len(paths) == 1 and "'" not in next(iter(paths))]


# swept keys that can change a job's launcher parameters: any hardware.* and launcher.* value (what
# conf/launcher/*.yaml read), and the choices of configs that may set those (phase and model pick the recipe)
SIZING_GROUPS = ("hardware", "launcher")
SIZING_CHOICES = ("hardware", "launcher", "phase", "model", "recipe", "site")


def _check_sweep(overrides: list[str], cfg: DictConfig) -> None:
    """What Hydra's launchers cannot give each job of a sweep on its own: the launcher itself (Hydra picks
    it once, from the command without its swept values) and, through hydra-submitit-launcher, resources
    (one job array, sized once: rlhf_exp.launch.slurm.check_sweep_resources)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    swept = [o for o in parsed if o.is_sweep_override()]
    for o in swept:
        if o.key_or_group == "launcher":
            raise ConfigError(f"{o.input_line}: a sweep runs through one launcher, which Hydra picks from the command "
                              "without its swept values (so launcher=local here): give one launcher=..., and run one "
                              "sweep per launcher")
    if cfg.launcher.name not in ("slurm", "submitit_local", "parallel"):
        return
    choices = []
    for o in swept:
        if o.key_or_group.split(".")[0] not in SIZING_GROUPS and o.key_or_group not in SIZING_CHOICES:
            continue
        if o.value_type.name == "GLOB_CHOICE_SWEEP":
            values = o.value().filter(group_options(o.key_or_group))
        elif o.value_type.name == "INTERVAL_SWEEP":  # Optuna's interval(a, b): both ends
            values = [int(x) if x == int(x) else x for x in (o.value().start, o.value().end)]
        else:
            values = list(o.sweep_string_iterator())
        choices.append([f"{o.get_key_element()}={v}" for v in values])
    if not choices:
        return
    from rlhf_exp.launch.slurm import check_sweep_resources

    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    jobs = [list(job) for job in itertools.islice(itertools.product(*choices), 64)]
    check_sweep_resources(str(cfg.launcher.name), fixed, [(" ".join(job), job) for job in jobs])


def _check_runner(phase: str, load: bool) -> None:
    """The phase has a runner; ``load`` imports it (a dry run only looks it up: no torch)."""
    from rlhf_exp import runners

    if load or phase in runners.PLANNED or phase not in runners.RUNNERS:
        runners.get_runner(phase)  # raises before importing anything when there is no runner


def _dry_run(cfgs: list[DictConfig], overrides: list[str]) -> None:
    """A single ``dry_run=true``: the checks of the real command, then the plan (and the sbatch script).
    A refused dry run prints its plan as far as it gets, then the real command's refusal (status 2)."""
    from rlhf_exp.plan import print_plan

    try:
        plan(cfgs, dry_run=True)
        refusal = None
    except ConfigError as exc:
        refusal = exc
    try:
        print_plan(cfgs[0])  # before Hydra, so a dry run leaves no run folder behind
        if cfgs[0].launcher.name == "slurm":
            from rlhf_exp.launch.slurm import compose_sbatch_script

            print("\nsbatch script (one job; a sweep submits it as a job array):\n")
            print(compose_sbatch_script(overrides))
    except ConfigError:
        if refusal is None:
            raise  # the real command stops at its refusal first, before reading any data
    sys.stdout.flush()
    if refusal is not None:
        raise refusal


def _print_sweep_script(overrides: list[str]) -> None:
    """A sweep's dry run with launcher=slurm: the script of its job array, which hydra-submitit-launcher
    sizes from the command without its swept values (plan() refused a sweep whose jobs need otherwise)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from rlhf_exp.launch.slurm import compose_sbatch_script

    fixed = [o.input_line for o in OverridesParser.create().parse_overrides(overrides) if not o.is_sweep_override()]
    print("sbatch script of the sweep's job array (every job the same; one job shown):\n")
    print(compose_sbatch_script(fixed))


def _hydra_flags(argv: list[str]):
    from hydra._internal.utils import get_args_parser

    return get_args_parser().parse_args(argv)


def _add_overrides(argv: list[str], extra: list[str]) -> list[str]:
    """``argv`` with ``extra`` right after its overrides (Hydra's parser takes them as one run of words:
    ``model=x --cfg job`` + extra must not become ``model=x --cfg job extra``), or first when it has none."""
    if not extra:
        return argv
    overrides = _hydra_flags(argv).overrides  # a command line Hydra's parser refuses stops here, as below
    n = len(overrides)
    ends = [i + n for i in range(len(argv) - n + 1) if n and argv[i:i + n] == overrides]
    at = ends[-1] if ends else 0
    return argv[:at] + extra + argv[at:]


def run_job(cfg: DictConfig):
    """The Hydra task: runs inside the run folder Hydra created; returns the objective for sweepers."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from rlhf_exp.launch import distributed

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    run_dir = Path(hydra_cfg.runtime.output_dir)
    started = False
    try:
        validate(cfg)
        if cfg.dry_run:  # under -m; a single dry run never reaches Hydra
            from rlhf_exp.plan import print_plan

            print_plan(cfg)
            return float("nan") if multirun else None
        if cfg.get("pipeline") is not None:  # the pipeline's SLURM job: the chain runs here
            return _pipeline_job(cfg, run_dir)
        distributed.from_submitit()  # one of several SLURM tasks: torch.distributed variables from SLURM's
        resume = (run_dir / "manifest.json").exists() and resumable(cfg, run_dir)
        # one live process per run folder: the launching process (SLURM's rank 0 task) holds its lock
        lock = RunLock(run_dir).acquire() if distributed.rank() == 0 else None
        started = True  # from here on the folder is this run's
        try:
            if distributed.needs_spawn(cfg):
                distributed.spawn_workers(cfg, run_dir, resume)
                result = distributed.read_metrics(run_dir)
            else:
                result = execute(cfg, run_dir, resume)
        finally:
            if lock is not None:
                lock.release()
    except KeyboardInterrupt:
        print(f"\nrlhf_exp: interrupted; {run_dir} is marked failed (manifest.json)", file=sys.stderr)
        sys.exit(130)
    except Interrupted as exc:  # SIGTERM/SIGUSR2: checkpoint saved, manifest says "interrupted"
        GUARD.hand_over(exc, distributed.rank(), run_dir)
    except Exception as exc:
        if distributed.in_task_group():  # one of several SLURM tasks: the others must not wait for it
            distributed.abort_task(run_dir, exc, record=started)
        if started and _disk_full(exc):
            line = _disk_full_line(run_dir, exc)
            if not multirun:
                print(line, file=sys.stderr)
                sys.exit(1)
            print(line, file=sys.stderr, flush=True)
            return float("nan")
        if not multirun:
            if isinstance(exc, ConfigError):
                fail(str(exc))
            if isinstance(exc, distributed.WorkersFailed):
                print(f"rlhf_exp: error: {exc}", file=sys.stderr)
                sys.exit(1)
            raise
        return _job_failed(run_dir, exc, traceback=not isinstance(exc, (ConfigError, distributed.WorkersFailed)))
    if distributed.rank() != 0:
        return None
    print_result(cfg.phase.name, run_dir, result)
    # the sweep objective: gold score on the embedded task (higher is better), else eval loss (lower);
    # NaN (a failed trial to Optuna) when a phase has neither
    objective = result.get("gold_score", result.get("eval_loss"))
    return float("nan") if objective is None else objective


def _disk_full(exc: BaseException) -> bool:
    import errno

    seen = exc
    while seen is not None:  # the error itself, or what it was raised from (a library's wrapper)
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _disk_full_line(run_dir: Path, exc: BaseException) -> str:
    """One line for a run stopped by a full disk (or quota): where, what state it left, how to continue."""
    where = next((getattr(e, "filename", None) for e in (exc, exc.__cause__, exc.__context__)
                  if getattr(e, "filename", None)), None)
    try:
        status = json.loads((run_dir / "manifest.json").read_text()).get("status")
    except (OSError, ValueError):
        status = None
    state = ("its manifest says failed" if status == "failed" else
             "its manifest could not be updated and keeps its last good state")
    return (f"rlhf_exp: error: no space left on device{f' writing {where}' if where else ''}: the run stopped; "
            f"{state}; metrics.jsonl holds whole lines up to the last step written. Free space, then continue it "
            f"from its last checkpoint with: python -m rlhf_exp resume={run_dir}")


def _job_failed(run_dir: Path, exc: BaseException, traceback: bool) -> float:
    """A failed sweep job: say why in its log, and let the sweep's other jobs run. The job's manifest
    says "failed" with the error; the sweep summary lists it and the command exits non-zero at the end.
    NaN is the objective sweepers (Optuna) read as a failed trial."""
    if traceback:
        import traceback as tb

        tb.print_exc()
    print(f"rlhf_exp: error: sweep job {run_dir.name} failed: {exc}", file=sys.stderr, flush=True)
    from rlhf_exp.launch.slurm import fail_job_at_exit

    fail_job_at_exit()  # a SLURM job ends with status 1 after its result is saved: sacct says FAILED
    return float("nan")


def execute(cfg: DictConfig, run_dir: Path, resume: bool = False) -> dict:
    """Run the phase in this process (one of the workers when there are several): parents, runner,
    the run folder's files (continued when ``resume``). Returns the runner's metrics."""
    from rlhf_exp.launch.distributed import limit_cpu_threads
    from rlhf_exp.runners import get_runner, import_libraries
    from rlhf_exp.tracking.lineage import resolve_parents
    from rlhf_exp.tracking.run import Run

    limit_cpu_threads(cfg)  # CPU threads for this process: rlhf_exp.launch.threads (before torch runs any op)
    if cfg.hardware.accelerator == "cpu":  # DeepSpeed (imported by accelerate when installed) need not probe for GPUs
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    parents = resolve_parents(cfg, announce=False)
    runner = get_runner(cfg.phase.name)
    typed = OmegaConf.to_object(cfg)
    GUARD.install()  # from here SIGTERM/SIGUSR2 mean: checkpoint at the end of the step, then stop
    try:
        with Run(run_dir, cfg, parents, resume=resume) as run:
            with run.stage("imports"):
                import_libraries(cfg.phase.name)
            return runner(typed, run)
    finally:
        GUARD.uninstall()


PIPELINE_ROOT: Path | None = None  # a pipeline submitted to SLURM from this process: its folder


def _pipeline(cfgs: list[DictConfig], flags, argv: list[str]) -> list[str] | None:
    """``pipeline=...``: checks every phase, then runs the pipeline here (returns None), or, with launcher=slurm,
    returns the command line that submits it as one job (a one-job sweep into the pipeline's folder)."""
    from rlhf_exp import pipeline

    if flags.multirun:
        raise ConfigError("pipeline=... runs its phases itself; sweeping whole pipelines with -m is not supported yet")
    cfg = cfgs[0]
    if cfg.launcher.name not in ("local", "slurm"):
        raise ConfigError(f"pipeline=... runs on this machine (launcher=local) or in one SLURM job (launcher=slurm); "
                          f"launcher={cfg.launcher.name} is not supported for pipelines: submit the phases one by one "
                          "(python -m rlhf_exp phase=...)")
    if cfg.launcher.name == "slurm" and int(cfg.hardware.num_nodes) > 1:
        raise ConfigError(f"pipeline=... launcher=slurm runs the whole chain in one job on one node, and "
                          f"hardware={cfg.hardware.name} spans hardware.num_nodes={cfg.hardware.num_nodes}: use a "
                          "one-node preset (e.g. hardware=a100x8), or submit the phases one by one (python -m rlhf_exp "
                          "phase=... launcher=slurm)")
    pipeline.check(cfg, flags.overrides)
    slurm = cfg.launcher.name == "slurm"
    common = pipeline.phase_overrides(flags.overrides)
    run_dir = _explicit_run_dir(flags.overrides, cfg)
    check_writable(Path(str(cfg.output_root)), "output_root")
    if run_dir is not None:
        check_writable(run_dir, "hydra.run.dir")
        check_unlocked(run_dir)
    # each phase's launch checks, before the pipeline's folder exists (a dry run refuses alike); the
    # parents are the pipeline's own earlier phases
    plan([compose(pipeline.phase_args(cfg, phase, common, None)) for phase in cfg.pipeline.phases],
         dry_run=cfg.dry_run, parents=False)
    if cfg.dry_run:
        where = run_dir or Path(str(cfg.output_root)) / "pipelines" / f"<time>_{cfg.pipeline.name}"
        if slurm:  # the folder the submission would use now
            where = pipeline._folder(cfg, flags.overrides, run_dir)[0].resolve()
        print(f"pipeline folder: {where} (an unfinished run of this same pipeline under output_root is continued)")
        if slurm:
            from rlhf_exp.launch.slurm import compose_sbatch_script

            print("one SLURM job runs the whole chain, each phase with launcher=local on the job's node; its script:")
            print(compose_sbatch_script([*_hydra_pipeline_args(flags.overrides),
                                         *pipeline.submission_overrides(cfg, where)]))
        in_job = pipeline.phase_overrides(flags.overrides, in_job=slurm)  # as the phases will run
        for phase in cfg.pipeline.phases:
            print("python -m rlhf_exp " + " ".join(pipeline.phase_args(cfg, phase, in_job, None)))
        print("dry run: every phase composed and checked; nothing loaded, nothing trained"
              + (", nothing submitted." if slurm else "."))
        return None
    if not slurm:
        pipeline.run(cfg, flags.overrides, run_dir)
        return None
    global PIPELINE_ROOT
    root, continuing = pipeline._folder(cfg, flags.overrides, run_dir)
    root = root.resolve()
    check_unlocked(root)
    from rlhf_exp.launch.slurm_wait import install

    install(cfg.launcher.get("pending_timeout_min"))
    PIPELINE_ROOT = root
    print(f"rlhf_exp: pipeline {cfg.pipeline.name}: one SLURM job runs the chain in {root}"
          + (" (continuing it)" if continuing else ""), file=sys.stderr, flush=True)
    return [*_add_overrides(_hydra_pipeline_args(argv), pipeline.submission_overrides(cfg, root)), "--multirun"]


def _hydra_pipeline_args(argv: list[str]) -> list[str]:
    """The command line as Hydra's job receives it (``pipeline.<phase>.<key>`` as additions, as compose() makes
    them); hydra.run.dir and resume belong to the login node."""
    from rlhf_exp.pipeline import as_additions

    return as_additions([a for a in argv if a.split("=", 1)[0] not in ("hydra.run.dir", "resume")])


def _pipeline_job(cfg: DictConfig, run_dir: Path):
    """The pipeline's SLURM job (launcher=slurm): runs the chain here, its phases with launcher=local. A stop
    (USR2 before the time limit or on preemption; SIGTERM on requeue or scancel) reaches the running phase, which
    checkpoints; then, as a single run does, USR2 goes on to submitit's handler (requeue: the same job continues
    the pipeline in its folder) and SIGTERM ends the job without a result. A failed phase fails the job
    (sacct: FAILED) after its result is saved; the submitting command reports it."""
    from hydra.core.hydra_config import HydraConfig

    from rlhf_exp import pipeline
    from rlhf_exp.launch.slurm import fail_job_at_exit

    overrides = [str(o) for o in HydraConfig.get().overrides.task]
    root, status, received = pipeline.run(cfg, overrides, run_dir, in_job=True)
    if received is not None:
        previous = signal.getsignal(received)
        then = ("the job requeues itself and continues the pipeline there" if received == signal.SIGUSR2 else
                "a requeued job continues the pipeline there; a cancelled one with: python -m rlhf_exp resume=" + str(root))
        print(f"rlhf_exp: pipeline stopped by {signal.Signals(received).name}, its running phase checkpointed: {then}",
              file=sys.stderr, flush=True)
        if received == signal.SIGUSR2 and callable(previous):
            previous(received, None)  # submitit: resubmit this Hydra job, `scontrol requeue`, exit
        os._exit(128 + int(received))  # no result: the submitting command waits for the requeued job
    if status != "succeeded":
        fail_job_at_exit()
        return float("nan")
    return 0.0


def _exit_status_of_pipeline() -> None:
    """After the pipeline's SLURM job: its table, and status 1 unless it succeeded (a cancelled job was already
    reported in one line with the resume command)."""
    from rlhf_exp import pipeline
    from rlhf_exp.launch.slurm_wait import REPORTED

    if PIPELINE_ROOT is None:
        return
    summary = pipeline._read(PIPELINE_ROOT / "pipeline_summary.json")
    manifest = pipeline._read(PIPELINE_ROOT / pipeline.MANIFEST) or {}
    if str(PIPELINE_ROOT) in REPORTED:
        sys.exit(1)
    if summary is None or manifest.get("status") != "succeeded":
        rows = (summary or {}).get("phases", [])
        if rows:
            print(pipeline.table(rows))
        print(f"rlhf_exp: error: pipeline {manifest.get('status', 'not started')}"
              + (f" at phase {pipeline.rows_stopped(rows)}" if rows else "")
              + f" (its job's log: {PIPELINE_ROOT}/.submitit/); fix it, then continue with: "
                f"python -m rlhf_exp resume={PIPELINE_ROOT}", file=sys.stderr)
        sys.exit(1)
    print(pipeline.table(summary["phases"]))
    print(f"rlhf_exp: pipeline folder {PIPELINE_ROOT} (pipeline_summary.json)")


def print_result(phase: str, run_dir: Path, metrics: dict) -> None:
    shown = []
    if "gold_score" in metrics:
        start = metrics.get("gold_score_initial")
        shown.append(f"gold_score {start:.3f} -> {metrics['gold_score']:.3f}" if start is not None
                     else f"gold_score {metrics['gold_score']:.3f}")
    for key in ("eval_loss", "eval_perplexity", "eval_rewards_accuracies", "eval_accuracy", "gold_accuracy", "kl",
                "reward"):
        if key in metrics:
            shown.append(f"{key} {metrics[key]:.4g}")
    print(f"rlhf_exp: {phase} finished in {metrics.get('train_runtime_s', 0):.0f}s of training: "
          f"{', '.join(shown)}\nrlhf_exp: run folder {run_dir} (summary.json, metrics.jsonl, manifest.json)")


HELP_HEADER = """rlhf_exp: RLHF experiments (SFT, reward model, PPO, DPO) from composable configs.

Usage: python -m rlhf_exp [group=option ...] [key=value ...] [--cfg job] [-m]
"""

HELP_FOOTER = """Examples:
  python -m rlhf_exp                                  SFT on the embedded task (tiny model, CPU)
  python -m rlhf_exp phase=dpo                        DPO from the latest matching SFT run
  python -m rlhf_exp phase=dpo phase.beta=0.2 phase.sft_run=<run folder or run id>
  python -m rlhf_exp model=qwen2_5_7b data=ultrafeedback_binarized hardware=a100x1
  python -m rlhf_exp --cfg job                        show the composed config; load nothing
  python -m rlhf_exp dry_run=true                     compose, check, print the plan; load nothing
  python -m rlhf_exp phase=dpo --help                 this help with the DPO settings below

Each run writes outputs/runs/<run id>/: config.yaml, manifest.json, metrics.jsonl, summary.json.
Hydra's own flags: --hydra-help."""


def print_help(overrides: list[str]) -> None:
    """Our --help: one composition (Hydra's lists each group by recomposing, ~1 s)."""
    try:
        _print_help(overrides)
    except BrokenPipeError:  # `--help | head`
        sys.stderr.close()


def _print_help(overrides: list[str]) -> None:
    cfg = compose(overrides)
    print(HELP_HEADER)
    print("== Config groups ==  pick one option per group (e.g. model=tiny)\n")
    for group in config_groups():
        options = [o for o in group_options(group) if not o.startswith("base_")]
        if options:  # conf/site/ is empty until a site adds local.yaml
            print(f"{group}: {', '.join(options)}")
    folders = ", ".join(str(d) for d in config_paths.config_dirs())
    print(f"\nConfig folders, searched in this order: {folders}\nYour own presets: "
          f"{config_paths.ENV_VAR}=<folder> or --config-dir <folder> (<folder>/<group>/<option>.yaml, "
          "<folder>/sweeps/<name>.yaml)")
    print("\n== Config ==  any key below can be overridden (e.g. phase.learning_rate=1e-5)\n")
    print(OmegaConf.to_yaml(cfg))
    print(HELP_FOOTER)


def hand_sweep_name(argv: list[str]) -> None:
    """sweep=<name>: its jobs' W&B group (rlhf_exp.tracking.wandb_sink.SWEEP_ENV), read by the jobs' processes; a
    command without one clears a name left in the environment."""
    named = [a.split("=", 1)[1] for a in argv if a.startswith("sweep=")]
    os.environ.pop("RLHF_EXP_SWEEP", None)
    if named:
        os.environ["RLHF_EXP_SWEEP"] = named[-1]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    from rlhf_exp.sweep import expand_sweep

    try:
        argv = config_paths.take_config_dirs(argv)  # --config-dir DIR: into RLHF_EXP_CONFIG_DIR
        config_paths.check_config_dirs()
        hand_sweep_name(argv)
        argv = expand_sweep(argv)  # sweep=<name>: the overrides written in sweeps/<name>.yaml
    except ConfigError as exc:
        fail(str(exc))
    argv = _resume_command(argv)
    # the user's config folders, for Hydra's job as for our preflight; Hydra records it with the job's
    # Hydra overrides, so a job that composes again elsewhere (SLURM, submitit) searches them too
    argv = _add_overrides(argv, config_paths.searchpath_overrides())
    flags = _hydra_flags(argv)
    try:
        from rlhf_exp.launch.distributed import refuse_external_launcher

        refuse_external_launcher()
    except ConfigError as exc:
        fail(str(exc))
    if flags.help:
        try:
            print_help(flags.overrides)
        except ConfigError as exc:
            fail(str(exc))
        return
    if not (flags.hydra_help or flags.info or flags.shell_completion):
        try:
            if any(o.split("=", 1)[0] == "pipeline" and not o.endswith("=null") for o in flags.overrides):
                from rlhf_exp.pipeline import common_overrides

                common_overrides(flags.overrides)  # phase settings under a pipeline: say where they go
            cfgs = preflight(flags.overrides, multirun=flags.multirun, check_rules=flags.cfg is None)
            if flags.cfg is None and cfgs[0].pipeline is not None:
                argv = _pipeline(cfgs, flags, argv)  # None: it ran here (or was a dry run)
            else:
                argv = _prepare_launch(argv, flags, cfgs)  # None: a dry run, done
            if argv is None:
                return
        except ConfigError as exc:
            fail(str(exc))

    import hydra

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def _app(cfg: DictConfig):
        return run_job(cfg)

    sys.argv = [sys.argv[0], *argv]
    _scrub_hydra_logs()
    _app()
    _exit_status_of_sweep()
    _exit_status_of_pipeline()


def _prepare_launch(argv: list[str], flags, cfgs: list[DictConfig]) -> list[str] | None:
    """A single run's or a sweep's checks before Hydra starts, and the command line Hydra gets (None: a dry run,
    done here)."""
    if flags.cfg is None:
        # before Hydra writes anything (.hydra/ included): folders writable, an existing run folder this
        # run's and free; a dry run refuses alike
        if flags.multirun:
            for output_root in sorted({str(cfg.output_root) for cfg in cfgs}):
                check_writable(Path(output_root), "output_root")
        else:
            check_before_launch(cfgs[0], _explicit_run_dir(flags.overrides, cfgs[0]))
    dry_run = any(cfg.dry_run for cfg in cfgs)
    if flags.cfg is None and dry_run and not flags.multirun:
        _dry_run(cfgs, flags.overrides)
        return None
    if flags.cfg is None:  # the real command's checks, for a dry run too (it must refuse alike)
        argv = _add_overrides(argv, plan(cfgs, dry_run=dry_run, sweep=flags.overrides if flags.multirun else None))
    if flags.multirun and dry_run and cfgs[0].launcher.name != "local":
        # a dry run prints each job's plan here and submits nothing
        print(f"rlhf_exp: dry run: plans printed here; nothing is submitted to launcher={cfgs[0].launcher.name}",
              file=sys.stderr)
        if cfgs[0].launcher.name == "slurm":
            _print_sweep_script(flags.overrides)
        argv = _add_overrides([a for a in argv if not a.startswith("launcher=")], ["launcher=local"])
    if flags.multirun and all(cfg.dry_run for cfg in cfgs):
        if any(a.startswith("hydra/sweeper=optuna") for a in argv):
            print("rlhf_exp: dry run: an Optuna search picks its trials from results as they come, so there is "
                  "no plan to print; both ends of every interval were composed and checked.")
            return None
        # Hydra makes a folder per job even for a dry run: let it make them where they vanish
        dry_dir = tempfile.mkdtemp(prefix="rlhf_exp_dry_run_")
        atexit.register(shutil.rmtree, dry_dir, ignore_errors=True)
        argv = _add_overrides(argv, [f"hydra.sweep.dir={dry_dir}"])
    if flags.cfg is None and not flags.multirun and cfgs[0].launcher.name != "local":
        # Hydra hands jobs to a launcher only under --multirun: a single job is a one-job sweep
        print(f"rlhf_exp: launcher={cfgs[0].launcher.name} submits through Hydra's multirun: this run is a "
              f"one-job sweep under {cfgs[0].output_root}/sweeps/", file=sys.stderr)
        argv.append("--multirun")
    if flags.cfg is None and not dry_run and cfgs[0].launcher.name == "parallel":
        from rlhf_exp.config.schema import _parallel_jobs
        from rlhf_exp.launch.threads import share_cpus

        jobs = _parallel_jobs(cfgs[0].launcher.parallel_jobs)
        share = share_cpus(jobs)
        print(f"rlhf_exp: launcher=parallel: {jobs} jobs at once on this machine, {share} CPU(s) each", file=sys.stderr)
    if flags.cfg is None and not dry_run and cfgs[0].launcher.name == "slurm":
        from rlhf_exp.launch.slurm_wait import install

        # sbatch refusals and hopeless pending reasons in one line (exit 2), scancel with its resume command
        install(cfgs[0].launcher.get("pending_timeout_min"))
        run_dirs = [o.split("=", 1)[1] for o in flags.overrides if o.startswith("hydra.run.dir=")]
        if run_dirs and not flags.multirun:  # resume=<run folder>: the one-job sweep runs in that folder
            run_dir = Path(run_dirs[-1])
            argv = _add_overrides(argv, [f"hydra.sweep.dir={run_dir.parent}", f"hydra.sweep.subdir={run_dir.name}"])
    return argv


def _explicit_run_dir(overrides: list[str], cfg: DictConfig) -> Path | None:
    """The folder a single run was pointed at (``hydra.run.dir=...``, also what ``resume=<folder>`` adds), resolved
    against the config (``${output_root}``); None for the default, a new time-stamped folder."""
    given = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == "hydra.run.dir"]
    if not given:
        return None
    value = given[-1]
    if "${" in value:
        try:
            probe = OmegaConf.merge(cfg, {"_run_dir_probe": value})
            value = str(OmegaConf.select(probe, "_run_dir_probe", throw_on_resolution_failure=True))
        except Exception:  # Hydra's own resolvers (${now:...}) exist only inside its job: a new folder
            return None
    return Path(value).expanduser().resolve()


def _resume_command(argv: list[str]) -> list[str]:
    """``resume=<run folder>``: that run's own command (its .hydra/overrides.yaml) into its own folder."""
    given = [a for a in argv if a.startswith("resume=") and a.split("=", 1)[1] not in ("auto", "never")]
    if not given:
        return argv
    folder = Path(given[-1].split("=", 1)[1]).expanduser().resolve()
    pipeline_manifest = folder / "pipeline.json"
    if pipeline_manifest.is_file():  # a pipeline's folder: its command, continued there
        try:
            overrides = [str(o) for o in json.loads(pipeline_manifest.read_text())["overrides"]]
        except (OSError, ValueError, KeyError) as exc:
            fail(f"resume={folder}: its pipeline.json cannot be read ({exc})")
        print(f"rlhf_exp: resuming pipeline {folder.name}: python -m rlhf_exp {' '.join(overrides)}", file=sys.stderr)
        return [*overrides, f"hydra.run.dir={folder}"]
    saved = folder / ".hydra" / "overrides.yaml"
    if not (folder / "manifest.json").is_file() or not saved.is_file():
        fail(f"resume={folder}: not a run folder (it needs manifest.json and .hydra/overrides.yaml)")
    overrides = [str(o) for o in OmegaConf.load(saved)]
    print(f"rlhf_exp: resuming {folder.name}: python -m rlhf_exp {' '.join(overrides)}", file=sys.stderr)
    return [*overrides, f"hydra.run.dir={folder}"]


def _scrub_hydra_logs() -> None:
    """Hydra logs each sweep job's overrides: a secret in a value is masked there too."""
    import logging

    from rlhf_exp.tracking.secrets import scrub, secret_values

    if not secret_values():
        return

    class _Scrub(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.msg, record.args = scrub(record.getMessage()), None
            return True

    for handler in logging.getLogger().handlers + logging.getLogger("hydra").handlers:
        handler.addFilter(_Scrub())
    logging.getLogger("hydra").addFilter(_Scrub())
    logging.getLogger("hydra._internal.core_plugins.basic_launcher").addFilter(_Scrub())
    logging.getLogger("hydra_plugins.hydra_submitit_launcher.submitit_launcher").addFilter(_Scrub())


def _exit_status_of_sweep() -> None:
    """A sweep whose jobs failed ends with status 1 and names them (its other jobs ran to the end)."""
    from rlhf_exp import sweep

    summary = sweep.LAST_SUMMARY
    if not summary:
        return
    failed = [job for job in summary["jobs"] if job["status"] != "succeeded"]
    from rlhf_exp.launch.slurm_wait import REPORTED

    if failed and all(job["path"] in REPORTED for job in failed):
        sys.exit(1)  # cancelled SLURM jobs, each already reported in one line with its resume command
    if failed:
        lines = [f"  {job['job']}: {job['status']}: {job.get('error') or 'see its log under .submitit/ or above'}"
                 for job in failed]
        print(f"rlhf_exp: error: {len(failed)} of {len(summary['jobs'])} sweep jobs failed:\n" + "\n".join(lines),
              file=sys.stderr)
        sys.exit(1)
