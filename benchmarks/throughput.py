"""Training throughput of peftbench beside the plain transformers + PEFT loop (same as ``peftbench bench``).

    python benchmarks/throughput.py --arch bert-base-chinese --precisions bf16 --lengths fixed,tnews
"""

from peftbench.bench import main, parse_args

if __name__ == "__main__":
    raise SystemExit(main(parse_args(prog="benchmarks/throughput.py")))
