"""Dense float64 references for the diagnostics: what §2 of the specification defines, computed naively."""

import torch

from fedlora.ops.weights import data_weights
from fedlora.federation.diagnostics import init_noise
from fedlora.train.client import start_delta

from tests.conftest import random_update


def dense(delta, name, layers):
    """Σ B A of one layer's terms as a dense float64 matrix."""
    d_out, d_in = layers[name]
    out = torch.zeros(d_out, d_in, dtype=torch.float64)
    for t in delta.get(name, []):
        out += t.dense().double()
    return out


def dense_agg_noise(before, after, starts, updates, w, layers):
    """‖G_{t+1} − (G_t + Δ*_t)‖_F / ‖Δ*_t‖_F with every matrix formed densely."""
    err2 = ideal2 = 0.0
    for name in layers:
        g0, g1 = dense(before, name, layers), dense(after, name, layers)
        ideal = sum(p * (dense(s, name, layers) + u.scale * u.factors[name].B @ u.factors[name].A - g0) for s, u, p in zip(starts, updates, w))
        err2 += float(torch.linalg.norm(g1 - g0 - ideal)) ** 2
        ideal2 += float(torch.linalg.norm(ideal)) ** 2
    return (err2 / ideal2) ** 0.5


def run_round(method, states, sampled, ranks, scales, gen, rnd, layers):
    """One simulated round: plans, catch-up, init noise, clients' factors = initial + a random step, aggregation."""
    before = method.global_delta()
    plans = {k: method.plan(k, rnd) for k in sampled}
    starts, inits = [], []
    for k in sampled:
        states[k].catch_up(plans[k])
        starts.append(start_delta(states[k], plans[k]))
        inits.append(init_noise(before, starts[-1], plans[k]))
    updates = []
    for k in sampled:
        u = random_update(k, layers, ranks[k], scales[k], 10 + 7 * k, gen)
        if plans[k].init:
            for n, f in plans[k].init.items():
                u.factors[n].B.add_(f.B.double())
                u.factors[n].A.add_(f.A.double())
        updates.append(u)
    w = data_weights([u.num_examples for u in updates])
    method.aggregate(updates, w, rnd)
    return before, method.global_delta(), starts, updates, w, inits
