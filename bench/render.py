"""Print the benchmarks' JSON results (bench/results/*.json) as the markdown docs/RESULTS.md quotes.

    .venv/bin/python bench/render.py [bench/results/aggregation.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import benchlib


def machine(doc: dict) -> str:
    m = doc["machine"]
    return (f"`{doc['command']}` · {doc['finished_utc']} · {m['uname_m']} {m['cpu_model']}, nproc {m['nproc']}, "
            f"torch {m['torch']} ({m['threads']} threads) · before: `{m['uptime_before']}` · after: `{m['uptime_after']}`")


def targets(doc: dict) -> list[str]:
    return [f"- {t['metric']}: **{t['measured']:.4g}** (target {t['op']} {t['value']:g}: {'met' if t['met'] else '**not met**'})" for t in doc["targets"]]


def aggregation(doc: dict) -> list[str]:
    r = doc["results"]
    out = ["| method | layers run | upload MB | aggregate s | floor s | ratio | s / round at 128 layers | plans s |", "|---|---|---|---|---|---|---|---|"]
    for m, x in r["methods"].items():
        out.append(f"| `{m}` | {x['layers']} | {x['upload_mb']:.1f} | {x['aggregate_median_s']:.3f} | {x['floor_median_s']:.3f} | "
                   f"{x['ratio']:.2f} | {x['aggregate_median_s'] * 128 / x['layers']:.2f} | {x['plans_median_s']:.3f} |")
    return out


def flexlora_svd(doc: dict) -> list[str]:
    r = doc["results"]
    s = r["seconds"]
    return [f"d = {r['shape']['d_out']}, Σr = {r['shape']['sum_r']}: low-rank SVD {s['lowrank_median'] * 1e3:.1f} ms, dense (form + SVD) "
            f"{s['dense_median']:.2f} s, ratio **{r['speedup_dense_over_lowrank']:.0f}×**; largest relative singular-value difference "
            f"{r['max_rel_diff_singular_values']:.2e}, rank-64 truncation {r['rel_diff_rank64_truncation']:.2e}."]


def train_throughput(doc: dict) -> list[str]:
    r = doc["results"]
    out = [f"{r['steps']} steps × batch {r['batch_size']}, rank {r['rank']}, {r['repeats']} runs of each side at each precision:", "",
           "| precision | real tokens per run | fedlora tok/s | plain PEFT tok/s | ratio |", "|---|---|---|---|---|"]
    for name, x in r["precisions"].items():
        out.append(f"| {name} | {x['tokens_per_run']} | {x['fedlora_tokens_per_s']:.1f} | {x['plain_peft_tokens_per_s']:.1f} | **{x['ratio']:.3f}** |")
    return out


def memory_clients(doc: dict) -> list[str]:
    out = ["| sampled clients | peak RSS MiB | wall s |", "|---|---|---|"]
    out += [f"| {x['clients']} | {x['peak_rss_mib']:.0f} | {x['wall_s']:.0f} |" for x in doc["results"]["rows"]]
    return out


def communication(doc: dict) -> list[str]:
    out = ["| method | ranks | MB up / round | MB down / round | up + down vs full | FLoRA paper |", "|---|---|---|---|---|---|"]
    for m, x in doc["results"]["methods"].items():
        ranks = f"all {x['one_rank']}" if x["one_rank"] else ",".join(map(str, x["ranks"] or []))
        ratio = "—" if x["ratio_to_full"] is None else f"{x['ratio_to_full']:.3f}"
        out.append(f"| `{m}` | {ranks} | {x['mb_up']:.2f} | {x['mb_down']:.2f} | {ratio} | {x['paper_ratio'] or '—'} |")
    return out


def rounds(doc: dict) -> list[str]:
    r = doc["results"]
    out = ["| method | layer | server s, round 2 → 50 → 200 | client prep s, round 2 → 200 | state MB, round 2 → 50 → 200 | "
           "checkpoint MB, round 200 | MB down per client, round 2 → 200 | RSS MB, round 2 → 200 |", "|---|---|---|---|---|---|---|---|"]
    for m, x in r["methods"].items():
        a = {int(k): v for k, v in x["at"].items()}
        last = max(a)
        mid = a.get(50, a[last])
        out.append(
            f"| `{m}` | {x.get('d', r['d'])}² | {a[2]['server_s']:.3f} → {mid['server_s']:.3f} → {a[last]['server_s']:.3f} "
            f"| {a[2]['client_prep_s']:.3f} → {a[last]['client_prep_s']:.3f} "
            f"| {a[2]['state_bytes'] / 1e6:.1f} → {mid['state_bytes'] / 1e6:.1f} → {a[last]['state_bytes'] / 1e6:.1f} "
            f"| {a[last]['checkpoint_bytes'] / 1e6:.1f} | {a[2]['down_bytes_per_client'] / 1e6:.2f} → {a[last]['down_bytes_per_client'] / 1e6:.2f} "
            f"| {a[2]['rss_mb']:.0f} → {a[last]['rss_mb']:.0f} |"
        )
    return out


def main() -> None:
    paths = [Path(p) for p in sys.argv[1:]] or sorted(benchlib.RESULTS.glob("*.json"))
    for p in paths:
        doc = json.loads(p.read_text())
        body = globals().get(doc["benchmark"])
        print(f"### {doc['benchmark']}{' (quick)' if doc.get('quick') else ''}\n")
        print("\n".join([machine(doc), "", *targets(doc), "", *(body(doc) if body else [])]) + "\n")


if __name__ == "__main__":
    main()
