"""Every benchmark in bench/ runs in its --quick mode on the tiny benchmark and writes the JSON its README cites.

    python -m pytest tests/unit/test_bench_smoke.py -q

The scripts are run in this process (as `main(argv)`), so each takes seconds; the figures of a quick run mean
nothing, but the code paths that produce bench/README.md's numbers are the ones exercised here.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
MICRO = "timelit-micro-ViT"

pytestmark = pytest.mark.slow


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):
    """Import a bench script by name, with bench/ on sys.path (its helpers are imported as top-level modules)."""
    monkeypatch.syspath_prepend(str(BENCH))
    threads = torch.get_num_threads()

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module

    yield load
    torch.set_num_threads(threads)


def written(out: Path, name: str) -> dict:
    report = json.loads((out / f"{name}.json").read_text())
    assert report["benchmark"] == name and report["machine"]["cores"] >= 1
    return report


def test_train_overhead(bench, tiny_benchmark: Path, tmp_path: Path) -> None:
    args = ["--quick", "--data-root", str(tiny_benchmark), "--model", MICRO, "--batch-size", "16"]
    bench("train_overhead").main([*args, "--micro-model", "", "--out", str(tmp_path), "--tmp", str(tmp_path)])
    report = written(tmp_path, "train_overhead")
    variants = {row["variant"]: row for row in report["rows"]}
    now = {"in-memory", "shards, 0 workers", "shards, 1 workers (runs alternated)"}
    assert set(variants) == now | {f"{name}, before fixes" for name in now}
    for row in variants.values():
        assert row["timelit_steps_per_s"] > 0 and row["plain_steps_per_s"] > 0
    assert {row["variant"] for row in report["before_vs_now"]} == now
    assert all(row["before_over_now"] > 0 for row in report["before_vs_now"])
    in_memory = report["variants"]["in-memory"][0]
    # Both sides were timed on every block after the warm-up: the comparison is side by side.
    assert in_memory["timelit_steps"] > 0 and in_memory["plain_steps"] > 0 and in_memory["block_ratios"]


def test_train_overhead_bare_lightning(bench, tiny_benchmark: Path, tmp_path: Path) -> None:
    args = ["--quick", "--data-root", str(tiny_benchmark), "--micro-model", MICRO, "--variants", "bare"]
    bench("train_overhead").main([*args, "--out", str(tmp_path), "--tmp", str(tmp_path)])
    (row,) = written(tmp_path, "train_overhead")["rows"]
    assert row["variant"] == "micro model, batch 16, bare Lightning"
    assert row["timelit_steps_per_s"] > 0 and row["plain_steps_per_s"] > 0


def test_optimizer_step(bench, tiny_benchmark: Path, tmp_path: Path) -> None:
    bench("optimizer_step").main(["--quick", "--data-root", str(tiny_benchmark), "--out", str(tmp_path),
                                  "--tmp", str(tmp_path)])  # fmt: skip
    report = written(tmp_path, "optimizer_step")
    assert set(report["step_alone_ms"]) == {"default", "foreach", "fused"}
    assert all(ms > 0 for runs in report["step_alone_ms"].values() for ms in runs)
    assert {k: len(v) for k, v in report["fit_step_ms"].items()} == {"false": 1, "true": 1}
    assert report["summary"]["fit_unfused_over_fused"] > 0


def test_data_pipeline(bench, tiny_benchmark: Path, tmp_path: Path) -> None:
    bench("data_pipeline").main(["--quick", "--data-root", str(tiny_benchmark), "--out", str(tmp_path),
                                 "--tmp", str(tmp_path)])  # fmt: skip
    report = written(tmp_path, "data_pipeline")
    throughput = report["throughput"]
    assert throughput["tar_check"]["identical"] and throughput["tar_check"]["samples_compared"] > 0
    assert all(row["samples_per_s"] > 0 for row in throughput["rows"])
    assert [(row["pipeline"], row["undone"]) for row in throughput["before_vs_now"]] == [
        ("0 workers", "before fixes (torch.manual_seed, tarfile)")
    ]
    assert {row["shards"].split()[0] for row in report["memory"]["rows"]} == {"1x", "2x"}
    assert all(row["peak_tree_pss_mb"] > 0 for row in report["memory"]["rows"])
    hires = report["hires"]
    assert hires["mean_jpeg_bytes"] > 0 and all(n >= 1 for n in hires["workers_needed"].values())
    assert "ESTIMATE" in hires["gpu"]["source"] or "measured" in hires["gpu"]["source"]
    side = report["side_by_side"]  # naive vs today vs new on the same JPEGs, and the workers one GPU needs
    assert len(side["ms_per_sample"]) == 3 and all(ms > 0 for ms in side["ms_per_sample"].values())
    assert all(n >= 1 for rates in side["workers_per_gpu"].values() for n in rates.values())
    assert side["new_vs_today_first_batch_levels"]["max_abs"] <= 6.5


def test_before_fixes_puts_the_old_behaviour_back_and_restores(bench) -> None:
    """BeforeFixes patches the names timelit's modules call (torch.manual_seed-based seeding, tarfile, logging at
    every step) and puts the current ones back on exit."""
    bench("train_overhead")  # puts bench/ on sys.path for _fit
    import _fit

    import timelit.data.loaders as loaders
    import timelit.data.shards as shards
    import timelit.training.callbacks.budget as budget
    import timelit.training.model as model

    names = [(loaders, "seed_torch_cpu"), (model, "seed_step"), (model, "reaches_logger"),
             (budget, "reaches_logger"), (shards, "tar_members")]  # fmt: skip
    now = [getattr(module, name) for module, name in names]
    with _fit.BeforeFixes():
        assert loaders.seed_torch_cpu is torch.manual_seed
        assert model.reaches_logger(None) and budget.reaches_logger(None)
        assert shards.tar_members(b"\0" * 1024) is None
        torch_state = torch.get_rng_state()
        model.seed_step(7)
        first = torch.rand(1)
        model.seed_step(7)
        assert torch.equal(torch.rand(1), first)
        torch.set_rng_state(torch_state)
    assert [getattr(module, name) for module, name in names] == now
    with _fit.BeforeFixes(seeding=False, logging=False):
        assert loaders.seed_torch_cpu is now[0] and shards.tar_members is not now[4]
    assert [getattr(module, name) for module, name in names] == now


def test_task_boundary(bench, tmp_path: Path) -> None:
    bench("task_boundary").main(["--quick", "--out", str(tmp_path), "--tmp", str(tmp_path), "--margin-gb", "0"])
    report = written(tmp_path, "task_boundary")
    rows = {(row["protocol"], row["N"]): row for row in report["rows"]}
    assert set(rows) == {(p, n) for p in ("ft/ft", "ema/ema", "zs/all average", "all/all TIES") for n in ("3", "5")}
    assert all(row["boundary total s"] > 0 for row in rows.values())
    assert rows[("ema/ema", "5")]["EMA s"] > 0 and rows[("ft/ft", "5")]["all merge s"] == 0
    assert rows[("all/all TIES", "5")]["all merge s"] > 0
    assert not list(tmp_path.glob("task_boundary_*")), "the experts' temporary folder is removed"


def test_eval_cost(bench, tiny_benchmark: Path, tmp_path: Path) -> None:
    bench("eval_cost").main(["--quick", "--data-root", str(tiny_benchmark), "--out", str(tmp_path)])
    report = written(tmp_path, "eval_cost")
    # Four prepare calls: first build, same weights, visual change, text change: the cache saved two builds.
    assert report["quickstart"]["median"]["head_builds"] == 2
    fomo = report["fomo_in_flux"]
    assert fomo["prompts_adapt"] > 1000 and fomo["cpu_rebuild_all_s_ESTIMATE"] > 0


def test_gpu_throughput(bench, tiny_benchmark: Path, tmp_path: Path) -> None:
    bench("gpu_throughput").main(["--quick", "--data-root", str(tiny_benchmark), "--out", str(tmp_path),
                                  "--tmp", str(tmp_path)])  # fmt: skip
    report = written(tmp_path, "gpu_throughput")
    assert [row["side"] for row in report["rows"]] == ["timelit fit", "plain loop"]
    assert report["best"]["samples_per_s"] > 0
    if not torch.cuda.is_available():
        assert report["rows"][0]["mfu"] is None and "CPU" in report["note"]


def test_boundary_incremental(bench, tmp_path: Path) -> None:
    bench("boundary_incremental").main(["--quick", "--out", str(tmp_path), "--tmp", str(tmp_path)])
    report = written(tmp_path, "boundary_incremental")
    assert [(r["t"], r["identical"]) for r in report["results"]] == [(3, True), (5, True)]
    assert all(r["full_s"] > 0 and r["incremental_s"] > 0 and r["state_mb"] > 0 for r in report["results"])
    assert not list(tmp_path.glob("boundary_incremental_*")), "the experts' temporary folder is removed"


def test_quickstart_fresh(bench, tiny_benchmark: Path, tmp_path: Path) -> None:
    keep = tmp_path / "fresh"
    bench("quickstart_fresh").main(["--quick", "--data-root", str(tiny_benchmark), "--out", str(tmp_path),
                                    "--keep", str(keep)])  # fmt: skip
    report = written(tmp_path, "quickstart_fresh")
    [run] = report["runs"]
    assert run["total_s"] > 0 and run["fit_s"] == run["total_s"], "the benchmark was there: the whole run is the fit"
    assert run["GM_final"] > 0 and run["peak_rss_mb"] > 0
    folder = Path(run["folder"])
    # The run saw an empty home and an empty working folder: it wrote its runs/ there, nowhere else.
    assert (folder / "work" / "runs" / "quickstart" / "results.json").exists()
    assert not (folder / "home" / ".cache" / "timelit" / "quickstart").exists()
