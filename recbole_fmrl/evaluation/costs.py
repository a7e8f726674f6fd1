"""What each nesting size costs when served: exported parameters, state size, scoring latency."""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
import torch

from recbole_fmrl.submodel.export import checkpoint_size_bytes, export_submodel, parameter_counts


@torch.no_grad()
def size_costs(model, eval_data, device, n_batches: int = 5, repeats: int = 3) -> OrderedDict[int, dict]:
    """Per size: parameters of the exported sub-model, its state size, and scoring latency per user batch."""
    batches = []
    for i, (interaction, *_rest) in enumerate(eval_data):
        if i >= n_batches:
            break
        batches.append(interaction.to(device))
    costs = OrderedDict()
    for size in model.mrl_sizes:
        sub = export_submodel(model, size).eval()
        sub.full_sort_predict(batches[0])  # warm-up
        timings = []
        for _ in range(repeats):
            for batch in batches:
                start = time.perf_counter()
                sub.full_sort_predict(batch)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                timings.append(time.perf_counter() - start)
        params = parameter_counts(sub)
        costs[size] = {
            "params_encoder": params["encoder"],
            "params_item_tower": params["item_tower"],
            "state_bytes": checkpoint_size_bytes(sub),
            "latency_ms_per_batch": 1000 * float(np.median(timings)),
            "batch_users": int(len(batches[0])),
        }
    return costs
