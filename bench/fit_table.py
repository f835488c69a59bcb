"""The README's fit table: every paper config on the slices it is meant for, compiled ahead of time.

    python bench/fit_table.py [--only=sni_t5_lm.py:base@v5e-8,...] [--stage=finetune]

Runs `launch/compile.py` once per (config, slice, stage) and prints one markdown row per compiled program: GiB per chip
(total against HBM), whether it fits in 90%, TFLOP per chip per step and the roofline step time. Each program
of XL / XXL takes minutes to compile on a small CPU machine; `--only` and `--stage` cut the matrix down.
Exits 1 when any program does not fit.
"""
import argparse
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `python bench/fit_table.py`: find the repo

from tagi_jax.config import load_config  # noqa: E402
# The slices issue 12 asks each size to fit (v5e, and the v4 alternative).
MATRIX = [(f"{name}:{size}", slice_) for name in ("sni_t5_lm.py", "p3_t0.py")
          for size, slices in (("base", ("v5e-8",)), ("xl", ("v5e-32", "v4-16")), ("xxl", ("v5e-256", "v4-128")))
          for slice_ in slices]


def table_row(config: str, topology: str, line: str) -> str | None:
    """launch/compile.py's line for one compiled program as a markdown row (None for any other line)."""
    parts = line.split()
    if len(parts) >= 12 and parts[-1].endswith("s") and parts[-2].endswith("ms"):
        stage_name, program = parts[0], " ".join(parts[1:-10])
        total, hbm, fits, tflop, roofline = parts[-6], parts[-5], parts[-4], parts[-3], parts[-2]
        return (f"| {config} | {topology} | {stage_name} | {program} | {total} / {hbm} | {fits} | {tflop} | "
                f"{roofline} |")
    return None


def rows(config: str, topology: str, stage: str) -> tuple[list[str], int]:
    """Compile one (config, slice); each program's row is printed as soon as it is compiled (minutes apart)."""
    cmd = [sys.executable, os.path.join(REPO, "launch", "compile.py"), f"--config={REPO}/configs/{config}",
           f"--topology={topology}"] + ([f"--stage={stage}"] if stage else [])
    table = []
    with tempfile.TemporaryFile("w+") as stderr:  # a file, not a pipe: a full stderr pipe would stall the child
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True) as proc:
            for line in proc.stdout:
                row = table_row(config, topology, line)
                if row is not None:
                    table.append(row)
                    print(row, flush=True)
        stderr.seek(0)
        err = stderr.read().strip().splitlines()
    if proc.returncode not in (0, 1) or not table:
        table.append(f"| {config} | {topology} | - | - | - | error: {err[-1] if err else proc.returncode} | - | - |")
        print(table[-1], flush=True)
    return table, proc.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated config@slice pairs, e.g. sni_t5_lm.py:xl@v5e-32")
    parser.add_argument("--stage", default="", help="comma-separated stages (default: every stage)")
    args = parser.parse_args()
    matrix = [tuple(p.split("@", 1)) for p in args.only.split(",") if p] if args.only else MATRIX
    if any(len(p) != 2 for p in matrix):
        print("error: --only takes config@slice pairs, e.g. sni_t5_lm.py:xl@v5e-32", file=sys.stderr)
        return 2
    print("| config | slice | stage | program | GiB per chip (total / HBM) | fits (90%) | TFLOP per chip | roofline |")
    print("|---|---|---|---|---|---|---|---|")
    status = 0
    for config, topology in matrix:
        # One process a stage: the TPU compiler's host memory grows with every program a process compiles (over
        # 20 GB by T5-Base's third stage), and a stage that fails does not take the others' rows with it.
        for stage in (args.stage.split(",") if args.stage else pipeline_stages(config)):
            _, code = rows(config, topology, stage)
            status = max(status, 1 if code else 0)
    return status


def pipeline_stages(config: str) -> tuple[str, ...]:
    """The `pipeline.stages` of a configs/ file (with its :size)."""
    return tuple(load_config(os.path.join(REPO, "configs", config)).pipeline.stages)


if __name__ == "__main__":
    sys.exit(main())
