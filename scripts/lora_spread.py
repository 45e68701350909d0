"""How alike are documents' LoRAs? For the translator's generated LoRAs (of the top-k documents of some
questions) and for the trained LoRAs it learned from: each document's delta B A of one module, its distance
to the mean delta relative to the mean's norm, and the norms. Generated LoRAs that all sit near their mean
carry little of their document, and a sum of k of them is k times that mean (docs/results.md, DyPRAG).

python scripts/lora_spread.py --home H --dataset ../shared/data/qa/2wikimultihopqa/dev.jsonl --limit 8
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from prag import Config, Pipeline
from prag import translator as dyprag
from prag.evaluate import load_questions
from prag.protocols import apply_protocol, dataset_name, protocol_settings


def spread(deltas: torch.Tensor) -> dict:
    """deltas: (n, ...) -> each one's distance to their mean over the mean's norm, and the norms."""
    mean = deltas.mean(0)
    relative = [((d - mean).norm() / mean.norm()).item() for d in deltas]
    return {
        "n": len(deltas),
        "distance_to_mean_over_mean_norm": {
            "median": round(float(torch.tensor(relative).median()), 4),
            "max": round(max(relative), 4),
        },
        "mean_delta_norm": round(mean.norm().item(), 4),
        "median_delta_norm": round(float(deltas.flatten(1).norm(dim=1).median()), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--home", required=True)
    parser.add_argument("--dataset", required=True, help="questions whose top-k documents are translated")
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--module", default="up_proj")
    args = parser.parse_args()

    config = apply_protocol(Config(), protocol_settings(dataset_name(args.dataset)))
    pipeline = Pipeline(Path(args.home), config)
    questions = load_questions(args.dataset, offset=args.offset, limit=args.limit)
    k = config.answer.top_k
    documents = list({p.id: p for q in questions for p in pipeline.retrieve(q.question, k)}.values())

    def delta(adapter: dict) -> torch.Tensor:
        return torch.einsum("lor,lri->loi", adapter[f"{args.module}.B"].float(), adapter[f"{args.module}.A"].float())

    generated = pipeline.translator.adapters(pipeline.llm, documents, config.train.max_length)
    _, info = dyprag.load(pipeline.translator_path)
    trained_ids = info["document_ids"][: len(documents)]
    result = {
        "module": args.module,
        "generated": spread(torch.stack([delta(a) for a in generated])),
        "trained (the translator's training documents)": spread(
            torch.stack([delta(pipeline.adapters.get(i)) for i in trained_ids])
        ),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
