"""Speed and memory benchmarks (``make bench``); results go to ``benchmarks/runs/<UTC time>/<name>.json``.

Each benchmark runs in its own process, so its peak RSS is its own. Dataset benchmarks use Amazon Beauty
from ``--data_path`` (default ``../shared/datasets``) and fall back to the shipped mm-sample when absent.

    python -m benchmarks.run [--only nested_loss,loss_alone,loss_memory,train_modes,eval_sizes,masked_linear,
        narrow_grads,compiled_softmax]
        [--data_path=...] [--steps=20] [--out=DIR] [--official_code=DIR] [--compare_code=DIR]

- nested_loss: the paper's D=1024 training step (1 LRU block, 32 x 50 positions, 12,101 items, 1024-d text +
  1024-d image features, 8 sizes) with the fused loss, with the fused loss without its wide blocks' forward
  in item tiles (``ITEM_TILE = 0``), with the reference loss (K logit matrices through autograd), and with a
  stand-in loss that costs only the three logit GEMMs (the GEMM floor of the same step: no other pass over a
  [rows, items] matrix), timed with the scores GEMM in both output layouts, [rows, items] and [items, rows],
  the faster being the floor; with ``--official_code=<checkout of github.com/yueqirex/fMRLRec>``, also the
  official model code's step (its LRUModel, embedding path and loss); interleaved, medians, and the median
  over rounds of the side-by-side ratios. With ``--compare_code=<another checkout of this repo>`` (for
  example ``git worktree add /tmp/old <commit>``), also the step with that checkout's fused loss, paired
  with ours in the same run.
- loss_alone: the fused loss alone (no encoder) at the D=1024 step's shape and the CPU profile's, as it is,
  without its leading blocks' GEMMs in row sub-chunks (``SUB_COLUMNS = 0``: every block's GEMM on whole
  chunks) and without its wide blocks' forward in item tiles (``ITEM_TILE``), beside the GEMM floor loss
  alone (and ``--compare_code``'s fused loss); interleaved in one process, medians and paired ratios.
- narrow_grads: the two gradient products of one narrow block of the fused loss at the D=1024 step's chunk
  shape, in both orientations (the wide dimension last, or the narrow one first, as the loss takes them for
  blocks under ``NARROW_COLUMNS``), interleaved, medians.
- compiled_softmax: the fused loss's per-size softmax (ATen's, into a kept buffer, as the loss takes it)
  beside torch.compile's (inductor) into a buffer of the same shape, at the D=1024 step's chunk shape and at
  the leading blocks' ``SUB_ROWS`` rows: whether a generated kernel beats ATen's on those passes;
  interleaved, medians and paired ratios (the first compiled call is reported, not timed in; without a C++
  compiler for inductor the result says so and the other benchmarks go on).
- loss_memory: peak RSS of a training step on a 100,000-item synthetic catalogue at D=256, fused vs
  reference, each in its own process, beside the model + gradients + optimiser state + loss scratch.

``benchmarks/runs/`` is git-ignored: runs are outputs, not source.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RUNS = Path(__file__).resolve().parent / "runs"
BENCHMARKS = (
    "nested_loss",
    "loss_alone",
    "loss_memory",
    "train_modes",
    "eval_sizes",
    "masked_linear",
    "narrow_grads",
    "compiled_softmax",
)


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


def _interleaved_times(steps: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds of each step, timed in turn round after round (after one warm-up call each), so that drifts
    in machine speed hit every step alike."""
    times = {name: [] for name in steps}
    for step in steps.values():
        step()
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def _interleaved_medians(steps: dict, rounds: int) -> dict[str, float]:
    import statistics

    return {name: statistics.median(t) for name, t in _interleaved_times(steps, rounds).items()}


def _paired_ratio(times: dict[str, list[float]], over: str, under: str) -> float:
    """Median over rounds of one step's time over another's in the same round: the side-by-side ratio, less
    sensitive than a ratio of medians to the machine speeding up or slowing down between rounds."""
    import statistics

    return statistics.median(a / b for a, b in zip(times[over], times[under], strict=True))


def _narrow_grad_steps(h, width: int) -> dict:
    import torch

    q_cols, e_cols = torch.randn(h.size(0), width), torch.randn(h.size(1), width)
    q_rows, e_rows = q_cols.T.contiguous(), e_cols.T.contiguous()
    acc, acc_t = torch.zeros(h.size(1), width), torch.zeros(width, h.size(1))
    return {
        "d_query_wide_last": lambda: h @ e_cols,
        "d_query_narrow_first": lambda: torch.mm(e_rows, h.T),
        "d_items_wide_last": lambda: acc.addmm_(h.T, q_cols),
        "d_items_narrow_first": lambda: acc_t.addmm_(q_rows, h),
    }


def bench_narrow_grads(args) -> dict:
    """d-query (H E_b) and d-items (H^T Q_b) of one block of 8, 16 or 32 columns, as [rows, items] x
    [items, w] and [items, rows] x [rows, w] or narrow side first ([w, items] x [items, rows] and
    [w, rows] x [rows, items]), at the chunk the fused loss picks for the D=1024 step (12,101 items, 8 sizes)."""
    import torch

    from recbole_fmrl.model.layers.nested_loss import auto_chunk_size

    torch.manual_seed(0)
    n_items = 12_101
    rows = auto_chunk_size(n_items, 8)
    h = torch.randn(rows, n_items)
    out = {"rows": rows, "items": n_items, "ms": {}}
    for width in (8, 16, 32):
        med = _interleaved_medians(_narrow_grad_steps(h, width), max(5, args.repeats))
        out["ms"][width] = {name: 1000 * t for name, t in med.items()}
        out[f"w{width}_d_query_wide_over_narrow"] = med["d_query_wide_last"] / med["d_query_narrow_first"]
        out[f"w{width}_d_items_wide_over_narrow"] = med["d_items_wide_last"] / med["d_items_narrow_first"]
    return out


def _softmax_into(scores, out) -> None:
    out.copy_(scores.softmax(1))


def _softmax_steps(rows: int, n_items: int) -> tuple[dict, float]:
    """ATen's softmax as the fused loss takes it (``torch._softmax`` into a kept buffer) and inductor's
    into another, on the same scores; returns the steps and the seconds the first compiled call took."""
    import torch

    scores = torch.randn(rows, n_items)
    aten_out, compiled_out = torch.empty_like(scores), torch.empty_like(scores)
    compiled = torch.compile(_softmax_into, dynamic=False)
    steps = {
        "aten_into_buffer": lambda: torch._softmax(scores, 1, False, out=aten_out),
        "inductor_into_buffer": lambda: compiled(scores, compiled_out),
    }
    start = time.perf_counter()
    steps["inductor_into_buffer"]()
    compile_s = time.perf_counter() - start
    steps["aten_into_buffer"]()
    torch.testing.assert_close(compiled_out, aten_out)
    return steps, compile_s


def bench_compiled_softmax(args) -> dict:
    """One size's softmax over [rows, items] scores, at the chunk the fused loss picks for the D=1024 step
    (12,101 items, 8 sizes) and at ``SUB_ROWS`` rows (the leading blocks' forward, in cache)."""
    import statistics

    import torch

    from recbole_fmrl.model.layers.nested_loss import SUB_ROWS, auto_chunk_size

    torch.manual_seed(0)
    n_items = 12_101
    out = {"items": n_items, "threads": torch.get_num_threads(), "ms": {}, "compile_s": {}, "paired": {}}
    for rows in (auto_chunk_size(n_items, 8), SUB_ROWS):
        try:
            steps, out["compile_s"][rows] = _softmax_steps(rows, n_items)
        except AssertionError:
            raise
        except Exception as err:  # inductor's CPU kernels need a C++ compiler; the other benchmarks go on
            out["unavailable"] = (
                f"torch.compile failed ({type(err).__name__}: {err}); inductor's CPU kernels need a C++ compiler"
            )
            return out
        times = _interleaved_times(steps, max(10, 10 * args.repeats))
        out["ms"][rows] = {name: 1000 * statistics.median(t) for name, t in times.items()}
        out["paired"][rows] = _paired_ratio(times, "inductor_into_buffer", "aten_into_buffer")
    return out


@functools.lru_cache(maxsize=1)
def _floor_ones(rows: int, items: int, dtype):
    """The GEMM floor's G, built once per shape (in the benchmark's untimed warm-up call) and kept."""
    import torch

    return torch.ones(rows, items, dtype=dtype)


def _gemm_floor_loss(query, items, targets, sizes, weights, chunk_size=None, items_major=False):
    """A loss costing only the logit GEMMs: forward Q E^T, backward G E and G^T Q (G = ones).

    Nothing else passes over a [rows, items] matrix: the loss value is a constant (not a sum over the
    logits), and G comes from ``_floor_ones``, not filled in the timed step. ``items_major`` takes the
    forward product as E Q^T, the same GEMM with an [items, rows] output, which MKL can run at a
    different speed; the benchmark times both and takes the faster as the floor.
    """
    import torch

    ones = _floor_ones(query.size(0), items.size(0), query.dtype)

    class LinearLogits(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, e):
            ctx.save_for_backward(q, e)
            torch.mm(e, q.T) if items_major else torch.mm(q, e.T)
            return q.new_zeros(())

        @staticmethod
        def backward(ctx, grad):
            q, e = ctx.saved_tensors
            g = ones if bool(grad == 1) else ones * grad
            return g @ e, g.T @ q

    return LinearLogits.apply(query, items)


def _compared_loss(code: str | None):
    """The fused loss of another checkout of this repo (its ``nested_loss.py``, loaded beside ours), to time
    two versions in one run; None without ``--compare_code``."""
    import importlib.util

    if not code:
        return None
    path = Path(code) / "recbole_fmrl" / "model" / "layers" / "nested_loss.py"
    spec = importlib.util.spec_from_file_location("compared_nested_loss", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.nested_cross_entropy


def _with_constants(loss_fn, **constants):
    """``loss_fn`` with module constants of ``nested_loss`` set for each call and restored after it (the fused
    loss does all its work in the forward call)."""
    from recbole_fmrl.model.layers import nested_loss

    def call(*args, **kwargs):
        defaults = {name: getattr(nested_loss, name) for name in constants}
        try:
            for name, value in constants.items():
                setattr(nested_loss, name, value)
            return loss_fn(*args, **kwargs)
        finally:
            for name, value in defaults.items():
                setattr(nested_loss, name, value)

    return call


def _paper_step(loss_fn, n_items=12_101, batch=32, length=50, dim=1024, feature_dim=1024, seed=0):
    """One fMRLRec training step (item tower + LRU encoder + nested CE) on synthetic data, given the loss."""
    import torch

    from recbole_fmrl.model.layers.lru import LRUEncoder
    from recbole_fmrl.model.sequential_recommender.fmrlrec import ItemTower

    torch.manual_seed(seed)
    sizes = [8 * 2**k for k in range(8)] if dim == 1024 else [8, 16, 32, 64, 128, 256]
    features = {"text": torch.randn(n_items, feature_dim), "image": torch.randn(n_items, feature_dim)}
    tower = ItemTower(n_items, dim, features, use_id_embedding=False, freeze_features=True)
    encoder = LRUEncoder(sizes, 1, dropout=0.6, attn_dropout=0.6, r_min=0.0, r_max=0.1)
    params = [*tower.parameters(), *encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    seq = torch.randint(1, n_items, (batch, length + 1))
    mask = torch.ones(batch, length, dtype=torch.bool)
    targets = seq[:, 1:][mask]
    weights = torch.full((len(sizes),), 1.0 / len(sizes))
    dropout = torch.nn.Dropout(0.6)

    def step():
        optimizer.zero_grad(set_to_none=True)
        items = tower()
        hidden = encoder.forward_packed(dropout(items[seq[:, :-1][mask]]), mask)
        loss_fn(hidden, items, targets, sizes, weights).backward()
        optimizer.step()

    return step


def _official_step(code: str, n_items=12_101, batch=32, length=50, dim=1024, feature_dim=1024, seed=0):
    """The same step with the official fMRLRec model code (``model/lru.py`` of a checkout of
    github.com/yueqirex/fMRLRec at ``code``; not shipped here): its ``LRUModel`` (blocks + the K concatenated
    score matrices), its embedding path (frozen text/image lookups, one projector, dropout) and its trainer's
    loss (cross-entropy over the K stacked logit matrices)."""
    import importlib.util
    from types import SimpleNamespace

    import torch

    spec = importlib.util.spec_from_file_location("official_lru", Path(code) / "model" / "lru.py")
    official = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(official)
    torch.manual_seed(seed)
    sizes = [8 * 2**k for k in range(8)]
    args = SimpleNamespace(
        mrl_hidden_sizes=sizes,
        lru_num_blocks=1,
        lru_use_bias=True,
        lru_dropout=0.6,
        lru_attn_dropout=0.6,
        lru_r_min=0.0,
        lru_r_max=0.1,
    )
    text = torch.nn.Embedding.from_pretrained(torch.randn(n_items, feature_dim), freeze=True, padding_idx=0)
    image = torch.nn.Embedding.from_pretrained(torch.randn(n_items, feature_dim), freeze=True, padding_idx=0)
    projector = torch.nn.Linear(2 * feature_dim, dim)
    model = official.LRUModel(args)
    dropout = torch.nn.Dropout(0.6)
    optimizer = torch.optim.AdamW([*projector.parameters(), *model.parameters()], lr=1e-4)
    seq = torch.randint(1, n_items, (batch, length + 1))
    inputs, labels = seq[:, :-1], seq[:, 1:]
    ce = torch.nn.CrossEntropyLoss(ignore_index=0)

    def step():
        optimizer.zero_grad(set_to_none=True)
        x = dropout(projector(torch.cat([text(inputs), image(inputs)], dim=-1)))
        weight = projector(torch.cat([text.weight, image.weight], dim=-1))
        logits = model(x, weight, inputs > 0)
        ce(logits.view(-1, logits.size(-1)), labels.repeat(len(sizes), 1).view(-1)).backward()
        optimizer.step()

    return step


def bench_nested_loss(args) -> dict:
    """The D=1024 paper step: fused vs reference loss vs the GEMM floor (and the official model code's step
    when ``--official_code`` names a checkout of it), interleaved, median seconds and paired ratios."""
    import statistics

    from recbole_fmrl.model.layers.nested_loss import nested_cross_entropy, nested_cross_entropy_reference

    variants = {
        "fused": _paper_step(nested_cross_entropy),
        "fused_no_item_tiles": _paper_step(_with_constants(nested_cross_entropy, ITEM_TILE=0)),
        "reference": _paper_step(nested_cross_entropy_reference),
        "gemm_floor": _paper_step(_gemm_floor_loss),
        "gemm_floor_items_major": _paper_step(functools.partial(_gemm_floor_loss, items_major=True)),
    }
    if args.official_code:
        variants["official"] = _official_step(args.official_code)
    compared = _compared_loss(getattr(args, "compare_code", None))
    if compared:
        variants["fused_compared"] = _paper_step(compared)
    times = _interleaved_times(variants, args.repeats + 2)
    med = {name: statistics.median(t) for name, t in times.items()}
    floor = min(("gemm_floor", "gemm_floor_items_major"), key=med.get)  # the floor is the faster layout
    out = {
        "setting": "1 LRU block, 32 x 50 positions, 12,101 items, 1024+1024-d features, D=1024, 8 sizes",
        "step_s": med,
        "floor": floor,
        "fused_over_gemm_floor": med["fused"] / med[floor],
        "reference_over_fused": med["reference"] / med["fused"],
        "no_item_tiles_over_gemm_floor": med["fused_no_item_tiles"] / med[floor],
        "paired": {
            "fused_over_gemm_floor": _paired_ratio(times, "fused", floor),
            "no_item_tiles_over_gemm_floor": _paired_ratio(times, "fused_no_item_tiles", floor),
            "no_item_tiles_over_fused": _paired_ratio(times, "fused_no_item_tiles", "fused"),
        },
        "repeats": args.repeats + 2,
        "times_s": times,
    }
    if "official" in med:
        out["official_over_fused"] = med["official"] / med["fused"]
        out["paired"]["official_over_fused"] = _paired_ratio(times, "official", "fused")
    if compared:
        out["compared_code"] = str(Path(args.compare_code).resolve())
        out["compared_over_gemm_floor"] = med["fused_compared"] / med[floor]
        out["paired"]["compared_over_gemm_floor"] = _paired_ratio(times, "fused_compared", floor)
        out["paired"]["compared_over_fused"] = _paired_ratio(times, "fused_compared", "fused")
    return out


def _loss_alone_steps(
    dim: int, sizes: list[int], rows: int = 1600, n_items: int = 12_101, compared=None
) -> dict:
    """Steps of the loss alone on random rows and items (see ``bench_loss_alone``)."""
    import torch

    from recbole_fmrl.model.layers import nested_loss

    torch.manual_seed(0)
    query = torch.randn(rows, dim, requires_grad=True)
    items = (0.1 * torch.randn(n_items, dim)).requires_grad_()
    targets = torch.randint(1, n_items, (rows,))
    weights = torch.full((len(sizes),), 1.0 / len(sizes))

    def step(loss_fn, **kwargs):
        def run():
            query.grad = items.grad = None
            loss_fn(query, items, targets, sizes, weights, **kwargs).backward()

        return run

    fused = nested_loss.nested_cross_entropy
    steps = {
        "fused": step(fused),
        "fused_no_sub_rows": step(_with_constants(fused, SUB_COLUMNS=0)),
        "fused_no_item_tiles": step(_with_constants(fused, ITEM_TILE=0)),
        "gemm_floor": step(_gemm_floor_loss),
        "gemm_floor_items_major": step(_gemm_floor_loss, items_major=True),
    }
    if compared:
        steps["fused_compared"] = step(compared)
    return steps


def bench_loss_alone(args) -> dict:
    """The loss alone, without the encoder both steps share: the fused loss as it is, without its leading
    blocks' forward in row sub-chunks (``SUB_COLUMNS = 0``), without its wide blocks' forward in item tiles
    (``ITEM_TILE = 0``), and the GEMM floor loss in its faster layout, interleaved in one process, at the
    D=1024 step's shape (8 sizes) and the CPU profile's (D=256, 6 sizes): 1,600 rows, 12,101 items, random
    queries and items."""
    import statistics

    out = {}
    compared = _compared_loss(getattr(args, "compare_code", None))
    for dim, sizes in ((1024, [8 * 2**k for k in range(8)]), (256, [8, 16, 32, 64, 128, 256])):
        times = _interleaved_times(_loss_alone_steps(dim, sizes, compared=compared), args.repeats + 2)
        med = {name: statistics.median(t) for name, t in times.items()}
        floor = min(("gemm_floor", "gemm_floor_items_major"), key=med.get)
        out[f"D{dim}"] = {
            "loss_s": med,
            "floor": floor,
            "fused_over_gemm_floor": med["fused"] / med[floor],
            "no_sub_rows_over_fused": med["fused_no_sub_rows"] / med["fused"],
            "no_item_tiles_over_fused": med["fused_no_item_tiles"] / med["fused"],
            "paired": {
                "fused_over_gemm_floor": _paired_ratio(times, "fused", floor),
                "no_sub_rows_over_fused": _paired_ratio(times, "fused_no_sub_rows", "fused"),
                "no_item_tiles_over_fused": _paired_ratio(times, "fused_no_item_tiles", "fused"),
            },
            "times_s": times,
        }
        if compared:
            paired = out[f"D{dim}"]["paired"]
            paired["compared_over_fused"] = _paired_ratio(times, "fused_compared", "fused")
            paired["compared_over_gemm_floor"] = _paired_ratio(times, "fused_compared", floor)
    return out


def bench_loss_memory(args) -> dict:
    """Peak RSS of one D=256 step on 100,000 synthetic items, fused vs reference, one process each."""
    out = {}
    for variant in ("fused", "reference"):
        cmd = [sys.executable, "-m", "benchmarks.run", f"--child=memory_{variant}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        if proc.returncode != 0:
            out[variant] = {"failed": proc.stderr[-500:]}
            continue
        out[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    if "peak_extra_mb" in out.get("fused", {}):
        out["fused_peak_over_budget"] = out["fused"]["peak_extra_mb"] / out["fused"]["budget_mb"]
    return out


def _memory_step(variant: str) -> dict:
    import torch

    from recbole_fmrl.model.layers.lru import LRUEncoder
    from recbole_fmrl.model.layers.nested_loss import (
        auto_chunk_size,
        nested_cross_entropy,
        nested_cross_entropy_reference,
    )
    from recbole_fmrl.trainer import fused_optimizer_supported

    torch.manual_seed(0)
    n_items, dim, sizes, batch, length = 100_000, 256, [8, 16, 32, 64, 128, 256], 128, 50
    lengths = torch.randint(1, length + 1, (batch,)).clamp(max=torch.randint(3, 20, (batch,)))
    mask = torch.arange(length) < lengths.unsqueeze(1)  # Beauty-like: about 9 valid positions per row
    seq = torch.randint(1, n_items, (batch, length))
    width = int(lengths.max())  # fMRLRec.encode trims each batch to its longest sequence
    mask, seq = mask[:, :width], seq[:, :width]
    baseline = _peak_rss_mb()
    items_param = torch.nn.Parameter(torch.randn(n_items, dim) * 0.02)
    encoder = LRUEncoder(sizes, 1, dropout=0.6, attn_dropout=0.6, r_min=0.0, r_max=0.1)
    params = [items_param, *encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=fused_optimizer_supported(params))  # as the trainer
    loss_fn = nested_cross_entropy if variant == "fused" else nested_cross_entropy_reference
    weights = torch.full((len(sizes),), 1.0 / len(sizes))
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        hidden = encoder.forward_packed(items_param[seq[mask]], mask)
        loss_fn(hidden, items_param, seq[mask], sizes, weights).backward()
        optimizer.step()
    param_mb = sum(p.numel() for p in params) * 4 / 2**20
    chunk_mb = (len(sizes) + 1) * auto_chunk_size(n_items, len(sizes)) * n_items * 4 / 2**20
    budget = 4 * param_mb + chunk_mb  # parameters + gradients + AdamW's two moments + the loss scratch
    return {
        "items": n_items,
        "D": dim,
        "positions": int(mask.sum()),
        "peak_extra_mb": _peak_rss_mb() - baseline,
        "params_grads_adam_mb": 4 * param_mb,
        "loss_scratch_mb": chunk_mb if variant == "fused" else None,
        "budget_mb": budget,
    }


def _beauty_or_sample(args) -> tuple[str, dict]:
    if (Path(args.data_path) / "amazon-beauty" / "amazon-beauty.inter").is_file():
        return "amazon-beauty", {"data_path": args.data_path}
    return "mm-sample", {}


# The CPU profile as benchmarks/MEASURED.md's timings were taken with it: trained text features, no ID
# embedding, batch 256 (the profile before it switched to frozen features + IDs, then to batch 64). Pinned so
# those numbers stay reproducible; it is also the costlier tower (the feature table gets gradients).
TIMED_PROFILE = {"freeze_features": False, "use_id_embedding": False, "train_batch_size": 256}


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
        config_dict={"state": "WARNING", "show_progress": False, **TIMED_PROFILE, **extra},
        cli_args=[],
    )
    init_seed(config["seed"], True)
    data = create_dataset(config)
    train, valid, test = data_preparation(config, data)
    model = get_model("fMRLRec")(config, train._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], "fMRLRec")(config, model)
    return config, model, trainer, train, test


def bench_train_modes(args) -> dict:
    """fMRLRec (CPU profile) training time per epoch: all_positions with the fused loss, with the reference
    loss, and RecBole's prefix samples (timed steps x batches)."""
    import torch

    from recbole_fmrl.data.training_windows import last_windows
    from recbole_fmrl.model.layers.nested_loss import nested_cross_entropy_reference
    from recbole_fmrl.model.sequential_recommender import fmrlrec

    dataset, extra = _beauty_or_sample(args)
    out = {"dataset": dataset}
    fused = fmrlrec.nested_cross_entropy
    reference = lambda q, e, t, s, w, _chunk: nested_cross_entropy_reference(q, e, t, s, w)  # noqa: E731
    for name, mode, loss in (
        ("all_positions", "all_positions", fused),
        ("all_positions_reference_loss", "all_positions", reference),
        ("prefix", "prefix", fused),
    ):
        fmrlrec.nested_cross_entropy = loss
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
        out[name] = {
            "batches_per_epoch": len(loader),
            "samples_per_epoch": len(loader._dataset),
            "step_s": per_step,
            "epoch_s_estimate": per_step * len(loader),
            "timed_steps": len(times),
        }
    fmrlrec.nested_cross_entropy = fused
    out["fused_over_reference_epoch_time"] = (
        out["all_positions"]["epoch_s_estimate"] / out["all_positions_reference_loss"]["epoch_s_estimate"]
    )
    out["all_positions_over_prefix_epoch_time"] = (
        out["all_positions"]["epoch_s_estimate"] / out["prefix"]["epoch_s_estimate"]
    )
    return out


def bench_eval_sizes(args) -> dict:
    """All-sizes evaluation (one pass; fused scores, the default, and each size's exact GEMM) vs one-size
    evaluation (RecBole's, and the plugin's evaluator on the full size alone), and scoring latency per size."""
    from recbole_fmrl.evaluation import evaluate_all_sizes, size_costs

    dataset, extra = _beauty_or_sample(args)
    config, model, trainer, train, test = _build(dataset, extra)
    trainer.eval_collector.data_collect(train)
    one = _median_time(lambda: trainer.evaluate(test, load_best_model=False), args.repeats)
    every = _median_time(lambda: evaluate_all_sizes(trainer, test), args.repeats)
    config["mrl_eval_scoring"] = "exact"  # each size's own GEMM, as its export computes it
    exact = _median_time(lambda: evaluate_all_sizes(trainer, test), args.repeats)
    config["mrl_eval_scoring"] = "fused"
    sizes, model.mrl_sizes = model.mrl_sizes, model.mrl_sizes[-1:]  # the full size alone, same evaluator
    try:
        own_one = _median_time(lambda: evaluate_all_sizes(trainer, test), args.repeats)
    finally:
        model.mrl_sizes = sizes
    costs = size_costs(model, test, config["device"])
    topk = _topk_times(model, test, config, args.repeats)
    return {
        "dataset": dataset,
        "sizes": model.mrl_sizes,
        "one_size_eval_s": one,
        "all_sizes_eval_s": every,
        "all_over_one": every / one,
        "all_sizes_exact_eval_s": exact,
        "exact_all_over_one": exact / one,
        # RecBole's one-size path builds a dense [users, items] hit matrix and runs torch.topk; the plugin's
        # evaluator does neither, so part of the margin above is that, not the fused scores.
        "one_size_plugin_evaluator_s": own_one,
        "all_over_one_plugin_evaluator": every / own_one,
        "per_size": costs,
        **topk,
    }


def _topk_times(model, test, config, repeats: int) -> dict:
    """torch.topk vs the evaluator's strided-block top-k on one test batch's full-size scores."""
    import torch

    from recbole_fmrl.evaluation.topk import topk_indices

    k = max(config["topk"])
    interaction = next(iter(test))[0].to(config["device"])
    with torch.no_grad():
        scores = model.full_sort_predict(interaction).reshape(len(interaction), -1)
    torch_s = _median_time(lambda: torch.topk(scores, k, dim=-1), repeats)
    block_s = _median_time(lambda: topk_indices(scores, k), repeats)
    return {
        "topk_batch": list(scores.shape),
        "torch_topk_ms": 1000 * torch_s,
        "block_topk_ms": 1000 * block_s,
        "block_over_torch_topk": block_s / torch_s,
    }


def run_one(name: str, args) -> dict:
    if name.startswith("memory_"):
        return _memory_step(name.removeprefix("memory_"))
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
    parser.add_argument(
        "--official_code",
        default=None,
        help="a checkout of github.com/yueqirex/fMRLRec: nested_loss also times its model code's step",
    )
    parser.add_argument(
        "--compare_code",
        default=None,
        help="another checkout of this repo (git worktree add DIR <commit>): nested_loss and loss_alone also "
        "time its fused loss, paired with this one's",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import recbole_fmrl  # noqa: F401  (compat fixes)

    if args.child:
        print(json.dumps(run_one(args.child, args)))
        return 0
    if args.official_code and not (Path(args.official_code) / "model" / "lru.py").is_file():
        print(
            f"--official_code={args.official_code}: no model/lru.py there; pass the folder of a checkout of "
            "github.com/yueqirex/fMRLRec, or leave the option out.",
            file=sys.stderr,
        )
        return 2
    compared = Path(args.compare_code or ".") / "recbole_fmrl" / "model" / "layers" / "nested_loss.py"
    if args.compare_code and not compared.is_file():
        print(
            f"--compare_code={args.compare_code}: no recbole_fmrl/model/layers/nested_loss.py there; pass the "
            "folder of another checkout of this repo (git worktree add DIR <commit>), or leave the option out.",
            file=sys.stderr,
        )
        return 2
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
        if args.official_code:
            cmd.append(f"--official_code={Path(args.official_code).resolve()}")
        if args.compare_code:
            cmd.append(f"--compare_code={Path(args.compare_code).resolve()}")
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
