"""Speed and memory benchmarks (``make bench``); results go to ``benchmarks/runs/<UTC time>/<name>.json``.

Each benchmark runs in its own process, so its peak RSS is its own. Dataset benchmarks use Amazon Beauty
from ``--data_path`` (default ``../shared/datasets``) and fall back to the shipped mm-sample when absent.

    python -m benchmarks.run [--only masked_linear,train_modes,eval_sizes] [--data_path=...] [--steps=20] [--out=DIR]

``benchmarks/runs/`` is git-ignored: runs are outputs, not source.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RUNS = Path(__file__).resolve().parent / "runs"
BENCHMARKS = ("masked_linear", "train_modes", "eval_sizes")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _machine() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def _median_time(fn, repeats: int) -> float:
    import statistics

    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_masked_linear(args) -> dict:
    """Forward+backward step of the masked MatryoshkaLinear vs a loop of K Linear layers, D=1024, K=8."""
    import torch
    from torch import nn

    from recbole_fmrl.model.layers.matryoshka import MatryoshkaLinear

    torch.manual_seed(0)
    sizes = [8, 16, 32, 64, 128, 256, 512, 1024]
    masked = MatryoshkaLinear(sizes)
    starts = [0, *sizes[:-1]]
    loop = nn.ModuleList(nn.Linear(m, e - s) for s, e, m in zip(starts, sizes, sizes, strict=True))
    x = torch.randn(args.tokens, sizes[-1], requires_grad=True)

    def step_masked():
        masked(x).sum().backward()

    def step_loop():
        torch.cat([layer(x[:, :m]) for layer, m in zip(loop, sizes, strict=True)], dim=-1).sum().backward()

    t_masked, t_loop = _median_time(step_masked, args.repeats), _median_time(step_loop, args.repeats)
    return {
        "tokens": args.tokens,
        "D": 1024,
        "K": 8,
        "masked_ms": 1000 * t_masked,
        "loop_ms": 1000 * t_loop,
        "loop_over_masked": t_loop / t_masked,
    }


def _beauty_or_sample(args) -> tuple[str, dict]:
    if (Path(args.data_path) / "amazon-beauty" / "amazon-beauty.inter").is_file():
        return "amazon-beauty", {"data_path": args.data_path}
    return "mm-sample", {}


def _build(dataset: str, extra: dict):
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_seed

    from recbole_fmrl.config import Config
    from recbole_fmrl.utils import get_model, get_trainer

    profile = str(Path(__file__).resolve().parents[1] / "properties" / "profiles" / "fMRLRec-cpu.yaml")
    config = Config(
        "fMRLRec",
        dataset,
        config_file_list=[profile],
        config_dict={"state": "WARNING", "show_progress": False, **extra},
        cli_args=[],
    )
    init_seed(config["seed"], True)
    data = create_dataset(config)
    train, valid, test = data_preparation(config, data)
    model = get_model("fMRLRec")(config, train._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], "fMRLRec")(config, model)
    return config, model, trainer, train, test


def bench_train_modes(args) -> dict:
    """fMRLRec training time per epoch, RecBole's prefix samples vs all_positions (timed steps x batches)."""
    import torch

    from recbole_fmrl.data.training_windows import last_windows

    dataset, extra = _beauty_or_sample(args)
    out = {"dataset": dataset}
    for mode in ("all_positions", "prefix"):
        config, model, trainer, train, _ = _build(dataset, {**extra, "train_mode": mode})
        loader = last_windows(train) if mode == "all_positions" else train
        optimizer = torch.optim.AdamW(model.parameters(), lr=config["learning_rate"])
        model.train()
        times = []
        for i, batch in enumerate(loader):
            if i > args.steps:
                break
            start = time.perf_counter()
            optimizer.zero_grad()
            model.calculate_loss(batch.to(config["device"])).backward()
            optimizer.step()
            if i > 0:  # the first step warms up
                times.append(time.perf_counter() - start)
        per_step = sum(times) / len(times)
        out[mode] = {
            "batches_per_epoch": len(loader),
            "samples_per_epoch": len(loader._dataset),
            "step_s": per_step,
            "epoch_s_estimate": per_step * len(loader),
            "timed_steps": len(times),
        }
    out["all_positions_over_prefix_epoch_time"] = (
        out["all_positions"]["epoch_s_estimate"] / out["prefix"]["epoch_s_estimate"]
    )
    return out


def bench_eval_sizes(args) -> dict:
    """All-sizes evaluation (one pass) vs one-size evaluation, and scoring latency per size."""
    from recbole_fmrl.evaluation import evaluate_all_sizes, size_costs

    dataset, extra = _beauty_or_sample(args)
    config, model, trainer, train, test = _build(dataset, extra)
    trainer.eval_collector.data_collect(train)
    one = _median_time(lambda: trainer.evaluate(test, load_best_model=False), args.repeats)
    every = _median_time(lambda: evaluate_all_sizes(trainer, test), args.repeats)
    costs = size_costs(model, test, config["device"])
    return {
        "dataset": dataset,
        "sizes": model.mrl_sizes,
        "one_size_eval_s": one,
        "all_sizes_eval_s": every,
        "all_over_one": every / one,
        "per_size": costs,
    }


def run_one(name: str, args) -> dict:
    result = globals()[f"bench_{name}"](args)
    result["peak_rss_mb"] = _peak_rss_mb()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(BENCHMARKS))
    parser.add_argument(
        "--data_path", default=str(Path(__file__).resolve().parents[2] / "shared" / "datasets")
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--out", default=None, help="output folder (default: benchmarks/runs/<UTC time>)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import recbole_fmrl  # noqa: F401  (compat fixes)

    if args.child:
        print(json.dumps(run_one(args.child, args)))
        return 0
    out = Path(args.out) if args.out else RUNS / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out.mkdir(parents=True, exist_ok=True)
    for name in args.only.split(","):
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.run",
            f"--child={name}",
            f"--data_path={args.data_path}",
            f"--steps={args.steps}",
            f"--repeats={args.repeats}",
            f"--tokens={args.tokens}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        if proc.returncode != 0:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            return 1
        result = {
            "benchmark": name,
            "machine": _machine(),
            **json.loads(proc.stdout.strip().splitlines()[-1]),
        }
        (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"{name}: {json.dumps({k: v for k, v in result.items() if k not in ('machine', 'per_size')})}")
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
