"""GFLOPs per training step on the meta device, against the FoMo-in-Flux reference table; the budget arithmetic."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from timelit.commands.budget import budget_command
from timelit.training.flops import StepCost, measure_step, steps_for_budget

# FoMo-in-Flux README table (images/gflops.png): ViT-B/16, 224 px, 512 samples per step, full fine-tuning.
REFERENCE_GFLOPS_PER_STEP = 63394.7585
REFERENCE_TOTAL_GFLOPS = 1.8e9
REFERENCE_STEPS = {20: 1420, 50: 568, 100: 284, 200: 142}


@pytest.fixture(scope="module")
def vit_b16() -> StepCost:
    return measure_step("ViT-B-16", 512)


def test_vit_b16_step_matches_the_reference(vit_b16: StepCost) -> None:
    assert (vit_b16.image_size, vit_b16.context_length, vit_b16.batch_size) == ((224, 224), 77, 512)
    assert vit_b16.gflops == pytest.approx(REFERENCE_GFLOPS_PER_STEP, rel=0.02)
    # The one remaining difference is open_clip's ClipLoss computing text @ image^T as a second product (forward
    # and its two backward products) where the reference transposes the first: 3 x 2 x 512^3 FLOPs.
    assert vit_b16.gflops - REFERENCE_GFLOPS_PER_STEP == pytest.approx(3 * 2 * 512**3 / 1e9, abs=1e-3)


def test_reference_budget_gives_the_reference_steps(vit_b16: StepCost) -> None:
    steps = {t: steps_for_budget(REFERENCE_TOTAL_GFLOPS / t, vit_b16.gflops) for t in REFERENCE_STEPS}
    assert steps == REFERENCE_STEPS


def test_measuring_is_cheap_and_leaves_torch_as_it_was() -> None:
    sdpa, rng = F.scaled_dot_product_attention, torch.get_rng_state()
    start = time.perf_counter()
    cost = measure_step("ViT-B-16", 2048)  # 4x the reference batch: nothing is allocated or computed
    assert time.perf_counter() - start < 60
    assert cost.gflops == pytest.approx(4 * REFERENCE_GFLOPS_PER_STEP, rel=0.02)
    # Attention is routed back, and no random number was drawn (a run's seeds are unaffected).
    assert F.scaled_dot_product_attention is sdpa and torch.equal(torch.get_rng_state(), rng)


def test_fused_attention_counts_the_recomputed_scores() -> None:
    fused, math = measure_step("timelit-tiny-ViT", 64, "fused"), measure_step("timelit-tiny-ViT", 64, "math")
    forward = fused.by_op["aten._scaled_dot_product_efficient_attention"]
    # Forward: Q K^T and P V, as the math path's two batched products; backward: the math path's four products
    # plus Q K^T again.
    assert forward == pytest.approx(math.by_op["aten.bmm"] / 3)
    assert fused.by_op["aten._scaled_dot_product_efficient_attention_backward"] == pytest.approx(2.5 * forward)
    assert fused.gflops - math.gflops == pytest.approx(0.5 * forward)
    assert fused.forward_gflops == pytest.approx(math.forward_gflops)


def test_backward_costs_twice_the_forward_except_the_patch_embedding() -> None:
    cost = measure_step("timelit-tiny-ViT", 64, "math")
    # The images need no gradient: the patch-embedding convolution has a weight gradient only.
    conv = cost.by_op["aten.convolution"]
    assert cost.backward_gflops == pytest.approx(2 * cost.forward_gflops - conv)


def test_cost_per_sample_does_not_depend_on_the_batch_but_for_the_loss() -> None:
    small, large = measure_step("timelit-tiny-ViT", 64), measure_step("timelit-tiny-ViT", 256)
    # Everything but the B x B similarity matrix is per sample; ClipLoss spends 3 x 2 products of B x B x D.
    loss = {b: 3 * 2 * 2 * b * b * 128 / 1e9 for b in (64, 256)}
    assert (large.gflops - loss[256]) / 256 == pytest.approx((small.gflops - loss[64]) / 64, rel=1e-9)


def test_model_shape_comes_from_its_config() -> None:
    cost = measure_step("timelit-micro-ViT", 8)
    assert (cost.image_size, cost.context_length) == ((16, 16), 12)


def test_unknown_model_names_the_close_ones() -> None:
    with pytest.raises(ValueError, match="Did you mean 'ViT-B-16'"):
        measure_step("ViT-B-61", 512)


def test_budget_rounding() -> None:
    assert steps_for_budget(1.8e9 / 20, REFERENCE_GFLOPS_PER_STEP) == 1420
    assert steps_for_budget(1.8e9 / 20, REFERENCE_GFLOPS_PER_STEP, "floor") == 1419
    assert steps_for_budget(1.0, 1.0) == 1
    with pytest.raises(ValueError, match=r"budget of 0\.9 GFLOPs is smaller than one training step \(1 GFLOPs\)"):
        steps_for_budget(0.9, 1.0)


def test_budget_command_prints_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    budget_command(model_name="ViT-B-16", batch_size=512, total_gflops=1.8e9, num_tasks=50)
    out = capsys.readouterr().out
    assert "63,395.56 GFLOPs (123.8195 per sample)" in out
    assert "568 steps per task (290,816 samples), 28,400 steps (14,540,800 samples) in total" in out
    table = out.split("tasks   GFLOPs/task")[1].splitlines()[1:]
    rows = {int(line.split()[0]): line.split()[2] for line in table}
    assert rows == {t: f"{s:,}" for t, s in REFERENCE_STEPS.items()}


def test_budget_table_columns_stay_apart_for_huge_budgets(capsys: pytest.CaptureFixture[str]) -> None:
    budget_command(model_name="timelit-micro-ViT", batch_size=8, total_gflops=1e15, num_tasks=1)
    out = capsys.readouterr().out
    header, row = out.split("\n\n")[1].splitlines()[:2]
    assert header.split() == ["tasks", "GFLOPs/task", "steps/task", "samples/task", "total", "steps", "samples"]
    table = out.split("\n\n")[1].splitlines()[1:]
    for row in table:
        cells = row.split()
        assert len(cells) == 6, row  # six figures, none run into its neighbour
        tasks, steps = int(cells[0]), int(cells[2].replace(",", ""))
        assert tasks in (20, 50, 100, 200) and steps > 10**14 and cells[3] == f"{steps * 8:,}", row
        assert len(row) == len(header), "rows and the header line up"
    # Before the columns widened, a row read "2050,000,000,000,0004,331,998,846,648,627...": one token.


def test_budget_command_reads_a_run_config_and_its_budget_fragment(capsys: pytest.CaptureFixture[str]) -> None:
    budget_command(fit_config=["quickstart.yaml", "budget/quickstart.yaml"])
    out = capsys.readouterr().out
    assert out.startswith("timelit-tiny-ViT: 32x32 px, context 16, global batch 64")
    assert "budget (config)" in out and "100 steps per task (6,400 samples)" in out
    assert "conflicts" not in out


def test_budget_command_flags_a_budget_below_one_step(capsys: pytest.CaptureFixture[str]) -> None:
    budget_command(model_name="timelit-micro-ViT", batch_size=8, gflops_per_task=1e-4)
    assert "less than one step: a task needs at least" in capsys.readouterr().out


def test_meta_device_holds_no_parameters() -> None:
    from timelit.training.flops import build_meta_model

    model = build_meta_model("ViT-B-16")
    assert {p.device for p in model.parameters()} == {torch.device("meta")}


def test_budget_command_runs_as_a_jsonargparse_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    from jsonargparse import CLI

    args = ["budget", "--model_name", "timelit-micro-ViT", "--batch_size", "8", "--gflops_per_task", "1", "--table"]
    CLI({"budget": budget_command}, args=[*args, "[3]"], as_positional=False)
    out = capsys.readouterr().out
    cost = measure_step("timelit-micro-ViT", 8)
    assert f"{steps_for_budget(1.0, cost.gflops):,} steps per task" in out
    assert [line.split()[0] for line in out.split("tasks   GFLOPs/task")[1].splitlines()[1:]] == ["3"]


def test_budget_command_refuses_two_budgets() -> None:
    with pytest.raises(ValueError, match="both set; choose one"):
        budget_command(model_name="timelit-micro-ViT", total_gflops=1.0, gflops_per_task=1.0)
