"""Benchmarks and machine checks of this project.

    python bench/throughput.py            tutorial loop vs HF Trainer vs this tool (throughput.py, children.py,
                                          child.py, the *_loop.py modules, measure.py, tables.py, workload.py)
    bash bench/gpu_check.sh OUT --part N  every GPU-only check, in two calls (the gpu_check package)
"""
