"""Benchmarks and machine checks of this project.

    python bench/throughput.py          tutorial loop vs HF Trainer vs this tool (see throughput.py)
    bash bench/gpu_check.sh OUT         every GPU-only check in one command (see gpu_check.py)
"""
