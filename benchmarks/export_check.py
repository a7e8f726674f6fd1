"""Export check on a trained checkpoint: the size-D export gives the nested model's top-10 for every test user.

    python -m benchmarks.export_check --model_file=saved/fMRLRec-....pth --size=64 [--output=/tmp/sub.pth]
Writes benchmarks/runs/export_check.json (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_file", required=True)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)

    from recbole_fmrl.cli import export
    from recbole_fmrl.quick_start import load_data_and_model

    output = args.output or str(Path(args.model_file).with_suffix(f".size{args.size}.pth"))
    cmd = [f"--model_file={args.model_file}", f"--size={args.size}", f"--output={output}", "--trust"]
    assert export.main(cmd) == 0
    _, nested, _, _, _, test_data = load_data_and_model(args.model_file, trust=True)
    _, small, _, _, _, _ = load_data_and_model(output)
    nested.eval(), small.eval()
    k = nested.mrl_sizes.index(args.size)
    users = same = 0
    max_diff = 0.0
    t_nested = t_small = 0.0
    with torch.no_grad():
        for batch, *_ in test_data:
            start = time.perf_counter()
            expected = nested.full_sort_predict_sizes(batch)[k]
            t_nested += time.perf_counter() - start
            start = time.perf_counter()
            got = small.full_sort_predict(batch).view_as(expected)
            t_small += time.perf_counter() - start
            expected[:, 0] = got[:, 0] = -float("inf")  # padding item, as RecBole masks it
            same += int((got.topk(10).indices == expected.topk(10).indices).all(dim=1).sum())
            finite = torch.isfinite(expected)
            max_diff = max(max_diff, float((got - expected)[finite].abs().max()))
            users += len(expected)
    result = {
        "model_file": args.model_file,
        "size": args.size,
        "test_users": users,
        "identical_top10_users": same,
        "max_abs_score_diff": max_diff,
        "full_checkpoint_bytes": os.path.getsize(args.model_file),
        "exported_bytes": os.path.getsize(output),
        "nested_all_sizes_scoring_s": t_nested,
        "exported_scoring_s": t_small,
    }
    result["shrink"] = result["full_checkpoint_bytes"] / result["exported_bytes"]
    out = Path(__file__).resolve().parent / "runs" / "export_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if same == users else 1


if __name__ == "__main__":
    sys.exit(main())
