"""scripts/compare.py on two small `prag eval` directories: the paired table for every mode, or for the
baselines alone when the candidate answered only `closed` and `rag`."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare.py"


def write_run(run: Path, f1: dict[str, list[float]]) -> None:
    run.mkdir(parents=True)
    rows = [{"id": f"q{i}", "mode": mode, "f1": v} for mode, values in f1.items() for i, v in enumerate(values)]
    (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "metrics.json").write_text(json.dumps({"n": len(next(iter(f1.values())))}))


def compare(tmp_path: Path, *extra: str) -> str:
    args = [sys.executable, str(SCRIPT), "--a", str(tmp_path / "a-{dataset}"), "--b", str(tmp_path / "b-{dataset}")]
    done = subprocess.run(
        [*args, "--labels", "plain", "base", "--datasets", "popqa", *extra], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_baselines_only_are_compared_mode_by_mode(tmp_path):
    write_run(tmp_path / "a-popqa", {"closed": [0, 0, 0, 0], "rag": [0, 0, 1, 0]})
    write_run(tmp_path / "b-popqa", {"closed": [0, 0, 0, 0], "rag": [1, 1, 1, 1]})
    out = compare(tmp_path, "--plot", str(tmp_path / "f1.png"))
    assert "| popqa | rag | 0.250 | 1.000 | +0.750 [" in out  # b - a, then its bootstrap interval
    assert "| popqa | mean of the 2 | 0.125 | 0.500 | +0.375 |" in out
    assert (tmp_path / "f1.png").stat().st_size > 0


def test_every_mode_gives_right_minus_unrelated(tmp_path):
    modes = ("closed", "rag", "prag", "combine", "prag-unrelated", "combine-unrelated")
    write_run(tmp_path / "a-popqa", {m: [0, 0] for m in modes})
    write_run(tmp_path / "b-popqa", {**{m: [0, 0] for m in modes}, "prag": [1, 1]})
    out = compare(tmp_path)
    assert "| popqa | +0.000 [+0.000, +0.000] | +1.000 [+1.000, +1.000] |" in out  # prag right - unrelated
    assert "| popqa | prag | 0.000 | 1.000 | +1.000 [+1.000, +1.000] |" in out


def test_baselines_come_from_whichever_recipe_answered_them(tmp_path):
    modes = ("closed", "rag", "prag", "combine", "prag-unrelated", "combine-unrelated")
    write_run(tmp_path / "a-popqa", {**{m: [0, 0] for m in modes}, "rag": [1, 0]})
    write_run(tmp_path / "b-popqa", {m: [1, 1] for m in modes[2:]})  # a training option: parametric modes alone
    out = compare(tmp_path, "--plot", str(tmp_path / "f1.png"))
    assert "| popqa | 2 | 0.000 | 0.500 | 0.000 | 1.000 | +1.000 [+1.000, +1.000] |" in out  # closed, rag from a
    assert "| popqa | +1.000 [+1.000, +1.000] | +0.500 [" in out  # b: prag - closed, prag - rag
    assert (tmp_path / "f1.png").stat().st_size > 0


def test_no_baselines_in_either_recipe_is_an_error(tmp_path):
    write_run(tmp_path / "a-popqa", {"prag": [0, 0], "combine": [0, 0]})
    write_run(tmp_path / "b-popqa", {"prag": [1, 1], "combine": [1, 1]})
    args = [sys.executable, str(SCRIPT), "--a", str(tmp_path / "a-{dataset}"), "--b", str(tmp_path / "b-{dataset}")]
    done = subprocess.run([*args, "--datasets", "popqa"], capture_output=True, text=True)
    assert done.returncode != 0 and "neither recipe's run answered both `closed` and `rag`" in done.stderr
