"""The human-readable table of a `sluice bench train` report (the JSON line stays the record)."""

from __future__ import annotations

from typing import TextIO


def _cell(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _rows(report: dict) -> list[tuple]:
    """(label, s/step, optimizer s, tok/s, MFU, peak GiB) of each timed phase in the report."""
    rows = [("sluice train_step", report["train_step_s"], report.get("optimizer_s"), report["train_tok_s"],
             report["mfu"], report["peak_memory_gib"])]
    if "old_logprobs_s" in report:
        rows.append(("sluice old logprobs", report["old_logprobs_s"], None, report["old_logprobs_tok_s"],
                     report["old_logprobs_mfu"], report["peak_memory_gib"]))
    if "hf" in report and "error" not in report["hf"]:
        hf = report["hf"]
        rows.append((f"HF loop ({hf['micro_batch_size']} rows/mb)", hf["train_step_s"], hf.get("optimizer_s"),
                     hf["train_tok_s"], hf["mfu"], hf["peak_memory_gib"]))
    return rows


def print_table(report: dict, out: TextIO) -> None:
    batching = report["batching"]
    layout = (f"packed, {batching['max_tokens_per_gpu']} tokens per micro-batch" if batching["packed"]
              else f"padded, {batching['micro_batch_size']} rows per micro-batch")
    print(f"sluice bench train: {report['model_shape']} on {report['device']}, {report['train_dtype']}, "
          f"commit {report['commit']}", file=out)
    print(f"{report['tokens_per_step']:,} tokens per step; {layout}: {batching['num_micro_batches']} micro-batches, "
          f"{batching['computed_tokens']:,} tokens computed", file=out)
    print(f"{'phase':<28}{'s/step':>9}{'optim s':>9}{'tok/s':>11}{'MFU':>8}{'peak GiB':>10}", file=out)
    for label, seconds, optimizer, tok_s, mfu, peak in _rows(report):
        print(f"{label:<28}{seconds:>9.3f}{_cell(optimizer, '.3f'):>9}{tok_s:>11,.0f}{_cell(mfu, '.1%'):>8}"
              f"{_cell(peak, '.2f'):>10}", file=out)
    if "error" in report.get("hf", {}):
        print(f"HF loop ({report['hf']['micro_batch_size']} rows/mb): {report['hf']['error']}", file=out)
    if "speedup_vs_hf" in report:
        print(f"speedup vs HF (train_step): {report['speedup_vs_hf']:.2f}x", file=out)
    print(f"MFU = {report['mfu_formula']}, N = {report['matmul_params']:,}, peak = {report['peak_tflops']} TFLOP/s",
          file=out)
