"""Collect several `prag eval` output directories into one markdown table and one F1 plot.

python scripts/summarize.py runs/popqa50 runs/hotpotqa50 runs/2wikimultihopqa50 --plot docs/f1_by_dataset.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="directories holding metrics.json")
    parser.add_argument("--plot", help="write a grouped bar chart of F1 per mode and dataset here")
    args = parser.parse_args()
    metrics = [json.loads((Path(run) / "metrics.json").read_text()) for run in args.runs]
    modes = list(metrics[0]["modes"])

    print("| dataset | n | recall@k | " + " | ".join(f"{m} F1" for m in modes) + " |")
    print("|---|---|---|" + "---|" * len(modes))
    for m in metrics:
        recall = m["retrieval"]["recall@k"]
        cells = [m["dataset"], str(m["n"]), "n/a" if recall is None else f"{recall:.3f}"]
        cells += [f"{m['modes'][mode]['f1']:.3f}" for mode in modes]
        print("| " + " | ".join(cells) + " |")
    print("\n## EM, F1 and latency per mode (ms; retrieval, load+merge, generation are means)\n")
    print("| dataset | mode | EM | F1 | p50 ms | p95 ms | retrieval ms | load+merge ms | generation ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in metrics:
        for mode in modes:
            r = m["modes"][mode]
            lat, parts = r["latency_ms"], r["latency_ms"]["parts"]
            print(
                f"| {m['dataset']} | {mode} | {r['em']:.3f} | {r['f1']:.3f} | {lat['p50']:.0f} | {lat['p95']:.0f} | "
                f"{parts['retrieval']['mean']:.1f} | {parts['load_merge']['mean']:.1f} | "
                f"{parts['generation']['mean']:.0f} |"
            )
    print("\n## Offline cost (augmentation + LoRA training, batched)\n")
    print("| dataset | documents parameterized | offline seconds per document |")
    print("|---|---|---|")
    for m in metrics:
        off = m.get("offline", {})
        print(f"| {m['dataset']} | {off.get('documents_parameterized')} | {off.get('parameterize_s_per_doc')} |")

    if args.plot:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 3.5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        width = 0.8 / len(modes)
        for i, mode in enumerate(modes):
            xs = [j + i * width for j in range(len(metrics))]
            ax.bar(xs, [m["modes"][mode]["f1"] for m in metrics], width, label=mode)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))], [m["dataset"] for m in metrics])
        ax.set_ylabel("token F1")
        ax.set_title(f"F1 per mode, {metrics[0]['model']}, top-{metrics[0]['top_k']}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
