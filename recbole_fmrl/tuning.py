"""Hyperparameter tuning the RecBole way, for the plugin's models and RecBole's: hyperopt or Ray Tune.

    python -m recbole_fmrl.tuning --tool=hyperopt --model=fMRLRec --dataset=mm-sample \\
        --params_file=properties/hyper/fMRLRec.hyper [--config_files="a.yaml"] [--output_file=F] \\
        [--algo=exhaustive|random|bayes] [--max_evals=N] [--tune_size=64] [--key=value ...]
    python -m recbole_fmrl.tuning --tool=ray ... [--cpus_per_trial=1] [--gpus_per_trial=0] [--ray_address=HOST:PORT]

The flags and the params-file syntax are RecBole's ``run_hyper.py``'s: one ``name type values`` line per
parameter, with ``choice [..]``, ``uniform low,high``, ``quniform low,high,q`` or ``loguniform low,high``
(natural-log bounds, as hyperopt's). The file is read as data (``ast.literal_eval``), never ``eval``ed.
hyperopt runs through RecBole's ``HyperTuning`` with this plugin's objective (its Config, models, trainers);
Ray Tune runs each trial in a worker that imports the plugin, and reports through Ray's session API.
``--tune_size`` selects on that nesting size's sub-model (it becomes each trial's ``eval_size``).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import sys
import time
from pathlib import Path

from recbole_fmrl.cli import cli_entry, config_from_cli, parser
from recbole_fmrl.errors import ConfigError
from recbole_fmrl.fileio import atomic_write_bytes

TOOLS = ("hyperopt", "ray")
ALGOS = ("exhaustive", "random", "bayes")
TYPES = {"choice": 1, "uniform": 2, "quniform": 3, "loguniform": 2}


class ParamsFileError(ConfigError):
    """A params file line is not ``name type values`` of RecBole's syntax, or names no config key."""


def read_params_file(path: str | Path) -> dict[str, tuple[str, list]]:
    """``{name: (type, values)}`` from a RecBole params file, as data; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ParamsFileError(
            f"params file {path} does not exist: give --params_file=<file> (see properties/hyper/)."
        )
    params: dict[str, tuple[str, list]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        where = f"{path}:{number}"
        parts = text.split(maxsplit=2)
        if len(parts) < 3:
            raise ParamsFileError(
                f"{where}: '{text}' is not 'name type values' (e.g. 'learning_rate choice [1e-3,1e-4]')."
            )
        name, kind, raw = parts[0], parts[1], "".join(parts[2].split())
        if kind not in TYPES:
            raise ParamsFileError(f"{where}: type '{kind}' is not one of {list(TYPES)}.")
        if kind == "choice":
            try:
                values = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                raise ParamsFileError(
                    f"{where}: choice values {raw!r} are not a literal list, e.g. [64,128]."
                ) from None
            if not isinstance(values, (list, tuple)) or not values:
                raise ParamsFileError(f"{where}: choice values {raw!r} must be a non-empty list.")
            values = list(values)
        else:
            try:
                values = [float(v) for v in raw.split(",")]
            except ValueError:
                raise ParamsFileError(f"{where}: {kind} bounds {raw!r} are not numbers.") from None
            if len(values) != TYPES[kind] or values[0] >= values[1]:
                raise ParamsFileError(
                    f"{where}: {kind} needs {TYPES[kind]} numbers 'low,high{',q' if kind == 'quniform' else ''}' "
                    f"with low < high; got {raw!r}."
                )
        if name in params:
            raise ParamsFileError(f"{where}: '{name}' is given twice.")
        params[name] = (kind, values)
    if not params:
        raise ParamsFileError(f"params file {path} has no parameter lines ('name type values').")
    return params


def check_keys(params: dict, model: str, dataset: str, config_files: list[str], fixed: dict) -> bool:
    """Every tuned name must be a config key this model's Config knows (a typo would tune nothing).

    Returns ``valid_metric_bigger`` of that Config."""
    from recbole_fmrl.config import Config

    config = Config(model, dataset, config_files or None, {**fixed, "state": "WARNING"}, cli_args=[])
    unknown = [name for name in params if name not in config.final_config_dict]
    if unknown:
        raise ParamsFileError(
            f"{unknown} {'is not a config key' if len(unknown) == 1 else 'are not config keys'} of {model} on "
            f"{dataset}: check the spelling against properties/model/{model}.yaml or RecBole's docs."
        )
    return bool(config["valid_metric_bigger"])


def hyperopt_space(params: dict) -> dict:
    from hyperopt import hp

    space = {}
    for name, (kind, values) in params.items():
        if kind == "choice":
            space[name] = hp.choice(name, values)
        elif kind == "uniform":
            space[name] = hp.uniform(name, *values)
        elif kind == "quniform":
            space[name] = hp.quniform(name, *values)
        else:
            space[name] = hp.loguniform(name, *values)
    return space


def ray_space(params: dict, exhaustive: bool) -> dict:
    """Ray's space; ``loguniform`` bounds are natural logs (hyperopt's meaning), so exp() them for Ray."""
    from ray import tune

    space = {}
    for name, (kind, values) in params.items():
        if kind == "choice":
            space[name] = tune.grid_search(values) if exhaustive else tune.choice(values)
        elif kind == "uniform":
            space[name] = tune.uniform(*values)
        elif kind == "quniform":
            space[name] = tune.quniform(*values)
        else:
            space[name] = tune.loguniform(math.exp(values[0]), math.exp(values[1]))
    return space


def run_trial(model: str, dataset: str, config_files: list[str], config: dict) -> dict:
    """One trial through ``run_recbole_fmrl``: RecBole's result dict (+ per-size metrics, seconds)."""
    import recbole_fmrl  # noqa: F401  (compat fixes, also in a Ray worker)
    from recbole_fmrl.benchmark import plain
    from recbole_fmrl.quick_start import run_recbole_fmrl

    start = time.perf_counter()
    result = run_recbole_fmrl(model, dataset, config_files or None, config, saved=True, cli_args=[])
    result["seconds"] = round(time.perf_counter() - start, 1)
    return plain(result)


def _trial_record(params: dict, result: dict) -> dict:
    keep = (
        "best_valid_score",
        "best_valid_result",
        "test_result",
        "test_result_by_size",
        "valid_result_by_size",
        "epochs",
        "seconds",
    )
    return {"params": plain_params(params), **{k: result.get(k) for k in keep if k in result}}


def plain_params(params: dict) -> dict:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in params.items()}


def _progress(n: int, record: dict) -> str:
    return (
        f"trial {n}: {json.dumps(record['params'])}  valid={record['best_valid_score']:.4f}  "
        f"({record.get('seconds', 0):.1f} s)"
    )


def tune_hyperopt(args, params: dict, fixed: dict, files: list[str], bigger: bool = True) -> list[dict]:
    from recbole.trainer import HyperTuning

    trials: list[dict] = []

    def objective(config_dict, _fixed_files):
        result = run_trial(args.model, args.dataset, files, {**fixed, **config_dict})
        trials.append(_trial_record(config_dict, result))
        print(_progress(len(trials), trials[-1]), flush=True)
        return result

    tuner = HyperTuning(
        objective,
        space=hyperopt_space(params),
        algo=args.algo,
        max_evals=args.max_evals,
        early_stop=args.early_stop,
    )
    tuner._print_result = lambda _result: None  # one progress line per trial instead of RecBole's block
    tuner.run()
    return trials


def worker_setup() -> None:
    """Ray's worker setup hook: the compat fixes, before the worker imports ray.tune."""
    from recbole_fmrl import compat

    compat.apply()


def _ray_trainable(config: dict, model: str, dataset: str, files: list[str], fixed: dict) -> None:
    """A Ray trial: imports the plugin in the worker (compat fixes applied there) and reports via session."""
    from ray.air import session

    # Concurrent trials must not share a checkpoint name (RecBole's is <model>-<time to the second>.pth).
    folder = Path(fixed.get("checkpoint_dir") or "saved") / session.get_trial_id()
    result = run_trial(model, dataset, files, {**fixed, "checkpoint_dir": str(folder), **config})
    record = _trial_record(config, result)
    session.report({"valid_score": float(result["best_valid_score"]), "record": json.dumps(record)})


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """A dead ``host:port`` fails in seconds with one line, instead of Ray's minutes of retries."""
    import socket

    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if address == "auto" or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise ConfigError(
            f"cannot reach the Ray cluster at --ray_address={address}: {err}. Start it "
            "(`ray start --head`) or leave --ray_address out for a local one."
        ) from None


def tune_ray(args, params: dict, fixed: dict, files: list[str], bigger: bool = True) -> list[dict]:
    import ray
    from ray import air, tune

    from recbole_fmrl import tuning  # by its import name, so workers import it instead of unpickling __main__

    # Workers import ray.tune (numpy-2-broken in ray 2.6) before any trial code: the hook applies the compat
    # fixes first in every worker process.
    runtime_env = {"worker_process_setup_hook": tuning.worker_setup}
    if args.ray_address:
        check_ray_address(args.ray_address)
    try:
        if args.ray_address:
            ray.init(address=args.ray_address, runtime_env=runtime_env, log_to_driver=False)
        else:
            ray.init(runtime_env=runtime_env, include_dashboard=False, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ConfigError(
            f"cannot reach the Ray cluster at --ray_address={args.ray_address}: {err}. Start it "
            "(`ray start --head`) or leave --ray_address out for a local one."
        ) from None
    exhaustive = args.algo == "exhaustive"
    trainable = tune.with_parameters(
        tuning._ray_trainable, model=args.model, dataset=args.dataset, files=files, fixed=fixed
    )
    resources = {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial}
    tuner = tune.Tuner(
        tune.with_resources(trainable, resources),
        param_space=ray_space(params, exhaustive),
        tune_config=tune.TuneConfig(
            metric="valid_score",
            mode="max" if bigger else "min",
            num_samples=1 if exhaustive else args.max_evals,
            chdir_to_trial_dir=False,
        ),
        run_config=air.RunConfig(
            name=f"{args.model}-{args.dataset}",
            storage_path=str(Path(args.ray_dir).resolve()),
            verbose=0,
        ),
    )
    try:
        grid = tuner.fit()
    finally:
        if not args.ray_address:
            ray.shutdown()
    trials = []
    for result in grid:
        if result.error is not None:
            print(f"trial failed: {str(result.error).splitlines()[0]}", flush=True)
            continue
        trials.append(json.loads(result.metrics["record"]))
        print(_progress(len(trials), trials[-1]), flush=True)
    return trials


def _cli() -> argparse.ArgumentParser:
    cli = parser("python -m recbole_fmrl.tuning", __doc__.splitlines()[0])
    cli.add_argument("--tool", default="hyperopt", help="hyperopt | ray")
    cli.add_argument("--model", "-m", default="fMRLRec")
    cli.add_argument("--dataset", "-d", default="mm-sample")
    cli.add_argument("--params_file", required=True, help="RecBole params file (see properties/hyper/)")
    cli.add_argument("--config_files", default=None, help="space-separated fixed config files")
    cli.add_argument("--output_file", default=None, help="result JSON (default hyper_<model>_<dataset>.json)")
    cli.add_argument("--algo", default="exhaustive", help="exhaustive (grid) | random | bayes")
    cli.add_argument("--max_evals", type=int, default=100, help="trials for random/bayes")
    cli.add_argument(
        "--early_stop", type=int, default=10, help="hyperopt: stop after N trials without progress"
    )
    cli.add_argument("--tune_size", type=int, default=None, help="select on this nesting size (eval_size)")
    cli.add_argument("--cpus_per_trial", type=float, default=1)
    cli.add_argument("--gpus_per_trial", type=float, default=0)
    cli.add_argument("--ray_address", default=None, help="an existing Ray cluster (default: a local one)")
    cli.add_argument("--ray_dir", default="ray_results", help="where Ray keeps its trial folders")
    return cli


def _main(argv: list[str]) -> int:
    args, fixed = config_from_cli(argv, _cli())
    if args.tool not in TOOLS:
        raise ConfigError(f"--tool={args.tool!r} is not one of {list(TOOLS)}.")
    if args.algo not in ALGOS:
        raise ConfigError(f"--algo={args.algo!r} is not one of {list(ALGOS)}.")
    if args.max_evals < 1:
        raise ConfigError(f"--max_evals={args.max_evals} must be >= 1.")
    if args.cpus_per_trial <= 0 or args.gpus_per_trial < 0:
        raise ConfigError("--cpus_per_trial must be > 0 and --gpus_per_trial >= 0.")
    files = [str(Path(f).resolve()) for f in (args.config_files.split() if args.config_files else [])]
    if args.tune_size is not None:
        fixed["eval_size"] = args.tune_size
    params = read_params_file(args.params_file)
    bigger = check_keys(params, args.model, args.dataset, files, fixed)  # also checks --tune_size, fixed keys
    output = Path(args.output_file or f"hyper_{args.model}_{args.dataset}.json")

    start = time.perf_counter()
    tool = tune_hyperopt if args.tool == "hyperopt" else tune_ray
    trials = tool(args, params, fixed, files, bigger)
    if not trials:
        raise ConfigError("no trial finished: see the log/ folder (or Ray's trial logs) for the first error.")
    sign = 1 if bigger else -1
    best = max(trials, key=lambda t: sign * t["best_valid_score"])
    report = {
        "tool": args.tool,
        "model": args.model,
        "dataset": args.dataset,
        "tune_size": args.tune_size,
        "params_file": str(args.params_file),
        "best_params": best["params"],
        "best_valid_score": best["best_valid_score"],
        "best_test_result": best.get("test_result"),
        "seconds": round(time.perf_counter() - start, 1),
        "trials": trials,
    }
    atomic_write_bytes(output, (json.dumps(report, indent=2) + "\n").encode())
    print(_table(trials))
    print(f"best: {json.dumps(best['params'])}  valid={best['best_valid_score']:.4f}  -> {output}")
    return 0


def _table(trials: list[dict]) -> str:
    names = list(dict.fromkeys(k for t in trials for k in t["params"]))
    header = [*names, "valid", "test (first metrics)"]
    lines = [" | ".join(header)]
    for t in trials:
        test = "  ".join(f"{k}={float(v):.4f}" for k, v in list((t.get("test_result") or {}).items())[:2])
        lines.append(
            " | ".join([*(str(t["params"].get(n)) for n in names), f"{t['best_valid_score']:.4f}", test])
        )
    return "\n".join(lines)


main = cli_entry(_main)

if __name__ == "__main__":
    sys.exit(main())
